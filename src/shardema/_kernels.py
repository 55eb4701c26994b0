"""Fused foreach EMA kernels, plus the float64 loop they are tested against.

[Note: one call for all factors]
With K target factors the shadows of one (device, dtype) group are updated by a
single ``torch._foreach_lerp_`` whose tensor lists hold every (factor, tensor)
pair and whose weights are a scalar list (``1 - decay_k`` per pair). When K > 1
the pairs are ordered chunk by chunk (``s1[c], s2[c], ..., sK[c]``, all reading the
same live chunk ``l[c]``) so the live chunk is still in cache for factors 2..K:
the update then moves close to (4 + 8K) bytes per fp32 element instead of 12K.

[Note: mixed dtypes]
``_foreach_lerp_`` needs the live and shadow tensors in the same dtype. For a
bf16/fp16 live shard with fp32 shadows, live chunks are first copied into a
preallocated fp32 scratch buffer of bounded size (``scratch_numel`` elements),
batch by batch, so the upcast never costs more than that buffer.
"""

from __future__ import annotations

from typing import Sequence

import torch

LERP_TAKES_SCALAR_LIST = "ScalarList" in torch.ops.aten._foreach_lerp_.overloads()


def foreach_lerp_(selfs: list[torch.Tensor], ends: list[torch.Tensor], weights: list[float]) -> None:
    """``selfs[i].lerp_(ends[i], weights[i])`` for all i, in as few foreach calls as torch allows."""
    if not selfs:
        return
    if LERP_TAKES_SCALAR_LIST:
        torch._foreach_lerp_(selfs, ends, weights)
        return
    by_weight: dict[float, tuple[list, list]] = {}
    for s, e, w in zip(selfs, ends, weights):
        group = by_weight.setdefault(w, ([], []))
        group[0].append(s)
        group[1].append(e)
    for w, (s, e) in by_weight.items():
        torch._foreach_lerp_(s, e, w)


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


class LerpPlan:
    """Foreach argument lists for one group, valid while the live tensors are unchanged.

    ``shadows[k][i]`` is the shadow of live tensor ``lives[i]`` for factor k. Building
    a plan creates views only; :meth:`lerp` and :meth:`copy` allocate nothing.
    """

    def __init__(self, shadows: list[list[torch.Tensor]], lives: list[torch.Tensor], *,
                 chunk_numel: int, scratch: torch.Tensor | None):
        self.lives = lives
        self.num_factors = len(shadows)
        keep = [i for i, live in enumerate(lives) if live.numel() > 0]
        mixed = any(lives[i].dtype != shadows[0][i].dtype for i in keep)
        if mixed and scratch is None:
            raise AssertionError("a scratch buffer is needed for mixed live / shadow dtypes")
        # (self, end, factor index) triples in update order, as chunk batches.
        self._batches: list[tuple[list, list, list[int], list, list]] = []
        self._copy_selfs = [shadows[k][i] for i in keep for k in range(self.num_factors)]
        self._copy_srcs = [lives[i] for i in keep for _ in range(self.num_factors)]
        split = mixed or self.num_factors > 1
        if mixed:
            chunk_numel = min(chunk_numel, scratch.numel())
        pieces = []  # (shadow chunks per factor, live chunk)
        for i in keep:
            contiguous = lives[i].is_contiguous() and all(shadows[k][i].is_contiguous() for k in range(self.num_factors))
            if split and contiguous:
                live_chunks = _flat_chunks(lives[i], chunk_numel)
                shadow_chunks = [_flat_chunks(shadows[k][i], chunk_numel) for k in range(self.num_factors)]
                pieces += [([sc[c] for sc in shadow_chunks], live_chunks[c]) for c in range(len(live_chunks))]
            elif mixed:
                raise NotImplementedError("non-contiguous bf16/fp16 live tensors with a different shadow dtype")
            else:
                pieces.append(([shadows[k][i] for k in range(self.num_factors)], lives[i]))
        if not mixed:
            self._batches.append(self._lists(pieces, None))
            return
        batch, used = [], 0
        for piece in pieces:
            n = piece[1].numel()
            if used + n > scratch.numel():
                self._batches.append(self._lists(batch, scratch))
                batch, used = [], 0
            batch.append(piece)
            used += n
        if batch:
            self._batches.append(self._lists(batch, scratch))

    def _lists(self, pieces, scratch):
        selfs, ends, factor_of, copy_dst, copy_src = [], [], [], [], []
        offset = 0
        for shadow_chunks, live_chunk in pieces:
            end = live_chunk
            if scratch is not None:
                end = scratch[offset:offset + live_chunk.numel()].view(live_chunk.shape)
                offset += live_chunk.numel()
                copy_dst.append(end)
                copy_src.append(live_chunk)
            for k, shadow_chunk in enumerate(shadow_chunks):
                selfs.append(shadow_chunk)
                ends.append(end)
                factor_of.append(k)
        return selfs, ends, factor_of, copy_dst, copy_src

    def lerp(self, weights: Sequence[float]) -> None:
        """Move every shadow of factor k towards its live tensor by ``weights[k]``."""
        for selfs, ends, factor_of, copy_dst, copy_src in self._batches:
            if not selfs:
                continue
            if copy_dst:
                torch._foreach_copy_(copy_dst, copy_src)
            foreach_lerp_(selfs, ends, [weights[k] for k in factor_of])

    def copy(self) -> None:
        """Set every shadow to its live tensor (casting to the shadow dtype)."""
        if self._copy_selfs:
            torch._foreach_copy_(self._copy_selfs, self._copy_srcs)
