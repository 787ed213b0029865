"""The cache: at each step, every scheduled layer either computes (and keeps its output) or returns
the output it kept.

Decisions are made once per model call, in a forward pre-hook (``steps.attach_step_hooks``): each
schedule key has one ``_Decision`` whose ``compute`` flag is set for the step. The per-layer path is
one attribute read and a branch. PyTorch's forward hooks cannot skip a module's computation, so a layer's
``forward`` is shadowed by an instance attribute, as diffusers' hook registry does; removing it
(or restoring an instance ``forward`` that was there before) puts the module back exactly.

Outputs are kept per call slot (the n-th model call of a step: conditional and unconditional
calls keep apart). A slot reuses only what it computed itself earlier in the same generation, for
inputs of the same shape; otherwise it computes, whatever the plan says. So a call that appears on
some steps only (SD3's skip-layer guidance), an expert taking over (Wan 2.2), a layer its block
skips, or a batch that changes size all compute before they reuse. A layer its block calls
several times per call (CogView4's ff, on image then text tokens) keeps one output per occurrence.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

from torch import Tensor, nn

from .adapters import CacheableLayer, find_layers
from .errors import ScheduleError, StepMismatchError
from .schedule import Schedule, schedule_key_for
from .steps import (
    StepTracker,
    attach_step_hooks,
    resolve_target,
    scheduler_step_index,
    step_anchor,
)

__all__ = ["CacheHandle", "cache"]

logger = logging.getLogger(__name__)

_MISSING = object()


class _Decision:
    """Compute or reuse, for every layer one schedule key governs, at the current call."""

    __slots__ = ("compute", "slot")

    def __init__(self) -> None:
        self.compute = True
        self.slot = 0


def _caching_forward(original: Callable[..., Any], decision: _Decision, outputs: dict[int, Any]) -> Callable[..., Any]:
    """The hot path: compute and keep, or hand back what was kept for this call slot."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not decision.compute:
            kept = outputs.get(decision.slot, _MISSING)
            if kept is not _MISSING:
                return kept
        output = original(*args, **kwargs)
        outputs[decision.slot] = output
        return output

    return forward


