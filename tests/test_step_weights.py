"""Step sensitivities: measured by the scheduler's own step, on copies, leaving the generation untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import STEPS, generate
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
)

import smoothcache
from smoothcache.step_weights import StepProbe


def ddim_coefficients(scheduler: DDIMScheduler, steps: int) -> np.ndarray:
    """|d x_(t-1) / d eps| of a DDIM step (eta 0): how far an output error moves the sample."""
    scheduler.set_timesteps(steps)
    alphas = scheduler.alphas_cumprod.double()
    stride = scheduler.config.num_train_timesteps // steps
    values = []
    for t in scheduler.timesteps.tolist():
        a_t = alphas[t]
        a_prev = alphas[t - stride] if t - stride >= 0 else scheduler.final_alpha_cumprod.double()
        values.append(abs(float((1 - a_prev).sqrt() - (a_prev / a_t).sqrt() * (1 - a_t).sqrt())))
    return np.array(values)


class RecordingDDIM(DDIMScheduler):
    """DDIM that keeps what each real step took and gave (copies made by the probe keep their own list)."""

    def step(self, model_output, timestep, sample, *args, **kwargs):
        result = super().step(model_output, timestep, sample, *args, **kwargs)
        self.__dict__.setdefault("records", []).append((model_output.clone(), result[0] if isinstance(result, tuple) else result.prev_sample))
        return result


def test_ddim_sensitivity_is_the_step_coefficient_times_output_over_sample(dit_pipe):
    # without clipping x0, the step is linear in the output (a random model's x0 would be clipped)
    dit_pipe.scheduler = RecordingDDIM.from_config(dit_pipe.scheduler.config, clip_sample=False)
    with smoothcache.calibration(dit_pipe, components=["attn1"]) as rec:
        generate(dit_pipe, seed=1)
    weights = rec.profile.step_weights
    assert weights is not None and len(weights) == STEPS and weights.max() == pytest.approx(1.0)
    coefficients = ddim_coefficients(DDIMScheduler.from_config(dit_pipe.scheduler.config), STEPS)
    records = dit_pipe.scheduler.records
    assert len(records) == STEPS
    # relative change of the sample per relative change of the output: |c_t| ||eps|| / ||x_(t-1)||
    expected = np.array([c * float(eps.norm() / new.norm()) for c, (eps, new) in zip(coefficients, records)])
    np.testing.assert_allclose(weights, expected / expected.max(), rtol=1e-3)
    assert weights[-1] < 0.1  # DDIM's last step hardly moves the sample


@pytest.mark.parametrize("scheduler_class", [DDPMScheduler, DPMSolverMultistepScheduler])
def test_probing_changes_nothing_in_the_generation_and_detaches(dit_pipe, scheduler_class):
    # DDPM draws noise every step, from the global RNG (DiTPipeline passes no generator to the step)
    dit_pipe.scheduler = scheduler_class.from_config(dit_pipe.scheduler.config)
    torch.manual_seed(7)
    expected = generate(dit_pipe, seed=4)
    torch.manual_seed(7)
    with smoothcache.calibration(dit_pipe, components=["attn1"]) as rec:
        images = generate(dit_pipe, seed=4)
    assert torch.equal(images, expected)
    assert "step" not in vars(dit_pipe.scheduler)
    assert rec.profile.step_weights is not None and np.all(rec.profile.step_weights > 0)


def probed(scheduler, steps: int):
    """A scheduler set to ``steps`` with a probe attached, what it saw, and a random sample and output."""
    scheduler.set_timesteps(steps)
    seen: list[torch.Tensor] = []
    probe = StepProbe(scheduler, seen.append).attach()
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return probe, seen, sample, torch.randn_like(sample)


def test_flow_matching_sensitivity_is_relative_to_the_sample():
    scheduler = FlowMatchEulerDiscreteScheduler()
    probe, seen, sample, velocity = probed(scheduler, 4)
    for t in scheduler.timesteps:
        sigma, sigma_next = scheduler.sigmas[scheduler.step_index or 0], scheduler.sigmas[(scheduler.step_index or 0) + 1]
        new = scheduler.step(velocity, t, sample, return_dict=False)[0]
        expected = abs(float(sigma_next - sigma)) * velocity.norm() / new.norm()  # x + (s' - s) v
        assert float(seen[-1]) == pytest.approx(float(expected), rel=1e-3)
        sample = new
    probe.detach()
    assert "step" not in vars(scheduler)


def test_the_optimal_solver_weighs_steps_and_may_skip_the_last_one(dit_pipe):
    with smoothcache.calibration(dit_pipe, components=["attn1", "ff"]) as rec:
        generate(dit_pipe, seed=1)
    profile = rec.profile
    weighted = profile.schedule(compute_fraction=0.5)
    plain = profile.schedule(compute_fraction=0.5, weigh_steps=False)
    assert all(plan[-1] == 1 for plan in plain.plans.values())  # unweighted: the last step is computed, as before
    problem = profile.solver_problem()
    assert not problem.keep_last
    np.testing.assert_allclose(problem.curves["ff"][0, :-1], profile.curves("ff")[0, :-1] * profile.step_weights[1:])
    assert weighted.compute_fraction() <= 0.5
    # a profile without weights (a bare module, or an older file) solves as before
    del profile.metadata["step_weights"]
    assert profile.schedule(compute_fraction=0.5) == plain


def test_the_probe_reads_arguments_by_name_and_passes_every_call_through():
    scheduler = DDIMScheduler()
    probe, seen, sample, output = probed(scheduler, 5)
    t = scheduler.timesteps[0]
    by_keyword = scheduler.step(model_output=output, timestep=t, sample=sample, return_dict=False)[0]
    positional = scheduler.step(output, t, sample).prev_sample
    assert torch.equal(by_keyword, positional) and len(seen) == 2 and float(seen[0]) == pytest.approx(float(seen[1]))
    with pytest.raises(TypeError):  # a wrong call fails as it would without the probe
        scheduler.step(output)
    probe.detach()
