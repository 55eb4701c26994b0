"""EMA checkpoints in one process: round trip, fallback, mismatch, crash windows, cleanup, consolidation, CLI."""

import json
import logging
import os
import subprocess
import sys
import zlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import shardema
from checksum_reference import crc32c_hex
from shardema.checkpoint import (
    CheckpointMismatchError,
    list_checkpoints,
    load_consolidated,
    load_ema,
    resume_ema,
    save_ema,
)
from shardema.cli import main as cli_main

FACTORS = (0.9, 0.99)


class Net(nn.Module):
    def __init__(self, hidden: int = 5, extra: bool = False, norm: bool = True):
        super().__init__()
        self.enc = nn.Linear(4, hidden)
        if norm:
            self.norm = nn.BatchNorm1d(hidden)
        self.dec = nn.Linear(hidden, 3)
        if extra:
            self.extra = nn.Linear(2, 2)


def target(fqn: str, shape, dtype: torch.dtype, step: int) -> torch.Tensor:
    """The live value of ``fqn`` before update number ``step`` (0 = at construction)."""
    if not dtype.is_floating_point:
        return torch.full(shape, step, dtype=dtype)
    g = torch.Generator().manual_seed(zlib.crc32(fqn.encode()) * 1000 + step)
    return torch.randn(shape, generator=g, dtype=torch.float64)


@torch.no_grad()
def set_live(model: nn.Module, step: int) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        t.copy_(target(name, t.shape, t.dtype, step))


def make(step0: int = 0, **kwargs):
    model = Net(**{k: kwargs.pop(k) for k in ("hidden", "extra", "norm") if k in kwargs})
    set_live(model, step0)
    return model, shardema.ShardedEMA(model, kwargs.pop("factors", FACTORS), **kwargs)


def train(model, ema, steps: int) -> None:
    for _ in range(steps):
        set_live(model, ema.step + 1)
        ema.update()


def snapshot(ema) -> dict:
    return {(f, t.key): ema.shadow(f, t.key).clone() for f in ema.target_factors for t in ema.tracked()}


def assert_state(ema, expected: dict) -> None:
    for (f, key), value in expected.items():
        assert torch.equal(ema.shadow(f, key), value), (f, key)


def reference(fqn: str, shape, factor: float, steps: int) -> torch.Tensor:
    """Float64 EMA of the live values of a blended tensor after ``steps`` constant-decay updates."""
    s = target(fqn, shape, torch.float64, 0)
    for i in range(1, steps + 1):
        s = factor * s + (1 - factor) * target(fqn, shape, torch.float64, i)
    return s


def committed_file(root, tag="latest", factor=0.9, label="model"):
    return root / label / f"cp={tag}" / f"ema={factor!r}" / "rank-00000-of-00001.safetensors"


# ----------------------------------------------------------------------------- round trip and layout
def test_round_trip_restores_values_step_and_schedule(tmp_path, caplog):
    model, ema = make(schedule="warmup")
    train(model, ema, 4)
    assert save_ema(ema, tmp_path, "latest") == "latest"
    saved = snapshot(ema)
    model2, ema2 = make(step0=7)  # different live weights, default schedule
    with caplog.at_level(logging.WARNING, logger="shardema"):
        assert resume_ema(ema2, tmp_path) == "latest"
    assert ema2.step == 4
    assert ema2.schedule == ema.schedule and "replaces" in caplog.text
    assert_state(ema2, saved)
    # training continues exactly like the uninterrupted run
    train(model, ema, 2)
    train(model2, ema2, 2)
    assert_state(ema2, snapshot(ema))


