"""ShardedEMA in one process: values against float64 loops and closed forms, memory, bad input."""

import math

import pytest
import torch
from torch import nn

from shardema import DecaySchedule, ShardedEMA
from shardema._kernels import LerpPlan, lerp_loop_reference


class TwoTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 4))
        self.decoder = nn.Sequential(nn.Linear(4, 3))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))


def _perturb(model, generator):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
        for b in model.buffers():
            if b.dtype.is_floating_point:
                b.add_(torch.randn(b.shape, generator=generator, dtype=b.dtype))
            else:
                b.add_(1)


def _float64_reference(model, factors, steps, decay_fn, blend_buffers=False):
    """EMA of the same trajectory as a plain float64 per-tensor loop."""
    generator = torch.Generator().manual_seed(1)
    names = [n for n, _ in model.named_parameters()]
    if blend_buffers:
        names += [n for n, b in model.named_buffers() if b.dtype.is_floating_point]
    state = dict(model.state_dict())
    ema = {f: {n: state[n].double().clone() for n in names} for f in factors}
    trajectory = []
    for step in range(steps):
        _perturb(model, generator)
        state = dict(model.state_dict())
        for f in factors:
            d = decay_fn(f, step)
            for n in names:
                ema[f][n] = d * ema[f][n] + (1 - d) * state[n].double()
        trajectory.append({n: state[n].clone() for n in state})
    return ema, trajectory


def test_foreach_plan_equals_float64_loop_for_all_factors_and_chunkings():
    torch.manual_seed(0)
    shapes = [(7, 3), (1,), (0, 4), (300,), (2, 2, 2)]
    lives = [torch.randn(s) for s in shapes]
    weights = [0.1, 0.01, 0.5]
    for chunk in (1 << 18, 5):
        shadows = [[torch.randn(s) for s in shapes] for _ in weights]
        expected = [[s.clone() for s in row] for row in shadows]
        LerpPlan(shadows, lives, chunk_numel=chunk, scratch=None).lerp(weights)
        lerp_loop_reference(expected, lives, weights)
        for row, ref_row in zip(shadows, expected):
            for got, ref in zip(row, ref_row):
                torch.testing.assert_close(got, ref, rtol=3e-7, atol=1e-7)  # within fp32 rounding of the exact value


def test_foreach_plan_upcasts_bf16_through_a_bounded_scratch():
    torch.manual_seed(0)
    shapes = [(40, 3), (5,), (64,)]
    lives = [torch.randn(s).bfloat16() for s in shapes]
    weights = [0.25, 0.001]
    shadows = [[torch.randn(s) for s in shapes] for _ in weights]
    expected = [[s.clone() for s in row] for row in shadows]
    scratch = torch.empty(16)  # smaller than the largest tensor: forces chunked batches
    LerpPlan(shadows, lives, chunk_numel=1 << 18, scratch=scratch).lerp(weights)
    lerp_loop_reference(expected, lives, weights)
    for row, ref_row in zip(shadows, expected):
        for got, ref in zip(row, ref_row):
            torch.testing.assert_close(got, ref, rtol=3e-7, atol=1e-7)  # within fp32 rounding of the exact value


@pytest.mark.parametrize("live_dtype, weights", [(torch.float32, [0.1, 0.01, 0.5]), (torch.float32, [0.3]),
                                                 (torch.bfloat16, [0.1, 0.01, 0.5])])
