"""HunyuanDiT: HunyuanDiTBlock (self-attention attn1, cross-attention attn2, ff; long skip
connections into the later blocks), through HunyuanDiTPipeline with batched classifier-free guidance."""

import pytest
import torch

from .conftest import FamilyCase, sample, text_embeddings, tiny_pipeline, tiny_vae

CLIP_DIM, CLIP_LEN, T5_DIM, T5_LEN = 16, 5, 16, 6


def make_pipeline():
    from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline

    torch.manual_seed(0)
    transformer = HunyuanDiT2DModel(
        sample_size=4,
        num_layers=4,  # the last block takes a long skip connection from the first
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        hidden_size=16,
        cross_attention_dim=CLIP_DIM,
        cross_attention_dim_t5=T5_DIM,
        pooled_projection_dim=16,
        text_len=CLIP_LEN,
        text_len_t5=T5_LEN,
    ).eval()
    # The pipeline sizes its rotary grid as if the VAE downsampled by 8, so this one does.
    return tiny_pipeline(
        HunyuanDiTPipeline,
        vae=tiny_vae(levels=4),
        transformer=transformer,
        scheduler=DDPMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def generate(pipe, seed: int = 0) -> torch.Tensor:
    # Stand-ins for CLIP (here: BERT) and T5 embeddings. Latents out: a 4-level VAE decode would cost
    # more than the whole denoising loop.
    clip, t5 = text_embeddings(2, CLIP_LEN, CLIP_DIM), text_embeddings(2, T5_LEN, T5_DIM)
    clip_mask, t5_mask = torch.ones(2, CLIP_LEN, dtype=torch.long), torch.ones(2, T5_LEN, dtype=torch.long)
    return sample(
        pipe, seed, "latent", prompt_embeds=clip, prompt_attention_mask=clip_mask,
        prompt_embeds_2=t5, prompt_attention_mask_2=t5_mask,
        negative_prompt_embeds=torch.zeros_like(clip), negative_prompt_attention_mask=clip_mask,
        negative_prompt_embeds_2=torch.zeros_like(t5), negative_prompt_attention_mask_2=t5_mask,
        height=32, width=32, use_resolution_binning=False,
    )  # fmt: skip


CASE = FamilyCase(
    "hunyuandit", make_pipeline, generate,
    default_keys=[f"{kind}-{block}" for block in range(4) for kind in ("attn1", "ff")], schedule_keys={"attn1", "ff"},
    opt_in_components=["attn1", "attn2", "ff"],  # cross-attention, when asked for
    all_ones_components=["attn1", "attn2", "ff"], disable_components=["attn1", "attn2", "ff"],
)  # fmt: skip


@pytest.fixture
def pipe():
    return make_pipeline()
