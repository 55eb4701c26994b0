"""Post-hoc EMA reconstruction quality against the number of snapshots and their dtype.

    python benchmarks/posthoc_quality.py            # -> benchmarks/results/posthoc_quality.{json,md,png}

One SGD run of a small MLP regression tracks sigma_rel {0.05, 0.10} with snapshots every
S updates; a second EMA of the same trajectory tracks each target (0.07, 0.03, 0.15)
directly. For every subset of the snapshots (every k-th: 4, 8, 16, 32, 64 per profile)
the target is reconstructed and compared with the tracked one:

    error = ||reconstructed - tracked|| / ||tracked_0.05 - tracked_0.10||

The same run is repeated with bfloat16 and float16 snapshots. Accuracy, not speed:
the figures do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
import _plots
import shardema
from shardema import posthoc

PAIR = (0.05, 0.10)
TARGETS = (0.07, 0.03, 0.15)
COUNTS = (4, 8, 16, 32, 64)


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state[k].flatten().double() for k in sorted(state)])


def _weights(ema, model, sigma_rel) -> dict[str, torch.Tensor]:
    with ema.swapped(sigma_rel):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run(root: Path, updates: int, snapshots: int, dtype: torch.dtype | None, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    pair = shardema.ShardedEMA(model, sigma_rels=PAIR)
    direct = shardema.ShardedEMA(model, sigma_rels=TARGETS)
    x = torch.randn(4096, 32)
    y = torch.tanh(x @ torch.randn(32, 8)) + 0.1 * torch.randn(4096, 8)
    every = updates // snapshots
    for step in range(1, updates + 1):
        idx = torch.randint(0, len(x), (64,))
        loss = ((model(x[idx]) - y[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pair.update()
        direct.update()
        if step % every == 0:
            posthoc.save_snapshot(pair, root, dtype=dtype)
    scale = float((_flat(_weights(pair, model, 0.05)) - _flat(_weights(pair, model, 0.10))).norm())
    tracked = {s: _flat(_weights(direct, model, s)) for s in TARGETS}
    results = []
    tags = [s.tag for s in posthoc.list_snapshots(root)]
    for count in COUNTS:
        if count > len(tags):
            continue
        step_k = len(tags) // count
        subset = tags[step_k - 1::step_k]  # evenly spaced, always ending with the last snapshot
        with tempfile.TemporaryDirectory() as sub:
            for tag in subset:
                shutil.copytree(root / "model" / f"cp={tag}", Path(sub) / "model" / f"cp={tag}")
            for target in TARGETS:
                plan = posthoc.plan_reconstruction(sub, target)
                rec = _flat(posthoc.reconstruct(sub, target))
                results.append({"snapshots_per_profile": len(subset), "target": target,
                                "error": float((rec - tracked[target]).norm()) / scale,
                                "profile_fit_error": plan.fit_error})
    return {"dtype": "float32" if dtype is None else str(dtype).removeprefix("torch."), "updates": updates,
            "rows": results}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=3200)
    parser.add_argument("--out", type=Path, default=C.DEFAULT_RESULTS)
    args = parser.parse_args(argv)
    runs = []
    for dtype in (None, torch.bfloat16, torch.float16):
        with tempfile.TemporaryDirectory() as root:
            runs.append(run(Path(root), args.updates, max(COUNTS), dtype))
            print(f"done: {runs[-1]['dtype']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "posthoc_quality", "machine": C.machine_info(torch.device("cpu")),
               "pair": PAIR, "runs": runs}
    (args.out / "posthoc_quality.json").write_text(json.dumps(payload, indent=1))
    lines = ["| snapshot dtype | snapshots per profile | " + " | ".join(f"error {t}" for t in TARGETS)
             + " | profile fit error (0.07) |", "|---" * (3 + len(TARGETS)) + "|"]
    for r in runs:
        for count in sorted({row["snapshots_per_profile"] for row in r["rows"]}):
            rows = {row["target"]: row for row in r["rows"] if row["snapshots_per_profile"] == count}
            lines.append(f"| {r['dtype']} | {count} | " + " | ".join(f"{rows[t]['error']:.2e}" for t in TARGETS)
                         + f" | {rows[0.07]['profile_fit_error']:.2e} |")
    (args.out / "posthoc_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plots(runs, args.out)


def plots(runs: list[dict], out_dir: Path) -> list[str]:
    """The error of the 0.07 reconstruction against the snapshots per profile, one line per snapshot dtype."""
    first = [row for row in runs[0]["rows"] if row["target"] == 0.07]
    xs = [row["snapshots_per_profile"] for row in first]
    lines = []
    for r in runs:
        rows = {row["snapshots_per_profile"]: row for row in r["rows"] if row["target"] == 0.07}
        lines.append(_plots.Line([rows[x]["error"] for x in xs], f"{r['dtype']} snapshots"))
    panel = _plots.Panel(xs, lines, xlabel="snapshots per profile",
                         ylabel="||rec 0.07 - tracked 0.07|| / ||0.05 - 0.10||", title="reconstruction of 0.07",
                         log=True, log_x=True, hlines=[{"y": 0.01, **_plots.TARGET_LINE, "label": "target 0.01"}])
    return _plots.lines(out_dir, "posthoc_quality.png", [panel], figsize=(6, 4), legend={})


if __name__ == "__main__":
    main()
