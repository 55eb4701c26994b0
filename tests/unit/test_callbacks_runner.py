"""UpdateCounter, hook order, the epoch / update / sample schedules, the runner and metric writers."""

from __future__ import annotations

import json

import pytest
import torch

from shardema.callbacks import (
    CallbackBase,
    CallbackConfig,
    CallbackRunner,
    IntervalType,
    JsonlWriter,
    MemoryWriter,
    MultiWriter,
    PeriodicCallback,
    PeriodicCallbackConfig,
    PrefixedWriter,
    UpdateCounter,
    default_writer,
    register_callback,
)


class RecorderConfig(PeriodicCallbackConfig):
    """Schedules only."""


@register_callback
class RecorderCallback(PeriodicCallback):
    """Records every hook and every periodic run into a shared list."""

    config_class = RecorderConfig

    def __init__(self, config=None, context=None, log=None):
        super().__init__(config, context)
        self.log = log if log is not None else []

    def _note(self, what, c, extra=None):
        self.log.append((self.name, what, c.epoch, c.update, c.sample, extra, torch.is_grad_enabled()))

    def before_training(self, *, update_counter, **kw):
        self._note("before_training", update_counter)

    def track_after_update_step(self, *, update_counter, **kw):
        self._note("track", update_counter, kw["values"].get("loss"))

    def after_update(self, *, update_counter, **kw):
        self._note("after_update", update_counter)
        super().after_update(update_counter=update_counter, **kw)

    def after_epoch(self, *, update_counter, **kw):
        self._note("after_epoch", update_counter)
        super().after_epoch(update_counter=update_counter, **kw)

    def after_training(self, *, update_counter, **kw):
        self._note("after_training", update_counter)

    def periodic_callback(self, *, interval_type, update_counter, **kw):
        self._note("periodic", update_counter, IntervalType(interval_type).value)

    def periodic(self):
        return [(e, u, s, kind) for (_, what, e, u, s, kind, _) in self.log if what == "periodic"]


def _recorder(log=None, **schedule):
    return RecorderCallback(RecorderConfig(**schedule), log=log)


def _train(runner, epochs, updates, num_samples=None, manual_epochs=True):
    runner.before_training()
    for _ in range(epochs):
        for u in range(updates):
            runner.after_update(num_samples=None if num_samples is None else num_samples[u], values={"loss": float(u)})
        if manual_epochs:
            runner.after_epoch()
    runner.after_training()


def test_update_counter_counts_and_tags():
    c = UpdateCounter(effective_batch_size=32, updates_per_epoch=3)
    assert c.iteration_tag == "E0_U0_S0" and not c.is_full_epoch
    for _ in range(3):
        c.next_update()
    assert c.is_full_epoch and c.iteration_tag == "E0_U3_S96"
    c.next_epoch()
    c.next_update(num_samples=5)
    assert (c.epoch, c.update, c.sample, c.last_update_samples) == (1, 4, 101, 5)
    assert c.iteration_tag == "E1_U4_S101"
    restored = UpdateCounter(effective_batch_size=32, updates_per_epoch=3)
    restored.load_state_dict(json.loads(json.dumps(c.state_dict())))
    assert restored.iteration_tag == c.iteration_tag and restored.last_update_samples == 5
    for bad in (dict(effective_batch_size=0), dict(updates_per_epoch=-1), dict(epoch=-1), dict(sample=1.5)):
        with pytest.raises(ValueError):
            UpdateCounter(**bad)
    with pytest.raises(ValueError, match="num_samples"):
        c.next_update(num_samples=-3)


