"""CogVideoX: CogVideoXBlock (joint attention attn1 over video and text, one ff over both), through
CogVideoXPipeline with batched classifier-free guidance; CogVideoX-2b's DDIM and CogVideoX-5b's
DPM solver (whose step also takes the previous step's prediction) with rotary embeddings."""

import dataclasses
import functools

import torch

from .conftest import FamilyCase, sample, text_embeddings, tiny_pipeline
from .tiny_configs import COGVIDEOX_5B_TRANSFORMER, COGVIDEOX_TRANSFORMER, COGVIDEOX_VAE

TEXT_DIM, TEXT_LEN = COGVIDEOX_TRANSFORMER["text_embed_dim"], COGVIDEOX_TRANSFORMER["max_text_seq_length"]


def make_pipeline(cogvideox_5b: bool = False):
    from diffusers import (
        CogVideoXDDIMScheduler,
        CogVideoXDPMScheduler,
        CogVideoXPipeline,
    )

    return tiny_pipeline(
        CogVideoXPipeline,
        transformer=COGVIDEOX_5B_TRANSFORMER if cogvideox_5b else COGVIDEOX_TRANSFORMER,
        vae=COGVIDEOX_VAE,
        scheduler=CogVideoXDPMScheduler() if cogvideox_5b else CogVideoXDDIMScheduler(),
    )


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
