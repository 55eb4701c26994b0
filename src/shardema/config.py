"""Every EMA option in one frozen pydantic model: :class:`EMAConfig` (and its :class:`DecaySchedule`).

The same fields reach shardema three ways, with one validation:

- Python: ``ShardedEMA(model, EMAConfig(target_factors=[0.999], schedule="warmup"))``;
- keywords: ``ShardedEMA(model, [0.999], schedule="warmup")`` builds the same config;
- YAML: an ``EmaCallback`` entry (``EmaCallbackConfig`` subclasses :class:`EMAConfig`).

Nothing here holds torch state; torch is imported only to name dtypes.

[Note: step numbering]
``n`` in the schedules is the number of ``update()`` calls made since averaging
began, i.e. ``ema.step - start_step`` at the time of the call (0 for the first
averaged call). Calls before ``start_step`` copy the live weights into the
shadows (or, with ``before_start="hold"``, leave them as they are); after it an
update is applied on every ``update_every``-th call (the calls in between still
refresh the copied buffers).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from ._profiles import check_sigma_rel, gamma_of_sigma_rel, power_function_decay

ScheduleKind = Literal["constant", "warmup", "power", "half_life", "edm", "swa", "power_function"]
BufferPolicy = Literal["copy", "average", "ignore"]
ShadowDtypeName = Literal["float32", "float64", "bfloat16", "float16", "live"]

SHADOW_DTYPES: dict[str, torch.dtype | None] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "live": None,  # each shadow in its live tensor's dtype
}

DEFAULT_UPCAST_BUFFER_BYTES = 32 * 2**20
"""Default bound of the buffer that upcasts bf16/fp16 live shards for fp32 shadows in ``update()``."""
DEFAULT_EXCHANGE_BUFFER_BYTES = 64 * 2**20
"""Default bound of the buffer through which ``swapped()`` exchanges live and EMA values in place."""
DEFAULT_CHUNK_NUMEL = 2**18

SCHEDULE_FIELDS = ("inv_gamma", "power", "update_every", "start_step", "before_start", "min_decay", "count",
                   "first_update_copies", "half_life_fraction", "step_bias", "half_life_samples", "rampup_ratio",
                   "samples_per_update")
"""Schedule options that may also be given flat, beside ``schedule`` (keywords, YAML)."""

RENAMED_OPTIONS = {
    "upcast_scratch_bytes": "upcast_buffer_bytes",
    "scratch_bytes": "exchange_buffer_bytes",
}
"""Option names of shardema 0.1 that were renamed: old -> new (the old ones are rejected, naming the new)."""

RENAMED_ATTRIBUTES = {
    "ShardedEMA": {"scratch_bytes": "upcast_buffer_bytes"},
    "SwapInfo": {"scratch_bytes": "exchange_buffer_bytes"},
}
"""Attributes of shardema 0.1 that were renamed: class -> old -> new (reading an old one raises, naming the new)."""


def missing_attribute(obj: object, name: str) -> AttributeError:
    """Python's error for a missing ``obj.name``, naming the new name when ``name`` was renamed in 0.2."""
    owner = type(obj).__name__
    new = RENAMED_ATTRIBUTES.get(owner, {}).get(name)
    hint = f"; it was renamed to {new!r} in shardema 0.2" if new else ""
    return AttributeError(f"{owner!r} object has no attribute {name!r}{hint}", name=name, obj=obj)

FACTOR_MATCH_TOLERANCE = 1e-12
"""Two factors closer than this are the same factor in lookups (``swapped(0.9999)``, checkpoints);
factors of one EMA must therefore be further apart."""


def factors_match(a: float, b: float) -> bool:
    """True when ``a`` and ``b`` name the same factor (see :data:`FACTOR_MATCH_TOLERANCE`)."""
    return abs(float(a) - float(b)) <= FACTOR_MATCH_TOLERANCE


PositiveInt = Annotated[int, Field(gt=0, strict=True)]
NonNegativeInt = Annotated[int, Field(ge=0, strict=True)]


