"""Which solver makes the best schedules? Every solver, fixed-interval, random and fewer steps on the
shipped demo model, matched in compute, scored against the uncached run on the same seeds.

    python benchmarks/solvers.py --out docs/solvers            # CPU, about 5 minutes on 2 cores
    python benchmarks/solvers.py --device cuda --out docs/solvers-gpu
    python benchmarks/solvers.py --components block --solvers optimal --out docs/solvers-block   # whole blocks

Writes report.json (every run: compute, measured and ideal speedup, FID, accuracy, PSNR, SSIM) and
tradeoff.png into --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from smoothcache.demo.assets import load_demo_pipeline, load_quality_scorer
from smoothcache.demo.figures import plot_tradeoff
from smoothcache.demo.harness import DemoConfig, run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/solvers")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples-per-class", type=int, default=10)
    parser.add_argument("--calibration-samples-per-class", type=int, default=2)
    parser.add_argument("--solvers", default="greedy,optimal,per-block")
    parser.add_argument("--compute-fractions", default="0.8,0.65,0.5,0.4,0.3")
    parser.add_argument("--timing-repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--components", help="layers to cache, e.g. block for whole blocks (default: attn1,ff)")
    parser.add_argument("--plot-from", type=Path, help="only redraw the plots of a report.json")
    args = parser.parse_args()
    if args.plot_from:
        report = json.loads(args.plot_from.read_text())
        print(plot_tradeoff(report, args.plot_from.parent / "tradeoff.png"))  # measured and ideal speedup panels
        return

    config = DemoConfig(
        steps=args.steps,
        samples_per_class=args.samples_per_class,
        calibration_samples_per_class=args.calibration_samples_per_class,
        solvers=tuple(args.solvers.split(",")),
        compute_fractions=tuple(float(x) for x in args.compute_fractions.split(",")),
        timing_repeats=args.timing_repeats,
        seed=args.seed,
        components=tuple(args.components.split(",")) if args.components else None,
    )
    pipe = load_demo_pipeline(device=args.device, progress_bar=False)
    scorer = load_quality_scorer(device=args.device)
    started = time.perf_counter()
    result = run_demo(pipe, scorer, config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = result.report
    report["seconds"] = time.perf_counter() - started
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_tradeoff(report, out / "tradeoff.png")  # measured and ideal speedup panels
    base = report["baseline"]
    print(f"uncached: FID {base['fid']:.2f}  acc {base['accuracy']:.3f}  {base['seconds']:.2f}s")
    for r in sorted(report["runs"], key=lambda r: (r["method"], r["compute_fraction"])):
        print(f"{r['method']:<24} compute {r['compute_fraction']:.2f}  ideal {r['estimated_speedup']:.2f}x  "
              f"measured {r['speedup']:.2f}x  FID {r['fid']:6.2f}  acc {r['accuracy']:.3f}  PSNR {r['psnr']:5.2f}  SSIM {r['ssim']:.3f}")


if __name__ == "__main__":
    main()
