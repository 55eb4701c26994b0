"""UpdateCounter: where training stands (epochs, updates, samples)."""

from __future__ import annotations

import re

_ITERATION_TAG_RE = re.compile(r"E(\d+)_U(\d+)_S(\d+)")


def parse_iteration_tag(tag: str) -> tuple[int, int, int] | None:
    """``(epoch, update, sample)`` of an iteration tag ``E{e}_U{u}_S{s}``; None for other tags."""
    match = _ITERATION_TAG_RE.fullmatch(tag)
    return None if match is None else (int(match.group(1)), int(match.group(2)), int(match.group(3)))


class UpdateCounter:
    """Completed epochs, optimizer updates and samples of a training run.

    ``epoch`` counts completed epochs, ``update`` completed optimizer updates and
    ``sample`` the samples those updates consumed, summed over all ranks. The
    counter is identical on every rank, which is what lets every rank decide on its
    own, and consistently, that a periodic callback fires.

    Args:
        effective_batch_size: samples per update over all ranks; the default sample
            count of :meth:`next_update`. ``None``: samples are counted only when the
            loop passes them.
        updates_per_epoch: when given, an epoch ends automatically after every
            ``updates_per_epoch`` updates (see :class:`CallbackRunner`).
        epoch, update, sample: the starting point (e.g. after a resume).
    """

    def __init__(self, *, effective_batch_size: int | None = None, updates_per_epoch: int | None = None,
                 epoch: int = 0, update: int = 0, sample: int = 0):
        for name, value in (("effective_batch_size", effective_batch_size), ("updates_per_epoch", updates_per_epoch)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive int or None")
        for name, value in (("epoch", epoch), ("update", update), ("sample", sample)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}={value!r} must be a non-negative int")
        self.effective_batch_size = effective_batch_size
        self.updates_per_epoch = updates_per_epoch
        self.epoch = epoch
        self.update = update
        self.sample = sample
        self.last_update_samples = 0
        """Samples consumed by the latest update (0 when the loop does not count them)."""

    # ------------------------------------------------------------------ progress
    def next_update(self, num_samples: int | None = None) -> None:
        """Count one optimizer update of ``num_samples`` samples (default: the effective batch size)."""
        if num_samples is None:
            num_samples = self.effective_batch_size or 0
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 0:
            raise ValueError(f"num_samples={num_samples!r} must be a non-negative int (samples of this update, "
                             "summed over all ranks)")
        self.update += 1
        self.sample += num_samples
        self.last_update_samples = num_samples

    def next_epoch(self) -> None:
        """Count one completed epoch."""
        self.epoch += 1

    @property
    def is_full_epoch(self) -> bool:
        """True when the latest update completed an epoch (needs ``updates_per_epoch``)."""
        per_epoch = self.updates_per_epoch
        return per_epoch is not None and per_epoch > 0 and self.update > 0 and self.update % per_epoch == 0

    @property
    def counts_samples(self) -> bool:
        """True when updates report their sample counts."""
        return self.sample > 0 or self.effective_batch_size is not None

    @property
    def update_epoch(self) -> int:
        """0-based index of the epoch the latest update belongs to: ``epoch``, less one when that
        update completed an epoch the runner has already counted (with ``updates_per_epoch`` it
        counts the epoch before the update's hooks run; without, at ``after_epoch``)."""
        counted = self.updates_per_epoch is not None and self.is_full_epoch
        return max(0, self.epoch - 1) if counted else self.epoch

    @property
    def iteration_tag(self) -> str:
        """``E{epoch}_U{update}_S{sample}``, the tag of per-iteration checkpoints."""
        return f"E{self.epoch}_U{self.update}_S{self.sample}"

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Plain ints, picklable and JSON-serialisable."""
        return {"epoch": self.epoch, "update": self.update, "sample": self.sample,
                "last_update_samples": self.last_update_samples,
                "effective_batch_size": self.effective_batch_size, "updates_per_epoch": self.updates_per_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Restore the counts; a changed batch size or epoch length is kept from the constructor."""
        for key in ("epoch", "update", "sample"):
            value = state[key]
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"counter state {key}={value!r} must be a non-negative int")
            setattr(self, key, value)
        self.last_update_samples = int(state.get("last_update_samples", 0))

    def __repr__(self) -> str:
        return (f"UpdateCounter(epoch={self.epoch}, update={self.update}, sample={self.sample}, "
                f"effective_batch_size={self.effective_batch_size}, updates_per_epoch={self.updates_per_epoch})")
