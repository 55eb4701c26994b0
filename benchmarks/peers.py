"""The peer EMA implementations, set up on the same live model as shardema.

Each family builds one EMA copy of the model and returns its variants: the variants
of one library differ only by a flag read at update time (``use_foreach``,
``foreach``, ``multi_avg_fn`` / ``avg_fn``), so they share that copy and the flag
is set before every call. A family whose package is missing or does not import is
reported as unavailable with the reason; the benchmark goes on without it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

DEFAULT_FACTOR = 0.9999


@dataclass
class PeerFamily:
    """One library's EMA on the live model: its variants, or why it is unavailable."""

    name: str
    variants: list[tuple[str, Callable[[], object]]] = field(default_factory=list)
    copies: int = 1  # model copies it holds (memory), in units of the live fp32 model
    transient_copies: int = 0  # extra full copies allocated during one update
    unavailable: str | None = None
    state: object = None  # keeps the EMA object alive


def _unavailable(name: str, exc: BaseException) -> PeerFamily:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return PeerFamily(name, unavailable=f"does not import here ({type(exc).__name__}: {first})")


def torch_averaged_model(model: nn.Module, factor: float) -> PeerFamily:
    """``torch.optim.swa_utils.AveragedModel`` with the foreach and the per-parameter EMA functions."""
    try:
        from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn, get_ema_multi_avg_fn
    except Exception as exc:
        return _unavailable("torch AveragedModel", exc)
    multi, single = get_ema_multi_avg_fn(factor), get_ema_avg_fn(factor)
    averaged = AveragedModel(model, multi_avg_fn=multi)
    averaged.update_parameters(model)  # the first call copies

    def foreach():
        averaged.multi_avg_fn, averaged.avg_fn = multi, None
        averaged.update_parameters(model)

    def per_param():
        averaged.multi_avg_fn, averaged.avg_fn = None, single
        averaged.update_parameters(model)

    return PeerFamily("torch AveragedModel", [("AveragedModel foreach", foreach),
                                              ("AveragedModel per-param", per_param)], state=averaged)


def ema_pytorch(model: nn.Module, factor: float) -> PeerFamily:
    """lucidrains' ``ema_pytorch.EMA``: its default per-parameter ``lerp_`` and ``use_foreach=True``."""
    try:
        from ema_pytorch import EMA
    except Exception as exc:
        return _unavailable("ema-pytorch", exc)
    ema = EMA(model, beta=factor, update_after_step=0, update_every=1)
    ema.update()  # initialises the copy
    ema.update()

    def default():
        ema.use_foreach = False
        ema.update()

    def foreach():
        ema.use_foreach = True
        ema.update()

    return PeerFamily("ema-pytorch", [("ema-pytorch default", default), ("ema-pytorch use_foreach", foreach)],
                      state=ema)


def diffusers_ema(model: nn.Module, factor: float) -> PeerFamily:
    """``diffusers.training_utils.EMAModel`` with ``foreach`` on and off."""
    try:
        from diffusers.training_utils import EMAModel
    except Exception as exc:
        return _unavailable("diffusers EMAModel", exc)
    params = list(model.parameters())
    ema = EMAModel(params, decay=factor, foreach=False)

    def loop():
        ema.foreach = False
        ema.step(params)

    def foreach():
        ema.foreach = True
        ema.step(params)

    # foreach=True allocates ``s - p`` for every parameter before subtracting it.
    return PeerFamily("diffusers EMAModel", [("diffusers foreach", foreach), ("diffusers loop", loop)],
                      transient_copies=1, state=ema)


def timm_ema(model: nn.Module, factor: float) -> PeerFamily:
    """``timm.utils.ModelEmaV3`` (foreach lerp), where timm imports."""
    try:
        from timm.utils.model_ema import ModelEmaV3
    except Exception as exc:
        return _unavailable("timm ModelEmaV3", exc)
    ema = ModelEmaV3(model, decay=factor)

    def update():
        ema.update(model)

    return PeerFamily("timm ModelEmaV3", [("timm ModelEmaV3", update)], state=ema)


class NoetherStyle:
    """The seed framework's kernel, written here: one full copy per factor, foreach ``mul_`` + ``add_``."""

    def __init__(self, model: nn.Module, factors: list[float]):
        self.lives = list(model.parameters())
        self.factors = list(factors)
        self.copies = [[p.detach().clone() for p in self.lives] for _ in self.factors]

    @torch.no_grad()
    def update(self) -> None:
        for factor, copy in zip(self.factors, self.copies):
            torch._foreach_mul_(copy, factor)
            torch._foreach_add_(copy, self.lives, alpha=1.0 - factor)


def noether_style(model: nn.Module, factor: float) -> PeerFamily:
    ema = NoetherStyle(model, [factor])
    return PeerFamily("noether-style", [("noether-style mul+add", ema.update)], state=ema)


FAMILIES: list[Callable[[nn.Module, float], PeerFamily]] = [
    torch_averaged_model, ema_pytorch, diffusers_ema, timm_ema, noether_style,
]
FAMILY_NAMES = ["torch AveragedModel", "ema-pytorch", "diffusers EMAModel", "timm ModelEmaV3", "noether-style"]


def importable() -> dict[str, str | None]:
    """Per peer library: None when it imports, else the reason (checked without building an EMA)."""
    out: dict[str, str | None] = {}
    checks = {"torch AveragedModel": "torch.optim.swa_utils", "ema-pytorch": "ema_pytorch",
              "diffusers EMAModel": "diffusers.training_utils", "timm ModelEmaV3": "timm.utils.model_ema",
              "noether-style": None}
    import importlib

    for name, module in checks.items():
        if module is None:
            out[name] = None
            continue
        try:
            importlib.import_module(module)
            out[name] = None
        except Exception as exc:
            out[name] = _unavailable(name, exc).unavailable
    return out
