"""HunyuanDiT: HunyuanDiTBlock (self-attention attn1, cross-attention attn2, ff; long skip
connections into the later blocks), through HunyuanDiTPipeline with batched classifier-free guidance."""

import torch

from .conftest import FamilyCase, sample, text_embeddings, tiny_pipeline, tiny_vae
from .tiny_configs import HUNYUANDIT_TRANSFORMER

CLIP_DIM, CLIP_LEN = HUNYUANDIT_TRANSFORMER["cross_attention_dim"], HUNYUANDIT_TRANSFORMER["text_len"]
T5_DIM, T5_LEN = HUNYUANDIT_TRANSFORMER["cross_attention_dim_t5"], HUNYUANDIT_TRANSFORMER["text_len_t5"]


def make_pipeline():
    from diffusers import DDPMScheduler, HunyuanDiTPipeline

    # The pipeline sizes its rotary grid as if the VAE downsampled by 8, so this one does.
    return tiny_pipeline(
        HunyuanDiTPipeline,
        vae=tiny_vae(levels=4),
        transformer=HUNYUANDIT_TRANSFORMER,
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
