"""Shadow storage and kernel plans: the narrow interface the swap and the checkpoint code use.

A :class:`ShadowStore` owns, for one model and one set of options:

- the tracked tensors (:class:`~shardema._shards.TrackedTensor`, re-resolved on use);
- one flat ``[K, N]`` shadow buffer per (device, live dtype) group of blended tensors,
  and one shared copy per copied tensor (integer buffers, buffers under ``copy``);
- the foreach plans (:class:`~shardema._kernels.LerpPlan`), rebuilt only when a live
  local tensor object was replaced (FSDP2 may do that), and the bounded upcast buffers.

It knows nothing of steps, schedules or swap state: :class:`~shardema.ShardedEMA`
owns those and is the only caller of the mutating methods except through
:class:`CheckpointLoad`, the write access it hands to a checkpoint load.
"""

from __future__ import annotations

import fnmatch
import operator
from collections.abc import Iterable, Sequence
from typing import cast

import torch

from ._compat import DTensor, local_tensor, module_buffers, module_children, module_parameters
from ._kernels import CPU_BATCH_NUMEL, LerpPlan
from ._shards import (
    Model,
    TrackedTensor,
    collect,
    frozen_parameters,
    module_edges,
    path_label,
    registration_counts,
    reshard_fsdp,
    select_by_name,
)
from .config import DecaySchedule, EMAConfig, check_model_paths

Key = tuple[str | None, str]
"""``(model_path, fqn)``: a tracked tensor's unique name."""


