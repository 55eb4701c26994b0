"""EmaCallback and the schedules: samples reach ``ema.update`` (edm from YAML), retention of
iteration-tag checkpoints (``keep_last_n_weights``), ``start_epoch`` against a float64 replay."""

from __future__ import annotations

import logging
import zlib

import pytest
import torch
from torch import nn

import shardema
from shardema.callbacks import CallbackRunner, EmaCallback, EmaCallbackConfig, MemoryWriter, UpdateCounter
from shardema.checkpoint import delete_checkpoint, list_checkpoints, load_ema


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


@torch.no_grad()
def _set_live(model: nn.Module, update: int) -> dict[str, torch.Tensor]:
    """Live weights after update ``update`` (1-based; 0 = init): a fresh value every update."""
    for name, p in model.named_parameters():
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()) * 1000 + update)
        p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _shadows(ema, factor) -> dict[str, torch.Tensor]:
    return {t.fqn: ema.shadow(factor, t.key).clone() for t in ema.tracked()}


def _replay(init, lives, decay_of, factor):
    """float64 EMA of ``lives`` (the states after updates 1, 2, ...); ``decay_of(factor, u)`` gives
    the decay of the update at index u (0-based), 0 for a copy, None for a skipped update."""
    shadow = dict(init)
    for u, live in enumerate(lives):
        d = decay_of(factor, u)
        if d is not None:
            shadow = {k: d * shadow[k] + (1 - d) * live[k] for k in shadow}
    return shadow


def _assert_close(ours, expected, atol=1e-12):
    assert ours.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(ours[k], expected[k], rtol=0, atol=atol)


# ---------------------------------------------------------------------------- samples: edm from YAML
EDM_YAML = """
- kind: EmaCallback
  target_factors: [0.9999, 0.99]
  shadow_dtype: float64
  schedule: edm
  half_life_samples: 200
  rampup_ratio: 0.05
  save_last_weights: false
"""


def _edm_decay(f, samples, seen, half_life=200.0, ratio=0.05):
    return min(f, 0.5 ** (samples / max(min(half_life, seen * ratio), 1e-8)))


def test_edm_from_yaml_gets_each_updates_samples():
    """Varying batches passed to runner.after_update(num_samples=...) reach ema.update: the EMA
    equals the EDM closed form with each update's own sample count."""
    model = _model()
    init = _set_live(model, 0)
    runner = CallbackRunner(EDM_YAML, model=model, writer=MemoryWriter())
    runner.before_training()
    batch = [8 + (u % 7) for u in range(60)]
    lives = []
    for u in range(60):
        lives.append(_set_live(model, u + 1))
        runner.after_update(num_samples=batch[u])
    ema = runner[0].ema
    seen = [sum(batch[:u]) for u in range(60)]
    for f in (0.9999, 0.99):
        _assert_close(_shadows(ema, f), _replay(init, lives, lambda f, u: _edm_decay(f, batch[u], seen[u]), f))
    assert ema.samples_seen == sum(batch)


def test_samples_come_from_the_effective_batch_size_or_the_configs_batch_size():
    """UpdateCounter(effective_batch_size=b) counts b per update; without counts, the config's
    batch_size stands in; with neither, an edm schedule fails naming the fixes."""
    model = _model()
    runner = CallbackRunner(EDM_YAML, model=model, writer=MemoryWriter(), effective_batch_size=12)
    runner.before_training()
    for u in range(5):
        _set_live(model, u + 1)
        runner.after_update()
    assert runner[0].ema.samples_seen == 60

    config = EmaCallbackConfig(target_factors=[0.99], schedule="edm", half_life_samples=100.0,
                               every_n_samples=40, batch_size=10, save_last_weights=False)
    runner = CallbackRunner([config], model=model, writer=MemoryWriter())
    runner.before_training()
    runner.after_update()
    assert runner[0].ema.samples_seen == 10

    config = EmaCallbackConfig(target_factors=[0.99], schedule="edm", half_life_samples=100.0,
                               save_last_weights=False)
    runner = CallbackRunner([config], model=model, writer=MemoryWriter())
    runner.before_training()
    with pytest.raises(ValueError, match="effective_batch_size"):
        runner.after_update()
    # samples_per_update in the config is enough
    config = config.model_copy(update={"schedule": config.schedule.model_copy(update={"samples_per_update": 4})})
    runner = CallbackRunner([config], model=model, writer=MemoryWriter())
    runner.before_training()
    runner.after_update()
    assert runner[0].ema.samples_seen == 4