def _repeated_caching_forward(
    original: Callable[..., Any], decision: _Decision, outputs: dict[int, list[Any]], occurrence: list[int]
) -> Callable[..., Any]:
    """As :func:`_caching_forward`, for a layer called several times per model call: one output per
    occurrence (``occurrence[0]`` counts this model call's calls so far; the handle zeroes it)."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        n = occurrence[0]
        occurrence[0] = n + 1
        kept = outputs.get(decision.slot)
        if not decision.compute and kept is not None and n < len(kept):
            return kept[n]
        output = original(*args, **kwargs)
        if n == 0 or kept is None:
            kept = outputs[decision.slot] = []
        if n < len(kept):
            kept[n] = output
        else:
            kept.append(output)
        return output

    return forward


class CacheHandle:
    """SmoothCache attached to one model; a context manager, and ``enable()``/``disable()`` for manual use."""

    def __init__(
        self,
        pipe_or_module: Any,
        schedule: Schedule | dict[str, list[int]],
        *,
        components: Sequence[str] | None = None,
        layers: Sequence[CacheableLayer] | None = None,
        calls_per_step: int | None = None,
        steps_mismatch: Literal["error", "compute"] = "error",
    ) -> None:
        if not isinstance(schedule, Schedule):
            schedule = Schedule.from_dict(schedule)
        if steps_mismatch not in ("error", "compute"):
            raise ValueError(f"steps_mismatch must be 'error' or 'compute', got {steps_mismatch!r}")
        self.target = resolve_target(pipe_or_module)
        self.schedule = schedule
        self.steps_mismatch = steps_mismatch
        if layers is None:
            if components is None:
                components = list(dict.fromkeys(_layer_type_of(key) for key in schedule.keys))
            layers = find_layers(self.target.model, components, allow_repeated=True)
        self._plans = self._assign_keys(list(layers))
        covered = {id(layer) for group in self._plans.values() for layer in group}
        # module order: the first of them anchors the step, so it must run before the others
        self.layers = [layer for layer in layers if id(layer) in covered]
        self._tracker = StepTracker(
            schedule.num_steps, self.target.timesteps, calls_per_step, scheduler_step_index(self.target)
        )
        self._decisions: list[tuple[_Decision, tuple[bool, ...]]] = []
        self._restore: list[Callable[[], None]] = []
        self._outputs: list[dict[int, Any]] = []  # per layer: call slot -> kept output(s)
        self._occurrences: list[list[int]] = []  # per repeated layer: its calls in this model call
        self._input_shapes: dict[int, tuple[int, ...] | None] = {}  # per call slot: at its last call
        self.enable()

    def _assign_keys(self, layers: list[CacheableLayer]) -> dict[str, list[CacheableLayer]]:
        """Group the layers by the schedule key that governs them; every key must govern some."""
        by_key: dict[str, list[CacheableLayer]] = {}
        for layer in layers:
            key = schedule_key_for(self.schedule.plans, layer.layer_type, layer.block)
            if key is not None:
                by_key.setdefault(key, []).append(layer)
        unused = [key for key in self.schedule.keys if key not in by_key]
        if unused:
            found = sorted({layer.layer_type for layer in layers})
            raise ScheduleError(
                f"Schedule keys {unused} match no layer of {type(self.target.model).__name__}; "
                f"its cacheable layers answer to {found} (or '<type>-<block>'). "
                "Use a schedule made for this model, or pass components= naming its layers"
            )
        return by_key

    # ---- attach / detach --------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self._restore)

    def enable(self) -> CacheHandle:
        """Attach to the model (idempotent). The next model call starts a new generation."""
        if self.enabled:
            return self
        self._tracker.reset()
        for key, layers in self._plans.items():
            decision = _Decision()
            self._decisions.append((decision, tuple(v == 1 for v in self.schedule.plans[key])))
            for layer in layers:
                outputs: dict[int, Any] = {}
                self._outputs.append(outputs)
                if layer.repeats > 1:
                    occurrence = [0]
                    self._occurrences.append(occurrence)
                    forward = _repeated_caching_forward(layer.module.forward, decision, outputs, occurrence)
                else:
                    forward = _caching_forward(layer.module.forward, decision, outputs)
                self._restore.append(_shadow_forward(layer.module, forward))
        anchor = step_anchor(self.target.model, self.layers[0].name)
        self._restore.extend(attach_step_hooks(self.target.model, anchor, self._before_model_call, pass_inputs=True))
        logger.debug("SmoothCache enabled on %d layers under %d keys", len(self._outputs), len(self._plans))
        return self

    def disable(self) -> None:
        """Detach: the model's modules are exactly as before and every kept output is released."""
        for restore in reversed(self._restore):
            restore()
        self._restore.clear()
        for outputs in self._outputs:
            outputs.clear()
        self._outputs.clear()
        self._occurrences.clear()
        self._input_shapes.clear()
        self._decisions.clear()
        self._tracker.reset()

    def reset(self) -> None:
        """Start over at step 0 on the next call (e.g. after an interrupted generation)."""
        self._tracker.reset()

    def __enter__(self) -> CacheHandle:
        return self.enable()

    def __exit__(self, *exc: object) -> None:
        self.disable()

    # ---- per model call ---------------------------------------------------------------------
    def _before_model_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            step, slot, new_generation = self._tracker.advance()
        except StepMismatchError:
            self._tracker.reset()
            raise
        num_steps = self.schedule.num_steps
        if new_generation:
            ran = self._tracker.generation_steps
            if ran is not None and ran != num_steps and self.steps_mismatch == "error":
                self._tracker.reset()
                raise StepMismatchError(
                    f"The schedule has {num_steps} steps but the pipeline is running {ran}; "
                    f"calibrate for {ran} steps, call the pipeline with num_inference_steps={num_steps}, "
                    "or pass steps_mismatch='compute' to compute every step the schedule does not cover"
                    f"{self._multistep_hint(ran)}"
                )
            self._forget_outputs()
        self._check_input_shape(slot, args, kwargs)
        for occurrence in self._occurrences:
            occurrence[0] = 0
        if step >= num_steps:
            if self.steps_mismatch == "error":
                self._tracker.reset()
                raise StepMismatchError(
                    f"The schedule has {num_steps} steps but the model was called for step {step + 1}; "
                    f"calibrate for {step + 1}+ steps, set calls_per_step if the pipeline calls the model "
                    "several times per step, or pass steps_mismatch='compute'"
                )
            for decision, _ in self._decisions:
                decision.compute, decision.slot = True, slot
            return
        for decision, plan in self._decisions:
            decision.compute, decision.slot = plan[step], slot

    def _forget_outputs(self, slot: int | None = None) -> None:
        """Drop the kept outputs of one call slot, or all of them (a new generation)."""
        for outputs in self._outputs:
            if slot is None:
                outputs.clear()
            else:
                outputs.pop(slot, None)
        if slot is None:
            self._input_shapes.clear()

    def _check_input_shape(self, slot: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """A slot called with inputs of another shape than at its last call must not reuse."""
        shape = _input_shape(args, kwargs)
        if slot in self._input_shapes and self._input_shapes[slot] != shape:
            logger.debug("Call slot %d changed input shape to %s: its layers compute", slot, shape)
            self._forget_outputs(slot)
        self._input_shapes[slot] = shape

    def _multistep_hint(self, ran: int) -> str:
        """Why a pipeline runs more steps than asked, where its solver evaluates the model twice per step."""
        scheduler = getattr(self.target.pipeline, "scheduler", None)
        order = getattr(scheduler, "order", 1)
        if not isinstance(order, int) or order <= 1:
            return ""
        return (
            f". {type(scheduler).__name__} is a solver of order {order}: it evaluates the model several "
            f"times per step and its timesteps list each evaluation ({ran} here), so calibrate with the same "
            f"scheduler and num_inference_steps: its profile then has {ran} steps"
        )


def _input_shape(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...] | None:
    """The shape of a call's first tensor argument (positional first): its batch and token layout."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return tuple(value.shape)
    return None


def _layer_type_of(key: str) -> str:
    """``"attn1-3"`` -> ``"attn1"``; a type key stays as it is."""
    head, _, tail = key.rpartition("-")
    return head if head and tail.isdigit() else key


def _shadow_forward(module: nn.Module, forward: Callable[..., Any]) -> Callable[[], None]:
    """Put the caching ``forward`` on ``module``; return the function that undoes exactly that."""
    previous = module.__dict__.get("forward", _MISSING)
    module.forward = forward  # type: ignore[method-assign]

    def restore() -> None:
        if previous is _MISSING:
            module.__dict__.pop("forward", None)
        else:
            module.__dict__["forward"] = previous

    return restore


def cache(
    pipe_or_module: Any,
    schedule: Schedule | dict[str, list[int]],
    *,
    components: Sequence[str] | None = None,
    calls_per_step: int | None = None,
    steps_mismatch: Literal["error", "compute"] = "error",
) -> CacheHandle:
    """Cache ``pipe_or_module``'s layers on ``schedule``; returns an enabled :class:`CacheHandle`.

    ``calls_per_step`` is how often the pipeline calls the model per denoising step; by default it
    is read off the scheduler's step index where it has one, and may then vary from step to step
    (skip-layer guidance), else 1 (see ``steps.StepTracker``). A pipeline with two experts (Wan 2.2
    A14B's ``transformer`` for high noise and ``transformer_2`` for low noise) has both cached
    under one schedule over its steps, as calibrating the pipeline gives: a key's plan governs
    whichever expert runs a step, and ``transformer_2`` computes on its first step, having nothing
    of its own to reuse. To give each expert its own schedule, cache each as a module instead.

    >>> with smoothcache.cache(pipe, Schedule.load("schedule.json")):   # doctest: +SKIP
    ...     images = pipe(class_labels=[207], num_inference_steps=50).images
    """
    return CacheHandle(
        pipe_or_module, schedule, components=components, calls_per_step=calls_per_step, steps_mismatch=steps_mismatch
    )
