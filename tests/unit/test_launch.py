"""`shardema launch`: torchrun's own flags, plus two defaults."""

import os
import re
import signal
import subprocess
import sys
import time

import torch

from shardema._launch import default_nproc_per_node, torchrun_argv
from shardema.cli import main as cli_main


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for name in ("OMP_NUM_THREADS", "LOGLEVEL", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def test_defaults_are_added_only_when_the_user_gave_none():
    nproc = default_nproc_per_node()
    assert nproc == (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    assert torchrun_argv(["train.py", "--config", "c.yaml"]) == \
        ["--standalone", f"--nproc-per-node={nproc}", "train.py", "--config", "c.yaml"]
    assert torchrun_argv(["--nproc_per_node", "4", "train.py"]) == ["--standalone", "--nproc_per_node", "4", "train.py"]
    multi = ["--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=host:1", "train.py"]
    assert torchrun_argv(multi) == [f"--nproc-per-node={nproc}", *multi]
    # flags of the script are not mistaken for torchrun's
    assert torchrun_argv(["train.py", "--nnodes=7"])[:2] == ["--standalone", f"--nproc-per-node={nproc}"]


def test_launch_runs_a_two_process_job(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(
        "import os, torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "name = f'rank{dist.get_rank()}-of-{dist.get_world_size()}-omp{os.environ.get(\"OMP_NUM_THREADS\")}'\n"
        "open(os.path.join(os.path.dirname(__file__), name), 'w')\n"
        "dist.destroy_process_group()\n")
    result = subprocess.run([sys.executable, "-m", "shardema.cli", "launch", str(script)], check=True, timeout=120,
                            capture_output=True, text=True, env=_env())
    assert sorted(p.name for p in tmp_path.glob("rank*")) == ["rank0-of-2-omp1", "rank1-of-2-omp1"]
    assert "OMP_NUM_THREADS" not in result.stdout + result.stderr  # no torchrun banner


def test_launch_help_is_shardemas_own_with_its_defaults(capsys):
    nproc = default_nproc_per_node()
    for argv in (["launch", "--help"], ["launch", "-h"], ["launch"], ["launch", "--nnodes=1", "--help"]):
        assert cli_main(argv) == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: shardema launch [TORCHRUN FLAGS] SCRIPT [SCRIPT ARGS]"), out
        assert f"--nproc-per-node={nproc} " in out and "--standalone " in out and "OMP_NUM_THREADS=1 " in out
        assert "torchrun's flags: torchrun --help" in out
        assert "--rdzv-backend" not in out  # torchrun's own help is not printed under shardema's name


def test_a_failed_worker_ends_with_one_line(tmp_path):
    script = tmp_path / "job.py"
    script.write_text("import sys\nsys.exit(3)\n")
    result = subprocess.run([sys.executable, "-m", "shardema.cli", "launch", str(script)], timeout=120,
                            capture_output=True, text=True, env=_env())
    assert result.returncode == 3
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert re.fullmatch(rf"shardema launch: {re.escape(str(script))} failed: rank [01] exited with code 3 "
                        r"\(its output, if any, is above\)", lines[0]), lines[0]


def test_ctrl_c_stops_the_job_with_one_line(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(
        "import os, pathlib, signal, time\n"
        "signal.signal(signal.SIGINT, signal.SIG_DFL)  # as launch/train.py does\n"
        "pathlib.Path(__file__).with_name(f'ready{os.environ[\"RANK\"]}').touch()\n"
        "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-m", "shardema.cli", "launch", str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("ready*"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(list(tmp_path.glob("ready*"))) == 2
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGINT
    assert out == ""
    assert err.splitlines() == ["shardema launch: stopped by SIGINT; the workers were stopped too"], err
