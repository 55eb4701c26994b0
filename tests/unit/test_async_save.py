"""``ema.save(root, tag, blocking=False)``: the staged copy is what is written, while training goes on."""

import logging
import threading
import time

import pytest
import torch
from torch import nn

import shardema
from shardema.checkpoint import _writer

FACTORS = (0.9, 0.99)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Linear(32, 4))


def _step(model, ema, k: int) -> None:
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(torch.full_like(p, 0.1 * (k + i)))
        model[1].running_mean.add_(1.0)
    ema.update()


def _state(ema) -> dict:
    return {(f, t.fqn): ema.shadow(f, t.key).clone() for f in ema.target_factors for t in ema.tracked()}


def _resumed(root, tag="latest"):
    ema = shardema.ShardedEMA(_model(), FACTORS)
    assert shardema.checkpoint.load_ema(ema, root, tag) == tag
    return ema


def test_the_staged_copy_is_written_while_updates_go_on(tmp_path, monkeypatch):
    model = _model()
    ema = shardema.ShardedEMA(model, FACTORS)
    for k in range(3):
        _step(model, ema, k)
    staged = _state(ema)
    # Hold the background writer until the training loop has changed every shadow.
    release = threading.Event()
    real = _writer._write_file

    def held(*args, **kwargs):
        assert release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(_writer, "_write_file", held)
    handle = ema.save(tmp_path, "latest", blocking=False)
    assert isinstance(handle, shardema.SaveHandle) and not handle.done()
    assert (handle.tag, handle.step, handle.root) == ("latest", 3, tmp_path)
    assert handle.staged_bytes == ema.shadow_bytes + ema.copied_bytes
    for k in range(3, 6):
        _step(model, ema, k)
    assert ema.step == 6
    release.set()
    assert handle.wait(timeout=60) == "latest" and handle.done()
    resumed = _resumed(tmp_path)
    assert resumed.step == 3
    for (f, fqn), value in staged.items():
        assert torch.equal(resumed.shadow(f, (None, fqn)), value), (f, fqn)
    assert any(not torch.equal(ema.shadow(f, (None, fqn)), value) for (f, fqn), value in staged.items())


def test_a_second_save_waits_for_the_first_and_both_commit(tmp_path):
    model = _model()
    ema = shardema.ShardedEMA(model, FACTORS)
    _step(model, ema, 0)
    first = ema.save(tmp_path, "E0_U1_S1", blocking=False)
    at_one = _state(ema)
    _step(model, ema, 1)
    second = ema.save(tmp_path, "latest", blocking=False)
    assert first.done()  # the second save waited for the first before staging
    _step(model, ema, 2)
    assert ema.save(tmp_path, "last") == "last"  # a blocking save waits too
    assert second.done() and ema.wait_for_save() is None
    assert _resumed(tmp_path, "E0_U1_S1").step == 1 and _resumed(tmp_path, "latest").step == 2
    assert _resumed(tmp_path, "last").step == 3
    one = _resumed(tmp_path, "E0_U1_S1")
    assert all(torch.equal(one.shadow(f, (None, fqn)), v) for (f, fqn), v in at_one.items())


def test_a_failed_async_save_raises_from_wait_or_from_the_next_save(tmp_path, monkeypatch, caplog):
    model = _model()
    ema = shardema.ShardedEMA(model, FACTORS)
    _step(model, ema, 0)
    real = _writer._write_file

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(_writer, "_write_file", broken)
    with caplog.at_level(logging.ERROR, logger="shardema"):
        handle = ema.save(tmp_path, "latest", blocking=False)
        with pytest.raises(RuntimeError, match="disk full"):
            handle.wait(timeout=60)
    (message,) = [r.getMessage() for r in caplog.records if r.getMessage().lower().startswith("asynchronous")]
    assert message.startswith(f"asynchronous save of latest under {tmp_path} failed: saving the EMA checkpoint "
                              "cp=latest") and "OSError: disk full" in message
    assert ema.wait_for_save() is None  # already reported: not raised twice
    unseen = ema.save(tmp_path, "latest", blocking=False)  # nobody waits for this one...
    while not unseen.done():
        time.sleep(0.01)
    monkeypatch.setattr(_writer, "_write_file", real)
    with pytest.raises(RuntimeError, match="disk full"):  # ...so the next save raises its error
        ema.save(tmp_path, "latest", blocking=False)
    assert ema.save(tmp_path, "latest") == "latest"  # and the one after works
    assert not (tmp_path / "model" / "cp=latest.old").exists()


