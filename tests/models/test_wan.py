"""Wan 2.1 / 2.2: WanTransformerBlock (self-attention attn1, cross-attention attn2, feed-forward ffn),
through WanPipeline, whose classifier-free guidance makes two sequential transformer calls per step
(conditional, then unconditional). Wan 2.2 A14B splits the steps between two experts, `transformer`
(high noise) and `transformer_2` (low noise)."""

import numpy as np
import pytest
import torch

import smoothcache
from smoothcache import NoCacheableLayersError, Schedule, StepMismatchError, find_layers
from smoothcache.keys import key_for

from .conftest import (
    STEPS,
    FamilyCase,
    WeightUses,
    assert_skips_exactly_the_scheduled_calls,
    calibrated_schedule,
    sample,
    text_embeddings,
    tiny_pipeline,
)
from .tiny_configs import WAN_TRANSFORMER, WAN_VACE_TRANSFORMER, WAN_VAE

TEXT_DIM = WAN_TRANSFORMER["text_dim"]
# With UniPC's flow shift of 3, 6 steps run at t = 999, 937, 857, 750, 600, 376: a boundary at
# t = 800 gives each expert three steps.
BOUNDARY_RATIO, HIGH_NOISE_STEPS = 0.8, 3


def tiny_transformer(seed: int = 0):
    torch.manual_seed(seed)
    return WAN_TRANSFORMER.build()


def make_pipeline(two_experts: bool = False):
    from diffusers import UniPCMultistepScheduler, WanPipeline

    return tiny_pipeline(
        WanPipeline,
        vae=WAN_VAE,
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        transformer=tiny_transformer(),
        transformer_2=tiny_transformer(seed=1) if two_experts else None,
        boundary_ratio=BOUNDARY_RATIO if two_experts else None,
    )


def generate(pipe, seed: int = 0, guidance_scale: float = 5.0) -> torch.Tensor:
    # Stand-ins for UMT5 embeddings.
    prompt = text_embeddings(1, 6, TEXT_DIM)
    return sample(
        pipe, seed, prompt_embeds=prompt, negative_prompt_embeds=torch.zeros_like(prompt),
        guidance_scale=guidance_scale, height=32, width=32, num_frames=5,
    )  # fmt: skip


def generate_without_guidance(pipe, seed: int = 0) -> torch.Tensor:
    return generate(pipe, seed, guidance_scale=1.0)


CASE = FamilyCase(
    "wan", make_pipeline, generate,
    default_keys=["attn1-0", "ffn-0", "attn1-1", "ffn-1"], schedule_keys={"attn1", "ffn"},
    calls_per_step=2,  # guidance as two sequential calls
)  # fmt: skip


def test_vace_control_blocks_are_refused_and_left_out_of_the_defaults():
    torch.manual_seed(0)
    vace = WAN_VACE_TRANSFORMER.build()
    assert [layer.block_key for layer in find_layers(vace)] == ["attn1-0", "ffn-0", "attn1-1", "ffn-1"]
    assert find_layers(vace)[0].name == "blocks.0.attn1"
    with pytest.raises(NoCacheableLayersError, match=r"vace_blocks.0.attn1 \('vace_attn1' of .*run before blocks.0"):
        find_layers(vace, ["attn1", "vace_attn1"])
    with pytest.raises(NoCacheableLayersError, match="run before blocks.0"):
        find_layers(vace, ["vace_blocks.*.ffn"])


def test_two_calls_per_step_are_found_from_the_scheduler_step_index(pipe):
    # Wan runs guidance as two sequential calls; FlowMatchEuler's step_index tells the steps apart.
    with smoothcache.calibration(pipe) as rec:
        generate(pipe, seed=1)
    assert rec.profile.metadata["calls_per_step"] == 2 and rec.profile.num_steps == STEPS
    schedule = rec.profile.schedule(compute_fraction=0.6)
    assert schedule == calibrated_schedule(pipe, generate, calls_per_step=2)  # same curves as declared
    assert_skips_exactly_the_scheduled_calls(pipe, generate, schedule, calls=2)


