"""Pydantic configs of the callbacks; every error names the field to change.

[Note: dispatch by kind]
Validating the base :class:`CallbackConfig` (a list entry, an ``eval_callbacks``
child) reads ``kind``, resolves it through the registry and validates the data
with the config class of that callback, so nested configs are discriminated by
``kind`` and their errors carry the full location (``eval_callbacks.0.dataset_key``).
Validating a concrete config checks that ``kind``, when given, names a callback it
configures, and fills it in otherwise.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..config import EMAConfig
from ._registry import kinds_of_config, known_kinds, resolve_kind

PositiveStrictInt = Annotated[int, Field(gt=0, strict=True)]
NonNegativeStrictInt = Annotated[int, Field(ge=0, strict=True)]
StrictBool = Annotated[bool, Field(strict=True)]

def field_error(title: str, loc: tuple, message: str, value: Any) -> ValidationError:
    """A ValidationError located at ``loc`` (used by checks that span several fields)."""
    return ValidationError.from_exception_data(
        title, [dict(type=PydanticCustomError("invalid_config", "{message}", {"message": message}),
                     loc=loc, input=value)])


class CallbackConfig(BaseModel):
    """Base config of every callback: ``kind`` picks the callback class (see [Note: kinds]).

    Validating this base class with a mapping dispatches to the config class of the
    named callback, so ``CallbackConfig.model_validate({"kind": "EmaCallback", ...})``
    returns an :class:`EmaCallbackConfig`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    """Short name (``EmaCallback``) or dotted import path of a registered callback."""
    name: str | None = None
    """Display name used in logs and as the key of the callback's state (default: ``kind``)."""

    @model_validator(mode="wrap")
    @classmethod
    def _dispatch_on_kind(cls, data: Any, handler):
        if not isinstance(data, dict):
            return handler(data)
        data = dict(data)
        if "kind" not in data:
            defaults = kinds_of_config(cls)
            if len(defaults) != 1:
                choices = ", ".join(defaults) if defaults else known_kinds()
                raise field_error(cls.__name__, ("kind",), f"kind is missing; name the callback, one of: {choices}",
                                  None)
            data["kind"] = defaults[0]
        try:
            short, klass = resolve_kind(data["kind"])
        except ValueError as exc:
            raise field_error(cls.__name__, ("kind",), str(exc), data["kind"]) from None
        target: type[CallbackConfig] = klass.config_class  # type: ignore[attr-defined]
        data["kind"] = short
        if target is cls:
            return handler(data)
        if issubclass(target, cls):
            return target.model_validate(data)
        raise field_error(cls.__name__, ("kind",),
                          f"kind {short!r} is configured by {target.__name__}, not {cls.__name__}", short)

    @field_validator("name")
    @classmethod
    def _name_not_blank(cls, value):
        if value is not None and not value.strip():
            raise ValueError("name must not be blank; leave it out to use the kind")
        return value

    @property
    def display_name(self) -> str:
        """``name`` when given, else ``kind``."""
        return self.name or self.kind


class PeriodicCallbackConfig(CallbackConfig):
    """A callback that runs every n epochs, updates and/or samples (any that are set)."""

    every_n_epochs: PositiveStrictInt | None = None
    """Run after every n-th completed epoch."""
    every_n_updates: PositiveStrictInt | None = None
    """Run after every n-th optimizer update."""
    every_n_samples: PositiveStrictInt | None = None
    """Run after the update during which the sample count crossed a multiple of n."""
    batch_size: PositiveStrictInt | None = None
    """Samples per update for ``every_n_samples`` when the training loop does not count
    samples (its UpdateCounter has no effective batch size); ignored otherwise."""

    @model_validator(mode="after")
    def _batch_size_needs_samples(self):
        if self.batch_size is not None and self.every_n_samples is None:
            raise field_error(type(self).__name__, ("batch_size",),
                              f"batch_size={self.batch_size} is only used by every_n_samples; set every_n_samples "
                              "or remove batch_size", self.batch_size)
        return self

    @property
    def has_schedule(self) -> bool:
        """True when at least one of the ``every_n_*`` fields is set."""
        return any(v is not None for v in (self.every_n_epochs, self.every_n_updates, self.every_n_samples))


def _no_callback_kind_nesting(parent: str, children: list) -> None:
    for i, child in enumerate(children):
        if isinstance(child, EmaCallbackConfig):
            raise field_error(parent, ("eval_callbacks", i, "kind"),
                              "an EmaCallback cannot be an eval callback of another EmaCallback; "
                              "list it at the top level", child.kind)


