"""Whole-block caching: a block's output as its input plus a residual, and that residual kept.

A layer's kept output stands in for the layer while the block's norms, modulation and gates still
run; on a small-token model such as DiT-XL/2 that leftover work is latency-bound and costs a
large share of a step. Caching the whole block (the ``"block"`` component) skips it too: a
reusing step returns ``input + (output - input)`` of the last computed step, the residual the
block added to the residual stream. Calibration measures the rel-L1 change of that residual.

A block continues one or more streams: DiT's returns ``hidden_states``; Flux's returns
``(encoder_hidden_states, hidden_states)``. :class:`BlockStreams` names, per output element, the
input argument it continues, and finds those inputs in a call's arguments.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from ..errors import BlockCachingError

if TYPE_CHECKING:
    from .forwards import KeptForm

__all__ = ["BlockChain", "BlockStreams", "Follows", "KeptStates", "RunKept", "extrapolate"]


def extrapolate(last: torch.Tensor, previous: torch.Tensor, ratio: float) -> torch.Tensor:
    """``last + ratio * (last - previous)``, one fused op: ``lerp`` with weight ``-ratio`` steps from
    ``last`` away from ``previous``. Forecasting (``forecast="linear"``) extrapolates layer outputs,
    block residuals and, in calibration, the candidates it scores with it."""
    return torch.lerp(last, previous, -ratio)


class KeptStates(NamedTuple):
    """A computing step's block output and inputs, kept as they are instead of as their difference.

    Under torch.compile the residual ``output - input`` cost a kernel per block at every step that
    keeps one: inductor recomputed the block's last update from its operands to write it out, about
    0.34 ms per step of DiT-XL/2 (batch 8, H200; ``loop_profile.py``). The stream states are
    buffers the graph writes anyway, so keeping them costs nothing, and a reusing step takes the
    difference inside the kernel that adds it (one more read per block). Eagerly, the residual is
    kept: each eager op is a launch, and a reusing step would pay one more per block. Where
    neighbouring blocks keep on the same steps, a block's input is its predecessor's output, so the
    kept tensors are about one per stream and block, as residuals are. The tensors are referenced,
    not copied: whatever changes them in place before the reusing step changes the reuse (the
    runtime keeps the residual for the first block of each list, whose input may come from outside
    the model).
    """

    outputs: tuple[Any, ...]
    inputs: tuple[Any, ...]


@dataclass(frozen=True)
class BlockStreams:
    """The input arguments a block's outputs continue, in output order, and where a call passes them.

    One name: the block returns a tensor. Several: it returns a tuple with one element per name
    (an element may be ``None``, as SD3's last block returns no text stream).
    """

    block_name: str
    names: tuple[str, ...]
    positions: tuple[int | None, ...]  # index among forward's positional parameters, if it has one

    @classmethod
    def of(cls, block: nn.Module, block_name: str, names: Sequence[str]) -> BlockStreams:
        """The streams of ``block``, read from its ``forward`` signature."""
        parameters = [
            p.name
            for p in inspect.signature(block.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        missing = [name for name in names if name not in parameters]
        if missing:
            raise BlockCachingError(
                f"{block_name} ({type(block).__name__}) takes no argument {missing[0]!r}, the stream its output was "
                f"expected to continue (its arguments: {parameters}); cache its layers instead of the whole block"
            )
        return cls(block_name, tuple(names), tuple(parameters.index(name) for name in names))

    def inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """The stream tensors of one call, in output order."""
        return tuple(
            kwargs[name] if name in kwargs else args[position] if position is not None and position < len(args) else None
            for name, position in zip(self.names, self.positions)
        )

    def residual(self, output: Any, inputs: tuple[Any, ...]) -> Any:
        """What the block added to each stream: ``output - input`` (a tensor, or a tuple like the output)."""
        return self._residual(self._elements(output, inputs), inputs)

    def states(self, output: Any, inputs: tuple[Any, ...]) -> KeptStates:
        """The block's output and inputs as they are, checked as :meth:`residual` checks them."""
        return KeptStates(self._elements(output, inputs), inputs)

    def _residual(self, outputs: tuple[Any, ...], inputs: tuple[Any, ...]) -> Any:
        residuals = tuple(None if out is None else out - x for out, x in zip(outputs, inputs))
        return residuals[0] if len(self.names) == 1 else residuals

    def as_residual(self, kept: Any) -> Any:
        """A kept residual, or the residual of :class:`KeptStates`."""
        return self._residual(kept.outputs, kept.inputs) if isinstance(kept, KeptStates) else kept

    def apply(self, inputs: tuple[Any, ...], kept: Any) -> Any:
        """The block's output rebuilt from this call's inputs and a kept residual (or :class:`KeptStates`)."""
        residual = self.as_residual(kept)
        # The kept residual first: the sum takes its (contiguous) layout, where an input may be a
        # transposed view (DiT's patch embedding), which would make every later block's adds strided.
        if len(self.names) == 1:
            return residual + inputs[0]
        return tuple(None if r is None else r + x for x, r in zip(inputs, residual))

    def passthrough(self, inputs: tuple[Any, ...]) -> Any:
        """This call's stream inputs as the block's output: a block inside a reused chain adds nothing."""
        return inputs[0] if len(self.names) == 1 else tuple(inputs)

    def extrapolate(self, last: Any, previous: Any, ratio: float) -> Any:
        """``last + ratio * (last - previous)`` for each stream's residual (forecast="linear"); either
        may be kept as :class:`KeptStates`."""
        last, previous = self.as_residual(last), self.as_residual(previous)
        if len(self.names) == 1:
            return extrapolate(last, previous, ratio)
        return tuple(a if a is None or b is None else extrapolate(a, b, ratio) for a, b in zip(last, previous))

    def _elements(self, output: Any, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        """The output's elements, checked to continue the inputs (same shapes), else a clear error."""
        outputs = (output,) if len(self.names) == 1 else tuple(output) if isinstance(output, (tuple, list)) else None
        if outputs is None or len(outputs) != len(self.names):
            raise BlockCachingError(
                f"{self.block_name} returned {_describe(output)}, not one tensor per stream {list(self.names)}; "
                "cache its layers instead of the whole block"
            )
        for name, out, x in zip(self.names, outputs, inputs):
            if out is None:
                continue
            if not isinstance(out, torch.Tensor) or not isinstance(x, torch.Tensor) or out.shape != x.shape:
                raise BlockCachingError(
                    f"{self.block_name} returned {_describe(out)} for stream {name!r}, whose input was {_describe(x)}: "
                    "a block is cached whole only where its output continues its input; cache its layers instead"
                )
        return outputs


class RunKept:
    """What the first block of a chained run keeps: the run's residual per stream (``last``; with
    forecasting also the one before, where that run ended at the same block), and its last block.

    Mutable, and made when the run opens: the first block stores it in its own kept entries then,
    and the run's last block fills it in, so that no block writes another block's entries."""

    __slots__ = ("end", "last", "previous")

    def __init__(self, previous: RunKept | None = None) -> None:
        self.end = -1
        self.last: Any = None
        self.previous: Any = previous  # the run kept before; replaced by its residual when closed


class Follows(NamedTuple):
    """Kept by a block inside a chained run: it passes its input on where the run's first block
    (``start``) reuses."""

    start: int


class BlockChain:
    """A module list's blocks cached whole on one schedule, reused as one (or two lists the model
    runs back to back, planned alike: :func:`.plan._chains`).

    Where each block's input is its predecessor's output, the chain adds ``output_last - input_first``
    to its stream, so a reusing step needs one kept residual per stream instead of one per block:
    the first block returns its input plus that residual and the others pass their input on. That
    is a block's worth of memory instead of the list's (DiT-XL/2: 28 blocks), and one addition
    instead of one per block. The chain is checked at every computing step that keeps: where
    something changes the stream between two blocks (a ControlNet residual, say), the next block
    starts a run of its own, with its own residual, and reuse stays exact. A block's output read
    elsewhere is why only whole lists chain, each planned on one column (:func:`.plan._chains`).

    ``kept`` holds each block's per-slot entries (a :class:`RunKept`, a :class:`Follows` or None);
    ``reusing`` is the position of the run whose first block reused in the current call.
    """

    def __init__(self, length: int, streams: BlockStreams, forecast: bool, form: KeptForm | None = None) -> None:
        self.kept: list[dict[int, Any]] = [{} for _ in range(length)]
        self.streams = streams
        self.forecast = forecast
        self.form = form  # kept_device / kept_dtype: the residual is stored in that form
        self.active = True  # set per generation: off where blocks are compiled one by one
        self.reusing: int | None = None
        self._start: int | None = None  # the open run's first block, during a computing call
        self._run: RunKept | None = None  # what it keeps, filled in when the run closes
        self._slot = 0  # the call slot the open run belongs to
        self._inputs: tuple[Any, ...] = ()  # its stream inputs
        self._last: tuple[Any, ...] = ()  # the latest block's outputs
        self._next = 0  # the position that continues the open run

    def link(self, position: int, slot: int, states: KeptStates, earlier: Any) -> RunKept | Follows:
        """Record a computed block and return what it keeps (``earlier``: what it kept before): a
        :class:`Follows` where it continues the open run (its inputs are the previous block's
        outputs), else a new :class:`RunKept`, which opens a run; the chain's last block closes the
        run (a call that stops earlier leaves it to :meth:`end_call`). The block stores the entry
        in its own kept entries."""
        continues = (
            self._start is not None and position == self._next and slot == self._slot
            and all(x is out for x, out in zip(states.inputs, self._last, strict=True))
        )
        entry: RunKept | Follows
        if continues:
            entry = Follows(self._start)  # type: ignore[arg-type]
        else:
            self.end_call()
            entry = self._run = RunKept(earlier if self.forecast and isinstance(earlier, RunKept) else None)
            self._start, self._slot, self._inputs = position, slot, states.inputs
        self._last, self._next = states.outputs, position + 1
        if position == len(self.kept) - 1:
            self.end_call()
        return entry

    def start_call(self) -> None:
        """At every model call's start: close a run the last call left open (:meth:`end_call`) and
        forget which run reused in it, so that a call skipping a run's first block computes the
        blocks after it instead of passing their input on."""
        self.end_call()
        self.reusing = None

    @property
    def open(self) -> bool:
        """Whether a run is open: the next model call's start closes it (GPU work outside any call)."""
        return self._start is not None

    def end_call(self) -> None:
        """Close the open run in the slot that opened it: at the list's last block, or where a model
        call ended before it (SD3's skip-layer guidance skipping the last block; a list called in
        another order). The handle calls this at every model call's start."""
        if self._start is None:
            return
        end = self._next - 1
        residual = self.streams.residual(self._last if len(self._last) > 1 else self._last[0], self._inputs)
        if self.form is not None:
            residual = self.form.store(residual)
        run = self._run
        assert run is not None
        earlier = run.previous
        run.end, run.last = end, residual
        run.previous = earlier.last if earlier is not None and earlier.end == end else None
        self.abandon()

    def abandon(self) -> None:
        """Forget the open run (a model call raised, a generation starts, the cache is disabled):
        its first block's entry stays unfilled (``last`` None), so a reuse there computes."""
        self._start, self._run, self._inputs, self._last = None, None, (), ()

    def residual(self, kept: RunKept, ratio: float) -> Any:
        """The run's residual for this step: kept, or extrapolated from the last two (forecasting)."""
        if self.form is not None:
            return self.form.load(kept.last)  # (no forecasting with a stored form)
        if kept.previous is None or ratio == 0.0:
            return kept.last
        return self.streams.extrapolate(kept.last, kept.previous, ratio)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return type(value).__name__
