"""A real client: torchtitan's llama3 debug model, parallelised by torchtitan's own code.

Four gloo ranks build the mesh the way torchtitan's trainer does (``ParallelDims`` with
dp_shard=2, tp=2), the ``debugmodel`` flavour on the meta device, and apply torchtitan's
``parallelize_llama`` (its tensor-parallel sharding, its default selective activation
checkpointing, its FSDP2 wrapping), then ``to_empty`` + ``init_weights`` as the trainer
does. shardema then keeps two EMAs through deterministic perturbations (applied through
torch's own ``distribute_tensor``), and the test checks:
- the EMA, read back inside ``ema.swapped`` through torch's ``full_tensor()``, against a
  float64 reference started from the gathered initial weights;
- the memory: exactly local numel x 2 factors x 4 bytes per rank;
- the save: each rank's swapped full tensors equal ``load_consolidated`` bit for bit;
- in a plain single process: the unsharded torchtitan model resumes the checkpoint with
  ``strict=True`` bit-exactly, and the consolidated weights load into it with ``strict=True``.

What it takes to run torchtitan 0.3.0 on a CPU-only torch 2.13 (each is applied in the
worker only, and only when needed):
- ``torchtitan/tools/utils.py:55`` picks ``device_type = _get_available_device_type() or
  "cuda"``, and ``ParallelDims.build_mesh`` calls ``init_device_mesh(device_type, ...)``: on
  a machine without a GPU that is "cuda" and gloo ranks fail. The test sets
  ``torchtitan.distributed.parallel_dims.device_type = "cpu"``.
- ``torchtitan.models.common`` imports (through the MoE token dispatcher) the triton kernels
  of ``torchtitan.distributed.minimal_async_ep``; triton does not exist for CPU torch. Dense
  llama3 never calls them: without triton a stub module stands in and raises if called.
- ``Llama3Model.Config.update_from_config`` imports ``torchtitan.trainer`` only for an
  ``isinstance(config, Trainer.Config)`` check; the trainer module imports the data, metrics
  and checkpoint stack (torchdata, tensorboard, datasets, tokenizers, torch_checkpointing).
  Without them a stand-in ``Trainer`` makes the check false, which is torchtitan's own path
  for non-trainer callers (its docstring: any config with a ``parallelism`` field).
- torchtitan 0.3.0's default ``spmd_backend="spmd_types"`` keeps parameters as annotated plain
  tensors and relies on a newer ``fully_shard`` (torchtitan releases pin a torch nightly):
  torch 2.13's ``fully_shard`` with ``dp_mesh_dims`` refuses them ("all parameters must be
  DTensors on the full SPMD mesh"). The test runs the two DTensor backends torchtitan ships,
  ``full_dtensor`` and ``partial_dtensor``.

Install (no GPU packages, about 13 MB, seconds)::

    pip install --no-deps torchtitan==0.3.0 spmd_types==0.2.3
    pip install torch==2.13.0 tyro==1.0.17
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_ranks
from test_layouts import FACTORS as LAYOUT_FACTORS
from test_layouts import _delta, reference_from

_MISSING = [m for m in ("torchtitan", "spmd_types", "tyro") if importlib.util.find_spec(m) is None]

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(bool(_MISSING), reason=f"torchtitan is not installed (missing {', '.join(_MISSING)}): "
                       "pip install --no-deps torchtitan==0.3.0 spmd_types==0.2.3 && "
                       "pip install torch==2.13.0 tyro==1.0.17"),
]

FACTORS = (0.9, 0.99)
STEPS = 3
assert FACTORS == LAYOUT_FACTORS  # the shared float64 reference averages these factors
BACKENDS = ("full_dtensor", "partial_dtensor")
LAYERS = 2
WRAPPER = "._checkpoint_wrapped_module"  # torchtitan's activation checkpointing wraps each block


# ---------------------------------------------------------------------------------- torchtitan on CPU
def _stub_module(name: str, **attrs) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module


def _triton_kernel_stub(attr: str):
    if attr.startswith("__"):
        raise AttributeError(attr)

    def unavailable(*args, **kwargs):
        raise RuntimeError(f"{attr}: a triton kernel of MoE expert parallelism, not available on CPU torch")

    return unavailable


def _import_torchtitan():
    """Import torchtitan's llama3 on a CPU-only torch (see the module docstring); return the model spec."""
    if importlib.util.find_spec("triton") is None:
        _stub_module("torchtitan.distributed.minimal_async_ep.kernels", __getattr__=_triton_kernel_stub)
    try:
        import torchtitan.trainer  # noqa: F401
    except ImportError:  # its data/metrics stack is not installed: the non-trainer path of update_from_config
        _stub_module("torchtitan.trainer", Trainer=type("Trainer", (), {"Config": type("Config", (), {})}))
    import torchtitan.distributed.parallel_dims as parallel_dims
    from torchtitan.models.llama3 import model_registry

    parallel_dims.device_type = "cpu"  # tools/utils.py falls back to "cuda" without a GPU
    return model_registry("debugmodel")


