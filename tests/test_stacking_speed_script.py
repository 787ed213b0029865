"""benchmarks/stacking_speed.py on the CPU with its tiny DiT (eager, and dynamo without inductor):
every part runs through the script's own path (diffusers' DiTPipeline, torchao int8 weights,
smoothcache's kept-output forms, calibration) and the result JSON holds what the GPU run will be
judged by; part a times each cell's methods in turn, compiled once, without recompiling."""

from __future__ import annotations

import importlib
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
stacking_speed = importlib.import_module("stacking_speed")

METHODS = ("uncached", "smoothcache blocks", "smoothcache layers")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_script(*args: str) -> dict[str, Any]:
    """The script's main, in this process; dynamo's limits, which it raises, are put back."""
    config = torch._dynamo.config
    limits = {name: getattr(config, name) for name in ("recompile_limit", "accumulated_recompile_limit")}
    try:
        path = stacking_speed.main(list(args))
    finally:
        for name, value in limits.items():
            setattr(config, name, value)
    assert path.with_suffix(".png").read_bytes().startswith(PNG_MAGIC)
    return json.loads(path.read_text())


def positive(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def rows_of(result: dict[str, Any], part: str, **match: Any) -> list[dict[str, Any]]:
    return [r for r in result["rows"] if r["part"] == part and all(r.get(k) == v for k, v in match.items())]


def check_quantized_speed(result: dict[str, Any]) -> None:
    """Part a: every method timed for unquantized and int8 weights, int8's speedups compared; float8 skipped off the GPU."""
    for weights in ("fp16", "int8"):
        rows = rows_of(result, "a", weights=weights)
        assert [r["method"] for r in rows] == list(METHODS)
        for row in rows:
            assert "error" not in row and "skipped" not in row, row
            assert positive(row["ms"]) and positive(row["speedup"]) and len(row["runs_ms"]) == 1
            assert row["timing"] == "interleaved"
        assert rows[0]["speedup"] == 1.0 and rows[0]["max_abs_diff_vs_uncached"] == 0.0
        for row in rows[1:]:  # the caches reuse, and hold what they reuse
            assert row["max_abs_diff_vs_uncached"] > 0 and row["kept_device_mib"] > 0
    for row in rows_of(result, "a", weights="int8")[1:]:
        assert positive(row["speedup_ratio"]) and row["unquantized_speedup"] > 0
        assert row["within_5_percent"] == (row["speedup_ratio"] >= 0.95)
    float8 = rows_of(result, "a", weights="float8")
    assert len(float8) == len(METHODS) and all("compute capability 8.9" in r["skipped"] for r in float8)
    assert all(r["timing"] == "interleaved" for r in float8)  # skipped whole, as a cell


def check_kept_forms(result: dict[str, Any]) -> None:
    """Part b: float8 kept outputs hold a quarter of float32's bytes and cost only rounding; the host form is skipped on the CPU."""
    uncached = rows_of(result, "b", method="uncached")
    assert len(uncached) == 1 and positive(uncached[0]["ms"])
    for method in ("smoothcache layers", "smoothcache blocks"):
        default, float8, host = (rows_of(result, "b", method=method, kept=kept)[0] for kept in ("default", "float8_e4m3fn", "cpu"))
        for row in (default, float8):
            assert positive(row["ms"]) and positive(row["speedup"]) and row["psnr_db_vs_uncached"] > 0
        assert default["max_abs_diff_vs_default_kept"] == 0.0 and default["device_kept_fraction"] == 1.0
        assert float8["device_kept_fraction"] == 0.25 and float8["halves_cache_memory"]
        assert float8["kept_bytes_by_device"]["cpu"] * 4 == default["kept_bytes_by_device"]["cpu"] > 0
        assert float8["max_abs_diff_vs_default_kept"] > 0  # reuses rounded
        assert "moves nothing" in host["skipped"]  # the CPU is where the model computes


def check_calibration(result: dict[str, Any]) -> None:
    """Part c: an uncached call and one calibration per components and lookahead, no GPU peak off the GPU."""
    rows = rows_of(result, "c")
    assert [(r["method"], r.get("components"), r.get("lookahead"), r.get("layer_groups")) for r in rows] == [
        ("uncached", None, None, None)] + [
        ("calibration", name, k, groups) for name in ("layers", "blocks") for k, groups in ((1, None), (2, None), (3, None), (3, 2))
    ]
    for row in rows:
        assert positive(row["seconds"]) and row["peak_mib"] is None and "no CUDA GPU" in row["peak_not_measured"]
    assert all(r["profile_layers"] > 0 for r in rows[1:])
    by_groups = {(r["components"], r.get("layer_groups")): r["history_peak_mib"] for r in rows[1:] if r["lookahead"] == 3}
    for name in ("layers", "blocks"):  # two groups hold about half the history
        assert 0 < by_groups[(name, 2)] <= 0.6 * by_groups[(name, None)]


def test_every_part_runs_on_the_tiny_dit_and_records_what_the_gpu_run_is_judged_by(tmp_path):
    pytest.importorskip("torchao")
    result = run_script("--tiny", "--device", "cpu", "--compile", "eager", "--out", str(tmp_path))
    assert result["settings"]["parts"] == ["a", "b", "c"] and result["versions"]["torchao"]
    check_quantized_speed(result)
    check_kept_forms(result)
    check_calibration(result)


def cells_of(result: dict[str, Any]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Part a's rows by (weights, compile), in the order written."""
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows_of(result, "a"):
        cells.setdefault((row["weights"], row["compile"]), []).append(row)
    return cells


def test_part_a_times_a_cells_methods_in_turn_against_its_own_uncached_row_without_recompiling(tmp_path):
    result = run_script("--tiny", "--device", "cpu", "--parts", "a", "--compile", "eager", "compile", "--weights", "fp16",
                        "--repeats", "3", "--out", str(tmp_path))
    assert "interleaved" in result["settings"]["timing"]["a"]
    cells = cells_of(result)
    assert list(cells) == [("fp16", "eager"), ("fp16", "compile")]
    for (_, compile_mode), rows in cells.items():
        assert [r["method"] for r in rows] == list(METHODS)
        for row in rows:
            assert "error" not in row and "skipped" not in row, row
            assert row["timing"] == "interleaved" and len(row["runs_ms"]) == 3 == len(row["runs_at_s"])
            assert row["ms"] == pytest.approx(statistics.median(row["runs_ms"]))
            assert row["speedup"] == pytest.approx(rows[0]["ms"] / row["ms"])  # this cell's uncached row
            assert row["warmup_generations"] == (2 if compile_mode == "compile" else 1)
        # in turn, one timed generation each per round, each round starting one method later
        # (the warm-up rounds, 1 or 2, shift where the timed ones start)
        starts = sorted((start, row["method"]) for row in rows for start in row["runs_at_s"])
        shift = row["warmup_generations"]
        expected = [list(METHODS)[(r + shift + i) % 3] for r in range(3) for i in range(3)]
        assert [method for _, method in starts] == expected
        for row in rows[1:]:  # each cache on for its own turns: it reused, and kept what it reuses
            assert row["max_abs_diff_vs_uncached"] > 0 and row["kept_device_mib"] > 0
            assert "handle.enable() before each of its generations" in row["how"]
    eager, compiled = cells[("fp16", "eager")], cells[("fp16", "compile")]
    for row in compiled:  # each method compiled its own graphs in the warm-up; switching caches recompiles nothing
        assert row["graphs_compiled_in_warmup"] >= 1 and row["recompiles_while_timed"] == 0
        assert row["how"].startswith("pipe.transformer = torch.compile(pipe.transformer, backend='eager')")
    assert all(r["graphs_compiled_in_warmup"] == 0 for r in eager)
    for plain, traced in zip(eager[1:], compiled[1:], strict=True):  # the same schedules, compiled or not
        assert traced["max_abs_diff_vs_uncached"] == pytest.approx(plain["max_abs_diff_vs_uncached"], rel=1e-4)


def test_a_cell_past_the_time_budget_is_skipped_whole(tmp_path, monkeypatch):
    checked: list[bool] = []

    def over_budget(run: Any) -> bool:  # the first cell starts in time, the second does not
        checked.append(bool(checked))
        return checked[-1]

    monkeypatch.setattr(stacking_speed.Run, "over_budget", over_budget)
    result = run_script("--tiny", "--device", "cpu", "--parts", "a", "--compile", "eager", "compile", "--weights", "fp16",
                        "--out", str(tmp_path))
    assert checked == [False, True]  # asked once per cell, not per row
    measured, late = cells_of(result).values()
    assert all("ms" in r and "skipped" not in r for r in measured)
    assert [r["method"] for r in late] == list(METHODS)
    assert all(r["compile"] == "compile" and r["timing"] == "interleaved" and "over the time budget" in r["skipped"]
               and "ms" not in r for r in late)


def test_an_error_is_recorded_in_its_methods_row_or_its_cells_rows_and_the_run_goes_on(tmp_path, monkeypatch):
    pipeline_methods = stacking_speed.pipeline_methods
    cache, configured = stacking_speed.smoothcache.cache, pipeline_methods.configured

    def failing_cache(pipe: Any, schedule: Any, **kwargs: Any) -> Any:
        if "ff" in schedule.keys:
            raise RuntimeError("layers cannot attach here")
        return cache(pipe, schedule, **kwargs)

    def failing_configured(work: Any, config: Any, backend: str) -> Any:
        if config.compile == "compile":
            raise RuntimeError("no compiler here")
        return configured(work, config, backend)

    monkeypatch.setattr(stacking_speed.smoothcache, "cache", failing_cache)
    monkeypatch.setattr(pipeline_methods, "configured", failing_configured)
    result = run_script("--tiny", "--device", "cpu", "--parts", "a", "--compile", "eager", "compile", "--weights", "fp16",
                        "--repeats", "2", "--out", str(tmp_path))
    eager, compiled = cells_of(result).values()
    uncached, blocks, layers = eager  # the failing method leaves the rounds, the others are timed
    assert len(uncached["runs_ms"]) == len(blocks["runs_ms"]) == 2 and blocks["speedup"] > 0
    assert "layers cannot attach here" in layers["error"] and "ms" not in layers
    assert [r["method"] for r in compiled] == list(METHODS)
    assert all("no compiler here" in r["error"] and r["timing"] == "interleaved" for r in compiled)


def test_a_cache_that_cannot_be_disabled_stops_its_cell_rather_than_time_the_others_with_it(tmp_path, monkeypatch):
    """A handle whose disable() fails once stays enabled: the uncached turns would run cached, so
    the cell stops and each of its rows says why (the cell's teardown still disables it)."""
    cache = stacking_speed.smoothcache.cache
    stuck = []

    def sticking_cache(pipe: Any, schedule: Any, **kwargs: Any) -> Any:
        handle = cache(pipe, schedule, **kwargs)
        if list(schedule.keys) == ["block"]:
            disable, calls = handle.disable, []

            def disable_failing_on_the_third_call() -> None:  # the first: at attaching; then one per turn
                calls.append(1)
                if len(calls) == 3:
                    stuck.append(handle)
                    raise RuntimeError("disable failed")
                disable()

            handle.disable = disable_failing_on_the_third_call
        return handle

    monkeypatch.setattr(stacking_speed.smoothcache, "cache", sticking_cache)
    result = run_script("--tiny", "--device", "cpu", "--parts", "a", "--compile", "eager", "--weights", "fp16",
                        "--repeats", "2", "--out", str(tmp_path))
    (rows,) = cells_of(result).values()
    assert stuck and not stuck[0].enabled
    for row in rows:
        assert "ms" not in row and "left the cache of smoothcache blocks switched on" in row["error"], row


def part_a_result(rows: list[tuple[str, str, float]]) -> dict[str, Any]:
    """A result file of part a rows (weights, method, ms), eager, as a run writes it."""
    args = stacking_speed.parse_args(["--tiny", "--device", "cpu"])
    return {"date": "today", "device": "cpu", "settings": stacking_speed.settings(args),
            "rows": [{"part": "a", "weights": w, "compile": "eager", "method": m, "ms": ms} for w, m, ms in rows]}


def test_merging_parts_takes_each_cell_from_the_last_file_that_has_it_and_compares_speedups_across_them(tmp_path):
    parts = [
        part_a_result([("fp16", "uncached", 100.0), ("fp16", "smoothcache blocks", 50.0), ("int8", "uncached", 1.0)]),
        part_a_result([("int8", "uncached", 120.0), ("int8", "smoothcache blocks", 63.0)]),
    ]
    paths = [tmp_path / "first.json", tmp_path / "second.json"]
    for path, part in zip(paths, parts, strict=True):
        path.write_text(json.dumps(part))
    merged = run_script("--merge", *map(str, paths), "--out", str(tmp_path / "merged"))
    assert [(r["weights"], r["ms"]) for r in merged["rows"]] == [("fp16", 100.0), ("fp16", 50.0), ("int8", 120.0), ("int8", 63.0)]
    int8 = merged["rows"][-1]
    assert int8["speedup"] == pytest.approx(120 / 63) and int8["unquantized_speedup"] == 2.0
    assert int8["speedup_ratio"] == pytest.approx(120 / 63 / 2) and int8["within_5_percent"]
    assert [Path(m["file"]).name for m in merged["merged_from"]] == ["first.json", "second.json"]


def test_methods_timed_in_turn_also_get_their_speedup_round_by_round(tmp_path):
    """A host that slows down in one round slows every method of that round: the per-round speedups
    stay put where the rows' medians, taken from different rounds, move."""
    runs = {("fp16", "uncached"): [100.0, 100.0, 300.0], ("fp16", "smoothcache blocks"): [50.0, 150.0, 150.0],
            ("int8", "uncached"): [200.0, 200.0, 200.0], ("int8", "smoothcache blocks"): [100.0, 110.0, 100.0]}
    result = part_a_result([(w, m, statistics.median(r)) for (w, m), r in runs.items()])
    for row in result["rows"]:
        row.update(timing="interleaved", runs_ms=runs[(row["weights"], row["method"])])
    path = tmp_path / "in-turn.json"
    path.write_text(json.dumps(result))
    merged = run_script("--merge", str(path), "--out", str(tmp_path / "merged"))
    fp16_uncached, fp16_blocks, _, int8_blocks = merged["rows"]
    assert "speedup_paired" not in fp16_uncached
    assert fp16_blocks["speedup"] == pytest.approx(100 / 150)  # medians from different rounds: slower than uncached
    assert fp16_blocks["speedup_per_round"] == pytest.approx([2.0, 100 / 150, 2.0]) and fp16_blocks["speedup_paired"] == 2.0
    assert int8_blocks["speedup_paired"] == 2.0 and int8_blocks["speedup_ratio_paired"] == 1.0
    assert int8_blocks["speedup_ratio"] == pytest.approx(2.0 / (100 / 150))


def test_rows_timed_one_after_another_get_no_paired_speedup(tmp_path):
    result = part_a_result([("fp16", "uncached", 100.0), ("fp16", "smoothcache blocks", 50.0)])
    for row in result["rows"]:
        row["runs_ms"] = [row["ms"]] * 3  # same lengths, but not taken in turn
    path = tmp_path / "one-after-another.json"
    path.write_text(json.dumps(result))
    blocks = run_script("--merge", str(path), "--out", str(tmp_path / "merged"))["rows"][1]
    assert blocks["speedup"] == 2.0 and "speedup_paired" not in blocks and "speedup_per_round" not in blocks
