"""shardema: exponential moving averages of model weights for sharded PyTorch training."""

from ._ema import EMAState, ShardedEMA, reshard_fsdp
from ._schedule import DecaySchedule
from ._swap import DEFAULT_SCRATCH_BYTES as DEFAULT_SWAP_SCRATCH_BYTES
from ._swap import SwapAbortedError, SwapInfo
from .checkpoint import load_consolidated

__all__ = ["ShardedEMA", "DecaySchedule", "EMAState", "reshard_fsdp", "SwapInfo", "SwapAbortedError",
           "DEFAULT_SWAP_SCRATCH_BYTES", "load_consolidated"]
__version__ = "0.1.0"
