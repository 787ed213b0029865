"""benchmarks/step_graphs_probe.py captures CUDA graphs: on the CPU it stops at once and says why."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
probe = importlib.import_module("step_graphs_probe")


def test_the_probe_says_it_needs_a_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(probe.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA GPU"):
        probe.main(["--out", str(tmp_path / "probe")])
    assert not (tmp_path / "probe").exists()
