"""Swap latency and extra memory; checkpoint save / load throughput against the disk.

Swap: ``with ema.swapped(f): pass`` (EMA weights in, live weights back) against the
clone-and-restore swap of the seed callback and of Lightning (clone every live
tensor, copy the EMA in, copy the clone back). Extra memory is what the swap holds
from entry to exit: the ``SwapInfo`` figure and the measured peak (RSS on CPU,
allocator peak on CUDA).

Checkpoint: ``ema.save(root, tag)`` and ``ema.resume(root)`` against a raw
sequential write / read of the same bytes and against ``torch.save`` /
``torch.load`` of the same tensors. Every write ends with an fsync; the files are
then dropped from the page cache (``posix_fadvise(DONTNEED)``) so reads come from
the disk, not from memory.

    python benchmarks/swap_checkpoint.py [--quick] [--device cpu|cuda] [--out DIR] [--workdir DIR]
"""

from __future__ import annotations

import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
import _plots
import shardema

FACTORS = [0.999, 0.9999]
SWAP_OURS, SWAP_CLONE, ONE_COPY = "shardema swapped", "clone-and-restore", "one copy of the local shards"
RAW_W, TORCH_W, OURS_W = "raw sequential write", "torch.save", "shardema ema.save"
RAW_R, TORCH_R, OURS_R = "raw sequential read", "torch.load", "shardema ema.resume"
BLOCK = 64 * 2**20

PLANS = {
    ("cpu", "full"): dict(size=100_000_000, swap_rounds=7, ckpt_rounds=3),
    ("cpu", "quick"): dict(size=2_000_000, swap_rounds=3, ckpt_rounds=2),
    ("cuda", "full"): dict(size=250_000_000, swap_rounds=9, ckpt_rounds=3),
    ("cuda", "quick"): dict(size=10_000_000, swap_rounds=3, ckpt_rounds=2),
}


