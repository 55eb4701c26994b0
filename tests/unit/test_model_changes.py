"""What the EMA refuses at creation, and the model changes update() detects after it (one process)."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from shardema import EMAConfig, ShardedEMA


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_factors_closer_than_the_lookup_tolerance_are_rejected():
    with pytest.raises(ValueError, match="lookups cannot tell them apart"):
        EMAConfig(target_factors=[0.5, 0.5 + 1e-13])
    with pytest.raises(ValueError, match="lookups cannot tell them apart"):
        ShardedEMA(_model(), [0.9, 0.99, 0.9 + 5e-13])
    ema = ShardedEMA(_model(), [0.5, 0.5 + 1e-9])  # far enough apart: each found exactly
    assert ema.factor_index(0.5) == 0 and ema.factor_index(0.5 + 1e-9) == 1


def _lines_executed(fn) -> int:
    """Python lines executed by ``fn()`` (all frames): an operation count, not a time."""
    count = 0

    def trace(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        fn()
    finally:
        sys.settrace(previous)
    return count


def test_many_factors_validate_in_linear_time():
    def validate(n: int):
        factors = [0.5 + i * 1e-6 for i in range(n)]
        return lambda: EMAConfig(target_factors=factors)

    assert len(validate(20_000)().target_factors) == 20_000
    small, large = _lines_executed(validate(500)), _lines_executed(validate(2_000))
    # 4 x the factors: about 4 x the work when linear (sorting is in C), 16 x when every pair is compared.
    assert large < 6 * small, (small, large)


def test_a_0d_tensor_of_factors_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"target_factors=tensor\(0.9000\) must be a decay or a list of decays"):
        EMAConfig(target_factors=torch.tensor(0.9))


def test_complex_parameters_are_refused_at_creation():
    model = _model()
    model.register_parameter("phase", nn.Parameter(torch.zeros(3, dtype=torch.complex64)))
    with pytest.raises(NotImplementedError, match="'phase'.*complex.*view_as_real"):
        ShardedEMA(model, [0.9])


def test_a_meta_device_model_is_refused_naming_to_empty():
    with torch.device("meta"):
        model = _model()
    with pytest.raises(ValueError, match=r"meta device.*to_empty"):
        ShardedEMA(model, [0.9])


def test_assigning_param_data_is_followed_by_the_next_update():
    model = _model()
    ema = ShardedEMA(model, [0.5])
    ema.update()  # the cached plan now holds views of the original storage
    weight = model[0].weight
    before = ema.shadow(0.5, (None, "0.weight")).clone()
    weight.data = torch.full_like(weight, 5.0)  # same Parameter object, new storage
    ema.update()
    expected = 0.5 * before + 0.5 * 5.0
    torch.testing.assert_close(ema.shadow(0.5, (None, "0.weight")), expected, rtol=0, atol=1e-6)


def test_every_kind_of_replaced_live_tensor_is_seen_by_the_next_update():
    """The per-update watch compares registered objects and storage pointers for every tensor."""
    model = _model()
    ema = ShardedEMA(model, [0.5])
    ema.update()
    key = (None, "2.bias")
    before = ema.shadow(0.5, key).clone()
    model[2].bias = nn.Parameter(torch.full((2,), 3.0))  # a new object: same name, count and shape
    ema.update()
    torch.testing.assert_close(ema.shadow(0.5, key), 0.5 * before + 1.5, rtol=0, atol=1e-6)
    before = ema.shadow(0.5, key).clone()
    model[2].bias.data = torch.full((2,), -1.0)  # then new storage under that object
    ema.update()
    torch.testing.assert_close(ema.shadow(0.5, key), 0.5 * before - 0.5, rtol=0, atol=1e-6)
    model[2]._parameters["bias"] = None  # same registration count, no tensor
    with pytest.raises(RuntimeError, match=r"'2.bias'.*no longer registered"):
        ema.update()


def test_a_dtype_change_after_creation_raises_naming_the_fqn():
    model = _model()
    ema = ShardedEMA(model, [0.9])
    ema.update()
    model.half()  # Module._apply assigns p.data: the Parameter objects stay the same
    with pytest.raises(RuntimeError, match=r"'0.weight'.*dtype torch.float16"):
        ema.update()


def test_a_replaced_submodule_raises_naming_its_path():
    model = _model()
    ema = ShardedEMA(model, [0.9])
    ema.update()
    model[2] = nn.Linear(4, 2)  # same parameter names and shapes, a different module
    with pytest.raises(RuntimeError, match=r"submodule '2' was replaced"):
        ema.update()
    nested = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 1))
    ema = ShardedEMA(nested, [0.9])
    nested[0][0] = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match=r"submodule '0.0' was replaced"):
        ema.update()


def test_unfreezing_a_parameter_left_out_as_frozen_raises_naming_it():
    model = _model()
    model[0].bias.requires_grad_(False)
    ema = ShardedEMA(model, [0.9], include_frozen=False)
    assert (None, "0.bias") not in {t.key for t in ema.tracked()}
    ema.update()
    model[0].bias.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"'0.bias'.*was unfrozen.*include_frozen=True"):
        ema.update()
    # Freezing a tracked parameter is fine: it keeps being averaged.
    model = _model()
    ema = ShardedEMA(model, [0.9], include_frozen=False)
    model[0].weight.requires_grad_(False)
    ema.update()


class _TiedAcrossPaths(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Embedding(6, 4), nn.Linear(4, 4))
        self.decoder = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 6, bias=False))
        self.decoder[1].weight = self.encoder[0].weight  # tied: one Parameter in two model paths


def test_a_weight_tied_across_two_model_paths_is_complete_in_each(tmp_path):
    from safetensors.torch import load_file

    import shardema

    model = _TiedAcrossPaths()
    ema = ShardedEMA(model, [0.5], model_paths=["encoder", "decoder"])
    keys = {t.key for t in ema.tracked()}
    assert ("encoder", "0.weight") in keys and ("decoder", "1.weight") in keys
    tied = model.encoder[0].weight
    reference = tied.detach().double().clone()
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        ema.update()
        reference = 0.5 * reference + 0.5 * tied.detach().double()
    for key in (("encoder", "0.weight"), ("decoder", "1.weight")):
        torch.testing.assert_close(ema.shadow(0.5, key).double(), reference, rtol=0, atol=1e-6)
    live = tied.detach().clone()
    with ema.swapped(0.5, "decoder"):  # the decoder alone sees the tied weight's EMA
        torch.testing.assert_close(model.decoder[1].weight.double(), reference, rtol=0, atol=1e-6)
    assert torch.equal(tied, live)
    with ema.swapped(0.5):  # both paths: the shared tensor is exchanged once, restored bit-exact
        torch.testing.assert_close(tied.double(), reference, rtol=0, atol=1e-6)
    assert torch.equal(tied, live)
    ema.save(tmp_path, "latest")
    out = tmp_path / "decoder.safetensors"
    shardema.checkpoint.consolidate_to_file(tmp_path, 0.5, out, model_path="decoder")
    fresh = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 6, bias=False))
    fresh.load_state_dict(load_file(out), strict=True)
    torch.testing.assert_close(fresh[1].weight.double(), reference, rtol=0, atol=1e-6)


def test_swapped_and_copy_to_detect_a_replaced_submodule_before_any_update():
    model = _model()
    ema = ShardedEMA(model, [0.5])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()  # the shadows now differ from the live weights
    old = model[0]
    model[0] = nn.Linear(3, 4)  # no update() in between: only swapped() / copy_to() can see it
    new_weight = model[0].weight.detach().clone()
    old_weight = old.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"submodule '0' was replaced"):
        with ema.swapped(0.5):
            pytest.fail("the body ran with the new module's live weights")
    assert torch.equal(model[0].weight, new_weight) and torch.equal(old.weight, old_weight)
    assert ema.state.value == "idle"
    with pytest.raises(RuntimeError, match=r"submodule '0' was replaced"):
        ema.copy_to(0.5)
    assert torch.equal(model[0].weight, new_weight) and torch.equal(old.weight, old_weight)
    # The other changes update() detects are seen too: an unfrozen parameter left out as frozen.
    model = _model()
    model[0].bias.requires_grad_(False)
    ema = ShardedEMA(model, [0.5], include_frozen=False)
    model[0].bias.requires_grad_(True)
    for call in (lambda: ema.swapped(0.5).__enter__(), lambda: ema.copy_to(0.5)):
        with pytest.raises(RuntimeError, match=r"'0.bias'.*was unfrozen"):
            call()
