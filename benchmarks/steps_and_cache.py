"""Fewer steps and a cache together, on the bench model: every split of a compute budget, and the one
``smoothcache.split_steps`` picks (issue 17: what beats "fewer steps").

For each sampler and budget ``b`` (compute as a fraction of the full-step uncached run's block
calls): ``split_steps`` measures each candidate step count ``n`` on the calibration set (labels
and seeds apart from the evaluation's): calibrated at ``n`` steps, cached with whole blocks and
linear forecasting computing ``b * full / n`` of the block calls (uncached where that reaches 1:
plain fewer steps), compared with the full-step uncached output. The default candidates run from
``full`` (the cache alone) to ``floor(b * full)`` steps (fewer steps alone). Then every candidate runs on the
evaluation set and is scored there against the full-step uncached samples of the same seeds: PSNR
(dB, per image, averaged) and class accuracy. With the default candidates the one at ``n = full`` is
the cache alone and the one at the fewest steps fewer steps alone.

    python benchmarks/steps_and_cache.py --device cpu --out docs/results/steps-and-cache        # ~25 min on 2 cores
    python benchmarks/steps_and_cache.py --device cuda --eval-per-class 100 --out "$OUT/split"  # one GPU: minutes
    python benchmarks/steps_and_cache.py --plot-from docs/results/steps-and-cache/steps-and-cache.json

Writes ``steps-and-cache.json`` (each row: sampler, budget, steps, the cache's compute fraction,
the compute fraction, the calibration-set error, evaluation PSNR and accuracy, ``chosen``) and
``steps-and-cache.png`` (PSNR against the share of steps kept, one line per budget, the chosen
split starred).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

import smoothcache
from smoothcache.demo.assets import load_bench_pipeline, load_bench_scorer
from smoothcache.demo.bench_harness import BenchConfig, make_scheduler
from smoothcache.demo.bench_model import tiny_bench
from smoothcache.files import atomic_write_text

RESULT_NAME = "steps-and-cache.json"


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.tiny:
        pipe, scorer = tiny_bench(device)
    else:
        pipe, scorer = load_bench_pipeline(device, dtype, progress_bar=False), load_bench_scorer(device)
    base_scheduler = pipe.scheduler.config
    eval_labels = [c for c in range(10) for _ in range(args.eval_per_class)]
    calibration_labels = [c for c in range(10) for _ in range(args.calibration_per_class)]

    def generate(labels: list[int], seed: int, steps: int) -> torch.Tensor:
        return pipe(labels, guidance_scale=args.guidance_scale, generator=torch.Generator(device).manual_seed(seed),
                    num_inference_steps=steps, output_type="pt").images.float()

    started, rows, result = time.perf_counter(), [], {}
    result.update(
        benchmark="steps_and_cache: fewer steps and a cache together, split by smoothcache.split_steps (issue 17)",
        device=torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores, {platform.machine()})",
        date=time.strftime("%Y-%m-%d %H:%M:%S"), torch=torch.__version__, dtype=str(dtype),
        settings={"model": "tiny random bench-shaped DiT (code paths only)" if args.tiny
                  else "bench DiT (16 blocks, Fashion-MNIST), DiTPipeline", "guidance_scale": args.guidance_scale,
                  "samplers": list(args.samplers), "budgets": list(args.budgets), "step_counts": args.step_counts or "split_steps' default",
                  "eval_images": len(eval_labels), "eval_seed": args.seed, "calibration_images": len(calibration_labels),
                  "calibration_seed": args.seed + 10_000, "components": ["block"], "forecast": "linear",
                  "split_error": "relative L1 against the full-step uncached output, calibration set",
                  "psnr": "per image, averaged, against the full-step uncached sample of the same seed"},
        rows=rows,
    )
    out = args.out / RESULT_NAME
    for sampler in args.samplers:
        full = BenchConfig.steps_of(sampler)
        pipe.scheduler = make_scheduler(sampler, base_scheduler)
        reference = generate(eval_labels, args.seed, full)
        calibration_reference = generate(calibration_labels, args.seed + 10_000, full)
        for budget in args.budgets:
            split = smoothcache.split_steps(
                pipe, lambda n: generate(calibration_labels, args.seed + 10_000, n), full, budget,
                step_counts=args.step_counts, components=["block"], forecast="linear",
                reference=calibration_reference, progress=not args.tiny,
            )
            for probe in split.probes:
                steps = probe["num_steps"]
                schedule = split.schedules[steps]
                if schedule.compute_fraction() < 1:
                    with smoothcache.cache(pipe, schedule, forecast="linear"):
                        images = generate(eval_labels, args.seed, steps)
                else:
                    images = generate(eval_labels, args.seed, steps)
                row = {"sampler": sampler, "full_steps": full, "budget": budget, "steps": steps,
                       "steps_share": steps / full, "cache_compute_fraction": probe["cache_compute_fraction"],
                       "compute_fraction": probe["compute_fraction"], "split_error": probe["error"],
                       "psnr": scorer.psnr(images, reference), "accuracy": scorer.accuracy(images, eval_labels),
                       "chosen": steps == split.num_steps}
                rows.append(row)
                print(f"{sampler} budget {budget:g}: {steps:3d} steps x cache {row['cache_compute_fraction']:.3f} "
                      f"(compute {row['compute_fraction']:.3f}) -> {row['psnr']:.2f} dB, accuracy {row['accuracy']:.3f}"
                      f"{'  <- chosen' if row['chosen'] else ''}", flush=True)
                result["minutes"] = (time.perf_counter() - started) / 60
                atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    return result


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from smoothcache.files import atomic_path

    samplers = list(dict.fromkeys(r["sampler"] for r in result["rows"]))
    figure, axes = plt.subplots(1, len(samplers), figsize=(5.2 * len(samplers), 4), squeeze=False)
    for axis, sampler in zip(axes[0], samplers, strict=True):
        rows = [r for r in result["rows"] if r["sampler"] == sampler]
        for budget in dict.fromkeys(r["budget"] for r in rows):
            line = sorted((r for r in rows if r["budget"] == budget), key=lambda r: r["steps_share"])
            shares, psnrs = [r["steps_share"] for r in line], [r["psnr"] for r in line]
            (drawn,) = axis.plot(shares, psnrs, marker="o", label=f"compute {budget:g}")
            for r in line:
                if r["chosen"]:
                    axis.plot(r["steps_share"], r["psnr"], marker="*", markersize=16, color=drawn.get_color())
        axis.set_title(sampler)
        axis.set_xlabel("share of the steps run: left end fewer steps alone, right end the cache alone")
        axis.set_ylabel("PSNR vs full-step uncached (dB)")
        axis.grid(alpha=0.3)
        axis.legend(title="star: split_steps' choice", fontsize=8)
    figure.suptitle(f"Fewer steps and a cache, bench model, {result['device']}, {result['settings']['eval_images']} images",
                    fontsize=10)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samplers", nargs="+", default=["ddim-50", "dpm++-20"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.35])
    parser.add_argument("--eval-per-class", type=int, default=2)
    parser.add_argument("--calibration-per-class", type=int, default=1)
    parser.add_argument("--guidance-scale", type=float, default=BenchConfig.guidance_scale)
    parser.add_argument("--seed", type=int, default=BenchConfig.seed)
    parser.add_argument("--out", type=Path, default=Path("docs/results/steps-and-cache"))
    parser.add_argument("--step-counts", type=int, nargs="+", help="candidates (default: split_steps' own)")
    parser.add_argument("--tiny", action="store_true", help="a random tiny model: checks the code paths, measures nothing")
    parser.add_argument("--plot-from", type=Path, help="only redraw the plot of a result JSON")
    args = parser.parse_args(argv)
    if args.plot_from:
        print(plot(json.loads(args.plot_from.read_text()), args.plot_from.with_suffix(".png")))
        return args.plot_from
    logging.basicConfig(level=logging.WARNING)
    if args.device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    args.out.mkdir(parents=True, exist_ok=True)
    result = evaluate(args)
    try:
        print(plot(result, (args.out / RESULT_NAME).with_suffix(".png")))
    except ImportError as error:
        print(f"no plot ({error}); redraw with --plot-from {args.out / RESULT_NAME}")
    return args.out / RESULT_NAME


if __name__ == "__main__":
    main()
