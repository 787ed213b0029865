"""The demo's pictures: a sample grid (a row per method, the same seeds in each column) and the
quality-vs-speed trade-off."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..plots import pyplot, save_figure

__all__ = ["plot_samples", "plot_tradeoff"]

FAMILIES = (
    "smoothcache", "smoothcache-optimal", "smoothcache-forecast", "smoothcache-per-block", "fixed-interval", "random", "fewer-steps"
)


# the legend's words for the demo's method names
LEGEND = {
    "smoothcache": "smoothcache, paper's greedy", "smoothcache-optimal": "smoothcache, optimal",
    "smoothcache-forecast": "smoothcache, optimal + forecast", "smoothcache-per-block": "smoothcache, per-block",
}


def family_of(method: str) -> str:
    """``fixed-interval-2`` -> ``fixed-interval``; every other method is its own family."""
    return "fixed-interval" if method.startswith("fixed-interval") else method


def plot_samples(images: list[tuple[str, torch.Tensor]], path: str | Path, columns: int = 10,
                 column_names: list[str] | None = None) -> Path:
    """A row per method, the same seeds in each column; ``column_names`` head the columns (the classes)."""
    plt = pyplot()
    rows = len(images)
    header = 0.25 if column_names else 0.0
    fig, axes = plt.subplots(rows, 1, figsize=(columns * 0.62 + 2.2, rows * 0.68 + 0.2 + header), squeeze=False)
    for ax, (label, batch) in zip(axes[:, 0], images):
        strip = torch.cat(list(batch[:columns].clamp(0, 1)), dim=-1)  # (C, H, W * columns)
        ax.imshow(strip.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    if column_names:
        width = images[0][1].shape[-1]
        top = axes[0, 0]
        top.set_xticks([width * (i + 0.5) for i in range(min(columns, len(column_names)))], column_names[:columns],
                       fontsize=8)
        top.xaxis.tick_top()
        top.tick_params(length=0)
    top_margin = 1 - header / (rows * 0.68 + 0.2 + header) - 0.01
    fig.subplots_adjust(left=0.2, right=0.99, top=top_margin, bottom=0.01, hspace=0.08)
    return save_figure(fig, path, dpi=110)


def plot_tradeoff(report: dict[str, Any], path: str | Path) -> Path:
    """FID and PSNR against the measured speedup and against the ideal one (FLOPs skipped; fewer
    steps: the step ratio): one line per method family, uncached as a star, one legend. Measured
    points more than 10% above their ideal are timing noise and drawn hollow."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharey="row")
    baseline = report["baseline"]
    present = {family_of(r["method"]) for r in report["runs"]}
    families = [f for f in [*FAMILIES, *sorted(present - set(FAMILIES))] if f in present]  # a family not listed too
    colors = {family: f"C{i}" for i, family in enumerate(families)}
    for column, speed in enumerate(("speedup", "estimated_speedup")):
        ax_fid, ax_psnr = axes[0, column], axes[1, column]
        for family in families:
            runs = sorted((r for r in report["runs"] if family_of(r["method"]) == family), key=lambda r: r[speed])
            x = [r[speed] for r in runs]
            psnr = [r["psnr"] if math.isfinite(r["psnr"]) else float("nan") for r in runs]
            for ax, y in ((ax_fid, [r["fid"] for r in runs]), (ax_psnr, psnr)):
                ax.plot(x, y, color=colors[family], label=LEGEND.get(family, family) if ax is axes[0, 0] else None)
                for xi, yi, r in zip(x, y, runs):
                    noisy = speed == "speedup" and r.get("timing_noise")
                    ax.plot([xi], [yi], marker="o", color=colors[family], markerfacecolor="none" if noisy else colors[family])
        ax_fid.plot([1.0], [baseline["fid"]], marker="*", markersize=14, color="black", linestyle="none",
                    label="uncached" if column == 0 else None)
        ax_fid.axhline(baseline["fid"] * 1.1, color="grey", linestyle="--", linewidth=0.8,
                       label="uncached FID +10%" if column == 0 else None)
        label = "measured speedup (hollow: >10% above ideal, noise)" if speed == "speedup" else \
            "ideal speedup (FLOPs skipped; fewer steps: step ratio)"
        ax_psnr.set_xlabel(label)
        for ax in (ax_fid, ax_psnr):
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("FID (classifier features, lower is better)")
    axes[1, 0].set_ylabel("PSNR vs uncached, same seeds (dB)")
    fig.legend(loc="lower center", ncol=min(5, len(families) + 2), fontsize=8, frameon=False)
    fig.suptitle(f"demo model, {report['steps']} steps, {report['samples']} samples, {report['device']}")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return save_figure(fig, path, dpi=120)
