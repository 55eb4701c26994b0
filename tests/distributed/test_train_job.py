"""The example trainer end to end: torchrun on CPU/gloo, two simulated nodes, kill and resume."""

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "launch" / "configs" / "tiny.yaml"
FACTORS = (0.9, 0.99)
TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*flags: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *flags]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    return env


def _run(cmd: list[str], timeout: float = TIMEOUT) -> str:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        raise AssertionError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{tail}")
    return proc.stdout + proc.stderr


def _train(run_dir: Path, *extra: str) -> str:
    flags = ["--standalone", "--nproc-per-node=2", "launch/train.py", "--config", str(TINY), "--run-dir", str(run_dir)]
    return _run(_torchrun(*flags, *extra))


def _final_ema(run_dir: Path) -> dict:
    from shardema import load_consolidated

    return {f: load_consolidated(run_dir / "ema", factor=f, tag="last") for f in FACTORS}


def _assert_same_ema(a: dict, b: dict) -> None:
    for f in FACTORS:
        assert a[f].keys() == b[f].keys()
        for key in a[f]:
            assert torch.equal(a[f][key], b[f][key]), f"ema={f} {key} differs"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    output = _train(run_dir, "--dump-live", str(run_dir / "live"))
    return run_dir, output


def test_the_job_ema_equals_a_float64_replay_of_its_live_weights(reference_run):
    """Independent reference: the EMA recomputed in float64 from the live weights the job dumped
    (start, then after every update), against the consolidated EMA checkpoints of the job."""
    from shardema import load_consolidated

    run_dir, _ = reference_run
    lives = [torch.load(run_dir / "live" / f"live_{u:08d}.pt") for u in range(25)]
    assert not torch.equal(lives[0]["head.weight"], lives[24]["head.weight"])  # the job really trained
    for factor in FACTORS:
        replay = {k: v.double() for k, v in lives[0].items()}
        for update in range(1, 25):
            replay = {k: factor * replay[k] + (1 - factor) * lives[update][k].double() for k in replay}
            if update in (8, 16, 24):
                tag = "last" if update == 24 else f"E0_U{update}_S{update * 16}"
                saved = load_consolidated(run_dir / "ema", factor=factor, tag=tag)
                assert saved.keys() == replay.keys()
                for key, value in replay.items():
                    torch.testing.assert_close(saved[key].double(), value, rtol=1e-5, atol=2e-6,
                                               msg=lambda m, k=key, u=update, f=factor: f"ema={f} {k} at {u}: {m}")


