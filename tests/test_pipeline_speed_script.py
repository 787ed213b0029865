"""benchmarks/pipeline_speed.py on the CPU with its tiny models: every configuration runs through the
script's own path (diffusers' pipelines, smoothcache and cache-dit attached, dynamo for the compiled
cells) and the result JSON holds what the GPU run will be judged by."""

from __future__ import annotations

import contextlib
import gzip
import importlib
import json
import math
import statistics
import sys
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import pytest
import torch

from smoothcache.device_once import base_class

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
pipeline_speed = importlib.import_module("pipeline_speed")
pipeline_measures = importlib.import_module("pipeline_measures")
pipeline_methods = importlib.import_module("pipeline_methods")
pipeline_results = importlib.import_module("pipeline_results")
pipeline_settings = importlib.import_module("pipeline_settings")
pipeline_workloads = importlib.import_module("pipeline_workloads")

METHODS = ("uncached", "smoothcache blocks", "smoothcache layers", "cache-dit F1B0 static mask")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run(tmp_path: Path):
    """The script's main, in this process, on tiny models; dynamo's limits, which it raises, are put back."""
    config = torch._dynamo.config
    limits = {name: getattr(config, name) for name in ("recompile_limit", "accumulated_recompile_limit")}

    def run(*args: str, out: str = "out") -> list[dict[str, Any]]:
        paths = pipeline_speed.main([*args, "--tiny", "--device", "cpu", "--out", str(tmp_path / out)])
        for path in paths:
            assert path.with_suffix(".png").read_bytes().startswith(PNG_MAGIC)
        return [json.loads(path.read_text()) for path in paths]

    yield run
    for name, value in limits.items():
        setattr(config, name, value)


@pytest.fixture
def stand_in_graphs(monkeypatch) -> None:
    """The script's step graphs on the CPU: a stand-in capture that keeps a CUDA graph's semantics
    (tests/op_replay.py) in place of CUDA graphs."""
    from op_replay import OpReplayCapture

    from smoothcache import StepGraphs

    monkeypatch.setattr(pipeline_methods, "replays_on", lambda device: True)
    monkeypatch.setattr(pipeline_methods, "attach_step_graphs",
                        lambda pipe, warmup: StepGraphs(pipe, warmup_generations=warmup, capture=OpReplayCapture()))


