"""EMAConfig: one validation for Python, keywords and YAML; identical EMAs whichever way it is given."""

from __future__ import annotations

import ast
import itertools
import json
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from torch import nn

import shardema
from shardema import DecaySchedule, EMAConfig, ShardedEMA
from shardema.callbacks import CallbackRunner, EmaCallbackConfig, MemoryWriter, load_callback_configs

SRC = Path(shardema.__file__).parent


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))


def _train_steps(model: nn.Module, ema: ShardedEMA, steps: int) -> None:
    generator = torch.Generator().manual_seed(3)
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator))
        ema.update()


FULL = dict(target_factors=[0.99, 0.9], model_paths=["0", "2"], shadow_dtype="float64", buffers="average",
            schedule="warmup", update_every=2, start_step=1, include_frozen=False, upcast_buffer_bytes=4096,
            exchange_buffer_bytes=1024, chunk_numel=64)


def test_flat_schedule_options_land_in_the_nested_schedule():
    cfg = EMAConfig(**FULL)
    assert cfg.schedule == DecaySchedule(kind="warmup", update_every=2, start_step=1)
    assert cfg.target_factors == (0.99, 0.9) and cfg.model_paths == ("0", "2")
    assert cfg.torch_shadow_dtype is torch.float64
    nested = EMAConfig(target_factors=0.5, schedule={"kind": "power", "power": 0.75})
    assert nested.schedule.power == 0.75 and nested.target_factors == (0.5,)
    assert EMAConfig(target_factors=[0.5], shadow_dtype=torch.bfloat16).shadow_dtype == "bfloat16"
    assert EMAConfig(target_factors=[0.5], shadow_dtype=None).shadow_dtype == "live"


def test_round_trips_through_json_and_yaml():
    cfg = EMAConfig(**FULL)
    assert EMAConfig.model_validate_json(cfg.model_dump_json()) == cfg
    text = yaml.safe_dump(json.loads(cfg.model_dump_json()))
    assert EMAConfig.model_validate(yaml.safe_load(text)) == cfg
    callback = EmaCallbackConfig(every_n_updates=5, **FULL)
    again = load_callback_configs(yaml.safe_dump([json.loads(callback.model_dump_json())]))[0]
    assert again == callback and again.to_ema_config() == cfg


@pytest.mark.parametrize(("options", "message"), [
    ({"target_factors": "0.9"}, "must be a decay or a list of decays"),
    ({"target_factors": [0.9, "x"]}, "is not a number"),
    ({"target_factors": [True]}, "is not a number"),
    ({"target_factors": [0.9], "schedule": {"kind": "warmup", "update_every": 2}, "update_every": 3},
     "update_every given both flat and inside schedule"),
    ({"target_factors": [0.9], "upcast_scratch_bytes": 8}, "renamed to 'upcast_buffer_bytes'"),
    ({"target_factors": [0.9], "shadow_dtype": torch.int32}, "shadow_dtype=torch.int32"),
    ({"target_factors": [0.9], "chunk_numel": 0}, "chunk_numel"),
    ({"target_factors": [0.9], "include_frozen": "yes"}, "include_frozen"),
    ({"target_factors": [0.9], "model_paths": ["a", "a.b"]}, "overlap"),
    ({"target_factors": [0.9], "model_paths": ["a", "b/c"]}, "'b/c' is not a dotted submodule path"),
    ({"target_factors": [0.9], "model_paths": ["a", "b\\c"]}, r"'b\\\\c' is not a dotted submodule path"),
])
def test_bad_options_name_the_field(options, message):
    with pytest.raises(ValidationError, match=message):
        EMAConfig(**options)


def test_constructor_forms_and_their_errors():
    model = _model()
    cfg = EMAConfig(target_factors=[0.9])
    assert ShardedEMA(model, cfg).config == cfg
    assert ShardedEMA(model, 0.9).config == cfg
    assert ShardedEMA(model, target_factors=0.9).config == cfg
    assert ShardedEMA(model, [0.9], schedule="warmup").config.schedule.kind == "warmup"
    with pytest.raises(TypeError, match=r"an EMAConfig and the keyword\(s\) \['buffers'\]"):
        ShardedEMA(model, cfg, buffers="ignore")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['decay'\]"):
        ShardedEMA(model, [0.9], decay=0.5)
    with pytest.raises(TypeError, match="'upcast_scratch_bytes' was renamed to 'upcast_buffer_bytes'"):
        ShardedEMA(model, [0.9], upcast_scratch_bytes=64)
    with pytest.raises(TypeError, match="target factors twice"):
        ShardedEMA(model, [0.9], target_factors=[0.8])
    with pytest.raises(TypeError, match="needs target factors"):
        ShardedEMA(model)
    ema = ShardedEMA(model, cfg)
    with pytest.raises(TypeError, match="'scratch_bytes' \\(now 'exchange_buffer_bytes'\\)"):
        with ema.swapped(0.9, scratch_bytes=8):
            pass