# ---------------------------------------------------------------------------- retention
def _label_dirs(root, labels=("0", "2")) -> dict[str, list[str]]:
    return {label: sorted(p.name for p in (root / label).iterdir() if p.name.startswith("cp="))
            for label in labels}


def _retention_runner(root, keep=2, **extra):
    model = _model()
    _set_live(model, 0)
    config = EmaCallbackConfig(target_factors=[0.9], model_paths=["0", "2"], every_n_updates=1, save_weights=True,
                               save_latest_weights=True, keep_last_n_weights=keep, **extra)
    runner = CallbackRunner([config], model=model, writer=MemoryWriter(), effective_batch_size=4, ema_root=root)
    return runner, model


def test_keep_last_n_weights_keeps_the_newest_and_only_iteration_tags(tmp_path):
    root = tmp_path / "ema"
    # An earlier run left an iteration tag (counted as older than any of this run's, whatever
    # its numbers) and a tag of the user's own (never touched).
    model = _model()
    earlier = shardema.ShardedEMA(model, [0.9], model_paths=["0", "2"])
    earlier.save(root, "E0_U3_S99")
    earlier.save(root, "mytag")

    runner, model = _retention_runner(root, keep=2)
    runner.before_training()
    cb: EmaCallback = runner[0]
    steps_at = {}
    for u in range(5):
        _set_live(model, u + 1)
        runner.after_update()
        steps_at[runner.update_counter.iteration_tag] = cb.ema.step
        # after every save: the 2 newest iteration tags
        assert cb.iteration_tags_on_disk() == sorted((["E0_U3_S99", *steps_at])[-2:])
    runner.after_training()
    expected = ["cp=E0_U4_S16", "cp=E0_U5_S20", "cp=last", "cp=latest", "cp=mytag"]
    assert _label_dirs(root) == {"0": expected, "2": expected}
    # a reader finds every kept tag, whole (both model paths) and at its step
    for tag in ("E0_U4_S16", "E0_U5_S20"):
        reader = shardema.ShardedEMA(_model(), [0.9], model_paths=["0", "2"])
        assert load_ema(reader, root, tag) == tag and reader.step == steps_at[tag]
    states = {(i.model_path, i.tag): i.state for i in list_checkpoints(root)}
    assert set(states.values()) == {"committed"}
    assert ("0", "E0_U3_S99") not in states  # the earlier run's tag went first


def test_async_saves_write_each_positions_values_and_retention_counts_only_committed_tags(tmp_path):
    root = tmp_path / "ema"
    runner, model = _retention_runner(root, keep=2, async_save=True)
    runner.before_training()
    cb: EmaCallback = runner[0]
    at = {}
    for u in range(5):
        _set_live(model, u + 1)
        runner.after_update()
        at[runner.update_counter.iteration_tag] = (cb.ema.step, _shadows(cb.ema, 0.9))
        # never more than the 2 kept committed tags plus the one in flight
        assert len(cb.iteration_tags_on_disk()) <= 3
    runner.after_training()  # waits for the save in flight, then cp=last (blocking)
    expected = ["cp=E0_U4_S16", "cp=E0_U5_S20", "cp=last", "cp=latest"]
    assert _label_dirs(root) == {"0": expected, "2": expected}
    for tag in ("E0_U4_S16", "E0_U5_S20", "latest", "last"):
        reader = shardema.ShardedEMA(_model(), [0.9], model_paths=["0", "2"])
        assert load_ema(reader, root, tag) == tag
        step, shadows = at.get(tag, at["E0_U5_S20"])
        assert reader.step == step
        _assert_close(_shadows(reader, 0.9), shadows, atol=0)


