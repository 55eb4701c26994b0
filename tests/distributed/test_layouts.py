"""Every parallel layout large jobs run: FSDP2 x TP (2-D), HSDP x TP (3-D), pipeline stages, expert parallel.

Each layout trains a few steps with deterministic perturbations applied through torch's own
placement logic (``distribute_tensor``), then checks, against a float64 replica of the full
tensors:
- the EMA (read back through ``ema.swapped`` and torch's ``full_tensor()`` all-gather);
- the swap (each rank's forward equal to an unsharded reference model, or reference stage,
  holding the float64 reference EMA);
- the memory (exactly local numel x K x 4 bytes per rank);
- the checkpoint: the shadows held at the save equal the consolidated tensors bit for bit;
  ``shardema consolidate`` writes a file equal to ``load_consolidated`` that loads with
  ``strict=True``; resumes under other layouts and world sizes are bit-exact.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_ranks
from torch import nn

pytestmark = pytest.mark.distributed

FACTORS = (0.9, 0.99)
STEPS = 3


class Block(nn.Module):
    def __init__(self, width: int = 8, hidden: int = 12):
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    """Layers in a ModuleDict, so a pipeline stage can drop the others and keep the full FQNs."""

    def __init__(self, layers: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleDict({str(i): Block() for i in range(layers)})
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        for layer in self.layers.values():
            x = x + layer(x)
        # A pipeline stage without the head (see _stage) hands its hidden state to the next stage.
        return self.head(x) if "head" in self._modules else x


class MoE(nn.Module):
    """A dense projection and a bank of experts (the experts live on their own mesh)."""

    def __init__(self, experts: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.dense = nn.Linear(6, 6)
        self.experts = nn.Parameter(torch.randn(experts, 6, 6) * 0.1)

    def forward(self, x):
        # No router: every token goes through every expert and the outputs are averaged.
        from torch.distributed.tensor import DTensor, Shard

        h = torch.relu(self.dense(x))
        experts = self.experts
        if not isinstance(experts, DTensor):
            return torch.einsum("bi,eoi->beo", h, experts).mean(dim=1)
        # Expert parallel: each rank runs its own experts, then the outputs are gathered along
        # the expert dim of the ep mesh (the exchange that all-to-all routing does).
        local = torch.einsum("bi,eoi->beo", h, experts.to_local())
        return DTensor.from_local(local, experts.device_mesh, [Shard(1)]).full_tensor().mean(dim=1)


def _delta(name: str, shape, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) * 100 + step)
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64)


def _reference(full_model: nn.Module, names, steps: int = STEPS) -> dict:
    """Float64 EMA per factor of the full tensors after ``steps`` perturbations."""
    return reference_from({n: p.detach() for n, p in full_model.named_parameters() if n in names}, steps)


def reference_from(initial: dict, steps: int = STEPS) -> dict:
    """Float64 EMA per factor of the full tensors ``initial`` (name -> tensor) after ``steps`` perturbations."""
    live = {n: v.double().clone() for n, v in initial.items()}
    ema = {f: {n: v.clone() for n, v in live.items()} for f in FACTORS}
    for step in range(steps):
        for n in live:
            live[n] += _delta(n, live[n].shape, step)
            for f in FACTORS:
                ema[f][n] = f * ema[f][n] + (1 - f) * live[n]
    return ema


@torch.no_grad()
def _perturb(model: nn.Module, step: int, prefix: str = "") -> None:
    """Add each parameter's delta; DTensors take their local part through torch's placement logic."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, p in model.named_parameters():
        delta = _delta(prefix + name, p.shape, step).to(p.dtype)
        if isinstance(p, DTensor):
            p.to_local().add_(distribute_tensor(delta, p.device_mesh, p.placements).to_local())
        else:
            p.add_(delta)


def _train(parts, ema, prefix: str = "") -> None:
    for step in range(STEPS):
        for part in parts:
            _perturb(part, step, prefix)
        ema.update()


def _local_numel(parts) -> int:
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for part in parts for p in part.parameters())


