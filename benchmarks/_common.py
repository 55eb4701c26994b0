"""Shared helpers of the benchmark scripts: models, interleaved timing, statistics, output.

[Note: interleaved rounds]
Shared machines are noisy: the same 400 MB ``lerp_`` was seen to take from 17.8 ms
to 28.9 ms within one minute. Numbers from separate runs are therefore never
compared. Every comparison runs its methods in rounds (roofline, ours, each peer,
then again), rotating the order from round to round, and each ratio is taken
inside one round, where all methods saw about the same machine. The reported
ratio is the median over rounds, with the quartiles and the extremes as spread.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

SCHEMA_VERSION = 1
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_RESULTS = BENCH_DIR / "results"

LAYOUT_WIDTH = {"large": 4096, "small": 128}
"""Width of the square ``nn.Linear`` blocks of each layout: few large tensors vs many small ones."""


# ---------------------------------------------------------------------------- device
def resolve_device(name: str) -> torch.device:
    """``cpu`` or ``cuda``; refuses ``cuda`` without a GPU with a clear message."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was given but torch.cuda.is_available() is False on this machine")
    return torch.device(name)


def sync(device: torch.device) -> None:
    """Wait for queued device work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def available_bytes(device: torch.device) -> int:
    """Memory a benchmark may still allocate on ``device`` (MemAvailable on CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def fits(need_bytes: int, device: torch.device, margin: float = 1.25, reserve: int = 4 * 2**30) -> bool:
    """True when ``need_bytes`` (times a margin) fits, keeping ``reserve`` bytes for everyone else."""
    return need_bytes * margin + (reserve if device.type == "cpu" else 2**30) <= available_bytes(device)


def peak_rss_reset() -> bool:
    """Reset this process's peak RSS (VmHWM) so :func:`peak_rss_bytes` measures from now on."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_bytes(field_name: str = "VmRSS") -> int:
    """This process's resident set size (``VmRSS``) or its peak (``VmHWM``), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------- machine
def _lscpu() -> dict[str, str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    out = {}
    for line in text.splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            out[key.strip()] = value.strip()
    return out


def machine_info(device: torch.device) -> dict:
    """Date and machine description recorded with every result file."""
    cpu = _lscpu()
    try:
        date = subprocess.run(["date"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        date = ""
    mem_total = 0
    try:
        with open("/proc/meminfo") as f:
            mem_total = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    info = {
        "date": date,
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_model": cpu.get("Model name", platform.processor()),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "l2_cache": cpu.get("L2 cache", ""),
        "l3_cache": cpu.get("L3 cache", ""),
        "hypervisor": cpu.get("Hypervisor vendor", ""),
        "memory_gib": round(mem_total / 2**30, 1),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "device": device.type,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def describe_machine(info: dict) -> str:
    """One line: CPU (or GPU), cores, memory, torch version."""
    what = info.get("gpu") or info["cpu_model"]
    extra = f", {info['hypervisor']} VM" if info.get("hypervisor") else ""
    return (f"{what}; {info['cpus']} CPUs{extra}, L2 {info['l2_cache'] or '?'}, L3 {info['l3_cache'] or '?'}, "
            f"{info['memory_gib']} GiB RAM; {info['platform']}; Python {info['python']}, torch {info['torch']}")


# ---------------------------------------------------------------------------- models
def build_model(num_params: int, layout: str, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu", seed: int = 0, min_layers: int = 1) -> nn.Sequential:
    """A stack of square ``nn.Linear`` blocks with about ``num_params`` parameters.

    ``layout="large"`` uses 4096-wide blocks (few tensors of 16.8M elements);
    ``"small"`` uses 128-wide blocks (many tensors of 16K elements plus biases).
    Smaller widths are used when the target is too small for one block.
    """
    width = LAYOUT_WIDTH[layout]
    while width > 16 and num_params < min_layers * (width * width + width):
        width //= 2
    layers = max(min_layers, round(num_params / (width * width + width)))
    model = nn.Sequential(*[nn.Linear(width, width, device="meta") for _ in range(layers)])
    model = model.to_empty(device=device).to(dtype)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(dtype))
    return model


def numel_of(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def size_label(num_params: int) -> str:
    if num_params >= 10**9:
        return f"{num_params / 10**9:.1f}B"
    return f"{round(num_params / 10**6)}M" if num_params >= 10**6 else f"{round(num_params / 10**3)}K"


# ---------------------------------------------------------------------------- timing
@dataclass
class Method:
    """One timed method of a comparison: ``fn()`` performs one update."""

    name: str
    fn: Callable[[], object]
    reps: int = 1


@dataclass
class Rounds:
    """Per-round mean seconds per call, for every method of one comparison."""

    seconds: dict[str, list[float]] = field(default_factory=dict)

    @property
    def num_rounds(self) -> int:
        return min((len(v) for v in self.seconds.values()), default=0)


WARMUP_CALLS = 2
"""Calls of a method :func:`pick_reps` makes (the last one timed) before its rounds."""


def pick_reps(fn: Callable[[], object], device: torch.device, target_s: float, max_reps: int = 20) -> tuple[int, float]:
    """Warm ``fn`` up (``WARMUP_CALLS`` calls) and choose how many calls make about ``target_s`` per round."""
    for _ in range(WARMUP_CALLS - 1):
        fn()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    once = time.perf_counter() - start
    return max(1, min(max_reps, int(target_s / max(once, 1e-6)))), once


def interleave(methods: list[Method], device: torch.device, rounds: int, *, min_rounds: int = 3,
               budget_s: float | None = None, progress=None) -> Rounds:
    """Run ``methods`` in ``rounds`` rounds, rotating their order; see [Note: interleaved rounds].

    Each round times ``reps`` back-to-back calls of each method between two device
    syncs and records the mean. Stops early (after ``min_rounds``) when ``budget_s``
    is spent. ``progress`` is an optional tqdm bar advanced once per round.
    """
    result = Rounds({m.name: [] for m in methods})
    start = time.perf_counter()
    for r in range(rounds):
        if r >= min_rounds and budget_s is not None and time.perf_counter() - start > budget_s:
            break
        order = methods[r % len(methods):] + methods[:r % len(methods)]
        gc.collect()
        gc.disable()
        try:
            for m in order:
                sync(device)
                t0 = time.perf_counter()
                for _ in range(m.reps):
                    m.fn()
                sync(device)
                result.seconds[m.name].append((time.perf_counter() - t0) / m.reps)
        finally:
            gc.enable()
        if progress is not None:
            progress.update(1)
    return result


def calls_made(method: Method, rounds: Rounds) -> int:
    """How often :func:`pick_reps` and :func:`interleave` called ``method.fn``."""
    return WARMUP_CALLS + method.reps * len(rounds.seconds[method.name])


def spread(values: list[float]) -> dict:
    """Median, quartiles and extremes of ``values`` (rounded)."""
    if not values:
        return {"median": None, "q25": None, "q75": None, "min": None, "max": None, "n": 0}
    ordered = sorted(values)
    if len(ordered) >= 2:
        q25, _, q75 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q25 = q75 = ordered[0]
    return {"median": round(statistics.median(ordered), 4), "q25": round(q25, 4), "q75": round(q75, 4),
            "min": round(ordered[0], 4), "max": round(ordered[-1], 4), "n": len(ordered)}


def ratio(rounds: Rounds, numerator: str, denominator: str) -> dict:
    """Per-round ratio ``numerator / denominator`` of mean call times, summarised by :func:`spread`."""
    pairs = zip(rounds.seconds[numerator], rounds.seconds[denominator])
    return spread([a / b for a, b in pairs if b > 0])


def method_stats(seconds: list[float], nbytes: int | None, reps: int) -> dict:
    """Median / min milliseconds over rounds and effective GB/s (``nbytes`` per call)."""
    med = statistics.median(seconds)
    out = {"median_ms": round(med * 1e3, 3), "min_ms": round(min(seconds) * 1e3, 3), "reps": reps,
           "rounds_ms": [round(s * 1e3, 3) for s in seconds]}
    if nbytes:
        out["gbps"] = round(nbytes / med / 1e9, 2)
        out["gbps_best"] = round(nbytes / min(seconds) / 1e9, 2)
    return out


# ---------------------------------------------------------------------------- EMA value check
class EMAProbe:
    """A few live and EMA values, so a test can recompute what the timed updates must have produced.

    [Note: EMA value check]
    The benchmarks time ``ShardedEMA.update()`` on live weights that never change, and
    an EMA that starts at constant weights stays there whether ``update()`` averages or
    does nothing. So once every EMA of a case is built (shadows = live weights ``w``),
    :meth:`start` negates the live weights (the work per update is the same for any
    values). After ``n`` updates with decay ``f`` each shadow element must then be
    ``-w + f**n * 2w``: away from both its start ``w`` and the live ``-w``. :meth:`finish`
    records ``n``, the sampled start values, the current live values and the shadows;
    tests/unit/test_benchmarks_quick.py recomputes the EMA from them.
    """

    def __init__(self, model: nn.Module, tensors: int = 4, per_tensor: int = 8):
        named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
        last = max(0, len(named) - 1)
        picked = [named[i] for i in sorted({round(j * last / max(1, tensors - 1)) for j in range(tensors)})
                  if i < len(named)]
        self.model = model
        self.names = [n for n, _ in picked]  # spread over the model: first, last and between
        self.index = [torch.linspace(0, max(0, _local(p).numel() - 1), per_tensor).long().unique() for _, p in picked]
        self.initial: list[float] = []

    def _live(self) -> list[float]:
        params = dict(self.model.named_parameters())
        return [v for n, i in zip(self.names, self.index) if _local(params[n]).numel()
                for v in _local(params[n]).detach().reshape(-1)[i].double().tolist()]

    @torch.no_grad()
    def start(self) -> None:
        """Sample the live weights (the EMAs' start), then negate them all; call right before timing."""
        self.initial = self._live()
        for p in self.model.parameters():
            _local(p).neg_()

    def finish(self, ema, factors: list[float], updates: int) -> dict:
        """The ``ema_check`` entry of a case, after ``updates`` calls of ``ema.update()``."""
        shadows = []
        for f in factors:
            shadows.append([v for n, i in zip(self.names, self.index)
                            if (t := ema.shadow(f, (None, n))).numel()
                            for v in t.detach().reshape(-1)[i].double().tolist()])
        return {"updates": updates, "factors": list(factors), "tensors": self.names, "initial": self.initial,
                "live": self._live(), "shadows": shadows}


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a (possibly DTensor) parameter."""
    return p.to_local() if hasattr(p, "to_local") else p


# ---------------------------------------------------------------------------- output
def envelope(benchmark: str, mode: str, device: torch.device, config: dict) -> dict:
    """The common top level of every result file (see benchmarks/README.md)."""
    return {"schema_version": SCHEMA_VERSION, "benchmark": benchmark, "mode": mode, "device": device.type,
            "machine": machine_info(device), "config": config, "cases": [], "targets": [], "notes": []}


def target(name: str, goal: str, measured, met: bool | None, note: str = "") -> dict:
    """One target line of a result file: what was asked, what was measured, whether it was met."""
    return {"name": name, "target": goal, "measured": measured, "met": met, "note": note}


def write_json(payload: dict, out_dir: Path, stem: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    if "load_average_end" not in payload["machine"]:  # kept when tables are re-rendered from a result
        payload["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
    return path


def _json_default(value):
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {value!r}")


def md_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fmt_ratio(stats: dict | None) -> str:
    """``median [q25, q75]`` of a ratio summary."""
    if not stats or stats.get("median") is None:
        return "n/a"
    return f"{stats['median']:.2f} [{stats['q25']:.2f}, {stats['q75']:.2f}]"


def targets_md(targets: list[dict]) -> str:
    rows = [[t["name"], t["target"], t["measured"], met_word(t["met"]), t["note"]]
            for t in targets]
    return md_table(["target", "goal", "measured", "", "note"], rows)


def tqdm_bar(total: int, desc: str, enabled: bool = True):
    """A tqdm progress bar (disabled when ``enabled`` is False)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True)


def met_word(met: bool | None) -> str:
    return {True: "met", False: "missed", None: "not evaluated"}[met]


def bench_parser(doc: str, device_help: str | None = None) -> argparse.ArgumentParser:
    """The options every benchmark script takes (benchmarks/README.md); a script adds its own after them."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: one small model, few rounds")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help=device_help)
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS, help="results directory")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    parser.add_argument("--render-only", action="store_true",
                        help="re-derive targets, tables and plots from the JSON already in --out (no measuring)")
    return parser


def measure_or_render(args, stem: str, run: Callable[[argparse.Namespace], dict], plots, markdown,
                      rederive: Callable[[dict], None] | None = None) -> int:
    """``run(args)``, or with ``--render-only`` the result already in ``--out`` (``rederive`` updates
    what is derived from the measurements); then :func:`write_outputs`."""
    if args.render_only:
        result = json.loads((args.out / f"{stem}.json").read_text())
        if rederive is not None:
            rederive(result)
    else:
        result = run(args)
    return write_outputs(result, args.out, stem, plots, markdown)


def write_outputs(result: dict, out_dir: Path, stem: str, plots, markdown) -> int:
    """Write ``<stem>.json``, ``<stem>.md`` and the plots of one benchmark; print the targets."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result["plots"] = plots(result, out_dir)
    path = write_json(result, out_dir, stem)
    (out_dir / f"{stem}.md").write_text(markdown(result))
    print(f"[{stem}] wrote {path}")
    for t in result.get("targets", []):
        print(f"  {t['name']}: {t['measured']} -> {met_word(t['met'])}")
    return 0
