"""HunyuanDiT: HunyuanDiTBlock (self-attention attn1, cross-attention attn2, ff; long skip
connections into the later blocks), through HunyuanDiTPipeline with batched classifier-free guidance."""

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

CLIP_DIM, CLIP_LEN, T5_DIM, T5_LEN = 16, 5, 16, 6


def make_pipeline():
    from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline

    torch.manual_seed(0)
    transformer = HunyuanDiT2DModel(
        sample_size=4,
        num_layers=4,  # the last block takes a long skip connection from the first
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        hidden_size=16,
        cross_attention_dim=CLIP_DIM,
        cross_attention_dim_t5=T5_DIM,
        pooled_projection_dim=16,
        text_len=CLIP_LEN,
        text_len_t5=T5_LEN,
    ).eval()
    # The pipeline sizes its rotary grid as if the VAE downsampled by 8, so this one does.
    pipe = HunyuanDiTPipeline(
        vae=tiny_vae(levels=4),
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
        scheduler=DDPMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed: int = 0) -> torch.Tensor:
    # CLIP (here: BERT) and T5 embeddings stood in for by fixed random tensors.
    g = torch.Generator().manual_seed(100)
    clip, t5 = torch.randn(2, CLIP_LEN, CLIP_DIM, generator=g), torch.randn(2, T5_LEN, T5_DIM, generator=g)
    clip_mask, t5_mask = torch.ones(2, CLIP_LEN, dtype=torch.long), torch.ones(2, T5_LEN, dtype=torch.long)
    return pipe(
        prompt_embeds=clip,
        prompt_attention_mask=clip_mask,
        prompt_embeds_2=t5,
        prompt_attention_mask_2=t5_mask,
        negative_prompt_embeds=torch.zeros_like(clip),
        negative_prompt_attention_mask=clip_mask,
        negative_prompt_embeds_2=torch.zeros_like(t5),
        negative_prompt_attention_mask_2=t5_mask,
        num_inference_steps=STEPS,
        height=32,
        width=32,
        use_resolution_binning=False,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",  # a 4-level VAE decode would cost more than the whole denoising loop
    ).images


@pytest.fixture
def pipe():
    return make_pipeline()


def test_self_attention_and_feed_forward_are_the_defaults(pipe):
    keys = [layer.block_key for layer in find_layers(pipe.transformer)]
    assert keys == [f"{kind}-{block}" for block in range(4) for kind in ("attn1", "ff")]


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
