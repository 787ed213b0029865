"""Sana: SanaTransformerBlock (linear self-attention attn1, cross-attention attn2, GLUMBConv
feed-forward ff), through SanaPipeline with a tiny deep-compression VAE and batched
classifier-free guidance."""

import pytest
import torch

from .conftest import FamilyCase, sample, text_embeddings, tiny_pipeline

CAPTION_CHANNELS = 8


def make_pipeline():
    from diffusers import (
        AutoencoderDC,
        FlowMatchEulerDiscreteScheduler,
        SanaPipeline,
        SanaTransformer2DModel,
    )

    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=CAPTION_CHANNELS,
        sample_size=8,
    ).eval()
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        upsample_block_type="interpolate",
        downsample_block_type="conv",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    ).eval()
    return tiny_pipeline(
        SanaPipeline, vae=vae, transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0)
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


@pytest.fixture
def pipe():
    return make_pipeline()