def test_hook_order_over_two_epochs_with_automatic_epoch_ends():
    log = []
    a = _recorder(log, every_n_updates=2, name="A")
    b = _recorder(log, every_n_epochs=1, name="B")
    runner = CallbackRunner([a, b], effective_batch_size=4, updates_per_epoch=3, writer=MemoryWriter())
    _train(runner, epochs=2, updates=3, manual_epochs=True)  # explicit after_epoch() is a no-op here
    events = [(name, what, e, u, s) for (name, what, e, u, s, _, _) in log]
    expected = [("A", "before_training", 0, 0, 0), ("B", "before_training", 0, 0, 0)]
    for update in range(1, 7):
        epoch = update // 3
        s = 4 * update
        expected += [("A", "track", epoch, update, s), ("B", "track", epoch, update, s),
                     ("A", "after_update", epoch, update, s)]
        if update % 2 == 0:
            expected.append(("A", "periodic", epoch, update, s))
        expected.append(("B", "after_update", epoch, update, s))
        if update % 3 == 0:
            expected += [("A", "after_epoch", epoch, update, s), ("B", "after_epoch", epoch, update, s),
                         ("B", "periodic", epoch, update, s)]
    expected += [("A", "after_training", 2, 6, 24), ("B", "after_training", 2, 6, 24)]
    assert events == expected
    assert not any(grad for *_, grad in log), "hooks must run under torch.no_grad()"
    assert [x for (n, w, *_ , x, _) in log if w == "track" and n == "A"] == [0.0, 1.0, 2.0] * 2  # kwargs reach hooks


def test_epoch_schedule_with_manual_epoch_ends():
    rec = _recorder(every_n_epochs=2)
    runner = CallbackRunner([rec], effective_batch_size=2, writer=MemoryWriter())
    _train(runner, epochs=5, updates=2)
    assert rec.periodic() == [(2, 4, 8, "epoch"), (4, 8, 16, "epoch")]


def test_update_schedule():
    rec = _recorder(every_n_updates=3)
    runner = CallbackRunner([rec], effective_batch_size=1, writer=MemoryWriter())
    _train(runner, epochs=1, updates=10)
    assert [u for (_, u, _, _) in rec.periodic()] == [3, 6, 9]


def test_sample_schedule_fires_when_a_multiple_is_crossed():
    rec = _recorder(every_n_samples=10)
    runner = CallbackRunner([rec], writer=MemoryWriter())
    _train(runner, epochs=1, updates=10, num_samples=[4, 4, 4, 4, 4, 4, 4, 4, 25, 1])
    # samples: 4 8 12 16 20 24 28 32 57 58 -> crossings at 12, 20, 32, 57
    assert [(u, s) for (_, u, s, kind) in rec.periodic()] == [(3, 12), (5, 20), (8, 32), (9, 57)]
    assert {kind for *_, kind in rec.periodic()} == {"sample"}


def test_sample_schedule_uses_batch_size_when_the_loop_counts_no_samples():
    rec = _recorder(every_n_samples=10, batch_size=4)
    runner = CallbackRunner([rec], writer=MemoryWriter())
    _train(runner, epochs=1, updates=6)
    assert [u for (_, u, _, _) in rec.periodic()] == [3, 5]
    no_counts = _recorder(every_n_samples=10)
    runner = CallbackRunner([no_counts], writer=MemoryWriter())
    runner.before_training()
    with pytest.raises(ValueError, match="batch_size"):
        runner.after_update()


def test_update_and_sample_schedules_matching_together_run_once():
    rec = _recorder(every_n_updates=2, every_n_samples=8)
    runner = CallbackRunner([rec], effective_batch_size=4, writer=MemoryWriter())
    _train(runner, epochs=1, updates=4)
    assert rec.periodic() == [(0, 2, 8, "update"), (0, 4, 16, "update")]


def test_at_eval_runs_periodic_callbacks_with_the_eval_interval():
    rec = _recorder(every_n_epochs=100)
    runner = CallbackRunner([rec], effective_batch_size=1, writer=MemoryWriter())
    with pytest.raises(RuntimeError, match="before_training"):
        runner.at_eval()
    runner.before_training()
    runner.after_update()
    runner.at_eval()
    assert rec.periodic() == [(0, 1, 1, "eval")]


def test_runner_lifecycle_errors():
    runner = CallbackRunner([_recorder(every_n_updates=1)], effective_batch_size=1, updates_per_epoch=4,
                            writer=MemoryWriter())
    with pytest.raises(RuntimeError, match="after_update"):
        runner.after_update()
    runner.before_training()
    with pytest.raises(RuntimeError, match="before_training"):
        runner.before_training()
    runner.after_update()
    with pytest.raises(ValueError, match="updates_per_epoch"):
        runner.after_epoch()
    runner.after_training()
    with pytest.raises(RuntimeError, match="after_training"):
        runner.after_training()
    with pytest.raises(ValueError, match="not both"):
        CallbackRunner([], update_counter=UpdateCounter(), effective_batch_size=3)
    with pytest.raises(TypeError, match="callbacks\\[0\\]"):
        CallbackRunner([42])


