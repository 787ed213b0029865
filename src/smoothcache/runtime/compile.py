"""What the cache needs to know about torch.compile and CUDA graphs, and the one op it adds.

Whether a model runs compiled (whole, or any module in it), cudagraph trees' step mark, the
recompile limit a schedule's patterns must fit under, and :func:`stream_barrier`, the opaque op
that keeps a run of reusing blocks from being fused into one reduction
(:func:`~smoothcache.runtime.forwards.stream_barrier_forward` says when it is used).
"""

from __future__ import annotations

import logging
import sys

import torch
from torch import nn

from ..steps import Experts

__all__ = [
    "compiled_anywhere",
    "compiled_whole",
    "cuda_graphs_anywhere",
    "cudagraph_step_mark",
    "launches_each_kernel",
    "replays_step_graphs",
    "stream_barrier",
    "warn_if_past_recompile_limit",
]

logger = logging.getLogger(__name__)


@torch.library.custom_op("smoothcache::stream_barrier", mutates_args=())
def stream_barrier(stream: torch.Tensor) -> torch.Tensor:
    """The block's output stream (a copy: a custom op may not return its input)."""
    return stream.clone()


@stream_barrier.register_fake
def _(stream: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(stream)


# a copy passes its gradient through (guidance by gradients through a model compiled whole)
stream_barrier.register_autograd(lambda ctx, grad: grad)


def compiled_whole(model: nn.Module) -> bool:
    """Whether ``model`` runs as one compiled graph: ``torch.compile(model)``, ``model.compile()`` or
    ``model.forward = torch.compile(model.forward)``; for :class:`~smoothcache.steps.Experts`, whether
    one of its experts does (each is called on its own)."""
    if isinstance(model, Experts):
        return any(compiled_whole(expert) for expert in model.children())
    return (
        isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
        or getattr(model, "_compiled_call_impl", None) is not None
        or hasattr(model.__dict__.get("forward"), "_torchdynamo_orig_callable")
    )


def compiled_anywhere(model: nn.Module) -> bool:
    """Whether ``model``, or any module in it, runs compiled."""
    return any(compiled_whole(module) for module in model.modules())


def cuda_graphs_anywhere(model: nn.Module) -> bool:
    """Whether a compiled part of ``model`` replays CUDA graphs: compiled with
    ``mode="reduce-overhead"`` (inductor's ``triton.cudagraphs``), or with inductor's global switch on."""
    for module in model.modules():
        for compiled in (module, getattr(module, "_compiled_call_impl", None), module.__dict__.get("forward")):
            get_config = getattr(compiled, "get_compiler_config", None)
            config = get_config() if callable(get_config) else None
            if isinstance(config, dict) and config.get("triton.cudagraphs"):
                return True
    inductor_config = sys.modules.get("torch._inductor.config")
    return bool(inductor_config is not None and inductor_config.triton.cudagraphs and compiled_anywhere(model))


def replays_step_graphs(model: nn.Module) -> bool:
    """Whether ``smoothcache.step_graphs`` replays ``model``'s calls from CUDA graphs (its forward says so)."""
    return getattr(model.__dict__.get("forward"), "_smoothcache_step_graphs", None) is not None


def launches_each_kernel(model: nn.Module) -> bool:
    """Whether ``model`` runs compiled on a GPU without CUDA graphs (torch's or step graphs): the host
    then launches every kernel of a step, so work a reusing step leaves behind costs launch time even
    when tiny."""
    device = next((p.device for p in model.parameters()), None)
    return (device is not None and device.type == "cuda" and compiled_anywhere(model)
            and not cuda_graphs_anywhere(model) and not replays_step_graphs(model))


def cudagraph_step_mark() -> int | None:
    """cudagraph trees' count of ``cudagraph_mark_step_begin()`` calls (private to torch; None where
    it is not there)."""
    trees = sys.modules.get("torch._inductor.cudagraph_trees")
    box = getattr(trees, "MarkStepBox", None)
    return getattr(box, "mark_step_counter", None)


def warn_if_past_recompile_limit(model: nn.Module, patterns: int) -> None:
    """Dynamo runs a function eagerly once it has more graphs than its recompile limit: say so up front."""
    compiled = compiled_anywhere(model)
    limit = torch._dynamo.config.recompile_limit
    if compiled and patterns > limit:
        logger.warning(
            "The schedule uses %d compute/reuse patterns, each one graph under torch.compile, but "
            "torch._dynamo.config.recompile_limit is %d: past it the model runs uncompiled. Raise the "
            "limit to at least %d (twice that if the model compiles two variants of a region itself)",
            patterns, limit, patterns,
        )