class _Group:
    """Shadows of the blended tensors of one (device, live dtype), in one flat [K, N] buffer."""

    def __init__(self, members: list[TrackedTensor], num_factors: int, shadow_dtype: torch.dtype,
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
        self.plan_ptrs: list[int] = []
        self.watch: _Watch | None = None


def _same_tensors(lives: list[torch.Tensor], cached: list[torch.Tensor] | None, ptrs: list[int]) -> bool:
    """Same tensor objects over the same storage (``p.data = x`` keeps the object, not the storage).

    ``data_ptr()`` is host-side metadata: reading it never syncs with the device.
    """
    return (cached is not None and len(cached) == len(lives) and all(a is b for a, b in zip(lives, cached))
            and all(a.data_ptr() == p for a, p in zip(lives, ptrs)))


class _Watch:
    """What an ``update()`` compares, per tensor, to know its cached plan is still valid.

    For each tracked tensor: its registration table, attribute name, the object registered
    there when the plan was built and the storage pointer of its local piece. The check
    runs as ``map`` over flat lists (C loops, no Python frame per tensor): one ``dict.get``,
    one identity test and one ``data_ptr()`` per tensor, about 0.1 us; no device access.
    The storage pointer is what sees ``p.data = x`` (the same Parameter object over new
    storage), which no registration table or module-level counter shows.
    """

    def __init__(self, members: Sequence[TrackedTensor], lives: Sequence[torch.Tensor]):
        self.registries = [t.registry for t in members]
        self.attrs = [t.attr for t in members]
        self.registered = [t.current() for t in members]
        self.dtensors = any(isinstance(v, DTensor) for v in self.registered)
        self.ptrs = [live.data_ptr() for live in lives]

    def unchanged(self) -> bool:
        """True while every registered object and its local storage are the ones the plan holds."""
        values = list(map(dict.get, self.registries, self.attrs))
        # Identity only: ``==`` on tensors would compare values. A removed entry (None) fails too.
        if not all(map(operator.is_, values, self.registered)):
            return False
        lives = cast(list[torch.Tensor], values)  # every entry is the registered tensor
        if self.dtensors:
            lives = list(map(_local_piece, lives))
        return list(map(_DATA_PTR, lives)) == self.ptrs


_DATA_PTR = torch.Tensor.data_ptr
_REQUIRES_GRAD = operator.attrgetter("requires_grad")


def _local_piece(value: torch.Tensor) -> torch.Tensor:
    return local_tensor(value) if isinstance(value, DTensor) else value


class ShadowStore:
    """This rank's shadows of the tracked tensors of ``model`` (see the module docstring).

    Args:
        model: the live module.
        config: the EMA's options (factors, model paths, dtypes, buffers policy, sizes).
        process_group: the group the model is sharded over (replica dedupe on save).
    """

    def __init__(self, model: Model, config: EMAConfig, process_group=None):
        self.model = model
        self.config = config
        self.process_group = process_group
        self.num_factors = len(config.target_factors)
        reshard_fsdp(model)
        self._tracked = self._collect()
        self._by_key = {t.key: t for t in self._tracked}
        self._build()
        # Registered-tensor counts of every owning module: a cheap per-update check that
        # nothing was added to or removed from them.
        owners = {id(t.owner): t.owner for t in self._tracked}
        self._owner_counts = [(m, registration_counts(m)) for m in owners.values()]
        # Submodule registrations down to every owner: a replaced submodule would leave the
        # EMA averaging a detached module.
        self._edges = module_edges(model, list(owners.values()))
        # Parameters left out because they were frozen: unfreezing one later is an error.
        self._frozen = [] if config.include_frozen else [
            (mp, fqn, p) for mp, fqn, p in frozen_parameters(model, config.model_paths)
            if (config.include is None or any(fnmatch.fnmatchcase(fqn, pat) for pat in config.include))
            and not any(fnmatch.fnmatchcase(fqn, pat) for pat in config.exclude)]
        self._refresh_checks()

    def _collect(self) -> list[TrackedTensor]:
        tracked = collect(self.model, self.config.model_paths, include_frozen=self.config.include_frozen,
                          buffers=self.config.buffers, group=self.process_group)
        if self.config.include is None and not self.config.exclude:
            return tracked
        return select_by_name(tracked, self.config.include, self.config.exclude)

    def _build(self) -> None:
        shadow_dtype = self.config.torch_shadow_dtype
        groups: dict[tuple[torch.device, torch.dtype], list[TrackedTensor]] = {}
        self._copied: list[TrackedTensor] = []
        for t in self._tracked:
            if t.blended:
                groups.setdefault((t.device, t.dtype), []).append(t)
            else:
                self._copied.append(t)
        self._groups: list[_Group] = []
        self._shadow_of: dict[Key, tuple[_Group, int]] = {}
        for (device, dtype), members in groups.items():
            group = _Group(members, self.num_factors, shadow_dtype or dtype, device)
            self._groups.append(group)
            for i, m in enumerate(members):
                self._shadow_of[m.key] = (group, i)
        # Copied tensors: one copy shared by all factors.
        self._copies: dict[Key, torch.Tensor] = {
            t.key: torch.empty(t.local_shape, dtype=t.dtype, device=t.device) for t in self._copied
        }
        self._copy_lives: list[torch.Tensor] | None = None
        self._copy_ptrs: list[int] = []
        self._copy_watch: _Watch | None = None
        self._copy_pairs: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self._upcast: dict[torch.device, torch.Tensor] = {}
        for group in self._groups:
            device = group.flat.device
            if any(m.dtype != group.shadow_dtype for m in group.members) and device not in self._upcast:
                numel = max(1, self.config.upcast_buffer_bytes // group.flat.element_size())
                want = max(1, max(m.local_numel for m in group.members))
                if device.type == "cpu":  # one L2-sized batch per CPU worker (see _kernels)
                    want = max(want, CPU_BATCH_NUMEL * torch.get_num_threads())
                self._upcast[device] = torch.empty(min(numel, want), dtype=group.shadow_dtype, device=device)

    # ------------------------------------------------------------------ sizes
    @property
    def shadow_bytes(self) -> int:
        """Bytes of shadow storage for blended tensors (all factors)."""
        return sum(g.flat.numel() * g.flat.element_size() for g in self._groups)

    @property
    def copied_bytes(self) -> int:
        """Bytes held for copied tensors."""
        return sum(t.numel() * t.element_size() for t in self._copies.values())

    @property
    def upcast_buffer_bytes(self) -> int:
        """Bytes of the bounded upcast buffers (0 when live and shadow dtypes match)."""
        return sum(t.numel() * t.element_size() for t in self._upcast.values())

    # ------------------------------------------------------------------ lookup
    def tracked(self, model_paths: Iterable[str | None] | str | None = None) -> list[TrackedTensor]:
        """The tracked tensors, optionally only those of some model paths (validated)."""
        if model_paths is None:
            return list(self._tracked)
        wanted = set(check_model_paths(model_paths))
        unknown = [p for p in wanted if p not in self.config.model_paths]
        if unknown:
            raise ValueError(f"model paths {unknown} are not tracked by this EMA; tracked: "
                             f"{list(self.config.model_paths)}")
        return [t for t in self._tracked if t.model_path in wanted]

    def tensor(self, key: Key) -> TrackedTensor:
        """The tracked tensor named ``key``."""
        return self._by_key[key]

    @torch.no_grad()
    def stage(self, previous: StagedShadows | None = None, pin_memory: bool = True) -> StagedShadows:
        """Host copies of every shadow now (see :class:`StagedShadows`), reusing ``previous``'s buffers."""
        old_flats = previous.flats if previous is not None else []
        old_copies = previous.copies if previous is not None else {}
        flats = [_host_copy(g.flat, old_flats[i] if i < len(old_flats) else None, pin_memory)
                 for i, g in enumerate(self._groups)]
        copies = {key: _host_copy(t, old_copies.get(key), pin_memory) for key, t in self._copies.items()}
        host_of = {id(g): flats[i] for i, g in enumerate(self._groups)}
        views = {}
        for key, (group, i) in self._shadow_of.items():
            for k in range(self.num_factors):
                view = group.views[k][i]
                views[(k, key)] = host_of[id(group)].as_strided(view.shape, view.stride(), view.storage_offset())
        for device in {t.device for t in [*(g.flat for g in self._groups), *self._copies.values()]}:
            if device.type == "cuda":  # the non-blocking copies must land before the writer reads them
                torch.cuda.current_stream(device).synchronize()
        return StagedShadows(flats, copies, views)

    def shadow(self, k: int, key: Key) -> torch.Tensor:
        """The shadow of factor index ``k`` of ``key`` (a view; copied tensors share one)."""
        if key in self._copies:
            return self._copies[key]
        group, i = self._shadow_of[key]
        return group.views[k][i]

    # ------------------------------------------------------------------ live tensors
    def check_live(self, targets: Sequence[TrackedTensor], lives: Sequence[torch.Tensor]) -> None:
        """Raise naming the FQN when a live local tensor changed shape or dtype."""
        for t, live in zip(targets, lives):
            if tuple(live.shape) != t.local_shape or live.dtype != t.dtype:
                raise RuntimeError(
                    f"the model's parameter set changed: {t.fqn!r} (model path {path_label(t.model_path)!r}) "
                    f"now has local shape {tuple(live.shape)} and dtype {live.dtype}, expected "
                    f"{t.local_shape} and {t.dtype}; create a new ShardedEMA after changing the model"
                )

    def resolve_lives(self, targets: Sequence[TrackedTensor]) -> list[torch.Tensor]:
        """Reshard FSDP2 modules, then the current live local tensors of ``targets`` (checked)."""
        reshard_fsdp(self.model)
        lives = [t.local() for t in targets]
        self.check_live(targets, lives)
        return lives

    def _resolved_plan(self, group: _Group) -> LerpPlan:
        """The group's plan, rebuilt only when a live local tensor was replaced."""
        if group.plan is not None and group.watch is not None and group.watch.unchanged():
            return group.plan  # the steady state: nothing was replaced
        # Something changed: FSDP2 may have left unsharded params (reshard and look again),
        # replaced a local tensor, or the user assigned ``p.data`` (new views, same shadows;
        # a changed shape or dtype raises naming the FQN).
        lives = self.resolve_lives(group.members)
        group.watch = _Watch(group.members, lives)
        if group.plan is not None and _same_tensors(lives, group.plan_lives, group.plan_ptrs):
            return group.plan  # resharding brought back the tensors the plan holds
        group.plan = LerpPlan(group.views, lives, chunk_numel=self.config.chunk_numel,
                              scratch=self._upcast.get(group.flat.device))
        group.plan_lives = lives
        group.plan_ptrs = [live.data_ptr() for live in lives]
        return group.plan

    def _copied_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(destinations, live sources) of the copied tensors; cached while the live tensors are unchanged."""
        if self._copy_watch is not None and self._copy_watch.unchanged():
            return self._copy_pairs
        lives = [t.local() for t in self._copied]
        if not _same_tensors(lives, self._copy_lives, self._copy_ptrs):
            lives = self.resolve_lives(self._copied)
            keep = [i for i, live in enumerate(lives) if live.numel() > 0]
            self._copy_pairs = ([self._copies[self._copied[i].key] for i in keep], [lives[i] for i in keep])
            self._copy_lives = lives
            self._copy_ptrs = [live.data_ptr() for live in lives]
        self._copy_watch = _Watch(self._copied, lives)
        return self._copy_pairs

    def _refresh_checks(self) -> None:
        """The flat lists the steady-state structure check maps over (registration dicts, edges)."""
        self._tables = [table for m, _ in self._owner_counts for table in (module_parameters(m), module_buffers(m))]
        self._table_sizes = [len(table) for table in self._tables]
        self._edge_dicts = [module_children(parent) for parent, _, _, _ in self._edges]
        self._edge_names = [name for _, name, _, _ in self._edges]
        self._edge_children = [child for _, _, child, _ in self._edges]
        self._frozen_params = [param for _, _, param in self._frozen]

    def check_structure(self) -> None:
        """Raise naming the FQNs added to or removed from the tracked model paths.

        Also raises when a submodule holding tracked tensors was replaced, or a
        parameter left out as frozen (``include_frozen=False``) was unfrozen. Cheap when
        nothing changed (registration counts of the owning modules, one dict lookup per
        submodule on the way to them, one flag per frozen parameter; no device access).
        A change the EMA does not track (a non-persistent buffer, an ignored buffer, a
        frozen parameter with ``include_frozen=False``) only refreshes the counts.
        """
        # The steady state: O(modules) C-level maps (no Python frame per module), no tensor touched.
        if list(map(len, self._tables)) == self._table_sizes and \
                all(map(operator.is_, map(dict.get, self._edge_dicts, self._edge_names), self._edge_children)) and \
                not any(map(_REQUIRES_GRAD, self._frozen_params)):
            return
        for parent, name, child, path in self._edges:
            if module_children(parent).get(name) is not child:
                raise RuntimeError(
                    f"submodule {path!r} was replaced (or removed) after the EMA was created, so the EMA would "
                    "keep averaging the detached module; create a new ShardedEMA after changing the model "
                    "(wrap modules, e.g. activation checkpointing, before creating it)")
        for model_path, fqn, param in self._frozen:
            if param.requires_grad:
                raise RuntimeError(
                    f"parameter {fqn!r} (model path {path_label(model_path)!r}) was unfrozen after the EMA was "
                    "created with include_frozen=False, so it has no EMA; unfreeze before creating the "
                    "ShardedEMA, or create it with include_frozen=True")
        if all(registration_counts(m) == counts for m, counts in self._owner_counts):
            self._refresh_checks()
            return
        reshard_fsdp(self.model)
        now = {t.key for t in self._collect()}
        before = set(self._by_key)
        if now == before:
            self._owner_counts = [(m, registration_counts(m)) for m, _ in self._owner_counts]
            self._refresh_checks()
            return
        changes = [f"added {path_label(p)}:{f}" for p, f in sorted(now - before, key=str)]
        changes += [f"removed {path_label(p)}:{f}" for p, f in sorted(before - now, key=str)]
        raise RuntimeError(
            "the model's parameter set changed since the EMA was created (" + ", ".join(changes) +
            "); create a new ShardedEMA after changing the model's parameters"
        )

    # ------------------------------------------------------------------ mutation (owner: ShardedEMA)
    @torch.no_grad()
    def copy_from_live(self) -> None:
        """Set every shadow (all factors) and every copy to the current live values."""
        for group in self._groups:
            self._resolved_plan(group).copy()
        self.copy_copied()

    @torch.no_grad()
    def lerp(self, weights: Sequence[float]) -> None:
        """Move the shadows of factor k towards the live values by ``weights[k]``; refresh the copies."""
        for group in self._groups:
            self._resolved_plan(group).lerp(weights)
        self.copy_copied()

    @torch.no_grad()
    def copy_copied(self) -> None:
        """Refresh the copied tensors (integer buffers, buffers under ``copy``) from the live model."""
        dsts, srcs = self._copied_pairs()
        if dsts:
            torch._foreach_copy_(dsts, srcs)


class StagedShadows:
    """Host copies of every shadow at one instant: what an asynchronous save writes.

    Made by :meth:`ShadowStore.stage`: one copy per flat ``[K, N]`` group buffer and per
    copied tensor (pinned host memory for accelerator shadows, so the copies run at full
    bandwidth), reusing the buffers of the previous staging when they fit. :meth:`shadow`
    returns views laid out exactly like the live store's.
    """

    def __init__(self, flats: list[torch.Tensor], copies: dict[Key, torch.Tensor],
                 views: dict[tuple[int, Key], torch.Tensor]):
        self.flats = flats
        self.copies = copies
        self.views = views

    @property
    def nbytes(self) -> int:
        """Host bytes held."""
        return sum(t.numel() * t.element_size() for t in [*self.flats, *self.copies.values()])

    def shadow(self, k: int, key: Key) -> torch.Tensor:
        """The staged shadow of factor index ``k`` of ``key``."""
        if key in self.copies:
            return self.copies[key]
        return self.views[(k, key)]


def _host_copy(source: torch.Tensor, reuse: torch.Tensor | None, pin_memory: bool) -> torch.Tensor:
    """``source`` copied into host memory, into ``reuse`` when it has the same shape and dtype."""
    if reuse is None or reuse.shape != source.shape or reuse.dtype != source.dtype:
        pin = pin_memory and source.device.type == "cuda"
        reuse = torch.empty(source.shape, dtype=source.dtype, device="cpu", pin_memory=pin)
    reuse.copy_(source, non_blocking=source.device.type != "cpu")
    return reuse


class CheckpointLoad:
    """Write access to the shadows for one checkpoint load, adopted all at once or not at all.

    Handed out by :meth:`shardema.ShardedEMA.loading`. The loader writes shadows through
    :meth:`shadow` (which records that the shadows were touched) and calls :meth:`adopt`
    with the loaded step and schedule once every value is in place. When the block
    ends, the EMA adopts the step and schedule if :meth:`adopt` was called; otherwise, if
    shadows were touched (a failed or partial load) or :meth:`reset_to_live` was asked,
    every shadow is reset to the live weights, so a half-loaded EMA never survives.
    """

    def __init__(self, store: ShadowStore):
        self.store = store
        self.touched = False
        self.reset_requested = False
        self.adopted: tuple[int, DecaySchedule | None, dict] | None = None

    def tracked(self, model_paths: Iterable[str | None] | str | None = None) -> list[TrackedTensor]:
        """The tracked tensors (see :meth:`ShadowStore.tracked`)."""
        return self.store.tracked(model_paths)

    def shadow(self, k: int, key: Key) -> torch.Tensor:
        """The shadow of factor index ``k`` of ``key``, to be written."""
        self.touched = True
        return self.store.shadow(k, key)

    def adopt(self, step: int, schedule: DecaySchedule | None, counters: dict | None = None) -> None:
        """Every shadow is loaded: at the end of the block the EMA takes this step, schedule and counters."""
        self.adopted = (int(step), schedule, dict(counters or {}))

    def reset_to_live(self) -> None:
        """At the end of the block, reset every shadow to the live weights (nothing was loaded)."""
        self.reset_requested = True
