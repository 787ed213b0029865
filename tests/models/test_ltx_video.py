"""LTX-Video: LTXVideoTransformerBlock (self-attention attn1, cross-attention attn2, feed-forward),
through LTXPipeline with batched classifier-free guidance."""

import pytest
import torch

from .conftest import FamilyCase, sample, text_embeddings, tiny_pipeline

TEXT_DIM = 16


def make_pipeline():
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=2,
        caption_channels=TEXT_DIM,
    ).eval()
    # 8x spatial, 4x temporal compression: a 32x32, 5-frame video is 2 latent frames of 4x4.
    vae = AutoencoderKLLTXVideo(
        latent_channels=4,
        block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        down_block_types=("LTXVideoDownBlock3D",) * 2,
        spatio_temporal_scaling=(True, True),
        decoder_spatio_temporal_scaling=(True, True),
        decoder_inject_noise=(False,) * 3,
        downsample_type=("conv", "conv"),
        upsample_residual=(False, False),
        upsample_factor=(1, 1),
        patch_size=2,
        patch_size_t=1,
    ).eval()
    return tiny_pipeline(LTXPipeline, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, transformer=transformer)


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


@pytest.fixture
def pipe():
    return make_pipeline()
