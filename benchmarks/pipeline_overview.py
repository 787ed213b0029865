"""Every cell ``pipeline_speed.py`` measured for some models, in one figure and one JSON (issue 20's
item 3: Flux and Wan against cache-dit, end to end).

Flux's and Wan's cells came from several leases on two kinds of card, so no one result file holds
them, and ``--plot-from`` (one device per merge) cannot draw them together. Each bar here is still a
speedup within one process: a method's ``pipe(...)`` against the uncached pipeline of its own cell
in its own file (``pipeline_results.plotted_speedups``), the ideal from the FLOPs it skips drawn as
a black tick. A cell measured in several files (a re-measurement, another card) is one group per
file, labelled with its card and date, never mixed. Needs no GPU::

    python benchmarks/pipeline_overview.py                        # docs/benchmarks/pipeline-overview-flux-wan.*
    python benchmarks/pipeline_overview.py --models flux --files A.json B.json --out /tmp/overview
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline_results import COLOURS, LABELS, plotted_speedups, read_result
from pipeline_settings import BLOCKS, CACHE_DIT, LAYERS, UNCACHED

from smoothcache.files import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "benchmarks"
COMPILE_ORDER = ("eager", "compile", "cudagraphs")
CACHED_METHODS = (BLOCKS, LAYERS, CACHE_DIT)


def card_of(device: str) -> str:
    """The card's short name in a device string (``"NVIDIA H100 80GB HBM3"`` -> ``"H100"``,
    ``"NVIDIA A100-SXM4-80GB"`` -> ``"A100"``): a letter or two and digits, or RTX and its number,
    else the string itself."""
    found = re.search(r"\b(RTX \d{4}|[A-Z]{1,2}\d{2,4}[A-Z]?)\b", device.replace("-", " "))
    return found.group(1) if found else device


def cells_of(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The cells of one result file with each cached method's speedup over its cell's uncached row
    (no prefetch: Flux and Wan keep their timesteps on the device), its ideal and efficiency; the
    date is the part's where the file was merged from several. Also the cells left out, and why."""
    result = read_result(path)
    plotted = plotted_speedups(result)
    rows = [r for r in result["rows"] if not r["prefetch"]]
    cells, left_out = [], []
    for compile_mode, batch in dict.fromkeys((r["compile"], r["batch"]) for r in rows):
        own = [r for r in rows if (r["compile"], r["batch"]) == (compile_mode, batch)]
        uncached = next((r for r in own if r["method"] == UNCACHED and "ms" in r), None)
        methods = {}
        for row in own:
            speedup = plotted.bars.get((compile_mode, batch, False, row["method"]))
            if row["method"] not in CACHED_METHODS or not isinstance(speedup, float):
                continue
            ideal = row.get("ideal_speedup")
            methods[row["method"]] = {"ms": row["ms"], "speedup": speedup, "ideal_speedup": ideal,
                                      "efficiency": speedup / ideal if ideal else None}
        if uncached is None or not methods:
            why = "no timed uncached row" if uncached is None else "no timed cached row"
            left_out.append(f"{path.name}: {compile_mode}, batch {batch} ({why})")
            continue
        date = result["merged_from"][uncached["from_file"]]["date"] if "from_file" in uncached else result["date"]
        cells.append({"model": result["settings"]["model"], "compile": compile_mode, "batch": batch,
                      "card": card_of(result["device"]), "device": result["device"], "date": date[:10], "time": date[11:16],
                      "file": path.name, "uncached_ms": uncached["ms"], "methods": methods})
    return cells, left_out


def overview(files: Sequence[Path], models: Sequence[str]) -> dict[str, Any]:
    """The cells of ``files`` for ``models``, in the order a reader scans them: model, compile
    setting, batch, then date; with each model's workload as its files describe it."""
    cells, left_out, workloads = [], [], {}
    for path in files:
        settings = read_result(path)["settings"]
        if settings["model"] not in models:
            continue
        found, missing = cells_of(path)
        if found:
            workloads.setdefault(settings["model"], {key: settings.get(key) for key in
                                                     ("pipeline", "dtype", "steps", "computed_steps_in_mask")})
        cells += found
        left_out += missing
    rank = {mode: i for i, mode in enumerate(COMPILE_ORDER)}
    cells.sort(key=lambda c: (models.index(c["model"]), rank.get(c["compile"], len(rank)), c["batch"], c["date"], c["card"]))
    return {"benchmark": "pipeline-overview", "models": list(models), "files": [p.name for p in files],
            "workloads": workloads, "cells": cells, "left_out": left_out}


def tick_labels(cells: Sequence[dict[str, Any]]) -> list[str]:
    """Each cell's label under its group: setting and batch, then card and day; with the time of day
    where two cells of one panel would otherwise read alike (one cell re-measured the same day)."""
    labels = [f"{c['compile']}, b{c['batch']}\n{c['card']} {c['date'][5:]}" for c in cells]
    return [f"{label} {c['time']}" if labels.count(label) > 1 else label for label, c in zip(labels, cells, strict=True)]