def test_a_wrong_explicit_calls_per_step_is_an_error(pipe):
    with (
        pytest.raises(StepMismatchError, match="call for step 7.*calls_per_step"),
        smoothcache.calibration(pipe, calls_per_step=1),
    ):
        generate(pipe)
    schedule = Schedule({"attn1": (1, 0) * (STEPS // 2)})
    with (
        pytest.raises(StepMismatchError, match="called for step 7.*calls_per_step"),
        smoothcache.cache(pipe, schedule, calls_per_step=1),
    ):
        generate(pipe)


def test_without_guidance_one_call_per_step_skips_exactly_the_scheduled_calls(pipe):
    schedule = calibrated_schedule(pipe, generate_without_guidance, ["attn1", "attn2", "ffn"])
    assert set(schedule.keys) == {"attn1", "attn2", "ffn"}
    assert_skips_exactly_the_scheduled_calls(pipe, generate_without_guidance, schedule)


def test_two_experts_are_cached_as_modules_each_with_a_schedule_for_its_own_steps():
    # The other recipe for Wan 2.2 A14B: each expert is a bare module that runs a fixed number of steps.
    pipe = make_pipeline(two_experts=True)
    experts = {pipe.transformer: HIGH_NOISE_STEPS, pipe.transformer_2: STEPS - HIGH_NOISE_STEPS}
    recorders = [smoothcache.calibration(expert, steps=steps, calls_per_step=2) for expert, steps in experts.items()]
    generate(pipe, seed=1)
    schedules = [recorder.stop().schedule(compute_fraction=0.7) for recorder in recorders]  # 1 of 3 steps reused
    assert all(0 in plan for schedule in schedules for plan in schedule.plans.values())

    uncached = generate(pipe)
    handles = [smoothcache.cache(expert, s, calls_per_step=2) for expert, s in zip(experts, schedules, strict=True)]
    uses = [WeightUses(handle.layers) for handle in handles]  # one per expert: their layer names are the same
    with uses[0], uses[1]:
        cached = generate(pipe)
    for handle in handles:
        handle.disable()
    for handle, schedule, expert_uses in zip(handles, schedules, uses, strict=True):
        for layer in handle.layers:
            computed = sum(schedule.plans[key_for(schedule.plans, layer.layer_type, layer.block)])
            assert expert_uses.counts[layer.name] == computed * 2, layer.name
    assert not torch.equal(cached, uncached)
    assert torch.equal(generate(pipe), uncached)


def test_two_experts_are_calibrated_and_cached_through_the_pipeline():
    # One schedule over the pipeline's steps: a key's plan governs whichever expert runs a step, and
    # the low-noise expert computes on its first step, having nothing of its own to reuse yet.
    pipe = make_pipeline(two_experts=True)
    with smoothcache.calibration(pipe) as rec:
        generate(pipe, seed=1)
    profile = rec.profile
    assert profile.num_steps == STEPS and profile.metadata["calls_per_step"] == 2
    experts = {"transformer": range(HIGH_NOISE_STEPS), "transformer_2": range(HIGH_NOISE_STEPS, STEPS)}
    names = [f"{expert}.blocks.{block}.{layer}" for expert in experts for block in (0, 1) for layer in ("attn1", "ffn")]
    assert [layer.name for layer in profile.layers] == names
    # no expert measures reusing its last high-noise step's outputs on the first low-noise step: NaN
    curves = profile.curves("attn1")
    assert np.isnan(curves[[2, 1, 0], [0, 1, 2]]).all() and not np.isnan(curves[:2, 0]).any()
    schedule = profile.schedule(compute_fraction=0.7)
    assert all(plan[HIGH_NOISE_STEPS] == 1 for plan in schedule.plans.values())

    uncached = generate(pipe)
    handle = smoothcache.cache(pipe, schedule)
    with handle, WeightUses(handle.layers) as uses:
        cached = generate(pipe)
    expected = {}
    for layer in handle.layers:
        plan, steps = schedule.plans[layer.layer_type], experts[layer.name.partition(".")[0]]
        expected[layer.name] = 2 * sum(1 for step in steps if plan[step] or step == steps[0])
    assert uses.counts == expected
    assert sum(expected.values()) < 2 * HIGH_NOISE_STEPS * len(names)  # something was reused
    assert not torch.equal(cached, uncached)
    for expert in (pipe.transformer, pipe.transformer_2):
        for module in expert.modules():
            assert "forward" not in module.__dict__
            assert not module._forward_hooks and not module._forward_pre_hooks
    assert torch.equal(generate(pipe), uncached)
