"""Single-process tests of the EMA swap (no process group: one rank is the world)."""

import pickle

import pytest
import torch
from torch import nn

import shardema
from shardema import DEFAULT_EXCHANGE_BUFFER_BYTES, EMAState, ShardedEMA
from shardema._swap import SwapAbortedError, _Swap

FACTORS = [0.9, 0.99]


def _net(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    return net.to(dtype)


def _train(model: nn.Module, ema: ShardedEMA, steps: int, seed: int = 1):
    """Perturb the weights, run BN forwards, update the EMA; return float64 references.

    Returns (reference EMA per factor, buffers at the last update, average of buffers per factor).
    """
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    ref = {f: {n: p.detach().double().clone() for n, p in params.items()} for f in FACTORS}
    buf_avg = {f: {n: b.detach().double().clone() for n, b in model.named_buffers() if b.is_floating_point()}
               for f in FACTORS}
    buffers_at_update = {}
    for _ in range(steps):
        model.train()
        with torch.no_grad():
            for p in params.values():
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype))
            model(torch.randn(8, 4, generator=gen).to(next(model.parameters()).dtype))
        ema.update()
        buffers_at_update = {n: b.detach().clone() for n, b in model.named_buffers()}
        for f in FACTORS:
            for n, p in params.items():
                ref[f][n] = f * ref[f][n] + (1 - f) * p.detach().double()
            for n, b in model.named_buffers():
                if b.is_floating_point():
                    buf_avg[f][n] = f * buf_avg[f][n] + (1 - f) * b.detach().double()
    # Move the live buffers away from their update-time value: the swap must put those back.
    with torch.no_grad():
        model(torch.randn(8, 4, generator=gen).to(next(model.parameters()).dtype))
    model.eval()
    return ref, buffers_at_update, buf_avg


def _snapshot(model: nn.Module) -> dict:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def _shadows(ema: ShardedEMA) -> dict:
    return {(f, t.key): ema.shadow(f, t.key).clone() for f in ema.target_factors for t in ema.tracked()}


def _assert_bit_exact(model: nn.Module, snapshot: dict, ema: ShardedEMA, shadows: dict) -> None:
    for name, value in model.state_dict().items():
        assert torch.equal(value, snapshot[name]), f"live {name} not restored bit-exact"
    for (f, key), value in shadows.items():
        assert torch.equal(ema.shadow(f, key), value), f"shadow {f} {key} changed by the swap"


