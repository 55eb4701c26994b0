"""ShardedEMA: per-rank shadows of the local shards, fused updates, Stateful state."""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ._kernels import CPU_BATCH_NUMEL, LerpPlan
from ._log import logger
from ._schedule import DecaySchedule, ScheduleKind, check_factors
from ._shards import BufferPolicy, DTensor, LiveTensor, check_model_paths, collect, path_label

_DEFAULT_SCRATCH_BYTES = 32 * 2**20
_DEFAULT_CHUNK_NUMEL = 2**18


class EMAState(enum.Enum):
    """Lifecycle of a :class:`ShardedEMA`: updating normally, or EMA weights swapped in."""

    IDLE = "idle"
    SWAPPED = "swapped"


def reshard_fsdp(model: nn.Module) -> None:
    """Reshard every FSDP2 module under ``model`` so parameters are sharded DTensors again.

    After a forward with ``reshard_after_forward=False`` (or an eval forward of the root),
    FSDP2 leaves unsharded plain Parameters registered. ``reshard()`` is local (no
    communication) and a no-op for modules that are already sharded.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class _Group:
    """Shadows of the blended tensors of one (device, live dtype), in one flat [K, N] buffer."""

    def __init__(self, members: list[LiveTensor], num_factors: int, shadow_dtype: torch.dtype,
                 device: torch.device):
        self.members = members
        self.shadow_dtype = shadow_dtype
        total = sum(m.local_numel for m in members)
        self.flat = torch.empty((num_factors, total), dtype=shadow_dtype, device=device)
        self.views: list[list[torch.Tensor]] = [[] for _ in range(num_factors)]
        offset = 0
        for m in members:
            for k in range(num_factors):
                self.views[k].append(self.flat[k, offset:offset + m.local_numel].view(m.local_shape))
            offset += m.local_numel
        self.plan: LerpPlan | None = None
        self.plan_lives: list[torch.Tensor] | None = None  # None: no plan built yet


class ShardedEMA:
    """Exponential moving averages of a model's weights, kept shard by shard on every rank.

    Each rank allocates shadows only for its own local pieces of the tracked tensors
    (FSDP2 / DTensor shards; the full tensor for plain or DDP-replicated models), so
    its EMA memory is exactly ``local numel x len(target_factors) x shadow-dtype bytes``.
    Nothing is gathered and the model is never deep-copied.

    Args:
        model: the live module: plain, DDP-wrapped, FSDP2 ``fully_shard``-ed, or with
            DTensor parameters (tensor parallel, HSDP).
        target_factors: one decay or a list of distinct decays in (0, 1). Typical: 0.999
            for ~10k-step runs, 0.9999 for ~100k+ steps.
        model_paths: dotted submodule paths to average separately (``None`` = the whole
            model). Keys are FQNs relative to each path, wrapper prefixes removed.
        shadow_dtype: dtype of the shadows (default fp32; ``None`` = each live dtype).
        buffers: ``"copy"`` (buffers follow the live model), ``"average"`` (float buffers
            are averaged like parameters, integer ones copied) or ``"ignore"``.
        schedule: ``"constant"``, ``"warmup"`` or ``"power"`` (see :class:`DecaySchedule`).
        inv_gamma, power: parameters of the ``power`` schedule.
        update_every: average on every k-th ``update()`` call only.
        start_step: calls before this step copy the live weights instead of averaging.
        include_frozen: also average parameters with ``requires_grad=False``.
        process_group: the group the model is sharded over (default: the world).
        upcast_scratch_bytes: size of the scratch buffer used to upcast bf16/fp16 live
            shards for fp32 shadows.
        chunk_numel: chunk size used to order multi-factor updates for cache reuse.
    """

    def __init__(
        self,
        model: nn.Module,
        target_factors: float | Sequence[float],
        *,
        model_paths: Sequence[str | None] | str | None = None,
        shadow_dtype: torch.dtype | None = torch.float32,
        buffers: BufferPolicy = "copy",
        schedule: ScheduleKind | DecaySchedule = "constant",
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
        update_every: int = 1,
        start_step: int = 0,
        include_frozen: bool = True,
        process_group=None,
        upcast_scratch_bytes: int = _DEFAULT_SCRATCH_BYTES,
        chunk_numel: int = _DEFAULT_CHUNK_NUMEL,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if buffers not in ("copy", "average", "ignore"):
            raise ValueError(f"buffers={buffers!r} is not a buffers policy; use 'copy', 'average' or 'ignore'")
        if shadow_dtype is not None and not (isinstance(shadow_dtype, torch.dtype) and shadow_dtype.is_floating_point):
            raise ValueError(f"shadow_dtype={shadow_dtype!r} must be a floating torch dtype such as torch.float32, or None")
        if chunk_numel < 1 or upcast_scratch_bytes < 1:
            raise ValueError(f"chunk_numel={chunk_numel} and upcast_scratch_bytes={upcast_scratch_bytes} must be positive")
        if isinstance(schedule, DecaySchedule):
            self.schedule = schedule
        else:
            if schedule not in ("constant", "warmup", "power"):
                raise ValueError(f"schedule={schedule!r} is not a schedule; use 'constant', 'warmup' or 'power'")
            self.schedule = DecaySchedule(kind=schedule, inv_gamma=inv_gamma, power=power,
                                          update_every=update_every, start_step=start_step)
        self.model = model
        self.target_factors: tuple[float, ...] = check_factors(target_factors)
        self.model_paths: tuple[str | None, ...] = tuple(check_model_paths(model_paths))
        self.process_group = process_group
        self.shadow_dtype = shadow_dtype
        self.buffers = buffers
        self.include_frozen = include_frozen
        self.step = 0
        self.state = EMAState.IDLE
        self._chunk_numel = chunk_numel
        self._scratch_bytes = upcast_scratch_bytes

        reshard_fsdp(model)
        self._tracked = collect(model, list(self.model_paths), include_frozen=include_frozen,
                                buffers=buffers, group=process_group)
        self._build_storage()
        # Registered-tensor counts of every owning module: a cheap per-update check that
        # nothing was added to or removed from them.
        owners = {id(t.owner): t.owner for t in self._tracked}
        self._owner_counts = [(m, len(m._parameters), len(m._buffers)) for m in owners.values()]
        self._initialise_from_live()
        logger.info("tracking %d tensors in %d model path(s) with factors %s: %d shadow bytes on this rank",
                    len(self._tracked), len(self.model_paths), list(self.target_factors), self.shadow_bytes)

    # ------------------------------------------------------------------ storage
    def _blends(self, t: LiveTensor) -> bool:
        if not t.dtype.is_floating_point:
            return False
        return not t.is_buffer or self.buffers == "average"

    def _build_storage(self) -> None:
        num_factors = len(self.target_factors)
        groups: dict[tuple, list[LiveTensor]] = {}
        self._copied: list[LiveTensor] = []
        for t in self._tracked:
            if self._blends(t):
                groups.setdefault((t.device, t.dtype), []).append(t)
            else:
                self._copied.append(t)
        self._groups: list[_Group] = []
        self._shadow_of: dict[tuple, tuple[_Group, int]] = {}
        for (device, dtype), members in groups.items():
            group = _Group(members, num_factors, self.shadow_dtype or dtype, device)
            self._groups.append(group)
            for i, m in enumerate(members):
                self._shadow_of[m.key] = (group, i)
        # Copied tensors (integer buffers, buffers under "copy"): one copy shared by all factors.
        self._copies: dict[tuple, torch.Tensor] = {
            t.key: torch.empty(t.local_shape, dtype=t.dtype, device=t.device) for t in self._copied
        }
        self._copy_lives: list[torch.Tensor] | None = None
        self._copy_pairs: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self._scratch: dict[torch.device, torch.Tensor] = {}
        for group in self._groups:
            if any(m.dtype != group.shadow_dtype for m in group.members) and group.flat.device not in self._scratch:
                numel = max(1, self._scratch_bytes // group.flat.element_size())
                want = max(1, max(m.local_numel for m in group.members))
                if group.flat.device.type == "cpu":  # one L2-sized batch per CPU worker (see _kernels)
                    want = max(want, CPU_BATCH_NUMEL * torch.get_num_threads())
                self._scratch[group.flat.device] = torch.empty(min(numel, want),
                                                               dtype=group.shadow_dtype, device=group.flat.device)

    @property
    def shadow_bytes(self) -> int:
        """Bytes of shadow storage on this rank for blended tensors (all factors)."""
        return sum(g.flat.numel() * g.flat.element_size() for g in self._groups)

    @property
    def copied_bytes(self) -> int:
        """Bytes held for copied tensors (buffers under ``copy``, integer buffers)."""
        return sum(t.numel() * t.element_size() for t in self._copies.values())

    @property
    def scratch_bytes(self) -> int:
        """Bytes of the bounded upcast scratch buffers (0 when live and shadow dtypes match)."""
        return sum(t.numel() * t.element_size() for t in self._scratch.values())

    # ------------------------------------------------------------------ lookup
    def factor_index(self, factor: float) -> int:
        """Index of ``factor`` in :attr:`target_factors`; raises listing the valid ones."""
        for k, f in enumerate(self.target_factors):
            if math.isclose(f, float(factor), rel_tol=0, abs_tol=1e-12):
                return k
        raise ValueError(f"factor {factor!r} is not one of this EMA's target factors {list(self.target_factors)}")

    def tracked(self, model_paths: Iterable[str | None] | None = None) -> list[LiveTensor]:
        """The tracked tensors, optionally only those of some model paths (validated)."""
        if model_paths is None:
            return list(self._tracked)
        wanted = set(check_model_paths(model_paths))
        unknown = [p for p in wanted if p not in self.model_paths]
        if unknown:
            raise ValueError(f"model paths {unknown} are not tracked by this EMA; tracked: {list(self.model_paths)}")
        return [t for t in self._tracked if t.model_path in wanted]

    def shadow(self, factor: float | int, key: tuple[str | None, str]) -> torch.Tensor:
        """This rank's EMA tensor of ``key = (model_path, fqn)`` for ``factor`` (a view; copies are shared)."""
        if key in self._copies:
            return self._copies[key]
        k = factor if isinstance(factor, int) else self.factor_index(factor)
        group, i = self._shadow_of[key]
        return group.views[k][i]

    # ------------------------------------------------------------------ live tensors
    def _live_locals(self, group_members: list[LiveTensor]) -> list[torch.Tensor]:
        return [t.local() for t in group_members]

    def _check_live(self, members: list[LiveTensor], lives: list[torch.Tensor]) -> None:
        for t, live in zip(members, lives):
            if tuple(live.shape) != t.local_shape or live.dtype != t.dtype:
                raise RuntimeError(
                    f"the model's parameter set changed: {t.fqn!r} (model path {path_label(t.model_path)!r}) "
                    f"now has local shape {tuple(live.shape)} and dtype {live.dtype}, expected "
                    f"{t.local_shape} and {t.dtype}; create a new ShardedEMA after changing the model"
                )

    @staticmethod
    def _same_tensors(lives: list[torch.Tensor], cached: list[torch.Tensor] | None) -> bool:
        return cached is not None and len(cached) == len(lives) and all(a is b for a, b in zip(lives, cached))

    def _resolved_plan(self, group: _Group) -> LerpPlan:
        """The group's plan, rebuilt only when a live local tensor was replaced."""
        lives = self._live_locals(group.members)
        if self._same_tensors(lives, group.plan_lives):
            return group.plan
        # Something changed: FSDP2 may have left unsharded params (reshard and look again)
        # or replaced a local tensor (new views, same shadows).
        reshard_fsdp(self.model)
        lives = self._live_locals(group.members)
        if self._same_tensors(lives, group.plan_lives):
            return group.plan
        self._check_live(group.members, lives)
        group.plan = LerpPlan(group.views, lives, chunk_numel=self._chunk_numel,
                              scratch=self._scratch.get(group.flat.device))
        group.plan_lives = lives
        return group.plan

    def _copied_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(destinations, live sources) of the copied tensors; cached while the live tensors are unchanged."""
        lives = [t.local() for t in self._copied]
        if not self._same_tensors(lives, self._copy_lives):
            reshard_fsdp(self.model)
            lives = [t.local() for t in self._copied]
            self._check_live(self._copied, lives)
            keep = [i for i, live in enumerate(lives) if live.numel() > 0]
            self._copy_pairs = ([self._copies[self._copied[i].key] for i in keep], [lives[i] for i in keep])
            self._copy_lives = lives
        return self._copy_pairs

    @torch.no_grad()
    def _initialise_from_live(self) -> None:
        for group in self._groups:
            self._resolved_plan(group).copy()
        dsts, srcs = self._copied_pairs()
        if dsts:
            torch._foreach_copy_(dsts, srcs)

    # ------------------------------------------------------------------ public API
    def _check_structure(self) -> None:
        """Raise naming the FQNs added to or removed from the tracked model paths.

        Called when an owning module's registered-tensor count changed; a change the EMA
        does not track (a non-persistent buffer, an ignored buffer, a frozen parameter
        with ``include_frozen=False``) only refreshes the counts.
        """
        reshard_fsdp(self.model)
        now = {t.key for t in collect(self.model, list(self.model_paths), include_frozen=self.include_frozen,
                                      buffers=self.buffers, group=self.process_group)}
        before = {t.key for t in self._tracked}
        if now == before:
            self._owner_counts = [(m, len(m._parameters), len(m._buffers)) for m, _, _ in self._owner_counts]
            return
        changes = [f"added {path_label(p)}:{f}" for p, f in sorted(now - before, key=str)]
        changes += [f"removed {path_label(p)}:{f}" for p, f in sorted(before - now, key=str)]
        raise RuntimeError(
            "the model's parameter set changed since the EMA was created (" + ", ".join(changes) +
            "); create a new ShardedEMA after changing the model's parameters"
        )

    def _require_idle(self, what: str) -> None:
        if self.state is not EMAState.IDLE:
            raise RuntimeError(f"ema.{what}() was called inside `with ema.swapped(...)`; call it after the block exits")

    @torch.no_grad()
    def update(self) -> None:
        """Apply one EMA step to every factor; call after ``optimizer.step()``.

        Local shards are re-resolved on every call; the decay comes from the schedule
        in Python floats, so the call neither syncs with the device nor allocates.
        """
        self._require_idle("update")
        for owner, num_params, num_buffers in self._owner_counts:
            if len(owner._parameters) != num_params or len(owner._buffers) != num_buffers:
                self._check_structure()
                break
        step = self.step
        if self.schedule.is_tracking(step):
            for group in self._groups:
                self._resolved_plan(group).copy()
        elif self.schedule.is_update_step(step):
            weights = [1.0 - self.schedule.decay(f, step) for f in self.target_factors]
            for group in self._groups:
                self._resolved_plan(group).lerp(weights)
        dsts, srcs = self._copied_pairs()
        if dsts:
            torch._foreach_copy_(dsts, srcs)
        self.step = step + 1

    @torch.no_grad()
    def reset_to_live(self) -> None:
        """Set every shadow to the current live weights (the step counter is kept)."""
        self._require_idle("reset_to_live")
        self._initialise_from_live()

    def current_decays(self) -> dict[float, float]:
        """Decay the next ``update()`` applies, per factor: 0 when it copies the live weights
        (before ``start_step``), 1 when ``update_every`` skips it."""
        if self.schedule.is_tracking(self.step):
            return dict.fromkeys(self.target_factors, 0.0)
        if not self.schedule.is_update_step(self.step):
            return dict.fromkeys(self.target_factors, 1.0)
        return {f: self.schedule.decay(f, self.step) for f in self.target_factors}

    def swapped(self, factor: float, model_paths: Sequence[str | None] | str | None = None, *,
                scratch_bytes: int | None = None, backup_to_host: bool = False):
        """Collective context manager: the EMA weights of ``factor`` live in the model inside.

        Yields a :class:`shardema.SwapInfo` (mode, extra bytes held on this rank).
        ``scratch_bytes`` bounds the in-place exchange buffer (default 64 MiB);
        ``backup_to_host`` keeps backups of CUDA shards (when the shadow dtype differs
        from the live dtype) in pinned host memory. See docs/swap.md.
        """
        from ._swap import swap_context

        return swap_context(self, factor, model_paths, scratch_bytes=scratch_bytes, backup_to_host=backup_to_host)

    # ------------------------------------------------------------------ Stateful
    def _dtensor_or_local(self, t: LiveTensor, local: torch.Tensor) -> torch.Tensor:
        if t.mesh is None:
            return local
        stride = _contiguous_stride(t.global_shape)
        return DTensor.from_local(local, t.mesh, t.placements, run_check=False,
                                  shape=torch.Size(t.global_shape), stride=stride)

    def state_key(self, factor: float, t: LiveTensor) -> str:
        """Flat state-dict key of one tensor: ``ema=<factor>/<model path>/<fqn>``."""
        return f"ema={factor!r}/{path_label(t.model_path)}/{t.fqn}"

    def state_dict(self) -> dict:
        """Stateful state: the step, the schedule and every shadow (DTensor when sharded).

        Values are live views of the shadows, so ``torch.distributed.checkpoint.load``
        restores in place. DTensors carry the global shape and stride (uneven shards).
        """
        state: dict = {"step": self.step, "schedule": self.schedule.model_dump_json(),
                       "target_factors": list(self.target_factors)}
        for factor in self.target_factors:
            for t in self._tracked:
                state[self.state_key(factor, t)] = self._dtensor_or_local(t, self.shadow(factor, t.key))
        return state

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict, strict: bool = True) -> None:
        """Load a :meth:`state_dict` (also full, unsharded tensors: this rank's slice is taken)."""
        self._require_idle("load_state_dict")
        missing, shape_errors, copies = [], [], []
        for factor in self.target_factors:
            for t in self._tracked:
                key = self.state_key(factor, t)
                if key not in state_dict:
                    missing.append(key)
                    continue
                value = state_dict[key]
                target = self.shadow(factor, t.key)
                if isinstance(value, DTensor):
                    if tuple(value.shape) != t.global_shape:
                        shape_errors.append(f"{key}: shape {tuple(value.shape)} != {t.global_shape}")
                        continue
                    if value._local_tensor is target:
                        continue  # loaded in place (torch.distributed.checkpoint)
                    if t.placements is not None and tuple(value.placements) == t.placements:
                        value = value._local_tensor
                    else:
                        value = value.full_tensor()
                if tuple(value.shape) == t.global_shape and t.global_shape != t.local_shape:
                    value = _slice_global(value, t)
                if tuple(value.shape) != t.local_shape:
                    shape_errors.append(f"{key}: shape {tuple(value.shape)} != {t.global_shape}")
                    continue
                if value is not target:
                    copies.append((target, value))
        expected = {self.state_key(f, t) for f in self.target_factors for t in self._tracked}
        unexpected = [k for k in state_dict if k.startswith("ema=") and k not in expected]
        problems = [f"missing key {k}" for k in missing] + [f"unexpected key {k}" for k in unexpected] + shape_errors
        if problems and strict:  # nothing was changed
            raise RuntimeError("EMA state dict does not match this EMA:\n  " + "\n  ".join(problems))
        for target, value in copies:
            target.copy_(value)
        if "step" in state_dict:
            self.step = int(state_dict["step"])
        if "schedule" in state_dict:
            saved = DecaySchedule.model_validate_json(state_dict["schedule"])
            if saved != self.schedule:
                logger.warning("loaded schedule %s replaces the configured %s", saved, self.schedule)
                self.schedule = saved

    # ------------------------------------------------------------------ checkpoints
    def save(self, root, tag: str = "latest") -> str:
        """Collective: write this EMA under ``root`` with ``tag`` (see docs/checkpoint-format.md)."""
        self._require_idle("save")
        from .checkpoint import save_ema

        return save_ema(self, root, tag)

    def resume(self, root, strict: bool = False) -> str | None:
        """Collective: load ``cp=latest``, else ``cp=last``; else keep the live init (None)."""
        self._require_idle("resume")
        from .checkpoint import resume_ema

        return resume_ema(self, root, strict=strict)


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


def _slice_global(value: torch.Tensor, t: LiveTensor) -> torch.Tensor:
    for dim, (start, size) in enumerate(zip(t.global_offset, t.local_shape)):
        value = value.narrow(dim, start, size)
    return value
