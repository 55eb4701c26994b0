"""Every peer's EMA, value for value, next to the shardema options that reproduce it (docs/peers.md).

Each test drives the peer and a ShardedEMA (float64 shadows) with the same live weights for a few
hundred calls (the weights change on every call, so every decay leaves a trace) and compares every
tracked tensor after every call at which the two are defined to agree.

Peers run for real where they are light: ``torch.optim.swa_utils.AveragedModel`` (torch itself),
ema-pytorch (a dev dependency, no dependencies of its own) and Lightning's ``EMAWeightAveraging``
(lightning is a dev dependency; its own ``setup()`` and ``on_train_batch_end()`` run, with a
stand-in trainer that carries only ``global_step``). The others are reproduced from their source,
cited in each class: diffusers ``EMAModel`` and timm ``ModelEmaV3`` import far more than the EMA
(pipelines, torchvision, the hub client); torchtitan's ``components/ema.py`` is not in its 0.3.0
wheel (the package this project's torchtitan test installs); NeMo is not a light package.
"""

from __future__ import annotations

import copy
import itertools
import math
import types
import zlib

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from shardema import EMAConfig, ShardedEMA

STEPS = 300


def _net() -> nn.Module:
    """Parameters, float buffers (BatchNorm running stats) and an integer buffer (num_batches_tracked)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).double()


@torch.no_grad()
def _set_live(model: nn.Module, call: int) -> None:
    """The live weights at ``call`` (-1: at construction): fresh values every call, integers = call."""
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.dtype.is_floating_point:
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()) * 1000 + call + 10)
            t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype))
        else:
            t.fill_(max(call, 0))


def _ema(model: nn.Module, factor: float, **options) -> ShardedEMA:
    return ShardedEMA(model, EMAConfig(target_factors=[factor], shadow_dtype="float64", **options))


def _ours(ema: ShardedEMA) -> dict[str, torch.Tensor]:
    return {t.fqn: ema.shadow(0, t.key) for t in ema.tracked()}


def _compare(ours: dict, theirs: dict, names, atol: float, where: str) -> None:
    for name in names:
        diff = (ours[name].double() - theirs[name].double()).abs().max().item()
        assert diff <= atol, f"{where}: {name} differs by {diff:.3g}"


def _floats(model: nn.Module) -> list[str]:
    return [k for k, v in model.state_dict().items() if v.dtype.is_floating_point]


def _params(model: nn.Module) -> list[str]:
    return [k for k, _ in model.named_parameters()]


def _buffers(model: nn.Module, floating: bool) -> list[str]:
    return [k for k, v in model.named_buffers() if v.dtype.is_floating_point == floating]


# ---------------------------------------------------------------------------- torch AveragedModel (real)
@pytest.mark.parametrize("update_every,start", [(1, 0), (3, 7)])
def test_averaged_model_default_swa(update_every, start):
    """AveragedModel(model) (the equal average; its first update_parameters copies), called on
    every ``update_every``-th step from ``start``: kind="swa", update_every, start_step=start,
    buffers="copy" (it copies buffers at each call, use_buffers=False)."""
    model = _net()
    _set_live(model, -1)
    peer = AveragedModel(model)
    ema = _ema(model, 0.5, schedule="swa", update_every=update_every, start_step=start, buffers="copy")
    for call in range(STEPS):
        _set_live(model, call)
        fires = call >= start and (call - start) % update_every == 0
        if fires:
            peer.update_parameters(model)
        ema.update()
        if call >= start:
            theirs = peer.module.state_dict()
            _compare(_ours(ema), theirs, _params(model), 1e-12, f"call {call}")
            if fires:  # AveragedModel copies buffers only when it is called; shardema on every call
                _compare(_ours(ema), theirs, _buffers(model, True) + _buffers(model, False), 0, f"call {call}")
    assert int(peer.n_averaged) == len(range(start, STEPS, update_every))


@pytest.mark.parametrize("use_buffers", [False, True])
def test_averaged_model_ema_multi_avg_fn(use_buffers):
    """AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(d), use_buffers=...): its first
    call copies, then a constant decay: kind="constant", first_update_copies=True; buffers="copy"
    (use_buffers=False) or "average" (use_buffers=True). Same foreach lerp: bit for bit."""
    model = _net()
    _set_live(model, -1)
    peer = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.95), use_buffers=use_buffers)
    ema = _ema(model, 0.95, first_update_copies=True, buffers="average" if use_buffers else "copy")
    for call in range(STEPS):
        _set_live(model, call)
        peer.update_parameters(model)
        ema.update()
        _compare(_ours(ema), peer.module.state_dict(), _floats(model), 0, f"call {call}")
    # Integer buffers: shardema copies them; AveragedModel(use_buffers=True) "averages" them in
    # float and truncates into the integer (num_batches_tracked lags behind the live count).
    live = model[1].num_batches_tracked
    assert torch.equal(_ours(ema)["1.num_batches_tracked"], live)
    averaged = peer.module[1].num_batches_tracked
    assert (averaged < live).item() if use_buffers else torch.equal(averaged, live)


def test_averaged_model_swa_with_buffers():
    """AveragedModel(model, use_buffers=True) (Lightning's WeightAveraging default): float
    buffers are averaged too: kind="swa", buffers="average"."""
    model = _net()
    _set_live(model, -1)
    peer = AveragedModel(model, use_buffers=True)
    ema = _ema(model, 0.5, schedule="swa", buffers="average")
    for call in range(STEPS):
        _set_live(model, call)
        peer.update_parameters(model)
        ema.update()
        _compare(_ours(ema), peer.module.state_dict(), _floats(model), 1e-12, f"call {call}")


# ---------------------------------------------------------------------------- ema-pytorch (real)
EMA_PYTORCH_CASES = {
    "defaults": dict(beta=0.9999, update_after_step=100, update_every=10),
    "power_min_value": dict(beta=0.99, update_after_step=20, update_every=4, inv_gamma=3.0, power=0.75,
                            min_value=0.5),
    "every_call": dict(beta=0.999, update_after_step=0, update_every=1, power=1.0),
}


def _ema_pytorch_options(beta, update_after_step=100, update_every=10, inv_gamma=1.0, power=2 / 3, min_value=0.0):
    """The shardema options that reproduce ``ema_pytorch.EMA(...)`` (update_after_step must be a
    multiple of update_every). Its integer buffers are never tracked (left as deep-copied)."""
    assert update_after_step % update_every == 0
    return dict(schedule="power", inv_gamma=inv_gamma, power=power, min_decay=min_value, start_step=update_after_step,
                update_every=update_every, first_update_copies=True, buffers="average",
                exclude=["*.num_batches_tracked"])


@pytest.fixture
def float64_default():
    """ema-pytorch computes its decay with torch in the default dtype; float64 makes it the same
    number shardema computes in Python floats (with float32 they differ by float32 rounding)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("case", list(EMA_PYTORCH_CASES))
def test_ema_pytorch(case, float64_default):
    ema_pytorch = pytest.importorskip("ema_pytorch")
    kwargs = EMA_PYTORCH_CASES[case]
    model = _net()
    _set_live(model, -1)
    peer = ema_pytorch.EMA(model, include_online_model=False, **kwargs)
    ema = _ema(model, kwargs["beta"], **_ema_pytorch_options(**kwargs))
    start, every = kwargs["update_after_step"], kwargs["update_every"]
    for call in range(STEPS):
        _set_live(model, call)
        ours_decay = ema.current_decays()[kwargs["beta"]]
        peer.update()
        ema.update()
        if call > start and call % every == 0:  # an averaging call of ema-pytorch: the same decay
            assert ours_decay == peer.get_current_decay(), f"call {call}"
        # Before update_after_step ema-pytorch copies on every update_every-th call, shardema on
        # every call: they agree at those calls, and at every call from update_after_step on.
        if call >= start or call % every == 0:
            _compare(_ours(ema), peer.ema_model.state_dict(), _floats(model), 0, f"call {call}")


def test_ema_pytorch_float32_decay_differs_by_rounding_only():
    """With torch's default float32, ema-pytorch's decay is the float32 rounding of shardema's."""
    ema_pytorch = pytest.importorskip("ema_pytorch")
    kwargs = EMA_PYTORCH_CASES["power_min_value"]
    model = _net()
    peer = ema_pytorch.EMA(model, include_online_model=False, **kwargs)
    ema = _ema(model, kwargs["beta"], **_ema_pytorch_options(**kwargs))
    for call in range(STEPS):
        ours_decay = ema.current_decays()[kwargs["beta"]]
        peer.update()
        ema.update()
        if call > kwargs["update_after_step"] and call % kwargs["update_every"] == 0:
            assert abs(ours_decay - peer.get_current_decay()) <= 4 * 2.0**-24


# ---------------------------------------------------------------------------- diffusers EMAModel (closed form)
class DiffusersEMAModel:
    """diffusers 0.42.1 ``diffusers.training_utils.EMAModel`` (``__init__``, ``get_decay``,
    ``step`` with ``foreach=False``), reduced to what decides the values."""

    def __init__(self, parameters, decay=0.9999, min_decay=0.0, update_after_step=0, use_ema_warmup=False,
                 inv_gamma=1.0, power=2 / 3):
        self.shadow_params = [p.clone().detach() for p in parameters]
        self.decay, self.min_decay, self.update_after_step = decay, min_decay, update_after_step
        self.use_ema_warmup, self.inv_gamma, self.power = use_ema_warmup, inv_gamma, power
        self.optimization_step = 0

    def get_decay(self, optimization_step: int) -> float:
        step = max(0, optimization_step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.use_ema_warmup:
            cur_decay_value = 1 - (1 + step / self.inv_gamma) ** -self.power
        else:
            cur_decay_value = (1 + step) / (10 + step)
        cur_decay_value = min(cur_decay_value, self.decay)
        return max(cur_decay_value, self.min_decay)

    @torch.no_grad()
    def step(self, parameters) -> None:
        self.optimization_step += 1
        one_minus_decay = 1 - self.get_decay(self.optimization_step)
        for s_param, param in zip(self.shadow_params, parameters):
            if param.requires_grad:
                s_param.sub_(one_minus_decay * (s_param - param))
            else:
                s_param.copy_(param)


def diffusers_options(decay=0.9999, min_decay=0.0, update_after_step=0, use_ema_warmup=False, inv_gamma=1.0,
                      power=2 / 3, step_every=1):
    """The shardema options that reproduce EMAModel (its ``step()`` called on every
    ``step_every``-th call): it copies until ``update_after_step`` steps have passed, then warms up
    from there, counting its own steps."""
    schedule = dict(schedule="power", inv_gamma=inv_gamma, power=power) if use_ema_warmup else dict(schedule="warmup")
    return dict(schedule, min_decay=min_decay, start_step=update_after_step * step_every, update_every=step_every,
                count="firings", first_update_copies=True, buffers="ignore")


DIFFUSERS_CASES = {
    "defaults": dict(decay=0.9999),
    "ema_warmup": dict(decay=0.995, use_ema_warmup=True, inv_gamma=2.0, power=0.75, update_after_step=10,
                       min_decay=0.3),
    "warmup_after_step_every_3": dict(decay=0.99, update_after_step=4, min_decay=0.2, step_every=3),
}


@pytest.mark.parametrize("case", list(DIFFUSERS_CASES))
def test_diffusers_ema_model(case):
    kwargs = dict(DIFFUSERS_CASES[case])
    every = kwargs.pop("step_every", 1)
    model = _net()
    _set_live(model, -1)
    peer = DiffusersEMAModel(model.parameters(), **kwargs)
    ema = _ema(model, kwargs["decay"], **diffusers_options(**kwargs, step_every=every))
    start = kwargs.get("update_after_step", 0) * every
    for call in range(STEPS):
        _set_live(model, call)
        if call % every == 0:
            peer.step(model.parameters())
        ema.update()
        if call >= start or call % every == 0:
            theirs = dict(zip(_params(model), peer.shadow_params))
            _compare(_ours(ema), theirs, _params(model), 1e-12, f"call {call}")


# ---------------------------------------------------------------------------- timm ModelEmaV3 (closed form)
class TimmModelEmaV3:
    """timm 1.0.31 ``timm.utils.model_ema.ModelEmaV3`` (``get_decay``, ``apply_update_`` and
    ``apply_update_no_buffers_`` on the foreach path, float64 so no stochastic rounding)."""

    def __init__(self, model, decay=0.9999, min_decay=0.0, update_after_step=0, use_warmup=False,
                 warmup_gamma=1.0, warmup_power=2 / 3, exclude_buffers=False):
        self.module = copy.deepcopy(model)
        self.decay, self.min_decay, self.update_after_step = decay, min_decay, update_after_step
        self.use_warmup, self.warmup_gamma, self.warmup_power = use_warmup, warmup_gamma, warmup_power
        self.exclude_buffers = exclude_buffers

    def get_decay(self, step=None) -> float:
        if step is None:
            return self.decay
        step = max(0, step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.use_warmup:
            decay = 1 - (1 + step / self.warmup_gamma) ** -self.warmup_power
            decay = max(min(decay, self.decay), self.min_decay)
        else:
            decay = self.decay
        return decay

    @torch.no_grad()
    def update(self, model, step=None) -> None:
        decay = self.get_decay(step)
        if self.exclude_buffers:
            torch._foreach_lerp_(list(self.module.parameters()), list(model.parameters()), weight=1.0 - decay)
            for ema_b, model_b in zip(self.module.buffers(), model.buffers()):
                ema_b.copy_(model_b)
            return
        ema_values, model_values = [], []
        for ema_v, model_v in zip(self.module.state_dict().values(), model.state_dict().values()):
            if ema_v.is_floating_point():
                ema_values.append(ema_v)
                model_values.append(model_v)
            else:
                ema_v.copy_(model_v)
        torch._foreach_lerp_(ema_values, model_values, weight=1.0 - decay)


def timm_options(decay=0.9999, min_decay=0.0, update_after_step=0, use_warmup=False, warmup_gamma=1.0,
                 warmup_power=2 / 3, exclude_buffers=False, with_step=True):
    """The shardema options that reproduce ModelEmaV3, updated after every optimizer step with
    ``step=num_updates`` (1-based, as timm's train.py does) or ``step=None`` (``with_step=False``)."""
    buffers = "copy" if exclude_buffers else "average"
    if not with_step:  # no step: the constant decay from the first update, no copy
        return dict(buffers=buffers)
    schedule = dict(schedule="power", inv_gamma=warmup_gamma, power=warmup_power) if use_warmup else {}
    return dict(schedule, min_decay=min_decay if use_warmup else 0.0, start_step=update_after_step,
                first_update_copies=True, buffers=buffers)


TIMM_CASES = {
    "no_step": dict(decay=0.998, with_step=False),
    "step_no_warmup": dict(decay=0.99, update_after_step=3),
    "warmup": dict(decay=0.999, use_warmup=True, warmup_gamma=2.0, warmup_power=0.75, min_decay=0.2,
                   update_after_step=5),
    "warmup_exclude_buffers": dict(decay=0.999, use_warmup=True, exclude_buffers=True),
}


@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_model_ema_v3(case):
    kwargs = dict(TIMM_CASES[case])
    with_step = kwargs.pop("with_step", True)
    model = _net()
    _set_live(model, -1)
    peer = TimmModelEmaV3(model, **kwargs)
    ema = _ema(model, kwargs["decay"], **timm_options(**kwargs, with_step=with_step))
    for call in range(STEPS):
        _set_live(model, call)
        peer.update(model, step=call + 1 if with_step else None)
        ema.update()
        _compare(_ours(ema), peer.module.state_dict(), model.state_dict(), 0, f"call {call}")


# ---------------------------------------------------------------------------- torchtitan (closed form)
class TorchtitanEMA:
    """torchtitan's EMA (pytorch/torchtitan ``torchtitan/components/ema.py`` at cd09595e:
    ``step(current_step)``, ``_decay_at``, ``_update``), called with the trainer's step, which is
    1 at the first optimizer step. Trainable parameters only."""

    def __init__(self, model, decay=None, half_life_fraction=0.05, start_step=0, step_bias=0,
                 update_every_n_steps=1):
        self.model = model
        self.ema = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.decay, self.half_life_fraction = decay, half_life_fraction
        self.start_step, self.step_bias, self.update_every_n_steps = start_step, step_bias, update_every_n_steps

    @torch.no_grad()
    def step(self, current_step: int) -> None:
        if current_step < self.start_step:
            return
        elapsed = current_step - self.start_step
        if elapsed % self.update_every_n_steps != 0:
            return
        num_updates = max((elapsed + self.step_bias) // self.update_every_n_steps, 1)
        decay = self.decay if self.decay is not None else 2.0 ** (-1.0 / (self.half_life_fraction * num_updates))
        names = list(self.ema)
        params = dict(self.model.named_parameters())
        torch._foreach_lerp_([self.ema[n] for n in names], [params[n] for n in names], 1.0 - decay)


def torchtitan_options(decay=None, half_life_fraction=0.05, start_step=0, step_bias=0, update_every_n_steps=1):
    """The shardema options that reproduce torchtitan's EMA, for every start_step and update_every_n_steps.

    Its first firing is at the first trainer step ``t0 >= max(start_step, 1)`` on its grid
    (``(t0 - start_step) % N == 0``): shardema's call ``t0 - 1``, so ``start_step = t0 - 1``,
    ``update_every = N``, and ``before_start="hold"`` keeps the weights the EMA was created with
    until then, as torchtitan keeps its initial clone. At its firing j ``num_updates`` is
    ``max(j + (t0 - start_step + step_bias) // N, 1)``: shardema's ``m = max(1, j + 1 + step_bias)``
    with ``step_bias = (t0 - start_step + step_bias) // N - 1``."""
    n = update_every_n_steps
    t0 = next(t for t in itertools.count(max(start_step, 1)) if (t - start_step) % n == 0)
    bias = (t0 - start_step + step_bias) // n - 1
    schedule = dict(schedule="constant") if decay is not None else dict(schedule="half_life",
                                                                       half_life_fraction=half_life_fraction,
                                                                       step_bias=bias)
    held = dict(start_step=t0 - 1, before_start="hold") if t0 > 1 else {}
    return dict(schedule, **held, update_every=n, count="firings", buffers="ignore", include_frozen=False)


TORCHTITAN_CASES = {
    "defaults": dict(half_life_fraction=0.05),
    "step_bias": dict(half_life_fraction=0.2, step_bias=7),
    "start_1_every_3_bias_5": dict(half_life_fraction=0.2, start_step=1, update_every_n_steps=3, step_bias=5),
    "start_1_every_4": dict(half_life_fraction=0.1, start_step=1, update_every_n_steps=4),
    "fixed_decay_every_2": dict(decay=0.97, start_step=1, update_every_n_steps=2),
    "start_0_every_3": dict(half_life_fraction=0.2, update_every_n_steps=3),
    "start_5": dict(half_life_fraction=0.1, start_step=5, step_bias=2),
    "fixed_decay_start_6_every_4": dict(decay=0.97, start_step=6, update_every_n_steps=4),
}


@pytest.mark.parametrize("case", list(TORCHTITAN_CASES))
def test_torchtitan_ema(case):
    kwargs = TORCHTITAN_CASES[case]
    model = _net()
    _set_live(model, -1)
    peer = TorchtitanEMA(model, **kwargs)
    factor = kwargs.get("decay") or 0.9999  # torchtitan's half-life decay has no cap; 0.9999 is never reached
    ema = _ema(model, factor, **torchtitan_options(**kwargs))
    for call in range(STEPS):
        _set_live(model, call)
        peer.step(call + 1)
        ema.update()
        _compare(_ours(ema), peer.ema, list(peer.ema), 0, f"call {call}")
    if "decay" not in kwargs:  # the cap of the factor never bound
        assert 2.0 ** (-1.0 / (kwargs["half_life_fraction"] * (STEPS + kwargs.get("step_bias", 0)))) < factor


# ---------------------------------------------------------------------------- Lightning EMAWeightAveraging
def lightning_options(update_every_n_steps=1, update_starting_at_step=None, use_buffers=True):
    """The shardema options that reproduce EMAWeightAveraging (an AveragedModel with
    ``get_ema_avg_fn(decay)``: its first update copies): it updates at step indices that are
    multiples of update_every_n_steps, from update_starting_at_step on."""
    n, start = update_every_n_steps, update_starting_at_step or 0
    return dict(start_step=math.ceil(start / n) * n, update_every=n, first_update_copies=True,
                buffers="average" if use_buffers else "copy")


LIGHTNING_CASES = {
    "defaults": dict(),
    "every_3_from_7": dict(update_every_n_steps=3, update_starting_at_step=7),
    "every_2_no_buffers": dict(update_every_n_steps=2, use_buffers=False),
}


@pytest.mark.parametrize("case", list(LIGHTNING_CASES))
def test_lightning_ema_weight_averaging(case):
    """lightning 2.6.6 itself: ``setup(stage="fit")`` builds the AveragedModel, and
    ``on_train_batch_end`` decides (``should_update(step_idx=global_step - 1)``) and updates."""
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.callbacks import EMAWeightAveraging

    kwargs = dict(LIGHTNING_CASES[case])
    model = pl.LightningModule()  # the _net layers under the same names
    for name, layer in _net().named_children():
        model.add_module(name, layer)
    _set_live(model, -1)
    peer = EMAWeightAveraging(decay=0.99, **kwargs)
    peer.setup(None, model, stage="fit")
    options = lightning_options(**kwargs)
    use_buffers = kwargs.get("use_buffers", True)
    ema = _ema(model, 0.99, **options)
    firings = 0
    for call in range(STEPS):
        _set_live(model, call)
        trainer = types.SimpleNamespace(global_step=call + 1)  # optimizer steps so far: all the hook reads
        peer.on_train_batch_end(trainer, model, None, None, call)
        fires = peer._latest_update_step == call + 1
        firings += fires
        ema.update()
        if call >= options["start_step"]:  # before its first update it holds the initial weights
            names = _params(model) + (_buffers(model, True) if use_buffers or fires else [])
            _compare(_ours(ema), peer._average_model.module.state_dict(), names, 1e-12, f"call {call}")
    n, start = kwargs.get("update_every_n_steps", 1), kwargs.get("update_starting_at_step") or 0
    assert firings == len(range(options["start_step"], STEPS, n)) and options["start_step"] >= start
    assert int(peer._average_model.n_averaged) == firings


# ---------------------------------------------------------------------------- NeMo EMA (closed form)
class NemoEMA:
    """NeMo's ``EMAOptimizer`` (nemo/collections/common/callbacks/ema.py): the EMA is a copy of the
    parameters taken at the first ``step()``, before the optimizer step; after every
    ``every_n_steps``-th optimizer step, counting from the first, ``ema = decay * ema + (1 - decay) * p``
    (``_foreach_mul_`` then ``_foreach_add_``)."""

    def __init__(self, model, decay=0.999, every_n_steps=1):
        self.model, self.decay, self.every_n_steps = model, decay, every_n_steps
        self.ema_params = tuple(p.detach().clone() for p in model.parameters())
        self.current_step = 0

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.current_step % self.every_n_steps == 0:
            current = tuple(p.data for p in self.model.parameters())
            torch._foreach_mul_(self.ema_params, self.decay)
            torch._foreach_add_(self.ema_params, current, alpha=1.0 - self.decay)
        self.current_step += 1


@pytest.mark.parametrize("every_n_steps", [1, 4])
def test_nemo_ema(every_n_steps):
    """NeMo EMA(decay, every_n_steps): kind="constant", update_every=every_n_steps, parameters only."""
    model = _net()
    _set_live(model, -1)
    peer = NemoEMA(model, decay=0.995, every_n_steps=every_n_steps)
    ema = _ema(model, 0.995, update_every=every_n_steps, buffers="ignore")
    for call in range(STEPS):
        _set_live(model, call)
        peer.after_optimizer_step()
        ema.update()
        _compare(_ours(ema), dict(zip(_params(model), peer.ema_params)), _params(model), 1e-12, f"call {call}")
