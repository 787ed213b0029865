"""benchmarks/steps_and_cache.py end to end on a tiny random model: every candidate split of each
budget scored on the evaluation set, the pure options at both ends, split_steps' choice marked."""

import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
steps_and_cache = importlib.import_module("steps_and_cache")


def test_every_split_scored_and_the_choice_marked(tmp_path):
    path = steps_and_cache.main(["--tiny", "--device", "cpu", "--samplers", "ddim-8", "--budgets", "0.5",
                                 "--step-counts", "8", "6", "4", "--eval-per-class", "1", "--out", str(tmp_path)])
    result = json.loads(path.read_text())
    rows = result["rows"]
    assert [r["steps"] for r in rows] == [8, 6, 4]
    assert sum(r["chosen"] for r in rows) == 1
    chosen = next(r for r in rows if r["chosen"])
    assert chosen["split_error"] == min(r["split_error"] for r in rows)
    cache_alone, _, fewer_steps_alone = rows
    assert fewer_steps_alone["cache_compute_fraction"] == 1.0 and cache_alone["cache_compute_fraction"] < 1.0
    assert all(r["compute_fraction"] <= 0.5 + 1e-9 and 0 <= r["accuracy"] <= 1 and r["psnr"] > 0 for r in rows)
    assert result["settings"]["eval_images"] == 10
    assert result["settings"]["budgets"] == [0.5] and result["settings"]["step_counts"] == [8, 6, 4]
    assert result["device"].startswith("cpu (") and "cores" in result["device"]
    assert path.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
