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

pytest.importorskip("matplotlib")
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


def test_a_merged_files_cells_carry_their_parts_dates_and_the_order_is_compile_then_batch():
    found = pipeline_overview.overview(FILES, ["flux"])
    keys = [(c["compile"], c["batch"]) for c in found["cells"]]
    rank = {"eager": 0, "compile": 1, "cudagraphs": 2}
    assert keys == sorted(keys, key=lambda k: (rank[k[0]], k[1]))
    first = next(c for c in found["cells"] if c["file"] == "pipeline-speed-flux-h100.json" and c["compile"] == "eager")
    merged = json.loads((pipeline_overview.RESULTS / first["file"]).read_text())["merged_from"]
    assert first["date"] == merged[0]["date"][:10]


def test_the_command_writes_the_json_and_the_plot_and_refuses_a_model_without_cells(tmp_path, capsys):
    out = tmp_path / "overview"
    assert pipeline_overview.main(["--files", *map(str, FILES), "--out", str(out)]) == 0
    written = json.loads(out.with_suffix(".json").read_text())
    assert written["files"] == [p.name for p in FILES] and len(written["cells"]) >= 10
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "flux  compile    b8" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no cell of dit"):
        pipeline_overview.main(["--models", "dit", "--files", *map(str, FILES[:1]), "--out", str(out)])


def test_the_card_is_read_from_the_device_name():
    assert pipeline_overview.card_of("NVIDIA H100 80GB HBM3") == "H100"
    assert pipeline_overview.card_of("NVIDIA H200") == "H200"
    assert pipeline_overview.card_of("cpu") == "cpu"
