"""The recorder: measures, during ordinary pipeline calls, how much each layer's output changes
between steps ``s`` and ``s + k`` for ``k = 1..lookahead``.

Errors accumulate on the model's device and are copied to the host once, when recording stops.
Each layer keeps only its last ``lookahead`` outputs per call slot and occurrence (copies in the model's dtype,
as the model may reuse its buffers). A step's error is the mean over the calls that measured it;
where a layer measured nothing (its expert or its call did not run), the error is NaN.

With ``forecast="linear"`` it also measures the error of predicting step ``s + k`` by extrapolating
linearly from steps ``s`` and ``s - g`` (what a reusing step computes under
``cache(..., forecast="linear")``), for gaps ``g = 1..lookahead + 1``; each layer then keeps its
last ``2 * lookahead + 1`` outputs.

At the first call of a generation's second step the rings hold exactly one step's outputs, so the
generation's peak is known before it is reached (and again where a call slot first appears later):
it is logged, and on CUDA a history that the device cannot hold is refused then
(:class:`~smoothcache.errors.CalibrationMemoryError`, with the ``layer_groups`` that would fit), not
an out-of-memory error steps later. It counts the history only: the model's own activations need
room too, so a card nearly full can still run out.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from .adapters import CacheableLayer, find_layers
from .errors import (
    CalibrationMemoryError,
    GuidanceError,
    ProfileError,
    StepMismatchError,
)
from .guidance import branch_order, check_cfg_batch
from .keys import BRANCHES, Key
from .ownership import Claim, claim, release
from .profile import CalibrationProfile, LayerInfo
from .runtime.streams import BlockStreams, extrapolate
from .step_weights import StepProbe
from .steps import (
    StepTracker,
    attach_step_hooks,
    resolve_target,
    scheduler_step_index,
    step_anchor,
)
from .version import __version__

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["CalibrationRecorder", "calibration"]

logger = logging.getLogger(__name__)


def _branch_layer_infos(infos: Sequence[LayerInfo]) -> list[LayerInfo]:
    """The branch entries of a profile, cond then uncond: each layer once per branch, at half its cost."""
    return [
        LayerInfo(f"{info.name}@{branch}", Key(info.layer_type, branch=branch).typed, info.block,
                  None if info.flops is None else info.flops / 2)
        for branch in BRANCHES
        for info in infos
    ]


def _tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a layer output: a tensor, or the tensors in a tuple/list."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for t in output if isinstance(t, torch.Tensor)]
    raise TypeError(f"Cannot measure a layer output of type {type(output).__name__}; expected a tensor or a tuple of tensors")


def _l1(t: torch.Tensor) -> torch.Tensor:
    """The L1 norm, summed in float32 whatever the tensor's dtype."""
    return torch.linalg.vector_norm(t, ord=1, dtype=torch.float32)


def _total(norms: Any) -> torch.Tensor:
    """The sum of a layer's per-tensor norms (one for a tensor output, several for a tuple)."""
    return torch.stack(list(norms)).sum()


