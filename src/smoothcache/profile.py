"""CalibrationProfile: the error curves one calibration recorded, with the metadata to trust them.

The profile keeps the raw per-layer, per-step curves of every calibration call, so schedules for
any threshold or budget come from it without running the model again.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from .errors import ProfileError
from .files import atomic_write_text, read_json, shown, strict_json
from .keys import Key, key_for
from .resampling import resample_curves, resample_step_weights, uniform_positions
from .schedule import Schedule
from .solvers import Forecast, Solver, SolverProblem, solve, solver_problem

__all__ = ["CalibrationProfile", "LayerInfo"]

logger = logging.getLogger(__name__)

FORMAT = "smoothcache.profile"
FORMAT_VERSION = 1

@dataclass(frozen=True)
class LayerInfo:
    """One calibrated layer: its module path, its type key, its block index and its cost per model call."""

    name: str
    layer_type: str
    block: int | None
    flops: float | None = None

    @property
    def block_key(self) -> str:
        """The per-block schedule key, e.g. ``"attn1-3"`` (the type key when the block is unknown)."""
        return str(Key(self.layer_type, self.block))


@dataclass
class CalibrationProfile:
    """Relative L1 errors per calibration run, layer, lookahead and step.

    ``errors[r, l, k - 1, s]`` is ``||y_{s+k} - y_s||_1 / ||y_{s+k}||_1`` for layer ``l`` in run
    ``r``: the error of reusing step ``s``'s output ``k`` steps later. Entries with
    ``s + k >= num_steps`` are NaN.

    ``forecast_errors[r, l, g - 1, k - 1, s]``, recorded by ``calibration(..., forecast="linear")``,
    is the error of predicting step ``s + k`` by extrapolating from steps ``s`` and ``s - g``.
    """

    layers: list[LayerInfo]
    errors: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)
    total_flops: float | None = None
    forecast_errors: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.errors = np.asarray(self.errors, dtype=np.float64)
        if self.errors.ndim != 4:
            raise ProfileError(f"errors must have shape (runs, layers, lookahead, steps), got {self.errors.shape}")
        if self.errors.shape[0] < 1:
            raise ProfileError("The profile holds no calibration run; run the pipeline at least once while calibrating")
        if self.errors.shape[1] != len(self.layers):
            raise ProfileError(f"errors cover {self.errors.shape[1]} layers but {len(self.layers)} are listed")
        if self.lookahead < 1 or self.num_steps < 2:
            raise ProfileError(f"A profile needs lookahead >= 1 and >= 2 steps, got {self.lookahead} and {self.num_steps}")
        if self.forecast_errors is not None:
            self.forecast_errors = np.asarray(self.forecast_errors, dtype=np.float64)
            runs, layers, lookahead, steps = self.errors.shape
            shape = self.forecast_errors.shape
            if len(shape) != 5 or shape[:2] != (runs, layers) or shape[3:] != (lookahead, steps) or shape[2] < lookahead + 1:
                raise ProfileError(
                    f"forecast_errors must have shape ({runs}, {layers}, gaps >= {lookahead + 1}, {lookahead}, {steps}) "
                    f"to match the errors, got {shape}"
                )

    # ---- shape ------------------------------------------------------------------------------
    @property
    def num_runs(self) -> int:
        return self.errors.shape[0]

    @property
    def lookahead(self) -> int:
        return self.errors.shape[2]

    @property
    def num_steps(self) -> int:
        return self.errors.shape[3]

    @property
    def step_weights(self) -> np.ndarray | None:
        """Each step's sensitivity (see :mod:`smoothcache.step_weights`), where calibration measured it."""
        weights = self.metadata.get("step_weights")
        if weights is None or len(weights) != self.num_steps:
            return None
        return np.asarray(weights, dtype=np.float64)

    def keys(self, per_block: bool = False, branches: bool = False) -> list[str]:
        """Schedule keys in the model's order: layer types, or one key per block's layer.

        Guidance-aware profiles also hold each layer's conditional and unconditional halves
        (``"attn1@uncond"``, see :mod:`smoothcache.guidance`); ``branches=True`` gives those keys
        instead of the whole-batch ones.
        """
        names = [
            layer.block_key if per_block else layer.layer_type
            for layer in self.layers
            if ("@" in layer.layer_type) == branches
        ]
        return list(dict.fromkeys(names))

    # ---- curves -----------------------------------------------------------------------------
    def mean_errors(self) -> np.ndarray:
        """``(layers, lookahead, steps)``: the mean over the calibration runs that measured each layer
        (all of them, unless calibrated with ``layer_groups``)."""
        return _mean_over_runs(self.errors)

    def curves(self, key: str) -> np.ndarray:
        """``(lookahead, steps)`` curves for a type key (mean over its blocks) or a per-block key."""
        return self._mean_over_rows(self.mean_errors(), key)

    def forecast_curves(self, key: str) -> np.ndarray:
        """``(gaps, lookahead, steps)``: as :meth:`curves`, for the errors of extrapolating (see the class)."""
        if self.forecast_errors is None:
            raise ProfileError(
                "This profile has no forecast errors: calibrate with forecast='linear' "
                "(smoothcache calibrate --forecast linear) to plan schedules for forecasting"
            )
        return self._mean_over_rows(_mean_over_runs(self.forecast_errors), key)

    def _mean_over_rows(self, per_layer: np.ndarray, key: str) -> np.ndarray:
        rows = [i for i, layer in enumerate(self.layers) if key in (layer.layer_type, layer.block_key)]
        if not rows:
            raise ProfileError(f"The profile has no layer for key {key!r}; it has {self.keys()} and {self.keys(True)}")
        per_type = [i for i in rows if self.layers[i].layer_type == key]
        rows = per_type or rows
        with warnings.catch_warnings():  # a step no layer of the key measured stays NaN: compute there
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(per_layer[rows], axis=0)

    def curves_by_key(self, keys: Sequence[str] | None = None, per_block: bool = False) -> dict[str, np.ndarray]:
        keys = list(keys) if keys is not None else self.keys(per_block)
        return {key: self.curves(key) for key in keys}

    def forecast_curves_by_key(self, keys: Sequence[str] | None = None, per_block: bool = False) -> dict[str, np.ndarray]:
        keys = list(keys) if keys is not None else self.keys(per_block)
        return {key: self.forecast_curves(key) for key in keys}

    def key_costs(self, per_block: bool = False) -> dict[str, float]:
        """FLOPs per model call of all layers each key governs (needs costs recorded at calibration)."""
        if self.total_flops is None or any(layer.flops is None for layer in self.layers):
            raise ProfileError(
                "This profile has no measured layer costs; recalibrate with measure_flops=True "
                "or give the budget as compute_fraction"
            )
        costs: dict[str, float] = {}
        for layer in self.layers:
            key = layer.block_key if per_block else layer.layer_type
            costs[key] = costs.get(key, 0.0) + float(layer.flops or 0.0)
        return costs

    # few-step sampling: below this many steps a reused output stands in for a large share of the
    # trajectory (distilled and turbo-style models run 1-8)
    FEW_STEPS = 8

    def outlook(self) -> str | None:
        """Where caching can hardly pay, why and which schedules still gain: a few-step profile's
        adjacent-step changes and the most any schedule can skip; None for ordinary step counts."""
        if self.num_steps > self.FEW_STEPS:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            adjacent = float(np.nanmean(self.mean_errors()[:, 0, :]))
        greedy = self.schedule(alpha=0.18)
        fewest = min(_fewest_computes(self.num_steps, self.lookahead), self.num_steps)
        return (
            f"{self.num_steps} steps: a few-step sampler, where adjacent steps' outputs differ by {adjacent:.0%} on "
            f"average (rel-L1), so every reuse replaces a large change. The paper's alpha=0.18 computes "
            f"{greedy.compute_fraction():.0%} of the layer calls; at most {1 - fewest / self.num_steps:.0%} of a "
            "layer's steps can reuse within the lookahead. Schedules that still gain reuse only where the error is "
            "small: measure them (smoothcache tune --max-error, or smoothcache bench) before relying on them"
        )

    # ---- schedules --------------------------------------------------------------------------
    def schedule(
        self,
        alpha: float | None = None,
        *,
        compute_fraction: float | None = None,
        speedup: float | None = None,
        keys: Sequence[str] | None = None,
        per_block: bool = False,
        solver: Solver | None = None,
        forecast: Forecast = "none",
        weigh_steps: bool = True,
    ) -> Schedule:
        """A schedule at threshold ``alpha`` (greedy only), or the best one within a budget.

        ``compute_fraction`` bounds the fraction of cached-layer calls computed; ``speedup`` asks
        for at least that ideal speedup from the measured FLOPs. Give exactly one of the three.
        ``solver="greedy"`` is the paper's rule (for a budget: at the smallest threshold meeting
        it); ``solver="optimal"`` spends the budget where the summed reuse error falls most (see
        ``solvers.optimal_schedule``). By default a threshold uses the greedy rule and a budget the
        optimal solver, which gave better FID and PSNR at every budget on the demo model
        (``docs/solvers/``). With ``per_block=True`` each block's layers get their own plan, so
        sensitive blocks compute more often under the same global budget; ``solver="per-block"``
        is the optimal solver with ``per_block=True``. Where calibration measured the steps'
        sensitivity, the optimal solver weighs each step's error by it and may reuse at the last
        step (``weigh_steps=False``: plain summed errors, last step computed). ``forecast="linear"`` plans for
        ``cache(..., forecast="linear")``: the optimal solver minimises the errors of extrapolating
        instead of reusing (the profile must have been calibrated with ``forecast="linear"``).

        >>> profile.schedule(alpha=0.18)                                   # doctest: +SKIP
        >>> profile.schedule(compute_fraction=0.5, solver="optimal")       # doctest: +SKIP
        >>> profile.schedule(compute_fraction=0.4, forecast="linear")      # doctest: +SKIP
        """
        return self.schedule_and_threshold(
            alpha,
            compute_fraction=compute_fraction,
            speedup=speedup,
            keys=keys,
            per_block=per_block,
            solver=solver,
            forecast=forecast,
            weigh_steps=weigh_steps,
        )[0]

    def schedule_and_threshold(
        self,
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
        """As :meth:`schedule`, also returning the greedy threshold used (None for the optimal solver)."""
        return solve(self, alpha, compute_fraction=compute_fraction, speedup=speedup, keys=keys, per_block=per_block,
                     solver=solver, forecast=forecast, weigh_steps=weigh_steps)

    def solver_problem(
        self, keys: Sequence[str] | None = None, per_block: bool = False, forecast: Forecast = "none", weigh_steps: bool = True
    ) -> SolverProblem:
        """What the optimal solver minimises for these keys (see :func:`.solvers.solver_problem`)."""
        return solver_problem(self, keys, per_block, forecast, weigh_steps)

    def estimated_speedup(self, schedule: Schedule) -> float:
        """Ideal speedup of ``schedule`` on the calibrated model, from the FLOPs it skips.

        Each layer counts under the key that governs it (a per-block key before its type key).
        """
        self.key_costs()  # raises if this profile has no measured costs
        total = float(self.total_flops or 0.0)
        saved = 0.0
        for layer in self.layers:
            key = key_for(schedule.plans, layer.layer_type, layer.block)
            if key is not None:
                saved += float(layer.flops or 0.0) * (1.0 - schedule.compute_fraction(key))
        return math.inf if saved >= total else total / (total - saved)

    def resample(self, num_steps: int, timesteps: Sequence[float] | None = None) -> CalibrationProfile:
        """This profile as if calibrated at ``num_steps``, from the curves it has (see :mod:`.resampling`).

        ``timesteps`` are the target scheduler's (``scheduler.set_timesteps(num_steps)`` then
        ``scheduler.timesteps``); without them, or without timesteps recorded in the profile, steps are
        placed evenly over the same denoising range.

        >>> profile50 = profile20.resample(50, timesteps=pipe.scheduler.timesteps)   # doctest: +SKIP
        """
        if num_steps < 2:
            raise ProfileError(f"num_steps must be >= 2, got {num_steps}")
        recorded = self.metadata.get("timesteps")
        if timesteps is not None and recorded is not None and len(recorded) == self.num_steps:
            source, target = np.asarray(recorded, dtype=np.float64), np.asarray(timesteps, dtype=np.float64)
            if len(target) != num_steps:
                raise ProfileError(f"Got {len(target)} target timesteps for num_steps={num_steps}")
        else:
            source, target = uniform_positions(self.num_steps), uniform_positions(num_steps)
        errors = np.stack([np.stack([resample_curves(layer, source, target) for layer in run]) for run in self.errors])
        metadata = dict(self.metadata)
        metadata.update(
            num_steps=num_steps,
            resampled_from={"num_steps": self.num_steps, "timesteps": recorded},
            timesteps=[float(t) for t in target] if timesteps is not None else None,
        )
        if self.step_weights is not None:
            metadata["step_weights"] = [round(float(w), 6) for w in resample_step_weights(self.step_weights, source, target)]
        if self.forecast_errors is not None:
            # a gap of g steps spans another stretch of the trajectory at another step count
            logger.warning("Resampling drops the profile's forecast errors; calibrate at %d steps to plan forecasting", num_steps)
            metadata["forecast"] = "none"
        return CalibrationProfile(self.layers, errors, metadata, self.total_flops)

    def check_compatible(self, model: Any, num_steps: int | None = None) -> None:
        """Raise :class:`ProfileError` unless ``model`` has the calibrated layers and runs ``num_steps``.

        ``model`` is an ``nn.Module`` or a pipeline (both experts of a two-expert pipeline count).
        """
        from .steps import (
            resolve_target,  # the step module knows how pipelines hold their models
        )

        model = resolve_target(model).model
        names = {name for name, _ in model.named_modules()}
        # a guidance-aware profile's branch entries ("blocks.0.attn1@cond") name the same module
        missing = [layer.name for layer in self.layers if layer.name.partition("@")[0] not in names]
        recorded = self.metadata.get("model_class")
        if missing:
            raise ProfileError(
                f"This profile was calibrated on {recorded or 'another model'}; {type(model).__name__} lacks "
                f"{len(missing)} of its {len(self.layers)} layers (e.g. {missing[0]}). Calibrate this model"
            )
        if num_steps is not None and num_steps != self.num_steps:
            raise ProfileError(
                f"The profile was calibrated for {self.num_steps} steps but {num_steps} were asked for; "
                f"calibrate again with {num_steps} steps"
            )

    # ---- combining --------------------------------------------------------------------------
    @classmethod
    def merge(cls, profiles: Sequence[CalibrationProfile]) -> CalibrationProfile:
        """One profile holding the runs of several calibrations of the same model and steps."""
        if not profiles:
            raise ProfileError("Nothing to merge")
        first = profiles[0]
        for other in profiles[1:]:
            if [layer.name for layer in other.layers] != [layer.name for layer in first.layers]:
                raise ProfileError("Cannot merge profiles of different models: their calibrated layers differ")
            if other.errors.shape[2:] != first.errors.shape[2:]:
                raise ProfileError(
                    f"Cannot merge profiles of {first.num_steps} and {other.num_steps} steps "
                    f"(lookahead {first.lookahead} and {other.lookahead})"
                )
        metadata = dict(first.metadata)
        labels: list[Any] = []
        for profile in profiles:  # each calibration numbered its own calls from 0: continue the count
            for label in profile.metadata.get("run_labels", [None] * profile.num_runs):
                default = isinstance(label, str) and label.startswith("call ") and label[5:].isdigit()
                labels.append(f"call {len(labels)}" if default or label is None else label)
        metadata.update(run_labels=labels, num_runs=len(labels))
        forecasts = None
        if all(p.forecast_errors is not None and p.forecast_errors.shape[2:] == first.forecast_errors.shape[2:] for p in profiles):  # type: ignore[union-attr]
            forecasts = np.concatenate([p.forecast_errors for p in profiles])  # type: ignore[misc]
        elif any(p.forecast_errors is not None for p in profiles):
            logger.warning("Not every merged profile has forecast errors (calibrated with forecast='linear'): the merge has none")
            metadata["forecast"] = "none"
        weights = [p.step_weights for p in profiles]
        if all(w is not None for w in weights):  # each profile's are scaled to at most 1: a run-weighted mean of those
            mean = np.average(np.stack(weights), axis=0, weights=[p.num_runs for p in profiles])  # type: ignore[arg-type]
            metadata["step_weights"] = [round(float(v), 6) for v in mean / mean.max()]
        else:
            metadata.pop("step_weights", None)
        errors = np.concatenate([p.errors for p in profiles])
        return cls(first.layers, errors, metadata, first.total_flops, forecasts)

    # ---- files ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The file's layout in plain JSON values; NaN (a step never measured) and infinities become None."""

        def trimmed(curves: np.ndarray) -> list[list[float | None]]:
            return [strict_json(curves[k, : self.num_steps - k - 1].tolist()) for k in range(self.lookahead)]

        layers = [
            {"name": layer.name, "layer_type": layer.layer_type, "block": layer.block, "flops": strict_json(layer.flops)}
            for layer in self.layers
        ]
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "lookahead": self.lookahead,
            "num_steps": self.num_steps,
            "total_flops": strict_json(self.total_flops),
            "metadata": strict_json(self.metadata),
            "layers": layers,
            "curve_layout": "errors[k-1][s] = rel-L1 between the outputs at step s+k and step s, over ||y_(s+k)||_1",
            "runs": [{layer.name: trimmed(run[i]) for i, layer in enumerate(self.layers)} for run in self.errors],
            "mean": {layer.name: trimmed(curves) for layer, curves in zip(self.layers, self.mean_errors(), strict=True)},
            **self._forecasts_dict(),
        }

    def _forecasts_dict(self) -> dict[str, Any]:
        if self.forecast_errors is None:
            return {}

        def trimmed(forecasts: np.ndarray) -> list[list[list[float | None]]]:  # the measured steps s = g .. num_steps - k - 1
            return [
                [strict_json(forecasts[g, k, g + 1 : self.num_steps - k - 1].tolist()) for k in range(self.lookahead)]
                for g in range(forecasts.shape[0])
            ]

        return {
            "forecast_layout": (
                "forecast[g-1][k-1][i] = rel-L1 between the output at step s+k and its linear extrapolation from "
                "steps s and s-g, for s = g+i, over ||y_(s+k)||_1"
            ),
            "forecast_runs": [{layer.name: trimmed(run[i]) for i, layer in enumerate(self.layers)} for run in self.forecast_errors],
        }

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as strict JSON (null, never NaN) atomically (see :mod:`.files`)."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> CalibrationProfile:
        """Build from :meth:`to_dict`'s layout; anything else raises :class:`ProfileError` naming ``source``.

        Every list's length is checked against ``lookahead`` and ``num_steps`` before an array is
        made, so a small file that claims a huge profile is refused instead of allocated. Files
        written before profiles were strict JSON (``NaN`` where a step was never measured) still load.
        """
        where = f" {source}" if source else ""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ProfileError(
                f"Profile{where} is not a smoothcache calibration profile (no \"format\": \"{FORMAT}\"); "
                "schedules load with Schedule.load"
            )
        if data.get("format_version") != FORMAT_VERSION:
            raise ProfileError(
                f"Profile{where} has format_version {shown(data.get('format_version'))}, this smoothcache reads {FORMAT_VERSION}"
            )
        try:
            parts = _profile_parts(data, where)
        except ProfileError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, OverflowError, RecursionError) as exc:  # a case no check foresaw
            raise ProfileError(f"Profile{where} is malformed: {type(exc).__name__}: {shown(str(exc))}") from exc
        try:
            return cls(*parts)
        except ProfileError as exc:
            raise ProfileError(f"Profile{where}: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> CalibrationProfile:
        """Read a profile JSON file; errors name the file and what is wrong with it."""
        path = Path(path)
        return cls.from_dict(read_json(path, ProfileError, "profile"), source=str(path))


# ---- reading a profile file: every check before any array is made ---------------------------
def _profile_parts(data: dict[str, Any], where: str) -> tuple[list[LayerInfo], np.ndarray, dict[str, Any], Any, np.ndarray | None]:
    """The constructor's arguments from a profile file's object, checked."""
    layers = _layers_from(data.get("layers"), where)
    names = [layer.name for layer in layers]
    num_steps = _whole(data.get("num_steps"), "num_steps", 2, where)
    lookahead = _whole(data.get("lookahead"), "lookahead", 1, where)
    if lookahead >= num_steps:
        raise _problem(where, f"lookahead {shown(lookahead)} reaches past the last of {shown(num_steps)} steps; it must be less")
    runs = data.get("runs")
    if not isinstance(runs, list) or not runs:
        raise _problem(where, f"\"runs\" must be a non-empty list of calibration runs, got {shown(runs)}")
    curves = [
        [
            _rows(rows, lookahead, lambda k: num_steps - k - 1, 0, f"layer {name!r} in run {r}", where)
            for name, rows in _per_layer(run, names, f"run {r}", where)
        ]
        for r, run in enumerate(runs)
    ]
    metadata = _metadata_from(data.get("metadata"), num_steps, where)
    total_flops = data.get("total_flops")
    if total_flops is not None and not _is_cost(total_flops):
        raise _problem(where, f"total_flops is {shown(total_flops)}; expected a finite number >= 0, or null")
    forecasts = _forecasts_from(data.get("forecast_runs"), names, len(runs), lookahead, num_steps, where)
    errors = np.full((len(runs), len(layers), lookahead, num_steps), np.nan)
    for r, per_layer in enumerate(curves):
        for i, rows in enumerate(per_layer):
            for k, row in enumerate(rows):
                errors[r, i, k, : len(row)] = row
    return layers, errors, metadata, total_flops, forecasts


def _forecasts_from(
    runs: Any, names: list[str], num_runs: int, lookahead: int, num_steps: int, where: str
) -> np.ndarray | None:
    """The ``forecast_runs`` of a profile file as an array (None where the file has none)."""
    if runs is None:
        return None
    if not isinstance(runs, list) or len(runs) != num_runs:
        raise _problem(where, f"\"forecast_runs\" must be a list of {num_runs} runs, as \"runs\" is, got {shown(runs)}")
    first = runs[0].get(names[0]) if isinstance(runs[0], dict) else None
    gaps = len(first) if isinstance(first, list) else 0
    # the recorder writes lookahead + 1 gaps; past num_steps a gap has no step to measure
    if not lookahead + 1 <= gaps <= num_steps:
        raise _problem(
            where, f"layer {names[0]!r} in forecast run 0 has {gaps} gaps; expected {lookahead + 1} to {num_steps} "
            f"for lookahead {lookahead} and {num_steps} steps"
        )
    checked = []
    for r, run in enumerate(runs):
        per_layer = []
        for name, per_gap in _per_layer(run, names, f"forecast run {r}", where):
            place = f"layer {name!r} in forecast run {r}"
            if not isinstance(per_gap, list) or len(per_gap) != gaps:
                raise _problem(where, f"{place} must be a list of {gaps} gaps, got {shown(per_gap)}")
            per_layer.append([
                _rows(rows, lookahead, lambda k, g=g: max(0, num_steps - k - g - 2), g + 1, f"{place}, gap {g + 1}", where)
                for g, rows in enumerate(per_gap)
            ])
        checked.append(per_layer)
    forecasts = np.full((num_runs, len(names), gaps, lookahead, num_steps), np.nan)
    for r, per_layer in enumerate(checked):
        for i, per_gap in enumerate(per_layer):
            for g, rows in enumerate(per_gap):
                for k, row in enumerate(rows):
                    forecasts[r, i, g, k, g + 1 : g + 1 + len(row)] = row
    return forecasts


def _layers_from(entries: Any, where: str) -> list[LayerInfo]:
    if not isinstance(entries, list) or not entries:
        raise _problem(where, f"\"layers\" must be a non-empty list of layer objects, got {shown(entries)}")
    layers: list[LayerInfo] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise _problem(where, f"layer {i} must be an object with name, layer_type, block and flops, got {shown(entry)}")
        name, layer_type, block, flops = (entry.get(field) for field in ("name", "layer_type", "block", "flops"))
        if not isinstance(name, str) or not name:
            raise _problem(where, f"layer {i} has name {shown(name)}; expected its module path, e.g. \"blocks.0.attn1\"")
        if name in seen:
            raise _problem(where, f"layer {name!r} is listed twice; each calibrated layer appears once")
        seen.add(name)
        if not isinstance(layer_type, str) or not layer_type:
            raise _problem(where, f"layer {name!r} has layer_type {shown(layer_type)}; expected a type key like \"attn1\"")
        if block is not None and (type(block) is not int or block < 0):
            raise _problem(where, f"layer {name!r} has block {shown(block)}; expected a block index >= 0, or null")
        if flops is not None and not _is_cost(flops):
            raise _problem(where, f"layer {name!r} has flops {shown(flops)}; expected a finite number >= 0, or null")
        layers.append(LayerInfo(name, layer_type, block, flops))
    return layers


def _per_layer(run: Any, names: list[str], place: str, where: str) -> list[tuple[str, Any]]:
    """A run's ``{layer name: curves}`` in the order of ``layers``, which it must match exactly."""
    if not isinstance(run, dict):
        raise _problem(where, f"{place} must be an object of layer name -> curves, got {shown(run)}")
    missing = [name for name in names if name not in run]
    if missing:
        raise _problem(where, f"{place} has no curves for layer {missing[0]!r} ({len(missing)} of the {len(names)} layers)")
    if len(run) != len(names):
        extra = next(key for key in run if key not in set(names))
        raise _problem(where, f"{place} has curves for {shown(extra)}, which \"layers\" does not list")
    return [(name, run[name]) for name in names]


def _rows(
    rows: Any, lookahead: int, length: Callable[[int], int], first_step: int, place: str, where: str
) -> list[list[float]]:
    """One layer's ``lookahead`` rows of errors, row k of ``length(k)`` values; null and NaN (never measured) become NaN.

    The counts claimed are only compared with lists present, never used to size anything here.
    """
    if not isinstance(rows, list) or len(rows) != lookahead:
        count = len(rows) if isinstance(rows, list) else shown(rows)
        raise _problem(where, f"{place} has {count} lookahead rows, expected {shown(lookahead)}")
    checked: list[list[float]] = []
    for k, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != length(k):
            count = len(row) if isinstance(row, list) else shown(row)
            raise _problem(where, f"{place}, lookahead {k + 1} has {count} values, expected {shown(length(k))}")
        values = [math.nan if value is None else _real(value) for value in row]
        for s, value in enumerate(values):
            if value is None or value < 0 or value == math.inf:  # NaN passes: a step the layer never ran
                raise _problem(
                    where, f"{place}, lookahead {k + 1} has {shown(row[s])} at step {first_step + s}; "
                    "errors are finite numbers >= 0, or null where the layer never ran"
                )
        checked.append(cast(list[float], values))  # every None was refused above
    return checked


def _metadata_from(metadata: Any, num_steps: int, where: str) -> dict[str, Any]:
    """The metadata object, with the entries smoothcache reads checked."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise _problem(where, f"\"metadata\" must be an object, got {shown(metadata)}")
    weights = metadata.get("step_weights")
    if weights is not None and not (isinstance(weights, list) and len(weights) == num_steps and all(map(_is_cost, weights))):
        raise _problem(where, f"metadata step_weights must be {num_steps} finite numbers >= 0 (one per step), or null; got {shown(weights)}")
    timesteps = metadata.get("timesteps")
    if timesteps is not None and not (isinstance(timesteps, list) and all(_is_finite(t) for t in timesteps)):
        raise _problem(where, f"metadata timesteps must be a list of finite numbers, or null; got {shown(timesteps)}")
    config = metadata.get("scheduler_config")
    if config is not None and not isinstance(config, dict):
        raise _problem(where, f"metadata scheduler_config must be an object (the scheduler's config), or null; got {shown(config)}")
    if "run_labels" in metadata and not isinstance(metadata["run_labels"], list):
        raise _problem(where, f"metadata run_labels must be a list of one label per run; got {shown(metadata['run_labels'])}")
    return dict(metadata)


def _whole(value: Any, name: str, least: int, where: str) -> int:
    if type(value) is not int or value < least:
        raise _problem(where, f"{name} must be a whole number >= {least}, got {shown(value)}")
    return value


def _real(value: Any) -> float | None:
    """``value`` as a float if it is a number (NaN and infinities included), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:  # an integer beyond any float
        return None


def _is_finite(value: Any) -> bool:
    number = _real(value)
    return number is not None and math.isfinite(number)


def _is_cost(value: Any) -> bool:
    return _is_finite(value) and value >= 0


def _problem(where: str, what: str) -> ProfileError:
    return ProfileError(f"Profile{where}: {what}")


def _fewest_computes(num_steps: int, lookahead: int) -> int:
    """The fewest computed steps a plan of ``num_steps`` can have when a kept output serves at most
    ``lookahead`` later steps (the first step always computes)."""
    return -(-num_steps // (lookahead + 1))


def _mean_over_runs(errors: np.ndarray) -> np.ndarray:
    """The mean over axis 0 (runs), NaN where no run measured an entry (the last lookahead steps; a
    layer another group measured, with ``layer_groups``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN entries stay NaN
        return np.nanmean(errors, axis=0)
