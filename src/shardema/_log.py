"""The library's logger: ``logging.getLogger("shardema")`` with a rank prefix."""

from __future__ import annotations

import logging

import torch.distributed as dist

_LOGGER = logging.getLogger("shardema")


class _RankAdapter(logging.LoggerAdapter):
    """Prefixes every message with ``[rank R]`` once a process group exists."""

    def process(self, msg, kwargs):
        if dist.is_available() and dist.is_initialized():
            return f"[rank {dist.get_rank()}] {msg}", kwargs
        return msg, kwargs


logger = _RankAdapter(_LOGGER, {})
