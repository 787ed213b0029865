"""QwenImage: QwenImageTransformerBlock (joint attention returning image and text outputs, img_mlp,
txt_mlp), through QwenImagePipeline; one call per step, or two sequential calls with true CFG."""

import pytest
import torch

from smoothcache import find_layers

from .conftest import (
    STEPS,
    assert_all_ones_is_bit_identical,
    assert_disable_restores_the_model,
    assert_skips_exactly_the_scheduled_calls,
    calibrated_schedule,
)

TEXT_DIM = 16


def make_pipeline():
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        axes_dims_rope=(2, 2, 4),
    ).eval()
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ).eval()
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed: int = 0, true_cfg: bool = False) -> torch.Tensor:
    # Qwen2.5-VL embeddings stood in for by fixed random tensors; a mask hiding the last two tokens.
    prompt = torch.randn(2, 5, TEXT_DIM, generator=torch.Generator().manual_seed(100))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    return pipe(
        prompt_embeds=prompt,
        prompt_embeds_mask=mask,
        negative_prompt_embeds=torch.zeros_like(prompt) if true_cfg else None,
        negative_prompt_embeds_mask=torch.ones_like(mask) if true_cfg else None,
        true_cfg_scale=4.0,  # applies only with a negative prompt
        num_inference_steps=STEPS,
        height=16,
        width=16,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images


def generate_true_cfg(pipe, seed: int = 0) -> torch.Tensor:
    return generate(pipe, seed, true_cfg=True)


@pytest.fixture
def pipe():
    return make_pipeline()


def test_joint_attention_and_both_streams_mlps_are_the_defaults(pipe):
    keys = [layer.block_key for layer in find_layers(pipe.transformer)]
    assert keys == ["attn-0", "img_mlp-0", "txt_mlp-0", "attn-1", "img_mlp-1", "txt_mlp-1"]


def test_calibrated_schedule_skips_exactly_the_scheduled_calls(pipe):
    schedule = calibrated_schedule(pipe, generate)
    assert set(schedule.keys) == {"attn", "img_mlp", "txt_mlp"}
    assert_skips_exactly_the_scheduled_calls(pipe, generate, schedule)


def test_true_cfg_two_calls_per_step_skip_exactly_the_scheduled_calls(pipe):
    schedule = calibrated_schedule(pipe, generate_true_cfg, calls_per_step=2)
    assert_skips_exactly_the_scheduled_calls(pipe, generate_true_cfg, schedule, calls_per_step=2)


def test_all_ones_schedule_is_bit_identical_to_uncached(pipe):
    assert_all_ones_is_bit_identical(pipe, generate)
    assert_all_ones_is_bit_identical(pipe, generate_true_cfg, calls_per_step=2)


def test_disable_restores_the_model_exactly(pipe):
    assert_disable_restores_the_model(pipe, generate, calibrated_schedule(pipe, generate))
