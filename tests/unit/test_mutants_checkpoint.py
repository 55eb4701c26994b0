"""Tests that kill mutants of the checkpoint modules left alive by the other unit tests.

See docs/testing.md, "Mutation testing". Expected values come from the format's
description (docs/checkpoint-format.md, the notes of ``_manifest`` and ``_writer``):
directory names, which versions a reader may use, what an error message must name.
They are worked out by hand, never read back from the code under test.
"""

from __future__ import annotations

import json
import logging
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


def _logged(caplog, start: str) -> bool:
    """True when a shardema log record's whole message starts with ``start``."""
    return any(r.getMessage().startswith(start) for r in caplog.records if r.name.startswith("shardema"))


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


def test_a_failed_write_commits_nothing_and_names_the_rank(tmp_path, monkeypatch, caplog):
    from shardema.checkpoint import _io

    first = _save(tmp_path, None)
    torch.manual_seed(1)
    ema = shardema.ShardedEMA(TwoPaths(), FACTORS)

    def write(self, name, tensor):
        raise OSError("simulated full disk")

    monkeypatch.setattr(_io.SafetensorsStreamWriter, "write", write)
    with caplog.at_level(logging.ERROR, logger="shardema"), \
            pytest.raises(RuntimeError, match=rf"^saving the EMA checkpoint cp=T under {tmp_path} failed \(rank 0: "
                                              r"OSError: simulated full disk\); nothing was committed") as info:
        ema.save(tmp_path, "T")
    assert _logged(caplog, "writing EMA checkpoint T failed: simulated full disk")
    assert isinstance(info.value.__cause__, OSError)
    assert json.loads((tmp_path / "model" / "cp=T" / "manifest.json").read_text())["save_id"] == first


def test_a_failed_commit_raises_with_its_cause(tmp_path, monkeypatch):
    from shardema.checkpoint import _writer

    def commit(*args):
        raise OSError("simulated rename failure")

    monkeypatch.setattr(_writer, "_commit", commit)
    torch.manual_seed(0)
    ema = shardema.ShardedEMA(TwoPaths(), FACTORS)
    with pytest.raises(RuntimeError, match=rf"^committing the EMA checkpoint cp=T under {tmp_path} failed on "
                                           "rank 0: OSError: simulated rename failure") as info:
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


def test_delete_checkpoint_goes_on_past_a_model_path_without_a_directory(tmp_path, caplog):
    from shardema.checkpoint import delete_checkpoint

    _save(tmp_path, ["b"])  # "a" has no directory at all
    with caplog.at_level(logging.INFO, logger="shardema"):
        assert delete_checkpoint(tmp_path, "T", ["a", "b"]) == [tmp_path / "b" / "cp=T"]
    assert _logged(caplog, f"deleted EMA checkpoint cp=T under {tmp_path}")
    assert not (tmp_path / "b" / "cp=T").exists()


def test_deleting_two_versions_whose_trash_stays_behind_uses_two_trash_names(tmp_path, monkeypatch):
    from shardema.checkpoint import _writer, delete_checkpoint

    _save(tmp_path, ["a"])
    _save(tmp_path / "other", ["a"])
    shutil.move(tmp_path / "other" / "a" / "cp=T", tmp_path / "a" / "cp=T.old")
    monkeypatch.setattr(_writer.shutil, "rmtree", lambda *args, **kwargs: None)  # deleting fails silently
    removed = delete_checkpoint(tmp_path, "T", ["a"])
    assert sorted(removed) == [tmp_path / "a" / "cp=T", tmp_path / "a" / "cp=T.old"]
    trash = sorted(p.name for p in (tmp_path / "a").iterdir() if p.name.startswith("cp="))
    assert len(trash) == 2 and all(name.startswith("cp=T.tmp-deleting-") for name in trash), trash


def test_cleanup_brings_back_a_complete_old_version_and_reports_what_it_removed(tmp_path, caplog):
    from shardema.checkpoint._writer import cleanup_leftovers

    _save(tmp_path, ["a"], tag="T")
    shutil.move(tmp_path / "a" / "cp=T", tmp_path / "a" / "cp=T.old")
    (tmp_path / "a" / "cp=T").mkdir()  # a current version without manifest: incomplete
    (tmp_path / "a" / "cp=T.tmp-abc").mkdir()  # a crashed save's staging directory
    with caplog.at_level(logging.INFO, logger="shardema"):
        removed = cleanup_leftovers(tmp_path, ["a"])
    assert removed == [tmp_path / "a" / "cp=T.tmp-abc", tmp_path / "a" / "cp=T"]
    assert (tmp_path / "a" / "cp=T" / "manifest.json").is_file() and not (tmp_path / "a" / "cp=T.old").exists()
    assert _logged(caplog, f"removed leftovers of interrupted saves: {tmp_path / 'a' / 'cp=T.tmp-abc'}, "
                           f"{tmp_path / 'a' / 'cp=T'}")


def test_cleanup_leaves_files_and_versions_without_an_old_one_alone(tmp_path, caplog):
    from shardema.checkpoint._writer import cleanup_leftovers

    label = tmp_path / "a"
    label.mkdir()
    (label / "cp=T.tmp-abc").write_text("not a directory")
    (label / "cp=C").mkdir()  # a damaged current version without an old one: not cleanup's business
    with caplog.at_level(logging.INFO, logger="shardema"):
        assert cleanup_leftovers(tmp_path, ["a"]) == []
    assert (label / "cp=T.tmp-abc").is_file() and (label / "cp=C").is_dir()
    assert caplog.text == ""


