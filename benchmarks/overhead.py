"""Overhead of smoothcache on steps it computes, and of calibration, on the CPU.

Interleaves repeats of: a plain pipeline call, the same under an all-ones schedule (every layer
wrapped, nothing skipped), and a calibration pass; reports medians and writes JSON and a plot.

    python benchmarks/overhead.py --out benchmarks/results/overhead-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import smoothcache
from smoothcache import Schedule

ROOT = Path(__file__).resolve().parents[1]


def tiny_pipeline(layers: int, width: int, sample: int):
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DiTPipeline,
        DiTTransformer2DModel,
    )

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        sample_size=sample, patch_size=2, in_channels=4, out_channels=8, num_layers=layers,
        attention_head_dim=width // 4, num_attention_heads=4, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
    ).eval()
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), sample_size=sample).eval()
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _NoOpBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn, self.mlp = nn.Identity(), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attn(x))


class _NoOpModel(nn.Module):
    """DiT-XL/2's layout (28 blocks x attn + mlp) with layers that do nothing: only Python cost remains."""

    def __init__(self, depth: int = 28) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_NoOpBlock() for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def python_cost_per_call(calls: int = 2000, rounds: int = 7) -> dict[str, float]:
    """Microseconds per model call of the no-op DiT: plain, all-ones schedule, every other step reused."""
    model, x = _NoOpModel(), torch.zeros(1)

    def best() -> float:
        timings = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(calls):
                model(x)
            timings.append((time.perf_counter() - start) / calls * 1e6)
        return min(timings)

    result = {"plain_us": best()}
    for name, plan in (("all_ones_us", (1,) * 50), ("half_reused_us", (1, 0) * 25)):
        with smoothcache.cache(model, Schedule({"attn": plan, "mlp": plan})):
            result[name] = best()
    result["added_us_per_layer_call"] = (result["all_ones_us"] - result["plain_us"]) / 56
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--sample", type=int, default=16, help="latent size (tokens = (sample/2)^2)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is the least noisy on a shared CPU)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "overhead-cpu.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    pipe = tiny_pipeline(args.layers, args.width, args.sample)
    labels = list(range(args.batch))

    def call() -> None:
        pipe(class_labels=labels, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0), output_type="pt")

    ones = Schedule({"attn1": (1,) * args.steps, "ff": (1,) * args.steps})
    handle = smoothcache.cache(pipe, ones)
    handle.disable()

    def plain() -> None:
        call()

    def cached_all_ones() -> None:
        handle.enable()
        try:
            call()
        finally:
            handle.disable()

    def calibrating() -> None:
        with smoothcache.calibration(pipe, measure_flops=False):
            call()

    variants = {"plain": plain, "all_ones_schedule": cached_all_ones, "calibration": calibrating}
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    median = {name: statistics.median(values) for name, values in times.items()}
    python_cost = python_cost_per_call()
    result = {
        "benchmark": "overhead",
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "settings": vars(args) | {"out": str(args.out)},
        "median_seconds": median,
        "hook_overhead": median["all_ones_schedule"] / median["plain"] - 1,
        "calibration_overhead": median["calibration"] / median["plain"] - 1,
        "python_cost_no_op_dit_xl_layout": python_cost,
        "targets": {"hook_overhead": 0.02, "calibration_overhead": 0.20},
        "seconds": times,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    try:
        from smoothcache.plots import pyplot, save_figure

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.boxplot([times[n] for n in variants])
        ax.set_xticks(range(1, len(variants) + 1), list(variants))
        ax.set_ylabel("seconds per pipeline call")
        ax.set_title(f"{args.steps} steps, {args.layers} blocks, width {args.width}, batch {args.batch} (CPU)")
        fig.tight_layout()
        save_figure(fig, args.out.with_suffix(".png"), dpi=120)
    except ImportError:
        pass
    print(json.dumps({k: result[k] for k in ("device", "median_seconds", "hook_overhead", "calibration_overhead", "python_cost_no_op_dit_xl_layout")}, indent=1))


if __name__ == "__main__":
    main()
