"""Latte: a spatial and a temporal BasicTransformerBlock per depth (transformer_blocks and
temporal_transformer_blocks, interleaved), one class for both, told apart by the list holding them;
through LattePipeline with batched classifier-free guidance."""

import pytest
import torch

from smoothcache import Schedule, find_layers

from .conftest import (
    STEPS,
    assert_all_ones_is_bit_identical,
    assert_disable_restores_the_model,
    assert_skips_exactly_the_scheduled_calls,
    calibrated_schedule,
    tiny_vae,
)

TEXT_DIM, FRAMES = 16, 3


def make_pipeline():
    from diffusers import DDIMScheduler, LattePipeline, LatteTransformer3DModel

    torch.manual_seed(0)
    transformer = LatteTransformer3DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=TEXT_DIM,
        in_channels=4,
        cross_attention_dim=16,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        video_length=FRAMES,
    ).eval()
    pipe = LattePipeline(
        tokenizer=None,
        text_encoder=None,
        vae=tiny_vae(levels=2),
        transformer=transformer,
        scheduler=DDIMScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed: int = 0) -> torch.Tensor:
    # T5 embeddings stood in for by fixed random tensors.
    prompt = torch.randn(1, 6, TEXT_DIM, generator=torch.Generator().manual_seed(100))
    return pipe(
        prompt_embeds=prompt,
        negative_prompt=None,
        negative_prompt_embeds=torch.zeros_like(prompt),
        video_length=FRAMES,
        height=16,
        width=16,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).frames


@pytest.fixture
def pipe():
    return make_pipeline()


def test_temporal_blocks_get_their_own_keys(pipe):
    keys = [layer.block_key for layer in find_layers(pipe.transformer)]
    assert keys == [
        "attn1-0", "ff-0", "attn1-1", "ff-1", "temporal_attn1-0", "temporal_ff-0", "temporal_attn1-1", "temporal_ff-1"
    ]  # fmt: skip
    assert [layer.name for layer in find_layers(pipe.transformer, ["temporal_attn1"])] == [
        "temporal_transformer_blocks.0.attn1", "temporal_transformer_blocks.1.attn1"
    ]  # fmt: skip


def test_module_path_patterns_get_the_prefix_too(pipe):
    layers = find_layers(pipe.transformer, ["temporal_transformer_blocks.*.ff"])
    assert [layer.block_key for layer in layers] == ["temporal_ff-0", "temporal_ff-1"]


def test_a_per_block_key_names_one_temporal_block(pipe):
    schedule = Schedule({"temporal_attn1-1": (1, 0) * (STEPS // 2)})
    layers = assert_skips_exactly_the_scheduled_calls(pipe, generate, schedule)
    assert [layer.name for layer in layers] == ["temporal_transformer_blocks.1.attn1"]


def test_calibrated_schedule_skips_exactly_the_scheduled_calls(pipe):
    schedule = calibrated_schedule(pipe, generate)
    assert set(schedule.keys) == {"attn1", "ff", "temporal_attn1", "temporal_ff"}
    assert_skips_exactly_the_scheduled_calls(pipe, generate, schedule)


def test_all_ones_schedule_is_bit_identical_to_uncached(pipe):
    assert_all_ones_is_bit_identical(pipe, generate, ["attn1", "attn2", "ff", "temporal_attn1", "temporal_ff"])


def test_disable_restores_the_model_exactly(pipe):
    assert_disable_restores_the_model(pipe, generate, calibrated_schedule(pipe, generate))


def test_image_models_built_from_the_same_blocks_keep_their_family(pipe):
    from diffusers import DiTTransformer2DModel

    from smoothcache.adapters import family_of

    assert family_of(pipe.transformer).name == "latte"
    dit = DiTTransformer2DModel(num_layers=1, attention_head_dim=8, num_attention_heads=2, sample_size=8)
    assert family_of(dit).name == "diffusers-basic"
