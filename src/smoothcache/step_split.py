"""Fewer steps and a cache together: at one compute budget, the split between them that drifts least.

A cache and a shorter sampler spend a compute budget in different ways: the cache skips block
calls where outputs barely change, fewer steps coarsen the whole trajectory. Each is cheapest in
error at a mild setting, so a budget spent as somewhat fewer steps with a mild cache can beat
either alone (docs/results/bench-model.md measures it on our bench model); with a high-order
multistep solver the shorter sampler alone may win. Which holds depends on the
model and the sampler, so ``split_steps`` measures it: for each candidate step count it calibrates
at that count, plans the cache for the rest of the budget, runs the evaluation set and compares
the result with the full-step uncached output. The split with the least error wins; the default candidates
include the two pure options (all steps cached, and the most steps the budget allows uncached),
so it is then never worse than either on that set.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from .adapters import whole_block_components
from .errors import UnreachableBudgetError
from .recorder import calibration
from .runtime import cache
from .schedule import Schedule
from .solvers import Forecast
from .steps import resolve_target
from .tuning import ErrorFn, relative_l1

__all__ = ["StepSplit", "default_step_counts", "split_steps"]

logger = logging.getLogger(__name__)

_SLACK = 1e-9  # products such as 100 * 0.07 = 7.000000000000001 count as whole


@dataclass
class StepSplit:
    """The chosen split: run ``num_steps`` steps with ``schedule`` (all-compute where fewer steps
    alone won), and what each candidate measured."""

    num_steps: int
    schedule: Schedule
    full_steps: int
    error: float
    forecast: Forecast
    probes: list[dict[str, float]] = field(default_factory=list)
    schedules: dict[int, Schedule] = field(default_factory=dict)  # each candidate step count's schedule

    @property
    def uses_cache(self) -> bool:
        """False where fewer steps alone won: run ``num_steps`` steps with no cache."""
        return self.schedule.compute_fraction() < 1.0

    @property
    def compute_fraction(self) -> float:
        """Cached-layer calls computed, as a fraction of the full-step uncached run's."""
        return self.num_steps / self.full_steps * self.schedule.compute_fraction()


def default_step_counts(full_steps: int, compute_fraction: float, count: int = 5) -> list[int]:
    """``count`` step counts spread evenly from the most the budget allows uncached
    (``floor(full_steps * compute_fraction)``, at least 2: fewer steps alone) to ``full_steps``
    (the cache alone), most steps first."""
    if count < 2:
        raise ValueError(f"count must be >= 2, got {count}")
    fewest = max(2, math.floor(full_steps * compute_fraction + _SLACK))
    if fewest >= full_steps:
        return [full_steps]
    spread = {round(fewest + (full_steps - fewest) * i / (count - 1)) for i in range(count)}
    return sorted(spread, reverse=True)


def split_steps(
    pipe_or_module: Any,
    generate: Callable[[int], Any],
    full_steps: int,
    compute_fraction: float,
    *,
    step_counts: Sequence[int] | None = None,
    components: Sequence[str] | None = None,
    forecast: Forecast = "linear",
    error_fn: ErrorFn = relative_l1,
    reference: Any | None = None,
    progress: bool = True,
) -> StepSplit:
    """The split of ``compute_fraction`` between fewer steps and a cache whose output drifts least
    from the full-step uncached output.

    ``generate(num_steps)`` runs the evaluation set at that step count (fixed prompts or labels and
    generators) and returns its outputs, as for :func:`~smoothcache.tune`. Each candidate step
    count ``n`` (``step_counts``, default :func:`default_step_counts`) is calibrated at ``n`` steps
    (one ``generate(n)``) and cached with the schedule computing ``compute_fraction * full_steps /
    n`` of the ``components``' calls (one more); where that is 1 or more, ``n`` steps run uncached.
    ``components`` default to every block list of the model cached whole (Flux: ``"block"`` and
    ``"single_block"``). A step count whose budget no schedule reaches is skipped (logged). Equal errors go to the
    earlier candidate.

    >>> split = smoothcache.split_steps(pipe, lambda n: pipe(class_labels=labels, num_inference_steps=n,
    ...     generator=torch.manual_seed(0), output_type="pt"), full_steps=50, compute_fraction=0.5)  # doctest: +SKIP
    >>> with smoothcache.cache(pipe, split.schedule, forecast=split.forecast):   # doctest: +SKIP
    ...     images = pipe(class_labels=[207], num_inference_steps=split.num_steps).images  # (if split.uses_cache)
    """
    if not 0 < compute_fraction <= 1:
        raise ValueError(f"compute_fraction must be in (0, 1], got {compute_fraction}")
    if full_steps < 2:
        raise ValueError(f"full_steps must be >= 2, got {full_steps}")
    counts = list(dict.fromkeys(step_counts)) if step_counts is not None else default_step_counts(full_steps, compute_fraction)
    wrong = [n for n in counts if not 2 <= n <= full_steps]
    if wrong or not counts:
        raise ValueError(f"step_counts must lie in [2, full_steps={full_steps}], got {counts}")
    if components is None:
        components = whole_block_components(resolve_target(pipe_or_module).model)
    if reference is None:
        reference = generate(full_steps)
    probes: list[dict[str, float]] = []
    schedules: dict[int, Schedule] = {}
    best: StepSplit | None = None
    for steps in tqdm(counts, desc="splitting steps", unit="step count", disable=not progress):
        share = compute_fraction * full_steps / steps  # of the cached calls at this step count
        try:
            schedule = _plan(pipe_or_module, generate, steps, share, components, forecast)
        except UnreachableBudgetError as error:
            logger.warning("%d steps: no schedule computes %.3f of the calls (%s); skipped", steps, share, error)
            continue
        if schedule is None:
            output, schedule = generate(steps), Schedule({key: (1,) * steps for key in components})
        else:
            with cache(pipe_or_module, schedule, forecast=forecast):
                output = generate(steps)
        schedules[steps] = schedule
        candidate = StepSplit(steps, schedule, full_steps, float(error_fn(output, reference)), forecast)
        probes.append({"num_steps": steps, "cache_compute_fraction": schedule.compute_fraction(),
                       "compute_fraction": candidate.compute_fraction, "error": candidate.error})
        logger.info("%d steps, cache computing %.3f: compute %.3f, error %.4g", steps, schedule.compute_fraction(),
                    candidate.compute_fraction, candidate.error)
        if math.isnan(candidate.error):
            logger.warning("%d steps: the error is NaN (the output is not finite); never chosen", steps)
        elif best is None or candidate.error < best.error:
            best = candidate
    if best is None:
        raise UnreachableBudgetError(
            f"No step count in {counts} gave a finite error within compute fraction {compute_fraction}: include "
            f"fewer steps (at {max(2, math.floor(full_steps * compute_fraction + _SLACK))} or fewer no cache is needed), "
            "or give a larger compute_fraction"
        )
    best.probes, best.schedules = probes, schedules
    return best


def _plan(pipe_or_module: Any, generate: Callable[[int], Any], steps: int, share: float,
          components: Sequence[str], forecast: Forecast) -> Schedule | None:
    """The schedule for ``steps`` computing ``share`` of the calls, calibrated at ``steps``; None
    where the share leaves nothing to skip (fewer steps alone)."""
    if share >= 1 - _SLACK:
        return None
    lookahead = min(3, steps - 1)  # calibration's default, as far as the steps reach
    with calibration(pipe_or_module, components=list(components), steps=steps, forecast=forecast,
                     lookahead=lookahead) as recorder:
        generate(steps)
    return recorder.profile.schedule(compute_fraction=share, forecast=forecast)
