"""Sana: SanaTransformerBlock (linear self-attention attn1, cross-attention attn2, GLUMBConv
feed-forward ff), through SanaPipeline with a tiny deep-compression VAE and batched
classifier-free guidance."""

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

CAPTION_CHANNELS = 8


def make_pipeline():
    from diffusers import (
        AutoencoderDC,
        FlowMatchEulerDiscreteScheduler,
        SanaPipeline,
        SanaTransformer2DModel,
    )

    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=CAPTION_CHANNELS,
        sample_size=8,
    ).eval()
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        upsample_block_type="interpolate",
        downsample_block_type="conv",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    ).eval()
    pipe = SanaPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed: int = 0) -> torch.Tensor:
    # Gemma embeddings stood in for by fixed random tensors; a mask that hides the last two tokens.
    prompt = torch.randn(2, 5, CAPTION_CHANNELS, generator=torch.Generator().manual_seed(100))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    return pipe(
        prompt_embeds=prompt,
        prompt_attention_mask=mask,
        negative_prompt=None,
        negative_prompt_embeds=torch.zeros_like(prompt),
        negative_prompt_attention_mask=torch.ones_like(mask),
        num_inference_steps=STEPS,
        height=32,  # the pipeline's minimum
        width=32,
        use_resolution_binning=False,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images


@pytest.fixture
def pipe():
    return make_pipeline()


def test_self_attention_and_feed_forward_are_the_defaults(pipe):
    layers = find_layers(pipe.transformer)
    assert [layer.block_key for layer in layers] == ["attn1-0", "ff-0", "attn1-1", "ff-1"]


def test_calibrated_schedule_skips_exactly_the_scheduled_calls(pipe):
    schedule = calibrated_schedule(pipe, generate)
    assert set(schedule.keys) == {"attn1", "ff"}
    assert_skips_exactly_the_scheduled_calls(pipe, generate, schedule)


def test_cross_attention_is_cached_when_asked_for(pipe):
    schedule = calibrated_schedule(pipe, generate, ["attn1", "attn2", "ff"])
    assert set(schedule.keys) == {"attn1", "attn2", "ff"}
    assert_skips_exactly_the_scheduled_calls(pipe, generate, schedule)


def test_all_ones_schedule_is_bit_identical_to_uncached(pipe):
    assert_all_ones_is_bit_identical(pipe, generate, ["attn1", "attn2", "ff"])


def test_disable_restores_the_model_exactly(pipe):
    assert_disable_restores_the_model(pipe, generate, calibrated_schedule(pipe, generate, ["attn1", "attn2", "ff"]))
