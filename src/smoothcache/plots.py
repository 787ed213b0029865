"""Pictures of profiles, schedules and bench cells (matplotlib, imported only when a plot is asked for)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .files import atomic_path
from .profile import CalibrationProfile
from .schedule import Schedule

__all__ = ["plot_bench_cells", "plot_profile", "plot_schedule", "pyplot", "save_figure"]


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("Plots need matplotlib: pip install 'smoothcache[plot]'") from exc
    return plt


def save_figure(fig, path: str | Path, *, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` (its suffix picks the format) in one step, and close it: a figure
    left open keeps its memory until the process ends."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        pyplot().close(fig)
    return Path(path)


def plot_profile(profile: CalibrationProfile, path: str | Path, alphas: tuple[float, ...] = ()) -> Path:
    """Error curves per layer type (one panel each, one line per lookahead), thresholds dashed; and,
    where calibration measured them, the steps' sensitivities the optimal solver weighs errors by."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator
    keys = profile.keys()
    weights = profile.step_weights
    panels = len(keys) + (weights is not None)
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.4), squeeze=False)
    steps = np.arange(profile.num_steps)
    for ax in axes[0][1 : len(keys)]:
        ax.sharey(axes[0][0])
    if weights is not None:
        ax = axes[0][-1]
        ax.bar(steps, weights, color="tab:grey")
        ax.set_title("step sensitivity (solver weights)")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax, key in zip(axes[0], keys):
        curves = profile.curves(key)
        for k in range(profile.lookahead):
            ax.plot(steps, curves[k], marker=".", label=f"k = {k + 1}")
        for alpha in alphas:
            ax.axhline(alpha, linestyle="--", color="grey", linewidth=0.8)
            ax.annotate(f"alpha {alpha:g}", (1, alpha), xycoords=("axes fraction", "data"), ha="right", va="bottom",
                        fontsize=7, color="grey")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{key} (mean of {sum(layer.layer_type == key for layer in profile.layers)} blocks)")
        ax.set_xlabel("step s (reused at s + k)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("relative L1 error")
    axes[0][0].legend()
    model = profile.metadata.get("model_class", "model")
    runs = f"{profile.num_runs} calibration run{'s' if profile.num_runs != 1 else ''}"
    fig.suptitle(f"{model}: {runs}, {profile.num_steps} steps")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_schedule(schedule: Schedule, path: str | Path) -> Path:
    """The plan as a grid: a row per key, a column per step, dark = computed."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator
    grid = np.array([schedule.plans[key] for key in schedule.keys])
    fig, ax = plt.subplots(figsize=(max(6, 0.16 * schedule.num_steps), 0.6 + 0.3 * len(schedule.keys)))
    ax.imshow(grid, aspect="auto", cmap="Greys", vmin=0, vmax=1.4, interpolation="nearest")
    ax.set_yticks(range(len(schedule.keys)), [f"{k} ({schedule.compute_fraction(k):.2f})" for k in schedule.keys])
    ax.set_xlabel("step (dark = compute, light = reuse)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return save_figure(fig, path)


def plot_bench_cells(cells: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """``smoothcache bench``'s cells side by side: the cached call's speedup over the uncached one
    with its ideal (from the FLOPs skipped) as a black tick and, with step graphs, a diamond for the
    gain over the plain pipeline; beside it, where measured on a GPU, both calls' peak memory, since
    what the cache keeps is the other half of its price."""
    plt = pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    labels = [f"{c['compile']}\nbatch {c['batch']}" for c in cells]
    with_memory = any(c.get("peak_memory_mib") for c in cells)
    fig, axes = plt.subplots(1, 2 if with_memory else 1, figsize=(2.5 + 1.1 * len(cells) * (2 if with_memory else 1), 3.8),
                             squeeze=False)
    speed = axes[0, 0]
    for x, cell in enumerate(cells):
        speed.bar(x, cell["speedup"], 0.6, color="tab:blue", edgecolor="black", linewidth=0.4)
        speed.text(x, cell["speedup"] / 2, f"{cell['speedup']:.2f}x", ha="center", va="center", fontsize=8, color="white")
        if cell.get("ideal_speedup"):
            speed.plot([x - 0.3, x + 0.3], [cell["ideal_speedup"]] * 2, color="black", linewidth=2)
        if cell.get("speedup_over_plain") is not None:
            speed.plot(x, cell["speedup_over_plain"], marker="D", markerfacecolor="white", markeredgecolor="tab:red")
    speed.axhline(1.0, color="grey", linewidth=0.8)
    speed.set_xticks(range(len(cells)), labels, fontsize=7)
    speed.set_ylabel("cached call's speedup over uncached")
    speed.set_ylim(0, 1.15 * max(max(c["speedup"], c.get("ideal_speedup") or 0, c.get("speedup_over_plain") or 0)
                                 for c in cells))
    handles = [Line2D([], [], color="black", linewidth=2, label="ideal (FLOPs skipped)")]
    if any(c.get("speedup_over_plain") is not None for c in cells):
        handles.append(Line2D([], [], linestyle="", marker="D", markerfacecolor="white", markeredgecolor="tab:red",
                              label="over the plain pipeline (step graphs)"))
    if with_memory:
        memory, runs = axes[0, 1], {"uncached": ("tab:gray", -0.18), "cached": ("tab:blue", 0.18)}
        for x, cell in enumerate(cells):
            peaks = cell.get("peak_memory_mib") or {}
            for run, (colour, offset) in runs.items():
                if run in peaks:
                    memory.bar(x + offset, peaks[run], 0.36, color=colour, edgecolor="black", linewidth=0.4)
        handles += [Patch(facecolor=colour, edgecolor="black", label=f"peak memory, {run}") for run, (colour, _) in runs.items()]
        memory.set_xticks(range(len(cells)), labels, fontsize=7)
        memory.set_ylabel("peak GPU memory (MiB)")
    columns = min(len(handles), 2)
    fig.legend(handles=handles, loc="lower center", ncol=columns, fontsize=7)  # below: over no bar
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.07 * -(-len(handles) // columns), 1, 1))
    return save_figure(fig, path)
