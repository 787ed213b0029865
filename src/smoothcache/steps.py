"""Which denoising step a model call belongs to, and where one generation ends and the next begins.

The caching runtime and the calibration recorder both see only calls of the transformer. Given a
pipeline, the step source is its scheduler: every pipeline call runs ``scheduler.set_timesteps``,
which puts a new ``timesteps`` tensor on the scheduler, so a new tensor object means a new
generation (checked by identity: no device sync). Without a scheduler, a generation ends after a
known number of steps; with one, calls beyond its steps are reported, not wrapped around.

A pipeline with two denoisers taking turns over the steps (Wan 2.2 A14B's ``transformer`` and
``transformer_2``) resolves to :class:`Experts`, one module holding both, so that layers are found
and step hooks attached in both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import StepMismatchError

__all__ = ["Experts", "StepTracker", "Target", "attach_step_hooks", "host_timestep", "resolve_target", "scheduler_step_index",
           "step_anchor"]


@dataclass
class Target:
    """What a ``pipe_or_module`` argument resolves to: the model to hook and, for pipelines, the pipeline."""

    model: nn.Module
    pipeline: Any | None = None

    def timesteps(self) -> Any | None:
        """The pipeline scheduler's current ``timesteps`` (looked up each call: schedulers get swapped)."""
        scheduler = getattr(self.pipeline, "scheduler", None)
        return getattr(scheduler, "timesteps", None)

    @property
    def scheduler_name(self) -> str | None:
        scheduler = getattr(self.pipeline, "scheduler", None)
        return None if scheduler is None else type(scheduler).__name__


class Experts(nn.Module):
    """A pipeline's denoisers that take turns over the steps, as one module to find layers in and hook.

    Wan 2.2 A14B runs ``transformer`` on the high-noise steps and ``transformer_2`` on the rest.
    Holding them here changes nothing in them. Layer names keep the pipeline's attribute
    (``transformer_2.blocks.0.attn1``), but schedule keys (``"attn1"``, ``"attn1-0"``) are shared:
    a schedule covers the pipeline's steps, and a key's plan governs whichever expert runs a step.
    """

    def __init__(self, experts: dict[str, nn.Module]) -> None:
        super().__init__()
        for name, expert in experts.items():
            self.add_module(name, expert)
        self.training = any(expert.training for expert in experts.values())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("Experts only holds a pipeline's denoisers; call the pipeline or one expert")


# The pipeline attributes holding denoisers, in the order they run.
_EXPERT_ATTRIBUTES = ("transformer", "transformer_2")


def resolve_target(pipe_or_module: Any) -> Target:
    """A diffusers pipeline (its ``transformer``, or :class:`Experts` where it also has a ``transformer_2``)
    or any ``nn.Module``."""
    if isinstance(pipe_or_module, nn.Module):
        return Target(pipe_or_module)
    experts: dict[str, nn.Module] = {}
    for name in _EXPERT_ATTRIBUTES:
        model = getattr(pipe_or_module, name, None)
        if isinstance(model, nn.Module):
            experts[name] = model
    if len(experts) > 1:
        return Target(Experts(experts), pipe_or_module)
    if experts:
        return Target(next(iter(experts.values())), pipe_or_module)
    raise TypeError(
        f"Expected a diffusers pipeline with a .transformer or an nn.Module, got {type(pipe_or_module).__name__}; "
        "for a pipeline whose denoiser is elsewhere (e.g. .unet), pass that module"
    )


def step_anchor(model: nn.Module, first_layer_name: str, *, whole_block: bool = False) -> nn.Module:
    """The block holding the first cached layer (the layer itself if it is a block cached whole):
    it runs once per model call, before that layer's cached forward."""
    if whole_block:
        return model.get_submodule(first_layer_name)
    parent = first_layer_name.rpartition(".")[0]
    return model.get_submodule(parent) if parent else model.get_submodule(first_layer_name)


