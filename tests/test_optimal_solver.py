"""The budget-optimal solver: exact against brute force, within its budget, nested across keys."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smoothcache import ScheduleError
from smoothcache.solvers import (
    allocate_budget,
    nested_plans,
    optimal_schedule,
    plan_frontier,
    reuse_error,
)


@st.composite
def small_curves(draw, max_steps=9):
    lookahead = draw(st.integers(1, 3))
    steps = draw(st.integers(2, max_steps))
    values = draw(st.lists(st.floats(0, 1, allow_nan=False), min_size=lookahead * steps, max_size=lookahead * steps))
    curves = np.array(values).reshape(lookahead, steps)
    for k in range(1, lookahead + 1):
        curves[k - 1, max(steps - k, 0):] = np.nan
    return curves


def all_plans(steps, keep_last):
    for rest in itertools.product((0, 1), repeat=steps - 1):
        plan = (1, *rest)
        if keep_last and plan[-1] != 1:
            continue
        yield plan


@settings(max_examples=150, deadline=None)
@given(small_curves(), st.booleans())
def test_frontier_is_the_brute_force_optimum_for_every_count(curves, keep_last):
    steps = curves.shape[1]
    best = {}
    for plan in all_plans(steps, keep_last):
        error = reuse_error(curves, plan)
        best[sum(plan)] = min(best.get(sum(plan), np.inf), error)
    frontier = plan_frontier(curves, keep_last)
    for m in range(1, steps + 1):
        expected = best.get(m, np.inf)
        if np.isinf(expected):
            assert np.isinf(frontier.errors[m])
            continue
        assert frontier.errors[m] == pytest.approx(expected, abs=1e-9)
        plan = frontier.plan(m)
        assert sum(plan) == m and plan[0] == 1 and (plan[-1] == 1 or not keep_last)
        assert reuse_error(curves, plan) == pytest.approx(expected, abs=1e-9)


def test_reuse_error_is_infinite_past_the_lookahead():
    curves = np.array([[0.1, 0.2, 0.3, np.nan]])  # lookahead 1
    assert reuse_error(curves, (1, 0, 1, 1)) == pytest.approx(0.1)
    assert reuse_error(curves, (1, 0, 0, 1)) == np.inf


def test_infeasible_count_says_which_counts_are_feasible():
    curves = np.array([[0.1, 0.1, 0.1, 0.1, np.nan]])  # lookahead 1: at least every other step
    with pytest.raises(ScheduleError, match="feasible counts are 3..5"):
        plan_frontier(curves).plan(2)


@settings(max_examples=60, deadline=None)
@given(st.lists(small_curves(max_steps=6), min_size=2, max_size=3), st.data())
def test_allocation_is_the_brute_force_optimum(curves_list, data):
    steps = curves_list[0].shape[1]
    curves_list = [c for c in curves_list if c.shape[1] == steps]
    frontiers = {f"k{i}": plan_frontier(c) for i, c in enumerate(curves_list)}
    weights = {key: data.draw(st.integers(1, 4)) for key in frontiers}
    budget = data.draw(st.integers(0, sum(w * steps for w in weights.values())))
    feasible = [list(f.feasible()) for f in frontiers.values()]
    best = np.inf
    for counts in itertools.product(*feasible):
        if sum(weights[k] * m for k, m in zip(frontiers, counts)) <= budget:
            best = min(best, sum(frontiers[k].errors[m] for k, m in zip(frontiers, counts)))
    if np.isinf(best):
        with pytest.raises(ScheduleError, match="fewest the lookahead allows"):
            allocate_budget(frontiers, weights, budget)
        return
    allocation = allocate_budget(frontiers, weights, budget)
    assert sum(weights[k] * m for k, m in allocation.items()) <= budget
    assert sum(frontiers[k].errors[m] for k, m in allocation.items()) == pytest.approx(best, abs=1e-9)


def rising_curves(steps=20, lookahead=3, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    base = scale * (0.05 + 0.3 * rng.random(steps))
    curves = np.stack([base * k for k in range(1, lookahead + 1)])
    for k in range(1, lookahead + 1):
        curves[k - 1, steps - k:] = np.nan
    return curves


def test_weighted_budget_is_never_exceeded_and_spends_on_the_costly_error():
    curves = {"attn": rising_curves(seed=1), "ff": rising_curves(seed=2, scale=3.0)}
    weights = {"attn": 0.36, "ff": 0.64}
    for budget in (10.0, 14.3, 20.0, 30.0):
        schedule = optimal_schedule(curves, budget, weights=weights)
        used = sum(weights[k] * sum(p) for k, p in schedule.plans.items())
        assert used <= budget + 1e-9
    schedule = optimal_schedule(curves, 24)  # unweighted: 24 computed steps over both keys
    assert sum(map(sum, schedule.plans.values())) <= 24
    assert sum(schedule.plans["ff"]) > sum(schedule.plans["attn"])  # ff's errors are 3x larger


def test_fewer_computes_nest_inside_more():
    curves = {"a": rising_curves(seed=3), "b": rising_curves(seed=4, scale=2.0), "c": rising_curves(seed=5, scale=0.5)}
    plans = nested_plans(curves, {"a": 10, "b": 14, "c": 7})
    assert [sum(plans[k]) for k in "abc"] == [10, 14, 7]
    assert all(not (x and not y) for x, y in zip(plans["a"], plans["b"]))  # a within b
    assert all(not (x and not y) for x, y in zip(plans["c"], plans["a"]))  # c within a


def test_budget_below_the_lookahead_minimum_is_refused():
    with pytest.raises(ScheduleError, match="fewest the lookahead allows"):
        optimal_schedule({"attn": rising_curves()}, 3)


def test_a_budget_past_the_lookahead_says_the_reachable_end_in_the_users_terms():
    from smoothcache import CalibrationProfile, LayerInfo, ProfileError

    steps, lookahead = 12, 3
    curves = np.stack([np.full(steps, 0.1 * k) for k in range(1, lookahead + 1)])
    for k in range(1, lookahead + 1):
        curves[k - 1, steps - k:] = np.nan
    layers = [LayerInfo("b0.attn1", "attn1", 0, 30.0), LayerInfo("b0.ff", "ff", 0, 60.0)]
    profile = CalibrationProfile(layers, np.stack([curves, curves])[None], {}, total_flops=100.0)
    with pytest.raises(ProfileError, match=r"speedup=50 is out of reach: with lookahead 3 the fastest schedule gives (\d+\.\d\d)x") as refused:
        profile.schedule(speedup=50)
    fastest = float(refused.value.args[0].split("gives ")[1].split("x")[0])
    assert 1 < fastest < 10  # skipping every layer at every step would claim 10x
    assert profile.estimated_speedup(profile.schedule(speedup=fastest - 0.005)) >= fastest - 0.005
    with pytest.raises(ProfileError, match=r"compute_fraction=0.01 is out of reach: with lookahead 3 at least 0.\d+ of the layer calls"):
        profile.schedule(compute_fraction=0.01)
    for bad in ({"alpha": float("nan")}, {"speedup": float("nan")}, {"speedup": float("inf")}, {"compute_fraction": float("nan")}):
        with pytest.raises(ProfileError, match="must be"):
            profile.schedule(**bad)
