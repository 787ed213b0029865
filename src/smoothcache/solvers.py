"""Pure functions from error curves to schedules.

A curve array has shape ``(lookahead, num_steps)``: ``curves[k - 1, s]`` is the relative L1 error
of reusing step ``s``'s output at step ``s + k`` (NaN where ``s + k`` is past the last step).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from .errors import ScheduleError
from .schedule import Schedule

__all__ = ["greedy_plan", "greedy_schedule", "alpha_candidates", "schedule_for_budget"]


def greedy_plan(curves: np.ndarray, alpha: float) -> list[int]:
    """The paper's greedy rule, as the reference calibration helper applies it.

    Walking forward from step ``i``, try the longest lookahead first: if reusing step ``i``'s
    output ``k`` steps later costs at most ``alpha``, compute ``i`` and reuse it for the next ``k``
    steps, then continue at ``i + k + 1``; if no lookahead qualifies, compute ``i`` alone.
    The first and last steps are always computed.
    """
    curves = np.asarray(curves, dtype=np.float64)
    if curves.ndim != 2:
        raise ScheduleError(f"curves must have shape (lookahead, num_steps), got {curves.shape}")
    lookahead, num_steps = curves.shape
    plan = [1] * num_steps
    step = 0
    while step < num_steps:
        for k in range(lookahead, 0, -1):
            error = curves[k - 1, step]
            if error <= alpha:  # False for NaN: that lookahead runs past the last step.
                for skipped in range(step + 1, min(step + k + 1, num_steps)):
                    plan[skipped] = 0
                step += k + 1
                break
        else:
            step += 1
    if num_steps:
        plan[0] = 1
        plan[-1] = 1
    return plan


def greedy_schedule(curves_by_key: Mapping[str, np.ndarray], alpha: float) -> Schedule:
    """Apply :func:`greedy_plan` with one threshold to every key's curves."""
    if not curves_by_key:
        raise ScheduleError("No curves to build a schedule from")
    return Schedule({key: tuple(greedy_plan(curves, alpha)) for key, curves in curves_by_key.items()})


def alpha_candidates(curves_by_key: Mapping[str, np.ndarray]) -> np.ndarray:
    """Every threshold at which some greedy decision can change, ascending, starting at 0."""
    values = np.concatenate([np.asarray(c, dtype=np.float64).ravel() for c in curves_by_key.values()])
    values = values[np.isfinite(values)]
    return np.unique(np.concatenate([[0.0], values]))


def schedule_for_budget(
    curves_by_key: Mapping[str, np.ndarray],
    meets_budget: Callable[[Schedule], bool],
    describe_budget: str,
) -> tuple[Schedule, float]:
    """The greedy schedule at the smallest threshold whose schedule meets the budget.

    Returns the schedule and the threshold. The smallest qualifying threshold keeps the most
    accurate schedule among those that are cheap enough.
    """
    best: tuple[Schedule, float] | None = None
    for alpha in alpha_candidates(curves_by_key):
        schedule = greedy_schedule(curves_by_key, float(alpha))
        if meets_budget(schedule):
            return schedule, float(alpha)
        best = (schedule, float(alpha))
    assert best is not None
    raise ScheduleError(
        f"No threshold reaches {describe_budget}: even skipping wherever the lookahead allows computes "
        f"{best[0].compute_fraction():.3f} of the layer calls; calibrate with a larger lookahead "
        "or ask for a smaller budget"
    )
