"""LTX-Video: LTXVideoTransformerBlock (self-attention attn1, cross-attention attn2, feed-forward),
through LTXPipeline with batched classifier-free guidance."""

import pytest
import torch

from smoothcache import find_layers

from .conftest import (
    STEPS,
    assert_all_ones_is_bit_identical,
    assert_disable_restores_the_model,
    assert_skips_exactly_the_scheduled_calls,
    calibrated_schedule,
)

TEXT_DIM = 16


def make_pipeline():
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=2,
        caption_channels=TEXT_DIM,
    ).eval()
    # 8x spatial, 4x temporal compression: a 32x32, 5-frame video is 2 latent frames of 4x4.
    vae = AutoencoderKLLTXVideo(
        latent_channels=4,
        block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        down_block_types=("LTXVideoDownBlock3D",) * 2,
        spatio_temporal_scaling=(True, True),
        decoder_spatio_temporal_scaling=(True, True),
        decoder_inject_noise=(False,) * 3,
        downsample_type=("conv", "conv"),
        upsample_residual=(False, False),
        upsample_factor=(1, 1),
        patch_size=2,
        patch_size_t=1,
    ).eval()
    pipe = LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed: int = 0) -> torch.Tensor:
    # T5 embeddings stood in for by fixed random tensors; a mask that hides two tokens.
    prompt = torch.randn(1, 6, TEXT_DIM, generator=torch.Generator().manual_seed(100))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    return pipe(
        prompt_embeds=prompt,
        prompt_attention_mask=mask,
        negative_prompt_embeds=torch.zeros_like(prompt),
        negative_prompt_attention_mask=mask,
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).frames


@pytest.fixture
def pipe():
    return make_pipeline()


def test_self_attention_and_feed_forward_are_the_default(pipe):
    assert [layer.block_key for layer in find_layers(pipe.transformer)] == ["attn1-0", "ff-0", "attn1-1", "ff-1"]


def test_calibrated_schedule_skips_exactly_the_scheduled_calls(pipe):
    schedule = calibrated_schedule(pipe, generate)
    assert set(schedule.keys) == {"attn1", "ff"}
    assert_skips_exactly_the_scheduled_calls(pipe, generate, schedule)


def test_cross_attention_is_opt_in(pipe):
    schedule = calibrated_schedule(pipe, generate, ["attn1", "attn2", "ff"])
    assert set(schedule.keys) == {"attn1", "attn2", "ff"}
    assert_skips_exactly_the_scheduled_calls(pipe, generate, schedule)


def test_all_ones_schedule_is_bit_identical_to_uncached(pipe):
    assert_all_ones_is_bit_identical(pipe, generate, ["attn1", "attn2", "ff"])


def test_disable_restores_the_model_exactly(pipe):
    assert_disable_restores_the_model(pipe, generate, calibrated_schedule(pipe, generate))
