"""Resampling a profile to another step count, by timestep."""

import numpy as np
import pytest

from smoothcache import CalibrationProfile, LayerInfo, ProfileError
from smoothcache.resampling import resample_curves, uniform_positions


def linear_curves(timesteps, lookahead=3, rate=0.001):
    """Errors proportional to the span carried: the model resampling assumes, so it must be exact."""
    x = np.asarray(timesteps, dtype=float)
    n = len(x)
    curves = np.full((lookahead, n), np.nan)
    for k in range(1, lookahead + 1):
        curves[k - 1, : n - k] = rate * (x[: n - k] - x[k:])
    return curves


def ddim_timesteps(n):
    return np.arange(0, 1000, 1000 // n)[::-1][:n] + 1


def test_same_timesteps_give_the_same_curves():
    x = ddim_timesteps(20)
    rng = np.random.default_rng(0)
    curves = linear_curves(x) * (1 + 0.3 * rng.random((3, 20)))
    assert np.allclose(resample_curves(curves, x, x), curves, equal_nan=True)


def test_finer_steps_interpolate_errors_along_the_span():
    source, target = ddim_timesteps(20), ddim_timesteps(50)
    out = resample_curves(linear_curves(source), source, target)
    expected = linear_curves(target)
    measured = np.isfinite(out)
    assert measured[:, :45].all()  # every lookahead of the finer grid lies within the measured spans
    assert np.allclose(out[measured], expected[measured], rtol=1e-6)


def test_coarser_steps_leave_unmeasured_spans_nan():
    source, target = ddim_timesteps(20), ddim_timesteps(10)  # 50 vs 100 timesteps per step
    out = resample_curves(linear_curves(source), source, target)
    assert np.isfinite(out[0, :9]).all()  # one coarse step = two fine ones: measured
    assert np.isnan(out[1:]).all()  # two coarse steps = four fine ones: past the lookahead of 3


def test_rising_timesteps_work_like_falling_ones():
    source, target = ddim_timesteps(20), ddim_timesteps(30)
    curves = linear_curves(source)
    assert np.allclose(resample_curves(curves, -source, -target), resample_curves(curves, source, target), equal_nan=True)
    with pytest.raises(ProfileError, match="monotonically"):
        resample_curves(curves, np.r_[source[:10], source[:10]], target)


def profile_with(timesteps=None, steps=20):
    x = timesteps if timesteps is not None else uniform_positions(steps) * 1000
    errors = np.stack([linear_curves(x), 2 * linear_curves(x)])[None]
    metadata = {"timesteps": list(map(float, timesteps))} if timesteps is not None else {}
    return CalibrationProfile([LayerInfo("b0.attn1", "attn1", 0), LayerInfo("b0.ff", "ff", 0)], errors, metadata)


def test_profile_resample_keeps_layers_and_records_where_it_came_from():
    profile = profile_with(ddim_timesteps(20).astype(float))
    target = ddim_timesteps(40)
    resampled = profile.resample(40, timesteps=target)
    assert resampled.num_steps == 40 and resampled.layers == profile.layers and resampled.num_runs == 1
    assert resampled.metadata["resampled_from"]["num_steps"] == 20
    assert np.allclose(resampled.curves("ff")[0, :39], 2 * linear_curves(target)[0, :39])
    schedule = resampled.schedule(compute_fraction=0.5, solver="optimal")
    assert schedule.num_steps == 40
    with pytest.raises(ProfileError, match="3 target timesteps"):
        profile.resample(40, timesteps=[3, 2, 1])


def test_without_recorded_timesteps_steps_are_spread_evenly():
    profile = profile_with(None)
    resampled = profile.resample(30, timesteps=ddim_timesteps(30))
    assert resampled.num_steps == 30 and np.isfinite(resampled.curves("attn1")[0, :29]).all()


def test_step_weights_travel_with_the_curves():
    from smoothcache.resampling import resample_step_weights, uniform_positions

    weights = np.array([1.0, 0.5, 0.3, 0.2, 0.02])  # the last step lands on the clean sample
    same = resample_step_weights(weights, uniform_positions(5), uniform_positions(5))
    np.testing.assert_allclose(same, weights)
    finer = resample_step_weights(weights, uniform_positions(5), uniform_positions(9))
    assert len(finer) == 9 and finer[0] == 1.0 and finer[-1] == pytest.approx(0.02)
    assert np.all(np.diff(finer[:-1]) <= 1e-12)  # falls along the trajectory as the measured weights do
    assert finer[2] == pytest.approx(np.interp(-uniform_positions(9)[2], -uniform_positions(5)[:-1], weights[:-1]))


def test_a_resampled_profile_is_solved_with_weights(dit_pipe):
    from conftest import generate

    import smoothcache

    with smoothcache.calibration(dit_pipe) as rec:
        generate(dit_pipe)
    resampled = rec.profile.resample(15)
    assert resampled.step_weights is not None and len(resampled.step_weights) == 15
    assert not resampled.solver_problem().keep_last
