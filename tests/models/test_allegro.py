"""Allegro: AllegroTransformerBlock (self-attention attn1, cross-attention attn2, feed-forward),
through AllegroPipeline with batched classifier-free guidance. Latents out: Allegro's VAE decodes
only in tiles of 24 frames, far beyond a tiny test."""

import torch

from .conftest import FamilyCase, sample, text_embeddings, tiny_pipeline

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
    return tiny_pipeline(AllegroPipeline, vae=vae, transformer=transformer, scheduler=EulerAncestralDiscreteScheduler())


def generate(pipe, seed: int = 0) -> torch.Tensor:
    # Stand-ins for T5 embeddings; a mask that hides two tokens.
    prompt, mask = text_embeddings(1, 6, TEXT_DIM), torch.tensor([[1, 1, 1, 1, 0, 0]])
    return sample(
        pipe, seed, "latent", prompt_embeds=prompt, prompt_attention_mask=mask, negative_prompt=None,
        negative_prompt_embeds=torch.zeros_like(prompt), negative_prompt_attention_mask=mask,
        height=32, width=32, num_frames=5,
    )  # fmt: skip


CASE = FamilyCase(
    "allegro", make_pipeline, generate,
    default_keys=["attn1-0", "ff-0", "attn1-1", "ff-1"], schedule_keys={"attn1", "ff"},
    all_ones_components=["attn1", "attn2", "ff"],
)  # fmt: skip
