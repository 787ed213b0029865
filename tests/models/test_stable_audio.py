"""Stable Audio Open: StableAudioDiTBlock (self-attention attn1, cross-attention attn2, feed-forward),
through StableAudioPipeline with batched classifier-free guidance. Its solvers are multistep
DPM-Solver++ (2M, also the SDE variant): one transformer call per step."""

import pytest
import torch

from .conftest import (
    FamilyCase,
    assert_all_ones_is_bit_identical,
    assert_skips_exactly_the_scheduled_calls,
    calibrated_schedule,
    sample,
    text_embeddings,
    tiny_pipeline,
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
    return tiny_pipeline(
        StableAudioPipeline, vae=vae, projection_model=projection.eval(), transformer=transformer, scheduler=scheduler
    )


def generate(pipe, seed: int = 0) -> torch.Tensor:
    # Stand-ins for T5 embeddings.
    prompt = text_embeddings(1, 6, TEXT_DIM)
    return sample(pipe, seed, prompt_embeds=prompt, negative_prompt_embeds=torch.zeros_like(prompt))


CASE = FamilyCase(
    "stable_audio", make_pipeline, generate,
    default_keys=["attn1-0", "ff-0", "attn1-1", "ff-1"], schedule_keys={"attn1", "ff"},
    opt_in_components=["attn1", "attn2", "ff"],  # cross-attention, when asked for
)  # fmt: skip


@pytest.fixture
def pipe():
    return make_pipeline()


def test_checkpoint_cosine_sde_solver_skips_exactly_the_scheduled_calls():
    pytest.importorskip("torchsde", reason="CosineDPMSolverMultistepScheduler draws its noise through torchsde")
    from diffusers import CosineDPMSolverMultistepScheduler

    pipe = make_pipeline(CosineDPMSolverMultistepScheduler(solver_order=2, prediction_type="v_prediction"))
    assert_skips_exactly_the_scheduled_calls(pipe, generate, calibrated_schedule(pipe, generate))
    assert_all_ones_is_bit_identical(pipe, generate)
