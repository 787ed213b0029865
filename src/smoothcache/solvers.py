"""Pure functions from error curves to schedules, and the one front door from a profile to them.

Every way of making a schedule goes through :func:`solve` (one threshold or budget) or
:func:`candidate_schedules` (every budget, for ``tune``); adding a solver means adding it to
:data:`SOLVERS` and to those two functions.

A curve array has shape ``(lookahead, num_steps)``: ``curves[k - 1, s]`` is the relative L1 error
of reusing step ``s``'s output at step ``s + k`` (NaN where ``s + k`` is past the last step).
A forecast curve array, for reusing steps that extrapolate (``cache(..., forecast="linear")``), has
shape ``(gaps, lookahead, num_steps)``: ``forecasts[g - 1, k - 1, s]`` is the error of predicting
step ``s + k`` from the outputs of steps ``s`` and ``s - g``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args, overload

import numpy as np

from .errors import ProfileError, ScheduleError, UnreachableBudgetError
from .schedule import Schedule

__all__ = [
    "SOLVERS",
    "BudgetAllocations",
    "Calibrated",
    "Forecast",
    "ForecastFrontier",
    "PlanFrontier",
    "Solver",
    "SolverProblem",
    "allocate_budget",
    "alpha_candidates",
    "candidate_schedules",
    "forecast_frontier",
    "frontier_of",
    "greedy_plan",
    "greedy_schedule",
    "nested_plans",
    "optimal_schedule",
    "plan_frontier",
    "reuse_error",
    "schedule_for_budget",
    "solve",
    "solver_problem",
    "weigh_by_target_step",
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
    raise UnreachableBudgetError(
        f"No threshold reaches {describe_budget}: even skipping wherever the lookahead allows computes "
        f"{best[0].compute_fraction():.3f} of the layer calls; calibrate with a larger lookahead "
        "or ask for a smaller budget"
    )


# ---- budget-optimal schedules --------------------------------------------------------------
# The greedy rule bounds each jump's error by one threshold; it neither spends a budget where
# errors are smallest nor trades one layer's error against another's. The solvers below minimise
# the summed reuse error under a compute budget, exactly, by dynamic programming.


def reuse_error(curves: np.ndarray, plan: Sequence[int], forecasts: np.ndarray | None = None) -> float:
    """Summed error of ``plan``: each reused step ``t`` costs ``curves[t - s - 1, s]``, ``s`` its source.

    With ``forecasts``, a reused step after two computes ``p < s`` extrapolates from them and costs
    ``forecasts[s - p - 1, t - s - 1, s]``. ``inf`` where a step reuses an output older than the
    lookahead (its error was never measured).
    """
    curves = np.asarray(curves, dtype=np.float64)
    lookahead = curves.shape[0]
    total, source, previous = 0.0, 0, None
    for step, compute in enumerate(plan):
        if compute:
            source, previous = step, (source if step else None)
            continue
        distance = step - source
        if distance > lookahead:
            return math.inf
        if forecasts is None or previous is None:
            error = curves[distance - 1, source]
        elif source - previous > forecasts.shape[0]:
            return math.inf
        else:
            error = forecasts[source - previous - 1, distance - 1, source]
        if not np.isfinite(error):
            return math.inf
        total += float(error)
    return total


class _Frontier:
    """What both frontiers share: the least error per number of computed steps, and its checks."""

    errors: np.ndarray  # (num_steps + 1,)

    @property
    def num_steps(self) -> int:
        return len(self.errors) - 1

    def feasible(self) -> np.ndarray:
        """The numbers of computed steps some plan reaches, ascending."""
        return np.flatnonzero(np.isfinite(self.errors))

    def _check_feasible(self, computed: int) -> None:
        if not 0 <= computed < len(self.errors) or not np.isfinite(self.errors[computed]):
            feasible = self.feasible()
            raise ScheduleError(
                f"No plan computes exactly {computed} of {self.num_steps} steps within the lookahead; "
                f"feasible counts are {feasible.min()}..{feasible.max()}"
            )

    def plan(self, computed: int) -> tuple[int, ...]:
        """The least-error plan with exactly ``computed`` computed steps."""
        raise NotImplementedError


@dataclass(frozen=True)
class PlanFrontier(_Frontier):
    """For one key, the least summed reuse error with exactly ``m`` computed steps, for every ``m``.

    ``errors[m]`` is ``inf`` where no plan computes exactly ``m`` steps within the lookahead.
    """

    errors: np.ndarray  # (num_steps + 1,)
    reused_before: np.ndarray  # (num_steps + 1, num_steps): for m computes ending at t, steps reused before t
    last_step: np.ndarray  # (num_steps + 1,): the last computed step of the best plan with m computes

    def plan(self, computed: int) -> tuple[int, ...]:
        """The least-error plan with exactly ``computed`` computed steps."""
        self._check_feasible(computed)
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


@dataclass(frozen=True)
class ForecastFrontier(_Frontier):
    """As :class:`PlanFrontier`, for plans whose reusing steps extrapolate from the last two computes.

    A reused step's error then depends on the gap between those two computes as well, so the plan
    state is (last computed step, gap to the one before); gap 0 marks step 0, which has no earlier
    compute and is reused plainly, as the runtime does.
    """

    errors: np.ndarray  # (num_steps + 1,)
    previous_gap: np.ndarray  # (num_steps + 1, num_steps, gaps + 1): for m computes ending at t with gap g, the gap before
    last_step: np.ndarray  # (num_steps + 1,)
    last_gap: np.ndarray  # (num_steps + 1,)

    def plan(self, computed: int) -> tuple[int, ...]:
        """The least-error plan with exactly ``computed`` computed steps."""
        self._check_feasible(computed)
        plan = [0] * self.num_steps
        step, gap, m = int(self.last_step[computed]), int(self.last_gap[computed]), computed
        while True:
            plan[step] = 1
            if m == 1:
                return tuple(plan)
            step, gap, m = step - gap, int(self.previous_gap[m, step, gap]), m - 1


def forecast_frontier(
    curves: np.ndarray, forecasts: np.ndarray, keep_last: bool = True, allowed: Sequence[bool] | None = None
) -> ForecastFrontier:
    """Dynamic programming as in :func:`plan_frontier`, over (computes, last compute, gap before it).

    After step 0, reusing step ``s``'s output costs ``curves``; after a later compute ``s`` whose
    previous compute was ``g`` steps earlier, step ``s + k`` costs ``forecasts[g - 1, k - 1, s]``.
    Gaps up to ``lookahead + 1`` (``lookahead`` reused steps between two computes) need
    ``forecasts`` with that many gap rows.
    """
    curves = np.asarray(curves, dtype=np.float64)
    forecasts = np.asarray(forecasts, dtype=np.float64)
    lookahead, steps = curves.shape
    if forecasts.ndim != 3 or forecasts.shape[1:] != curves.shape or forecasts.shape[0] < lookahead + 1:
        raise ScheduleError(
            f"forecasts must have shape (gaps >= {lookahead + 1}, {lookahead}, {steps}) for curves of shape "
            f"{curves.shape}, got {forecasts.shape}"
        )
    gaps = lookahead + 1

    def measured(values: np.ndarray) -> np.ndarray:
        return np.where(np.isfinite(values), values, np.inf)

    # run_cost[g, s, j]: the j steps after compute s, reached with gap g (0: step 0, plain reuse)
    run_cost = np.full((gaps + 1, steps, lookahead + 1), np.inf)
    run_cost[:, :, 0] = 0.0
    for j in range(1, lookahead + 1):
        run_cost[0, :, j] = run_cost[0, :, j - 1] + measured(curves[j - 1])
        run_cost[1:, :, j] = run_cost[1:, :, j - 1] + measured(forecasts[:gaps, j - 1])
    best = np.full((steps + 1, steps, gaps + 1), np.inf)
    previous_gap = np.zeros((steps + 1, steps, gaps + 1), dtype=np.int16)
    best[1, 0, 0] = 0.0
    for t in range(1, steps):
        if allowed is not None and not allowed[t]:
            continue
        for j in range(min(lookahead, t - 1) + 1):
            source = t - j - 1
            # arriving at t from compute `source` (itself reached with gap g) after j reused steps
            candidates = best[:-1, source, :] + run_cost[:, source, j]  # (steps, gaps + 1)
            best[1:, t, j + 1] = candidates.min(axis=1)
            previous_gap[1:, t, j + 1] = np.argmin(candidates, axis=1)
    if keep_last:
        final = best[:, steps - 1, :]
        last_gap = np.argmin(final, axis=1)
        return ForecastFrontier(final.min(axis=1), previous_gap, np.full(steps + 1, steps - 1), last_gap)
    ends = np.full((steps + 1, steps, gaps + 1), np.inf)
    for t in range(max(0, steps - 1 - lookahead), steps):
        ends[:, t, :] = best[:, t, :] + run_cost[:, t, steps - 1 - t]
    flat = ends.reshape(steps + 1, -1)
    where = np.argmin(flat, axis=1)
    return ForecastFrontier(flat.min(axis=1), previous_gap, where // (gaps + 1), where % (gaps + 1))


def allocate_budget(frontiers: Mapping[str, _Frontier], weights: Mapping[str, int], budget: int) -> dict[str, int]:
    """Computed steps per key minimising the summed error, with ``sum(weights[k] * m_k) <= budget``.

    An exact knapsack over keys; ``weights`` are the integer costs of one computed step of each key.
    """
    return BudgetAllocations(frontiers, weights, budget).within(budget)


class BudgetAllocations:
    """The knapsack of :func:`allocate_budget`, solved once up to ``max_budget``: its tables hold the
    best allocation within every smaller budget too, so a sweep over budgets (``tune``) costs one solve.
    """

    def __init__(self, frontiers: Mapping[str, _Frontier], weights: Mapping[str, int], max_budget: int) -> None:
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
    forecasts_by_key: Mapping[str, np.ndarray] | None = None,
) -> Schedule:
    """The schedule with the least summed reuse error over all keys, within a compute budget.

    The budget is ``sum(weights[key] * computed_steps[key]) <= max_weighted_computes``; ``weights``
    are each key's cost per computed step (e.g. its FLOPs per model call), 1 per key if omitted,
    so that the budget counts computed layer-type steps. For the knapsack, weights are rounded up to
    integers of at most ``resolution`` and the budget down, so the result always fits the budget.
    With ``forecasts_by_key`` the errors are those of reusing steps that extrapolate
    (``cache(..., forecast="linear")``), and computes go where extrapolation needs them.

    >>> optimal_schedule({"attn1": curves_a, "ff": curves_f}, max_weighted_computes=20)   # doctest: +SKIP
    """
    if not curves_by_key:
        raise ScheduleError("No curves to build a schedule from")
    frontiers = {
        key: frontier_of(curves, None if forecasts_by_key is None else forecasts_by_key[key], keep_last)
        for key, curves in curves_by_key.items()
    }
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
    return Schedule(nested_plans(curves_by_key, allocation, keep_last, forecasts_by_key))


def frontier_of(
    curves: np.ndarray, forecasts: np.ndarray | None, keep_last: bool = True, allowed: Sequence[bool] | None = None
) -> _Frontier:
    """The plain frontier, or the forecasting one where forecast errors are given."""
    if forecasts is None:
        return plan_frontier(curves, keep_last, allowed)
    return forecast_frontier(curves, forecasts, keep_last, allowed)


def nested_plans(
    curves_by_key: Mapping[str, np.ndarray],
    computed: Mapping[str, int],
    keep_last: bool = True,
    forecasts_by_key: Mapping[str, np.ndarray] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Place each key's computed steps so that a key computing fewer steps computes a subset of the
    steps of every key computing more.

    The summed lookahead errors do not see that layers feed each other: on the demo model, two
    layer types with equal counts whose compute steps were offset by one lost 4 dB of PSNR against
    the same counts aligned. So the key computing most is placed on the summed curves of all
    keys, and each next key within the steps already chosen (where the lookahead allows it).
    """
    keys = sorted(computed, key=lambda key: -computed[key])

    def summed(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        # NaN (never measured) anywhere makes the sum NaN: no key may reuse there
        return np.sum(np.stack([np.asarray(arrays[key], dtype=np.float64) for key in keys]), axis=0)

    total = summed(curves_by_key)
    total_forecasts = None if forecasts_by_key is None else summed(forecasts_by_key)
    plans: dict[str, tuple[int, ...]] = {}
    allowed: tuple[int, ...] | None = None
    for key in keys:
        if allowed is None:
            curves, forecasts = total, total_forecasts
        else:
            curves, forecasts = curves_by_key[key], None if forecasts_by_key is None else forecasts_by_key[key]
        plan: tuple[int, ...] | None = None
        if allowed is not None:
            inside = frontier_of(curves, forecasts, keep_last, allowed=[bool(v) for v in allowed])
            if computed[key] < len(inside.errors) and np.isfinite(inside.errors[computed[key]]):
                plan = inside.plan(computed[key])
        if plan is None:
            plan = frontier_of(curves, forecasts, keep_last).plan(computed[key])
        plans[key] = plan
        allowed = plan
    return {key: plans[key] for key in curves_by_key}


def weigh_by_target_step(errors: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Curves (``(lookahead, steps)``) or forecast curves (``(gaps, lookahead, steps)``) with each
    error scaled by the weight of the step where it is incurred: ``[..., k - 1, s]`` by ``weights[s + k]``."""
    errors = np.array(errors, dtype=np.float64)
    lookahead, steps = errors.shape[-2:]
    for k in range(1, lookahead + 1):
        errors[..., k - 1, : steps - k] *= weights[k:]
    return errors


@dataclass(frozen=True)
class SolverProblem:
    """The optimal solver's input for a set of keys: the curves it minimises, and how."""

    curves: dict[str, np.ndarray]
    forecasts: dict[str, np.ndarray] | None = None  # for forecasting schedules
    keep_last: bool = True

    def frontiers(self) -> dict[str, _Frontier]:
        return {key: frontier_of(c, None if self.forecasts is None else self.forecasts[key], self.keep_last) for key, c in self.curves.items()}

    def solve(self, max_weighted_computes: float, weights: Mapping[str, float] | None = None) -> Schedule:
        """The least-error schedule within the budget (see :func:`optimal_schedule`)."""
        return optimal_schedule(self.curves, max_weighted_computes, weights, self.keep_last, forecasts_by_key=self.forecasts)

    def place(self, computed: Mapping[str, int]) -> Schedule:
        """The schedule computing ``computed[key]`` steps of each key (see :func:`nested_plans`)."""
        return Schedule(nested_plans(self.curves, computed, self.keep_last, self.forecasts))


# ---- the front door: a profile and a budget (or threshold) -> a schedule -------------------------

# "per-block" is the optimal solver with one plan per block: one name for the command line and the demo.
Solver = Literal["greedy", "optimal", "per-block"]
SOLVERS: tuple[str, ...] = get_args(Solver)
# what a reusing step returns: the kept output, or an extrapolation from the last two (runtime.cache)
Forecast = Literal["none", "linear"]


class Calibrated(Protocol):
    """What the solvers read of a calibration profile (:class:`~smoothcache.profile.CalibrationProfile`)."""

    @property
    def num_steps(self) -> int: ...
    @property
    def step_weights(self) -> np.ndarray | None: ...
    total_flops: float | None
    metadata: dict[str, Any]

    def curves_by_key(self, keys: Sequence[str] | None = None, per_block: bool = False) -> dict[str, np.ndarray]: ...
    def forecast_curves_by_key(self, keys: Sequence[str] | None = None, per_block: bool = False) -> dict[str, np.ndarray]: ...
    def key_costs(self, per_block: bool = False) -> dict[str, float]: ...
    def estimated_speedup(self, schedule: Schedule) -> float: ...


def solver_problem(
    profile: Calibrated, keys: Sequence[str] | None = None, per_block: bool = False, forecast: Forecast = "none",
    weigh_steps: bool = True,
) -> SolverProblem:
    """What the optimal solver minimises for these keys: their curves, weighted by the steps'
    sensitivity where it was measured (``weigh_steps``), and the forecast errors for ``forecast``."""
    if forecast not in ("none", "linear"):
        raise ProfileError(f"forecast must be 'none' or 'linear', got {forecast!r}")
    weights = profile.step_weights if weigh_steps else None
    curves = profile.curves_by_key(keys, per_block)
    forecasts = profile.forecast_curves_by_key(keys, per_block) if forecast == "linear" else None
    if weights is not None:
        curves = {key: weigh_by_target_step(c, weights) for key, c in curves.items()}
        if forecasts is not None:
            forecasts = {key: weigh_by_target_step(f, weights) for key, f in forecasts.items()}
    # with weights, the last step competes like any other (DDIM's last step hardly moves the sample)
    return SolverProblem(curves, forecasts, keep_last=weights is None)


def solve(
    profile: Calibrated,
    alpha: float | None = None,
    *,
    compute_fraction: float | None = None,
    speedup: float | None = None,
    keys: Sequence[str] | None = None,
    per_block: bool = False,
    solver: Solver | None = None,
    forecast: Forecast = "none",
    weigh_steps: bool = True,
) -> tuple[Schedule, float | None]:
    """The schedule for one threshold or budget, and the greedy threshold used (None for the
    optimal solver); ``CalibrationProfile.schedule`` documents the arguments. The schedule records
    how it was planned (``Schedule.planned``)."""
    schedule, threshold = _solve(profile, alpha, compute_fraction=compute_fraction, speedup=speedup, keys=keys,
                                 per_block=per_block, solver=solver, forecast=forecast, weigh_steps=weigh_steps)
    name = solver or ("greedy" if alpha is not None else "optimal")
    weighted = weigh_steps and profile.step_weights is not None  # as solver_problem weighs; the greedy rule never does
    return schedule.with_planned(
        solver=name, alpha=threshold, compute_fraction=compute_fraction, speedup=speedup, forecast=forecast,
        per_block=per_block or None, step_weights=None if name == "greedy" else weighted,
        model_class=profile.metadata.get("model_class"), scheduler_class=profile.metadata.get("scheduler_class"),
    ), threshold


def _solve(
    profile: Calibrated,
    alpha: float | None,
    *,
    compute_fraction: float | None,
    speedup: float | None,
    keys: Sequence[str] | None,
    per_block: bool,
    solver: Solver | None,
    forecast: Forecast,
    weigh_steps: bool,
) -> tuple[Schedule, float | None]:
    given = [n for n, v in (("alpha", alpha), ("compute_fraction", compute_fraction), ("speedup", speedup)) if v is not None]
    if len(given) != 1:
        raise ProfileError(f"Give exactly one of alpha, compute_fraction, speedup (got {given or 'none'})")
    if solver is None:
        solver = "greedy" if alpha is not None else "optimal"
    if solver not in SOLVERS:
        raise ProfileError(f"Unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if solver == "per-block":
        solver, per_block = "optimal", True
    if forecast == "linear" and solver == "greedy":
        raise ProfileError(
            "Schedules for forecasting come from the optimal solver: give compute_fraction= or speedup= "
            "with solver='optimal' or 'per-block'"
        )
    problem = solver_problem(profile, keys, per_block, forecast, weigh_steps) if solver == "optimal" else None
    # the optimal solver reads only the keys of the unweighted curves: its problem holds them
    curves = problem.curves if problem is not None else profile.curves_by_key(keys, per_block)
    num_steps = profile.num_steps
    if alpha is not None:
        if not math.isfinite(alpha) or alpha < 0:
            raise ProfileError(f"alpha must be a finite number >= 0, got {alpha}")
        if solver != "greedy":
            raise ProfileError(
                "The optimal solver spends a budget, it has no threshold: pass compute_fraction= or speedup= "
                "(or solver='greedy' for the paper's alpha)"
            )
        return greedy_schedule(curves, alpha), float(alpha)
    if compute_fraction is not None:
        if not 0 < compute_fraction <= 1:  # False for NaN too
            raise ProfileError(f"compute_fraction must be in (0, 1], got {compute_fraction}")
        if problem is not None:
            try:
                return problem.solve(compute_fraction * num_steps * len(curves)), None
            except ScheduleError:
                least = _least_computes(problem)
                raise UnreachableBudgetError(
                    f"compute_fraction={compute_fraction} is out of reach: with lookahead {_lookahead(curves)} at least "
                    f"{sum(least.values()) / (num_steps * len(curves)):.3f} of the layer calls compute, since a kept output "
                    "serves at most that many later steps; ask for more, or calibrate with a larger lookahead"
                ) from None
        return schedule_for_budget(
            curves, lambda s: s.compute_fraction() <= compute_fraction + 1e-12, f"compute_fraction={compute_fraction}"
        )
    assert speedup is not None
    if not math.isfinite(speedup) or speedup < 1:
        raise ProfileError(f"speedup must be a finite number >= 1, got {speedup}")
    if problem is not None:
        costs = profile.key_costs(per_block)
        costs = {key: costs[key] for key in curves}
        total = float(profile.total_flops or 0.0)
        # speedup = total / (total - saved) with saved = sum(cost * (1 - computed / steps))
        budget = num_steps * (sum(costs.values()) - total * (1.0 - 1.0 / speedup))
        if budget >= 0:
            with contextlib.suppress(ScheduleError):  # below the fewest computes the lookahead allows
                return problem.solve(budget, weights=costs), None
        least = _least_computes(problem)
        saved = sum(costs[key] * (1.0 - least[key] / num_steps) for key in curves)
        raise UnreachableBudgetError(
            f"speedup={speedup} is out of reach: with lookahead {_lookahead(curves)} the fastest schedule gives "
            f"{total / max(total - saved, 1e-30):.2f}x (ideal, from the measured FLOPs); ask for less, or "
            "calibrate with a larger lookahead"
        )
    return schedule_for_budget(curves, lambda s: profile.estimated_speedup(s) >= speedup - 1e-12, f"speedup={speedup}")


def _least_computes(problem: SolverProblem) -> dict[str, int]:
    """The fewest computed steps each key's plans can have within the lookahead."""
    return {key: int(frontier.feasible().min()) for key, frontier in problem.frontiers().items()}


def _lookahead(curves: Mapping[str, np.ndarray]) -> int:
    return int(np.asarray(next(iter(curves.values()))).shape[-2])


def candidate_schedules(
    profile: Calibrated,
    solver: Solver = "optimal",
    per_block: bool = False,
    keys: Sequence[str] | None = None,
    forecast: Forecast = "none",
) -> Sequence[Schedule]:
    """Every distinct schedule the solver makes at some compute budget, cheapest first.

    For the optimal solver the knapsack is solved once for all budgets and a schedule is built only
    when asked for (a binary search asks for a dozen): per-block DiT-XL/2 has 2,800 budgets.
    """
    per_block = per_block or solver == "per-block"
    if solver in ("optimal", "per-block"):
        problem = solver_problem(profile, keys, per_block, forecast)
        how = {"solver": solver, "forecast": forecast, "per_block": per_block or None,
               "model_class": profile.metadata.get("model_class"), "scheduler_class": profile.metadata.get("scheduler_class")}
        return _OptimalSchedules(problem, profile.num_steps * len(problem.curves), how)
    slots = profile.num_steps * len(profile.curves_by_key(keys, per_block))
    if forecast != "none":
        raise ProfileError("Schedules for forecasting come from the optimal solver: tune with solver='optimal' or 'per-block'")
    schedules: list[Schedule] = []
    for computed in range(slots, 0, -1):
        try:
            schedule = solve(profile, compute_fraction=computed / slots, solver=solver, per_block=per_block, keys=keys)[0]
        except ScheduleError:  # below the fewest computed steps the lookahead allows
            break
        if not schedules or schedule != schedules[-1]:
            schedules.append(schedule)
    return schedules[::-1]


class _OptimalSchedules(Sequence[Schedule]):
    """The optimal solver's distinct schedules over every budget of computed layer steps, cheapest
    first, as ``profile.schedule(compute_fraction=...)`` makes them, each built on first access."""

    def __init__(self, problem: SolverProblem, slots: int, how: dict[str, Any]) -> None:
        self._problem, self._how = problem, how
        knapsack = BudgetAllocations(problem.frontiers(), dict.fromkeys(problem.curves, 1), slots)
        allocations: list[dict[str, int]] = []
        for budget in range(slots, 0, -1):
            if not np.isfinite(knapsack.errors[budget]):
                break  # below the fewest computed steps the lookahead allows
            allocation = knapsack.within(budget)
            if not allocations or allocation != allocations[-1]:
                allocations.append(allocation)
        self._allocations = allocations[::-1]
        self._built: dict[int, Schedule] = {}

    def __len__(self) -> int:
        return len(self._allocations)

    @overload
    def __getitem__(self, index: int) -> Schedule: ...
    @overload
    def __getitem__(self, index: slice) -> list[Schedule]: ...
    def __getitem__(self, index: int | slice) -> Schedule | list[Schedule]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = range(len(self))[index]  # negative indices, and IndexError past the end
        if index not in self._built:
            self._built[index] = self._problem.place(self._allocations[index]).with_planned(**self._how)
        return self._built[index]
