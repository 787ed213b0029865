"""The command line on a tiny DiT pipeline saved to disk and loaded back with from_pretrained."""

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import make_dit_pipeline

import smoothcache.bench
import smoothcache.cli
import smoothcache.cli_pipelines
import smoothcache.plots
from smoothcache import CalibrationProfile, Schedule
from smoothcache.cli import build_parser, main


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-dit")
    make_dit_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_block_dir(tmp_path_factory):
    """The tiny DiT with a single block, for the benches under torch.compile: what they check does not
    depend on the depth, and dynamo's tracing, their cost, grows with it."""
    path = tmp_path_factory.mktemp("tiny-dit-one-block")
    make_dit_pipeline(num_layers=1).save_pretrained(path)
    return path


def test_calibrate_schedule_generate_inspect(pipeline_dir, tmp_path, capsys):
    profile_path, schedule_path = tmp_path / "profile.json", tmp_path / "schedule.json"
    common = ["--model", str(pipeline_dir), "--steps", "10", "--quiet"]
    assert main(["calibrate", *common, "--samples", "4", "--batch", "2", "--out", str(profile_path)]) == 0
    profile = CalibrationProfile.load(profile_path)
    assert profile.num_runs == 2 and profile.num_steps == 10 and profile.keys() == ["attn1", "ff"]
    assert profile.metadata["model"] == str(pipeline_dir) and len(profile.metadata["calibration_set"]) == 2
    assert "alpha   compute  est. speedup" in capsys.readouterr().out

    assert main(["schedule", str(profile_path), "--compute-fraction", "0.7", "--out", str(schedule_path)]) == 0
    schedule = Schedule.load(schedule_path)
    assert schedule.compute_fraction() <= 0.7
    assert "estimated speedup" in capsys.readouterr().out
    for solver in ("optimal", "per-block"):
        path = tmp_path / f"{solver}.json"
        assert main(["schedule", str(profile_path), "--solver", solver, "--speedup", "1.3", "--out", str(path)]) == 0
        assert profile.estimated_speedup(Schedule.load(path)) >= 1.3
        assert f"{solver} solver: estimated speedup" in capsys.readouterr().out
    assert Schedule.load(tmp_path / "per-block.json").keys[:2] == ["attn1-0", "ff-0"]
    resampled = tmp_path / "resampled.json"
    assert main(["schedule", str(profile_path), "--steps", "15", "--solver", "optimal", "--compute-fraction", "0.6", "--out", str(resampled)]) == 0
    assert Schedule.load(resampled).num_steps == 15
    assert "Resampled the 10-step profile to 15 steps by the scheduler's timesteps" in capsys.readouterr().out
    tuned = tmp_path / "tuned.json"
    assert main(["tune", *common, "--samples", "2", "--batch", "2", "--profile", str(profile_path), "--max-error", "0.05", "--out", str(tuned)]) == 0
    assert "<- chosen" in capsys.readouterr().out and Schedule.load(tuned).compute_fraction() < 1
    assert main(["schedule", str(profile_path), "--solver", "optimal", "--alpha", "0.1", "--out", str(schedule_path)]) == 1
    error = capsys.readouterr().err  # the library's message, in flags
    assert "has no threshold" in error and "pass --compute-fraction or --speedup (or --solver greedy" in error

    out = tmp_path / "images"
    assert main(["generate", *common, "--classes", "1,2,3", "--batch", "2", "--schedule", str(schedule_path), "--out", str(out)]) == 0
    record = json.loads((out / "generation.json").read_text())
    assert len(record["files"]) == 3 and all((out / f.split("/")[-1]).exists() for f in record["files"])
    forecast = tmp_path / "forecast"
    assert main(["generate", *common, "--classes", "1", "--schedule", str(schedule_path), "--forecast", "linear", "--out", str(forecast)]) == 0
    assert (forecast / "generation.json").exists()

    assert main(["inspect", str(profile_path), "--plot", str(tmp_path / "curves.png"), "--alpha", "0.2"]) == 0
    assert main(["inspect", str(schedule_path), "--plot", str(tmp_path / "plan.png")]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "profile of DiTTransformer2DModel" in printed and "FLOPs share per call" in printed


def test_cli_errors_are_one_clear_line(pipeline_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"attn1": [0, 1]}')
    assert main(["inspect", str(bad)]) == 1
    assert "starts with 0" in capsys.readouterr().err
    schedule = tmp_path / "s.json"
    Schedule({"attn1": (1, 0, 1)}).save(schedule)
    assert main(["generate", "--model", str(pipeline_dir), "--steps", "10", "--schedule", str(schedule), "--out", str(tmp_path)]) == 1
    assert "has 3 steps but --steps is 10; pass --steps 3" in capsys.readouterr().err
    # --quiet: no loading bar (run alone, diffusers' bar is on; other tests may have turned it off)
    assert main(["calibrate", "--model", str(pipeline_dir), "--steps", "4", "--classes", "5000", "--quiet", "--out", str(bad)]) == 1
    error = capsys.readouterr().err
    assert "outside 0..999" in error and len(error.splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "flag", "got"),
    [
        (["schedule", "p.json", "--alpha", "nan"], "--alpha", "nan"),
        (["schedule", "p.json", "--speedup", "nan"], "--speedup", "nan"),
        (["schedule", "p.json", "--speedup", "inf"], "--speedup", "inf"),
        (["schedule", "p.json", "--speedup", "0.5"], "--speedup", "0.5"),
        (["schedule", "p.json", "--compute-fraction", "0"], "--compute-fraction", "0"),
        (["schedule", "p.json", "--compute-fraction", "1.5"], "--compute-fraction", "1.5"),
        (["schedule", "p.json", "--alpha", "0.1", "--steps", "0"], "--steps", "0"),
        (["generate", "--model", "demo", "--steps", "0"], "--steps", "0"),
        (["generate", "--model", "demo", "--batch", "0"], "--batch", "0"),
        (["generate", "--model", "demo", "--samples", "-2"], "--samples", "-2"),
        (["generate", "--model", "demo", "--seed", "-1"], "--seed", "-1"),
        (["generate", "--model", "demo", "--guidance-scale", "inf"], "--guidance-scale", "inf"),
        (["calibrate", "--model", "demo", "--lookahead", "0"], "--lookahead", "0"),
        (["calibrate", "--model", "demo", "--steps", "2", "--lookahead", "3"], "--lookahead", "3"),
        (["tune", "--model", "demo", "--profile", "p.json", "--max-error", "nan"], "--max-error", "nan"),
        (["bench", "--model", "demo", "--schedule", "s.json", "--repeats", "0"], "--repeats", "0"),
        (["inspect", "p.json", "--alpha=-inf"], "--alpha", "-inf"),
        (["demo", "--steps", "0"], "--steps", "0"),
        (["demo", "--samples-per-class", "0"], "--samples-per-class", "0"),
        (["demo", "--timing-repeats", "nan"], "--timing-repeats", "nan"),
    ],
)
def test_bad_numbers_are_usage_errors_naming_the_flag(argv, flag, got, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--out", str(tmp_path / "out")] if argv[0] != "inspect" else argv)
    assert exit_.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert f"argument {flag}: must be" in error and error.endswith((f"got {got}", f"got '{got}'"))
    assert not list(tmp_path.iterdir())  # refused before anything was made


def test_ctrl_c_exits_130_with_one_line(tmp_path, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(smoothcache.cli, "cmd_schedule", interrupted)
    assert main(["schedule", str(tmp_path / "p.json"), "--alpha", "0.1", "--out", str(tmp_path / "s.json")]) == 130
    printed = capsys.readouterr()
    assert printed.err == "interrupted\n" and printed.out == ""


@pytest.mark.parametrize("stop_at", [2, 1])
def test_calibrate_stopped_by_ctrl_c_keeps_what_the_finished_calls_measured(stop_at, tmp_path, monkeypatch, capsys):
    import smoothcache.cli_pipelines

    real, calls = smoothcache.cli_pipelines.run_request, []

    def stopped(*args, **kwargs):
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(smoothcache.cli_pipelines, "run_request", stopped)
    out = tmp_path / "p.json"
    argv = ["calibrate", "--model", "demo", "--steps", "4", "--samples", "3", "--batch", "1", "--lookahead", "2"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 130
    if stop_at == 1:  # nothing finished: nothing saved
        assert not out.exists() and capsys.readouterr().err == "interrupted\n"
        return
    profile = CalibrationProfile.load(out)
    assert profile.num_runs == 1 and profile.metadata["partial"] == "interrupted after 1 of 3 calls"
    assert len(profile.metadata["calibration_set"]) == 1
    assert "saved a partial profile of 1 of 3 calls" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["calibrate", "--model", "demo", "--out", "profile.json"],
                                  ["generate", "--model", "demo", "--out", "images"],
                                  ["demo", "--out", "demo-out"]])
def test_an_unwritable_out_folder_fails_before_the_model_loads(argv, tmp_path, monkeypatch, capsys):
    import tempfile

    import smoothcache.cli_pipelines
    import smoothcache.demo.assets

    loaded = []
    monkeypatch.setattr(smoothcache.cli_pipelines, "load_pipeline", lambda *a, **k: loaded.append(a))
    monkeypatch.setattr(smoothcache.demo.assets, "load_demo_pipeline", lambda *a, **k: loaded.append(a))
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        if os.access(read_only, os.W_OK):  # root writes anywhere: the probe's file is refused instead
            real = tempfile.NamedTemporaryFile

            def refuse_in_read_only(*args, dir=None, **kwargs):
                if dir is not None and Path(dir).is_relative_to(read_only):
                    raise PermissionError(13, "Permission denied")
                return real(*args, dir=dir, **kwargs)

            monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse_in_read_only)
        argv = [*argv[:-1], str(read_only / argv[-1])]
        assert main(argv) == 1
    finally:
        read_only.chmod(0o700)
    error = capsys.readouterr().err
    assert loaded == [] and len(error.splitlines()) == 1
    assert f"error: --out {argv[-1]}: cannot write to " in error and "choose a writable folder" in error


