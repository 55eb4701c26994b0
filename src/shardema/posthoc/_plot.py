"""The target profile against the reconstructed one (EDM2's figure); needs matplotlib (the ``train`` extra)."""

from __future__ import annotations

from pathlib import Path

from .._profiles import gamma_of_sigma_rel
from ._reconstruct import ReconstructionPlan


def profile_curves(plan: ReconstructionPlan, points: int = 400) -> tuple[list[float], list[float], list[float]]:
    """``(tau, target, reconstructed)`` sampled on ``[0, t]``: the weight each update gets."""
    t = float(plan.time)
    taus = [t * (i + 0.5) / points for i in range(points)]

    def profile(tau: float, t_i: float, gamma: float) -> float:
        return 0.0 if tau > t_i else (gamma + 1.0) * (tau / t_i) ** gamma / t_i

    target = [profile(tau, t, plan.gamma) for tau in taus]
    combined = [sum(term.coefficient * profile(tau, float(term.snapshot.time), gamma_of_sigma_rel(term.sigma_rel))
                    for term in plan.terms) for tau in taus]
    return taus, target, combined


def plot_profiles(plan: ReconstructionPlan, path) -> Path:
    """Save a PNG of the target profile and its reconstruction from the snapshots; returns the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install torch==2.13.0 'shardema[train]'") from None
    taus, target, combined = profile_curves(plan)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(taus, target, label=f"target sigma_rel={plan.sigma_rel:g}", linewidth=2)
    ax.plot(taus, combined, "--", label=f"{len(plan.terms)} snapshot profiles combined", linewidth=1.5)
    ax.set_xlabel("update (firings)")
    ax.set_ylabel("weight of the update in the average")
    ax.set_title(f"post-hoc EMA at step {plan.step}: fit error {plan.fit_error:.2g}")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
