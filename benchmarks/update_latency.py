"""EMA update latency against the memory-bandwidth roofline and against peers, in one run.

For every model (size x layout) this measures, in interleaved rounds (see
[Note: interleaved rounds] in ``_common.py``):

1. K = 1, fp32 live: the roofline (one ``lerp_`` over a contiguous buffer of the same
   bytes), shardema, and every peer EMA on the same live model;
2. K = 2, 3, fp32 live: shardema's fused update against K separate K = 1 updates
   (and a noether-style update of K full copies when memory allows);
3. K = 1, 2, 3, bf16 live with fp32 shadows: shardema against its roofline.

Bytes per element of one update: fp32 live (4 + 8K), bf16 live (2 + 8K): the live
value is read once, each shadow is read and written once.

    python benchmarks/update_latency.py [--quick] [--device cpu|cuda] [--out DIR]

[Note: roofline on a shared CPU]
On CPU, one ``lerp_`` over a large buffer is split over all of torch's threads in one
parallel region, which ends when the slowest thread does. When another process holds
a core, that thread waits for the scheduler and the "roofline" drops below what one
thread alone achieves. So on CPU the roofline ``lerp_`` is timed twice per round, on
all threads and on one thread, and the round's roofline is the faster of the two:
the bandwidth one ``lerp_`` could reach at that moment. Both are recorded.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
import _plots
import peers as P
import shardema

FACTORS = [0.9999, 0.999, 0.99]
OURS = "shardema"
ROOF = "roofline"
ROOF_ALL = "roofline lerp_ (all threads)"
ROOF_ONE = "roofline lerp_ (1 thread)"
SEPARATE = "K separate K=1"
NOETHER_K = "noether-style K copies"

PLANS = {
    ("cpu", "full"): dict(sizes=[10_000_000, 100_000_000, 300_000_000], small_max=100_000_000, rounds=7,
                          min_rounds=5, budget_s=20.0, round_target_s=0.1, multi=(2, 3), bf16=(1, 3)),
    ("cpu", "quick"): dict(sizes=[2_000_000], small_max=2_000_000, rounds=3, min_rounds=3, budget_s=4.0,
                           round_target_s=0.02, multi=(3,), bf16=(1,)),
    ("cuda", "full"): dict(sizes=[10_000_000, 100_000_000, 1_000_000_000], small_max=100_000_000, rounds=7,
                           min_rounds=5, budget_s=8.0, round_target_s=0.03, multi=(2, 3), bf16=(1, 3)),
    ("cuda", "quick"): dict(sizes=[10_000_000], small_max=10_000_000, rounds=3, min_rounds=3, budget_s=4.0,
                            round_target_s=0.02, multi=(3,), bf16=(1,)),
}

# Full model copies each peer family holds (plus one transient copy for diffusers' foreach).
PEER_COPIES = {"torch_averaged_model": 1, "ema_pytorch": 1, "diffusers_ema": 2, "timm_ema": 1, "noether_style": 1}


CHECK_NUMEL = 1 << 20
CHECK_TOLERANCE = 1e-5


@torch.no_grad()
def check_against_float64(ema: shardema.ShardedEMA) -> dict:
    """One more ``update()`` of ``ema`` after moving the live weights, against float64.

    The benchmark's live weights never change, so the timed updates leave the shadows equal
    to them whatever the update does; this check moves the first parameters (about
    ``CHECK_NUMEL`` elements) by +10, updates once, compares those shadows with
    ``d * shadow + (1 - d) * live`` in float64 and restores the live weights.
    """
    checked, total = [], 0
    for t in ema.tracked():
        if t.is_buffer or not t.dtype.is_floating_point or total >= CHECK_NUMEL:
            continue
        checked.append(t)
        total += t.local_numel
    decays = ema.current_decays()
    before = {(f, t.key): ema.shadow(f, t.key).double() for f in ema.target_factors for t in checked}
    lives = {t.key: t.local().detach().clone() for t in checked}
    for t in checked:
        t.local().add_(10.0)  # a no-op update would be off by (1 - decay) * 10 >= 1e-3
    ema.update()
    moved = {t.key: t.local().double() for t in checked}
    error = 0.0
    for (f, key), old in before.items():
        expected = decays[f] * old + (1 - decays[f]) * moved[key]
        error = max(error, float((ema.shadow(f, key).double() - expected).abs().max()))
    for t in checked:
        t.local().copy_(lives[t.key])
    return {"max_abs_error": error, "tolerance": CHECK_TOLERANCE, "numel": total, "ok": error <= CHECK_TOLERANCE}


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def _release() -> None:
    """Return the memory of the phase that just ended (its objects died with its frame)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Runner:
    """Runs the phases of one model and collects the cases."""

    def __init__(self, device: torch.device, plan: dict, progress: bool):
        self.device = device
        self.plan = plan
        self.progress = progress

    def _time(self, methods: list[C.Method], desc: str, model) -> tuple[C.Rounds, C.EMAProbe]:
        probe = C.EMAProbe(model)  # see [Note: EMA value check]
        probe.start()
        for m in methods:
            m.reps, _ = C.pick_reps(m.fn, self.device, self.plan["round_target_s"])
        bar = C.tqdm_bar(self.plan["rounds"], desc, self.progress)
        try:
            rounds = C.interleave(methods, self.device, self.plan["rounds"], budget_s=self.plan["budget_s"],
                                  min_rounds=self.plan["min_rounds"], progress=bar)
        finally:
            bar.close()
        self._add_roofline(rounds)
        return rounds, probe

    def _roofline(self, nbytes: int) -> tuple[list[C.Method], list[torch.Tensor]]:
        """One ``lerp_`` over a contiguous buffer of ``nbytes``; on CPU also timed on one thread.

        See [Note: roofline on a shared CPU]: the round's roofline is the faster of the two.
        """
        numel = max(1, nbytes // 12)  # one lerp_ moves 12 bytes per fp32 element
        a = torch.full((numel,), 1.0, device=self.device)
        b = torch.full((numel,), 2.0, device=self.device)
        threads = torch.get_num_threads()
        methods = [C.Method(ROOF_ALL, lambda: a.lerp_(b, 1e-3))]
        if self.device.type == "cpu" and threads > 1:
            def one_thread():
                torch.set_num_threads(1)
                try:
                    a.lerp_(b, 1e-3)
                finally:
                    torch.set_num_threads(threads)

            methods.append(C.Method(ROOF_ONE, one_thread))
        return methods, [a, b]

    @staticmethod
    def _add_roofline(rounds: C.Rounds) -> None:
        timed = [rounds.seconds[n] for n in (ROOF_ALL, ROOF_ONE) if n in rounds.seconds]
        rounds.seconds[ROOF] = [min(values) for values in zip(*timed)]

    def _case(self, phase, meta, k, live_dtype, nbytes, rounds, methods, ours, probe) -> dict:
        stats = {m.name: C.method_stats(rounds.seconds[m.name], nbytes, m.reps) for m in methods}
        stats[ROOF] = C.method_stats(rounds.seconds[ROOF], nbytes, 1)
        timed = next(m for m in methods if m.name == OURS)
        return {"phase": phase, **meta, "live_dtype": str(live_dtype).replace("torch.", ""), "shadow_dtype": "float32",
                "num_factors": k, "bytes_per_update": nbytes, "rounds": rounds.num_rounds, "methods": stats,
                "roofline_fraction": C.ratio(rounds, ROOF, OURS),
                "ema_check": probe.finish(ours, FACTORS[:k], C.calls_made(timed, rounds))}

    # ------------------------------------------------------------------ phase 1
    def k1_with_peers(self, model, meta) -> dict:
        n = meta["num_params"]
        nbytes = 12 * n
        roofs, _keep = self._roofline(nbytes)
        ours = shardema.ShardedEMA(model, [FACTORS[0]])
        methods = [*roofs, C.Method(OURS, ours.update)]
        families, skipped = [], {}
        for build in P.FAMILIES:
            need = PEER_COPIES[build.__name__] * 4 * n
            if not C.fits(need, self.device):
                skipped[build.__name__] = f"skipped: needs {need / 2**30:.1f} GiB more than this machine has free"
                continue
            fam = build(model, FACTORS[0])
            if fam.unavailable:
                skipped[fam.name] = fam.unavailable
                continue
            families.append(fam)
            methods += [C.Method(name, fn) for name, fn in fam.variants]
        rounds, probe = self._time(methods, f"K=1 {meta['model']} {meta['layout']}", model)
        case = self._case("k1_peers", meta, 1, torch.float32, nbytes, rounds, methods, ours, probe)
        peer_names = [m.name for m in methods[len(roofs) + 1:]]
        case["peers"] = peer_names
        case["ratios"] = {f"{OURS}/{p}": C.ratio(rounds, OURS, p) for p in peer_names}
        case["unavailable"] = skipped
        mark_fastest_peer(case)
        case["check"] = check_against_float64(ours)
        return case

    # ------------------------------------------------------------------ phase 2
    def fused_vs_separate(self, model, meta, k) -> dict:
        n = meta["num_params"]
        nbytes = (4 + 8 * k) * n
        need = 4 * n * k * 2 + 2 * (nbytes // 12) * 4
        if not C.fits(need, self.device):
            return {"phase": "fused_vs_separate", **meta, "num_factors": k,
                    "skipped": f"needs {need / 2**30:.1f} GiB; not enough free memory"}
        roofs, _keep = self._roofline(nbytes)
        fused = shardema.ShardedEMA(model, FACTORS[:k])
        separate = [shardema.ShardedEMA(model, [f]) for f in FACTORS[:k]]

        def run_separate():
            for ema in separate:
                ema.update()

        methods = [*roofs, C.Method(OURS, fused.update), C.Method(SEPARATE, run_separate)]
        noether = None
        if C.fits(4 * n * k, self.device):
            noether = P.NoetherStyle(model, FACTORS[:k])
            methods.append(C.Method(NOETHER_K, noether.update))
        rounds, probe = self._time(methods, f"K={k} {meta['model']} {meta['layout']}", model)
        case = self._case("fused_vs_separate", meta, k, torch.float32, nbytes, rounds, methods, fused, probe)
        case["fused_over_separate"] = C.ratio(rounds, OURS, SEPARATE)
        case["predicted_fused_over_separate"] = round((4 + 8 * k) / (12 * k), 4)
        if noether is not None:
            case["ratios"] = {f"{OURS}/{NOETHER_K}": C.ratio(rounds, OURS, NOETHER_K)}
        case["check"] = check_against_float64(fused)
        return case

    # ------------------------------------------------------------------ phase 3
    def low_precision_live(self, model, meta, k) -> dict:
        n = meta["num_params"]
        nbytes = (2 + 8 * k) * n
        need = 4 * n * k + 2 * (nbytes // 12) * 4
        if not C.fits(need, self.device):
            return {"phase": "bf16_live", **meta, "num_factors": k,
                    "skipped": f"needs {need / 2**30:.1f} GiB; not enough free memory"}
        roofs, _keep = self._roofline(nbytes)
        ours = shardema.ShardedEMA(model, FACTORS[:k])
        methods = [*roofs, C.Method(OURS, ours.update)]
        rounds, probe = self._time(methods, f"bf16 K={k} {meta['model']} {meta['layout']}", model)
        case = self._case("bf16_live", meta, k, torch.bfloat16, nbytes, rounds, methods, ours, probe)
        case["check"] = check_against_float64(ours)
        return case


def run(args) -> dict:
    device = C.resolve_device(args.device)
    mode = "quick" if args.quick else "full"
    plan = dict(PLANS[(device.type, mode)])
    if args.sizes:
        plan["sizes"] = [parse_size(s) for s in args.sizes.split(",")]
        plan["small_max"] = max(plan["sizes"])
    if args.rounds:
        plan["rounds"] = args.rounds
    layouts = args.layouts.split(",")
    result = C.envelope("update_latency", mode, device,
                        {**plan, "layouts": layouts, "factors": FACTORS, "peers_importable": P.importable()})
    runner = Runner(device, plan, not args.no_progress)
    for size in plan["sizes"]:
        for layout in layouts:
            if layout == "small" and size > plan["small_max"]:
                continue
            need = 4 * size * 4  # live + ours + roofline pair, the least any phase needs
            if not C.fits(need, device):
                result["cases"].append({"phase": "k1_peers", "model": C.size_label(size), "layout": layout,
                                        "skipped": f"needs {need / 2**30:.1f} GiB; not enough free memory"})
                continue
            model = C.build_model(size, layout, torch.float32, device)
            meta = {"model": C.size_label(size), "layout": layout, "num_params": C.numel_of(model),
                    "num_tensors": len(list(model.parameters()))}
            print(f"[update_latency] {meta}", flush=True)
            result["cases"].append(runner.k1_with_peers(model, meta))
            _release()
            for k in plan["multi"]:
                result["cases"].append(runner.fused_vs_separate(model, meta, k))
                _release()
            if plan["bf16"]:
                model = model.to(torch.bfloat16)
                _release()
                for k in plan["bf16"]:
                    result["cases"].append(runner.low_precision_live(model, meta, k))
                    _release()
            del model
            _release()
    result["targets"] = targets(result["cases"])
    if mode == "quick":
        for t in result["targets"]:
            t["met"], t["note"] = None, "smoke run on a small model: not evaluated"
    return result


# ---------------------------------------------------------------------- targets
def mark_fastest_peer(case: dict) -> None:
    """The fastest peer is the one shardema compares worst against (highest median per-round ratio)."""
    if case.get("peers"):
        fastest = max(case["peers"], key=lambda p: case["ratios"][f"{OURS}/{p}"]["median"])
        case["fastest_peer"] = fastest
        case["ours_vs_fastest_peer"] = case["ratios"][f"{OURS}/{fastest}"]


def _ok(cases, phase):
    return [c for c in cases if c.get("phase") == phase and "skipped" not in c]


def targets(cases: list[dict]) -> list[dict]:
    out = []
    big = [c for c in _ok(cases, "k1_peers") if c["num_params"] >= 90_000_000]
    if big:
        fr = {f"{c['model']} {c['layout']}": c["roofline_fraction"]["median"] for c in big}
        met = all(v >= 0.85 for v in fr.values())
        out.append(C.target("roofline_k1", ">= 0.85 of the roofline at >= 100M parameters, K = 1, fp32",
                            fr, met, "" if met else "below 0.85: models of many small, separately allocated "
                            "tensors pay the foreach call's ~1-2 us per tensor (docs/benchmarks.md, "
                            "\"Per-tensor costs\")"))
    fused = [c for c in _ok(cases, "fused_vs_separate") if c["num_factors"] == 3 and c["num_params"] >= 90_000_000]
    if fused:
        fr = {f"{c['model']} {c['layout']}": c["fused_over_separate"]["median"] for c in fused}
        pred = fused[0]["predicted_fused_over_separate"]
        met = all(v <= 0.9 and abs(v - pred) <= 0.1 for v in fr.values())
        out.append(C.target("fused_k3", f"K=3 fused / 3 separate K=1 clearly < 1, close to (4+8K)/12K = {pred:.2f}, "
                                        ">= 100M parameters", fr, met,
                            "met = every ratio <= 0.90 and within 0.10 of the byte-count prediction; smaller models "
                            "stay in the last-level cache, where re-reading the live weights costs little"
                            + ("" if met else "; a miss on the small layout: the fused pass pays the same "
                               "per-tensor costs as each separate one")))
    peers = [c for c in _ok(cases, "k1_peers") if c.get("fastest_peer")]
    if peers:
        fr = {f"{c['model']} {c['layout']}": f"{c['ours_vs_fastest_peer']['median']:.2f} vs {c['fastest_peer']}"
              for c in peers}
        met = all(c["ours_vs_fastest_peer"]["median"] <= 1.05 for c in peers)
        out.append(C.target("fastest_peer_k1", "K = 1, one rank: shardema / fastest peer <= 1.05, every model", fr, met,
                            "fastest peer = the one with the highest median per-round ratio"))
    return out


# ---------------------------------------------------------------------- report
def markdown(result: dict) -> str:
    cases = result["cases"]
    parts = []
    k1 = _ok(cases, "k1_peers")
    if k1:
        rows = []
        for c in k1:
            m = c["methods"]
            rows.append([c["model"], c["layout"], f"{c['num_params']:,}", c["num_tensors"],
                         f"{m[ROOF]['median_ms']:.1f}", f"{m[OURS]['median_ms']:.1f} (min {m[OURS]['min_ms']:.1f})",
                         m[OURS]["gbps"], C.fmt_ratio(c["roofline_fraction"]), c["rounds"]])
        parts.append("**K = 1, fp32 live: shardema against the roofline** (fraction = roofline time / shardema "
                     "time per round; median [quartiles] over rounds)\n\n" + C.md_table(
                         ["model", "layout", "params", "tensors", "roofline ms", "shardema ms", "GB/s",
                          "fraction of roofline", "rounds"], rows))
        peer_names = []
        for c in k1:
            peer_names += [p for p in c["peers"] if p not in peer_names]
        rows = []
        for c in k1:
            row = [f"{c['model']} {c['layout']}"]
            for p in peer_names:
                if p in c["methods"]:
                    row.append(f"{c['methods'][p]['median_ms']:.1f} ms, {C.fmt_ratio(c['ratios'][OURS + '/' + p])}")
                else:
                    row.append("n/a")
            rows.append(row)
        parts.append("**K = 1, fp32: peers on the same model** (peer median ms, then the ratio shardema / peer per "
                     "round: below 1 means shardema is faster)\n\n" + C.md_table(["model", *peer_names], rows))
        gone = {}
        for c in k1:
            gone.update(c.get("unavailable", {}))
        if gone:
            parts.append("Peers not measured: " + "; ".join(f"{k}: {v}" for k, v in gone.items()) + "\n")
    fused = [c for c in cases if c.get("phase") == "fused_vs_separate"]
    if fused:
        rows = []
        for c in fused:
            if "skipped" in c:
                rows.append([c["model"], c["layout"], c["num_factors"]] + ["skipped"] * 5 + [c["skipped"]])
                continue
            m = c["methods"]
            noether = C.fmt_ratio(c.get("ratios", {}).get(f"{OURS}/{NOETHER_K}"))
            rows.append([c["model"], c["layout"], c["num_factors"], f"{m[OURS]['median_ms']:.1f}",
                         f"{m[SEPARATE]['median_ms']:.1f}", C.fmt_ratio(c["fused_over_separate"]),
                         f"{c['predicted_fused_over_separate']:.2f}", C.fmt_ratio(c["roofline_fraction"]), noether])
        parts.append("**K factors fused vs K separate K = 1 updates** (fp32 live)\n\n" + C.md_table(
            ["model", "layout", "K", "fused ms", "separate ms", "fused / separate", "predicted (4+8K)/12K",
             "fused fraction of roofline", "shardema / noether-style K copies"], rows))
    low = [c for c in cases if c.get("phase") == "bf16_live"]
    if low:
        rows = []
        for c in low:
            if "skipped" in c:
                rows.append([c["model"], c["layout"], c["num_factors"], "skipped", "", "", c["skipped"]])
                continue
            m = c["methods"]
            rows.append([c["model"], c["layout"], c["num_factors"], f"{m[ROOF]['median_ms']:.1f}",
                         f"{m[OURS]['median_ms']:.1f}", m[OURS]["gbps"], C.fmt_ratio(c["roofline_fraction"])])
        parts.append("**bf16 live weights, fp32 shadows** ((2 + 8K) bytes per element)\n\n" + C.md_table(
            ["model", "layout", "K", "roofline ms", "shardema ms", "GB/s", "fraction of roofline"], rows))
    parts.append("**Targets**\n\n" + C.targets_md(result["targets"]))
    return "\n".join(parts)


def plots(result: dict, out_dir: Path) -> list[str]:
    cases = result["cases"]
    roof = [c for c in cases if "skipped" not in c and "roofline_fraction" in c]
    fractions = [c["roofline_fraction"] for c in roof]
    written = _plots.bars(
        out_dir, "update_latency_roofline.png",
        [f"{c['model']} {c['layout']}\n{c['live_dtype']} K={c['num_factors']}" for c in roof],
        [_plots.Series([f["median"] for f in fractions], yerr=([f["median"] - f["q25"] for f in fractions],
                                                               [f["q75"] - f["median"] for f in fractions]))],
        figsize=(max(6, 0.55 * len(roof)), 4), tick_style={"rotation": 90, "fontsize": 7},
        hlines=[dict(y=0.85, **_plots.TARGET_LINE, label="target 0.85 (K=1, >=100M)")],
        ylabel="roofline time / shardema time", title="Fraction of the memory-bandwidth roofline (median, quartiles)",
        legend={"fontsize": 8})
    k1 = _ok(cases, "k1_peers")
    peer_names: list[str] = []
    for c in k1:
        peer_names += [p for p in c["peers"] if p not in peer_names]
    written += _plots.bars(
        out_dir, "update_latency_peers.png", peer_names,
        [_plots.Series([c["ratios"].get(f"{OURS}/{p}", {}).get("median") or 0 for p in peer_names],
                       label=f"{c['model']} {c['layout']}") for c in k1],
        figsize=(11, 4), tick_style=_plots.SLANTED, log=True,
        hlines=[dict(y=1.0, color="black", linewidth=0.8),
                dict(y=1.05, **_plots.TARGET_LINE, label="target <= 1.05 vs fastest")],
        ylabel="shardema time / peer time (log)",
        title="K = 1, fp32: shardema against peers on the same model (below 1 = faster)",
        legend={"fontsize": 7, "bbox_to_anchor": (1.01, 1), "loc": "upper left"})
    fused = _ok(cases, "fused_vs_separate")
    written += _plots.bars(
        out_dir, "update_latency_fused.png", [f"{c['model']} {c['layout']} K={c['num_factors']}" for c in fused],
        [_plots.Series([c["fused_over_separate"]["median"] for c in fused], label="measured"),
         _plots.Series([c["predicted_fused_over_separate"] for c in fused], label="(4+8K)/12K byte count")],
        figsize=(7, 4), tick_style=_plots.SLANTED, ylabel="fused time / K separate K=1 updates",
        title="Fusing K factors into one pass over the live weights", legend={"fontsize": 8})
    return written


def rederive(result: dict) -> None:
    """Fastest peers and targets again from the measurements of ``result``."""
    for case in _ok(result["cases"], "k1_peers"):
        mark_fastest_peer(case)
    result["targets"] = targets(result["cases"])
    for t in result["targets"] if result["mode"] == "quick" else []:
        t["met"], t["note"] = None, "smoke run on a small model: not evaluated"


def main(argv=None) -> int:
    parser = C.bench_parser(__doc__)
    parser.add_argument("--sizes", default="", help="comma-separated parameter counts, e.g. 10M,100M")
    parser.add_argument("--layouts", default="large,small", help="large (few big tensors), small (many small)")
    parser.add_argument("--rounds", type=int, default=0, help="override the number of interleaved rounds")
    return C.measure_or_render(parser.parse_args(argv), "update_latency", run, plots, markdown, rederive)


if __name__ == "__main__":
    sys.exit(main())