def test_an_undecidable_tag_is_named_in_the_warning(tmp_path, caplog):
    from shardema.checkpoint._writer import cleanup_leftovers

    label = tmp_path / "a"
    (label / "cp=A.old").mkdir(parents=True)  # no manifest in either version
    with caplog.at_level(logging.WARNING, logger="shardema"):
        assert cleanup_leftovers(tmp_path, ["a"]) == []
    assert _logged(caplog, f"cannot tell which version of tag 'A' under {tmp_path} is complete; leaving it as is")


def test_a_save_logs_its_step_root_and_directory_and_records_its_model_path(tmp_path, caplog):
    from safetensors import safe_open

    torch.manual_seed(0)
    ema = shardema.ShardedEMA(TwoPaths(), FACTORS, model_paths=["a"], shadow_dtype="live")
    ema.update()
    with caplog.at_level(logging.INFO, logger="shardema"):
        ema.save(tmp_path, "T")
    assert _logged(caplog, f"saved EMA step 1 to {tmp_path} (cp=T) in ")
    manifest = json.loads((tmp_path / "a" / "cp=T" / "manifest.json").read_text())
    assert manifest["shadow_dtype"] is None  # "live": each tensor's own dtype
    with safe_open(str(tmp_path / "a" / "cp=T" / manifest["files"][0]["path"]), "pt") as f:
        assert f.metadata()["model_path"] == '"a"'


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


# ---------------------------------------------------------------------- resharding from hand-made rank files
def _crc32c_hex(data: bytes) -> str:
    import crc32c

    return f"{crc32c.crc32c(data) & 0xFFFFFFFF:08x}"


def _write_rank_file(path: Path, tensors: dict, offsets: dict, save_id: str) -> dict:
    """One rank file of a format-2 save (docs/checkpoint-format.md), written with safetensors itself."""
    from safetensors.torch import save_file

    pieces = {name: {"offset": offsets[name], "shape": list(t.shape)} for name, t in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "shardema-ema", "format_version": "2", "save_id": save_id,
                                            "tensors": json.dumps(pieces)})
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    return {"size": len(data), "header_crc32c": _crc32c_hex(data[:header_end]),
            "pieces": {name: dict(pieces[name], crc32c=_crc32c_hex(t.contiguous().view(torch.uint8).numpy().tobytes()))
                       for name, t in tensors.items()}}


def _as_two_ranks(cp_dir: Path) -> dict:
    """Rewrite a one-rank save of ``TwoPaths`` (one factor) as a save of 2 ranks; return the saved tensors.

    Rank 0 holds row 0 of ``a.weight`` only; rank 1 holds row 1 of ``a.weight`` and every other tensor
    whole, so the first file lacks most tensors and ``a.weight`` has two pieces.
    """
    from safetensors.torch import load_file

    manifest_path = cp_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    (entry,) = manifest["files"]
    saved = load_file(str(cp_dir / entry["path"]))
    (cp_dir / entry["path"]).unlink()
    weight = saved["a.weight"]
    layout = {0: ({"a.weight": weight[:1].clone()}, {"a.weight": [0, 0]}),
              1: ({"a.weight": weight[1:].clone(), **{k: v for k, v in saved.items() if k != "a.weight"}},
                  {"a.weight": [1, 0], **{k: [0] * v.dim() for k, v in saved.items() if k != "a.weight"}})}
    files = []
    for rank, (tensors, offsets) in layout.items():
        path = f"ema=0.9/rank-0000{rank}-of-00002.safetensors"
        files.append({"path": path, "factor": 0.9, "rank": rank,
                      **_write_rank_file(cp_dir / path, tensors, offsets, manifest["save_id"])})
    manifest.update(world_size=2, files=files)
    manifest_path.write_text(json.dumps(manifest))
    return saved


def _two_rank_save(root: Path) -> dict:
    torch.manual_seed(0)
    ema = shardema.ShardedEMA(TwoPaths(), FACTORS)
    ema.update()
    ema.save(root, "latest")
    return _as_two_ranks(root / "model" / "cp=latest")


def test_one_rank_resumes_a_save_of_two_ranks_whose_files_hold_different_tensors(tmp_path):
    saved = _two_rank_save(tmp_path)
    torch.manual_seed(1)
    fresh = shardema.ShardedEMA(TwoPaths(), FACTORS)
    assert fresh.resume(tmp_path, strict=True) == "latest"
    for fqn, value in saved.items():
        assert torch.equal(fresh.shadow(0.9, (None, fqn)), value), fqn


class _RankOfTwo:
    """What rank 1 of a 2-way row split of ``a.weight`` (and nothing else) asks a load for."""

    def __init__(self, offset, shape):
        from types import SimpleNamespace

        self.t = SimpleNamespace(model_path=None, fqn="a.weight", key=(None, "a.weight"), blended=True,
                                 global_offset=tuple(offset), local_shape=tuple(shape),
                                 local_numel=shape[0] * shape[1])
        self.shadow_tensor = torch.full(tuple(shape), float("nan"))

    def tracked(self, model_paths=None):
        return [self.t]

    def shadow(self, k, key):
        assert (k, key) == (0, (None, "a.weight"))
        return self.shadow_tensor


