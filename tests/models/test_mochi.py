"""Mochi: MochiTransformerBlock (joint attention attn1 over video and text, ff, ff_context; the last
block has no ff_context), through MochiPipeline with batched classifier-free guidance."""

import pytest
import torch

from .conftest import FamilyCase, sample, text_embeddings, tiny_pipeline

TEXT_DIM = 16


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
    return tiny_pipeline(MochiPipeline, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, transformer=transformer)


def generate(pipe, seed: int = 0) -> torch.Tensor:
    # Stand-ins for T5 embeddings; a mask that hides two tokens. Latents out: decoding them with this
    # VAE (group norms of 32 channels) costs four times the whole denoising loop.
    prompt, mask = text_embeddings(1, 6, TEXT_DIM), torch.tensor([[1, 1, 1, 1, 0, 0]])
    return sample(
        pipe, seed, "latent", prompt_embeds=prompt, prompt_attention_mask=mask, max_sequence_length=6,
        negative_prompt_embeds=torch.zeros_like(prompt), negative_prompt_attention_mask=mask,
        height=32, width=32, num_frames=7,
    )  # fmt: skip


CASE = FamilyCase(
    "mochi", make_pipeline, generate,
    default_keys=["attn1-0", "ff-0", "ff_context-0", "attn1-1", "ff-1"],  # the last block has no ff_context
    schedule_keys={"attn1", "ff", "ff_context"},
    # Mochi's rotary embedding asks for float32 autocast, which the CPU does not have.
    marks=[pytest.mark.filterwarnings("ignore:In CPU autocast")],
)  # fmt: skip
