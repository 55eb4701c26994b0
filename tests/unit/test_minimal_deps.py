"""Honest dependencies: no numpy at runtime, PyYAML only for YAML callback configs.

The full check of the minimal install (a venv without numpy and PyYAML, 2 gloo ranks,
the CLI) is .ci/minimal_install.sh; these tests keep the pieces honest in the dev venv.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

from shardema._bytes import cpu_bytes
from shardema.callbacks import EmaCallbackConfig, load_callback_configs


@pytest.mark.parametrize("make", [
    lambda: torch.arange(7, dtype=torch.float32),
    lambda: torch.arange(12, dtype=torch.bfloat16).view(3, 4),
    lambda: torch.arange(24, dtype=torch.int64).view(4, 6)[:, 1:4],  # not contiguous: copied
    lambda: torch.arange(10, dtype=torch.float64)[3:8],  # a view with a storage offset
    lambda: torch.tensor(3.5),
    lambda: torch.tensor([True, False, True]),
])
def test_cpu_bytes_are_the_raw_bytes(make):
    t = make()
    expected = bytes(t.contiguous().reshape(-1).view(torch.uint8).tolist()) if t.dtype != torch.bool else \
        bytes(t.to(torch.uint8).tolist())
    view = cpu_bytes(t)
    assert view.readonly and view.format == "B" and view.nbytes == t.numel() * t.element_size()
    assert bytes(view) == expected
    assert zlib.crc32(view) == zlib.crc32(expected)


def test_cpu_bytes_of_an_empty_tensor():
    assert bytes(cpu_bytes(torch.empty(0, 3))) == b""


def test_cpu_bytes_is_zero_copy_and_keeps_the_memory_alive():
    t = torch.arange(1000, dtype=torch.float32)
    view = cpu_bytes(t)
    t[0] = 42.0  # the same memory: the view sees the write
    assert bytes(view[:4]) == bytes(torch.tensor([42.0]).view(torch.uint8).tolist())
    expected = bytes(t.view(torch.uint8).tolist())
    del t
    gc.collect()
    torch.ones(1000, dtype=torch.float32).add_(1)  # reuse freed memory, if it had been freed
    assert bytes(view) == expected


def test_yaml_configs_without_pyyaml_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # `import yaml` raises ImportError
    with pytest.raises(ImportError, match=r'pip install "shardema\[callbacks\]"'):
        load_callback_configs("- kind: EmaCallback\n  target_factors: [0.9]\n")
    # A parsed list needs no YAML.
    (config,) = load_callback_configs([{"kind": "EmaCallback", "target_factors": [0.9]}])
    assert isinstance(config, EmaCallbackConfig)


def test_nothing_in_the_library_imports_yaml_at_import_time():
    code = textwrap.dedent("""
        import sys
        sys.modules["yaml"] = None
        import shardema, shardema.callbacks, shardema.checkpoint, shardema.cli
        assert "yaml" not in {m.split(".")[0] for m, v in sys.modules.items() if v is not None}
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


_NO_NUMPY = """
import sys
sys.modules["numpy"] = None  # as if numpy were not installed
import warnings
warnings.simplefilter("error")  # nothing may warn: `import shardema` hides torch's own NumPy warning
import shardema
warnings.resetwarnings()
import tempfile, zlib
from datetime import timedelta
import torch
import torch.distributed as dist
from torch import nn

try:
    torch.zeros(1).numpy()
except RuntimeError:
    pass
else:
    raise AssertionError("numpy is available")

from shardema import _dist
from shardema.checkpoint._format import tensor_checksum

t = torch.arange(6, dtype=torch.bfloat16)
assert tensor_checksum(t, "crc32") == f"{zlib.crc32(bytes(t.view(torch.uint8).tolist())):08x}"

with tempfile.TemporaryDirectory() as tmp:
    # torch's broadcast_object_list / all_gather_object decode with .numpy(): ours must not.
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1,
                            timeout=timedelta(seconds=60))
    obj = {"a": [1, 2.5, "x"], "t": (None, b"\\x00" * 1000)}
    assert _dist.broadcast_object(obj, src=0) == obj
    assert _dist.all_gather_objects(obj) == [obj]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    ema = shardema.ShardedEMA(model, [0.9, 0.99])
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)
        ema.update()
    ema.save(tmp + "/ema", tag="latest")
    with ema.swapped(0.99):
        saved = {k: v.clone() for k, v in model.state_dict().items()}
    other = shardema.ShardedEMA(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)), [0.9, 0.99])
    assert other.resume(tmp + "/ema") == "latest"
    with other.swapped(0.99):
        resumed = {k: v.clone() for k, v in other.model.state_dict().items()}
    assert all(torch.equal(resumed[k], v) for k, v in saved.items())
    dist.destroy_process_group()
    full = shardema.load_consolidated(tmp + "/ema", factor=0.99)
    assert all(torch.equal(full[k], v) for k, v in saved.items())
print("numpy-free ok")
"""


def test_save_resume_consolidate_and_object_collectives_without_numpy():
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-c", _NO_NUMPY], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "numpy-free ok" in proc.stdout


_NO_FRAMEWORKS = """
import sys
for name in ("lightning", "pytorch_lightning", "transformers", "accelerate"):
    sys.modules[name] = None  # as if not installed
import shardema, shardema.integrations, shardema.callbacks, shardema.checkpoint, shardema.cli
for extra in ("lightning", "transformers"):
    try:
        __import__(f"shardema.integrations.{extra}")
    except ImportError as exc:
        assert f'pip install "shardema[{extra}]"' in str(exc), exc
    else:
        raise AssertionError(f"shardema.integrations.{extra} imported without its framework")
print("frameworks-free ok")
"""


def test_the_library_imports_without_the_integration_frameworks():
    """``import shardema`` never imports Lightning or transformers; an integration without its extra
    raises an ImportError with the pip command."""
    done = subprocess.run([sys.executable, "-c", _NO_FRAMEWORKS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "frameworks-free ok" in done.stdout


def test_an_integration_without_accelerate_names_the_extra():
    code = ('import sys; sys.modules["accelerate"] = None\n'
            'try:\n    import shardema.integrations.transformers\n'
            'except ImportError as exc:\n    print(exc)\n')
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "'accelerate'" in done.stdout and 'pip install "shardema[transformers]"' in done.stdout