def _reference_forward(weights: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
    ref = _net(torch.float64).eval()
    state = {n: w.double() for n, w in weights.items()}
    state.update({n: b.double() if b.is_floating_point() else b for n, b in buffers.items()})
    ref.load_state_dict(state)
    return ref(x.double())


@pytest.mark.parametrize("exchange_buffer_bytes", [None, 12])
def test_in_place_swap_matches_float64_reference_and_restores_bit_exact(exchange_buffer_bytes):
    model = _net()
    ema = ShardedEMA(model, FACTORS)
    ref, buffers, _ = _train(model, ema, steps=4)
    x = torch.randn(6, 4)
    snapshot, shadows = _snapshot(model), _shadows(ema)
    live_out = model(x)
    with ema.swapped(0.99, exchange_buffer_bytes=exchange_buffer_bytes) as info:
        assert ema.state is EMAState.SWAPPED
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.double(), ref[0.99][name], rtol=0, atol=1e-6)
        for name, b in model.named_buffers():
            assert torch.equal(b, buffers[name]), f"buffer {name} is not its value at the last update()"
        torch.testing.assert_close(model(x).double(), _reference_forward(ref[0.99], buffers, x),
                                   rtol=1e-5, atol=1e-5)
    assert ema.state is EMAState.IDLE
    _assert_bit_exact(model, snapshot, ema, shadows)
    assert torch.equal(model(x), live_out)
    # Parameters are exchanged in place; buffers (small) are always backed up.
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    widest = max(p.element_size() for p in model.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    assert info.mode == "in_place" and info.backup_bytes == buffer_bytes and not info.backup_on_host
    assert info.num_tensors == len(model.state_dict())
    expected = max(min(exchange_buffer_bytes or DEFAULT_EXCHANGE_BUFFER_BYTES, total), widest)
    assert info.exchange_buffer_bytes == expected and info.extra_bytes == expected + buffer_bytes
    assert info.factor == 0.99 and info.model_paths == (None,)


def test_tiny_scratch_makes_many_batches_that_straddle_tensors():
    model = _net()
    ema = ShardedEMA(model, FACTORS)
    _train(model, ema, steps=2)
    swap = _Swap(ema.store, 1, ema.tracked(), scratch_limit=12, backup_to_host=False)
    float_numel = sum(p.numel() for p in model.parameters())
    float_batches = [b for b in swap.batches if b[1] == torch.float32]
    assert len(float_batches) == len(swap.batches) == -(-float_numel // 3)  # 12 bytes = 3 fp32 elements
    assert any(len(segments) > 1 for _, _, segments in float_batches)  # segments of two tensors
    assert swap.scratch[torch.device("cpu")].numel() == 12
    buffers = {i for i, t in enumerate(swap.targets) if t.is_buffer}
    assert buffers and buffers == set(swap.backed)  # buffers are backed up, never exchanged


def test_backup_path_bf16_live_fp32_shadow():
    model = _net(torch.bfloat16)
    ema = ShardedEMA(model, FACTORS, shadow_dtype=torch.float32, buffers="ignore")
    ref, _, _ = _train(model, ema, steps=3)
    snapshot, shadows = _snapshot(model), _shadows(ema)
    with ema.swapped(0.9, backup_to_host=True) as info:
        for name, p in model.named_parameters():
            shadow = ema.shadow(0.9, (None, name))
            assert shadow.dtype == torch.float32
            assert torch.equal(p, shadow.to(torch.bfloat16))
            torch.testing.assert_close(p.double(), ref[0.9][name], rtol=1e-2, atol=1e-2)
    _assert_bit_exact(model, snapshot, ema, shadows)
    param_bytes = sum(p.numel() * 2 for p in model.parameters())
    assert info.mode == "backup" and info.exchange_buffer_bytes == 0
    assert info.backup_bytes == info.extra_bytes == param_bytes
    assert not info.backup_on_host  # CPU live tensors: nothing to pin


def test_mixed_model_exchanges_same_dtype_and_backs_up_the_rest():
    model = _net()
    model[2].to(torch.bfloat16)
    ema = ShardedEMA(model, FACTORS, buffers="average")
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype))
        ema.update()
    snapshot, shadows = _snapshot(model), _shadows(ema)
    with ema.swapped(0.99) as info:
        for t in ema.tracked():  # (exchanged shadows hold the live values now: compare with copies)
            assert torch.equal(t.local(), shadows[(0.99, t.key)].to(t.dtype)), t.fqn
    _assert_bit_exact(model, snapshot, ema, shadows)
    bf16_bytes = sum(p.numel() * 2 for p in model[2].parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    other = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("2."))
    assert info.mode == "mixed"
    assert info.backup_bytes == bf16_bytes + buffer_bytes and info.exchange_buffer_bytes == other
    assert info.extra_bytes == bf16_bytes + buffer_bytes + other


def test_buffer_policies():
    for policy in ("copy", "average", "ignore"):
        model = _net()
        ema = ShardedEMA(model, FACTORS, buffers=policy)
        _, at_update, averaged = _train(model, ema, steps=3)
        live_buffers = {n: b.clone() for n, b in model.named_buffers()}
        with ema.swapped(0.9):
            for name, b in model.named_buffers():
                if policy == "ignore":
                    assert torch.equal(b, live_buffers[name]), name
                elif policy == "average" and b.is_floating_point():
                    torch.testing.assert_close(b.double(), averaged[0.9][name], rtol=0, atol=1e-5)
                else:
                    assert torch.equal(b, at_update[name]), name
            assert not torch.equal(model[1].running_mean, live_buffers["1.running_mean"]) or policy == "ignore"
        for name, b in model.named_buffers():
            assert torch.equal(b, live_buffers[name])


def test_swap_before_first_update_puts_in_the_initial_weights():
    model = _net()
    initial = _snapshot(model)
    ema = ShardedEMA(model, FACTORS)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    snapshot = _snapshot(model)
    with ema.swapped(0.9):
        for name, value in model.state_dict().items():
            assert torch.equal(value, initial[name]), name
    for name, value in model.state_dict().items():
        assert torch.equal(value, snapshot[name]), name


