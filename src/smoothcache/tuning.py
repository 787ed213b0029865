"""Quality target: the fastest schedule whose final output stays within a bound the user gives.

A threshold such as alpha = 0.18 says nothing about the images: on one model it changes nothing,
on another it ruins them. ``tune`` asks instead how far the cached result may drift from the
uncached one on the calibration set, and searches the solver's schedules, from cheapest to
dearest, for the cheapest that stays within that drift. The drift is measured, not predicted:
each probe is one cached run of the set, and a binary search needs about log2(#schedules) probes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import ProfileError
from .profile import CalibrationProfile
from .runtime import cache
from .schedule import Schedule
from .solvers import Forecast, Solver, candidate_schedules
from .steps import resolve_target

__all__ = ["TuneResult", "relative_l1", "tune"]

logger = logging.getLogger(__name__)

ErrorFn = Callable[[Any, Any], float]


def _tensors(output: Any) -> list[torch.Tensor]:
    """The tensors in a generation's output: a tensor, a list/tuple of them, or ``.images``."""
    output = getattr(output, "images", output)
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _tensors(item)]
    raise TypeError(
        f"generate() returned {type(output).__name__}; return the pipeline output with output_type='pt' "
        "(tensors), or pass error_fn= that compares your outputs"
    )


def relative_l1(output: Any, reference: Any) -> float:
    """``||output - reference||_1 / ||reference||_1`` over every tensor of the two outputs."""
    outputs, references = _tensors(output), _tensors(reference)
    if len(outputs) != len(references):
        raise ValueError(f"generate() returned {len(outputs)} tensors but the reference run {len(references)}")
    difference = sum(float((o.float() - r.float()).abs().sum()) for o, r in zip(outputs, references))
    norm = sum(float(r.float().abs().sum()) for r in references)
    return difference / max(norm, 1e-12)


@dataclass
class TuneResult:
    """The schedule chosen, its measured error, and every probe made to find it."""

    schedule: Schedule
    error: float
    max_error: float
    estimated_speedup: float | None
    probes: list[dict[str, float]] = field(default_factory=list)

    @property
    def compute_fraction(self) -> float:
        return self.schedule.compute_fraction()


def tune(
    pipe_or_module: Any,
    profile: CalibrationProfile,
    generate: Callable[[], Any],
    max_error: float,
    *,
    solver: Solver = "optimal",
    per_block: bool = False,
    keys: Sequence[str] | None = None,
    error_fn: ErrorFn = relative_l1,
    reference: Any | None = None,
    calls_per_step: int | None = None,
    progress: bool = True,
    forecast: Forecast = "none",
) -> TuneResult:
    """The cheapest schedule whose output stays within ``max_error`` of the uncached output.

    ``generate()`` runs the evaluation set (e.g. the calibration prompts and seeds, with fixed
    generators) and returns its outputs; ``error_fn(output, reference)`` compares them (relative
    L1 by default, so ``max_error=0.05`` allows a 5% drift). Errors are assumed to fall as the budget
    grows, which holds for the solvers' schedules up to noise; the result is always measured.
    ``forecast="linear"`` plans and measures schedules for ``cache(..., forecast="linear")`` (the
    profile must hold forecast errors); use the result with the same ``forecast``.

    >>> result = smoothcache.tune(pipe, profile, lambda: pipe(class_labels=[1, 2], num_inference_steps=20,
    ...     generator=torch.manual_seed(0), output_type="pt"), max_error=0.05)    # doctest: +SKIP
    >>> result.schedule.save("schedule.json")                                     # doctest: +SKIP
    """
    if max_error < 0:
        raise ValueError(f"max_error must be >= 0, got {max_error}")
    profile.check_compatible(resolve_target(pipe_or_module).model)
    schedules = candidate_schedules(profile, solver, per_block, keys, forecast)
    if not schedules:
        raise ProfileError("The solver made no schedule from this profile")
    if reference is None:
        reference = generate()
    full = Schedule({key: (1,) * profile.num_steps for key in schedules[-1].keys})
    probes: list[dict[str, float]] = []
    bar = tqdm(total=max(1, len(schedules).bit_length()), desc="tuning", unit="probe", disable=not progress)

    def measure(schedule: Schedule) -> float:
        with cache(pipe_or_module, schedule, calls_per_step=calls_per_step, forecast=forecast):
            error = float(error_fn(generate(), reference))
        probes.append({"compute_fraction": schedule.compute_fraction(), "error": error})
        logger.info("compute fraction %.3f: error %.4g (bound %.4g)", schedule.compute_fraction(), error, max_error)
        bar.update()
        bar.set_postfix_str(f"compute {schedule.compute_fraction():.2f} error {error:.3g}")
        return error

    # binary search for the first (cheapest) schedule within the bound
    low, high = 0, len(schedules) - 1
    chosen, chosen_error = full, 0.0
    while low <= high:
        middle = (low + high) // 2
        error = measure(schedules[middle])
        if error <= max_error:
            chosen, chosen_error, high = schedules[middle], error, middle - 1
        else:
            low = middle + 1
    bar.close()
    if chosen.compute_fraction() == 1.0:
        logger.warning(
            "No cached schedule kept the error within %.4g; the cheapest saving tried drifted by %.4g. "
            "Returning the all-compute schedule: raise max_error or calibrate with more samples",
            max_error,
            min((p["error"] for p in probes), default=float("nan")),
        )
    speedup = profile.estimated_speedup(chosen) if profile.total_flops else None
    return TuneResult(chosen.with_planned(max_error=max_error), chosen_error, max_error, speedup, probes)