class CalibrationRecorder:
    """Hooks that record rel-L1 error curves; use through :func:`calibration`."""

    def __init__(
        self,
        pipe_or_module: Any,
        layers: Sequence[CacheableLayer],
        *,
        lookahead: int = 3,
        steps: int | None = None,
        calls_per_step: int | None = None,
        measure_flops: bool = True,
        components: Sequence[str] | None = None,
        branches: Sequence[str] | str | None = None,
        forecast: Literal["none", "linear"] = "none",
        layer_groups: int = 1,
    ) -> None:
        if layer_groups < 1:
            raise ValueError(f"layer_groups must be >= 1, got {layer_groups}")
        if forecast not in ("none", "linear"):
            raise ValueError(f"forecast must be 'none' or 'linear', got {forecast!r}")
        if forecast == "linear" and branches is not None:
            raise GuidanceError("Forecast errors are measured over the whole batch only; calibrate with branches= or forecast=, not both")
        if lookahead < 1:
            raise ValueError(f"lookahead must be >= 1, got {lookahead}")
        if steps is not None and steps < 2:
            raise ValueError(f"steps must be >= 2 to measure errors between steps, got {steps}")
        self.target = resolve_target(pipe_or_module)
        if self.target.pipeline is None and steps is None:
            raise ValueError(
                "Calibrating a bare module needs steps= (the number of denoising steps per generation), "
                "since there is no scheduler to tell where one generation ends"
            )
        self.layers = list(layers)
        if layer_groups > most_layer_groups(self.layers):
            raise ValueError(
                f"layer_groups={layer_groups} would leave some generations nothing to measure: a group is every "
                f"n-th block, and these layers make at most {most_layer_groups(self.layers)} groups"
            )
        # Guidance halves in batch order (guidance.py); their errors go to extra rows: cond L..2L-1, uncond 2L..3L-1.
        self.branches = branch_order(self.target.pipeline, branches) if branches is not None else None
        self._batch_rows = 0  # the current model call's batch, where branches are recorded
        self.lookahead = lookahead
        self.gaps = lookahead + 1 if forecast == "linear" else 0  # forecast: gaps between the two computes
        self.steps = steps
        self.measure_flops = measure_flops
        self.components = list(components) if components is not None else sorted({layer.layer_type for layer in self.layers})
        self._tracker = StepTracker(steps, self.target.timesteps, calls_per_step, scheduler_step_index(self.target))
        self._undo: list[Callable[[], None]] = []  # removes the hooks
        self._runs: list[torch.Tensor] = []  # finished generations: (layers, steps, lookahead) sums
        self._run_counts: list[torch.Tensor] = []  # and how many measurements each sum holds
        self._current: torch.Tensor | None = None
        self._calls_in_generation = 0
        self._counts: torch.Tensor | None = None  # measurements summed into each cell of _current
        self._forecast_runs: list[torch.Tensor] = []  # with forecast: (layers, steps, gaps, lookahead) sums
        self._forecast_run_counts: list[torch.Tensor] = []
        self._forecasts: torch.Tensor | None = None  # this generation's, by target step
        self._sensitivities: list[torch.Tensor] = []  # this generation's, one per scheduler step (step_weights.py)
        self._sensitivity_runs: list[torch.Tensor] = []
        self._forecast_counts: torch.Tensor | None = None
        self._timesteps: Any | None = None  # the scheduler's, for the profile (read once, at the end)
        self._rings: list[dict[tuple[int, int], deque[list[torch.Tensor]]]] = []  # per layer: (slot, occurrence) -> last outputs
        self._occurrences: list[int] = [0] * len(self.layers)  # per layer: its calls in this model call
        self._step = 0
        self._slot = 0
        self._flop_meter = FlopMeter(len(self.layers))
        self.layer_groups = layer_groups
        self._group_of = group_of(self.layers, layer_groups)  # each layer's group
        self._group = 0  # the group this generation measures
        self._generations = 0  # generations started
        self._history_bytes = 0  # what the rings hold now, and the most they held
        self.history_peak_bytes = 0
        self.history_predicted_bytes = 0  # the most a generation's history was predicted to reach
        self._history_said = 0.0  # the largest prediction logged (logged again only where it grows)
        self._new_rings = False  # rings opened since the last prediction
        self._started = 0.0
        self._profile: CalibrationProfile | None = None

    # ---- attach / detach --------------------------------------------------------------------
    def start(self) -> Self:
        if self._undo:
            return self
        claim(self.target.model, Claim(self, "being calibrated", self._detach,
                                       "End that calibration first (leave its with block, or call stop())"))
        self._tracker.reset()
        self._started = time.time()
        anchor = step_anchor(self.target.model, self.layers[0].name, whole_block=self.layers[0].streams is not None)
        self._undo = attach_step_hooks(self.target.model, anchor, self._before_model_call, pass_inputs=True,
                                       on_model_error=self._tracker.reset)  # a raise ends the generation
        scheduler = getattr(self.target.pipeline, "scheduler", None)
        if callable(getattr(scheduler, "step", None)) and "step" not in vars(scheduler):
            probe = StepProbe(scheduler, self._sensitivities.append).attach()
            self._undo.append(probe.detach)
        for index, layer in enumerate(self.layers):
            before = layer.module.register_forward_pre_hook(lambda m, a, i=index: self._before_layer(i))
            if layer.streams is None:
                after = layer.module.register_forward_hook(lambda m, a, out, i=index: self._after_layer(i, out))
            else:  # a block cached whole: what matters is the residual it adds to its streams
                streams = BlockStreams.of(layer.module, layer.name, layer.streams)
                after = layer.module.register_forward_hook(
                    lambda m, a, kw, out, i=index, s=streams: self._after_layer(i, s.residual(out, s.inputs(a, kw)), fresh=True),
                    with_kwargs=True,
                )
            self._undo += [before.remove, after.remove]
        return self

    def stop(self) -> CalibrationProfile:
        """Detach the hooks and build the profile from every complete generation."""
        self._detach()
        self._finish_generation()
        self._rings = []
        self._profile = self._build_profile()
        return self._profile

    def _detach(self) -> None:
        for undo in self._undo:
            undo()
        self._undo.clear()
        release(self.target.model, self)
        self._flop_meter.close(keep=False)  # stopped before a second model call: no whole call counted

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.stop()
            return
        self._detach()  # leave the model clean, keep the original error
        self._release_history()  # and the memory the interrupted generation held

    @property
    def profile(self) -> CalibrationProfile:
        """The recorded profile (available once recording stopped, e.g. after the ``with`` block)."""
        if self._profile is None:
            raise ProfileError("The profile is ready once calibration stops: read rec.profile after the with block")
        return self._profile

    # ---- hooks ------------------------------------------------------------------------------
    def _before_model_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._flop_meter.close()
        step, slot, new_generation = self._tracker.advance(args, kwargs)
        if new_generation:
            self._finish_generation()
            self._start_generation()
        self._calls_in_generation += 1
        steps = self._current.shape[1] if self._current is not None else 0
        if step >= steps:
            raise StepMismatchError(
                f"Calibration for {steps} steps saw a call for step {step + 1}; pass steps= matching the "
                "pipeline's num_inference_steps, or calls_per_step= if it calls the model several times per step"
            )
        self._step, self._slot = step, slot
        if step >= 1 and self._new_rings:  # after the step that opened rings (step 0; a call slot first
            self._new_rings = False        # seen later, as SD3's skip-layer guidance): off the per-layer path
            self._check_history_fits()
        self._occurrences = [0] * len(self.layers)
        if self.branches is not None:  # compare the halves once per generation: it syncs with the device
            self._batch_rows = check_cfg_batch(args, kwargs, compare=step == slot == 0)
        if self.measure_flops and self._flop_meter.total is None and self._tracker.generation == 0 and step == slot == 0:
            self._flop_meter.open()

    def _before_layer(self, index: int) -> None:
        self._flop_meter.before_layer(index)

    def _after_layer(self, index: int, output: Any, *, fresh: bool = False) -> None:
        self._flop_meter.after_layer(index)
        if self._group_of[index] != self._group:  # another generation measures this layer
            return
        # Kept in the model's dtype (half the memory of float32 copies on a bf16 model); the norms
        # accumulate in float32. Copies, as the model may reuse its buffers (a block's residual is new).
        current = [t.detach() if fresh else t.detach().clone() for t in _tensors(output)]
        rings = self._rings[index]
        key = (self._slot, self._occurrences[index])
        self._occurrences[index] += 1
        ring = rings.get(key)
        if ring is None:
            ring = rings[key] = deque(maxlen=self.lookahead + self.gaps)
            self._new_rings = True  # the history's prediction grows: checked at the next step's call
        if ring:
            earlier = list(ring)  # earlier[i] is step t - 1 - i
            denominator = _total(_l1(t) for t in current)
            numerators = [_total(_l1(p - c) for p, c in zip(previous, current)) for previous in earlier[: self.lookahead]]
            assert self._current is not None and self._counts is not None
            self._current[index, self._step, : len(numerators)] += torch.stack(numerators) / denominator
            self._counts[index, self._step, : len(numerators)] += 1
            if self.gaps and len(earlier) > 1:
                self._record_forecasts(index, current, earlier, denominator)
        if self.branches is not None:
            self._record_branches(index, current, ring)
        if len(ring) == ring.maxlen:
            self._history_bytes -= _nbytes(ring[-1])
        ring.appendleft(current)
        self._history_bytes += _nbytes(current)
        self.history_peak_bytes = max(self.history_peak_bytes, self._history_bytes)

    def _record_forecasts(
        self, index: int, current: list[torch.Tensor], earlier: list[list[torch.Tensor]], denominator: torch.Tensor
    ) -> None:
        """The error of predicting this step from steps ``s = t - k`` and ``s - g``: ``y_s + (k / g) (y_s - y_(s-g))``
        (``earlier[i]`` holds step ``t - 1 - i``)."""
        numerators, cells = [], []
        for k in range(1, self.lookahead + 1):
            for gap in range(1, self.gaps + 1):
                if k + gap > len(earlier):
                    break
                last, previous = earlier[k - 1], earlier[k - 1 + gap]
                numerators.append(_total(_l1(c - extrapolate(s, p, k / gap)) for c, s, p in zip(current, last, previous)))
                cells.append((gap - 1, k - 1))
        if not cells:
            return
        assert self._forecasts is not None and self._forecast_counts is not None
        gaps, ks = (list(axis) for axis in zip(*cells))
        self._forecasts[index, self._step, gaps, ks] += torch.stack(numerators) / denominator
        self._forecast_counts[index, self._step, gaps, ks] += 1

    def _record_branches(self, index: int, current: list[torch.Tensor], ring: deque[list[torch.Tensor]]) -> None:
        """As the whole-batch error, over each guidance half's rows alone, into that branch's entry."""
        rows = self._batch_rows
        if any(t.dim() == 0 or t.shape[0] != rows for t in current):
            shapes = [tuple(t.shape) for t in current]
            raise GuidanceError(
                f"Layer {self.layers[index].name} returned {shapes}, not {rows} rows like the model's guidance batch, "
                "so its errors cannot be split by branch; calibrate without branches= or leave it out of components="
            )
        if not ring:
            return
        assert self._current is not None and self._counts is not None
        half = rows // 2
        for position, branch in enumerate(self.branches or ()):
            rows_of = slice(0, half) if position == 0 else slice(half, rows)
            entry = index + len(self.layers) * (1 + BRANCHES.index(branch))
            denominator = _total(_l1(t[rows_of]) for t in current)
            numerators = [
                _total(_l1(p[rows_of] - c[rows_of]) for p, c in zip(previous, current))
                for previous in ring
            ]
            self._current[entry, self._step, : len(numerators)] += torch.stack(numerators) / denominator
            self._counts[entry, self._step, : len(numerators)] += 1

    # ---- the history's size -----------------------------------------------------------------
    def _check_history_fits(self) -> None:
        """Predict this generation's history from the newest output of each ring (one step's, for
        every layer, call slot and occurrence seen so far): each layer of this generation's group
        keeps its outputs of the last ``lookahead + gaps`` steps. Logged where it grows; where a
        CUDA device cannot give the growth still to come, the hooks come off, the history is let
        go and :class:`CalibrationMemoryError` says what fits, before the rings fill and run out."""
        assert self._current is not None
        ring = _ring_length(self.lookahead, bool(self.gaps), self._current.shape[1])
        group = [i for i, g in enumerate(self._group_of) if g == self._group]
        by_device, held_by_device = self._step_bytes_by_device()
        if not by_device:
            return
        predicted = {device: ring * sum(layer_bytes[i] for i in group) for device, layer_bytes in by_device.items()}
        total = sum(predicted.values())
        self.history_predicted_bytes = max(self.history_predicted_bytes, round(total))
        if total > self._history_said:
            self._history_said = total
            self._say_history(total, ring, len(group), [sum(column) for column in zip(*by_device.values())])
        for device, layer_bytes in by_device.items():
            held = held_by_device[device]
            available = _available_bytes(device)
            if available is not None and predicted[device] - held > available:
                message = self._too_big(device, layer_bytes, ring, predicted[device], available, held)
                self._detach()  # leave the model clean: the raise ends the pipeline call
                self._release_history()
                raise CalibrationMemoryError(message)

    def _release_history(self) -> None:
        """Let the rings' outputs go (a calibration that raised: a retry must have that memory)."""
        self._rings, self._history_bytes, self._current, self._counts = [], 0, None, None
        self._forecasts = self._forecast_counts = None

    def _say_history(self, total: float, ring: int, measured: int, layer_bytes: list[float]) -> None:
        """Log the prediction, and what more layer groups would keep (about ``1/n`` of it where the
        blocks are alike)."""
        layers = f"{measured} layers" if self.layer_groups == 1 else \
            f"{measured} of {len(self.layers)} layers, layer_groups={self.layer_groups}"
        more = [n for n in (2 * self.layer_groups, 4 * self.layer_groups) if n <= most_layer_groups(self.layers)]
        fewer = " and ".join(
            f"layer_groups={n} about {_size(ring * largest_group_bytes(layer_bytes, group_of(self.layers, n)))}" for n in more)
        logger.info(
            "Calibration keeps about %s of layer outputs (%d steps' outputs of %s; lookahead %d%s)%s",
            _size(total), ring, layers, self.lookahead, ", forecast" if self.gaps else "",
            f"; {fewer}, over that many generations" if more else "",
        )

    def _step_bytes_by_device(self) -> tuple[dict[torch.device, list[float]], dict[torch.device, float]]:
        """Per device, each layer's bytes of one step (the newest output of each of its rings), and
        the bytes the rings hold now. A layer that has not run yet (another generation's group, or
        another expert's) counts at the mean of its kind, so that another expert's layers, which
        run later, are in the prediction."""
        step: dict[torch.device, list[float]] = {}
        held: dict[torch.device, float] = {}
        for index, rings in enumerate(self._rings):
            for ring in rings.values():
                for position, entry in enumerate(ring):
                    for tensor in entry:
                        nbytes = tensor.numel() * tensor.element_size()
                        held[tensor.device] = held.get(tensor.device, 0.0) + nbytes
                        if position == 0:
                            step.setdefault(tensor.device, [0.0] * len(self.layers))[index] += nbytes
        ran = [index for index, rings in enumerate(self._rings) if rings]
        for layer_bytes in step.values():
            overall = sum(layer_bytes[i] for i in ran) / len(ran)
            by_kind: dict[str, list[float]] = {}
            for index in ran:
                by_kind.setdefault(self.layers[index].layer_type, []).append(layer_bytes[index])
            for index, rings in enumerate(self._rings):
                if not rings:
                    same = by_kind.get(self.layers[index].layer_type)
                    layer_bytes[index] = sum(same) / len(same) if same else overall
        return step, held

    def _too_big(
        self, device: torch.device, layer_bytes: list[float], ring: int, predicted: float, available: int, held: float
    ) -> str:
        """What to say where the history will not fit: the sizes, and the ``layer_groups`` or
        ``lookahead`` that would fit in the room there is (what the device can give plus what the
        rings hold now)."""
        room = available + held
        fixes = []
        groups = smallest_layer_groups(self.layers, layer_bytes, ring, room, above=self.layer_groups)
        if groups is not None:
            fixes.append(f"layer_groups={groups} (each generation then measures the layers of one block in {groups}: "
                         f"run {groups} generations, or a multiple of {groups}, for every layer to be measured)")
        steps = self._current.shape[1] if self._current is not None else ring
        step_bytes = predicted / ring
        lower = next((k for k in range(self.lookahead - 1, 0, -1)
                      if step_bytes * _ring_length(k, bool(self.gaps), steps) <= room), None)
        if lower is not None:
            fixes.append(f"lookahead={lower} (caching then reuses an output for at most {lower} steps)")
        fix = f"Calibrate with {' or '.join(fixes)}." if fixes else (
            "Even one block per generation would not fit: free memory on the device (a smaller batch or "
            "resolution, model offloading).")
        return (
            f"Calibration would keep about {_size(predicted)} of layer outputs on {device} (the last {ring} "
            f"steps' outputs of the layers it measures, lookahead {self.lookahead}"
            f"{', forecast' if self.gaps else ''}, layer_groups={self.layer_groups}), but the device has about "
            f"{_size(room)} for them ({_size(held)} held now plus {_size(available)} it can "
            f"still give). {fix} The calibration hooks were removed: the model is as before it"
        )

    # ---- generations ------------------------------------------------------------------------
    def _start_generation(self) -> None:
        steps = self._tracker.generation_steps
        if steps is None:
            raise ValueError("Cannot tell how many steps this generation has; pass steps=")
        if self.lookahead > steps:  # (== steps only leaves its last lookahead unmeasured)
            raise ValueError(
                f"lookahead={self.lookahead} reaches past the last of {steps} steps; calibrate with lookahead <= {steps - 1}"
            )
        if self.steps is not None and steps != self.steps:
            raise StepMismatchError(f"Calibration was set up for steps={self.steps} but the pipeline is running {steps} steps")
        if self._runs and steps != self._runs[0].shape[1]:
            raise StepMismatchError(
                f"Every calibration call must run the same number of steps: the first ran {self._runs[0].shape[1]}, "
                f"this one runs {steps}"
            )
        model = self.target.model
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if model.training:
            logger.warning(
                "%s is in training mode: dropout and label dropout make calibration noisy; call .eval() first",
                type(model).__name__,
            )
        entries = len(self.layers) * (1 + len(BRANCHES) if self.branches is not None else 1)
        self._current = torch.zeros(entries, steps, self.lookahead, device=device)
        self._counts = torch.zeros_like(self._current)
        if self.gaps:
            self._forecasts = torch.zeros(len(self.layers), steps, self.gaps, self.lookahead, device=device)
            self._forecast_counts = torch.zeros_like(self._forecasts)
        self._timesteps = self.target.timesteps()  # kept by reference: read once, when the profile is built
        self._calls_in_generation = 0
        self._rings = [{} for _ in self.layers]
        self._history_bytes = 0
        self._group = self._generations % self.layer_groups
        self._generations += 1
        self._sensitivities.clear()

    def _finish_generation(self) -> None:
        if self._current is None:
            return
        steps = self._current.shape[1]
        if self._calls_in_generation >= steps * self._tracker.calls_per_step:
            assert self._counts is not None
            self._runs.append(self._current)
            self._run_counts.append(self._counts)
            if self._forecasts is not None and self._forecast_counts is not None:
                self._forecast_runs.append(self._forecasts)
                self._forecast_run_counts.append(self._forecast_counts)
            if len(self._sensitivities) == steps:  # one scheduler step per denoising step, as the solver assumes
                self._sensitivity_runs.append(torch.stack(self._sensitivities))
            elif self._sensitivities:
                logger.info("Step sensitivities not recorded: %d scheduler steps for %d steps", len(self._sensitivities), steps)
        else:
            logger.warning("Dropping an incomplete calibration generation (%d of %d steps)", self._step + 1, steps)
        self._current = None
        self._sensitivities.clear()

    def _check_every_group_measured(self, runs: int) -> None:
        """With ``layer_groups``, each complete generation measured one group in turn: a group no
        complete generation measured would leave its layers without errors."""
        if runs < self.layer_groups:
            raise ProfileError(
                f"Calibration with layer_groups={self.layer_groups} measures each group of layers in its own "
                f"generation, but {runs} complete generation(s) ran: run at least {self.layer_groups} (a multiple of "
                f"{self.layer_groups} measures every layer equally often), or lower layer_groups"
            )

    def _build_profile(self) -> CalibrationProfile:
        if not self._runs:
            raise ProfileError(
                "Calibration recorded no complete generation; run the pipeline at least once inside the with block"
            )
        # One device-to-host copy for everything recorded.
        calls_per_step = self._tracker.calls_per_step
        errors = errors_by_source_step(_host(self._runs), _host(self._run_counts))
        runs, _, lookahead, steps = errors.shape
        self._check_every_group_measured(runs)
        forecasts = None
        if self.gaps:
            forecasts = forecasts_by_source_step(_host(self._forecast_runs), _host(self._forecast_run_counts))
            self._forecast_runs, self._forecast_run_counts = [], []
        measured, self._sensitivity_runs = self._sensitivity_runs, []
        flops: list[float | None] = list(self._flop_meter.layers) if self._flop_meter.layers else [None] * len(self.layers)
        infos = [LayerInfo(layer.name, layer.layer_type, layer.block, f) for layer, f in zip(self.layers, flops, strict=True)]
        if self.branches is not None:
            infos += _branch_layer_infos(infos)
        model = self.target.model
        parameter = next(model.parameters(), None)
        metadata = {
            "model_class": type(model).__name__,
            "pipeline_class": type(self.target.pipeline).__name__ if self.target.pipeline is not None else None,
            "scheduler_class": self.target.scheduler_name,
            "dtype": str(parameter.dtype).removeprefix("torch.") if parameter is not None else None,
            "device": str(parameter.device) if parameter is not None else None,
            "components": self.components,
            "lookahead": lookahead,
            "forecast": "linear" if self.gaps else "none",
            "num_steps": steps,
            "calls_per_step": calls_per_step,
            "branches": list(self.branches) if self.branches is not None else None,
            "num_runs": runs,
            "run_labels": [f"call {i}" for i in range(runs)],
            "layer_groups": self.layer_groups,
            "history_peak_mib": round(self.history_peak_bytes / 2**20, 3),
            "smoothcache_version": __version__,
            "torch_version": torch.__version__,
            "python": platform.python_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.time() - self._started, 3),
            **_scheduler_record(self.target.pipeline, self._timesteps),
            **(step_weights_record(torch.stack(measured).mean(dim=0).cpu().double().numpy()) if len(measured) == runs else {}),
        }
        self._runs, self._run_counts = [], []
        profile = CalibrationProfile(infos, errors, metadata, self._flop_meter.total, forecasts)
        outlook = profile.outlook()
        if outlook is not None:
            logger.warning("%s", outlook)
        return profile


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _size(nbytes: float) -> str:
    """Bytes as GiB, or MiB / KiB where smaller (a tiny model's history)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes / 2**10:.2f} KiB"


def _ring_length(lookahead: int, forecast: bool, steps: int) -> int:
    """How many steps' outputs a layer keeps at most: ``lookahead`` (``2 * lookahead + 1`` with
    forecasting), no more than the generation has steps."""
    return min(lookahead + (lookahead + 1 if forecast else 0), steps)


def group_of(layers: Sequence[CacheableLayer], groups: int) -> list[int]:
    """Each layer's group under ``layer_groups=groups``: its block's place among the blocks present,
    modulo ``groups`` (a layer outside the blocks counts as a block of its own, after them). A group
    holds every ``groups``-th block whole, so blocks alike split evenly: on Flux a single-stream
    block's attention (27 MiB a step) and MLP input (108 MiB) stay together, where every
    ``groups``-th layer would put all the MLP inputs in one group."""
    return [unit % groups for unit in _block_units(layers)]


def _block_units(layers: Sequence[CacheableLayer]) -> list[int]:
    """Each layer's block, numbered densely (0, 1, ... over the blocks present, then one number per
    layer outside the blocks): blocks 1 and 3 alone make two units, not four."""
    places = {block: place for place, block in enumerate(sorted({layer.block for layer in layers if layer.block is not None}))}
    units, loose = [], len(places)
    for layer in layers:
        if layer.block is None:
            units.append(loose)
            loose += 1
        else:
            units.append(places[layer.block])
    return units


def most_layer_groups(layers: Sequence[CacheableLayer]) -> int:
    """The most groups :func:`group_of` can make with none empty."""
    return max(_block_units(layers), default=0) + 1


def largest_group_bytes(layer_bytes: Sequence[float], groups: Sequence[int]) -> float:
    """One step's bytes of the largest group (``groups``: each layer's, as :func:`group_of` gives)."""
    totals: dict[int, float] = {}
    for nbytes, group in zip(layer_bytes, groups, strict=True):
        totals[group] = totals.get(group, 0.0) + nbytes
    return max(totals.values())


def smallest_layer_groups(
    layers: Sequence[CacheableLayer], layer_bytes: Sequence[float], ring: int, room: float, *, above: int = 0
) -> int | None:
    """The fewest ``layer_groups`` (more than ``above``) whose largest group's ``ring`` steps of
    outputs fit in ``room`` bytes; None where even the most groups there can be do not."""
    for n in range(above + 1, most_layer_groups(layers) + 1):
        if ring * largest_group_bytes(layer_bytes, group_of(layers, n)) <= room:
            return n
    return None


def _available_bytes(device: torch.device) -> int | None:
    """What ``device`` can still give new tensors: its free memory plus what the caching allocator
    holds unused; None off CUDA, where there is nothing cheap to ask. One driver call, no sync."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