def test_cpu_plan_splits_work_across_threads_and_matches_whole_tensor_lerp(monkeypatch, live_dtype, weights):
    import shardema._kernels as kernels

    monkeypatch.setattr(kernels, "MIN_PARALLEL_NUMEL", 1)
    monkeypatch.setattr(kernels, "CPU_WHOLE_NUMEL", 100_000)
    monkeypatch.setattr(kernels.torch, "get_num_threads", lambda: 3)
    torch.manual_seed(0)
    shapes = [(70001,), (3,), (0, 5), (513, 257), (40, 3)]
    lives = [torch.randn(s).to(live_dtype).requires_grad_() for s in shapes]
    shadows = [[torch.randn(s) for s in shapes] for _ in weights]
    expected = [[s.clone() for s in row] for row in shadows]
    whole = [[s.lerp(live.detach().float(), w) for s, live in zip(row, lives)] for row, w in zip(shadows, weights)]
    scratch = torch.empty(5000) if live_dtype != torch.float32 else None
    plan = LerpPlan(shadows, lives, chunk_numel=1 << 18, scratch=scratch)
    assert len(plan._runs) == 3  # three worker shares
    assert bool(plan._inline) == (len(weights) == 1 and live_dtype == torch.float32)
    plan.lerp(weights)
    lerp_loop_reference(expected, lives, weights)
    for row, ref_row, whole_row in zip(shadows, expected, whole):
        for got, ref, same in zip(row, ref_row, whole_row):
            assert got.grad_fn is None and not got.requires_grad  # pool threads run under no_grad too
            assert torch.equal(got, same)  # bit-identical to one whole-tensor lerp
            torch.testing.assert_close(got, ref, rtol=3e-7, atol=5e-7)


@pytest.mark.parametrize("buffers", ["copy", "average", "ignore"])
def test_ema_matches_float64_reference_over_a_trajectory(buffers):
    torch.manual_seed(0)
    model = TwoTower()
    reference_model = TwoTower()
    reference_model.load_state_dict(model.state_dict())
    factors = [0.9, 0.99, 0.5]
    ema = ShardedEMA(model, factors, buffers=buffers)
    generator = torch.Generator().manual_seed(1)
    for _ in range(12):
        _perturb(model, generator)
        ema.update()
    ref, trajectory = _float64_reference(reference_model, factors, 12, lambda f, s: f,
                                         blend_buffers=buffers == "average")
    assert ema.step == 12
    for f in factors:
        for name, value in ref[f].items():
            torch.testing.assert_close(ema.shadow(f, (None, name)).double(), value, rtol=0, atol=1e-5)
    last = trajectory[-1]
    keys = {t.fqn for t in ema.tracked()}
    if buffers == "ignore":
        assert keys == {n for n, _ in model.named_parameters()}
    else:
        # integer buffers are always copied, never blended; "copy" copies float buffers too
        assert torch.equal(ema.shadow(0.9, (None, "calls")), last["calls"])
        assert ema.shadow(0.9, (None, "calls")).dtype == torch.long
        if buffers == "copy":
            assert torch.equal(ema.shadow(0.5, (None, "encoder.1.running_mean")), last["encoder.1.running_mean"])


def _closed_form_decay(kind, f, n, inv_gamma=1.0, power=2 / 3):
    if kind == "constant":
        return f
    if kind == "warmup":
        return min(f, (1 + n) / (10 + n))
    return min(f, 1 - (1 + n / inv_gamma) ** -power)


@pytest.mark.parametrize("kind,options", [
    ("constant", {}), ("warmup", {}), ("power", {}), ("power", {"inv_gamma": 3.0, "power": 0.75}),
])
def test_schedule_decays_equal_their_closed_form(kind, options):
    schedule = DecaySchedule(kind=kind, **options)
    for n in [0, 1, 2, 5, 10, 100, 10_000, 10**7]:
        for f in (0.9, 0.999, 0.9999):
            assert schedule.decay(f, n) == pytest.approx(_closed_form_decay(kind, f, n, **options), rel=1e-12)
    assert DecaySchedule(kind="warmup").decay(0.9999, 0) == pytest.approx(0.1)
    assert DecaySchedule(kind="power").decay(0.9999, 0) == 0.0


def _live_value(step: int) -> torch.Tensor:
    """The live weight during update call ``step`` (a different value at every step)."""
    base = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    return base * math.cos(0.7 * step) + 0.3 * step