def check_factors(target_factors: Any) -> tuple[float, ...]:
    """Validate target factors: one decay or a list of them, each in (0, 1), no duplicates."""
    if isinstance(target_factors, (int, float)) and not isinstance(target_factors, bool):
        target_factors = [target_factors]
    if isinstance(target_factors, (str, bytes, bool)) or not isinstance(target_factors, Sequence):
        raise ValueError(f"target_factors={target_factors!r} must be a decay or a list of decays in (0, 1), "
                         "e.g. [0.999, 0.9999]")
    factors = []
    for f in target_factors:
        if isinstance(f, bool) or not isinstance(f, (int, float)):
            raise ValueError(f"target factor {f!r} is not a number; give decays in (0, 1) such as 0.9999")
        factors.append(float(f))
    if not factors:
        raise ValueError("target_factors is empty; give at least one decay in (0, 1), e.g. [0.9999]")
    for f in factors:
        if math.isnan(f) or not (0.0 < f < 1.0):
            raise ValueError(f"target factor {f!r} is outside (0, 1); use a decay such as 0.999 or 0.9999")
    ordered = sorted(factors)
    duplicated = sorted({a for a, b in itertools.pairwise(ordered) if a == b})
    if duplicated:
        raise ValueError(f"target factors {duplicated} are given more than once; give each decay once")
    close = [(a, b) for a, b in itertools.pairwise(ordered) if factors_match(a, b)]
    if close:
        a, b = close[0]
        raise ValueError(f"target factors {a!r} and {b!r} differ by {b - a:.3g}, less than "
                         f"{FACTOR_MATCH_TOLERANCE:g}, so lookups cannot tell them apart; keep one of them")
    return tuple(factors)


def _profiles_as_factors(data: dict) -> dict:
    """``sigma_rels=[...]`` -> ``target_factors=[...]`` with ``schedule="power_function"`` (before validation)."""
    if data.get("sigma_rels") is None:
        return data
    sigma_rels = data["sigma_rels"]
    if isinstance(sigma_rels, (int, float)) and not isinstance(sigma_rels, bool):
        sigma_rels = [sigma_rels]
    if isinstance(sigma_rels, (str, bytes)) or not isinstance(sigma_rels, Sequence) or not sigma_rels:
        raise ValueError(f"sigma_rels={sigma_rels!r} must be a non-empty list of relative widths, e.g. [0.05, 0.10]")
    sigma_rels = tuple(check_sigma_rel(v) for v in sigma_rels)
    given = data.get("target_factors")
    if given is not None and tuple(check_factors(given)) != sigma_rels:
        raise ValueError(f"give sigma_rels={list(sigma_rels)} or target_factors={given!r}, not both: a "
                         "power-function EMA names its averages by their sigma_rels")
    schedule = data.get("schedule", "power_function")
    kind = (schedule if isinstance(schedule, str) else schedule.get("kind", "constant") if isinstance(schedule, dict)
            else getattr(schedule, "kind", None))
    if kind != "power_function":
        raise ValueError(f"sigma_rels needs schedule 'power_function' (it is {kind!r}); leave schedule unset")
    if isinstance(schedule, str):
        schedule = {"kind": schedule}
    return {**data, "sigma_rels": sigma_rels, "target_factors": sigma_rels, "schedule": schedule}


def _is_dotted_path(path: object) -> bool:
    # A model path names a checkpoint directory: no path separators ('/etc' would leave the root).
    return (isinstance(path, str) and bool(path) and path == path.strip(".") and ".." not in path
            and not any(c.isspace() or c in "/\\" for c in path))


def check_model_paths(model_paths: Any) -> tuple[str | None, ...]:
    """Validate model paths: ``None`` (whole model), one dotted path, or disjoint dotted paths."""
    if model_paths is None:
        return (None,)
    if isinstance(model_paths, str):
        model_paths = [model_paths]
    if not isinstance(model_paths, Sequence):
        raise ValueError(f"model_paths={model_paths!r} must be None, a dotted path or a list of them")
    paths = list(model_paths)
    if not paths:
        raise ValueError("model_paths is empty; pass None to average the whole model")
    for path in paths:
        if path is not None and not _is_dotted_path(path):
            raise ValueError(f"model path {path!r} is not a dotted submodule path such as 'encoder' or 'blocks.0'")
    for i, a in enumerate(paths):
        for b in paths[i + 1:]:
            if a is None or b is None or a == b or b.startswith(a + ".") or a.startswith(b + "."):
                shown_a = "None (the whole model)" if a is None else repr(a)
                shown_b = "None (the whole model)" if b is None else repr(b)
                raise ValueError(
                    f"model paths {shown_a} and {shown_b} overlap; give disjoint submodules "
                    "(e.g. 'encoder' and 'decoder'), each parameter may belong to one path only"
                )
    return tuple(paths)


