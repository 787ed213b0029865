"""Kept outputs stored elsewhere or in a lower precision (cache(kept_device=, kept_dtype=)): the
memory the cache holds shrinks, computing steps are unchanged, reuses come back converted."""

from __future__ import annotations

import pytest
import torch
from conftest import STEPS, generate, make_dit_pipeline

import smoothcache
from smoothcache import Schedule, ScheduleError

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