def test_attributes_and_names_renamed_in_0_2_raise_naming_the_new_one():
    ema = ShardedEMA(_model(), [0.9])
    with ema.swapped(0.9) as info:
        pass
    with pytest.raises(AttributeError, match="'scratch_bytes'; it was renamed to 'upcast_buffer_bytes'"):
        ema.scratch_bytes  # noqa: B018
    with pytest.raises(AttributeError, match="'scratch_bytes'; it was renamed to 'exchange_buffer_bytes'"):
        info.scratch_bytes  # noqa: B018
    with pytest.raises(ImportError, match="LiveTensor was renamed to TrackedTensor"):
        from shardema import LiveTensor  # noqa: F401
    # The hints name attributes that exist; any other missing name is a plain AttributeError.
    assert ema.upcast_buffer_bytes == 0 and info.exchange_buffer_bytes > 0
    assert type(ema.tracked()[0]).__name__ == "TrackedTensor"
    for obj in (ema, info, shardema):
        assert not hasattr(obj, "no_such_name")
        with pytest.raises(AttributeError, match="no attribute 'no_such_name'$"):
            obj.no_such_name  # noqa: B018

def test_config_keywords_and_yaml_callback_build_identical_emas(tmp_path):
    cfg = EMAConfig(target_factors=[0.99, 0.9], schedule="warmup", update_every=2, start_step=1,
                    buffers="average", shadow_dtype="float64")
    by_config = ShardedEMA(_model(), cfg)
    by_keywords = ShardedEMA(_model(), target_factors=[0.99, 0.9], schedule="warmup", update_every=2,
                             start_step=1, buffers="average", shadow_dtype=torch.float64)
    text = ("- kind: EmaCallback\n  target_factors: [0.99, 0.9]\n  schedule: warmup\n  update_every: 2\n"
            "  start_step: 1\n  buffers: average\n  shadow_dtype: float64\n  save_last_weights: false\n")
    model = _model()
    runner = CallbackRunner(text, model=model, writer=MemoryWriter(), run_dir=tmp_path)
    runner.before_training()
    by_yaml = runner[0].ema
    assert by_config.config == by_keywords.config == by_yaml.config
    for ema in (by_config, by_keywords, by_yaml):
        _train_steps(ema.model, ema, 7)
    for t in by_config.tracked():
        for factor in cfg.target_factors:
            expected = by_config.shadow(factor, t.key)
            assert expected.dtype == (torch.float64 if t.blended else t.dtype)
            assert torch.equal(by_keywords.shadow(factor, t.key), expected), t.fqn
            assert torch.equal(by_yaml.shadow(factor, t.key), expected), t.fqn
    # ...and the shadows really moved: the EMA differs from both the initial and the live weights.
    fresh = _model()
    weight = by_config.shadow(0.9, (None, "0.weight"))
    assert not torch.equal(weight, fresh[0].weight.double())
    assert not torch.equal(weight, by_config.model[0].weight.double())


def _is_module(name: str) -> bool:
    path = SRC.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _runtime_imports(path: Path, package: str) -> set[str]:
    """Modules of ``package`` that ``path`` imports at run time (imports under TYPE_CHECKING excluded)."""
    tree = ast.parse(path.read_text())
    module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    if module.endswith(".__init__"):
        module = module[: -len(".__init__")]
        base = module.split(".")
    else:
        base = module.split(".")[:-1]
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from . import _dist`` imports the submodule; ``from .x import y`` imports x.
            names = [f"{target}.{a.name}" if _is_module(f"{target}.{a.name}") else target for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n for n in names if n.startswith(package))
    return found


def test_no_import_cycles_in_the_library():
    modules = {".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in SRC.rglob("*.py")}
    graph = {m: {t for t in _runtime_imports(p, "shardema") if t in modules and t != m} for m, p in modules.items()}
    # A package's __init__ re-exports its submodules; a submodule importing its own package's
    # names is what creates cycles, so package -> submodule edges are kept as they are.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt):], nxt]
                if not all(a.startswith(b + ".") or b.startswith(a + ".") for a, b in itertools.pairwise(cycle)):
                    raise AssertionError("import cycle: " + " -> ".join(cycle))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    # The facade's owners: nothing below _ema imports it at run time.
    for low in ("shardema._store", "shardema._swap", "shardema._shards", "shardema.config", "shardema._kernels",
                "shardema._compat"):
        assert "shardema._ema" not in graph[low], low