def test_a_two_rank_run_commits_ema_checkpoints_and_metrics(reference_run):
    from shardema.checkpoint import list_checkpoints

    run_dir, output = reference_run
    infos = list_checkpoints(run_dir / "ema")
    committed = {(i.tag, i.step) for i in infos if i.state == "committed"}
    assert {("latest", 24), ("last", 24), ("E0_U8_S128", 8), ("E0_U16_S256", 16)} <= committed
    assert all(i.world_size == 2 for i in infos)
    records = [yaml.safe_load(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = {(r["key"], r["update"]) for r in records}
    for update in (8, 16, 24):
        assert {("loss/val", update), ("ema=0.9/loss/val", update), ("ema=0.99/loss/val", update)} <= keys
    values = {(r["key"], r["update"]): r["value"] for r in records}
    assert values[("ema=0.99/loss/val", 24)] != values[("loss/val", 24)]  # the EMA weights were evaluated
    summary = (run_dir / "summary.md").read_text()
    assert "| update | live | ema=0.9 | ema=0.99 |" in summary
    for f in FACTORS:  # tiny.yaml: the constant schedule, so the last decay is the factor itself
        assert (f"- ema={f}: EMA, target factor {f}, `constant` schedule: decay {f:.4f} at the last update "
                f"(half-life {math.log(0.5) / math.log(f):.0f} updates)") in summary
    assert "update 24/24" in output
    assert "returned a view tensor" not in output  # FSDP2's warning about the model's output
    committed_models = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if (p / ".metadata").exists())
    assert committed_models == ["update_00000016", "update_00000024"]  # the newest two are kept


def test_two_simulated_nodes_give_the_same_ema_as_one_node(reference_run, tmp_path):
    reference_dir, _ = reference_run
    port = _free_port()
    procs = []
    for node_rank in range(2):
        flags = ["--nnodes=2", f"--node-rank={node_rank}", "--nproc-per-node=1", "--rdzv-backend=c10d",
                 f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes",
                 "launch/train.py", "--config", str(TINY), "--run-dir", str(tmp_path)]
        procs.append(subprocess.Popen(_torchrun(*flags), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, "\n".join(out.splitlines()[-40:])
    _assert_same_ema(_final_ema(tmp_path), _final_ema(reference_dir))


def test_kill_and_resume_gives_the_same_final_ema(reference_run, tmp_path):
    reference_dir, _ = reference_run
    flags = ["--standalone", "--nproc-per-node=2", "launch/train.py", "--config", str(TINY),
             "--run-dir", str(tmp_path)]
    # torchrun starts its workers in sessions of their own: a SIGKILL of torchrun's group would leave
    # them training (and finishing the run). Under `shardema launch` they die with the launcher.
    launcher = [sys.executable, "-m", "shardema.cli", "launch"]
    proc = subprocess.Popen([*launcher, *flags], cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    marker = tmp_path / "checkpoints" / "update_00000008" / ".metadata"
    deadline = time.monotonic() + TIMEOUT
    try:
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the first checkpoint never appeared"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher; its workers get SIGTERM from the kernel
        proc.wait(timeout=30)
    time.sleep(2)  # let the workers' SIGTERM land before looking
    assert not (tmp_path / "ema" / "model" / "cp=last").exists()  # it really was interrupted
    assert not (tmp_path / "summary.md").exists()
    output = _train(tmp_path)
    assert "resumed from" in output
    _assert_same_ema(_final_ema(tmp_path), _final_ema(reference_dir))


def test_resume_when_the_ema_checkpoint_is_ahead_of_the_model(reference_run, tmp_path):
    """A kill between the EMA save and the model save: the EMA is taken from the model's update."""
    reference_dir, _ = reference_run
    _train(tmp_path, "--updates", "16")
    shutil.rmtree(tmp_path / "checkpoints" / "update_00000016")  # as if killed before the model save
    shutil.rmtree(tmp_path / "ema" / "model" / "cp=last")
    output = _train(tmp_path)
    assert "EMA cp=latest is at step 16, the model at update 8; loading cp=E0_U8_S128" in output
    _assert_same_ema(_final_ema(tmp_path), _final_ema(reference_dir))


def _launch(run_dir: Path, *extra: str, config: Path = TINY) -> subprocess.CompletedProcess:
    """`shardema launch` of the tiny job, as a user types it; output merged, failures returned."""
    cmd = [sys.executable, "-m", "shardema.cli", "launch", "launch/train.py", "--config", str(config),
           "--run-dir", str(run_dir), *extra]
    return subprocess.run(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=TIMEOUT)


def test_rerunning_a_finished_run_says_so_and_trains_nothing(reference_run):
    run_dir, _ = reference_run
    metrics = (run_dir / "metrics.jsonl").read_text()
    result = _launch(run_dir)
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    assert lines[0].startswith(f"{run_dir} is finished (24/24 updates): results in {run_dir / 'summary.md'}")
    assert f"EMA checkpoints in {run_dir / 'ema'}" in lines[0] and "--run-dir" in lines[0]
    assert (run_dir / "metrics.jsonl").read_text() == metrics


def test_another_config_in_the_same_run_folder_is_one_line_with_a_hint(reference_run, tmp_path):
    reference_dir, _ = reference_run
    run_dir = tmp_path / "run"
    shutil.copytree(reference_dir, run_dir, ignore=shutil.ignore_patterns("live"))
    config = yaml.safe_load(TINY.read_text())
    config["callbacks"][1]["target_factors"] = [0.9, 0.95]
    config["train"]["updates"] = 32
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(config))
    result = _launch(run_dir, config=changed)
    assert result.returncode == 2, result.stdout
    lines = result.stdout.splitlines()
    assert not any("Traceback" in line or line.startswith("[rank") for line in lines), result.stdout
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stdout
    assert f"{run_dir} was trained with another callback config" in errors[0]
    assert "['0.9', '0.99']" in errors[0] and "['0.9', '0.95']" in errors[0]
    assert "--run-dir" in errors[0] and f"delete {run_dir}" in errors[0]
    assert lines[-1] == ("shardema launch: launch/train.py failed: rank 0 exited with code 2 "
                         "(its output, if any, is above)")


def test_ctrl_c_stops_the_trainer_with_one_line(tmp_path):
    cmd = [sys.executable, "-m", "shardema.cli", "launch", "launch/train.py", "--config", str(TINY),
           "--run-dir", str(tmp_path)]
    # A terminal's Ctrl-C reaches the launcher only: torchrun starts its workers in their own sessions.
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "loss/val" in line:
                break
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGINT
    lines = rest.splitlines()
    assert not any("Traceback" in line or "KeyboardInterrupt" in line or line.startswith("[rank") for line in lines)
    assert lines[-1] == "shardema launch: stopped by SIGINT; the workers were stopped too", rest


def test_single_node_script_needs_no_activated_venv(tmp_path):
    script = str(REPO / "launch" / "single_node.sh")
    env = dict(_env(), PATH="/usr/bin:/bin", PYTHON=sys.executable)  # no venv on PATH, no torchrun
    result = subprocess.run(["bash", script, str(TINY), "--help"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "usage: train.py" in result.stdout
    env["PYTHON"] = str(tmp_path / "no-python")
    result = subprocess.run(["bash", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "cannot import torch and shardema" in result.stderr and "set PYTHON=/path/to/python" in result.stderr


def test_every_launch_config_validates():
    sys.path.insert(0, str(REPO / "launch"))
    try:
        from trainlib import TrainConfig
    finally:
        sys.path.pop(0)
    configs = sorted((REPO / "launch" / "configs").glob("*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        config = TrainConfig.from_yaml(path)
        kinds = [c.kind for c in config.callbacks]
        assert "EmaCallback" in kinds, path


def test_the_posthoc_snapshots_equal_a_float64_replay_and_the_sweep_is_reported(reference_run):
    """The job's second EMA (sigma_rels 0.05 / 0.10, a snapshot every 4 updates): each snapshot equals the
    power-function EMA recomputed in float64 from the dumped live weights; the summary has the sweep."""
    from shardema import load_consolidated, posthoc

    run_dir, _ = reference_run
    lives = [torch.load(run_dir / "live" / f"live_{u:08d}.pt") for u in range(25)]
    snaps = posthoc.list_snapshots(run_dir / "posthoc")
    assert [s.step for s in snaps] == [4, 8, 12, 16, 20, 24]
    for sigma_rel in (0.05, 0.10):
        gamma = posthoc.gamma_of_sigma_rel(sigma_rel)
        replay = {k: v.double() for k, v in lives[0].items()}
        for t in range(1, 25):
            beta = (1 - 1 / t) ** (gamma + 1)
            replay = {k: beta * replay[k] + (1 - beta) * lives[t][k].double() for k in replay}
            if t % 4 == 0:
                saved = load_consolidated(run_dir / "posthoc", factor=sigma_rel, tag=posthoc.snapshot_tag(t))
                for key, value in replay.items():
                    torch.testing.assert_close(saved[key].double(), value, rtol=1e-5, atol=2e-6)
    summary = (run_dir / "summary.md").read_text()
    assert "# Post-hoc EMA: validation loss against sigma_rel" in summary
    rows = [line for line in summary.splitlines() if line.startswith("| 0.")]
    assert len(rows) == 12 and sum("best" in row for row in rows) == 1
    assert (run_dir / "posthoc_sweep.png").stat().st_size > 1000