def test_a_rank_reads_only_its_rows_at_their_offset(tmp_path):
    from shardema.checkpoint import _reader

    saved = _two_rank_save(tmp_path)
    (candidate,) = find_candidates(tmp_path, [None], "latest")
    ema = shardema.ShardedEMA(TwoPaths(), FACTORS)
    second = _RankOfTwo([1, 0], [1, 2])  # row 1: only rank 1's piece overlaps it
    reads = _reader.plan_reads(ema, second, candidate)
    assert [(path.name, piece["offset"]) for path, plan in reads.items() for _, _, piece, _ in plan] == [
        ("rank-00001-of-00002.safetensors", [1, 0])]
    _reader._load(ema, second, candidate)
    assert torch.equal(second.shadow_tensor, saved["a.weight"][1:])


def test_a_rank_reads_the_part_of_a_piece_it_overlaps_at_the_piece_s_own_offset(tmp_path):
    """A partial overlap (after resharding): the piece is read whole, then cut at (start - piece offset)."""
    from shardema.checkpoint import _reader

    saved = _two_rank_save(tmp_path)
    (candidate,) = find_candidates(tmp_path, [None], "latest")
    ema = shardema.ShardedEMA(TwoPaths(), FACTORS)
    corner = _RankOfTwo([1, 1], [1, 1])  # row 1, column 1: inside rank 1's piece at offset [1, 0]
    _reader._load(ema, corner, candidate)
    assert torch.equal(corner.shadow_tensor, saved["a.weight"][1:, 1:])


def test_pieces_that_do_not_cover_a_rank_are_a_bug_naming_the_counts(tmp_path):
    from shardema.checkpoint import _reader

    _two_rank_save(tmp_path)
    (candidate,) = find_candidates(tmp_path, [None], "latest")
    ema = shardema.ShardedEMA(TwoPaths(), FACTORS)
    with pytest.raises(AssertionError, match=r"^'a.weight': saved pieces cover 4 of 6 local elements$"):
        _reader.plan_reads(ema, _RankOfTwo([0, 0], [3, 2]), candidate)


def _data_starts(path: Path) -> dict:
    """FQN -> offset in the file of its bytes, from the safetensors header (8-byte length, JSON)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    return {name: 8 + n + info["data_offsets"][0] for name, info in header.items() if name != "__metadata__"}


def test_each_piece_is_read_once_and_a_copied_tensor_from_the_first_factor_only(tmp_path, monkeypatch):
    from shardema.checkpoint import _reader

    def model():
        return nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))

    torch.manual_seed(0)
    ema = shardema.ShardedEMA(model(), (0.9, 0.99))  # buffers="copy": the BatchNorm buffers are copied
    ema.update()
    ema.save(tmp_path, "latest")
    cp = tmp_path / "model" / "cp=latest"
    starts = {d: _data_starts(next((cp / d).iterdir())) for d in ("ema=0.9", "ema=0.99")}
    blended = ["0.weight", "0.bias", "1.weight", "1.bias"]
    copied = ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    expected = sorted([("ema=0.9", starts["ema=0.9"][n]) for n in blended + copied]
                      + [("ema=0.99", starts["ema=0.99"][n]) for n in blended])
    reads = []
    real = _reader.read_exactly

    def read_exactly(f, offset, into, path, hashed=None):
        reads.append((path.parent.name, offset))
        return real(f, offset, into, path, hashed)

    monkeypatch.setattr(_reader, "read_exactly", read_exactly)
    torch.manual_seed(1)
    assert shardema.ShardedEMA(model(), (0.9, 0.99)).resume(tmp_path) == "latest"
    assert sorted(reads) == expected


def test_a_candidate_deleted_while_read_is_not_adopted(tmp_path, monkeypatch):
    from shardema.checkpoint import _reader

    _save(tmp_path, None, tag="latest")
    real = _reader._load

    def load_then_delete(ema, load, candidate):
        real(ema, load, candidate)
        shutil.rmtree(tmp_path / "model" / "cp=latest")  # deleted by another job meanwhile

    monkeypatch.setattr(_reader, "_load", load_then_delete)
    torch.manual_seed(1)
    fresh = shardema.ShardedEMA(TwoPaths(), FACTORS)
    assert fresh.resume(tmp_path) is None
    assert fresh.step == 0


def test_a_candidate_replaced_while_read_gives_way_to_the_new_save(tmp_path, monkeypatch):
    from shardema.checkpoint import _reader

    _save(tmp_path, None, tag="latest")
    torch.manual_seed(5)
    newer = shardema.ShardedEMA(TwoPaths(), FACTORS)
    for _ in range(3):
        newer.update()
    real = _reader._load
    calls = []

    def load_then_commit(ema, load, candidate):
        real(ema, load, candidate)
        calls.append(candidate.save_id)
        if len(calls) == 1:
            newer.save(tmp_path, "latest")  # another job commits a newer save of the tag meanwhile

    monkeypatch.setattr(_reader, "_load", load_then_commit)
    torch.manual_seed(1)
    fresh = shardema.ShardedEMA(TwoPaths(), FACTORS)
    assert fresh.resume(tmp_path) == "latest"
    assert len(calls) == 2 and calls[0] != calls[1]
    assert fresh.step == 3
    for t in newer.tracked():
        assert torch.equal(fresh.shadow(0.9, t.key), newer.shadow(0.9, t.key)), t.fqn


def test_a_label_of_other_model_paths_does_not_hide_an_overlapping_save(tmp_path):
    _save(tmp_path, ["a"], tag="latest")  # "a" sorts before "model" and does not overlap "b"
    _save(tmp_path, None, tag="latest")
    torch.manual_seed(2)
    ema = shardema.ShardedEMA(TwoPaths(), FACTORS, model_paths=["b"])
    with pytest.raises(shardema.checkpoint.CheckpointMismatchError, match=r"\(model paths \['model'\]\)"):
        ema.resume(tmp_path)


def test_a_directory_that_is_no_model_path_adds_nothing_to_the_overlap_listing(tmp_path):
    _save(tmp_path, ["a"], tag="latest")
    shutil.copytree(tmp_path / "a", tmp_path / "a copy")  # a copy under a name that is no model path
    torch.manual_seed(2)
    with pytest.raises(shardema.checkpoint.CheckpointMismatchError) as info:
        shardema.ShardedEMA(TwoPaths(), FACTORS).resume(tmp_path)
    assert str(info.value).count("(model paths ['a'])") == 1


# ---------------------------------------------------------------------- verify_file against hand-made files
def _hand_made_file(path: Path, metadata: dict) -> dict:
    """A safetensors file of one 2x2 float32 tensor ``w`` with ``metadata``; its format-2 manifest entry."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.arange(4.0).reshape(2, 2)}, str(path), metadata=metadata)
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    return {"path": "ema=0.9/rank-00000-of-00001.safetensors", "factor": 0.9, "rank": 0, "size": len(data),
            "header_crc32c": _crc32c_hex(data[:header_end]),
            "pieces": {"w": {"offset": [0, 0], "shape": [2, 2],
                             "crc32c": _crc32c_hex(torch.arange(4.0).numpy().tobytes())}}}