def test_an_out_file_that_is_a_folder_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import smoothcache.cli_pipelines

    monkeypatch.setattr(smoothcache.cli_pipelines, "load_pipeline", pytest.fail)
    assert main(["calibrate", "--model", "demo", "--out", str(tmp_path)]) == 1
    assert "is a folder; give the JSON file to write" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "module", "extra"),
    [(["demo"], "torchmetrics", "demo"), (["demo"], "matplotlib", "demo"),
     (["generate", "--model", "demo"], "diffusers", "diffusers")],
)
def test_a_missing_optional_dependency_names_the_extra_to_install(argv, module, extra, tmp_path, monkeypatch, capsys):
    import smoothcache.cli_pipelines
    import smoothcache.demo.assets

    def missing(*args, **kwargs):
        raise ModuleNotFoundError(f"No module named {module!r}", name=module)

    monkeypatch.setattr(smoothcache.cli_pipelines, "load_pipeline", missing)
    monkeypatch.setattr(smoothcache.demo.assets, "load_demo_pipeline", missing)
    assert main([*argv, "--out", str(tmp_path / "out")]) == 1
    # endswith: a library's first import may write to stderr before (torchao does)
    assert capsys.readouterr().err.endswith(f'error: {argv[0]} needs {module}, which is not installed: pip install "smoothcache[{extra}]"\n')


