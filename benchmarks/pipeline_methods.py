"""Each method the pipeline benchmarks time, put in place on a pipeline and taken down (issue 20).

torch.compile, smoothcache's whole blocks and layers, cache-dit's F1B0 static mask, prefetch and step
graphs, each library set up its documented way round (``configured``), or switched on for one
generation of an in-turn cell (``enabled``, ``cache_dit_on``); then undone, so that the next
configuration starts from nothing this one left. ``pipeline_speed.py`` and ``stacking_speed.py``
time them; ``compile_variation.py`` uses the step-graph parts. The tests replace ``configured``,
``enabled``, ``attach_step_graphs`` and ``replays_on`` here: the scripts call them through this
module, and this module by their global names, so a patch here also reaches ``configured`` and
``never_runs``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import gpu_peers
import torch
from pipeline_settings import (
    BLOCKS,
    CACHE_DIT,
    LAYERS,
    STEP_GRAPHS,
    Config,
    is_compiled,
)
from pipeline_workloads import Workload
from torch import nn

import smoothcache
from smoothcache import Schedule
from smoothcache.bench import compile_blocks, uncompile_blocks


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside a ``torch.compile`` wrapper."""
    return getattr(model, "_orig_mod", model)


@dataclass
class Attached:
    """A configuration in place: smoothcache's handle where it caches, how it was set up, and what
    failed while taking it down."""

    handle: Any = None
    graphs: Any = None  # smoothcache.step_graphs' handle, under the "graphs" setting
    how: list[str] = field(default_factory=list)
    teardown_errors: list[str] = field(default_factory=list)


@contextlib.contextmanager
def configured(work: Workload, config: Config, backend: str) -> Iterator[Attached]:
    """Compile (as ``config`` says) and attach the method, each library its documented way round;
    then prefetch; undo all of it afterwards, in reverse, from a reset dynamo."""
    pipe, attached, undo = work.pipe, Attached(), []
    torch._dynamo.reset()

    def compile_transformer() -> None:
        how = compile_transformer_of(pipe, config.compile, backend, undo)
        if how:
            attached.how.append(how)

    try:
        if config.method == CACHE_DIT:  # cache-dit's docs: enable_cache(pipe), then torch.compile
            cache_dit_undo = contextlib.ExitStack()
            cache_dit_undo.enter_context(cache_dit_enabled(pipe, work.steps, work.mask))
            undo.append(cache_dit_undo.close)
            attached.how.append(CACHE_DIT_HOW)
        compile_transformer()
        if config.method in (BLOCKS, LAYERS):  # smoothcache's docs: cache the compiled pipeline
            attached.handle = smoothcache.cache(pipe, schedule_of(work, config.method))
            undo.append(attached.handle.disable)
            attached.how.append(smoothcache_how(work, config.method))
        if config.prefetch:
            undo.append(smoothcache.prefetch_timesteps(pipe, device_once=True).disable)
            attached.how.append(PREFETCH_HOW)
        if config.compile in STEP_GRAPHS:
            # compiled, two plain generations: the first of a (batch, method) may be the counting
            # one, run under force_eager, and nothing may compile inside a capture
            attached.graphs = attach_step_graphs(pipe, STEP_GRAPHS[config.compile])
            undo.append(attached.graphs.disable)
            attached.how.append("smoothcache.step_graphs(pipe)")
        yield attached
    finally:
        undo_all(undo, attached.teardown_errors)


def compile_transformer_of(pipe: Any, compile_mode: str, backend: str, undo: list[Callable[[], Any]]) -> str | None:
    """``pipe.transformer`` compiled as ``compile_mode`` says (nothing for the eager settings), its
    undoing appended to ``undo``; how, in words."""
    if not is_compiled(compile_mode):
        return None
    if compile_mode == "regional":
        return compile_blocks_of(pipe.transformer, backend, undo)
    mode = {"mode": "reduce-overhead"} if compile_mode == "cudagraphs" and backend == "inductor" else {}
    pipe.transformer = torch.compile(pipe.transformer, backend=backend, **mode)
    undo.append(lambda: setattr(pipe, "transformer", unwrapped(pipe.transformer)))
    shown = ", mode='reduce-overhead'" if mode else ""
    return f"pipe.transformer = torch.compile(pipe.transformer, backend={backend!r}{shown})"


def compile_blocks_of(transformer: Any, backend: str, undo: list[Callable[[], Any]]) -> str:
    """Regional compile (``smoothcache.bench.compile_blocks``), its undoing appended to ``undo``; how, in words."""
    undo.append(lambda: uncompile_blocks(transformer))
    return compile_blocks(transformer, backend=backend)


def undo_all(undo: Sequence[Callable[[], Any]], errors: list[str]) -> None:
    """Run ``undo`` in reverse, each failure recorded in ``errors`` (the rest still run), then reset
    dynamo and free memory: the next configuration starts from nothing left by this one."""
    for step in reversed(undo):
        try:
            step()
        except Exception as error:  # noqa: BLE001 - recorded in the rows; the next configuration goes on
            errors.append(f"{type(error).__name__}: {error}"[:500])
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


PREFETCH_HOW = "smoothcache.prefetch_timesteps(pipe, device_once=True)"


