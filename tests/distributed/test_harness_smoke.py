import pytest
import torch
import torch.distributed as dist
from dist_harness import run_ranks

pytestmark = pytest.mark.distributed


def _sum_of_ranks():
    t = torch.tensor([dist.get_rank() + 1.0])
    dist.all_reduce(t)
    return t.item()


def _rank_one_raises():
    if dist.get_rank() == 1:
        raise ValueError("boom on rank 1")
    return "fine"


def test_all_reduce_on_real_gloo_ranks():
    assert run_ranks(_sum_of_ranks, 3) == [6.0, 6.0, 6.0]


def test_a_failing_rank_fails_the_test_with_its_traceback():
    with pytest.raises(AssertionError, match="boom on rank 1"):
        run_ranks(_rank_one_raises, 2)
