"""`shardema launch`: workers die with a killed launcher; a second job on a run folder fails at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardema.checkpoint import WriterLock

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]

WORKER = """
import os, sys, time
from pathlib import Path
import shardema
assert shardema.exit_with_launcher()
Path(sys.argv[1], f"worker-{os.environ['RANK']}.pid").write_text(str(os.getpid()))
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its new parent) is dead for this purpose
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
@pytest.mark.timeout(120)
def test_workers_die_with_a_killed_launcher(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = subprocess.Popen([sys.executable, "-m", "shardema.cli", "launch", "--nproc-per-node=2", str(script),
                                 str(tmp_path)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    pid_files = [tmp_path / f"worker-{r}.pid" for r in (0, 1)]
    try:
        deadline = time.monotonic() + 60
        while not all(p.exists() and p.read_text() for p in pid_files):
            assert launcher.poll() is None, "the launcher exited before its workers started"
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.2)
        workers = [int(p.read_text()) for p in pid_files]
        assert all(_alive(w) for w in workers)
        launcher.send_signal(signal.SIGKILL)  # no chance to clean up
        launcher.wait(10)
        deadline = time.monotonic() + 20
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        survivors = [w for w in workers if _alive(w)]
        assert not survivors, f"workers {survivors} outlived the killed launcher"
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for p in pid_files:
            if p.exists() and p.read_text() and _alive(int(p.read_text())):
                os.kill(int(p.read_text()), signal.SIGKILL)


@pytest.mark.timeout(180)
def test_a_second_job_on_the_same_run_folder_fails_at_once(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    with WriterLock(run_dir, purpose="training (the first job)"):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                               "launch/train.py", "--config", "launch/configs/tiny.yaml", "--run-dir", str(run_dir)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert f"cannot train into {run_dir}" in output and "training (the first job)" in output, output[-3000:]
    # It failed before training: nothing of a run was written.
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "ema").exists()