def _drop_cache(path: Path) -> None:
    """Evict ``path`` (a file or every file under a directory) from the page cache."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _fsync_file(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _host_views(ema) -> list[torch.Tensor]:
    """The shadow storages as flat host tensors (copied from the device when needed)."""
    flats = [g.flat for g in ema.store._groups]
    return [f.reshape(-1) if f.device.type == "cpu" else f.reshape(-1).cpu() for f in flats]


class Checkpointing:
    """The three writers and readers over the same EMA."""

    def __init__(self, ema, workdir: Path, device: torch.device):
        self.ema = ema
        self.device = device
        self.dir = workdir
        self.raw_path = workdir / "raw.bin"
        self.torch_path = workdir / "torch.pt"
        self.root = workdir / "shardema"
        self.nbytes = ema.shadow_bytes + ema.copied_bytes
        self.tensors = {ema.state_key(f, t): ema.shadow(f, t.key) for f in ema.target_factors for t in ema.tracked()}

    # writes
    def raw_write(self) -> None:
        with open(self.raw_path, "wb") as f:
            for flat in _host_views(self.ema):
                data = memoryview(flat.numpy()).cast("B")
                for i in range(0, len(data), BLOCK):
                    f.write(data[i:i + BLOCK])
            _fsync_file(f)
        _drop_cache(self.raw_path)

    def torch_write(self) -> None:
        with open(self.torch_path, "wb") as f:
            torch.save(self.tensors, f)
            _fsync_file(f)
        _drop_cache(self.torch_path)

    def ours_write(self) -> None:
        self.ema.save(self.root, "latest")
        _drop_cache(self.root)

    # reads (into memory the EMA already owns, where the method allows it)
    def raw_read(self) -> None:
        with open(self.raw_path, "rb", buffering=0) as f:
            for group in self.ema.store._groups:
                flat = group.flat.reshape(-1)
                host = flat if flat.device.type == "cpu" else torch.empty(flat.shape, dtype=flat.dtype)
                data = memoryview(host.numpy()).cast("B")
                for i in range(0, len(data), BLOCK):
                    f.readinto(data[i:i + BLOCK])
                if host is not flat:
                    flat.copy_(host)
        _drop_cache(self.raw_path)

    def torch_read(self) -> None:
        loaded = torch.load(self.torch_path, map_location=self.device, weights_only=True)
        with torch.no_grad():
            for key, value in loaded.items():
                self.tensors[key].copy_(value)
        _drop_cache(self.torch_path)

    def ours_read(self) -> None:
        tag = self.ema.resume(self.root, strict=True)
        assert tag == "latest", tag
        _drop_cache(self.root)


def _async_stalls(ck: Checkpointing, rounds: int) -> dict:
    """Per round: a blocking save, then an asynchronous one; how long each holds the caller.

    The asynchronous save's stall is the time until ``ema.save(..., blocking=False)``
    returns (staging the host copy into buffers kept from the previous one); the blocking
    save's is the whole save. Same bytes, same root, interleaved in each round, after one
    asynchronous save that allocates the staging buffers.
    """
    started = time.perf_counter()  # the first one allocates the host staging buffers: reported apart
    ck.ema.save(ck.root, "latest", blocking=False).wait()
    first = time.perf_counter() - started
    _drop_cache(ck.root)
    blocking, stall, total = [], [], []
    for _ in range(rounds):
        started = time.perf_counter()
        ck.ema.save(ck.root, "latest")
        blocking.append(time.perf_counter() - started)
        _drop_cache(ck.root)
        started = time.perf_counter()
        handle = ck.ema.save(ck.root, "latest", blocking=False)
        stall.append(time.perf_counter() - started)
        handle.wait()
        total.append(time.perf_counter() - started)
        _drop_cache(ck.root)
    per_round = sorted(s / b for s, b in zip(stall, blocking))
    return {"first_total_ms": round(1e3 * first, 1),
            "blocking_ms": [round(1e3 * v, 1) for v in blocking], "stall_ms": [round(1e3 * v, 1) for v in stall],
            "async_total_ms": [round(1e3 * v, 1) for v in total],
            "stall_over_blocking": {"median": round(statistics.median(per_round), 4), "min": round(per_round[0], 4),
                                    "max": round(per_round[-1], 4), "n": len(per_round)}}


def targets(cases: list[dict]) -> list[dict]:
    """The issue's goals for the swap and the checkpoint, met or not, with the cause of each miss."""
    out = []
    for c in cases:
        if c["phase"] == "swap" and c.get("swap_over_one_copy"):
            ratio = c["swap_over_one_copy"]["median"]
            out.append(C.target("swap in + out / one copy of the local shards", "<= 2.2", f"{ratio:.2f}",
                                ratio <= 2.2, "" if ratio <= 2.2 else "an in-place exchange reads and writes live "
                                "and shadow once each way: 4x the traffic of one copy is its floor"))
        if c["phase"] == "checkpoint":
            for key, name in (("save_fraction_of_raw", "save / raw fsynced write"),
                              ("load_fraction_of_raw", "resume / raw read")):
                ratio = c[key]["median"]
                out.append(C.target(name, ">= 0.9", f"{ratio:.2f}", ratio >= 0.9,
                                    "" if ratio >= 0.9 else "fixed costs of a save (lock, agreement, directory "
                                    "fsyncs, manifest) on small checkpoints; the checksum thread shares busy cores"))
            if c.get("async_save"):
                ratio = c["async_save"]["stall_over_blocking"]["median"]
                out.append(C.target("async save stall / blocking save", "< 1 (the caller only stages)",
                                    f"{ratio:.3f}", ratio < 1))
    return out


def _swap_clone(ema, params_and_shadows) -> None:
    with torch.no_grad():
        backup = [p.detach().clone() for p, _ in params_and_shadows]
        for p, s in params_and_shadows:
            p.detach().copy_(s)
        for (p, _), b in zip(params_and_shadows, backup):
            p.detach().copy_(b)


