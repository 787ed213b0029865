"""What a cached module runs in place of its own ``forward``: compute and keep, or reuse what it kept.

A ``Decision`` per column of the plan (:mod:`.plan`: one per schedule key, two more for a layer
whose guidance halves have plans of their own) holds the step's compute/reuse flag; the handle
(:mod:`.handle`) sets it once per model call, and every forward here reads it: one attribute read
and a branch on the per-layer path. Layers keep their outputs; blocks cached whole keep what they
added to their residual streams (:mod:`.streams`); forecasting variants extrapolate from the last
two computed ones.

PyTorch's forward hooks cannot skip a module's computation, so :func:`shadow_forward` puts such a
forward on the module as an instance attribute, as diffusers' hook registry does, and returns the
function that removes it exactly (or restores an instance ``forward`` that was there before).
Under whole-model torch.compile, :func:`stream_barrier_forward` keeps a run of reusing blocks from
being fused into one reduction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..guidance import check_layer_rows, splice_half, take_half
from .compile import stream_barrier
from .streams import BlockChain, BlockStreams, Follows, KeptStates, RunKept, extrapolate

__all__ = [
    "Decision",
    "GuidanceRows",
    "KeptForm",
    "ShadowedForward",
    "StoredTensor",
    "block_caching_forward",
    "block_forecasting_forward",
    "branch_caching_forward",
    "caching_forward",
    "chained_block_forward",
    "forecasting_forward",
    "link_block",
    "repeated_caching_forward",
    "shadow_forward",
    "stored_block_caching_forward",
    "stored_caching_forward",
    "stream_barrier_forward",
]

_MISSING = object()


class Decision:
    """Compute or reuse, for every layer one schedule key governs, at the current call. ``keep``:
    the next step reuses, so a computing block must keep its residual (a layer always keeps its
    output, which costs nothing; a block's residual costs a subtraction eagerly; traced, a block
    keeps regardless, see :func:`block_caching_forward`)."""

    __slots__ = ("compute", "keep", "ratio", "slot")

    def __init__(self) -> None:
        self.compute = True
        self.keep = True
        self.ratio = 0.0  # forecasting: how far past the last computed output to extrapolate
        self.slot = 0


def caching_forward(original: Callable[..., Any], decision: Decision, outputs: dict[int, Any]) -> Callable[..., Any]:
    """The hot path: compute and keep, or hand back what was kept for this call slot."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not decision.compute:
            kept = outputs[decision.slot]
            if kept is not None:
                return kept
        output = original(*args, **kwargs)
        outputs[decision.slot] = output
        return output

    return forward


