"""Smoke test of the minimal install (no extras, no numpy, no pyyaml); run by .ci/minimal_install.sh.

Two gloo ranks train a tiny FSDP2 model with ``shardema.ShardedEMA(model, [0.9, 0.99])``,
check the swap against a float64 reference EMA, and save; then a new model (other initial
weights) and a new EMA on the same ranks resume and must hold the saved values bit-exact
(one spawn: each process's `import torch` is most of this test's time). Then ``shardema.load_consolidated`` and the
``shardema consolidate`` / ``shardema inspect`` commands are checked, without a process
group. Prints one line per check and exits 1 on the first failure (or a hang).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

# torch's own import-time warning without numpy (the shardema package hides it; this script
# imports torch first). Any other warning still shows.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

# Everything the ranks and the commands import, imported here first: with bytecode caching
# on (.ci/minimal_install.sh), the processes started later read it from the cache.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "distributed"))
from dist_harness import run_ranks as harness_run_ranks  # noqa: E402

import shardema  # noqa: E402
import shardema.cli  # noqa: E402
from shardema.callbacks import EmaCallbackConfig, load_callback_configs  # noqa: E402

FACTORS = (0.9, 0.99)
STEPS = 12
WORLD = 2
PHASE_TIMEOUT_S = 60.0  # one spawn phase (start-up included); a hang fails after this
PG_TIMEOUT_S = 30  # collectives of a rank whose peer died
CLI_TIMEOUT_S = 60.0


class SmokeFailure(Exception):
    pass


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SmokeFailure(what)
    print(f"  ok  {what}", flush=True)


# --------------------------------------------------------------------------- ranks
def build_model(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 3))
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    return model


def full_weights(model) -> dict[str, torch.Tensor]:
    """Every parameter as a full CPU tensor (a collective: all-gathers the shards)."""
    return {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}


def train_and_save(root: str, expected_path: str) -> dict:
    """Train, check the swap against the float64 reference, save; the swapped-in EMA weights by factor."""
    rank = torch.distributed.get_rank()
    model = build_model(seed=0)
    ema = shardema.ShardedEMA(model, list(FACTORS))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # Reference: the EMA recomputed in float64 from the full live weights after every step.
    start = full_weights(model)
    ref = {f: {k: v.double() for k, v in start.items()} for f in FACTORS}
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(STEPS):
        x = torch.randn(16, 8, generator=gen)
        y = torch.randn(16, 3, generator=gen)
        (model(x) - y).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update()
        live = full_weights(model)
        for f in FACTORS:
            for k, v in live.items():
                ref[f][k] = f * ref[f][k] + (1.0 - f) * v.double()

    before = full_weights(model)
    swapped = {}
    for f in FACTORS:
        with ema.swapped(f):
            swapped[f] = full_weights(model)
        worst = max((swapped[f][k].double() - ref[f][k]).abs().max().item() for k in ref[f])
        if worst > 1e-5:
            raise SmokeFailure(f"rank {rank}: swapped(ema={f}) weights differ from the float64 reference "
                               f"by {worst:.3g}")
    after = full_weights(model)
    if any(not torch.equal(before[k], after[k]) for k in before):
        raise SmokeFailure(f"rank {rank}: live weights not restored bit-exact after the swap")

    ema.save(root, tag="latest")
    if rank == 0:
        torch.save({"ema": swapped, "ref": ref}, expected_path)
    return swapped


def resume_and_compare(root: str, saved: dict) -> str:
    """A new model (other weights) and a new EMA resume from the files: the saved values, bit-exact."""
    rank = torch.distributed.get_rank()
    model = build_model(seed=1)  # other initial weights: the resumed values must come from the files
    ema = shardema.ShardedEMA(model, list(FACTORS))
    tag = ema.resume(root)
    if tag != "latest":
        raise SmokeFailure(f"rank {rank}: ema.resume returned {tag!r}, expected 'latest'")
    for f in FACTORS:
        with ema.swapped(f):
            got = full_weights(model)
        for k, v in saved[f].items():
            if got[k].dtype != v.dtype or not torch.equal(got[k], v):
                diff = (got[k].double() - v.double()).abs().max().item()
                raise SmokeFailure(f"rank {rank}: resumed ema={f} {k} is not bit-exact the saved value "
                                   f"(max diff {diff:.3g})")
    ema.update()  # the resumed EMA keeps working
    return f"resumed {tag!r}"


def save_and_resume(root: str, expected_path: str) -> str:
    # One spawn for both halves: each extra pair of processes costs two `import torch`.
    saved = train_and_save(root, expected_path)
    torch.distributed.barrier()
    return resume_and_compare(root, saved)


def run_ranks(name: str, fn, *args) -> None:
    """Run ``fn(*args)`` on WORLD gloo ranks (the test suite's harness); fail on an error, a death or a hang."""
    started = time.monotonic()
    try:
        results = harness_run_ranks(fn, WORLD, *args, timeout=PHASE_TIMEOUT_S, pg_timeout_s=PG_TIMEOUT_S)
    except (AssertionError, TimeoutError) as exc:
        raise SmokeFailure(f"{name} on {WORLD} gloo ranks failed:\n{exc}") from None
    print(f"  ok  {name} on {WORLD} gloo ranks ({results[0]}, {time.monotonic() - started:.1f} s)", flush=True)


# --------------------------------------------------------------------------- single process
def start_cli(*argv: str) -> tuple[str, subprocess.Popen]:
    exe = Path(sys.executable).parent / "shardema"
    if not exe.exists():
        raise SmokeFailure(f"the console script {exe} was not installed")
    command = "shardema " + " ".join(argv)
    return command, subprocess.Popen([str(exe), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_cli(started: tuple[str, subprocess.Popen]) -> str:
    """stdout of a finished command; fails on a non-zero exit, anything on stderr or a hang."""
    command, proc = started
    try:
        stdout, stderr = proc.communicate(timeout=CLI_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise SmokeFailure(f"`{command}` did not finish within {CLI_TIMEOUT_S:.0f} s") from None
    if proc.returncode != 0 or stderr.strip():
        raise SmokeFailure(f"`{command}` exited with {proc.returncode} (expected 0, nothing on stderr)\n"
                           f"--- stdout:\n{stdout}--- stderr:\n{stderr}")
    return stdout


def check_no_extras() -> None:
    for module in ("numpy", "yaml"):
        try:
            __import__(module)
        except ImportError:
            print(f"  ok  {module} is not installed", flush=True)
        else:
            raise SmokeFailure(f"{module} is importable: run this smoke test in the install without extras "
                               "(no numpy, no pyyaml), as .ci/minimal_install.sh does")
    parsed = load_callback_configs([{"kind": "EmaCallback", "target_factors": list(FACTORS)}])
    check(isinstance(parsed[0], EmaCallbackConfig),
          "shardema.callbacks imports and takes parsed configs without pyyaml")
    try:
        load_callback_configs("- kind: EmaCallback\n  target_factors: [0.9]\n")
    except ImportError as exc:
        check('pip install "shardema[callbacks]"' in str(exc), f"YAML configs without pyyaml: ImportError {exc}")
    else:
        raise SmokeFailure("load_callback_configs parsed YAML text without pyyaml")


def check_integrations_need_their_extras() -> None:
    """Without the lightning / transformers extras, the integrations fail with the pip command."""
    for extra in ("lightning", "transformers"):
        try:
            __import__(f"shardema.integrations.{extra}")
        except ImportError as exc:
            check(f'pip install "shardema[{extra}]"' in str(exc),
                  f"shardema.integrations.{extra} names the extra when its framework is missing: {exc}")
            print(f"  ok  shardema.integrations.{extra} asks for shardema[{extra}]", flush=True)
        else:
            raise SmokeFailure(f"shardema.integrations.{extra} imported in the install without extras")


def smoke(work: Path) -> None:
    check_no_extras()
    check_integrations_need_their_extras()
    root = str(work / "ema")
    expected_path = str(work / "expected.pt")
    run_ranks("update, swap, save, then a new model and EMA resume", save_and_resume, root, expected_path)
    expected = torch.load(expected_path, weights_only=False)

    # Both commands run while this process checks load_consolidated.
    out = work / "ema-0.99.safetensors"
    consolidate = start_cli("consolidate", root, "--factor", "0.99", "--out", str(out))
    inspect = start_cli("inspect", root)

    for f in FACTORS:
        full = shardema.load_consolidated(root, factor=f)
        check(set(full) == set(expected["ema"][f]), f"load_consolidated(factor={f}) has the model's keys")
        check(all(torch.equal(full[k], v) for k, v in expected["ema"][f].items()),
              f"load_consolidated(factor={f}) is bit-exact the saved EMA")
        worst = max((full[k].double() - v).abs().max().item() for k, v in expected["ref"][f].items())
        check(worst <= 1e-5, f"load_consolidated(factor={f}) matches the float64 reference (max diff {worst:.2g})")

    stdout = finish_cli(consolidate)
    check(out.is_file() and str(out) in stdout, f"shardema consolidate exits 0: {stdout.strip()!r}")
    exported = load_file(str(out))
    check(set(exported) == set(expected["ema"][0.99])
          and all(torch.equal(exported[k], v) for k, v in expected["ema"][0.99].items()),
          "the consolidated file holds the saved EMA of factor 0.99, bit-exact")

    lines = finish_cli(inspect).strip().splitlines()
    row = next((line.split() for line in lines[1:] if line.split()[1:3] == ["latest", "committed"]), None)
    check(bool(lines) and lines[0].startswith("model path") and row is not None
          and row[3] == str(STEPS) and row[4] == "0.9,0.99" and row[5] == str(WORLD),
          f"shardema inspect exits 0 and lists cp=latest committed, step {STEPS}, factors 0.9,0.99, world {WORLD}")
    for line in lines:
        print(f"      | {line}")


def main() -> int:
    print(f"minimal-install smoke: python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"shardema from {Path(shardema.__file__).parent}", flush=True)
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="shardema-smoke-") as work:
            smoke(Path(work))
    except SmokeFailure as exc:
        print(f"FAIL {exc}", flush=True)
        return 1
    except Exception:
        print(f"FAIL unexpected error:\n{traceback.format_exc()}", flush=True)
        return 1
    print(f"PASS minimal-install smoke in {time.monotonic() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
