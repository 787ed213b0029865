"""CogVideoX: CogVideoXBlock (joint attention attn1 over video and text, one ff over both), through
CogVideoXPipeline with batched classifier-free guidance; CogVideoX-2b's DDIM and CogVideoX-5b's
DPM solver (whose step also takes the previous step's prediction) with rotary embeddings."""

import dataclasses
import functools

import torch

from .conftest import FamilyCase, sample, text_embeddings, tiny_pipeline

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
    return tiny_pipeline(CogVideoXPipeline, vae=vae, transformer=transformer, scheduler=scheduler)


def generate(pipe, seed: int = 0) -> torch.Tensor:
    # Stand-ins for T5 embeddings.
    prompt = text_embeddings(1, TEXT_LEN, TEXT_DIM)
    return sample(
        pipe, seed, prompt_embeds=prompt, negative_prompt_embeds=torch.zeros_like(prompt),
        height=8, width=8, num_frames=5, max_sequence_length=TEXT_LEN,
    )  # fmt: skip


CASE = FamilyCase(
    "cogvideox", make_pipeline, generate,
    default_keys=["attn1-0", "ff-0", "attn1-1", "ff-1"], schedule_keys={"attn1", "ff"},
)  # fmt: skip
# CogVideoX-5b: the DPM solver, whose step also takes the previous step's prediction, and rotary embeddings.
CASE_5B = dataclasses.replace(CASE, name="cogvideox-5b", make=functools.partial(make_pipeline, cogvideox_5b=True))