@pytest.mark.parametrize("kind,update_every,start_step", [
    ("constant", 1, 0), ("warmup", 1, 0), ("power", 1, 0), ("constant", 3, 0), ("warmup", 2, 4), ("constant", 1, 5),
    ("warmup", 1, 3), ("power", 1, 5), ("power", 2, 3),
])
def test_ema_of_a_changing_live_weight_equals_the_closed_form_recursion(kind, update_every, start_step):
    """The live weight changes before every call; the shadow follows the float64 recursion whose decay at
    call ``step`` is the closed form at ``n = step - start_step`` (tracking before ``start_step``)."""
    model = nn.Linear(3, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(_live_value(-1))
    factors = [0.9, 0.7]
    ema = ShardedEMA(model, factors, schedule=kind, update_every=update_every, start_step=start_step,
                     shadow_dtype=torch.float64)
    expected = {f: _live_value(-1).clone() for f in factors}
    applied = []
    for step in range(17):
        live = _live_value(step)
        with torch.no_grad():
            model.weight.copy_(live)
        decays = ema.current_decays()
        ema.update()
        for f in factors:
            if step < start_step:
                d = 0.0  # tracking: the shadow equals the live weight
            elif (step - start_step) % update_every == 0:
                d = _closed_form_decay(kind, f, step - start_step)
            else:
                d = 1.0  # skipped by update_every
            assert decays[f] == pytest.approx(d, rel=1e-12, abs=0), (step, f)
            expected[f] = d * expected[f] + (1 - d) * live
            if f == factors[0]:
                applied.append(d)
        for f in factors:
            torch.testing.assert_close(ema.shadow(f, (None, "weight")), expected[f], rtol=1e-12, atol=1e-12,
                                       msg=lambda m, s=step, f=f: f"call {s}, factor {f}: {m}")
    # the averaged calls really used different decays (a schedule counting from another step would differ)
    averaged = [d for d in applied if 0.0 < d < 1.0]
    assert len(averaged) >= 4 and (kind == "constant" or len(set(averaged)) > 2)


def test_reset_to_live_sets_every_shadow_to_the_live_weights_and_keeps_the_step():
    torch.manual_seed(0)
    for model, options in [(TwoTower(), {"buffers": "average"}),
                           (nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2)).bfloat16(), {"upcast_buffer_bytes": 64})]:
        factors = [0.9, 0.5]
        ema = ShardedEMA(model, factors, **options)
        generator = torch.Generator().manual_seed(2)
        for _ in range(3):
            _perturb(model, generator)
            ema.update()
        live = {t.key: t.local().detach().clone() for t in ema.tracked()}
        floats = [t for t in ema.tracked() if t.dtype.is_floating_point and not (t.is_buffer and t.dtype == torch.long)]
        assert any(not torch.equal(ema.shadow(0.9, t.key), live[t.key].to(ema.shadow(0.9, t.key).dtype))
                   for t in floats), "the EMA must differ from the live weights before the reset"
        ema.reset_to_live()
        assert ema.step == 3
        for f in factors:
            for t in ema.tracked():
                shadow = ema.shadow(f, t.key)
                assert torch.equal(shadow, live[t.key].to(shadow.dtype)), (f, t.fqn)
        # averaging continues from the live weights
        _perturb(model, generator)
        ema.update()
        for t in floats:
            if ema.shadow(0.5, t.key).dtype == torch.float32 and not t.is_buffer:
                expected = 0.5 * live[t.key].double() + 0.5 * t.local().detach().double()
                torch.testing.assert_close(ema.shadow(0.5, t.key).double(), expected, rtol=0, atol=1e-6)
        with ema.swapped(0.9), pytest.raises(RuntimeError, match="reset_to_live.*inside `with ema.swapped"):
            ema.reset_to_live()


