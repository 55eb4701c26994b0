"""The benchmark suite's --quick mode runs end to end and writes the documented result files.

Besides the format, the checks recompute from raw data in the result files: the EMA
values after the timed updates (see [Note: EMA value check] in benchmarks/_common.py),
and every reported ratio and median from the per-round times it summarises.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
RUN_ALL = REPO / "benchmarks" / "run_all.py"
TOP_KEYS = {"schema_version", "benchmark", "mode", "device", "machine", "config", "cases", "targets", "notes", "plots"}
MACHINE_KEYS = {"date", "date_utc", "platform", "python", "torch", "cpu_model", "cpus", "torch_threads", "memory_gib",
                "load_average", "load_average_end", "device"}
SPREAD_KEYS = {"median", "q25", "q75", "min", "max", "n"}
TIMING_KEYS = {"median_ms", "min_ms", "reps", "rounds_ms"}


def _spread_ok(stats: dict) -> None:
    assert SPREAD_KEYS <= set(stats)
    assert stats["n"] >= 1
    assert 0 < stats["min"] <= stats["q25"] <= stats["median"] <= stats["q75"] <= stats["max"] < 1e4


def _ratio_ok(stats: dict, numerator_ms: list[float], denominator_ms: list[float]) -> None:
    """``stats`` summarises the per-round ratios of the two lists of per-round times."""
    _spread_ok(stats)
    assert stats["n"] == len(numerator_ms) == len(denominator_ms)
    ratios = [a / b for a, b in zip(numerator_ms, denominator_ms)]
    # times are rounded to 0.001 ms in the file, the summary to 1e-4
    slack = max(r * (5e-4 / a + 5e-4 / b) for r, a, b in zip(ratios, numerator_ms, denominator_ms)) + 1e-4
    expected = {"min": min(ratios), "max": max(ratios), "median": float(np.median(ratios)),
                "q25": float(np.percentile(ratios, 25)), "q75": float(np.percentile(ratios, 75))}
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value, abs=slack), (key, stats, ratios)


def _timing_ok(stats: dict, rounds: int | None = None, nbytes: int | None = None) -> None:
    """Median and minimum are those of the per-round times; GB/s is ``nbytes`` over the median."""
    assert TIMING_KEYS <= set(stats)
    assert 0 < stats["min_ms"] <= stats["median_ms"] < 60_000
    assert stats["reps"] >= 1 and len(stats["rounds_ms"]) >= 1
    if rounds is not None:
        assert len(stats["rounds_ms"]) == rounds
    assert stats["min_ms"] == min(stats["rounds_ms"])
    assert stats["median_ms"] == pytest.approx(float(np.median(stats["rounds_ms"])), abs=1e-3)
    if nbytes is not None:
        # gbps is rounded to 0.01 (error <= 0.005) and computed from the unrounded median, which the
        # file rounds to 0.001 ms (relative error <= 5e-4 / median_ms): the two bounds add up
        expected = nbytes / stats["median_ms"] / 1e6
        tolerance = 0.005 + expected * 5e-4 / stats["median_ms"] + 1e-6
        assert stats["gbps"] == pytest.approx(expected, rel=0, abs=tolerance)


def _ema_ok(check: dict) -> None:
    """The EMA after the timed updates is the one recomputed from its start and the live values.

    With live weights ``w`` held during ``n`` updates of decay ``f``, a shadow that started
    at ``w0`` is ``w + f**n * (w0 - w)``. The benchmark negated the live weights after
    building the EMA, so the result is far from both ``w0`` (an update that does nothing)
    and ``w`` (one that copies).
    """
    n = check["updates"]
    assert n >= 3 and check["initial"] and len(check["live"]) == len(check["initial"])
    assert len(check["shadows"]) == len(check["factors"])
    for f, shadows in zip(check["factors"], check["shadows"]):
        assert len(shadows) == len(check["initial"])
        discriminates = False
        for i, (w0, w, s) in enumerate(zip(check["initial"], check["live"], shadows)):
            expected = w + f**n * (w0 - w)
            tol = 4 * (n + 1) * 2.0**-24 * max(abs(w0), abs(w)) + 1e-12  # fp32 rounding of n lerps
            assert abs(s - expected) <= tol, (
                f"factor {f}, element {i} of {check['tensors']}: EMA {s!r} after {n} updates, expected {expected!r} "
                f"(start {w0!r}, live {w!r})")
            discriminates |= abs(w0 - expected) > 100 * tol and abs(w - expected) > 100 * tol
        assert discriminates, f"factor {f}: the sampled values cannot tell an EMA update from none"


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, str(RUN_ALL), "--quick", "--out", str(out), "--no-docs", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, f"run_all.py --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out


@pytest.mark.timeout(200)
def test_quick_suite_writes_every_result_file(quick_results):
    summary = json.loads((quick_results / "summary.json").read_text())
    assert summary["mode"] == "quick"
    assert set(summary["runs"]) == {"update_latency", "sharded", "swap_checkpoint"}
    assert all(r["exit"] == 0 for r in summary["runs"].values())
    for name in summary["runs"]:
        result = json.loads((quick_results / f"{name}.json").read_text())
        assert TOP_KEYS <= set(result), name
        assert result["schema_version"] == 1 and result["benchmark"] == name and result["mode"] == "quick"
        assert MACHINE_KEYS <= set(result["machine"])
        assert result["cases"], name
        for target in result["targets"]:
            assert {"name", "target", "measured", "met", "note"} <= set(target)
        table = (quick_results / f"{name}.md").read_text()
        assert "|---|" in table
        for png in result["plots"]:
            assert (quick_results / png).stat().st_size > 1000


@pytest.mark.timeout(200)
def test_quick_update_latency_values_are_sane(quick_results):
    result = json.loads((quick_results / "update_latency.json").read_text())
    phases = {c["phase"] for c in result["cases"]}
    assert phases == {"k1_peers", "fused_vs_separate", "bf16_live"}
    for case in result["cases"]:
        assert "skipped" not in case, case
        n = case["num_params"]
        expected = {"float32": 4, "bfloat16": 2}[case["live_dtype"]] + 8 * case["num_factors"]
        assert case["bytes_per_update"] == expected * n
        methods = case["methods"]
        for stats in methods.values():
            _timing_ok(stats, case["rounds"], case["bytes_per_update"])
        ms = {name: stats["rounds_ms"] for name, stats in methods.items()}
        # the round's roofline is the faster of the all-threads and one-thread lerp_ (when both ran)
        lerps = [ms[name] for name in ("roofline lerp_ (all threads)", "roofline lerp_ (1 thread)") if name in ms]
        assert lerps and ms["roofline"] == [min(values) for values in zip(*lerps)]
        _ratio_ok(case["roofline_fraction"], ms["roofline"], ms["shardema"])
        check = case["ema_check"]
        assert check["factors"] == result["config"]["factors"][:case["num_factors"]]
        assert check["updates"] >= methods["shardema"]["reps"] * case["rounds"]
        _ema_ok(check)
        if case["phase"] == "k1_peers":
            # peers that need nothing beyond torch are always there
            assert {"AveragedModel foreach", "AveragedModel per-param", "noether-style mul+add"} <= set(case["peers"])
            for peer in case["peers"]:
                _ratio_ok(case["ratios"][f"shardema/{peer}"], ms["shardema"], ms[peer])
            assert case["fastest_peer"] in case["peers"]
            assert case["ours_vs_fastest_peer"]["median"] == max(
                case["ratios"][f"shardema/{peer}"]["median"] for peer in case["peers"])
            assert all(isinstance(reason, str) and reason for reason in case["unavailable"].values())
        if case["phase"] == "fused_vs_separate":
            _ratio_ok(case["fused_over_separate"], ms["shardema"], ms["K separate K=1"])
            k = case["num_factors"]
            assert case["predicted_fused_over_separate"] == pytest.approx((4 + 8 * k) / (12 * k), abs=1e-4)
    assert all(t["met"] is None for t in result["targets"])  # quick mode does not judge targets


@pytest.mark.timeout(200)
def test_quick_update_latency_updates_are_checked_against_float64(quick_results):
    """The timed updates never see the live weights change; each case also checks one update that does."""
    result = json.loads((quick_results / "update_latency.json").read_text())
    for case in result["cases"]:
        check = case["check"]
        assert check["numel"] > 0 and check["max_abs_error"] <= check["tolerance"] <= 1e-5, (case["phase"], check)
        assert check["ok"] is True


@pytest.mark.timeout(200)
def test_quick_sharded_memory_is_exactly_one_over_w(quick_results):
    result = json.loads((quick_results / "sharded.json").read_text())
    cases = {c["world_size"]: c for c in result["cases"]}
    assert set(cases) == {1, 2}
    full = cases[1]["ema_bytes_per_rank"][0]
    assert full == cases[1]["num_params"] * 4  # one fp32 factor
    for w, case in cases.items():
        assert case["exactly_one_over_w"] is True
        assert case["ema_bytes_per_rank"] == [full // w] * w
        assert sum(case["local_numel_per_rank"]) == case["num_params"]
        assert case["baseline_bytes_per_rank"] == [full] * w  # the gathering baseline keeps a full replica
        ms = {}
        for name in ("shardema", "gather-then-update", "roofline lerp_"):
            stats = case["methods"][name]
            ms[name] = stats["rounds_ms_slowest_rank"]
            assert len(ms[name]) == case["rounds"]
            assert 0 < stats["median_ms_slowest_rank"] < 60_000
            assert stats["median_ms_slowest_rank"] == pytest.approx(float(np.median(ms[name])), abs=1e-3)
            assert stats["min_ms_slowest_rank"] == min(ms[name])
        _ratio_ok(case["gather_over_ours"], ms["gather-then-update"], ms["shardema"])
        _ratio_ok(case["roofline_fraction"], ms["roofline lerp_"], ms["shardema"])
        assert len(case["ema_check_per_rank"]) == w
        for check in case["ema_check_per_rank"]:  # each rank's own shards, updated without communication
            assert check["factors"] == [result["config"]["factor"]]
            _ema_ok(check)
    assert result["targets"][0]["met"] is True


@pytest.mark.timeout(200)
def test_quick_swap_and_checkpoint_values_are_sane(quick_results):
    result = json.loads((quick_results / "swap_checkpoint.json").read_text())
    swap, ckpt = (next(c for c in result["cases"] if c["phase"] == p) for p in ("swap", "checkpoint"))
    for stats in swap["methods"].values():
        _timing_ok(stats, swap["rounds"], 2 * swap["live_bytes"])
    swap_ms = {name: stats["rounds_ms"] for name, stats in swap["methods"].items()}
    _ratio_ok(swap["clone_over_ours"], swap_ms["clone-and-restore"], swap_ms["shardema swapped"])
    assert swap["swap_info"]["mode"] == "in_place"
    assert 0 < swap["swap_info"]["extra_bytes"] <= swap["live_bytes"]
    assert swap["extra_bytes_model"]["clone-and-restore"] == swap["live_bytes"]
    assert ckpt["bytes"] == swap["live_bytes"] * len(result["config"]["factors"])
    assert ckpt["file_bytes"]["raw sequential write"] == ckpt["bytes"]
    for name, stats in ckpt["methods"].items():
        _timing_ok(stats, ckpt["rounds"], ckpt["bytes"])
        assert stats["gbps"] > 0, name
    ms = {name: stats["rounds_ms"] for name, stats in ckpt["methods"].items()}
    _ratio_ok(ckpt["save_fraction_of_raw"], ms["raw sequential write"], ms["shardema ema.save"])
    _ratio_ok(ckpt["save_over_torch_save"], ms["shardema ema.save"], ms["torch.save"])
    _ratio_ok(ckpt["load_fraction_of_raw"], ms["raw sequential read"], ms["shardema ema.resume"])
    _ratio_ok(ckpt["load_over_torch_load"], ms["shardema ema.resume"], ms["torch.load"])