def test_subset_of_model_paths():
    torch.manual_seed(0)
    model = nn.ModuleDict({"enc": nn.Linear(3, 4), "dec": nn.Linear(4, 2)})
    ema = ShardedEMA(model, [0.5], model_paths=["enc", "dec"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    live = _snapshot(model)
    with ema.swapped(0.5, model_paths="dec") as info:
        assert torch.equal(model["enc"].weight, live["enc.weight"])  # not swapped
        assert torch.equal(model["dec"].weight, live["dec.weight"] - 0.5)
    assert info.model_paths == ("dec",) and info.num_tensors == 2
    for name, value in model.state_dict().items():
        assert torch.equal(value, live[name])


def test_zero_numel_parameter_is_skipped():
    model = _net()
    model.empty = nn.Parameter(torch.empty(0, 3))
    ema = ShardedEMA(model, FACTORS)
    with ema.swapped(0.9) as info:
        assert model.empty.shape == (0, 3)
    assert info.num_tensors == len(model.state_dict()) - 1


def test_guards_nested_update_save_and_bad_arguments():
    model = _net()
    ema = ShardedEMA(model, FACTORS)
    _train(model, ema, steps=2)
    snapshot, shadows = _snapshot(model), _shadows(ema)
    with pytest.raises(ValueError, match="not one of this EMA's target factors"):
        with ema.swapped(0.5):
            pass
    with pytest.raises(ValueError, match="not tracked"):
        with ema.swapped(0.9, model_paths="0"):
            pass
    with pytest.raises(ValueError, match="exchange_buffer_bytes"):
        with ema.swapped(0.9, exchange_buffer_bytes=0):
            pass
    assert ema.state is EMAState.IDLE
    _assert_bit_exact(model, snapshot, ema, shadows)
    with ema.swapped(0.9):
        with pytest.raises(RuntimeError, match="nested swaps are not supported"):
            with ema.swapped(0.99):
                pass
        with pytest.raises(RuntimeError, match="update"):
            ema.update()
        with pytest.raises(RuntimeError, match="save"):
            ema.save("unused-root")
        assert ema.state is EMAState.SWAPPED
    assert ema.state is EMAState.IDLE
    _assert_bit_exact(model, snapshot, ema, shadows)
    ema.update()  # allowed again


def test_exception_in_body_restores_then_reraises_the_same_exception():
    model = _net()
    ema = ShardedEMA(model, FACTORS)
    _train(model, ema, steps=2)
    snapshot, shadows = _snapshot(model), _shadows(ema)
    boom = ValueError("boom in eval")
    with pytest.raises(ValueError) as caught:
        with ema.swapped(0.9):
            raise boom
    assert caught.value is boom
    assert ema.state is EMAState.IDLE
    _assert_bit_exact(model, snapshot, ema, shadows)
    with ema.swapped(0.9):  # a later swap works
        assert torch.equal(model[0].weight, shadows[(0.9, (None, "0.weight"))])
        assert torch.equal(ema.shadow(0.9, (None, "0.weight")), snapshot["0.weight"])  # exchanged
    _assert_bit_exact(model, snapshot, ema, shadows)


def test_failure_during_swap_in_undoes_the_batches_done(monkeypatch):
    model = _net()
    model[2].to(torch.bfloat16)  # backup path and exchange path both in play
    ema = ShardedEMA(model, FACTORS)
    _train_plain(model, ema)
    snapshot, shadows = _snapshot(model), _shadows(ema)
    calls = {"n": 0}
    exchange = _Swap._exchange

    def flaky(self, lives, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise MemoryError("simulated device failure")
        exchange(self, lives, batch)

    monkeypatch.setattr(_Swap, "_exchange", flaky)
    with pytest.raises(MemoryError, match="simulated"):
        with ema.swapped(0.9, exchange_buffer_bytes=16):
            pytest.fail("the body must not run when the swap-in failed")
    assert ema.state is EMAState.IDLE
    _assert_bit_exact(model, snapshot, ema, shadows)


def _train_plain(model, ema):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()


def test_swap_aborted_error_names_ranks_and_pickles():
    err = SwapAbortedError(0.999, [1, 3])
    assert isinstance(err, RuntimeError) and err.failed_ranks == (1, 3)
    assert "rank(s) 1, 3" in str(err) and "0.999" in str(err)
    again = pickle.loads(pickle.dumps(err))
    assert again.failed_ranks == (1, 3) and str(again) == str(err)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host backups need CUDA")
def test_backup_to_host_pins_the_backup_of_cuda_tensors():
    model = _net(torch.bfloat16).cuda()
    ema = ShardedEMA(model, FACTORS, buffers="ignore")
    # float64 reference of the same trajectory, on the host
    ref = {f: {n: p.detach().double().cpu() for n, p in model.named_parameters()} for f in FACTORS}
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype))
        ema.update()
        for f in FACTORS:
            for n, p in model.named_parameters():
                ref[f][n] = f * ref[f][n] + (1 - f) * p.detach().double().cpu()
    snapshot, shadows = _snapshot(model), _shadows(ema)
    with ema.swapped(0.9, backup_to_host=True) as info:
        for name, p in model.named_parameters():
            shadow = ema.shadow(0.9, (None, name))
            assert shadow.dtype == torch.float32 and shadow.is_cuda
            torch.testing.assert_close(shadow.double().cpu(), ref[0.9][name], rtol=0, atol=1e-5)
            # the swapped-in bf16 weight is the reference rounded to bf16 (one bf16 rounding apart)
            assert torch.equal(p, shadow.to(torch.bfloat16))
            torch.testing.assert_close(p.double().cpu(), ref[0.9][name], rtol=8e-3, atol=1e-5)
    torch.cuda.synchronize()
    _assert_bit_exact(model, snapshot, ema, shadows)
    assert info.backup_on_host and info.mode == "backup"
    assert info.backup_bytes == sum(p.numel() * 2 for p in model.parameters())


# ---------------------------------------------------------------- writes inside the swap body
def _bn_loader(n: int = 4, seed: int = 7):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 4, generator=gen) * 3 + 1 for _ in range(n)]


