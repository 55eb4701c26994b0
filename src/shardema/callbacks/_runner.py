"""CallbackRunner: the handful of calls a training loop makes to drive its callbacks."""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ._base import NO_VALUES, CallbackBase, CallbackContext, Hook, build_callback
from ._config import CallbackConfig
from ._counter import UpdateCounter
from ._loader import load_callback_configs
from ._metrics import MetricWriter, default_writer

CallbackSpec = CallbackBase | CallbackConfig | Mapping[str, Any]


class RunnerState(enum.Enum):
    """Lifecycle of a :class:`CallbackRunner`."""

    CREATED = "created"
    TRAINING = "training"
    FINISHED = "finished"


class CallbackRunner:
    """Drives callbacks from any training loop (plain, DDP, FSDP2).

    Every rank makes the same calls at the same points::

        runner.resume_from_checkpoint(state)   # optional, when resuming
        runner.before_training()
        for epoch ...:
            for batch in loader:
                ...; optimizer.step()
                runner.after_update(num_samples=global_batch, values={"loss": loss})
            runner.after_epoch()                 # no-op if updates_per_epoch ended it already
        runner.at_eval()                         # optional, whenever an evaluation is wanted
        runner.after_training()
        state = runner.state_dict()              # checkpoint it with the run

    Args:
        callbacks: callback instances, configs (objects or mappings with ``kind``), or a
            YAML file / YAML text for :func:`load_callback_configs`.
        model: the live model handed to the callbacks.
        update_counter: the counter to advance; or give ``effective_batch_size``
            (samples per update over all ranks) and ``updates_per_epoch`` (epochs then
            end automatically in :meth:`after_update`) to create one.
        datasets: loaders by key for evaluation callbacks (``{"val": loader}``).
        loss_fn: ``loss_fn(model, batch)`` -> the batch's mean loss (or ``(sum, count)``).
        writer: metric writer; default: logging plus ``<run_dir>/metrics.jsonl``.
        run_dir: the run's directory; EMA checkpoints default to ``<run_dir>/ema``.
        ema_root: the EMA checkpoint directory, overriding ``<run_dir>/ema``.
        process_group: the group the model is sharded over (default: the world).
    """

    def __init__(
        self,
        callbacks: Sequence[CallbackSpec] | str | os.PathLike,
        *,
        model: nn.Module | None = None,
        update_counter: UpdateCounter | None = None,
        effective_batch_size: int | None = None,
        updates_per_epoch: int | None = None,
        datasets: Mapping[str, Iterable] | None = None,
        loss_fn: Callable[..., Any] | None = None,
        writer: MetricWriter | None = None,
        run_dir: str | os.PathLike | None = None,
        ema_root: str | os.PathLike | None = None,
        process_group=None,
    ):
        if update_counter is None:
            update_counter = UpdateCounter(effective_batch_size=effective_batch_size,
                                           updates_per_epoch=updates_per_epoch)
        elif effective_batch_size is not None or updates_per_epoch is not None:
            raise ValueError("give either update_counter or effective_batch_size/updates_per_epoch, not both")
        self.update_counter = update_counter
        self._owns_writer = writer is None
        self.context = CallbackContext(
            model=model, datasets=dict(datasets or {}), loss_fn=loss_fn,
            writer=writer if writer is not None else default_writer(run_dir),
            run_dir=run_dir, ema_root=ema_root, process_group=process_group,
        )
        if isinstance(callbacks, (str, os.PathLike)):
            callbacks = load_callback_configs(callbacks)
        self.callbacks: list[CallbackBase] = [self._build(spec, i) for i, spec in enumerate(callbacks)]
        self._keys = _unique_keys(self.callbacks)
        self._check_checkpoint_dirs()
        self.state = RunnerState.CREATED
        self._epoch_closed_at: int | None = None

    def _build(self, spec: CallbackSpec, index: int) -> CallbackBase:
        if isinstance(spec, CallbackBase):
            return spec
        if isinstance(spec, Mapping):
            spec = CallbackConfig.model_validate(dict(spec))
        if isinstance(spec, CallbackConfig):
            return build_callback(spec, self.context)
        raise TypeError(f"callbacks[{index}] is a {type(spec).__name__}; give a CallbackBase, a CallbackConfig "
                        "or a mapping with a 'kind'")

    def _check_checkpoint_dirs(self) -> None:
        owners: dict[Path, str] = {}
        for cb in self.all_callbacks():
            for directory in cb.checkpoint_dirs():
                resolved = Path(directory).resolve()
                if resolved in owners:
                    raise ValueError(f"callbacks {owners[resolved]!r} and {cb.name!r} would both write checkpoints "
                                     f"to {str(directory)!r}; give one of them root: <another directory>")
                owners[resolved] = cb.name

    # ------------------------------------------------------------------ introspection
    def all_callbacks(self) -> list[CallbackBase]:
        """Every callback, children after their parent (depth first)."""
        out: list[CallbackBase] = []

        def visit(cb: CallbackBase) -> None:
            out.append(cb)
            for child in cb.get_children():
                visit(child)

        for cb in self.callbacks:
            visit(cb)
        return out

    def __getitem__(self, key: int | str) -> CallbackBase:
        """A top-level callback by index or by state key (its name)."""
        if isinstance(key, int):
            return self.callbacks[key]
        return self.callbacks[self._keys.index(key)]

    # ------------------------------------------------------------------ lifecycle
    def _require(self, state: RunnerState, call: str) -> None:
        if self.state is not state:
            raise RuntimeError(f"runner.{call}() called while the runner is {self.state.value}; "
                               f"it belongs to the {state.value} phase")

    def _call(self, hook: Hook, values: Mapping[str, Any] | None) -> None:
        frozen = NO_VALUES if not values else MappingProxyType(dict(values))
        with torch.no_grad():
            for cb in self.callbacks:
                getattr(cb, hook.value)(update_counter=self.update_counter, values=frozen)

    def resume_from_checkpoint(self, state_dict: dict | None = None, values: Mapping[str, Any] | None = None) -> None:
        """Collective, before :meth:`before_training`: restore ``state_dict`` (from :meth:`state_dict`)
        and let every callback resume (the EMA: ``cp=latest``, then ``cp=last``, then init)."""
        self._require(RunnerState.CREATED, "resume_from_checkpoint")
        if state_dict is not None:
            self.load_state_dict(state_dict)
        self._call(Hook.RESUME_FROM_CHECKPOINT, values)

    def before_training(self, values: Mapping[str, Any] | None = None) -> None:
        """Collective: once, before the first update."""
        self._require(RunnerState.CREATED, "before_training")
        self.state = RunnerState.TRAINING
        self._call(Hook.BEFORE_TRAINING, values)

    def after_update(self, num_samples: int | None = None, values: Mapping[str, Any] | None = None) -> None:
        """Collective: after every ``optimizer.step()``.

        Counts the update (``num_samples`` over all ranks; default the effective batch
        size), ends the epoch when ``updates_per_epoch`` says so, and calls
        ``track_after_update_step``, ``after_update`` (and ``after_epoch``) on every
        callback. ``values`` (e.g. ``{"loss": loss}``) reach every hook of this call as ``values``.
        """
        self._require(RunnerState.TRAINING, "after_update")
        counter = self.update_counter
        counter.next_update(num_samples)
        ends_epoch = counter.is_full_epoch
        if ends_epoch:
            counter.next_epoch()
        self._call(Hook.TRACK_AFTER_UPDATE_STEP, values)
        self._call(Hook.AFTER_UPDATE, values)
        if ends_epoch:
            self._epoch_closed_at = counter.update
            self._call(Hook.AFTER_EPOCH, values)

    def after_epoch(self, values: Mapping[str, Any] | None = None) -> None:
        """Collective: at the end of an epoch (a no-op when :meth:`after_update` just ended it)."""
        self._require(RunnerState.TRAINING, "after_epoch")
        counter = self.update_counter
        if self._epoch_closed_at == counter.update:
            return
        if counter.update == 0 and counter.updates_per_epoch is not None:
            raise ValueError(f"after_epoch() before any after_update(): with updates_per_epoch="
                             f"{counter.updates_per_epoch} an epoch ends after that many updates; call "
                             "runner.after_update() after every optimizer.step()")
        if counter.updates_per_epoch is not None:
            raise ValueError(
                f"after_epoch() at update {counter.update}, which is not a multiple of updates_per_epoch="
                f"{counter.updates_per_epoch}; fix updates_per_epoch, or leave it None and call after_epoch()"
            )
        counter.next_epoch()
        self._epoch_closed_at = counter.update
        self._call(Hook.AFTER_EPOCH, values)

    def at_eval(self, values: Mapping[str, Any] | None = None) -> None:
        """Collective: run every callback's evaluation now (EMA children with EMA weights)."""
        if self.state is RunnerState.CREATED:
            raise RuntimeError("runner.at_eval() before before_training()")
        self._call(Hook.AT_EVAL, values)

    def after_training(self, values: Mapping[str, Any] | None = None) -> None:
        """Collective: once, after the last update; flushes the metric writer."""
        self._require(RunnerState.TRAINING, "after_training")
        self.state = RunnerState.FINISHED
        try:
            self._call(Hook.AFTER_TRAINING, values)
        finally:
            self.context.writer.flush()
            if self._owns_writer:
                self.context.writer.close()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The counter and every top-level callback's state (children inside their parent's)."""
        return {
            "update_counter": self.update_counter.state_dict(),
            "epoch_closed_at": self._epoch_closed_at,
            "callbacks": {key: cb.state_dict() for key, cb in zip(self._keys, self.callbacks)},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the callbacks must be the same (by name)."""
        saved = state.get("callbacks", {})
        if set(saved) != set(self._keys):
            raise ValueError(f"saved callback states {sorted(saved)} do not match the callbacks {sorted(self._keys)}")
        self.update_counter.load_state_dict(state["update_counter"])
        self._epoch_closed_at = state.get("epoch_closed_at")
        for key, cb in zip(self._keys, self.callbacks):
            cb.load_state_dict(saved[key])


def _unique_keys(callbacks: list[CallbackBase]) -> list[str]:
    keys: list[str] = []
    for cb in callbacks:
        key, n = cb.name, 1
        while key in keys:
            n += 1
            key = f"{cb.name}#{n}"
        keys.append(key)
    return keys
