"""benchmarks/gpu_peers.py's cache-dit configurations leave the transformer as they found it: cache-dit
1.5.3's ``disable_cache`` keeps its patched ``forward`` on the model, which every later row (the
uncached one and smoothcache's included) would otherwise run."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("cache_dit")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
gpu_peers = importlib.import_module("gpu_peers")


def test_a_cache_dit_row_detached_leaves_the_uncached_model_behind():
    setup = gpu_peers.build(tiny=True, device="cpu", dtype=torch.float32)
    before = gpu_peers.generate(setup)
    modules_before = {name: (type(m), dict(vars(m))) for name, m in setup.transformer.named_modules()}
    static = next(m for m in gpu_peers.cache_dit_methods(setup) if "mask" in m.name.lower() or "static" in m.name.lower())
    detach = static.attach(setup, None)
    assert "forward" in vars(setup.transformer)  # cache-dit patched it
    cached = gpu_peers.generate(setup)
    detach()
    assert "forward" not in vars(setup.transformer)
    assert {name: (type(m), dict(vars(m))) for name, m in setup.transformer.named_modules()}.keys() == modules_before.keys()
    assert not torch.equal(cached, before)  # the mask skipped steps
    assert torch.equal(gpu_peers.generate(setup), before)
