"""Durable file operations and a streaming safetensors writer.

[Note: why a streaming writer]
``safetensors.torch.save_file`` builds the whole file in memory and refuses views
that share storage (every shadow is a view into one flat buffer). The format is a
little-endian u64 header length, a JSON header padded with spaces to a multiple of
8 bytes, then the tensors' raw bytes back to back. Writing it tensor by tensor keeps
the extra memory at one tensor (its CPU copy when the shadow lives on an
accelerator) and lets us checksum the bytes as they go out. A resume reads the
header with :class:`SafetensorsHeader` and each piece straight into its shadow; other
readers (consolidation, post-hoc) use ``safetensors.safe_open``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ._checksum import CRC32, CRC32C, RunningHash, as_hex, chunks, digest, hex_digest
from ._format import TEMP_SUFFIX, numel, st_dtype, tensor_bytes, torch_dtype

_READ_CHUNK = 16 * 2**20


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (new names, renames) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """Create ``path`` and its parents, flushing each new directory entry."""
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    path.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        fsync_dir(created.parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync it, rename it, fsync the directory."""
    temp = path.with_name(path.name + TEMP_SUFFIX)
    with open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    fsync_dir(path.parent)


def range_digest(f, begin: int, end: int, algorithm: str) -> str:
    """Checksum ``algorithm`` of the bytes ``[begin, end)`` of the open binary file ``f``, read in 16 MiB chunks."""
    f.seek(begin)
    value, left = 0, end - begin
    while left > 0:
        chunk = f.read(min(_READ_CHUNK, left))
        if not chunk:
            raise ValueError(f"{getattr(f, 'name', 'file')}: ended {left} bytes early (truncated)")
        value = digest(algorithm, chunk, value)
        left -= len(chunk)
    return as_hex(value)


def file_crc32(path: Path) -> tuple[int, str]:
    """``(size, zlib CRC-32 hex)`` of a whole file (format 1 files)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return size, range_digest(f, 0, size, CRC32)


MAX_HEADER_BYTES = 100 * 2**20
"""A safetensors header larger than this is corrupt (safetensors' own limit)."""


class SafetensorsHeader:
    """The parsed header of a safetensors file: its bytes, tensor entries, metadata and data start.

    Parsed here rather than by ``safetensors.safe_open`` because a resume reads each
    piece straight into the shadow's memory (``readinto`` at the piece's offset): safetensors
    can only return a new tensor, which would cost one more copy of every byte. Every
    entry is checked against the file size, so a damaged header cannot make a read leave
    the file's data.
    """

    def __init__(self, raw: bytes, file_size: int, path: Path):
        self.raw = raw
        self.data_start = len(raw)
        try:
            parsed = json.loads(raw[8:].decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ValueError(f"{path}: the safetensors header is not JSON ({exc})") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"{path}: the safetensors header is not a JSON object")
        metadata = parsed.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise ValueError(f"{path}: the safetensors metadata is not a JSON object")
        self.metadata: dict = metadata
        self.entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        for name, entry in parsed.items():
            try:
                dtype = torch_dtype(entry["dtype"])
                shape = [int(s) for s in entry["shape"]]
                begin, end = (int(v) for v in entry["data_offsets"])
            except (TypeError, ValueError, KeyError) as exc:
                raise ValueError(f"{path}: tensor {name!r} has a malformed header entry ({exc})") from None
            if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != numel(shape) * dtype.itemsize \
                    or self.data_start + end > file_size:
                raise ValueError(f"{path}: tensor {name!r} has inconsistent data offsets {[begin, end]} for "
                                 f"{entry['dtype']} {shape} in a file of {file_size} bytes")
            self.entries[name] = (dtype, shape, self.data_start + begin, self.data_start + end)

    @classmethod
    def read(cls, f, path: Path) -> SafetensorsHeader:
        """Read the header of the open binary file ``f`` (positioned anywhere)."""
        file_size = os.fstat(f.fileno()).st_size
        f.seek(0)
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path}: {file_size} bytes is too short for a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, file_size - 8):
            raise ValueError(f"{path}: header length {length} does not fit a file of {file_size} bytes")
        blob = f.read(length)
        return cls(prefix + blob, file_size, path)


