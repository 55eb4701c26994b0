"""Rank helpers and the small agreement collectives the library uses.

Every collective goes through ``torch.distributed`` on the process group the
user gave (default: the world group). Nothing here runs when no process group
is initialised: a single process is its own world.
"""

from __future__ import annotations

import pickle

import torch
import torch.distributed as dist

from ._bytes import cpu_bytes


def is_distributed() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank(group=None) -> int:
    """This process's rank in ``group`` (0 without a process group)."""
    return dist.get_rank(group) if is_distributed() else 0


def world_size(group=None) -> int:
    """Number of ranks in ``group`` (1 without a process group)."""
    return dist.get_world_size(group) if is_distributed() else 1


def background_group(group=None):
    """A new gloo group over the ranks of ``group`` (the world when None), for collectives run
    on a background thread beside the training loop's own; None without a process group.

    Collective over the ranks of ``group`` only (``use_local_synchronization``): ranks outside
    it need not call it.
    """
    if not is_distributed():
        return None
    ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    return dist.new_group(ranks, backend="gloo", use_local_synchronization=True)


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


# [Note: object collectives without numpy]
# torch's broadcast_object_list / all_gather_object decode what they receive with
# ``tensor.numpy().tobytes()`` (distributed_c10d._tensor_to_object), so without numpy the
# receiving ranks raise "Numpy is not available" (a broadcast's sender decodes nothing and
# waits for them in its next collective). These two send the pickle as a uint8 tensor and
# decode it through a numpy-free byte view (see [Note: no numpy at runtime] in _bytes).


def _pickled(obj, device: torch.device) -> torch.Tensor:
    data = bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
    return torch.frombuffer(data, dtype=torch.uint8).to(device)  # the tensor keeps ``data`` alive


def _unpickled(payload: torch.Tensor, size: int):
    return pickle.loads(cpu_bytes(payload[:size]))


def broadcast_object(obj, src: int = 0, group=None):
    """Broadcast one picklable object from global rank ``src`` (identity without a group)."""
    if not is_distributed():
        return obj
    device = collective_device(group)
    sender = dist.get_rank() == src
    payload = _pickled(obj, device) if sender else None
    size = torch.tensor([0 if payload is None else payload.numel()], dtype=torch.int64, device=device)
    dist.broadcast(size, src=src, group=group)
    if payload is None:
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(payload, src=src, group=group)
    return obj if sender else _unpickled(payload, payload.numel())


def all_gather_objects(obj, group=None) -> list:
    """Gather one picklable object from every rank of ``group``."""
    if not is_distributed():
        return [obj]
    device = collective_device(group)
    world = world_size(group)
    payload = _pickled(obj, device)
    size = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    return [_unpickled(t, n) for t, n in zip(gathered, counts)]
