"""The main job's post-hoc EMA sweep: validation loss against the EMA length, chosen after training.

After training, every rank reconstructs each sigma_rel of :data:`SWEEP` from the snapshots
(``shardema.posthoc.reconstruct``: offline, one tensor at a time, no collective), loads it into
its shards of the FSDP2 model, evaluates the validation loss (collective), and restores the live
weights. Rank 0 writes ``posthoc_sweep.png`` (EDM2's loss-vs-EMA-length curve, the best value
marked) and appends a table to ``summary.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from shardema import posthoc, reshard_fsdp

log = logging.getLogger("shardema.launch")

SWEEP = (0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.085, 0.10, 0.12, 0.15, 0.20, 0.25)
"""sigma_rel values evaluated: around EDM2's tracked pair 0.05 / 0.10, from short to long averages."""


def _local(p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return p.to_local() if isinstance(p, DTensor) else p


@torch.no_grad()
def _load_full(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into the model's parameters (each rank keeps its own shards)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    reshard_fsdp(model)  # an evaluation leaves the root's parameters unsharded
    for name, p in model.named_parameters():
        full = state[name].to(p.dtype)
        if isinstance(p, DTensor):
            # Every rank holds the same full tensor: cut it locally, no communication.
            p.copy_(distribute_tensor(full.to(p.device), p.device_mesh, p.placements, src_data_rank=None))
        else:
            p.copy_(full)


@torch.no_grad()
def sweep(model: torch.nn.Module, snapshot_root: Path, evaluate: Callable[[], float],
          sigma_rels=SWEEP) -> list[tuple[float, float]]:
    """Collective: ``(sigma_rel, validation loss)`` for every sigma_rel, the live weights restored after."""
    reshard_fsdp(model)
    backup = [_local(p).detach().clone() for p in model.parameters()]
    results = []
    try:
        for sigma_rel in sigma_rels:
            _load_full(model, posthoc.reconstruct(snapshot_root, sigma_rel, progress=False))
            results.append((sigma_rel, evaluate()))
            if dist.get_rank() == 0:
                log.info("post-hoc EMA sigma_rel %.3f: validation loss %.4f", sigma_rel, results[-1][1])
    finally:
        reshard_fsdp(model)
        for p, saved in zip(model.parameters(), backup):
            _local(p).detach().copy_(saved)
    return results


def write_sweep_report(run_dir: Path, results: list[tuple[float, float]], tracked: tuple[float, ...],
                       live_loss: float | None) -> None:
    """Rank 0: the table (appended to summary.md) and posthoc_sweep.png."""
    best = min(results, key=lambda r: r[1])
    lines = ["", "# Post-hoc EMA: validation loss against sigma_rel (reconstructed after training)", "",
             f"Tracked during training: sigma_rel {', '.join(f'{s:g}' for s in tracked)}, snapshots under "
             f"`{run_dir.name}/posthoc`; every other value is a reconstruction (docs/posthoc.md).", "",
             "| sigma_rel | gamma | validation loss | |", "|---|---|---|---|"]
    for sigma_rel, loss in results:
        mark = ", ".join(word for word, yes in (("best", (sigma_rel, loss) == best), ("tracked", sigma_rel in tracked))
                         if yes)
        lines.append(f"| {sigma_rel:g} | {posthoc.gamma_of_sigma_rel(sigma_rel):.2f} | {loss:.4f} | {mark} |")
    if live_loss is not None:
        lines.append(f"\nLive weights at the end: {live_loss:.4f}.")
    with open(run_dir / "summary.md", "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axis = plt.subplots(figsize=(7, 4.5))
    axis.plot([r[0] for r in results], [r[1] for r in results], marker="o", label="post-hoc EMA")
    axis.plot([best[0]], [best[1]], marker="*", markersize=16, color="crimson", linestyle="none",
              label=f"best: sigma_rel {best[0]:g} ({best[1]:.4f})")
    for sigma_rel in tracked:
        axis.axvline(sigma_rel, color="gray", linestyle=":", linewidth=1)
    if live_loss is not None:
        axis.axhline(live_loss, color="black", linestyle="--", linewidth=1, label=f"live weights ({live_loss:.4f})")
    axis.set_xscale("log")
    axis.set_xlabel("sigma_rel (EMA length relative to training time); dotted: tracked")
    axis.set_ylabel("validation loss (nats/char)")
    axis.set_title("Validation loss against EMA length, chosen after training")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(run_dir / "posthoc_sweep.png", dpi=120)
    log.info("wrote %s", run_dir / "posthoc_sweep.png")
