"""QwenImage: QwenImageTransformerBlock (joint attention returning image and text outputs, img_mlp,
txt_mlp), through QwenImagePipeline; one call per step, or two sequential calls with true CFG."""

import torch

from .conftest import FamilyCase, sample, text_embeddings, tiny_pipeline
from .tiny_configs import QWENIMAGE_TRANSFORMER, QWENIMAGE_VAE

TEXT_DIM = QWENIMAGE_TRANSFORMER["joint_attention_dim"]


def make_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    return tiny_pipeline(
        QwenImagePipeline,
        transformer=QWENIMAGE_TRANSFORMER,
        vae=QWENIMAGE_VAE,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )


def generate(pipe, seed: int = 0, true_cfg: bool = False) -> torch.Tensor:
    # Stand-ins for Qwen2.5-VL embeddings; a mask hiding the last two tokens of one prompt; true CFG
    # applies only with a negative prompt.
    prompt, mask = text_embeddings(2, 5, TEXT_DIM), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    return sample(
        pipe, seed, prompt_embeds=prompt, prompt_embeds_mask=mask,
        negative_prompt_embeds=torch.zeros_like(prompt) if true_cfg else None,
        negative_prompt_embeds_mask=torch.ones_like(mask) if true_cfg else None,
        true_cfg_scale=4.0, height=16, width=16,
    )  # fmt: skip


def generate_true_cfg(pipe, seed: int = 0) -> torch.Tensor:
    return generate(pipe, seed, true_cfg=True)


CASE = FamilyCase(
    "qwenimage", make_pipeline, generate, true_cfg=generate_true_cfg,
    default_keys=["attn-0", "img_mlp-0", "txt_mlp-0", "attn-1", "img_mlp-1", "txt_mlp-1"],
    schedule_keys={"attn", "img_mlp", "txt_mlp"},  # joint attention and both streams' MLPs
)  # fmt: skip