def forecasting_forward(original: Callable[..., Any], decision: Decision, outputs: dict[int, Any]) -> Callable[..., Any]:
    """As :func:`caching_forward`, but a reusing step extrapolates linearly from the last two computed
    outputs, ``last + ratio * (last - previous)`` with ``ratio`` = steps since the last compute over
    the steps between the two (a first-order Taylor step, as TaylorSeer does). Computing costs nothing
    extra: it keeps the output it replaces."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        kept = outputs[decision.slot]  # (last, previous) computed outputs
        if not decision.compute and kept is not None:
            last, previous = kept
            if previous is None or decision.ratio == 0.0:
                return last
            if isinstance(last, (tuple, list)):  # joint attention (Flux, SD3): each tensor on its own
                return type(last)(_extrapolated(a, b, decision.ratio) for a, b in zip(last, previous))
            return _extrapolated(last, previous, decision.ratio)
        output = original(*args, **kwargs)
        outputs[decision.slot] = (output, None if kept is None else kept[0])
        return output

    return forward


def _extrapolated(last: Any, previous: Any, ratio: float) -> Any:
    """``last + ratio * (last - previous)`` for a tensor; anything else (``None``, a non-tensor) as it was
    last computed."""
    if not isinstance(last, torch.Tensor) or not isinstance(previous, torch.Tensor):
        return last
    return extrapolate(last, previous, ratio)


# Under whole-model torch.compile, a block whose cached layers all reuse is pointwise work on the
# residual stream (``h + gate * kept``): its norms feed only the skipped layers, so they are dead
# code. Over a run of such blocks inductor fuses the stream into whatever reduction reads it next,
# the following block's norm or the model's final one: one kernel recomputing every block's update
# inside a reduction, which took 4.2 ms of a 5 ms reusing step of DiT-XL/2 on an H100
# (benchmarks/dit_pattern_cost.py). An opaque op on the stream where such a run ends, and every
# few blocks within one, keeps it realized: the run becomes plain pointwise kernels and one copy
# per barrier, and the dead norms go. (An earlier barrier took each reused layer's input, which kept
# those norms alive, and copied each kept output: about 1 ms more per reusing step of DiT-XL/2.)
# Where each block is compiled on its own, nothing spans blocks: barriers are for whole-model compile.
# How many blocks of a run may fuse: plan.BARRIER_EVERY.


def stream_barrier_forward(
    original: Callable[..., Any],
    decisions: Sequence[Decision],
    following: Sequence[Decision] | None,
    closes_group: bool,
    whole_model_compiled: list[bool],
) -> Callable[..., Any]:
    """A block with cached layers. Traced as part of a whole model at a step where all of them reuse,
    its output streams pass :func:`stream_barrier` if the run of such blocks ends here (the next
    block with cached layers, ``following``, computes one; or there is none) or ``closes_group``
    (every ``plan.BARRIER_EVERY``-th block). Otherwise it runs as it is."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        output = original(*args, **kwargs)
        if not (whole_model_compiled[0] and torch.compiler.is_compiling()):
            return output
        if any(decision.compute for decision in decisions):
            return output
        if not closes_group and following is not None and not any(decision.compute for decision in following):
            return output
        if isinstance(output, torch.Tensor):
            return stream_barrier(output)
        if isinstance(output, (tuple, list)):  # several streams (Flux: text, image)
            return type(output)(stream_barrier(x) if isinstance(x, torch.Tensor) else x for x in output)
        return output

    return forward


def block_caching_forward(
    original: Callable[..., Any], decision: Decision, outputs: dict[int, Any], streams: BlockStreams, keep_states: bool
) -> Callable[..., Any]:
    """As :func:`caching_forward`, for a block cached whole: keep what it added to its streams, and
    reuse as this call's inputs plus that residual.

    Eagerly, a computing step keeps the residual where the next step reuses it (``decision.keep``).
    Traced by torch.compile, it keeps at every computing step, so that the graph does not depend on
    ``keep``: with ``keep_states`` its output and inputs as they are (:class:`KeptStates`, free),
    else the residual. The first block of a list keeps the residual: its input may come from outside
    the model, where it could change in place before the reusing step."""

    keep_traced = streams.states if keep_states else streams.residual

    def forward(*args: Any, **kwargs: Any) -> Any:
        inputs = streams.inputs(args, kwargs)
        if not decision.compute:
            kept = outputs[decision.slot]
            if kept is not None:
                return streams.apply(inputs, kept)
        output = original(*args, **kwargs)
        if torch.compiler.is_compiling():
            outputs[decision.slot] = keep_traced(output, inputs)
        elif decision.keep or not decision.compute:
            outputs[decision.slot] = streams.residual(output, inputs)
        return output

    return forward


def block_forecasting_forward(
    original: Callable[..., Any], decision: Decision, outputs: dict[int, Any], streams: BlockStreams, keep_states: bool
) -> Callable[..., Any]:
    """As :func:`block_caching_forward`, but a reusing step extrapolates the block's residual from
    the last two computed ones, as :func:`forecasting_forward` does a layer's output. Every
    computing step keeps its residual (one subtraction; traced, with ``keep_states``, its output and
    inputs), since a later forecast may need it."""

    keep_traced = streams.states if keep_states else streams.residual

    def forward(*args: Any, **kwargs: Any) -> Any:
        inputs = streams.inputs(args, kwargs)
        kept = outputs[decision.slot]  # (last, previous) residuals
        if not decision.compute and kept is not None:
            last, previous = kept
            if previous is not None and decision.ratio != 0.0:
                last = streams.extrapolate(last, previous, decision.ratio)
            return streams.apply(inputs, last)
        output = original(*args, **kwargs)
        keep = keep_traced if torch.compiler.is_compiling() else streams.residual
        outputs[decision.slot] = (keep(output, inputs), None if kept is None else kept[0])
        return output

    return forward