def _w_metadata(**pieces) -> dict:
    return {"save_id": "s", "tensors": json.dumps({"w": {"offset": [0, 0], "shape": [2, 2]}, **pieces})}


def test_verify_file_checks_the_header_checksum(tmp_path):
    from shardema.checkpoint._reader import verify_file

    path = tmp_path / "f.safetensors"
    entry = _hand_made_file(path, dict(_w_metadata(), tag="AB"))
    assert verify_file(path, entry, "s") is None
    data = bytearray(path.read_bytes())
    at = data.index(b'"AB"')
    data[at + 1:at + 3] = b"BA"  # same size, other metadata
    path.write_bytes(bytes(data))
    got = _crc32c_hex(bytes(data[:8 + int.from_bytes(data[:8], "little")]))
    assert got != entry["header_crc32c"]
    assert verify_file(path, entry, "s") == (
        f"{path}: header CRC-32C {got}, the manifest says {entry['header_crc32c']} (corrupt)")


def test_verify_file_names_the_save_a_file_belongs_to(tmp_path):
    from shardema.checkpoint._reader import verify_file

    path = tmp_path / "f.safetensors"
    entry = _hand_made_file(path, _w_metadata())
    assert verify_file(path, entry, "other") == f"{path}: belongs to save 's', not 'other'"


def test_verify_file_compares_each_piece_with_the_header(tmp_path):
    from shardema.checkpoint._reader import verify_file

    path = tmp_path / "f.safetensors"
    entry = _hand_made_file(path, _w_metadata())
    moved = json.loads(json.dumps(entry))
    moved["pieces"]["w"]["offset"] = [1, 0]  # the header says [0, 0]; its shape agrees
    assert verify_file(path, moved, "s") == f"{path}: piece 'w' differs from the manifest"
    # metadata without a piece table: every piece differs
    bare = _hand_made_file(path, {"save_id": "s"})
    assert verify_file(path, bare, "s") == f"{path}: piece 'w' differs from the manifest"
    # a piece the metadata lists but the file does not hold
    ghost = _hand_made_file(path, _w_metadata(ghost={"offset": [0], "shape": [1]}))
    ghost["pieces"]["ghost"] = {"offset": [0], "shape": [1], "crc32c": "00000000"}
    assert verify_file(path, ghost, "s") == f"{path}: piece 'ghost' differs from the manifest"


def test_verify_file_names_the_file_inside_an_unreadable_header(tmp_path):
    from shardema.checkpoint._reader import verify_file

    path = tmp_path / "f.safetensors"
    entry = _hand_made_file(path, _w_metadata())
    data = bytearray(path.read_bytes())
    data[:8] = (len(data)).to_bytes(8, "little")  # a header longer than the file
    path.write_bytes(bytes(data))
    problem = verify_file(path, entry, "s")
    assert problem is not None and problem.startswith(f"{path}: unreadable (ValueError: {path}: header length ")


def test_structure_differences_of_one_process_compare_its_own_tensors(tmp_path):
    from shardema.checkpoint._reader import structure_differences

    _save(tmp_path, ["b"], tag="latest")
    (candidate,) = find_candidates(tmp_path, ["b"], "latest")
    assert structure_differences(shardema.ShardedEMA(TwoPaths(), FACTORS, model_paths=["b"]), candidate) == []
    model = TwoPaths()
    model.b = nn.Linear(2, 3)
    assert structure_differences(shardema.ShardedEMA(model, FACTORS, model_paths=["b"]), candidate) == [
        "b: 'weight' has shape [3, 2] in the model but [1, 2] in cp=latest",
        "b: 'bias' has shape [3] in the model but [1] in cp=latest"]


def test_the_mismatch_error_lists_one_difference_a_line_then_the_hint(tmp_path):
    _save(tmp_path, ["b"], tag="latest")
    model = TwoPaths()
    model.b = nn.Linear(2, 3)
    with pytest.raises(shardema.checkpoint.CheckpointMismatchError) as info:
        shardema.ShardedEMA(model, FACTORS, model_paths=["b"]).resume(tmp_path)
    assert str(info.value) == (
        f"the EMA checkpoint {tmp_path / 'b' / 'cp=latest'} does not match this EMA (2 difference(s)):\n"
        "  b: 'weight' has shape [3, 2] in the model but [1, 2] in cp=latest\n"
        "  b: 'bias' has shape [3] in the model but [1] in cp=latest\n"
        "resume with the model and EMA options used for saving, or save to a new root")


