"""The quality harness: calibrate the demo model, derive schedules, generate the same classes and
seeds with every method, and score speed and quality against the uncached run.

Methods compared at matched compute: SmoothCache at several budgets (the optimal solver, the
paper's greedy rule, and the optimal solver planning for ``forecast="linear"``); fixed-interval caching
(FORA-style, compute every n-th step); a random schedule with the same computed steps per key as
each SmoothCache schedule; and simply running fewer uncached steps for the same ideal speedup
(the baseline the paper leaves out).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from ..bench import timed
from ..profile import CalibrationProfile
from ..recorder import calibration
from ..runtime import cache
from ..schedule import Schedule
from ..solvers import SOLVERS

__all__ = ["DemoConfig", "DemoResult", "Method", "plan_methods", "random_schedule", "run_demo", "run_label"]

logger = logging.getLogger(__name__)


class Scorer(Protocol):
    def accuracy(self, images: torch.Tensor, labels: Sequence[int]) -> float: ...
    def fid(self, images: torch.Tensor) -> float: ...
    def psnr(self, images: torch.Tensor, reference: torch.Tensor) -> float: ...
    def ssim(self, images: torch.Tensor, reference: torch.Tensor) -> float: ...


@dataclass
class DemoConfig:
    """What the demo runs; the defaults fit in two minutes on a 2-core CPU."""

    steps: int = 20
    calibration_samples_per_class: int = 1
    samples_per_class: int = 5
    num_classes: int = 10
    seed: int = 0
    guidance_scale: float = 1.5  # the DiT paper's setting for FID
    timing_repeats: int = 2  # each method is timed this many times, round-robin; the fastest counts
    compute_fractions: tuple[float, ...] = (0.8, 0.65, 0.5, 0.4)
    # "optimal", "optimal+forecast", "greedy", "per-block"; random and fewer-steps follow the first
    solvers: tuple[str, ...] = ("optimal", "optimal+forecast", "greedy")
    fixed_intervals: tuple[int, ...] = (2, 3)
    components: tuple[str, ...] | None = None
    grid_columns: int = 10


@dataclass
class Method:
    """One way of generating: a schedule (or none) at a number of steps."""

    method: str
    steps: int
    schedule: Schedule | None = None
    alpha: float | None = None
    compute_fraction: float = 1.0
    estimated_speedup: float = 1.0
    forecast: str = "none"  # what a reusing step returns (smoothcache.cache's forecast=)


@dataclass
class RunResult:
    method: str
    alpha: float | None
    compute_fraction: float
    steps: int
    estimated_speedup: float
    seconds: float
    speedup: float = 1.0
    fid: float = float("nan")
    accuracy: float = float("nan")
    psnr: float = float("nan")
    ssim: float = float("nan")
    images: torch.Tensor | None = field(default=None, repr=False)


def random_schedule(like: Schedule, seed: int) -> Schedule:
    """Per key, the same number of computed steps as ``like``, at random steps (first and last kept)."""
    rng = random.Random(seed)
    plans = {}
    for key, plan in like.plans.items():
        n = len(plan)
        inner = sum(plan) - 1 - (1 if n > 1 else 0)
        chosen = set(rng.sample(range(1, n - 1), max(inner, 0))) if n > 2 else set()
        plans[key] = tuple(1 if s in chosen or s in (0, n - 1) else 0 for s in range(n))
    return Schedule(plans)


# the demo's name for each solver (the paper's greedy rule is plain "smoothcache"), and the optimal
# solver planned for, and run with, forecast="linear"
SOLVER_METHODS = {
    **{solver: "smoothcache" if solver == "greedy" else f"smoothcache-{solver}" for solver in SOLVERS},
    "optimal+forecast": "smoothcache-forecast",
}


def plan_methods(profile: CalibrationProfile, config: DemoConfig) -> list[Method]:
    """Every method the demo runs after the uncached baseline, matched in compute."""
    methods: list[Method] = []
    smoothcache_runs = []
    for solver in config.solvers:
        runs: list[Method] = []
        forecast = "linear" if solver.endswith("+forecast") else "none"
        for budget in config.compute_fractions:
            schedule, alpha = profile.schedule_and_threshold(
                compute_fraction=budget, solver=solver.removesuffix("+forecast"), forecast=forecast  # type: ignore[arg-type]
            )
            if any(m.schedule == schedule for m in runs):
                continue  # two budgets that land on one schedule
            speedup = profile.estimated_speedup(schedule)
            runs.append(
                Method(SOLVER_METHODS[solver], config.steps, schedule, alpha, schedule.compute_fraction(), speedup, forecast)
            )
        smoothcache_runs += runs
    methods += smoothcache_runs
    keys = profile.keys()
    for interval in config.fixed_intervals:
        schedule = Schedule.fixed_interval(keys, config.steps, interval)
        methods.append(
            Method(f"fixed-interval-{interval}", config.steps, schedule, None, schedule.compute_fraction(), profile.estimated_speedup(schedule))
        )
    greedy_runs = [run for run in smoothcache_runs if run.method == SOLVER_METHODS[config.solvers[0]]]
    for i, run in enumerate(greedy_runs):
        assert run.schedule is not None
        schedule = random_schedule(run.schedule, config.seed + i)
        methods.append(Method("random", config.steps, schedule, None, schedule.compute_fraction(), profile.estimated_speedup(schedule)))
    for run in greedy_runs:
        steps = max(2, round(config.steps / run.estimated_speedup))
        if any(m.method == "fewer-steps" and m.steps == steps for m in methods) or steps == config.steps:
            continue
        methods.append(Method("fewer-steps", steps, None, None, steps / config.steps, config.steps / steps))
    return methods


@dataclass
class DemoResult:
    """The JSON-ready report, and what the pictures need: each run's label and images."""

    report: dict[str, Any]
    labels: list[int]
    images: list[tuple[str, torch.Tensor]]
    profile: CalibrationProfile


