"""Damaged, hostile and mismatched checkpoints: each is refused or skipped, never half-loaded."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from torch import nn

import shardema
from shardema.checkpoint import CheckpointMismatchError, ManifestError, list_checkpoints, validate_tag
from shardema.checkpoint._manifest import read_manifest, validate_manifest
from shardema.cli import main as cli_main

FACTORS = (0.9, 0.99)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))


def _trained(steps: int, paths=None, seed: int = 0):
    model = _model(seed)
    ema = shardema.ShardedEMA(model, FACTORS, model_paths=paths)
    gen = torch.Generator().manual_seed(seed + 100)
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        ema.update()
    return model, ema


def _values(ema) -> dict:
    return {(f, t.key): ema.shadow(f, t.key).clone() for f in ema.target_factors for t in ema.tracked()}


def _assert_values(ema, expected: dict) -> None:
    for key, value in expected.items():
        assert torch.equal(ema.shadow(*key), value), key


def _assert_live(ema) -> None:
    for t in ema.tracked():
        for f in ema.target_factors:
            assert torch.equal(ema.shadow(f, t.key), t.local().to(ema.shadow(f, t.key).dtype)), (f, t.key)


def _edit_manifest(root: Path, tag: str, edit, label: str = "model") -> Path:
    path = root / label / f"cp={tag}" / "manifest.json"
    manifest = json.loads(path.read_text())
    result = edit(manifest)
    path.write_text(result if isinstance(result, str) else json.dumps(manifest))
    return path


@pytest.fixture
def latest_and_last(tmp_path):
    """cp=last at step 3, then cp=latest at step 5; returns (root, values at 3, values at 5)."""
    model, ema = _trained(3)
    ema.save(tmp_path, "last")
    at_three = _values(ema)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    ema.update()
    ema.save(tmp_path, "latest")
    return tmp_path, at_three, _values(ema)


def _fresh():
    model = _model(7)
    return shardema.ShardedEMA(model, FACTORS)


# -------------------------------------------------------------------- damaged manifests fall back
# Each damage, and what the error says about it: the field (pydantic's location), or why it could not be parsed.
DAMAGE = {
    "invalid schedule": (lambda m: m["schedule"].update(kind="cosine"), "field schedule.kind: Input should be"),
    "dtype typo": (lambda m: next(iter(m["tensors"].values())).update(dtype="flaot32"),
                   "field tensors.0.weight.dtype: Value error, unknown dtype name 'flaot32'"),
    "huge number": (lambda m: '{"format": "shardema-ema", "step": ' + "9" * 5000 + "}",
                    "unreadable manifest (ValueError"),
    "deep nesting": (lambda m: "[" * 100_000 + "]" * 100_000, "unreadable manifest (RecursionError"),
    "non-string model path": (lambda m: m.update(model_paths=[None, 7]),
                              "field model_paths.1: Input should be a valid string"),
    "path outside the root": (lambda m: m.update(model_paths=[None, "../x"]),
                              "field model_paths: Value error, model path '../x' is not a dotted submodule path"),
    "absolute model path": (lambda m: m.update(model_paths=[None, "/etc"]),
                            "field model_paths: Value error, model path '/etc' is not a dotted submodule path"),
    "file outside the root": (lambda m: m["files"][0].update(path="../../../../etc/passwd"),
                              "file path '../../../../etc/passwd' is not 'ema=<factor>/rank-"),
    "negative step": (lambda m: m.update(step=-1), "field step: Input should be greater than or equal to 0"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_manifest_is_corrupt_and_resume_falls_back_to_last(latest_and_last, damage, caplog):
    root, at_three, _ = latest_and_last
    edit, reason = DAMAGE[damage]
    manifest = _edit_manifest(root, "latest", edit)
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest.parent)
    assert str(info.value).startswith(f"{manifest}: ") and reason in str(info.value), str(info.value)
    ema = _fresh()
    assert ema.resume(root) == "last" and ema.step == 3
    _assert_values(ema, at_three)
    assert str(manifest) in caplog.text and reason in caplog.text  # the skipped version is named, with why


def test_an_invalid_schedule_touches_nothing_even_when_it_is_the_only_version(tmp_path):
    _, ema = _trained(2)
    ema.save(tmp_path, "latest")
    _edit_manifest(tmp_path, "latest", lambda m: m["schedule"].update(update_every=0))
    fresh = _fresh()
    assert fresh.resume(tmp_path) is None and fresh.step == 0
    _assert_live(fresh)
    assert fresh.schedule == shardema.DecaySchedule()


def test_no_path_read_from_a_manifest_leaves_the_root(tmp_path):
    outside = tmp_path / "outside"
    (outside / "cp=latest").mkdir(parents=True)
    root = tmp_path / "root"
    _, ema = _trained(1)
    ema.save(root, "latest")
    _edit_manifest(root, "latest", lambda m: m.update(model_paths=[None, "../outside"]))
    with pytest.raises(ManifestError, match="model_paths"):
        read_manifest(root / "model" / "cp=latest")
    assert _fresh().resume(root) is None
    _fresh().save(root, "latest")  # the next save cleans up under the root only
    assert (outside / "cp=latest").is_dir()


# -------------------------------------------------------------------- the coverage check is linear
def _manifest_with_pieces(n: int) -> dict:
    rows = 1 << 20
    files = [{"path": f"ema=0.9/rank-{r:05d}-of-{n:05d}.safetensors", "factor": 0.9, "rank": r, "size": 1,
              "crc32": "00000000", "pieces": {"w": {"offset": [r * (rows // n), 0], "shape": [rows // n, 1 << 20],
                                                    "crc32": "0"}}} for r in range(n)]
    return {"format": "shardema-ema", "format_version": 1, "save_id": "s", "tag": "latest", "model_path": None,
            "model_paths": [None], "step": 1, "schedule": {}, "factors": [0.9], "world_size": n,
            "tensors": {"w": {"global_shape": [rows, 1 << 20], "dtype": "float32"}}, "files": files}


def test_checking_many_pieces_needs_memory_proportional_to_the_pieces():
    manifest = _manifest_with_pieces(1024)  # 1,024 pieces of a 2**40-element tensor
    tracemalloc.start()
    validate_manifest(manifest)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 16 * 2**20, peak  # a dense grid of the piece boundaries would need gigabytes
    gap = _manifest_with_pieces(1024)
    del gap["files"][500]
    with pytest.raises(ManifestError, match="a gap"):
        validate_manifest(gap)
    overlap = _manifest_with_pieces(1024)
    overlap["files"][3]["pieces"]["w"]["offset"][0] += 1
    with pytest.raises(ManifestError, match="overlap"):
        validate_manifest(overlap)


# -------------------------------------------------------------------- which version, which paths
def test_resume_picks_the_intact_version_with_the_highest_step(tmp_path):
    _, ema = _trained(6)
    ema.save(tmp_path, "latest")
    ema.update()
    ema.save(tmp_path, "last")
    at_seven = _values(ema)
    fresh = _fresh()
    assert fresh.resume(tmp_path) == "last" and fresh.step == 7
    _assert_values(fresh, at_seven)
    ema.save(tmp_path, "latest")  # a tie: latest wins
    assert _fresh().resume(tmp_path) == "latest"


@pytest.mark.parametrize(("saved", "resumed"), [(None, ["0"]), (["0", "1"], None), (["1"], None)])
def test_changed_model_paths_raise_instead_of_starting_over(tmp_path, saved, resumed):
    _, ema = _trained(2, paths=saved)
    ema.save(tmp_path, "latest")
    fresh = shardema.ShardedEMA(_model(3), FACTORS, model_paths=resumed)
    with pytest.raises(CheckpointMismatchError, match="overlapping model paths"):
        fresh.resume(tmp_path)
    _assert_live(fresh)


def test_tags_with_a_trailing_newline_are_rejected():
    with pytest.raises(ValueError, match="not valid"):
        validate_tag("latest\n")
    with pytest.raises(ValueError, match="not valid"):
        _fresh().save("/nonexistent-root", "latest\n")


# -------------------------------------------------------------------- command line: one clear line
def test_cli_errors_are_one_line_naming_the_path(tmp_path, capsys):
    _, ema = _trained(2)
    ema.save(tmp_path, "latest")
    data = tmp_path / "model" / "cp=latest" / "ema=0.9" / "rank-00000-of-00001.safetensors"
    raw = bytearray(data.read_bytes())
    raw[8:20] = b"{not json!!!"
    data.write_bytes(bytes(raw))
    out = tmp_path / "out.safetensors"
    assert cli_main(["consolidate", str(tmp_path), "--factor", "0.9", "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(data) in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob("out.safetensors*"))

    folder = tmp_path / "exports"
    folder.mkdir()
    assert cli_main(["consolidate", str(tmp_path), "--factor", "0.99", "--out", str(folder), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert "is a directory" in err and len(err.splitlines()) == 1
    assert list(folder.iterdir()) == [] and not list(tmp_path.glob("exports*.tmp"))

    assert cli_main(["inspect", str(data)]) == 1
    err = capsys.readouterr().err.strip()
    assert "is a file, not a checkpoint root" in err
    with pytest.raises(ValueError, match="is a file"):
        list_checkpoints(data)


def test_the_installed_command_prints_no_traceback(tmp_path):
    bad = tmp_path / "missing-root"
    result = subprocess.run([sys.executable, "-m", "shardema.cli", "inspect", str(bad)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr and str(bad) in result.stderr
