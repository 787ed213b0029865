"""CogView4: CogView4TransformerBlock (joint attention attn1 over image and text; one ff run twice
per block call, on image then text tokens, cached per occurrence), through CogView4Pipeline, whose
classifier-free guidance makes two sequential transformer calls per step (conditional, then
unconditional)."""

import pytest
import torch

import smoothcache
from smoothcache import NoCacheableLayersError, Schedule, find_layers

from .conftest import (
    STEPS,
    WeightUses,
    assert_all_ones_is_bit_identical,
    assert_disable_restores_the_model,
    assert_skips_exactly_the_scheduled_calls,
    calibrated_schedule,
    tiny_vae,
)

TEXT_DIM = 16


def make_pipeline():
    from diffusers import (
        CogView4Pipeline,
        CogView4Transformer2DModel,
        FlowMatchEulerDiscreteScheduler,
    )

    torch.manual_seed(0)
    transformer = CogView4Transformer2DModel(
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=2,
        out_channels=4,
        text_embed_dim=TEXT_DIM,
        time_embed_dim=8,
        condition_dim=4,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.25, max_shift=0.75, time_shift_type="linear"
    )
    pipe = CogView4Pipeline(
        tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=transformer, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed: int = 0) -> torch.Tensor:
    # GLM embeddings stood in for by fixed random tensors; the negative prompt is shorter.
    g = torch.Generator().manual_seed(100)
    return pipe(
        prompt_embeds=torch.randn(2, 6, TEXT_DIM, generator=g),
        negative_prompt_embeds=torch.randn(2, 3, TEXT_DIM, generator=g),
        num_inference_steps=STEPS,
        height=16,
        width=16,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images


@pytest.fixture
def pipe():
    return make_pipeline()


def test_joint_attention_is_the_default(pipe):
    assert [layer.block_key for layer in find_layers(pipe.transformer)] == ["attn1-0", "attn1-1"]


def test_the_shared_feed_forward_is_calibrated_and_cached_per_occurrence_when_asked_for(pipe):
    assert [layer.block_key for layer in find_layers(pipe.transformer)] == ["attn1-0", "attn1-1"]
    with pytest.raises(NoCacheableLayersError, match=r"runs 2 times per block call \(image tokens, then text tokens\)"):
        find_layers(pipe.transformer, ["attn1", "ff"])  # callers that do not keep one output per occurrence
    schedule = calibrated_schedule(pipe, generate, ["attn1", "ff"])
    assert set(schedule.keys) == {"attn1", "ff"}
    handle = smoothcache.cache(pipe, schedule)
    with handle, WeightUses(handle.layers) as uses:
        generate(pipe)
    expected = {layer.name: sum(schedule.plans[layer.layer_type]) * 2 * layer.repeats for layer in handle.layers}
    assert uses.counts == expected


def test_the_shared_feed_forward_keeps_one_output_per_occurrence(pipe):
    attn1 = calibrated_schedule(pipe, generate).plans["attn1"]
    schedule = Schedule({"attn1": attn1, "ff": attn1})
    uncached = generate(pipe)
    ff0 = pipe.transformer.transformer_blocks[0].ff
    outputs: list[torch.Tensor] = []  # what ff-0 hands its block, per call: (step, cond/uncond, image/text)
    spy = ff0.register_forward_hook(lambda module, args, output: outputs.append(output))
    handle = smoothcache.cache(pipe, schedule)
    with handle, WeightUses(handle.layers) as uses:
        cached = generate(pipe)
    spy.remove()
    assert uses.counts == {layer.name: sum(attn1) * 2 * layer.repeats for layer in handle.layers}
    per_step = [outputs[4 * step : 4 * step + 4] for step in range(STEPS)]
    assert [tuple(o.shape[1] for o in step) for step in per_step] == [(64, 6, 64, 3)] * STEPS  # image, text tokens
    for step in range(1, STEPS):
        source = max(s for s in range(step) if attn1[s])  # the last compute step before
        assert all(a is b for a, b in zip(per_step[step], per_step[source])) == (not attn1[step])
        assert all(a is not b for a, b in zip(per_step[step], per_step[source][1:] + per_step[source][:1]))
    assert not torch.equal(cached, uncached)


def test_calibrated_schedule_skips_exactly_the_scheduled_calls(pipe):
    schedule = calibrated_schedule(pipe, generate, calls_per_step=2)
    assert set(schedule.keys) == {"attn1"}
    assert_skips_exactly_the_scheduled_calls(pipe, generate, schedule, calls_per_step=2)


def test_all_ones_schedule_is_bit_identical_to_uncached(pipe):
    assert_all_ones_is_bit_identical(pipe, generate, ["attn1", "ff"], calls_per_step=2)


def test_disable_restores_the_model_exactly(pipe):
    schedule = calibrated_schedule(pipe, generate, calls_per_step=2)
    assert_disable_restores_the_model(pipe, generate, schedule, calls_per_step=2)
