"""The tensor table of a save: the union of every rank's tracked tensors.

[Note: union tensor table]
Under pipeline parallelism ranks hold disjoint parts of one model (torchtitan keeps the
full model's FQNs on every stage, for that stage's layers only); under expert
parallelism some tensors live on meshes that do not span every rank. So no single rank
knows the whole model: the manifest's tensor table is the union of every rank's table,
gathered in the save's agreement step (metadata only, never tensor data), and a resume
compares the saved table with the union of the resuming ranks' tables. Two ranks that
describe one FQN differently (global shape, dtype) are a bug in the model set-up and
fail the save on every rank before anything is written.
"""

from __future__ import annotations

from typing import Any

import torch

from .._shards import TrackedTensor
from ._format import dtype_name

Table = dict[Any, dict[str, dict]]
"""model path -> FQN -> ``{"global_shape", "dtype", "blended", "is_buffer", "aliases", "placements", "mesh_shape"}``."""


def mesh_shape(t: TrackedTensor) -> list[int] | None:
    """The shape of the tensor's device mesh (None for plain tensors)."""
    return None if t.mesh is None else [int(s) for s in t.mesh.shape]


def stored_dtype(t: TrackedTensor, shadow_dtype: torch.dtype, save_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a save stores a shadow in: ``save_dtype`` for averaged floating tensors, else its own."""
    if save_dtype is None or not t.blended or not shadow_dtype.is_floating_point:
        return shadow_dtype
    return save_dtype


def local_table(ema, save_dtype: torch.dtype | None = None) -> Table:
    """This rank's tensor table: every tracked tensor of every model path (dtypes as a save stores them)."""
    table: Table = {mp: {} for mp in ema.model_paths}
    for t in ema.tracked():
        table[t.model_path][t.fqn] = {
            "global_shape": list(t.global_shape),
            "dtype": dtype_name(stored_dtype(t, ema.shadow(0, t.key).dtype, save_dtype)),
            "blended": t.blended, "is_buffer": t.is_buffer, "aliases": list(t.aliases),
            "placements": None if t.placements is None else str(tuple(t.placements)), "mesh_shape": mesh_shape(t),
        }
    return table


def union_tables(tables: list[Table]) -> tuple[Table, list[str]]:
    """The union of the ranks' tables (in rank order) and every conflict between them."""
    union: Table = {}
    conflicts: list[str] = []
    for rank, table in enumerate(tables):
        for mp, entries in table.items():
            merged = union.setdefault(mp, {})
            for fqn, info in entries.items():
                seen = merged.get(fqn)
                if seen is None:
                    merged[fqn] = {**info, "aliases": list(info["aliases"])}
                    continue
                for key in ("global_shape", "dtype", "blended", "is_buffer"):
                    if seen[key] != info[key]:
                        conflicts.append(f"model path {mp!r}: {fqn!r} has {key} {info[key]!r} on rank {rank} but "
                                         f"{seen[key]!r} on a lower rank")
                seen["aliases"] = sorted(set(seen["aliases"]) | set(info["aliases"]))
    return union, conflicts
