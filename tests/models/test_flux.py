"""Flux: double-stream FluxTransformerBlock (joint attention, ff, ff_context) and single-stream
FluxSingleTransformerBlock (attention and MLP input projection in parallel), through FluxPipeline;
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
    tiny_vae,
)
from .tiny_configs import FLUX_TRANSFORMER

JOINT_DIM, POOLED_DIM = FLUX_TRANSFORMER["joint_attention_dim"], FLUX_TRANSFORMER["pooled_projection_dim"]


def make_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return tiny_pipeline(
        FluxPipeline,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(latent_channels=1, shift_factor=0.0609, scaling_factor=1.5035),
        transformer=FLUX_TRANSFORMER,
    )


def generate(pipe, seed: int = 0, true_cfg: bool = False) -> torch.Tensor:
    # Stand-ins for CLIP pooled and T5 embeddings; true CFG applies only with a negative prompt.
    prompt, pooled = text_embeddings(2, 6, JOINT_DIM), text_embeddings(2, POOLED_DIM)
    return sample(
        pipe, seed, prompt_embeds=prompt, pooled_prompt_embeds=pooled,
        negative_prompt_embeds=torch.zeros_like(prompt) if true_cfg else None,
        negative_pooled_prompt_embeds=torch.zeros_like(pooled) if true_cfg else None,
        true_cfg_scale=2.0, height=8, width=8, guidance_scale=3.5,
    )  # fmt: skip


def generate_true_cfg(pipe, seed: int = 0) -> torch.Tensor:
    return generate(pipe, seed, true_cfg=True)


CASE = FamilyCase(
    "flux", make_pipeline, generate, true_cfg=generate_true_cfg,
    default_keys=[
        "attn-0", "ff-0", "ff_context-0", "attn-1", "ff-1", "ff_context-1",
        "single_proj_mlp-0", "single_attn-0", "single_proj_mlp-1", "single_attn-1",
    ],  # the single-stream layers get their own keys
    schedule_keys={"attn", "ff", "ff_context", "single_attn", "single_proj_mlp"},
)  # fmt: skip


def test_double_stream_keys_leave_the_single_stream_blocks_alone(pipe):
    assert [layer.name for layer in find_layers(pipe.transformer, ["attn"])] == [
        "transformer_blocks.0.attn", "transformer_blocks.1.attn"
    ]  # fmt: skip


def test_block_classes_given_by_the_caller_keep_the_bare_child_names(pipe):
    from diffusers.models.transformers.transformer_flux import (
        FluxSingleTransformerBlock,
    )

    layers = find_layers(pipe.transformer, ["attn"], block_classes=[FluxSingleTransformerBlock])
    assert [layer.block_key for layer in layers] == ["attn-0", "attn-1"]
    assert layers[0].name == "single_transformer_blocks.0.attn"


def test_one_stream_can_be_cached_alone(pipe):
    schedule = Schedule({"single_attn": (1, 0) * (STEPS // 2)})
    layers = assert_skips_exactly_the_scheduled_calls(pipe, generate, schedule)
    assert [layer.name for layer in layers] == ["single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]


def test_per_block_keys_name_one_single_stream_block(pipe):
    schedule = Schedule({"single_attn-1": (1, 0) * (STEPS // 2)})
    layers = assert_skips_exactly_the_scheduled_calls(pipe, generate, schedule)
    assert [layer.name for layer in layers] == ["single_transformer_blocks.1.attn"]


def test_split_steps_caches_both_block_lists_whole_by_default():
    """Fewer steps and a cache (smoothcache.split_steps) on Flux: the default components are both
    block lists, double- and single-stream, cached whole."""
    import smoothcache
    from smoothcache.adapters import whole_block_components

    pipe = make_pipeline()
    assert whole_block_components(pipe.transformer) == ["block", "single_block"]
    prompt, pooled = text_embeddings(2, 6, JOINT_DIM), text_embeddings(2, POOLED_DIM)

    def generate_at(steps: int) -> torch.Tensor:
        return pipe(prompt_embeds=prompt, pooled_prompt_embeds=pooled, height=8, width=8, guidance_scale=3.5,
                    num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt")[0]

    split = smoothcache.split_steps(pipe, generate_at, 8, 0.6, step_counts=[8, 6], forecast="none", progress=False)
    assert split.schedules[8].keys == ["block", "single_block"] and split.schedules[8].compute_fraction() <= 0.6
    assert split.schedules[6].compute_fraction() < 1  # 6 of 8 steps leave 0.8 for the cache
