"""The GPU benchmarks' denoising loops, checked on the CPU with a tiny DiT: the sync-free loop must
generate exactly what diffusers' synced loop does, cached or not, so that their timings compare
like with like; and the profiler summary's busy time must count overlapping kernels once."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

import smoothcache
from smoothcache import Schedule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
gpu_bench = importlib.import_module("gpu_bench")
loop_profile = importlib.import_module("loop_profile")


@pytest.fixture(scope="module")
def tiny_pipe():
    torch.manual_seed(0)
    return gpu_bench.make_pipe(gpu_bench.dit_xl("cpu", torch.float32, tiny=True), "cpu")


@pytest.mark.parametrize("plans", [None, {"block": gpu_bench.ALPHA_018}, {"attn1": gpu_bench.ALPHA_018, "ff": gpu_bench.ALPHA_018}])
def test_the_sync_free_loop_generates_what_the_synced_loop_does(tiny_pipe, plans):
    handle = smoothcache.cache(tiny_pipe, Schedule(plans)) if plans else None
    try:
        synced = gpu_bench.denoise(tiny_pipe, batch=2, loop="synced")
        sync_free = gpu_bench.denoise(tiny_pipe, batch=2, loop="sync-free")
    finally:
        if handle is not None:
            handle.disable()
    assert torch.equal(synced, sync_free)
    if plans:  # and the cache did act: the cached sample differs from the uncached one
        assert not torch.equal(synced, gpu_bench.denoise(tiny_pipe, batch=2, loop="synced"))


def test_gpu_busy_time_counts_overlapping_kernels_once():
    assert loop_profile.busy_ms([]) == 0.0
    assert loop_profile.busy_ms([(0, 1000), (500, 1500), (3000, 4000)]) == pytest.approx(2.5)
    assert loop_profile.busy_ms([(3000, 4000), (0, 1000), (100, 200)]) == pytest.approx(2.0)  # nested, unsorted


def test_idle_time_is_split_by_gap_length_and_overlaps_leave_no_gap():
    idle = loop_profile.idle_by_gap([(0, 10), (12, 20), (5, 15), (50, 60), (260, 300)])
    # gaps: 20->50 (30 us), 60->260 (200 us); (12, 20) lies inside the reach of (5, 15) then follows it
    assert idle["0-5us"] == 0 and idle["20-100us"] == pytest.approx(0.03) and idle[">=100us"] == pytest.approx(0.2)
    assert idle["gaps 20-100us"] == 1 and idle["gaps >=100us"] == 1 and idle["gaps 0-5us"] == 0
