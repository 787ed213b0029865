"""HunyuanVideo: double-stream HunyuanVideoTransformerBlock (joint attention, ff, ff_context) and
single-stream HunyuanVideoSingleTransformerBlock (attention and MLP input projection in parallel),
after a text token refiner that is not cached unless asked for; through HunyuanVideoPipeline,
guidance-distilled (one call per step) and with true CFG (two sequential calls per step)."""

import torch

from smoothcache import Schedule, find_layers

from .conftest import (
    STEPS,
    FamilyCase,
    assert_skips_exactly_the_scheduled_calls,
    sample,
    text_embeddings,
    tiny_pipeline,
)
from .tiny_configs import HUNYUAN_VIDEO_TRANSFORMER, HUNYUAN_VIDEO_VAE

TEXT_DIM, POOLED_DIM = HUNYUAN_VIDEO_TRANSFORMER["text_embed_dim"], HUNYUAN_VIDEO_TRANSFORMER["pooled_projection_dim"]


def tiny_transformer(**config):
    torch.manual_seed(0)
    return HUNYUAN_VIDEO_TRANSFORMER.with_config(**config).build()


def make_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    return tiny_pipeline(
        HunyuanVideoPipeline,
        transformer=tiny_transformer(),
        vae=HUNYUAN_VIDEO_VAE,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )


def generate(pipe, seed: int = 0, true_cfg: bool = False) -> torch.Tensor:
    # Stand-ins for Llama and CLIP embeddings; a mask that hides two tokens; true CFG applies only with a
    # negative prompt.
    prompt, pooled = text_embeddings(1, 6, TEXT_DIM), text_embeddings(1, POOLED_DIM)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    return sample(
        pipe, seed, prompt_embeds=prompt, pooled_prompt_embeds=pooled, prompt_attention_mask=mask,
        negative_prompt_embeds=torch.zeros_like(prompt) if true_cfg else None,
        negative_pooled_prompt_embeds=torch.zeros_like(pooled) if true_cfg else None,
        negative_prompt_attention_mask=mask if true_cfg else None,
        true_cfg_scale=2.0, height=16, width=16, num_frames=5,
    )  # fmt: skip


def generate_true_cfg(pipe, seed: int = 0) -> torch.Tensor:
    return generate(pipe, seed, true_cfg=True)


CASE = FamilyCase(
    "hunyuan_video", make_pipeline, generate, true_cfg=generate_true_cfg,
    default_keys=[
        "attn-0", "ff-0", "ff_context-0", "attn-1", "ff-1", "ff_context-1",
        "single_attn-0", "single_proj_mlp-0", "single_attn-1", "single_proj_mlp-1",
    ],  # the single-stream layers get their own keys; the token refiner is left alone
    schedule_keys={"attn", "ff", "ff_context", "single_attn", "single_proj_mlp"},
)  # fmt: skip


def test_image_to_video_token_replace_blocks_answer_to_the_same_keys():
    transformer = tiny_transformer(image_condition_type="token_replace")
    assert {type(block).__name__ for block in transformer.single_transformer_blocks} == {
        "HunyuanVideoTokenReplaceSingleTransformerBlock"
    }
    assert [layer.block_key for layer in find_layers(transformer)] == CASE.default_keys


def test_the_token_refiner_is_opt_in_under_its_own_keys(pipe):
    layers = find_layers(pipe.transformer, ["attn", "refiner_attn", "refiner_ff"])
    assert [layer.name for layer in layers[:2]] == [
        "context_embedder.token_refiner.refiner_blocks.0.attn",
        "context_embedder.token_refiner.refiner_blocks.0.ff",
    ]
    assert [layer.block_key for layer in layers] == ["refiner_attn-0", "refiner_ff-0", "attn-0", "attn-1"]
    schedule = Schedule({"refiner_attn": (1, 0) * (STEPS // 2), "attn": (1, 1, 0) * (STEPS // 3)})
    assert_skips_exactly_the_scheduled_calls(pipe, generate, schedule)
