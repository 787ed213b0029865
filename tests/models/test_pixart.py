"""PixArt-α and PixArt-Σ: diffusers' BasicTransformerBlock (attn1, cross-attention attn2, ff),
through PixArtAlphaPipeline and PixArtSigmaPipeline with batched classifier-free guidance."""

import torch

from .conftest import (
    FamilyCase,
    assert_skips_exactly_the_scheduled_calls,
    calibrated_schedule,
    sample,
    text_embeddings,
    tiny_pipeline,
    tiny_vae,
)
from .tiny_configs import PIXART_TRANSFORMER

CAPTION_CHANNELS = PIXART_TRANSFORMER["caption_channels"]


def make_pipeline(pipeline_class_name: str = "PixArtAlphaPipeline"):
    import diffusers
    from diffusers import DPMSolverMultistepScheduler

    pipeline_class = getattr(diffusers, pipeline_class_name)
    return tiny_pipeline(
        pipeline_class, transformer=PIXART_TRANSFORMER, vae=tiny_vae(), scheduler=DPMSolverMultistepScheduler()
    )


def generate(pipe, seed: int = 0) -> torch.Tensor:
    # Stand-ins for T5 embeddings; a mask that hides the last two tokens of one prompt.
    prompt, mask = text_embeddings(2, 5, CAPTION_CHANNELS), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    return sample(
        pipe, seed, prompt_embeds=prompt, prompt_attention_mask=mask, negative_prompt=None,
        negative_prompt_embeds=torch.zeros_like(prompt), negative_prompt_attention_mask=torch.ones_like(mask),
        height=8, width=8, use_resolution_binning=False,
    )  # fmt: skip


CASE = FamilyCase(
    "pixart", make_pipeline, generate,
    default_keys=["attn1-0", "ff-0", "attn1-1", "ff-1"], schedule_keys={"attn1", "ff"},
    all_ones_components=["attn1", "attn2", "ff"], disable_components=["attn1", "attn2", "ff"],
)  # fmt: skip


def test_cross_attention_is_cached_when_asked_for(pipe):
    components = ["attn1", "attn2", "ff"]
    schedule = calibrated_schedule(pipe, generate, components)
    assert set(schedule.keys) == set(components)
    layers = assert_skips_exactly_the_scheduled_calls(pipe, generate, schedule)
    cross = [layer.module for layer in layers if layer.layer_type == "attn2"]
    assert len(cross) == 2 and all(attn.is_cross_attention for attn in cross)


def test_pixart_sigma_pipeline_is_cached_the_same_way():
    pipe = make_pipeline("PixArtSigmaPipeline")
    assert_skips_exactly_the_scheduled_calls(pipe, generate, calibrated_schedule(pipe, generate))