def test_files_follow_the_documented_layout(tmp_path):
    model, ema = make()
    train(model, ema, 2)
    ema.save(tmp_path, "E1_U2_S3")
    directory = tmp_path / "model" / "cp=E1_U2_S3"
    assert sorted(p.name for p in directory.iterdir()) == ["ema=0.9", "ema=0.99", "manifest.json"]
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["step"] == 2 and manifest["factors"] == [0.9, 0.99] and manifest["world_size"] == 1
    assert {f["path"] for f in manifest["files"]} == {"ema=0.9/rank-00000-of-00001.safetensors",
                                                     "ema=0.99/rank-00000-of-00001.safetensors"}
    path = committed_file(tmp_path, "E1_U2_S3", 0.99)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert {"format", "format_version", "save_id", "tag", "model_path", "factor", "step", "schedule",
            "world_size", "rank", "mesh_shapes", "tensors"} <= set(meta)
    assert meta["factor"] == "0.99" and meta["step"] == "2" and json.loads(meta["model_path"]) is None
    tensors = json.loads(meta["tensors"])
    # copied buffers (running stats, the int counter) are stored in each factor's file too
    assert keys == set(tensors) == {t.fqn for t in ema.tracked()}
    assert tensors["enc.weight"]["global_shape"] == [5, 4] and tensors["enc.weight"]["offset"] == [0, 0]
    assert tensors["norm.num_batches_tracked"]["dtype"] == "int64"
    assert not tensors["norm.running_mean"]["blended"] and tensors["enc.weight"]["blended"]
    loaded = load_file(path)
    assert torch.equal(loaded["enc.weight"], ema.shadow(0.99, (None, "enc.weight")))


def test_bad_tag_raises_before_writing(tmp_path):
    _model, ema = make()
    with pytest.raises(ValueError, match="'a/b' is not valid"):
        ema.save(tmp_path, "a/b")
    assert list(tmp_path.iterdir()) == []


def test_bf16_shadows_round_trip_in_their_dtype(tmp_path):
    model = Net().to(torch.bfloat16)
    set_live(model, 0)
    ema = shardema.ShardedEMA(model, FACTORS, shadow_dtype=None)
    train(model, ema, 2)
    ema.save(tmp_path)
    model2 = Net().to(torch.bfloat16)
    ema2 = shardema.ShardedEMA(model2, FACTORS, shadow_dtype=None)
    assert ema2.resume(tmp_path) == "latest"
    assert_state(ema2, snapshot(ema))
    assert load_consolidated(tmp_path, 0.9)["enc.weight"].dtype == torch.bfloat16


# ----------------------------------------------------------------------------- fallback and errors
def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 7)


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) - 5] ^= 0x40  # inside the tensor data, not the header
    path.write_bytes(bytes(data))


def _delete(path):
    path.unlink()


@pytest.mark.parametrize("damage", [_truncate, _flip_byte, _delete])
def test_damaged_latest_falls_back_to_last(tmp_path, caplog, damage):
    model, ema = make()
    train(model, ema, 2)
    ema.save(tmp_path, "last")
    at_last = snapshot(ema)
    train(model, ema, 3)
    ema.save(tmp_path, "latest")
    broken = committed_file(tmp_path, "latest", 0.99)
    damage(broken)
    _, ema2 = make(step0=5)
    with caplog.at_level(logging.WARNING, logger="shardema"):
        assert ema2.resume(tmp_path) == "last"
    assert str(broken) in caplog.text and "skipping" in caplog.text
    assert ema2.step == 2
    assert_state(ema2, at_last)


def test_corrupt_manifest_is_not_a_commit(tmp_path, caplog):
    model, ema = make()
    train(model, ema, 1)
    ema.save(tmp_path, "last")
    ema.save(tmp_path, "latest")
    manifest = tmp_path / "model" / "cp=latest" / "manifest.json"
    manifest.write_text(manifest.read_text()[:-20])
    _, ema2 = make()
    with caplog.at_level(logging.WARNING, logger="shardema"):
        assert ema2.resume(tmp_path) == "last"
    assert str(manifest) in caplog.text


