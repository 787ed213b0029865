"""Caching the two halves of a classifier-free guidance batch on plans of their own.

A schedule key "<type>@cond" / "<type>@uncond" (one block: "<type>@uncond-3") gives one half of a
classifier-free guidance batch its own plan (guidance.py names the halves and knows their order).
Where one half computes and the other reuses, the layer runs on the computing half's rows only and
its output is spliced with the other half's kept rows, as FasterCache does for the unconditional
branch, so that layer call costs half. CacheHandle sees a plain schedule, each such layer under a
base key ("attn1"; made up as the union of the halves' plans where the schedule has none), and
takes those layers' forwards from here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .adapters import CacheableLayer
from .errors import ScheduleError
from .guidance import (
    BRANCHES,
    GuidanceError,
    branch_key,
    branch_order,
    check_cfg_batch,
    check_layer_rows,
    input_shape,
    splice_half,
    split_branch_key,
    take_half,
)
from .reuse import Decision
from .schedule import Schedule, layer_type_of, schedule_key_for

__all__ = ["BranchCaching"]


class BranchCaching:
    """The branch plans of one schedule, and the forwards of the layers they govern."""

    def __init__(self, schedule: Schedule, branches: Sequence[str] | str, target: Any) -> None:
        self.branch_plans: dict[str, tuple[int, ...]] = {}
        base: dict[str, tuple[int, ...]] = {}
        for key, plan in schedule.plans.items():
            (self.branch_plans if split_branch_key(key)[1] else base)[key] = plan
        self._made_up: set[str] = set()  # base keys only there to cover branch layers
        for key, plan in self.branch_plans.items():
            base_key = split_branch_key(key)[0]
            if base_key not in schedule.plans and layer_type_of(base_key) not in schedule.plans:
                self._made_up.add(base_key)
                base[base_key] = tuple(a | b for a, b in zip(base.get(base_key, plan), plan, strict=True))
        self.schedule = Schedule(base, source=schedule.source) if self.branch_plans else schedule
        self.order = branch_order(target.pipeline, branches) if self.branch_plans else None
        self._plans: dict[int, tuple[tuple[bool, ...], tuple[bool, ...]]] = {}  # id(layer) -> plans in batch order
        self._rows = 0  # the current model call's batch
        self._checked: set[tuple[int, tuple[int, ...] | None]] = set()  # (slot, input shape) seen to batch guidance

    def bind(self, layers: Sequence[CacheableLayer]) -> None:
        """Resolve each layer's two plans, refusing what cannot be split before anything is attached."""
        if self.order is None:
            return
        used: set[str] = set()
        for layer in layers:
            keys = {b: schedule_key_for(self.branch_plans, f"{layer.layer_type}@{b}", layer.block) for b in BRANCHES}
            named = [key for key in keys.values() if key is not None]
            if not named:
                continue
            if layer.streams is not None:
                raise ScheduleError(
                    f"Schedule key {named[0]!r}: {layer.name} is a block cached whole, whose guidance halves "
                    "cannot be cached apart; drop its '@cond'/'@uncond' keys"
                )
            if layer.repeats > 1:
                raise ScheduleError(
                    f"Schedule key {named[0]!r}: {layer.name} runs {layer.repeats} times per block call, so its "
                    "guidance halves cannot be cached apart; drop its '@cond'/'@uncond' keys"
                )
            plans = {}
            for branch, key in keys.items():
                if key is None:
                    key = schedule_key_for(self.schedule.plans, layer.layer_type, layer.block)
                    if key is None or key in self._made_up:
                        raise ScheduleError(
                            f"Schedule key {named[0]!r} plans one guidance half of {layer.name} but no key plans its "
                            f"{branch} half; add {branch_key(layer.layer_type, branch)!r} or {layer.layer_type!r}"
                        )
                    plans[branch] = self.schedule.plans[key]
                else:
                    used.add(key)
                    plans[branch] = self.branch_plans[key]
            self._plans[id(layer)] = tuple(tuple(v == 1 for v in plans[b]) for b in self.order)  # type: ignore[assignment]
        unused = [key for key in self.branch_plans if key not in used]
        if unused:
            raise ScheduleError(f"Schedule keys {unused} match no cached layer; their base keys must name layers of the model")

    def governs(self, layer: CacheableLayer) -> bool:
        return id(layer) in self._plans

    def before_model_call(
        self, slot: int, args: tuple[Any, ...], kwargs: dict[str, Any], new_generation: bool, on_error: Callable[[], None]
    ) -> None:
        """Check that the call batches guidance; compare its halves once per slot and shape (it syncs)."""
        if self.order is None:
            return
        if new_generation:
            self._checked.clear()
        seen = (slot, input_shape(args, kwargs))
        try:
            self._rows = check_cfg_batch(args, kwargs, compare=seen not in self._checked)
        except GuidanceError:
            on_error()
            raise
        self._checked.add(seen)

    def forward(
        self,
        original: Callable[..., Any],
        layer: CacheableLayer,
        outputs: dict[int, Any],
        decisions: list[tuple[Decision, tuple[bool, ...]]],
    ) -> Callable[..., Any]:
        """The layer's caching forward; its two decisions (batch order) join ``decisions``."""
        first, second = Decision(), Decision()
        plans = self._plans[id(layer)]
        decisions += [(first, plans[0]), (second, plans[1])]
        where = f"Layer {layer.name}"

        def forward(*args: Any, **kwargs: Any) -> Any:
            kept = outputs.get(first.slot)  # None: nothing kept (emptied slots stay, see CacheHandle._forget_outputs)
            if kept is None or (first.compute and second.compute):
                output = original(*args, **kwargs)
            elif not (first.compute or second.compute):
                return kept
            else:  # one half computes: only its rows run
                half, rows = (0 if first.compute else 1), self._rows
                check_layer_rows(args, kwargs, rows, where)
                part = original(*take_half(args, rows, half), **take_half(kwargs, rows, half))
                output = splice_half(kept, part, half, where)
            outputs[first.slot] = output
            return output

        return forward
