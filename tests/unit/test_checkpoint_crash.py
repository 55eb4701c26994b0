"""SIGKILL during ``ema.save``: a fresh reader always finds the previous or the new save, never a mix.

Two tests:

- every point of the commit protocol, deterministically: a dry run lists the points of one
  save (each ``os.rename`` / ``os.replace`` / ``os.fsync`` and the first write into each file
  it creates: rank files and manifests); then for each point N a child process runs the same
  save and SIGKILLs itself at point N (a write point writes half its bytes first). The parent
  checks that ``resume()`` finds, bit for bit, either the old or the new save, and that a
  following save succeeds. Children are forked one after the other from a "zygote" process
  that imported torch once, so each costs milliseconds.
- a writer saving in a loop is killed at random moments (timing-dependent, an extra check).

Both run with blocking saves and with asynchronous ones (``blocking=False``: the staged copy is
written by a background thread while the EMA goes on updating; the kill lands in that thread).

Run as a script, this module is the writer (``python test_checkpoint_crash.py ROOT MODE``: resume
from ROOT, then forever one update and a save of ``cp=latest``, and of an iteration tag every 4
steps, printing each committed step) or the zygote (``--zygote``: reads ``ROOT<TAB>N<TAB>MODE`` lines).
"""

import builtins
import io
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
import zlib

import pytest
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


def writer(root: str, blocking: bool) -> None:
    model, ema = make()
    ema.resume(root)
    while True:
        train(model, ema, 1)
        ema.save(root, "latest", blocking=blocking)
        if ema.step % 4 == 0:
            ema.save(root, f"E0_U{ema.step}_S{ema.step}", blocking=blocking)  # waits for the first
        ema.wait_for_save()
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
            # Blocking saves in even rounds, asynchronous ones (written on a background thread) in odd ones.
            mode = "blocking" if round_ % 2 == 0 else "async"
            proc = subprocess.Popen([sys.executable, __file__, str(root), mode], stdout=subprocess.PIPE,
                                    stderr=err, text=True)
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


