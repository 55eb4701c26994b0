"""Replicas outside a DTensor's mesh (data parallel around tensor parallel) are written once."""

import json

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_ranks
from torch import nn

pytestmark = pytest.mark.distributed


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))


def save_tp_replicated_over_dp(root):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from shardema import ShardedEMA

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = parallelize_module(_model(), mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    ema = ShardedEMA(model, [0.9])
    # Every dp replica thinks it owns its tensor-parallel pieces (its mesh has no Replicate dim).
    assert all(t.writes_checkpoint or t.local_numel == 0 for t in ema.tracked() if t.fqn != "2.bias")
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().add_(1.0 + dist.get_rank() % 2)  # same values within each dp replica group
    ema.update()
    ema.save(root, "latest")
    return {t.fqn: ema.shadow(0.9, t.key).clone() for t in ema.tracked()}


def test_dp_replicas_of_tensor_parallel_pieces_write_one_file_set(tmp_path):
    from shardema import load_consolidated

    run_ranks(save_tp_replicated_over_dp, 4, str(tmp_path))
    manifest = json.loads((tmp_path / "model" / "cp=latest" / "manifest.json").read_text())
    writers = sorted({f["rank"] for f in manifest["files"]})
    assert writers == [0, 1]  # the dp replica on ranks 2 and 3 wrote nothing
    full = load_consolidated(tmp_path, 0.9)
    reference = _model()
    with torch.no_grad():
        # column-parallel rows / row-parallel columns of tp rank r moved by 0.1 * (1 + r)
        expected = {k: v.clone() for k, v in reference.state_dict().items()}
        expected["0.weight"][:3] += 0.1
        expected["0.weight"][3:] += 0.2
        expected["0.bias"][:3] += 0.1
        expected["0.bias"][3:] += 0.2
        expected["2.weight"][:, :3] += 0.1
        expected["2.weight"][:, 3:] += 0.2
        expected["2.bias"] += 0.1  # replicated: rank 0's value is the one written
    for key, value in expected.items():
        torch.testing.assert_close(full[key], value, rtol=0, atol=1e-6, msg=key)
