"""`shardema launch`: torchrun's own flags, plus two defaults."""

import subprocess
import sys

import torch

from shardema._launch import default_nproc_per_node, torchrun_argv


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
        "open(os.path.join(os.path.dirname(__file__), f'rank{dist.get_rank()}-of-{dist.get_world_size()}'), 'w')\n"
        "dist.destroy_process_group()\n")
    subprocess.run([sys.executable, "-m", "shardema.cli", "launch", str(script)], check=True, timeout=120,
                   capture_output=True)
    assert sorted(p.name for p in tmp_path.glob("rank*")) == ["rank0-of-2", "rank1-of-2"]
