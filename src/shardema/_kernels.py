"""Fused foreach EMA kernels, plus the float64 loop they are tested against.

[Note: one call for all factors]
With K target factors the shadows of one (device, dtype) group are updated by
foreach lerps whose tensor lists hold every (factor, tensor) pair and whose weights
are a scalar list (``1 - decay_k`` per pair). When K > 1 the pairs are ordered chunk
by chunk (``s1[c], s2[c], ..., sK[c]``, all reading the same live chunk ``l[c]``) so
the live chunk is still in cache for factors 2..K: the update then moves close to
(4 + 8K) bytes per fp32 element instead of 12K.

[Note: mixed dtypes]
``_foreach_lerp_`` needs the live and shadow tensors in the same dtype. For a
bf16/fp16 live shard with fp32 shadows, live chunks are first copied into a
preallocated fp32 scratch buffer of bounded size (``scratch_numel`` elements),
batch by batch, so the upcast never costs more than that buffer.

[Note: CPU execution]
On CPU, ATen splits one elementwise op over its threads once the op has more than
``CPU_PIECE_NUMEL`` (ATen's grain size) elements, opening and joining a parallel
region per op. A plan of hundreds of chunks would pay hundreds of joins per update,
and every join waits for the slowest thread: on cores shared with data loaders or
other jobs that wait dominates (measured 10x slower than one ``lerp_`` of the same
bytes). So on CPU a plan cuts the work into pieces of at most ``CPU_PIECE_NUMEL``
elements, which ATen runs serially, and gives ``torch.get_num_threads()`` workers
one contiguous, equal-sized share each: one join per update. The exception is a
single factor with matching dtypes, where nothing is reused across factors: tensors
of at least ``CPU_WHOLE_NUMEL`` elements are then updated whole by one foreach call
on the calling thread (one join per big tensor, measured 5-8% faster than pieces
on an idle machine), and only the smaller ones are cut into pieces. Upcast batches are
kept small (``CPU_BATCH_NUMEL``) so each worker's scratch stays in its L2 cache and
the live shard is read from memory once. On other devices a plan is one sequence of
foreach calls, as described above.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, NamedTuple

import torch

CPU_PIECE_NUMEL = 32768
"""Largest CPU piece: ATen's grain size, below which an elementwise op runs on one thread."""

CPU_BATCH_NUMEL = 1 << 18
"""Elements per upcast batch of one CPU worker (1 MiB of fp32 scratch: stays in L2)."""

CPU_WHOLE_NUMEL = 1 << 20
"""With one factor and matching dtypes, CPU tensors this large are updated whole (ATen splits each)."""

MIN_PARALLEL_NUMEL = 1 << 20
"""Below this many (element x factor) updates per call a CPU plan runs on the calling thread."""


def foreach_lerp_(selfs: list[torch.Tensor], ends: list[torch.Tensor], weights: list[float]) -> None:
    """``selfs[i].lerp_(ends[i], weights[i])`` for all i, in as few foreach calls as torch allows."""
    if selfs:
        torch._foreach_lerp_(selfs, ends, weights)  # the ScalarList overload: one weight per pair


@torch.no_grad()
def lerp_loop_reference(shadows: Sequence[Sequence[torch.Tensor]], lives: Sequence[torch.Tensor],
                        weights: Sequence[float]) -> None:
    """Reference: per tensor, per factor, in float64, written back in the shadow dtype."""
    for k, weight in enumerate(weights):
        for shadow, live in zip(shadows[k], lives):
            exact = shadow.double() + weight * (live.double() - shadow.double())
            shadow.copy_(exact)


def _flat_chunks(tensor: torch.Tensor, chunk_numel: int) -> list[torch.Tensor]:
    flat = tensor.view(-1)
    return [flat[i:i + chunk_numel] for i in range(0, flat.numel(), chunk_numel)]


class _Batch(NamedTuple):
    """One foreach lerp (preceded by one foreach upcast copy when ``copy_dst`` is set)."""

    selfs: list[torch.Tensor]
    ends: list[torch.Tensor]
    factor_of: list[int]
    copy_dst: list[torch.Tensor]
    copy_src: list[torch.Tensor]


# A piece of work: (the shadow chunk of each factor, the live chunk they all read).
_Piece = tuple[list[torch.Tensor], torch.Tensor]

_pool_lock = threading.Lock()
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, executor)


