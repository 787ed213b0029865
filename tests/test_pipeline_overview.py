"""benchmarks/pipeline_overview.py on the Flux and Wan result files the docs show: every cell drawn,
each speedup within its own file and cell, cells from two cards never mixed."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
pipeline_overview = importlib.import_module("pipeline_overview")
pipeline_results = importlib.import_module("pipeline_results")

FILES = sorted(p for m in ("flux", "wan") for p in pipeline_overview.RESULTS.glob(f"pipeline-speed-{m}-*.json"))


def test_every_speedup_is_its_own_cells_uncached_time_over_the_methods_time():
    found = pipeline_overview.overview(FILES, ["flux", "wan"])
    assert {c["model"] for c in found["cells"]} == {"flux", "wan"}
    for cell in found["cells"]:
        for measured in cell["methods"].values():
            assert measured["speedup"] == pytest.approx(cell["uncached_ms"] / measured["ms"])
            assert measured["efficiency"] == pytest.approx(measured["speedup"] / measured["ideal_speedup"])
        rows = pipeline_results.read_result(pipeline_overview.RESULTS / cell["file"])["rows"]
        assert any(r["method"] == "uncached" and r["ms"] == cell["uncached_ms"]
                   and (r["compile"], r["batch"]) == (cell["compile"], cell["batch"]) for r in rows)


def test_a_cell_measured_on_two_cards_is_two_groups_each_with_its_own_methods():
    found = pipeline_overview.overview(FILES, ["wan"])
    eager_b8 = [c for c in found["cells"] if (c["compile"], c["batch"]) == ("eager", 8)]
    assert sorted(c["card"] for c in eager_b8) == ["H100", "H200"]
    by_card = {c["card"]: set(c["methods"]) for c in eager_b8}
    assert by_card == {"H100": {"cache-dit F1B0 static mask"}, "H200": {"smoothcache blocks"}}


def test_the_order_is_compile_setting_then_batch():
    found = pipeline_overview.overview(FILES, ["flux"])
    keys = [(c["compile"], c["batch"]) for c in found["cells"]]
    rank = {"eager": 0, "compile": 1, "cudagraphs": 2}
    assert keys == sorted(keys, key=lambda k: (rank[k[0]], k[1]))


def _row(compile_mode: str, method: str, ms: float, ideal: float | None, part: int) -> dict:
    return {"compile": compile_mode, "batch": 1, "prefetch": False, "method": method, "ms": ms,
            "ideal_speedup": ideal, "from_file": part}


def test_a_merged_files_cells_carry_their_parts_dates_a_missing_ideal_prints_and_cells_without_rows_are_named(
    tmp_path, capsys
):
    """Parts on different days: each cell takes its own part's date; a method without a FLOP count has
    no ideal (printed n/a); a cell whose uncached row is missing is left out, and the run says so."""
    settings = {"model": "flux", "pipeline": "FluxPipeline", "dtype": "torch.bfloat16", "steps": 28,
                "computed_steps_in_mask": 15, "exactness_reference": pipeline_results.EXACTNESS_REFERENCE}
    merged = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-12-06 10:00:00", "settings": settings,
              "merged_from": [{"date": "2026-12-01 09:00:00"}, {"date": "2026-12-06 10:00:00"}],
              "rows": [_row("eager", "uncached", 100.0, 1.0, 0), _row("eager", "smoothcache blocks", 50.0, None, 0),
                       _row("compile", "uncached", 80.0, 1.0, 1), _row("compile", "smoothcache blocks", 40.0, 2.1, 1),
                       _row("cudagraphs", "smoothcache blocks", 40.0, 2.1, 1)]}
    path = tmp_path / "pipeline-speed-flux-merged.json"
    path.write_text(json.dumps(merged))
    found = pipeline_overview.overview([path], ["flux"])
    assert [(c["compile"], c["date"]) for c in found["cells"]] == [("eager", "2026-12-01"), ("compile", "2026-12-06")]
    eager = found["cells"][0]["methods"]["smoothcache blocks"]
    assert eager["speedup"] == 2.0 and eager["ideal_speedup"] is None and eager["efficiency"] is None
    assert found["left_out"] == ["pipeline-speed-flux-merged.json: cudagraphs, batch 1 (no timed uncached row)"]
    pytest.importorskip("matplotlib")
    assert pipeline_overview.main(["--files", str(path), "--models", "flux", "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "blocks 2.00x (ideal n/a)" in printed and "left out: pipeline-speed-flux-merged.json: cudagraphs" in printed


def test_the_command_writes_the_json_and_the_plot_and_refuses_a_model_without_cells(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "overview"
    assert pipeline_overview.main(["--files", *map(str, FILES), "--out", str(out)]) == 0
    written = json.loads(out.with_suffix(".json").read_text())
    assert written["files"] == [p.name for p in FILES] and len(written["cells"]) >= 10
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "flux  compile    b8" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no cell of dit"):
        pipeline_overview.main(["--models", "dit", "--files", *map(str, FILES[:1]), "--out", str(out)])


def test_a_cell_re_measured_the_same_day_on_the_same_card_is_told_apart_by_its_time(tmp_path):
    settings = {"model": "wan", "pipeline": "WanPipeline", "dtype": "torch.bfloat16", "steps": 30,
                "computed_steps_in_mask": 18, "exactness_reference": pipeline_results.EXACTNESS_REFERENCE}
    paths = []
    for name, time, method in (("a", "05:28:42", "smoothcache blocks"), ("b", "07:10:00", "cache-dit F1B0 static mask")):
        rows = [{"compile": "compile", "batch": 8, "prefetch": False, "method": m, "ms": ms, "ideal_speedup": ideal}
                for m, ms, ideal in (("uncached", 250.0, 1.0), (method, 150.0, 1.67))]
        path = tmp_path / f"pipeline-speed-wan-{name}.json"
        path.write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "date": f"2026-12-06 {time}",
                                    "settings": settings, "rows": rows}))
        paths.append(path)
    other = {"compile": "eager", "batch": 1, "card": "H100", "date": "2026-12-06", "time": "04:00"}
    cells = pipeline_overview.overview(paths, ["wan"])["cells"]
    assert pipeline_overview.tick_labels([*cells, other]) == [
        "compile, b8\nH100 12-06 05:28", "compile, b8\nH100 12-06 07:10", "eager, b1\nH100 12-06"]


def test_the_card_is_read_from_the_device_name():
    assert pipeline_overview.card_of("NVIDIA H100 80GB HBM3") == "H100"
    assert pipeline_overview.card_of("NVIDIA H200") == "H200"
    assert pipeline_overview.card_of("NVIDIA A100-SXM4-80GB") == "A100"
    assert pipeline_overview.card_of("NVIDIA GeForce RTX 4090") == "RTX 4090"
    assert pipeline_overview.card_of("cpu") == "cpu"


def test_a_groups_bars_are_centred_on_its_label_however_many_methods_it_measured():
    assert pipeline_overview.bar_centres(3, 1, 0.25) == [3]
    assert pipeline_overview.bar_centres(3, 2, 0.25) == pytest.approx([2.875, 3.125])
    assert pipeline_overview.bar_centres(0, 3, 0.25) == pytest.approx([-0.25, 0, 0.25])
