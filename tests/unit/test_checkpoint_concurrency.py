"""Several writers and readers on one checkpoint root, in separate processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import shardema
from shardema.checkpoint._lock import CheckpointLockedError, WriterLock

FACTORS = (0.9, 0.99)


def _ema(seed: int = 0) -> shardema.ShardedEMA:
    torch.manual_seed(seed)
    return shardema.ShardedEMA(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)), FACTORS)


def _set_state(ema: shardema.ShardedEMA, step: int) -> None:
    """Every shadow holds ``step`` in every element, and the EMA is at ``step``."""
    state = ema.state_dict()
    for key, value in state.items():
        if torch.is_tensor(value):
            state[key] = torch.full_like(value, float(step))
    state["step"] = step
    ema.load_state_dict(state)


HOLDER_STAGING = "cp=latest.tmp-" + "ab" * 16  # the holder's own save in progress


def _hold_lock(directory: str, ready, release) -> None:
    with WriterLock(Path(directory), purpose="holding it for a test"):
        staging = Path(directory) / HOLDER_STAGING / "ema=0.9"
        staging.mkdir(parents=True)
        (staging / "rank-0-of-1.safetensors").write_bytes(b"half written")
        ready.set()
        release.wait(60)


def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path):
    ema = _ema()
    _set_state(ema, 1)
    ema.save(tmp_path, "latest")
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path / "model"), ready, release), daemon=True)
    holder.start()
    try:
        assert ready.wait(60)
        _set_state(ema, 2)
        started = time.monotonic()
        with pytest.raises(RuntimeError, match=rf"locked by another writer \(host .* pid {holder.pid} holding it"):
            ema.save(tmp_path, "latest")
        assert time.monotonic() - started < 30  # fails, never waits for the holder
        # The failed writer never cleans up: the holder's staging directory is live, and it left none of its own.
        assert [p.name for p in (tmp_path / "model").iterdir() if ".tmp-" in p.name] == [HOLDER_STAGING]
        piece = tmp_path / "model" / HOLDER_STAGING / "ema=0.9" / "rank-0-of-1.safetensors"
        assert piece.read_bytes() == b"half written"
    finally:
        release.set()
        holder.join(30)
    fresh = _ema(1)
    assert fresh.resume(tmp_path) == "latest" and fresh.step == 1  # the committed save is intact
    ema.save(tmp_path, "latest")  # the holder is gone: the lock is free again, its staging a leftover
    assert [p.name for p in (tmp_path / "model").iterdir() if ".tmp-" in p.name] == []
    assert _ema(2).resume(tmp_path) == "latest"


def test_two_emas_of_one_process_cannot_write_one_root_at_once(tmp_path):
    with WriterLock(tmp_path / "model"):
        with pytest.raises(CheckpointLockedError, match=f"another EMA of this process \\(pid {os.getpid()}\\)"):
            WriterLock(tmp_path / "model").acquire()
    WriterLock(tmp_path / "model").acquire().release()


def _write_forever(root: str, stop, saves) -> None:
    torch.set_num_threads(1)
    ema = _ema()
    step = 1
    while not stop.is_set():
        _set_state(ema, step)
        ema.save(root, "latest")
        saves.value = step
        step += 1


@pytest.mark.timeout(240)
def test_a_reader_always_finds_a_whole_committed_version_while_a_writer_commits(tmp_path, caplog):
    ema = _ema()
    _set_state(ema, 0)
    ema.save(tmp_path, "latest")
    ctx = mp.get_context("spawn")
    stop, saves = ctx.Event(), ctx.Value("i", 0)
    writer = ctx.Process(target=_write_forever, args=(str(tmp_path), stop, saves), daemon=True)
    writer.start()
    reader = _ema(3)
    resumes, steps = 0, set()
    try:
        # A spawned writer takes seconds to import torch; count only the resumes made while it commits.
        started = time.monotonic()
        while saves.value < 1 and time.monotonic() - started < 120:
            time.sleep(0.05)
        assert saves.value >= 1, "the writer process never committed a save"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and (saves.value < 40 or resumes < 50 or len(steps) <= 3):
            tag = reader.resume(tmp_path)
            assert tag == "latest", (f"resume {resumes} found no committed version (writer at save {saves.value}): "
                                     + caplog.text[-2000:])
            step = reader.step
            for t in reader.tracked():  # one whole version: every value is that version's step
                for f in FACTORS:
                    assert torch.equal(reader.shadow(f, t.key), torch.full_like(reader.shadow(f, t.key), step))
            steps.add(step)
            resumes += 1
    finally:
        stop.set()
        writer.join(60)
    assert writer.exitcode == 0
    assert saves.value >= 10 and resumes >= 50, (saves.value, resumes)
    assert len(steps) > 3  # the reader really saw the writer's new versions
