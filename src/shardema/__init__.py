"""shardema: exponential moving averages of model weights for sharded PyTorch training."""

from ._ema import EMAState, ShardedEMA, reshard_fsdp
from ._schedule import DecaySchedule
from ._swap import DEFAULT_SCRATCH_BYTES as DEFAULT_SWAP_SCRATCH_BYTES
from ._swap import SwapAbortedError, SwapInfo
from .checkpoint import load_consolidated

__all__ = [
           "DEFAULT_SWAP_SCRATCH_BYTES",
           "DecaySchedule",
           "EMAState",
           "ShardedEMA",
           "SwapAbortedError",
           "SwapInfo",
           "load_consolidated",
           "reshard_fsdp",
]
__version__ = "0.1.0"
