"""benchmarks/kept_forms_quality.py end to end on the shipped demo model, quick (10 samples, 10 steps,
one budget): every kept form runs for layers and for blocks, a lower precision holds the fraction of
float32's bytes its width says and changes the samples by rounding only, and the host form on the
CPU changes nothing."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
kept_forms_quality = importlib.import_module("kept_forms_quality")

FORMS = ("default", "bfloat16", "float8_e4m3fn", "cpu")
BYTES_PER_VALUE = {"default": 4, "bfloat16": 2, "float8_e4m3fn": 1, "cpu": 4}  # the demo model computes in float32


def finite(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def test_every_form_is_measured_and_the_memory_ratio_is_the_dtype_width(tmp_path):
    path = kept_forms_quality.main(["--quick", "--budgets", "0.5", "--out", str(tmp_path)])
    result = json.loads(path.read_text())
    assert path.with_suffix(".png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert result["settings"]["budgets"] == [0.5] and result["settings"]["samples"] == 10
    rows = result["rows"]
    assert [(r["components"], r["kept"]) for r in rows] == [(c, f) for c in ("layers", "blocks") for f in FORMS]
    assert {s["components"]: s["schedule_compute_fraction"] for s in result["schedules"]} == {"layers": 0.5, "blocks": 0.5}
    for components in ("layers", "blocks"):
        by_form = {r["kept"]: r for r in rows if r["components"] == components}
        default = by_form["default"]
        assert default["kept_bytes"] > 0 and default["kept_bytes_by_device"] == {"cpu": default["kept_bytes"]}
        for form, row in by_form.items():
            assert row["compute_fraction"] == 0.5 and 0 <= row["accuracy"] <= 1 and row["seconds"] > 0
            assert row["kept_bytes"] * 4 == default["kept_bytes"] * BYTES_PER_VALUE[form]
            assert row["kept_fraction_vs_default"] == BYTES_PER_VALUE[form] / 4
            assert finite(row["psnr_vs_uncached"]) and row["psnr_vs_uncached"] > 15  # cached, so not equal to uncached
        for form in ("default", "cpu"):  # nothing converted: bit-identical
            row = by_form[form]
            assert row["max_abs_diff_vs_default_kept"] == 0.0 and row["psnr_vs_default_kept"] is None
            assert row["identical_to_default_kept"] and row["psnr_vs_uncached"] == default["psnr_vs_uncached"]
        bf16, float8 = by_form["bfloat16"], by_form["float8_e4m3fn"]
        for row in (bf16, float8):  # reuses rounded: the samples move, less than caching moved them
            assert row["max_abs_diff_vs_default_kept"] > 0 and not row["identical_to_default_kept"]
            assert finite(row["psnr_vs_default_kept"]) and row["psnr_vs_default_kept"] > default["psnr_vs_uncached"]
        assert bf16["psnr_vs_default_kept"] > float8["psnr_vs_default_kept"]  # 8 mantissa bits round less than 3
    layers, blocks = (next(r for r in rows if r["components"] == c and r["kept"] == "default") for c in ("layers", "blocks"))
    assert blocks["kept_bytes"] < layers["kept_bytes"]  # a block list on one key keeps one residual
    assert result["checks"] == {"kept_device_cpu_bit_identical_to_default": True}