def test_calibrating_the_demo_model_needs_no_torchmetrics(tmp_path, monkeypatch):
    """pip install "smoothcache[diffusers]" is enough to calibrate the shipped model: only the demo's
    quality scores need torchmetrics."""
    for name in [n for n in sys.modules if n.startswith("torchmetrics") or n == "smoothcache.demo.metrics"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchmetrics", None)  # import torchmetrics -> ModuleNotFoundError
    out = tmp_path / "p.json"
    argv = ["calibrate", "--model", "demo", "--steps", "4", "--samples", "1", "--batch", "1", "--lookahead", "2"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0 and out.exists()


def test_a_plot_without_matplotlib_names_the_plot_extra(tmp_path, monkeypatch, capsys):
    schedule = tmp_path / "s.json"
    Schedule({"attn1": (1, 0, 1)}).save(schedule)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ModuleNotFoundError
    assert main(["inspect", str(schedule), "--plot", str(tmp_path / "plan.png")]) == 1
    assert capsys.readouterr().err.endswith('error: inspect needs matplotlib, which is not installed: pip install "smoothcache[plot]"\n')


def test_a_bench_plot_without_matplotlib_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    schedule = tmp_path / "s.json"
    Schedule({"attn1": (1, 0, 1)}).save(schedule)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(smoothcache.cli, "_load", lambda args: pytest.fail("the model loaded before the refusal"))
    assert main(["bench", "--model", "demo", "--schedule", str(schedule), "--plot", str(tmp_path / "b.png")]) == 1
    assert 'bench needs matplotlib, which is not installed: pip install "smoothcache[plot]"' in capsys.readouterr().err


def test_a_mistyped_model_folder_is_named_and_a_hub_id_is_left_to_the_hub(tmp_path, monkeypatch, capsys):
    import smoothcache.cli_pipelines

    monkeypatch.chdir(tmp_path)
    loaded = []

    def offline(model, *args, **kwargs):
        loaded.append(model)
        raise OSError(f"{model} cannot be downloaded here")

    monkeypatch.setattr(smoothcache.cli_pipelines, "load_pipeline", offline)
    for model in ("./no-such-folder", "~/no-such-folder", "models/dit/no-such-folder"):
        assert main(["generate", "--model", model, "--out", "images"]) == 1
        assert "the folder does not exist" in capsys.readouterr().err
    assert loaded == []
    assert main(["generate", "--model", "no-org/no-model", "--out", "images"]) == 1
    assert loaded == ["no-org/no-model"] and "does not exist" not in capsys.readouterr().err


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "smoothcache", "--version"], check=False, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("smoothcache ")


def test_bench_reports_speedup_ideal_and_warns_when_caching_gains_nothing(pipeline_dir, tmp_path, capsys):
    schedule, out = tmp_path / "s.json", tmp_path / "bench.json"
    Schedule.fixed_interval(["attn1", "ff"], 10, 2).save(schedule)
    args = ["bench", "--model", str(pipeline_dir), "--schedule", str(schedule), "--classes", "1,2", "--repeats", "2", "--out", str(out)]
    assert main(args) == 0
    (result,) = json.loads(out.read_text())["cells"]
    assert result["compute_fraction"] == pytest.approx(0.6) and (result["compile"], result["batch"]) == ("none", 2)
    assert result["ideal_speedup"] > 1 and result["uncached_seconds"] > 0 and result["cached_seconds"] > 0
    assert result["speedup"] == pytest.approx(result["uncached_seconds"] / result["cached_seconds"])
    assert "speedup" in capsys.readouterr().out
    assert main([*args, "--forecast", "linear"]) == 0
    assert json.loads(out.read_text())["cells"][0]["compute_fraction"] == pytest.approx(0.6)


@dataclass
class CompileCounts:
    """What a bench under ``dynamo_only_compiles`` compiled: each ``torch.compile`` target, and the
    frames dynamo compiled during each timed run."""

    compiled: list[object] = field(default_factory=list)
    while_timed: list[int] = field(default_factory=list)


@pytest.fixture
def dynamo_only_compiles(monkeypatch) -> Iterator[CompileCounts]:
    """torch.compile with dynamo only (inductor would make these tests slow), counted."""
    from torch._dynamo.utils import counters

    counts, real_compile, real_timed = CompileCounts(), torch.compile, smoothcache.bench.timed

    def compile_with_dynamo_only(model, *args, **kwargs):
        counts.compiled.append(model)
        return real_compile(model, backend="eager")

    def counting_timed(fn, device):
        before = counters["frames"]["total"]
        result = real_timed(fn, device)
        counts.while_timed.append(counters["frames"]["total"] - before)
        return result

    monkeypatch.setattr(torch, "compile", compile_with_dynamo_only)
    monkeypatch.setattr(smoothcache.bench, "timed", counting_timed)
    torch._dynamo.reset()
    yield counts
    torch._dynamo.reset()


def test_bench_compiles_the_transformer_measures_the_ideal_eagerly_and_compiles_nothing_while_timed(
    one_block_dir, tmp_path, capsys, dynamo_only_compiles
):
    """--compile wraps the transformer whole; the FLOP count runs eagerly, and after the warm-up no
    graph is compiled."""
    from torch._dynamo.utils import counters

    schedule, out = tmp_path / "s.json", tmp_path / "bench.json"
    Schedule.fixed_interval(["attn1", "ff"], 10, 2).save(schedule)
    assert main(["bench", "--model", str(one_block_dir), "--schedule", str(schedule), "--classes", "1,2",
                 "--repeats", "2", "--compile", "model", "--out", str(out)]) == 0
    assert counters["frames"]["total"] > 0  # the warm-up compiled
    (result,) = json.loads(out.read_text())["cells"]
    assert len(dynamo_only_compiles.compiled) == 1 and dynamo_only_compiles.while_timed == [0, 0, 0, 0]
    assert result["ideal_speedup"] > 1 and result["speedup"] > 0
    assert "torch.compile model" in capsys.readouterr().out


def test_bench_compiles_each_block_on_its_own_under_regional_and_compiles_nothing_while_timed(
    one_block_dir, tmp_path, capsys, dynamo_only_compiles
):
    """--compile regional: each of DiT's transformer_blocks compiled in place (DiT names no repeated
    blocks for diffusers' compile_repeated_blocks); whole blocks cached, nothing compiled while timed."""
    schedule, out = tmp_path / "s.json", tmp_path / "bench.json"
    Schedule.fixed_interval(["block"], 10, 2).save(schedule)
    assert main(["bench", "--model", str(one_block_dir), "--schedule", str(schedule), "--classes", "1,2",
                 "--repeats", "2", "--compile", "regional", "--out", str(out)]) == 0
    (result,) = json.loads(out.read_text())["cells"]
    compiled = [type(getattr(fn, "__self__", None)).__name__ for fn in dynamo_only_compiles.compiled]
    assert compiled == ["BasicTransformerBlock"]  # its one block's call
    assert dynamo_only_compiles.while_timed == [0, 0, 0, 0] and result["compile"] == "regional"
    assert result["ideal_speedup"] > 1 and result["speedup"] > 0
    assert "torch.compile regional" in capsys.readouterr().out


def test_bench_times_one_cell_per_compile_setting_and_batch_size(one_block_dir, tmp_path, capsys, monkeypatch):
    """--compile none model --batch-sizes 1 3: four cells, each against its own uncached runs; the
    transformer is compiled afresh per setting (dynamo only here) and put back at the end."""
    schedule, out = tmp_path / "s.json", tmp_path / "bench.json"
    Schedule.fixed_interval(["block"], 10, 2).save(schedule)
    compiled_modes: list[str | None] = []
    real_compile = torch.compile

    def compile_with_dynamo_only(model, mode=None):
        compiled_modes.append(mode)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", compile_with_dynamo_only)
    batches_run: list[int] = []
    real_run_request = smoothcache.cli_pipelines.run_request

    def counting_run_request(pipe, request, *args, **kwargs):
        batches_run.append(request.size)
        return real_run_request(pipe, request, *args, **kwargs)

    monkeypatch.setattr(smoothcache.cli_pipelines, "run_request", counting_run_request)
    plotted = []
    monkeypatch.setattr(smoothcache.plots, "plot_bench_cells", lambda cells, path, title: plotted.append(cells) or path)
    args = ["bench", "--model", str(one_block_dir), "--schedule", str(schedule), "--classes", "1,2", "--repeats", "1",
            "--compile", "none", "model", "--batch-sizes", "1", "3", "--quiet", "--out", str(out),
            "--plot", str(tmp_path / "plots" / "bench.png")]
    assert main(args) == 0
    torch._dynamo.reset()
    record = json.loads(out.read_text())
    cells = [(c["compile"], c["batch"]) for c in record["cells"]]
    assert cells == [("none", 1), ("none", 3), ("model", 1), ("model", 3)]
    assert all(c["speedup"] > 0 and c["ideal_speedup"] > 1 for c in record["cells"])
    assert compiled_modes == [None] and set(batches_run) == {1, 3}  # labels 1,2 repeated to fill 3
    assert record["steps"] == 10 and record["repeats"] == 1
    printed = capsys.readouterr().out
    table = printed.split("peak MiB (uncached/cached)")[-1].split("plot ->")[0].strip().splitlines()
    assert [line.split()[:2] for line in table] == [["none", "1"], ["none", "3"], ["model", "1"], ["model", "3"]]
    assert "over plain" not in printed  # a column for step graphs only
    assert plotted == [record["cells"]] and (tmp_path / "plots").is_dir()


def test_the_bench_plot_draws_speedups_ideals_step_graph_gains_and_memory(tmp_path, monkeypatch):
    """Per cell a speedup bar, a tick at its ideal where there is one, a diamond where step graphs
    ran; where memory was measured (a GPU) a second panel with both calls' peaks."""
    pytest.importorskip("matplotlib")
    real_save = smoothcache.plots.save_figure
    figures = []
    monkeypatch.setattr(smoothcache.plots, "save_figure", lambda fig, path: figures.append(fig) or real_save(fig, path))
    cell = {"compile": "none", "batch": 1, "speedup": 1.8, "ideal_speedup": 2.0, "peak_memory_mib": None}
    cpu = smoothcache.plots.plot_bench_cells([cell, {**cell, "batch": 8, "ideal_speedup": None}], tmp_path / "cpu.png", "t")
    gpu_cells = [{**cell, "peak_memory_mib": {"uncached": 900.0, "cached": 950.0}},
                 {**cell, "compile": "model", "speedup_over_plain": 3.6, "peak_memory_mib": {"uncached": 800.0, "cached": 820.0}}]
    gpu = smoothcache.plots.plot_bench_cells(gpu_cells, tmp_path / "gpu.png")
    assert cpu.stat().st_size > 0 and gpu.stat().st_size > 0
    (speed,) = figures[0].axes
    assert [round(bar.get_height(), 2) for bar in speed.patches] == [1.8, 1.8]
    assert [line.get_ydata()[0] for line in speed.lines if line.get_marker() in ("None", "")] == [2.0, 1.0]  # an ideal, the 1.0 line
    assert sum(line.get_marker() == "D" for line in speed.lines) == 0
    speed, memory = figures[1].axes
    assert sum(line.get_marker() == "D" and line.get_ydata()[0] == 3.6 for line in speed.lines) == 1
    assert sorted(bar.get_height() for bar in memory.patches) == [800.0, 820.0, 900.0, 950.0]


def test_bench_warms_up_as_often_as_warmups_says_and_records_it(one_block_dir, tmp_path, capsys, monkeypatch):
    """--warmups 2: one FLOP-counting run, then two warm-ups and one timed run of each (uncached,
    cached), and the host's waits counted on CUDA only: seven pipeline calls on the CPU."""
    schedule, out = tmp_path / "s.json", tmp_path / "bench.json"
    Schedule.fixed_interval(["block"], 10, 2).save(schedule)
    calls = []
    real_run_request = smoothcache.cli_pipelines.run_request
    monkeypatch.setattr(smoothcache.cli_pipelines, "run_request",
                        lambda *args, **kwargs: calls.append(1) or real_run_request(*args, **kwargs))
    args = ["bench", "--model", str(one_block_dir), "--schedule", str(schedule), "--classes", "1,2", "--repeats", "1",
            "--warmups", "2", "--quiet", "--out", str(out)]
    assert main(args) == 0
    assert len(calls) == 1 + 2 * (2 + 1)
    (cell,) = json.loads(out.read_text())["cells"]
    assert cell["warmups"] == 2
    assert "median of 1 after 2 warm-ups each" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--compile", "model-cudagraphs", "--warmups", "1"],
         "--warmups 1 would time CUDA graphs' capture under --compile model-cudagraphs: give --warmups 2 or more"),
        (["--plot", "bench"], "--plot bench: give a file name ending in .png"),
        (["--step-graphs", "--warmups", "2"], "--step-graphs warms up its own way"),
    ],
)
def test_bench_refuses_warmups_that_would_time_capture_before_loading_the_model(extra, message, tmp_path, capsys,
                                                                                monkeypatch):
    schedule = tmp_path / "s.json"
    Schedule.fixed_interval(["block"], 10, 2).save(schedule)
    monkeypatch.setattr(smoothcache.cli, "_replays_on", lambda device: True)  # --step-graphs asks for CUDA first
    monkeypatch.setattr(smoothcache.cli, "_load", lambda args: pytest.fail("the model loaded before the refusal"))
    assert main(["bench", "--model", "demo", "--schedule", str(schedule), *extra]) == 1
    assert message in capsys.readouterr().err