def chained_block_forward(
    original: Callable[..., Any],
    decision: Decision,
    chain: BlockChain,
    position: int,
    streams: BlockStreams,
    one_by_one: Callable[..., Any],
    inside: list[bool],
) -> Callable[..., Any]:
    """A block of a :class:`~.streams.BlockChain`: a reusing step adds its run's kept residual at
    the run's first block (extrapolated with forecasting) and passes the stream on through the
    rest; a computing step links the block into the chain. As :func:`block_caching_forward`, it
    keeps eagerly where the next step reuses (or where nothing was kept), traced at every
    computing step; a reusing step that finds nothing kept computes.

    Where the block is compiled on its own (regional compile), its compiled call runs the chain's
    bookkeeping around the graph (:class:`~.regional.CompiledBlockCall`) and sets ``inside`` while
    the graph runs, so that the graph holds the plain block. Where the chain is off for the
    generation (a block traced inside some other compiled region), ``one_by_one``, the block's own
    forward keeping its own residual, runs instead."""
    outputs = chain.kept[position]

    def forward(*args: Any, **kwargs: Any) -> Any:
        if inside[0]:
            return original(*args, **kwargs)
        if not chain.active:
            return one_by_one(*args, **kwargs)
        inputs = streams.inputs(args, kwargs)
        if not decision.compute:
            kept = outputs[decision.slot]
            if isinstance(kept, RunKept) and kept.last is not None:  # (unfilled: its run was cut short)
                chain.reusing = position
                return streams.apply(inputs, chain.residual(kept, decision.ratio))
            if isinstance(kept, Follows) and chain.reusing == kept.start:
                return streams.passthrough(inputs)
            chain.reusing = None
        output = original(*args, **kwargs)
        if torch.compiler.is_compiling() or decision.keep or not decision.compute:
            link_block(chain, position, outputs, decision, streams.states(output, inputs))
        return output

    return forward


def link_block(chain: BlockChain, position: int, outputs: dict[int, Any], decision: Decision, states: KeptStates) -> None:
    """Record a computed block of a chain in its kept entries (``outputs``), for this call slot: what
    :meth:`~.streams.BlockChain.link` returns."""
    earlier = outputs[decision.slot] if chain.forecast else None  # (a read is a guard under torch.compile)
    outputs[decision.slot] = chain.link(position, decision.slot, states, earlier)


def repeated_caching_forward(
    original: Callable[..., Any], decision: Decision, outputs: dict[int, list[Any]], occurrence: list[int]
) -> Callable[..., Any]:
    """As :func:`caching_forward`, for a layer called several times per model call: one output per
    occurrence (``occurrence[0]`` counts this model call's calls so far; the handle zeroes it)."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        n = occurrence[0]
        occurrence[0] = n + 1
        kept = outputs[decision.slot]
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


class KeptForm:
    """Where and in what precision kept outputs are stored (``cache(kept_device=, kept_dtype=)``):
    cached outputs cost memory for as long as they may be reused; storing them on the host or in
    a lower precision trades a copy per keep and per reuse for that memory. Floating-point tensors
    are converted; anything else is kept as it is."""

    __slots__ = ("device", "dtype")

    def __init__(self, device: torch.device | None, dtype: torch.dtype | None) -> None:
        self.device, self.dtype = device, dtype

    def store(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            dtype = self.dtype if self.dtype is not None and value.is_floating_point() else value.dtype
            return StoredTensor(value.to(device=self.device or value.device, dtype=dtype, non_blocking=True), value.device, value.dtype)
        if isinstance(value, (tuple, list)):
            return type(value)(self.store(v) for v in value)
        return value

    def load(self, value: Any) -> Any:
        if isinstance(value, StoredTensor):
            return value.tensor.to(device=value.device, dtype=value.dtype, non_blocking=True)
        if isinstance(value, (tuple, list)):
            return type(value)(self.load(v) for v in value)
        return value


class StoredTensor:
    """A kept tensor in its stored form, with the device and dtype it goes back to."""

    __slots__ = ("device", "dtype", "tensor")

    def __init__(self, tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> None:
        self.tensor, self.device, self.dtype = tensor, device, dtype


def stored_caching_forward(
    original: Callable[..., Any], decision: Decision, outputs: dict[int, Any], form: KeptForm
) -> Callable[..., Any]:
    """As :func:`caching_forward`, keeping the output in ``form`` and converting it back on reuse."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not decision.compute:
            kept = outputs[decision.slot]
            if kept is not None:
                return form.load(kept)
        output = original(*args, **kwargs)
        outputs[decision.slot] = form.store(output)
        return output

    return forward