def test_a_skipped_candidate_is_logged_with_every_problem(tmp_path, caplog):
    torch.manual_seed(0)
    ema = shardema.ShardedEMA(TwoPaths(), (0.9, 0.99))
    ema.update()
    ema.save(tmp_path, "latest")
    cp = tmp_path / "model" / "cp=latest"
    paths = [cp / "ema=0.9" / "rank-00000-of-00001.safetensors", cp / "ema=0.99" / "rank-00000-of-00001.safetensors"]
    sizes = [p.stat().st_size for p in paths]
    for p in paths:
        with open(p, "ab") as f:
            f.write(b"\0")
    assert shardema.ShardedEMA(TwoPaths(), (0.9, 0.99)).resume(tmp_path) is None
    problems = [f"{p}: size {s + 1} bytes, the manifest says {s} (truncated or overwritten)"
                for p, s in zip(paths, sizes)]
    assert f"skipping EMA checkpoint {cp}: {problems[0]}; {problems[1]}" in caplog.messages


def test_a_piece_failing_its_checksum_is_logged_with_the_rank_and_the_error_type(tmp_path, caplog):
    _save(tmp_path, None, tag="latest")
    cp = tmp_path / "model" / "cp=latest"
    path = cp / "ema=0.9" / "rank-00000-of-00001.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # the last piece's data: the header still verifies
    path.write_bytes(bytes(raw))
    assert shardema.ShardedEMA(TwoPaths(), FACTORS).resume(tmp_path) is None
    skipped = [m for m in caplog.messages if m.startswith("skipping EMA checkpoint")]
    assert len(skipped) == 1 and skipped[0].startswith(f"skipping EMA checkpoint {cp}: rank 0: ValueError: {path}: ")
    assert f"{path}: 'b.bias' fails its CRC-32C check" in skipped[0]  # the last tensor of the file


def test_two_versions_of_one_step_are_tried_current_then_old(tmp_path):
    from shardema.checkpoint._reader import _discover

    new_id = _save(tmp_path, None, tag="latest")
    old_id = _save(tmp_path / "other", None, tag="latest")  # the same step
    shutil.move(tmp_path / "other" / "model" / "cp=latest", tmp_path / "model" / "cp=latest.old")
    candidates, problems = _discover(tmp_path, [None], ("latest",))
    assert [(c.save_id, c.versions[None].directory.name) for c in candidates] == [
        (new_id, "cp=latest"), (old_id, "cp=latest.old")]
    assert problems == []


def test_saves_of_other_model_paths_do_not_matter_when_ours_exist(tmp_path):
    _save(tmp_path, ["a"], tag="latest")
    _save(tmp_path, None, tag="latest")  # overlaps "a", in another directory
    torch.manual_seed(2)
    assert shardema.ShardedEMA(TwoPaths(), FACTORS, model_paths=["a"]).resume(tmp_path) == "latest"


def test_the_overlap_error_lists_every_save_of_the_other_model_paths(tmp_path):
    _save(tmp_path, None, tag="latest")
    _save(tmp_path, None, tag="last")
    torch.manual_seed(2)
    with pytest.raises(shardema.checkpoint.CheckpointMismatchError) as info:
        shardema.ShardedEMA(TwoPaths(), FACTORS, model_paths=["a"]).resume(tmp_path)
    assert str(info.value) == (
        f"no EMA checkpoint for model paths ['a'] under {tmp_path}, but there are checkpoints of overlapping model "
        f"paths: {tmp_path / 'model' / 'cp=latest'} (model paths ['model']); {tmp_path / 'model' / 'cp=last'} "
        "(model paths ['model']); resume with the model paths used for saving, or save to a new root")


def test_a_save_of_two_model_paths_is_listed_once_by_the_overlap_error(tmp_path):
    _save(tmp_path, ["a", "b"], tag="latest")  # one save, found under a/ and under b/
    torch.manual_seed(2)
    with pytest.raises(shardema.checkpoint.CheckpointMismatchError) as info:
        shardema.ShardedEMA(TwoPaths(), FACTORS).resume(tmp_path)  # the whole model overlaps both
    assert str(info.value) == (
        f"no EMA checkpoint for model paths ['model'] under {tmp_path}, but there are checkpoints of overlapping "
        f"model paths: {tmp_path / 'a' / 'cp=latest'}, {tmp_path / 'b' / 'cp=latest'} (model paths ['a', 'b']); "
        "resume with the model paths used for saving, or save to a new root")


def test_a_directory_without_a_valid_manifest_is_logged_as_ignored(tmp_path, caplog):
    _save(tmp_path, None, tag="last")
    _write_manifest(tmp_path / "model" / "cp=latest", "{")
    torch.manual_seed(2)
    assert shardema.ShardedEMA(TwoPaths(), FACTORS).resume(tmp_path) == "last"
    ignored = [m for m in caplog.messages if m.startswith("ignoring ")]
    assert len(ignored) == 1 and ignored[0].startswith(f"ignoring {tmp_path / 'model' / 'cp=latest' / 'manifest.json'}")


