"""The import guard shared by the integrations."""

from __future__ import annotations


def missing(module: str, extra: str, exc: ImportError) -> ImportError:
    """The error raised when an integration's framework is not installed: it names the pip command."""
    return ImportError(
        f"shardema.integrations.{extra} needs the {module.split('.')[0]!r} package, which is not installed "
        f"(import {module!r} failed: {exc}); install it with: pip install \"shardema[{extra}]\""
    )


def is_sharded(ema) -> bool:
    """True when any tensor the EMA tracks is a DTensor (FSDP2, tensor parallel): its state is per rank."""
    return any(t.mesh is not None for t in ema.tracked())


def rank_of(ema) -> int:
    """This process's rank in the EMA's process group (0 without torch.distributed)."""
    from .._dist import rank

    return rank(ema.process_group)


def pick_factor(config, factor: float | None, option: str) -> float:
    """The factor a trainer callback uses for ``option`` (default: the first target factor), checked."""
    from ..config import factors_match

    if factor is None:
        return config.target_factors[0]
    for f in config.target_factors:
        if factors_match(f, factor):
            return f
    raise ValueError(f"{option}={factor!r} is not one of the target factors {list(config.target_factors)}")