class FlopMeter:
    """FLOPs of one whole model call and of each calibrated layer in it, counted once: from the
    first model call to the second (the first call's lead-in, the embeddings before the anchor
    block, stood in for by the second's)."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.total: float | None = None  # the whole call
        self.layers: list[float] | None = None  # per layer, in the recorder's order
        self._counter: FlopCounterMode | None = None
        self._marks: list[float] = []

    def open(self) -> None:
        self._counter = FlopCounterMode(display=False)
        self._counter.__enter__()
        self._marks = [0.0] * self.num_layers

    def close(self, keep: bool = True) -> None:
        """End the count (keeping what it measured, with ``keep``); nothing where no count is open."""
        counter, self._counter = self._counter, None
        if counter is None:
            return
        counter.__exit__(None, None, None)
        if keep:
            self.total, self.layers = float(counter.get_total_flops()), self._marks

    def before_layer(self, index: int) -> None:
        if self._counter is not None:
            self._marks[index] -= float(self._counter.get_total_flops())

    def after_layer(self, index: int) -> None:
        if self._counter is not None:
            self._marks[index] += float(self._counter.get_total_flops())


# ---- from recorded sums to the profile's arrays (pure) ---------------------------------------------


def _host(tensors: list[torch.Tensor]) -> np.ndarray:
    """Stacked on the host in float64: one device-to-host copy for everything recorded."""
    return torch.stack(tensors).cpu().double().numpy()


def errors_by_source_step(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``(runs, layers, steps, K)`` sums by target step -> mean errors ``(runs, layers, K, steps)`` by
    source step, NaN where nothing was measured."""
    with np.errstate(invalid="ignore"):
        means = sums / counts
    runs, num_layers, steps, lookahead = means.shape
    errors = np.full((runs, num_layers, lookahead, steps), np.nan)
    for k in range(1, lookahead + 1):
        # target step t = s + k holds the error against step s: shift to source indexing.
        errors[:, :, k - 1, : steps - k] = means[:, :, k:, k - 1]
    return errors


