"""Rank helpers and the small agreement collectives the library uses.

Every collective goes through ``torch.distributed`` on the process group the
user gave (default: the world group). Nothing here runs when no process group
is initialised: a single process is its own world.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank(group=None) -> int:
    """This process's rank in ``group`` (0 without a process group)."""
    return dist.get_rank(group) if is_distributed() else 0


def world_size(group=None) -> int:
    """Number of ranks in ``group`` (1 without a process group)."""
    return dist.get_world_size(group) if is_distributed() else 1


def collective_device(group=None) -> torch.device:
    """The device on which ``group``'s backend takes tensors."""
    if not is_distributed():
        return torch.device("cpu")
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def failed_ranks(failed: bool, group=None) -> list[int]:
    """Collective: every rank says whether it failed; all learn which ranks did.

    One all-reduce of a ``world_size`` int vector, so every rank reaches it exactly
    once whatever happened locally. A rank that died outright makes the others
    raise when the process group's timeout (``init_process_group(timeout=...)``)
    expires instead of waiting forever.
    """
    if not is_distributed():
        return [0] if failed else []
    flags = torch.zeros(world_size(group), dtype=torch.int32, device=collective_device(group))
    if failed:
        flags[rank(group)] = 1
    dist.all_reduce(flags, group=group)
    return [int(r) for r in torch.nonzero(flags).flatten().tolist()]


def barrier(group=None) -> None:
    """A barrier that is a no-op without a process group."""
    if is_distributed():
        dist.barrier(group=group)


def broadcast_object(obj, src: int = 0, group=None):
    """Broadcast one picklable object from global rank ``src`` (identity without a group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_objects(obj, group=None) -> list:
    """Gather one picklable object from every rank of ``group``."""
    if not is_distributed():
        return [obj]
    out: list = [None] * world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


