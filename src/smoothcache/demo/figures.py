"""The demo's pictures: a sample grid (a row per method, the same seeds in each column) and the
quality-vs-speed trade-off."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_path
from ..plots import pyplot

__all__ = ["plot_samples", "plot_tradeoff"]

FAMILIES = (
    "smoothcache", "smoothcache-optimal", "smoothcache-forecast", "smoothcache-per-block", "fixed-interval", "random", "fewer-steps"
)


def family_of(method: str) -> str:
    """``fixed-interval-2`` -> ``fixed-interval``; every other method is its own family."""
    return "fixed-interval" if method.startswith("fixed-interval") else method


def plot_samples(images: list[tuple[str, torch.Tensor]], path: str | Path, columns: int = 10) -> Path:
    plt = pyplot()
    rows = len(images)
    fig, axes = plt.subplots(rows, 1, figsize=(columns * 0.62 + 2.2, rows * 0.68 + 0.2), squeeze=False)
    for ax, (label, batch) in zip(axes[:, 0], images):
        strip = torch.cat(list(batch[:columns].clamp(0, 1)), dim=-1)  # (C, H, W * columns)
        ax.imshow(strip.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(left=0.2, right=0.99, top=0.99, bottom=0.01, hspace=0.08)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_tradeoff(report: dict[str, Any], path: str | Path, speed: str = "speedup") -> Path:
    """FID and PSNR against speedup; one line per method family, uncached as a star.

    ``speed="estimated_speedup"`` plots the ideal speedup from FLOPs instead of the measured one:
    deterministic, for comparing schedules where timing noise would swamp their differences.
    """
    plt = pyplot()
    fig, (ax_fid, ax_psnr) = plt.subplots(1, 2, figsize=(10, 3.8))
    baseline = report["baseline"]
    present = {family_of(r["method"]) for r in report["runs"]}
    for family in [*FAMILIES, *sorted(present - set(FAMILIES))]:  # a family not listed is drawn too
        runs = sorted((r for r in report["runs"] if family_of(r["method"]) == family), key=lambda r: r[speed])
        if not runs:
            continue
        x = [r[speed] for r in runs]
        ax_fid.plot(x, [r["fid"] for r in runs], marker="o", label=family)
        ax_psnr.plot(x, [r["psnr"] if math.isfinite(r["psnr"]) else float("nan") for r in runs], marker="o", label=family)
    ax_fid.plot([1.0], [baseline["fid"]], marker="*", markersize=14, color="black", linestyle="none", label="uncached")
    ax_fid.axhline(baseline["fid"] * 1.1, color="grey", linestyle="--", linewidth=0.8, label="uncached FID +10%")
    label = "measured speedup" if speed == "speedup" else "ideal speedup (FLOPs skipped; fewer steps: step ratio)"
    ax_fid.set_xlabel(label)
    ax_fid.set_ylabel("FID (classifier features, lower is better)")
    ax_psnr.set_xlabel(label)
    ax_psnr.set_ylabel("PSNR vs uncached, same seeds (dB)")
    for ax in (ax_fid, ax_psnr):
        ax.grid(alpha=0.3)
    ax_fid.legend(fontsize=8)
    fig.suptitle(f"demo model, {report['steps']} steps, {report['samples']} samples, {report['device']}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return Path(path)
