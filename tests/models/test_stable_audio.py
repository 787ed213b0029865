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
from .tiny_configs import (
    STABLE_AUDIO_PROJECTION,
    STABLE_AUDIO_TRANSFORMER,
    STABLE_AUDIO_VAE,
)

TEXT_DIM = STABLE_AUDIO_PROJECTION["text_encoder_dim"]


def make_pipeline(scheduler=None):
    from diffusers import EDMDPMSolverMultistepScheduler, StableAudioPipeline

    if scheduler is None:  # the stochastic DPM-Solver++(2M) of the checkpoint, without torchsde
        scheduler = EDMDPMSolverMultistepScheduler(
            solver_order=2, prediction_type="v_prediction", sigma_data=1.0, algorithm_type="sde-dpmsolver++"
        )
    return tiny_pipeline(
        StableAudioPipeline,
        transformer=STABLE_AUDIO_TRANSFORMER,
        vae=STABLE_AUDIO_VAE,
        # Projects the T5 embeddings and the start/end seconds; the T5 encoder itself is not needed.
        projection_model=STABLE_AUDIO_PROJECTION,
        scheduler=scheduler,
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


def test_checkpoint_cosine_sde_solver_skips_exactly_the_scheduled_calls():
    pytest.importorskip("torchsde", reason="CosineDPMSolverMultistepScheduler draws its noise through torchsde")
    from diffusers import CosineDPMSolverMultistepScheduler

    pipe = make_pipeline(CosineDPMSolverMultistepScheduler(solver_order=2, prediction_type="v_prediction"))
    assert_skips_exactly_the_scheduled_calls(pipe, generate, calibrated_schedule(pipe, generate))
    assert_all_ones_is_bit_identical(pipe, generate)
