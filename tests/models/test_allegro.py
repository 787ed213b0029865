"""Allegro: AllegroTransformerBlock (self-attention attn1, cross-attention attn2, feed-forward),
through AllegroPipeline with batched classifier-free guidance. Latents out: Allegro's VAE decodes
only in tiles of 24 frames, far beyond a tiny test."""

import torch

from .conftest import FamilyCase, sample, text_embeddings, tiny_pipeline
from .tiny_configs import ALLEGRO_TRANSFORMER, ALLEGRO_VAE

TEXT_DIM = ALLEGRO_TRANSFORMER["caption_channels"]


def make_pipeline():
    from diffusers import AllegroPipeline, EulerAncestralDiscreteScheduler

    return tiny_pipeline(
        AllegroPipeline, transformer=ALLEGRO_TRANSFORMER, vae=ALLEGRO_VAE, scheduler=EulerAncestralDiscreteScheduler()
    )


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