CACHE_DIT_HOW = ("cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, "
                 "steps_computation_mask=mask, steps_computation_policy='static'))")


def f1b0_static_mask(steps: int, mask: Sequence[int]) -> Any:
    """cache-dit's F1B0 static mask: its first block at every step, the others at the mask's steps."""
    import cache_dit

    return cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, num_inference_steps=steps,
                                   steps_computation_mask=list(mask), steps_computation_policy="static")


def cached_keys(work: Workload, method: str) -> tuple[str, ...]:
    """The schedule's keys: whole blocks (``BLOCKS``) or the family's default layers (``LAYERS``)."""
    return work.block_keys if method == BLOCKS else work.layer_keys


def schedule_of(work: Workload, method: str) -> Schedule:
    return Schedule({key: list(work.mask) for key in cached_keys(work, method)})


def smoothcache_how(work: Workload, method: str) -> str:
    return f"smoothcache.cache(pipe, Schedule({{{', '.join(map(repr, cached_keys(work, method)))}: mask}}))"


SWITCHED_HOW = "handle.disable(); handle.enable() before each of its generations, handle.disable() after"


def cached_switched_off(work: Workload, method: str) -> Any:
    """smoothcache's schedule for ``method`` cached on the (compiled) pipeline, then disabled at
    once, for an in-turn cell: one handle may hold a model at a time (a second enabled one is
    refused), disabled ones coexist, and each is enabled for its own generations only (``SWITCHED_HOW``)."""
    handle = smoothcache.cache(work.pipe, schedule_of(work, method))
    handle.disable()
    return handle


def attach_step_graphs(pipe: Any, warmup_generations: int) -> smoothcache.StepGraphs:
    """``smoothcache.step_graphs``: the seam where the tests put a CPU stand-in for CUDA graphs."""
    return smoothcache.step_graphs(pipe, warmup_generations=warmup_generations)


def replays_on(device: torch.device) -> bool:
    """Whether step graphs can replay on ``device`` (the tests' stand-in replays on the CPU)."""
    return device.type == "cuda"


def never_runs(config: Config, device: torch.device) -> str | None:
    """Why ``config`` is never measured, whatever the time: step graphs off CUDA, or cache-dit with step graphs."""
    if config.compile in STEP_GRAPHS and not replays_on(device):
        return "smoothcache.step_graphs replays CUDA graphs: it needs a CUDA GPU"
    if config.compile in STEP_GRAPHS and config.method == CACHE_DIT:
        return "step_graphs is smoothcache's; cache-dit's CUDA graphs are the cudagraphs cell"
    return None


def enabled(handle: Any) -> contextlib.AbstractContextManager[Any]:
    """A smoothcache handle enabled for one generation: the handle is its own context manager
    (``with handle:`` enables it, leaving the block disables it). A seam for the tests."""
    return handle


@contextlib.contextmanager
def cache_dit_on(work: Workload, prefetch: Any) -> Iterator[None]:
    """cache-dit for one generation, enabled as ``configured`` enables it: before prefetch, which
    is suspended around ``enable_cache`` (cache-dit then wraps the pipeline's own class and the
    device memo stays off, as for a user who enables cache-dit first); afterwards disabled, and the
    forward its ``disable_cache`` leaves on the transformer put back, so that no other method runs it."""
    with contextlib.ExitStack() as undo:  # unwinds every step, even past one that fails
        if prefetch is not None:
            prefetch.disable()
            undo.callback(prefetch.enable)
        undo.enter_context(cache_dit_enabled(work.pipe, work.steps, work.mask, quiet=True))
        if prefetch is not None:
            silenced(prefetch.enable, "smoothcache.device_once")()
            undo.callback(prefetch.disable)
        yield


@contextlib.contextmanager
def cache_dit_enabled(pipe: Any, steps: int, mask: Sequence[int], *, quiet: bool = False) -> Iterator[None]:
    """cache-dit's F1B0 static mask on ``pipe``, its documented way (``enable_cache(pipe)``), undone
    afterwards: disabled (also after an ``enable_cache`` that failed halfway; ``quiet``: without the
    line cache-dit logs), and the forward its ``disable_cache`` leaves on the transformer put back."""
    import cache_dit

    with contextlib.ExitStack() as undo:
        undo.callback(gpu_peers.restorer(pipe.transformer))
        disable = silenced(cache_dit.disable_cache, "cache_dit.caching.cache_interface") if quiet else cache_dit.disable_cache
        undo.callback(disable, pipe)
        cache_dit.enable_cache(pipe, cache_config=f1b0_static_mask(steps, mask))
        yield


def silenced(call: Callable[..., Any], logger_name: str) -> Callable[..., Any]:
    """``call`` with the logger ``logger_name`` off: cache-dit's turns toggle it every generation, and
    each toggle logs what is meant here (cache-dit's hooks released; the device memo left off)."""
    logger = logging.getLogger(logger_name)

    def quietly(*args: Any) -> Any:
        was, logger.disabled = logger.disabled, True
        try:
            return call(*args)
        finally:
            logger.disabled = was

    return quietly


def prefetch_available() -> bool:
    return hasattr(smoothcache, "prefetch_timesteps")
