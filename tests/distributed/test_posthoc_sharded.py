"""Post-hoc EMA on FSDP2 ranks: snapshots written on 2 ranks (uneven shards) reconstruct bit-exactly like
snapshots written by 1 process, match a float64 replay, and the sharded output resumes on 3 ranks."""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_ranks
from torch import nn

import shardema
from shardema import posthoc
from shardema.checkpoint import load_ema

pytestmark = pytest.mark.distributed

PAIR = (0.05, 0.10)
STEPS, EVERY = 32, 4


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))  # 7 and 3 rows: uneven on 2 and 3 ranks


def _live(step: int) -> dict[str, torch.Tensor]:
    """The full live weights after update ``step``: a fixed pseudo-random walk."""
    out = {}
    for i, (name, p) in enumerate(_model().named_parameters()):
        g = torch.Generator().manual_seed(1000 * step + i)
        out[name] = p.detach() * 0 + torch.randn(p.shape, generator=g) * 0.1 + step * 0.01
    return out


def _sharded_model():
    from torch.distributed.fsdp import fully_shard

    model = _model()
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    return model


@torch.no_grad()
def _train_and_snapshot(root: str) -> None:
    from torch.distributed.tensor import distribute_tensor

    model = _sharded_model()
    ema = shardema.ShardedEMA(model, sigma_rels=PAIR)
    for step in range(1, STEPS + 1):
        for name, p in model.named_parameters():
            p.copy_(distribute_tensor(_live(step)[name], p.device_mesh, p.placements))
        ema.update()
        if step % EVERY == 0:
            posthoc.save_snapshot(ema, root)


def _resume_reconstruction(root: str) -> dict[str, torch.Tensor]:
    model = _sharded_model()
    ema = shardema.ShardedEMA(model, sigma_rels=[0.07])
    assert ema.resume(root, strict=True) == "latest" and ema.step == STEPS
    with ema.swapped(0.07):
        return {name: p.full_tensor().clone() for name, p in model.named_parameters()}


def _replay(sigma_rel: float) -> dict[int, dict[str, torch.Tensor]]:
    """float64 power-function EMA of the live walk, at every snapshot step."""
    gamma = posthoc.gamma_of_sigma_rel(sigma_rel)
    shadow = {k: v.double() for k, v in dict(_model().named_parameters()).items()}
    at = {}
    for t in range(1, STEPS + 1):
        beta = (1 - 1 / t) ** (gamma + 1)
        shadow = {k: beta * shadow[k] + (1 - beta) * v.double() for k, v in _live(t).items()}
        if t % EVERY == 0:
            at[t] = shadow
    return at


@pytest.mark.timeout(240)
def test_sharded_snapshots_reconstruct_like_one_process_and_resume_on_three_ranks(tmp_path):
    sharded, single, out = tmp_path / "two_ranks", tmp_path / "one_process", tmp_path / "out"
    run_ranks(_train_and_snapshot, 2, str(sharded), timeout=180)
    snaps = posthoc.list_snapshots(sharded)
    assert [s.step for s in snaps] == list(range(EVERY, STEPS + 1, EVERY))
    assert {p.name for p in (sharded / "model" / snaps[-1].directory.name / "ema=0.05").iterdir()} == {
        "rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors"}

    # The same snapshots, written by one process (loaded from the 2-rank ones, saved again).
    reader = shardema.ShardedEMA(_model(), sigma_rels=PAIR)
    for snap in snaps:
        load_ema(reader, sharded, snap.tag)
        posthoc.save_snapshot(reader, single)
    from_two, from_one = posthoc.reconstruct(sharded, 0.07), posthoc.reconstruct(single, 0.07)
    assert from_two.keys() == from_one.keys()
    for key in from_one:
        assert torch.equal(from_two[key], from_one[key]), key

    # Against a float64 replay of the same trajectory, combined with the plan's coefficients.
    plan = posthoc.plan_reconstruction(sharded, 0.07)
    replays = {(s, t): state for s in PAIR for t, state in _replay(s).items()}
    for key, value in from_two.items():
        expected = sum(term.coefficient * replays[(term.sigma_rel, term.snapshot.step)][key] for term in plan.terms)
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=2e-6)

    posthoc.reconstruct_to_checkpoint(sharded, 0.07, out)
    full = run_ranks(_resume_reconstruction, 3, str(out), timeout=180)[0]
    for key, value in full.items():
        assert torch.equal(value, from_two[key]), key