def test_pruning_happens_after_the_commit_and_a_crash_leaves_extra_never_fewer(tmp_path, monkeypatch, caplog):
    root = tmp_path / "ema"
    runner, model = _retention_runner(root, keep=1)
    runner.before_training()
    deleted_when = []
    import shardema.callbacks._ema_callback as ema_callback_module

    def deleting(root_, tag, model_paths):
        # the new checkpoint is committed (complete on disk) before any older one goes
        newest = runner.update_counter.iteration_tag
        assert shardema.checkpoint.list_checkpoints(root_) and all(
            i.state == "committed" for i in list_checkpoints(root_) if i.tag == newest)
        deleted_when.append((tag, newest))
        return delete_checkpoint(root_, tag, model_paths)

    monkeypatch.setattr(ema_callback_module, "delete_checkpoint", deleting)
    for u in range(3):
        _set_live(model, u + 1)
        runner.after_update()
    assert deleted_when == [("E0_U1_S4", "E0_U2_S8"), ("E0_U2_S8", "E0_U3_S12")]

    # A failing deletion is logged; the old tag stays (extra), the next save retries.
    def failing(root_, tag, model_paths):
        raise OSError("read-only file system")

    monkeypatch.setattr(ema_callback_module, "delete_checkpoint", failing)
    with caplog.at_level(logging.WARNING, logger="shardema"):
        _set_live(model, 4)
        runner.after_update()
    assert "could not delete the old EMA checkpoint cp=E0_U3_S12" in caplog.text
    assert runner[0].iteration_tags_on_disk() == ["E0_U3_S12", "E0_U4_S16"]

    # The job is killed between the commits (the tag's, then latest's) and the deletion: the old tags stay.
    def killed(root_, tag, model_paths):
        raise SystemExit("killed")

    monkeypatch.setattr(ema_callback_module, "delete_checkpoint", killed)
    _set_live(model, 5)
    with pytest.raises(SystemExit):
        runner.after_update()
    assert runner[0].iteration_tags_on_disk() == ["E0_U3_S12", "E0_U4_S16", "E0_U5_S20"]
    state = runner.state_dict()

    # The resumed run prunes what the killed one left, keeping only the newest.
    monkeypatch.undo()
    runner2, model2 = _retention_runner(root, keep=1)
    runner2.resume_from_checkpoint(state)
    runner2.before_training()
    assert runner2[0].resumed_from == "latest" and runner2[0].ema.step == 5
    _set_live(model2, 6)
    runner2.after_update()
    assert runner2[0].iteration_tags_on_disk() == ["E0_U6_S24"]
    assert _label_dirs(root) == {label: ["cp=E0_U6_S24", "cp=latest"] for label in ("0", "2")}


def test_delete_checkpoint_renames_away_and_respects_the_writer_lock(tmp_path):
    root = tmp_path / "ema"
    model = _model()
    ema = shardema.ShardedEMA(model, [0.9], model_paths=["0", "2"])
    ema.save(root, "E0_U1_S1")
    removed = delete_checkpoint(root, "E0_U1_S1", ["0", "2"])
    assert sorted(p.parent.name for p in removed) == ["0", "2"]
    assert _label_dirs(root) == {"0": [], "2": []}
    assert delete_checkpoint(root, "E0_U1_S1", ["0", "2"]) == []  # gone: nothing to do
    ema.save(root, "E0_U2_S2")
    from shardema.checkpoint import CheckpointLockedError, WriterLock

    with WriterLock(root / "2"), pytest.raises(CheckpointLockedError):
        delete_checkpoint(root, "E0_U2_S2", ["0", "2"])
    with pytest.raises(ValueError, match="not valid"):
        delete_checkpoint(root, "../x", None)


