"""Checksums of checkpoint bytes: CRC-32C (format 2) and zlib's CRC-32 (format 1).

[Note: checksums at disk speed]
Format 1 stored zlib's CRC-32 of every piece and of every whole file, so a save
hashed each byte twice and a resume read and hashed each byte twice (about 3 GB/s per
core: slower than the disk). Format 2 uses CRC-32C (the Castagnoli polynomial, which
x86 SSE 4.2 and ARMv8 compute in hardware; the ``crc32c`` package, ~11 GB/s on one core
here), hashes each byte once (every piece; the file itself only for its header), and
hashes on a background thread while the same bytes are written or read, so the
checksum costs no time as long as it is faster than the disk. Both hash functions
release the GIL on large buffers, which is what makes the overlap work.
"""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import crc32c as _crc32c

CRC32C = "crc32c"
CRC32 = "crc32"

_FUNCTIONS: dict[str, Callable[..., int]] = {
    CRC32C: lambda data, value=0: _crc32c.crc32c(data, value),
    CRC32: lambda data, value=0: zlib.crc32(data, value),
}

_CHUNK = 8 * 2**20  # hashing and I/O alternate in pieces this large (bounded, cache-friendly)


LABELS = {CRC32C: "CRC-32C", CRC32: "CRC-32"}
"""How messages spell each algorithm."""


def digest(algorithm: str, data, value: int = 0) -> int:
    """The running checksum ``algorithm`` of ``data``, continuing from ``value``."""
    return _FUNCTIONS[algorithm](data, value)


def as_hex(value: int) -> str:
    """A 32-bit checksum as 8 lowercase hex digits."""
    return f"{value & 0xFFFFFFFF:08x}"


def hex_digest(algorithm: str, data) -> str:
    """``algorithm`` of ``data`` as 8 hex digits."""
    return as_hex(digest(algorithm, data))


def piece_checksum(piece: Mapping) -> tuple[str, str]:
    """``(algorithm, hex)`` of a stored piece's manifest entry (format 2: ``crc32c``, format 1: ``crc32``)."""
    if CRC32C in piece:
        return CRC32C, piece[CRC32C]
    return CRC32, piece[CRC32]


def chunks(data: memoryview, size: int = _CHUNK):
    """``data`` in consecutive slices of at most ``size`` bytes."""
    for start in range(0, len(data), size):
        yield data[start:start + size]


_pool: tuple[int, ThreadPoolExecutor] | None = None
_pool_lock = threading.Lock()


def hashing_pool() -> ThreadPoolExecutor:
    """One background thread per process that hashes while the caller does I/O (recreated after a fork)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardema-hash"))
        return _pool[1]


class RunningHash:
    """A checksum fed chunk by chunk and computed on the hashing thread, in order.

    :meth:`feed` right after a chunk is read (or right before it is written) hashes it
    while it is still in cache and while the caller does the next I/O. The caller must
    keep each chunk's memory unchanged and alive until :meth:`hexdigest` returns.
    """

    def __init__(self, algorithm: str):
        self.algorithm = algorithm
        self._value = 0
        self._pending: list[Future] = []

    def _extend(self, data: memoryview) -> None:
        self._value = digest(self.algorithm, data, self._value)

    def feed(self, data: memoryview) -> None:
        """Queue ``data`` (the next bytes); the one hashing thread takes chunks in the order given."""
        if len(data):
            self._pending.append(hashing_pool().submit(self._extend, data))

    def hexdigest(self) -> str:
        """Wait for every chunk fed so far; the checksum as 8 hex digits."""
        for future in self._pending:
            future.result()
        self._pending.clear()
        return as_hex(self._value)
