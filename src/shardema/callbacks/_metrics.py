"""Metric writers: scalars by key, to logging, a JSONL file, TensorBoard or memory.

Callbacks reduce their metrics across ranks themselves, so every rank holds the
same value; the file and logging writers write on rank 0 only.
"""

from __future__ import annotations

import json
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import torch

from .. import _dist
from .._log import logger

if TYPE_CHECKING:  # pragma: no cover
    from ._counter import UpdateCounter


def _as_float(value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"a metric must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.detach().item())
    return float(value)


def _position(update_counter: UpdateCounter | None) -> dict:
    if update_counter is None:
        return {}
    return {"epoch": update_counter.epoch, "update": update_counter.update, "sample": update_counter.sample}


class MetricWriter(ABC):
    """Where callbacks send scalar metrics; subclass and implement :meth:`add_scalar`."""

    @abstractmethod
    def add_scalar(self, key: str, value, *, update_counter: UpdateCounter | None = None) -> None:
        """Record one scalar (a float or a one-element tensor) at the counter's position."""

    def add_scalars(self, values: Mapping[str, object], *, update_counter: UpdateCounter | None = None) -> None:
        """Record several scalars at the same position."""
        for key, value in values.items():
            self.add_scalar(key, value, update_counter=update_counter)

    def flush(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Push buffered records out (no-op by default)."""

    def close(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Release files and handles (no-op by default)."""


class LoggingWriter(MetricWriter):
    """Logs each scalar at INFO on the ``shardema`` logger (rank 0 only unless ``all_ranks``)."""

    def __init__(self, all_ranks: bool = False):
        self.all_ranks = all_ranks

    def add_scalar(self, key, value, *, update_counter=None) -> None:
        if self.all_ranks or _dist.rank() == 0:
            where = f" at {update_counter.iteration_tag}" if update_counter is not None else ""
            logger.info("%s = %.6g%s", key, _as_float(value), where)


class JsonlWriter(MetricWriter):
    """Appends one JSON object per scalar to ``path`` (rank 0 only).

    Each line holds ``key``, ``value``, ``epoch``, ``update``, ``sample`` and the wall
    time; non-finite values are written as strings (``"nan"``, ``"inf"``) so every
    line stays valid JSON.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file: TextIO | None = None

    def add_scalar(self, key, value, *, update_counter=None) -> None:
        if _dist.rank() != 0:
            return
        number = _as_float(value)
        record = {"key": key, "value": number if math.isfinite(number) else str(number),
                  **_position(update_counter), "time": time.time()}
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardWriter(MetricWriter):
    """Writes scalars to TensorBoard event files (rank 0 only); needs the ``tensorboard`` package.

    The global step is the update count.
    """

    def __init__(self, log_dir: str | os.PathLike):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(f"TensorBoardWriter needs the tensorboard package ({exc}); "
                              "install it with `pip install tensorboard` or use JsonlWriter") from None
        self._writer = SummaryWriter(log_dir=str(log_dir)) if _dist.rank() == 0 else None

    def add_scalar(self, key, value, *, update_counter=None) -> None:
        if self._writer is not None:
            step = update_counter.update if update_counter is not None else None
            self._writer.add_scalar(key, _as_float(value), global_step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class MemoryWriter(MetricWriter):
    """Keeps every record in :attr:`records` on every rank (tests, notebooks)."""

    def __init__(self):
        self.records: list[dict] = []

    def add_scalar(self, key, value, *, update_counter=None) -> None:
        self.records.append({"key": key, "value": _as_float(value), **_position(update_counter)})

    def values(self, key: str) -> list[float]:
        """The recorded values of ``key``, oldest first."""
        return [r["value"] for r in self.records if r["key"] == key]


class MultiWriter(MetricWriter):
    """Sends every scalar to several writers."""

    def __init__(self, writers: Iterable[MetricWriter]):
        self.writers = list(writers)

    def add_scalar(self, key, value, *, update_counter=None) -> None:
        for writer in self.writers:
            writer.add_scalar(key, value, update_counter=update_counter)

    def flush(self) -> None:
        for writer in self.writers:
            writer.flush()

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


class PrefixedWriter(MetricWriter):
    """Prepends ``prefix`` to every key (the EMA callback uses ``ema=<factor>/``).

    Flushing reaches the wrapped writer; closing is left to its owner.
    """

    def __init__(self, writer: MetricWriter, prefix: str):
        self.writer = writer
        self.prefix = prefix

    def add_scalar(self, key, value, *, update_counter=None) -> None:
        self.writer.add_scalar(self.prefix + key, value, update_counter=update_counter)

    def flush(self) -> None:
        self.writer.flush()


def default_writer(run_dir: str | os.PathLike | None = None, *, tensorboard: bool = False) -> MetricWriter:
    """Logging, plus ``<run_dir>/metrics.jsonl`` when ``run_dir`` is given, plus TensorBoard
    (``<run_dir>/tensorboard``) when asked for and the package is installed."""
    writers: list[MetricWriter] = [LoggingWriter()]
    if run_dir is not None:
        writers.append(JsonlWriter(Path(run_dir) / "metrics.jsonl"))
        if tensorboard:
            try:
                writers.append(TensorBoardWriter(Path(run_dir) / "tensorboard"))
            except ImportError as exc:
                logger.warning("%s", exc)
    return MultiWriter(writers)