def test_the_bench_table_shows_the_speedup_over_the_plain_pipeline_where_step_graphs_ran():
    cell = {"compile": "none", "batch": 1, "uncached_seconds": 0.5, "cached_seconds": 0.25, "speedup": 2.0,
            "ideal_speedup": 2.08, "efficiency": 0.96, "peak_memory_mib": None}
    table = smoothcache.cli.bench_cells_table([{**cell, "speedup_over_plain": 5.5}, {**cell, "compile": "model"}])
    header, graphs, plain = table.splitlines()
    assert "over plain" in header and graphs.split()[-2] == "5.50x" and plain.split()[-2] == "-"


def test_bench_diagnoses_caches_that_gain_little():
    from smoothcache.bench import diagnose

    assert "gains nothing" in diagnose(1.01, 1.0)[0]
    assert "gains nothing" in diagnose(0.9, 2.0)[0]
    assert "reaches 50% of its ideal 3.00x" in diagnose(1.5, 3.0)[0]
    assert diagnose(1.9, 2.0) == [] and diagnose(1.3, None) == []


def test_bench_diagnoses_a_loop_that_waits_for_the_gpu_every_step():
    from smoothcache.bench import diagnose

    waits = diagnose(1.8, 2.08, host_syncs=300, steps=50)
    assert len(waits) == 1 and "300 times in one generation of 50 steps" in waits[0]
    assert "copy them to the device once per generation" in waits[0]
    assert diagnose(1.98, 2.08, host_syncs=300, steps=50) == []  # at the ideal, the waits cost nothing
    assert diagnose(1.8, 2.08, host_syncs=1, steps=50) == []  # one wait per generation: the end of it
    assert diagnose(1.8, 2.08, host_syncs=None, steps=50) == []  # not counted (no CUDA)
    both = diagnose(1.01, 2.0, host_syncs=100, steps=50)
    assert "gains nothing" in both[0] and "wait for the GPU" in both[1]


