"""Reading a bench report: each family against the others at equal measured speed or equal compute."""

from __future__ import annotations

import itertools
import math
from typing import Any

__all__ = ["SPEED_TARGETS", "compare_at_speed", "interpolate_families", "summarise"]

SPEED_TARGETS = (1.3, 1.5, 1.75, 2.0, 2.5, 3.0)


def compare_at_speed(rows: list[dict[str, Any]], key: str, targets: tuple[float, ...] = SPEED_TARGETS,
                     tolerance: float = 0.05, metric: str = "psnr") -> list[dict[str, Any]]:
    """At each target speedup, the best smoothcache row and the best other row within +-``tolerance``.

    ``key`` is "speedup_eager", "speedup_compiled" or "ideal_speedup" (equal compute). A row counts
    at a target when its speedup is within the tolerance; the margin is ours minus theirs, in dB for
    PSNR. Rows identical to uncached (PSNR null) and failed rows take no part.
    """
    table = []
    for target in targets:
        near = [r for r in rows if r.get("error") is None and r.get(key) is not None and r.get(metric) is not None
                and abs(r[key] / target - 1) <= tolerance]
        ours = max((r for r in near if r["family"].startswith("smoothcache")), key=lambda r: r[metric], default=None)
        others = max((r for r in near if not r["family"].startswith("smoothcache")), key=lambda r: r[metric], default=None)
        entry: dict[str, Any] = {"target": target}
        for side, row in (("smoothcache", ours), ("best_other", others)):
            entry[side] = None if row is None else {
                "family": row["family"], "setting": row["setting"], metric: row[metric], key: row[key],
                "fd_clf": row.get("fd_clf"), "accuracy": row.get("accuracy")}
        entry["margin"] = (ours[metric] - others[metric]) if ours and others else None
        table.append(entry)
    return table


def interpolate_families(rows: list[dict[str, Any]], key: str, targets: tuple[float, ...] = SPEED_TARGETS,
                         metric: str = "psnr") -> list[dict[str, Any]]:
    """At each target speedup, each family's quality read off its own curve (linear between its two
    measured settings around the target, never extrapolated); the best smoothcache family against
    the best other. Where a family's settings are sparse, this is fairer than nearest points."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r.get("error") is None and r.get(key) is not None and r.get(metric) is not None:
            curves.setdefault(r["family"], []).append((r[key], r[metric]))
    table = []
    for target in targets:
        values = {}
        for family, points in curves.items():
            points.sort()
            for (x0, y0), (x1, y1) in itertools.pairwise(points):
                if x0 <= target <= x1:
                    value = y0 if x1 == x0 else y0 + (y1 - y0) * (target - x0) / (x1 - x0)
                    values[family] = max(values.get(family, -math.inf), value)
        ours = max(((f, v) for f, v in values.items() if f.startswith("smoothcache")), key=lambda p: p[1], default=None)
        others = max(((f, v) for f, v in values.items() if not f.startswith("smoothcache")), key=lambda p: p[1],
                     default=None)
        table.append({"target": target,
                      "smoothcache": None if ours is None else {"family": ours[0], metric: ours[1]},
                      "best_other": None if others is None else {"family": others[0], metric: others[1]},
                      "margin": (ours[1] - others[1]) if ours and others else None})
    return table


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Comparisons at equal measured speed (eager, compiled) and at equal compute: measured rows within
    +-5% of each target, and each family's curve read at the target."""
    rows = [r if isinstance(r, dict) else r.as_dict() for r in result["rows"]]  # bench_harness.Row objects mid-run
    keys = ("speedup_eager", "speedup_compiled", "ideal_speedup")
    return {"within_5_percent": {key: compare_at_speed(rows, key) for key in keys},
            "along_each_curve": {key: interpolate_families(rows, key) for key in keys}}
