"""CogVideoX: CogVideoXBlock (joint attention attn1 over video and text, one ff over both), through
CogVideoXPipeline with batched classifier-free guidance; CogVideoX-2b's DDIM and CogVideoX-5b's
DPM solver (whose step also takes the previous step's prediction) with rotary embeddings."""

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

TEXT_DIM, TEXT_LEN = 16, 6


def make_pipeline(cogvideox_5b: bool = False):
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXDPMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,  # the rotary embedding splits it 4 + 6 + 6 over frames, height, width
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=TEXT_DIM,
        num_layers=2,
        sample_width=4,
        sample_height=4,
        sample_frames=5,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=TEXT_LEN,
        use_rotary_positional_embeddings=cogvideox_5b,
    ).eval()
    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 2,
        up_block_types=("CogVideoXUpBlock3D",) * 2,
        block_out_channels=(8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    ).eval()
    scheduler = CogVideoXDPMScheduler() if cogvideox_5b else CogVideoXDDIMScheduler()
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed: int = 0) -> torch.Tensor:
    # T5 embeddings stood in for by fixed random tensors.
    prompt = torch.randn(1, TEXT_LEN, TEXT_DIM, generator=torch.Generator().manual_seed(100))
    return pipe(
        prompt_embeds=prompt,
        negative_prompt_embeds=torch.zeros_like(prompt),
        height=8,
        width=8,
        num_frames=5,
        num_inference_steps=STEPS,
        max_sequence_length=TEXT_LEN,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).frames


@pytest.fixture
def pipe():
    return make_pipeline()


@pytest.fixture
def pipe5b():
    return make_pipeline(cogvideox_5b=True)


def test_joint_attention_and_feed_forward_are_the_default(pipe):
    assert [layer.block_key for layer in find_layers(pipe.transformer)] == ["attn1-0", "ff-0", "attn1-1", "ff-1"]


def test_calibrated_schedule_skips_exactly_the_scheduled_calls(pipe):
    schedule = calibrated_schedule(pipe, generate)
    assert set(schedule.keys) == {"attn1", "ff"}
    assert_skips_exactly_the_scheduled_calls(pipe, generate, schedule)


def test_5b_dpm_solver_skips_exactly_the_scheduled_calls(pipe5b):
    assert_skips_exactly_the_scheduled_calls(pipe5b, generate, calibrated_schedule(pipe5b, generate))


def test_all_ones_schedule_is_bit_identical_to_uncached(pipe5b):
    assert_all_ones_is_bit_identical(pipe5b, generate)


def test_disable_restores_the_model_exactly(pipe5b):
    assert_disable_restores_the_model(pipe5b, generate, calibrated_schedule(pipe5b, generate))
