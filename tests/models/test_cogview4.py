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
    FamilyCase,
    WeightUses,
    calibrated_schedule,
    sample,
    text_embeddings,
    tiny_pipeline,
    tiny_vae,
)
from .tiny_configs import COGVIEW4_TRANSFORMER

TEXT_DIM = COGVIEW4_TRANSFORMER["text_embed_dim"]


def make_pipeline():
    from diffusers import CogView4Pipeline, FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.25, max_shift=0.75, time_shift_type="linear"
    )
    return tiny_pipeline(CogView4Pipeline, transformer=COGVIEW4_TRANSFORMER, vae=tiny_vae(), scheduler=scheduler)


def generate(pipe, seed: int = 0) -> torch.Tensor:
    # Stand-ins for GLM embeddings; the negative prompt is shorter.
    prompt, negative = text_embeddings(2, 6, TEXT_DIM), text_embeddings(2, 3, TEXT_DIM)
    return sample(pipe, seed, prompt_embeds=prompt, negative_prompt_embeds=negative, height=16, width=16)


CASE = FamilyCase(
    "cogview4", make_pipeline, generate,
    default_keys=["attn1-0", "attn1-1"], schedule_keys={"attn1"},  # joint attention alone
    calls_per_step=2, all_ones_components=["attn1", "ff"],
)  # fmt: skip


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