def run_label(run: dict[str, Any]) -> str:
    """A short name for a run: ``greedy a=0.12`` (the paper's rule), ``optimal 0.50``, ``fewer-steps 12``."""
    if run["method"] == "smoothcache" and run["alpha"] is not None:
        return f"greedy a={run['alpha']:.3g}"
    if run["method"].startswith("smoothcache"):
        return f"{run['method'].removeprefix('smoothcache-')} {run['compute_fraction']:.2f}"
    if run["method"] == "fewer-steps":
        return f"fewer-steps {run['steps']}"
    if run["method"] == "random":
        return f"random {run['compute_fraction']:.2f}"
    return run["method"]


def run_demo(pipe: Any, scorer: Scorer, config: DemoConfig | None = None, progress: bool = True) -> DemoResult:
    """Calibrate, plan, generate and score every method on the same classes and seeds.

    ``pipe`` is a class-conditional pipeline with DiTPipeline's call shape.
    """
    config = config or DemoConfig()
    unknown = [s for s in config.solvers if s not in SOLVER_METHODS]
    if unknown:
        raise ValueError(f"Unknown demo solver(s) {unknown}; choose from {', '.join(SOLVER_METHODS)}")
    device = torch.device(getattr(pipe, "device", "cpu"))
    pipe.set_progress_bar_config(disable=True)
    # 0..9, 0..9, ...: the first num_classes samples show one of each class in the grid.
    labels = [c for _ in range(config.samples_per_class) for c in range(config.num_classes)]

    def generate(steps: int, seed: int, class_labels: list[int]) -> torch.Tensor:
        generator = torch.Generator("cpu").manual_seed(seed)
        return pipe(
            class_labels=class_labels,
            num_inference_steps=steps,
            guidance_scale=config.guidance_scale,
            generator=generator,
            output_type="pt",
        ).images.float().cpu()

    bar = tqdm(total=3, desc="demo", unit="stage", disable=not progress)
    bar.set_postfix_str("calibrating")
    calibration_labels = [c for _ in range(config.calibration_samples_per_class) for c in range(config.num_classes)]
    started = time.perf_counter()
    forecast = "linear" if any(s.endswith("+forecast") for s in config.solvers) else "none"
    components = list(config.components) if config.components else None
    with calibration(pipe, components=components, steps=config.steps, forecast=forecast) as rec:  # type: ignore[arg-type]
        generate(config.steps, config.seed + 10_000, calibration_labels)
    profile = rec.profile
    calibration_seconds = time.perf_counter() - started
    methods = plan_methods(profile, config)
    bar.update()

    bar.set_postfix_str("generating")
    generate(2, config.seed, labels[: config.num_classes])  # warm-up (allocator, kernels)
    all_methods = [Method("uncached", config.steps)] + methods
    runs = [
        RunResult(m.method, m.alpha, m.compute_fraction, m.steps, m.estimated_speedup, float("inf")) for m in all_methods
    ]
    rounds = tqdm(total=len(all_methods) * config.timing_repeats, desc="generating", unit="run", disable=not progress, leave=False)
    # round-robin, so drift in machine load hits every method alike; every other round backwards, so
    # that the uncached baseline is not always timed first (right after a warm-up or a switch)
    for round_index in range(config.timing_repeats):
        order = list(zip(all_methods, runs, strict=True))
        for method, run in order if round_index % 2 == 0 else order[::-1]:
            handle = cache(pipe, method.schedule, forecast=method.forecast) if method.schedule is not None else None  # type: ignore[arg-type]
            try:
                images, seconds = timed(lambda m=method: generate(m.steps, config.seed, labels), device)
            finally:
                if handle is not None:
                    handle.disable()
            run.seconds = min(run.seconds, seconds)
            if run.images is None:
                run.images = images
            rounds.update()
    rounds.close()
    bar.update()

    bar.set_postfix_str("scoring")
    baseline = runs[0]
    for run in runs:
        assert run.images is not None and baseline.images is not None
        run.speedup = baseline.seconds / run.seconds
        run.fid = scorer.fid(run.images)
        run.accuracy = scorer.accuracy(run.images, labels)
        if run is not baseline:
            run.psnr = scorer.psnr(run.images, baseline.images)
            run.ssim = scorer.ssim(run.images, baseline.images)
    bar.update()
    bar.close()
    report = _report(config, device, profile, calibration_seconds, runs, labels)
    images = [("uncached", runs[0].images)] + [(run_label(r), run.images) for r, run in zip(report["runs"], runs[1:])]
    return DemoResult(report, labels, images, profile)  # type: ignore[arg-type]


