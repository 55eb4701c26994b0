"""Post-hoc EMA (Karras et al., EDM2): track power-function profiles, snapshot them, choose the EMA length later.

Training: ``ema = ShardedEMA(model, sigma_rels=[0.05, 0.10])`` and, every S updates,
``save_snapshot(ema, root)``. After training: :func:`reconstruct` (a state dict),
:func:`reconstruct_to_file` (one safetensors file) or :func:`reconstruct_to_checkpoint`
(a sharded checkpoint that ``resume`` / ``swapped`` use) for any ``sigma_rel`` at any
step up to the last snapshot; :func:`plan_reconstruction` shows the coefficients. The
command line: ``shardema posthoc ROOT --sigma-rel 0.07 --out FILE``. See docs/posthoc.md.
"""

from .._profiles import MAX_SIGMA_REL, gamma_of_sigma_rel, power_function_decay, profile_dot, sigma_rel_of_gamma
from ._plot import plot_profiles, profile_curves
from ._reconstruct import (
    ReconstructionPlan,
    Term,
    plan_reconstruction,
    reconstruct,
    reconstruct_to_checkpoint,
    reconstruct_to_file,
)
from ._snapshots import SNAPSHOT_PREFIX, Snapshot, list_snapshots, save_snapshot, snapshot_tag

__all__ = [
    "MAX_SIGMA_REL",
    "SNAPSHOT_PREFIX",
    "ReconstructionPlan",
    "Snapshot",
    "Term",
    "gamma_of_sigma_rel",
    "list_snapshots",
    "plan_reconstruction",
    "plot_profiles",
    "power_function_decay",
    "profile_curves",
    "profile_dot",
    "reconstruct",
    "reconstruct_to_checkpoint",
    "reconstruct_to_file",
    "save_snapshot",
    "sigma_rel_of_gamma",
    "snapshot_tag",
]
