"""EmaCallback in one process: EMA values, swaps only when a child fires, metric prefixes,
saves, resume order, children's state; OfflineLossCallback."""

from __future__ import annotations

import functools
import logging

import pytest
import torch
from torch import nn

import callback_probes
from callback_probes import RecordingProbe
from shardema.callbacks import (
    CallbackRunner,
    EmaCallback,
    EmaCallbackConfig,
    MemoryWriter,
    OfflineLossCallback,
    OfflineLossCallbackConfig,
    UpdateCounter,
    batch_size_of,
    factor_prefix,
)


class ProbeConfig(callback_probes.ProbeConfig):
    """Schedules only (this module's probe kind)."""


class EmaProbeCallback(RecordingProbe, kind="EmaProbeCallback"):
    """Records the model's weights whenever it runs; counts its runs (its state)."""

    config_class = ProbeConfig

    def __init__(self, config=None, context=None):
        super().__init__(config, context)  # seen: (hook kind, update, swapped?, weights)
        self.swap_state = None  # set by tests: a dict whose "depth" says whether a swap is active

    def _swapped(self):
        return None if self.swap_state is None else self.swap_state["depth"] > 0

    def before_training(self, *, update_counter, **kw):
        self.seen.append(("before_training", update_counter.update, self._swapped(), None))

    def after_training(self, *, update_counter, **kw):
        self.seen.append(("after_training", update_counter.update, self._swapped(), None))

    def record(self, interval_type, update_counter):
        weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.log_scalar("probe/weight_sum", sum(float(w.sum()) for w in weights.values()), update_counter)
        return (interval_type.value, update_counter.update, self._swapped(), weights)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)) for _ in range(n)]


