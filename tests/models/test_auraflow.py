"""AuraFlow: MMDiT AuraFlowJointTransformerBlock (joint attention, ff, ff_context), then
AuraFlowSingleTransformerBlock with the same child names (keys "single_attn", "single_ff"), through
AuraFlowPipeline with batched classifier-free guidance."""

import torch

from .conftest import FamilyCase, sample, text_embeddings, tiny_pipeline, tiny_vae
from .tiny_configs import AURAFLOW_TRANSFORMER

JOINT_DIM = AURAFLOW_TRANSFORMER["joint_attention_dim"]


def make_pipeline():
    from diffusers import AuraFlowPipeline, FlowMatchEulerDiscreteScheduler

    return tiny_pipeline(
        AuraFlowPipeline, transformer=AURAFLOW_TRANSFORMER, vae=tiny_vae(), scheduler=FlowMatchEulerDiscreteScheduler()
    )


def generate(pipe, seed: int = 0) -> torch.Tensor:
    # Stand-ins for UMT5 embeddings.
    prompt, mask = text_embeddings(2, 5, JOINT_DIM), torch.ones(2, 5, dtype=torch.long)
    return sample(
        pipe, seed, prompt_embeds=prompt, prompt_attention_mask=mask,
        negative_prompt_embeds=torch.zeros_like(prompt), negative_prompt_attention_mask=mask, height=8, width=8,
    )  # fmt: skip


CASE = FamilyCase(
    "auraflow", make_pipeline, generate,
    default_keys=[
        "attn-0", "ff-0", "ff_context-0", "attn-1", "ff-1", "ff_context-1",
        "single_attn-0", "single_ff-0", "single_attn-1", "single_ff-1",
    ],  # the single blocks get their own keys
    schedule_keys={"attn", "ff", "ff_context", "single_attn", "single_ff"},
)  # fmt: skip
