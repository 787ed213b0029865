"""The ``smoothcache`` command line: calibrate, schedule, generate, inspect. The only module that prints."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .errors import SmoothCacheError
from .profile import CalibrationProfile
from .schedule import Schedule
from .solvers import SOLVERS
from .version import __version__


def _csv_ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="'demo', a local pipeline folder, or a hub id (loaded with from_pretrained)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (num_inference_steps)")
    parser.add_argument("--scheduler", help="diffusers scheduler class to swap in, e.g. DPMSolverMultistepScheduler")
    parser.add_argument("--classes", type=_csv_ints, help="class labels, e.g. 207,360,387 (class-conditional models)")
    parser.add_argument("--prompts", nargs="+", help="text prompts (text-conditional models)")
    parser.add_argument("--samples", type=int, default=8, help="random classes to draw when --classes is not given")
    parser.add_argument("--batch", type=int, default=4, help="samples per pipeline call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale (pipeline default if unset)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _load(args: argparse.Namespace) -> tuple[Any, list[Any], dict[str, Any]]:
    from . import distributed
    from .cli_pipelines import load_pipeline, make_requests

    world = distributed.current()  # under torchrun: this rank's GPU, and one progress bar
    pipe = load_pipeline(
        args.model, world.device(args.device), args.dtype, args.scheduler, progress_bar=not args.quiet and world.is_main
    )
    pipe.set_progress_bar_config(disable=True)
    requests = make_requests(
        pipe, classes=args.classes, prompts=args.prompts, samples=args.samples, batch=args.batch, seed=args.seed
    )
    extra = {} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}
    return pipe, requests, extra


def cmd_calibrate(args: argparse.Namespace) -> int:
    from . import distributed
    from .calibration import calibration
    from .cli_pipelines import run_request

    with distributed.session(args.device) as world:  # one process unless launched by torchrun

        def calibrate_shard() -> tuple[CalibrationProfile | None, list[Any], float]:
            pipe, requests, extra = _load(args)
            started, shard = time.perf_counter(), world.shard(requests)
            if not shard and world.size > 1:  # more ranks than calls
                return None, requests, 0.0
            branches = "auto" if args.branches else None
            with calibration(
                pipe, components=args.components, lookahead=args.lookahead, steps=args.steps, branches=branches,
                forecast=args.forecast,
            ) as recorder:
                for request in tqdm(shard, desc="calibrating", unit="call", disable=args.quiet or not world.is_main):
                    run_request(pipe, request, args.steps, **extra)
            return recorder.profile, requests, time.perf_counter() - started

        results = world.run(calibrate_shard)
    if not world.is_main:
        return 0
    profile = distributed.merge_rank_profiles([shard_profile for shard_profile, _, _ in results])
    requests, seconds = results[0][1], max(elapsed for _, _, elapsed in results)
    profile.metadata["model"] = args.model
    profile.metadata["calibration_set"] = [
        {"seed": r.seed, "class_labels": list(r.class_labels), "prompts": list(r.prompts)} for r in requests
    ]
    profile.save(args.out)
    ranks = f" on {world.size} ranks" if world.size > 1 else ""
    print(f"Calibrated {len(profile.layers)} layers ({', '.join(profile.keys())}) over {profile.num_runs} calls "
          f"of {profile.num_steps} steps{ranks} in {seconds:.1f}s -> {args.out}")
    print(_threshold_table(profile))
    return 0


def _threshold_table(profile: CalibrationProfile) -> str:
    lines = ["alpha   compute  est. speedup"]
    has_costs = profile.total_flops is not None
    for alpha in (0.05, 0.1, 0.15, 0.18, 0.25, 0.35):
        schedule = profile.schedule(alpha=alpha)
        speedup = f"{profile.estimated_speedup(schedule):.2f}x" if has_costs else "n/a"
        lines.append(f"{alpha:<6}  {schedule.compute_fraction():7.3f}  {speedup:>12}")
    return "\n".join(lines)


def cmd_schedule(args: argparse.Namespace) -> int:
    profile = CalibrationProfile.load(args.profile)
    if args.steps is not None and args.steps != profile.num_steps:
        from .cli_pipelines import scheduler_timesteps

        timesteps = scheduler_timesteps(profile.metadata.get("scheduler_config"), args.steps)
        profile = profile.resample(args.steps, timesteps)
        by = "the scheduler's timesteps" if timesteps else "evenly spaced steps"
        print(f"Resampled the {profile.metadata['resampled_from']['num_steps']}-step profile to {args.steps} steps by {by}")
    schedule, alpha = profile.schedule_and_threshold(
        args.alpha,
        compute_fraction=args.compute_fraction,
        speedup=args.speedup,
        keys=args.keys,
        per_block=args.per_block,
        solver=args.solver,
        forecast=args.forecast,
        weigh_steps=not args.unweighted,
    )
    schedule.save(args.out)
    print(schedule.summary())
    if args.forecast == "linear":
        print("Planned for forecasting: generate with --forecast linear (cache(..., forecast='linear'))")
    speedup = f"estimated speedup {profile.estimated_speedup(schedule):.2f}x" if profile.total_flops else "no FLOPs recorded"
    threshold = f"alpha {alpha:.4g}, " if alpha is not None else ""
    solver = "greedy" if alpha is not None else args.solver or "optimal"  # only the greedy rule has a threshold
    print(f"{solver} solver: {threshold}{speedup} -> {args.out}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from .cli_pipelines import run_request
    from .tuning import tune

    profile = CalibrationProfile.load(args.profile)
    if args.steps != profile.num_steps:
        raise SystemExit(f"error: {args.profile} was calibrated for {profile.num_steps} steps but --steps is {args.steps}")
    pipe, requests, extra = _load(args)

    def generate() -> list[Any]:
        return [run_request(pipe, request, args.steps, **extra) for request in requests]

    result = tune(pipe, profile, generate, args.max_error, solver=args.solver, progress=not args.quiet, forecast=args.forecast)
    result.schedule.save(args.out)
    print("compute  rel-L1 error of the output")
    for probe in sorted(result.probes, key=lambda p: p["compute_fraction"]):
        mark = "  <- chosen" if probe["compute_fraction"] == result.compute_fraction else ""
        print(f"{probe['compute_fraction']:7.3f}  {probe['error']:.4g}{mark}")
    speedup = f", estimated speedup {result.estimated_speedup:.2f}x" if result.estimated_speedup else ""
    print(f"Cheapest schedule within rel-L1 {args.max_error:g} over {len(requests)} calls: compute {result.compute_fraction:.3f}, "
          f"error {result.error:.4g}{speedup} -> {args.out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from . import distributed
    from .cli_pipelines import run_request
    from .runtime import cache

    schedule = Schedule.load(args.schedule) if args.schedule else None
    if schedule is not None and args.steps != schedule.num_steps:
        raise SystemExit(f"error: {args.schedule} has {schedule.num_steps} steps but --steps is {args.steps}; pass --steps {schedule.num_steps}")
    out = Path(args.out)
    with distributed.session(args.device) as world:  # one process unless launched by torchrun

        def generate_shard() -> tuple[list[str], float]:
            pipe, requests, extra = _load(args)
            out.mkdir(parents=True, exist_ok=True)
            shard = world.shard_range(len(requests))
            index = sum(request.size for request in requests[: shard.start])  # file names number images globally
            handle = cache(pipe, schedule, forecast=args.forecast) if schedule is not None else None
            written: list[str] = []
            started = time.perf_counter()
            try:
                for request in tqdm(requests[shard.start : shard.stop], desc="generating", unit="call",
                                    disable=args.quiet or not world.is_main):
                    images = run_request(pipe, request, args.steps, output_type="pil", **extra)
                    for image, name in zip(images, request.names()):
                        path = out / f"{index + len(written):04d}-{name}-seed{request.seed}.png"
                        image.save(path)
                        written.append(str(path))
            finally:
                if handle is not None:
                    handle.disable()
            return written, time.perf_counter() - started

        results = world.run(generate_shard)
    if not world.is_main:
        return 0
    written = [path for files, _ in results for path in files]
    seconds = max(elapsed for _, elapsed in results)
    record = {"model": args.model, "steps": args.steps, "schedule": args.schedule, "seconds": seconds, "files": written}
    if world.size > 1:
        record["world_size"] = world.size
    (out / "generation.json").write_text(json.dumps(record, indent=1))
    ranks = f" on {world.size} ranks" if world.size > 1 else ""
    print(f"Wrote {len(written)} images to {out}{ranks} in {seconds:.1f}s ({'cached: ' + args.schedule if schedule else 'uncached'})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import benchmark_schedule
    from .cli_pipelines import run_request

    schedule = Schedule.load(args.schedule)
    pipe, requests, extra = _load(args)
    request = requests[0]
    if args.compile != "none":  # as diffusers' docs compile: the transformer wrapped whole
        import torch

        mode = "reduce-overhead" if args.compile == "model-cudagraphs" else None
        pipe.transformer = torch.compile(pipe.transformer, mode=mode)
    result = benchmark_schedule(
        pipe, schedule, lambda: run_request(pipe, request, schedule.num_steps, **extra), repeats=args.repeats,
        forecast=args.forecast, warmup=1 if args.compile == "none" else 3,
        cuda_graphs=args.compile == "model-cudagraphs",
    )
    ideal = f"{result.ideal_speedup:.2f}x" if result.ideal_speedup else "n/a"
    efficiency = f"{result.efficiency:.2f}" if result.efficiency else "n/a"
    compiled = "" if args.compile == "none" else f", torch.compile {args.compile}"
    print(f"{args.model}, {schedule.num_steps} steps, batch {request.size}, {args.device}{compiled}; median of {args.repeats}")
    print(f"uncached {result.uncached_seconds:.3f}s  cached {result.cached_seconds:.3f}s  "
          f"speedup {result.speedup:.2f}x  ideal {ideal}  efficiency {efficiency}  compute {result.compute_fraction:.2f}")
    if result.peak_memory_mib:
        print("peak memory (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in result.peak_memory_mib.items()))
    if result.host_syncs is not None:
        print(f"host waited for the GPU {result.host_syncs} times in one cached generation")
    for warning in result.warnings:
        print(f"warning: {warning}")
    if args.out:
        Path(args.out).write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .errors import ProfileError

    try:
        data = json.loads(Path(args.file).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"error: cannot read {args.file}: {exc}") from exc
    if isinstance(data, dict) and data.get("format") == "smoothcache.profile":
        profile = CalibrationProfile.from_dict(data, source=args.file)
        meta = profile.metadata
        print(f"profile of {meta.get('model_class')} ({meta.get('model', '?')}), scheduler {meta.get('scheduler_class')}, "
              f"{profile.num_steps} steps, lookahead {profile.lookahead}, {profile.num_runs} runs, {len(profile.layers)} layers")
        if profile.total_flops:
            costs = profile.key_costs()
            print("FLOPs share per call: " + ", ".join(f"{k} {v / profile.total_flops:.1%}" for k, v in costs.items()))
        print(_threshold_table(profile))
        if args.plot:
            from .plots import plot_profile

            print(f"plot -> {plot_profile(profile, args.plot, tuple(args.alpha or ()))}")
        return 0
    try:
        schedule = Schedule.from_dict(data, source=args.file)
    except SmoothCacheError as exc:
        raise ProfileError(f"{args.file} is neither a smoothcache profile nor a schedule: {exc}") from exc
    print(schedule.summary())
    if args.plot:
        from .plots import plot_schedule

        print(f"plot -> {plot_schedule(schedule, args.plot)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.model == "bench":
        return cmd_demo_bench(args)
    from .demo.assets import load_demo_pipeline, load_quality_scorer
    from .demo.figures import plot_samples, plot_tradeoff
    from .demo.harness import DemoConfig, run_demo, run_label

    config = DemoConfig(
        steps=args.steps, samples_per_class=args.samples_per_class or 5, seed=args.seed,
        timing_repeats=args.timing_repeats,
    )
    device = args.device or "cpu"
    pipe = load_demo_pipeline(device=device, progress_bar=not args.quiet)
    scorer = load_quality_scorer(device=device)
    started = time.perf_counter()
    result = run_demo(pipe, scorer, config, progress=not args.quiet)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = result.report
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    result.profile.save(out / "profile.json")
    plot_samples(result.images, out / "samples.png", columns=config.num_classes)
    plot_tradeoff(report, out / "tradeoff.png")
    print(_demo_table(report))
    best = report["best_smoothcache_within_quality"]
    if best:
        print(f"\nFastest SmoothCache run within FID +10% and accuracy -2 points of uncached: "
              f"{best['speedup']:.2f}x ({run_label(best)}, compute fraction {best['compute_fraction']:.2f})")
    else:
        print("\nNo SmoothCache run kept FID within +10% and accuracy within 2 points of uncached.")
    print(f"Done in {time.perf_counter() - started:.0f}s: {out}/report.json, samples.png, tradeoff.png, profile.json")
    return 0


def cmd_demo_bench(args: argparse.Namespace) -> int:
    """Every method against every other on the shipped 16-block bench model (benchmarks/bench_proof.py)."""
    import torch

    from .demo.assets import load_bench_pipeline, load_bench_scorer
    from .demo.bench_harness import BenchConfig, run_bench

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    defaults = BenchConfig()
    samplers = tuple(args.samplers or defaults.samplers)
    for sampler in samplers:  # before minutes of loading, not after
        BenchConfig.steps_of(sampler)
    config = BenchConfig(samplers=samplers, samples_per_class=args.samples_per_class or defaults.samples_per_class,
                         seed=args.seed, timing_repeats=args.timing_repeats, progress=not args.quiet)
    pipe = load_bench_pipeline(device, dtype, progress_bar=False)
    scorer = load_bench_scorer(device)
    out = Path(args.out)
    report = run_bench(pipe, scorer, config, out)
    print(_bench_table(report))
    print(f"Done in {report['seconds']:.0f}s: {out}/report.json, pareto-*.png, samples-*.png")
    return 0


def _bench_table(report: dict[str, Any]) -> str:
    """Per sampler, each family's rows: compute, quality and measured speed."""
    def cell(value: Any, spec: str) -> str:
        return format(value, spec) if isinstance(value, (int, float)) else "-"

    lines = []
    for sampler, result in report["samplers"].items():
        base = result.get("uncached", {})
        lines.append(f"\n{sampler}: uncached FD-clf {cell(base.get('fd_clf'), '.2f')}, accuracy {cell(base.get('accuracy'), '.3f')}")
        lines.append(f"{'method':<40} {'setting':<26} {'compute':>7} {'PSNR':>6} {'FD-clf':>7} {'acc':>6} {'eager':>6} {'compiled':>8}")
        for r in result["rows"]:
            lines.append(f"{r['family'][:40]:<40} {r['setting'][:26]:<26} {cell(r['compute_fraction'], '7.2f')} "
                         f"{cell(r['psnr'], '6.1f')} {cell(r['fd_clf'], '7.2f')} {cell(r['accuracy'], '6.3f')} "
                         f"{cell(r['speedup_eager'], '5.2f')}x {cell(r['speedup_compiled'], '7.2f')}x"
                         + (f"  ({r['error'][:60]})" if r.get("error") else ""))
    return "\n".join(lines)


