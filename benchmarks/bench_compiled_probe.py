"""A short compiled-speed probe on the bench model: how long torch.compile + CUDA graphs take to warm
up, and the compiled pipe() speedup of a few methods at half the compute, without the quality pass.

    python benchmarks/bench_compiled_probe.py --out "$OUT/probe.json"          # one GPU, a few minutes

It reuses the harness's compiled timing (``BenchRun.time_compiled``) on a handful of methods:
fewer steps, whole blocks + forecast, layers (optimal + forecast) and the paper's greedy layers,
each at compute 0.5 of DDIM 50 steps. Rows are written after each method.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

import smoothcache
from smoothcache.demo.assets import load_bench_pipeline, load_bench_scorer
from smoothcache.demo.bench_harness import (
    BenchConfig,
    BenchRun,
    Row,
    make_scheduler,
)
from smoothcache.demo.bench_methods import Method, ours
from smoothcache.files import strict_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file")
    parser.add_argument("--sampler", default="ddim-50")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    pipe = load_bench_pipeline("cuda", torch.float16, progress_bar=False)
    config = BenchConfig(samplers=(args.sampler,), timing_repeats=args.repeats, progress=False)
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "sampler": args.sampler}

    def save(figures: bool = False) -> None:
        result["rows"] = [asdict(r) for r in run.rows]
        args.out.write_text(json.dumps(strict_json(result), indent=1, default=str) + "\n")

    run = BenchRun(pipe, load_bench_scorer("cuda"), config, args.sampler, time.perf_counter(), save)
    pipe.scheduler = make_scheduler(args.sampler, pipe.scheduler.config)
    steps = run.steps
    with smoothcache.calibration(pipe, components=["attn1", "ff"], steps=steps, forecast="linear") as layers:
        run.calibration_generate()
    with smoothcache.calibration(pipe, components=["block"], steps=steps, forecast="linear") as blocks:
        run.calibration_generate()
    layers, blocks = layers.profile, blocks.profile
    run.methods = [
        Method("fewer steps", f"{steps // 2} steps", lambda p: (lambda: None), steps=steps // 2, compiles=True),
        Method("smoothcache blocks + forecast", "compute 0.5",
               ours(blocks.schedule(compute_fraction=0.5, forecast="linear"), "linear"), compiles=True),
        Method("smoothcache layers, optimal + forecast", "compute 0.5",
               ours(layers.schedule(compute_fraction=0.5, forecast="linear"), "linear"), compiles=True),
        Method("smoothcache layers, paper's greedy", "compute 0.5",
               ours(layers.schedule(compute_fraction=0.5, solver="greedy")), compiles=True),
    ]
    run.rows = [Row(m.family, m.setting) for m in run.methods]
    started = time.perf_counter()
    try:
        run.time_compiled()
    finally:
        result["seconds"] = round(time.perf_counter() - started, 1)
        save()
    for row in run.rows:
        print(f"{row.family:40} {row.setting:12} compiled {row.speedup_compiled:.2f}x  {row.compiled_error or ''}")


if __name__ == "__main__":
    main()