def _move_away_from_live(model, ema) -> None:
    """Make every blended shadow differ from the live weights, which stay as they were."""
    before = {n: t.detach().clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    set_live(model, 1000)
    ema.update()
    with torch.no_grad():
        for n, t in list(model.named_parameters()) + list(model.named_buffers()):
            t.copy_(before[n])


def assert_equals_live(ema) -> None:
    for t in ema.tracked():
        for f in ema.target_factors:
            shadow = ema.shadow(f, t.key)
            same = torch.equal(shadow, t.local().to(shadow.dtype))
            assert same, f"ema={f} {t.fqn} differs from the live weight"


def assert_differs_from_live(ema) -> None:
    blended = [t for t in ema.tracked() if not t.is_buffer]
    assert all(not torch.equal(ema.shadow(f, t.key), t.local()) for f in ema.target_factors for t in blended)


def test_no_intact_checkpoint_initialises_from_live_or_raises_when_strict(tmp_path, caplog):
    model, ema = make()
    train(model, ema, 2)
    ema.save(tmp_path, "latest")
    ema.save(tmp_path, "last")
    for tag in ("latest", "last"):
        _flip_byte(committed_file(tmp_path, tag, 0.9))
    model2, ema2 = make(step0=3)
    _move_away_from_live(model2, ema2)  # so that "initialised from live" can fail
    assert_differs_from_live(ema2)
    with pytest.raises(FileNotFoundError, match="no intact EMA checkpoint"):
        ema2.resume(tmp_path, strict=True)
    with caplog.at_level(logging.WARNING, logger="shardema"):
        assert ema2.resume(tmp_path) is None
    assert "starts from the live weights" in caplog.text
    assert ema2.step == 1  # the step is kept
    assert_equals_live(ema2)
    _move_away_from_live(model2, ema2)
    assert resume_ema(ema2, tmp_path / "missing") is None
    assert_equals_live(ema2)


def _flip_tensor_byte(path, name: str) -> None:
    """Flip one bit inside the stored bytes of tensor ``name`` (the header stays intact)."""
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8:8 + header_len])[name]["data_offsets"]
    assert end - start >= 4
    data[8 + header_len + start + 2] ^= 0x10
    path.write_bytes(bytes(data))


def _reseal_manifest(root, tag: str, label: str = "model") -> None:
    """Make a file whose data bytes were changed pass verification, so that it fails only while it is read.

    Format 2 verification checks the size and the header's CRC-32C, which a changed data byte
    leaves intact: assert that nothing needs resealing."""
    manifest_path = root / label / f"cp={tag}" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["files"]:
        raw = (manifest_path.parent / entry["path"]).read_bytes()
        header_len = int.from_bytes(raw[:8], "little")
        assert (entry["size"], entry["header_crc32c"]) == (len(raw), crc32c_hex(raw[:8 + header_len]))


def _save_with_a_corrupt_second_file(tmp_path, tag: str):
    """A save whose ema=0.9 file is intact and whose ema=0.99 file fails its per-piece CRC when read:
    a load writes the 0.9 shadows (read first), then fails."""
    model, ema = make()
    train(model, ema, 3)
    ema.save(tmp_path, tag)
    _flip_tensor_byte(committed_file(tmp_path, tag, 0.99), "enc.weight")  # blended: read for every factor
    _reseal_manifest(tmp_path, tag)
    return snapshot(ema)


def test_a_load_that_fails_after_writing_some_shadows_is_undone(tmp_path, caplog):
    saved = _save_with_a_corrupt_second_file(tmp_path, "latest")
    model2, ema2 = make(step0=5)
    for strict in (True, False):
        _move_away_from_live(model2, ema2)
        assert_differs_from_live(ema2)
        with caplog.at_level(logging.WARNING, logger="shardema"):
            if strict:
                with pytest.raises(FileNotFoundError, match="no intact EMA checkpoint"):
                    ema2.resume(tmp_path, strict=True)
            else:
                assert ema2.resume(tmp_path) is None
        assert "fails its CRC-32C check" in caplog.text  # it failed while reading, after verification
        # neither the partly loaded values nor the values from before the resume are left
        assert_equals_live(ema2)
        assert not torch.equal(ema2.shadow(0.9, (None, "dec.weight")), saved[(0.9, (None, "dec.weight"))])


def test_load_ema_that_fails_after_writing_some_shadows_is_undone(tmp_path):
    _save_with_a_corrupt_second_file(tmp_path, "E0_U3_S3")
    model2, ema2 = make(step0=5)
    _move_away_from_live(model2, ema2)
    with pytest.raises(FileNotFoundError, match="no intact EMA checkpoint cp=E0_U3_S3"):
        load_ema(ema2, tmp_path, "E0_U3_S3")
    assert_equals_live(ema2)


