"""Pure functions from error curves to schedules.

A curve array has shape ``(lookahead, num_steps)``: ``curves[k - 1, s]`` is the relative L1 error
of reusing step ``s``'s output at step ``s + k`` (NaN where ``s + k`` is past the last step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import ScheduleError
from .schedule import Schedule

__all__ = [
    "BudgetAllocations",
    "PlanFrontier",
    "allocate_budget",
    "alpha_candidates",
    "greedy_plan",
    "greedy_schedule",
    "nested_plans",
    "optimal_plan",
    "optimal_schedule",
    "plan_frontier",
    "reuse_error",
    "schedule_for_budget",
]


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


# ---- budget-optimal schedules --------------------------------------------------------------
# The greedy rule bounds each jump's error by one threshold; it neither spends a budget where
# errors are smallest nor trades one layer's error against another's. The solvers below minimise
# the summed reuse error under a compute budget, exactly, by dynamic programming.


def reuse_error(curves: np.ndarray, plan: Sequence[int]) -> float:
    """Summed error of ``plan``: each reused step ``t`` costs ``curves[t - s - 1, s]``, ``s`` its source.

    ``inf`` where a step reuses an output older than the lookahead (its error was never measured).
    """
    curves = np.asarray(curves, dtype=np.float64)
    lookahead = curves.shape[0]
    total, source = 0.0, 0
    for step, compute in enumerate(plan):
        if compute:
            source = step
            continue
        distance = step - source
        if distance > lookahead or not np.isfinite(curves[distance - 1, source]):
            return math.inf
        total += float(curves[distance - 1, source])
    return total


@dataclass(frozen=True)
class PlanFrontier:
    """For one key, the least summed reuse error with exactly ``m`` computed steps, for every ``m``.

    ``errors[m]`` is ``inf`` where no plan computes exactly ``m`` steps within the lookahead.
    """

    errors: np.ndarray  # (num_steps + 1,)
    reused_before: np.ndarray  # (num_steps + 1, num_steps): for m computes ending at t, steps reused before t
    last_step: np.ndarray  # (num_steps + 1,): the last computed step of the best plan with m computes

    @property
    def num_steps(self) -> int:
        return self.reused_before.shape[1]

    def feasible(self) -> np.ndarray:
        """The numbers of computed steps some plan reaches, ascending."""
        return np.flatnonzero(np.isfinite(self.errors))

    def plan(self, computed: int) -> tuple[int, ...]:
        """The least-error plan with exactly ``computed`` computed steps."""
        if not 0 <= computed < len(self.errors) or not np.isfinite(self.errors[computed]):
            feasible = self.feasible()
            raise ScheduleError(
                f"No plan computes exactly {computed} of {self.num_steps} steps within the lookahead; "
                f"feasible counts are {feasible.min()}..{feasible.max()}"
            )
        plan = [0] * self.num_steps
        step, m = int(self.last_step[computed]), computed
        while True:
            plan[step] = 1
            if m == 1:
                return tuple(plan)
            step, m = step - int(self.reused_before[m, step]) - 1, m - 1


def plan_frontier(curves: np.ndarray, keep_last: bool = True, allowed: Sequence[bool] | None = None) -> PlanFrontier:
    """Dynamic programming over (computed steps so far, last computed step).

    ``best[m, t]`` is the least error of steps ``0..t`` with ``t`` computed and ``m`` computes; a
    computed step ``t`` follows the computed step ``t - j - 1`` after ``j <= lookahead`` reused
    steps, which cost the lookahead errors ``curves[0..j-1, t - j - 1]``. Step 0 is always computed;
    with ``keep_last`` the last one too, as the greedy rule does. ``allowed`` restricts the steps
    that may compute (step 0 always may).
    """
    curves = np.asarray(curves, dtype=np.float64)
    if curves.ndim != 2:
        raise ScheduleError(f"curves must have shape (lookahead, num_steps), got {curves.shape}")
    lookahead, steps = curves.shape
    # run_cost[s, j]: reusing step s's output for the j steps after it
    run_cost = np.full((steps, lookahead + 1), np.inf)
    run_cost[:, 0] = 0.0
    for j in range(1, lookahead + 1):
        run_cost[:, j] = run_cost[:, j - 1] + np.where(np.isfinite(curves[j - 1]), curves[j - 1], np.inf)
    best = np.full((steps + 1, steps), np.inf)
    reused_before = np.zeros((steps + 1, steps), dtype=np.int16)
    best[1, 0] = 0.0
    for t in range(1, steps):
        if allowed is not None and not allowed[t]:
            continue
        candidates = np.full((lookahead + 1, steps + 1), np.inf)
        for j in range(min(lookahead, t - 1) + 1):
            source = t - j - 1
            candidates[j, 1:] = best[:-1, source] + run_cost[source, j]
        reused_before[:, t] = np.argmin(candidates, axis=0)
        best[:, t] = candidates.min(axis=0)
    if keep_last:
        return PlanFrontier(best[:, steps - 1].copy(), reused_before, np.full(steps + 1, steps - 1))
    # the last computed step t hands its output to every step after it
    ends = np.full((steps + 1, steps), np.inf)
    for t in range(max(0, steps - 1 - lookahead), steps):
        ends[:, t] = best[:, t] + run_cost[t, steps - 1 - t]
    return PlanFrontier(ends.min(axis=1), reused_before, np.argmin(ends, axis=1))


def optimal_plan(curves: np.ndarray, computed: int, keep_last: bool = True) -> list[int]:
    """The plan with ``computed`` computed steps whose summed reuse error is least."""
    return list(plan_frontier(curves, keep_last).plan(computed))


def allocate_budget(frontiers: Mapping[str, PlanFrontier], weights: Mapping[str, int], budget: int) -> dict[str, int]:
    """Computed steps per key minimising the summed error, with ``sum(weights[k] * m_k) <= budget``.

    An exact knapsack over keys; ``weights`` are the integer costs of one computed step of each key.
    """
    return BudgetAllocations(frontiers, weights, budget).within(budget)


class BudgetAllocations:
    """The knapsack of :func:`allocate_budget`, solved once up to ``max_budget``: its tables hold the
    best allocation within every smaller budget too, so a sweep over budgets (``tune``) costs one solve.
    """

    def __init__(self, frontiers: Mapping[str, PlanFrontier], weights: Mapping[str, int], max_budget: int) -> None:
        self.frontiers, self.weights = frontiers, weights
        self.keys = list(frontiers)
        best = np.zeros(max_budget + 1)  # best[b]: least error of the keys so far within weighted budget b
        self._picks: list[np.ndarray] = []
        for key in self.keys:
            frontier, weight = frontiers[key], int(weights[key])
            if weight < 1:
                raise ScheduleError(f"The weight of key {key!r} must be a positive integer, got {weight}")
            extended = np.full(max_budget + 1, np.inf)
            pick = np.full(max_budget + 1, -1, dtype=np.int32)
            for m in frontier.feasible():
                cost = weight * int(m)
                if cost > max_budget:
                    break
                candidate = np.full(max_budget + 1, np.inf)
                candidate[cost:] = best[: max_budget + 1 - cost] + frontier.errors[m]
                better = candidate < extended
                extended[better], pick[better] = candidate[better], m
            best = extended
            self._picks.append(pick)
        self.errors = best  # the least summed error within each budget; inf where none fits

    def within(self, budget: int) -> dict[str, int]:
        """The computed steps per key of the least-error allocation within ``budget``."""
        if not np.isfinite(self.errors[budget]):
            least = sum(int(self.weights[k]) * int(self.frontiers[k].feasible().min()) for k in self.keys)
            raise ScheduleError(
                f"The budget allows {budget} weighted computed steps but the fewest the lookahead allows is {least}; "
                "ask for a larger budget or calibrate with a larger lookahead"
            )
        allocation: dict[str, int] = {}
        remaining = budget
        for key, pick in zip(reversed(self.keys), reversed(self._picks)):
            allocation[key] = int(pick[remaining])
            remaining -= int(self.weights[key]) * allocation[key]
        return {key: allocation[key] for key in self.keys}


def optimal_schedule(
    curves_by_key: Mapping[str, np.ndarray],
    max_weighted_computes: float,
    weights: Mapping[str, float] | None = None,
    keep_last: bool = True,
    resolution: int = 32,
) -> Schedule:
    """The schedule with the least summed reuse error over all keys, within a compute budget.

    The budget is ``sum(weights[key] * computed_steps[key]) <= max_weighted_computes``; ``weights``
    are each key's cost per computed step (e.g. its FLOPs per model call), 1 per key if omitted,
    so that the budget counts computed layer-type steps. For the knapsack, weights are rounded up to
    integers of at most ``resolution`` and the budget down, so the result always fits the budget.

    >>> optimal_schedule({"attn1": curves_a, "ff": curves_f}, max_weighted_computes=20)   # doctest: +SKIP
    """
    if not curves_by_key:
        raise ScheduleError("No curves to build a schedule from")
    frontiers = {key: plan_frontier(curves, keep_last) for key, curves in curves_by_key.items()}
    if weights is None:
        units = {key: 1 for key in frontiers}
        budget = math.floor(max_weighted_computes + 1e-9)
    else:
        missing = [key for key in frontiers if key not in weights]
        if missing or min(weights[key] for key in frontiers) <= 0:
            raise ScheduleError(f"Every key needs a positive weight; missing or not positive: {missing or dict(weights)}")
        quantum = max(weights[key] for key in frontiers) / resolution
        units = {key: math.ceil(weights[key] / quantum - 1e-9) for key in frontiers}
        budget = math.floor(max_weighted_computes / quantum + 1e-9)
    allocation = allocate_budget(frontiers, units, budget)
    return Schedule(nested_plans(curves_by_key, allocation, keep_last))


def nested_plans(curves_by_key: Mapping[str, np.ndarray], computed: Mapping[str, int], keep_last: bool = True) -> dict[str, tuple[int, ...]]:
    """Place each key's computed steps so that a key computing fewer steps computes a subset of the
    steps of every key computing more.

    The summed lookahead errors do not see that layers feed each other: on the demo model, two
    layer types with equal counts whose compute steps were offset by one lost 4 dB of PSNR against
    the same counts aligned. So the key computing most is placed on the summed curves of all
    keys, and each next key within the steps already chosen (where the lookahead allows it).
    """
    keys = sorted(computed, key=lambda key: -computed[key])
    # NaN (never measured) anywhere makes the sum NaN: no key may reuse there
    total = np.sum(np.stack([np.asarray(curves_by_key[key], dtype=np.float64) for key in keys]), axis=0)
    plans: dict[str, tuple[int, ...]] = {}
    allowed: tuple[int, ...] | None = None
    for key in keys:
        curves = total if allowed is None else curves_by_key[key]
        plan: tuple[int, ...] | None = None
        if allowed is not None:
            inside = plan_frontier(curves, keep_last, allowed=[bool(v) for v in allowed])
            if computed[key] < len(inside.errors) and np.isfinite(inside.errors[computed[key]]):
                plan = inside.plan(computed[key])
        if plan is None:
            plan = plan_frontier(curves, keep_last).plan(computed[key])
        plans[key] = plan
        allowed = plan
    return {key: plans[key] for key in curves_by_key}
