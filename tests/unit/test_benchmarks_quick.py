"""The benchmark suite's --quick mode runs end to end and writes the documented result files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


def _timing_ok(stats: dict) -> None:
    assert TIMING_KEYS <= set(stats)
    assert 0 < stats["min_ms"] <= stats["median_ms"] < 60_000
    assert stats["reps"] >= 1 and len(stats["rounds_ms"]) >= 1


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
    assert sum(r["seconds"] for r in summary["runs"].values()) < 120, summary["runs"]
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
        for stats in case["methods"].values():
            _timing_ok(stats)
        assert "shardema" in case["methods"] and "roofline" in case["methods"]
        _spread_ok(case["roofline_fraction"])
        if case["phase"] == "k1_peers":
            # peers that need nothing beyond torch are always there
            assert {"AveragedModel foreach", "AveragedModel per-param", "noether-style mul+add"} <= set(case["peers"])
            for peer in case["peers"]:
                _spread_ok(case["ratios"][f"shardema/{peer}"])
            assert case["fastest_peer"] in case["peers"]
            assert all(isinstance(reason, str) and reason for reason in case["unavailable"].values())
        if case["phase"] == "fused_vs_separate":
            _spread_ok(case["fused_over_separate"])
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
        for name in ("shardema", "gather-then-update", "roofline lerp_"):
            assert 0 < case["methods"][name]["median_ms_slowest_rank"] < 60_000
        _spread_ok(case["gather_over_ours"])
    assert result["targets"][0]["met"] is True


@pytest.mark.timeout(200)
def test_quick_swap_and_checkpoint_values_are_sane(quick_results):
    result = json.loads((quick_results / "swap_checkpoint.json").read_text())
    swap, ckpt = (next(c for c in result["cases"] if c["phase"] == p) for p in ("swap", "checkpoint"))
    for stats in swap["methods"].values():
        _timing_ok(stats)
    assert swap["swap_info"]["mode"] == "in_place"
    assert 0 < swap["swap_info"]["extra_bytes"] <= swap["live_bytes"]
    assert swap["extra_bytes_model"]["clone-and-restore"] == swap["live_bytes"]
    assert ckpt["bytes"] == swap["live_bytes"] * len(result["config"]["factors"])
    assert ckpt["file_bytes"]["raw sequential write"] == ckpt["bytes"]
    for name, stats in ckpt["methods"].items():
        _timing_ok(stats)
        assert stats["gbps"] > 0, name
    for key in ("save_fraction_of_raw", "load_fraction_of_raw", "save_over_torch_save", "load_over_torch_load"):
        _spread_ok(ckpt[key])
