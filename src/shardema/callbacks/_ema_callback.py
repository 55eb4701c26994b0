"""EmaCallback: keep, checkpoint and evaluate a ShardedEMA from any training loop.

[Note: when the EMA weights are swapped in]
At the eval-time hooks (``after_update``, ``after_epoch``, ``at_eval``) the callback
first asks each child whether it fires at this position (:meth:`CallbackBase.fires`,
a pure function of the config and the counter, so every rank gets the same
answer). Only when at least one child of a factor fires does it enter
``ema.swapped(factor)`` (a collective) and run that factor's children; otherwise
nothing is swapped and no collective is issued. ``before_training``,
``resume_from_checkpoint``, ``track_after_update_step`` and ``after_training`` reach the
children without a swap, so they see the live weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from .. import _dist
from .._ema import ShardedEMA
from .._log import logger
from .._shards import path_label
from ..checkpoint import delete_checkpoint
from ..checkpoint._format import parse_cp_dirname
from ._base import NO_VALUES, CallbackBase, CallbackContext, Hook, IntervalType, PeriodicCallback, build_callback
from ._config import EmaCallbackConfig
from ._counter import UpdateCounter, parse_iteration_tag
from ._metrics import PrefixedWriter


def factor_prefix(factor: float) -> str:
    """Metric prefix of one target factor: ``ema=<factor>/`` (``repr`` of the float)."""
    return f"ema={float(factor)!r}/"


class EmaCallback(PeriodicCallback, kind="EmaCallback"):
    """EMA of the model's weights, with checkpoints and EMA-evaluated child callbacks.

    - ``before_training`` (or ``resume_from_checkpoint``) creates the
      :class:`~shardema.ShardedEMA` for ``model_paths`` / ``target_factors``; resuming
      loads ``cp=latest``, else ``cp=last``, else starts from the live weights.
    - ``track_after_update_step`` updates the EMA after every optimizer update, with the
      update's sample count when the loop reports one (the ``edm`` schedule needs it);
      before epoch ``start_epoch`` (if set) it copies the live weights instead.
    - On the periodic schedule: ``cp=<iteration tag>`` when ``save_weights`` (only the
      newest ``keep_last_n_weights`` of them are kept), ``cp=latest`` when ``save_latest_weights``.
    - ``after_training``: ``cp=last`` when ``save_last_weights`` (independently of
      ``save_weights``).
    - Post-hoc EMA (``sigma_rels``): ``cp=snapshot-<EMA step>`` after every
      ``snapshot_every_n_updates``-th update, for :mod:`shardema.posthoc`.
    - ``eval_callbacks`` run once per target factor with that factor's EMA weights
      swapped in, only when one of them fires (see the note in this module); their
      metric keys are prefixed ``ema=<factor>/``.

    Checkpoints go to ``config.root``, else the runner's ``ema_root``, else
    ``<run_dir>/ema``. Every hook is collective when the model is distributed: all
    ranks call the runner at the same points.
    """

    config_class: ClassVar = EmaCallbackConfig
    config: EmaCallbackConfig

    def __init__(self, config: EmaCallbackConfig | None = None, context: CallbackContext | None = None):
        super().__init__(config, context)
        cfg: EmaCallbackConfig = self.config
        self.model_paths = cfg.model_paths
        self.target_factors = tuple(float(f) for f in cfg.target_factors)
        self.save_weights = cfg.save_weights
        self.save_last_weights = cfg.save_last_weights
        self.save_latest_weights = cfg.save_latest_weights
        self.keep_last_n_weights = cfg.keep_last_n_weights
        self.start_epoch = cfg.start_epoch
        self.root = self._resolve_root()
        saves = (self.save_weights, self.save_latest_weights, self.save_last_weights, cfg.snapshot_every_n_updates)
        if self.root is None and any(saves):
            raise ValueError(f"{self.name}: saving is enabled but there is no checkpoint directory; set root in "
                             "the config or give the runner ema_root=... or run_dir=...")
        self.ema: ShardedEMA | None = None
        self.resumed_from: str | None = None
        """What :meth:`resume_from_checkpoint` loaded: ``"latest"``, ``"last"`` or ``None`` (init)."""
        self.saved_tags: list[str] = []
        """Tags saved by this callback in this process, oldest first."""
        self._saved_at: dict[str, str] = {}
        self._iteration_tags: list[str] = []  # iteration tags saved in this process, oldest first
        self._saved_ema_step: int | None = None
        self.eval_callbacks: dict[float, list[CallbackBase]] = {
            factor: [build_callback(child, self.context.replace(writer=PrefixedWriter(self.context.writer,
                                                                                      factor_prefix(factor))))
                     for child in cfg.eval_callbacks]
            for factor in self.target_factors
        }

    def _resolve_root(self) -> Path | None:
        if self.config.root is not None:
            if "{run_dir}" in self.config.root:  # e.g. "{run_dir}/posthoc": a second EMA beside the first
                if self.context.run_dir is None:
                    raise ValueError(f"{self.name}: root={self.config.root!r} names {{run_dir}}, but the runner has "
                                     "no run_dir; give the runner run_dir=... or an absolute root")
                return Path(self.config.root.replace("{run_dir}", str(self.context.run_dir)))
            return Path(self.config.root)
        if self.context.ema_root is not None:
            return Path(self.context.ema_root)
        if self.context.run_dir is not None:
            return Path(self.context.run_dir) / "ema"
        return None

    # ------------------------------------------------------------------ the EMA
    def create_ema(self) -> ShardedEMA:
        """Collective: build the ShardedEMA from the live model (idempotent)."""
        if self.ema is not None:
            return self.ema
        if self.model is None:
            raise ValueError(f"{self.name}: the callback context has no model; give the runner model=...")
        self.ema = ShardedEMA(self.model, self.config.to_ema_config(), process_group=self.context.process_group)
        return self.ema

    def checkpoint_dirs(self) -> list[os.PathLike]:
        """The EMA checkpoint root (when saving or resuming is possible)."""
        return [] if self.root is None else [self.root]

    def _require_ema(self, hook: str) -> ShardedEMA:
        if self.ema is None:
            raise RuntimeError(f"{self.name}.{hook}() before the EMA exists; call before_training() "
                               "(or resume_from_checkpoint()) first")
        return self.ema

    def _save(self, tag: str, update_counter: UpdateCounter) -> bool:
        """Collective: save ``cp=<tag>`` unless it was saved at this position already; True if saved."""
        if self.root is None:  # pragma: no cover - guarded in __init__
            raise ValueError(f"{self.name}: no checkpoint directory to save {tag!r} to")
        position = update_counter.iteration_tag
        if self._saved_at.get(tag) == position:
            return False  # e.g. the update and the epoch schedule fire at the same update: one save is enough
        ema = self._require_ema("save")
        if tag == "last" or not self.config.async_save:
            ema.save(self.root, tag)
        else:
            ema.save(self.root, tag, blocking=False)
        self._saved_at[tag] = position
        self.saved_tags.append(tag)
        return True

    # ------------------------------------------------------------------ retention
    def iteration_tags_on_disk(self) -> list[str]:
        """Iteration tags (``E{e}_U{u}_S{s}``) with a committed or ``.old`` directory under the root
        for any of the EMA's model paths (``latest``, ``last`` and other tags never match)."""
        found: set[str] = set()
        if self.root is None:
            return []
        for mp in self.model_paths:
            label_dir = self.root / path_label(mp)
            if not label_dir.is_dir():
                continue
            for child in label_dir.iterdir():
                parsed = parse_cp_dirname(child.name)
                if parsed is not None and parsed[1] != "staging" and parse_iteration_tag(parsed[0]) is not None:
                    found.add(parsed[0])
        return sorted(found)

    def weights_oldest_first(self) -> list[str]:
        """The iteration tags under the root, oldest first: those this callback saved in this
        process are the newest, in the order saved; the others (earlier runs) come before them,
        ordered by their update, sample and epoch counts."""
        on_disk = set(self.iteration_tags_on_disk())
        ours = [t for t in self._iteration_tags if t in on_disk]

        def counts(tag: str) -> tuple[int, int, int]:
            epoch, update, sample = parse_iteration_tag(tag) or (0, 0, 0)
            return update, sample, epoch

        return sorted(on_disk - set(ours), key=counts) + ours

    def prune_weights(self) -> list[str]:
        """Delete all but the newest ``keep_last_n_weights`` iteration tags; return the deleted tags.

        Runs on rank 0 of the EMA's process group only (the other ranks return ``[]``), after
        the save that made them superfluous has committed. Each tag is deleted by
        :func:`shardema.checkpoint.delete_checkpoint` (renamed away first, so readers never
        see half of one). A failure is logged and leaves the tag for the next pruning: a
        crash or an error leaves extra checkpoints, never fewer.
        """
        keep = self.keep_last_n_weights
        ema = self._require_ema("prune_weights")
        if keep is None or self.root is None or _dist.rank(ema.process_group) != 0:
            return []
        doomed = self.weights_oldest_first()[:-keep]
        deleted = []
        for tag in doomed:
            try:
                delete_checkpoint(self.root, tag, self.model_paths)
            except Exception as exc:  # housekeeping: never fail the training step for it
                logger.warning("%s: could not delete the old EMA checkpoint cp=%s under %s (%s: %s); it stays, "
                               "the next save tries again", self.name, tag, self.root, type(exc).__name__, exc)
                continue
            deleted.append(tag)
        self._iteration_tags = [t for t in self._iteration_tags if t not in deleted]
        if deleted:
            logger.info("%s: kept the newest %d EMA checkpoints, deleted %s", self.name, keep,
                        ", ".join(f"cp={t}" for t in deleted))
        return deleted

    # ------------------------------------------------------------------ children
    def get_children(self) -> list[CallbackBase]:
        """Every child eval callback, all factors, as one flat list (factor order)."""
        return [child for factor in self.target_factors for child in self.eval_callbacks[factor]]

    def _forward(self, hook: Hook, update_counter: UpdateCounter, values: Mapping[str, Any]) -> None:
        """Run ``hook`` on every child with the live weights."""
        for child in self.get_children():
            getattr(child, hook.value)(update_counter=update_counter, values=values)

    def _dispatch_swapped(self, hook: Hook, update_counter: UpdateCounter, values: Mapping[str, Any]) -> None:
        """Per factor: swap in its EMA weights and run ``hook`` on its children, if one fires."""
        for factor in self.target_factors:
            children = self.eval_callbacks[factor]
            if not any(child.fires(hook, update_counter) for child in children):
                continue
            ema = self._require_ema(hook.value)
            with ema.swapped(factor, self.model_paths):
                for child in children:
                    getattr(child, hook.value)(update_counter=update_counter, values=values)

    def fires(self, hook: Hook | str, update_counter: UpdateCounter) -> bool:
        """Its own schedule, or any child's."""
        return super().fires(hook, update_counter) or any(c.fires(hook, update_counter) for c in self.get_children())

    # ------------------------------------------------------------------ hooks
    @torch.no_grad()
    def resume_from_checkpoint(self, *, update_counter: UpdateCounter, values: Mapping[str, Any] = NO_VALUES) -> None:
        """Collective: create the EMA and load ``cp=latest``, else ``cp=last``, else keep the live init."""
        if self.root is None:
            raise ValueError(f"{self.name}: cannot resume without a checkpoint directory; set root in the config "
                             "or give the runner ema_root=... or run_dir=...")
        ema = self.create_ema()
        self.resumed_from = ema.resume(self.root, strict=self.config.strict_resume)
        logger.info("%s: resumed EMA from %s (step %d)", self.name,
                    f"cp={self.resumed_from}" if self.resumed_from else "the live weights", ema.step)
        if self._saved_ema_step is not None and self._saved_ema_step != ema.step:
            logger.warning("%s: the run state was saved at EMA step %d but the EMA checkpoint is at step %d; "
                           "save cp=latest on the same schedule as the run state to keep them together",
                           self.name, self._saved_ema_step, ema.step)
        self._forward(Hook.RESUME_FROM_CHECKPOINT, update_counter, values)

    @torch.no_grad()
    def before_training(self, *, update_counter: UpdateCounter, values: Mapping[str, Any] = NO_VALUES) -> None:
        """Collective: create the EMA from the live weights unless resumed; forward to the children."""
        self.create_ema()
        self._forward(Hook.BEFORE_TRAINING, update_counter, values)

    def update_samples(self, update_counter: UpdateCounter) -> int | None:
        """Samples of the latest update, handed to ``ema.update(num_samples=...)``: the counter's,
        when the loop counts samples; else the config's ``batch_size``; else None."""
        if update_counter.counts_samples:
            return update_counter.last_update_samples
        return self.batch_size

    def is_tracking(self, update_counter: UpdateCounter) -> bool:
        """True when the latest update belongs to an epoch before ``start_epoch`` (the EMA copies)."""
        return self.start_epoch is not None and update_counter.update_epoch < self.start_epoch

    @torch.no_grad()
    def track_after_update_step(self, *, update_counter: UpdateCounter, values: Mapping[str, Any] = NO_VALUES) -> None:
        """Update the EMA (every optimizer update; before ``start_epoch``: copy the live weights,
        leaving the EMA's step and sample count alone); forward to the children with live weights."""
        ema = self._require_ema("track_after_update_step")
        if self.is_tracking(update_counter):
            ema.reset_to_live()
        else:
            samples = self.update_samples(update_counter)
            schedule = ema.schedule
            if samples is None and schedule.kind == "edm" and schedule.samples_per_update is None:
                raise ValueError(
                    f"{self.name}: the edm schedule counts samples, but the training loop reports none; give the "
                    "runner effective_batch_size=... (or an UpdateCounter with it), pass num_samples to "
                    "runner.after_update(), or set samples_per_update in the config")
            ema.update(num_samples=samples)
            every = self.config.snapshot_every_n_updates
            if every is not None and ema.step % every == 0:
                self._save_snapshot(ema)
        self._forward(Hook.TRACK_AFTER_UPDATE_STEP, update_counter, values)

    def _save_snapshot(self, ema: ShardedEMA) -> None:
        """Collective: a post-hoc snapshot ``cp=snapshot-<EMA step>`` (see docs/posthoc.md)."""
        from ..posthoc import save_snapshot

        assert self.root is not None  # checked in __init__
        dtype = None if self.config.snapshot_dtype is None else getattr(torch, self.config.snapshot_dtype)
        saved = save_snapshot(ema, self.root, dtype=dtype, blocking=not self.config.async_save)
        self.saved_tags.append(saved if isinstance(saved, str) else saved.tag)

    def wait_for_saves(self) -> None:
        """Collective: wait until this callback's asynchronous save in flight (if any) has committed.

        Raises its error if it failed. A no-op without ``async_save``.
        """
        if self.ema is not None:
            self.ema.wait_for_save()

    @torch.no_grad()
    def after_update(self, *, update_counter: UpdateCounter, values: Mapping[str, Any] = NO_VALUES) -> None:
        """Periodic saves on the update/sample schedule, then the children (swapped, if one fires)."""
        super().after_update(update_counter=update_counter, values=values)
        self._dispatch_swapped(Hook.AFTER_UPDATE, update_counter, values)

    @torch.no_grad()
    def after_epoch(self, *, update_counter: UpdateCounter, values: Mapping[str, Any] = NO_VALUES) -> None:
        """Periodic saves on the epoch schedule, then the children (swapped, if one fires)."""
        super().after_epoch(update_counter=update_counter, values=values)
        self._dispatch_swapped(Hook.AFTER_EPOCH, update_counter, values)

    @torch.no_grad()
    def at_eval(self, *, update_counter: UpdateCounter, values: Mapping[str, Any] = NO_VALUES) -> None:
        """The children with the EMA weights of each factor (no save)."""
        self._dispatch_swapped(Hook.AT_EVAL, update_counter, values)

    @torch.no_grad()
    def periodic_callback(self, *, interval_type: IntervalType, update_counter: UpdateCounter,
                          values: Mapping[str, Any] = NO_VALUES) -> None:
        """Save ``cp=<iteration tag>`` and/or ``cp=latest`` (collective)."""
        if interval_type is IntervalType.EVAL:
            return
        saved_weights = False
        if self.config.async_save:
            # The previous position's save must commit before pruning (it takes the writer lock and
            # counts only committed tags) and before the next save (which would wait for it anyway).
            self.wait_for_saves()
            if self.save_weights:
                self.prune_weights()
        if self.save_weights:
            tag = update_counter.iteration_tag
            saved_weights = self._save(tag, update_counter)
            if saved_weights:
                if tag in self._iteration_tags:
                    self._iteration_tags.remove(tag)
                self._iteration_tags.append(tag)
        if self.save_latest_weights:
            self._save("latest", update_counter)
        if saved_weights and not self.config.async_save:
            self.prune_weights()  # last: every save of this position is committed before anything is deleted

    @torch.no_grad()
    def after_training(self, *, update_counter: UpdateCounter, values: Mapping[str, Any] = NO_VALUES) -> None:
        """Wait for a save in flight; save ``cp=last`` when ``save_last_weights``; forward to the
        children with live weights."""
        self.wait_for_saves()
        if self.config.async_save and self.save_weights:
            self.prune_weights()  # the last asynchronous save has committed
        if self.save_last_weights:
            self._save("last", update_counter)
        self._forward(Hook.AFTER_TRAINING, update_counter, values)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The children's states by factor (the EMA tensors live in its own checkpoints)."""
        return {
            "children": {repr(factor): [child.state_dict() for child in self.eval_callbacks[factor]]
                         for factor in self.target_factors},
            "ema_step": None if self.ema is None else self.ema.step,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the children's states; the factors and children must match the config."""
        self._saved_ema_step = state.get("ema_step")
        saved = state.get("children", {})
        expected = {repr(f) for f in self.target_factors}
        if set(saved) != expected:
            raise ValueError(f"{self.name}: saved child states are for factors {sorted(saved)}, "
                             f"the config has {sorted(expected)}")
        for factor in self.target_factors:
            children = self.eval_callbacks[factor]
            states = saved[repr(factor)]
            if len(states) != len(children):
                raise ValueError(f"{self.name}: {len(states)} saved child states for factor {factor!r}, "
                                 f"but the config has {len(children)} eval_callbacks")
            for child, child_state in zip(children, states):
                child.load_state_dict(child_state)
