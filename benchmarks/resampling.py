"""How close does a resampled profile come to a fresh calibration at another step count?

Calibrates the shipped demo model at --source steps, resamples the profile to each target step
count, calibrates afresh there too, and scores the optimal solver's schedules from both against
the uncached output at that step count (PSNR on the same seeds; higher is closer).

    python benchmarks/resampling.py --out docs/solvers       # about 3 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import smoothcache
from smoothcache import ScheduleError
from smoothcache.demo.assets import load_demo_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/solvers")
    parser.add_argument("--source", type=int, default=20)
    parser.add_argument("--targets", default="10,30,50")
    parser.add_argument("--compute-fractions", default="0.65,0.5,0.4")
    parser.add_argument("--samples-per-class", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = load_demo_pipeline(progress_bar=False)
    pipe.set_progress_bar_config(disable=True)
    labels = list(range(10))

    def calibrate(steps: int) -> smoothcache.CalibrationProfile:
        with smoothcache.calibration(pipe, steps=steps) as rec:
            pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=1.5, generator=torch.Generator().manual_seed(10_000))
        return rec.profile

    def generate(steps: int, schedule: smoothcache.Schedule | None = None) -> torch.Tensor:
        handle = smoothcache.cache(pipe, schedule) if schedule is not None else None
        try:
            return pipe(class_labels=labels * args.samples_per_class, num_inference_steps=steps, guidance_scale=1.5,
                        generator=torch.Generator().manual_seed(0), output_type="pt").images
        finally:
            if handle is not None:
                handle.disable()

    source = calibrate(args.source)
    results = []
    for steps in (int(x) for x in args.targets.split(",")):
        fresh = calibrate(steps)
        pipe.scheduler.set_timesteps(steps)
        resampled = source.resample(steps, timesteps=pipe.scheduler.timesteps)
        a, b = fresh.mean_errors(), resampled.mean_errors()
        both = np.isfinite(a) & np.isfinite(b)
        reference = generate(steps)
        row = {
            "steps": steps,
            "curve_relative_difference": float(np.abs(a[both] - b[both]).sum() / np.abs(a[both]).sum()),
            "coverage": float(np.isfinite(b).sum() / np.isfinite(a).sum()),
            "budgets": [],
        }
        for fraction in (float(x) for x in args.compute_fractions.split(",")):
            entry: dict[str, object] = {"compute_fraction": fraction}
            for name, profile in (("fresh", fresh), ("resampled", resampled)):
                try:
                    schedule = profile.schedule(compute_fraction=fraction, solver="optimal")
                except ScheduleError as exc:
                    entry[name] = {"error": str(exc)}
                    continue
                output = generate(steps, schedule)
                psnr = float(10 * torch.log10(1 / ((output - reference) ** 2).mean()))
                entry[name] = {"psnr": psnr, "compute_fraction": schedule.compute_fraction(), "plans": schedule.to_dict()}
            row["budgets"].append(entry)
            print(steps, fraction, {k: v.get("psnr", v.get("error", "")[:50]) for k, v in entry.items() if isinstance(v, dict)})
        results.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d"), "source_steps": args.source, "solver": "optimal", "device": "cpu", "results": results}
    (out / "resampling.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