def positive(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def check_rows(result: dict[str, Any]) -> None:
    """Every method in every cell measured, with speedups, ideals and the work each did."""
    settings, rows = result["settings"], result["rows"]
    mask = settings["mask"]
    cells = {(r["compile"], r["batch"], r["prefetch"]) for r in rows}
    for cell in cells:
        assert sorted(r["method"] for r in rows if (r["compile"], r["batch"], r["prefetch"]) == cell) == sorted(METHODS)
    for row in rows:
        assert "error" not in row and "skipped" not in row and "teardown_errors" not in row, row
        for key in ("ms", "speedup", "speedup_of_fastest", "speedup_vs_plain_uncached", "ideal_speedup", "efficiency"):
            assert positive(row[key]), (key, row)
        assert len(row["runs_ms"]) == settings["repeats"] and all(t > 0 for t in row["runs_ms"])
        assert positive(row["wall_s"]) and row["wall_s"] > row["ms"] * settings["repeats"] / 1000
        assert math.isfinite(row["max_abs_diff_vs_uncached"])
        assert row["graphs_compiled_while_timed"] == 0 and row["recompiles_while_timed"] == 0
        assert row["peak_mib"] is None and row["host_syncs_per_generation"] is None  # no GPU here
        step_ms = row["step_ms"]
        assert step_ms["steps_measured"] == settings["steps"] - 1
        assert positive(step_ms["host_computing"]) and positive(step_ms["host_reusing"])
        assert step_ms["device_computing"] is None and step_ms["device_reusing"] is None
        if row["method"] == "uncached":
            assert row["ideal_speedup"] == 1.0 and row["computed_steps"] == settings["steps"]
            assert row["max_abs_diff_vs_uncached"] == 0.0  # itself, or bit-identical with prefetch
        else:  # every cache computes the mask's steps, so the last block's attention runs on those only
            assert row["ideal_speedup"] > 1.0 and row["computed_steps"] == sum(mask)
        if row["implementation"] == "smoothcache":
            assert row["attention_fraction"] == pytest.approx(sum(mask) / len(mask))
            assert row["kept_mib"] > 0
        else:
            assert row["kept_mib"] is None
        if row["implementation"] == "cache-dit":  # its first block computes at every step: a lower ideal
            smoothcache_ideal = next(r["ideal_speedup"] for r in rows if r["method"] == "smoothcache blocks"
                                     and r["batch"] == row["batch"])
            assert row["ideal_speedup"] < smoothcache_ideal
        if row["compile"] == "regional":
            assert "compile_repeated_blocks(" in row["how"] or "block.compile(" in row["how"]
        elif row["compile"] != "eager":
            assert "torch.compile(pipe.transformer" in row["how"]


def test_dit_rows_eager_with_and_without_prefetch(run, capsys):
    (result,) = run("--model", "dit", "--compile", "eager", "--batches", "1")
    check_rows(result)
    # the run's verdict: its one column, from the rows it wrote, printed at the end
    (verdict,) = result["targets"]["columns"]
    assert (verdict["compile"], verdict["batch"], verdict["one_process"], result["targets"]["one_run"]) == ("eager", 1, True, True)
    assert verdict["smoothcache_fastest"]["ms"] == min(r["ms"] for r in result["rows"] if r["implementation"] == "smoothcache")
    assert verdict["smoothcache_fastest"]["timing"] == "interleaved"
    assert verdict["baseline"]["ms"] == min(r["ms"] for r in result["rows"] if r["method"] == "uncached")
    assert verdict["ratio_to_cache_dit"] == verdict["cache_dit_fastest"]["ms"] / verdict["smoothcache_fastest"]["ms"]
    assert "issue 20's targets, dit" in capsys.readouterr().out
    assert result["settings"]["pipeline"] == "DiTPipeline" and len(result["settings"]["mask"]) == result["settings"]["steps"]
    assert {r["prefetch"] for r in result["rows"]} == {False, True}
    for row in result["rows"]:  # prefetching the timesteps claims bit-identical outputs
        assert row["max_abs_diff_vs_prefetch_off"] == 0.0 if row["prefetch"] else "max_abs_diff_vs_prefetch_off" not in row


def test_dit_rows_compiled_each_library_its_documented_way(run):
    (result,) = run("--model", "dit", "--compile", "cudagraphs", "--batches", "1", "--prefetch", "off")
    check_rows(result)
    how = {r["method"]: r["how"] for r in result["rows"]}
    assert how["cache-dit F1B0 static mask"].startswith("cache_dit.enable_cache")  # then compiled
    assert how["smoothcache blocks"].startswith("pipe.transformer = torch.compile")  # then cached


@pytest.mark.parametrize("model", ["dit", "wan"])
def test_regional_compile_compiles_each_block_and_gives_every_method_its_own_graphs(run, model):
    """Each block compiled on its own (diffusers' compile_repeated_blocks; DiT's transformer_blocks):
    every method timed with nothing compiled while timed, smoothcache's chain keeping one residual
    per call slot as it does compiled whole, and the blocks uncompiled afterwards."""
    (result,) = run("--model", model, "--compile", "regional", "compile", "--batches", "1", "--prefetch", "off",
                    "--backend", "eager", "--no-in-turn", "--methods", "blocks", "cache-dit")
    rows = {(r["compile"], r["method"]): r for r in result["rows"]}
    for row in rows.values():
        assert "error" not in row and row["graphs_compiled_while_timed"] == 0 and row["recompiles_while_timed"] == 0, row
    regional, whole = rows["regional", "smoothcache blocks"], rows["compile", "smoothcache blocks"]
    assert regional["kept_mib"] == whole["kept_mib"] > 0
    assert rows["regional", "uncached"]["how"].startswith("pipe.transformer.compile_repeated_blocks(" if model == "wan"
                                                          else "block.compile(")


def test_nothing_starts_past_the_budget_and_parts_of_runs_merge_cell_by_cell(run, tmp_path):
    """Parts of one model's run (one command each) merge with each cell's rows from one file (the
    last that has it), so that no speedup mixes processes."""
    (result,) = run("--model", "dit", "--compile", "eager", "--batches", "1", "--prefetch", "off", "--max-minutes", "0")
    assert len(result["rows"]) == len(METHODS) and all("skipped" in r for r in result["rows"])
    parts = []
    for index, compile_mode in enumerate(["eager", "compile", "eager"]):
        part = {**result, "rows": [{**r, "compile": compile_mode, "part": index} for r in result["rows"]]}
        parts.append(tmp_path / f"part{index}.json")
        parts[-1].write_text(json.dumps(part))
    path, png = pipeline_speed.main(["--plot-from", *map(str, parts), "--out", str(tmp_path / "merged")])
    merged = json.loads(path.read_text())
    assert path.name == "pipeline-speed-dit.json" and png.read_bytes().startswith(PNG_MAGIC)
    assert sorted((r["compile"], r["part"]) for r in merged["rows"]) == sorted([("compile", 1), ("eager", 2)] * len(METHODS))
    assert [Path(m["file"]).name for m in merged["merged_from"]] == ["part0.json", "part1.json", "part2.json"]
    assert sorted(merged["settings"]["compile"]) == ["compile", "eager"]


@pytest.mark.parametrize(("guess_s", "warned"), [(20 * 60.0, True), (5 * 60.0, False)])
def test_a_run_guessed_past_its_budget_says_up_front_that_rows_will_not_start(monkeypatch, capsys, guess_s, warned):
    """``--max-minutes`` defaults to one command's share; a longer run would drop its last rows with
    only the budget's number printed, so the first estimate says so where the guess exceeds it."""
    monkeypatch.setattr(pipeline_speed, "remaining_seconds", lambda runner, configs: guess_s)
    monkeypatch.setattr(pipeline_speed, "runnable", lambda runner, configs: 2)
    runner = SimpleNamespace(plan=[], extra={"first_generation_s": 43.4, "first_generation_batch": 1},
                             args=SimpleNamespace(max_minutes=7.5))
    pipeline_speed.print_estimate(runner)
    out = capsys.readouterr().out
    assert f"2 configurations, expected about {guess_s / 60:.1f} min" in out
    assert ("the guess runs past --max-minutes 7.5: configurations due after it will not start" in out) is warned


def test_methods_chosen_run_in_the_order_given_after_the_uncached_one(run):
    (result,) = run("--model", "dit", "--compile", "eager", "--batches", "1", "--prefetch", "both", "--max-minutes", "0",
                    "--methods", "cache-dit", "blocks", "uncached")
    order = ["uncached", "cache-dit F1B0 static mask", "smoothcache blocks"]
    # an eager cell's methods take turns: its rows come together, prefetch off's cell first
    assert [(r["prefetch"], r["method"]) for r in result["rows"]] == [(p, m) for p in (False, True) for m in order]
    assert result["settings"]["methods"] == order


def test_traced_rows_write_a_trace_with_each_step_named(run, tmp_path):
    (result,) = run("--model", "dit", "--compile", "eager", "--batches", "1", "--prefetch", "off",
                    "--methods", "blocks", "--trace", "blocks")
    uncached, blocks = result["rows"]
    assert "trace_file" not in uncached and result["settings"]["traced"] == ["smoothcache blocks"]
    assert blocks["trace_file"] == "trace-dit-eager-b1-blocks-prefetch-off.json.gz"
    with gzip.open(tmp_path / "out" / blocks["trace_file"], "rt") as file:
        names = {event.get("name") for event in json.load(file)["traceEvents"]}
    mask = result["settings"]["mask"]
    assert {f"step {i} {'computing' if m else 'reusing'}" for i, m in enumerate(mask)} <= names
    top = blocks["top_host_ops"]
    assert 0 < len(top) <= 15 and all(op["count"] > 0 and op["self_host_ms"] >= 0 for op in top)
    by_kind = blocks["step_us"]["by_kind"]
    assert by_kind["computing"]["steps"] == sum(mask) and by_kind["reusing"]["steps"] == len(mask) - sum(mask)
    assert all(found["call_us"] > 0 and found["between_calls_us"] > 0 for found in by_kind.values())
    generation = blocks["generation_us"]  # on the CPU: no device work traced
    assert generation["host_us"] > generation["before_first_call_us"] > 0 and generation["after_last_call_us"] > 0
    assert generation["device_busy_us"] is None


def test_flux_and_wan_rows(run):
    flux, wan = run("--model", "flux", "wan", "--compile", "eager", "--prefetch", "off")
    for result in (flux, wan):
        check_rows(result)
    assert flux["settings"]["block_keys"] == ["block", "single_block"]
    assert wan["settings"]["calls_per_step"] == 2  # guidance runs the transformer twice per step


def test_flux_and_wan_replay_their_steps_bit_identically(run, stand_in_graphs):
    """Flux's two kinds of blocks and Wan's two calls a step (guidance), each step's calls replayed
    under a graph's semantics: the same output as the pipeline without step graphs."""
    for result in run("--model", "flux", "wan", "--compile", "eager", "eager-graphs", "--batches", "1",
                      "--prefetch", "off", "--methods", "blocks"):
        calls = result["settings"]["steps"] * result["settings"]["calls_per_step"]
        for row in (r for r in result["rows"] if r["compile"] == "eager-graphs"):
            assert row["max_abs_diff_vs_plain_path"] == 0.0, row
            stats = row["step_graphs"]
            assert stats["captured"] == calls and stats["incomplete"] == 0 and stats["capture_error"] is None
            assert stats["replayed"] == calls * (row["repeats"] + 2) and stats["invalidated"] == 0  # warm-up's last, timed, clocked


def test_the_step_graphs_cells_say_they_need_a_gpu(run):
    """``--compile graphs eager-graphs`` are smoothcache.step_graphs, compiled and not: on the CPU
    each row says why it did not run."""
    (result,) = run("--model", "dit", "--compile", "graphs", "eager-graphs", "--batches", "1", "--prefetch", "off",
                    "--methods", "blocks", "cache-dit")
    rows = result["rows"]
    assert [(r["compile"], r["method"]) for r in rows] == [
        (setting, method) for setting in ("graphs", "eager-graphs")
        for method in ("uncached", "smoothcache blocks", "cache-dit F1B0 static mask")]
    assert all("CUDA GPU" in r["skipped"] for r in rows)
    assert result["settings"]["warmup"]["graphs"] == 4 and result["settings"]["warmup"]["eager-graphs"] == 3


def test_the_step_graphs_cells_run_through_the_script_under_a_graphs_semantics(run, stand_in_graphs):
    """The GPU run's step-graphs cells, on the CPU with a stand-in capture that keeps a CUDA graph's
    semantics (tests/op_replay.py): every generation after the warm-up replays, nothing falls back,
    and each row is bit-identical to the same method without step graphs."""
    (result,) = run("--model", "dit", "--compile", "compile", "graphs", "eager", "eager-graphs", "--batches", "1",
                    "--prefetch", "on", "--methods", "blocks")
    rows = {(r["compile"], r["method"]): r for r in result["rows"]}
    steps = result["settings"]["steps"]
    for setting, plain in pipeline_settings.PLAIN_PATH.items():
        for method in ("uncached", "smoothcache blocks"):
            row = rows[(setting, method)]
            assert "error" not in row and "skipped" not in row, row
            assert row["max_abs_diff_vs_plain_path"] == 0.0, (setting, method)  # its own set-up, graphs removed
            assert row["max_abs_diff_vs_plain_cell"] == 0.0, (setting, method)  # the cell without step graphs
            assert row["max_abs_diff_vs_uncached"] == rows[(plain, method)]["max_abs_diff_vs_uncached"]
            stats = row["step_graphs"]
            # the run's first row of a method counts its work with hooks on every linear layer: then,
            # and only then, the graphs are dropped once, before the warm-up
            counted_here = next(r for r in result["rows"] if r["method"] == method) is row
            assert stats["capture_error"] is None and stats["incomplete"] == 0
            assert stats["invalidated"] == int(counted_here)
            assert stats["captured"] == steps  # one generation captured, a call per step
            replayed = row["repeats"] + 1 + (pipeline_settings.WARMUP[setting] - pipeline_settings.STEP_GRAPHS[setting] - 1)
            assert stats["replayed"] == steps * replayed  # the timed, the clocked and the warm-up's last
            assert row["graphs_compiled_while_timed"] == 0 and row["kept_mib"] is None


def test_step_graph_rows_are_also_compared_with_the_pipeline_they_stand_in_for() -> None:
    """A step-graphs row's speedup is against the uncached pipeline with step graphs (like with like),
    and also against the uncached one a user would run instead, where the run has it."""
    def row(setting: str, method: str, ms: float) -> dict[str, Any]:
        return {"model": "dit", "compile": setting, "batch": 1, "prefetch": False, "method": method,
                "ms": ms, "runs_ms": [ms], "flops": 100.0 if method == "uncached" else 50.0}

    rows = pipeline_results.with_speedups([row("eager", "uncached", 400.0), row("eager-graphs", "uncached", 100.0),
                                         row("eager-graphs", "smoothcache blocks", 50.0)])
    cached = rows[-1]
    assert cached["speedup"] == 2.0 and cached["speedup_vs_eager_uncached"] == 8.0
    assert rows[1]["speedup_vs_eager_uncached"] == 4.0 and "speedup_vs_cudagraphs_uncached" not in cached


def test_skip_guards_times_compiled_rows_with_only_the_guards_that_tell_graphs_apart(run, monkeypatch):
    """--skip-guards: after the warm-up, every compiled configuration's timed and clocked generations
    run under set_stance(skip_guard_eval_unsafe=True), those taking turns (plain compile) and those
    timed alone (CUDA graphs; dynamo only here) alike; nothing compiles and every output is as checked."""
    stanced, real_unchecked = [], pipeline_speed.unchecked

    def counting(generate: Any) -> Any:
        fast = real_unchecked(generate)

        def counted() -> Any:
            stanced.append(1)
            return fast()

        return counted

    monkeypatch.setattr(pipeline_speed, "unchecked", counting)
    repeats = 2
    args = ("--model", "dit", "--compile", "compile", "cudagraphs", "--batches", "1", "--prefetch", "off",
            "--methods", "layers", "--repeats", str(repeats))
    (checked,) = run(*args, out="checked")
    assert stanced == []
    (unchecked,) = run(*args, "--skip-guards", out="unchecked")
    assert [r["timing"] for r in unchecked["rows"]] == ["sequential", "sequential", "interleaved", "interleaved"]
    assert len(stanced) == 4 * (repeats + 1)  # each row's timed generations and its clocked one
    # cache-dit recompiles after its warm-up, which the stance refuses: its rows keep every guard
    stanced.clear()
    (with_cache_dit,) = run("--model", "dit", "--compile", "compile", "--batches", "1", "--prefetch", "off",
                            "--methods", "cache-dit", "--skip-guards", out="cache-dit")
    assert stanced and all("error" not in r and positive(r["ms"]) for r in with_cache_dit["rows"])
    assert with_cache_dit["settings"]["skip_guard_eval_unsafe"].endswith("but cache-dit's")
    assert checked["settings"]["skip_guard_eval_unsafe"] is False
    assert unchecked["settings"]["skip_guard_eval_unsafe"].startswith("timed")
    for plain, fast in zip(checked["rows"], unchecked["rows"], strict=True):
        assert plain["method"] == fast["method"] and "error" not in fast
        assert fast["graphs_compiled_while_timed"] == 0 and fast["recompiles_while_timed"] == 0
        assert fast["max_abs_diff_vs_uncached"] == plain["max_abs_diff_vs_uncached"]


def test_the_exactness_claim_compares_the_replays_with_their_own_set_up_with_the_graphs_removed(monkeypatch) -> None:
    """``max_abs_diff_vs_plain_path``: the step graphs are removed first, then one more generation runs
    on the same set-up; a replay off that path shows. If that generation compiled anything it ran
    other graphs, and if removing the graphs fails the check is lost, not the row: both say so."""
    calls: list[str] = []
    graphs = SimpleNamespace(disable=lambda: calls.append("disable"))

    def generate(batch: int, generator: torch.Generator) -> torch.Tensor:
        calls.append(f"generate b{batch}")
        return torch.tensor([1.0, 2.0])

    runner = pipeline_speed.Runner(work=SimpleNamespace(generate=generate), args=SimpleNamespace(device="cpu"), out=None)
    config = pipeline_settings.Config("eager-graphs", 1, False, "smoothcache blocks")
    runner.outputs[config] = torch.tensor([1.0, 2.25])  # what the replays gave
    assert runner.plain_path_difference(config, graphs) == {"max_abs_diff_vs_plain_path": 0.25}
    assert calls == ["disable", "generate b1"]

    counts = iter([{"graphs": 3, "frames": 3, "graph_breaks": 0, "cudagraph_skips": 0},
                   {"graphs": 4, "frames": 4, "graph_breaks": 0, "cudagraph_skips": 0}])
    monkeypatch.setattr(pipeline_speed.gpu_bench, "dynamo_counts", lambda: next(counts))
    assert runner.plain_path_difference(config, graphs) == {"max_abs_diff_vs_plain_path": None,
                                                            "plain_path_graphs_compiled": 1}

    def refusing() -> None:
        raise RuntimeError("The model's forward was replaced after step_graphs attached; undo that first")

    found = runner.plain_path_difference(config, SimpleNamespace(disable=refusing))
    assert found["max_abs_diff_vs_plain_path"] is None and found["plain_path_error"].startswith("RuntimeError: The model")


def test_step_graph_rows_are_compared_with_the_same_method_in_the_plain_cell_in_either_order() -> None:
    Config = pipeline_settings.Config
    runner = pipeline_speed.Runner(work=None, args=None, out=None)
    replayed, plain = Config("eager-graphs", 1, False, "smoothcache blocks"), Config("eager", 1, False, "smoothcache blocks")
    runner.outputs[replayed] = torch.ones(2)
    runner.rows.append({**replayed._asdict(), "ms": 1.0})
    runner.compare_plain_paths()
    assert "max_abs_diff_vs_plain_cell" not in runner.rows[0]  # the plain path has not run yet
    runner.outputs[plain] = torch.tensor([1.0, 1.5])
    runner.rows.append({**plain._asdict(), "ms": 2.0})
    runner.compare_plain_paths()
    assert runner.rows[0]["max_abs_diff_vs_plain_cell"] == 0.5 and "max_abs_diff_vs_plain_cell" not in runner.rows[1]


def test_a_cell_run_with_prefetch_only_plots_against_its_own_uncached_call(tmp_path):
    """A cell with prefetched rows alone has no plain uncached row: its bars are against the uncached
    call with prefetch, and its title says so (they were all drawn as failed before), also beside a
    cell that ran both ways, as a merge of two runs can put them; a step-graph row's marker is
    against the pipeline without step graphs on the same kind of baseline as its bar."""
    def row(compile_mode: str, method: str, prefetch: bool, ms: float | None) -> dict[str, Any]:
        timed = {"ms": ms, "runs_ms": [ms]} if ms else {"skipped": "over the time budget"}
        return {"compile": compile_mode, "batch": 1, "prefetch": prefetch, "method": method, **timed}

    rows = [row("cudagraphs", "uncached", True, 166.5), row("cudagraphs", "smoothcache blocks", True, 106.6),
            row("graphs", "uncached", True, 181.7), row("graphs", "smoothcache blocks", True, 100.0),
            row("eager", "uncached", False, 200.0), row("eager", "uncached", True, 160.0),
            row("eager", "smoothcache blocks", True, 100.0), row("eager", "smoothcache layers", True, None),
            row("eager-graphs", "uncached", True, 150.0)]
    settings = {"pipeline": "DiTPipeline", "steps": 50, "computed_steps_in_mask": 24, "dtype": "torch.float16", "tiny": True}
    result = {"device": "cpu", "settings": settings, "rows": pipeline_results.with_speedups(rows)}
    plotted = pipeline_results.plotted_speedups(result)
    assert plotted.baselines == {("cudagraphs", 1): "with prefetch", ("graphs", 1): "with prefetch",
                                 ("eager", 1): "no prefetch", ("eager-graphs", 1): "with prefetch"}
    assert plotted.bars[("cudagraphs", 1, True, "smoothcache blocks")] == pytest.approx(166.5 / 106.6)
    assert plotted.bars[("graphs", 1, True, "smoothcache blocks")] == pytest.approx(181.7 / 100.0)
    assert plotted.bars[("eager", 1, True, "smoothcache blocks")] == 2.0  # against the plain uncached call
    assert plotted.bars[("eager", 1, True, "smoothcache layers")] == "skipped"
    assert plotted.markers == {("graphs", 1, True, "uncached"): pytest.approx(166.5 / 181.7),
                               ("graphs", 1, True, "smoothcache blocks"): pytest.approx(166.5 / 100.0)}
    # eager-graphs stands in for eager, whose baseline is the plain call: no marker on another baseline
    assert ("eager-graphs", 1, True, "uncached") not in plotted.markers
    assert pipeline_results.plot(result, tmp_path / "p.png").read_bytes().startswith(PNG_MAGIC)


def test_the_axes_stop_below_a_step_graph_marker_far_above_the_bars():
    """Step graphs against plain eager measured 5.5x and 17.3x beside 2x bars on one H100; scaling
    the shared axis to them flattened every bar. The top follows the bars and ideal ticks, and a
    marker at most half again as tall; a taller one is drawn on the edge with its value."""
    bars = {("eager", 1, True, "uncached"): 1.0, ("eager", 1, True, BLOCKS): 1.9, ("eager", 1, True, LAYERS): "failed"}
    rows = [{"method": BLOCKS, "ideal_speedup": 2.08}, {"method": "uncached"}]
    near = pipeline_results.Plotted({}, bars, {("graphs", 1, True, BLOCKS): 2.5})
    far = pipeline_results.Plotted({}, bars, {("eager-graphs", 1, True, BLOCKS): 17.3})
    assert pipeline_results.marker_ceiling(rows, near) == 2.5
    assert pipeline_results.marker_ceiling(rows, far) == 2.08
    assert pipeline_results.marker_ceiling([], pipeline_results.Plotted({}, {}, {})) == 1.0


def test_a_cell_with_no_timed_row_is_named_not_drawn():
    """A cell cut by the time budget gets no empty panel: the title lists it as not run. A run with
    no timed row at all still draws every cell (its labels say why)."""
    def row(compile_mode: str, method: str, ms: float | None) -> dict[str, Any]:
        timed = {"ms": ms} if ms else {"skipped": "over the time budget"}
        return {"compile": compile_mode, "batch": 1, "prefetch": True, "method": method, **timed}

    rows = [row("cudagraphs", "uncached", 164.7), row("cudagraphs", "smoothcache blocks", 95.1),
            row("compile", "uncached", None), row("compile", "smoothcache blocks", None)]
    assert pipeline_results.plotted_panels(rows) == ([("cudagraphs", 1)], [("compile", 1)])
    skipped = [r for r in rows if "skipped" in r]
    assert pipeline_results.plotted_panels(skipped) == ([("compile", 1)], [])


# ---- issue 20's verdict from the rows ----------------------------------------------------------
BLOCKS, LAYERS, CACHE_DIT = "smoothcache blocks", "smoothcache layers", "cache-dit F1B0 static mask"
FLOPS = {"uncached": 100.0, BLOCKS: 40.0, LAYERS: 40.0, CACHE_DIT: 50.0}  # ideal speedups 2.5, 2.5, 2.0


def verdict_row(compile_mode: str, method: str, ms: float | None, prefetch: bool = True, **extra: Any) -> dict[str, Any]:
    """A row as a run writes it: timed (``ms``), or failed where ``ms`` is None."""
    timed = {"ms": ms, "runs_ms": [ms]} if ms else {"error": "RuntimeError: out of memory"}
    return {"model": "dit", "compile": compile_mode, "batch": 1, "prefetch": prefetch, "method": method,
            "flops": FLOPS[method], **timed, **extra}


def column(found: dict[str, Any], compile_mode: str, batch: int = 1) -> dict[str, Any]:
    return next(c for c in found["columns"] if (c["compile"], c["batch"]) == (compile_mode, batch))


def test_the_verdict_counts_step_graph_rows_where_they_stand_in_against_the_fastest_plain_uncached_row():
    """Step-graph rows are smoothcache configurations of the column they stand in for; the baseline
    is the fastest plain uncached row (here the prefetched one), never the step-graph uncached row,
    even where that is faster; a failed row is left out."""
    rows = pipeline_results.with_speedups([
        verdict_row("cudagraphs", "uncached", 200.0, prefetch=False), verdict_row("cudagraphs", "uncached", 160.0),
        verdict_row("cudagraphs", BLOCKS, 120.0, prefetch=False), verdict_row("cudagraphs", BLOCKS, 100.0),
        verdict_row("cudagraphs", LAYERS, None), verdict_row("cudagraphs", CACHE_DIT, 150.0),
        verdict_row("graphs", "uncached", 130.0, max_abs_diff_vs_plain_path=0.0),
        verdict_row("graphs", BLOCKS, 80.0, max_abs_diff_vs_plain_path=0.0),
        {"model": "dit", "compile": "graphs", "batch": 1, "prefetch": True, "method": CACHE_DIT,
         "skipped": "step_graphs is smoothcache's"},
    ])
    found = pipeline_results.targets(rows, "dit")
    assert [(c["compile"], c["batch"]) for c in found["columns"]] == [("cudagraphs", 1)]
    verdict = column(found, "cudagraphs")
    assert verdict["baseline"] == {"compile": "cudagraphs", "prefetch": True, "method": "uncached", "ms": 160.0,
                                   "timing": None, "from_file": None}
    ours = verdict["smoothcache_fastest"]
    assert (ours["compile"], ours["method"], ours["ms"]) == ("graphs", BLOCKS, 80.0)
    assert ours["speedup"] == 2.0  # against the plain uncached row; the efficiency against its own cell's
    assert ours["own_cell_speedup"] == pytest.approx(130 / 80) and ours["efficiency"] == pytest.approx(130 / 80 / 2.5)
    theirs = verdict["cache_dit_fastest"]
    assert (theirs["compile"], theirs["ms"], theirs["speedup"]) == ("cudagraphs", 150.0, pytest.approx(160 / 150))
    assert verdict["ratio_to_cache_dit"] == pytest.approx(150 / 80) and verdict["meets_1_05"] is True
    assert verdict["ideal_ratio_to_cache_dit"] == pytest.approx(2.5 / 2.0)  # FLOPS' ideals
    # each row against its own cell's uncached row: the graphs row against 130 ms, the others against 160 or 200
    assert verdict["slowest_smoothcache_speedup"] == 1.6 and verdict["none_below_1"] is True
    assert verdict["slowest_smoothcache"] == {"compile": "cudagraphs", "prefetch": True, "method": BLOCKS}
    assert (verdict["speedup_target"], verdict["meets_speedup_target"]) == (1.6, True)
    assert verdict["efficiency_target"] is None and verdict["meets_efficiency_target"] is None
    assert verdict["one_process"] is True
    assert found["bit_identical"] == {"compared": 2, "identical": 2, "all_identical": True}


def test_the_verdict_holds_flux_to_its_efficiency_and_says_none_where_rows_are_missing():
    """A column without cache-dit has no ratio; a smoothcache row slower than its own uncached row
    fails "no cell below 1.0x"; a column whose rows all failed, or that has no plain uncached row,
    gives None where there is no figure, and no exception."""
    flux = [{**r, "model": "flux"} for r in (
        verdict_row("eager", "uncached", 1000.0), verdict_row("eager", BLOCKS, 1100.0), verdict_row("eager", LAYERS, 800.0),
        verdict_row("compile", "uncached", None), verdict_row("compile", BLOCKS, None),
        verdict_row("cudagraphs", "uncached", None), verdict_row("cudagraphs", BLOCKS, 500.0))]
    found = pipeline_results.targets(pipeline_results.with_speedups(flux), "flux")
    assert [c["compile"] for c in found["columns"]] == ["eager", "compile", "cudagraphs"]
    eager = column(found, "eager")
    assert eager["smoothcache_fastest"]["method"] == LAYERS and eager["smoothcache_fastest"]["speedup"] == 1.25
    assert eager["smoothcache_fastest"]["efficiency"] == pytest.approx(1.25 / 2.5)
    assert (eager["efficiency_target"], eager["meets_efficiency_target"]) == (0.95, False)
    assert eager["speedup_target"] is None and eager["meets_speedup_target"] is None
    assert eager["cache_dit_fastest"] is None and eager["ratio_to_cache_dit"] is None and eager["meets_1_05"] is None
    assert eager["ideal_ratio_to_cache_dit"] is None
    assert eager["slowest_smoothcache_speedup"] == pytest.approx(1000 / 1100) and eager["none_below_1"] is False
    failed = column(found, "compile")
    assert failed["baseline"] is None and failed["smoothcache_fastest"] is None and failed["one_process"] is None
    assert failed["slowest_smoothcache_speedup"] is None and failed["none_below_1"] is None
    unbased = column(found, "cudagraphs")
    assert unbased["baseline"] is None and unbased["smoothcache_fastest"]["ms"] == 500.0
    assert unbased["smoothcache_fastest"]["speedup"] is None and unbased["smoothcache_fastest"]["efficiency"] is None
    assert unbased["meets_efficiency_target"] is None and unbased["none_below_1"] is None
    assert found["bit_identical"] == {"compared": 0, "identical": 0, "all_identical": None}
    table = pipeline_results.targets_table(found).splitlines()
    assert len(table) == 2 + len(found["columns"]) + 2 and table[2].startswith("eager b1")
    assert table[-1] == "every row from one run (one process): yes"


@pytest.mark.parametrize("model", ["flux", "wan"])
def test_flux_and_wan_report_the_ratio_to_cache_dit_without_holding_it_to_dits_target(model: str):
    """The 1.05x lead is the DiT table's target; on Flux and Wan the verdict gives the ratio and the
    ratio at both ideals, and holds the fastest row to efficiency alone."""
    rows = [{**r, "model": model} for r in (
        verdict_row("eager", "uncached", 1000.0), verdict_row("eager", BLOCKS, 420.0), verdict_row("eager", CACHE_DIT, 520.0))]
    found = pipeline_results.targets(pipeline_results.with_speedups(rows), model)
    eager = column(found, "eager")
    assert eager["ratio_to_cache_dit"] == pytest.approx(520 / 420) and eager["meets_1_05"] is None
    assert eager["ideal_ratio_to_cache_dit"] == pytest.approx(2.5 / 2.0)
    assert (eager["efficiency_target"], eager["meets_efficiency_target"]) == (0.95, True)
    assert found["thresholds"]["ratio_to_cache_dit"] is None and found["thresholds"]["efficiency"] == 0.95
    line = pipeline_results.targets_table(found).splitlines()[2]
    assert " 1.2381x 1.2500x -  " in line and "eff 0.95: yes" in line
    dit = pipeline_results.targets(pipeline_results.with_speedups([{**r, "model": "dit"} for r in rows]), "dit")
    assert column(dit, "eager")["meets_1_05"] is True and dit["thresholds"]["ratio_to_cache_dit"] == 1.05


def test_the_ratio_at_both_ideals_needs_both_rows_counted():
    """Rows whose FLOPs were not counted have no ideal: the ratio stands, its ideal is None, "-"."""
    rows = [{key: value for key, value in r.items() if key != "flops"} for r in (
        verdict_row("eager", "uncached", 1000.0), verdict_row("eager", BLOCKS, 420.0), verdict_row("eager", CACHE_DIT, 520.0))]
    found = pipeline_results.targets(pipeline_results.with_speedups(rows), "dit")
    eager = column(found, "eager")
    assert eager["ratio_to_cache_dit"] == pytest.approx(520 / 420) and eager["ideal_ratio_to_cache_dit"] is None
    assert " 1.2381x       - yes" in pipeline_results.targets_table(found).splitlines()[2]


def test_the_runner_calls_the_patched_seams_through_their_modules():
    """A from-imported copy of a seam in pipeline_speed would bypass the tests' patches silently."""
    assert not {"configured", "enabled", "step_clock", "attach_step_graphs", "replays_on"} & set(vars(pipeline_speed))


def test_one_step_graph_row_off_the_plain_path_fails_bit_identity():
    rows = pipeline_results.with_speedups([
        verdict_row("eager", "uncached", 400.0),
        verdict_row("eager-graphs", "uncached", 300.0, max_abs_diff_vs_plain_path=0.0),
        verdict_row("eager-graphs", BLOCKS, 150.0, max_abs_diff_vs_plain_path=0.0078125)])
    found = pipeline_results.targets(rows, "dit")
    assert found["bit_identical"] == {"compared": 2, "identical": 1, "all_identical": False}
    assert column(found, "eager")["smoothcache_fastest"]["speedup"] == 400 / 150


def test_merged_parts_say_which_file_each_row_came_from_and_a_column_across_files_is_not_one_process(tmp_path, capsys):
    """--plot-from: every row carries ``from_file`` (its index in ``merged_from``) and the merged
    file carries the verdict; a column whose baseline and fastest rows come from two processes says so."""
    settings = {"model": "dit", "pipeline": "DiTPipeline", "steps": 50, "computed_steps_in_mask": 24,
                "dtype": "torch.float16", "tiny": True}
    parts = [
        [verdict_row("cudagraphs", "uncached", 160.0), verdict_row("cudagraphs", BLOCKS, 100.0),
         verdict_row("cudagraphs", CACHE_DIT, 150.0)],
        [verdict_row("graphs", "uncached", 130.0), verdict_row("graphs", BLOCKS, 80.0),
         verdict_row("eager", "uncached", 400.0), verdict_row("eager", BLOCKS, 200.0)],
    ]
    files = []
    for index, rows in enumerate(parts):
        files.append(tmp_path / f"part{index}.json")
        files[-1].write_text(json.dumps({"device": "cpu", "date": "today", "settings": settings,
                                         "rows": pipeline_results.with_speedups(rows)}))
    path, _ = pipeline_speed.main(["--plot-from", *map(str, files), "--out", str(tmp_path / "merged")])
    merged = json.loads(path.read_text())
    assert sorted({(r["compile"], r["from_file"]) for r in merged["rows"]}) == [
        ("cudagraphs", 0), ("eager", 1), ("graphs", 1)]
    assert [Path(m["file"]).name for m in merged["merged_from"]] == ["part0.json", "part1.json"]
    assert merged["targets"] == pipeline_results.targets(merged["rows"], "dit")
    cudagraphs, eager = column(merged["targets"], "cudagraphs"), column(merged["targets"], "eager")
    assert cudagraphs["baseline"]["from_file"] == 0 and cudagraphs["smoothcache_fastest"]["from_file"] == 1
    assert cudagraphs["smoothcache_fastest"]["speedup"] == 2.0 and cudagraphs["one_process"] is False
    assert eager["one_process"] is True and eager["smoothcache_fastest"]["speedup"] == 2.0
    assert merged["targets"]["one_run"] is False  # two processes, though each column but one is within one
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("issue 20's targets, dit")
    assert [line.split()[:2] for line in printed[2:4]] == [["eager", "b1"], ["cudagraphs", "b1"]]


def test_count_batch_counts_the_work_at_that_batch_with_the_same_ideal_speedups(run):
    """--count-batch 1: a batch-2 cell's work is counted in a batch-1 generation, a cheaper one; the
    computed steps and ideal speedups are those of counting at batch 2, the FLOPs those of batch 1."""
    args = ("--model", "dit", "--compile", "eager", "compile", "--prefetch", "off", "--methods", "blocks", "cache-dit",
            "--repeats", "1")
    (own,) = run(*args, "--batches", "2", out="own")
    (small,) = run(*args, "--batches", "2", "--count-batch", "1", out="small")
    (one,) = run(*args, "--batches", "1", out="one")
    assert small["settings"]["count_batch"] == 1 and own["settings"]["count_batch"] == "each configuration's own"
    by_method = {(r["compile"], r["method"]): r for r in own["rows"]}
    flops_at_1 = {r["method"]: r["flops"] for r in one["rows"]}
    for row in small["rows"]:
        reference = by_method[(row["compile"], row["method"])]
        assert row["counted_at_batch"] == 1 and reference["counted_at_batch"] == 2 and row["batch"] == 2
        assert row["flops"] == flops_at_1[row["method"]] < reference["flops"]
        assert row["computed_steps"] == reference["computed_steps"]
        assert row["ideal_speedup"] == pytest.approx(reference["ideal_speedup"], rel=1e-6)
        assert len(row["runs_ms"]) == 1 and "error" not in row
    assert small["first_generation_batch"] == 1


def test_ideal_speedups_compare_flops_per_sample_where_rows_were_counted_at_different_batches():
    """A step-graph cell that counts first counts at its own batch, a later method at --count-batch's:
    per sample, their FLOPs still compare."""
    rows = pipeline_results.with_speedups([
        verdict_row("graphs", "uncached", 100.0, batch=8, flops=800.0, counted_at_batch=8),
        verdict_row("cudagraphs", BLOCKS, 50.0, batch=8, flops=40.0, counted_at_batch=1),
        verdict_row("cudagraphs", CACHE_DIT, 60.0, batch=8, flops=400.0)])  # no counted_at_batch: its own batch
    assert [r["ideal_speedup"] for r in rows] == [1.0, 2.5, 2.0]


def test_count_batch_leaves_step_graph_cells_counting_at_their_own_batch(run, stand_in_graphs):
    """A generation at another batch would be one of the step graphs' own warm-ups: a step-graph
    cell that counts first counts at its own batch."""
    (result,) = run("--model", "dit", "--compile", "eager-graphs", "--batches", "2", "--prefetch", "off",
                    "--methods", "blocks", "--repeats", "1", "--count-batch", "1")
    assert [r["counted_at_batch"] for r in result["rows"]] == [2, 2] and all("ms" in r for r in result["rows"])


@pytest.mark.parametrize("in_turn", ["--in-turn", "--no-in-turn"])
def test_eager_warmup_0_times_the_first_generations_and_still_counts_the_work(run, in_turn):
    """--eager-warmup 0 (a generation of minutes: Wan at batch 8): no warm-up generation, each
    method's work counted in a generation of its own before the timed ones; compiled cells keep theirs."""
    (result,) = run("--model", "dit", "--compile", "eager", "compile", "--batches", "1", "--prefetch", "off",
                    "--methods", "blocks", "--repeats", "2", "--eager-warmup", "0", in_turn)
    assert result["settings"]["warmup"]["eager"] == 0 and result["settings"]["warmup"]["compile"] == 2
    for row in result["rows"]:
        assert "error" not in row and len(row["runs_ms"]) == 2 and positive(row["flops"]), row
        assert row["warmup_generations"] == (0 if row["compile"] == "eager" else 2)
        if row["compile"] == "eager" and in_turn == "--no-in-turn":
            assert row["warmup_s"] == 0.0
    eager = {r["method"]: r for r in result["rows"] if r["compile"] == "eager"}
    assert eager["uncached"]["ideal_speedup"] == 1.0 and eager["smoothcache blocks"]["ideal_speedup"] > 1.0


def test_warmup_sets_a_compiled_cells_warmups_and_eager_warmup_stays_its_shorthand(run):
    """--warmup compile=1 (a compiled Wan generation at batch 8 takes minutes): one warm-up generation,
    which compiles every pattern, so nothing recompiles while timed; --eager-warmup N is eager=N."""
    (result,) = run("--model", "dit", "--compile", "eager", "compile", "--batches", "1", "--prefetch", "off",
                    "--methods", "blocks", "--repeats", "1", "--warmup", "compile=1", "--eager-warmup", "0")
    assert result["settings"]["warmup"] == {**pipeline_settings.WARMUP, "compile": 1, "eager": 0}
    for row in result["rows"]:
        assert "error" not in row and row["warmup_generations"] == (1 if row["compile"] == "compile" else 0), row
        if row["compile"] == "compile":
            assert row["recompiles_while_timed"] == 0, row


@pytest.mark.parametrize(("setting", "says"), [("cudagraphs=1", "cudagraphs needs at least 2"),
                                               ("compile=0", "compile needs at least 1"),
                                               ("fast=1", "expected SETTING=N"), ("compile", "expected SETTING=N")])
def test_warmup_refuses_fewer_generations_than_a_setting_needs_and_says_how_many(setting, says, capsys):
    with pytest.raises(SystemExit):
        pipeline_speed.parse_args(["--warmup", setting])
    assert says in capsys.readouterr().err


def test_no_step_clock_saves_the_clocked_generation_and_says_so(run, capsys, monkeypatch):
    """A Wan generation takes a minute on the GPU: --no-step-clock runs one generation fewer per
    configuration, and the rows and lines say their steps were not clocked."""
    clocked = []
    real_clock = pipeline_measures.step_clock
    monkeypatch.setattr(pipeline_measures, "step_clock", lambda *a: (clocked.append(a), real_clock(*a))[1])
    (result,) = run("--model", "wan", "--compile", "eager", "--batches", "1", "--prefetch", "off",
                    "--methods", "blocks", "--no-step-clock")
    rows = result["rows"]
    assert [r["method"] for r in rows] == ["uncached", "smoothcache blocks"] and all(positive(r["ms"]) for r in rows)
    assert all(r["step_ms"] is None for r in rows) and clocked == []
    assert capsys.readouterr().out.count("steps not clocked (--no-step-clock)") == 2


# ---- eager cells: the methods in turn ------------------------------------------------------------
class Pristine(NamedTuple):
    """What a tiny DiT pipeline looks like before any cache touched it, and its uncached output."""

    pipe_class: type
    call: Any
    transformer_class: type
    transformer_attributes: frozenset[str]  # its instance attributes and child modules
    output: torch.Tensor

    @classmethod
    def of(cls, work: Any) -> Pristine:
        pipe, transformer = work.pipe, work.pipe.transformer
        return cls(type(pipe), type(pipe).__call__, type(transformer), attributes(transformer), uncached_output(work))

    def check(self, work: Any, compiled: bool = False) -> None:
        """As built; after ``torch.compile`` (``compiled``) the mark torch's wrapper sets on the model it
        wraps stays, as it does for any user who compiled."""
        pipe, transformer = work.pipe, work.pipe.transformer
        assert type(pipe) is self.pipe_class and type(pipe).__call__ is self.call
        assert "_original_call" not in vars(self.pipe_class) and "_is_cached" not in vars(self.pipe_class)  # cache-dit's
        left = attributes(transformer) - ({"_is_torch_compile"} if compiled else set())
        assert type(transformer) is self.transformer_class and left == self.transformer_attributes
        assert "forward" not in vars(transformer) and "set_timesteps" not in vars(pipe.scheduler)
        assert torch.equal(uncached_output(work), self.output)


def attributes(module: torch.nn.Module) -> frozenset[str]:
    return frozenset(vars(module)) | frozenset(module._modules)


def uncached_output(work: Any, batch: int = 2) -> torch.Tensor:
    return work.generate(batch, torch.Generator("cpu").manual_seed(0)).float().clone()


def leftovers(cell: Any) -> list[str]:
    """What another method left switched on, seen at the start of a turn."""
    pipe, transformer = cell.work.pipe, pipeline_methods.unwrapped(cell.work.pipe.transformer)
    found = [t.config.method for t in cell.turns if t.handle is not None and t.handle.enabled]
    found += [name for name in ("_is_patched", "_original_forward", "forward", "_norm1_emb") if name in attributes(transformer)]
    return found + (["cache-dit's __call__"] if "_original_call" in vars(type(pipe)) else [])


class TurnSeen(NamedTuple):
    cell: tuple[str, int, bool]  # (compile, batch, prefetch)
    method: str
    round: int
    leftovers: list[str]  # at the turn's start
    device_memo: list[bool]  # whether prefetch's device memo was on, in each generation of the turn


@pytest.fixture
def watched(monkeypatch) -> SimpleNamespace:
    """A run of the tiny DiT, watched: its workload and how it looked as built, its runner, and each
    turn taken in an eager cell (``TurnSeen``)."""
    seen = SimpleNamespace(work=None, pristine=None, runner=None, turns=[])

    def build(tiny: bool, device: str) -> Any:
        seen.work = pipeline_workloads.dit_workload(tiny, device)
        seen.pristine = Pristine.of(seen.work)
        return seen.work

    real_run, real_take_turn = pipeline_speed.Runner.run, pipeline_speed.InTurnCell.take_turn

    def run(runner: Any) -> Any:
        seen.runner = runner
        return real_run(runner)

    def take_turn(cell: Any, turn: Any, round_index: int) -> None:
        seen.turns.append(TurnSeen(turn.config[:3], turn.config.method, round_index, leftovers(cell), []))
        generate = cell.generate

        def generate_watched() -> torch.Tensor:
            seen.turns[-1].device_memo.append(base_class(type(cell.work.pipe)) is not type(cell.work.pipe))
            return generate()

        cell.generate = generate_watched
        try:
            real_take_turn(cell, turn, round_index)
        finally:
            cell.generate = generate

    monkeypatch.setitem(pipeline_workloads.BUILDERS, "dit", build)
    monkeypatch.setattr(pipeline_speed.Runner, "run", run)
    monkeypatch.setattr(pipeline_speed.InTurnCell, "take_turn", take_turn)
    return seen


def alone(config: Any) -> torch.Tensor:
    """``config``'s output from a fresh tiny DiT pipeline with that method alone, set up as the
    sequential cells set up each configuration (``configured``)."""
    work = pipeline_workloads.dit_workload(True, "cpu")
    with pipeline_methods.configured(work, config, "eager"):
        return uncached_output(work, config.batch)


def test_eager_cells_time_their_methods_in_turn_each_round_one_method_later(run, watched):
    repeats = 3
    (result,) = run("--model", "dit", "--compile", "eager", "--batches", "2", "--prefetch", "both",
                    "--repeats", str(repeats))
    check_rows(result)
    rows = result["rows"]
    assert [(r["prefetch"], r["method"]) for r in rows] == [(p, m) for p in (False, True) for m in METHODS]
    warmup = pipeline_settings.WARMUP["eager"]
    for prefetch in (False, True):
        cell = {r["method"]: r for r in rows if r["prefetch"] == prefetch}
        turns = [(t.method, t.round) for t in watched.turns if t.cell == ("eager", 2, prefetch)]
        for round_index in range(warmup + repeats):  # each round starts one method later
            shift = round_index % len(METHODS)
            assert [m for m, r in turns if r == round_index] == list(METHODS[shift:] + METHODS[:shift])
        starts = [cell[m]["runs_at_s"][r - warmup] for m, r in turns if r >= warmup]
        assert starts[0] == 0.0 and all(a < b for a, b in pairwise(starts))  # in the order the turns ran
        uncached = cell["uncached"]
        for row in cell.values():
            assert row["timing"] == "interleaved" and len(row["runs_ms"]) == len(row["runs_at_s"]) == repeats
            if row is uncached:
                assert "speedup_paired" not in row
                continue
            assert row["speedup_per_round"] == [b / r for b, r in zip(uncached["runs_ms"], row["runs_ms"], strict=True)]
            assert row["speedup_paired"] == statistics.median(row["speedup_per_round"])
    assert [t for t in watched.turns if t.leftovers] == []  # no method ran with another's switched on
    # prefetch's device memo as configured() leaves it: on, except where cache-dit wrapped the class first
    assert all(t.device_memo == [t.cell[2] and t.method != "cache-dit F1B0 static mask"] for t in watched.turns)
    for config, output in watched.runner.outputs.items():  # as each method gives alone, cache-dit's toggles included
        assert torch.equal(output, alone(config)), config
    assert len(watched.runner.outputs) == 2 * len(METHODS)
    watched.pristine.check(watched.work)


@pytest.mark.parametrize(("failing", "in_round"), [("smoothcache layers", 2), ("cache-dit F1B0 static mask", 2),
                                                   ("smoothcache blocks", 0)])  # round 0: its counted warm-up
def test_a_method_failing_in_its_turn_leaves_the_rounds_and_the_others_go_on(run, watched, monkeypatch, failing, in_round):
    """Its generation raises once, switched on: its row records the error, the others have every
    run, and the pipeline is put back all the same."""
    take_turn = pipeline_speed.InTurnCell.take_turn  # the watched one

    def raising_once(cell: Any, turn: Any, round_index: int) -> None:
        if turn.config.method != failing or round_index != in_round:
            return take_turn(cell, turn, round_index)
        generate, cell.generate = cell.generate, lambda: (_ for _ in ()).throw(RuntimeError("broke in its turn"))
        try:
            take_turn(cell, turn, round_index)
        finally:
            cell.generate = generate

    monkeypatch.setattr(pipeline_speed.InTurnCell, "take_turn", raising_once)
    (result,) = run("--model", "dit", "--compile", "eager", "--batches", "2", "--prefetch", "off", "--repeats", "3")
    rows = {r["method"]: r for r in result["rows"]}
    broken = rows.pop(failing)
    assert broken["error"] == "RuntimeError: broke in its turn" and "raising_once" in broken["traceback"]
    assert "ms" not in broken and broken["how"]
    assert [t.round for t in watched.turns if t.method == failing] == list(range(in_round + 1))
    for row in rows.values():
        assert "error" not in row and len(row["runs_ms"]) == 3
        assert row["method"] == "uncached" or len(row["speedup_per_round"]) == 3
    assert [t for t in watched.turns if t.leftovers] == []
    watched.pristine.check(watched.work)


def test_a_method_that_cannot_be_switched_off_stops_its_cell_rather_than_time_the_others_with_it(run, watched, monkeypatch):
    """Its handle's disable() raises once, leaving it enabled: no other method may take a turn with
    it on (the uncached turns would run cached), so the cell's every row records why it stopped."""
    enabled = pipeline_methods.enabled
    broke = []

    @contextlib.contextmanager
    def sticking_once(handle: Any) -> Iterator[None]:
        if broke or list(handle.schedule.keys) != ["block"]:
            with enabled(handle):
                yield
            return
        handle.enable()
        yield
        broke.append(handle)
        raise RuntimeError("disable failed")

    monkeypatch.setattr(pipeline_methods, "enabled", sticking_once)
    (result,) = run("--model", "dit", "--compile", "eager", "--batches", "2", "--prefetch", "off", "--repeats", "2")
    rows = result["rows"]
    assert len(rows) == 4 and broke
    for row in rows:
        assert "ms" not in row and "left smoothcache blocks (its handle) switched on" in row["error"], row
    assert not broke[0].enabled  # the cell's teardown still switched it off
    watched.pristine.check(watched.work)


def test_a_failing_step_clocked_generation_keeps_the_timed_runs(run, monkeypatch):
    def broken_clock(*_: Any) -> Any:
        raise RuntimeError("no clock")

    monkeypatch.setattr(pipeline_measures, "step_clock", broken_clock)
    (result,) = run("--model", "dit", "--compile", "eager", "--batches", "1", "--prefetch", "off", "--methods", "blocks",
                    "--repeats", "2")
    for row in result["rows"]:
        assert "error" not in row and len(row["runs_ms"]) == 2 and positive(row["ms"])
        assert row["after_rounds_error"] == "RuntimeError: no clock" and row["step_ms"] is None


def test_a_cell_whose_set_up_fails_records_it_in_each_row(run, monkeypatch):
    def refused(pipe: Any, **_: Any) -> Any:
        raise RuntimeError("no prefetch here")

    monkeypatch.setattr(pipeline_speed.smoothcache, "prefetch_timesteps", refused)
    (result,) = run("--model", "dit", "--compile", "eager", "--batches", "1", "--methods", "blocks")
    plain, prefetched = ([r for r in result["rows"] if r["prefetch"] == p] for p in (False, True))
    assert all("ms" in r for r in plain) and len(prefetched) == 2
    assert all(r["error"] == "RuntimeError: no prefetch here" and "ms" not in r for r in prefetched)


def test_plain_compile_cells_time_uncached_and_smoothcache_in_turn_on_one_compiled_transformer(run, watched):
    """One H100 timed compiled whole blocks at 2.58x against an ideal 2.08x, one configuration after
    the other, as the host sped up between them. Uncached, blocks and layers now take turns on one
    compiled transformer, nothing compiling once warm; cache-dit, which cannot be enabled after
    compiling (next test), is compiled alone after them; CUDA graphs cells stay one configuration
    at a time."""
    repeats, in_turn = 2, METHODS[:3]
    (result,) = run("--model", "dit", "--compile", "compile", "cudagraphs", "--batches", "2", "--prefetch", "off",
                    "--repeats", str(repeats))
    check_rows(result)
    rows = result["rows"]
    assert [(r["compile"], r["method"], r["timing"]) for r in rows] == [  # DiT's cells: CUDA graphs first
        *(("cudagraphs", m, "sequential") for m in METHODS),
        *(("compile", m, "interleaved") for m in in_turn), ("compile", METHODS[3], "sequential")]
    warmup = pipeline_settings.WARMUP["compile"]
    turns = [(t.method, t.round) for t in watched.turns]
    assert {t.cell for t in watched.turns} == {("compile", 2, False)}
    for round_index in range(warmup + repeats):
        shift = round_index % len(in_turn)
        assert [m for m, r in turns if r == round_index] == list(in_turn[shift:] + in_turn[:shift])
    cell = {r["method"]: r for r in rows if r["compile"] == "compile"}
    assert cell["uncached"]["graphs_compiled_in_warmup"] >= 1 and cell[METHODS[1]]["graphs_compiled_in_warmup"] >= 1
    for method in in_turn[1:]:
        assert len(cell[method]["speedup_per_round"]) == repeats and len(cell[method]["runs_at_s"]) == repeats
        assert "torch.compile(pipe.transformer" in cell[method]["how"]
    assert "runs_at_s" not in cell[METHODS[3]] and "speedup_paired" not in cell[METHODS[3]]
    assert result["settings"]["timing"]["compile"].startswith("interleaved")
    assert [t for t in watched.turns if t.leftovers] == []
    for method in in_turn:  # as each method gives alone (dynamo's eager backend here: the same kernels)
        config = pipeline_settings.Config("compile", 2, False, method)
        assert torch.equal(watched.runner.outputs[config], alone(config)), config
    watched.pristine.check(watched.work, compiled=True)  # the compiled wrapper and every handle taken off


def test_cache_dit_enabled_after_compiling_fails_on_dit_so_it_cannot_take_turns_under_compile():
    """Why a compile cell times cache-dit alone: switching it per turn would enable it on the compiled
    transformer, and there its block container replaces the blocks DiT's own forward reads. If a
    cache-dit release lifts this, compile cells could time it in turn too."""
    work = pipeline_workloads.dit_workload(True, "cpu")
    torch._dynamo.reset()
    work.pipe.transformer = torch.compile(work.pipe.transformer, backend="eager")
    try:
        work.generate(1, torch.Generator("cpu").manual_seed(0))
        with pytest.raises(AttributeError, match="norm1"), pipeline_methods.cache_dit_on(work, None):
            work.generate(1, torch.Generator("cpu").manual_seed(0))
    finally:
        work.pipe.transformer = pipeline_methods.unwrapped(work.pipe.transformer)
        torch._dynamo.reset()


def test_a_compiled_turn_that_fails_leaves_the_rounds_without_stopping_the_cell(run, watched, monkeypatch):
    """Under compile the transformer is torch.compile's wrapper, which sets its own forward: that is
    not a method left switched on, so the others go on."""
    take_turn = pipeline_speed.InTurnCell.take_turn  # the watched one

    def raising(cell: Any, turn: Any, round_index: int) -> None:
        if turn.config.method == METHODS[2] and round_index == 1:
            raise RuntimeError("broke in its turn")
        take_turn(cell, turn, round_index)

    monkeypatch.setattr(pipeline_speed.InTurnCell, "take_turn", raising)
    (result,) = run("--model", "dit", "--compile", "compile", "--batches", "1", "--prefetch", "off", "--repeats", "2",
                    "--methods", "blocks", "layers")
    rows = {r["method"]: r for r in result["rows"]}
    assert rows[METHODS[2]]["error"] == "RuntimeError: broke in its turn"
    assert all(len(rows[m]["runs_ms"]) == 2 for m in METHODS[:2])


def test_no_in_turn_times_eager_cells_one_configuration_after_another(run):
    (result,) = run("--model", "dit", "--compile", "eager", "--batches", "1", "--prefetch", "off",
                    "--methods", "blocks", "--no-in-turn")
    rows = result["rows"]
    assert [r["method"] for r in rows] == ["uncached", "smoothcache blocks"] and all(positive(r["ms"]) for r in rows)
    assert all(r["timing"] == "sequential" and "runs_at_s" not in r and "speedup_paired" not in r for r in rows)
    assert result["settings"]["timing"]["eager"] == result["settings"]["timing"]["compile"] == "sequential (--no-in-turn)"


def test_compile_variation_separates_replays_from_fresh_compiles(tmp_path: Path, stand_in_graphs, monkeypatch) -> None:
    """benchmarks/compile_variation.py on the tiny DiT, with a backend whose fresh compile (after the
    script's second dynamo reset) adds 1e-3 to every graph's output, as a compile that picked other
    kernels would differ: the compiled model equals itself and its step-graph generations (which
    compile nothing), the fresh compile does not; the pipeline is left as it was found."""
    compile_variation = importlib.import_module("compile_variation")
    resets, real_reset = [], torch._dynamo.reset
    monkeypatch.setattr(torch._dynamo, "reset", lambda: (resets.append(1), real_reset())[1])

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        if len(resets) != 2:
            return gm.forward
        def shifted(*args: Any) -> Any:
            return torch.utils._pytree.tree_map(
                lambda t: t + 1e-3 if isinstance(t, torch.Tensor) and t.is_floating_point() else t, gm.forward(*args))
        return shifted

    work = pipeline_workloads.dit_workload(True, "cpu")
    model, forward = work.pipe.transformer, work.pipe.transformer.forward
    found = compile_variation.measure_batch(work, 2, torch.device("cpu"), backend)
    assert found["eager_vs_eager_prefetched"] == 0.0 and found["compiled_generation_1_vs_2_vs_3"] == [0.0, 0.0]
    assert found["step_graphs_vs_compiled"] == [0.0] * 4 and found["graphs_removed_vs_compiled"] == 0.0
    assert found["graphs_compiled"]["compiled"] > 0
    assert found["graphs_compiled"]["step_graphs"] == 0 and found["graphs_compiled"]["graphs_removed"] == 0
    assert found["graphs_compiled"]["recompiled"] > 0
    assert all(d > 1e-4 for d in found["recompiled_vs_compiled"]), found["recompiled_vs_compiled"]
    steps = len(pipeline_workloads.DIT_TINY_MASK)
    assert found["step_graph_stats"]["captured"] == steps and found["step_graph_stats"]["replayed"] == steps
    assert work.pipe.transformer is model and "forward" not in vars(model) and model.forward == forward


def test_compile_variation_writes_every_batch(tmp_path: Path, stand_in_graphs) -> None:
    compile_variation = importlib.import_module("compile_variation")
    path = compile_variation.main(["--tiny", "--device", "cpu", "--backend", "eager", "--batches", "2", "1",
                                   "--out", str(tmp_path)])
    result = json.loads(path.read_text())
    assert [b["batch"] for b in result["batches"]] == [2, 1] and result["settings"]["backend"] == "eager"
    assert all(b["step_graphs_vs_compiled"] == [0.0] * 4 for b in result["batches"])


def test_files_written_before_the_own_set_up_check_read_their_comparison_as_the_cells(tmp_path: Path) -> None:
    """A result file without ``settings.exactness_reference`` compared each step-graph row with the
    cell without step graphs under ``max_abs_diff_vs_plain_path``: read back, that is the cell
    comparison, and the verdict holds no exactness figure it did not measure. Newer files keep theirs."""
    row = {"model": "dit", "compile": "graphs", "batch": 8, "prefetch": True, "method": "uncached", "ms": 480.0,
           "max_abs_diff_vs_plain_path": 0.22}
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"settings": {"model": "dit"}, "rows": [row]}))
    (read,) = pipeline_results.read_result(old)["rows"]
    assert read["max_abs_diff_vs_plain_cell"] == 0.22 and "max_abs_diff_vs_plain_path" not in read
    assert pipeline_results.targets([read], "dit")["bit_identical"]["compared"] == 0
    new = tmp_path / "new.json"
    new.write_text(json.dumps({"settings": {"model": "dit", "exactness_reference": pipeline_results.EXACTNESS_REFERENCE},
                               "rows": [{**row, "max_abs_diff_vs_plain_path": 0.0}]}))
    assert pipeline_results.read_result(new)["rows"][0]["max_abs_diff_vs_plain_path"] == 0.0
    for parts in ([new, old], [old, new]):  # merged, in either order, the file says its naming
        for f in parts:
            f.write_text(json.dumps({**json.loads(f.read_text()), "device": "cpu", "date": "today"}))
        merged = pipeline_results.merge(parts)
        assert merged["settings"]["exactness_reference"] == pipeline_results.EXACTNESS_REFERENCE


