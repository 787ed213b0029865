"""Mochi: MochiTransformerBlock (joint attention attn1 over video and text, ff, ff_context; the last
block has no ff_context), through MochiPipeline with batched classifier-free guidance."""

import pytest
import torch

from .conftest import FamilyCase, sample, text_embeddings, tiny_pipeline
from .tiny_configs import MOCHI_TRANSFORMER, MOCHI_VAE

TEXT_DIM = MOCHI_TRANSFORMER["text_embed_dim"]


def make_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline

    return tiny_pipeline(
        MochiPipeline, transformer=MOCHI_TRANSFORMER, vae=MOCHI_VAE, scheduler=FlowMatchEulerDiscreteScheduler()
    )


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