def _config(spec, parallelism):
    """The debugmodel flavour (dim 256, 16 heads, vocab 2048) with its first ``LAYERS`` of 6 layers."""
    import dataclasses
    from types import SimpleNamespace

    from torchtitan.config import TrainingConfig

    config = spec.model
    config.layers = config.layers[:LAYERS]
    config.update_from_config(config=SimpleNamespace(parallelism=parallelism))
    for layer in config.layers:  # the RoPE cache for the training sequence length, as the trainer sizes it
        layer.attention.rope = dataclasses.replace(layer.attention.rope, max_seq_len=TrainingConfig().seq_len)
    return config


def _unsharded_model():
    """torchtitan's debug model, unsharded, on the CPU (its values are overwritten by the tests)."""
    from torchtitan.config import ParallelismConfig

    config = _config(_import_torchtitan(), ParallelismConfig(data_parallel_shard_degree=1))
    with torch.device("meta"):
        model = config.build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    return model


def _parallelized_model(backend: str, dump_folder: str):
    """What torchtitan's Trainer.__init__ does for a model without pipeline parallelism."""
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed import utils as dist_utils
    from torchtitan.distributed.activation_checkpoint import SelectiveAC

    spec = _import_torchtitan()
    parallelism = ParallelismConfig(data_parallel_shard_degree=2, tensor_parallel_degree=2, spmd_backend=backend)
    parallel_dims = ParallelDims.from_config(parallelism, dist.get_world_size())
    parallel_dims.build_mesh()
    dist_utils.set_spmd_backend(backend)
    config = _config(spec, parallelism)
    with torch.device("meta"):
        model = config.build()
    model = spec.parallelize_fn(model, parallel_dims=parallel_dims, training=TrainingConfig(),
                                parallelism=parallelism, compile_config=CompileConfig(),
                                ac_config=SelectiveAC.Config(), dump_folder=dump_folder)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    return model


# ---------------------------------------------------------------------------------- EMA reference
def _name(fqn: str) -> str:
    return fqn.replace(WRAPPER, "")


def _reference(initial: dict) -> dict:
    """Float64 EMA per factor of the full tensors after ``STEPS`` perturbations (the layout tests' reference)."""
    return reference_from(initial, STEPS)


@torch.no_grad()
def _perturb(model, step: int) -> None:
    """Add each parameter's delta; its local part comes from torch's placement logic."""
    from torch.distributed.tensor import distribute_tensor

    for fqn, p in model.named_parameters():
        delta = _delta(_name(fqn), p.shape, step).to(p.dtype)
        p.to_local().add_(distribute_tensor(delta, p.device_mesh, p.placements).to_local())


