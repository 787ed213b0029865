"""Does caching the guidance branches apart pay? Whole-batch schedules against branch schedules of
equal compute on the shipped demo model, scored against the uncached run on the same seeds.

    python benchmarks/guidance.py --out docs/guidance           # CPU, about 2 minutes on 2 cores

Calibrates with ``branches="auto"`` and compares, at each compute fraction (cached-layer calls,
a half-batch call counting half; the rows each layer really ran are counted to check it):

    whole         the optimal solver on the whole-batch keys (attn1, ff)
    branches      the optimal solver on the branch keys (attn1@cond, attn1@uncond, ff@cond, ff@uncond)
    weighted      as branches, each half's curves weighted by its weight in the guided output
                  (cond: g, uncond: g - 1, for guidance scale g)
    sparse-d      FasterCache-like: cond on the whole-batch optimal plan at fraction f + d, uncond on
                  its own optimal plan at f - d

Writes report.json (the branch curves and every run's compute, speed, FID, accuracy, PSNR, SSIM).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import smoothcache
from smoothcache.demo.assets import load_demo_pipeline, load_quality_scorer
from smoothcache.errors import ScheduleError
from smoothcache.solvers import SolverProblem

TYPES = ("attn1", "ff")


def branch_curves_report(profile: smoothcache.CalibrationProfile) -> dict[str, Any]:
    """Per layer type: the k=1 curves of the whole batch and each branch, and how they compare."""
    report = {}
    for key in TYPES:
        whole, cond, uncond = (profile.curves(k)[0, :-1] for k in (key, f"{key}@cond", f"{key}@uncond"))
        report[key] = {
            "mean_k1": {"whole": float(whole.mean()), "cond": float(cond.mean()), "uncond": float(uncond.mean())},
            "uncond_over_cond_mean": float(uncond.mean() / cond.mean()),
            "steps_uncond_below_cond": int((uncond < cond).sum()),
            "steps": len(whole),
            "k1": {"whole": whole.round(4).tolist(), "cond": cond.round(4).tolist(), "uncond": uncond.round(4).tolist()},
            "mean_k3": {b: float(np.nanmean(profile.curves(k)[2])) for b, k in
                        (("whole", key), ("cond", f"{key}@cond"), ("uncond", f"{key}@uncond"))},
        }
    return report


def methods(profile: smoothcache.CalibrationProfile, fraction: float, guidance: float, deltas: list[float]) -> dict[str, smoothcache.Schedule]:
    steps = profile.num_steps
    branch_keys = [f"{t}@{b}" for t in TYPES for b in ("cond", "uncond")]
    plans = {"whole": profile.schedule(compute_fraction=fraction, keys=list(TYPES), solver="optimal")}
    plans["branches"] = profile.schedule(compute_fraction=fraction, keys=branch_keys, solver="optimal")
    scale = {"cond": guidance, "uncond": abs(guidance - 1)}
    # every plan from the solver's own problem (curves weighted by the steps' sensitivity, as profile.schedule does)
    problem = profile.solver_problem(branch_keys)
    weighted = SolverProblem({k: c * scale[k.split("@")[1]] for k, c in problem.curves.items()}, keep_last=problem.keep_last)
    plans["weighted"] = weighted.solve(fraction * steps * len(branch_keys))
    for d in deltas:
        if fraction - d < 2 / steps or fraction + d > 1:
            continue
        try:
            cond = profile.solver_problem(list(TYPES)).solve((fraction + d) * steps * len(TYPES))
            uncond = profile.solver_problem([f"{t}@uncond" for t in TYPES]).solve((fraction - d) * steps * len(TYPES))
        except ScheduleError:  # f - d is below what the lookahead allows
            continue
        plans[f"sparse-{d:g}"] = smoothcache.Schedule(
            {**{f"{t}@cond": cond.plans[t] for t in TYPES}, **{f"{t}@uncond": uncond.plans[f"{t}@uncond"] for t in TYPES}}
        )
    return plans


def planned_compute(schedule: smoothcache.Schedule, costs: dict[str, float]) -> tuple[float, float]:
    """Fraction of cached-layer calls (a half-batch call counts half) and of their FLOPs."""
    calls, flops = 0.0, 0.0
    for t in TYPES:
        if t in schedule.plans:
            share = schedule.compute_fraction(t)
        else:
            share = (schedule.compute_fraction(f"{t}@cond") + schedule.compute_fraction(f"{t}@uncond")) / 2
        calls += share / len(TYPES)
        flops += share * costs[t] / sum(costs[x] for x in TYPES)
    return calls, flops


class RowCounter:
    """Rows entering the first Linear of every cached layer: the work each layer really did."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.rows = 0
        linears = [b.attn1.to_q for b in transformer.transformer_blocks] + [b.ff.net[0].proj for b in transformer.transformer_blocks]
        self.handles = [m.register_forward_pre_hook(self.hit) for m in linears]

    def hit(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        self.rows += args[0].shape[0]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/guidance")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples-per-class", type=int, default=3)
    parser.add_argument("--calibration-samples-per-class", type=int, default=2)
    parser.add_argument("--guidance-scale", type=float, default=1.5)
    parser.add_argument("--compute-fractions", default="0.65,0.5,0.4,0.3")
    parser.add_argument("--deltas", default="0.1,0.2")
    parser.add_argument("--timing-repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lookahead", type=int, default=3)
    args = parser.parse_args()

    torch.set_num_threads(max(1, torch.get_num_threads()))
    pipe = load_demo_pipeline(device=args.device, progress_bar=False)
    scorer = load_quality_scorer(device=args.device)
    labels = [c for _ in range(args.samples_per_class) for c in range(10)]

    def generate(seed: int, class_labels: list[int]) -> torch.Tensor:
        return pipe(class_labels=class_labels, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                    generator=torch.Generator("cpu").manual_seed(seed), output_type="pt").images.float().cpu()

    started = time.perf_counter()
    with smoothcache.calibration(pipe, branches="auto", lookahead=args.lookahead) as rec:
        generate(args.seed + 10_000, [c for _ in range(args.calibration_samples_per_class) for c in range(10)])
    profile = rec.profile
    costs = profile.key_costs()

    runs: list[dict[str, Any]] = [{"method": "uncached", "compute_fraction": 1.0, "schedule": None}]
    for fraction in (float(x) for x in args.compute_fractions.split(",")):
        for name, schedule in methods(profile, fraction, args.guidance_scale, [float(x) for x in args.deltas.split(",")]).items():
            calls, flops = planned_compute(schedule, costs)
            runs.append({"method": name, "budget": fraction, "compute_fraction": calls, "flop_fraction": flops,
                         "estimated_speedup": profile.estimated_speedup(schedule), "schedule": schedule})

    generate(args.seed, labels[:10])  # warm-up
    for repeat in range(args.timing_repeats):  # round-robin, so load drift hits every method alike
        for run in runs:
            counter = RowCounter(pipe.transformer)
            handle = smoothcache.cache(pipe, run["schedule"]) if run["schedule"] is not None else None
            try:
                t0 = time.perf_counter()
                images = generate(args.seed, labels)
                seconds = time.perf_counter() - t0
            finally:
                if handle is not None:
                    handle.disable()
                counter.remove()
            run["seconds"] = min(run.get("seconds", float("inf")), seconds)
            run["rows"] = counter.rows
            if repeat == 0:
                run["images"] = images

    base = runs[0]
    for run in runs:
        run["measured_compute"] = run["rows"] / base["rows"]
        run["speedup"] = base["seconds"] / run["seconds"]
        run["fid"] = scorer.fid(run["images"])
        run["accuracy"] = scorer.accuracy(run["images"], labels)
        if run is not base:
            run["psnr"] = scorer.psnr(run["images"], base["images"])
            run["ssim"] = scorer.ssim(run["images"], base["images"])
    for run in runs:
        schedule = run.pop("schedule")
        run["plans"] = schedule.to_dict() if schedule is not None else None
        del run["images"]

    report = {
        "device": args.device, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
        "steps": args.steps, "samples": len(labels), "guidance_scale": args.guidance_scale,
        "calibration_samples": 10 * args.calibration_samples_per_class,
        "branch_order": profile.metadata.get("branches"), "key_costs": costs,
        "curves": branch_curves_report(profile), "runs": runs, "seconds": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    for key, c in report["curves"].items():
        m = c["mean_k1"]
        print(f"{key}: mean k=1 error whole {m['whole']:.4f} cond {m['cond']:.4f} uncond {m['uncond']:.4f} "
              f"(uncond/cond {c['uncond_over_cond_mean']:.3f}, uncond lower at {c['steps_uncond_below_cond']}/{c['steps']} steps)")
    print(f"{'method':<12} budget  calls  flops  rows   ideal  speedup    FID    acc   PSNR   SSIM")
    for r in runs:
        print(f"{r['method']:<12} {r.get('budget', 1.0):6.2f} {r['compute_fraction']:6.3f} {r.get('flop_fraction', 1.0):6.3f} "
              f"{r['measured_compute']:6.3f} {r.get('estimated_speedup', 1.0):6.2f} {r['speedup']:7.2f} {r['fid']:7.2f} "
              f"{r['accuracy']:6.3f} {r.get('psnr', float('inf')):6.2f} {r.get('ssim', 1.0):6.3f}")


if __name__ == "__main__":
    main()