def attach_step_hooks(
    model: nn.Module, anchor: nn.Module, on_model_call: Callable[..., None], *, pass_inputs: bool = False,
    on_model_error: Callable[[], None] | None = None, on_anchor_call: Callable[..., None] | None = None,
) -> list[Callable[[], None]]:
    """Call ``on_model_call`` once at the start of every model call; return the undo functions.

    The model's own pre-hook marks the call, so blocks that run before the anchor (e.g. Wan
    VACE's control blocks) see the new step. The original DiT's ``forward_with_cfg`` calls
    ``self.forward`` directly, which bypasses the model's hooks: then the anchor block marks it.
    For :class:`Experts`, each expert's call marks a model call. With ``pass_inputs``,
    ``on_model_call`` receives the call's positional and keyword arguments. ``on_model_error`` is
    called where a model call raised (its step is then unfinished: the caller starts over).
    ``on_anchor_call``, where given, is called in place of ``on_model_call`` where the anchor marks
    the call (the model's own hooks did not run).
    """
    inside_model = False

    def mark(args: tuple[Any, ...], kwargs: dict[str, Any], call: Callable[..., None] = on_model_call) -> None:
        if pass_inputs:
            call(args, kwargs)
        else:
            call()

    def before_model(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        nonlocal inside_model
        inside_model = True
        mark(args, kwargs)

    def after_model(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        nonlocal inside_model
        inside_model = False
        if output is None and on_model_error is not None:  # torch runs always_call hooks with None on a raise
            on_model_error()

    def before_anchor(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not inside_model:
            mark(args, kwargs, on_anchor_call or on_model_call)

    models = list(model.children()) if isinstance(model, Experts) else [model]
    handles = [anchor.register_forward_pre_hook(before_anchor, with_kwargs=True)]
    # Under whole-model torch.compile the model's own hooks run outside the graph: kept out of
    # dynamo, they cause no graph break; the anchor's hook runs inside block 0's graph, untouched.
    outer_before, outer_after = torch.compiler.disable(before_model), torch.compiler.disable(after_model)
    for called in models:
        handles.append(called.register_forward_pre_hook(outer_before, with_kwargs=True))
        handles.append(called.register_forward_hook(outer_after, always_call=True))
    return [handle.remove for handle in handles]


class StepTracker:
    """Maps each model call to ``(step, slot)``; ``slot`` numbers the calls within one step.

    Pipelines may call the model more than once per step (classifier-free guidance run as separate
    conditional and unconditional calls). ``calls_per_step=None`` finds out: where the scheduler
    has a ``step_index`` (advanced by ``scheduler.step``, read without a device sync), a call with
    an unchanged index belongs to the same step, so the number of calls may vary from step to step
    (SD3's skip-layer guidance adds a call on some steps); then ``calls_per_step`` is the fewest
    calls any finished step made. Schedulers without a step index
    (DDIM, DDPM, PNDM) and bare modules get a fixed ``calls_per_step``, 1 unless told otherwise.
    Second-order solvers (Heun, KDPM2) advance the index at every model call, as their
    ``timesteps`` list one entry per call: there a step is one model evaluation.
    """

    MAX_AUTO_CALLS_PER_STEP = 8

    def __init__(
        self,
        num_steps: int | None,
        timesteps: Callable[[], Any | None] = lambda: None,
        calls_per_step: int | None = None,
        step_index: Callable[[], Any] | None = None,
    ) -> None:
        if calls_per_step is not None and calls_per_step < 1:
            raise ValueError(f"calls_per_step must be >= 1, got {calls_per_step}")
        self.num_steps = num_steps
        self.fixed_calls_per_step = calls_per_step
        self._timesteps = timesteps
        self._step_index = step_index
        self.reset()

    def reset(self) -> None:
        """Forget the generation in progress: the next call starts a new one."""
        self._seen_timesteps: Any | None = None
        self._calls = 0
        self._limit: int | None = None
        self.generation = -1
        self.generation_steps: int | None = None
        self.calls_per_step = self.fixed_calls_per_step or 1
        self._auto = False
        self._step = 0
        self._slot = 0
        self._seen_index: Any = None
        self._last_timestep: float | None = None

    def advance(self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> tuple[int, int, bool]:
        """Account for one model call: ``(step, slot, starts_new_generation)``. Without a scheduler,
        the call's timestep is read off its arguments where that costs no sync (:func:`host_timestep`):
        one that rises again starts a new generation (an earlier one was cut short)."""
        timesteps = self._timesteps()
        timestep = host_timestep(args, kwargs or {}) if timesteps is None else None
        new = self.generation < 0
        if timesteps is not None and timesteps is not self._seen_timesteps:
            new = True
        elif timesteps is None and self._limit is not None and self._calls >= self._limit:
            # Without a scheduler, a generation ends after its steps. With one, running past them
            # means the pipeline calls the model more often than counted: the caller reports it.
            new = True
        elif timesteps is None and timestep is not None and self._last_timestep is not None and timestep > self._last_timestep:
            new = True  # denoising runs the timestep down: a rise is the next generation's start
        if timesteps is None:
            self._last_timestep = timestep
        if new:
            self._start_generation(timesteps)
        elif self._auto:
            self._advance_by_step_index()
        else:
            self._step, self._slot = divmod(self._calls, self.calls_per_step)
        self._calls += 1
        return self._step, self._slot, new

    def _start_generation(self, timesteps: Any | None) -> None:
        self._seen_timesteps = timesteps
        self._calls = 0
        self._step = self._slot = 0
        self.generation += 1
        self.generation_steps = len(timesteps) if timesteps is not None else self.num_steps
        index = self._step_index() if self._step_index is not None else _NO_INDEX
        self._auto = self.fixed_calls_per_step is None and index is not _NO_INDEX
        self._seen_index = index
        if self._auto and self.generation == 0:
            self.calls_per_step = 0  # unknown until the first step ends
        steps = self.generation_steps if self.generation_steps is not None else self.num_steps
        self._limit = None if steps is None else steps * max(self.calls_per_step, 1)

    def _advance_by_step_index(self) -> None:
        index = self._step_index()  # type: ignore[misc]
        if index != self._seen_index:
            calls_in_step = self._slot + 1
            self.calls_per_step = min(self.calls_per_step or calls_in_step, calls_in_step)
            self._seen_index = index
            self._step += 1
            self._slot = 0
            return
        self._slot += 1
        if self._slot >= self.MAX_AUTO_CALLS_PER_STEP:
            raise StepMismatchError(
                f"The model was called {self._slot + 1} times while the scheduler's step_index stayed at "
                f"{self._seen_index}; if the pipeline does not call scheduler.step, pass calls_per_step="
            )


_NO_INDEX = object()
_TIMESTEP_NAMES = ("timestep", "timesteps", "t")


def host_timestep(args: tuple[Any, ...], kwargs: dict[str, Any]) -> float | None:
    """A model call's timestep as a number, where reading it costs no device sync: a Python number
    or a CPU tensor of at most one dimension passed as ``timestep``/``timesteps``/``t`` or as the
    second positional argument (the original DiT's ``forward(x, t, y)``); None otherwise (a GPU
    tensor, no timestep, or a second argument that is not one)."""
    value = next((kwargs[name] for name in _TIMESTEP_NAMES if name in kwargs), args[1] if len(args) > 1 else None)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if (isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.dim() <= 1 and value.numel() > 0
            and value.dtype != torch.bool and not value.dtype.is_complex):  # a timestep is a scalar or one per sample
        return float(value.reshape(-1)[0])
    return None


def scheduler_step_index(target: Target) -> Callable[[], Any] | None:
    """A reader of the pipeline scheduler's ``step_index``, or None where there is none to read."""
    if target.pipeline is None:
        return None

    def read() -> Any:
        scheduler = getattr(target.pipeline, "scheduler", None)
        if scheduler is None or not hasattr(type(scheduler), "step_index"):
            return _NO_INDEX
        return scheduler.step_index

    return read
