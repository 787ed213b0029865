"""The ``smoothcache`` command line: calibrate, schedule, generate, inspect. The only module that prints."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .errors import ProfileError, RankFailedError, SmoothCacheError, StepMismatchError
from .files import atomic_path, atomic_write_text, read_json
from .profile import CalibrationProfile
from .schedule import Schedule
from .solvers import SOLVERS
from .version import __version__

# ---- option types: a bad number is a usage error (exit 2) naming its flag, before any work ----


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1: steps, sample counts, batch sizes, repeats."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An integer >= 0: seeds."""
    return _int_at_least(text, 0, "an integer >= 0")


def finite_float(low: float | None = None, high: float | None = None, *, low_open: bool = False) -> Callable[[str], float]:
    """A ``type=`` for a finite number in ``[low, high]`` (``(low, high]`` with ``low_open``); a bound may be left out.

    >>> parser.add_argument("--compute-fraction", type=finite_float(0, 1, low_open=True))  # doctest: +SKIP
    """
    bounds = [f"{'>' if low_open else '>='} {low:g}"] if low is not None else []
    bounds += [f"<= {high:g}"] if high is not None else []
    if low is not None and high is not None:
        bounds = [f"in {'(' if low_open else '['}{low:g}, {high:g}]"]
    what = " ".join(["a finite number", *bounds])

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        below = low is not None and (value <= low if low_open else value < low)
        if not math.isfinite(value) or below or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


def _csv_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(value < 0 for value in values):
        raise argparse.ArgumentTypeError(f"class labels must be integers >= 0, got {text!r}")
    return values


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _add_prefetch_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefetch-timesteps", action="store_true",
                        help="copy the scheduler's timesteps to the device once per generation and look the pipeline's "
                        "execution device up once per call (smoothcache.prefetch_timesteps(pipe, device_once=True)): "
                        "removes DiTPipeline's wait for the GPU at every step and two of its three device lookups, "
                        "outputs unchanged")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="'demo', a local pipeline folder, or a hub id (loaded with from_pretrained)")
    parser.add_argument("--steps", type=positive_int, default=50, help="denoising steps (num_inference_steps)")
    parser.add_argument("--scheduler", help="diffusers scheduler class to swap in, e.g. DPMSolverMultistepScheduler")
    parser.add_argument("--classes", type=_csv_ints, help="class labels, e.g. 207,360,387 (class-conditional models)")
    parser.add_argument("--prompts", nargs="+", help="text prompts (text-conditional models)")
    parser.add_argument("--samples", type=positive_int, default=8, help="random classes to draw when --classes is not given")
    parser.add_argument("--batch", type=positive_int, default=4, help="samples per pipeline call")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the first pipeline call (then +1 per call)")
    parser.add_argument("--guidance-scale", type=finite_float(0), help="classifier-free guidance scale (pipeline default if unset)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model weights' dtype")
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
    from .cli_pipelines import run_request
    from .recorder import calibration

    with distributed.session(args.device) as world:  # one process unless launched by torchrun

        def calibrate_shard() -> tuple[CalibrationProfile | None, list[Any], float]:
            pipe, requests, extra = _load(args)
            started, shard = time.perf_counter(), world.shard(requests)
            if not shard and world.size > 1:  # more ranks than calls
                return None, requests, 0.0
            branches = "auto" if args.branches else None
            done = 0
            with calibration(
                pipe, components=args.components, lookahead=args.lookahead, steps=args.steps, branches=branches,
                forecast=args.forecast, layer_groups=args.layer_groups,
            ) as recorder:
                try:
                    for request in tqdm(shard, desc="calibrating", unit="call", disable=args.quiet or not world.is_main):
                        run_request(pipe, request, args.steps, **extra)
                        done += 1
                except KeyboardInterrupt:
                    if world.size > 1 or done == 0:
                        raise
                    interrupted.append(f"{done} of {len(shard)} calls")  # keep what the finished calls measured
            return recorder.profile, requests[:done] if interrupted else requests, time.perf_counter() - started

        interrupted: list[str] = []
        results = world.run(calibrate_shard)
    if not world.is_main:
        return 0
    profile = distributed.merge_rank_profiles([shard_profile for shard_profile, _, _ in results])
    if interrupted:
        profile.metadata["partial"] = f"interrupted after {interrupted[0]}"
    requests, seconds = results[0][1], max(elapsed for _, _, elapsed in results)
    profile.metadata["model"] = args.model
    profile.metadata["calibration_set"] = [
        {"seed": r.seed, "class_labels": list(r.class_labels), "prompts": list(r.prompts)} for r in requests
    ]
    profile.save(args.out)
    ranks = f" on {world.size} ranks" if world.size > 1 else ""
    history = profile.metadata.get("history_peak_mib")
    held = f", outputs held for the errors at most {history:.1f} MiB" if history is not None else ""
    print(f"Calibrated {len(profile.layers)} layers ({', '.join(profile.keys())}) over {profile.num_runs} calls "
          f"of {profile.num_steps} steps{ranks} in {seconds:.1f}s{held} -> {args.out}")
    print(_threshold_table(profile))
    if interrupted:
        print(f"interrupted: saved a partial profile of {interrupted[0]} (metadata 'partial')", file=sys.stderr)
        return 130
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
        print("Planned for forecasting: generate and bench use --forecast linear with it by default")
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
        raise StepMismatchError(
            f"{args.profile} was calibrated for {profile.num_steps} steps but --steps is {args.steps}; "
            f"pass --steps {profile.num_steps} or calibrate for {args.steps} steps"
        )
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