def test_the_samples_since_the_last_firing_are_restored(tmp_path):
    from shardema.config import DecaySchedule

    torch.manual_seed(0)
    ema = shardema.ShardedEMA(TwoPaths(), FACTORS, schedule=DecaySchedule(update_every=4))
    for _ in range(3):
        ema.update(num_samples=10)
    pending = ema.counters()["samples_pending"]
    assert pending in (20.0, 30.0)  # the first call or none of them fired
    ema.save(tmp_path, "latest")
    fresh = shardema.ShardedEMA(TwoPaths(), FACTORS, schedule=DecaySchedule(update_every=4))
    assert fresh.resume(tmp_path) == "latest"
    assert fresh.counters() == {"samples_seen": 30.0, "samples_pending": pending}


def test_a_full_verification_names_the_corrupt_piece_and_both_checksums(tmp_path):
    from shardema.checkpoint._reader import verify_file

    path = tmp_path / "f.safetensors"
    entry = _hand_made_file(path, _w_metadata())
    assert verify_file(path, entry, "s", full=True) is None
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the last byte of w's data
    path.write_bytes(bytes(data))
    assert verify_file(path, entry, "s") is None  # the header alone still verifies
    got = _crc32c_hex(bytes(data[-16:]))
    assert verify_file(path, entry, "s", full=True) == (
        f"{path}: piece 'w' has CRC-32C {got}, the manifest says {entry['pieces']['w']['crc32c']} (corrupt)")


def test_a_tensor_without_elements_does_not_stop_the_load_of_the_next_ones(tmp_path):
    def model():
        m = nn.Module()
        m.empty = nn.Parameter(torch.zeros(0, 3))  # registered first
        m.w = nn.Parameter(torch.randn(2, 3))
        return m

    torch.manual_seed(0)
    ema = shardema.ShardedEMA(model(), FACTORS)
    ema.save(tmp_path, "latest")
    torch.manual_seed(1)
    fresh = shardema.ShardedEMA(model(), FACTORS)
    assert fresh.resume(tmp_path) == "latest"
    assert torch.equal(fresh.shadow(0.9, (None, "w")), ema.shadow(0.9, (None, "w")))


# ---------------------------------------------------------------------- the writer: rank 0's visibility check
def _reported(root: Path, sizes: dict) -> list:
    """Entries of files ranks 0.. reported for model path "a" of save "s" of tag T; ``sizes``: name -> bytes."""
    staging = root / "a" / "cp=T.tmp-s" / "ema=0.9"
    staging.mkdir(parents=True, exist_ok=True)
    return [{"model_path": "a", "path": f"ema=0.9/{name}", "rank": rank, "size": size}
            for rank, (name, size) in enumerate(sizes.items())]


def test_rank_0_names_every_file_it_cannot_see_at_its_size(tmp_path):
    from shardema.checkpoint._writer import _check_visible

    names = [f"rank-0000{r}-of-00006.safetensors" for r in range(6)]
    entries = _reported(tmp_path, dict.fromkeys(names, 8))
    (tmp_path / "a" / "cp=T.tmp-s" / "ema=0.9" / names[0]).write_bytes(b"12345678")  # visible, right size
    (tmp_path / "a" / "cp=T.tmp-s" / "ema=0.9" / names[1]).write_bytes(b"123")  # visible, other size
    with pytest.raises(FileNotFoundError) as info:
        _check_visible(tmp_path, {"tag": "T", "save_id": "s"}, entries)
    assert str(info.value) == (
        f"rank 0 cannot see files the other ranks wrote under {tmp_path}: ema=0.9/{names[1]} of rank 1 (3 bytes), "
        f"ema=0.9/{names[2]} of rank 2 (missing), ema=0.9/{names[3]} of rank 3 (missing), ema=0.9/{names[4]} of "
        "rank 4 (missing) and 1 more. The checkpoint root must be one shared file system that every rank sees at "
        "its path (not a node-local directory)")


def test_four_invisible_files_are_all_shown(tmp_path):
    from shardema.checkpoint._writer import _check_visible

    names = [f"rank-0000{r}-of-00004.safetensors" for r in range(4)]
    entries = _reported(tmp_path, dict.fromkeys(names, 8))
    with pytest.raises(FileNotFoundError) as info:
        _check_visible(tmp_path, {"tag": "T", "save_id": "s"}, entries)
    shown = ", ".join(f"ema=0.9/{n} of rank {r} (missing)" for r, n in enumerate(names))
    assert str(info.value).startswith(f"rank 0 cannot see files the other ranks wrote under {tmp_path}: {shown}. ")
    _check_visible(tmp_path, {"tag": "T", "save_id": "s"}, [])  # nothing reported: nothing to see


def test_the_manifest_records_the_save_time_the_mesh_shapes_and_the_shadow_dtype(tmp_path):
    import time

    before = time.time()
    _save(tmp_path, None, tag="T")
    manifest = json.loads((tmp_path / "model" / "cp=T" / "manifest.json").read_text())
    assert before <= manifest["created_unix"] <= time.time()
    assert manifest["mesh_shapes"] == []  # no DTensor
    assert manifest["shadow_dtype"] == "float32"  # the default shadow dtype


