"""Schedules that travel: a profile calibrated at one step count, resampled to another.

The error of reusing an output depends on where in the denoising it happens and how far it is
carried, both measured in the scheduler's own timesteps. Calibrating at N steps measures that
error at the N timesteps ``x_s`` for spans ``x_s - x_{s+k}``, ``k = 1..lookahead``. For a target
step ``j`` carried ``k'`` steps, the error is read off those measurements: interpolated along the
timestep, then along the span (zero error at zero span). A span longer than any measured there is
left unmeasured (NaN), so the solvers never reuse that far: extrapolating errors would be a guess.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import ProfileError

__all__ = ["resample_curves", "resample_step_weights", "uniform_positions"]


def uniform_positions(num_steps: int) -> np.ndarray:
    """Stand-in timesteps when none were recorded: evenly spaced, falling from 1 to ``1 / num_steps``."""
    return 1.0 - np.arange(num_steps) / num_steps


def resample_curves(curves: np.ndarray, source: Sequence[float], target: Sequence[float]) -> np.ndarray:
    """``(lookahead, len(source))`` curves at timesteps ``source`` -> ``(lookahead, len(target))`` at ``target``.

    Timesteps may rise or fall, but must be monotone in both lists.
    """
    curves = np.asarray(curves, dtype=np.float64)
    x, y = _falling(source), _falling(target)
    lookahead, n = curves.shape
    if len(x) != n:
        raise ProfileError(f"{n} steps of curves but {len(x)} source timesteps")
    m = len(y)
    out = np.full((lookahead, m), np.nan)
    # spans[k-1, s] = x_s - x_{s+k}: how far (in timesteps) lookahead k carries an output from step s
    spans = np.full((lookahead, n), np.nan)
    for k in range(1, lookahead + 1):
        spans[k - 1, : n - k] = x[: n - k] - x[k:]
    for j in range(m):
        here = _at(y[j], x, spans), _at(y[j], x, curves)  # (lookahead,) spans and errors measured near y_j
        known = np.isfinite(here[0]) & np.isfinite(here[1])
        if not known.any():
            continue
        span_points = np.concatenate([[0.0], here[0][known]])
        error_points = np.concatenate([[0.0], here[1][known]])
        order = np.argsort(span_points)
        span_points, error_points = span_points[order], error_points[order]
        for k in range(1, lookahead + 1):
            if j + k >= m:
                break
            span = y[j] - y[j + k]
            if span <= span_points[-1] * (1 + 1e-9):
                out[k - 1, j] = np.interp(span, span_points, error_points)
    return out


def resample_step_weights(weights: Sequence[float], source: Sequence[float], target: Sequence[float]) -> np.ndarray:
    """The steps' sensitivities (``step_weights.py``) at timesteps ``target``, scaled to at most 1.

    Interpolated along the timestep over every step but the last, which is set apart: it lands on
    the clean sample, so its sensitivity is of another kind (DDIM's last step barely moves the
    sample) and carries over as it is, to the target's last step.
    """
    weights = np.asarray(weights, dtype=np.float64)
    x, y = _falling(source), _falling(target)
    if len(weights) != len(x):
        raise ProfileError(f"{len(weights)} step weights but {len(x)} source timesteps")
    inner = np.interp(-y[:-1], -x[:-1], weights[:-1]) if len(x) > 1 else np.array([])  # rising axis for np.interp
    resampled = np.append(inner, weights[-1])
    return resampled / resampled.max()


def _falling(timesteps: Sequence[float]) -> np.ndarray:
    values = np.asarray(timesteps, dtype=np.float64)
    if len(values) < 2:
        raise ProfileError("Resampling needs at least 2 timesteps")
    steps = np.diff(values)
    if np.all(steps < 0):
        return values
    if np.all(steps > 0):
        return -values
    raise ProfileError("Timesteps must rise or fall monotonically to be resampled")


def _at(position: float, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Each row interpolated (linearly, over its finite entries) at ``position`` on the falling axis ``x``."""
    values = np.full(rows.shape[0], np.nan)
    for k, row in enumerate(rows):
        finite = np.isfinite(row)
        if finite.sum() == 0:
            continue
        xs, ys = x[finite][::-1], row[finite][::-1]  # np.interp wants rising x
        if position < xs[0] - _reach(x) or position > xs[-1] + _reach(x):
            continue  # outside the measured range by more than a step
        values[k] = np.interp(position, xs, ys)
    return values


def _reach(x: np.ndarray) -> float:
    return float(np.max(np.abs(np.diff(x))))
