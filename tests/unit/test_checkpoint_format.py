"""The on-disk format pieces: tags, names, the streaming safetensors writer, manifest validation."""

import json
import zlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from checksum_reference import crc32c_hex
from shardema.checkpoint import ManifestError, validate_tag
from shardema.checkpoint._format import (
    box_overlap,
    ema_dirname,
    parse_cp_dirname,
    parse_rank_filename,
    rank_filename,
    staging_dirname,
    tensor_checksum,
)
from shardema.checkpoint._io import SafetensorsHeader, SafetensorsStreamWriter, file_crc32
from shardema.checkpoint._manifest import validate_manifest


@pytest.mark.parametrize("tag", ["latest", "last", "E3_U300_S9600", "run-2", "0"])
def test_valid_tags(tag):
    assert validate_tag(tag) == tag


@pytest.mark.parametrize("tag", ["", "a/b", "x.old", "ep=3", "_hidden", "-x", "with space", "a" * 129, None, 3])
def test_bad_tags_are_rejected_with_the_rule(tag):
    with pytest.raises(ValueError, match="letters, digits"):
        validate_tag(tag)


def test_names_round_trip():
    assert ema_dirname(0.9999) == "ema=0.9999"
    assert ema_dirname(1e-5) == "ema=1e-05"
    assert rank_filename(3, 8) == "rank-00003-of-00008.safetensors"
    assert parse_rank_filename(rank_filename(3, 8)) == (3, 8)
    assert parse_rank_filename("rank-3-of-8.safetensors") is None
    assert parse_cp_dirname("cp=latest") == ("latest", "committed")
    assert parse_cp_dirname("cp=latest.old") == ("latest", "old")
    assert parse_cp_dirname(staging_dirname("E1_U2_S3", "abc")) == ("E1_U2_S3", "staging")
    assert parse_cp_dirname("cp=bad/tag") is None
    assert parse_cp_dirname("ema=0.9") is None


def test_box_overlap():
    assert box_overlap([0, 0], [3, 4], [2, 1], [5, 5]) == ((2, 1), (1, 3))
    assert box_overlap([0], [3], [3], [2]) is None
    assert box_overlap([], [], [], []) == ((), ())


def test_stream_writer_output_is_read_by_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, generator=g)
    # Views sharing one storage (like the EMA's flat shadows), mixed dtypes, a scalar and an empty tensor.
    tensors = {"a": base[:12].view(3, 4), "b": base[12:20], "h": torch.arange(6, dtype=torch.bfloat16).view(2, 3),
               "i": torch.tensor(7, dtype=torch.int64), "flag": torch.tensor([True, False]),
               "empty": torch.zeros(0, 4)}
    path = tmp_path / "x.safetensors"
    writer = SafetensorsStreamWriter(path, [(k, v.dtype, v.shape) for k, v in tensors.items()], {"k": "v"})
    assert writer.order[0] == "i"  # largest element size first keeps every tensor aligned
    for name in writer.order:
        writer.write(name, tensors[name])
    written = writer.close()
    raw = path.read_bytes()
    assert written.size == len(raw) == path.stat().st_size
    header_len = int.from_bytes(raw[:8], "little")
    assert written.header_crc32c == crc32c_hex(raw[:8 + header_len])
    header = json.loads(raw[8:8 + header_len])
    for name in tensors:  # each tensor's CRC-32C, of its bytes as stored
        begin, end = header[name]["data_offsets"]
        assert written.checksums[name] == crc32c_hex(raw[8 + header_len + begin:8 + header_len + end]), name
    with open(path, "rb") as f:
        parsed = SafetensorsHeader.read(f, path)
    assert parsed.raw == raw[:8 + header_len] and parsed.metadata == {"k": "v"}
    assert parsed.entries["a"] == (torch.float32, [3, 4], 8 + header_len + header["a"]["data_offsets"][0],
                                   8 + header_len + header["a"]["data_offsets"][1])
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v), k
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"k": "v"}
        assert torch.equal(f.get_slice("a")[1:3, 2:4], tensors["a"][1:3, 2:4])
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_len % 8 == 0