def read_exactly(f, offset: int, into: memoryview, path: Path, hashed: RunningHash | None = None) -> None:
    """Fill ``into`` with the bytes of ``f`` from ``offset``; a short file is an error naming it.

    ``hashed`` is fed each chunk as soon as it has been read (hashed while the next is read).
    """
    f.seek(offset)
    filled = 0
    for chunk in chunks(into):
        part = chunk
        while len(part):
            got = f.readinto(part)
            if not got:
                raise ValueError(f"{path}: ended {len(into) - filled} bytes early (truncated)")
            filled += got
            part = part[got:]
        if hashed is not None:
            hashed.feed(chunk)


@dataclass(frozen=True)
class WrittenFile:
    """What a finished safetensors write reports for the manifest (format 2)."""

    size: int
    header_crc32c: str
    checksums: dict[str, str]  # tensor name -> CRC-32C of its bytes


class SafetensorsStreamWriter:
    """Write a safetensors file one tensor at a time, in a layout fixed up front.

    ``entries`` lists ``(name, dtype, shape)``; the data is ordered by element size
    (largest first, then the given order) so every tensor is aligned to its element
    size. Call :meth:`write` once per entry in :attr:`order`, then :meth:`close`, which
    fsyncs and returns a :class:`WrittenFile`: the size, the CRC-32C of the header and of
    each tensor. Each tensor is hashed on a background thread while it is written (see
    [Note: checksums at disk speed]). The file is written at ``path`` directly: callers
    give a temporary name and rename it.
    """

    def __init__(self, path: Path, entries: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                 metadata: dict[str, str] | None = None):
        names = [name for name, _, _ in entries]
        if len(set(names)) != len(names):
            raise AssertionError(f"duplicate tensor names in one file: {names}")
        indexed = sorted(range(len(entries)), key=lambda i: (-entries[i][1].itemsize, i))
        header: dict = {}
        if metadata:
            bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
            if bad:
                raise TypeError(f"safetensors metadata keys and values must be str; got {bad}")
            header["__metadata__"] = dict(metadata)
        offset = 0
        self.order: list[str] = []
        for i in indexed:
            name, dtype, shape = entries[i]
            nbytes = numel(shape) * dtype.itemsize
            header[name] = {"dtype": st_dtype(dtype), "shape": [int(s) for s in shape],
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            self.order.append(name)
        self._shapes = {name: (dtype, tuple(int(s) for s in shape)) for name, dtype, shape in entries}
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)
        head = struct.pack("<Q", len(blob)) + blob
        self._header_crc32c = hex_digest(CRC32C, head)
        self._checksums: dict[str, str] = {}
        self._file = open(path, "wb")
        self._file.write(head)
        self._size = len(head)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; it must be ``order[i]`` with the declared dtype and shape."""
        if self._next >= len(self.order) or self.order[self._next] != name:
            expected = self.order[self._next] if self._next < len(self.order) else "(none)"
            raise AssertionError(f"safetensors stream expected tensor {expected!r}, got {name!r}")
        dtype, shape = self._shapes[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise AssertionError(f"{name!r}: got {tensor.dtype} {tuple(tensor.shape)}, declared {dtype} {shape}")
        data = tensor_bytes(tensor)  # dtype and shape match the declaration: so does the byte count
        hashed = RunningHash(CRC32C)  # each chunk hashed while the next is written
        try:
            for part in chunks(data):
                hashed.feed(part)
                self._file.write(part)
        finally:
            self._checksums[name] = hashed.hexdigest()  # one tensor in flight: memory stays bounded
        self._size += len(data)
        self._next += 1

    def close(self) -> WrittenFile:
        """Flush and fsync the file; return its size and checksums."""
        if self._next != len(self.order):
            self._file.close()
            raise AssertionError(f"safetensors stream closed after {self._next} of {len(self.order)} tensors")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return WrittenFile(self._size, self._header_crc32c, dict(self._checksums))

    def abort(self) -> None:
        """Close the file without checks (the caller removes it)."""
        if not self._file.closed:
            self._file.close()


def write_safetensors_atomic(final: Path, entries: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                             metadata: dict[str, str], tensor_of: Callable[[str], torch.Tensor]) -> WrittenFile:
    """Write one safetensors file, one tensor at a time: temporary name, fsync, rename, fsync the directory.

    ``tensor_of(name)`` gives each tensor when its turn comes (in the file's order), so only
    one is needed at a time. Nothing is left behind on failure. Returns the :class:`WrittenFile`.
    """
    temp = final.with_name(final.name + TEMP_SUFFIX)
    writer = SafetensorsStreamWriter(temp, entries, metadata)
    try:
        for name in writer.order:
            writer.write(name, tensor_of(name))
        result = writer.close()
        os.replace(temp, final)
    except BaseException:
        writer.abort()
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)
    return result