# ---------------------------------------------------------------------------- start_epoch
def _run_start_epoch(schedule: dict, start_epoch: int, epochs: int, per_epoch: int, upe_known: bool):
    model = _model()
    init = _set_live(model, 0)
    config = EmaCallbackConfig(target_factors=[0.99, 0.8], shadow_dtype="float64", save_last_weights=False,
                               start_epoch=start_epoch, **schedule)
    runner = CallbackRunner([config], model=model, writer=MemoryWriter(),
                            updates_per_epoch=per_epoch if upe_known else None)
    runner.before_training()
    lives = []
    for _epoch in range(epochs):
        for _ in range(per_epoch):
            lives.append(_set_live(model, len(lives) + 1))
            runner.after_update()
        runner.after_epoch()  # a no-op when updates_per_epoch closed the epoch already
    assert runner.update_counter.epoch == epochs
    return runner[0].ema, init, lives


@pytest.mark.parametrize("upe_known", [True, False], ids=["updates_per_epoch", "after_epoch"])
def test_start_epoch_copies_until_the_epoch_then_averages_from_a_fresh_clock(upe_known):
    """start_epoch=2 with 4 updates per epoch: updates 0-7 copy the live weights, update 8 is the
    first averaged one with n = 0 (power schedule, update_every=2, first firing copies). The same
    whether epochs end by updates_per_epoch or by after_epoch()."""
    schedule = dict(schedule="power", power=0.75, update_every=2, first_update_copies=True, min_decay=0.1)
    ema, init, lives = _run_start_epoch(schedule, start_epoch=2, epochs=6, per_epoch=4, upe_known=upe_known)

    def decay(f, u):
        if u < 8:
            return 0.0
        n = u - 8
        if n % 2:
            return None
        return 0.0 if n == 0 else max(min(f, 1 - (1 + n) ** -0.75), 0.1)

    for f in (0.99, 0.8):
        _assert_close(_shadows(ema, f), _replay(init, lives, decay, f))
    assert ema.step == 24 - 8  # the EMA's clock started at epoch 2


def test_start_epoch_equals_start_step_of_the_updates_before_it():
    """For every schedule that does not count samples, start_epoch=e is start_step=e x updates_per_epoch
    (bit for bit); the EMA's own step counts from the start epoch."""
    schedule = dict(schedule="warmup", update_every=3)
    ours, _, lives = _run_start_epoch(schedule, start_epoch=3, epochs=5, per_epoch=5, upe_known=True)
    model = _model()
    _set_live(model, 0)
    direct = shardema.ShardedEMA(model, [0.99, 0.8], shadow_dtype="float64", start_step=15, schedule="warmup",
                                 update_every=3)
    for u in range(len(lives)):
        _set_live(model, u + 1)
        direct.update()
    for f in (0.99, 0.8):
        a, b = _shadows(ours, f), _shadows(direct, f)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_start_epoch_zero_changes_nothing_and_the_config_checks():
    a, _, _ = _run_start_epoch({}, start_epoch=0, epochs=2, per_epoch=3, upe_known=True)
    model = _model()
    _set_live(model, 0)
    b = shardema.ShardedEMA(model, [0.99, 0.8], shadow_dtype="float64")
    for u in range(6):
        _set_live(model, u + 1)
        b.update()
    assert all(torch.equal(x, y) for x, y in zip(_shadows(a, 0.8).values(), _shadows(b, 0.8).values()))
    with pytest.raises(ValueError, match="give one of them"):
        EmaCallbackConfig(start_epoch=1, start_step=10)
    with pytest.raises(ValueError, match="save_weights is false"):
        EmaCallbackConfig(keep_last_n_weights=3)
    with pytest.raises(ValueError, match="keep_last_n_weights"):
        EmaCallbackConfig(keep_last_n_weights=0, save_weights=True, every_n_updates=1)
    counter = UpdateCounter(updates_per_epoch=4)
    for _ in range(4):
        counter.next_update()
        assert counter.update_epoch == 0
    counter.next_epoch()  # as the runner does at the 4th update, before its hooks
    assert counter.update_epoch == 0  # the 4th update belongs to epoch 0 although the epoch is counted
    counter.next_update()
    assert counter.update_epoch == 1
