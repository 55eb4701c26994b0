"""Tests that kill mutants of the checkpoint modules left alive by the other unit tests.

See docs/testing.md, "Mutation testing". Expected values come from the format's
description (docs/checkpoint-format.md, the notes of ``_manifest`` and ``_writer``):
directory names, which versions a reader may use, what an error message must name.
They are worked out by hand, never read back from the code under test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import shardema
from shardema.checkpoint import ManifestError, _manifest
from shardema.checkpoint._manifest import (
    Candidate,
    Version,
    find_candidates,
    read_manifest,
    validate_manifest,
    versions_of,
)

FACTORS = (0.9,)


class TwoPaths(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.b = nn.Linear(2, 1)


def _save(root: Path, paths, tag: str = "T", steps: int = 1) -> str:
    """Save an EMA of ``TwoPaths`` tracking ``paths``; return the save id."""
    torch.manual_seed(0)
    ema = shardema.ShardedEMA(TwoPaths(), FACTORS, model_paths=paths)
    for _ in range(steps):
        ema.update()
    ema.save(root, tag)
    label = "model" if paths is None else paths[0]
    return json.loads((root / label / f"cp={tag}" / "manifest.json").read_text())["save_id"]


def _manifest_dict(**changes) -> dict:
    """A valid manifest of one 4x3 float32 tensor stored whole by rank 0 of 1."""
    manifest = {
        "format": "shardema-ema", "format_version": 1, "save_id": "s", "tag": "latest", "model_path": None,
        "model_paths": [None], "step": 1, "schedule": {}, "factors": [0.9], "world_size": 1,
        "tensors": {"w": {"global_shape": [4, 3], "dtype": "float32"}},
        "files": [{"path": "ema=0.9/rank-00000-of-00001.safetensors", "factor": 0.9, "rank": 0, "size": 1,
                   "crc32": "00000000", "pieces": {"w": {"offset": [0, 0], "shape": [4, 3], "crc32": "0"}}}],
    }
    manifest.update(changes)
    return manifest


def _write_manifest(directory: Path, manifest) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "manifest.json"
    path.write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    return path


# ---------------------------------------------------------------------- schema error messages
def test_one_schema_error_names_the_dotted_field_and_nothing_more():
    bad = _manifest_dict()
    bad["tensors"]["w"]["dtype"] = "flaot32"
    with pytest.raises(ManifestError) as info:
        validate_manifest(bad, "M")
    message = str(info.value)
    assert message.startswith("M: field tensors.w.dtype: ")
    assert "more problem" not in message and not message.endswith(("None", "XX"))


def test_two_schema_errors_say_one_more():
    with pytest.raises(ManifestError, match=r"^M: field step: .*\(and 1 more problem\(s\)\)$"):
        validate_manifest(_manifest_dict(step=-1, world_size=0), "M")


def test_an_error_of_the_whole_manifest_is_at_the_top_level():
    # model_path must be one of model_paths: a check of the whole object, with no field location
    with pytest.raises(ManifestError, match=r"^M: field \(top level\): .*model_path 'x'"):
        validate_manifest(_manifest_dict(model_path="x"), "M")


@pytest.mark.parametrize(("offset", "shape"), [([0, 0], [12]), ([0], [4, 3])])
def test_a_piece_with_the_wrong_number_of_dims_is_named(offset, shape):
    bad = _manifest_dict()
    bad["files"][0]["pieces"]["w"].update(offset=offset, shape=shape)
    expected = f"'w' has offset \\{offset} and shape \\{shape}, but the tensor has 2 dims"
    with pytest.raises(ManifestError, match=expected):
        validate_manifest(bad, "M")


def _pieces_manifest(pieces, global_shape=(4, 3)) -> dict:
    """A manifest of tensor ``w`` whose piece number R (offset, shape) is stored by rank R."""
    n = len(pieces)
    files = [{"path": f"ema=0.9/rank-{r:05d}-of-{n:05d}.safetensors", "factor": 0.9, "rank": r, "size": 1,
              "crc32": "00000000", "pieces": {"w": {"offset": list(o), "shape": list(s), "crc32": "0"}}}
             for r, (o, s) in enumerate(pieces)]
    return _manifest_dict(world_size=max(n, 1), files=files,
                          tensors={"w": {"global_shape": list(global_shape), "dtype": "float32"}})


def test_an_overlap_names_both_pieces_with_offsets_and_shapes():
    with pytest.raises(ManifestError) as info:
        validate_manifest(_pieces_manifest([([0, 0], [3, 3]), ([2, 0], [2, 3])]), "M")
    assert str(info.value) == (
        "factor 0.9: the pieces of 'w' overlap: ema=0.9/rank-00000-of-00002.safetensors at offset [0, 0] shape "
        "[3, 3] and ema=0.9/rank-00001-of-00002.safetensors at offset [2, 0] shape [2, 3]")


# Overlapping pieces whose volumes add up to the tensor's (2 x 3), so only the overlap check can
# refuse them; the overlapping cells are worked out on a grid by hand.
OVERLAPS_WITHOUT_A_VOLUME_SURPLUS = {
    "same start, one inside the other": [([0, 1], [2, 2]), ([0, 1], [2, 1])],  # column 1 twice
    "shorter piece sorted last": [([0, 1], [2, 1]), ([0, 2], [2, 1]), ([0, 0], [1, 2])],  # cell (0, 1)
    "swept along the second dim": [([0, 2], [2, 1]), ([1, 0], [1, 2]), ([0, 1], [2, 1])],  # cell (1, 1)
}


@pytest.mark.parametrize("case", sorted(OVERLAPS_WITHOUT_A_VOLUME_SURPLUS))
def test_overlaps_are_found_whatever_the_order_and_sizes_of_the_pieces(case):
    with pytest.raises(ManifestError, match="overlap"):
        validate_manifest(_pieces_manifest(OVERLAPS_WITHOUT_A_VOLUME_SURPLUS[case], global_shape=(2, 3)))


def test_a_gap_names_the_factor_and_the_tensor():
    with pytest.raises(ManifestError, match=r"^factor 0.9: the pieces of 'w' do not tile its global shape \[4, 3\]: "
                       r"they cover 9 of 12 elements \(a gap\)$"):
        validate_manifest(_pieces_manifest([([0, 0], [3, 3])]))


def test_a_tensor_without_any_piece_is_a_gap():
    with pytest.raises(ManifestError, match="cover 0 of 12 elements"):
        validate_manifest(_pieces_manifest([]))


def test_a_one_element_tensor_without_its_piece_is_a_gap():
    with pytest.raises(ManifestError, match="cover 0 of 1 elements"):
        validate_manifest(_pieces_manifest([], global_shape=(1, 1)))
    validate_manifest(_pieces_manifest([([0, 0], [1, 1])], global_shape=(1, 1)))
    validate_manifest(_pieces_manifest([], global_shape=(0, 3)))  # nothing to store


def test_a_scalar_stored_twice_is_refused():
    with pytest.raises(ManifestError, match=r"factor 0.9: scalar 'w' is stored 2 times, expected once"):
        validate_manifest(_pieces_manifest([([], []), ([], [])], global_shape=()))


def test_a_manifest_that_is_no_object_is_named_manifest_by_default():
    with pytest.raises(ManifestError, match="^manifest is not a JSON object$"):
        validate_manifest([1, 2])


@pytest.mark.parametrize("path", [
    "ema=0.99/rank-00000-of-00001.safetensors",  # another factor's directory
    "ema=0.9/x/rank-00000-of-00001.safetensors",  # one level too deep
    "ema=0.9/rank-0-of-1.safetensors",  # not a rank file name
])
def test_a_file_path_must_be_its_factor_directory_and_a_rank_file(path):
    bad = _manifest_dict()
    bad["files"][0]["path"] = path
    with pytest.raises(ManifestError) as info:
        validate_manifest(bad, "M")
    assert str(info.value) == (f"M: file path {path!r} is not 'ema=<factor>/rank-RRRRR-of-WWWWW.safetensors' "
                               "(with its own factor)")


def test_a_file_listed_twice_is_named():
    bad = _manifest_dict()
    bad["files"].append(dict(bad["files"][0], rank=1))
    with pytest.raises(ManifestError, match=r"^M: file 'ema=0.9/rank-00000-of-00001.safetensors' is listed twice$"):
        validate_manifest(bad, "M")


def test_a_file_of_an_unsaved_factor_is_named():
    bad = _manifest_dict()
    bad["files"][0].update(factor=0.5, path="ema=0.5/rank-00000-of-00001.safetensors")
    with pytest.raises(ManifestError, match=r"^M: file '.*' has factor 0.5 not in \[0.9\]$"):
        validate_manifest(bad, "M")


def test_a_piece_of_an_unknown_tensor_is_named():
    bad = _manifest_dict()
    bad["files"][0]["pieces"]["v"] = dict(bad["files"][0]["pieces"]["w"])
    with pytest.raises(ManifestError, match=r"^M: file '.*' holds 'v', which is not in the tensor table$"):
        validate_manifest(bad, "M")


# ---------------------------------------------------------------------- reading a manifest file
def test_a_directory_without_manifest_says_so(tmp_path):
    with pytest.raises(ManifestError, match=r"manifest.json: no manifest \(the save did not commit\)"):
        read_manifest(tmp_path)


def test_the_size_limit_is_inclusive(tmp_path, monkeypatch):
    path = _write_manifest(tmp_path, _manifest_dict())
    size = path.stat().st_size
    monkeypatch.setattr(_manifest, "MAX_MANIFEST_BYTES", size)
    assert read_manifest(tmp_path)["save_id"] == "s"  # exactly at the limit: read
    monkeypatch.setattr(_manifest, "MAX_MANIFEST_BYTES", size - 1)
    with pytest.raises(ManifestError, match=f"{size} bytes, more than a manifest can be \\({size - 1}\\)"):
        read_manifest(tmp_path)


def test_unreadable_json_names_the_error_type_and_its_text(tmp_path):
    _write_manifest(tmp_path, "{not json")
    with pytest.raises(ManifestError, match=r"unreadable manifest \(JSONDecodeError: Expecting property name"):
        read_manifest(tmp_path)


def test_the_reason_of_an_unreadable_manifest_is_cut_at_200_characters(tmp_path, monkeypatch):
    _write_manifest(tmp_path, "{}")

    def loads(text):
        raise ValueError("x" * 300)

    monkeypatch.setattr(_manifest.json, "loads", loads)
    with pytest.raises(ManifestError) as info:
        read_manifest(tmp_path)
    assert str(info.value).endswith("(ValueError: " + "x" * 200 + ")")


# ---------------------------------------------------------------------- versions and candidates
def test_versions_of_lists_the_current_then_the_old_version_once_each(tmp_path):
    first = _save(tmp_path, ["a"])
    shutil.move(tmp_path / "a" / "cp=T", tmp_path / "a" / "cp=T.old")
    second = _save(tmp_path / "other", ["a"])
    shutil.move(tmp_path / "other" / "a" / "cp=T", tmp_path / "a" / "cp=T")
    problems: list[str] = []
    found = versions_of(tmp_path, "a", "T", problems)
    assert [(v.directory.name, v.save_id, v.model_path, v.tag) for v in found] == [
        ("cp=T", second, "a", "T"), ("cp=T.old", first, "a", "T")]
    assert problems == []
    # both versions are complete saves of ["a"]: two candidates, the current one first
    assert [c.save_id for c in find_candidates(tmp_path, ["a"], "T")] == [second, first]


def test_versions_of_reports_nothing_for_the_missing_old_name(tmp_path):
    save_id = _save(tmp_path, ["a"])
    problems: list[str] = []
    assert [v.save_id for v in versions_of(tmp_path, "a", "T", problems)] == [save_id]
    assert problems == []


def test_versions_of_looks_at_the_current_name_again(tmp_path, monkeypatch):
    """A commit renamed the new version in after the first look at ``cp=T``: the third look finds it."""
    save_id = _save(tmp_path, ["a"])
    real_is_dir = Path.is_dir
    missed: list[Path] = []

    def is_dir(self):
        if self.name == "cp=T" and not missed:
            missed.append(self)
            return False
        return real_is_dir(self)

    monkeypatch.setattr(Path, "is_dir", is_dir)
    assert [(v.directory.name, v.save_id) for v in versions_of(tmp_path, "a", "T")] == [("cp=T", save_id)]
    assert missed


def test_a_save_reached_from_two_model_paths_is_one_candidate_and_later_versions_still_count(tmp_path):
    both = _save(tmp_path, ["a", "b"])  # a/cp=T and b/cp=T
    only_b = _save(tmp_path / "other", ["b"])
    shutil.move(tmp_path / "other" / "b" / "cp=T", tmp_path / "b" / "cp=T.old")
    candidates = find_candidates(tmp_path, ["a", "b"], "T")
    assert [(c.save_id, sorted(c.versions)) for c in candidates] == [(both, ["a", "b"]), (only_b, ["b"])]


def test_an_incomplete_save_is_a_problem_only_without_a_complete_one(tmp_path):
    save_id = _save(tmp_path, ["a", "b"])
    shutil.rmtree(tmp_path / "b" / "cp=T")
    problems: list[str] = []
    assert find_candidates(tmp_path, ["a"], "T", problems) == []
    assert problems == [f"{tmp_path / 'a' / 'cp=T'}: incomplete save {save_id} (model path 'b' of the same save "
                        "was not committed)"]
    complete = _save(tmp_path / "other", ["a"])
    shutil.move(tmp_path / "other" / "a" / "cp=T", tmp_path / "a" / "cp=T.old")
    problems = []
    assert [c.save_id for c in find_candidates(tmp_path, ["a"], "T", problems)] == [complete]
    assert problems == []  # the incomplete version beside a complete one is the trace of a swap


def test_candidate_describe_lists_its_directories():
    versions = {mp: Version(mp, "T", Path(f"/r/{mp}/cp=T"), {"save_id": "s"}) for mp in ("a", "b")}
    assert Candidate("T", "s", versions).describe() == "/r/a/cp=T, /r/b/cp=T"


# ---------------------------------------------------------------------- the writer (docs/checkpoint-format.md)
def test_the_manifest_and_file_metadata_follow_the_format(tmp_path):
    from safetensors import safe_open

    torch.manual_seed(0)
    ema = shardema.ShardedEMA(TwoPaths(), FACTORS, buffers="average")
    ema.update()
    ema.save(tmp_path, "T")
    manifest = json.loads((tmp_path / "model" / "cp=T" / "manifest.json").read_text())
    assert manifest["buffers"] == "average"
    assert manifest["format_version"] == 2
    assert [sorted(f) for f in manifest["files"]] == [["factor", "header_crc32c", "path", "pieces", "rank", "size"]]
    pieces = manifest["files"][0]["pieces"].values()
    assert pieces and all(sorted(p) == ["crc32c", "offset", "shape"] for p in pieces)
    with safe_open(str(tmp_path / "model" / "cp=T" / manifest["files"][0]["path"]), "pt") as f:
        assert json.loads(f.metadata()["mesh_shapes"]) == []  # no DTensor: an empty list


def test_a_failed_write_commits_nothing_and_names_the_rank(tmp_path, monkeypatch):
    from shardema.checkpoint import _io

    first = _save(tmp_path, None)
    torch.manual_seed(1)
    ema = shardema.ShardedEMA(TwoPaths(), FACTORS)

    def write(self, name, tensor):
        raise OSError("simulated full disk")

    monkeypatch.setattr(_io.SafetensorsStreamWriter, "write", write)
    with pytest.raises(RuntimeError, match=r"failed \(rank 0: OSError: simulated full disk\); nothing was "
                                           r"committed") as info:
        ema.save(tmp_path, "T")
    assert isinstance(info.value.__cause__, OSError)
    assert json.loads((tmp_path / "model" / "cp=T" / "manifest.json").read_text())["save_id"] == first


def test_a_failed_commit_raises_with_its_cause(tmp_path, monkeypatch):
    from shardema.checkpoint import _writer

    def commit(*args):
        raise OSError("simulated rename failure")

    monkeypatch.setattr(_writer, "_commit", commit)
    torch.manual_seed(0)
    ema = shardema.ShardedEMA(TwoPaths(), FACTORS)
    with pytest.raises(RuntimeError, match="failed on rank 0: OSError: simulated rename failure") as info:
        ema.save(tmp_path, "T")
    assert isinstance(info.value.__cause__, OSError)


def test_delete_checkpoint_removes_the_tag_and_its_old_version_of_each_model_path(tmp_path):
    from shardema.checkpoint import delete_checkpoint

    _save(tmp_path, ["a", "b"], tag="U")
    _save(tmp_path, ["a", "b"])
    _save(tmp_path / "other", ["a"])
    shutil.move(tmp_path / "other" / "a" / "cp=T", tmp_path / "a" / "cp=T.old")  # a stranded old version
    removed = delete_checkpoint(tmp_path, "T", ["a"])
    assert sorted(removed) == [tmp_path / "a" / "cp=T", tmp_path / "a" / "cp=T.old"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir() if p.name.startswith("cp=")) == ["cp=U"]
    assert (tmp_path / "b" / "cp=T").is_dir()  # another model path: untouched


def test_cleanup_goes_on_past_a_tag_it_cannot_decide(tmp_path):
    from shardema.checkpoint._writer import cleanup_leftovers

    # tag A: only an incomplete old version (its partner in "b" is gone): left as is
    _save(tmp_path, ["a", "b"], tag="A")
    shutil.move(tmp_path / "a" / "cp=A", tmp_path / "a" / "cp=A.old")
    shutil.rmtree(tmp_path / "b" / "cp=A")
    # tag B: a complete current version and a complete old one: the old one goes
    _save(tmp_path, ["a"], tag="B")
    _save(tmp_path / "other", ["a"], tag="B")
    shutil.move(tmp_path / "other" / "a" / "cp=B", tmp_path / "a" / "cp=B.old")
    assert cleanup_leftovers(tmp_path, ["a"]) == [tmp_path / "a" / "cp=B.old"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir() if p.name.startswith("cp=")) == ["cp=A.old", "cp=B"]


# ---------------------------------------------------------------------- the reader
def test_overlapping_model_paths():
    from shardema.checkpoint._reader import _overlaps

    for a, b in [(None, "a"), ("a", None), ("a", "a"), ("a", "a.b"), ("a.b", "a")]:
        assert _overlaps(a, b), (a, b)
    for a, b in [("a", "b"), ("a", "ab"), ("ab", "a"), ("a.b", "a.c")]:
        assert not _overlaps(a, b), (a, b)


def test_a_save_of_another_model_path_is_no_mismatch(tmp_path):
    _save(tmp_path, ["b"], tag="latest")
    torch.manual_seed(2)
    assert shardema.ShardedEMA(TwoPaths(), FACTORS, model_paths=["a"]).resume(tmp_path) is None


def test_an_invalid_directory_name_does_not_hide_an_overlapping_save(tmp_path):
    _save(tmp_path, ["a"], tag="latest")
    (tmp_path / ".x").mkdir()  # sorts first, and is no model path
    torch.manual_seed(2)
    ema = shardema.ShardedEMA(TwoPaths(), FACTORS)
    with pytest.raises(shardema.checkpoint.CheckpointMismatchError, match=r"\(model paths \['a'\]\)"):
        ema.resume(tmp_path)


def test_every_structure_difference_is_listed(tmp_path):
    torch.manual_seed(0)
    model = TwoPaths()
    model.b = nn.Linear(2, 3)
    ema = shardema.ShardedEMA(model, FACTORS, model_paths=["b"])
    ema.save(tmp_path, "latest")
    torch.manual_seed(1)
    fresh = shardema.ShardedEMA(TwoPaths(), FACTORS, model_paths=["a", "b"])
    with pytest.raises(shardema.checkpoint.CheckpointMismatchError) as info:
        fresh.resume(tmp_path)
    message = str(info.value)
    assert "model path 'a' is tracked but not in cp=latest" in message
    assert "b: 'weight' has shape [1, 2] in the model but [3, 2] in cp=latest" in message


def test_verify_file_names_each_kind_of_damage(tmp_path):
    from shardema.checkpoint._reader import verify_file

    save_id = _save(tmp_path, None)
    directory = tmp_path / "model" / "cp=T"
    entry = json.loads((directory / "manifest.json").read_text())["files"][0]
    path = directory / entry["path"]
    assert verify_file(path, entry, save_id) is None
    size = path.stat().st_size
    assert verify_file(path, dict(entry, size=size + 1), save_id) == (
        f"{path}: size {size} bytes, the manifest says {size + 1} (truncated or overwritten)")
    fqn = next(iter(entry["pieces"]))
    changed = json.loads(json.dumps(entry))
    changed["pieces"][fqn]["crc32"] = "0"
    assert verify_file(path, changed, save_id) == f"{path}: piece {fqn!r} differs from the manifest"


def test_every_file_is_verified_not_only_the_first(tmp_path, caplog):
    torch.manual_seed(0)
    ema = shardema.ShardedEMA(TwoPaths(), (0.9, 0.99))
    ema.update()
    ema.save(tmp_path, "latest")
    manifest = json.loads((tmp_path / "model" / "cp=latest" / "manifest.json").read_text())
    last = tmp_path / "model" / "cp=latest" / manifest["files"][-1]["path"]
    raw = bytearray(last.read_bytes())
    raw[-1] ^= 0xFF  # same size, other checksum
    last.write_bytes(bytes(raw))
    torch.manual_seed(1)
    assert shardema.ShardedEMA(TwoPaths(), (0.9, 0.99)).resume(tmp_path) is None
    # Format 2: the data bytes are checked as they are read (the header still verifies).
    assert f"{last}: " in caplog.text and "fails its CRC-32C check" in caplog.text
    assert "the manifest says" in caplog.text


def test_a_candidate_that_moved_while_read_is_looked_up_again(tmp_path, monkeypatch, caplog):
    from shardema.checkpoint import _reader

    _save(tmp_path, None, tag="latest")
    real = _reader._unchanged
    calls = []

    def unchanged(candidate):
        calls.append(candidate)
        return real(candidate) and len(calls) > 2  # moved at the first check and at the recheck

    monkeypatch.setattr(_reader, "_unchanged", unchanged)
    caplog.set_level("INFO", logger="shardema")
    torch.manual_seed(1)
    assert shardema.ShardedEMA(TwoPaths(), FACTORS).resume(tmp_path) == "latest"
    assert "was replaced by a newer save while it was read" in caplog.text
    assert "a candidate moved while it was read (a save committed); looking again (attempt 2)" in caplog.text


def test_a_listing_error_is_raised_naming_it(tmp_path, monkeypatch):
    from shardema.checkpoint import _reader

    def discover(*args):
        raise PermissionError("simulated")

    monkeypatch.setattr(_reader, "_discover", discover)
    with pytest.raises(RuntimeError, match="failed on rank 0: PermissionError: simulated"):
        shardema.ShardedEMA(TwoPaths(), FACTORS).resume(tmp_path)


def test_an_unexpected_error_while_loading_is_raised_not_skipped(tmp_path, monkeypatch):
    from shardema.checkpoint import _reader

    _save(tmp_path, None, tag="latest")

    def load(*args):
        raise MemoryError("simulated")

    monkeypatch.setattr(_reader, "_load", load)
    with pytest.raises(MemoryError, match="simulated"):
        shardema.ShardedEMA(TwoPaths(), FACTORS).resume(tmp_path)


def test_the_sample_counters_are_restored(tmp_path):
    torch.manual_seed(0)
    ema = shardema.ShardedEMA(TwoPaths(), FACTORS)
    ema.update(num_samples=32)
    ema.update(num_samples=16)
    ema.save(tmp_path, "latest")
    fresh = shardema.ShardedEMA(TwoPaths(), FACTORS)
    assert fresh.resume(tmp_path) == "latest"
    assert fresh.samples_seen == 48