def test_a_few_step_sampler_is_told_caching_rarely_pays(tmp_path, caplog):
    from smoothcache.bench import diagnose

    assert any("with 4 steps each reuse replaces a large share" in hint for hint in diagnose(1.3, 1.4, steps=4))
    assert diagnose(1.3, 1.4, steps=20) == []
    argv = ["calibrate", "--model", "demo", "--samples", "1", "--batch", "1", "--lookahead", "2", "--quiet"]
    with caplog.at_level("WARNING", logger="smoothcache"):
        assert main([*argv, "--steps", "4", "--out", str(tmp_path / "p4.json")]) == 0
        assert "4 steps: a few-step sampler, where adjacent steps' outputs differ by" in caplog.text
        assert "at most 50% of a layer's steps can reuse within the lookahead" in caplog.text
        caplog.clear()
        assert main([*argv, "--steps", "12", "--out", str(tmp_path / "p12.json")]) == 0
        assert "few-step" not in caplog.text


def test_bench_points_a_layer_schedule_far_from_its_ideal_to_whole_blocks():
    from smoothcache.bench import diagnose

    hint = diagnose(1.3, 2.08, caches_layers=True)
    assert len(hint) == 1 and "caching whole blocks" in hint[0]
    assert diagnose(1.3, 2.08, caches_layers=False) == []  # a block schedule: nothing more to skip
    assert diagnose(1.9, 2.08, caches_layers=True) == []  # near its ideal
    assert len(diagnose(1.01, 2.08, caches_layers=True)) == 1  # gains nothing: that warning alone