# ---------------------------------------------------------------------------------- the ranks
def titan_fsdp_tp(root: str):
    """dp_shard=2 x tp=2 on 4 ranks, per backend: EMA, memory, swap, save; rank 0 returns the initial weights."""
    from torch.distributed.tensor import DTensor

    from shardema import ShardedEMA, load_consolidated

    out = {}
    for backend in BACKENDS:
        model = _parallelized_model(backend, f"{root}/dump")
        assert all(isinstance(p, DTensor) for p in model.parameters())
        placements = {_name(n): str(tuple(p.placements)) for n, p in model.named_parameters()}
        meshes = sorted({p.device_mesh.mesh_dim_names for p in model.parameters()})
        initial = {_name(n): p.full_tensor() for n, p in model.named_parameters()}

        ema = ShardedEMA(model, FACTORS)
        local_numel = sum(p.to_local().numel() for p in model.parameters())
        assert ema.shadow_bytes == local_numel * len(FACTORS) * 4, (ema.shadow_bytes, local_numel)
        for step in range(STEPS):
            _perturb(model, step)
            ema.update()

        reference = _reference(initial)
        live = {_name(n): p.full_tensor() for n, p in model.named_parameters()}
        swapped = {}
        for f in FACTORS:
            with ema.swapped(f):
                swapped[f] = {_name(n): p.full_tensor() for n, p in model.named_parameters()}
            for name, value in swapped[f].items():
                torch.testing.assert_close(value.double(), reference[f][name], rtol=0, atol=1e-5,
                                           msg=f"{backend}: {name} factor {f}")
        for name, p in model.named_parameters():  # the swap restored the live weights, bit for bit
            assert torch.equal(p.full_tensor(), live[_name(name)]), name

        ema.save(f"{root}/{backend}", "latest")
        dist.barrier()
        for f in FACTORS:  # what was written is what the ranks held, bit for bit
            consolidated = load_consolidated(f"{root}/{backend}", factor=f)
            assert sorted(consolidated) == sorted(swapped[f]), sorted(set(consolidated) ^ set(swapped[f]))
            for name, value in swapped[f].items():
                assert torch.equal(consolidated[name], value), f"{backend}: {name} factor {f}"
        out[backend] = {"placements": placements, "meshes": meshes, "checked": len(swapped[FACTORS[0]]),
                        "shadow_bytes": ema.shadow_bytes, "local_numel": local_numel,
                        "initial": initial if dist.get_rank() == 0 else None}
    return out


# ---------------------------------------------------------------------------------- the test
@pytest.mark.timeout(420)
def test_torchtitan_llama3_fsdp2_tp_and_plain_resume(tmp_path):
    from shardema import ShardedEMA, load_consolidated

    results = run_ranks(titan_fsdp_tp, 4, str(tmp_path), timeout=330)
    model = _unsharded_model()
    names = sorted(n for n, _ in model.named_parameters())
    for backend in BACKENDS:
        ranks = [r[backend] for r in results]
        assert all(r["checked"] == len(names) for r in ranks)
        # FSDP2 over torchtitan's TP plan: a (dp, tp) mesh; _StridedShard for the colwise weights
        assert ranks[0]["meshes"] == [("dp_shard" if backend == "full_dtensor" else "fsdp", "tp")], ranks[0]["meshes"]
        placements = ranks[0]["placements"]
        assert placements["layers.0.attention.qkv_linear.wqkv.weight"] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
        assert placements["layers.0.attention.wo.weight"] == "(Shard(dim=0), Shard(dim=1))"  # rowwise
        assert placements["norm.weight"] == "(Shard(dim=0), Replicate())"  # sequence parallel: replicated on tp
        reference = _reference(ranks[0]["initial"])

        ema = ShardedEMA(model, FACTORS)
        assert ema.resume(tmp_path / backend, strict=True) == "latest" and ema.step == STEPS
        consolidated = {f: load_consolidated(tmp_path / backend, factor=f) for f in FACTORS}
        for f in FACTORS:
            with ema.swapped(f):  # the resumed shadows are the consolidated weights, bit for bit
                for name, p in model.named_parameters():
                    assert torch.equal(p.detach(), consolidated[f][name]), f"{backend}: {name} factor {f}"
        for f in FACTORS:
            model.load_state_dict(consolidated[f], strict=True)  # every name and shape of torchtitan's model
            for name, value in consolidated[f].items():
                torch.testing.assert_close(value.double(), reference[f][name], rtol=0, atol=1e-5, msg=name)
