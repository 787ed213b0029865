"""test_calibration_memory.py's refusal on a real GPU (issue 21), with no stand-in for the device: the
card is filled until calibration's history cannot fit, the refusal comes from what CUDA reports,
the model is left as it was, and the fix the message names runs on the same full card.

A DiT four blocks deep but wide enough (256 tokens of 256 channels, 64 rows) that one step's kept
outputs are far larger than the allocator's rounding; skipped without CUDA."""

from __future__ import annotations

import gc
import math
import os
from collections.abc import Iterator

import pytest
import torch
from models.tiny_configs import DIT_TRANSFORMER, kl_vae
from test_calibration_memory import COMPONENTS, one_step_bytes

import smoothcache
from smoothcache import CalibrationMemoryError
from smoothcache.ownership import holder

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    # the test fills the card: another worker's allocations would break its arithmetic (run with -n 0)
    pytest.mark.skipif(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") != "1",
                       reason="fills the GPU: run it in one process (pytest -n 0)"),
    pytest.mark.usefixtures("deterministic_convolutions"),
]

GPU = torch.device("cuda")
STEPS = 40
LABELS = list(range(32))  # 64 rows with classifier-free guidance


def wide_dit_pipeline():
    from diffusers import DDIMScheduler, DiTPipeline

    torch.manual_seed(0)
    transformer = DIT_TRANSFORMER.with_config(
        num_layers=4, sample_size=32, num_attention_heads=4, attention_head_dim=64).build()
    pipe = DiTPipeline(transformer=transformer, vae=kl_vae().build(), scheduler=DDIMScheduler()).to(GPU)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed: int = 0, steps: int = STEPS) -> torch.Tensor:
    return pipe(class_labels=LABELS, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                output_type="pt").images


def generation_bytes(pipe) -> int:
    """What one uncached generation reserves above what is held before it (activations, the
    pipeline's own tensors and the allocator's rounding)."""
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    generate(pipe, steps=2)
    return torch.cuda.max_memory_reserved() - before


@pytest.fixture
def card_filled_to() -> Iterator:
    """``fill(room)`` takes all the card can still give but ``room`` bytes; undone after the test."""
    fillers: list[torch.Tensor] = []

    def fill(room: int) -> None:
        gc.collect()
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info()
        assert free > room, f"the card has {free} bytes free, fewer than the {room} the test needs"
        fillers.append(torch.empty(free - room, dtype=torch.uint8, device=GPU))

    yield fill
    fillers.clear()
    gc.collect()
    torch.cuda.empty_cache()


def test_a_history_the_card_cannot_hold_is_refused_and_the_named_fix_fits(card_filled_to):
    pipe = wide_dit_pipeline()
    reference = generate(pipe)
    step = sum(one_step_bytes(pipe, generate))
    activations = generation_bytes(pipe)
    # Room for lookahead-1 steps and half a step: a ring of `lookahead` steps cannot fit (refused after
    # the first step), half of it can (layer_groups=2: two of four blocks per generation), with the
    # generation's own memory twice over besides.
    lookahead = math.ceil(2 * (2 * activations + 2**26) / step + 1)
    assert lookahead < STEPS, f"one step keeps {step} bytes against {activations} of activations: widen the model"
    room = (lookahead - 1) * step + step // 2
    card_filled_to(room)

    model = pipe.transformer
    finished_calls: list[int] = []
    counter = model.register_forward_hook(lambda *a: finished_calls.append(1))
    smoothcache.calibration(pipe, components=COMPONENTS, lookahead=lookahead)
    with pytest.raises(CalibrationMemoryError) as raised:  # no with block: the recorder itself lets go
        generate(pipe)
    counter.remove()
    message = str(raised.value)
    assert len(finished_calls) == 1, message  # refused at the second step's call, before the rings grew
    assert "on cuda" in message, message
    assert "layer_groups=2 (each generation" in message, message
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert holder(model) is None
    assert torch.equal(generate(pipe), reference)

    # the fix runs on the same full card, and what it kept stayed within the room
    with smoothcache.calibration(pipe, components=COMPONENTS, lookahead=lookahead, layer_groups=2) as fitting:
        for seed in range(2):
            generate(pipe, seed=seed)
    assert fitting.profile.num_runs == 2
    assert fitting.history_peak_bytes == lookahead * step // 2 <= room
