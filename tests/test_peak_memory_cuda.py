"""benchmarks/peak_memory.py's GPU count on a real card (issue 20's item 4): the CUDA allocator's
statistics, counted from before each configuration is set up, see what each cache holds between
generations, smoothcache's as its handle reports it; skipped without CUDA.

The small, narrow WanPipeline of test_peak_memory_script.py, in bf16, with dynamo's eager backend."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
peak_memory = importlib.import_module("peak_memory")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytest.importorskip("cache_dit")


def test_the_gpu_count_sees_what_each_cache_holds(tmp_path):
    path = peak_memory.main(["--device", "cuda", "--size", "tiny", "--backend", "eager", "--out", str(tmp_path)])
    rows = {(r["mode"], r["method"]): r for r in json.loads(path.read_text())["rows"]}
    for mode in peak_memory.MODES:
        for method in ("blocks", "layers", "blocks-forecast"):
            row = rows[mode, method]
            # exact: one tiny hidden state (128 tokens x 96 x bf16, 24,576 bytes) is whole 512-byte allocator blocks
            assert row["held_over_uncached_bytes"] == row["kept_bytes"] > 0, row
            assert row["rise_over_uncached_bytes"] <= row["kept_bytes"], row
        assert rows[mode, "cache-dit"]["held_over_uncached_bytes"] > rows[mode, "blocks"]["kept_bytes"]
