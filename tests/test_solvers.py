import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from smoothcache.solvers import alpha_candidates, greedy_plan


def curves_strategy():
    @st.composite
    def build(draw):
        lookahead = draw(st.integers(1, 4))
        steps = draw(st.integers(2, 30))
        values = draw(
            st.lists(st.floats(0, 1, allow_nan=False), min_size=lookahead * steps, max_size=lookahead * steps)
        )
        curves = np.array(values).reshape(lookahead, steps)
        for k in range(1, lookahead + 1):
            curves[k - 1, max(steps - k, 0):] = np.nan  # s + k past the last step
        return curves, draw(st.floats(0, 1))

    return build()


def runs_of_reuse(plan):
    """(compute step, number of reused steps after it) for every computed step."""
    runs, i = [], 0
    while i < len(plan):
        j = i + 1
        while j < len(plan) and plan[j] == 0:
            j += 1
        runs.append((i, j - i - 1))
        i = j
    return runs


@settings(max_examples=300, deadline=None)
@given(curves_strategy())
def test_greedy_plan_obeys_the_rule(case):
    curves, alpha = case
    lookahead, steps = curves.shape
    plan = greedy_plan(curves, alpha)
    assert len(plan) == steps and set(plan) <= {0, 1}
    assert plan[0] == 1 and plan[-1] == 1
    for step, reused in runs_of_reuse(plan):
        assert reused <= lookahead
        if reused:
            # the jump taken: reusing `step` for `reused` steps stays under alpha ...
            assert curves[reused - 1, step] <= alpha or step + reused == steps - 2
            # ... and no longer jump was allowed (longest lookahead first).
            for longer in range(reused + 1, lookahead + 1):
                allowed = curves[longer - 1, step] <= alpha
                truncated_by_last = step + longer >= steps - 1
                assert not allowed or truncated_by_last


@settings(max_examples=200, deadline=None)
@given(curves_strategy())
def test_raising_alpha_never_computes_more_at_the_extremes(case):
    curves, _ = case
    steps = curves.shape[1]
    assert greedy_plan(curves, -1.0) == [1] * steps
    candidates = alpha_candidates({"k": curves})
    assert candidates[0] == 0.0 and np.all(np.diff(candidates) > 0)
    most = greedy_plan(curves, float(np.nanmax(curves)) if np.isfinite(curves).any() else 0.0)
    assert sum(most) <= steps


def test_greedy_plan_on_a_hand_worked_example():
    # steps 0..7, lookahead 2; row k-1 holds the error of reusing step s at step s+k.
    nan = np.nan
    curves = np.array(
        [
            [0.1, 0.1, 0.5, 0.1, 0.1, 0.1, 0.1, nan],
            [0.3, 0.1, 0.5, 0.1, 0.5, 0.5, nan, nan],
        ]
    )
    # alpha 0.2: step 0 -> k=1 (0.3 > 0.2 for k=2), step 2 -> none, step 3 -> k=2, step 6 -> k=1, last forced
    assert greedy_plan(curves, 0.2) == [1, 0, 1, 1, 0, 0, 1, 1]
    assert greedy_plan(curves, 0.0) == [1] * 8
    assert greedy_plan(curves, 1.0) == [1, 0, 0, 1, 0, 0, 1, 1]
