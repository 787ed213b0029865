"""Everything a cache holds between model calls, in one object with an explicit reset.

Outputs are kept per cached module and call slot (the n-th model call of a step: conditional and
unconditional calls keep apart). Under ``torch.compile`` the compiled graphs read the kept-output
dicts, so nothing they read changes between generations: a module's slots are made once (``None``
until a slot keeps something) and emptied, never removed; the dicts themselves live as long as
the handle is enabled.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..guidance import input_shape
from .forwards import GuidanceRows, StoredTensor
from .streams import RunKept

__all__ = ["CacheState"]

logger = logging.getLogger(__name__)


# Call slots every kept-output dict has from the start. Under torch.compile dynamo may guard on a
# kept-output dict's size (it did for chained blocks, and cost per-block caches a graph): a slot opened
# during the first generation (a second model call per step, guidance run apart: Wan) would then
# recompile the second generation. Pipelines with more calls per step open more, once.
PREOPENED_SLOTS = 4


class CacheState:
    """Kept outputs and per-call bookkeeping of one enabled handle."""

    def __init__(self) -> None:
        self.outputs: list[dict[int, Any]] = []  # per cached module: call slot -> kept output(s), None if none
        self.occurrences: list[list[int]] = []  # per repeated layer: its calls in this model call
        self.guidance = GuidanceRows()  # the current call's batch rows, for guidance halves cached apart
        self.guidance_checked: set[tuple[int, tuple[int, ...] | None]] = set()  # (slot, shape) seen to batch guidance
        self.whole_model_compiled = [False]  # read by traced blocks: see forwards.stream_barrier_forward
        self.marked_step: int | None = None  # cudagraph trees' step mark, as this generation's start left it
        self.warn_marks = True  # until a mark within a generation has been warned about
        self.thread: int | None = None  # the thread whose generation this is (one generation at a time)
        self.last_step = -1  # the step of the last model call
        self.intruded = False  # another thread's call was refused during this generation
        self._slots = 0  # call slots every module has an entry for
        self._input_shapes: dict[int, tuple[int, ...] | None] = {}  # per call slot: at its last call

    def new_outputs(self) -> dict[int, Any]:
        """The kept-output dict of one more cached module, with every slot opened so far."""
        outputs: dict[int, Any] = dict.fromkeys(range(max(self._slots, PREOPENED_SLOTS)))
        self.outputs.append(outputs)
        return outputs

    def new_occurrence(self) -> list[int]:
        occurrence = [0]
        self.occurrences.append(occurrence)
        return occurrence

    def new_generation(self) -> None:
        """Forget every kept output (the slots stay, emptied) and what earlier calls looked like."""
        self._forget(None)
        self._input_shapes.clear()
        self.guidance_checked.clear()
        self.marked_step = None

    def new_call(self, slot: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Open ``slot`` in every module, forget it where the call's input shape changed, and restart
        the count of repeated layers' calls."""
        if slot >= self._slots:
            for outputs in self.outputs:
                for new in range(self._slots, slot + 1):
                    outputs.setdefault(new, None)
            self._slots = slot + 1
        shape = input_shape(args, kwargs)
        if slot in self._input_shapes and self._input_shapes[slot] != shape:
            logger.debug("Call slot %d changed input shape to %s: its layers compute", slot, shape)
            self._forget(slot)
        self._input_shapes[slot] = shape
        for occurrence in self.occurrences:
            occurrence[0] = 0

    def clear(self) -> None:
        """Release everything (the handle is disabled); the next enable starts afresh."""
        for outputs in self.outputs:
            outputs.clear()
        self.outputs.clear()
        self.occurrences.clear()
        self._slots = 0
        self._input_shapes.clear()
        self.guidance_checked.clear()
        self.marked_step = None
        self.thread, self.last_step, self.intruded = None, -1, False

    def kept(self) -> int:
        """How many (module, call slot) entries hold a kept output now."""
        return sum(value is not None for outputs in self.outputs for value in outputs.values())

    def kept_bytes(self) -> dict[str, int]:
        """Bytes of the kept tensors now, by device ("cuda:0", "cpu"): the memory the cache holds."""
        totals: dict[str, int] = {}
        seen: set[int] = set()  # a tensor kept twice (a block's output is the next one's input) counts once

        def add(value: Any) -> None:
            if isinstance(value, torch.Tensor):
                if id(value) not in seen:
                    seen.add(id(value))
                    totals[str(value.device)] = totals.get(str(value.device), 0) + value.numel() * value.element_size()
            elif isinstance(value, (tuple, list)):
                for item in value:
                    add(item)
            elif isinstance(value, StoredTensor):  # kept_device / kept_dtype
                add(value.tensor)
            elif isinstance(value, RunKept):  # a chained run's residuals
                add(value.last)
                add(value.previous)

        for outputs in self.outputs:
            for kept in outputs.values():
                add(kept)
        return totals

    def opened(self) -> int:
        """How many (module, call slot) entries there are, kept or empty."""
        return sum(slot < self._slots for outputs in self.outputs for slot in outputs)

    def _forget(self, slot: int | None) -> None:
        for outputs in self.outputs:
            for kept_slot in outputs if slot is None else (slot,):
                outputs[kept_slot] = None
