"""Mochi: MochiTransformerBlock (joint attention attn1 over video and text, ff, ff_context; the last
block has no ff_context), through MochiPipeline with batched classifier-free guidance."""

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

# Mochi's rotary embedding asks for float32 autocast, which the CPU does not have.
pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast")


def make_pipeline():
    from diffusers import (
        AutoencoderKLMochi,
        FlowMatchEulerDiscreteScheduler,
        MochiPipeline,
        MochiTransformer3DModel,
    )

    torch.manual_seed(0)
    transformer = MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        pooled_projection_dim=16,
        in_channels=12,  # the pipeline hard-codes Mochi's 12 latent channels
        qk_norm="rms_norm",
        text_embed_dim=TEXT_DIM,
        time_embed_dim=4,
        activation_fn="swiglu",
        max_sequence_length=16,
    ).eval()
    # 8x spatial, 6x temporal compression: a 32x32, 7-frame video is 2 latent frames of 4x4.
    vae = AutoencoderKLMochi(
        latent_channels=12,
        encoder_block_out_channels=(32,) * 4,  # group norms of 32 groups
        decoder_block_out_channels=(32,) * 4,
        layers_per_block=(1,) * 5,
        add_attention_block=(False,) * 5,
    ).eval()
    pipe = MochiPipeline(
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
        num_frames=7,
        num_inference_steps=STEPS,
        max_sequence_length=6,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).frames


@pytest.fixture
def pipe():
    return make_pipeline()


def test_both_streams_are_cached_and_the_last_block_has_no_context_feed_forward(pipe):
    keys = [layer.block_key for layer in find_layers(pipe.transformer)]
    assert keys == ["attn1-0", "ff-0", "ff_context-0", "attn1-1", "ff-1"]


def test_calibrated_schedule_skips_exactly_the_scheduled_calls(pipe):
    schedule = calibrated_schedule(pipe, generate)
    assert set(schedule.keys) == {"attn1", "ff", "ff_context"}
    assert_skips_exactly_the_scheduled_calls(pipe, generate, schedule)


def test_all_ones_schedule_is_bit_identical_to_uncached(pipe):
    assert_all_ones_is_bit_identical(pipe, generate)


def test_disable_restores_the_model_exactly(pipe):
    assert_disable_restores_the_model(pipe, generate, calibrated_schedule(pipe, generate))