def test_bench_points_a_gpu_run_without_cuda_graphs_to_them():
    from smoothcache.bench import diagnose

    hint = diagnose(1.27, 2.08, cuda_graphs=False)
    assert len(hint) == 1 and "mode='reduce-overhead'" in hint[0] and "--compile model-cudagraphs" in hint[0]
    assert diagnose(1.27, 2.08, cuda_graphs=True) == []  # graphs already: launches are not the cost
    assert diagnose(1.27, 2.08) == []  # not known (a CPU run, or a caller that did not say)
    assert diagnose(1.9, 2.08, cuda_graphs=False) == []  # near its ideal
    nothing = diagnose(1.01, 2.08, cuda_graphs=False)  # gains nothing: that warning alone, naming CUDA graphs
    assert len(nothing) == 1 and "gains nothing" in nothing[0] and "mode='reduce-overhead'" in nothing[0]
    both = diagnose(1.27, 2.08, caches_layers=True, cuda_graphs=False)
    assert "caching whole blocks" in both[0] and "CUDA graphs" in both[1]


def test_host_syncs_are_counted_on_cuda_only():
    from smoothcache.bench import count_host_syncs

    calls = []
    assert count_host_syncs(lambda: calls.append(1), torch.device("cpu")) is None
    assert calls == []  # off CUDA nothing is run to count


def test_host_syncs_are_the_sync_debug_warnings_and_other_warnings_pass_on(monkeypatch):
    """The CUDA path with torch's sync debug mode stood in for: it warns at each sync, as torch does."""
    import warnings

    from smoothcache.bench import count_host_syncs

    modes = [1]  # the user's own mode, which must come back
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: modes[-1])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def run():
        assert modes[-1] == "warn"
        for _ in range(3):
            warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
        warnings.warn("a warning of the pipeline's own", FutureWarning, stacklevel=1)

    with pytest.warns(FutureWarning, match="of the pipeline's own"):
        assert count_host_syncs(run, torch.device("cuda")) == 3
    assert modes[-1] == 1


def test_an_all_ones_schedule_has_an_ideal_speedup_of_one(dit_pipe):
    from conftest import generate

    from smoothcache.bench import benchmark_schedule, diagnose

    result = benchmark_schedule(dit_pipe, Schedule({"attn1": (1,) * 10}), lambda: generate(dit_pipe), repeats=1)
    assert result.ideal_speedup == pytest.approx(1.0) and result.compute_fraction == 1.0
    assert result.host_syncs is None  # counted on CUDA only
    assert result.warnings == diagnose(result.speedup, result.ideal_speedup)  # the result carries its diagnosis


def test_off_cuda_the_bench_does_not_judge_cuda_graphs(dit_pipe, monkeypatch):
    from conftest import generate

    from smoothcache import bench

    seen = []
    monkeypatch.setattr(bench, "diagnose", lambda *args: seen.append(args) or [])
    bench.benchmark_schedule(
        dit_pipe, Schedule({"attn1": (1, 0) * 5}), lambda: generate(dit_pipe), repeats=1, cuda_graphs=False
    )
    assert seen[0][-1] is None  # launches cost the host on a GPU only: no hint on a CPU run


