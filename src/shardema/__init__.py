"""shardema: exponential moving averages of model weights for sharded PyTorch training."""

import warnings

with warnings.catch_warnings():
    # Without numpy, `import torch` warns "Failed to initialize NumPy"; shardema never needs
    # numpy (see [Note: no numpy at runtime] in _bytes). The filter ends with this block.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    import torch  # noqa: F401

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