def _check_ema_through_swap(parts, ema, reference) -> int:
    """Inside the swap, every parameter's full tensor (torch's all-gather) is the float64 reference."""
    from torch.distributed.tensor import DTensor

    checked = 0
    for f in FACTORS:
        with ema.swapped(f):
            for part in parts:
                for name, p in part.named_parameters():
                    full = p.full_tensor() if isinstance(p, DTensor) else p
                    torch.testing.assert_close(full.double(), reference[f][name], rtol=0, atol=1e-5,
                                               msg=f"{name} factor {f}")
                    checked += 1
    return checked


def _check_forward(ema, pairs, reference, x, factor: float = 0.99) -> int:
    """The swap exposes the EMA to the sharded forward: each (part, reference part) pair gives the same
    output on ``x``, the reference part unsharded and holding the float64 reference EMA."""
    for _, reference_part in pairs:
        reference_part.load_state_dict({n: reference[factor][n].float() for n, _ in reference_part.named_parameters()})
    with torch.no_grad(), ema.swapped(factor):
        for part, reference_part in pairs:
            torch.testing.assert_close(part(x), reference_part(x), rtol=1e-5, atol=1e-5)
    return len(pairs)


def _input(width: int = 8) -> torch.Tensor:
    return torch.randn(5, width, generator=torch.Generator().manual_seed(1))


def _shadows(ema) -> dict:
    return {f"{f}|{t.fqn}|{t.global_offset}": ema.shadow(f, t.key).clone() for f in FACTORS for t in ema.tracked()}


def _saved(ema, root) -> dict:
    """Save; return what the EMA held (step, shadows) for the bit-exact comparison with the files."""
    ema.save(root, "latest")
    return {"step": ema.step, "shadows": _shadows(ema)}


