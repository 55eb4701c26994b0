"""Rank-coordinated swap of EMA weights into the live model (``with ema.swapped(f):``).

[Note: swap protocol]
Every rank of the EMA's process group enters the block together. Each rank then
works on its own local shards only; the collectives are two tiny agreements, one
after the swap-in and one at exit:

1. (every rank, local) validate the factor and model paths, refuse a nested swap,
   mark the EMA ``SWAPPED``.
2. (every rank, local) check the model's structure as ``update()`` does (a replaced
   submodule or an unfrozen parameter fails this step), reshard FSDP2 modules so
   parameters are sharded DTensors again, then re-resolve the live local tensors.
3. (every rank, local) allocate the swap memory (exchange buffer and backups), then
   put the EMA values into the live local shards.
4. (every rank, collective) entry agreement: one all-reduce of a ``world_size`` flag
   vector says whether step 2 or 3 failed anywhere; if so no rank runs the body (its
   collectives would never be joined by the failed rank): all restore and raise.
   Otherwise every rank runs the body.
5. (every rank, local, also when the body raised) reshard FSDP2 modules again,
   re-resolve the live local tensors and restore them bit-exact; mark ``IDLE``.
6. (every rank, collective, when the body ran) one all-reduce of a ``world_size``
   flag vector tells every rank which ranks failed in steps 4-5. A failed rank re-raises its own
   exception; the others raise :class:`SwapAbortedError` naming the failed ranks.

[Note: in-place exchange]
When a shadow has the live tensor's dtype, live and shadow values are exchanged
through one bounded exchange buffer, batch by batch (buffer <- live, live <- shadow,
shadow <- buffer). The same exchange at exit gives both sides their values back,
bit-exact, so no full backup of the model ever exists. Otherwise (e.g. bf16 live,
fp32 shadow) the live local shards are backed up first, optionally into pinned
host memory, the shadow is copied in with a cast, and the backup is copied back.
Buffers always take this backup path (they are small).

[Note: writes in the body]
The swap records every swapped live tensor's version counter right after the swap-in,
and that of the DTensor registered around it (an in-place op on a DTensor moves its
own counter, not its local tensor's), and compares them at exit (host metadata: no
memory, no device sync). Buffers written
by the body (a train-mode forward updates BatchNorm running stats) are simply
restored: their EMA is untouched. Parameters written by the body (an optimizer step,
``p.mul_()``) make the swap raise :class:`SwapWriteError` after the live weights are
restored; an exchanged parameter's EMA then holds the written values (the exchange
keeps no copy), a backed-up one's writes are discarded. With ``keep_changes=True``
every written value becomes the EMA value of that tensor: the way to recompute
BatchNorm statistics for the EMA weights (``torch.optim.swa_utils.update_bn``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from . import _dist
from ._compat import version_counter
from ._kernels import exchange_
from ._log import logger
from ._shards import TrackedTensor, path_label
from ._store import ShadowStore
from .config import missing_attribute

SwapMode = Literal["in_place", "backup", "mixed"]


class SwapAbortedError(RuntimeError):
    """Raised on every rank whose swap body succeeded when another rank's failed.

    The weights of this rank were restored before it was raised.
    ``failed_ranks`` holds the ranks (in the EMA's process group) whose body, swap-in
    or restore raised; their own exceptions are raised there.
    """

    def __init__(self, factor: float, failed_ranks: Sequence[int]):
        self.factor = float(factor)
        self.failed_ranks = tuple(int(r) for r in failed_ranks)
        ranks = ", ".join(str(r) for r in self.failed_ranks)
        super().__init__(
            f"swap of EMA factor {self.factor!r} aborted: rank(s) {ranks} raised inside "
            f"`with ema.swapped({self.factor!r})`; this rank's live weights were restored. "
            f"See the log of rank(s) {ranks} for the original exception."
        )

    def __reduce__(self):  # picklable across processes despite the custom signature
        return (type(self), (self.factor, self.failed_ranks))


class SwapWriteError(RuntimeError):
    """Raised at the exit of ``ema.swapped()`` when the block wrote to swapped parameters.

    Raised after the live weights were restored. ``fqns`` names the written tensors.
    Pass ``keep_changes=True`` to make such writes the new EMA values on purpose (for
    example ``torch.optim.swa_utils.update_bn`` on the EMA weights).
    """

    def __init__(self, message: str, fqns: Sequence[str] = ()):
        super().__init__(message)
        self.fqns = tuple(fqns)

    def __reduce__(self):  # picklable across processes despite the custom signature
        return (type(self), (str(self), self.fqns))


@dataclass(frozen=True)
class SwapInfo:
    """What a swap did on this rank; yielded by ``with ema.swapped(...) as info``.

    Attributes:
        factor: the EMA factor swapped in.
        model_paths: the model paths swapped (``None`` = the whole model).
        mode: ``"in_place"`` (every tensor exchanged through the exchange buffer),
            ``"backup"`` (every tensor backed up) or ``"mixed"``.
        num_tensors: local tensors swapped on this rank (empty pieces excluded).
        exchange_buffer_bytes: bytes of the in-place exchange buffers on this rank.
        backup_bytes: bytes of the live backups on this rank.
        backup_on_host: True when the backups live in pinned host memory.
    """

    factor: float
    model_paths: tuple[str | None, ...]
    mode: SwapMode
    num_tensors: int
    exchange_buffer_bytes: int
    backup_bytes: int
    backup_on_host: bool

    @property
    def extra_bytes(self) -> int:
        """Memory the swap holds on this rank from entry to exit (exchange buffers + backups)."""
        return self.exchange_buffer_bytes + self.backup_bytes

    if not TYPE_CHECKING:  # run time only: for mypy a misspelt attribute stays an error

        def __getattr__(self, name: str):
            """Called for missing attributes only: a name renamed in 0.2 raises naming the new one."""
            raise missing_attribute(self, name)


# An exchange segment: (pair index, start, length, offset in the scratch view).
_Segment = tuple[int, int, int, int]


class _Swap:
    """The swap of one factor's shadows with the live local shards of one rank.

    Plans depend only on shapes and dtypes, so they stay valid when FSDP2 replaces a
    local tensor during the body: :meth:`restore` re-resolves every live tensor.
    """

    def __init__(self, store: ShadowStore, k: int, targets: list[TrackedTensor], scratch_limit: int,
                 backup_to_host: bool):
        self.store = store
        self.targets = [t for t in targets if t.local_numel > 0]
        lives = self._resolve()
        # A tensor shared by two model paths has a shadow in each (equal values): swap it once.
        first: dict[int, int] = {}
        for i, live in enumerate(lives):
            first.setdefault(id(live), i)
        keep = sorted(first.values())
        self.targets = [self.targets[i] for i in keep]
        self._entry_lives = lives = [lives[i] for i in keep]
        self.shadows = [store.shadow(k, t.key) for t in self.targets]
        # Buffers are always backed up (they are small), so that a train-mode forward in the
        # body (BatchNorm running stats) never reaches their EMA: see [Note: writes in the body].
        exchange = [i for i, (t, live, shadow) in enumerate(zip(self.targets, lives, self.shadows))
                    if not t.is_buffer and live.dtype == shadow.dtype and live.is_contiguous()
                    and shadow.is_contiguous()]
        chosen = set(exchange)
        self.backed = [i for i in range(len(self.targets)) if i not in chosen]
        budget = self._scratch_budget(lives, exchange, scratch_limit)
        self.batches = self._plan_exchange(lives, exchange, budget)
        # Held until exit, so that restoring never needs to allocate.
        self.scratch = {d: torch.empty(n, dtype=torch.uint8, device=d) for d, n in budget.items()}
        self.backups, self.on_host = self._allocate_backups(lives, backup_to_host)
        self.batches_done = 0  # exchanged batches to exchange back
        self.live_overwritten = False  # backed-up tensors to copy back
        self.swapped_lives: list[torch.Tensor] = []  # the live tensors the EMA values were put into
        self.swapped_versions: list[int] = []  # their version counters right after the swap-in
        # The registered DTensors around them: an in-place op on a DTensor (p.mul_(2), an optimizer
        # step) bumps the DTensor's version counter only, not that of the local tensor it writes.
        self.swapped_outers: list[torch.Tensor | None] = []
        self.swapped_outer_versions: list[int] = []

    # ------------------------------------------------------------------ planning
    def _resolve(self) -> list[torch.Tensor]:
        return self.store.resolve_lives(self.targets)

    @staticmethod
    def _scratch_budget(lives, exchange, scratch_limit) -> dict[torch.device, int]:
        """Scratch bytes per device: the limit, or less for small models, >= one element."""
        need: dict[torch.device, int] = {}
        widest: dict[torch.device, int] = {}
        for i in exchange:
            live = lives[i]
            need[live.device] = need.get(live.device, 0) + live.numel() * live.element_size()
            widest[live.device] = max(widest.get(live.device, 1), live.element_size())
        return {d: max(min(scratch_limit, need[d]), widest[d]) for d in need}

    @staticmethod
    def _plan_exchange(lives, exchange, budget) -> list[tuple[torch.device, torch.dtype, list[_Segment]]]:
        """Batches of segments that fill the device's scratch (one dtype per batch)."""
        by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i in exchange:
            by_kind.setdefault((lives[i].device, lives[i].dtype), []).append(i)
        batches = []
        for (device, dtype), members in by_kind.items():
            capacity = budget[device] // lives[members[0]].element_size()
            segments: list[_Segment] = []
            used = 0
            for i in members:
                start, numel = 0, lives[i].numel()
                while start < numel:
                    if used == capacity:
                        batches.append((device, dtype, segments))
                        segments, used = [], 0
                    length = min(numel - start, capacity - used)
                    segments.append((i, start, length, used))
                    start += length
                    used += length
            if segments:
                batches.append((device, dtype, segments))
        return batches

    def _allocate_backups(self, lives, backup_to_host: bool) -> tuple[dict[int, torch.Tensor], bool]:
        # One flat buffer per (device, dtype); each backed-up tensor gets a view of it.
        by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i in self.backed:
            by_kind.setdefault((lives[i].device, lives[i].dtype), []).append(i)
        views: dict[int, torch.Tensor] = {}
        on_host = False
        for (device, dtype), members in by_kind.items():
            total = sum(lives[i].numel() for i in members)
            if backup_to_host and device.type == "cuda":
                # Pin the local tensor's backup (pin_memory() is not implemented for DTensors).
                flat = torch.empty(total, dtype=dtype, device="cpu", pin_memory=True)
                on_host = True
            else:
                flat = torch.empty(total, dtype=dtype, device=device)
            offset = 0
            for i in members:
                views[i] = flat[offset:offset + lives[i].numel()].view(lives[i].shape)
                offset += lives[i].numel()
        return views, on_host

    def info(self, factor: float, model_paths: tuple[str | None, ...]) -> SwapInfo:
        """The :class:`SwapInfo` of this swap (the mode speaks of parameters; buffers are always backed up)."""
        backed_params = [i for i in self.backed if not self.targets[i].is_buffer]
        num_params = sum(not t.is_buffer for t in self.targets)
        if not backed_params:
            mode: SwapMode = "in_place"
        elif len(backed_params) == num_params:
            mode = "backup"
        else:
            mode = "mixed"
        return SwapInfo(
            factor=factor, model_paths=model_paths, mode=mode, num_tensors=len(self.targets),
            exchange_buffer_bytes=sum(s.numel() for s in self.scratch.values()),
            backup_bytes=sum(b.numel() * b.element_size() for b in self.backups.values()),
            backup_on_host=self.on_host,
        )

    # ------------------------------------------------------------------ moving values
    def _typed_scratch(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The device's byte scratch seen as ``dtype`` (whole elements only)."""
        raw = self.scratch[device]
        itemsize = dtype.itemsize
        return raw[:raw.numel() // itemsize * itemsize].view(dtype)

    def _exchange(self, lives: list[torch.Tensor], batch) -> None:
        device, dtype, segments = batch
        scratch = self._typed_scratch(device, dtype)
        tmp = [scratch[o:o + n] for _, _, n, o in segments]
        live = [lives[i].view(-1)[s:s + n] for i, s, n, _ in segments]
        shadow = [self.shadows[i].view(-1)[s:s + n] for i, s, n, _ in segments]
        exchange_(tmp, live, shadow)

    @staticmethod
    def _copy(dsts: list[torch.Tensor], srcs: list[torch.Tensor], non_blocking: bool) -> None:
        if not dsts:
            return
        if all(d.device == s.device for d, s in zip(dsts, srcs)):
            torch._foreach_copy_(dsts, srcs)
        else:  # host backup of device tensors
            for d, s in zip(dsts, srcs):
                d.copy_(s, non_blocking=non_blocking)

    @torch.no_grad()
    def swap_in(self) -> None:
        """Put the EMA values into the live local shards (step 3 of the protocol)."""
        self._put_ema_in()

    def _put_ema_in(self) -> None:
        # Undecorated so that mutation testing reaches it (mutmut skips decorated functions);
        # swap_in's @torch.no_grad() covers it.
        lives, self._entry_lives = self._entry_lives, []
        backed = self.backed
        self._copy([self.backups[i] for i in backed], [lives[i] for i in backed], self.on_host)
        self.live_overwritten = True
        self._copy([lives[i] for i in backed], [self.shadows[i] for i in backed], False)
        for batch in self.batches:
            self._exchange(lives, batch)
            self.batches_done += 1
        self.swapped_lives = lives
        self.swapped_versions = [version_counter(live) for live in lives]
        self.swapped_outers = [self._outer(t, live) for t, live in zip(self.targets, lives)]
        self.swapped_outer_versions = [-1 if o is None else version_counter(o) for o in self.swapped_outers]

    @staticmethod
    def _outer(t: TrackedTensor, live: torch.Tensor) -> torch.Tensor | None:
        """The registered tensor wrapping ``live`` (a DTensor), or None when ``live`` is registered itself."""
        outer = t.current()
        return None if outer is None or outer is live else outer

    def written(self, lives: list[torch.Tensor]) -> list[int]:
        """Indices of the swapped tensors the body wrote to (their version counter, or that of
        the DTensor registered around them, moved).

        A live tensor that FSDP2 replaced by another object during the body is not
        compared (its new object has its own counter).
        """
        written = []
        for i, (live, before) in enumerate(zip(self.swapped_lives, self.swapped_versions)):
            if i >= len(lives) or lives[i] is not live:
                continue
            outer = self.swapped_outers[i]
            if version_counter(live) != before or (
                    outer is not None and self._outer(self.targets[i], live) is outer
                    and version_counter(outer) != self.swapped_outer_versions[i]):
                written.append(i)
        return written

    @torch.no_grad()
    def restore(self, keep_changes: bool = False) -> list[int]:
        """Give the live shards (and the exchanged shadows) their values back (step 5).

        Returns the indices of the tensors the body wrote to. With ``keep_changes`` the
        written values of backed-up tensors become their EMA values (exchanged tensors
        hand theirs back to the shadow by the exchange itself).
        """
        return self._give_back(keep_changes)

    def _give_back(self, keep_changes: bool) -> list[int]:
        # Undecorated so that mutation testing reaches it; restore's @torch.no_grad() covers it.
        lives = self._resolve()
        written = self.written(lives) if self.swapped_lives else []
        if keep_changes and written:
            kept = [i for i in written if i in set(self.backed)]
            self._copy([self.shadows[i] for i in kept], [lives[i] for i in kept], False)
        for batch in self.batches[:self.batches_done]:
            self._exchange(lives, batch)
        self.batches_done = 0
        if self.live_overwritten:
            backed = self.backed
            self._copy([lives[i] for i in backed], [self.backups[i] for i in backed], self.on_host)
        self.live_overwritten = False
        self.swapped_lives, self.swapped_versions = [], []
        self.swapped_outers, self.swapped_outer_versions = [], []
        return written

    def write_error(self, written: list[int], factor: float) -> SwapWriteError | None:
        """The error for parameters written inside the block (buffers are restored, not reported)."""
        params = [i for i in written if not self.targets[i].is_buffer]
        if not params:
            return None
        exchanged = [i for i in params if i not in set(self.backed)]
        names = [f"{path_label(self.targets[i].model_path)}:{self.targets[i].fqn}" for i in params]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        fate = ("their EMA now holds the values written in the block (the in-place exchange keeps no copy)"
                if exchanged else "those writes were discarded and the EMA is unchanged")
        return SwapWriteError(
            f"the body of `with ema.swapped({factor!r})` wrote to swapped parameter(s) {shown}; the live weights "
            f"were restored, and {fate}. Evaluate without writing (no optimizer step, no in-place ops on "
            "parameters), or pass keep_changes=True to make the written values the EMA on purpose",
            [self.targets[i].fqn for i in params])


@contextmanager
def swap_session(store: ShadowStore, k: int, factor: float, targets: list[TrackedTensor],
                 swapped_paths: tuple[str | None, ...], *, exchange_buffer_bytes: int, backup_to_host: bool,
                 keep_changes: bool = False, group=None) -> Iterator[SwapInfo]:
    """Collective: the shadows of factor index ``k`` live in the model inside the block.

    Runs steps 2-6 of the swap protocol (see this module's note); the caller
    (:meth:`shardema.ShardedEMA.swapped`) validates the arguments and owns the EMA's
    state (step 1). Every rank of ``group`` must enter. On exit every rank restores
    its live weights bit-exact, also when the body raised, then all ranks agree with
    one small all-reduce: a rank whose body raised re-raises its exception, the
    others raise :class:`SwapAbortedError`.

    Yields:
        a :class:`SwapInfo` with the mode and the extra bytes held on this rank.
    """
    yield from _session(store, k, factor, targets, swapped_paths, exchange_buffer_bytes=exchange_buffer_bytes,
                        backup_to_host=backup_to_host, keep_changes=keep_changes, group=group)


def _session(store: ShadowStore, k: int, factor: float, targets: list[TrackedTensor],
             swapped_paths: tuple[str | None, ...], *, exchange_buffer_bytes: int, backup_to_host: bool,
             keep_changes: bool, group) -> Iterator[SwapInfo]:
    # Undecorated so that mutation testing reaches it (mutmut skips decorated functions). Through
    # `yield from`, the body's exception (or GeneratorExit) is thrown in at the yield below.
    failure: BaseException | None = None
    failed: list[int] = []
    body_ran = False
    swap = None
    try:
        # A replaced submodule or unfrozen parameter would leave new live weights unswapped: refuse it
        # here, so that every rank learns of it through the entry agreement and raises together.
        store.check_structure()
        swap = _Swap(store, k, targets, exchange_buffer_bytes, backup_to_host)
        info = swap.info(factor, swapped_paths)
        swap.swap_in()
        logger.debug("swapped in EMA factor %r: %s", factor, info)
    except BaseException as exc:
        failure = exc
    try:
        # Entry agreement: if any rank could not swap in, no rank runs the body, whose
        # collectives (FSDP2 all-gathers) the failed rank would never join.
        failed = _dist.failed_ranks(failure is not None, group)
    except BaseException as exc:
        failure = failure or exc
    if failure is None and not failed:
        body_ran = True
        try:
            yield info
        except BaseException as exc:  # GeneratorExit too: restore, agree, re-raise
            failure = exc
    if swap is not None:
        try:
            written = swap.restore(keep_changes)
            if not keep_changes and failure is None:
                failure = swap.write_error(written, factor)
        except BaseException as exc:
            logger.error("restoring the live weights after the swap of factor %r failed: %r", factor, exc)
            if failure is None:
                failure = exc

    if body_ran:
        try:
            failed = _dist.failed_ranks(failure is not None, group)
        except BaseException as exc:
            logger.error(
                "the agreement at the end of the swap of factor %r failed (%r); a rank probably died. This rank's "
                "weights were restored", factor, exc,
            )
            if failure is not None:
                raise failure from exc
            raise
    if failure is not None:
        others = [r for r in failed if r != _dist.rank(group)]
        if others and hasattr(failure, "add_note"):
            failure.add_note(f"shardema: rank(s) {others} also failed inside the same swap")
        raise failure
    if failed:
        logger.warning("swap of factor %r aborted because rank(s) %s failed; weights restored", factor, failed)
        raise SwapAbortedError(factor, failed)
