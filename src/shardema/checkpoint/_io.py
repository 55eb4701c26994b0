"""Durable file operations and a streaming safetensors writer.

[Note: why a streaming writer]
``safetensors.torch.save_file`` builds the whole file in memory and refuses views
that share storage (every shadow is a view into one flat buffer). The format is a
little-endian u64 header length, a JSON header padded with spaces to a multiple of
8 bytes, then the tensors' raw bytes back to back. Writing it tensor by tensor keeps
the extra memory at one tensor (its CPU copy when the shadow lives on an
accelerator) and lets us checksum the bytes as they go out. Files are read back
with ``safetensors.safe_open``.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ._format import TEMP_SUFFIX, crc32_hex, numel, st_dtype, tensor_bytes

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
    temp = path.with_name(path.name + ".tmp")
    with open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    fsync_dir(path.parent)


def file_crc32(path: Path) -> tuple[int, str]:
    """``(size, crc32 hex)`` of a whole file, read in 16 MiB chunks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_READ_CHUNK)
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, crc32_hex(crc)


class SafetensorsStreamWriter:
    """Write a safetensors file one tensor at a time, in a layout fixed up front.

    ``entries`` lists ``(name, dtype, shape)``; the data is ordered by element size
    (largest first, then the given order) so every tensor is aligned to its element
    size. Call :meth:`write` once per entry in :attr:`order`, then :meth:`close`,
    which fsyncs and returns ``(size, crc32 hex of the whole file)``. The file is
    written at ``path`` directly: callers give a temporary name and rename it.
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
        self._sizes: dict[str, int] = {}
        offset = 0
        self.order: list[str] = []
        for i in indexed:
            name, dtype, shape = entries[i]
            nbytes = numel(shape) * dtype.itemsize
            header[name] = {"dtype": st_dtype(dtype), "shape": [int(s) for s in shape],
                            "data_offsets": [offset, offset + nbytes]}
            self._sizes[name] = nbytes
            offset += nbytes
            self.order.append(name)
        self._shapes = {name: (dtype, tuple(int(s) for s in shape)) for name, dtype, shape in entries}
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)
        self._file = open(path, "wb")
        self._crc = 0
        self._size = 0
        self._next = 0
        self._emit(struct.pack("<Q", len(blob)))
        self._emit(blob)

    def _emit(self, data) -> None:
        self._file.write(data)
        self._crc = zlib.crc32(data, self._crc)
        self._size += len(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; it must be ``order[i]`` with the declared dtype and shape."""
        if self._next >= len(self.order) or self.order[self._next] != name:
            expected = self.order[self._next] if self._next < len(self.order) else "(none)"
            raise AssertionError(f"safetensors stream expected tensor {expected!r}, got {name!r}")
        dtype, shape = self._shapes[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise AssertionError(f"{name!r}: got {tensor.dtype} {tuple(tensor.shape)}, declared {dtype} {shape}")
        data = tensor_bytes(tensor)
        if len(data) != self._sizes[name]:
            raise AssertionError(f"{name!r}: {len(data)} bytes, declared {self._sizes[name]}")
        if len(data):
            self._emit(data)
        self._next += 1

    def close(self) -> tuple[int, str]:
        """Flush and fsync the file; return ``(size in bytes, crc32 hex of the whole file)``."""
        if self._next != len(self.order):
            self._file.close()
            raise AssertionError(f"safetensors stream closed after {self._next} of {len(self.order)} tensors")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._size, crc32_hex(self._crc)

    def abort(self) -> None:
        """Close the file without checks (the caller removes it)."""
        if not self._file.closed:
            self._file.close()


def write_safetensors_atomic(final: Path, entries: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                             metadata: dict[str, str], tensor_of: Callable[[str], torch.Tensor]) -> tuple[int, str]:
    """Write one safetensors file, one tensor at a time: temporary name, fsync, rename, fsync the directory.

    ``tensor_of(name)`` gives each tensor when its turn comes (in the file's order), so only
    one is needed at a time. Nothing is left behind on failure. Returns ``(size, crc32)``.
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
