"""The bench harness's pictures: quality against measured speed and against compute, and the samples grid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..plots import pyplot, save_figure
from .fashion_mnist import CLASS_NAMES

__all__ = ["draw_all", "file_tag", "pareto_figure", "samples_figure"]

X_AXES = (("speedup_eager", "measured speedup of pipe(), eager"),
          ("speedup_compiled", "measured speedup, compiled + CUDA graphs"),
          ("ideal_speedup", "ideal speedup from compute (1 / compute fraction)"))
Y_AXES = (("psnr", "PSNR vs uncached, same seeds (dB)"), ("fd_clf", "FD-clf (classifier features; lower is better)"))


def draw_all(report: dict[str, Any], grids: dict[str, dict[str, torch.Tensor]], out: Path) -> list[Path]:
    paths = []
    for sampler, result in report["samplers"].items():
        paths.append(pareto_figure(result, report, out / f"pareto-{file_tag(sampler)}.png"))
        if grids.get(sampler):
            paths.append(samples_figure(grids[sampler], out / f"samples-{file_tag(sampler)}.png", sampler))
    return paths


def file_tag(sampler: str) -> str:
    """A sampler's name as a plain file name part: "dpm++-20" -> "dpmpp-20"."""
    return sampler.replace("+", "p")


def _style(family: str) -> dict[str, Any]:
    if family.startswith("smoothcache"):
        return {"linestyle": "-", "marker": "o", "linewidth": 1.8}
    if family == "fewer steps":
        return {"linestyle": "-", "marker": "D", "linewidth": 2.2, "color": "black"}
    return {"linestyle": "--", "marker": "s", "linewidth": 1.0}


def pareto_figure(result: dict[str, Any], report: dict[str, Any], path: Path) -> Path:
    """PSNR and FD-clf against eager speedup, compiled speedup and compute; one line per family."""
    plt = pyplot()

    rows = [r for r in result["rows"] if r.get("error") is None]
    families = list(dict.fromkeys(r["family"] for r in rows))
    colours = plt.cm.tab20(np.linspace(0, 1, max(1, len(families))))
    x_axes = [(key, label) for key, label in X_AXES if any(r.get(key) is not None for r in rows)] or list(X_AXES[2:])
    fig, axes = plt.subplots(2, len(x_axes), figsize=(6.4 * len(x_axes), 10.5), squeeze=False)
    for (y_key, y_label), axes_row in zip(Y_AXES, axes):
        for (x_key, x_label), ax in zip(x_axes, axes_row):
            for family, colour in zip(families, colours):
                points = sorted((r[x_key], r[y_key]) for r in rows
                                if r["family"] == family and r.get(x_key) is not None and r.get(y_key) is not None)
                if points:
                    style = {"color": colour, **_style(family)}
                    ax.plot(*zip(*points), label=family, markersize=4, **style)
            if y_key == "fd_clf" and result.get("uncached", {}).get("fd_clf") is not None:
                ax.axhline(result["uncached"]["fd_clf"], color="gray", lw=0.8, ls=":")
                ax.set_yscale("log")
            ax.axvline(1.0, color="gray", lw=0.6)
            ax.set_xlabel(x_label)
            ax.set_ylabel(y_label)
            ax.grid(alpha=0.3)
    handles, labels = axes[0, -1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    config = report["config"]
    fig.suptitle(f"Bench DiT (Fashion-MNIST), {result['sampler']}, {10 * config['samples_per_class']} samples, "
                 f"guidance {config['guidance_scale']}, {report['device']}; uncached FD-clf "
                 f"{result.get('uncached', {}).get('fd_clf', float('nan')):.3g} (dotted)")
    fig.tight_layout(rect=(0, 0.09, 1, 0.97))
    return save_figure(fig, path, dpi=100)


def samples_figure(grid: dict[str, torch.Tensor | None], path: Path, sampler: str) -> Path:
    """Rows: uncached, then each family at its setting nearest half the compute; columns: one seed a class."""
    plt = pyplot()

    rows = [(name, images) for name, images in grid.items() if images is not None]
    fig, axes = plt.subplots(len(rows), 1, figsize=(7, 1.05 * len(rows) + 0.8), squeeze=False)
    for i, (ax, (name, images)) in enumerate(zip(axes[:, 0], rows)):
        strip = images[:, 0].permute(1, 0, 2).reshape(images.shape[-2], -1).numpy()
        ax.imshow(strip, cmap="gray", vmin=0, vmax=1)
        ax.set_yticks([])
        ax.set_title(name, loc="left", fontsize=7, pad=2)
        size = images.shape[-1]
        last = i == len(rows) - 1
        ax.set_xticks([size // 2 + size * c for c in range(len(images))] if last else [],
                      CLASS_NAMES[: len(images)] if last else [], fontsize=6)
    fig.suptitle(f"Same seeds, each family at the setting nearest half the compute ({sampler})", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
