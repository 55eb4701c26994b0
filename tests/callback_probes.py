"""Probe callbacks shared by the unit and distributed callback tests (one place for the boilerplate)."""

from __future__ import annotations

from shardema.callbacks import NO_VALUES, PeriodicCallback, PeriodicCallbackConfig


class ProbeConfig(PeriodicCallbackConfig):
    """Schedules only."""


class RecordingProbe(PeriodicCallback):
    """Counts its runs (its state) and appends what :meth:`record` returns to ``seen`` at every run.

    Subclasses register their own ``kind`` and override :meth:`record` (and may log).
    """

    config_class = ProbeConfig

    def __init__(self, config=None, context=None):
        super().__init__(config, context)
        self.runs = 0
        self.seen: list = []

    def record(self, interval_type, update_counter):
        """What to remember of one run (override)."""
        return (interval_type.value, update_counter.update)

    def periodic_callback(self, *, interval_type, update_counter, values=NO_VALUES):
        self.runs += 1
        self.seen.append(self.record(interval_type, update_counter))

    def state_dict(self):
        return {"runs": self.runs}

    def load_state_dict(self, state):
        self.runs = state["runs"]