def test_load_ema_reads_one_given_tag_without_fallback(tmp_path):
    model, ema = make()
    train(model, ema, 2)
    ema.save(tmp_path, "E0_U2_S2")
    at_two = snapshot(ema)
    train(model, ema, 2)
    ema.save(tmp_path, "latest")
    ema.save(tmp_path, "E0_U4_S4")
    _model2, ema2 = make(step0=8)
    assert load_ema(ema2, tmp_path, "E0_U2_S2") == "E0_U2_S2" and ema2.step == 2
    assert_state(ema2, at_two)
    with pytest.raises(FileNotFoundError, match="cp=E0_U9_S9"):
        load_ema(ema2, tmp_path, "E0_U9_S9")
    _flip_byte(committed_file(tmp_path, "E0_U4_S4", 0.9))
    with pytest.raises(FileNotFoundError, match="no intact EMA checkpoint cp=E0_U4_S4"):
        load_ema(ema2, tmp_path, "E0_U4_S4")
    # The flipped data byte fails its piece's checksum while it is read: the half-loaded
    # shadows are reset to the live weights (never left half loaded) and the step stays.
    assert ema2.step == 2
    for t in ema2.tracked():
        live = t.owner.get_parameter(t.attr) if not t.is_buffer else t.owner.get_buffer(t.attr)
        assert torch.equal(ema2.shadow(0.99, t.key), live.detach()), t.fqn
    with ema2.swapped(0.99), pytest.raises(RuntimeError, match="inside `with ema.swapped"):
        load_ema(ema2, tmp_path, "latest")


def test_structure_mismatch_lists_every_difference(tmp_path):
    _model, ema = make()
    ema.save(tmp_path)
    _, other = make(hidden=6, extra=True, factors=(0.9, 0.5))
    with pytest.raises(CheckpointMismatchError) as info:
        other.resume(tmp_path)
    text = str(info.value)
    for expected in ["factor 0.5 is not in", "'enc.weight' has shape [6, 4] in the model but [5, 4]",
                     "'dec.weight' has shape [3, 6]", "missing 'extra.weight'", "missing 'extra.bias'"]:
        assert expected in text, expected
    _, no_norm = make(norm=False)
    with pytest.raises(CheckpointMismatchError, match="unexpected 'norm.running_var'"):
        no_norm.resume(tmp_path)
    _, both = make(model_paths=["enc", "dec"])
    both.save(tmp_path / "two")
    _, enc_only = make(model_paths=["enc"])
    with pytest.raises(CheckpointMismatchError, match="model path 'dec' is in cp=latest but not tracked"):
        enc_only.resume(tmp_path / "two")
    enc_only.save(tmp_path / "one")
    with pytest.raises(CheckpointMismatchError, match="model path 'dec' is tracked but not in cp=latest"):
        both.resume(tmp_path / "one")


# ----------------------------------------------------------------------------- crash windows and cleanup
class Crash(BaseException):
    """Stands for the process dying at a rename (no handler may catch it)."""


def _count_renames(monkeypatch, crash_at=None):
    calls = {"n": 0}
    real_rename, real_replace = os.rename, os.replace

    def wrap(real):
        def fn(*args, **kwargs):
            calls["n"] += 1
            if crash_at is not None and calls["n"] == crash_at:
                raise Crash(f"crash at rename {crash_at}")
            return real(*args, **kwargs)
        return fn

    monkeypatch.setattr(os, "rename", wrap(real_rename))
    monkeypatch.setattr(os, "replace", wrap(real_replace))
    return calls


