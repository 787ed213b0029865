"""The memory the cache holds: kept outputs stored elsewhere or in a lower precision
(cache(kept_device=, kept_dtype=)) shrink it, computing steps unchanged, reuses converted back; and
a generation's peak rises by no more than what the cache keeps, compiled whole or not."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from conftest import STEPS, generate, make_dit_pipeline

import smoothcache
from smoothcache import Schedule, ScheduleError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
peak_memory = importlib.import_module("peak_memory")

PLAN = (1, 0, 1, 1, 0, 1, 0, 1, 1, 1)
LAYERS = Schedule({"attn1": PLAN, "ff": PLAN})
BLOCKS = Schedule({"block": PLAN})


@pytest.fixture(scope="module")
def pipe():
    return make_dit_pipeline()


def kept_outputs(pipe, schedule, **kwargs):
    """The images, and the bytes the cache holds after a generation."""
    with smoothcache.cache(pipe, schedule, **kwargs) as handle:
        images = generate(pipe)
        return images, handle.state.kept_bytes()


@pytest.mark.parametrize("schedule", [LAYERS, BLOCKS], ids=["layers", "blocks"])
def test_a_lower_precision_halves_what_the_cache_holds_and_rounds_only_the_reuses(pipe, schedule):
    full, full_bytes = kept_outputs(pipe, schedule)
    half, half_bytes = kept_outputs(pipe, schedule, kept_dtype=torch.bfloat16)
    assert half_bytes["cpu"] * 2 == full_bytes["cpu"] > 0
    assert not torch.equal(half, full) and torch.allclose(half, full, atol=0.05)  # reuses rounded to bf16
    all_ones = Schedule({key: (1,) * STEPS for key in schedule.keys})
    assert torch.equal(kept_outputs(pipe, all_ones, kept_dtype=torch.bfloat16)[0], generate(pipe))  # computing steps exact


def test_kept_on_the_same_device_in_the_same_precision_is_bit_identical(pipe):
    images, kept = kept_outputs(pipe, LAYERS, kept_device="cpu")
    assert torch.equal(images, kept_outputs(pipe, LAYERS)[0]) and set(kept) == {"cpu"}


def test_forms_that_cannot_be_stored_are_refused(pipe):
    with pytest.raises(ValueError, match="floating-point torch.dtype"):
        smoothcache.cache(pipe, LAYERS, kept_dtype=torch.int8)
    with pytest.raises(ScheduleError, match="this cache also has forecast forwards"):
        smoothcache.cache(pipe, LAYERS, forecast="linear", kept_dtype=torch.bfloat16)


def peak_and_held(run) -> tuple[int, int]:
    """A generation's peak, and what was held from the generation before as it began, measured as
    benchmarks/peak_memory.py measures them on the CPU, after one generation that compiles."""
    with peak_memory.AllocationCount("cpu") as count:
        run()
        with count.window():
            run()
    return count.peak, count.held


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-whole"])
@pytest.mark.parametrize(("schedule", "forecast"), [(LAYERS, "none"), (BLOCKS, "none"), (LAYERS, "linear"), (BLOCKS, "linear")],
                         ids=["layers", "blocks", "layers-forecast", "blocks-forecast"])
def test_a_generation_peaks_at_most_what_the_cache_keeps_above_uncached(schedule, forecast, compiled):
    """A model compiled whole stores what its graph keeps only after the graph returns, so the
    entries a computing call replaces are emptied before it runs: otherwise they stayed alive through
    the graph, beside the new ones (1.4x the kept bytes above uncached for blocks, 1.8x for layers,
    before they were). Forecasting keeps two outputs and drops the older before a computing call
    (1.5x eagerly before). Dynamo's side effects are the same with any backend: the eager one is fast."""
    torch._dynamo.reset()
    pipe = make_dit_pipeline(num_layers=4)
    if compiled:
        pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    try:
        uncached, uncached_held = peak_and_held(lambda: generate(pipe))
        with smoothcache.cache(pipe, schedule, forecast=forecast) as handle:
            cached, cached_held = peak_and_held(lambda: generate(pipe))
            kept = sum(handle.state.kept_bytes().values())
    finally:
        torch._dynamo.reset()
    assert kept > 0 and cached_held - uncached_held == kept  # the measure sees what the cache holds
    assert cached - uncached <= kept


def test_a_computing_call_runs_without_the_entries_it_replaces(pipe):
    """Seen from inside the model: a call whose layers compute finds their entries empty, a reusing
    call finds them filled, and blocks that compute without keeping (eagerly, where the next step
    computes too) leave theirs as they were."""
    blocks = len(pipe.transformer.transformer_blocks)

    def seen(schedule):
        entries = []
        with smoothcache.cache(pipe, schedule) as handle:
            hook = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
                lambda *_: entries.append(handle.state.kept()))
            try:
                generate(pipe)
            finally:
                hook.remove()
        return entries

    assert seen(LAYERS) == [0 if computes else 2 * blocks for computes in PLAN]
    # PLAN: steps 0, 3 and 5 compute and keep (the next step reuses); 2, 7, 8 and 9 compute without keeping
    assert seen(BLOCKS) == [0, blocks, blocks, 0, blocks, 0, blocks, blocks, blocks, blocks]
