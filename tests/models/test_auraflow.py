"""AuraFlow: MMDiT AuraFlowJointTransformerBlock (joint attention, ff, ff_context), then
AuraFlowSingleTransformerBlock with the same child names (keys "single_attn", "single_ff"), through
AuraFlowPipeline with batched classifier-free guidance."""

import pytest
import torch

from smoothcache import find_layers

from .conftest import (
    STEPS,
    assert_all_ones_is_bit_identical,
    assert_disable_restores_the_model,
    assert_skips_exactly_the_scheduled_calls,
    calibrated_schedule,
    tiny_vae,
)

JOINT_DIM = 16


def make_pipeline():
    from diffusers import (
        AuraFlowPipeline,
        AuraFlowTransformer2DModel,
        FlowMatchEulerDiscreteScheduler,
    )

    torch.manual_seed(0)
    transformer = AuraFlowTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=2,
        num_single_dit_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=JOINT_DIM,
        out_channels=4,
        pos_embed_max_size=16,
    ).eval()
    pipe = AuraFlowPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=tiny_vae(),
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed: int = 0) -> torch.Tensor:
    # UMT5 embeddings stood in for by fixed random tensors.
    prompt = torch.randn(2, 5, JOINT_DIM, generator=torch.Generator().manual_seed(100))
    mask = torch.ones(2, 5, dtype=torch.long)
    return pipe(
        prompt_embeds=prompt,
        prompt_attention_mask=mask,
        negative_prompt_embeds=torch.zeros_like(prompt),
        negative_prompt_attention_mask=mask,
        num_inference_steps=STEPS,
        height=8,
        width=8,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images


@pytest.fixture
def pipe():
    return make_pipeline()


def test_single_blocks_get_their_own_keys(pipe):
    keys = [layer.block_key for layer in find_layers(pipe.transformer)]
    assert keys == [
        "attn-0", "ff-0", "ff_context-0", "attn-1", "ff-1", "ff_context-1",
        "single_attn-0", "single_ff-0", "single_attn-1", "single_ff-1",
    ]  # fmt: skip


def test_calibrated_schedule_skips_exactly_the_scheduled_calls(pipe):
    schedule = calibrated_schedule(pipe, generate)
    assert set(schedule.keys) == {"attn", "ff", "ff_context", "single_attn", "single_ff"}
    assert_skips_exactly_the_scheduled_calls(pipe, generate, schedule)


def test_all_ones_schedule_is_bit_identical_to_uncached(pipe):
    assert_all_ones_is_bit_identical(pipe, generate)


def test_disable_restores_the_model_exactly(pipe):
    assert_disable_restores_the_model(pipe, generate, calibrated_schedule(pipe, generate))
