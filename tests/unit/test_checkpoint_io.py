"""``checkpoint/_io``: durable writes, the safetensors header parser, exact reads and range checksums.

Expected values come from the safetensors layout (u64 little-endian header length, JSON
header, raw bytes; https://github.com/huggingface/safetensors) and from reference CRCs
(``checksum_reference``, ``zlib``), never from the code under test.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import pytest
import torch

import shardema
from checksum_reference import crc32c_hex
from shardema.checkpoint import _io
from shardema.checkpoint._checksum import CRC32, CRC32C, RunningHash
from shardema.checkpoint._io import (
    SafetensorsHeader,
    SafetensorsStreamWriter,
    make_dirs,
    range_digest,
    read_exactly,
    write_bytes_atomic,
    write_safetensors_atomic,
)


def _open_paths() -> set[str]:
    """Paths of the files this process holds open (Linux)."""
    fds = Path("/proc/self/fd")
    paths = set()
    for fd in fds.iterdir():
        try:
            paths.add(os.readlink(fd))
        except OSError:  # closed meanwhile (the fd of the listing itself)
            pass
    return paths


@pytest.fixture
def fsynced(monkeypatch) -> list[str]:
    """The paths of everything fsynced from now on, in order."""
    seen: list[str] = []
    real = os.fsync

    def spy(fd):
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


def test_every_rename_is_flushed_by_its_directory_before_the_operation_returns(tmp_path, monkeypatch):
    """Durability: a name created by a rename is on disk once its directory is fsynced after it."""
    from shardema.checkpoint._writer import cleanup_leftovers

    events: list[tuple[str, str | None]] = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", str(Path(dst).parent)))
        return real_rename(src, dst)

    def replace(src, dst):
        events.append(("rename", str(Path(dst).parent)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    torch.manual_seed(0)
    ema = shardema.ShardedEMA(torch.nn.Linear(3, 2), [0.9, 0.99])
    label = tmp_path / "model"
    for operation in (
        lambda: ema.save(tmp_path, "latest"),
        lambda: ema.save(tmp_path, "latest"),  # replaces cp=latest: cp=latest.old, then removed
        lambda: (real_rename(label / "cp=latest", label / "cp=latest.old"), (label / "cp=latest").mkdir()),
        lambda: cleanup_leftovers(tmp_path, [None]),  # the complete old version comes back
        lambda: shardema.checkpoint.delete_checkpoint(tmp_path, "latest"),
    ):
        start = len(events)
        operation()
        done = events[start:]
        for i, (kind, directory) in enumerate(done):
            if kind == "rename":
                assert ("fsync", directory) in done[i + 1:], (directory, done)
    assert sum(kind == "rename" for kind, _ in events) >= 12
    assert not [p.name for p in label.iterdir() if p.name.startswith("cp=")]


def test_make_dirs_flushes_the_parent_of_every_new_directory(tmp_path, fsynced):
    make_dirs(tmp_path / "a" / "b" / "c")
    assert (tmp_path / "a" / "b" / "c").is_dir()
    assert fsynced == [str(tmp_path), str(tmp_path / "a"), str(tmp_path / "a" / "b")]
    fsynced.clear()
    make_dirs(tmp_path / "a" / "b")  # nothing new: nothing to flush
    assert fsynced == []


def test_write_bytes_atomic_flushes_the_file_then_its_directory(tmp_path, fsynced):
    target = tmp_path / "manifest.json"
    target.write_bytes(b"old")
    write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    assert fsynced == [str(tmp_path / "manifest.json.tmp"), str(tmp_path)]


def test_write_safetensors_atomic_flushes_the_file_then_its_directory(tmp_path, fsynced):
    final = tmp_path / "rank.safetensors"
    written = write_safetensors_atomic(final, [("w", torch.float32, (3,))], {"k": "v"},
                                       lambda name: torch.arange(3, dtype=torch.float32))
    assert written.size == final.stat().st_size
    assert fsynced == [str(tmp_path / "rank.safetensors.tmp"), str(tmp_path)]


def test_a_failed_safetensors_write_leaves_no_file_and_no_open_handle(tmp_path):
    final = tmp_path / "rank.safetensors"

    def broken(name):
        raise RuntimeError("shadow unavailable")

    with pytest.raises(RuntimeError, match="shadow unavailable"):
        write_safetensors_atomic(final, [("w", torch.float32, (3,))], {}, broken)
    assert list(tmp_path.iterdir()) == []
    assert not any(p.startswith(str(tmp_path)) for p in _open_paths())


def test_a_failed_write_whose_temporary_file_is_gone_raises_its_own_error(tmp_path):
    # e.g. a concurrent cleanup removed the staging file: the cause must surface, not the cleanup's error.
    final = tmp_path / "rank.safetensors"

    def vanishing(name):
        (tmp_path / "rank.safetensors.tmp").unlink()
        raise RuntimeError("shadow unavailable")

    with pytest.raises(RuntimeError, match="shadow unavailable"):
        write_safetensors_atomic(final, [("w", torch.float32, (3,))], {}, vanishing)


def test_abort_closes_the_stream(tmp_path):
    path = tmp_path / "s.safetensors"
    writer = SafetensorsStreamWriter(path, [("a", torch.float32, (2,))])
    assert str(path) in _open_paths()
    writer.abort()
    assert str(path) not in _open_paths()
    writer.abort()  # twice is harmless


@pytest.mark.parametrize("algorithm", [CRC32C, CRC32])
def test_range_digest_chains_every_chunk_up_to_the_last_byte(tmp_path, monkeypatch, algorithm):
    monkeypatch.setattr(_io, "_READ_CHUNK", 7)  # many chunks, the last one a single byte
    data = bytes(range(50))
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    expected = crc32c_hex(data[3:46]) if algorithm == CRC32C else f"{zlib.crc32(data[3:46]):08x}"
    with open(path, "rb") as f:
        assert range_digest(f, 3, 46, algorithm) == expected  # 43 bytes: 6 chunks of 7, then 1


def test_range_digest_of_a_short_file_names_it_and_the_missing_bytes(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(50))
    with open(path, "rb") as f, pytest.raises(ValueError, match=rf"^{path}: ended 10 bytes early \(truncated\)$"):
        range_digest(f, 40, 60, CRC32C)
    with pytest.raises(ValueError, match=r"^file: ended 10 bytes early \(truncated\)$"):  # a stream without a name
        range_digest(io.BytesIO(bytes(50)), 40, 60, CRC32C)


class _Trickle(io.RawIOBase):
    """A file that returns at most 3 bytes per ``readinto``, as a pipe or network file system may."""

    def __init__(self, data: bytes):
        self._data, self._at = data, 0

    def seek(self, offset, whence=0):
        self._at = offset
        return offset

    def readinto(self, buffer):
        got = self._data[self._at:self._at + min(3, len(buffer))]
        buffer[:len(got)] = got
        self._at += len(got)
        return len(got)


def test_read_exactly_keeps_reading_after_short_reads(tmp_path):
    data = bytes(range(40))
    into = bytearray(20)
    hashed = RunningHash(CRC32C)
    read_exactly(_Trickle(data), 5, memoryview(into), Path("p"), hashed)
    assert bytes(into) == data[5:25] and hashed.hexdigest() == crc32c_hex(data[5:25])


def test_read_exactly_names_the_file_and_the_bytes_it_lacks():
    into = bytearray(10)
    with pytest.raises(ValueError, match=r"^f.safetensors: ended 3 bytes early \(truncated\)$"):
        read_exactly(_Trickle(bytes(range(12))), 5, memoryview(into), Path("f.safetensors"))  # 7 bytes: 3, 3, 1


def _file(tmp_path: Path, header, data: bytes = b"", length: int | None = None) -> Path:
    blob = json.dumps(header).encode()
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


def _parse(path: Path) -> SafetensorsHeader:
    with open(path, "rb") as f:
        return SafetensorsHeader.read(f, path)


def test_a_file_of_only_a_header_is_valid(tmp_path):
    parsed = _parse(_file(tmp_path, {"__metadata__": {"k": "v"}}))  # header length == file size - 8
    assert parsed.entries == {} and parsed.metadata == {"k": "v"}
    entry = _parse(_file(tmp_path, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)))
    n = 8 + len(json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}))
    assert entry.entries == {"w": (torch.float32, [2], n, n + 8)}  # the data ends exactly at the end of the file


@pytest.mark.parametrize(("header", "data", "message"), [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(4),
     r"tensor 'w' has inconsistent data offsets \[0, 8\] for F32 \[2\] in a file of \d+ bytes"),  # past the end
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, bytes(4),
     r"tensor 'w' has inconsistent data offsets \[-4, 0\]"),  # before the data
    ({"w": {"dtype": "F32", "shape": [0, -1], "data_offsets": [0, 0]}}, b"",
     r"tensor 'w' has inconsistent data offsets \[0, 0\] for F32 \[0, -1\]"),  # a negative dimension
    ([1], b"", "the safetensors header is not a JSON object"),
    ({"__metadata__": [1]}, b"", "the safetensors metadata is not a JSON object"),
])
def test_a_malformed_header_is_refused_naming_the_file(tmp_path, header, data, message):
    path = _file(tmp_path, header, data)
    with pytest.raises(ValueError, match=rf"^{path}: {message}"):
        _parse(path)


def test_a_header_length_with_the_top_bit_set_does_not_fit(tmp_path):
    path = _file(tmp_path, {}, length=2**63 + 5)  # read as unsigned: far larger than the file
    with pytest.raises(ValueError, match=rf"^{path}: header length {2**63 + 5} does not fit a file of 10 bytes"):
        _parse(path)


def test_a_running_hash_chains_its_chunks_in_order():
    data = bytes(range(256)) * 3
    for algorithm, expected in ((CRC32C, crc32c_hex(data)), (CRC32, f"{zlib.crc32(data):08x}")):
        hashed = RunningHash(algorithm)
        view = memoryview(data)
        for part in (view[:100], view[100:100], view[100:513], view[513:]):  # an empty chunk too
            hashed.feed(part)
        assert hashed.hexdigest() == expected, algorithm


def test_the_stream_writer_names_what_is_wrong(tmp_path):
    with pytest.raises(AssertionError, match=r"duplicate tensor names in one file: \['a', 'b', 'a'\]"):
        SafetensorsStreamWriter(tmp_path / "d.safetensors",
                                [("a", torch.float32, (1,)), ("b", torch.float32, (1,)), ("a", torch.int8, (2,))])
    with pytest.raises(TypeError, match=r"must be str; got \{'step': 'int'\}"):
        SafetensorsStreamWriter(tmp_path / "m.safetensors", [("a", torch.float32, (1,))], {"step": 3, "ok": "v"})
    writer = SafetensorsStreamWriter(tmp_path / "w.safetensors", [("a", torch.float32, (2,))])
    with pytest.raises(AssertionError, match=r"'a': got torch.float64 \(2,\), declared torch.float32 \(2,\)"):
        writer.write("a", torch.zeros(2, dtype=torch.float64))  # right shape, wrong dtype
    with pytest.raises(AssertionError, match=r"'a': got torch.float32 \(3,\), declared torch.float32 \(2,\)"):
        writer.write("a", torch.zeros(3))  # right dtype, wrong shape
    with pytest.raises(AssertionError, match=r"safetensors stream closed after 0 of 1 tensors"):
        writer.close()
    writer = SafetensorsStreamWriter(tmp_path / "x.safetensors", [("a", torch.float32, (2,))])
    writer.write("a", torch.zeros(2))
    with pytest.raises(AssertionError, match=r"expected tensor '\(none\)', got 'a'"):  # one tensor too many
        writer.write("a", torch.zeros(2))
    assert writer.close().size == (tmp_path / "x.safetensors").stat().st_size