# The validators' logic lives in plain functions: mutation testing (mutmut) skips decorated ones.
def _check_kind_options(schedule: DecaySchedule) -> None:
    if schedule.kind == "half_life" and schedule.half_life_fraction is None:
        raise ValueError("kind 'half_life' needs half_life_fraction, e.g. 0.1 (a tenth of the run so far)")
    if schedule.kind == "edm" and schedule.half_life_samples is None:
        raise ValueError("kind 'edm' needs half_life_samples, e.g. 500_000 (EDM's 500 kimg)")
    if schedule.kind == "power_function" and (schedule.min_decay or schedule.first_update_copies
                                              or schedule.count != "calls"):
        raise ValueError("kind 'power_function' takes neither min_decay, first_update_copies nor count: its "
                         "decays are fixed by the profile (time counts firings; the first one copies)")


class DecaySchedule(BaseModel):
    """When and how strongly the EMA is updated (a pure function of the step; see [Note: step numbering]).

    Kinds (``n`` counts calls since ``start_step``, or firings with ``count="firings"``):

    - ``constant`` (default): decay = factor.
    - ``warmup``: decay = min(factor, (1 + n) / (10 + n)): early steps move fast.
    - ``power``: decay = min(factor, 1 - (1 + n / inv_gamma) ** -power); ``power=2/3`` suits
      runs of ~1M steps, ``power=3/4`` shorter ones (as in Karras et al.).
    - ``half_life``: decay = min(factor, 2 ** (-1 / (half_life_fraction * m))) with
      ``m = max(1, firings including this one + step_bias)``: the half-life is a fixed
      fraction of the training so far (torchtitan).
    - ``edm``: decay = min(factor, 0.5 ** (samples / max(h, 1e-8))) with ``samples`` the
      samples since the previous firing and ``h = half_life_samples``, or with
      ``rampup_ratio`` ``h = min(half_life_samples, samples_seen * rampup_ratio)``: a
      half-life in samples, independent of the batch size (Karras et al., EDM).
    - ``swa``: the equal average of every firing (``torch.optim.swa_utils.AveragedModel``):
      decay = n / (n + 1) over firings, so the first firing copies; ``factor`` is ignored.
    - ``power_function``: the post-hoc EMA profiles of Karras et al. (EDM2): ``factor`` is
      the profile's ``sigma_rel``, ``gamma`` solves ``sigma_rel = sqrt((gamma + 1) /
      ((gamma + 2)**2 (gamma + 3)))`` and decay = ``(1 - 1/t)**(gamma + 1)`` with ``t`` the
      firings so far, this one included (the first firing copies). Set it with
      ``EMAConfig(sigma_rels=[...])``; see docs/posthoc.md.

    For every kind: ``update_every=k`` averages on every k-th call only; ``start_step=s``
    makes calls before ``s`` copy the live weights (``before_start="hold"``: keep the shadows,
    so the first firing averages in the weights the EMA was created with, as torchtitan
    does); ``min_decay`` is a floor on the decay
    (diffusers, timm, ema-pytorch ``min_value``); ``first_update_copies`` makes the first
    firing copy the live weights (``AveragedModel``, Lightning, diffusers).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ScheduleKind = "constant"
    """The decay formula: ``constant``, ``warmup``, ``power``, ``half_life``, ``edm`` or ``swa``."""
    inv_gamma: float = Field(1.0, gt=0)
    """``power`` schedule: the step scale (1 for most runs)."""
    power: float = Field(2 / 3, gt=0)
    """``power`` schedule: the exponent (2/3 for ~1M steps, 3/4 for shorter runs)."""
    update_every: PositiveInt = 1
    """Average on every k-th ``update()`` call only. The calls in between leave the averaged shadows
    alone; copied tensors (buffers under ``"copy"``, integer buffers) still take the live values."""
    start_step: NonNegativeInt = 0
    """Calls before this step copy the live weights instead of averaging (see ``before_start``)."""
    before_start: Literal["copy", "hold"] = "copy"
    """What calls before ``start_step`` do: ``"copy"`` the live weights (default), or ``"hold"`` the
    shadows as they are (skips: copied tensors still follow the live model), so the first firing
    averages in the weights the EMA was created with (or last loaded / reset to), as torchtitan
    does before its first firing."""
    min_decay: float = Field(0.0, ge=0.0, lt=1.0)
    """A floor on the decay of every firing (0: none)."""
    count: Literal["calls", "firings"] = "calls"
    """What ``n`` counts when ``update_every > 1``: ``update()`` calls since ``start_step`` (default)
    or firings (averaging calls), as torchtitan and diffusers do."""
    first_update_copies: StrictBool = False
    """The first firing copies the live weights (decay 0)."""
    half_life_fraction: float | None = Field(None, gt=0)
    """``half_life``: the half-life as a fraction of the firings so far (torchtitan)."""
    step_bias: int = 0
    """``half_life``: added to the firing count (a renumbered run continues its schedule)."""
    half_life_samples: float | None = Field(None, gt=0)
    """``edm``: the half-life in training samples."""
    rampup_ratio: float | None = Field(None, gt=0)
    """``edm``: cap the half-life at ``samples_seen * rampup_ratio`` (EDM uses 0.05)."""
    samples_per_update: PositiveInt | None = None
    """``edm``: samples per ``update()`` call when the caller passes no ``num_samples``."""

    @model_validator(mode="after")
    def _kind_options(self) -> DecaySchedule:
        _check_kind_options(self)
        return self

    def ignored_options(self) -> list[str]:
        """Options set away from their default that this kind does not use (worth a warning)."""
        used = {"constant": set(), "warmup": set(), "power": {"inv_gamma", "power"},
                "half_life": {"half_life_fraction", "step_bias"},
                "edm": {"half_life_samples", "rampup_ratio", "samples_per_update"}, "swa": set(),
                "power_function": set()}[self.kind]
        defaults = {"inv_gamma": 1.0, "power": 2 / 3, "half_life_fraction": None, "step_bias": 0,
                    "half_life_samples": None, "rampup_ratio": None, "samples_per_update": None}
        ignored = [name for name, default in defaults.items() if name not in used and getattr(self, name) != default]
        if self.kind == "swa" and self.min_decay:
            ignored.append("min_decay")
        return ignored

    def is_tracking(self, step: int) -> bool:
        """True when the call at ``step`` copies live weights (before ``start_step``, unless held)."""
        return step < self.start_step and self.before_start == "copy"

    def is_update_step(self, step: int) -> bool:
        """True when the call at ``step`` applies an EMA update (a firing)."""
        return step >= self.start_step and (step - self.start_step) % self.update_every == 0

    def firings_before(self, step: int) -> int:
        """Firings (averaging calls) before the call at ``step``."""
        return 0 if step <= self.start_step else -(-(step - self.start_step) // self.update_every)

    def decay(self, factor: float, step: int, samples: float = 0.0, samples_seen: float = 0.0) -> float:
        """Decay used by the call at ``step`` for target ``factor`` (see [Note: step numbering]).

        ``samples``: samples since the previous firing (this call's included); ``samples_seen``:
        samples before those. Only ``edm`` reads them.
        """
        fired = self.firings_before(step)
        if self.first_update_copies and fired == 0:
            return 0.0
        n = fired if self.count == "firings" else max(0, step - self.start_step)
        if self.kind == "constant":
            value = factor
        elif self.kind == "warmup":
            value = min(factor, (1 + n) / (10 + n))
        elif self.kind == "power":
            value = min(factor, 1.0 - (1.0 + n / self.inv_gamma) ** (-self.power))
        elif self.kind == "half_life":
            m = max(1, fired + 1 + self.step_bias)
            value = min(factor, 2.0 ** (-1.0 / (float(self.half_life_fraction or 1.0) * m)))
        elif self.kind == "edm":
            half_life = float(self.half_life_samples or 0.0)
            if self.rampup_ratio is not None:
                half_life = min(half_life, samples_seen * self.rampup_ratio)
            value = min(factor, 0.5 ** (samples / max(half_life, 1e-8)))
        elif self.kind == "power_function":  # factor is the profile's sigma_rel
            return power_function_decay(gamma_of_sigma_rel(factor), fired + 1)
        else:  # swa: the equal average of the firings
            return fired / (fired + 1.0)
        return max(value, self.min_decay)


class EMAConfig(BaseModel):
    """Every option of a :class:`~shardema.ShardedEMA`, validated once; frozen.

    ``ShardedEMA(model, EMAConfig(...))`` and ``ShardedEMA(model, factors, **fields)``
    build the same EMA; ``EmaCallbackConfig`` (YAML) has the same fields. Every
    :class:`DecaySchedule` option (``update_every``, ``start_step``, ``min_decay``,
    ``power``, ``half_life_samples``, ...) may also be given flat, beside ``schedule``;
    they end up in :attr:`schedule`. Round-trips through
    ``model_dump_json()`` / ``model_validate_json()`` and YAML.

    Example::

        cfg = EMAConfig(target_factors=[0.999, 0.9999], schedule="warmup", update_every=2)
        cfg.schedule            # DecaySchedule(kind='warmup', update_every=2, ...)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_factors: tuple[float, ...]
    """Decays in (0, 1), distinct (one number is accepted). Typical: 0.999 for ~10k-step runs,
    0.9999 for ~100k+ steps. All factors are updated by the same fused kernel. With
    :attr:`sigma_rels` they are the sigma_rels (each tracked average is named by its number)."""
    sigma_rels: tuple[float, ...] | None = None
    """Post-hoc EMA (EDM2): track power-function profiles of these relative widths instead of
    decays, e.g. ``[0.05, 0.10]``; implies ``schedule="power_function"``. Each profile is named
    by its sigma_rel wherever a factor names an average (``swapped(0.05)``, ``shadow``,
    ``ema=0.05`` checkpoint folders and metric prefixes). See docs/posthoc.md."""
    model_paths: tuple[str | None, ...] = (None,)
    """Dotted submodule paths averaged separately (``None``: the whole model). Keys are FQNs
    relative to each path, wrapper prefixes (``module.``, ``_orig_mod.``) removed."""
    shadow_dtype: ShadowDtypeName = "float32"
    """Dtype of the shadows: ``float32`` (default), ``float64``, ``bfloat16``, ``float16`` or ``live``
    (each tensor's own dtype). A torch dtype is accepted too."""
    buffers: BufferPolicy = "copy"
    """``copy`` (buffers follow the live model), ``average`` (float buffers are averaged like
    parameters, integer ones copied) or ``ignore``."""
    schedule: DecaySchedule = DecaySchedule()
    """The decay schedule: a :class:`DecaySchedule`, a mapping, or just its kind (``"warmup"``)."""
    include_frozen: StrictBool = True
    """Also average parameters with ``requires_grad=False``."""
    include: tuple[str, ...] | None = None
    """Track only tensors whose FQN (relative to its model path) matches one of these
    ``fnmatch`` patterns (``"blocks.*.attn.*"``); ``None``: every tensor. A pattern that
    matches nothing is an error naming it."""
    exclude: tuple[str, ...] = ()
    """Leave out tensors whose FQN matches one of these patterns (``"*.rotary.*"``,
    ema-pytorch's ``ignore_names``); applied after ``include``. A pattern that matches
    nothing is an error."""
    upcast_buffer_bytes: PositiveInt = DEFAULT_UPCAST_BUFFER_BYTES
    """Bound of the per-device buffer that upcasts bf16/fp16 live shards for fp32 shadows in
    ``update()`` (allocated once; 0 bytes when live and shadow dtypes match)."""
    exchange_buffer_bytes: PositiveInt = DEFAULT_EXCHANGE_BUFFER_BYTES
    """Default bound of the per-device buffer through which ``swapped()`` exchanges live and EMA
    values in place (allocated for the duration of a swap)."""
    chunk_numel: PositiveInt = DEFAULT_CHUNK_NUMEL
    """Chunk size (elements) that orders multi-factor updates for cache reuse."""

    @model_validator(mode="before")
    @classmethod
    def _gather_schedule_options(cls, data: Any) -> Any:
        return _gather_schedule_options(data)

    @field_validator("target_factors", mode="before")
    @classmethod
    def _check_factors(cls, value: Any) -> tuple[float, ...]:
        return check_factors(value)

    @model_validator(mode="after")
    def _profiles_match_schedule(self) -> EMAConfig:
        _profiles_match_schedule(self)
        return self

    @field_validator("model_paths", mode="before")
    @classmethod
    def _check_model_paths(cls, value: Any) -> tuple[str | None, ...]:
        return check_model_paths(value)

    @field_validator("include", "exclude", mode="before")
    @classmethod
    def _patterns(cls, value: Any) -> Any:
        return _patterns(value)

    @field_validator("shadow_dtype", mode="before")
    @classmethod
    def _dtype_to_name(cls, value: Any) -> Any:
        return _shadow_dtype_name(value)

    @field_validator("schedule", mode="before")
    @classmethod
    def _kind_to_schedule(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value

    @property
    def torch_shadow_dtype(self) -> torch.dtype | None:
        """:attr:`shadow_dtype` as a torch dtype (``None`` for ``live``)."""
        return SHADOW_DTYPES[self.shadow_dtype]

    def ema_options(self) -> dict[str, Any]:
        """The fields of :class:`EMAConfig` only (for subclasses that add their own)."""
        return {name: getattr(self, name) for name in EMAConfig.model_fields}

    def to_ema_config(self) -> EMAConfig:
        """This config as a plain :class:`EMAConfig` (drops a subclass's extra fields)."""
        if type(self) is EMAConfig:
            return self
        return EMAConfig(**self.ema_options())


def _gather_schedule_options(data: Any) -> Any:
    """Refuse renamed options; merge flat schedule keys (``kind``, ``warmup``...) into ``schedule``."""
    if not isinstance(data, dict):
        return data
    renamed = [k for k in data if k in RENAMED_OPTIONS]
    if renamed:
        raise ValueError("; ".join(f"option {k!r} was renamed to {RENAMED_OPTIONS[k]!r}" for k in renamed))
    data = _profiles_as_factors(data)
    flat = {k: data[k] for k in SCHEDULE_FIELDS if k in data}
    if not flat:
        return data
    data = {k: v for k, v in data.items() if k not in flat}
    schedule = data.get("schedule", "constant")
    if isinstance(schedule, str):
        schedule = {"kind": schedule}
    elif isinstance(schedule, DecaySchedule):
        schedule = schedule.model_dump(exclude_unset=True)
    if not isinstance(schedule, dict):
        return {**data, **flat}  # let field validation report the bad schedule
    both = sorted(set(flat) & set(schedule))
    if both:
        raise ValueError(f"{', '.join(both)} given both flat and inside schedule; give each option once")
    data["schedule"] = {**schedule, **flat}
    return data


def _profiles_match_schedule(config: EMAConfig) -> None:
    """``power_function`` factors are sigma_rel profiles; ``sigma_rels`` repeats them.

    ``sigma_rels`` given explicitly were made the factors by ``_profiles_as_factors`` (a
    before-validator), so only factors given under ``schedule="power_function"`` remain.
    """
    if config.schedule.kind == "power_function":
        for value in config.target_factors:
            check_sigma_rel(value)
        if config.sigma_rels is None:  # ShardedEMA(model, [0.05, 0.1], schedule="power_function")
            object.__setattr__(config, "sigma_rels", config.target_factors)


def _patterns(value: Any) -> Any:
    if value is None:
        return value
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(p, str) and p.strip() for p in value):
        raise ValueError(f"{value!r} must be a list of non-empty fnmatch patterns such as ['*.bias']")
    return tuple(value)


def _shadow_dtype_name(value: Any) -> Any:
    if value is None:
        return "live"
    if isinstance(value, torch.dtype):
        for name, dtype in SHADOW_DTYPES.items():
            if dtype == value:
                return name
        raise ValueError(f"shadow_dtype={value!r} is not a floating dtype shardema keeps shadows in; "
                         f"use one of {[n for n in SHADOW_DTYPES if n != 'live']} or 'live'")
    return value
