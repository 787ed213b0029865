"""The bench harness end to end on a tiny random DiT: every family runs, compute is measured the
same way for all, and the report is strict JSON with its figures."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("torchmetrics")
pytest.importorskip("matplotlib")

from smoothcache import Schedule
from smoothcache.demo.bench_compare import compare_at_speed, interpolate_families
from smoothcache.demo.bench_harness import BenchConfig, Row, run_bench
from smoothcache.demo.bench_model import (
    BenchModelConfig,
    build_bench_pipeline,
    build_bench_transformer,
    tiny_bench,
)

STEPS = 4


def reject_constant(name: str) -> float:
    raise AssertionError(f"report.json holds {name}: not strict JSON")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pipe, scorer = tiny_bench()
    config = BenchConfig(samplers=(f"ddim-{STEPS}",), samples_per_class=1, calibration_per_class=1, timing_per_class=1,
                         budgets=(0.5,), timing_repeats=1, compiled=False, few_settings=True, progress=False)
    out = tmp_path_factory.mktemp("bench")
    run_bench(pipe, scorer, config, out)
    return json.loads((out / "report.json").read_text(), parse_constant=reject_constant), out


def rows_of(report, family):
    return [r for r in report["samplers"][f"ddim-{STEPS}"]["rows"] if r["family"] == family]


def test_every_family_runs_and_is_timed(report):
    data, out = report
    rows = data["samplers"][f"ddim-{STEPS}"]["rows"]
    families = {r["family"] for r in rows}
    expected = {"fewer steps", "smoothcache layers, paper's greedy", "smoothcache layers, optimal",
                "smoothcache layers, optimal + forecast", "smoothcache layers, per-block", "smoothcache blocks, optimal",
                "smoothcache blocks + forecast", "smoothcache tune (blocks + forecast)",
                "smoothcache fewer steps + blocks + forecast (split_steps)", "FORA (fixed interval, attn1+ff)",
                "diffusers FirstBlockCache", "diffusers MagCache (calibrated)", "diffusers TaylorSeer (attn1+ff)",
                "diffusers PyramidAttentionBroadcast", "diffusers FasterCache (attention)"}
    assert expected <= families
    for row in rows:
        assert row["error"] is None, row
        assert 0 < row["compute_fraction"] <= 1 and row["speedup_eager"] > 0, row
        assert row["psnr"] is None or row["psnr"] > 0, row  # null: identical to uncached (infinite PSNR)
    for name in ("pareto-ddim-4.png", "samples-ddim-4.png"):
        assert (out / name).stat().st_size > 0


def test_compute_is_measured_not_declared(report):
    data, _ = report
    fewer = {r["setting"]: r["compute_fraction"] for r in rows_of(data, "fewer steps")}
    assert fewer == {"2 steps": pytest.approx(2 / STEPS)}
    fora = rows_of(data, "FORA (fixed interval, attn1+ff)")
    every_2 = next(r for r in fora if r["setting"] == "every 2")
    planned = Schedule.fixed_interval(["attn1", "ff"], STEPS, 2).compute_fraction()
    assert every_2["compute_fraction"] == pytest.approx(planned)
    (split,) = rows_of(data, "smoothcache fewer steps + blocks + forecast (split_steps)")
    assert split["compute_fraction"] <= 0.5 + 1e-9  # fewer steps and the cache together keep to the budget
    for family in ("smoothcache blocks, optimal", "smoothcache layers, optimal"):
        (row,) = rows_of(data, family)
        assert row["compute_fraction"] <= 0.5 + 1e-9
        assert row["ideal_speedup"] == pytest.approx(1 / row["compute_fraction"])


def test_the_uncached_run_is_the_quality_reference(report):
    data, _ = report
    result = data["samplers"][f"ddim-{STEPS}"]
    assert result["uncached"]["accuracy"] >= 0 and math.isfinite(result["uncached"]["fd_clf"])
    assert set(result["flop_shares"]) == {"attn1", "ff"}
    assert sum(result["flop_shares"].values()) == pytest.approx(1)


@pytest.mark.skipif(importlib.util.find_spec("cache_dit") is None, reason="cache-dit not installed")
def test_cache_dit_runs_where_installed(report):
    data, _ = report
    assert rows_of(data, "cache-dit DBCache F8B0") and rows_of(data, "cache-dit DBCache F1B0 static mask")


def test_the_cli_table_shows_every_row(report):
    from smoothcache.cli import bench_table, build_parser

    data, _ = report
    table = bench_table(data)
    for row in data["samplers"][f"ddim-{STEPS}"]["rows"]:
        assert row["family"][:40] in table
    args = build_parser().parse_args(["demo", "--model", "bench", "--samplers", "ddim-10", "--samples-per-class", "2"])
    assert (args.model, args.samplers, args.samples_per_class) == ("bench", ["ddim-10"], 2)


def test_comparisons_read_each_family_at_the_target_speed():
    rows = [
        {"family": "smoothcache blocks", "setting": "a", "speedup_eager": 1.0, "psnr": 50.0, "error": None},
        {"family": "smoothcache blocks", "setting": "b", "speedup_eager": 3.0, "psnr": 30.0, "error": None},
        {"family": "fewer steps", "setting": "c", "speedup_eager": 1.95, "psnr": 45.0, "error": None},
        {"family": "fewer steps", "setting": "d", "speedup_eager": 2.05, "psnr": 35.0, "error": None},
        {"family": "peer", "setting": "e", "speedup_eager": 2.0, "psnr": 99.0, "error": "it failed"},
    ]
    (at_two,) = interpolate_families(rows, "speedup_eager", targets=(2.0,))
    assert at_two["smoothcache"] == {"family": "smoothcache blocks", "psnr": pytest.approx(40.0)}
    assert at_two["best_other"] == {"family": "fewer steps", "psnr": pytest.approx(40.0)}
    (at_four,) = interpolate_families(rows, "speedup_eager", targets=(4.0,))  # never extrapolated
    assert at_four["smoothcache"] is None and at_four["margin"] is None
    (near,) = compare_at_speed(rows, "speedup_eager", targets=(2.0,))  # measured rows within 5%: c and d
    assert near["smoothcache"] is None and near["best_other"]["setting"] == "c"


def test_a_sampler_name_says_its_kind_and_steps():
    assert BenchConfig.steps_of("dpm++-20") == 20
    for bad in ("ddim", "euler-20", "ddim-1", "ddim-x"):
        with pytest.raises(ValueError, match="<kind>-<steps>"):
            BenchConfig.steps_of(bad)


def test_the_compiled_pass_times_its_rows_and_survives_a_method_that_fails(monkeypatch):
    """The compiled pass's control flow, with compilation itself replaced by nothing (a CPU)."""
    import statistics
    import time

    from smoothcache.demo.bench_harness import BenchRun
    from smoothcache.demo.bench_methods import Method

    torch.manual_seed(0)
    pipe = build_bench_pipeline(build_bench_transformer(BenchModelConfig(depth=2, hidden_size=16, num_heads=2)).eval())
    pipe.set_progress_bar_config(disable=True)
    config = BenchConfig(samplers=("ddim-3",), timing_per_class=1, timing_repeats=2, progress=False)
    run = BenchRun(pipe, None, config, "ddim-3", time.perf_counter(), lambda figures=True: None)
    monkeypatch.setattr(pipe.transformer, "compile", lambda **kwargs: None)
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))

    def broken(pipe):
        raise RuntimeError("cannot attach")

    run.methods = [Method("fewer steps", "2 steps", lambda p: (lambda: None), steps=2, compiles=True),
                   Method("diffusers broken", "x", broken, compiles=True),
                   Method("FORA (fixed interval, attn1+ff)", "every 2", lambda p: (lambda: None), compiles=True),
                   Method("not compiled", "y", lambda p: (lambda: None))]
    run.rows = [Row(m.family, m.setting) for m in run.methods]
    run.time_compiled()
    fewer, failed, fora, skipped = run.rows
    assert len(fewer.compiled_ratios) == len(fewer.compiled_seconds) == 2 and fewer.speedup_compiled > 0
    uncached = statistics.median(run.result["uncached_seconds_compiled"])  # one reference for every row
    assert fewer.compiled_ratios == [uncached / t for t in fewer.compiled_seconds]
    assert failed.compiled_error == "RuntimeError: cannot attach" and failed.error is None
    assert fora.speedup_compiled > 0  # the failure ended only its own row
    assert skipped.compiled_ratios == []
    assert len(marks) >= 3 + 2 * (2 + 2 + 2)  # every compiled call is its own CUDA graph step
