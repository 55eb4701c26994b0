"""Checkpoints written in format 1 (zlib CRC-32 of every piece and of every whole file) still load.

The format-1 checkpoints are built from the format's description (docs/checkpoint-format.md,
"Format 1"): the tensors of a format-2 save are written again with ``safetensors.torch.save_file``,
their header metadata lists each piece's zlib CRC-32, and the manifest lists the whole-file CRC-32.
"""

import json
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import shardema
from shardema.checkpoint import list_checkpoints, load_consolidated
from shardema.cli import main as cli_main

FACTORS = (0.9, 0.99)


def _crc32(data: bytes) -> str:
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def _as_format1(cp_dir: Path) -> None:
    """Rewrite the committed checkpoint ``cp_dir`` (format 2) as format 1, in place."""
    manifest_path = cp_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 1
    for entry in manifest["files"]:
        path = cp_dir / entry["path"]
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        stored = json.loads(metadata["tensors"])
        for name, piece in entry["pieces"].items():
            crc = _crc32(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            stored[name]["crc32"] = piece["crc32"] = crc
            del piece["crc32c"]
        metadata.update(tensors=json.dumps(stored), format_version="1")
        save_file(tensors, str(path), metadata=metadata)
        data = path.read_bytes()
        entry["size"], entry["crc32"] = len(data), _crc32(data)
        del entry["header_crc32c"]
    manifest_path.write_text(json.dumps(manifest, indent=1))


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))


def _trained_ema(seed: int):
    torch.manual_seed(seed)
    model = _model()
    ema = shardema.ShardedEMA(model, FACTORS)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
    return model, ema


def _shadows(ema) -> dict:
    return {(f, t.fqn): ema.shadow(f, t.key).clone() for f in ema.target_factors for t in ema.tracked()}


@pytest.fixture
def format1_root(tmp_path):
    """``cp=last`` (step 3) and ``cp=latest`` (step 4), both in format 1, and the values each holds."""
    model, ema = _trained_ema(0)
    ema.save(tmp_path, "last")
    at_last = _shadows(ema)
    with torch.no_grad():
        model[0].weight.mul_(3)
    ema.update()
    ema.save(tmp_path, "latest")
    at_latest = _shadows(ema)
    for tag in ("last", "latest"):
        _as_format1(tmp_path / "model" / f"cp={tag}")
    return tmp_path, at_last, at_latest


def test_a_format1_checkpoint_resumes_bit_exactly(format1_root):
    root, _, at_latest = format1_root
    assert json.loads((root / "model" / "cp=latest" / "manifest.json").read_text())["format_version"] == 1
    _, fresh = _trained_ema(5)
    assert fresh.resume(root, strict=True) == "latest" and fresh.step == 4
    assert all(torch.equal(fresh.shadow(f, t.key), at_latest[(f, t.fqn)])
               for f in FACTORS for t in fresh.tracked())


def test_a_corrupt_format1_file_fails_its_whole_file_crc_and_resume_falls_back(format1_root, caplog):
    root, at_last, _ = format1_root
    broken = root / "model" / "cp=latest" / "ema=0.99" / "rank-00000-of-00001.safetensors"
    data = bytearray(broken.read_bytes())
    data[-3] ^= 0x01
    broken.write_bytes(bytes(data))
    _, fresh = _trained_ema(5)
    assert fresh.resume(root) == "last" and fresh.step == 3
    assert f"{broken}: CRC-32 " in caplog.text  # rejected by the verification, before any read
    assert all(torch.equal(fresh.shadow(f, t.key), at_last[(f, t.fqn)]) for f in FACTORS for t in fresh.tracked())


def test_format1_consolidates_inspects_and_verifies(format1_root, tmp_path, capsys):
    root, _, at_latest = format1_root
    state = load_consolidated(root, tag="latest", factor=0.99)
    assert all(torch.equal(state[fqn], at_latest[(0.99, fqn)]) for (f, fqn) in at_latest if f == 0.99)
    listed = {c.tag: c for c in list_checkpoints(root, verify=True)}
    assert listed["latest"].state == "committed" and listed["latest"].problem is None
    out = tmp_path / "out.safetensors"
    assert cli_main(["consolidate", str(root), "--tag", "latest", "--factor", "0.99", "--out", str(out)]) == 0
    assert out.is_file()