def test_a_crash_at_any_rename_leaves_the_old_or_the_new_save(tmp_path, monkeypatch):
    paths = ["enc", "dec"]  # two model paths: the swap spans two directories
    model, ema = make(model_paths=paths)
    train(model, ema, 2)
    ema.save(tmp_path / "dry", "latest")
    old = snapshot(ema)
    old_state = {k: v.clone() if torch.is_tensor(v) else v for k, v in ema.state_dict().items()}
    train(model, ema, 1)
    new = snapshot(ema)
    new_state = {k: v.clone() if torch.is_tensor(v) else v for k, v in ema.state_dict().items()}
    with monkeypatch.context() as m:
        calls = _count_renames(m)
        ema.save(tmp_path / "dry", "latest")
    total = calls["n"]
    assert total >= 10  # files, manifests, and the swaps
    outcomes = set()
    for k in range(1, total + 1):
        root = tmp_path / f"crash{k}"
        ema.load_state_dict(old_state)
        ema.save(root, "latest")
        ema.save(root, "E1_U1_S1")
        ema.load_state_dict(new_state)
        with monkeypatch.context() as m:
            _count_renames(m, crash_at=k)
            with pytest.raises(Crash):
                ema.save(root, "latest")
        _, fresh = make(step0=9, model_paths=paths)
        assert fresh.resume(root) == "latest", k
        saved_state = old if fresh.step == 2 else new
        assert fresh.step in (2, 3)
        assert_state(fresh, saved_state)
        outcomes.add(fresh.step)
        # the next save cleans up, the other tag survives
        ema.save(root, "latest")
        names = sorted(p.name for mp in paths for p in (root / mp).iterdir() if p.name.startswith("cp="))
        assert names == ["cp=E1_U1_S1", "cp=E1_U1_S1", "cp=latest", "cp=latest"], (k, names)
        assert fresh.resume(root) == "latest" and fresh.step == 3
        assert_state(fresh, new)
    assert outcomes == {2, 3}  # early crashes keep the old save, late ones already show the new one



def test_ranks_that_describe_a_tensor_differently_make_the_save_fail_and_write_nothing(tmp_path, monkeypatch):
    import copy

    from shardema import _dist
    from shardema.checkpoint._table import local_table, union_tables

    model, ema = make()
    train(model, ema, 1)
    ema.save(tmp_path, "latest")
    saved = snapshot(ema)
    train(model, ema, 1)

    def two_ranks(obj, group=None):
        # The save's first gather, with a second rank that disagrees on a shape and a dtype.
        other = copy.deepcopy(obj[2])  # (rank 0's proposal, claimed pieces, tensor table)
        other[None]["enc.weight"]["global_shape"] = [9, 4]
        other[None]["dec.bias"]["dtype"] = "bfloat16"
        return [obj, (None, set(), other)]

    with monkeypatch.context() as m, pytest.raises(ValueError) as err:
        m.setattr(_dist, "all_gather_objects", two_ranks)
        ema.save(tmp_path, "latest")
    message = str(err.value)
    assert message.startswith("ranks describe tensors differently, nothing was saved: "), message
    assert "'enc.weight' has global_shape [9, 4] on rank 1 but [5, 4] on a lower rank" in message
    assert "'dec.bias' has dtype 'bfloat16' on rank 1 but 'float32'" in message
    # Nothing written: the previous save is the only version, bit for bit.
    assert [(i.tag, i.state) for i in list_checkpoints(tmp_path)] == [("latest", "committed")]
    assert [p.name for p in (tmp_path / "model").iterdir() if p.name.startswith("cp=")] == ["cp=latest"]
    _, fresh = make(step0=5)
    assert fresh.resume(tmp_path) == "latest" and fresh.step == 1
    assert_state(fresh, saved)
    # Tables that agree give no conflict; their aliases are merged.
    table = local_table(ema)
    aliased = copy.deepcopy(table)
    aliased[None]["enc.weight"]["aliases"] = ["shared.weight"]
    union, conflicts = union_tables([table, aliased])
    assert conflicts == [] and union[None]["enc.weight"]["aliases"] == ["shared.weight"]

