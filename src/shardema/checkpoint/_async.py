"""Asynchronous saves: stage the shadows into host memory, write and commit on a background thread.

[Note: asynchronous save]
``ema.save(root, tag, blocking=False)`` copies this rank's shadows into host buffers
(pinned for accelerator shadows; reused from one save to the next) and returns a
:class:`SaveHandle` at once; a background thread then runs the ordinary collective save
(``save_ema``: lock, agreement, per-rank files, manifest, atomic rename) on the staged
copy, through a gloo process group of its own, so its collectives never interleave with
the training loop's. ``update()`` may run meanwhile: the staged copy is what is written.
A second save of the same EMA (blocking or not) first waits for the previous one; a
failed asynchronous save raises from :meth:`SaveHandle.wait`, or from the next save when
nobody waited. A crash at any moment leaves the previous committed version intact,
exactly as for a blocking save (the commit protocol is the same).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path

import torch

from .._log import logger
from .._shards import TrackedTensor
from .._store import Key, StagedShadows
from ..config import DecaySchedule, check_model_paths


class StagedEMA:
    """What a save reads of a :class:`~shardema.ShardedEMA`, frozen at one instant.

    It has the members the checkpoint writer uses (``tracked``, ``shadow``, ``step``,
    ``schedule``, ``counters`` and the options), backed by host copies of the shadows.
    """

    def __init__(self, ema, shadows: StagedShadows, process_group):
        self.process_group = process_group
        self.model_paths = ema.model_paths
        self.target_factors = ema.target_factors
        self.shadow_dtype = ema.shadow_dtype
        self.buffers = ema.buffers
        self.step: int = ema.step
        self.schedule: DecaySchedule = ema.schedule
        self._counters = dict(ema.counters())
        self._tracked: list[TrackedTensor] = list(ema.tracked())
        self._factor_index = ema.factor_index  # reads only the frozen config
        self.shadows = shadows

    def counters(self) -> dict[str, float]:
        """The sample counters at staging time."""
        return dict(self._counters)

    def tracked(self, model_paths: Iterable[str | None] | str | None = None) -> list[TrackedTensor]:
        """The tracked tensors at staging time, optionally of some model paths."""
        if model_paths is None:
            return list(self._tracked)
        wanted = set(check_model_paths(model_paths))
        return [t for t in self._tracked if t.model_path in wanted]

    def shadow(self, factor: float | int, key: Key) -> torch.Tensor:
        """The staged shadow of ``factor`` (or factor index) of ``key``."""
        return self.shadows.shadow(factor if isinstance(factor, int) else self._factor_index(factor), key)


class SaveHandle:
    """An asynchronous save in progress, returned by ``ema.save(root, tag, blocking=False)``."""

    def __init__(self, root: Path, tag: str, step: int, staged_bytes: int, staging_seconds: float,
                 write: Callable[[], str]):
        self.root = root
        """The checkpoint root."""
        self.tag = tag
        """The tag being saved."""
        self.step = step
        """The EMA step that is being written."""
        self.staged_bytes = staged_bytes
        """Host bytes the staged copy holds."""
        self.staging_seconds = staging_seconds
        """Time the caller spent staging (the training loop's stall)."""
        self._future: Future = Future()
        self._reported = False
        # Not a daemon: the interpreter waits for a save in flight before it exits.
        threading.Thread(target=self._run, args=(write,), name=f"shardema-save-{tag}", daemon=False).start()

    def _run(self, write: Callable[[], str]) -> None:
        self._future.set_running_or_notify_cancel()
        try:
            self._future.set_result(write())
        except BaseException as exc:  # reported by wait() or the next save
            logger.error("asynchronous save of %s under %s failed: %s", self.tag, self.root, exc)
            self._future.set_exception(exc)

    def done(self) -> bool:
        """True once the save has committed or failed."""
        return self._future.done()

    def wait(self, timeout: float | None = None) -> str:
        """Block until the save is committed and return its tag; raise the save's error if it failed.

        ``timeout`` (seconds) raises ``TimeoutError`` when the save is still running.
        """
        try:
            return self._future.result(timeout)
        finally:
            if self._future.done():
                self._reported = True

    def finish(self) -> str | None:
        """Wait for the save; its tag, or None when it failed and :meth:`wait` already raised the error.

        Raises the save's error if it failed and nobody has seen it yet (what a following
        save and :meth:`ShardedEMA.wait_for_save` call).
        """
        if not self._reported:
            return self.wait()
        return None if self._future.exception() is not None else self._future.result()


def start_save(ema, previous: SaveHandle | None, staging: StagedShadows | None, process_group, root: Path,
               tag: str, dtype: torch.dtype | None, pin_memory: bool = True) -> tuple[SaveHandle, StagedShadows]:
    """Stage ``ema`` now and start writing it on a background thread; returns the handle and the staging."""
    from ._writer import save_ema

    if previous is not None:
        previous.finish()
    started = time.perf_counter()
    shadows = ema.store.stage(staging, pin_memory=pin_memory)
    staged = StagedEMA(ema, shadows, process_group)
    handle = SaveHandle(root, tag, staged.step, shadows.nbytes, time.perf_counter() - started,
                        lambda: save_ema(staged, root, tag, dtype=dtype))
    return handle, shadows
