"""EMA checkpoints across world sizes and meshes (FSDP2, HSDP) on real gloo ranks, and DCP round trips.

Live weights are a function of (FQN, step) only, so every layout trains the same EMA
and a float64 loop over the full tensors is an independent reference.
"""

import zlib

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_ranks
from torch import nn

import shardema

pytestmark = pytest.mark.distributed

FACTORS = (0.9, 0.99)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(8, 5)  # 5 rows: 3+2 on 2 ranks, 2+2+1 on 3 ranks
        self.norm = nn.LayerNorm(5)
        self.dec = nn.Linear(5, 3)  # 3 rows: 2+1 on 2 ranks
        self.tiny = nn.Parameter(torch.zeros(2, 3))  # 2 rows: 1+1+0 on 3 ranks (an empty piece)
        self.register_buffer("scale", torch.ones(4))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))


def target(fqn, shape, dtype, step):
    if not dtype.is_floating_point:
        return torch.full(shape, step, dtype=dtype)
    g = torch.Generator().manual_seed(zlib.crc32(fqn.encode()) * 1000 + step)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def reference(fqn, shape, factor, steps):
    s = target(fqn, shape, torch.float64, 0)
    for i in range(1, steps + 1):
        s = factor * s + (1 - factor) * target(fqn, shape, torch.float64, i)
    return s


def local_piece(tensor, full):
    """This rank's piece of ``full`` laid out like ``tensor`` (a DTensor or a plain tensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(tensor, DTensor):
        return distribute_tensor(full.to(tensor.dtype), tensor.device_mesh, tensor.placements).to_local()
    return full.to(tensor.dtype)


def named_tensors(model):
    return list(model.named_parameters()) + list(model.named_buffers())


@torch.no_grad()
def set_live(model, step):
    for name, t in named_tensors(model):
        full = target(name, tuple(t.shape), t.dtype, step)
        local = t.to_local() if hasattr(t, "to_local") else t
        local.copy_(local_piece(t, full))


def build(kind):
    torch.manual_seed(0)
    model = Net()
    if kind != "plain":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if kind == "hsdp":
            mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        fully_shard(model.enc, mesh=mesh)
        fully_shard(model, mesh=mesh)
    set_live(model, 0)
    return model


def train(model, ema, steps):
    for _ in range(steps):
        set_live(model, ema.step + 1)
        ema.update()


def full_state(ema):
    """{(factor, fqn): full tensor} gathered with DTensor collectives (not the checkpoint code)."""
    out = {}
    for key, value in ema.state_dict().items():
        if not key.startswith("ema="):
            continue
        factor, _, fqn = key[len("ema="):].split("/", 2)
        out[(float(factor), fqn)] = (value.full_tensor() if hasattr(value, "full_tensor") else value).clone()
    return out


def portable(state):
    """Tensors as numpy arrays: torch tensors cross the harness queue through shared memory, which
    a worker that exits right away can tear down before the parent reads them."""
    return {k: v.numpy() for k, v in state.items()}


def unportable(state):
    return {k: torch.from_numpy(v) for k, v in state.items()}


def check_resumed(model, ema, expected):
    """Every local shadow equals this rank's piece of the expected full tensor, bit for bit."""
    live = dict(named_tensors(model))
    checked = 0
    for (factor, fqn), full in expected.items():
        want = local_piece(live[fqn], full)
        got = ema.shadow(factor, (None, fqn))
        assert got.shape == want.shape and torch.equal(got, want.to(got.dtype)), (factor, fqn)
        checked += got.numel()
    return checked


# ----------------------------------------------------------------------------- workers
def _resume_check(kind, root, expected, step, tag="latest"):
    model = build(kind)
    set_live(model, 77)  # the live weights must not leak into the resumed EMA
    ema = shardema.ShardedEMA(model, FACTORS)
    assert ema.resume(root, strict=True) == tag
    assert ema.step == step
    return check_resumed(model, ema, expected)


def _resume_train_save(kind, root, expected, step, out_root, more_steps):
    model = build(kind)
    ema = shardema.ShardedEMA(model, FACTORS)
    assert ema.resume(root) == "latest" and ema.step == step
    check_resumed(model, ema, expected)
    train(model, ema, more_steps)
    ema.save(out_root, "latest")
    state, saved_step = portable(full_state(ema)), ema.step

    # A save that fails on rank 1 only raises on every rank and commits nothing.
    train(model, ema, 1)
    from shardema.checkpoint import _writer

    real = _writer._write_file

    def failing(*args):
        if dist.get_rank() == 1:
            raise OSError("disk full (simulated)")
        return real(*args)

    _writer._write_file = failing
    try:
        ema.save(out_root, "latest")
    except RuntimeError as exc:
        assert "rank 1: OSError: disk full (simulated)" in str(exc), exc
    else:
        raise AssertionError("the save should have failed on every rank")
    finally:
        _writer._write_file = real
    return state, saved_step


