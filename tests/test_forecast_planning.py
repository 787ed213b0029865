"""Planning for forecasting: calibration records the errors of extrapolating, the solver places
computes where extrapolation needs them, and the profile keeps those errors through its files."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import STEPS, generate
from test_calibration import record_outputs

import smoothcache
from smoothcache import CalibrationProfile, ProfileError
from smoothcache.solvers import forecast_frontier, reuse_error, weigh_by_target_step


def random_curves(rng: np.random.Generator, lookahead: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Reuse and forecast curves with NaN exactly where calibration leaves them unmeasured."""
    curves, forecasts = rng.random((lookahead, steps)), rng.random((lookahead + 1, lookahead, steps))
    for k in range(1, lookahead + 1):
        curves[k - 1, steps - k :] = np.nan
        forecasts[:, k - 1, steps - k :] = np.nan
    for gap in range(1, lookahead + 2):
        forecasts[gap - 1, :, :gap] = np.nan
    return curves, forecasts


@pytest.mark.parametrize("keep_last", [True, False])
def test_the_forecast_frontier_is_the_least_error_of_every_plan_with_that_many_computes(keep_last):
    rng = np.random.default_rng(0)
    for _ in range(12):
        lookahead, steps = int(rng.integers(1, 4)), int(rng.integers(3, 10))
        curves, forecasts = random_curves(rng, lookahead, steps)
        frontier = forecast_frontier(curves, forecasts, keep_last)
        least: dict[int, float] = {}
        for tail in itertools.product((0, 1), repeat=steps - 1):
            plan = (1, *tail)
            if keep_last and not plan[-1]:
                continue
            error = reuse_error(curves, plan, forecasts)
            least[sum(plan)] = min(least.get(sum(plan), np.inf), error)
        for computed in range(steps + 1):
            expected = least.get(computed, np.inf)
            assert frontier.errors[computed] == pytest.approx(expected) or np.isinf(expected) == np.isinf(frontier.errors[computed])
            if np.isfinite(expected):
                plan = frontier.plan(computed)
                assert sum(plan) == computed and plan[0] == 1
                assert reuse_error(curves, plan, forecasts) == pytest.approx(expected)


def test_reuse_error_with_forecasts_charges_each_reused_step_by_its_two_sources():
    curves = np.full((2, 6), 10.0)
    forecasts = np.zeros((3, 2, 6))
    forecasts[1, 0, 3], forecasts[1, 1, 3] = 0.5, 0.7  # computes 1 and 3 (gap 2) predicting steps 4 and 5
    # step 1 follows step 0 alone: plain reuse at curves[0, 0]
    assert reuse_error(curves, (1, 0, 1, 1, 0, 0), forecasts) == pytest.approx(10.0 + forecasts[0, 0, 3] + forecasts[0, 1, 3])
    assert reuse_error(curves, (1, 1, 0, 1, 0, 0), forecasts) == pytest.approx(forecasts[0, 0, 1] + 0.5 + 0.7)


def test_calibration_records_the_error_of_extrapolating_from_every_pair_of_earlier_steps(dit_pipe):
    with smoothcache.calibration(dit_pipe, components=["attn1", "ff"], lookahead=2, forecast="linear") as rec:
        generate(dit_pipe, seed=1)
    profile = rec.profile
    assert profile.forecast_errors is not None and profile.forecast_errors.shape == (1, 4, 3, 2, STEPS)
    assert profile.metadata["forecast"] == "linear"
    names = [layer.name for layer in profile.layers]
    outputs = record_outputs(dit_pipe, names, seeds=[1])
    for i, name in enumerate(names):
        ys = outputs[name]
        for gap, k, s in itertools.product((1, 2, 3), (1, 2), range(STEPS)):
            got = profile.forecast_errors[0, i, gap - 1, k - 1, s]
            if s - gap < 0 or s + k >= STEPS:
                assert np.isnan(got)
                continue
            predicted = ys[s] + (k / gap) * (ys[s] - ys[s - gap])
            expected = ((ys[s + k] - predicted).abs().sum() / ys[s + k].abs().sum()).item()
            assert got == pytest.approx(expected, rel=1e-4)
    # the reuse errors are those of a calibration without forecasting
    with smoothcache.calibration(dit_pipe, components=["attn1", "ff"], lookahead=2) as plain:
        generate(dit_pipe, seed=1)
    np.testing.assert_allclose(profile.errors, plain.profile.errors, rtol=1e-6)
    assert plain.profile.forecast_errors is None


def test_forecast_errors_survive_files_and_merges_and_resampling_drops_them(dit_pipe, tmp_path, caplog):
    with smoothcache.calibration(dit_pipe, lookahead=2, forecast="linear") as rec:
        generate(dit_pipe, seed=1)
        generate(dit_pipe, seed=2)
    profile = rec.profile
    loaded = CalibrationProfile.load(profile.save(tmp_path / "p.json"))
    np.testing.assert_allclose(loaded.forecast_errors, profile.forecast_errors, equal_nan=True)
    assert loaded.schedule(compute_fraction=0.5, forecast="linear") == profile.schedule(compute_fraction=0.5, forecast="linear")
    merged = CalibrationProfile.merge([profile, loaded])
    assert merged.forecast_errors.shape[0] == 4
    with smoothcache.calibration(dit_pipe, lookahead=2) as plain:
        generate(dit_pipe, seed=3)
    assert CalibrationProfile.merge([profile, plain.profile]).forecast_errors is None
    assert "forecast errors" in caplog.text
    assert profile.resample(STEPS * 2).forecast_errors is None