def test_a_save_in_another_dtype_stores_the_averaged_tensors_in_it_and_copies_as_they_are(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    ema = shardema.ShardedEMA(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), FACTORS)
    ema.update()
    ema.save(tmp_path, "T", dtype=torch.bfloat16)
    cp = tmp_path / "model" / "cp=T"
    stored = load_file(str(cp / "ema=0.9" / "rank-00000-of-00001.safetensors"))
    assert stored["0.weight"].dtype == torch.bfloat16
    assert torch.equal(stored["0.weight"], ema.shadow(0.9, (None, "0.weight")).to(torch.bfloat16))
    assert stored["1.running_mean"].dtype == torch.float32  # copied: as it is
    assert stored["1.num_batches_tracked"].dtype == torch.int64
    tensors = json.loads((cp / "manifest.json").read_text())["tensors"]
    assert (tensors["0.weight"]["dtype"], tensors["1.running_mean"]["dtype"]) == ("bfloat16", "float32")


def test_the_file_metadata_names_format_rank_and_every_piece_field(tmp_path):
    from safetensors import safe_open

    _save(tmp_path, None, tag="T")
    with safe_open(str(tmp_path / "model" / "cp=T" / "ema=0.9" / "rank-00000-of-00001.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert (metadata["format"], metadata["format_version"], metadata["rank"], metadata["world_size"]) == (
        "shardema-ema", "2", "0", "1")
    pieces = json.loads(metadata["tensors"])
    assert sorted(pieces["a.weight"]) == ["blended", "dtype", "global_shape", "is_buffer", "mesh_shape", "offset",
                                          "placements", "shape"]
    assert (pieces["a.weight"]["is_buffer"], pieces["a.weight"]["placements"]) == (False, None)


def test_cleanup_goes_on_past_a_model_path_without_a_directory(tmp_path, caplog):
    from shardema.checkpoint._writer import cleanup_leftovers

    staging = tmp_path / "b" / "cp=T.tmp-0123"
    staging.mkdir(parents=True)
    caplog.set_level("INFO", logger="shardema")
    assert cleanup_leftovers(tmp_path, ["a", "b"]) == [staging]  # "a" has no directory
    assert not staging.exists()
    assert f"removed leftovers of interrupted saves: {staging}" in caplog.messages


# ---------------------------------------------------------------------- asynchronous saves (checkpoint/_async.py)
def test_an_asynchronous_save_reports_its_tag_to_wait_and_to_finish(tmp_path):
    torch.manual_seed(0)
    ema = shardema.ShardedEMA(TwoPaths(), FACTORS)
    ema.update()
    handle = ema.save(tmp_path, "T", blocking=False)
    assert handle.wait() == "T"
    assert handle.finish() == "T"  # already seen by wait(): the tag again, no error
    assert isinstance(handle.staging_seconds, float) and handle.staging_seconds >= 0
    manifest = json.loads((tmp_path / "model" / "cp=T" / "manifest.json").read_text())
    assert (manifest["shadow_dtype"], manifest["buffers"]) == ("float32", "copy")


def test_the_staged_ema_answers_like_the_ema(tmp_path):
    from shardema.checkpoint._async import StagedEMA

    torch.manual_seed(0)
    ema = shardema.ShardedEMA(TwoPaths(), FACTORS, model_paths=["a", "b"])
    staged = StagedEMA(ema, ema.store.stage(None, pin_memory=False), None)
    assert [t.fqn for t in staged.tracked(["b"])] == ["weight", "bias"]
    assert [t.key for t in staged.tracked()] == [t.key for t in ema.tracked()]
    assert torch.equal(staged.shadow(0.9, ("a", "weight")), ema.shadow(0.9, ("a", "weight")))
    with pytest.raises(ValueError, match=r"^factor 0\.5 is not one of this EMA's target factors \[0\.9\]$"):
        staged.shadow(0.5, ("a", "weight"))


def test_an_asynchronous_save_in_another_dtype_and_its_staging_time(tmp_path):
    import time

    from safetensors.torch import load_file

    torch.manual_seed(0)
    ema = shardema.ShardedEMA(TwoPaths(), FACTORS)
    ema.update()
    before = time.perf_counter()
    handle = ema.save(tmp_path, "T", blocking=False, dtype=torch.bfloat16)
    elapsed = time.perf_counter() - before
    assert 0 <= handle.staging_seconds <= elapsed  # a part of the call, measured inside it
    assert handle.wait() == "T"
    stored = load_file(str(tmp_path / "model" / "cp=T" / "ema=0.9" / "rank-00000-of-00001.safetensors"))
    assert stored["a.weight"].dtype == torch.bfloat16


# ---------------------------------------------------------------------- checksums (checkpoint/_checksum.py)
def test_a_running_crc32c_continues_from_its_value():
    from shardema.checkpoint._checksum import CRC32C, digest

    # docs/checkpoint-format.md: the check value of b"123456789" is e3069283
    assert digest(CRC32C, b"456789", digest(CRC32C, b"123")) == 0xE3069283


def test_one_hashing_thread_per_process(monkeypatch):
    import threading

    from shardema.checkpoint import _checksum

    monkeypatch.setattr(_checksum, "_pool", None)  # as in a new process
    pool = _checksum.hashing_pool()
    assert _checksum.hashing_pool() is pool
    release = threading.Event()
    first = pool.submit(lambda: (release.wait(30), threading.current_thread().name)[1])
    second = pool.submit(lambda: threading.current_thread().name)  # queued behind the first: one thread
    release.set()
    assert first.result() == second.result()
    assert first.result().startswith("shardema-hash")
    pool.shutdown()


def test_a_save_in_bfloat16_resumes_into_float32_shadows_exactly(tmp_path):
    """Pieces stored in another dtype are read into a buffer and cast (not read as raw shadow bytes)."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = shardema.ShardedEMA(model, (0.9, 0.99), buffers="average")
    for k in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * (k + 1))
        model(torch.randn(5, 3))  # moves the batch-norm statistics
        ema.update()
    ema.save(tmp_path, "T", dtype=torch.bfloat16)
    torch.manual_seed(1)
    fresh = shardema.ShardedEMA(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), (0.9, 0.99), buffers="average")
    assert shardema.checkpoint.load_ema(fresh, tmp_path, "T") == "T"
    for factor in (0.9, 0.99):
        stored = load_file(tmp_path / "model" / "cp=T" / f"ema={factor}" / "rank-00000-of-00001.safetensors")
        assert stored["0.weight"].dtype == torch.bfloat16
        for t in fresh.tracked():
            shadow = fresh.shadow(factor, t.key)
            assert torch.equal(shadow, stored[t.fqn].to(shadow.dtype)), (factor, t.fqn)
            assert not torch.equal(shadow, t.current().detach()) or t.fqn.endswith("num_batches_tracked")


def test_load_ema_names_itself_inside_a_swap_and_the_model_paths_it_lacks(tmp_path):
    torch.manual_seed(0)
    ema = shardema.ShardedEMA(TwoPaths(), FACTORS, model_paths=["a"])
    with ema.swapped(0.9), pytest.raises(RuntimeError, match=r"ema\.load_ema\(\) was called inside"):
        shardema.checkpoint.load_ema(ema, tmp_path, "T")
    with pytest.raises(FileNotFoundError, match=r"cp=T under .* for model paths \['a'\]; list what exists"):
        shardema.checkpoint.load_ema(ema, tmp_path, "T")


def test_a_rank_file_gone_between_planning_and_reading_is_named(tmp_path, monkeypatch, caplog):
    from shardema.checkpoint import _reader

    _save(tmp_path, None)
    real = _reader.plan_reads

    def plan_then_delete(ema, load, candidate):
        reads = real(ema, load, candidate)
        for path in reads:
            path.unlink()  # what a newer save's cleanup does to an old version
        return reads

    monkeypatch.setattr(_reader, "plan_reads", plan_then_delete)
    torch.manual_seed(1)
    ema = shardema.ShardedEMA(TwoPaths(), FACTORS)
    with caplog.at_level(logging.WARNING, logger="shardema"), pytest.raises(FileNotFoundError):
        shardema.checkpoint.load_ema(ema, tmp_path, "T")
    gone = tmp_path / "model" / "cp=T" / "ema=0.9" / "rank-00000-of-00001.safetensors"
    assert f"FileNotFoundError: {gone}: gone while it was read (a newer save replaced it)" in caplog.text


def test_a_held_writer_lock_fails_the_save_naming_rank_0_and_the_lock(tmp_path):
    from shardema.checkpoint._lock import WriterLock

    torch.manual_seed(0)
    ema = shardema.ShardedEMA(TwoPaths(), FACTORS)
    with WriterLock(tmp_path / "model", purpose="deleting cp=T"):
        with pytest.raises(RuntimeError, match=rf"^saving the EMA checkpoint cp=T under {tmp_path} failed on rank 0: "
                                               r"CheckpointLockedError: .*/model is being written by another EMA "
                                               r"of this process .*; nothing was written$"):
            ema.save(tmp_path, "T")
    assert not [p for p in (tmp_path / "model").iterdir() if p.name.startswith("cp=")]
    assert ema.save(tmp_path, "T") == "T"  # released: the next save works


def test_save_ema_refuses_a_dtype_that_is_not_floating(tmp_path):
    from shardema.checkpoint import save_ema

    ema = shardema.ShardedEMA(TwoPaths(), FACTORS)
    for dtype in (torch.int8, "bfloat16"):
        with pytest.raises(ValueError, match=rf"^dtype={dtype!r} must be a floating torch dtype such as "
                                             r"torch.bfloat16, or None$"):
            save_ema(ema, tmp_path, "T", dtype=dtype)
    assert not tmp_path.joinpath("model").exists()


def test_resume_names_itself_and_what_it_tried(tmp_path, caplog):
    torch.manual_seed(0)
    ema = shardema.ShardedEMA(TwoPaths(), FACTORS, model_paths=["a"])
    with ema.swapped(0.9), pytest.raises(RuntimeError, match=r"ema\.resume\(\) was called inside"):
        ema.resume(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"^no intact EMA checkpoint \(cp=latest, cp=last\) under {tmp_path} "
                                                r"for model paths \['a'\]; pass strict=False to start from the live "
                                                r"weights$"):
        ema.resume(tmp_path, strict=True)
    with caplog.at_level(logging.WARNING, logger="shardema"):
        assert ema.resume(tmp_path) is None
    assert _logged(caplog, f"no intact EMA checkpoint (cp=latest, cp=last) under {tmp_path}: the EMA starts from "
                           "the live weights")


@pytest.mark.parametrize(("drop", "named"), [
    ("header_crc32c", "files.0.header_crc32c is required by format_version 2"),
    ("crc32c", "files.0.pieces.w.crc32c is required by format_version 2"),
])
def test_a_format_2_manifest_without_its_checksums_names_the_missing_one(drop, named):
    manifest = _manifest_dict(format_version=2)
    entry = manifest["files"][0]
    del entry["crc32"], entry["pieces"]["w"]["crc32"]
    entry["header_crc32c"], entry["pieces"]["w"]["crc32c"] = "00000000", "00000000"
    del (entry if drop == "header_crc32c" else entry["pieces"]["w"])[drop]
    with pytest.raises(ManifestError, match=named):
        validate_manifest(manifest)
