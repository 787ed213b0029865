"""LTX-Video: LTXVideoTransformerBlock (self-attention attn1, cross-attention attn2, feed-forward),
through LTXPipeline with batched classifier-free guidance."""

import torch

from .conftest import FamilyCase, sample, text_embeddings, tiny_pipeline
from .tiny_configs import LTX_VIDEO_TRANSFORMER, LTX_VIDEO_VAE

TEXT_DIM = LTX_VIDEO_TRANSFORMER["caption_channels"]


def make_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline

    return tiny_pipeline(
        LTXPipeline, transformer=LTX_VIDEO_TRANSFORMER, vae=LTX_VIDEO_VAE, scheduler=FlowMatchEulerDiscreteScheduler()
    )


def generate(pipe, seed: int = 0) -> torch.Tensor:
    # Stand-ins for T5 embeddings; a mask that hides two tokens.
    prompt, mask = text_embeddings(1, 6, TEXT_DIM), torch.tensor([[1, 1, 1, 1, 0, 0]])
    return sample(
        pipe, seed, prompt_embeds=prompt, prompt_attention_mask=mask,
        negative_prompt_embeds=torch.zeros_like(prompt), negative_prompt_attention_mask=mask,
        height=32, width=32, num_frames=5,
    )  # fmt: skip


CASE = FamilyCase(
    "ltx_video", make_pipeline, generate,
    default_keys=["attn1-0", "ff-0", "attn1-1", "ff-1"], schedule_keys={"attn1", "ff"},
    opt_in_components=["attn1", "attn2", "ff"], all_ones_components=["attn1", "attn2", "ff"],
)  # fmt: skip