def test_shadow_bytes_are_exactly_local_numel_times_factors_times_dtype():
    model = TwoTower()
    numel = sum(p.numel() for p in model.parameters())
    for dtype, size in [(torch.float32, 4), (torch.float64, 8), (torch.bfloat16, 2)]:
        ema = ShardedEMA(model, [0.9, 0.99, 0.999], shadow_dtype=dtype, buffers="ignore")
        assert ema.shadow_bytes == numel * 3 * size
    ema = ShardedEMA(model, [0.9], buffers="average")
    float_buffers = sum(b.numel() for b in model.buffers() if b.dtype.is_floating_point)
    assert ema.shadow_bytes == (numel + float_buffers) * 4
    assert ema.copied_bytes == 16  # the int64 counter and BatchNorm's num_batches_tracked
    assert ema.upcast_buffer_bytes == 0


def test_bf16_live_with_fp32_shadows_matches_float64_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 3)).bfloat16()
    ema = ShardedEMA(model, [0.99, 0.9], upcast_buffer_bytes=64)  # 16 fp32 elements: many batches
    assert ema.upcast_buffer_bytes == 64
    assert ema.shadow(0.99, (None, "0.weight")).dtype == torch.float32
    ref = {f: {n: p.double().clone() for n, p in model.named_parameters()} for f in (0.99, 0.9)}
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        for f in ref:
            for n, p in model.named_parameters():
                ref[f][n] = f * ref[f][n] + (1 - f) * p.double()
    for f in ref:
        for n in ref[f]:
            torch.testing.assert_close(ema.shadow(f, (None, n)).double(), ref[f][n], rtol=0, atol=1e-5)


def test_model_paths_keys_are_relative_and_wrapper_prefixes_removed():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = TwoTower()
    model.encoder[2] = checkpoint_wrapper(model.encoder[2])
    compiled = torch.compile(model)  # lazily compiled: only the `_orig_mod.` wrapper matters here
    ema = ShardedEMA(compiled, [0.9], model_paths=["encoder", "decoder"], buffers="ignore")
    keys = {(t.model_path, t.fqn) for t in ema.tracked()}
    assert keys == {("encoder", "0.weight"), ("encoder", "0.bias"), ("encoder", "1.weight"), ("encoder", "1.bias"),
                    ("encoder", "2.weight"), ("encoder", "2.bias"), ("decoder", "0.weight"), ("decoder", "0.bias")}
    assert ema.model_paths == ("encoder", "decoder")
    # a wrapped path component may be given or left out
    assert len(ShardedEMA(compiled, 0.9, model_paths="encoder.2").tracked()) == 2
    sd = ema.state_dict()
    assert "ema=0.9/encoder/2.weight" in sd and sd["step"] == 0


def test_frozen_parameters_can_be_skipped():
    model = TwoTower()
    model.decoder.requires_grad_(False)
    with_frozen = {t.fqn for t in ShardedEMA(model, 0.9, buffers="ignore").tracked()}
    without = {t.fqn for t in ShardedEMA(model, 0.9, buffers="ignore", include_frozen=False).tracked()}
    assert with_frozen - without == {"decoder.0.weight", "decoder.0.bias"}
    with pytest.raises(ValueError, match="'decoder' has no parameters.*include_frozen=True"):
        ShardedEMA(model, 0.9, model_paths=["decoder"], include_frozen=False)


def test_state_dict_round_trip_restores_values_step_and_schedule():
    torch.manual_seed(0)
    model = TwoTower()
    ema = ShardedEMA(model, [0.9, 0.99], schedule="warmup")
    _perturb(model, torch.Generator().manual_seed(3))
    ema.update()
    ema.update()
    saved = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in ema.state_dict().items()}
    other = ShardedEMA(TwoTower(), [0.9, 0.99])
    other.load_state_dict(saved)
    assert other.step == 2 and other.schedule.kind == "warmup"
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(other.state_dict()[key], value)
    broken = dict(saved)
    del broken["ema=0.9/model/decoder.0.bias"]
    broken["ema=0.9/model/decoder.0.weight"] = torch.zeros(9, 9)
    broken["ema=0.9/model/nope"] = torch.zeros(1)
    with pytest.raises(RuntimeError) as info:
        other.load_state_dict(broken)
    text = str(info.value)
    assert "missing key ema=0.9/model/decoder.0.bias" in text
    assert "unexpected key ema=0.9/model/nope" in text
    assert "ema=0.9/model/decoder.0.weight: shape (9, 9)" in text