def forecasts_by_source_step(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``(runs, layers, steps, gaps, K)`` forecast sums by target step -> mean errors in the profile's
    layout, ``(runs, layers, gaps, K, steps)`` by source step."""
    with np.errstate(invalid="ignore"):
        means = sums / counts
    runs, num_layers, steps, gaps, lookahead = means.shape
    forecasts = np.full((runs, num_layers, gaps, lookahead, steps), np.nan)
    for k in range(1, lookahead + 1):
        forecasts[:, :, :, k - 1, : steps - k] = means[:, :, k:, :, k - 1].transpose(0, 1, 3, 2)
    return forecasts


def step_weights_record(weights: np.ndarray) -> dict[str, Any]:
    """The steps' mean sensitivity over generations, scaled to at most 1, for the profile's
    metadata; nothing where it is not finite and positive."""
    if not np.all(np.isfinite(weights)) or weights.max() <= 0:
        logger.info("Step sensitivities not recorded: the scheduler's steps gave %s", weights)
        return {}
    return {"step_weights": [round(float(w), 6) for w in weights / weights.max()]}


def _scheduler_record(pipeline: Any, timesteps: Any) -> dict[str, Any]:
    """The scheduler's timesteps and config, so that a profile can be resampled to other step counts."""
    record: dict[str, Any] = {}
    if isinstance(timesteps, torch.Tensor):
        record["timesteps"] = [float(t) for t in timesteps.detach().float().cpu().tolist()]
    config = getattr(getattr(pipeline, "scheduler", None), "config", None)
    if config is not None:
        try:
            record["scheduler_config"] = json.loads(json.dumps(dict(config), default=str))
        except (TypeError, ValueError):
            logger.debug("Scheduler config is not JSON-serialisable; not recorded")
    return record


def calibration(
    pipe_or_module: Any,
    components: Sequence[str] | None = None,
    *,
    lookahead: int = 3,
    steps: int | None = None,
    calls_per_step: int | None = None,
    measure_flops: bool = True,
    branches: Sequence[str] | str | None = None,
    forecast: Literal["none", "linear"] = "none",
    layer_groups: int = 1,
) -> CalibrationRecorder:
    """Record error curves over any number of ordinary pipeline calls.

    Each measured layer keeps its last ``lookahead`` outputs (about ``2 * lookahead + 1`` with
    forecasting): that history is calibration's extra memory (``profile.metadata["history_peak_mib"]``).
    ``layer_groups=n`` bounds it to about ``1/n``: each generation measures the layers of every
    ``n``-th block, in turn, so every layer is measured on ``1/n`` of the generations; run a multiple of ``n``.
    After a generation's first step the history's peak is known: it is logged (INFO), and on CUDA
    a peak the device cannot hold raises :class:`~smoothcache.errors.CalibrationMemoryError` then,
    naming the ``layer_groups`` or ``lookahead`` that fits, rather than running out steps later
    (the history only: the model's activations need room besides).

    ``forecast="linear"`` also records the errors of extrapolating each layer's output from two
    earlier steps, so that ``profile.schedule(..., forecast="linear")`` places computes where
    ``cache(..., forecast="linear")`` needs them.

    ``branches`` records the two halves of a classifier-free guidance batch apart as well:
    ``"auto"`` (known pipelines) or their batch order, ``("cond", "uncond")`` for DiTPipeline. The
    profile then also has keys ``"<type>@cond"`` and ``"<type>@uncond"`` (e.g. ``"attn1@uncond"``,
    per block ``"attn1@uncond-3"``), each at half the layer's cost; a schedule over them caches
    each half on its own plan (``smoothcache.cache``). A model call that does not batch guidance
    raises :class:`~smoothcache.guidance.GuidanceError`.

    >>> with smoothcache.calibration(pipe, components=["attn1", "ff"]) as rec:   # doctest: +SKIP
    ...     for seed in range(4):
    ...         pipe(class_labels=[207, 360], num_inference_steps=50, generator=torch.manual_seed(seed))
    >>> schedule = rec.profile.schedule(alpha=0.18)                               # doctest: +SKIP
    >>> with smoothcache.calibration(pipe, branches="auto") as rec:                 # doctest: +SKIP
    ...     pipe(class_labels=[207, 360], num_inference_steps=50, guidance_scale=4.0)
    >>> keys = ["attn1@cond", "attn1@uncond", "ff@cond", "ff@uncond"]             # doctest: +SKIP
    >>> schedule = rec.profile.schedule(compute_fraction=0.5, keys=keys, solver="optimal")  # doctest: +SKIP
    """
    target = resolve_target(pipe_or_module)
    layers = find_layers(target.model, components, allow_repeated=True)
    return CalibrationRecorder(
        pipe_or_module,
        layers,
        lookahead=lookahead,
        steps=steps,
        calls_per_step=calls_per_step,
        measure_flops=measure_flops,
        components=components,
        branches=branches,
        forecast=forecast,
        layer_groups=layer_groups,
    ).start()
