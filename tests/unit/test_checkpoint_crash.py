"""A writer saving in a loop is killed with SIGKILL; a fresh reader always finds a complete earlier save.

Run as a script (``python test_checkpoint_crash.py ROOT``) this module is the writer:
it resumes from ROOT, then forever applies one update and saves ``cp=latest``
(and an iteration tag every 4 steps), printing each committed step.
"""

import random
import select
import signal
import subprocess
import sys
import time
import zlib

import torch
from torch import nn

import shardema

FACTORS = (0.9, 0.99)
PATHS = ["enc", "dec"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(64, 192)
        self.dec = nn.Linear(192, 32)
        self.dec.register_buffer("calls", torch.zeros((), dtype=torch.int64))


@torch.no_grad()
def set_live(model: nn.Module, step: int) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.dtype.is_floating_point:
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()) * 1000 + step)
            t.copy_(torch.randn(t.shape, generator=g))
        else:
            t.fill_(step)


def make():
    model = Net()
    set_live(model, 0)
    return model, shardema.ShardedEMA(model, FACTORS, model_paths=PATHS)


def train(model, ema, steps: int) -> None:
    for _ in range(steps):
        set_live(model, ema.step + 1)
        ema.update()


def writer(root: str) -> None:
    model, ema = make()
    ema.resume(root)
    while True:
        train(model, ema, 1)
        ema.save(root, "latest")
        if ema.step % 4 == 0:
            ema.save(root, f"E0_U{ema.step}_S{ema.step}")
        print(ema.step, flush=True)


def _first_line(proc, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


def test_sigkill_at_random_moments_never_loses_a_committed_save(tmp_path):
    rng = random.Random(20240611)
    root = tmp_path / "ck"
    previous, all_printed = 0, []
    for round_ in range(4):
        log = tmp_path / f"writer{round_}.err"
        with open(log, "w") as err:
            proc = subprocess.Popen([sys.executable, __file__, str(root)], stdout=subprocess.PIPE, stderr=err,
                                    text=True)
            try:
                first = _first_line(proc, timeout=120)
                assert first, f"the writer committed nothing: {log.read_text()}"
                time.sleep(rng.uniform(0.0, 0.4))
                assert proc.poll() is None, f"the writer died by itself: {log.read_text()}"
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                printed = [int(line) for line in [first, *proc.stdout.read().split()] if line.strip()]
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                proc.stdout.close()
        committed = max(printed)
        all_printed += printed
        assert min(printed) == previous + 1  # the writer resumed where the last complete save left off

        _model, ema = make()
        assert ema.resume(root, strict=True) == "latest"
        # killed between commit and print: one step more than printed
        assert committed <= ema.step <= committed + 1, (committed, ema.step)
        replay_model, replay = make()
        train(replay_model, replay, ema.step)
        for f in FACTORS:
            for t in ema.tracked():
                assert torch.equal(ema.shadow(f, t.key), replay.shadow(f, t.key)), (round_, t.fqn)
        previous = ema.step
    # Iteration tags stay intact, each with the step its name says; a printed step's tag was committed
    # (a kill inside an iteration-tag save may lose only that tag: the next writer resumes past it).
    infos = [i for i in shardema.checkpoint.list_checkpoints(root, verify=True) if i.tag.startswith("E0_")]
    committed_tags = {i.tag for i in infos if i.state == "committed"}
    assert {f"E0_U{s}_S{s}" for s in all_printed if s % 4 == 0} <= committed_tags
    assert committed_tags <= {f"E0_U{s}_S{s}" for s in range(4, previous + 1, 4)}
    for i in infos:
        if i.state == "committed":
            assert i.step == int(i.tag.rsplit("_S", 1)[1]) and i.problem is None, i


if __name__ == "__main__":
    torch.set_num_threads(1)
    writer(sys.argv[1])
