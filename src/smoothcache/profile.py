"""CalibrationProfile: the error curves one calibration recorded, with the metadata to trust them.

The profile keeps the raw per-layer, per-step curves of every calibration call, so schedules for
any threshold or budget come from it without running the model again.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ProfileError
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
        """``(layers, lookahead, steps)``: the mean over calibration runs."""
        return self.errors.mean(axis=0)

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
        return self._mean_over_rows(self.forecast_errors.mean(axis=0), key)

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
        def trimmed(curves: np.ndarray) -> list[list[float]]:
            return [[float(v) for v in curves[k, : self.num_steps - k - 1]] for k in range(self.lookahead)]

        layers = [
            {"name": layer.name, "layer_type": layer.layer_type, "block": layer.block, "flops": layer.flops} for layer in self.layers
        ]
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "lookahead": self.lookahead,
            "num_steps": self.num_steps,
            "total_flops": self.total_flops,
            "metadata": self.metadata,
            "layers": layers,
            "curve_layout": "errors[k-1][s] = rel-L1 between the outputs at step s+k and step s, over ||y_(s+k)||_1",
            "runs": [{layer.name: trimmed(run[i]) for i, layer in enumerate(self.layers)} for run in self.errors],
            "mean": {layer.name: trimmed(curves) for layer, curves in zip(self.layers, self.mean_errors(), strict=True)},
            **self._forecasts_dict(),
        }

    def _forecasts_dict(self) -> dict[str, Any]:
        if self.forecast_errors is None:
            return {}

        def trimmed(forecasts: np.ndarray) -> list[list[list[float]]]:  # the measured steps s = g .. num_steps - k - 1
            return [
                [[float(v) for v in forecasts[g, k, g + 1 : self.num_steps - k - 1]] for k in range(self.lookahead)]
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
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> CalibrationProfile:
        where = f" {source}" if source else ""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ProfileError(
                f"Profile{where} is not a smoothcache calibration profile (no \"format\": \"{FORMAT}\"); "
                "schedules load with Schedule.load"
            )
        if data.get("format_version") != FORMAT_VERSION:
            raise ProfileError(f"Profile{where} has format_version {data.get('format_version')}, this smoothcache reads {FORMAT_VERSION}")
        try:
            layers = [LayerInfo(x["name"], x["layer_type"], x["block"], x.get("flops")) for x in data["layers"]]
            lookahead, num_steps = int(data["lookahead"]), int(data["num_steps"])
            errors = np.full((len(data["runs"]), len(layers), lookahead, num_steps), np.nan)
            for r, run in enumerate(data["runs"]):
                for i, layer in enumerate(layers):
                    rows = run[layer.name]
                    if len(rows) != lookahead:
                        raise ProfileError(f"Profile{where}: layer {layer.name} has {len(rows)} lookahead rows, expected {lookahead}")
                    for k, row in enumerate(rows):
                        if len(row) != num_steps - k - 1:
                            raise ProfileError(
                                f"Profile{where}: layer {layer.name}, lookahead {k + 1} has {len(row)} values, "
                                f"expected {num_steps - k - 1} for {num_steps} steps"
                            )
                        errors[r, i, k, : len(row)] = row
            forecasts = _forecasts_from(data.get("forecast_runs"), layers, lookahead, num_steps, where)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ProfileError):
                raise
            raise ProfileError(f"Profile{where} is malformed: {type(exc).__name__}: {exc}") from exc
        return cls(layers, errors, dict(data.get("metadata") or {}), data.get("total_flops"), forecasts)

    @classmethod
    def load(cls, path: str | Path) -> CalibrationProfile:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise ProfileError(f"Cannot read profile file {path}: {exc.strerror or exc}") from exc
        except json.JSONDecodeError as exc:
            raise ProfileError(f"Profile file {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
        return cls.from_dict(data, source=str(path))


def _forecasts_from(runs: Any, layers: Sequence[LayerInfo], lookahead: int, num_steps: int, where: str) -> np.ndarray | None:
    """The ``forecast_runs`` of a profile file as an array (None where the file has none)."""
    if runs is None:
        return None
    gaps = len(runs[0][layers[0].name]) if runs else 0
    forecasts = np.full((len(runs), len(layers), gaps, lookahead, num_steps), np.nan)
    for r, run in enumerate(runs):
        for i, layer in enumerate(layers):
            per_gap = run[layer.name]
            if len(per_gap) != gaps or any(len(rows) != lookahead for rows in per_gap):
                raise ProfileError(f"Profile{where}: layer {layer.name} has forecast rows of another shape than {gaps}x{lookahead}")
            for g, rows in enumerate(per_gap):
                for k, row in enumerate(rows):
                    expected = max(0, num_steps - k - g - 2)
                    if len(row) != expected:
                        raise ProfileError(
                            f"Profile{where}: layer {layer.name}, forecast gap {g + 1} lookahead {k + 1} has {len(row)} "
                            f"values, expected {expected} for {num_steps} steps"
                        )
                    forecasts[r, i, g, k, g + 1 : g + 1 + len(row)] = row
    return forecasts