def test_the_ideal_speedup_of_a_block_schedule_counts_the_blocks_flops(dit_pipe):
    from conftest import generate

    from smoothcache.bench import benchmark_schedule

    plan = (1, 0) * 5
    blocks = benchmark_schedule(dit_pipe, Schedule({"block": plan}), lambda: generate(dit_pipe), repeats=1)
    layers = benchmark_schedule(dit_pipe, Schedule({"attn1": plan, "ff": plan}), lambda: generate(dit_pipe), repeats=1)
    # a whole block holds attn1 and ff and more: skipping it half the time saves more than they do
    assert blocks.ideal_speedup > layers.ideal_speedup > 1.0


def test_calibrate_and_schedule_for_forecasting(pipeline_dir, tmp_path, capsys):
    profile_path, schedule_path = tmp_path / "profile.json", tmp_path / "schedule.json"
    common = ["--model", str(pipeline_dir), "--steps", "10", "--quiet"]
    assert main(["calibrate", *common, "--samples", "2", "--batch", "2", "--forecast", "linear", "--out", str(profile_path)]) == 0
    profile = CalibrationProfile.load(profile_path)
    assert profile.forecast_errors is not None and profile.step_weights is not None
    capsys.readouterr()
    assert main(["schedule", str(profile_path), "--compute-fraction", "0.5", "--forecast", "linear", "--out", str(schedule_path)]) == 0
    assert Schedule.load(schedule_path) == profile.schedule(compute_fraction=0.5, forecast="linear")
    assert "generate and bench use --forecast linear with it by default" in capsys.readouterr().out
    assert Schedule.load(schedule_path).planned["forecast"] == "linear"
    unweighted = tmp_path / "unweighted.json"
    assert main(["schedule", str(profile_path), "--compute-fraction", "0.5", "--unweighted", "--out", str(unweighted)]) == 0
    assert Schedule.load(unweighted) == profile.schedule(compute_fraction=0.5, weigh_steps=False)
    assert main(["generate", *common, "--samples", "2", "--schedule", str(schedule_path), "--forecast", "linear",
                 "--out", str(tmp_path / "images")]) == 0
    tuned = tmp_path / "tuned.json"
    assert main(["tune", *common, "--samples", "2", "--batch", "2", "--profile", str(profile_path), "--max-error", "0.05",
                 "--forecast", "linear", "--out", str(tuned)]) == 0
    assert "<- chosen" in capsys.readouterr().out


def test_inspect_of_a_file_nested_too_deep_or_not_utf8_is_one_line(tmp_path, capsys):
    deep, binary = tmp_path / "deep.json", tmp_path / "binary.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    binary.write_bytes(b"\xff\xfe{}")
    assert main(["inspect", str(deep)]) == 1
    assert main(["inspect", str(binary)]) == 1
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and "nests lists or objects too deeply" in errors[0] and "is not UTF-8" in errors[1]


