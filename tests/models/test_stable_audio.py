"""Stable Audio Open: StableAudioDiTBlock (self-attention attn1, cross-attention attn2, feed-forward),
through StableAudioPipeline with batched classifier-free guidance. Its solvers are multistep
DPM-Solver++ (2M, also the SDE variant): one transformer call per step."""

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


def make_pipeline(scheduler=None):
    from diffusers import (
        AutoencoderOobleck,
        EDMDPMSolverMultistepScheduler,
        StableAudioDiTModel,
        StableAudioPipeline,
    )
    from diffusers.pipelines.stable_audio import StableAudioProjectionModel

    torch.manual_seed(0)
    transformer = StableAudioDiTModel(
        sample_size=8,
        in_channels=3,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=2,
        num_key_value_attention_heads=2,
        out_channels=3,
        cross_attention_dim=4,
        time_proj_dim=8,
        global_states_input_dim=8,
        cross_attention_input_dim=4,
    ).eval()
    vae = AutoencoderOobleck(
        encoder_hidden_size=6,
        downsampling_ratios=[1, 2],
        decoder_channels=3,
        decoder_input_channels=3,
        audio_channels=2,
        channel_multiples=[2, 4],
        sampling_rate=4,
    ).eval()
    # Projects the T5 embeddings and the start/end seconds; the T5 encoder itself is not needed.
    projection = StableAudioProjectionModel(text_encoder_dim=TEXT_DIM, conditioning_dim=4, min_value=0, max_value=32)
    if scheduler is None:  # the stochastic DPM-Solver++(2M) of the checkpoint, without torchsde
        scheduler = EDMDPMSolverMultistepScheduler(
            solver_order=2, prediction_type="v_prediction", sigma_data=1.0, algorithm_type="sde-dpmsolver++"
        )
    pipe = StableAudioPipeline(
        vae=vae,
        text_encoder=None,
        projection_model=projection.eval(),
        tokenizer=None,
        transformer=transformer,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed: int = 0) -> torch.Tensor:
    # T5 embeddings stood in for by fixed random tensors.
    prompt = torch.randn(1, 6, TEXT_DIM, generator=torch.Generator().manual_seed(100))
    return pipe(
        prompt_embeds=prompt,
        negative_prompt_embeds=torch.zeros_like(prompt),
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).audios


@pytest.fixture
def pipe():
    return make_pipeline()


def test_self_attention_and_feed_forward_are_the_default(pipe):
    assert [layer.block_key for layer in find_layers(pipe.transformer)] == ["attn1-0", "ff-0", "attn1-1", "ff-1"]


def test_calibrated_schedule_skips_exactly_the_scheduled_calls(pipe):
    schedule = calibrated_schedule(pipe, generate)
    assert set(schedule.keys) == {"attn1", "ff"}
    assert_skips_exactly_the_scheduled_calls(pipe, generate, schedule)


def test_cross_attention_is_opt_in(pipe):
    schedule = calibrated_schedule(pipe, generate, ["attn1", "attn2", "ff"])
    assert_skips_exactly_the_scheduled_calls(pipe, generate, schedule)


def test_checkpoint_cosine_sde_solver_skips_exactly_the_scheduled_calls():
    pytest.importorskip("torchsde", reason="CosineDPMSolverMultistepScheduler draws its noise through torchsde")
    from diffusers import CosineDPMSolverMultistepScheduler

    pipe = make_pipeline(CosineDPMSolverMultistepScheduler(solver_order=2, prediction_type="v_prediction"))
    assert_skips_exactly_the_scheduled_calls(pipe, generate, calibrated_schedule(pipe, generate))
    assert_all_ones_is_bit_identical(pipe, generate)


def test_all_ones_schedule_is_bit_identical_to_uncached(pipe):
    assert_all_ones_is_bit_identical(pipe, generate)


def test_disable_restores_the_model_exactly(pipe):
    assert_disable_restores_the_model(pipe, generate, calibrated_schedule(pipe, generate))