def test_next_save_removes_leftovers_and_keeps_user_data(tmp_path):
    model, ema = make()
    train(model, ema, 1)
    ema.save(tmp_path, "latest")
    ema.save(tmp_path, "E0_U1_S1")
    label = tmp_path / "model"
    # a crash between the two renames of a swap: cp=latest moved to .old, the new save not in place
    os.rename(label / "cp=latest", label / "cp=latest.old")
    stale = label / "cp=latest.tmp-deadbeef" / "ema=0.9"
    stale.mkdir(parents=True)
    (stale / "rank-00000-of-00001.safetensors.tmp").write_bytes(b"partial")
    (label / "cp=latest").mkdir()  # a half-written directory without manifest
    (label / "notes.txt").write_text("mine")
    states = {i.tag + ":" + i.state for i in list_checkpoints(tmp_path)}
    assert {"latest:old", "latest:uncommitted", "latest:staging", "E0_U1_S1:committed"} <= states
    _, fresh = make(step0=4)
    assert fresh.resume(tmp_path) == "latest" and fresh.step == 1  # read from cp=latest.old
    train(model, ema, 1)
    ema.save(tmp_path, "last")  # any save cleans up
    assert sorted(p.name for p in label.iterdir()) == [".shardema-writer.lock", "cp=E0_U1_S1", "cp=last", "cp=latest",
                                                     "notes.txt"]
    assert fresh.resume(tmp_path) == "last" and fresh.step == 2  # the newest intact version wins
    assert load_ema(fresh, tmp_path, "latest") == "latest" and fresh.step == 1  # the cleaned-up cp=latest