@pytest.mark.parametrize("factors,message", [
    ([1.0], "target factor 1.0 is outside \\(0, 1\\)"),
    ([0.0], "target factor 0.0 is outside"),
    ([-0.5], "target factor -0.5 is outside"),
    ([float("nan")], "target factor nan is outside"),
    ([0.9, 0.99, 0.9], "target factors \\[0.9\\] are given more than once"),
    ([], "target_factors is empty"),
])
def test_bad_factors_are_rejected_naming_the_value(factors, message):
    with pytest.raises(ValueError, match=message):
        ShardedEMA(TwoTower(), factors)


def test_bad_model_paths_are_rejected_with_the_valid_names():
    model = TwoTower()
    with pytest.raises(ValueError, match="unknown model path 'encodr'.*valid children of the model: decoder, encoder"):
        ShardedEMA(model, 0.9, model_paths=["encodr"])
    with pytest.raises(ValueError, match="unknown model path 'encoder.7'.*module 'encoder' has no child '7'.*0, 1, 2"):
        ShardedEMA(model, 0.9, model_paths=["encoder.7"])
    with pytest.raises(ValueError, match="model paths 'encoder' and 'encoder.0' overlap"):
        ShardedEMA(model, 0.9, model_paths=["encoder", "encoder.0"])
    with pytest.raises(ValueError, match="overlap"):
        ShardedEMA(model, 0.9, model_paths=["decoder", None])
    with pytest.raises(ValueError, match="model paths 'decoder' and 'decoder' overlap"):
        ShardedEMA(model, 0.9, model_paths=["decoder", "decoder"])
    with pytest.raises(ValueError, match="'encoder.1' has no parameters"):
        model.encoder[1] = nn.ReLU()
        ShardedEMA(model, 0.9, model_paths=["encoder.1"])


def test_other_bad_options_are_rejected():
    model = TwoTower()
    with pytest.raises(ValueError, match="buffers"):
        ShardedEMA(model, 0.9, buffers="mean")
    with pytest.raises(ValueError, match="schedule.kind"):
        ShardedEMA(model, 0.9, schedule="cosine")
    with pytest.raises(ValueError, match="shadow_dtype=torch.int32"):
        ShardedEMA(model, 0.9, shadow_dtype=torch.int32)
    with pytest.raises(ValueError, match="update_every"):
        ShardedEMA(model, 0.9, update_every=0)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        ShardedEMA({"weight": torch.zeros(1)}, 0.9)
    with pytest.raises(ValueError, match="factor 0.5 is not one of this EMA's target factors \\[0.9\\]"):
        ShardedEMA(model, 0.9).shadow(0.5, (None, "decoder.0.weight"))


def test_update_after_the_parameter_set_changed_names_the_fqn():
    model = TwoTower()
    ema = ShardedEMA(model, 0.9)
    del model.decoder[0]._parameters["bias"]
    with pytest.raises(RuntimeError, match="parameter set changed.*removed model:decoder.0.bias"):
        ema.update()
    model = TwoTower()
    ema = ShardedEMA(model, 0.9)
    model.decoder[0].scale = nn.Parameter(torch.ones(3))
    with pytest.raises(RuntimeError, match="parameter set changed.*added model:decoder.0.scale"):
        ema.update()
    model = TwoTower()
    ema = ShardedEMA(model, 0.9)
    model.decoder[0].weight = nn.Parameter(torch.zeros(7, 4))
    with pytest.raises(RuntimeError, match="'decoder.0.weight'.*local shape \\(7, 4\\).*expected \\(3, 4\\)"):
        ema.update()