def _peak_extra(fn, device: torch.device) -> int | None:
    """Peak memory ``fn`` adds above what was in use when it started (bytes), or None if unmeasurable."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not C.peak_rss_reset():
        return None
    before = C.rss_bytes("VmRSS")
    fn()
    return max(0, C.rss_bytes("VmHWM") - before)


def run(args) -> dict:
    device = C.resolve_device(args.device)
    mode = "quick" if args.quick else "full"
    plan = dict(PLANS[(device.type, mode)])
    if args.size:
        plan["size"] = int(float(args.size))
    result = C.envelope("swap_checkpoint", mode, device, {**plan, "factors": FACTORS})
    model = C.build_model(plan["size"], "large", torch.float32, device)
    ema = shardema.ShardedEMA(model, FACTORS)
    meta = {"num_params": C.numel_of(model), "num_tensors": len(list(model.parameters()))}
    progress = not args.no_progress

    # ---------------------------------------------------------------- swap
    params_and_shadows = [(t.local(), ema.shadow(FACTORS[-1], t.key)) for t in ema.tracked()]
    infos = []

    def ours_swap():
        with ema.swapped(FACTORS[-1]) as info:
            pass
        infos.append(info)

    copies = [torch.empty_like(p) for p, _ in params_and_shadows]
    lives = [p for p, _ in params_and_shadows]
    methods = [C.Method(SWAP_OURS, ours_swap), C.Method(SWAP_CLONE, lambda: _swap_clone(ema, params_and_shadows)),
               C.Method(ONE_COPY, lambda: torch._foreach_copy_(copies, lives))]
    for m in methods:
        m.reps, _ = C.pick_reps(m.fn, device, 0.05 if mode == "quick" else 0.3)
    extra = {SWAP_OURS: _peak_extra(ours_swap, device),
             SWAP_CLONE: _peak_extra(lambda: _swap_clone(ema, params_and_shadows), device)}
    bar = C.tqdm_bar(plan["swap_rounds"], "swap", progress)
    rounds = C.interleave(methods, device, plan["swap_rounds"], progress=bar)
    bar.close()
    live_bytes = sum(p.numel() * p.element_size() for p, _ in params_and_shadows)
    info = infos[-1]
    swap_case = {"phase": "swap", **meta, "live_bytes": live_bytes, "rounds": rounds.num_rounds,
                 "methods": {m.name: C.method_stats(rounds.seconds[m.name], 2 * live_bytes, m.reps) for m in methods},
                 "clone_over_ours": C.ratio(rounds, SWAP_CLONE, SWAP_OURS),
                 # In and out, the exchange reads and writes live and shadow once each way: 4x the
                 # traffic of one copy (read + write once) is its floor.
                 "swap_over_one_copy": C.ratio(rounds, SWAP_OURS, ONE_COPY),
                 "swap_info": None if info is None else {"mode": info.mode, "extra_bytes": info.extra_bytes,
                                                         "scratch_bytes": info.exchange_buffer_bytes,
                                                         "backup_bytes": info.backup_bytes},
                 "measured_extra_bytes": extra,
                 "extra_bytes_model": {SWAP_OURS: None if info is None else info.extra_bytes, SWAP_CLONE: live_bytes}}
    result["cases"].append(swap_case)
    del methods
    copies.clear()
    infos.clear()
    gc.collect()

    # ---------------------------------------------------------------- checkpoint
    workdir = Path(tempfile.mkdtemp(prefix="shardema-bench-", dir=args.workdir))
    try:
        ck = Checkpointing(ema, workdir, device)
        writes = [C.Method(RAW_W, ck.raw_write), C.Method(TORCH_W, ck.torch_write), C.Method(OURS_W, ck.ours_write)]
        reads = [C.Method(RAW_R, ck.raw_read), C.Method(TORCH_R, ck.torch_read), C.Method(OURS_R, ck.ours_read)]
        for m in writes + reads:  # warm up: creates the files the reads need
            m.fn()
        bar = C.tqdm_bar(2 * plan["ckpt_rounds"], "checkpoint", progress)
        w_rounds = C.interleave(writes, device, plan["ckpt_rounds"], progress=bar)
        r_rounds = C.interleave(reads, device, plan["ckpt_rounds"], progress=bar)
        bar.close()
        stalls = _async_stalls(ck, plan["ckpt_rounds"])
        sizes = {RAW_W: ck.raw_path.stat().st_size, TORCH_W: ck.torch_path.stat().st_size,
                 OURS_W: sum(p.stat().st_size for p in ck.root.rglob("*") if p.is_file())}
        result["cases"].append({
            "phase": "checkpoint", **meta, "bytes": ck.nbytes, "file_bytes": sizes, "rounds": w_rounds.num_rounds,
            "methods": {**{m.name: C.method_stats(w_rounds.seconds[m.name], ck.nbytes, 1) for m in writes},
                        **{m.name: C.method_stats(r_rounds.seconds[m.name], ck.nbytes, 1) for m in reads}},
            "save_fraction_of_raw": C.ratio(w_rounds, RAW_W, OURS_W),
            "save_over_torch_save": C.ratio(w_rounds, OURS_W, TORCH_W),
            "load_fraction_of_raw": C.ratio(r_rounds, RAW_R, OURS_R),
            "load_over_torch_load": C.ratio(r_rounds, OURS_R, TORCH_R),
            "async_save": stalls,
        })
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["targets"] = targets(result["cases"])
    return result


def markdown(result: dict) -> str:
    parts = []
    for c in result["cases"]:
        m = c["methods"]
        if c["phase"] == "swap":
            ours_extra = c["swap_info"]["extra_bytes"] if c["swap_info"] else None
            measured = c["measured_extra_bytes"]
            mib = lambda v: "n/a" if v is None else f"{v / 2**20:.1f}"  # noqa: E731
            rows = [[SWAP_OURS, f"{m[SWAP_OURS]['median_ms']:.1f}", f"{m[SWAP_OURS]['min_ms']:.1f}",
                     mib(ours_extra), mib(measured[SWAP_OURS]), c["swap_info"]["mode"] if c["swap_info"] else ""],
                    [SWAP_CLONE, f"{m[SWAP_CLONE]['median_ms']:.1f}", f"{m[SWAP_CLONE]['min_ms']:.1f}",
                     mib(c["live_bytes"]), mib(measured[SWAP_CLONE]), "full clone"],
                    [ONE_COPY, f"{m[ONE_COPY]['median_ms']:.1f}", f"{m[ONE_COPY]['min_ms']:.1f}", "", "",
                     "reference: the live shards copied once"]]
            parts.append(f"**Swap in and out, {c['num_params']:,} fp32 parameters ({c['live_bytes'] / 2**20:.0f} "
                         f"MiB live)**; clone-and-restore / shardema time per round: "
                         f"{C.fmt_ratio(c['clone_over_ours'])}; shardema in + out / one copy of the local shards: "
                         f"{C.fmt_ratio(c.get('swap_over_one_copy'))} (floor 4: live and shadow are each read and "
                         "written once each way)\n\n" + C.md_table(
                             ["method", "median ms", "min ms", "extra MiB (accounted)", "extra MiB (measured peak)",
                              "mode"], rows))
        else:
            rows = []
            for name in (RAW_W, TORCH_W, OURS_W, RAW_R, TORCH_R, OURS_R):
                rows.append([name, f"{m[name]['median_ms']:.0f}", f"{m[name]['min_ms']:.0f}", m[name]["gbps"],
                             m[name]["gbps_best"]])
            parts.append(f"**Checkpoint of {c['bytes'] / 2**20:.0f} MiB of shadows ({len(result['config']['factors'])}"
                         f" factors)**: save at {C.fmt_ratio(c['save_fraction_of_raw'])} of the raw write speed, "
                         f"load at {C.fmt_ratio(c['load_fraction_of_raw'])} of the raw read speed (per-round "
                         "ratios; every write fsynced, reads from disk)\n\n" + C.md_table(
                             ["method", "median ms", "min ms", "GB/s (median)", "GB/s (best)"], rows))
            if c.get("async_save"):
                a = c["async_save"]
                parts.append(f"**Asynchronous save** (`ema.save(root, tag, blocking=False)`), per round after a "
                             f"blocking save of the same bytes: the caller is held {a['stall_ms']} ms (staging "
                             f"the host copy) against {a['blocking_ms']} ms for the blocking save; the background "
                             f"write commits after {a['async_total_ms']} ms. Stall / blocking: "
                             f"{a['stall_over_blocking']['median']:.3f} (median of {a['stall_over_blocking']['n']}"
                             f" rounds). The first asynchronous save, which allocates the staging buffers, took "
                             f"{a.get('first_total_ms', 'n/a')} ms in all\n")
    if result.get("targets"):
        parts.append("**Targets**\n\n" + C.targets_md(result["targets"]))
    return "\n".join(parts)


def plots(result: dict, out_dir: Path) -> list[str]:
    ck = [c for c in result["cases"] if c["phase"] == "checkpoint"]
    if not ck:
        return []
    names = [RAW_W, TORCH_W, OURS_W, RAW_R, TORCH_R, OURS_R]
    return _plots.bars(out_dir, "swap_checkpoint.png", names,
                       [_plots.Series([ck[0]["methods"][n]["gbps"] for n in names],
                                      color=["grey", "tab:orange", "tab:blue"] * 2)],
                       figsize=(8, 4), tick_style=_plots.SLANTED, ylabel="GB/s (median over rounds)",
                       title="Checkpoint throughput (writes fsynced; reads from disk)")


def main(argv=None) -> int:
    parser = C.bench_parser(__doc__)
    parser.add_argument("--size", default="", help="parameter count, e.g. 100e6")
    parser.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp dir)")
    return C.measure_or_render(parser.parse_args(argv), "swap_checkpoint", run, plots, markdown)


if __name__ == "__main__":
    sys.exit(main())