def _demo_table(report: dict[str, Any]) -> str:
    from .demo.harness import run_label

    base = report["baseline"]
    lines = [
        f"{report['samples']} samples, {report['steps']} steps on {report['device']}",
        f"{'method':<22} {'compute':>7} {'seconds':>8} {'speedup':>7} {'ideal':>6} {'FID':>7} {'acc':>6} {'PSNR':>6} {'SSIM':>6}",
        f"{'uncached':<22} {1.0:7.2f} {base['seconds']:8.2f} {1.0:7.2f} {1.0:6.2f} {base['fid']:7.2f} {base['accuracy']:6.3f} {'':>6} {'':>6}",
    ]
    for r in report["runs"]:
        lines.append(
            f"{run_label(r):<22} {r['compute_fraction']:7.2f} {r['seconds']:8.2f} {r['speedup']:7.2f} "
            f"{r['estimated_speedup']:6.2f} {r['fid']:7.2f} {r['accuracy']:6.3f} {r['psnr']:6.2f} {r['ssim']:6.3f}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smoothcache", description="SmoothCache for Diffusion Transformers")
    parser.add_argument("--version", action="version", version=f"smoothcache {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    calibrate = commands.add_parser("calibrate", help="record error curves over a calibration set -> profile JSON")
    _add_model_args(calibrate)
    calibrate.add_argument("--components", type=_csv, help="layers to calibrate, e.g. attn1,ff, or block for whole blocks (default: the model family's)")
    calibrate.add_argument("--lookahead", type=int, default=3)
    calibrate.add_argument(
        "--branches", action="store_true",
        help="also record the conditional and unconditional halves of a CFG batch ('attn1@uncond' keys)",
    )
    calibrate.add_argument(
        "--forecast", choices=["none", "linear"], default="none",
        help="linear: also record the errors of extrapolating outputs, to plan schedules for generate --forecast linear",
    )
    calibrate.add_argument("--out", required=True, help="profile JSON to write")
    calibrate.set_defaults(func=cmd_calibrate)

    schedule = commands.add_parser("schedule", help="profile -> schedule JSON at a threshold or budget")
    schedule.add_argument("profile")
    budget = schedule.add_mutually_exclusive_group(required=True)
    budget.add_argument("--alpha", type=float, help="error threshold (the paper's alpha)")
    budget.add_argument("--compute-fraction", type=float, help="at most this fraction of cached-layer calls computed")
    budget.add_argument("--speedup", type=float, help="at least this ideal speedup from the measured FLOPs")
    schedule.add_argument("--keys", type=_csv, help="only these layer types")
    schedule.add_argument("--steps", type=int, help="derive the schedule for this many steps (resamples the profile's curves)")
    schedule.add_argument("--per-block", action="store_true", help="one plan per block ('attn1-3') instead of per layer type")
    schedule.add_argument(
        "--solver",
        choices=SOLVERS,
        help="greedy: the paper's threshold rule; optimal: least summed error within a budget; "
        "per-block: optimal with one plan per block under one global budget "
        "(default: greedy for --alpha, optimal for a budget)",
    )
    schedule.add_argument(
        "--forecast", choices=["none", "linear"], default="none",
        help="linear: place computes for reusing steps that extrapolate (needs calibrate --forecast linear)",
    )
    schedule.add_argument(
        "--unweighted", action="store_true",
        help="optimal solver: sum the errors as measured instead of weighing each step by its sensitivity",
    )
    schedule.add_argument("--out", required=True)
    schedule.set_defaults(func=cmd_schedule)

    tune_ = commands.add_parser("tune", help="the cheapest schedule whose output stays within an error bound (measured)")
    _add_model_args(tune_)
    tune_.add_argument("--profile", required=True, help="profile JSON from `smoothcache calibrate` (same --steps)")
    tune_.add_argument("--max-error", type=float, required=True, help="allowed rel-L1 drift of the output, e.g. 0.05")
    tune_.add_argument("--solver", choices=SOLVERS, default="optimal")
    tune_.add_argument(
        "--forecast", choices=["none", "linear"], default="none",
        help="linear: plan and measure schedules for generate --forecast linear (needs calibrate --forecast linear)",
    )
    tune_.add_argument("--out", required=True, help="schedule JSON to write")
    tune_.set_defaults(func=cmd_tune)

    generate = commands.add_parser("generate", help="generate images, cached on a schedule")
    _add_model_args(generate)
    generate.add_argument("--schedule", help="schedule JSON (omit for an uncached run)")
    generate.add_argument("--out", required=True, help="folder for the images")
    generate.add_argument(
        "--forecast", choices=["none", "linear"], default="none",
        help="reusing steps extrapolate from the last two computed outputs (linear) instead of reusing the last",
    )
    generate.set_defaults(func=cmd_generate)

    bench = commands.add_parser("bench", help="uncached vs cached latency of a schedule on your pipeline")
    _add_model_args(bench)
    bench.add_argument("--schedule", required=True, help="schedule JSON; its length sets the steps")
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--forecast", choices=["none", "linear"], default="none", help="time the cache with forecast='linear'")
    bench.add_argument("--compile", choices=["none", "model", "model-cudagraphs"], default="none",
                       help="time both runs with the transformer under torch.compile (model-cudagraphs: "
                       "mode='reduce-overhead'); warms up three runs each")
    bench.add_argument("--out", help="JSON file for the result")
    bench.set_defaults(func=cmd_bench)

    inspect_ = commands.add_parser("inspect", help="summarise a profile or schedule, optionally as a PNG plot")
    inspect_.add_argument("file")
    inspect_.add_argument("--plot", help="PNG to write")
    inspect_.add_argument("--alpha", type=float, action="append", help="threshold line(s) on a profile plot")
    inspect_.set_defaults(func=cmd_inspect)

    demo = commands.add_parser("demo", help="offline demo on the shipped model: speed and quality of every method")
    demo.add_argument("--model", choices=["demo", "bench"], default="demo",
                      help="demo: the 4-block digit model, a CPU quick start (default); bench: the 16-block "
                           "Fashion-MNIST DiT against every peer (a GPU; minutes a sampler, see the README)")
    demo.add_argument("--out", default="demo-out", help="folder for report.json and the figures")
    demo.add_argument("--device", help="cpu or cuda (default: cpu for demo, cuda where available for bench)")
    demo.add_argument("--steps", type=int, default=20, help="denoising steps (demo model; bench: see --samplers)")
    demo.add_argument("--samplers", nargs="+", help='bench model: "<ddim|dpm++>-<steps>" (default: ddim-50 dpm++-20)')
    demo.add_argument("--samples-per-class", type=int, help="samples a class (default: 5 demo, 100 bench)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--timing-repeats", type=int, default=2,
                      help="times each method is timed (demo: the fastest counts; bench: the median of the rounds)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (SmoothCacheError, ValueError, OSError) as exc:
        from . import distributed

        world = distributed.current()
        if isinstance(exc, distributed.RankFailedError) and exc.failed_ranks and not world.is_main:
            return 2  # another rank's reported failure: it printed its error, rank 0 prints the summary
        where = f"[rank {world.rank}/{world.size}] " if world.size > 1 else ""
        print(f"error: {where}{exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