def _loss_fn(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _count_swaps(ema, state=None):
    """Wrap ``ema.swapped`` on the instance: count entries and track whether one is active."""
    state = state if state is not None else {}
    state.update(count=0, depth=0, factors=[])
    original = ema.swapped

    @functools.wraps(original)
    def counting(factor, model_paths=None):
        import contextlib

        @contextlib.contextmanager
        def cm():
            state["count"] += 1
            state["factors"].append(factor)
            with original(factor, model_paths):
                state["depth"] += 1
                try:
                    yield
                finally:
                    state["depth"] -= 1
        return cm()

    ema.swapped = counting
    return state


def _count_saves(ema):
    tags = []
    original = ema.save

    def recording(root, tag="latest"):
        tags.append(tag)
        return original(root, tag)

    ema.save = recording
    return tags


def _train(runner, model, batches, epochs=1, on_step=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(epochs):
        for batch in batches:
            opt.zero_grad()
            _loss_fn(model, batch).backward()
            opt.step()
            live = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if on_step is not None:
                on_step(live)
            runner.after_update(num_samples=4)
            for k, v in model.state_dict().items():  # the callbacks leave the live weights bit-exact
                assert torch.equal(v, live[k]), k
        runner.after_epoch()


def _reference(model_states, factors):
    """float64 EMA trajectory: {factor: [state after update 0, 1, ...]}; update 0 = init."""
    out = {}
    for f in factors:
        ema = {k: v.double() for k, v in model_states[0].items()}
        traj = [dict(ema)]
        for live in model_states[1:]:
            ema = {k: f * ema[k] + (1 - f) * live[k].double() for k in ema}
            traj.append(dict(ema))
        out[f] = traj
    return out


def test_children_see_the_ema_weights_of_each_factor_with_prefixed_metrics(tmp_path):
    factors = [0.9, 0.5]
    model = _model()
    writer = MemoryWriter()
    config = EmaCallbackConfig(target_factors=factors, save_last_weights=False, eval_callbacks=[
        ProbeConfig(every_n_updates=2),
        OfflineLossCallbackConfig(dataset_key="val", every_n_epochs=1),
    ])
    val = _batches(3, seed=7)
    runner = CallbackRunner([config], model=model, writer=writer, datasets={"val": val}, loss_fn=_loss_fn,
                            updates_per_epoch=4, run_dir=tmp_path)
    runner.before_training()
    ema_cb: EmaCallback = runner[0]
    states = [{k: v.detach().clone() for k, v in model.state_dict().items()}]
    _train(runner, model, _batches(4), epochs=2, on_step=states.append)
    runner.after_training()
    ref = _reference(states, factors)
    assert ema_cb.ema.step == 8

    probes = {f: ema_cb.eval_callbacks[f][0] for f in factors}
    for f in factors:
        seen = [(kind, u, w) for (kind, u, _, w) in probes[f].seen if kind == "update"]
        assert [u for _, u, _ in seen] == [2, 4, 6, 8]
        for _, u, weights in seen:
            for k, w in weights.items():
                torch.testing.assert_close(w.double(), ref[f][u][k], rtol=0, atol=1e-6)
        # metric keys carry the factor prefix; values are the EMA weights' sums
        sums = writer.values(f"{factor_prefix(f)}probe/weight_sum")
        assert sums == pytest.approx([sum(float(v.sum()) for v in ref[f][u].values()) for u in (2, 4, 6, 8)],
                                     abs=1e-5)
        # OfflineLoss with the EMA weights == loss of a reference model holding the reference EMA
        reference_model = _model()
        reference_model.load_state_dict({k: v.float() for k, v in ref[f][8].items()})
        with torch.no_grad():
            expected = sum(float(_loss_fn(reference_model, b)) for b in val) / len(val)
        assert writer.values(f"{factor_prefix(f)}loss/val")[-1] == pytest.approx(expected, rel=1e-5)
    assert factor_prefix(0.9) == "ema=0.9/"
    assert not any(r["key"].startswith("probe") or r["key"].startswith("loss") for r in writer.records)
    assert len(ema_cb.get_children()) == 4 and all(c in runner.all_callbacks() for c in ema_cb.get_children())


def test_swaps_happen_only_when_a_child_fires():
    factors = [0.9, 0.99]
    model = _model()
    config = EmaCallbackConfig(target_factors=factors, save_last_weights=False, eval_callbacks=[
        ProbeConfig(every_n_updates=3), ProbeConfig(every_n_epochs=2)])
    runner = CallbackRunner([config], model=model, writer=MemoryWriter(), updates_per_epoch=4)
    ema_cb: EmaCallback = runner[0]
    swaps = {"depth": 0}
    for child in ema_cb.get_children():
        child.swap_state = swaps
    runner.before_training()
    _count_swaps(ema_cb.ema, swaps)
    _train(runner, model, _batches(4), epochs=3)  # 12 updates, epochs end at updates 4, 8, 12
    # update schedule fires at 3, 6, 9, 12; epoch schedule at epoch 2 (update 8): 5 hooks x 2 factors
    assert swaps["count"] == 10
    assert swaps["factors"] == [0.9, 0.99] * 5
    runner.at_eval()
    assert swaps["count"] == 12
    runner.after_training()
    assert swaps["count"] == 12
    every3, every_2_epochs = ema_cb.eval_callbacks[0.9]
    assert [(k, u, s) for (k, u, s, _) in every3.seen] == [
        ("before_training", 0, False), ("update", 3, True), ("update", 6, True), ("update", 9, True),
        ("update", 12, True), ("eval", 12, True), ("after_training", 12, False)]
    assert [(k, u, s) for (k, u, s, _) in every_2_epochs.seen if k not in ("before_training", "after_training")] \
        == [("epoch", 8, True), ("eval", 12, True)]


def test_no_swap_without_children_or_when_none_fire():
    model = _model()
    runner = CallbackRunner([EmaCallbackConfig(save_last_weights=False),
                             EmaCallbackConfig(name="ema2", root="unused", save_last_weights=False,
                                               eval_callbacks=[ProbeConfig(every_n_updates=1000)])],
                            model=model, writer=MemoryWriter(), effective_batch_size=4)
    runner.before_training()
    counts = [_count_swaps(runner[0].ema), _count_swaps(runner[1].ema)]
    _train(runner, model, _batches(5))
    runner.after_training()
    assert [c["count"] for c in counts] == [0, 0]


def test_save_last_weights_without_save_weights_and_the_periodic_tags(tmp_path):
    model = _model()
    runner = CallbackRunner([EmaCallbackConfig(every_n_epochs=1, save_weights=False, save_latest_weights=False,
                                               save_last_weights=True)],
                            model=model, writer=MemoryWriter(), updates_per_epoch=2, ema_root=tmp_path / "a")
    runner.before_training()
    tags = _count_saves(runner[0].ema)
    _train(runner, model, _batches(2), epochs=2)
    runner.after_training()
    assert tags == ["last"]

    model = _model()
    runner = CallbackRunner([EmaCallbackConfig(every_n_updates=2, every_n_epochs=1, save_weights=True,
                                               save_latest_weights=True, save_last_weights=False)],
                            model=model, writer=MemoryWriter(), updates_per_epoch=4, ema_root=tmp_path / "b")
    runner.before_training()
    tags = _count_saves(runner[0].ema)
    _train(runner, model, _batches(4), epochs=1)
    runner.after_training()
    # update 4 ends the epoch: both schedules fire there, each tag is saved once
    assert tags == ["E0_U2_S8", "latest", "E1_U4_S16", "latest"]
    assert runner[0].saved_tags == tags


def test_saving_needs_a_directory_and_roots_must_differ(tmp_path):
    with pytest.raises(ValueError, match="checkpoint directory"):
        CallbackRunner([EmaCallbackConfig()], model=_model(), writer=MemoryWriter())
    with pytest.raises(ValueError, match="both write checkpoints"):
        CallbackRunner([EmaCallbackConfig(), EmaCallbackConfig(name="second")], model=_model(),
                       writer=MemoryWriter(), run_dir=tmp_path)


def _ema_values(ema):
    return {k: v.detach().clone() for k, v in ema.state_dict().items() if k.startswith("ema=")}


def test_resume_order_latest_then_last_then_init(tmp_path, caplog):
    root = tmp_path / "ema"

    def run(config, resume, updates, seed):
        model = _model(seed)
        runner = CallbackRunner([config], model=model, writer=MemoryWriter(), effective_batch_size=4,
                                ema_root=root)
        if resume:
            runner.resume_from_checkpoint()
        runner.before_training()
        _train(runner, model, _batches(updates, seed=seed))
        runner.after_training()
        return runner[0], model

    # 1) empty directory: resume falls back to the live weights
    cb, _ = run(EmaCallbackConfig(target_factors=[0.9], save_last_weights=True), True, 3, seed=0)
    assert cb.resumed_from is None
    last_values = _ema_values(cb.ema)

    # 2) only cp=last exists (save_last_weights without save_weights): resume loads it
    cb2, _ = run(EmaCallbackConfig(target_factors=[0.9], save_last_weights=False), True, 0, seed=5)
    assert cb2.resumed_from == "last"
    for k, v in _ema_values(cb2.ema).items():
        assert torch.equal(v, last_values[k]), k
    assert cb2.ema.step == 3

    # 3) a run saving cp=latest every 2 updates: the next resume prefers it over cp=last
    cb3, _ = run(EmaCallbackConfig(target_factors=[0.9], every_n_updates=2, save_latest_weights=True,
                                   save_last_weights=False), True, 4, seed=6)
    assert cb3.resumed_from == "last" and cb3.saved_tags == ["latest", "latest"]
    latest_values = _ema_values(cb3.ema)
    cb4, _ = run(EmaCallbackConfig(target_factors=[0.9], save_last_weights=False), True, 0, seed=7)
    assert cb4.resumed_from == "latest"
    for k, v in _ema_values(cb4.ema).items():
        assert torch.equal(v, latest_values[k]), k

    # strict resume refuses to start from the live weights
    strict = CallbackRunner([EmaCallbackConfig(target_factors=[0.9], strict_resume=True, save_last_weights=False)],
                            model=_model(), writer=MemoryWriter(), ema_root=tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        strict.resume_from_checkpoint()


def test_resume_without_a_checkpoint_resets_an_existing_ema_to_the_live_weights(tmp_path):
    model = _model()
    runner = CallbackRunner([EmaCallbackConfig(target_factors=[0.9, 0.5], save_last_weights=False)], model=model,
                            writer=MemoryWriter(), effective_batch_size=4, ema_root=tmp_path / "empty")
    ema = runner[0].create_ema()
    with torch.no_grad():  # move the EMA away from the live weights, then put the live weights back
        before = [p.detach().clone() for p in model.parameters()]
        for p in model.parameters():
            p.add_(1.0)
        ema.update()
        for p, b in zip(model.parameters(), before):
            p.copy_(b)
    live = {t.key: t.local().detach().clone() for t in ema.tracked()}
    assert not all(torch.equal(ema.shadow(0.9, key), value) for key, value in live.items())
    runner.resume_from_checkpoint()
    assert runner[0].ema is ema and runner[0].resumed_from is None
    for f in (0.9, 0.5):
        for key, value in live.items():
            assert torch.equal(ema.shadow(f, key), value), (f, key)


def _train_and_keep_state(root, updates: int, state_at: int):
    """Train ``updates`` updates saving cp=latest every 2; return the runner state taken after ``state_at``."""
    model = _model()
    runner = CallbackRunner([EmaCallbackConfig(target_factors=[0.9], every_n_updates=2, save_latest_weights=True,
                                               save_last_weights=False)],
                            model=model, writer=MemoryWriter(), effective_batch_size=4, ema_root=root)
    runner.before_training()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = None
    for update, batch in enumerate(_batches(updates), start=1):
        opt.zero_grad()
        _loss_fn(model, batch).backward()
        opt.step()
        runner.after_update(num_samples=4)
        if update == state_at:
            state = runner.state_dict()
    runner.after_training()
    return state


@pytest.mark.parametrize("state_at,warns", [(3, True), (4, False)])
def test_resume_warns_when_the_run_state_and_the_ema_checkpoint_disagree_on_the_step(tmp_path, caplog, state_at,
                                                                                      warns):
    root = tmp_path / "ema"
    state = _train_and_keep_state(root, updates=4, state_at=state_at)  # cp=latest is at step 4
    assert state["callbacks"]["EmaCallback"]["ema_step"] == state_at
    runner = CallbackRunner([EmaCallbackConfig(target_factors=[0.9], every_n_updates=2, save_latest_weights=True,
                                               save_last_weights=False)],
                            model=_model(), writer=MemoryWriter(), effective_batch_size=4, ema_root=root)
    with caplog.at_level(logging.WARNING, logger="shardema"):
        runner.resume_from_checkpoint(state)
    assert runner[0].resumed_from == "latest" and runner[0].ema.step == 4
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("shardema") and r.levelno >= logging.WARNING
                and "the run state was saved at EMA step" in r.getMessage()]
    if warns:
        assert warnings == ["EmaCallback: the run state was saved at EMA step 3 but the EMA checkpoint is at step 4; "
                            "save cp=latest on the same schedule as the run state to keep them together"]
    else:
        assert warnings == []


def test_children_state_is_saved_and_restored():
    config = EmaCallbackConfig(target_factors=[0.9, 0.5], save_last_weights=False,
                               eval_callbacks=[ProbeConfig(every_n_updates=1), ProbeConfig(every_n_updates=2)])
    model = _model()
    runner = CallbackRunner([config], model=model, writer=MemoryWriter(), effective_batch_size=4)
    runner.before_training()
    _train(runner, model, _batches(4))
    state = runner.state_dict()
    assert state["callbacks"]["EmaCallback"]["children"] == {"0.9": [{"runs": 4}, {"runs": 2}],
                                                            "0.5": [{"runs": 4}, {"runs": 2}]}
    again = CallbackRunner([config], model=_model(), writer=MemoryWriter(), effective_batch_size=4)
    again.load_state_dict(state)
    assert [c.runs for c in again[0].get_children()] == [4, 2, 4, 2]
    other = CallbackRunner([config.model_copy(update={"target_factors": [0.9]})], model=_model(),
                           writer=MemoryWriter())
    with pytest.raises(ValueError, match="factors"):
        other.load_state_dict(state)


def test_engine_options_reach_the_ema():
    model = _model()
    config = EmaCallbackConfig(target_factors=[0.99], schedule="warmup", update_every=2, start_step=1,
                               shadow_dtype="float64", buffers="ignore", model_paths=["0"], save_last_weights=False)
    runner = CallbackRunner([config], model=model, writer=MemoryWriter(), effective_batch_size=1)
    runner.before_training()
    ema = runner[0].ema
    assert ema.schedule.kind == "warmup" and ema.schedule.update_every == 2 and ema.schedule.start_step == 1
    assert ema.shadow_dtype is torch.float64 and ema.buffers == "ignore" and ema.model_paths == ("0",)
    assert {t.fqn for t in ema.tracked()} == {"weight", "bias"}


def test_hooks_before_the_ema_exists_raise():
    cb = EmaCallback(EmaCallbackConfig(save_last_weights=False), None)
    with pytest.raises(RuntimeError, match="before_training"):
        cb.track_after_update_step(update_counter=UpdateCounter())


# ---------------------------------------------------------------------- OfflineLossCallback
def test_offline_loss_is_the_sample_weighted_mean_over_the_loader():
    model = _model()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(10, 3, generator=g), torch.randn(10, 2, generator=g)
    loader = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]  # uneven last batch
    writer = MemoryWriter()
    runner = CallbackRunner([OfflineLossCallbackConfig(dataset_key="val", every_n_updates=1)], model=model,
                            writer=writer, datasets={"val": loader}, loss_fn=_loss_fn, effective_batch_size=1)
    model.train()
    runner.before_training()
    runner.after_update()
    with torch.no_grad():
        expected = float(nn.functional.mse_loss(model(x), y))
    assert writer.values("loss/val") == [pytest.approx(expected, rel=1e-6)]
    assert model.training, "the model goes back to train mode"
    assert runner[0].state_dict() == {"last_loss": pytest.approx(expected, rel=1e-6)}

    def sum_and_count(model, batch):
        xb, yb = batch
        return ((model(xb) - yb) ** 2).mean(dim=1).sum(), xb.shape[0]

    cb = OfflineLossCallback(OfflineLossCallbackConfig(dataset_key="val", metric_key="val_mse"),
                             runner.context, loss_fn=sum_and_count)
    assert cb.evaluate() == pytest.approx(expected, rel=1e-6) and cb.metric_key == "val_mse"


def test_offline_loss_errors_name_the_fix():
    model = _model()
    cb = OfflineLossCallback(OfflineLossCallbackConfig(dataset_key="test"),
                             CallbackRunner([], model=model, datasets={"val": []}, loss_fn=_loss_fn,
                                            writer=MemoryWriter()).context)
    with pytest.raises(ValueError, match="dataset_key='test'"):
        cb.evaluate()
    empty = OfflineLossCallback(OfflineLossCallbackConfig(dataset_key="val"), cb.context)
    with pytest.raises(ValueError, match="no samples"):
        empty.evaluate()
    no_loss = OfflineLossCallback(OfflineLossCallbackConfig(dataset_key="val"), cb.context.replace(loss_fn=None))
    with pytest.raises(ValueError, match="loss_fn"):
        no_loss.evaluate()
    assert batch_size_of({"x": torch.zeros(7, 2), "y": 3}) == 7 and batch_size_of([None, torch.zeros(2)]) == 2
    with pytest.raises(ValueError, match="loss_sum"):
        batch_size_of("text")
