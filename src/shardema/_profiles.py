"""Power-function EMA profiles (Karras et al., EDM2, CVPR 2024): the maths, no torch state.

[Note: power-function profiles]
A power-function EMA with exponent ``gamma`` at time ``t`` (in firings, i.e. averaging
updates, counted from 1) averages the weights ``theta(tau)`` with the profile

    p_t(tau) = (gamma + 1) * tau**gamma / t**(gamma + 1),   0 <= tau <= t,

which integrates to 1. Its per-update decay is ``beta(t) = (1 - 1/t)**(gamma + 1)`` (so
``beta(1) = 0``: the first firing copies). Its width relative to ``t`` is

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)**2 * (gamma + 3))),

decreasing in ``gamma`` for ``gamma >= 0`` (sigma_rel < 1/sqrt(12)). Two profiles have the
closed-form inner product (``m = min(t_a, t_b)``)

    <p_a, p_b> = (g_a + 1)(g_b + 1) m**(g_a + g_b + 1) / ((g_a + g_b + 1) t_a**(g_a + 1) t_b**(g_b + 1)),

so the least-squares fit of a target profile by snapshot profiles (the post-hoc EMA of
EDM2) is the linear system ``A x = b`` with ``A_ij = <p_i, p_j>`` and ``b_i = <p_i, p_target>``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

MAX_SIGMA_REL = 1.0 / math.sqrt(12.0)
"""sigma_rel of ``gamma = 0`` (the uniform average); profiles need ``0 < sigma_rel < MAX_SIGMA_REL``."""


def sigma_rel_of_gamma(gamma: float) -> float:
    """The relative width of the power-function profile with exponent ``gamma`` (>= 0)."""
    g = float(gamma)
    if not g >= 0.0 or math.isinf(g):
        raise ValueError(f"gamma={gamma!r} must be a finite number >= 0")
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def check_sigma_rel(sigma_rel: object) -> float:
    """Validate one sigma_rel: a number in ``(0, 1/sqrt(12))``; return it as a float."""
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)):
        raise ValueError(f"sigma_rel {sigma_rel!r} is not a number; give relative widths such as 0.05 or 0.10")
    value = float(sigma_rel)
    if not 0.0 < value < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel {sigma_rel!r} is outside (0, {MAX_SIGMA_REL:.4f}): a power-function profile "
                         "is at most as wide as the uniform average; EDM2 tracks 0.05 and 0.10")
    return value


@functools.lru_cache(maxsize=1024)
def gamma_of_sigma_rel(sigma_rel: float) -> float:
    """The exponent ``gamma >= 0`` whose profile has relative width ``sigma_rel`` (cached).

    Solved by bisection on the decreasing branch (``gamma >= 0``) to full float precision:
    0.05 -> 16.97, 0.07 -> 11.24, 0.10 -> 6.94.
    """
    target = check_sigma_rel(sigma_rel)
    lo, hi = 0.0, 1.0
    while sigma_rel_of_gamma(hi) > target:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if sigma_rel_of_gamma(mid) > target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def power_function_decay(gamma: float, t: int) -> float:
    """Decay of the firing at time ``t`` (>= 1, in firings): ``(1 - 1/t)**(gamma + 1)``."""
    if t < 1:
        raise ValueError(f"time t={t!r} counts firings from 1")
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def profile_dot(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """``<p_a, p_b>``: the L2 inner product over ``tau`` of two power-function profiles (closed form).

    Computed in logarithms: ``t**gamma`` overflows a float for narrow profiles of long runs.
    """
    m = min(t_a, t_b)
    s = gamma_a + gamma_b + 1.0
    log_value = (math.log(gamma_a + 1.0) + math.log(gamma_b + 1.0) - math.log(s) + s * math.log(m)
                 - (gamma_a + 1.0) * math.log(t_a) - (gamma_b + 1.0) * math.log(t_b))
    return math.exp(log_value)


def solve_coefficients(snapshots: Sequence[tuple[float, float]], target: tuple[float, float]) -> list[float]:
    """Least-squares coefficients ``x`` with ``sum_i x_i p_i ~ p_target`` (L2 over ``tau``).

    ``snapshots`` and ``target`` are ``(t, gamma)`` pairs. Times are scaled by the target's
    (the fit is scale-free) and the system is solved in float64 by a rank-revealing
    least-squares solver, so duplicated or nearly dependent snapshots are fine.
    """
    import torch

    if not snapshots:
        raise ValueError("no snapshots to fit the target profile with")
    scale = float(target[0])
    points = [(t / scale, g) for t, g in snapshots]
    goal = (1.0, float(target[1]))
    a = torch.tensor([[profile_dot(ti, gi, tj, gj) for tj, gj in points] for ti, gi in points], dtype=torch.float64)
    b = torch.tensor([[profile_dot(ti, gi, *goal)] for ti, gi in points], dtype=torch.float64)
    solution = torch.linalg.lstsq(a, b, driver="gelsd").solution
    return [float(v) for v in solution[:, 0]]


def fit_error(snapshots: Sequence[tuple[float, float]], target: tuple[float, float],
              coefficients: Sequence[float]) -> float:
    """Relative L2 distance between the target profile and ``sum_i x_i p_i`` (0: an exact fit)."""
    scale = float(target[0])
    points = [(t / scale, g) for t, g in snapshots]
    goal = (1.0, float(target[1]))
    gg = profile_dot(*goal, *goal)
    cross = sum(x * profile_dot(ti, gi, *goal) for x, (ti, gi) in zip(coefficients, points))
    quad = sum(xi * xj * profile_dot(ti, gi, tj, gj)
               for xi, (ti, gi) in zip(coefficients, points) for xj, (tj, gj) in zip(coefficients, points))
    return math.sqrt(max(gg - 2.0 * cross + quad, 0.0) / gg)
