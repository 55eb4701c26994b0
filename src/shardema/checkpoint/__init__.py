"""EMA checkpoints: per-rank safetensors files, atomic commit, resume at any world size, consolidation.

The on-disk format is specified in docs/checkpoint-format.md.
"""

from ._consolidate import ConsolidatedReader, consolidate_to_file, load_consolidated
from ._format import FORMAT_VERSION, validate_tag
from ._inspect import CheckpointInfo, list_checkpoints
from ._lock import CheckpointLockedError, WriterLock
from ._manifest import ManifestError
from ._reader import CheckpointMismatchError, load_ema, resume_ema
from ._writer import cleanup_leftovers, delete_checkpoint, save_ema

__all__ = [
    "FORMAT_VERSION",
    "CheckpointInfo",
    "CheckpointLockedError",
    "CheckpointMismatchError",
    "ConsolidatedReader",
    "ManifestError",
    "WriterLock",
    "cleanup_leftovers",
    "consolidate_to_file",
    "delete_checkpoint",
    "list_checkpoints",
    "load_consolidated",
    "load_ema",
    "resume_ema",
    "save_ema",
    "validate_tag",
]
