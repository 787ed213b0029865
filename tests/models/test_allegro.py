"""Allegro: AllegroTransformerBlock (self-attention attn1, cross-attention attn2, feed-forward),
through AllegroPipeline with batched classifier-free guidance. Latents out: Allegro's VAE decodes
only in tiles of 24 frames, far beyond a tiny test."""

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
        AllegroPipeline,
        AllegroTransformer3DModel,
        AutoencoderKLAllegro,
        EulerAncestralDiscreteScheduler,
    )

    torch.manual_seed(0)
    transformer = AllegroTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=12,  # the rotary embedding splits it in three
        in_channels=4,
        out_channels=4,
        num_layers=2,
        cross_attention_dim=24,  # the projected captions have the inner width, 2 x 12
        sample_width=4,
        sample_height=4,
        sample_frames=2,
        caption_channels=TEXT_DIM,
    ).eval()
    # Sets the pipeline's 8x spatial and 4x temporal compression; never run.
    vae = AutoencoderKLAllegro(
        block_out_channels=(8,) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    ).eval()
    pipe = AllegroPipeline(
        tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=EulerAncestralDiscreteScheduler()
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
        negative_prompt=None,
        negative_prompt_embeds=torch.zeros_like(prompt),
        negative_prompt_attention_mask=mask,
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
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


def test_all_ones_schedule_is_bit_identical_to_uncached(pipe):
    assert_all_ones_is_bit_identical(pipe, generate, ["attn1", "attn2", "ff"])


def test_disable_restores_the_model_exactly(pipe):
    assert_disable_restores_the_model(pipe, generate, calibrated_schedule(pipe, generate))