def test_registering_tensors_the_ema_does_not_track_is_not_an_error():
    model = TwoTower()
    ema = ShardedEMA(model, 0.5, buffers="ignore", include_frozen=False)
    model.decoder[0].register_buffer("cache", torch.ones(2), persistent=False)
    model.decoder[0].register_buffer("stats", torch.ones(2))  # ignored buffers policy
    model.decoder[0].frozen = nn.Parameter(torch.ones(2), requires_grad=False)
    before = ema.shadow(0.5, (None, "decoder.0.bias")).clone()
    with torch.no_grad():
        model.decoder[0].bias.add_(1.0)  # the live weight moves away from the shadow: the decay matters
    ema.update()
    ema.update()  # the refreshed counts are used from now on
    torch.testing.assert_close(ema.shadow(0.5, (None, "decoder.0.bias")), before * 0.25 + model.decoder[0].bias * 0.75)


def test_torch_compile_of_a_ddp_model_is_unwrapped(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        compiled = torch.compile(DistributedDataParallel(nn.Sequential(nn.Linear(2, 2))))
        assert {t.fqn for t in ShardedEMA(compiled, 0.9).tracked()} == {"0.weight", "0.bias"}
    finally:
        dist.destroy_process_group()


def test_a_strict_load_that_fails_changes_nothing():
    model = TwoTower()
    ema = ShardedEMA(model, 0.9)
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in ema.state_dict().items()}
    state["ema=0.9/model/encoder.0.weight"].fill_(7.0)
    state["step"] = 99
    del state["ema=0.9/model/decoder.0.bias"]
    before = ema.shadow(0.9, (None, "encoder.0.weight")).clone()
    with pytest.raises(RuntimeError, match="missing key ema=0.9/model/decoder.0.bias"):
        ema.load_state_dict(state)
    assert torch.equal(ema.shadow(0.9, (None, "encoder.0.weight")), before) and ema.step == 0
    ema.load_state_dict(state, strict=False)  # loads what matches
    assert ema.shadow(0.9, (None, "encoder.0.weight")).eq(7.0).all() and ema.step == 99


def test_current_decays_follow_the_schedule():
    ema = ShardedEMA(nn.Linear(1, 1), [0.9], update_every=2, start_step=1)
    seen = []
    for _ in range(4):
        seen.append(ema.current_decays()[0.9])
        ema.update()
    assert seen == [0.0, 0.9, 1.0, 0.9]  # copy, update, skipped, update


def test_a_replaced_parameter_of_the_same_shape_is_followed():
    model = nn.Linear(2, 2)
    initial = model.weight.detach().clone()
    ema = ShardedEMA(model, 0.5, buffers="ignore")
    model.weight = nn.Parameter(torch.full((2, 2), 4.0))  # a new object: the cached plan is rebuilt
    ema.update()
    torch.testing.assert_close(ema.shadow(0.5, (None, "weight")), 0.5 * initial + 0.5 * 4.0)


def test_a_skipped_call_leaves_the_shadows_and_refreshes_the_copied_buffers():
    """update_every=2: the call in between keeps every averaged shadow as it was, while
    copied tensors (float buffers under "copy", integer buffers) take the live values."""
    torch.manual_seed(0)
    model = TwoTower()
    ema = ShardedEMA(model, [0.9], buffers="copy", update_every=2)
    generator = torch.Generator().manual_seed(3)
    _perturb(model, generator)
    ema.update()  # call 0 fires
    averaged = {name: ema.shadow(0.9, (None, name)).clone() for name, _ in model.named_parameters()}
    _perturb(model, generator)
    ema.update()  # call 1 skips
    for name, before in averaged.items():
        assert torch.equal(ema.shadow(0.9, (None, name)), before), name
    live = dict(model.named_buffers())
    for name in ("encoder.1.running_mean", "encoder.1.running_var", "encoder.1.num_batches_tracked", "calls"):
        assert torch.equal(ema.shadow(0.9, (None, name)), live[name]), name
    assert int(live["calls"]) == 2
