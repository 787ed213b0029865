"""Schedule: per-key 0/1 plans over denoising steps (1 = compute, 0 = reuse the cached output).

Keys are layer types (``"attn1"``, ``"ff"``, ``"attn"``, ``"mlp"``) or one block's layer
(``"attn-0"``, ``"mlp-13"``), as in the reference package's ``smoothcache_schedules/*.json``.
A per-block key wins over the layer-type key for that block (the grammar: :mod:`.keys`).

A schedule made by a solver also records how it was planned (solver, budget, forecast) under the
JSON key ``"_planned"``; the reference package looks plans up by layer name only, so it still
loads such a file, and ``cache()`` warns where a schedule runs otherwise than it was planned.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ScheduleError
from .files import atomic_write_text, read_json, shown

__all__ = ["PLANNED_KEY", "Schedule"]

PLANNED_KEY = "_planned"  # how a solver made the schedule: {"solver": ..., "forecast": ..., ...}


@dataclass(frozen=True)
class Schedule:
    """A validated compute/reuse plan for every cached key, all of the same number of steps."""

    plans: dict[str, tuple[int, ...]]
    source: str | None = field(default=None, compare=False)
    planned: Mapping[str, Any] | None = field(default=None, compare=False)  # how a solver made it (JSON values)

    def __post_init__(self) -> None:
        plans = {key: _validated_plan(key, plan, self.source) for key, plan in dict(self.plans).items()}
        where = _where(self.source)
        if not plans:
            raise ScheduleError(f"Schedule{where} has no keys; expected e.g. {{\"attn1\": [1, 0, 1, ...]}}")
        lengths = {key: len(plan) for key, plan in plans.items()}
        if len(set(lengths.values())) > 1:
            listed = ", ".join(f"{key!r}: {n}" for key, n in lengths.items())
            raise ScheduleError(
                f"Schedule{where} has plans of unequal length ({listed}); every key must cover the same steps"
            )
        object.__setattr__(self, "plans", plans)

    # ---- construction and files -------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Iterable[int]], source: str | None = None) -> Schedule:
        """Build from ``{"attn1": [1, 0, ...], ...}`` (the reference package's JSON object).

        Anything else raises :class:`ScheduleError` naming ``source``.
        """
        if not isinstance(data, Mapping):
            raise ScheduleError(
                f"Schedule{_where(source)} must be a JSON object of key -> list of 0/1, got {type(data).__name__}"
            )
        plans = dict(data)
        planned = plans.pop(PLANNED_KEY, None)
        if planned is not None and not (
            isinstance(planned, Mapping) and all(isinstance(k, str) and _json_scalar(v) for k, v in planned.items())
        ):
            raise ScheduleError(
                f"Schedule{_where(source)} has {PLANNED_KEY!r} = {shown(planned)}; it must be an object of names to "
                "strings, numbers, booleans or null (how the schedule was planned), or be left out"
            )
        return cls(plans=plans, source=source, planned=planned)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: str | Path) -> Schedule:
        """Read a schedule JSON file; errors name the file and what is wrong with it."""
        path = Path(path)
        return cls.from_dict(read_json(path, ScheduleError, "schedule"), source=str(path))

    @classmethod
    def fixed_interval(cls, keys: Iterable[str], num_steps: int, interval: int) -> Schedule:
        """Compute every ``interval``-th step and the last one (FORA-style), as the reference's ``*-fora.json``."""
        if interval < 1:
            raise ScheduleError(f"interval must be >= 1, got {interval}")
        if num_steps < 1:
            raise ScheduleError(f"num_steps must be >= 1, got {num_steps}")
        plan = [1 if step % interval == 0 else 0 for step in range(num_steps)]
        plan[-1] = 1
        return cls({key: tuple(plan) for key in keys})

    def to_dict(self) -> dict[str, list[int]]:
        """The plain JSON-ready mapping of the plans, keys in their original order (no ``"_planned"``)."""
        return {key: list(plan) for key, plan in self.plans.items()}

    def to_json(self) -> str:
        """One line per key with a compact list: the layout the reference's calibration helper writes,
        and a last line ``"_planned"`` where a solver made the schedule."""
        rows = [f"    {json.dumps(key)}: {json.dumps(list(plan), separators=(',', ':'))}" for key, plan in self.plans.items()]
        if self.planned is not None:
            rows.append(f"    {json.dumps(PLANNED_KEY)}: {json.dumps(dict(self.planned), allow_nan=False)}")
        return "{\n" + ",\n".join(rows) + "\n}\n"

    def with_planned(self, **how: Any) -> Schedule:
        """This schedule, recording how it was planned (``None`` values left out)."""
        return replace(self, planned={**(self.planned or {}), **{k: v for k, v in how.items() if v is not None}})

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path`` atomically (see :mod:`.files`), creating parent folders."""
        return atomic_write_text(path, self.to_json())

    # ---- reading it -------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return len(next(iter(self.plans.values())))

    @property
    def keys(self) -> list[str]:
        return list(self.plans)

    def compute_fraction(self, key: str | None = None) -> float:
        """Fraction of steps computed: for one key, or averaged over all keys."""
        if key is not None:
            plan = self.plans[key]
            return sum(plan) / len(plan)
        return sum(sum(plan) for plan in self.plans.values()) / (len(self.plans) * self.num_steps)

    def compute_fractions(self) -> dict[str, float]:
        return {key: self.compute_fraction(key) for key in self.plans}

    def estimated_speedup(self, key_costs: Mapping[str, float], total_cost: float) -> float:
        """Ideal speedup of the whole model from the cost (e.g. FLOPs per call) skipped.

        ``key_costs[key]`` is the cost of all layers the key governs in one model call, and
        ``total_cost`` the cost of the whole call; keys without a cost count as free.
        """
        if total_cost <= 0:
            raise ScheduleError(f"total_cost must be positive, got {total_cost}")
        saved = sum(key_costs.get(key, 0.0) * (1.0 - self.compute_fraction(key)) for key in self.plans)
        remaining = total_cost - saved
        return math.inf if remaining <= 0 else total_cost / remaining

    def summary(self) -> str:
        """A small table: key, steps computed, compute fraction."""
        width = max(len("key"), *(len(key) for key in self.plans))
        lines = [f"{'key':<{width}}  computed  fraction", f"{'-' * width}  --------  --------"]
        for key, plan in self.plans.items():
            lines.append(f"{key:<{width}}  {sum(plan):>3}/{len(plan):<4}  {sum(plan) / len(plan):8.3f}")
        lines.append(f"{'all':<{width}}  {'':8}  {self.compute_fraction():8.3f}")
        return "\n".join(lines)


def _json_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, bool, int)) or (isinstance(value, float) and math.isfinite(value))


def _where(source: str | None) -> str:
    return f" in {source}" if source else ""


def _validated_plan(key: object, plan: object, source: str | None) -> tuple[int, ...]:
    where = _where(source)
    if not isinstance(key, str) or not key:
        raise ScheduleError(f"Schedule{where} has a key {shown(key)}; keys must be non-empty strings like \"attn1\"")
    if isinstance(plan, (str, bytes)) or not isinstance(plan, Iterable):
        raise ScheduleError(f"Schedule {key!r}{where} must be a list of 0/1, got {type(plan).__name__}")
    values = list(plan)
    if not values:
        raise ScheduleError(f"Schedule {key!r}{where} is empty; it needs one 0/1 entry per step")
    for step, value in enumerate(values):
        # bool is an int subclass; 1.0 and "1" are rejected so a typo cannot pass as a plan.
        if type(value) not in (int, bool) or value not in (0, 1):
            raise ScheduleError(
                f"Schedule {key!r}{where} has {shown(value)} at step {step}; only 0 (reuse) and 1 (compute) are allowed"
            )
    if values[0] != 1:
        raise ScheduleError(
            f"Schedule {key!r}{where} starts with 0, but step 0 has nothing cached to reuse; the first step must be 1"
        )
    return tuple(int(v) for v in values)
