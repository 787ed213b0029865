"""Sana: SanaTransformerBlock (linear self-attention attn1, cross-attention attn2, GLUMBConv
feed-forward ff), through SanaPipeline with a tiny deep-compression VAE and batched
classifier-free guidance."""

import torch

from .conftest import FamilyCase, sample, text_embeddings, tiny_pipeline
from .tiny_configs import SANA_TRANSFORMER, SANA_VAE

CAPTION_CHANNELS = SANA_TRANSFORMER["caption_channels"]


def make_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline

    return tiny_pipeline(
        SanaPipeline, transformer=SANA_TRANSFORMER, vae=SANA_VAE, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0)
    )


def generate(pipe, seed: int = 0) -> torch.Tensor:
    # Stand-ins for Gemma embeddings; a mask that hides the last two tokens of one prompt. 32 x 32: the
    # pipeline's minimum.
    prompt, mask = text_embeddings(2, 5, CAPTION_CHANNELS), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    return sample(
        pipe, seed, prompt_embeds=prompt, prompt_attention_mask=mask, negative_prompt=None,
        negative_prompt_embeds=torch.zeros_like(prompt), negative_prompt_attention_mask=torch.ones_like(mask),
        height=32, width=32, use_resolution_binning=False,
    )  # fmt: skip


CASE = FamilyCase(
    "sana", make_pipeline, generate,
    default_keys=["attn1-0", "ff-0", "attn1-1", "ff-1"], schedule_keys={"attn1", "ff"},
    opt_in_components=["attn1", "attn2", "ff"],  # cross-attention, when asked for
    all_ones_components=["attn1", "attn2", "ff"], disable_components=["attn1", "attn2", "ff"],
)  # fmt: skip
