"""ShardedEMA: the public facade. It owns the step, the schedule and the swap state.

Storage and kernels live in :class:`~shardema._store.ShadowStore`; the swap protocol in
``_swap``; checkpoints in ``checkpoint/``. Those modules reach the EMA only through its
public methods and the store's interface (:attr:`ShardedEMA.store`, :meth:`ShardedEMA.loading`);
only this module changes the EMA's step, schedule and state.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import _dist
from ._compat import DTensor, local_tensor
from ._log import logger
from ._shards import Model, TrackedTensor, model_parts, path_label
from ._store import CheckpointLoad, Key, ShadowStore, StagedShadows
from ._swap import SwapInfo, swap_session
from .config import (
    RENAMED_OPTIONS,
    SCHEDULE_FIELDS,
    DecaySchedule,
    EMAConfig,
    check_model_paths,
    factors_match,
    missing_attribute,
)

if TYPE_CHECKING:
    from .checkpoint._async import SaveHandle


class EMAState(enum.Enum):
    """Lifecycle of a :class:`ShardedEMA`: updating normally, or EMA weights swapped in."""

    IDLE = "idle"
    SWAPPED = "swapped"


def build_config(config: Any, options: dict[str, Any]) -> EMAConfig:
    """The :class:`EMAConfig` that ``ShardedEMA(model, config, **options)`` means; errors name the option."""
    renamed = [k for k in options if k in RENAMED_OPTIONS]
    if renamed:
        raise TypeError("; ".join(f"ShardedEMA option {k!r} was renamed to {RENAMED_OPTIONS[k]!r}" for k in renamed))
    known = set(EMAConfig.model_fields) | set(SCHEDULE_FIELDS)
    unknown = sorted(k for k in options if k not in known)
    if unknown:
        raise TypeError(f"ShardedEMA got unknown option(s) {unknown}; EMAConfig has: {sorted(known)}")
    if isinstance(config, EMAConfig):
        if options:
            raise TypeError(f"ShardedEMA got an EMAConfig and the keyword(s) {sorted(options)}; put them in the "
                            f"config instead: config.model_copy(update={{...}}) or EMAConfig(..., "
                            f"{sorted(options)[0]}=...)")
        return config.to_ema_config()
    if config is not None:
        if "target_factors" in options:
            raise TypeError("ShardedEMA got target factors twice (second argument and target_factors=); give them "
                            "once")
        options = {"target_factors": config, **options}
    if "target_factors" not in options and options.get("sigma_rels") is None:
        raise TypeError("ShardedEMA needs target factors: ShardedEMA(model, [0.9999]), "
                        "ShardedEMA(model, EMAConfig(target_factors=[0.9999])) or, for post-hoc EMA, "
                        "ShardedEMA(model, sigma_rels=[0.05, 0.10])")
    return EMAConfig(**options)


class ShardedEMA:
    """Exponential moving averages of a model's weights, kept shard by shard on every rank.

    Each rank allocates shadows only for its own local pieces of the tracked tensors
    (FSDP2 / DTensor shards; the full tensor for plain or DDP-replicated models), so
    its EMA memory is exactly ``local numel x len(target_factors) x shadow-dtype bytes``.
    Nothing is gathered and the model is never deep-copied.

    Args:
        model: the live module: plain, DDP-wrapped, FSDP2 ``fully_shard``-ed, or with
            DTensor parameters (tensor parallel, HSDP, expert parallel); or the list of
            model parts this rank holds under pipeline parallelism (each keeping the full
            model's FQNs for its own layers, as torchtitan's stages do).
        config: an :class:`~shardema.EMAConfig`, or just the target factors (one decay or
            a list of distinct decays in (0, 1)).
        process_group: the group the model is sharded over (default: the world).
        **options: :class:`~shardema.EMAConfig` fields, as a convenience that builds the
            config (``target_factors``, ``model_paths``, ``shadow_dtype``, ``buffers``,
            ``schedule``, ``include_frozen``, ``include``, ``exclude``,
            ``upcast_buffer_bytes``, ``exchange_buffer_bytes``, ``chunk_numel``), and the
            schedule's options given flat (``update_every``, ``start_step``, ``min_decay``,
            ``power``, ``half_life_samples``, ...: every :class:`~shardema.DecaySchedule`
            field). Not allowed together with an ``EMAConfig``.

    Example::

        ema = ShardedEMA(model, [0.999, 0.9999])                       # keywords
        ema = ShardedEMA(model, EMAConfig(target_factors=[0.999]))     # the same, as a config
    """

    def __init__(self, model: Model, config: EMAConfig | float | Sequence[float] | None = None, *,
                 process_group=None, **options: Any):
        model_parts(model)  # validates: a module, or a non-empty list of model parts
        self.config: EMAConfig = build_config(config, options)
        """The validated options (frozen)."""
        self.model = model
        self.process_group = process_group
        self._step = 0
        self._samples_seen = 0.0  # samples before the next update() (the edm schedule's clock)
        self._samples_pending = 0.0  # samples since the last firing
        self._state = EMAState.IDLE
        self._schedule: DecaySchedule = self.config.schedule
        self._store = ShadowStore(model, self.config, process_group)
        self._pending_save: SaveHandle | None = None  # an asynchronous save in flight
        self._staging: StagedShadows | None = None  # its host buffers, reused by the next one
        self._save_group = None  # the gloo group asynchronous saves run their collectives on
        self._store.copy_from_live()
        self._warn_about_options()
        logger.info("tracking %d tensors in %d model path(s) with factors %s: %d shadow bytes on this rank",
                    len(self._store.tracked()), len(self.model_paths), list(self.target_factors), self.shadow_bytes)

    def _warn_about_options(self) -> None:
        """Warn where peers warn: options the schedule ignores, shadows too coarse for the decays."""
        ignored = self._schedule.ignored_options()
        if ignored:
            logger.warning("schedule kind %r ignores %s; remove them or pick the kind that uses them",
                           self._schedule.kind, ", ".join(ignored))
        coarse = sorted({self._store.shadow(0, t.key).dtype for t in self._store.tracked() if t.blended}
                        & {torch.bfloat16, torch.float16}, key=str)
        for dtype in coarse:
            eps = torch.finfo(dtype).eps
            frozen = [f for f in self.target_factors if 1.0 - f < eps]
            if frozen:
                logger.warning(
                    "%s shadows (resolution %.3g) with decay %s: an update moves a shadow by (1 - decay) x the "
                    "difference to the live weight, below the resolution unless that difference exceeds the weight "
                    "itself, so the EMA barely moves; use shadow_dtype='float32' or decays below %.4f",
                    str(dtype).removeprefix("torch."), eps, frozen, 1.0 - eps)

    # ------------------------------------------------------------------ read-only views
    @property
    def target_factors(self) -> tuple[float, ...]:
        """The decays, in the configured order."""
        return self.config.target_factors

    @property
    def model_paths(self) -> tuple[str | None, ...]:
        """The tracked model paths (``(None,)``: the whole model)."""
        return self.config.model_paths

    @property
    def shadow_dtype(self) -> torch.dtype | None:
        """The shadows' dtype (``None``: each live tensor's own dtype)."""
        return self.config.torch_shadow_dtype

    @property
    def buffers(self) -> str:
        """The buffers policy: ``copy``, ``average`` or ``ignore``."""
        return self.config.buffers

    @property
    def include_frozen(self) -> bool:
        """Whether parameters with ``requires_grad=False`` are averaged."""
        return self.config.include_frozen

    @property
    def step(self) -> int:
        """Number of ``update()`` calls applied so far (restored by a checkpoint load)."""
        return self._step

    @property
    def schedule(self) -> DecaySchedule:
        """The active schedule: the configured one, or the one a loaded checkpoint was saved with."""
        return self._schedule

    @property
    def state(self) -> EMAState:
        """``IDLE``, or ``SWAPPED`` inside ``with ema.swapped(...)``."""
        return self._state

    @property
    def store(self) -> ShadowStore:
        """The shadow storage: the read interface the swap and checkpoint code use (do not mutate)."""
        return self._store

    @property
    def shadow_bytes(self) -> int:
        """Bytes of shadow storage on this rank for blended tensors (all factors)."""
        return self._store.shadow_bytes

    @property
    def copied_bytes(self) -> int:
        """Bytes held for copied tensors (buffers under ``copy``, integer buffers)."""
        return self._store.copied_bytes

    @property
    def upcast_buffer_bytes(self) -> int:
        """Bytes of the bounded buffers that upcast bf16/fp16 live shards in ``update()`` (0 when dtypes match)."""
        return self._store.upcast_buffer_bytes

    if not TYPE_CHECKING:  # run time only: for mypy a misspelt attribute stays an error

        def __getattr__(self, name: str):
            """Called for missing attributes only: a name renamed in 0.2 raises naming the new one."""
            raise missing_attribute(self, name)

    # ------------------------------------------------------------------ lookup
    def factor_index(self, factor: float) -> int:
        """Index of ``factor`` in :attr:`target_factors`; raises listing the valid ones."""
        for k, f in enumerate(self.target_factors):
            if factors_match(f, factor):
                return k
        raise ValueError(f"factor {factor!r} is not one of this EMA's target factors {list(self.target_factors)}")

    def tracked(self, model_paths: Iterable[str | None] | str | None = None) -> list[TrackedTensor]:
        """The tracked tensors, optionally only those of some model paths (validated)."""
        return self._store.tracked(model_paths)

    def shadow(self, factor: float | int, key: Key) -> torch.Tensor:
        """This rank's EMA tensor of ``key = (model_path, fqn)`` for ``factor`` (a float) or a factor
        index (an int); a view, shared by all factors for copied tensors."""
        k = factor if isinstance(factor, int) else self.factor_index(factor)
        return self._store.shadow(k, key)

    # ------------------------------------------------------------------ updating
    def _require_idle(self, what: str) -> None:
        if self._state is not EMAState.IDLE:
            raise RuntimeError(f"ema.{what}() was called inside `with ema.swapped(...)`; call it after the block exits")

    @torch.no_grad()
    def update(self, num_samples: int | None = None) -> None:
        """Apply one EMA step to every factor; call after ``optimizer.step()``.

        Local shards are re-resolved on every call; the decay comes from the schedule
        in Python floats, so the call neither syncs with the device nor allocates.

        Args:
            num_samples: training samples in this step (all ranks). Only the ``edm``
                schedule reads it; it defaults to the schedule's ``samples_per_update``.
        """
        self._require_idle("update")
        self._store.check_structure()
        step, schedule = self._step, self._schedule
        samples = self._samples_of(num_samples)
        if schedule.is_tracking(step):
            self._store.copy_from_live()
            self._samples_pending = 0.0
        elif schedule.is_update_step(step):
            # The samples since the previous firing, and those seen before them: update_every=4 with
            # batch b averages like update_every=1 with batch 4b.
            window, before = self._samples_pending + samples, self._samples_seen - self._samples_pending
            self._store.lerp([1.0 - schedule.decay(f, step, window, before) for f in self.target_factors])
            self._samples_pending = 0.0
        else:
            self._store.copy_copied()
            self._samples_pending += samples
        self._samples_seen += samples
        self._step = step + 1

    def _samples_of(self, num_samples: int | None) -> float:
        if num_samples is not None:
            if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
                raise ValueError(f"num_samples={num_samples!r} must be a non-negative int (samples in this step)")
            return float(num_samples)
        if self._schedule.samples_per_update is not None:
            return float(self._schedule.samples_per_update)
        if self._schedule.kind == "edm":
            raise ValueError("the edm schedule counts samples: call ema.update(num_samples=global_batch_size), or set "
                             "samples_per_update in the schedule")
        return 0.0

    @property
    def samples_seen(self) -> float:
        """Training samples counted by ``update(num_samples=...)`` so far (restored by a load)."""
        return self._samples_seen

    @torch.no_grad()
    def reset_to_live(self) -> None:
        """Set every shadow to the current live weights (the step counter is kept)."""
        self._require_idle("reset_to_live")
        self._store.copy_from_live()

    def counters(self) -> dict[str, float]:
        """The sample counters the ``edm`` schedule needs, as saved in checkpoints."""
        return {"samples_seen": self._samples_seen, "samples_pending": self._samples_pending}

    def current_decays(self) -> dict[float, float]:
        """Decay the next ``update()`` applies, per factor: 0 when it copies the live weights
        (before ``start_step``), 1 when it leaves the shadows alone (``update_every`` skips it,
        or ``before_start="hold"`` holds it)."""
        if self._schedule.is_tracking(self._step):
            return dict.fromkeys(self.target_factors, 0.0)
        if not self._schedule.is_update_step(self._step):
            return dict.fromkeys(self.target_factors, 1.0)
        samples = self._samples_pending + (self._schedule.samples_per_update or 0)
        before = self._samples_seen - self._samples_pending
        return {f: self._schedule.decay(f, self._step, samples, before) for f in self.target_factors}

    # ------------------------------------------------------------------ swap
    @contextmanager
    def swapped(self, factor: float, model_paths: Sequence[str | None] | str | None = None, *,
                exchange_buffer_bytes: int | None = None, backup_to_host: bool = False,
                keep_changes: bool = False, **renamed: Any) -> Iterator[SwapInfo]:
        """Collective context manager: the EMA weights of ``factor`` live in the model inside.

        Every rank of the process group enters together; a model change ``update()`` would
        refuse (a replaced submodule, an unfrozen parameter) makes every rank raise before
        the body runs. On exit every rank restores its live weights bit-exact, also when the
        body raised, and all ranks agree (a rank whose body raised re-raises; the others
        raise :class:`shardema.SwapAbortedError`).
        Yields a :class:`shardema.SwapInfo` (mode, extra bytes held on this rank).

        Args:
            factor: one of :attr:`target_factors`.
            model_paths: swap only these model paths (default: all of the EMA's).
            exchange_buffer_bytes: bound of the in-place exchange buffer per device
                (default: the config's ``exchange_buffer_bytes``, 64 MiB).
            backup_to_host: keep backups of CUDA live shards (needed when the shadow dtype
                differs from the live dtype) in pinned host memory.
            keep_changes: make whatever the block writes into the swapped tensors their new
                EMA values (e.g. ``update_bn`` on the EMA weights). By default buffers written
                in the block are restored and writes to parameters raise
                :class:`shardema.SwapWriteError` at exit.

        See docs/swap.md.
        """
        if renamed:
            names = ", ".join(f"{k!r} (now {RENAMED_OPTIONS[k]!r})" if k in RENAMED_OPTIONS else repr(k)
                              for k in renamed)
            raise TypeError(f"ema.swapped() got unexpected keyword(s) {names}")
        k = self.factor_index(factor)
        factor = self.target_factors[k]
        targets = self.tracked(model_paths)
        swapped_paths = self.model_paths if model_paths is None else check_model_paths(model_paths)
        limit = self.config.exchange_buffer_bytes if exchange_buffer_bytes is None else exchange_buffer_bytes
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"exchange_buffer_bytes={exchange_buffer_bytes!r} must be a positive int (bytes), "
                             "e.g. 64 * 2**20")
        if self._state is not EMAState.IDLE:
            raise RuntimeError(
                f"`with ema.swapped({factor!r})` was entered while EMA weights are already swapped in; "
                "nested swaps are not supported: exit the outer `with ema.swapped(...)` block first"
            )
        self._state = EMAState.SWAPPED
        try:
            with swap_session(self._store, k, factor, targets, swapped_paths, exchange_buffer_bytes=limit,
                              backup_to_host=backup_to_host, keep_changes=keep_changes,
                              group=self.process_group) as info:
                yield info
        finally:
            self._state = EMAState.IDLE

    @torch.no_grad()
    def copy_to(self, factor: float, model_paths: Sequence[str | None] | str | None = None) -> None:
        """Collective: the model keeps the EMA weights of ``factor`` for good (e.g. at the end of training).

        Every rank copies its shadows into its live local shards (cast to the live dtype);
        the EMA itself is unchanged and goes on from its shadows. All ranks agree on the
        outcome with one small collective: if any rank failed, every rank raises. A model
        change ``update()`` would refuse (a replaced submodule, an unfrozen parameter) is
        refused here too, before anything is copied.
        ``model_paths``: copy only these model paths (default: all of the EMA's).
        """
        self._require_idle("copy_to")
        k = self.factor_index(factor)
        targets = [t for t in self.tracked(model_paths) if t.local_numel > 0]
        failure: BaseException | None = None
        try:
            # A replaced submodule would take no EMA weights (they would go into the detached one).
            self._store.check_structure()
            lives = self._store.resolve_lives(targets)
            seen: set[int] = set()
            for t, live in zip(targets, lives):
                if id(live) not in seen:  # a tensor shared by two model paths: once
                    seen.add(id(live))
                    live.copy_(self._store.shadow(k, t.key))
        except BaseException as exc:
            failure = exc
        failed = _dist.failed_ranks(failure is not None, self.process_group)
        if failure is not None:
            raise failure
        if failed:
            raise RuntimeError(f"ema.copy_to({factor!r}) failed on rank(s) {failed}; this rank's model holds the EMA "
                               "weights, theirs may not: see their logs")

    # ------------------------------------------------------------------ loading state
    def _adopt(self, step: int, schedule: DecaySchedule | None, counters: dict | None = None) -> None:
        """Take a loaded step, schedule and sample counters; a saved schedule replaces the configured one."""
        self._step = int(step)
        counters = counters or {}
        self._samples_seen = float(counters.get("samples_seen", 0.0))
        self._samples_pending = float(counters.get("samples_pending", 0.0))
        if schedule is not None and schedule != self._schedule:
            logger.warning("the loaded schedule %s replaces the configured %s", schedule, self._schedule)
            self._schedule = schedule

    @contextmanager
    def loading(self, what: str = "load") -> Iterator[CheckpointLoad]:
        """Write access to the shadows for one load, adopted all at once (used by ``checkpoint``).

        The block writes shadows through the yielded :class:`~shardema._store.CheckpointLoad`
        and calls its ``adopt(step, schedule)`` when every value is in place. At exit: if
        adopted, the EMA takes the step and schedule; otherwise, when shadows were written
        (a failed or partial load), or ``reset_to_live()`` was asked, or the block raised
        after writing, every shadow is reset to the live weights.
        """
        self._require_idle(what)
        load = CheckpointLoad(self._store)
        try:
            yield load
        except BaseException:
            if load.touched:
                self._store.copy_from_live()
            raise
        if load.adopted is not None:
            self._adopt(*load.adopted)
        elif load.touched or load.reset_requested:
            self._store.copy_from_live()

    # ------------------------------------------------------------------ Stateful
    def _dtensor_or_local(self, t: TrackedTensor, local: torch.Tensor) -> torch.Tensor:
        if t.mesh is None:
            return local
        stride = _contiguous_stride(t.global_shape)
        return DTensor.from_local(local, t.mesh, t.placements, run_check=False,
                                  shape=torch.Size(t.global_shape), stride=stride)

    def state_key(self, factor: float, t: TrackedTensor) -> str:
        """Flat state-dict key of one tensor: ``ema=<factor>/<model path>/<fqn>``."""
        return f"ema={factor!r}/{path_label(t.model_path)}/{t.fqn}"

    def state_dict(self) -> dict:
        """Stateful state: the step, the schedule and every shadow (DTensor when sharded).

        Values are live views of the shadows, so ``torch.distributed.checkpoint.load``
        restores in place. DTensors carry the global shape and stride (uneven shards).
        """
        state: dict = {"step": self._step, "schedule": self._schedule.model_dump_json(),
                       "target_factors": list(self.target_factors), **self.counters()}
        for k, factor in enumerate(self.target_factors):
            for t in self._store.tracked():
                state[self.state_key(factor, t)] = self._dtensor_or_local(t, self._store.shadow(k, t.key))
        return state

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict, strict: bool = True) -> None:
        """Load a :meth:`state_dict` (also full, unsharded tensors: this rank's slice is taken).

        With ``strict=True`` nothing changes unless every key matches.
        """
        self._require_idle("load_state_dict")
        missing, shape_errors, copies = [], [], []
        tracked = self._store.tracked()
        for k, factor in enumerate(self.target_factors):
            for t in tracked:
                key = self.state_key(factor, t)
                if key not in state_dict:
                    missing.append(key)
                    continue
                value = state_dict[key]
                target = self._store.shadow(k, t.key)
                if isinstance(value, DTensor):
                    if tuple(value.shape) != t.global_shape:
                        shape_errors.append(f"{key}: shape {tuple(value.shape)} != {t.global_shape}")
                        continue
                    if local_tensor(value) is target:
                        continue  # loaded in place (torch.distributed.checkpoint)
                    if t.placements is not None and tuple(value.placements) == t.placements:
                        value = local_tensor(value)
                    else:
                        value = value.full_tensor()
                if tuple(value.shape) == t.global_shape and t.global_shape != t.local_shape:
                    value = _slice_global(value, t)
                if tuple(value.shape) != t.local_shape:
                    shape_errors.append(f"{key}: shape {tuple(value.shape)} != {t.global_shape}")
                    continue
                if value is not target:
                    copies.append((target, value))
        expected = {self.state_key(f, t) for f in self.target_factors for t in tracked}
        unexpected = [k for k in state_dict if k.startswith("ema=") and k not in expected]
        problems = [f"missing key {k}" for k in missing] + [f"unexpected key {k}" for k in unexpected] + shape_errors
        if problems and strict:  # nothing was changed
            raise RuntimeError("EMA state dict does not match this EMA:\n  " + "\n  ".join(problems))
        schedule = None
        if "schedule" in state_dict:
            schedule = DecaySchedule.model_validate_json(state_dict["schedule"])
        for target, value in copies:
            target.copy_(value)
        self._adopt(int(state_dict.get("step", self._step)), schedule,
                    {k: state_dict[k] for k in ("samples_seen", "samples_pending") if k in state_dict})

    # ------------------------------------------------------------------ checkpoints
    def save(self, root, tag: str = "latest", *, dtype: torch.dtype | None = None, blocking: bool = True):
        """Collective: write this EMA under ``root`` with ``tag`` (see docs/checkpoint-format.md).

        ``dtype``: store the averaged shadows in a lower precision (e.g. ``torch.bfloat16``
        for post-hoc snapshots); ``None`` stores them as they are.

        ``blocking=True`` returns the tag once the save is committed. ``blocking=False``
        copies the shadows into host buffers (pinned for accelerator shadows) and returns a
        :class:`~shardema.SaveHandle` at once; a background thread writes and commits the
        copy with the same protocol, on a gloo process group of its own, while training
        goes on (``update()`` may run). Either way a save first waits for this EMA's
        previous asynchronous save (and raises its error if nobody waited for it). Call
        ``handle.wait()`` or :meth:`wait_for_save` before destroying the process group.
        """
        self._require_idle("save")
        from .checkpoint import save_ema
        from .checkpoint._async import start_save
        from .checkpoint._format import validate_tag

        validate_tag(tag)
        if not isinstance(blocking, bool):
            raise TypeError(f"blocking={blocking!r} must be True or False")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ValueError(f"dtype={dtype!r} must be a floating torch dtype such as torch.bfloat16, or None")
        if blocking:
            self.wait_for_save()
            return save_ema(self, root, tag, dtype=dtype)
        if self._save_group is None and _dist.is_distributed():
            self._save_group = _dist.background_group(self.process_group)
        self._pending_save, self._staging = start_save(self, self._pending_save, self._staging, self._save_group,
                                                       Path(root), tag, dtype)
        return self._pending_save

    def wait_for_save(self) -> str | None:
        """Wait for this EMA's asynchronous save in flight, if any; its tag, or None when there was none.

        Raises the save's error if it failed (once: a later call returns None).
        """
        pending, self._pending_save = self._pending_save, None
        return None if pending is None else pending.finish()

    def resume(self, root, strict: bool = False) -> str | None:
        """Collective: load ``cp=latest``, else ``cp=last``; else keep the live init (None)."""
        from .checkpoint import resume_ema

        return resume_ema(self, root, strict=strict)


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


def _slice_global(value: torch.Tensor, t: TrackedTensor) -> torch.Tensor:
    for dim, (start, size) in enumerate(zip(t.global_offset, t.local_shape)):
        value = value.narrow(dim, start, size)
    return value