def _train_save(kind, root, steps):
    model = build(kind)
    ema = shardema.ShardedEMA(model, FACTORS)
    train(model, ema, steps - 1)
    ema.save(root, "last")
    at_last = portable(full_state(ema))
    train(model, ema, 1)
    ema.save(root, "latest")
    writes = sorted(t.fqn for t in ema.tracked() if t.writes_checkpoint)
    return portable(full_state(ema)), ema.step, writes, at_last


def _async_save_while_training(kind, root, steps):
    """An asynchronous save (own gloo group, background thread) while the EMA goes on updating."""
    model = build(kind)
    ema = shardema.ShardedEMA(model, FACTORS)
    train(model, ema, steps)
    expected = portable(full_state(ema))
    handle = ema.save(root, "latest", blocking=False)
    train(model, ema, 2)  # the staged copy is what is written
    after = ema.save(root, "E0_U5_S5", blocking=False)  # waits for the first save, then stages step 5
    assert handle.done() and handle.wait() == "latest"
    train(model, ema, 1)
    assert ema.wait_for_save() == "E0_U5_S5" and after.done()
    return expected, handle.step


def _dcp_round_trip(path):
    import torch.distributed.checkpoint as dcp

    model = build("fsdp")
    ema = shardema.ShardedEMA(model, FACTORS)
    train(model, ema, 3)
    dcp.save({"ema": ema}, checkpoint_id=path)
    expected = {(f, t.key): ema.shadow(f, t.key).clone() for f in FACTORS for t in ema.tracked()}

    # Through the Stateful protocol
    other_model = build("fsdp")
    set_live(other_model, 50)
    restored = shardema.ShardedEMA(other_model, FACTORS, schedule="warmup")
    dcp.load({"ema": restored}, checkpoint_id=path)
    # Through a plain state dict
    third = shardema.ShardedEMA(other_model, FACTORS)
    sd = third.state_dict()
    dcp.load({"ema": sd}, checkpoint_id=path)
    third.load_state_dict(sd)
    for ema_ in (restored, third):
        assert ema_.step == 3 and ema_.schedule == ema.schedule
        for (f, key), value in expected.items():
            assert torch.equal(ema_.shadow(f, key), value), (f, key)
    return sum(v.numel() for v in expected.values())


# ----------------------------------------------------------------------------- tests
def _assert_matches_reference(state, steps):
    for (factor, fqn), full in state.items():
        if fqn == "count":
            assert int(full) == steps
        elif fqn == "scale":  # a buffer under "copy": the live value of the last update
            assert torch.equal(full, target(fqn, (4,), torch.float32, steps).float())
        else:
            torch.testing.assert_close(full.double(), reference(fqn, tuple(full.shape), factor, steps),
                                       rtol=1e-5, atol=1e-6)


def test_round_trips_1_to_2_to_1_and_2_to_3_uneven(tmp_path):
    # 1 process (no process group) -> 2 FSDP2 ranks
    model = build("plain")
    ema = shardema.ShardedEMA(model, FACTORS)
    train(model, ema, 3)
    ema.save(tmp_path / "one", "latest")
    expected_one = full_state(ema)
    results = run_ranks(_resume_train_save, 2, "fsdp", str(tmp_path / "one"), expected_one, 3,
                        str(tmp_path / "two"), 2, timeout=240)
    expected_two, step = unportable(results[0][0]), results[0][1]
    assert step == 5
    _assert_matches_reference(expected_two, 5)
    files = sorted(p.name for p in (tmp_path / "two" / "model" / "cp=latest" / "ema=0.9").iterdir())
    assert files == ["rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors"]

    # 2 ranks -> 1 process
    model = build("plain")
    single = shardema.ShardedEMA(model, FACTORS)
    assert single.resume(tmp_path / "two") == "latest" and single.step == 5
    assert check_resumed(model, single, expected_two) > 0

    # the consolidated weights load into an unsharded replica and equal the float64 reference
    for factor in FACTORS:
        replica = Net()
        replica.load_state_dict(shardema.checkpoint.load_consolidated(tmp_path / "two", factor), strict=True)
        for name, t in named_tensors(replica):
            assert torch.equal(t, expected_two[(factor, name)]), name
    _assert_matches_reference(expected_two, 5)

    # 2 ranks -> 3 ranks (uneven shards, an empty piece of 'tiny' on rank 2)
    checked = run_ranks(_resume_check, 3, "fsdp", str(tmp_path / "two"), expected_two, 5, timeout=240)
    total = sum(v.numel() for (_, fqn), v in expected_two.items() if fqn not in ("scale", "count"))
    buffers = sum(v.numel() for (_, fqn), v in expected_two.items() if fqn in ("scale", "count"))
    assert sum(checked) == total + 3 * buffers  # shards once, buffers replicated on every rank


