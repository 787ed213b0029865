"""Stable Diffusion 3 / 3.5: MMDiT JointTransformerBlock (joint attention over image and text,
SD3.5's extra image self-attention attn2, ff and ff_context), through StableDiffusion3Pipeline
with batched classifier-free guidance, and with skip-layer guidance's extra call on some steps."""

import functools

import pytest
import torch

import smoothcache
from smoothcache import Schedule

from .conftest import (
    STEPS,
    FamilyCase,
    WeightUses,
    assert_all_ones_is_bit_identical,
    sample,
    text_embeddings,
    tiny_pipeline,
    tiny_vae,
)
from .tiny_configs import SD3_TRANSFORMER, SD35_TRANSFORMER

JOINT_DIM, POOLED_DIM = SD3_TRANSFORMER["joint_attention_dim"], SD3_TRANSFORMER["pooled_projection_dim"]


def make_pipeline(sd35: bool = False):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return tiny_pipeline(
        StableDiffusion3Pipeline,
        transformer=SD35_TRANSFORMER if sd35 else SD3_TRANSFORMER,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(shift_factor=0.0609, scaling_factor=1.5035),
    )


def generate(pipe, seed: int = 0, **kwargs) -> torch.Tensor:
    # Stand-ins for CLIP and T5 embeddings.
    prompt, pooled = text_embeddings(2, 6, JOINT_DIM), text_embeddings(2, POOLED_DIM)
    return sample(
        pipe, seed, prompt_embeds=prompt, pooled_prompt_embeds=pooled, negative_prompt_embeds=torch.zeros_like(prompt),
        negative_pooled_prompt_embeds=torch.zeros_like(pooled), height=8, width=8, **kwargs,
    )  # fmt: skip


CASE = FamilyCase(
    "sd3", make_pipeline, generate,
    default_keys=["attn-0", "ff-0", "ff_context-0", "attn-1", "ff-1"],  # the last block has no ff_context
    schedule_keys={"attn", "ff", "ff_context"},
)  # fmt: skip
CASE_35 = FamilyCase(
    "sd3.5", functools.partial(make_pipeline, sd35=True), generate,
    default_keys=["attn-0", "attn2-0", "ff-0", "ff_context-0", "attn-1", "ff-1"],  # attn2 where it exists
    schedule_keys={"attn", "attn2", "ff", "ff_context"},
)  # fmt: skip


# Skip-layer guidance (SD3.5 Medium's recipe): on steps i with 6 * 0.2 < i < 6 * 0.8 the pipeline calls
# the transformer a second time, unbatched and with block 0 skipped: 1 call on steps 0, 1, 5; 2 on 2-4.
SLG = {"skip_guidance_layers": [0], "skip_layer_guidance_start": 0.2, "skip_layer_guidance_stop": 0.8}
SLG_STEPS = (2, 3, 4)


def generate_slg(pipe, seed: int = 0) -> torch.Tensor:
    return generate(pipe, seed, **SLG)


def skip_layer_guidance_uses(layer, plan) -> int:
    """Computations of ``layer``: the guidance call (slot 1) keeps its own outputs, so it computes on
    its plan's compute steps and on its first step, where it has nothing to reuse yet."""
    uses = sum(plan)
    if layer.block not in SLG["skip_guidance_layers"]:
        uses += sum(1 for step in SLG_STEPS if plan[step] or step == SLG_STEPS[0])
    return uses


def test_skip_layer_guidance_all_ones_schedule_is_bit_identical_to_uncached(pipe):
    assert_all_ones_is_bit_identical(pipe, generate_slg)


@pytest.mark.parametrize("calibrated", [True, False], ids=["calibrated", "reuse-where-the-extra-call-starts"])
def test_skip_layer_guidance_extra_call_computes_before_it_reuses(pipe, calibrated):
    if calibrated:
        with smoothcache.calibration(pipe) as rec:
            generate_slg(pipe, seed=1)
        assert rec.profile.num_steps == STEPS and rec.profile.metadata["calls_per_step"] == 1
        schedule = rec.profile.schedule(compute_fraction=0.6)
    else:
        schedule = Schedule({key: (1, 1, 0, 1, 0, 1) for key in ("attn", "ff", "ff_context")})
    uncached = generate_slg(pipe)
    handle = smoothcache.cache(pipe, schedule)
    with handle, WeightUses(handle.layers) as uses:
        cached = generate_slg(pipe)
    expected = {layer.name: skip_layer_guidance_uses(layer, schedule.plans[layer.layer_type]) for layer in handle.layers}
    assert uses.counts == expected
    assert sum(expected.values()) < (STEPS + len(SLG_STEPS)) * len(expected)  # something was reused
    assert not torch.equal(cached, uncached)
    with handle:  # a second generation restarts: same output
        assert torch.equal(generate_slg(pipe), cached)
