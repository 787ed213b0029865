"""The command line's pipelines: loading them, and building their calls (class labels or prompts).

This is the only place the command line touches diffusers, so the core stays model-agnostic.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Request", "load_pipeline", "make_requests", "num_classes", "run_request"]


@dataclass(frozen=True)
class Request:
    """One pipeline call: a batch of class labels or prompts, and the seed of its generator."""

    seed: int
    class_labels: tuple[int, ...] = ()
    prompts: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return len(self.class_labels) or len(self.prompts)

    def names(self) -> list[str]:
        return [f"class{c}" for c in self.class_labels] or [f"prompt{i}" for i in range(len(self.prompts))]


def load_pipeline(
    model: str, device: str = "cpu", dtype: str = "float32", scheduler: str | None = None, progress_bar: bool = True
) -> Any:
    """A pipeline by hub id or local folder through ``from_pretrained``; ``model="demo"`` is the shipped one."""
    torch_dtype = getattr(torch, dtype)
    if model == "demo":
        from .demo.assets import load_demo_pipeline

        pipe = load_demo_pipeline(device=device, dtype=torch_dtype, progress_bar=progress_bar)
    else:
        from diffusers import DiffusionPipeline
        from diffusers.utils import logging as diffusers_logging

        if not progress_bar:
            diffusers_logging.disable_progress_bar()

        with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; older know only torch_dtype
            warnings.simplefilter("ignore", FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=torch_dtype).to(device)
    if scheduler:
        import diffusers

        scheduler_class = getattr(diffusers, scheduler, None)
        if scheduler_class is None or not hasattr(scheduler_class, "from_config"):
            raise ValueError(f"Unknown diffusers scheduler {scheduler!r}; e.g. DDIMScheduler, DPMSolverMultistepScheduler")
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    return pipe


def _accepts(pipe: Any, name: str) -> bool:
    return name in inspect.signature(pipe.__call__).parameters


def num_classes(pipe: Any) -> int | None:
    """How many class labels a class-conditional pipeline knows, else None."""
    config = getattr(getattr(pipe, "transformer", None), "config", None)
    return getattr(config, "num_embeds_ada_norm", None) if _accepts(pipe, "class_labels") else None


def make_requests(
    pipe: Any,
    *,
    classes: Sequence[int] | None = None,
    prompts: Sequence[str] | None = None,
    samples: int = 4,
    batch: int = 4,
    seed: int = 0,
) -> list[Request]:
    """Split a calibration or generation set into pipeline calls of at most ``batch`` samples.

    Without classes or prompts, a class-conditional pipeline gets ``samples`` classes drawn with ``seed``.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if prompts:
        if not _accepts(pipe, "prompt"):
            raise ValueError(f"{type(pipe).__name__} takes no prompt; pass --classes for a class-conditional model")
        items: list[Any] = list(prompts)
    else:
        n = num_classes(pipe)
        if n is None:
            raise ValueError(f"{type(pipe).__name__} is not class-conditional; pass --prompts")
        if classes:
            bad = [c for c in classes if not 0 <= c < n]
            if bad:
                raise ValueError(f"Class labels {bad} are outside 0..{n - 1} for this model")
            items = list(classes)
        else:
            items = torch.randint(0, n, (samples,), generator=torch.Generator().manual_seed(seed)).tolist()
    requests = []
    for i, start in enumerate(range(0, len(items), batch)):
        chunk = tuple(items[start : start + batch])
        if prompts:
            requests.append(Request(seed + i, prompts=chunk))
        else:
            requests.append(Request(seed + i, class_labels=chunk))
    return requests


def run_request(pipe: Any, request: Request, steps: int, output_type: str = "pt", **kwargs: Any) -> Any:
    """Call the pipeline for one request; returns its images (a tensor for ``output_type="pt"``)."""
    device = getattr(pipe, "device", torch.device("cpu"))
    generator = torch.Generator(device=device if str(device).startswith("cuda") else "cpu").manual_seed(request.seed)
    inputs: dict[str, Any] = {"class_labels": list(request.class_labels)} if request.class_labels else {"prompt": list(request.prompts)}
    return pipe(**inputs, num_inference_steps=steps, generator=generator, output_type=output_type, **kwargs).images


def scheduler_timesteps(scheduler_config: dict[str, Any] | None, num_steps: int) -> list[float] | None:
    """The timesteps the recorded scheduler would run at ``num_steps``, or None if it cannot be rebuilt."""
    if not scheduler_config or "_class_name" not in scheduler_config:
        return None
    import diffusers

    scheduler_class = getattr(diffusers, scheduler_config["_class_name"], None)
    if scheduler_class is None:
        return None
    scheduler = scheduler_class.from_config(scheduler_config)
    try:
        scheduler.set_timesteps(num_steps)
    except TypeError:  # flow-matching schedulers that need more arguments (e.g. mu) to set timesteps
        return None
    return [float(t) for t in scheduler.timesteps]