def test_help_imports_neither_torch_nor_diffusers():
    """--help answers without importing torch (seconds on a busy machine): commands import what they need."""
    code = ("import sys, smoothcache.cli\n"
            "try:\n    smoothcache.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_every_option_has_help_and_every_command_an_example_that_parses():
    import argparse
    import shlex

    from smoothcache.cli import EXAMPLES

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == set(EXAMPLES)
    for name, command in commands.items():
        unexplained = [a.dest for a in command._actions if not a.help and a.dest != "help"]
        assert not unexplained, (name, unexplained)
        args = parser.parse_args(shlex.split(EXAMPLES[name])[1:])
        assert args.command == name and EXAMPLES[name] in command.format_help()


def test_split_finds_the_least_drifting_split_and_says_how_to_run_it(pipeline_dir, tmp_path, capsys):
    out = tmp_path / "split.json"
    common = ["--model", str(pipeline_dir), "--steps", "10", "--quiet", "--samples", "2", "--batch", "2"]
    assert main(["split", *common, "--compute-fraction", "0.6", "--step-counts", "10,8,6", "--components", "attn1,ff",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = [line.split() for line in printed.splitlines() if line[:5].strip().isdigit()]
    assert [int(r[0]) for r in rows] == [10, 8, 6] and sum("<-" in r for r in rows) == 1
    chosen = next(r for r in rows if "<-" in r)
    assert float(chosen[3]) == min(float(r[3]) for r in rows)
    schedule = Schedule.load(out)
    assert schedule.num_steps == int(chosen[0]) and schedule.keys == ["attn1", "ff"]
    assert f"Run it: smoothcache generate --steps {chosen[0]}" in printed
    assert main(["split", *common, "--compute-fraction", "0.6", "--step-counts", "12", "--out", str(out)]) == 1
    assert "step_counts must lie in [2, full_steps=10]" in capsys.readouterr().err


@pytest.mark.parametrize("compile_setting", ["none", "model"])
def test_bench_with_step_graphs_times_uncached_then_cached_each_replayed(
    compile_setting, one_block_dir, tmp_path, capsys, monkeypatch
):
    """--step-graphs: attaching or removing the cache drops the graphs, so the uncached runs come
    first and the cached ones after, each phase warmed up through a capture and one replay (a
    stand-in capture with a graph's semantics here, tests/op_replay.py; dynamo only)."""
    from op_replay import OpReplayCapture

    from smoothcache.graph_replay import StepGraphs

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: real_compile(model, backend="eager"))
    monkeypatch.setattr(smoothcache.bench, "_attach_step_graphs", lambda pipe: StepGraphs(pipe, capture=OpReplayCapture()))
    monkeypatch.setattr(smoothcache.cli, "_replays_on", lambda device: True)
    schedule, out = tmp_path / "s.json", tmp_path / "bench.json"
    Schedule.fixed_interval(["block"], 10, 2).save(schedule)
    torch._dynamo.reset()
    args = ["bench", "--model", str(one_block_dir), "--schedule", str(schedule), "--classes", "1,2", "--repeats", "2",
            "--compile", compile_setting, "--step-graphs", "--quiet", "--out", str(out)]
    assert main(args) == 0
    torch._dynamo.reset()
    (cell,) = json.loads(out.read_text())["cells"]
    assert cell["timing"] == "sequential" and cell["speedup"] > 0 and cell["ideal_speedup"] > 1
    for name in ("uncached", "cached"):  # a plain generation, the capture, one replay untimed, two timed
        counts = cell["step_graphs"][name]
        assert (counts["plain"], counts["captured"], counts["replayed"]) == (10, 10, 30)
        assert counts["incomplete"] == 0 and counts["capture_error"] is None
    # the plain pipeline, uncached without graphs, timed too: the user's gain from graphs and cache together
    assert cell["plain_uncached_seconds"] > 0
    assert cell["speedup_over_plain"] == pytest.approx(cell["plain_uncached_seconds"] / cell["cached_seconds"])
    printed = capsys.readouterr().out
    assert "step graphs (uncached runs, then cached ones)" in printed and "without step graphs: uncached" in printed


def test_bench_refuses_step_graphs_where_they_cannot_replay_before_loading(pipeline_dir, tmp_path, capsys, monkeypatch):
    schedule = tmp_path / "s.json"
    Schedule.fixed_interval(["block"], 10, 2).save(schedule)
    loads = []
    monkeypatch.setattr(smoothcache.cli, "_load", lambda args: loads.append(args))
    args = ["bench", "--model", str(pipeline_dir), "--schedule", str(schedule), "--classes", "1,2", "--step-graphs"]
    assert main([*args, "--compile", "model-cudagraphs"]) != 0
    assert "not model-cudagraphs" in capsys.readouterr().err
    assert main(args) != 0  # on the CPU
    assert "run on a CUDA device (--device cuda), not cpu" in capsys.readouterr().err
    assert loads == []


def test_bench_step_graphs_on_a_pipeline_they_cannot_take_is_an_error_not_a_traceback(monkeypatch):
    """step_graphs refuses what it cannot replay with a TypeError (no scheduler, two experts): the
    bench says it as the ValueError the command line reports."""
    from op_replay import OpReplayCapture

    import smoothcache.graph_replay

    monkeypatch.setattr(smoothcache.graph_replay, "step_graphs",
                        lambda pipe: smoothcache.graph_replay.StepGraphs(pipe, capture=OpReplayCapture()))
    with pytest.raises(ValueError, match="--step-graphs cannot replay this pipeline: step_graphs needs a diffusers pipeline"):
        smoothcache.bench._attach_step_graphs(make_dit_pipeline().transformer)


def test_bench_with_step_graphs_leaves_nothing_attached_when_a_phase_fails(dit_pipe, monkeypatch):
    def failing(pipe):
        raise ValueError("no graphs here")

    monkeypatch.setattr(smoothcache.bench, "_attach_step_graphs", failing)
    schedule = Schedule.fixed_interval(["block"], 10, 2)
    run = lambda: dit_pipe(class_labels=[1], num_inference_steps=10, output_type="pt")
    with pytest.raises(ValueError, match="no graphs here"):
        smoothcache.bench.benchmark_schedule(dit_pipe, schedule, run, repeats=1, measure_ideal=False, step_graphs=True)
    from smoothcache.ownership import holder

    assert holder(dit_pipe.transformer) is None  # the cache is off again


def test_bench_with_skip_guards_times_compiled_runs_under_the_stance(one_block_dir, tmp_path, monkeypatch):
    """--skip-guards: compiled runs are timed under set_stance(skip_guard_eval_unsafe=True), in turn
    as usual, and only they; an uncompiled cell says it did not apply."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: real_compile(model, backend="eager"))
    stances: list[bool] = []
    real_run_request = smoothcache.cli_pipelines.run_request

    def noting_the_stance(*args, **kwargs):
        stances.append(torch._dynamo.eval_frame._is_skip_guard_eval_unsafe_stance())
        return real_run_request(*args, **kwargs)

    monkeypatch.setattr(smoothcache.cli_pipelines, "run_request", noting_the_stance)
    schedule, out = tmp_path / "s.json", tmp_path / "bench.json"
    Schedule.fixed_interval(["attn1", "ff"], 10, 2).save(schedule)
    torch._dynamo.reset()
    args = ["bench", "--model", str(one_block_dir), "--schedule", str(schedule), "--classes", "1,2", "--repeats", "2",
            "--compile", "none", "model", "--skip-guards", "--quiet", "--out", str(out)]
    assert main(args) == 0
    torch._dynamo.reset()
    cells = json.loads(out.read_text())["cells"]
    assert [(c["compile"], c["skip_guards"], c["timing"]) for c in cells] == [
        ("none", False, "interleaved"), ("model", True, "interleaved")]
    # each cell: the ideal's run, the warm-up (1 uncompiled, 3 compiled, each way), then 2 timed each way
    assert stances == [False] * (1 + 2 + 4) + [False] * (1 + 6) + [True] * 4
    assert all(c["speedup"] > 0 for c in cells)
