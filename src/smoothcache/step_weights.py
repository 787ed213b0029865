"""How much an error in the model's output at each step moves the sample: the step's sensitivity.

Reusing a layer's output costs an error in the model's output at that step, but the solver turns
equal output errors into unequal sample errors: on DDIM at 20 steps, the first step moves the
latent twelve times as far per unit of output error as the last but one, and the last step hardly
moves it. The optimal solver weighs each step's reuse error by this sensitivity, so computes go
where errors move the sample most (on the demo model: 2-6 dB PSNR at every budget, ``docs/solvers/``).

The sensitivity is measured on the real trajectory during calibration, by the scheduler's own
``step``: on a copy of the scheduler, the step is taken once with the model output and once with
the output scaled by ``1 + h``; the relative change of the new sample over ``h`` is the weight.
It is dimensionless, so variance-preserving, variance-exploding and flow schedulers compare alike,
and nothing about a scheduler's formula is assumed. What it leaves out: the model's response to the
changed sample at later steps (errors partly denoised away, or amplified).
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["StepProbe", "sample_of"]

logger = logging.getLogger(__name__)

RELATIVE_NUDGE = 1e-2  # h: small against the output, large against float32 rounding


def sample_of(result: Any) -> torch.Tensor:
    """The new sample a scheduler's ``step`` returns, as a ``SchedulerOutput`` or a tuple."""
    prev_sample = getattr(result, "prev_sample", None)
    if isinstance(prev_sample, torch.Tensor):
        return prev_sample
    if isinstance(result, (tuple, list)) and result and isinstance(result[0], torch.Tensor):
        return result[0]
    raise TypeError(f"Cannot find the new sample in a scheduler step result of type {type(result).__name__}")


def _same_noise(generator: Any) -> Any:
    """A generator in the same state, so that a stochastic step draws the same noise as the real one."""
    if isinstance(generator, torch.Generator):
        twin = torch.Generator(device=generator.device)
        twin.set_state(generator.get_state())
        return twin
    if isinstance(generator, (list, tuple)):
        return [_same_noise(g) for g in generator]
    return generator


class StepProbe:
    """Wraps a scheduler's ``step`` while attached: each call also records the step's sensitivity.

    The real step runs unchanged on the real scheduler; the probes run on copies of it, in float32.
    Sensitivities stay on the device (``taken``) until read, so probing adds no host sync.
    """

    def __init__(self, scheduler: Any, on_step: Callable[[torch.Tensor], None]) -> None:
        self.scheduler = scheduler
        self.on_step = on_step
        self._attached = False

    def attach(self) -> StepProbe:
        if not self._attached:
            self.scheduler.step = self._step  # an instance attribute over the class's method
            self._attached = True
        return self

    def detach(self) -> None:
        if self._attached:
            del self.scheduler.step  # the class's method shows through again
            self._attached = False

    def _step(self, *args: Any, **kwargs: Any) -> Any:
        step = type(self.scheduler).step
        try:
            self.on_step(self._sensitivity(step, args, kwargs))
        except Exception as error:  # noqa: BLE001 (a probe must never break the generation)
            logger.debug("Step sensitivity not measured (%s: %s)", type(error).__name__, error)
        return step(self.scheduler, *args, **kwargs)

    def _sensitivity(self, step: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        # by name, as schedulers order their arguments differently (CogVideoX's DPM takes two samples)
        call = inspect.signature(step).bind(self.scheduler, *args, **kwargs)
        output = call.arguments["model_output"].detach().float()
        sample = call.arguments["sample"].detach().float()
        cuda = [sample.device] if sample.device.type == "cuda" else []
        news = []
        for scale in (1.0, 1.0 + RELATIVE_NUDGE):
            probe = object.__new__(type(self.scheduler))
            probe.__dict__.update(copy.deepcopy({k: v for k, v in vars(self.scheduler).items() if k != "step"}))
            arguments = dict(call.arguments, model_output=output * scale, sample=sample)
            arguments[next(iter(call.arguments))] = probe  # self
            if "generator" in arguments:
                arguments["generator"] = _same_noise(arguments["generator"])
            probe_call = inspect.BoundArguments(call.signature, arguments)  # type: ignore[arg-type]
            # a step without a generator draws from the global RNG: the probe leaves it as it found it
            with torch.random.fork_rng(devices=cuda):
                news.append(sample_of(step(*probe_call.args, **probe_call.kwargs)).float())
        base, nudged = news
        change = torch.linalg.vector_norm(nudged - base) / torch.linalg.vector_norm(base).clamp_min(1e-30)
        return change / RELATIVE_NUDGE