# ---------------------------------------------------------------------------------- the layouts
def fsdp_tp_2d(root):
    """Mesh (dp=2, tp=2): TP plan on each block, FSDP2 over dp on blocks and root (torchtitan's 2-D layout)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from shardema import ShardedEMA

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = Net()
    reference_model = Net()
    for block in model.layers.values():
        parallelize_module(block, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    placements = sorted({str(tuple(p.placements)) for p in model.parameters()})
    ema = ShardedEMA(model, FACTORS)
    assert ema.shadow_bytes == _local_numel([model]) * len(FACTORS) * 4
    _train([model], ema)
    reference = _reference(reference_model, dict(reference_model.named_parameters()))
    checked = _check_ema_through_swap([model], ema, reference)
    forwards = _check_forward(ema, [(model, reference_model)], reference, _input())
    return {"placements": placements, "checked": checked, "forwards": forwards, **_saved(ema, root)}


def hsdp_tp_3d(root):
    """Mesh (replicate=2, shard=2, tp=2) on 8 ranks: TP inside, HSDP (fully_shard on the 2-D dp mesh)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from shardema import ShardedEMA

    mesh = init_device_mesh("cpu", (2, 2, 2), mesh_dim_names=("replicate", "shard", "tp"))
    model = Net(layers=2)
    reference_model = Net(layers=2)
    for block in model.layers.values():
        parallelize_module(block, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
        fully_shard(block, mesh=mesh["replicate", "shard"])
    fully_shard(model, mesh=mesh["replicate", "shard"])
    ema = ShardedEMA(model, FACTORS)
    assert ema.shadow_bytes == _local_numel([model]) * len(FACTORS) * 4
    _train([model], ema)
    reference = _reference(reference_model, dict(reference_model.named_parameters()))
    checked = _check_ema_through_swap([model], ema, reference)
    forwards = _check_forward(ema, [(model, reference_model)], reference, _input())
    return {"checked": checked, "forwards": forwards, "writes": sum(t.writes_checkpoint for t in ema.tracked()),
            "mesh_dims": sorted({len(p.placements) for p in model.parameters()}), **_saved(ema, root)}


def _stage(model: Net, keep: list[int], with_head: bool) -> Net:
    for i in list(model.layers):
        if int(i) not in keep:
            del model.layers[i]
    if not with_head:
        del model.head
    return model


def pipeline_dp(root, split):
    """Mesh (pp=2, dp=2): each stage keeps its layers (full FQNs), FSDP2 over dp; ``split`` = stage 0's layers."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from shardema import ShardedEMA

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    stage = mesh["pp"].get_local_rank()
    keep = split if stage == 0 else [i for i in range(4) if i not in split]
    model = _stage(Net(), keep, with_head=stage == 1)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    ema = ShardedEMA(model, FACTORS)
    assert ema.shadow_bytes == _local_numel([model]) * len(FACTORS) * 4
    _train([model], ema)
    full = Net()
    reference = _reference(full, dict(full.named_parameters()))
    checked = _check_ema_through_swap([model], ema, reference)
    # This stage's forward against the same layers of an unsharded Net.
    forwards = _check_forward(ema, [(model, _stage(Net(), keep, with_head=stage == 1))], reference, _input())
    return {"checked": checked, "forwards": forwards, "fqns": sorted(t.fqn for t in ema.tracked()),
            **_saved(ema, root)}


def pipeline_two_parts(root):
    """2 ranks, 4 layers, interleaved: rank r holds the parts [layer r] and [layer r + 2] (+ head on rank 1)."""
    from shardema import ShardedEMA

    rank = dist.get_rank()
    first = _stage(Net(), [rank], with_head=False)
    second = _stage(Net(), [rank + 2], with_head=rank == 1)
    ema = ShardedEMA([first, second], FACTORS)
    assert ema.shadow_bytes == _local_numel([first, second]) * len(FACTORS) * 4
    _train([first, second], ema)
    full = Net()
    reference = _reference(full, dict(full.named_parameters()))
    checked = _check_ema_through_swap([first, second], ema, reference)
    pairs = [(first, _stage(Net(), [rank], with_head=False)), (second, _stage(Net(), [rank + 2], with_head=rank == 1))]
    forwards = _check_forward(ema, pairs, reference, _input())
    return {"checked": checked, "forwards": forwards, "fqns": sorted(t.fqn for t in ema.tracked()),
            **_saved(ema, root)}


def expert_parallel(root):
    """4 ranks: the dense layer FSDP2-sharded over a dp mesh, the experts Shard(0) on their own ep mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    from shardema import ShardedEMA

    dp = init_device_mesh("cpu", (4,), mesh_dim_names=("dp",))
    ep = init_device_mesh("cpu", (4,), mesh_dim_names=("ep",))
    model = MoE()
    model.experts = nn.Parameter(distribute_tensor(model.experts.detach(), ep, [Shard(0)]))
    fully_shard(model.dense, mesh=dp)
    ema = ShardedEMA(model, FACTORS)
    assert ema.shadow_bytes == _local_numel([model]) * len(FACTORS) * 4
    meshes = {id(t.mesh) for t in ema.tracked()}
    _train([model], ema)
    full = MoE()
    reference = _reference(full, dict(full.named_parameters()))
    checked = _check_ema_through_swap([model], ema, reference)
    forwards = _check_forward(ema, [(model, full)], reference, _input(6))
    return {"checked": checked, "forwards": forwards, "meshes": len(meshes), **_saved(ema, root)}


def resume_fsdp(root, expect_root):
    """1-D FSDP2 over every rank: resume the checkpoint; return the shadows."""
    from torch.distributed.fsdp import fully_shard

    from shardema import ShardedEMA

    model = Net() if expect_root == "net" else MoE()
    if expect_root == "net":
        for block in model.layers.values():
            fully_shard(block)
    fully_shard(model)
    ema = ShardedEMA(model, FACTORS)
    assert ema.resume(root, strict=True) == "latest"
    return {"step": ema.step, "shadows": _shadows(ema)}


def resume_stages(root, split):
    """(pp=2, dp=2) with another stage split: resume; return the shadows."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from shardema import ShardedEMA

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    stage = mesh["pp"].get_local_rank()
    keep = split if stage == 0 else [i for i in range(4) if i not in split]
    model = _stage(Net(), keep, with_head=stage == 1)
    fully_shard(model, mesh=mesh["dp"])
    ema = ShardedEMA(model, FACTORS)
    assert ema.resume(root, strict=True) == "latest"
    return {"step": ema.step, "shadows": _shadows(ema)}


# ---------------------------------------------------------------------------------- helpers (pytest side)
def _consolidated(root, model_class):
    """``load_consolidated`` per factor; ``shardema consolidate`` writes the same tensors, bit for bit,
    to a file that loads into the unsharded model with ``strict=True``."""
    import tempfile
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import load_file

    from shardema import load_consolidated
    from shardema.cli import main as cli_main

    out = {}
    with tempfile.TemporaryDirectory() as out_dir:
        for f in FACTORS:
            weights = load_consolidated(root, factor=f)
            path = Path(out_dir) / f"ema-{f}.safetensors"
            assert cli_main(["consolidate", str(root), "--factor", str(f), "--out", str(path), "--no-progress"]) == 0
            from_file = load_file(path)
            assert sorted(from_file) == sorted(weights)
            for name, value in weights.items():
                assert from_file[name].dtype == value.dtype and torch.equal(from_file[name], value), (f, name)
            with safe_open(path, "pt") as file:
                assert file.metadata()["step"] == str(STEPS)
            model_class().load_state_dict(from_file, strict=True)  # every tensor, every name: loads strictly
            out[f] = weights
    return out


def _assert_matches_consolidated(results, consolidated) -> int:
    """Every shadow (held at the save, or resumed) equals the consolidated tensor's slice at its offset, bit for bit."""
    checked = 0
    for result in results:
        assert result["step"] == STEPS
        for key, shadow in result["shadows"].items():
            f, fqn, offset = key.split("|")
            full = consolidated[float(f)][fqn]
            index = tuple(slice(o, o + s) for o, s in zip(eval(offset), shadow.shape))
            assert torch.equal(shadow, full[index]), key
            checked += 1
    return checked


def _inspect(root):
    """The committed cp=latest as ``shardema inspect`` sees it (and the command prints its layout)."""
    import subprocess
    import sys

    from shardema.checkpoint import list_checkpoints

    out = subprocess.run([sys.executable, "-m", "shardema.cli", "inspect", str(root)], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert "model/cp=latest: meshes" in out and "pieces per rank" in out, out
    return next(i for i in list_checkpoints(root) if i.tag == "latest" and i.state == "committed")


def _resume_plain(root, model_class):
    from shardema import ShardedEMA

    ema = ShardedEMA(model_class(), FACTORS)
    assert ema.resume(root, strict=True) == "latest" and ema.step == STEPS
    return {"step": ema.step, "shadows": _shadows(ema)}


def _assert_reference(consolidated, model_class):
    full = model_class()
    reference = _reference(full, dict(full.named_parameters()))
    for f in FACTORS:
        for name, value in reference[f].items():
            torch.testing.assert_close(consolidated[f][name].double(), value, rtol=0, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------- tests
@pytest.mark.timeout(420)
def test_fsdp2_over_tensor_parallel_2d_and_resume_under_other_layouts(tmp_path):
    results = run_ranks(fsdp_tp_2d, 4, str(tmp_path), timeout=300)
    placements = results[0]["placements"]
    assert any("_StridedShard" in p for p in placements), placements  # the placement 0.1 refused
    assert all(r["checked"] == 2 * 18 and r["forwards"] == 1 for r in results)
    info = _inspect(tmp_path)
    assert any("_StridedShard" in p for p in info.placements) and sorted(info.pieces_per_rank) == [0, 1, 2, 3]
    consolidated = _consolidated(tmp_path, Net)
    _assert_reference(consolidated, Net)
    assert _assert_matches_consolidated(results, consolidated)  # the shadows held at the save
    assert _assert_matches_consolidated(run_ranks(resume_fsdp, 4, str(tmp_path), "net", timeout=300), consolidated)
    assert _assert_matches_consolidated(run_ranks(resume_fsdp, 2, str(tmp_path), "net", timeout=300), consolidated)
    assert _assert_matches_consolidated([_resume_plain(tmp_path, Net)], consolidated)


@pytest.mark.timeout(420)
def test_hsdp_over_tensor_parallel_3d_on_8_ranks(tmp_path):
    results = run_ranks(hsdp_tp_3d, 8, str(tmp_path), timeout=360)
    assert all(r["checked"] == 2 * 10 and r["forwards"] == 1 for r in results)
    assert 3 in results[0]["mesh_dims"]  # (replicate, shard, tp) for the tensor-parallel weights
    # The replicate axis writes nothing twice: ranks 4-7 hold replicas of ranks 0-3.
    assert sum(r["writes"] for r in results[4:]) == 0 and sum(r["writes"] for r in results[:4]) > 0
    consolidated = _consolidated(tmp_path, lambda: Net(layers=2))
    _assert_reference(consolidated, lambda: Net(layers=2))
    assert _assert_matches_consolidated(results, consolidated)  # replicas included
    assert _assert_matches_consolidated([_resume_plain(tmp_path, lambda: Net(layers=2))], consolidated)


@pytest.mark.timeout(420)
def test_pipeline_stages_save_the_union_and_resume_under_any_split(tmp_path):
    results = run_ranks(pipeline_dp, 4, str(tmp_path), [0, 1], timeout=300)
    assert results[0]["fqns"] != results[2]["fqns"]  # disjoint stages
    assert not set(results[0]["fqns"]) & set(results[2]["fqns"])
    assert all(r["forwards"] == 1 for r in results)
    info = _inspect(tmp_path)  # stage 0 (ranks 0, 1) writes 2 layers, stage 1 (ranks 2, 3) 2 layers + head
    assert info.pieces_per_rank[0] < info.pieces_per_rank[2] and info.pieces_per_rank[0] == info.pieces_per_rank[1]
    consolidated = _consolidated(tmp_path, Net)  # the manifest's table is the union of the stages
    _assert_reference(consolidated, Net)
    assert _assert_matches_consolidated(results, consolidated)
    assert _assert_matches_consolidated(run_ranks(resume_fsdp, 4, str(tmp_path), "net", timeout=300), consolidated)
    assert _assert_matches_consolidated(run_ranks(resume_stages, 4, str(tmp_path), [0], timeout=300), consolidated)
    assert _assert_matches_consolidated([_resume_plain(tmp_path, Net)], consolidated)


@pytest.mark.timeout(300)
def test_two_model_parts_per_rank(tmp_path):
    results = run_ranks(pipeline_two_parts, 2, str(tmp_path), timeout=240)
    assert results[0]["fqns"][0].startswith("layers.0.") and any(f.startswith("layers.2.") for f in results[0]["fqns"])
    assert all(r["forwards"] == 2 for r in results)
    consolidated = _consolidated(tmp_path, Net)
    _assert_reference(consolidated, Net)
    assert _assert_matches_consolidated(results, consolidated)
    assert _assert_matches_consolidated([_resume_plain(tmp_path, Net)], consolidated)


@pytest.mark.timeout(300)
def test_expert_parallel_on_its_own_mesh_beside_fsdp2(tmp_path):
    results = run_ranks(expert_parallel, 4, str(tmp_path), timeout=240)
    assert all(r["meshes"] == 2 and r["checked"] == 2 * 3 and r["forwards"] == 1 for r in results)
    consolidated = _consolidated(tmp_path, MoE)
    _assert_reference(consolidated, MoE)
    assert _assert_matches_consolidated(results, consolidated)
    assert _assert_matches_consolidated(run_ranks(resume_fsdp, 2, str(tmp_path), "moe", timeout=240), consolidated)
    assert _assert_matches_consolidated([_resume_plain(tmp_path, MoE)], consolidated)


def partial_placement():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, distribute_tensor

    from shardema import ShardedEMA

    mesh = init_device_mesh("cpu", (2,))
    model = nn.Linear(2, 2)
    model.weight = nn.Parameter(distribute_tensor(model.weight.detach(), mesh, [Partial()]))
    try:
        ShardedEMA(model, [0.9])
    except NotImplementedError as exc:
        return str(exc)
    return None


def test_a_partial_placement_is_refused_with_the_fix():
    for message in run_ranks(partial_placement, 2, timeout=120):
        assert message is not None and "'weight'" in message and "redistribute" in message