def _cpu_pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of at least ``workers`` threads (recreated after a fork)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid() or _pool[1] < workers:
            if _pool is not None and _pool[0] == os.getpid():
                _pool[2].shutdown(wait=False)
            _pool = (os.getpid(), workers, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shardema"))
        return _pool[2]


def _run_parallel(fn, runs: list) -> None:
    """``fn(*run)`` for every run: the first on the calling thread, the others on the pool.

    Returns only when every run has finished (no worker may still write after it), then
    raises the first worker error.
    """
    futures = [_cpu_pool(len(runs) - 1).submit(fn, *run) for run in runs[1:]] if len(runs) > 1 else []
    try:
        fn(*runs[0])
    finally:
        errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error


def _run_batches(batches: list[_Batch], weight_lists: list[list[float]]) -> None:
    # Grad mode is thread-local: pool threads must disable it themselves (lives require grad).
    with torch.no_grad():
        for batch, weights in zip(batches, weight_lists):
            if batch.copy_dst:
                torch._foreach_copy_(batch.copy_dst, batch.copy_src)
            foreach_lerp_(batch.selfs, batch.ends, weights)


def _split_even(pieces: list[_Piece], parts: int) -> list[list[_Piece]]:
    """Contiguous runs of ``pieces`` with about equal element counts (no empty run)."""
    total = sum(p[1].numel() for p in pieces)
    runs: list[list[_Piece]] = [[]]
    done = 0
    for piece in pieces:
        if runs[-1] and len(runs) < parts and done >= total * len(runs) / parts:
            runs.append([])
        runs[-1].append(piece)
        done += piece[1].numel()
    return runs


def exchange_(scratch: list[torch.Tensor], a: list[torch.Tensor], b: list[torch.Tensor],
              layout: Literal["auto", "cpu", "device"] = "auto") -> None:
    """Swap the values of ``a[i]`` and ``b[i]`` through ``scratch[i]`` (same shapes and dtypes).

    On CPU the work is cut like an update plan (see [Note: CPU execution]): pieces of at most
    ``CPU_PIECE_NUMEL`` elements, which ATen copies on one thread, in one contiguous share per
    thread (one join per call, not one per copy: a swap then does not wait on the slowest of
    the threads three times per tensor when the cores are shared). Each share exchanges its
    pieces one after the other through one piece of scratch, which stays in the cache: live and
    shadow are each read and written once. Elsewhere: three foreach copies. ``layout`` forces
    one of the two (``"device"`` on CPU tensors: how tests run the device path in CI).
    """
    if not a:
        return
    if layout == "device" or (layout == "auto" and a[0].device.type != "cpu"):
        _exchange_lists(scratch, a, b)
        return
    pieces = [(t.view(-1)[i:i + CPU_PIECE_NUMEL], x.view(-1)[i:i + CPU_PIECE_NUMEL],
               y.view(-1)[i:i + CPU_PIECE_NUMEL])
              for t, x, y in zip(scratch, a, b) for i in range(0, x.numel(), CPU_PIECE_NUMEL)]
    total = sum(x.numel() for x in a)
    workers = min(max(1, torch.get_num_threads()), len(pieces)) if total >= MIN_PARALLEL_NUMEL else 1
    bounds = [len(pieces) * w // workers for w in range(workers + 1)]
    runs = [_interleaved(pieces[lo:hi]) for lo, hi in itertools.pairwise(bounds)]
    _run_parallel(_copy_in_order, runs)


def _interleaved(pieces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """``(dsts, srcs)`` that exchange each piece in turn through the run's largest scratch piece
    (its own: the runs' scratch pieces are disjoint)."""
    tmp = max((t for t, _, _ in pieces), key=lambda t: t.numel())
    dsts: list[torch.Tensor] = []
    srcs: list[torch.Tensor] = []
    for _, x, y in pieces:
        t = tmp[:x.numel()]
        dsts += [t, x, y]
        srcs += [x, y, t]
    return dsts, srcs


def _copy_in_order(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    # CPU foreach copies run one pair after the other, in list order: the order the exchange needs.
    with torch.no_grad():  # thread-local: pool threads set it themselves
        torch._foreach_copy_(dsts, srcs)


def _exchange_lists(scratch: list[torch.Tensor], a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    torch._foreach_copy_(scratch, a)
    torch._foreach_copy_(a, b)
    torch._foreach_copy_(b, scratch)


def _neighbours(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``b`` starts where ``a`` ends, in the same storage, both contiguous with one dtype."""
    return (a.dtype == b.dtype and a.device == b.device and a.is_contiguous() and b.is_contiguous()
            and b.data_ptr() == a.data_ptr() + a.numel() * a.element_size()
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())


def _span(first: torch.Tensor, numel: int) -> torch.Tensor:
    """A 1-D view of ``numel`` elements of ``first``'s storage, starting at ``first``."""
    return first.as_strided((numel,), (1,), first.storage_offset())


def _coalesce(shadows: list[list[torch.Tensor]], lives: list[torch.Tensor],
              keep: list[int]) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """The kept tensors, runs of storage neighbours (live and every shadow alike) merged into 1-D views.

    [Note: neighbours]
    On CPU a foreach op costs about a microsecond per tensor before it touches memory
    (one dispatch and one TensorIterator each), as much as moving ~100 KB of it; a model of
    many small tensors spends a large part of its update there. The shadows of a group are
    laid out in live-tensor order in one flat buffer, so when consecutive live tensors are
    also neighbours in one storage (views of one flat parameter buffer), the pair lists can
    hold one view per run instead of one per tensor. Separately allocated live tensors
    (FSDP2 shards, ordinary modules) are left as they are.
    """
    out_lives: list[torch.Tensor] = []
    out_shadows: list[list[torch.Tensor]] = [[] for _ in shadows]
    run: list[int] = []

    def close() -> None:
        if len(run) == 1:
            out_lives.append(lives[run[0]])
            for row, out in zip(shadows, out_shadows):
                out.append(row[run[0]])
        elif run:
            numel = sum(lives[i].numel() for i in run)
            out_lives.append(_span(lives[run[0]], numel))
            for row, out in zip(shadows, out_shadows):
                out.append(_span(row[run[0]], numel))

    for i in keep:
        if run and _neighbours(lives[run[-1]], lives[i]) and all(_neighbours(row[run[-1]], row[i]) for row in shadows):
            run.append(i)
        else:
            close()
            run = [i]
    close()
    return out_shadows, out_lives


class LerpPlan:
    """Foreach argument lists for one group, valid while the live tensors are unchanged.

    ``shadows[k][i]`` is the shadow of live tensor ``lives[i]`` for factor k. Building
    a plan creates views only; :meth:`lerp` and :meth:`copy` allocate nothing.

    ``layout`` picks the plan: ``"auto"`` (the default) builds the CPU plan for CPU
    tensors and the device plan otherwise; ``"cpu"`` or ``"device"`` force one, whatever
    the tensors' device. Both plans run on any device, so tests build the device plan
    from CPU tensors and check it in CI, where there is no accelerator.
    """

    def __init__(self, shadows: list[list[torch.Tensor]], lives: list[torch.Tensor], *,
                 chunk_numel: int, scratch: torch.Tensor | None,
                 layout: Literal["auto", "cpu", "device"] = "auto"):
        if layout not in ("auto", "cpu", "device"):
            raise ValueError(f"layout={layout!r} is not a plan layout; use 'auto', 'cpu' or 'device'")
        self.lives = lives
        self.num_factors = len(shadows)
        keep = [i for i, live in enumerate(lives) if live.numel() > 0]
        mixed = any(lives[i].dtype != shadows[0][i].dtype for i in keep)
        if mixed and scratch is None:
            raise AssertionError("a scratch buffer is needed for mixed live / shadow dtypes")
        # Neighbours in one storage become one tensor: fewer ops per update (see [Note: neighbours]).
        shadows, lives = _coalesce(shadows, lives, keep)
        keep = list(range(len(lives)))
        self._copy_selfs = [shadows[k][i] for i in keep for k in range(self.num_factors)]
        self._copy_srcs = [lives[i] for i in keep for _ in range(self.num_factors)]
        if layout == "auto":
            on_cpu = bool(keep) and lives[keep[0]].device.type == "cpu"
        else:
            on_cpu = layout == "cpu"
        self.layout: Literal["cpu", "device"] = "cpu" if on_cpu else "device"
        # _inline: batches run first on the calling thread; _runs: one list of batches per worker
        # (worker 0 is the calling thread).
        self._inline: list[_Batch] = []
        if on_cpu:
            self._runs = self._plan_cpu(shadows, lives, keep, mixed, chunk_numel, scratch)
        else:
            self._runs = [self._plan_device(shadows, lives, keep, mixed, chunk_numel, scratch)]
        self._weights_key: tuple[float, ...] | None = None
        self._weight_lists: list[list[list[float]]] = []
        self._inline_weights: list[list[float]] = []

    # ------------------------------------------------------------------ planning
    def _pieces(self, shadows, lives, keep, mixed, piece_numel, split) -> list[_Piece]:
        pieces: list[_Piece] = []
        for i in keep:
            contiguous = lives[i].is_contiguous() and all(s[i].is_contiguous() for s in shadows)
            if split and contiguous:
                live_chunks = _flat_chunks(lives[i], piece_numel)
                shadow_chunks = [_flat_chunks(shadows[k][i], piece_numel) for k in range(self.num_factors)]
                pieces += [([sc[c] for sc in shadow_chunks], live_chunks[c]) for c in range(len(live_chunks))]
            elif mixed:
                raise NotImplementedError("non-contiguous bf16/fp16 live tensors with a different shadow dtype")
            else:
                pieces.append(([shadows[k][i] for k in range(self.num_factors)], lives[i]))
        return pieces

    def _plan_device(self, shadows, lives, keep, mixed, chunk_numel, scratch) -> list[_Batch]:
        split = mixed or self.num_factors > 1
        if mixed:
            chunk_numel = min(chunk_numel, scratch.numel())
        pieces = self._pieces(shadows, lives, keep, mixed, chunk_numel, split)
        if not mixed:
            return [self._batch(pieces, None)]
        return self._scratch_batches(pieces, scratch)

    def _plan_cpu(self, shadows, lives, keep, mixed, chunk_numel, scratch) -> list[list[_Batch]]:
        if not mixed and self.num_factors == 1:
            # Nothing to reuse across factors: big tensors go whole to ATen, which splits each
            # over its threads (few joins, each after >= CPU_WHOLE_NUMEL elements).
            whole = [i for i in keep if lives[i].numel() >= CPU_WHOLE_NUMEL]
            if whole:
                self._inline = [self._batch(self._pieces(shadows, lives, whole, False, 0, split=False), None)]
                keep = [i for i in keep if lives[i].numel() < CPU_WHOLE_NUMEL]
        total = sum(lives[i].numel() for i in keep)
        workers = max(1, torch.get_num_threads())
        if total * self.num_factors < MIN_PARALLEL_NUMEL:
            workers = 1
        piece_numel = min(chunk_numel, CPU_PIECE_NUMEL)
        if mixed:
            workers = min(workers, scratch.numel())
            share = scratch.numel() // workers
            batch_numel = min(share, CPU_BATCH_NUMEL)
            piece_numel = min(piece_numel, batch_numel)
        pieces = self._pieces(shadows, lives, keep, mixed, piece_numel, split=True)
        runs = _split_even(pieces, workers)
        if not mixed:
            return [[self._batch(run, None)] for run in runs]
        return [self._scratch_batches(run, scratch[w * share:w * share + batch_numel]) for w, run in enumerate(runs)]

    def _scratch_batches(self, pieces: list[_Piece], scratch: torch.Tensor) -> list[_Batch]:
        batches: list[_Batch] = []
        batch: list[_Piece] = []
        used = 0
        for piece in pieces:
            n = piece[1].numel()
            if used + n > scratch.numel():
                batches.append(self._batch(batch, scratch))
                batch, used = [], 0
            batch.append(piece)
            used += n
        if batch:
            batches.append(self._batch(batch, scratch))
        return batches

    @staticmethod
    def _batch(pieces: list[_Piece], scratch: torch.Tensor | None) -> _Batch:
        batch = _Batch([], [], [], [], [])
        offset = 0
        for shadow_chunks, live_chunk in pieces:
            end = live_chunk
            if scratch is not None:
                end = scratch[offset:offset + live_chunk.numel()].view(live_chunk.shape)
                offset += live_chunk.numel()
                batch.copy_dst.append(end)
                batch.copy_src.append(live_chunk)
            for k, shadow_chunk in enumerate(shadow_chunks):
                batch.selfs.append(shadow_chunk)
                batch.ends.append(end)
                batch.factor_of.append(k)
        return batch

    # ------------------------------------------------------------------ execution
    def _weights_for(self, weights: Sequence[float]) -> list[list[list[float]]]:
        key = tuple(float(w) for w in weights)
        if key != self._weights_key:  # constant schedules rebuild nothing after the first call
            self._weight_lists = [[[key[k] for k in b.factor_of] for b in run] for run in self._runs]
            self._inline_weights = [[key[k] for k in b.factor_of] for b in self._inline]
            self._weights_key = key
        return self._weight_lists

    def lerp(self, weights: Sequence[float]) -> None:
        """Move every shadow of factor k towards its live tensor by ``weights[k]``."""
        weight_lists = self._weights_for(weights)
        if self._inline:
            _run_batches(self._inline, self._inline_weights)
        runs = [(run, w) for run, w in zip(self._runs, weight_lists) if any(b.selfs for b in run)]
        if not runs:
            return
        _run_parallel(_run_batches, runs)

    def copy(self) -> None:
        """Set every shadow to its live tensor (casting to the shadow dtype)."""
        if self._copy_selfs:
            torch._foreach_copy_(self._copy_selfs, self._copy_srcs)
