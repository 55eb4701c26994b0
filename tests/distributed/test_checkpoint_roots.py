"""A checkpoint root that is not one shared file system (node-local directories) is refused before committing."""

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_ranks
from torch import nn

pytestmark = pytest.mark.distributed


def save_to_rank_local_roots(base):
    from torch.distributed.fsdp import fully_shard

    from shardema import ShardedEMA

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    fully_shard(model)
    ema = ShardedEMA(model, [0.9])
    root = f"{base}/rank{dist.get_rank()}"  # what a job with node-local directories does
    try:
        ema.save(root, "latest")
    except RuntimeError as exc:
        return str(exc)
    return None


def test_ranks_with_different_roots_fail_on_every_rank_and_commit_nothing(tmp_path):
    errors = run_ranks(save_to_rank_local_roots, 2, str(tmp_path), timeout=120)
    for error in errors:
        assert error is not None and "must be one shared file system" in error, error
    assert "rank 1" in errors[0]
    for rank in (0, 1):
        assert not (tmp_path / f"rank{rank}" / "model" / "cp=latest").exists()
