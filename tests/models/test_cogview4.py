"""CogView4: CogView4TransformerBlock (joint attention attn1 over image and text; one ff run twice
per block call, which cannot be cached), through CogView4Pipeline, whose classifier-free guidance
makes two sequential transformer calls per step (conditional, then unconditional)."""

import pytest
import torch

from smoothcache import NoCacheableLayersError, find_layers

from .conftest import (
    STEPS,
    assert_all_ones_is_bit_identical,
    assert_disable_restores_the_model,
    assert_skips_exactly_the_scheduled_calls,
    calibrated_schedule,
    tiny_vae,
)

TEXT_DIM = 16


def make_pipeline():
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler

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


def test_the_shared_feed_forward_is_refused(pipe):
    refused = (
        r"transformer_blocks.0.ff \('ff' of CogView4TransformerBlock\) cannot be cached: it runs twice per block call"
    )
    with pytest.raises(NoCacheableLayersError, match=refused):
        find_layers(pipe.transformer, ["attn1", "ff"])
    with pytest.raises(NoCacheableLayersError, match="runs twice per block call"):
        find_layers(pipe.transformer, ["transformer_blocks.*.ff"])


def test_calibrated_schedule_skips_exactly_the_scheduled_calls(pipe):
    schedule = calibrated_schedule(pipe, generate, calls_per_step=2)
    assert set(schedule.keys) == {"attn1"}
    assert_skips_exactly_the_scheduled_calls(pipe, generate, schedule, calls_per_step=2)


def test_all_ones_schedule_is_bit_identical_to_uncached(pipe):
    assert_all_ones_is_bit_identical(pipe, generate, calls_per_step=2)


def test_disable_restores_the_model_exactly(pipe):
    schedule = calibrated_schedule(pipe, generate, calls_per_step=2)
    assert_disable_restores_the_model(pipe, generate, schedule, calls_per_step=2)
