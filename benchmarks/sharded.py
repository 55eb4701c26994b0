"""Sharded EMA under FSDP2 on 1, 2 and 4 CPU ranks (gloo): per-rank time and memory.

Each world size runs in its own spawn of real processes. Every rank builds the same
model, shards it with ``fully_shard`` (each block, then the root) and compares, in
interleaved rounds that start on a barrier:

* ``shardema``: ``ShardedEMA.update()`` on the rank's own shards, no communication;
* ``gather-then-update``: what the gathering FSDP EMA implementations do: summon the
  full parameters (``full_tensor()`` of every parameter, an all-gather each) and
  update a full replica held on every rank;
* ``roofline lerp_``: one ``lerp_`` over a contiguous buffer of the rank's bytes.

Per-rank EMA memory is the shadow storage (``ShardedEMA.shadow_bytes``) against the
replica (plus the transient gathered copy) of the baseline.

    python benchmarks/sharded.py [--quick] [--worlds 1,2,4] [--out DIR]
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
import _plots

OURS, GATHER, ROOF = "shardema", "gather-then-update", "roofline lerp_"
FACTOR = 0.9999

PLANS = {
    "full": dict(size=64_000_000, worlds=[1, 2, 4], rounds=5, threads=1),
    "quick": dict(size=1_000_000, worlds=[1, 2], rounds=3, threads=1),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, cfg: dict, out_path: str) -> None:
    """One rank: build, shard, time the methods in rounds, gather the numbers to rank 0."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import shardema

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(cfg["threads"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    try:
        model = C.build_model(cfg["size"], "large", torch.float32, "cpu", seed=0, min_layers=4)
        numel = C.numel_of(model)
        for block in model:
            fully_shard(block)
        fully_shard(model)
        ema = shardema.ShardedEMA(model, [FACTOR])
        params = list(model.parameters())
        local_numel = sum(p.to_local().numel() for p in params)
        replica = [p.full_tensor().clone() for p in params]  # the baseline's full EMA copy
        replica_bytes = sum(r.numel() * r.element_size() for r in replica)
        weight = 1.0 - FACTOR

        def gather_update():
            full = [p.full_tensor() for p in params]
            torch._foreach_lerp_(replica, full, weight)

        roof_a = torch.full((local_numel,), 1.0)
        roof_b = torch.full((local_numel,), 2.0)
        methods = [C.Method(ROOF, lambda: roof_a.lerp_(roof_b, weight)), C.Method(OURS, ema.update),
                   C.Method(GATHER, gather_update)]
        probe = C.EMAProbe(model)  # see [Note: EMA value check]
        probe.start()
        for m in methods:  # warm up (first touches, gloo buffers)
            for _ in range(C.WARMUP_CALLS):
                m.fn()
        seconds = {m.name: [] for m in methods}
        for r in range(cfg["rounds"]):
            order = methods[r % len(methods):] + methods[:r % len(methods)]
            for m in order:
                dist.barrier()
                t0 = time.perf_counter()
                m.fn()
                seconds[m.name].append(time.perf_counter() - t0)
        mine = {"rank": rank, "seconds": seconds, "shadow_bytes": ema.shadow_bytes, "local_numel": local_numel,
                "replica_bytes": replica_bytes, "gather_transient_bytes": replica_bytes, "numel": numel,
                "num_tensors": len(params),
                "ema_check": probe.finish(ema, [FACTOR], C.WARMUP_CALLS + cfg["rounds"])}
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            Path(out_path).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def run_world(world: int, cfg: dict, timeout_s: float = 600.0) -> list[dict]:
    """Spawn ``world`` gloo ranks and return each rank's measurements."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "ranks.json")
        procs = [ctx.Process(target=_rank_main, args=(r, world, port, cfg, out_path), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(1.0, deadline - time.monotonic()))
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
        if alive or any(p.exitcode != 0 for p in procs):
            codes = [p.exitcode for p in procs]
            raise RuntimeError(f"world size {world}: ranks exited with {codes} (None = killed after {timeout_s}s)")
        return json.loads(Path(out_path).read_text())


def summarise(world: int, ranks: list[dict], unsharded_bytes: int | None) -> dict:
    """Per world size: per-rank times (median over rounds), the slowest rank per round, memory."""
    names = list(ranks[0]["seconds"])
    rounds = len(ranks[0]["seconds"][OURS])
    slowest = {n: [max(r["seconds"][n][i] for r in ranks) for i in range(rounds)] for n in names}
    per_rank = {n: [round(statistics.median(r["seconds"][n]) * 1e3, 3) for r in ranks] for n in names}
    shadow = [r["shadow_bytes"] for r in ranks]
    case = {
        "world_size": world, "num_params": ranks[0]["numel"], "num_tensors": ranks[0]["num_tensors"],
        "rounds": rounds,
        "methods": {n: {"median_ms_slowest_rank": round(statistics.median(slowest[n]) * 1e3, 3),
                        "min_ms_slowest_rank": round(min(slowest[n]) * 1e3, 3),
                        "median_ms_per_rank": per_rank[n],
                        "rounds_ms_slowest_rank": [round(t * 1e3, 3) for t in slowest[n]]} for n in names},
        "gather_over_ours": C.spread([g / o for g, o in zip(slowest[GATHER], slowest[OURS])]),
        "roofline_fraction": C.spread([f / o for f, o in zip(slowest[ROOF], slowest[OURS])]),
        "ema_bytes_per_rank": shadow,
        "baseline_bytes_per_rank": [r["replica_bytes"] for r in ranks],
        "baseline_transient_bytes_per_rank": [r["gather_transient_bytes"] for r in ranks],
        "local_numel_per_rank": [r["local_numel"] for r in ranks],
        "ema_check_per_rank": [r["ema_check"] for r in ranks],
    }
    if unsharded_bytes:
        case["ema_bytes_unsharded"] = unsharded_bytes
        case["max_rank_fraction_of_unsharded"] = round(max(shadow) / unsharded_bytes, 6)
        case["exactly_one_over_w"] = all(s * world == unsharded_bytes for s in shadow)
    return case


def run(args) -> dict:
    mode = "quick" if args.quick else "full"
    cfg = dict(PLANS[mode])
    if args.worlds:
        cfg["worlds"] = [int(w) for w in args.worlds.split(",")]
    if args.size:
        cfg["size"] = int(float(args.size))
    device = torch.device("cpu")
    result = C.envelope("sharded", mode, device, {**cfg, "backend": "gloo", "factor": FACTOR,
                                                   "note": "ranks are CPU processes on this machine"})
    unsharded = None
    bar = C.tqdm_bar(len(cfg["worlds"]), "FSDP2 world sizes", not args.no_progress)
    for world in cfg["worlds"]:
        ranks = run_world(world, cfg)
        if world == 1:
            unsharded = ranks[0]["shadow_bytes"]
        elif unsharded is None:
            unsharded = ranks[0]["numel"] * 4  # fp32 shadow of every parameter, one factor
        result["cases"].append(summarise(world, ranks, unsharded))
        bar.update(1)
    bar.close()
    result["targets"] = targets(result["cases"], cfg)
    return result


def targets(cases: list[dict], cfg: dict) -> list[dict]:
    exact = {c["world_size"]: c.get("exactly_one_over_w") for c in cases}
    fr = {f"W={c['world_size']}": c.get("max_rank_fraction_of_unsharded") for c in cases}
    return [C.target("memory_one_over_w", "per-rank EMA memory exactly 1/W of the unsharded EMA", fr,
                     all(v for v in exact.values()))]


def markdown(result: dict) -> str:
    rows = []
    for c in result["cases"]:
        ms = {name: f"{c['methods'][name]['median_ms_slowest_rank']:.1f}" for name in (ROOF, OURS, GATHER)}
        replica = max(c["baseline_bytes_per_rank"]) / 2**20
        transient = max(c["baseline_transient_bytes_per_rank"]) / 2**20
        rows.append([c["world_size"], ms[ROOF], ms[OURS], ms[GATHER], C.fmt_ratio(c["gather_over_ours"]),
                     C.fmt_ratio(c["roofline_fraction"]), f"{max(c['ema_bytes_per_rank']) / 2**20:.1f}",
                     f"{replica:.1f} (+{transient:.0f} transient)", c.get("max_rank_fraction_of_unsharded"),
                     "yes" if c.get("exactly_one_over_w") else "no"])
    cfg = result["config"]
    head = (f"**FSDP2, {cfg['backend']} on CPU, {result['cases'][0]['num_params']:,} parameters, "
            f"{cfg['threads']} thread(s) per rank** (ms: median over rounds of the slowest rank; "
            "ratios per round)\n\n") if result["cases"] else ""
    return head + C.md_table(
        ["W", "roofline ms", "shardema ms", "gather-then-update ms", "gather / shardema",
         "shardema fraction of roofline", "EMA MiB per rank", "baseline MiB per rank", "EMA / unsharded",
         "exactly 1/W"], rows) + "\n**Targets**\n\n" + C.targets_md(result["targets"])


def plots(result: dict, out_dir: Path) -> list[str]:
    cases = result["cases"]
    if not cases:
        return []
    ws = [c["world_size"] for c in cases]
    mib = [_plots.Line([max(c["ema_bytes_per_rank"]) / 2**20 for c in cases], "shardema"),
           _plots.Line([max(c["baseline_bytes_per_rank"]) / 2**20 for c in cases], "gather-then-update replica")]
    if cases[0].get("ema_bytes_unsharded"):
        full = cases[0]["ema_bytes_unsharded"] / 2**20
        mib.append(_plots.Line([full / w for w in ws], "unsharded / W", {"linestyle": "--", "color": "grey"}))
    return _plots.lines(out_dir, "sharded.png", [
        _plots.Panel(ws, [_plots.Line([c["methods"][name]["median_ms_slowest_rank"] for c in cases], name)
                          for name in (ROOF, OURS, GATHER)],
                     "ranks (W)", "ms per update (slowest rank)", "Update time under FSDP2 (CPU, gloo)", log=True),
        _plots.Panel(ws, mib, "ranks (W)", "EMA MiB per rank", "Per-rank EMA memory"),
    ], figsize=(10, 4), legend={"fontsize": 8})


def main(argv=None) -> int:
    parser = C.bench_parser(__doc__, "ranks always run on CPU/gloo (one GPU cannot host several NCCL ranks)")
    parser.add_argument("--worlds", default="", help="comma-separated world sizes (default 1,2,4)")
    parser.add_argument("--size", default="", help="parameter count, e.g. 64e6")

    def rederive(result: dict) -> None:
        result["targets"] = targets(result["cases"], result["config"])

    return C.measure_or_render(parser.parse_args(argv), "sharded", run, plots, markdown, rederive)


if __name__ == "__main__":
    sys.exit(main())
