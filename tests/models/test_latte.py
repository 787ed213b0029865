"""Latte: a spatial and a temporal BasicTransformerBlock per depth (transformer_blocks and
temporal_transformer_blocks, interleaved), one class for both, told apart by the list holding them;
through LattePipeline with batched classifier-free guidance."""

import torch

from smoothcache import Schedule, find_layers

from .conftest import (
    STEPS,
    FamilyCase,
    assert_skips_exactly_the_scheduled_calls,
    sample,
    text_embeddings,
    tiny_pipeline,
    tiny_vae,
)
from .tiny_configs import LATTE_TRANSFORMER

TEXT_DIM, FRAMES = LATTE_TRANSFORMER["caption_channels"], LATTE_TRANSFORMER["video_length"]


def make_pipeline():
    from diffusers import DDIMScheduler, LattePipeline

    return tiny_pipeline(
        LattePipeline, transformer=LATTE_TRANSFORMER, vae=tiny_vae(levels=2), scheduler=DDIMScheduler()
    )


def generate(pipe, seed: int = 0) -> torch.Tensor:
    # Stand-ins for T5 embeddings.
    prompt = text_embeddings(1, 6, TEXT_DIM)
    return sample(
        pipe, seed, prompt_embeds=prompt, negative_prompt=None, negative_prompt_embeds=torch.zeros_like(prompt),
        video_length=FRAMES, height=16, width=16,
    )  # fmt: skip


CASE = FamilyCase(
    "latte", make_pipeline, generate,
    default_keys=[
        "attn1-0", "ff-0", "attn1-1", "ff-1", "temporal_attn1-0", "temporal_ff-0", "temporal_attn1-1", "temporal_ff-1"
    ],  # the temporal blocks get their own keys
    schedule_keys={"attn1", "ff", "temporal_attn1", "temporal_ff"},
    all_ones_components=["attn1", "attn2", "ff", "temporal_attn1", "temporal_ff"],
)  # fmt: skip


def test_temporal_keys_name_the_temporal_blocks(pipe):
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


def test_image_models_built_from_the_same_blocks_keep_their_family(pipe):
    from diffusers import DiTTransformer2DModel

    from smoothcache.adapters import family_of

    assert family_of(pipe.transformer).name == "latte"
    dit = DiTTransformer2DModel(num_layers=1, attention_head_dim=8, num_attention_heads=2, sample_size=8)
    assert family_of(dit).name == "diffusers-basic"
