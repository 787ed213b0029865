"""Quality target: the cheapest schedule whose measured output drift stays within the bound."""

import pytest
import torch
from conftest import generate, make_dit_pipeline

import smoothcache
from smoothcache import Schedule
from smoothcache.solvers import candidate_schedules
from smoothcache.tuning import relative_l1


@pytest.fixture(scope="module")
def calibrated():
    pipe = make_dit_pipeline(num_layers=2)
    with smoothcache.calibration(pipe) as rec:
        generate(pipe, seed=5, steps=12)
    return pipe, rec.profile


def test_relative_l1_of_outputs():
    reference = torch.ones(2, 3)
    assert relative_l1(reference * 1.1, reference) == pytest.approx(0.1)
    assert relative_l1([reference, reference], [reference, reference]) == 0
    with pytest.raises(TypeError, match="output_type='pt'"):
        relative_l1("a picture", reference)


def test_candidates_run_from_cheapest_to_all_compute(calibrated):
    _, profile = calibrated
    schedules = candidate_schedules(profile, "optimal")
    fractions = [s.compute_fraction() for s in schedules]
    assert fractions == sorted(fractions) and len(set(fractions)) == len(fractions)
    assert fractions[-1] == 1.0 and fractions[0] < 0.4


@pytest.mark.parametrize("solver", ["optimal", "per-block"])
def test_candidates_are_the_solvers_schedule_at_every_budget(calibrated, solver):
    """One knapsack for all budgets gives what solving each budget on its own gives."""
    _, profile = calibrated
    per_block = solver == "per-block"
    slots = profile.num_steps * len(profile.keys(per_block))
    one_by_one: list[Schedule] = []
    for computed in range(slots, 0, -1):
        try:
            schedule = profile.schedule(compute_fraction=computed / slots, solver=solver)
        except smoothcache.ScheduleError:
            break
        if not one_by_one or schedule != one_by_one[-1]:
            one_by_one.append(schedule)
    candidates = candidate_schedules(profile, solver)
    assert len(candidates) == len(one_by_one) and list(candidates) == one_by_one[::-1]
    assert candidates[-1] == one_by_one[0] and candidates[1:3] == one_by_one[::-1][1:3]


@pytest.mark.parametrize("bound", [0.002, 0.02, 0.2])
def test_the_chosen_schedule_is_the_cheapest_within_the_bound(calibrated, bound):
    pipe, profile = calibrated
    run = lambda: generate(pipe, seed=5, steps=12)
    reference = run()
    result = smoothcache.tune(pipe, profile, run, max_error=bound, progress=False)
    with smoothcache.cache(pipe, result.schedule):
        measured = relative_l1(run(), reference)
    assert measured == pytest.approx(result.error) and measured <= bound
    cheaper = [s for s in candidate_schedules(profile, "optimal") if s.compute_fraction() < result.compute_fraction]
    if cheaper:  # the next cheaper candidate breaks the bound (the search's monotonicity assumption, checked)
        with smoothcache.cache(pipe, cheaper[-1]):
            assert relative_l1(run(), reference) > bound
    assert 2 <= len(result.probes) <= 8
    assert not any(hasattr(m, "forward") and "forward" in m.__dict__ for m in pipe.transformer.modules())


def test_an_unreachable_bound_returns_all_compute_and_warns(calibrated, caplog):
    pipe, profile = calibrated
    result = smoothcache.tune(pipe, profile, lambda: generate(pipe, seed=5, steps=12), max_error=0.0, progress=False)
    all_compute = Schedule({k: (1,) * 12 for k in profile.keys()})  # noqa: SIM118 (a profile, not a dict)
    assert result.schedule == all_compute and result.error == 0.0
    assert "No cached schedule kept the error within" in caplog.text


def test_tuning_for_forecasting_plans_and_measures_with_the_forecast():
    pipe = make_dit_pipeline(num_layers=2)
    with smoothcache.calibration(pipe, forecast="linear") as rec:
        generate(pipe, seed=5, steps=12)
    profile = rec.profile
    candidates = candidate_schedules(profile, "optimal", forecast="linear")
    slots = profile.num_steps * len(profile.keys())
    for schedule in candidates[:3]:  # each is the forecast solver's schedule at its own budget
        assert schedule == profile.schedule(compute_fraction=schedule.compute_fraction() + 0.5 / slots, forecast="linear")
    run = lambda: generate(pipe, seed=5, steps=12)
    reference = run()
    result = smoothcache.tune(pipe, profile, run, max_error=0.05, progress=False, forecast="linear")
    with smoothcache.cache(pipe, result.schedule, forecast="linear"):
        assert relative_l1(run(), reference) == pytest.approx(result.error)
    with pytest.raises(smoothcache.ProfileError, match="optimal solver"):
        candidate_schedules(profile, "greedy", forecast="linear")