def test_hsdp_2x2_to_2_ranks(tmp_path):
    results = run_ranks(_train_save, 4, "hsdp", str(tmp_path), 4, timeout=300)
    expected, step = unportable(results[0][0]), results[0][1]
    assert step == 4
    _assert_matches_reference(expected, 4)
    # ranks 2 and 3 hold replicas of ranks 0 and 1 (replicate coordinate 1): they claim no shard; the
    # plain buffers every rank holds are claimed by all and written by rank 0 alone (the files below)
    assert set(results[2][2]) == set(results[3][2]) == {"count", "scale"}
    for factor in FACTORS:
        files = sorted(p.name for p in (tmp_path / "model" / "cp=latest" / f"ema={factor!r}").iterdir())
        assert files == ["rank-00000-of-00004.safetensors", "rank-00001-of-00004.safetensors"]
    checked = run_ranks(_resume_check, 2, "fsdp", str(tmp_path), expected, 4, timeout=240)
    assert all(c > 0 for c in checked)

    # A flipped data byte in one file is read, and caught by its piece's CRC-32C, on one rank only;
    # both ranks must skip to cp=last (the ranks agree). Partial reads: see
    # test_a_corrupt_piece_read_as_partial_slices_is_caught_by_its_checksum.
    broken = tmp_path / "model" / "cp=latest" / "ema=0.99" / "rank-00001-of-00004.safetensors"
    data = bytearray(broken.read_bytes())
    data[-3] ^= 0x01
    broken.write_bytes(bytes(data))
    run_ranks(_resume_check, 2, "fsdp", str(tmp_path), unportable(results[0][3]), 3, "last", timeout=240)


def _flip_tensor_byte(path, name):
    """Flip one bit inside the stored bytes of tensor ``name``; size and header stay as they were."""
    import json

    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8:8 + header_len])[name]["data_offsets"]
    data[start + (end - start) // 2 + 8 + header_len] ^= 0x04
    path.write_bytes(bytes(data))


def test_a_corrupt_piece_read_as_partial_slices_is_caught_by_its_checksum(tmp_path):
    """Saved by one process (whole tensors), resumed on 2 FSDP2 ranks: each rank needs a slice of the
    corrupt piece; a rank reads every piece it needs whole and checks its CRC-32C, so the candidate is
    rejected on both ranks and both fall back to cp=last."""
    model = build("plain")
    ema = shardema.ShardedEMA(model, FACTORS)
    train(model, ema, 2)
    ema.save(tmp_path, "last")
    at_last = full_state(ema)
    train(model, ema, 1)
    ema.save(tmp_path, "latest")
    broken = tmp_path / "model" / "cp=latest" / "ema=0.99" / "rank-00000-of-00001.safetensors"
    _flip_tensor_byte(broken, "enc.weight")  # 5 rows: 3 + 2 on 2 ranks, both read a slice of it
    run_ranks(_resume_check, 2, "fsdp", str(tmp_path), at_last, 2, "last", timeout=240)


def test_an_async_save_on_2_fsdp_ranks_writes_the_staged_copy_and_resumes_anywhere(tmp_path):
    results = run_ranks(_async_save_while_training, 2, "fsdp", str(tmp_path), 3, timeout=240)
    expected, step = unportable(results[0][0]), results[0][1]
    assert step == 3 and results[1][1] == 3
    _assert_matches_reference(expected, 3)
    checked = run_ranks(_resume_check, 2, "fsdp", str(tmp_path), expected, 3, timeout=240)
    assert all(c > 0 for c in checked)
    model = build("plain")
    single = shardema.ShardedEMA(model, FACTORS)
    assert single.resume(tmp_path, strict=True) == "latest" and single.step == 3
    assert check_resumed(model, single, expected) > 0
    assert shardema.checkpoint.load_ema(single, tmp_path, "E0_U5_S5") == "E0_U5_S5" and single.step == 5


def _nccl_save_and_resume(root):
    """One NCCL rank on the GPU: the save's agreement runs over NCCL (CUDA tensors), the asynchronous
    save over its own gloo group, from pinned host staging."""
    torch.cuda.set_device(0)
    torch.manual_seed(0)
    model = Net().cuda()
    set_live(model, 0)
    ema = shardema.ShardedEMA(model, FACTORS)
    train(model, ema, 2)
    ema.save(root, "last")
    staged = {(f, t.fqn): ema.shadow(f, t.key).cpu() for f in FACTORS for t in ema.tracked()}
    handle = ema.save(root, "latest", blocking=False)
    train(model, ema, 1)
    assert handle.wait() == "latest"
    other = shardema.ShardedEMA(model, FACTORS)
    assert other.resume(root, strict=True) == "latest" and other.step == 2
    assert all(torch.equal(other.shadow(f, (None, fqn)).cpu(), v) for (f, fqn), v in staged.items())
    return len(staged)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run by benchmarks/gpu_suite.sh)")
def test_cuda_nccl_agreement_and_async_save_resume_exactly(tmp_path):
    assert run_ranks(_nccl_save_and_resume, 1, str(tmp_path), backend="nccl", timeout=240)[0] > 0


def test_dcp_round_trip_through_state_dict(tmp_path):
    counts = run_ranks(_dcp_round_trip, 2, str(tmp_path / "dcp"), timeout=240)
    assert all(c > 0 for c in counts)
