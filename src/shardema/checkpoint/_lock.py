"""One writer per checkpoint directory: an exclusive lock held for the life of a save.

[Note: writer lock]
Two jobs saving into the same ``<root>/<model path>`` would clean up each other's
staging directories and commit manifests that name the other's files. So a save
takes ``<root>/<model path>/.shardema-writer.lock`` first: an exclusive POSIX record
lock (``fcntl.lockf``, which NFS supports) plus an in-process registry (POSIX locks
are per process, so two EMAs of one process would otherwise both get it). The lock
file says who holds it (host, pid, since when); a second writer fails at once with
that text instead of waiting. The operating system releases the lock when the
holder exits, also when it is killed, so a crashed job never blocks the next one.
Where ``fcntl`` does not exist (Windows) only the in-process registry applies.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".shardema-writer.lock"

_held_lock = threading.Lock()
_held: set[str] = set()  # resolved lock paths held by this process


class CheckpointLockedError(RuntimeError):
    """Another writer (another job, or another EMA of this process) is saving into the same directory."""


class WriterLock:
    """Exclusive, non-blocking lock of one checkpoint directory; a context manager.

    Args:
        directory: the ``<root>/<model path>`` directory (created if missing).
        purpose: what the holder does, written into the lock file for the error of the next one.
    """

    def __init__(self, directory: Path, purpose: str = "saving an EMA checkpoint"):
        self.path = Path(directory) / LOCK_NAME
        self.purpose = purpose
        self._fd: int | None = None
        self._key = ""

    def acquire(self) -> WriterLock:
        """Take the lock or raise :class:`CheckpointLockedError` naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._key = str(self.path.resolve())
        with _held_lock:
            if self._key in _held:
                raise CheckpointLockedError(
                    f"{self.path.parent} is being written by another EMA of this process (pid {os.getpid()}); "
                    "give each EMA its own checkpoint root")
            _held.add(self._key)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            self._forget()
            raise
        if fcntl is not None:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_holder(fd)
                os.close(fd)
                self._forget()
                raise CheckpointLockedError(
                    f"{self.path.parent} is locked by another writer ({holder}); one job at a time may write a "
                    "checkpoint root: give this job another root, or stop the other job") from None
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        info = f"host {socket.gethostname()} pid {os.getpid()} {self.purpose} since {since}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode("utf-8"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Release the lock (the lock file stays; its content is stale until the next holder)."""
        if self._fd is not None:
            try:
                if fcntl is not None:
                    fcntl.lockf(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None
                self._forget()

    def _forget(self) -> None:
        with _held_lock:
            _held.discard(self._key)

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "holder unknown"