def stored_block_caching_forward(
    original: Callable[..., Any], decision: Decision, outputs: dict[int, Any], streams: BlockStreams, form: KeptForm
) -> Callable[..., Any]:
    """As :func:`block_caching_forward`, keeping the residual in ``form`` (always the residual: keeping
    a block's states elsewhere would copy twice the data)."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        inputs = streams.inputs(args, kwargs)
        if not decision.compute:
            kept = outputs[decision.slot]
            if kept is not None:
                return streams.apply(inputs, form.load(kept))
        output = original(*args, **kwargs)
        if decision.keep or not decision.compute or torch.compiler.is_compiling():
            outputs[decision.slot] = form.store(streams.residual(output, inputs))
        return output

    return forward


class GuidanceRows:
    """The batch rows of the current model call, for the forwards that split guidance halves (set
    by the handle once per call, after checking that the call batches guidance)."""

    __slots__ = ("rows",)

    def __init__(self) -> None:
        self.rows = 0


def branch_caching_forward(
    original: Callable[..., Any], first: Decision, second: Decision, outputs: dict[int, Any], batch: GuidanceRows,
    where: str,
) -> Callable[..., Any]:
    """As :func:`caching_forward`, for a layer whose guidance halves have decisions of their own
    (``first``, ``second``: batch order). Where one half computes and the other reuses, the layer
    runs on the computing half's rows only and its output is spliced with the other half's kept
    rows, as FasterCache does for the unconditional branch: that call costs half."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        kept = outputs.get(first.slot)  # None: nothing kept (emptied slots stay, see CacheState)
        if kept is None or (first.compute and second.compute):
            output = original(*args, **kwargs)
        elif not (first.compute or second.compute):
            return kept
        else:  # one half computes: only its rows run
            half, rows = (0 if first.compute else 1), batch.rows
            check_layer_rows(args, kwargs, rows, where)
            part = original(*take_half(args, rows, half), **take_half(kwargs, rows, half))
            output = splice_half(kept, part, half, where)
        outputs[first.slot] = output
        return output

    return forward


class ShadowedForward:
    """A module whose ``forward`` smoothcache replaced; calling it puts back exactly what was there."""

    def __init__(self, module: nn.Module, forward: Callable[..., Any]) -> None:
        self.module, self.forward = module, forward
        self.previous = module.__dict__.get("forward", _MISSING)
        module.forward = forward  # type: ignore[method-assign]

    def intact(self) -> bool:
        """Whether the module still runs smoothcache's forward (nothing replaced it since)."""
        return self.module.__dict__.get("forward") is self.forward

    def __call__(self) -> None:
        if self.previous is _MISSING:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.__dict__["forward"] = self.previous


def shadow_forward(module: nn.Module, forward: Callable[..., Any]) -> ShadowedForward:
    """Put the caching ``forward`` on ``module``; the result, called, undoes exactly that."""
    return ShadowedForward(module, forward)
