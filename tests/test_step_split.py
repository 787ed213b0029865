"""Fewer steps and a cache together: the split of a compute budget with the least measured drift."""

import pytest
from conftest import generate, make_dit_pipeline

import smoothcache
from smoothcache.step_split import default_step_counts
from smoothcache.tuning import relative_l1

FULL = 12


@pytest.fixture(scope="module")
def pipe():
    return make_dit_pipeline(num_layers=2)


def run(pipe):
    return lambda steps: generate(pipe, seed=5, steps=steps)


def test_default_step_counts_run_from_all_steps_down_to_the_most_the_budget_allows_uncached():
    assert default_step_counts(50, 0.5) == [50, 44, 38, 31, 25]
    assert default_step_counts(20, 0.35) == [20, 17, 14, 10, 7]
    assert default_step_counts(50, 0.35) == [50, 42, 34, 25, 17]  # 17 uncached steps spend 0.34: within the budget
    assert default_step_counts(100, 0.07)[-1] == 7  # 100 * 0.07 = 7.000000000000001 counts as 7
    assert default_step_counts(10, 1.0) == [10]
    assert default_step_counts(4, 0.1) == [4, 3, 2]  # never below 2 steps, no repeats
    with pytest.raises(ValueError, match="count"):
        default_step_counts(50, 0.5, count=1)


@pytest.mark.parametrize("forecast", ["none", "linear"])
def test_the_split_with_the_least_measured_drift_wins_and_holds_to_the_budget(pipe, forecast):
    reference = run(pipe)(FULL)
    split = smoothcache.split_steps(pipe, run(pipe), FULL, 0.5, step_counts=[12, 9, 6], forecast=forecast,
                                    components=["attn1", "ff"], reference=reference, progress=False)
    assert [p["num_steps"] for p in split.probes] == [12, 9, 6]
    assert split.error == min(p["error"] for p in split.probes)
    pure_cache, middle, pure_steps = split.probes
    assert pure_steps["cache_compute_fraction"] == 1.0 and pure_steps["compute_fraction"] == 0.5  # 6 of 12 steps, uncached
    assert pure_cache["compute_fraction"] <= 0.5 and middle["compute_fraction"] <= 0.5 + 1e-9
    assert 0 < middle["cache_compute_fraction"] < 1
    # the chosen split, run as a user would, gives the error it was chosen for
    assert split.schedule.num_steps == split.num_steps
    with smoothcache.cache(pipe, split.schedule, forecast=split.forecast):
        again = run(pipe)(split.num_steps)
    assert relative_l1(again, reference) == pytest.approx(split.error)
    assert split.uses_cache == (split.num_steps != 6)
    assert sorted(split.schedules) == [6, 9, 12] and split.schedules[split.num_steps] == split.schedule


def test_fewer_steps_alone_is_a_candidate_that_can_win(pipe):
    """With an error that grows with the step count the last run used, 6 uncached steps of 12 win:
    no cache is needed. Equal errors go to the first candidate."""
    last = {}

    def generate_noting_steps(steps):
        last["steps"] = steps
        return run(pipe)(steps)

    split = smoothcache.split_steps(pipe, generate_noting_steps, FULL, 0.5, step_counts=[12, 9, 6], forecast="none",
                                    components=["attn1", "ff"], error_fn=lambda out, ref: last["steps"], progress=False)
    assert split.num_steps == 6 and not split.uses_cache and split.compute_fraction == 0.5
    split = smoothcache.split_steps(pipe, run(pipe), FULL, 0.5, step_counts=[9, 6], components=["attn1", "ff"],
                                    forecast="none", error_fn=lambda out, ref: 0.0, progress=False)
    assert split.num_steps == 9 and split.uses_cache


def test_budgets_out_of_reach_and_bad_arguments_say_what_to_change(pipe):
    with pytest.raises(smoothcache.UnreachableBudgetError, match="include fewer steps"):
        smoothcache.split_steps(pipe, run(pipe), FULL, 0.05, step_counts=[12], components=["attn1", "ff"],
                                forecast="none", progress=False)
    with pytest.raises(ValueError, match="compute_fraction"):
        smoothcache.split_steps(pipe, run(pipe), FULL, 0.0, progress=False)
    with pytest.raises(ValueError, match="step_counts"):
        smoothcache.split_steps(pipe, run(pipe), FULL, 0.5, step_counts=[13], progress=False)
    with pytest.raises(ValueError, match="step_counts"):
        smoothcache.split_steps(pipe, run(pipe), FULL, 0.5, step_counts=[1], progress=False)


def test_two_steps_calibrate_within_reach_and_a_small_budget_finishes(pipe):
    """At 2 steps calibration looks 1 step ahead (its default 3 reaches past the end)."""
    split = smoothcache.split_steps(pipe, run(pipe), FULL, 0.1, components=["attn1", "ff"], forecast="none",
                                    progress=False)
    assert split.compute_fraction <= 0.1 + 1e-9
    assert 2 in [p["num_steps"] for p in split.probes]  # calibrated and run, not refused


def test_a_nan_error_is_never_chosen_and_repeated_step_counts_run_once(pipe):
    errors = iter([float("nan"), 0.2, 0.1])
    split = smoothcache.split_steps(pipe, run(pipe), FULL, 0.5, step_counts=[12, 12, 9, 6, 6], forecast="none",
                                    components=["attn1", "ff"], error_fn=lambda out, ref: next(errors), progress=False)
    assert [p["num_steps"] for p in split.probes] == [12, 9, 6]
    assert split.num_steps == 6 and split.error == 0.1
