"""shardema: exponential moving averages of model weights for sharded PyTorch training."""

from ._ema import EMAState, ShardedEMA, reshard_fsdp
from ._schedule import DecaySchedule

__all__ = ["ShardedEMA", "DecaySchedule", "EMAState", "reshard_fsdp"]
__version__ = "0.1.0"
