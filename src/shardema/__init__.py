"""shardema: exponential moving averages of model weights for sharded PyTorch training."""

import warnings

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