def cmd_split(args: argparse.Namespace) -> int:
    from .cli_pipelines import run_request
    from .step_split import split_steps

    pipe, requests, extra = _load(args)

    def generate(steps: int) -> list[Any]:
        return [run_request(pipe, request, steps, **extra) for request in requests]

    result = split_steps(pipe, generate, args.steps, args.compute_fraction, step_counts=args.step_counts,
                         components=args.components, forecast=args.forecast, progress=not args.quiet)
    result.schedule.save(args.out)
    print("steps  cache computes  compute  rel-L1 error of the output")
    for probe in result.probes:
        mark = "  <- chosen" if probe["num_steps"] == result.num_steps else ""
        print(f"{probe['num_steps']:5d}  {probe['cache_compute_fraction']:14.3f}  {probe['compute_fraction']:7.3f}  "
              f"{probe['error']:.4g}{mark}")
    if result.uses_cache:
        how = f"generate --steps {result.num_steps} --schedule {args.out}" + (" --forecast linear" if args.forecast == "linear" else "")
    elif result.num_steps < args.steps:
        how = f"generate --steps {result.num_steps} with no schedule: fewer steps alone won"
    else:
        how = f"generate --steps {result.num_steps} with no schedule: the budget leaves nothing to skip"
    print(f"Least drift at compute {args.compute_fraction:g} over {len(requests)} calls: {result.num_steps} of {args.steps} "
          f"steps, the cache computing {result.schedule.compute_fraction():.3f} of them, error {result.error:.4g} -> {args.out}")
    print(f"Run it: smoothcache {how}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from . import distributed
    from .cli_pipelines import run_request
    from .runtime import cache

    schedule = Schedule.load(args.schedule) if args.schedule else None
    if schedule is not None and args.steps != schedule.num_steps:
        raise StepMismatchError(
            f"{args.schedule} has {schedule.num_steps} steps but --steps is {args.steps}; pass --steps {schedule.num_steps}"
        )
    out = Path(args.out)
    with distributed.session(args.device) as world:  # one process unless launched by torchrun

        def generate_shard() -> tuple[list[str], float]:
            pipe, requests, extra = _load(args)
            out.mkdir(parents=True, exist_ok=True)
            shard = world.shard_range(len(requests))
            index = sum(request.size for request in requests[: shard.start])  # file names number images globally
            handle = cache(pipe, schedule, forecast=_forecast_of(args, schedule)) if schedule is not None else None
            prefetch = _prefetch_if_asked(args, pipe)
            written: list[str] = []
            started = time.perf_counter()
            try:
                for request in tqdm(requests[shard.start : shard.stop], desc="generating", unit="call",
                                    disable=args.quiet or not world.is_main):
                    images = run_request(pipe, request, args.steps, output_type="pil", **extra)
                    for image, name in zip(images, request.names()):
                        path = out / f"{index + len(written):04d}-{name}-seed{request.seed}.png"
                        with atomic_path(path) as tmp:
                            image.save(tmp)
                        written.append(str(path))
            finally:
                if handle is not None:
                    handle.disable()
                if prefetch is not None:
                    prefetch.disable()
            return written, time.perf_counter() - started

        results = world.run(generate_shard)
    if not world.is_main:
        return 0
    written = [path for files, _ in results for path in files]
    seconds = max(elapsed for _, elapsed in results)
    record = {"model": args.model, "steps": args.steps, "schedule": args.schedule, "seconds": seconds, "files": written,
              "prefetch_timesteps": args.prefetch_timesteps}
    if world.size > 1:
        record["world_size"] = world.size
    atomic_write_text(out / "generation.json", json.dumps(record, indent=1))
    ranks = f" on {world.size} ranks" if world.size > 1 else ""
    print(f"Wrote {len(written)} images to {out}{ranks} in {seconds:.1f}s ({'cached: ' + args.schedule if schedule else 'uncached'})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """One cell per compile setting and batch size: uncached against cached, in this process."""
    import torch

    from .bench import benchmark_schedule, uncompile_blocks
    from .cli_pipelines import run_request

    schedule = Schedule.load(args.schedule)
    if args.step_graphs and "model-cudagraphs" in args.compile:
        raise ValueError("--step-graphs replays CUDA graphs of its own: use --compile none or model with it, "
                         "not model-cudagraphs (torch's CUDA graphs, which it replaces)")
    if args.step_graphs and not _replays_on(args.device):
        raise ValueError(f"--step-graphs replays CUDA graphs: run on a CUDA device (--device cuda), not {args.device}")
    if args.skip_guards and set(args.compile) == {"none"}:
        print("note: --skip-guards applies to compiled runs only (--compile model or model-cudagraphs)")
    warmups = {setting: _bench_warmups(args, setting) for setting in args.compile}  # refused before the model loads
    pipe, requests, extra = _load(args)
    batches = args.batch_sizes or [requests[0].size]
    prefetch = _prefetch_if_asked(args, pipe)  # uncached and cached runs alike: it is on the pipeline
    transformer, cells = pipe.transformer, []
    for compile_setting in dict.fromkeys(args.compile):
        torch._dynamo.reset()  # the last setting's graphs: each setting compiles afresh
        uncompile_blocks(transformer)  # (regional compiles in place)
        pipe.transformer = _compiled(transformer, compile_setting)
        for batch in batches:
            request = _request_of_size(requests, batch)
            result = benchmark_schedule(
                pipe, schedule, lambda request=request: run_request(pipe, request, schedule.num_steps, **extra),
                repeats=args.repeats, forecast=_forecast_of(args, schedule), warmup=warmups[compile_setting],
                cuda_graphs=compile_setting == "model-cudagraphs", progress=not args.quiet,
                step_graphs=args.step_graphs, skip_guards=args.skip_guards,
            )
            cell = {"compile": compile_setting, "batch": batch, "prefetch_timesteps": bool(prefetch),
                    "warmups": warmups[compile_setting]} | result.to_dict()
            cells.append(cell)
            _print_bench_cell(args, schedule, cell, prefetch)
    pipe.transformer = transformer
    uncompile_blocks(transformer)
    if len(cells) > 1:
        print(bench_cells_table(cells))
    if args.out:
        record = {"model": args.model, "steps": schedule.num_steps, "device": args.device, "dtype": args.dtype,
                  "repeats": args.repeats, "schedule": args.schedule, "cells": cells}
        atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")
    if args.plot:
        from .plots import plot_bench_cells

        title = f"{args.model}, {schedule.num_steps} steps, {args.device}, {args.dtype}; median of {args.repeats}"
        print(f"plot -> {plot_bench_cells(cells, args.plot, title)}")
    return 0


# warm-up runs of each (uncached, cached) before timing, per --compile setting, unless --warmups: a
# margin over the fewest (smoothcache.bench.FEWEST_WARMUPS), a few seconds on a small model
BENCH_WARMUPS = {"none": 1, "model": 3, "model-cudagraphs": 3, "regional": 3}


def _bench_warmups(args: argparse.Namespace, setting: str) -> int:
    """The warm-up runs for one ``--compile`` setting: ``--warmups`` where given, refused where it would
    time compilation or capture; step graphs warm up their own way."""
    from .bench import FEWEST_WARMUPS, STEP_GRAPHS_WARMUP

    if args.step_graphs:
        if args.warmups is not None:
            raise ValueError("--step-graphs warms up its own way (a plain run, the capture, one replay): leave --warmups out")
        return STEP_GRAPHS_WARMUP
    if args.warmups is None:
        return BENCH_WARMUPS[setting]
    fewest = FEWEST_WARMUPS[setting]
    if args.warmups < fewest:
        timed_work = "CUDA graphs' capture" if setting == "model-cudagraphs" else "compilation"
        raise ValueError(f"--warmups {args.warmups} would time {timed_work} under --compile {setting}: "
                         f"give --warmups {fewest} or more")
    return args.warmups


def _replays_on(device: str) -> bool:
    """Whether step graphs can replay on ``device``: CUDA graphs need a CUDA device (asked before the
    pipeline loads; a test seam, where a stand-in capture replays on the CPU)."""
    return str(device).startswith("cuda")


def _prefetch_if_asked(args: argparse.Namespace, pipe: Any) -> Any:
    """``smoothcache.prefetch_timesteps(pipe, device_once=True)`` where ``--prefetch-timesteps`` asks
    for it, else None (the command line's own pipeline: nothing else patches its class)."""
    if not args.prefetch_timesteps:
        return None
    from .prefetch import prefetch_timesteps

    return prefetch_timesteps(pipe, device_once=True)


def _compiled(transformer: Any, setting: str) -> Any:
    """The transformer as diffusers' docs compile it: wrapped whole (``model-cudagraphs``: with CUDA
    graphs), or each repeated block in place (``regional``: ``compile_repeated_blocks``; a model that
    names none, as DiT, each of its ``transformer_blocks``)."""
    if setting == "none":
        return transformer
    import torch

    if setting == "regional":
        from .bench import compile_blocks

        try:
            compile_blocks(transformer)
        except TypeError as error:
            raise ValueError(f"--compile regional: {error} (--compile model)") from error
        return transformer
    return torch.compile(transformer, mode="reduce-overhead" if setting == "model-cudagraphs" else None)


def _request_of_size(requests: list[Any], size: int) -> Any:
    """The first request's seed with ``size`` samples: the labels or prompts asked for, repeated as needed."""
    from itertools import cycle, islice

    from .cli_pipelines import Request

    first = requests[0]
    if size == first.size:
        return first
    if first.class_labels:
        labels = [label for r in requests for label in r.class_labels]
        return Request(first.seed, class_labels=tuple(islice(cycle(labels), size)))
    prompts = [prompt for r in requests for prompt in r.prompts]
    return Request(first.seed, prompts=tuple(islice(cycle(prompts), size)))


def _print_bench_cell(args: argparse.Namespace, schedule: Schedule, cell: dict[str, Any], prefetch: Any) -> None:
    ideal = f"{cell['ideal_speedup']:.2f}x" if cell["ideal_speedup"] else "n/a"
    efficiency = f"{cell['efficiency']:.2f}" if cell["efficiency"] else "n/a"
    compiled = "" if cell["compile"] == "none" else f", torch.compile {cell['compile']}"
    compiled += f", timesteps prefetched ({prefetch.served} device moves served)" if prefetch else ""
    print(f"{args.model}, {schedule.num_steps} steps, batch {cell['batch']}, {args.device}{compiled}; median of {args.repeats} "
          f"after {cell['warmups']} warm-up{'s' if cell['warmups'] > 1 else ''} each")
    print(f"uncached {cell['uncached_seconds']:.3f}s  cached {cell['cached_seconds']:.3f}s  "
          f"speedup {cell['speedup']:.2f}x  ideal {ideal}  efficiency {efficiency}  compute {cell['compute_fraction']:.2f}")
    if cell["peak_memory_mib"]:
        print("peak memory (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in cell["peak_memory_mib"].items()))
    if cell["host_syncs"] is not None:
        print(f"host waited for the GPU {cell['host_syncs']} times in one cached generation")
    if cell["step_graphs"]:
        counts = cell["step_graphs"]
        print("step graphs (uncached runs, then cached ones): " + "; ".join(
            f"{name} {c['replayed']} calls replayed, {c['captured']} captured" for name, c in counts.items()))
    if cell.get("plain_uncached_seconds") is not None:
        print(f"without step graphs: uncached {cell['plain_uncached_seconds']:.3f}s; cached with step graphs "
              f"{cell['speedup_over_plain']:.2f}x faster than that (the graphs' gain and the cache's)")
    if cell["skip_guards"]:
        print("timed with torch.compiler.set_stance(skip_guard_eval_unsafe=True)")
    for warning in cell["warnings"]:
        print(f"warning: {warning}")


def bench_cells_table(cells: list[dict[str, Any]]) -> str:
    """The bench's cells side by side: compile setting, batch, times, speedup against ideal, memory;
    with step graphs also the cached call's speedup over the plain pipeline (graphs and cache together)."""
    over_plain = any(c.get("speedup_over_plain") is not None for c in cells)
    header = (f"{'compile':<16} {'batch':>5} {'uncached':>9} {'cached':>8} {'speedup':>7} {'ideal':>6} "
              f"{'efficiency':>10}" + (f" {'over plain':>10}" if over_plain else "") + f" {'peak MiB (uncached/cached)':>27}")
    lines = [header]
    for c in cells:
        peaks = c["peak_memory_mib"] or {}
        memory = f"{peaks['uncached']:.0f}/{peaks['cached']:.0f}" if peaks else "-"
        ideal = f"{c['ideal_speedup']:5.2f}x" if c["ideal_speedup"] else "     -"
        efficiency = f"{c['efficiency']:10.2f}" if c["efficiency"] else f"{'-':>10}"
        plain = ""
        if over_plain:
            plain = f" {c['speedup_over_plain']:9.2f}x" if c.get("speedup_over_plain") is not None else f" {'-':>10}"
        lines.append(f"{c['compile']:<16} {c['batch']:>5} {c['uncached_seconds']:8.3f}s {c['cached_seconds']:7.3f}s "
                     f"{c['speedup']:6.2f}x {ideal} {efficiency}{plain} {memory:>27}")
    return "\n".join(lines)


def _forecast_of(args: argparse.Namespace, schedule: Schedule) -> str:
    """--forecast if given, else what the schedule was planned for (a schedule from before plans were
    recorded: none)."""
    return args.forecast or (schedule.planned or {}).get("forecast") or "none"


def cmd_inspect(args: argparse.Namespace) -> int:
    data = read_json(args.file, ProfileError, "profile or schedule")
    if isinstance(data, dict) and data.get("format") == "smoothcache.profile":
        profile = CalibrationProfile.from_dict(data, source=args.file)
        meta = profile.metadata
        print(f"profile of {meta.get('model_class')} ({meta.get('model', '?')}), scheduler {meta.get('scheduler_class')}, "
              f"{profile.num_steps} steps, lookahead {profile.lookahead}, {profile.num_runs} run"
              f"{'s' if profile.num_runs != 1 else ''}, {len(profile.layers)} layers")
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
    atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    result.profile.save(out / "profile.json")
    plot_samples(result.images, out / "samples.png", columns=config.num_classes,
                 column_names=[f"digit {c}" for c in range(config.num_classes)])
    plot_tradeoff(report, out / "tradeoff.png")
    print(demo_table(report))
    best = report["best_smoothcache_within_quality"]
    if best:
        print(f"\nFastest SmoothCache run within FID +10% and accuracy -2 points of uncached: "
              f"{best['speedup']:.2f}x ({run_label(best)}, compute fraction {best['compute_fraction']:.2f})")
    elif any(r.get("timing_noise") for r in report["runs"] if r["method"].startswith("smoothcache")):
        print("\nNo SmoothCache run with a trusted timing kept FID within +10% and accuracy within 2 points of "
              "uncached: rerun on an idle machine, or with --timing-repeats 5.")
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
    print(bench_table(report))
    print(f"Done in {report['seconds']:.0f}s: {out}/report.json, pareto-*.png, samples-*.png")
    return 0


def bench_table(report: dict[str, Any]) -> str:
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


def demo_table(report: dict[str, Any]) -> str:
    from .demo.harness import run_label

    base = report["baseline"]
    lines = [
        f"{report['samples']} samples, {report['steps']} steps on {report['device']}",
        f"{'method':<22} {'compute':>7} {'seconds':>8} {'speedup':>7} {'ideal':>6} {'FID':>7} {'acc':>6} {'PSNR':>6} {'SSIM':>6}",
        f"{'uncached':<22} {1.0:7.2f} {base['seconds']:8.2f} {1.0:7.2f} {1.0:6.2f} {base['fid']:7.2f} {base['accuracy']:6.3f} {'':>6} {'':>6}",
    ]
    for r in report["runs"]:
        speedup = f"{r['speedup']:.2f}" + ("!" if r.get("timing_noise") else "")
        lines.append(
            f"{run_label(r):<22} {r['compute_fraction']:7.2f} {r['seconds']:8.2f} {speedup:>7} "
            f"{r['estimated_speedup']:6.2f} {r['fid']:7.2f} {r['accuracy']:6.3f} {r['psnr']:6.2f} {r['ssim']:6.3f}"
        )
    noisy = sum(bool(r.get("timing_noise")) for r in report["runs"])
    if noisy:
        lines.append(f"! {noisy} run{'s' if noisy > 1 else ''} measured more than 10% above the ideal speedup: timing "
                     "noise (a busy machine), left out of the fastest run below; rerun with --timing-repeats 5")
    return "\n".join(lines)


def _command(commands: Any, name: str, help: str) -> argparse.ArgumentParser:
    return commands.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter,
                               epilog=f"example:\n  {EXAMPLES[name]}")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help with each option's default (where it has one worth saying) and examples kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
                and "default" not in text):
            text += " (default: %(default)s)"
        return text


# one example a command, shown at the end of its --help (tests/test_cli.py parses each)
EXAMPLES = {
    "calibrate": "smoothcache calibrate --model demo --steps 20 --samples 8 --out profile.json",
    "schedule": "smoothcache schedule profile.json --compute-fraction 0.5 --out schedule.json",
    "tune": "smoothcache tune --model demo --steps 20 --profile profile.json --max-error 0.05 --out schedule.json",
    "split": "smoothcache split --model demo --steps 20 --compute-fraction 0.5 --out schedule.json",
    "generate": "smoothcache generate --model demo --steps 20 --schedule schedule.json --classes 1,2,3 --out images",
    "bench": "smoothcache bench --model demo --steps 20 --schedule schedule.json --out bench.json",
    "inspect": "smoothcache inspect profile.json --plot curves.png",
    "demo": "smoothcache demo --out demo-out",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smoothcache", description="SmoothCache for Diffusion Transformers",
                                     formatter_class=_HelpFormatter,
                                     epilog="examples:\n  " + "\n  ".join(EXAMPLES.values()))
    parser.add_argument("--version", action="version", version=f"smoothcache {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    calibrate = _command(commands, "calibrate", help="record error curves over a calibration set -> profile JSON")
    _add_model_args(calibrate)
    calibrate.add_argument("--components", type=_csv, help="layers to calibrate, e.g. attn1,ff, or block for whole blocks (default: the model family's)")
    calibrate.add_argument("--lookahead", type=positive_int, default=3, help="steps ahead to measure reuse errors (at most --steps)")
    calibrate.add_argument(
        "--branches", action="store_true",
        help="also record the conditional and unconditional halves of a CFG batch ('attn1@uncond' keys)",
    )
    calibrate.add_argument(
        "--forecast", choices=["none", "linear"], default="none",
        help="linear: also record the errors of extrapolating outputs, to plan schedules for generate --forecast linear",
    )
    calibrate.add_argument(
        "--layer-groups", type=positive_int, default=1,
        help="measure the layers of every n-th block per generation, in turn: calibration's extra memory (the "
        "layers' last --lookahead outputs) drops to about 1/n; run a multiple of n generations (--samples / --batch)",
    )
    calibrate.add_argument("--out", required=True, help="profile JSON to write")
    calibrate.set_defaults(func=cmd_calibrate)

    schedule = _command(commands, "schedule", help="profile -> schedule JSON at a threshold or budget")
    schedule.add_argument("profile", help="profile JSON from `smoothcache calibrate`")
    budget = schedule.add_mutually_exclusive_group(required=True)
    budget.add_argument("--alpha", type=finite_float(0), help="error threshold (the paper's alpha)")
    budget.add_argument("--compute-fraction", type=finite_float(0, 1, low_open=True), help="at most this fraction of cached-layer calls computed")
    budget.add_argument("--speedup", type=finite_float(1), help="at least this ideal speedup from the measured FLOPs")
    schedule.add_argument("--keys", type=_csv, help="only these layer types")
    schedule.add_argument("--steps", type=positive_int, help="derive the schedule for this many steps (resamples the profile's curves)")
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
    schedule.add_argument("--out", required=True, help="schedule JSON to write")
    schedule.set_defaults(func=cmd_schedule)

    tune_ = _command(commands, "tune", help="the cheapest schedule whose output stays within an error bound (measured)")
    _add_model_args(tune_)
    tune_.add_argument("--profile", required=True, help="profile JSON from `smoothcache calibrate` (same --steps)")
    tune_.add_argument("--max-error", type=finite_float(0), required=True, help="allowed rel-L1 drift of the output, e.g. 0.05")
    tune_.add_argument("--solver", choices=SOLVERS, default="optimal", help="which solver's schedules to search")
    tune_.add_argument(
        "--forecast", choices=["none", "linear"], default="none",
        help="linear: plan and measure schedules for generate --forecast linear (needs calibrate --forecast linear)",
    )
    tune_.add_argument("--out", required=True, help="schedule JSON to write")
    tune_.set_defaults(func=cmd_tune)

    split = _command(commands, "split",
                     help="fewer steps and a cache: the split of a compute budget whose output drifts least (measured)")
    _add_model_args(split)
    split.add_argument("--compute-fraction", type=finite_float(0, 1, low_open=True), required=True,
                       help="calls of the --components computed, as a fraction of the uncached run at --steps")
    split.add_argument("--step-counts", type=_csv_ints,
                       help="candidate step counts, e.g. 50,40,35,30,25 (default: five from the fewest the budget allows to --steps)")
    split.add_argument("--components", type=_csv,
                       help="what the cache computes or reuses, e.g. attn1,ff (default: every block list cached whole, "
                            "block,single_block for Flux)")
    split.add_argument("--forecast", choices=["none", "linear"], default="linear",
                       help="linear: reusing steps extrapolate (plan and run with it)")
    split.add_argument("--out", required=True, help="schedule JSON to write (for the chosen step count)")
    split.set_defaults(func=cmd_split)

    generate = _command(commands, "generate", help="generate images, cached on a schedule")
    _add_model_args(generate)
    generate.add_argument("--schedule", help="schedule JSON (omit for an uncached run)")
    generate.add_argument("--out", required=True, help="folder for the images")
    generate.add_argument(
        "--forecast", choices=["none", "linear"],
        help="reusing steps extrapolate from the last two computed outputs (linear) instead of reusing the last "
        "(default: as the schedule was planned, else none)",
    )
    _add_prefetch_arg(generate)
    generate.set_defaults(func=cmd_generate)

    bench = _command(commands, "bench", help="uncached vs cached latency of a schedule on your pipeline")
    _add_model_args(bench)
    bench.add_argument("--schedule", required=True, help="schedule JSON; its length sets the steps")
    bench.add_argument("--repeats", type=positive_int, default=3, help="timed runs of each, interleaved (the median counts)")
    bench.add_argument("--forecast", choices=["none", "linear"],
                       help="time the cache with forecast='linear' (default: as the schedule was planned, else none)")
    bench.add_argument("--compile", nargs="+", choices=["none", "model", "model-cudagraphs", "regional"], default=["none"],
                       help="time both runs with the transformer under torch.compile (model-cudagraphs: "
                       "mode='reduce-overhead'; regional: each block compiled on its own, diffusers' "
                       "compile_repeated_blocks), after three warm-ups each (--warmups); several settings: one cell each")
    bench.add_argument("--warmups", type=positive_int,
                       help="warm-up runs of each before timing (default: 1, compiled 3; at least 2 with "
                       "model-cudagraphs): fewer save minutes on a large model")
    bench.add_argument("--batch-sizes", nargs="+", type=positive_int,
                       help="samples per call, one cell each (default: --batch); labels or prompts repeat to fill a batch")
    _add_prefetch_arg(bench)
    bench.add_argument("--step-graphs", action="store_true",
                       help="replay each step's model call from a CUDA graph (smoothcache.step_graphs), uncached and "
                       "cached alike, after timing the plain uncached pipeline without them (the cached call's "
                       "speedup over it: graphs and cache together); timed one after the other, not in turn "
                       "(CUDA; with --compile none or model)")
    bench.add_argument("--skip-guards", action="store_true",
                       help="time compiled runs under torch.compiler.set_stance(skip_guard_eval_unsafe=True), after "
                       "the warm-up (docs/speed.md says when that is safe)")
    bench.add_argument("--out", help="JSON file: the settings and one entry per cell under 'cells'")
    bench.add_argument("--plot", help="PNG to write: each cell's speedup against its ideal, and peak GPU memory")
    bench.set_defaults(func=cmd_bench)

    inspect_ = _command(commands, "inspect", help="summarise a profile or schedule, optionally as a PNG plot")
    inspect_.add_argument("file", help="a profile or schedule JSON")
    inspect_.add_argument("--plot", help="PNG to write")
    inspect_.add_argument("--alpha", type=finite_float(0), action="append", help="threshold line(s) on a profile plot")
    inspect_.set_defaults(func=cmd_inspect)

    demo = _command(commands, "demo", help="offline demo on the shipped model: speed and quality of every method")
    demo.add_argument("--model", choices=["demo", "bench"], default="demo",
                      help="demo: the 4-block digit model, a CPU quick start (default); bench: the 16-block "
                           "Fashion-MNIST DiT against every peer (a GPU; minutes a sampler, see the README)")
    demo.add_argument("--out", default="demo-out", help="folder for report.json and the figures")
    demo.add_argument("--device", help="cpu or cuda (default: cpu for demo, cuda where available for bench)")
    demo.add_argument("--steps", type=positive_int, default=20, help="denoising steps (demo model; bench: see --samplers)")
    demo.add_argument("--samplers", nargs="+", help='bench model: "<ddim|dpm++>-<steps>" (default: ddim-50 dpm++-20)')
    demo.add_argument("--samples-per-class", type=positive_int, help="samples a class (default: 5 demo, 100 bench)")
    demo.add_argument("--seed", type=non_negative_int, default=0, help="seed of the samples")
    demo.add_argument("--timing-repeats", type=positive_int, default=2,
                      help="times each method is timed (demo: the fastest counts; bench: the median of the rounds)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)
    return parser


# ---- checks after parsing and before any model loads: a typo should cost a second, not a load ----

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # org/name


def _check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Ranges that depend on two flags, refused as usage errors like the single-flag ones."""
    if args.command == "calibrate" and args.lookahead > args.steps:
        parser.error(f"argument --lookahead: must be at most --steps ({args.steps}), got {args.lookahead}")


def _check_model(args: argparse.Namespace) -> None:
    """A --model meant as a local folder (./x, /x, ~/x, a/b/c) that is not there; hub ids pass on to from_pretrained."""
    model = getattr(args, "model", None)
    if model is None or model == "demo" or args.command == "demo":
        return
    if model.startswith("~"):
        args.model = model = os.path.expanduser(model)  # from_pretrained does not expand ~
    if Path(model).exists():
        return
    if model.startswith((".", "/", "~")) or (("/" in model or "\\" in model) and not _HUB_ID.fullmatch(model)):
        raise FileNotFoundError(
            f"--model {model}: the folder does not exist; pass a pipeline folder saved with save_pretrained, "
            "a hub id (org/name), or demo"
        )


def _check_out(args: argparse.Namespace) -> None:
    """Create --out's folder and write a file there now, not after minutes of calibration."""
    out = getattr(args, "out", None)
    if out is None or args.command == "inspect":
        return
    out_path = Path(out)
    if args.command in ("generate", "demo"):  # these write a folder of files
        folder = out_path
    elif out_path.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; give the JSON file to write, e.g. {out_path / 'out.json'}")
    else:
        folder = out_path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".smoothcache-write-test-"):
            pass
    except OSError as exc:
        raise OSError(
            f"--out {out}: cannot write to {folder} ({exc.strerror or exc}); choose a writable folder"
        ) from exc


def _check_plot(args: argparse.Namespace) -> None:
    """Before the work, what would fail --plot after it: matplotlib missing, a format it cannot
    write, a folder that cannot be made."""
    plot = getattr(args, "plot", None)
    if plot is None:
        return
    from .plots import pyplot

    plt = pyplot()
    figure = plt.figure()
    formats = figure.canvas.get_supported_filetypes()
    plt.close(figure)
    if Path(plot).suffix.lstrip(".").lower() not in formats:
        raise ValueError(f"--plot {plot}: give a file name ending in .png (or {', '.join(sorted(formats))})")
    Path(plot).parent.mkdir(parents=True, exist_ok=True)


# ---- failures: one line on stderr, in the command line's own terms ----

_EXTRAS = {"diffusers": "diffusers", "accelerate": "diffusers", "matplotlib": "plot", "torchmetrics": "demo"}
_FLAGS = {"alpha": "--alpha", "compute_fraction": "--compute-fraction", "speedup": "--speedup", "lookahead": "--lookahead",
          "steps": "--steps", "max_error": "--max-error", "solver": "--solver", "forecast": "--forecast"}
_NAMES = "|".join(_FLAGS)
_PYTHON_ARGUMENT = re.compile(rf"(?<![\w/.-])({_NAMES})=(?:(['\"]?)([\w.+-]+)\2)?")  # compute_fraction=0.5, solver='greedy'
_PYTHON_NAME = re.compile(r"(?<![\w/.-])(alpha|compute_fraction|speedup|lookahead|max_error)(?= must\b)")


def _in_flag_terms(message: str) -> str:
    """A library message as the command line's user reads it: ``compute_fraction=0.5`` -> ``--compute-fraction 0.5``."""
    message = _PYTHON_ARGUMENT.sub(lambda m: _FLAGS[m[1]] + (f" {m[3]}" if m[3] else ""), message)
    message = re.sub(r"(--solver [\w-]+) or '([\w-]+)'", r"\1 or \2", message)  # solver='optimal' or 'per-block'
    return _PYTHON_NAME.sub(lambda m: _FLAGS[m[1]], message)


def _missing_extra(exc: ImportError, command: str) -> str | None:
    """The install line for an optional dependency that failed to import, or None if it is not one of ours."""
    cause: BaseException | None = exc
    while cause is not None and not (isinstance(cause, ImportError) and cause.name):  # plots.py re-raises without a name
        cause = cause.__cause__
    name = cause.name if isinstance(cause, ImportError) and cause.name else ""
    module = name.split(".")[0]
    if module not in _EXTRAS:
        return None
    install = f'pip install "smoothcache[{"demo" if command == "demo" else _EXTRAS[module]}]"'
    if isinstance(cause, ModuleNotFoundError) and name == module:
        return f"{command} needs {module}, which is not installed: {install}"
    first_line = str(cause).splitlines()[0] if str(cause) else name
    return f"{module} is installed but could not be imported ({first_line}); try {install} --upgrade"


def _fail(message: str) -> int:
    from . import distributed

    world = distributed.current()
    where = f"[rank {world.rank}/{world.size}] " if world.size > 1 else ""
    print(f"error: {where}{message}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 failed (one line on stderr), 2 a usage error (from argparse), 130 interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_flags(parser, args)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        _check_model(args)
        _check_out(args)
        _check_plot(args)
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ImportError as exc:
        message = _missing_extra(exc, args.command)
        if message is None:
            raise
        return _fail(message)
    except (SmoothCacheError, ValueError, OSError) as exc:
        from . import distributed

        if isinstance(exc, RankFailedError) and exc.failed_ranks and not distributed.current().is_main:
            return 1  # another rank's reported failure: it printed its error, rank 0 prints the summary
        return _fail(str(exc) if isinstance(exc, OSError) else _in_flag_terms(str(exc)))


if __name__ == "__main__":
    sys.exit(main())
