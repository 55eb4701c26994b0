"""Callbacks for training loops: EMA keeping, checkpointing and EMA-weight evaluation.

A training loop drives them through :class:`CallbackRunner`; configs are pydantic
models validated from YAML by :func:`load_callback_configs`. See docs/callbacks.md.
"""

from ._base import (
    NO_VALUES,
    CallbackBase,
    CallbackContext,
    Hook,
    IntervalType,
    PeriodicCallback,
    build_callback,
    register_callback,
)
from ._config import CallbackConfig, EmaCallbackConfig, OfflineLossCallbackConfig, PeriodicCallbackConfig
from ._counter import UpdateCounter
from ._ema_callback import EmaCallback, factor_prefix
from ._loader import load_callback_configs
from ._metrics import (
    JsonlWriter,
    LoggingWriter,
    MemoryWriter,
    MetricWriter,
    MultiWriter,
    PrefixedWriter,
    TensorBoardWriter,
    default_writer,
)
from ._offline_loss import OfflineLossCallback, batch_size_of, mean_over_ranks
from ._registry import allow_callback_imports, registered_callbacks, resolve_kind
from ._runner import CallbackRunner, RunnerState

__all__ = [
    "NO_VALUES",
    "CallbackBase",
    "CallbackConfig",
    "CallbackContext",
    "CallbackRunner",
    "EmaCallback",
    "EmaCallbackConfig",
    "Hook",
    "IntervalType",
    "JsonlWriter",
    "LoggingWriter",
    "MemoryWriter",
    "MetricWriter",
    "MultiWriter",
    "OfflineLossCallback",
    "OfflineLossCallbackConfig",
    "PeriodicCallback",
    "PeriodicCallbackConfig",
    "PrefixedWriter",
    "RunnerState",
    "TensorBoardWriter",
    "UpdateCounter",
    "allow_callback_imports",
    "batch_size_of",
    "build_callback",
    "default_writer",
    "factor_prefix",
    "load_callback_configs",
    "mean_over_ranks",
    "register_callback",
    "registered_callbacks",
    "resolve_kind",
]
