"""Decay schedules: pure functions of the step, in Python floats (no torch, no sync).

[Note: step numbering]
``n`` below is the number of update() calls made since averaging began, i.e.
``ema.step - start_step`` at the time of the call (0 for the first averaged call).
Calls before ``start_step`` copy the live weights into the shadows; after it an
update is applied on every ``update_every``-th call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ScheduleKind = Literal["constant", "warmup", "power"]


def check_factors(target_factors: float | Sequence[float]) -> tuple[float, ...]:
    """Validate target factors: at least one, each in (0, 1), no duplicates."""
    if isinstance(target_factors, (int, float)):
        target_factors = [target_factors]
    factors = tuple(float(f) for f in target_factors)
    if not factors:
        raise ValueError("target_factors is empty; give at least one decay in (0, 1), e.g. [0.9999]")
    for f in factors:
        if math.isnan(f) or not (0.0 < f < 1.0):
            raise ValueError(f"target factor {f!r} is outside (0, 1); use a decay such as 0.999 or 0.9999")
    duplicated = sorted({f for f in factors if factors.count(f) > 1})
    if duplicated:
        raise ValueError(f"target factors {duplicated} are given more than once; give each decay once")
    return factors


class DecaySchedule(BaseModel):
    """When and how strongly the EMA is updated.

    - ``constant`` (default): decay = factor.
    - ``warmup``: decay = min(factor, (1 + n) / (10 + n)) — early steps move fast.
    - ``power``: decay = min(factor, 1 - (1 + n / inv_gamma) ** -power); ``power=2/3`` suits
      runs of ~1M steps, ``power=3/4`` shorter ones (as in Karras et al.).
    - ``update_every=k``: average on every k-th call only.
    - ``start_step=s``: calls before ``s`` make the shadow track the live weights.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ScheduleKind = "constant"
    inv_gamma: float = Field(1.0, gt=0)
    power: float = Field(2 / 3, gt=0)
    update_every: int = Field(1, ge=1)
    start_step: int = Field(0, ge=0)

    def is_tracking(self, step: int) -> bool:
        """True when the call at ``step`` copies live weights (before ``start_step``)."""
        return step < self.start_step

    def is_update_step(self, step: int) -> bool:
        """True when the call at ``step`` applies an EMA update."""
        return step >= self.start_step and (step - self.start_step) % self.update_every == 0

    def decay(self, factor: float, step: int) -> float:
        """Decay used by the call at ``step`` for target ``factor`` (see the step note)."""
        n = max(0, step - self.start_step)
        if self.kind == "constant":
            return factor
        if self.kind == "warmup":
            return min(factor, (1 + n) / (10 + n))
        return min(factor, 1.0 - (1.0 + n / self.inv_gamma) ** (-self.power))
