"""The rank-coordinated swap on real gloo ranks, against an unsharded float64 reference EMA.

Each worker builds the live model (DDP, FSDP2, HSDP or tensor parallel) and an unsharded
twin from the same seed, trains the live model, keeps a float64 EMA of the gathered full
parameters, and checks that a forward inside ``ema.swapped`` equals the twin holding the
reference EMA, and that everything (live shards and shadows) is bit-exact afterwards.
"""

import time

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_ranks
from torch import nn

pytestmark = pytest.mark.distributed

FACTORS = [0.9, 0.99]


class Net(nn.Module):
    """Uneven under FSDP2 on 2 ranks: 3 rows -> 2 + 1; the 1-row head -> 1 + 0 (a rank with zero rows)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Tanh())
        self.head = nn.Linear(3, 1)

    def forward(self, x):
        return self.head(self.body(x))


def _net(seed=0):
    torch.manual_seed(seed)
    return Net()


def _full(value):
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def _inner(model):
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _full_params(model) -> dict:
    """Float64 full parameters by FQN (a collective for DTensor parameters)."""
    import shardema

    shardema.reshard_fsdp(model)
    return {n: _full(p).detach().double().clone() for n, p in _inner(model).named_parameters()}


class Reference:
    """A float64 EMA of the gathered full parameters (and buffers), independent of shardema."""

    def __init__(self, model, buffers="copy"):
        full = _full_params(model)
        self.params = {f: {n: v.clone() for n, v in full.items()} for f in FACTORS}
        self.policy = buffers
        self.buffers = {n: b.detach().clone() for n, b in _inner(model).named_buffers()}
        self.averaged = {f: {n: b.double().clone() for n, b in self.buffers.items() if b.is_floating_point()}
                         for f in FACTORS}

    def update(self, model):
        full = _full_params(model)
        for f in FACTORS:
            for n, v in full.items():
                self.params[f][n] = f * self.params[f][n] + (1 - f) * v
        self.buffers = {n: b.detach().clone() for n, b in _inner(model).named_buffers()}
        for f in FACTORS:
            for n, b in self.buffers.items():
                if b.is_floating_point():
                    self.averaged[f][n] = f * self.averaged[f][n] + (1 - f) * b.double()

    def forward(self, factor, x, make=_net, names=None, live=None):
        """The unsharded twin holding the reference EMA (only ``names`` swapped; the rest ``live``)."""
        twin = make().double().eval()
        state = twin.state_dict()
        for n, v in self.params[factor].items():
            state[n] = v if names is None or n in names else live[n]
        for n, b in self.buffers.items():
            if self.policy == "average" and b.is_floating_point():
                state[n] = self.averaged[factor][n]
            elif self.policy != "ignore":
                state[n] = b.double() if b.is_floating_point() else b
        twin.load_state_dict(state)
        return twin(x.double())


def _train(model, ema, ref, steps, dtype=torch.float32, seed=0):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    generator = torch.Generator().manual_seed(seed)  # same data on every rank: identical BN buffers
    model.train()
    for _ in range(steps):
        x = torch.randn(6, 4, generator=generator)
        model(x.to(dtype)).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update()
        ref.update(model)
    model.eval()


def _local_state(ema):
    import shardema

    shardema.reshard_fsdp(ema.model)
    lives = {t.key: t.local().detach().clone() for t in ema.tracked()}
    shadows = {(f, t.key): ema.shadow(f, t.key).clone() for f in ema.target_factors for t in ema.tracked()}
    return lives, shadows


def _assert_restored(ema, before):
    lives, shadows = _local_state(ema)
    for key, value in before[0].items():
        assert torch.equal(lives[key], value), f"live {key} not restored bit-exact"
    for key, value in before[1].items():
        assert torch.equal(shadows[key], value), f"shadow {key} not restored bit-exact"


def _unsharded_left(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(not isinstance(p, DTensor) for p in model.parameters())


def _check_swap(model, ema, ref, factor, x, *, atol=1e-5, model_paths=None, names=None, make=_net,
                expect_unsharded=False, **options):
    """Forward inside the swap == reference twin; forward and state after it == before, bit-exact."""

    live_full = _full_params(model)
    before = _local_state(ema)
    with torch.no_grad():
        live_out = model(x)  # an eval forward: FSDP2 may leave unsharded parameters registered
        if expect_unsharded:
            assert _unsharded_left(model), "the test meant to start the swap from unsharded params"
        with ema.swapped(factor, model_paths, **options) as info:
            inside = model(x)
        expected = ref.forward(factor, x, make=make, names=names, live=live_full)
        torch.testing.assert_close(inside.double(), expected, rtol=0, atol=atol)
        assert not torch.allclose(inside, live_out), "the EMA forward should differ from the live one"
        assert torch.equal(model(x), live_out)
    _assert_restored(ema, before)
    return info


def parity_on_two_ranks():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from torch.nn.parallel import DistributedDataParallel

    from shardema import ShardedEMA

    rank = dist.get_rank()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(7))
    out = {}

    # DDP, buffers averaged.
    ddp = DistributedDataParallel(_net())
    ema = ShardedEMA(ddp, FACTORS, buffers="average")
    ref = Reference(ddp, buffers="average")
    _train(ddp, ema, ref, steps=3)
    out["ddp"] = _check_swap(ddp, ema, ref, 0.99, x).mode

    # FSDP2 (uneven, rank 1 holds zero rows of the head): swap before the first update puts the
    # initial weights in; an eval forward of the root leaves unsharded params before each swap.
    model = _net()
    for m in (model.body[0], model.head, model):
        fully_shard(m)
    ema = ShardedEMA(model, FACTORS)
    ref = Reference(model)
    out["rows"] = {t.fqn: t.local_shape[0] for t in ema.tracked() if t.fqn.startswith("head")}
    model.eval()
    before = _local_state(ema)
    with ema.swapped(0.9):
        # before any update() the EMA equals the live weights: the swap exchanges equal values
        torch.testing.assert_close(model(x).double(), ref.forward(0.9, x), rtol=0, atol=1e-5)
        with pytest.raises(RuntimeError, match="nested"):
            with ema.swapped(0.99):
                pass
        with pytest.raises(RuntimeError, match="update"):
            ema.update()
    _assert_restored(ema, before)
    _train(model, ema, ref, steps=3)
    info = _check_swap(model, ema, ref, 0.9, x, expect_unsharded=True)
    out["fsdp"] = (info.mode, info.exchange_buffer_bytes, info.num_tensors)
    info = _check_swap(model, ema, ref, 0.99, x, exchange_buffer_bytes=8)  # 2 fp32 elements per batch
    out["fsdp_tiny_scratch"] = info.exchange_buffer_bytes

    # FSDP2 with reshard_after_forward=False, two model paths, only "head" swapped.
    model = _net()
    for m in (model.body[0], model.head, model):
        fully_shard(m, reshard_after_forward=False)
    ema = ShardedEMA(model, FACTORS, model_paths=["body", "head"])
    ref = Reference(model)
    _train(model, ema, ref, steps=2)
    with torch.no_grad():
        model(x)
    assert all(not hasattr(p, "placements") for p in model.parameters()), "expected unsharded params"
    info = _check_swap(model, ema, ref, 0.99, x, model_paths=["head"], names={"head.weight", "head.bias"})
    out["subset"] = (info.model_paths, info.num_tensors)
    _check_swap(model, ema, ref, 0.9, x, expect_unsharded=True)

    # FSDP2 bf16 live shards, fp32 shadows: the backup path (buffers are always backed up).
    model = _net().bfloat16()
    for m in (model.body[0], model.head, model):
        fully_shard(m)
    ema = ShardedEMA(model, FACTORS)
    ref = Reference(model)
    _train(model, ema, ref, steps=3, dtype=torch.bfloat16)
    info = _check_swap(model, ema, ref, 0.99, x.bfloat16(), atol=3e-2, backup_to_host=True)
    local_param_bytes = sum(p.to_local().numel() * 2 for p in model.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    assert info.backup_bytes == local_param_bytes + buffer_bytes and not info.backup_on_host  # CPU: nothing to pin
    out["bf16"] = info.mode

    # Tensor parallel: column-wise then row-wise Linear (Shard(0), Shard(1), Replicate params).
    def make_tp():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = parallelize_module(make_tp(), mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    ema = ShardedEMA(model, FACTORS)
    ref = Reference(model)
    _train(model, ema, ref, steps=3)
    out["tp"] = _check_swap(model, ema, ref, 0.99, x, make=make_tp, exchange_buffer_bytes=12).mode
    out["rank"] = rank
    return out


def faults_on_two_ranks():
    from torch.distributed.fsdp import fully_shard

    from shardema import EMAState, ShardedEMA
    from shardema._swap import SwapAbortedError

    rank = dist.get_rank()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(7))
    model = _net()
    for m in (model.body[0], model.head, model):
        fully_shard(m, reshard_after_forward=False)
    ema = ShardedEMA(model, FACTORS)
    ref = Reference(model)
    _train(model, ema, ref, steps=2)
    before = _local_state(ema)
    with torch.no_grad():
        live_out = model(x)
    seen = []
    # Round 1: rank 1 fails right after a collective forward, rank 0 leaves the body later.
    # Round 2: rank 0 fails late, rank 1 leaves at once. Round 3: both fail.
    for failing, late in (({1}, 0), ({0}, 0), ({0, 1}, 1)):
        try:
            with torch.no_grad(), ema.swapped(0.99):
                model(x)  # every rank reaches the body's collectives before failing
                if rank == late:
                    time.sleep(0.5)
                if rank in failing:
                    raise ValueError(f"eval exploded on rank {rank}")
        except ValueError as error:
            assert rank in failing and str(error) == f"eval exploded on rank {rank}"
            seen.append("own")
        except SwapAbortedError as error:
            assert rank not in failing and error.failed_ranks == tuple(sorted(failing))
            assert f"rank(s) {', '.join(map(str, sorted(failing)))}" in str(error)
            seen.append(f"aborted {list(error.failed_ranks)}")
        else:
            raise AssertionError("every rank must raise when a rank failed inside the swap")
        assert ema.state is EMAState.IDLE
        _assert_restored(ema, before)
        with torch.no_grad():
            assert torch.equal(model(x), live_out)
    # Round 4: the swap-in itself fails on rank 1 (e.g. out of memory for a backup). No rank
    # may run the body: its forward all-gathers would wait forever for rank 1.
    from shardema import _swap

    original = _swap._Swap.swap_in

    def failing_swap_in(self):
        if dist.get_rank() == 1:
            raise MemoryError("no room for the swap on rank 1")
        return original(self)

    _swap._Swap.swap_in = failing_swap_in
    try:
        with torch.no_grad(), ema.swapped(0.99):
            model(x)
            raise AssertionError("the body ran although rank 1 could not swap in")
    except MemoryError as error:
        assert rank == 1 and "rank 1" in str(error)
        seen.append("own")
    except SwapAbortedError as error:
        assert rank == 0 and error.failed_ranks == (1,)
        seen.append("aborted [1]")
    finally:
        _swap._Swap.swap_in = original
    _assert_restored(ema, before)
    # A later swap works, and the model keeps training and averaging.
    _check_swap(model, ema, ref, 0.99, x)
    _train(model, ema, ref, steps=1, seed=5)
    _check_swap(model, ema, ref, 0.9, x)
    # Round 5: rank 1 writes to its shard of a swapped parameter (fp32: exchanged in place). Rank 1 raises
    # SwapWriteError naming it, rank 0 SwapAbortedError; the live weights come back bit-exact everywhere, and
    # only the written shard's EMA changes: it holds the written values (the exchange keeps no copy).
    from shardema import SwapWriteError

    before = _local_state(ema)
    written = (0.99, (None, "body.0.weight"))
    assert before[1][written].numel() > 0  # rank 1 holds one of the 3 rows
    try:
        with torch.no_grad(), ema.swapped(0.99) as info:
            assert info.mode == "in_place"
            if rank == 1:
                model.body[0].weight.mul_(2)  # the sharded DTensor: only this rank's local shard is written
    except SwapWriteError as error:
        assert rank == 1 and error.fqns == ("body.0.weight",) and "body.0.weight" in str(error)
        seen.append("write error")
    except SwapAbortedError as error:
        assert rank == 0 and error.failed_ranks == (1,)
        seen.append("aborted [1]")
    else:
        raise AssertionError("every rank must raise when a rank wrote to a swapped parameter")
    assert ema.state is EMAState.IDLE
    lives, shadows = _local_state(ema)
    for key, value in before[0].items():
        assert torch.equal(lives[key], value), f"live {key} not restored bit-exact"
    for key, value in before[1].items():
        expected = 2 * value if rank == 1 and key == written else value
        assert torch.equal(shadows[key], expected), f"shadow {key}"
    return seen


def hsdp_on_a_2x2_mesh():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard

    from shardema import ShardedEMA
    from shardema._swap import SwapAbortedError

    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(7))
    model = _net()
    for m in (model.body[0], model.head, model):
        fully_shard(m, mesh=mesh)
    ema = ShardedEMA(model, FACTORS)
    assert ema.tracked()[0].placements == (Replicate(), Shard(0))
    ref = Reference(model)
    _train(model, ema, ref, steps=3)
    _check_swap(model, ema, ref, 0.99, x, expect_unsharded=True)
    before = _local_state(ema)
    outcome = None
    try:
        with torch.no_grad(), ema.swapped(0.9):
            model(x)
            if rank == 3:
                raise KeyError("rank 3 only")
    except KeyError:
        outcome = "own"
    except SwapAbortedError as error:
        outcome = list(error.failed_ranks)
    _assert_restored(ema, before)
    _check_swap(model, ema, ref, 0.9, x)
    rows = {t.fqn: t.local_shape[0] for t in ema.tracked() if t.fqn == "head.weight"}
    return {"outcome": outcome, "rows": rows}


def test_swap_matches_unsharded_reference_for_ddp_fsdp2_subset_bf16_and_tp():
    results = run_ranks(parity_on_two_ranks, 2)
    for r in results:
        assert r["ddp"] == "in_place" and r["fsdp"][0] == "in_place" and r["tp"] == "in_place"
        assert r["fsdp_tiny_scratch"] == 8
        assert r["subset"] == (("head",), 2 if r["rank"] == 0 else 0)
        assert r["bf16"] == "backup"  # every bf16 parameter backed up (the mode speaks of parameters)
    assert results[0]["rows"] == {"head.weight": 1, "head.bias": 1}
    assert results[1]["rows"] == {"head.weight": 0, "head.bias": 0}  # a rank with zero rows
    assert results[1]["fsdp"][2] < results[0]["fsdp"][2]  # empty pieces are not swapped


def test_a_failure_on_some_ranks_restores_everywhere_and_raises_on_every_rank():
    results = run_ranks(faults_on_two_ranks, 2)
    assert results[0] == ["aborted [1]", "own", "own", "aborted [1]", "aborted [1]"]
    assert results[1] == ["own", "aborted [0]", "own", "own", "write error"]


def test_hsdp_2x2_swap_and_a_failure_on_rank_3():
    results = run_ranks(hsdp_on_a_2x2_mesh, 4)
    assert [r["outcome"] for r in results] == [[3], [3], [3], "own"]
    assert [r["rows"]["head.weight"] for r in results] == [1, 0, 1, 0]