# ----------------------------------------------------------------------------- consolidation and CLI
@pytest.mark.parametrize("buffers", ["copy", "average", "ignore"])
def test_consolidated_weights_equal_the_float64_reference_and_load_strictly(tmp_path, buffers):
    model, ema = make(buffers=buffers)
    steps = 6
    train(model, ema, steps)
    ema.save(tmp_path, "last")
    for factor in FACTORS:
        sd = load_consolidated(tmp_path, factor, tag="last")
        replica = Net()
        if buffers == "ignore":
            assert not any(k.startswith("norm.running") for k in sd)
            result = replica.load_state_dict(sd, strict=False)
            # (BatchNorm itself tolerates a missing num_batches_tracked)
            assert {"norm.running_mean", "norm.running_var"} <= set(result.missing_keys)
        else:
            replica.load_state_dict(sd, strict=True)
        for name, p in replica.named_parameters():
            torch.testing.assert_close(p.double(), reference(name, p.shape, factor, steps), rtol=1e-5, atol=1e-6)
        if buffers != "ignore":
            assert int(replica.norm.num_batches_tracked) == steps
            expected = (reference("norm.running_mean", (5,), factor, steps) if buffers == "average"
                        else target("norm.running_mean", (5,), torch.float64, steps))
            torch.testing.assert_close(replica.norm.running_mean.double(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"saved factors: \[0.9, 0.99\]"):
        load_consolidated(tmp_path, 0.5, tag="last")
    with pytest.raises(FileNotFoundError, match="cp=latest"):
        load_consolidated(tmp_path, 0.9)


def test_consolidated_model_path_keys_are_relative(tmp_path):
    model, ema = make(model_paths=["enc", "dec"])
    train(model, ema, 3)
    ema.save(tmp_path)
    sd = load_consolidated(tmp_path, 0.99, model_path="enc")
    assert set(sd) == {"weight", "bias"}
    nn.Linear(4, 5).load_state_dict(sd, strict=True)
    torch.testing.assert_close(sd["weight"].double(), reference("enc.weight", (5, 4), 0.99, 3), rtol=1e-5, atol=1e-6)


def test_consolidate_detects_a_corrupt_piece(tmp_path):
    _model, ema = make()
    ema.save(tmp_path)
    _flip_byte(committed_file(tmp_path, "latest", 0.9))
    with pytest.raises(ValueError, match="CRC-32"):
        load_consolidated(tmp_path, 0.9)


def test_cli_consolidate_and_inspect(tmp_path, capsys):
    model, ema = make()
    train(model, ema, 3)
    ema.save(tmp_path, "latest")
    ema.save(tmp_path, "E1_U3_S3")
    out = tmp_path / "out" / "ema.safetensors"
    assert cli_main(["consolidate", str(tmp_path), "--factor", "0.99", "--tag", "E1_U3_S3", "--out", str(out)]) == 0
    written = load_file(out)
    expected = load_consolidated(tmp_path, 0.99, tag="E1_U3_S3")
    assert set(written) == set(expected) and all(torch.equal(written[k], expected[k]) for k in expected)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["step"] == "3" and f.metadata()["factor"] == "0.99"
    Net().load_state_dict(written, strict=True)
    capsys.readouterr()

    assert cli_main(["inspect", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["model", "path", "tag", "state"]
    assert any(line.split()[:4] == ["model", "latest", "committed", "3"] for line in lines), table
    assert any(line.split()[:3] == ["model", "E1_U3_S3", "committed"] for line in lines), table
    assert "0.9,0.99" in table

    _flip_byte(committed_file(tmp_path, "latest", 0.9))
    assert cli_main(["inspect", str(tmp_path), "--verify", "--json"]) == 0
    listed = {i["tag"]: i for i in json.loads(capsys.readouterr().out)}
    assert listed["latest"]["state"] == "corrupt" and "CRC-32" in listed["latest"]["problem"]
    assert listed["E1_U3_S3"]["state"] == "committed" and listed["E1_U3_S3"]["world_size"] == 1

    assert cli_main(["consolidate", str(tmp_path), "--factor", "0.9", "--tag", "nope", "--out", str(out)]) == 1
    assert "no committed EMA checkpoint" in capsys.readouterr().err


def test_iteration_tags_are_listed_by_their_numbers(tmp_path, capsys):
    from shardema.checkpoint import list_checkpoints

    _model, ema = make()
    for tag in ("E0_U1000_S16000", "latest", "E0_U100_S1600", "E0_U20_S320", "E1_U200_S3200"):
        ema.save(tmp_path, tag)
    expected = ["E0_U20_S320", "E0_U100_S1600", "E0_U1000_S16000", "E1_U200_S3200", "latest"]
    assert [i.tag for i in list_checkpoints(tmp_path)] == expected
    assert cli_main(["inspect", str(tmp_path)]) == 0
    rows = [line.split()[1] for line in capsys.readouterr().out.splitlines()[1:6]]
    assert rows == expected


def test_inspect_of_a_run_folder_points_to_its_ema_folder(tmp_path, capsys):
    _model, ema = make()
    run = tmp_path / "runs" / "exp"
    ema.save(run / "ema", "latest")
    (run / "checkpoints" / "update_00000001").mkdir(parents=True)  # the trainer's own checkpoints
    assert cli_main(["inspect", str(run)]) == 0
    out = capsys.readouterr().out
    ema_dir = run / "ema"
    assert out.strip() == f"no EMA checkpoints under {run}; they are under {ema_dir}: shardema inspect {ema_dir}"
    assert cli_main(["inspect", str(tmp_path / "runs")]) == 0
    assert f"shardema inspect {run / 'ema'}" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["inspect", str(empty)]) == 0
    assert capsys.readouterr().out.strip() == f"no EMA checkpoints under {empty}"


def test_cli_runs_as_a_module(tmp_path):
    _model, ema = make()
    ema.save(tmp_path)
    result = subprocess.run([sys.executable, "-m", "shardema.cli", "inspect", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "latest" in result.stdout and "committed" in result.stdout


def test_tied_weights_are_stored_once_and_exported_under_every_name(tmp_path):
    from safetensors.torch import load_file

    from shardema import ShardedEMA, load_consolidated
    from shardema.checkpoint import consolidate_to_file

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(5, 3)
            self.head = torch.nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight  # tied, as in most language models

    model = Tied()
    ema = ShardedEMA(model, [0.5])
    assert [(t.fqn, t.aliases) for t in ema.tracked()] == [("embed.weight", ["head.weight"])]
    assert ema.shadow_bytes == 5 * 3 * 4  # one shadow for both names
    with torch.no_grad():
        model.embed.weight.add_(2.0)
    ema.update()
    expected = ema.shadow(0.5, (None, "embed.weight")).clone()
    ema.save(tmp_path, "latest")
    full = load_consolidated(tmp_path, 0.5)
    assert set(full) == {"embed.weight", "head.weight"}
    fresh = Tied()
    fresh.load_state_dict(full, strict=True)
    assert torch.equal(fresh.head.weight, expected) and torch.equal(fresh.embed.weight, expected)
    out = consolidate_to_file(tmp_path, 0.5, tmp_path / "export.safetensors")
    exported = load_file(str(out))
    assert torch.equal(exported["head.weight"], expected) and torch.equal(exported["embed.weight"], expected)