def bar_centres(x: float, count: int, width: float) -> list[float]:
    """Where a group's ``count`` bars stand: side by side, centred on the group's label at ``x``, so a
    cell that measured one method has its bar under its label rather than in its slot of three."""
    return [x + (i - (count - 1) / 2) * width for i in range(count)]


def plot(found: dict[str, Any], path: Path) -> Path:
    """One row of panels per model; per cell a group of bars (each cached method's speedup over its
    cell's uncached ``pipe(...)``, drawn from 1.0 up: the gain) with its ideal as a black tick."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from smoothcache.plots import pyplot, save_figure

    plt = pyplot()
    models = [m for m in found["models"] if any(c["model"] == m for c in found["cells"])]
    methods = [m for m in CACHED_METHODS if any(m in c["methods"] for c in found["cells"])]
    widest = max(sum(c["model"] == m for c in found["cells"]) for m in models)
    fig, axes = plt.subplots(len(models), 1, figsize=(2.0 + 1.15 * widest, 0.9 + 3.2 * len(models)), squeeze=False)
    measured = [v for c in found["cells"] for v in c["methods"].values()]
    top = max(max(v["speedup"], v["ideal_speedup"] or 0) for v in measured)
    bottom = min(1.0, *(v["speedup"] for v in measured)) - 0.12 * (top - 1.0)  # bars grow from 1.0: the gain
    width = 0.8 / len(methods)
    for ax, model in zip(axes[:, 0], models, strict=True):
        cells = [c for c in found["cells"] if c["model"] == model]
        for x, cell in enumerate(cells):
            present = [m for m in methods if m in cell["methods"]]  # in legend order
            for method, left in zip(present, bar_centres(x, len(present), width), strict=True):
                measured = cell["methods"][method]
                ax.bar(left, measured["speedup"] - 1.0, width, bottom=1.0, color=COLOURS[method], edgecolor="black",
                       linewidth=0.4)
                ax.text(left, (1.0 + measured["speedup"]) / 2, f"{measured['speedup']:.2f}x", rotation=90, fontsize=7,
                        ha="center", va="center", color="white")
                if measured["ideal_speedup"]:
                    ax.plot([left - width / 2, left + width / 2], [measured["ideal_speedup"]] * 2, color="black", linewidth=2)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_ylim(bottom, top + 0.06 * (top - 1.0))
        ax.set_xticks(range(len(cells)), tick_labels(cells), fontsize=7)
        ax.set_ylabel("speedup over uncached pipe()\n(same cell, same process)", fontsize=8)
        w = found["workloads"][model]
        ax.set_title(f"{w['pipeline']}, {w['dtype'].removeprefix('torch.')}, "
                     f"{w['computed_steps_in_mask']} of {w['steps']} steps computed", fontsize=9)
    handles = [Patch(facecolor=COLOURS[m], edgecolor="black", label=LABELS[m].replace("\n", " ")) for m in methods]
    handles.append(Line2D([], [], color="black", linewidth=2, label="ideal (FLOPs skipped)"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7)
    fig.suptitle("Every measured cell: each method against its own uncached pipeline (card and date below each)",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["flux", "wan"], help="models to draw (default: flux wan)")
    parser.add_argument("--files", type=Path, nargs="+",
                        help="pipeline_speed.py result files (default: docs/benchmarks/pipeline-speed-MODEL-*.json)")
    parser.add_argument("--out", type=Path, help="path without suffix (default: docs/benchmarks/pipeline-overview-MODELS)")
    args = parser.parse_args(argv)
    files = args.files or sorted(p for m in args.models for p in RESULTS.glob(f"pipeline-speed-{m}-*.json"))
    found = overview(files, args.models)
    if not found["cells"]:
        raise SystemExit(f"no cell of {', '.join(args.models)} in {len(files)} file(s)")
    out = args.out or RESULTS / f"pipeline-overview-{'-'.join(args.models)}"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(found, indent=1) + "\n")
    plot(found, out.with_suffix(".png"))
    for cell in found["cells"]:
        measured = ", ".join(f"{m.removeprefix('smoothcache ')} {v['speedup']:.2f}x (ideal "
                             f"{'n/a' if v['ideal_speedup'] is None else format(v['ideal_speedup'], '.2f') + 'x'})"
                             for m, v in cell["methods"].items())
        print(f"{cell['model']:<5} {cell['compile']:<10} b{cell['batch']:<2} {cell['card']} {cell['date']} {cell['time']}  {measured}  "
              f"[{cell['file']}]")
    for reason in found["left_out"]:
        print(f"left out: {reason}")
    print(out.with_suffix(".json"), out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