def test_the_time_left_is_taken_at_the_runs_own_paces_and_guessed_where_it_has_none(capsys) -> None:
    """``remaining_seconds``: a configuration like one measured (setting, batch, timing) costs that
    median, one of a measured setting only that setting's; one of a setting not yet measured is
    guessed from the first generation (its compile allowance and, first time per batch and method,
    the counting generation); one that never runs costs nothing. Before any pace or first generation
    (a first configuration that failed) there is no figure, and the progress line says only the time."""
    Config, UNCACHED, BLOCKS = pipeline_settings.Config, pipeline_settings.UNCACHED, pipeline_settings.BLOCKS
    work = SimpleNamespace(mask=(1, 0), steps=2, compiled_factor=0.5, compile_guess_s=10.0)
    args = SimpleNamespace(device="cpu", step_clock=False, repeats=1, max_minutes=5.0, in_turn=True,
                           warmup={}, count_batch=None)
    runner = pipeline_speed.Runner(work=work, args=args, out=None)
    eager, eager8, graphs, compiled = (Config("eager", 1, False, UNCACHED), Config("eager", 8, False, UNCACHED),
                                       Config("graphs", 1, False, UNCACHED), Config("compile", 1, False, BLOCKS))
    assert pipeline_speed.remaining_seconds(runner, [eager, compiled]) is None
    pipeline_speed.print_progress(runner, [eager, compiled])
    assert "configurations (none starts" in capsys.readouterr().out

    runner.extra.update(first_generation_s=1.0, first_generation_batch=1)
    runner.paces[("eager", 1, "interleaved")] = [2.0, 4.0, 100.0]
    runner.paces[("eager", 2, "interleaved")] = [1.0]
    assert pipeline_methods.never_runs(graphs, torch.device("cpu")) and not pipeline_methods.never_runs(eager, torch.device("cpu"))
    one = 1.0 * (0.5 + 0.1)  # a cached generation: the first's time at the computed share (and a margin)
    guessed = (pipeline_settings.WARMUP["compile"] + 1) * one * 0.5 + one + 10.0
    assert pipeline_speed.remaining_seconds(runner, [eager, graphs, compiled]) == pytest.approx(4.0 + guessed)
    assert pipeline_speed.remaining_seconds(runner, [eager8]) == pytest.approx(3.0)  # the setting's median
    runner.counts[(1, BLOCKS)] = {}  # counted already: no counting generation
    assert pipeline_speed.remaining_seconds(runner, [compiled]) == pytest.approx(guessed - one)
    runner.plan = [eager8, eager, graphs, compiled]
    pipeline_speed.print_progress(runner, [eager, graphs, compiled])
    assert "1 of 3 configurations; about" in capsys.readouterr().out  # the step-graph one never runs on the CPU
    # --eager-warmup 0 --count-batch 1: one timed generation at batch 8, and its counting one apart, at batch 1
    runner = pipeline_speed.Runner(work=work, args=SimpleNamespace(**{**vars(args), "warmup": {"eager": 0}, "count_batch": 1}),
                                   out=None)
    runner.extra.update(first_generation_s=1.0, first_generation_batch=1)
    assert pipeline_speed.remaining_seconds(runner, [eager8]) == pytest.approx(8.0 + 1.0)


def test_a_first_configuration_that_fails_before_any_generation_leaves_the_run_going(run, monkeypatch) -> None:
    """The progress line after a failed first configuration has no first generation to guess from:
    it says the time so far, and the next configurations are measured."""
    real, failed = pipeline_methods.configured, []

    @contextlib.contextmanager
    def failing_once(*args: Any, **kwargs: Any) -> Iterator[Any]:
        if not failed:
            failed.append(True)
            raise RuntimeError("out of memory")
        with real(*args, **kwargs) as attached:
            yield attached

    monkeypatch.setattr(pipeline_methods, "configured", failing_once)
    (result,) = run("--model", "dit", "--compile", "cudagraphs", "--batches", "1", "--prefetch", "off",
                    "--methods", "blocks")
    first, second = result["rows"]
    assert first["error"].startswith("RuntimeError: out of memory") and first["wall_s"] >= 0
    assert "error" not in second and positive(second["ms"]) and positive(second["wall_s"])