class EmaCallbackConfig(PeriodicCallbackConfig, EMAConfig):
    """Config of :class:`EmaCallback`: every :class:`~shardema.EMAConfig` field, plus saving and children.

    The EMA options are :class:`~shardema.EMAConfig`'s own fields (same names, same
    validation; ``target_factors`` defaults to ``[0.9999]`` here). The periodic fields
    schedule the saves with the iteration tag (``save_weights``) and of ``cp=latest``
    (``save_latest_weights``); the EMA itself is updated after every optimizer update.
    """

    target_factors: tuple[float, ...] = (0.9999,)
    """Decays in (0, 1), distinct; eval callbacks run once per factor."""
    save_weights: StrictBool = False
    """Save ``cp=<iteration tag>`` (``E{e}_U{u}_S{s}``) on the periodic schedule."""
    save_last_weights: StrictBool = True
    """Save ``cp=last`` after training (independent of ``save_weights``)."""
    save_latest_weights: StrictBool = False
    """Save ``cp=latest`` on the periodic schedule (overwritten each time)."""
    eval_callbacks: list[SerializeAsAny[CallbackConfig]] = Field(default_factory=list)
    """Callbacks run with the EMA weights swapped in, each on its own schedule."""
    root: str | None = None
    """Checkpoint directory; default: the runner's ``ema_root`` (``<run_dir>/ema``). ``{run_dir}``
    in it is replaced by the runner's run directory (``"{run_dir}/posthoc"``: a second EMA
    callback needs a root of its own)."""
    strict_resume: StrictBool = False
    """On resume, raise instead of warning when no committed checkpoint exists."""
    async_save: StrictBool = False
    """Write the periodic saves (iteration tags, ``cp=latest``) and the post-hoc snapshots
    asynchronously: ``ema.save(..., blocking=False)`` stages a host copy and a background thread
    commits it while training goes on (see docs/api.md). ``cp=last`` stays blocking; each save
    waits for the previous one (two tags at one position: the second waits for the first);
    ``keep_last_n_weights`` prunes at the next position, once the previous save has committed;
    :meth:`EmaCallback.wait_for_saves` waits for the one in flight."""
    keep_last_n_weights: PositiveStrictInt | None = None
    """Keep only the newest n iteration-tag checkpoints (``cp=E{e}_U{u}_S{s}``, written by
    ``save_weights``): after each new one is committed, older iteration tags under ``root`` are
    deleted (never ``latest`` or ``last``). ``None``: keep every one."""
    start_epoch: NonNegativeStrictInt | None = None
    """Averaging starts with the first update of epoch ``start_epoch`` (0-based, i.e. once that
    many epochs have completed); every update before it copies the live weights, and the EMA's
    clock (its step and sample count, hence the schedule) starts at that update."""

    snapshot_every_n_updates: PositiveStrictInt | None = None
    """Post-hoc EMA (needs ``sigma_rels``): save a snapshot ``cp=snapshot-<EMA step>`` of every
    profile after every n-th EMA update (see docs/posthoc.md). ``None``: no snapshots."""
    snapshot_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Store the snapshots in this dtype (``bfloat16`` halves them); ``None``: the shadows' dtype."""

    @field_validator("eval_callbacks", mode="before")
    @classmethod
    def _none_is_empty(cls, value):
        return [] if value is None else value

    @model_validator(mode="after")
    def _saves_need_a_schedule(self):
        periodic_saves = [f for f in ("save_weights", "save_latest_weights") if getattr(self, f)]
        if periodic_saves and not self.has_schedule:
            names = " and ".join(periodic_saves)
            verb = "needs" if len(periodic_saves) == 1 else "need"
            raise field_error(type(self).__name__, ("every_n_epochs",),
                              f"{names} {verb} a periodic schedule, but none is set; set every_n_epochs, "
                              f"every_n_updates or every_n_samples, or set {names} to false", None)
        if self.keep_last_n_weights is not None and not self.save_weights:
            raise field_error(type(self).__name__, ("keep_last_n_weights",),
                              f"keep_last_n_weights={self.keep_last_n_weights} prunes the checkpoints save_weights "
                              "writes, but save_weights is false; set save_weights: true or remove "
                              "keep_last_n_weights", self.keep_last_n_weights)
        if self.start_epoch is not None and self.schedule.start_step:
            raise field_error(type(self).__name__, ("start_epoch",),
                              f"start_epoch={self.start_epoch} and start_step={self.schedule.start_step} both say "
                              "when averaging begins; give one of them", self.start_epoch)
        if self.snapshot_every_n_updates is not None and self.sigma_rels is None:
            raise field_error(type(self).__name__, ("snapshot_every_n_updates",),
                              f"snapshot_every_n_updates={self.snapshot_every_n_updates} saves post-hoc snapshots "
                              "of power-function profiles, but the EMA tracks decays; set sigma_rels: [0.05, 0.10] "
                              "instead of target_factors", self.snapshot_every_n_updates)
        if self.snapshot_dtype is not None and self.snapshot_every_n_updates is None:
            raise field_error(type(self).__name__, ("snapshot_dtype",),
                              f"snapshot_dtype={self.snapshot_dtype!r} is for snapshots, but "
                              "snapshot_every_n_updates is not set; set it or remove snapshot_dtype",
                              self.snapshot_dtype)
        _no_callback_kind_nesting(type(self).__name__, self.eval_callbacks)
        return self


class OfflineLossCallbackConfig(PeriodicCallbackConfig):
    """Config of :class:`OfflineLossCallback`: the mean loss over one named dataset."""

    dataset_key: str = Field(min_length=1)
    """Key of the loader in the runner's ``datasets`` mapping (e.g. ``val``)."""
    metric_key: str | None = None
    """Metric name (default ``loss/<dataset_key>``)."""

    @field_validator("dataset_key", "metric_key")
    @classmethod
    def _not_blank(cls, value):
        if value is not None and not value.strip():
            raise ValueError("must not be blank")
        return value

