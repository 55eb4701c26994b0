"""CallbackBase (the hooks), PeriodicCallback (schedules) and what callbacks can reach.

[Note: hook order]
For each optimizer update the runner counts the update (and, when it completes an
epoch, the epoch), then calls on every callback in order:
``track_after_update_step`` (every update, unconditionally: cheap tracking such as
the EMA update itself), ``after_update`` (every update too, but meant for periodic
work: :class:`PeriodicCallback` runs ``periodic_callback`` there only when its
update/sample schedule fires) and, at an epoch end, ``after_epoch``.
``before_training`` / ``after_training`` run once, ``resume_from_checkpoint`` before
``before_training`` when resuming, ``at_eval`` when the loop asks for an evaluation.
Every hook runs under ``torch.no_grad()`` and takes exactly two keyword arguments:
the shared :class:`UpdateCounter` as ``update_counter``, and ``values``, a read-only
mapping of what the training loop handed to the runner for this call (e.g.
``{"loss": 2.31}``; empty by default).
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from . import _registry
from ._config import CallbackConfig, PeriodicCallbackConfig
from ._counter import UpdateCounter
from ._metrics import MemoryWriter, MetricWriter

NO_VALUES: Mapping[str, Any] = MappingProxyType({})
"""The ``values`` a hook gets when the training loop passed none."""


class IntervalType(str, enum.Enum):
    """What made a periodic callback fire."""

    EPOCH = "epoch"
    UPDATE = "update"
    SAMPLE = "sample"
    EVAL = "eval"


class Hook(str, enum.Enum):
    """The lifecycle hooks, by name."""

    BEFORE_TRAINING = "before_training"
    RESUME_FROM_CHECKPOINT = "resume_from_checkpoint"
    TRACK_AFTER_UPDATE_STEP = "track_after_update_step"
    AFTER_UPDATE = "after_update"
    AFTER_EPOCH = "after_epoch"
    AT_EVAL = "at_eval"
    AFTER_TRAINING = "after_training"


@dataclasses.dataclass(frozen=True)
class CallbackContext:
    """What a training run hands to its callbacks.

    Attributes:
        model: the live model (plain, DDP, FSDP2, DTensor).
        datasets: loaders by key (``{"val": loader}``) for evaluation callbacks; each
            yields this rank's batches.
        loss_fn: ``loss_fn(model, batch)`` returning the batch's mean loss (a scalar
            tensor) or a ``(loss_sum, sample_count)`` pair.
        writer: where metrics go.
        run_dir: the run's directory (metrics file, default checkpoint root).
        ema_root: default checkpoint directory of EMA callbacks.
        process_group: the group the model is sharded over (default: the world).
    """

    model: nn.Module | None = None
    datasets: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    loss_fn: Callable[..., Any] | None = None
    writer: MetricWriter = dataclasses.field(default_factory=MemoryWriter)
    run_dir: str | os.PathLike | None = None
    ema_root: str | os.PathLike | None = None
    process_group: Any = None

    def replace(self, **changes) -> CallbackContext:
        """A copy with some attributes changed (e.g. a prefixed writer for child callbacks)."""
        return dataclasses.replace(self, **changes)


class CallbackBase:
    """A training callback: override the hooks you need (all are no-ops here).

    Define a subclass with a ``config_class`` and a ``kind`` to make it available in
    YAML configs (``kind: MyEval``)::

        class MyEvalConfig(PeriodicCallbackConfig):
            dataset_key: str

        class MyEval(PeriodicCallback, kind="MyEval"):
            config_class = MyEvalConfig

    Hooks are keyword-only: ``update_counter`` and ``values``; see [Note: hook order].

    Args:
        config: the validated config (a default one when omitted); validate a mapping
            first with ``ConfigClass.model_validate(mapping)``.
        context: what the run provides (model, datasets, loss, writer, directories).
    """

    config_class: ClassVar[type[CallbackConfig]] = CallbackConfig
    kind_name: ClassVar[str | None] = None
    """The ``kind`` this class is registered under (None: not available in configs)."""

    def __init_subclass__(cls, kind: str | None = None, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        cls.kind_name = None  # a subclass is not registered under its parent's kind
        if kind is not None:
            _register(cls, kind)

    def __init__(self, config: CallbackConfig | None = None, context: CallbackContext | None = None):
        if config is None:
            data: dict[str, Any] = {}
            if self.kind_name is not None:
                data["kind"] = self.kind_name
            config = self.config_class.model_validate(data)
        if not isinstance(config, self.config_class):
            hint = (f"; validate a mapping first: {self.config_class.__name__}.model_validate(...)"
                    if isinstance(config, Mapping) else "")
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, "
                            f"got {type(config).__name__}{hint}")
        self.config = config
        self.context = context if context is not None else CallbackContext()

    # ------------------------------------------------------------------ conveniences
    @property
    def name(self) -> str:
        """The config's display name (``name`` or ``kind``)."""
        return self.config.display_name

    @property
    def model(self) -> nn.Module | None:
        """The live model of the run."""
        return self.context.model

    @property
    def writer(self) -> MetricWriter:
        """Where this callback's metrics go (prefixed for EMA children)."""
        return self.context.writer

    def log_scalar(self, key: str, value, update_counter: UpdateCounter | None = None) -> None:
        """Write one metric through :attr:`writer`."""
        self.writer.add_scalar(key, value, update_counter=update_counter)

    # ------------------------------------------------------------------ hooks
    @torch.no_grad()
    def before_training(self, *, update_counter: UpdateCounter, values: Mapping[str, Any] = NO_VALUES) -> None:
        """Once, before the first update (after :meth:`resume_from_checkpoint` when resuming)."""

    @torch.no_grad()
    def resume_from_checkpoint(self, *, update_counter: UpdateCounter,
                               values: Mapping[str, Any] = NO_VALUES) -> None:
        """Once, when the run resumes, before :meth:`before_training`."""

    @torch.no_grad()
    def track_after_update_step(self, *, update_counter: UpdateCounter,
                                values: Mapping[str, Any] = NO_VALUES) -> None:
        """After every optimizer update, unconditionally (cheap tracking; the EMA update happens here)."""

    @torch.no_grad()
    def after_update(self, *, update_counter: UpdateCounter, values: Mapping[str, Any] = NO_VALUES) -> None:
        """After every optimizer update, following :meth:`track_after_update_step`; the place for
        periodic work (see [Note: hook order])."""

    @torch.no_grad()
    def after_epoch(self, *, update_counter: UpdateCounter, values: Mapping[str, Any] = NO_VALUES) -> None:
        """After every completed epoch (``update_counter.epoch`` already counts it)."""

    @torch.no_grad()
    def at_eval(self, *, update_counter: UpdateCounter, values: Mapping[str, Any] = NO_VALUES) -> None:
        """When the training loop asks for an evaluation."""

    @torch.no_grad()
    def after_training(self, *, update_counter: UpdateCounter, values: Mapping[str, Any] = NO_VALUES) -> None:
        """Once, after the last update."""

    def fires(self, hook: Hook | str, update_counter: UpdateCounter) -> bool:
        """Whether ``hook`` does work at this position; a parent swaps weights only if so.

        Default: always (a plain callback's hooks may do anything).
        """
        return True

    def checkpoint_dirs(self) -> list[os.PathLike]:
        """Directories this callback writes checkpoints to (the runner refuses two writers on one)."""
        return []

    def get_children(self) -> list[CallbackBase]:
        """Callbacks this one owns and dispatches (flat list; none by default)."""
        return []

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Picklable state to checkpoint with the run (empty by default)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class PeriodicCallback(CallbackBase):
    """A callback whose :meth:`periodic_callback` runs on its epoch / update / sample schedule.

    Subclasses implement :meth:`periodic_callback`. Within one hook it runs at most
    once, even when several schedules match; :meth:`at_eval` always runs it with
    ``interval_type=IntervalType.EVAL``.
    """

    config_class: ClassVar[type[CallbackConfig]] = PeriodicCallbackConfig
    config: PeriodicCallbackConfig

    def __init__(self, config: PeriodicCallbackConfig | None = None, context: CallbackContext | None = None):
        super().__init__(config, context)
        self.every_n_epochs = self.config.every_n_epochs
        self.every_n_updates = self.config.every_n_updates
        self.every_n_samples = self.config.every_n_samples
        self.batch_size = self.config.batch_size

    # ------------------------------------------------------------------ schedules
    def _sample_window(self, update_counter: UpdateCounter) -> tuple[int, int]:
        if update_counter.counts_samples:
            return update_counter.sample - update_counter.last_update_samples, update_counter.sample
        if self.batch_size is not None:
            return (update_counter.update - 1) * self.batch_size, update_counter.update * self.batch_size
        raise ValueError(
            f"{self.name}: every_n_samples={self.every_n_samples} needs sample counts, but the training loop "
            "reports none; give UpdateCounter(effective_batch_size=...), pass num_samples to after_update, "
            "or set batch_size in the callback's config"
        )

    def update_interval(self, update_counter: UpdateCounter) -> IntervalType | None:
        """The interval that fires after the current update, if any (updates before samples)."""
        if self.every_n_updates is not None and update_counter.update % self.every_n_updates == 0:
            return IntervalType.UPDATE
        if self.every_n_samples is not None:
            before, after = self._sample_window(update_counter)
            if before // self.every_n_samples < after // self.every_n_samples:
                return IntervalType.SAMPLE
        return None

    def epoch_fires(self, update_counter: UpdateCounter) -> bool:
        """True when the epoch just completed is on the epoch schedule."""
        return (self.every_n_epochs is not None and update_counter.epoch > 0
                and update_counter.epoch % self.every_n_epochs == 0)

    def fires(self, hook: Hook | str, update_counter: UpdateCounter) -> bool:
        """Whether :meth:`periodic_callback` runs in ``hook`` at this position."""
        hook = Hook(hook)
        if hook is Hook.AFTER_UPDATE:
            return self.update_interval(update_counter) is not None
        if hook is Hook.AFTER_EPOCH:
            return self.epoch_fires(update_counter)
        return hook is Hook.AT_EVAL

    # ------------------------------------------------------------------ hooks
    @torch.no_grad()
    def after_update(self, *, update_counter: UpdateCounter, values: Mapping[str, Any] = NO_VALUES) -> None:
        """Run :meth:`periodic_callback` when the update or sample schedule fires."""
        interval = self.update_interval(update_counter)
        if interval is not None:
            self.periodic_callback(interval_type=interval, update_counter=update_counter, values=values)

    @torch.no_grad()
    def after_epoch(self, *, update_counter: UpdateCounter, values: Mapping[str, Any] = NO_VALUES) -> None:
        """Run :meth:`periodic_callback` when the epoch schedule fires."""
        if self.epoch_fires(update_counter):
            self.periodic_callback(interval_type=IntervalType.EPOCH, update_counter=update_counter, values=values)

    @torch.no_grad()
    def at_eval(self, *, update_counter: UpdateCounter, values: Mapping[str, Any] = NO_VALUES) -> None:
        """Run :meth:`periodic_callback` with ``IntervalType.EVAL``."""
        self.periodic_callback(interval_type=IntervalType.EVAL, update_counter=update_counter, values=values)

    @torch.no_grad()
    def periodic_callback(self, *, interval_type: IntervalType, update_counter: UpdateCounter,
                          values: Mapping[str, Any] = NO_VALUES) -> None:
        """The periodic work: evaluate, save, log. Override this."""


