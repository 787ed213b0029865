"""Every caching method on the bench model (16-block DiT, Fashion-MNIST) through diffusers' DiTPipeline.

Quality (PSNR/SSIM against the uncached samples of the same seeds, FD-clf, class accuracy), compute
and measured ``pipe(...)`` speed, eager and compiled with CUDA graphs, for DDIM 50 and
DPM-Solver++ 20 steps: see ``smoothcache.demo.bench_harness``.

    python benchmarks/bench_proof.py --device cuda --out docs/bench           # one H200: about 8 minutes
    python benchmarks/bench_proof.py --tiny --out /tmp/bench-proof            # random tiny model, CPU: the code paths

On the GPU machine (wheels for diffusers 0.42.1, cache-dit 1.5.3 and dit-smoothcache 0.1.1 in .whl-bench/)::

    pip install -q --no-index --no-deps --target /tmp/site .whl-bench/*.whl &&
    PYTHONPATH=/tmp/site:src python3 benchmarks/bench_proof.py --device cuda --out "$OUT/bench"
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import fields
from pathlib import Path

import torch

from smoothcache.demo import bench_figures
from smoothcache.demo.assets import load_bench_pipeline, load_bench_scorer
from smoothcache.demo.bench_compare import summarise
from smoothcache.demo.bench_harness import BenchConfig, run_bench
from smoothcache.demo.bench_model import tiny_bench

TINY = BenchConfig(samplers=("ddim-8",), samples_per_class=2, calibration_per_class=1, budgets=(0.6, 0.4),
                   timing_repeats=1, compiled=False, few_settings=True, progress=False)


def merge_compiled(report_path: Path, compiled_path: Path) -> None:
    """Copy the compiled timings of another run (same methods and settings, run with --eager false)
    into a report, each row naming the run it came from, and redraw its Pareto figures. Several
    runs may be merged: a row's ratios are against its own run's uncached compiled calls."""
    report, compiled = json.loads(report_path.read_text()), json.loads(compiled_path.read_text())
    for sampler, result in compiled["samplers"].items():
        if sampler not in report["samplers"]:
            raise SystemExit(f"{report_path} has no sampler {sampler!r}; it has {list(report['samplers'])}")
        target_result = report["samplers"][sampler]
        # The greedy rows' settings name their alpha, which a second calibration may round differently.
        rows = {(r["family"], r["setting"].split(" (alpha")[0]): r for r in target_result["rows"]}
        for row in result["rows"]:
            if not row.get("compiled_seconds") and row.get("compiled_error") is None:
                continue
            target = rows.get((row["family"], row["setting"].split(" (alpha")[0]))
            if target is None:
                print(f"warning: no row {row['family']} / {row['setting']} in {report_path}; its compiled timing is left out")
                continue
            for key in ("speedup_compiled", "seconds_compiled", "compiled_ratios", "compiled_seconds", "compiled_error"):
                target[key] = row.get(key)
            target["compiled_from"] = compiled_path.name
        run = {"file": compiled_path.name, "device": compiled["device"], "date": compiled.get("date"),
               "versions": compiled.get("versions"),
               "note": f"a process of its own; its quality figures ({10 * compiled['config']['samples_per_class']} "
                       "samples) are not used"}
        for key in ("uncached_seconds_compiled", "compiled_reference", "compiled_error", "compiled_skipped"):
            if result.get(key) is not None:
                run[key] = result[key]
        runs = [r for r in target_result.get("compiled_runs", []) if r["file"] != compiled_path.name]
        target_result["compiled_runs"] = [*runs, run]
    for result in report["samplers"].values():
        result["at_equal_speed"] = summarise(result)
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    for sampler, result in report["samplers"].items():
        bench_figures.pareto_figure(result, report, report_path.parent / f"pareto-{bench_figures.file_tag(sampler)}.png")


def redraw(report_path: Path) -> None:
    """Recompute a report's comparisons at equal speed and redraw its Pareto figures (no model runs)."""
    report = json.loads(report_path.read_text())
    for sampler, result in report["samplers"].items():
        result["at_equal_speed"] = summarise(result)
        bench_figures.pareto_figure(result, report, report_path.parent / f"pareto-{bench_figures.file_tag(sampler)}.png")
    report_path.write_text(json.dumps(report, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for report.json and the figures")
    parser.add_argument("--redraw", type=Path, metavar="REPORT",
                        help="recompute REPORT's comparisons and redraw its Pareto figures; nothing else")
    parser.add_argument("--merge-compiled", nargs=2, type=Path, metavar=("REPORT", "COMPILED_REPORT"),
                        help="copy the compiled timings of COMPILED_REPORT into REPORT and redraw; nothing else")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--model", type=Path, help="bench pipeline folder (default: the shipped one)")
    parser.add_argument("--classifier", type=Path, help="bench classifier folder (default: the shipped one)")
    parser.add_argument("--tiny", action="store_true", help="a random tiny model and few settings (CPU smoke run)")
    for f in fields(BenchConfig):
        if f.type in ("int", "float", "bool") or isinstance(f.default, (int, float)):
            kind = {"bool": lambda s: s.lower() in ("1", "true", "yes")}.get(str(f.type), type(f.default))
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None)
    parser.add_argument("--samplers", nargs="+", help='"<ddim|dpm++>-<steps>", e.g. ddim-50 dpm++-20')
    parser.add_argument("--budgets", nargs="+", type=float, help="compute fractions of smoothcache's schedules")
    parser.add_argument("--compiled-families", nargs="+", metavar="PREFIX",
                        help='time only these method families compiled, by name prefix, e.g. "smoothcache layers"')
    args = parser.parse_args()
    if args.redraw:
        redraw(args.redraw)
        return
    if args.merge_compiled:
        merge_compiled(*args.merge_compiled)
        return
    if args.out is None:
        parser.error("--out is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    config = TINY if args.tiny else BenchConfig()
    overrides = {f.name: getattr(args, f.name) for f in fields(BenchConfig)
                 if getattr(args, f.name, None) is not None}
    if args.samplers:
        overrides["samplers"] = tuple(args.samplers)
    if args.budgets:
        overrides["budgets"] = tuple(args.budgets)
    if args.compiled_families:
        overrides["compiled_families"] = tuple(args.compiled_families)
    config = BenchConfig(**{**{f.name: getattr(config, f.name) for f in fields(BenchConfig)}, **overrides})
    if args.tiny:
        pipe, scorer = tiny_bench(args.device)
        describe = {"model": "random tiny DiT (10 blocks, width 16): code paths only"}
    else:
        dtype = getattr(torch, args.dtype) if args.device != "cpu" else torch.float32
        pipe = load_bench_pipeline(args.device, dtype, directory=args.model, progress_bar=False)
        scorer = load_bench_scorer(args.device, directory=args.classifier)
        describe = {"model": "bench DiT: 16 blocks, width 160, Fashion-MNIST 32x32 (docs/bench/training.md)",
                    "parameters": sum(p.numel() for p in pipe.transformer.parameters())}
    report = run_bench(pipe, scorer, config, args.out, describe)
    print(json.dumps({s: r.get("uncached") for s, r in report["samplers"].items()}, indent=1))
    print(f"report: {args.out / 'report.json'} ({report['seconds']} s)")


if __name__ == "__main__":
    main()