def test_a_train_mode_forward_in_the_body_leaves_the_buffer_ema_exact():
    model = _net()
    ema = ShardedEMA(model, FACTORS, buffers="average")
    _train(model, ema, steps=3)
    snapshot, shadows = _snapshot(model), _shadows(ema)
    with ema.swapped(0.99):
        model.train()  # BatchNorm running stats change: buffers are written, parameters are not
        with torch.no_grad():
            model(torch.randn(8, 4))
        model.eval()
    _assert_bit_exact(model, snapshot, ema, shadows)


@pytest.mark.parametrize("live_dtype", [torch.float32, torch.bfloat16])
def test_writing_a_swapped_parameter_raises_after_restoring(live_dtype):
    model = _net(live_dtype)
    ema = ShardedEMA(model, FACTORS)
    _train(model, ema, steps=2)
    snapshot = _snapshot(model)
    with pytest.raises(shardema.SwapWriteError, match=r"wrote to swapped parameter\(s\) model:0.weight") as info:
        with ema.swapped(0.9):
            with torch.no_grad():
                model[0].weight.mul_(2)
    assert info.value.fqns == ("0.weight",)
    assert "keep_changes=True" in str(info.value)
    for name, value in model.state_dict().items():
        assert torch.equal(value, snapshot[name]), name
    assert ema.state is EMAState.IDLE


@pytest.mark.parametrize("live_dtype", [torch.float32, torch.bfloat16])
def test_keep_changes_makes_the_written_values_the_ema(live_dtype):
    model = _net(live_dtype)
    ema = ShardedEMA(model, FACTORS, buffers="average")
    _train(model, ema, steps=2)
    snapshot, shadows = _snapshot(model), _shadows(ema)
    with ema.swapped(0.9, keep_changes=True):
        with torch.no_grad():
            model[0].weight.mul_(2)
        written = model[0].weight.detach().clone()
    for name, value in model.state_dict().items():
        assert torch.equal(value, snapshot[name]), name  # live weights restored
    shadow = ema.shadow(0.9, (None, "0.weight"))
    assert torch.equal(shadow, written.to(shadow.dtype))
    for (f, key), before in shadows.items():  # nothing else moved
        if (f, key) != (0.9, (None, "0.weight")):
            assert torch.equal(ema.shadow(f, key), before), (f, key)


def test_update_bn_on_the_ema_weights_with_keep_changes():
    model = _net()
    ema = ShardedEMA(model, FACTORS, buffers="average")
    _train(model, ema, steps=3)
    loader = _bn_loader()
    # Reference: a separate copy of the network holding the EMA weights, update_bn on it.
    reference = _net()
    reference.load_state_dict({n: ema.shadow(0.99, (None, n)).to(t.dtype)
                               for n, t in reference.state_dict().items()})
    torch.optim.swa_utils.update_bn(loader, reference)
    live_before = _snapshot(model)
    with ema.swapped(0.99, keep_changes=True):
        torch.optim.swa_utils.update_bn(loader, model)
    for name, value in reference.state_dict().items():
        shadow = ema.shadow(0.99, (None, name))
        torch.testing.assert_close(shadow.to(value.dtype), value, rtol=0, atol=1e-6, msg=name)
    for name, value in model.state_dict().items():
        assert torch.equal(value, live_before[name]), name