def _register(klass: type[CallbackBase], kind: str) -> None:
    config_class = getattr(klass, "config_class", None)
    if not (isinstance(config_class, type) and issubclass(config_class, CallbackConfig)):
        raise TypeError(f"{klass.__name__}.config_class must be a CallbackConfig subclass, got {config_class!r}")
    _registry.add(kind, klass)
    klass.kind_name = kind


C = TypeVar("C", bound=type)


def register_callback(cls: C | None = None, *, name: str | None = None) -> C | Callable[[C], C]:
    """Class decorator, equivalent to ``class X(CallbackBase, kind=name)``: make a callback class
    available as ``kind: <name>`` in configs (``name`` defaults to the class name).

    The class must define ``config_class``, a subclass of :class:`CallbackConfig`.
    Registering the same class again (a module imported twice) is allowed; giving a
    name to a different class raises.
    """

    def decorate(klass: C) -> C:
        if not (isinstance(klass, type) and issubclass(klass, CallbackBase)):
            raise TypeError(f"register_callback expects a CallbackBase subclass, got {klass!r}")
        _register(klass, name or klass.__name__)
        return klass

    return decorate if cls is None else decorate(cls)


def build_callback(config: CallbackConfig, context: CallbackContext) -> CallbackBase:
    """Instantiate the callback a validated config names."""
    _, klass = _registry.resolve_kind(config.kind)
    return klass(config, context)