def test_wait_with_a_timeout_raises_while_the_save_is_still_writing(tmp_path, monkeypatch):
    model = _model()
    ema = shardema.ShardedEMA(model, FACTORS)
    _step(model, ema, 0)
    release = threading.Event()
    safety = threading.Timer(30, release.set)  # a wait that ignored its timeout returns after 30 s
    safety.start()
    real = _writer._write_file

    def held(*args, **kwargs):
        assert release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(_writer, "_write_file", held)
    started: list = []
    # Started from a daemon thread (a trainer's helper thread), the writer still is no daemon: the
    # interpreter waits for it at exit instead of killing it half-way.
    starter = threading.Thread(target=lambda: started.append(ema.save(tmp_path, "latest", blocking=False)),
                               daemon=True)
    starter.start()
    starter.join(60)
    (handle,) = started
    try:
        writers = [t for t in threading.enumerate() if t.name == "shardema-save-latest"]
        assert len(writers) == 1 and not writers[0].daemon
        with pytest.raises(TimeoutError):
            handle.wait(timeout=0.05)
        assert not handle.done() and not tmp_path.joinpath("model", "cp=latest").exists()
    finally:
        release.set()
        safety.cancel()
    assert handle.wait(timeout=60) == "latest" and ema.wait_for_save() == "latest"
    assert ema.wait_for_save() is None and _resumed(tmp_path).step == 1


def test_bad_arguments_raise_before_anything_is_staged(tmp_path):
    model = _model()
    ema = shardema.ShardedEMA(model, FACTORS)
    with pytest.raises(TypeError, match="blocking='no' must be True or False"):
        ema.save(tmp_path, "latest", blocking="no")
    with pytest.raises(ValueError, match="checkpoint tag 'a/b'"):
        ema.save(tmp_path, "a/b", blocking=False)
    with pytest.raises(ValueError, match="dtype=torch.int8"):
        ema.save(tmp_path, "latest", dtype=torch.int8, blocking=False)
    with ema.swapped(0.9), pytest.raises(RuntimeError, match="inside `with ema.swapped"):
        ema.save(tmp_path, "latest", blocking=False)
    assert ema.wait_for_save() is None and not tmp_path.joinpath("model").exists()


def test_each_asynchronous_save_stages_into_the_buffers_of_the_previous_one(tmp_path, monkeypatch):
    model = _model()
    ema = shardema.ShardedEMA(model, FACTORS)
    calls: list = []
    real = type(ema.store).stage

    def spy(store, previous=None, pin_memory=True):
        staged = real(store, previous, pin_memory=pin_memory)
        calls.append((previous, staged, pin_memory))
        return staged

    monkeypatch.setattr(type(ema.store), "stage", spy)
    for k in range(3):
        _step(model, ema, k)
        ema.save(tmp_path, "latest", blocking=False)
    assert ema.wait_for_save() == "latest" and len(calls) == 3
    assert calls[0][0] is None and calls[1][0] is calls[0][1] and calls[2][0] is calls[1][1]
    assert all(pin is True for _, _, pin in calls)  # pinned when the shadows are on an accelerator


def test_staging_copies_every_shadow_and_reuses_its_buffers():
    model = _model()
    ema = shardema.ShardedEMA(model, FACTORS, buffers="average")
    _step(model, ema, 0)
    first = ema.store.stage()
    assert all(torch.equal(first.shadow(k, t.key), ema.shadow(k, t.key))
               for k in range(len(FACTORS)) for t in ema.tracked())
    _step(model, ema, 1)
    second = ema.store.stage(first)
    assert [t.data_ptr() for t in second.flats] == [t.data_ptr() for t in first.flats]
    assert all(torch.equal(second.shadow(k, t.key), ema.shadow(k, t.key))
               for k in range(len(FACTORS)) for t in ema.tracked())
    assert second.nbytes == ema.shadow_bytes + ema.copied_bytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run by benchmarks/gpu_suite.sh)")
def test_cuda_shadows_are_staged_in_pinned_memory_and_written_exactly(tmp_path):
    model = _model().cuda()
    ema = shardema.ShardedEMA(model, FACTORS)
    for k in range(2):
        _step(model, ema, k)
    staged = {key: value.cpu() for key, value in _state(ema).items()}
    staging = ema.store.stage()
    assert staging.flats and all(t.is_pinned() for t in staging.flats)
    handle = ema.save(tmp_path, "latest", blocking=False)
    _step(model, ema, 2)  # the device shadows change while the staged copy is written
    assert handle.wait(timeout=120) == "latest"
    resumed = shardema.ShardedEMA(_model(), FACTORS)  # on the CPU: the checkpoint is device-free
    assert resumed.resume(tmp_path, strict=True) == "latest" and resumed.step == 2
    for (f, fqn), value in staged.items():
        assert torch.equal(resumed.shadow(f, (None, fqn)), value), (f, fqn)
