"""shardema: exponential moving averages of model weights for sharded PyTorch training."""

import sys
import warnings
from typing import TYPE_CHECKING

with warnings.catch_warnings():
    # Without numpy, `import torch` warns "Failed to initialize NumPy"; shardema never needs
    # numpy (see [Note: no numpy at runtime] in _bytes). The filter ends with this block.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    import torch  # noqa: F401

from ._ema import EMAState, ShardedEMA
from ._launch import exit_with_launcher
from ._shards import reshard_fsdp
from ._swap import SwapAbortedError, SwapInfo, SwapWriteError
from .checkpoint import load_consolidated
from .checkpoint._async import SaveHandle
from .config import DEFAULT_EXCHANGE_BUFFER_BYTES, DEFAULT_UPCAST_BUFFER_BYTES, DecaySchedule, EMAConfig

__all__ = [
    "DEFAULT_EXCHANGE_BUFFER_BYTES",
    "DEFAULT_UPCAST_BUFFER_BYTES",
    "DecaySchedule",
    "EMAConfig",
    "EMAState",
    "SaveHandle",
    "ShardedEMA",
    "SwapAbortedError",
    "SwapInfo",
    "SwapWriteError",
    "exit_with_launcher",
    "load_consolidated",
    "reshard_fsdp",
]
__version__ = "0.2.0"

if not TYPE_CHECKING:  # run time only: for mypy a misspelt name stays an error

    def __getattr__(name: str):
        """Called for missing names only: ``LiveTensor`` (renamed in 0.2) raises naming ``TrackedTensor``."""
        if name == "LiveTensor":
            # An ImportError: `from shardema import LiveTensor` would drop an AttributeError's message.
            raise ImportError("shardema.LiveTensor was renamed to TrackedTensor in shardema 0.2: the type of the "
                              "items of ema.tracked(), shardema._shards.TrackedTensor", name=__name__)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}", name=name, obj=sys.modules[__name__])