NOISE_MARGIN = 0.10  # a measured speedup this far above the ideal one is noise, not speed


def timing_noise(run: RunResult) -> bool:
    """Whether a run measured faster than skipping its FLOPs allows: the machine was busy while the
    uncached runs were timed (nothing a cache does beats its ideal speedup by 10%)."""
    return run.speedup > run.estimated_speedup * (1 + NOISE_MARGIN)


def _report(
    config: DemoConfig,
    device: torch.device,
    profile: CalibrationProfile,
    calibration_seconds: float,
    runs: list[RunResult],
    labels: list[int],
) -> dict[str, Any]:
    baseline, others = runs[0], runs[1:]
    within = [
        r for r in others
        if r.method.startswith("smoothcache") and r.fid <= baseline.fid * 1.10 and r.accuracy >= baseline.accuracy - 0.02
        and not timing_noise(r)
    ]
    best = max(within, key=lambda r: r.speedup, default=None)

    def row(r: RunResult) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(r).items() if k != "images"}, "timing_noise": timing_noise(r)}

    return {
        "device": str(device) if device.type != "cpu" else f"cpu ({torch.get_num_threads()} threads)",
        "steps": config.steps,
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "settings": {k: v for k, v in asdict(config).items()},
        "samples": len(labels),
        "calibration": {
            "seconds": calibration_seconds,
            "samples": config.calibration_samples_per_class * config.num_classes,
            "keys": profile.keys(),
            "flops_share": {k: v / (profile.total_flops or 1.0) for k, v in profile.key_costs().items()}
            if profile.total_flops
            else None,
        },
        "baseline": {"seconds": baseline.seconds, "fid": baseline.fid, "accuracy": baseline.accuracy},
        "runs": [row(r) for r in others],
        "best_smoothcache_within_quality": None if best is None else {
            "rule": "FID within 10% and accuracy within 2 points of uncached",
            **row(best),
        },
    }