def test_stream_writer_checks_order_and_metadata(tmp_path):
    with pytest.raises(TypeError, match="must be str"):
        SafetensorsStreamWriter(tmp_path / "m.safetensors", [("a", torch.float32, (1,))], {"step": 3})
    writer = SafetensorsStreamWriter(tmp_path / "o.safetensors", [("a", torch.float32, (1,)),
                                                                 ("b", torch.float32, (2,))])
    with pytest.raises(AssertionError, match="expected tensor 'a'"):
        writer.write("b", torch.zeros(2))
    writer.abort()


def test_tensor_checksums_are_crc32c_and_zlib_crc32_of_the_raw_bytes():
    t = torch.arange(5, dtype=torch.float32)
    assert tensor_checksum(t) == crc32c_hex(t.numpy().tobytes())
    assert tensor_checksum(t, "crc32") == f"{zlib.crc32(t.numpy().tobytes()):08x}"
    h = torch.arange(5, dtype=torch.bfloat16)
    assert tensor_checksum(h) == crc32c_hex(h.view(torch.int16).numpy().tobytes())
    assert tensor_checksum(h, "crc32") == f"{zlib.crc32(h.view(torch.int16).numpy().tobytes()):08x}"


def test_file_crc32_is_zlib_crc_of_the_whole_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * 1000)
    assert file_crc32(path) == (256_000, f"{zlib.crc32(path.read_bytes()):08x}")


@pytest.mark.parametrize("damage", ["short", "length", "json", "offsets", "dtype"])
def test_a_damaged_safetensors_header_is_an_error_naming_the_file(tmp_path, damage):
    path = tmp_path / "d.safetensors"
    writer = SafetensorsStreamWriter(path, [("a", torch.float32, (4,))])
    writer.write("a", torch.ones(4))
    writer.close()
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    if damage == "short":
        raw = raw[:5]
    elif damage == "length":
        raw[:8] = (len(raw)).to_bytes(8, "little")
    elif damage == "json":
        raw[8] = ord("x")
    else:
        header = json.loads(raw[8:8 + n])
        if damage == "offsets":
            header["a"]["data_offsets"] = [0, 99]
        else:
            header["a"]["dtype"] = "F99"
        blob = json.dumps(header, separators=(",", ":")).encode().ljust(n)
        assert len(blob) == n
        raw[8:8 + n] = blob
    path.write_bytes(bytes(raw))
    with open(path, "rb") as f, pytest.raises(ValueError, match="d.safetensors"):
        SafetensorsHeader.read(f, path)


def _manifest(pieces):
    return {
        "format": "shardema-ema", "format_version": 2, "save_id": "s", "tag": "latest", "model_path": None,
        "model_paths": [None], "step": 1, "schedule": {}, "factors": [0.9], "world_size": 2,
        "tensors": {"w": {"global_shape": [4, 3], "dtype": "float32"}},
        "files": [{"path": f"ema=0.9/rank-0000{r}-of-00002.safetensors", "factor": 0.9, "rank": r, "size": 1,
                   "header_crc32c": "00000000", "pieces": {"w": {"offset": o, "shape": s, "crc32c": "0"}}}
                  for r, (o, s) in enumerate(pieces)],
    }


def test_manifest_validation_checks_that_pieces_tile_each_tensor():
    validate_manifest(_manifest([([0, 0], [3, 3]), ([3, 0], [1, 3])]))
    with pytest.raises(ManifestError, match="cover 9 of 12 elements"):  # row 3 missing
        validate_manifest(_manifest([([0, 0], [2, 3]), ([2, 0], [1, 3])]))
    with pytest.raises(ManifestError, match="overlap"):
        validate_manifest(_manifest([([0, 0], [3, 3]), ([2, 0], [2, 3])]))
    with pytest.raises(ManifestError, match="outside"):
        validate_manifest(_manifest([([0, 0], [3, 3]), ([3, 0], [2, 3])]))
    bad = _manifest([([0, 0], [4, 3])])
    bad["format_version"] = 99
    with pytest.raises(ManifestError, match="format_version 99"):
        validate_manifest(bad)
    bad = _manifest([([0, 0], [4, 3])])
    bad["files"][0]["path"] = "../../etc/x.safetensors"
    with pytest.raises(ManifestError, match="is not 'ema="):
        validate_manifest(bad)
    json.dumps(_manifest([]))  # the schema is plain JSON