def test_forecast_schedules_need_forecast_errors_and_a_budget(dit_pipe):
    with smoothcache.calibration(dit_pipe, lookahead=2) as rec:
        generate(dit_pipe)
    with pytest.raises(ProfileError, match="calibrate with forecast='linear'"):
        rec.profile.schedule(compute_fraction=0.5, forecast="linear")
    with smoothcache.calibration(dit_pipe, lookahead=2, forecast="linear") as rec:
        generate(dit_pipe)
    with pytest.raises(ProfileError, match="optimal solver"):
        rec.profile.schedule(alpha=0.1, solver="greedy", forecast="linear")
    with pytest.raises(ValueError, match="forecast must be"):
        smoothcache.calibration(dit_pipe, forecast="quadratic")
    with pytest.raises(smoothcache.GuidanceError, match="not both"):
        smoothcache.calibration(dit_pipe, forecast="linear", branches=("cond", "uncond"))


def test_a_layer_changing_linearly_over_the_steps_is_extrapolated_at_no_error():
    # a stand-in "layer" whose output moves linearly with the step: only forecasting predicts it
    steps, lookahead = 8, 3
    curves = np.array([[0.1 * k] * steps for k in range(1, lookahead + 1)])
    forecasts = np.zeros((lookahead + 1, lookahead, steps))
    for k in range(1, lookahead + 1):
        curves[k - 1, steps - k :] = np.nan
        forecasts[:, k - 1, steps - k :] = np.nan
    for gap in range(1, lookahead + 2):
        forecasts[gap - 1, :, :gap] = np.nan
    plan = forecast_frontier(curves, forecasts, keep_last=False).plan(2)
    # two computes: step 0 and one more within the lookahead; everything after is extrapolated for free
    assert reuse_error(curves, plan, forecasts) == pytest.approx(0.1 * (plan.index(1, 1) - 1) * plan.index(1, 1) / 2)


def test_weighing_scales_each_error_by_the_step_it_lands_on():
    curves = np.arange(1.0, 13.0).reshape(3, 4)
    weights = np.array([1.0, 0.5, 0.25, 0.125])
    weighted = weigh_by_target_step(curves, weights)
    assert weighted[0, 0] == curves[0, 0] * weights[1]  # step 0's output reused 1 step later lands on step 1
    assert weighted[2, 0] == curves[2, 0] * weights[3]
    assert weighted[1, 1] == curves[1, 1] * weights[3]
    assert weighted[1, 3] == curves[1, 3]  # past the last step: untouched (NaN in a profile)
    forecasts = np.ones((4, 3, 4))
    assert weigh_by_target_step(forecasts, weights)[3, 0, 2] == weights[3]


def test_forecast_planned_schedule_runs_and_changes_only_through_the_planning(dit_pipe):
    with smoothcache.calibration(dit_pipe, components=["attn1", "ff"], forecast="linear") as rec:
        generate(dit_pipe, seed=5)
    schedule = rec.profile.schedule(compute_fraction=0.5, forecast="linear")
    assert schedule.compute_fraction() <= 0.5
    with smoothcache.cache(dit_pipe, schedule, forecast="linear"):
        images = generate(dit_pipe)
    assert torch.isfinite(images).all()


def test_a_schedule_remembers_how_it_was_planned_and_running_it_otherwise_is_warned_about(dit_pipe, tmp_path, caplog):
    with smoothcache.calibration(dit_pipe, forecast="linear") as rec:
        generate(dit_pipe)
    schedule = rec.profile.schedule(compute_fraction=0.5, forecast="linear")
    assert schedule.planned == {"solver": "optimal", "compute_fraction": 0.5, "forecast": "linear", "step_weights": True,
                                "model_class": "DiTTransformer2DModel", "scheduler_class": "DDIMScheduler"}
    assert rec.profile.schedule(alpha=0.1).planned["solver"] == "greedy"
    path = schedule.save(tmp_path / "s.json")
    raw = __import__("json").loads(path.read_text())
    assert raw["attn1"] == list(schedule.plans["attn1"])  # the reference package looks plans up by name: "_planned" is ignored
    loaded = smoothcache.Schedule.load(path)
    assert loaded == schedule and loaded.planned == schedule.planned
    with caplog.at_level("WARNING", logger="smoothcache"):
        with smoothcache.cache(dit_pipe, loaded, forecast="linear"):
            pass
        assert not [r for r in caplog.records if r.name.startswith("smoothcache")]  # others' imports may warn
        with smoothcache.cache(dit_pipe, loaded):
            pass
    assert "planned for forecast='linear' but runs with forecast='none'" in caplog.text