# ----------------------------------------------------------------------------- every commit point
class _HalfWriteThenDie:
    """A file object whose first ``write`` is a kill point: at its turn it writes half the bytes and dies."""

    def __init__(self, file, is_kill_point):
        self._file = file
        self._is_kill_point = is_kill_point
        self._first = True

    def write(self, data):
        if self._first:
            self._first = False
            if self._is_kill_point():
                self._file.write(data[:len(data) // 2])
                self._file.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        return self._file.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._file.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._file, name)


def _fd_name(fd) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"


def save_killed_at(root: str, kill_at: int, blocking: bool = True) -> list[str]:
    """Build the step-3 EMA and save it to ``root`` as ``cp=latest``, SIGKILLing this process at
    point ``kill_at`` (1-based; 0 = never). Returns the points passed (when not killed).

    ``blocking=False``: an asynchronous save, during which the EMA goes on to step 5 (the
    background thread writes the staged step-3 copy and is the one killed)."""
    model, ema = make()
    train(model, ema, 3)
    prefix = os.path.abspath(root)
    points: list[str] = []

    def reached(kind: str, where) -> bool:
        points.append(f"{kind} {os.path.relpath(str(where), prefix)}")
        return len(points) == kill_at

    def wrap(kind, real, name_of):
        def fn(*args, **kwargs):
            if reached(kind, name_of(args[0])):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return fn

    real_open = builtins.open

    def opening(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        path = os.path.abspath(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else ""
        if path.startswith(prefix) and any(c in mode for c in "wax+"):
            return _HalfWriteThenDie(f, lambda: reached("write", path))
        return f

    os.rename = wrap("rename", os.rename, str)
    os.replace = wrap("replace", os.replace, str)
    os.fsync = wrap("fsync", os.fsync, _fd_name)
    builtins.open = io.open = opening
    if blocking:
        ema.save(root, "latest")
    else:
        handle = ema.save(root, "latest", blocking=False)
        train(model, ema, 2)
        handle.wait()
    return points


def zygote() -> None:
    """Fork one child per ``ROOT<TAB>N`` line of stdin; print its points (if it finished) and how it ended."""
    import tempfile

    with tempfile.TemporaryDirectory() as warm:  # torch's lazy set-up happens once, here, not in every child
        model, ema = make()
        train(model, ema, 3)
        ema.save(warm, "latest")
        ema.resume(warm)
    for line in sys.stdin:
        root, kill_at, mode = line.rstrip("\n").split("\t")
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                torch.set_num_threads(1)
                print(json.dumps({"points": save_killed_at(root, int(kill_at), mode == "blocking")}), flush=True)
            except BaseException as exc:
                print(json.dumps({"error": repr(exc)}), flush=True)
                code = 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        signalled = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        print(json.dumps({"signal": signalled, "exit": exit_code}), flush=True)


class Zygote:
    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, __file__, "--zygote"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        return self

    def run(self, root, kill_at: int, mode: str = "blocking") -> dict:
        """Run one child; returns ``{"signal", "exit", "points"?, "error"?}``."""
        self.proc.stdin.write(f"{root}\t{kill_at}\t{mode}\n")
        self.proc.stdin.flush()
        result: dict = {}
        while "signal" not in result:
            line = self.proc.stdout.readline()  # blocking: the zygote answers or exits (pytest's timeout guards)
            assert line, f"the zygote stopped answering (exit {self.proc.poll()})"
            result.update(json.loads(line))
        return result

    def __exit__(self, *exc):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc.stdout.close()


def snapshot(ema) -> dict:
    return {(f, t.key): ema.shadow(f, t.key).clone() for f in ema.target_factors for t in ema.tracked()}


def same_state(ema, expected: dict) -> bool:
    return all(torch.equal(ema.shadow(f, key), value) for (f, key), value in expected.items())


@pytest.mark.parametrize("mode", ["blocking", "async"])
def test_sigkill_at_every_commit_point_leaves_the_old_or_the_new_save(tmp_path, mode):
    template = tmp_path / "template"
    model, ema = make()
    train(model, ema, 2)
    ema.save(template, "latest")
    ema.save(template, "E0_U2_S2")
    old = snapshot(ema)
    train(model, ema, 1)
    new = snapshot(ema)  # what the children save
    with Zygote() as z:
        shutil.copytree(template, tmp_path / "dry")
        dry = z.run(tmp_path / "dry", 0, mode)
        assert dry["exit"] == 0 and "points" in dry, dry
        points = dry["points"]
        kinds = [p.split()[0] for p in points]
        # per model path and factor a rank file (write, fsync, replace, fsync of the directory);
        # per model path a manifest (write, fsync, replace, fsync) and the swap (renames, fsyncs)
        assert kinds.count("write") == len(PATHS) * len(FACTORS) + len(PATHS), points
        assert sum(p.startswith("write") and p.endswith("manifest.json.tmp") for p in points) == len(PATHS), points
        assert kinds.count("rename") >= 2 * len(PATHS) and kinds.count("replace") >= len(PATHS) * (len(FACTORS) + 1)
        assert kinds.count("fsync") >= len(PATHS) * (len(FACTORS) + 1) * 2, points
        # Readers are reused from point to point: a resume overwrites every shadow and the step.
        _, fresh = make()
        model_after, after = make()
        train(model_after, after, 4)
        at_four = snapshot(after)
        outcomes = []
        for n in range(1, len(points) + 1):
            root = tmp_path / f"kill{n}"
            shutil.copytree(template, root)
            result = z.run(root, n, mode)
            assert result["signal"] == signal.SIGKILL, (n, points[n - 1], result)
            assert fresh.resume(root, strict=True) == "latest", (n, points[n - 1])
            assert (fresh.step, same_state(fresh, {2: old, 3: new}.get(fresh.step, {}))) in {(2, True), (3, True)}, \
                f"killed at point {n} ({points[n - 1]}): step {fresh.step} is not bit-exact the old or the new save"
            outcomes.append(fresh.step)
            assert shardema.checkpoint.load_ema(fresh, root, "E0_U2_S2") == "E0_U2_S2" and same_state(fresh, old)
            # the next save succeeds, cleans up, and is what a reader finds
            after.save(root, "latest")
            names = sorted(p.name for mp in PATHS for p in (root / mp).iterdir() if p.name.startswith("cp="))
            assert names == ["cp=E0_U2_S2", "cp=E0_U2_S2", "cp=latest", "cp=latest"], (n, points[n - 1], names)
            assert fresh.resume(root, strict=True) == "latest" and fresh.step == 4 and same_state(fresh, at_four)
            shutil.rmtree(root)
    # the old save until one commit point, the new one from there on
    switch = outcomes.index(3)
    assert outcomes == [2] * switch + [3] * (len(outcomes) - switch) and switch > 0, list(zip(points, outcomes))


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "--zygote":
        zygote()
    else:
        writer(sys.argv[1], blocking=sys.argv[2] == "blocking")