def test_runner_builds_callbacks_from_configs_and_restores_its_state():
    configs = [{"kind": "RecorderCallback", "every_n_updates": 2, "name": "rec"},
               RecorderConfig(every_n_epochs=1, name="rec")]
    runner = CallbackRunner(configs, effective_batch_size=8, updates_per_epoch=2, writer=MemoryWriter())
    assert [type(cb).__name__ for cb in runner.callbacks] == ["RecorderCallback", "RecorderCallback"]
    assert runner["rec#2"] is runner.callbacks[1]
    runner.before_training()
    for _ in range(3):
        runner.after_update()
    state = runner.state_dict()
    assert state["update_counter"]["update"] == 3 and set(state["callbacks"]) == {"rec", "rec#2"}

    again = CallbackRunner(configs, effective_batch_size=8, updates_per_epoch=2, writer=MemoryWriter())
    again.resume_from_checkpoint(state)
    again.before_training()
    again.after_update()
    assert again.update_counter.iteration_tag == "E2_U4_S32"
    with pytest.raises(ValueError, match="do not match"):
        CallbackRunner([RecorderConfig(name="other")], writer=MemoryWriter()).load_state_dict(state)


class _PlainConfig(CallbackConfig):
    """No schedule."""


@register_callback
class PlainCallback(CallbackBase):
    config_class = _PlainConfig


def test_plain_callbacks_fire_on_every_hook_and_have_no_children():
    cb = PlainCallback()
    assert cb.kind_name == "PlainCallback" and cb.config.kind == "PlainCallback"
    assert cb.fires("after_update", UpdateCounter()) and cb.get_children() == [] and cb.state_dict() == {}


def test_metric_writers(tmp_path):
    memory = MemoryWriter()
    counter = UpdateCounter(effective_batch_size=2)
    counter.next_update()
    path = tmp_path / "m" / "metrics.jsonl"
    jsonl = JsonlWriter(path)
    writer = MultiWriter([memory, PrefixedWriter(jsonl, "ema=0.999/")])
    writer.add_scalar("loss/val", torch.tensor(0.25), update_counter=counter)
    writer.add_scalars({"a": 1, "b": float("nan")})
    writer.flush()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["key"], r["value"]) for r in lines] == [("ema=0.999/loss/val", 0.25), ("ema=0.999/a", 1.0),
                                                       ("ema=0.999/b", "nan")]
    assert (lines[0]["epoch"], lines[0]["update"], lines[0]["sample"]) == (0, 1, 2)
    assert memory.values("loss/val") == [0.25]
    with pytest.raises(ValueError, match="scalar"):
        memory.add_scalar("x", torch.ones(3))
    writer.close()

    run_dir = tmp_path / "run"
    default = default_writer(run_dir)
    default.add_scalar("k", 3.0)
    default.close()
    assert json.loads((run_dir / "metrics.jsonl").read_text())["key"] == "k"


def test_tensorboard_writer_writes_readable_event_files(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is in the dev extra; without it this test cannot run")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from shardema.callbacks import TensorBoardWriter

    counter = UpdateCounter()
    writer = TensorBoardWriter(tmp_path / "tb")
    for value in [0.5, 0.25, torch.tensor(0.125)]:
        counter.next_update()
        writer.add_scalar("ema=0.9/loss/val", value, update_counter=counter)
    writer.flush()
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = events.Scalars("ema=0.9/loss/val")
    assert [(e.step, e.value) for e in scalars] == [(1, 0.5), (2, 0.25), (3, 0.125)]


def test_tensorboard_writer_without_the_package_names_the_fix(tmp_path, monkeypatch):
    import builtins

    from shardema.callbacks import TensorBoardWriter

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "torch.utils.tensorboard" or name.startswith("tensorboard"):
            raise ImportError(f"No module named {name!r} (simulated)")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        TensorBoardWriter(tmp_path)
