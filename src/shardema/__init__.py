"""shardema: exponential moving averages of model weights for sharded PyTorch training."""

from ._ema import EMAState, ShardedEMA
from ._launch import exit_with_launcher
from ._shards import reshard_fsdp
from ._swap import SwapAbortedError, SwapInfo, SwapWriteError
from .checkpoint import load_consolidated
from .config import DEFAULT_EXCHANGE_BUFFER_BYTES, DEFAULT_UPCAST_BUFFER_BYTES, DecaySchedule, EMAConfig

__all__ = [
    "DEFAULT_EXCHANGE_BUFFER_BYTES",
    "DEFAULT_UPCAST_BUFFER_BYTES",
    "DecaySchedule",
    "EMAConfig",
    "EMAState",
    "ShardedEMA",
    "SwapAbortedError",
    "SwapInfo",
    "SwapWriteError",
    "exit_with_launcher",
    "load_consolidated",
    "reshard_fsdp",
]
__version__ = "0.2.0"
