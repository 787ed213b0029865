"""The peers, attached to a DiTPipeline the way their documentation says: diffusers' cache hooks,
cache-dit's DBCache, and the reference package ``dit-smoothcache``.

Each ``attach_*`` takes the pipeline and returns the function that detaches again, so a harness can
run every method on one model, one after the other. ``ComputeMeter`` measures the work any of them
really did, the same way for all: it counts the executions of a Linear inside each block's attn1
and ff (a hook on attn1 itself would also fire when a cache hands back a kept output).
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from types import ModuleType
from typing import Any

import torch
from torch import nn

__all__ = ["ComputeMeter", "Detach", "attach_cache_dit", "attach_diffusers_hook", "attach_reference",
           "calibrate_mag_ratios", "load_reference_package", "quiet_cache_dit"]

Detach = Callable[[], None]


class ComputeMeter:
    """Counts real executions of each block's attn1 and ff through a Linear inside each."""

    def __init__(self, transformer: nn.Module) -> None:
        self.counts = {"attn1": 0, "ff": 0}
        self._handles = []
        for block in transformer.transformer_blocks:
            for layer, inner in (("attn1", block.attn1.to_q), ("ff", block.ff.net[2])):
                self._handles.append(inner.register_forward_hook(lambda *_, layer=layer: self._hit(layer)))

    def _hit(self, layer: str) -> None:
        self.counts[layer] += 1

    def take(self) -> dict[str, int]:
        """The counts since the last ``take``, and zero again."""
        counts, self.counts = self.counts, {"attn1": 0, "ff": 0}
        return counts

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


# ---- diffusers' hooks ----------------------------------------------------------------------------
@contextlib.contextmanager
def diffusers_cache_context(transformer: nn.Module, steps: int) -> Iterator[dict[str, Any]]:
    """Set diffusers' cache context before every transformer call (DiTPipeline sets none); the dict
    holds the current timestep for hooks that ask for it by callback."""
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    state: dict[str, Any] = {"timestep": 1000.0, "call": 0}

    def before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        value = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        state["timestep"] = value
        step = state["call"] % steps
        state["call"] += 1
        _set_cache_context(module, CacheContext("cfg-batch", step_index=step, num_inference_steps=steps, timestep=value))

    handle = transformer.register_forward_pre_hook(before, with_kwargs=True)
    try:
        yield state
    finally:
        handle.remove()


def remove_diffusers_hooks(transformer: nn.Module) -> None:
    """Every diffusers hook off the transformer and its children, as before."""
    from diffusers.hooks import HookRegistry

    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if isinstance(registry, HookRegistry):
            for name in list(registry.hooks):
                registry.remove_hook(name, recurse=False)


def attach_diffusers_hook(pipe: Any, apply: Callable[[dict[str, Any]], None], steps: int) -> Detach:
    """Apply a diffusers hook with ``apply(state)``; the cache context is set around every call and
    ``state["timestep"]`` is the current timestep (for the hooks that take a callback)."""
    from diffusers.hooks import HookRegistry

    context = diffusers_cache_context(pipe.transformer, steps)
    state = context.__enter__()
    apply(state)
    # the root registry caches its children's registries: hooks on new modules must be seen
    HookRegistry.check_if_exists_or_initialize(pipe.transformer).invalidate_child_registries_cache()

    def detach() -> None:
        context.__exit__(None, None, None)
        remove_diffusers_hooks(pipe.transformer)

    return detach


def calibrate_mag_ratios(pipe: Any, generate: Callable[[], Any], steps: int) -> list[float]:
    """MagCache's documented calibration: one run with ``calibrate=True``, which prints the ratios."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    detach = attach_diffusers_hook(
        pipe, lambda _: apply_mag_cache(pipe.transformer, MagCacheConfig(num_inference_steps=steps, calibrate=True)),
        steps)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            generate()
    finally:
        detach()
    lines = [line for line in printed.getvalue().splitlines() if line.startswith("[") and not line.startswith("[MagCache")]
    if not lines:
        raise RuntimeError("MagCache's calibration printed no ratios")
    return [float(x) for x in ast.literal_eval(lines[-1])]


# ---- cache-dit -----------------------------------------------------------------------------------
def quiet_cache_dit() -> None:
    """cache-dit logs a table per generation at INFO; keep its warnings only."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("cache_dit"):
            logging.getLogger(name).setLevel(logging.WARNING)


def attach_cache_dit(pipe: Any, steps: int, *, fn: int, threshold: float | None = None,
                     mask: Sequence[int] | None = None, taylorseer: bool = False) -> Detach:
    """cache-dit's DBCache: ``fn`` front blocks always computed, the rest skipped when the front
    blocks' residual changed by less than ``threshold``, or on a static step ``mask``; optionally its
    TaylorSeer calibrator (order 1) predicts the skipped residual."""
    import cache_dit

    kwargs: dict[str, Any] = {"Fn_compute_blocks": fn, "Bn_compute_blocks": 0, "num_inference_steps": steps}
    if mask is not None:
        kwargs.update(steps_computation_mask=list(mask), steps_computation_policy="static")
    if threshold is not None:
        kwargs["residual_diff_threshold"] = threshold
    calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1) if taylorseer else None
    cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(**kwargs), calibrator_config=calibrator)
    quiet_cache_dit()
    return lambda: cache_dit.disable_cache(pipe)


# ---- the reference package -----------------------------------------------------------------------
def load_reference_package() -> ModuleType | None:
    """The reference package ``dit-smoothcache`` (it installs a top-level ``SmoothCache``, which this
    package's compatibility module also provides), imported under another name; None if absent."""
    if "SmoothCache_reference" in sys.modules:
        return sys.modules["SmoothCache_reference"]
    try:
        dist = metadata.distribution("dit-smoothcache")
    except metadata.PackageNotFoundError:
        return None
    init = dist.locate_file("SmoothCache/__init__.py")
    if not os.path.isfile(str(init)):
        return None
    spec = importlib.util.spec_from_file_location("SmoothCache_reference", str(init),
                                                  submodule_search_locations=[os.path.dirname(str(init))])
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules["SmoothCache_reference"] = module
    with contextlib.redirect_stdout(io.StringIO()):
        spec.loader.exec_module(module)
    return module


def attach_reference(pipe: Any, reference: ModuleType, schedule: dict[str, list[int]]) -> Detach:
    """The reference's helper over the DiT's blocks on ``schedule`` (its ``enable()`` resets its step
    counters). It prints on every wrapped call; callers silence stdout while generating."""
    from diffusers.models.attention import BasicTransformerBlock

    helper = reference.SmoothCacheHelper(pipe.transformer, BasicTransformerBlock, list(schedule), schedule)
    helper.enable()
    return helper.disable
