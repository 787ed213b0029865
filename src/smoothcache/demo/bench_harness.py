"""Every caching method against every other on the bench model, through diffusers' DiTPipeline:
quality against the uncached samples of the same seeds, and measured speed of ``pipe(...)``.

For each sampler (DDIM 50 steps, the paper's DiT setting, and DPM-Solver++ 20 steps):

1. the uncached pipeline draws ``samples_per_class`` samples of each class (fixed seeds);
2. smoothcache calibrates on a separate, smaller set (other seeds), per layer type and per block,
   with forecast errors, and MagCache calibrates as its documentation says;
3. every method draws the same samples once; the ``ComputeMeter`` counts the attn1/ff work it
   really did; PSNR and SSIM against the uncached samples, FD-clf and class accuracy are scored;
4. timing: on a GPU, first (before step 3 attaches any peer), the transformer compiled with CUDA
   graphs (``mode="reduce-overhead"``) for the methods that support it, each against uncached
   compiled calls just before and after it; after step 3, each method's eager ``pipe(...)`` call,
   ``timing_repeats`` interleaved rounds, median of the per-round ratios.

Everything lands in one ``report.json`` (rewritten after each phase, so a run stopped by a time limit
still leaves what it measured), plus a samples grid and the Pareto figures (``bench_figures``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import smoothcache

from ..files import atomic_write_text, strict_json
from . import peers
from .bench_compare import summarise
from .bench_methods import (
    Method,
    cache_dit_methods,
    compile_priority,
    diffusers_methods,
    fewer_steps_methods,
    smoothcache_methods,
    step_split_methods,
)
from .metrics import QualityScorer

__all__ = ["BenchConfig", "BenchRun", "Row", "run_bench"]

logger = logging.getLogger(__name__)

UNCACHED_EVERY = 6  # eager timing: the uncached call is timed again after this many methods
SAMPLER_KINDS = ("ddim", "dpm++")  # a sampler is named "<kind>-<steps>", e.g. "ddim-50"


@dataclass
class BenchConfig:
    """What one harness run measures; the defaults are the published run (docs/bench/)."""

    samplers: tuple[str, ...] = ("ddim-50", "dpm++-20")
    samples_per_class: int = 100
    timing_per_class: int = 20  # the timed pipe() calls draw this many a class
    calibration_per_class: int = 10
    guidance_scale: float = 1.5  # DiT's FID setting; the best FD-clf of the bench model (docs/bench/training.md)
    seed: int = 0
    budgets: tuple[float, ...] = (0.7, 0.5, 0.4, 0.3)
    timing_repeats: int = 2
    eager: bool = True  # time every method's pipe() call eagerly
    compiled: bool = True  # also time under torch.compile + CUDA graphs (CUDA only)
    max_minutes: float = 1e9  # no new phase starts after this
    thresholds_scale: float = 1.0  # peers' threshold grids are multiplied by this (tiny runs)
    few_settings: bool = False  # two settings a family: the CPU test
    compiled_families: tuple[str, ...] = ()  # time only these families (name prefixes) compiled; () = all
    compile_every_budget: bool = False  # layer schedules compiled at every budget, not the middle one only
    progress: bool = True  # a progress bar over the methods of each phase

    @staticmethod
    def steps_of(sampler: str) -> int:
        kind, _, steps = sampler.rpartition("-")
        if kind not in SAMPLER_KINDS or not steps.isdigit() or int(steps) < 2:
            raise ValueError(f'a sampler is "<kind>-<steps>" with kind one of {SAMPLER_KINDS}, e.g. "ddim-50"; got {sampler!r}')
        return int(steps)


@dataclass
class Row:
    family: str
    setting: str
    compute_fraction: float = math.nan
    psnr: float = math.nan
    ssim: float = math.nan
    fd_clf: float = math.nan
    accuracy: float = math.nan
    speedup_eager: float = math.nan
    speedup_compiled: float = math.nan
    seconds_eager: float = math.nan
    seconds_compiled: float = math.nan
    error: str | None = None
    compiled_error: str | None = None
    eager_ratios: list[float] = field(default_factory=list)
    compiled_ratios: list[float] = field(default_factory=list)
    compiled_seconds: list[float] = field(default_factory=list)  # each timed compiled call

    @property
    def ideal_speedup(self) -> float:
        return 1 / self.compute_fraction if self.compute_fraction > 0 else math.nan

    def as_dict(self) -> dict[str, Any]:
        """The row as the report stores it, its ideal speedup included."""
        return asdict(self) | {"ideal_speedup": self.ideal_speedup}


class Clock:
    """Wall-clock time of one pipeline call, with the device drained before and after."""

    def __init__(self, device: torch.device) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        self.sync()
        start = time.perf_counter()
        result = fn()
        self.sync()
        return time.perf_counter() - start, result


def make_scheduler(sampler: str, base_config: Any) -> Any:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if sampler.startswith("ddim"):
        return DDIMScheduler.from_config(base_config)
    return DPMSolverMultistepScheduler.from_config(base_config, algorithm_type="dpmsolver++", solver_order=2)


# ---- the run -------------------------------------------------------------------------------------
class BenchRun:
    """One sampler's pass: reference and calibration, compiled timing, every method's quality, eager timing."""

    def __init__(self, pipe: Any, scorer: QualityScorer, config: BenchConfig, sampler: str, started: float,
                 save: Callable[..., None]) -> None:
        self.pipe, self.scorer, self.config, self.sampler = pipe, scorer, config, sampler
        self.steps = config.steps_of(sampler)
        self.device = torch.device(pipe.device)
        self.clock = Clock(self.device)
        self.started, self.save = started, save
        per_class = config.samples_per_class
        self.labels = [c for c in range(10) for _ in range(per_class)]  # class-major: sample c*per_class is class c
        self.calibration_labels = [c for c in range(10) for _ in range(config.calibration_per_class)]
        self.rows: list[Row] = []
        self.result: dict[str, Any] = {"sampler": sampler, "steps": self.steps, "rows": []}
        self.grid: dict[str, torch.Tensor | None] = {}
        self._grid_distance: dict[str, float] = {}

    def over_time(self) -> bool:
        return time.perf_counter() - self.started > 60 * self.config.max_minutes

    def generate(self, labels: list[int] | None = None, seed: int | None = None, steps: int | None = None,
                 quiet: bool = False) -> torch.Tensor:
        generator = torch.Generator(self.device).manual_seed(self.config.seed if seed is None else seed)
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            return self.pipe(labels or self.labels, guidance_scale=self.config.guidance_scale, generator=generator,
                             num_inference_steps=steps or self.steps, output_type="pt").images.float()

    def calibration_generate(self) -> torch.Tensor:
        return self.generate(self.calibration_labels, self.config.seed + 10_000)

    def run(self) -> dict[str, Any]:
        base_scheduler = self.pipe.scheduler
        self.pipe.scheduler = make_scheduler(self.sampler, base_scheduler.config)
        meter = peers.ComputeMeter(self.pipe.transformer)
        try:
            self._prepare(meter)
            # Compiled timing comes before the quality pass has attached any peer (cache-dit patches
            # the transformer's forward for good), and without the meter's hooks in the graphs.
            meter.remove()
            if self.config.compiled and self.device.type != "cuda":
                self.result["compiled_skipped"] = "compiled timing runs on CUDA only"
            elif self.config.compiled and self.over_time():
                self.result["compiled_skipped"] = f"the run's time limit (max_minutes={self.config.max_minutes})"
            elif self.config.compiled:
                try:
                    self.time_compiled()
                except Exception as error:  # noqa: BLE001 (the other phases stand; say why compiled rows are missing)
                    self.result["compiled_error"] = f"{type(error).__name__}: {error}"[:400]
                    logger.warning("compiled timing stopped: %s", traceback.format_exc(limit=4))
                self.save(figures=False)
            meter = peers.ComputeMeter(self.pipe.transformer)
            self._quality(meter)
            self.save(figures=not self.config.eager)
            if self.config.eager and not self.over_time():
                self._time_eager()
                self.save()
        finally:
            meter.remove()
            self.pipe.scheduler = base_scheduler
        return self.result

    def _prepare(self, meter: peers.ComputeMeter) -> None:
        """The uncached reference, the calibrations, and the methods with an empty row each."""
        seconds, self.reference = self.clock(self.generate)
        self.full_counts = meter.take()
        self.result["uncached"] = {"fd_clf": self.scorer.fid(self.reference),
                                   "accuracy": self.scorer.accuracy(self.reference, self.labels),
                                   "seconds_first_call": seconds}
        self.grid["uncached"] = self._grid_images(self.reference)
        logger.info("%s uncached: %s", self.sampler, self.result["uncached"])

        with smoothcache.calibration(self.pipe, components=["attn1", "ff"], steps=self.steps, forecast="linear") as rec:
            self.calibration_generate()
        with smoothcache.calibration(self.pipe, components=["block"], steps=self.steps, forecast="linear") as brec:
            self.calibration_generate()
        layers, blocks = rec.profile, brec.profile
        costs = layers.key_costs()
        self.shares = {key: cost / sum(costs.values()) for key, cost in costs.items()}
        meter.take()
        few, scale = self.config.few_settings, self.config.thresholds_scale
        self.methods = (fewer_steps_methods(self.steps, self.config.budgets)
                        + smoothcache_methods(self.pipe, layers, blocks, self.config.budgets, self.steps,
                                              self.calibration_generate, few, self.config.compile_every_budget)
                        + step_split_methods(self.pipe, lambda n: self.generate(self.calibration_labels,
                                                                                  self.config.seed + 10_000, n),
                                             self.steps, self.config.budgets)
                        + cache_dit_methods(self.steps, len(self.pipe.transformer.transformer_blocks), few, scale)
                        + diffusers_methods(self.pipe, self.steps, self.calibration_generate, few, scale))
        meter.take()
        self.result["flop_shares"] = self.shares
        self.rows = [Row(method.family, method.setting) for method in self.methods]
        self.result["rows"] = self.rows

    def _quality(self, meter: peers.ComputeMeter) -> None:
        """Every method draws the reference's samples once: measured compute and quality."""
        meter.take()
        for method, row in tqdm(list(zip(self.methods, self.rows)), desc=f"{self.sampler} quality", unit="method",
                                disable=not self.config.progress):
            if self.over_time():
                row.error = f"skipped: the run's time limit (max_minutes={self.config.max_minutes}) was reached"
                continue
            detach = None
            try:
                detach = method.attach(self.pipe)
                images = self.generate(steps=method.steps, quiet=method.quiet)
                counts = meter.take()
                row.compute_fraction = sum(self.shares[k] * counts[k] / self.full_counts[k] for k in self.full_counts)
                row.psnr = self.scorer.psnr(images, self.reference)
                row.ssim = self.scorer.ssim(images, self.reference)
                row.fd_clf = self.scorer.fid(images)
                row.accuracy = self.scorer.accuracy(images, self.labels)
                self.grid.setdefault(method.family, None)
                if self._is_grid_setting(method, row):
                    self.grid[method.family] = self._grid_images(images)
            except Exception as error:  # noqa: BLE001 (a peer that cannot run here is recorded, not fatal)
                row.error = f"{type(error).__name__}: {error}"[:400]
                logger.warning("%s %s failed: %s", method.family, method.setting, traceback.format_exc(limit=3))
                meter.take()
            finally:
                if detach is not None:
                    detach()
            logger.info("%s %-44s %-26s compute %.3f PSNR %.2f FD-clf %.3f acc %.3f%s", self.sampler, row.family,
                        row.setting, row.compute_fraction, row.psnr, row.fd_clf, row.accuracy,
                        f" FAILED {row.error}" if row.error else "")

    def _is_grid_setting(self, method: Method, row: Row) -> bool:
        """The grid shows each family at the setting whose compute is nearest one half."""
        distance = abs(row.compute_fraction - 0.5)
        if distance < self._grid_distance.get(method.family, math.inf):
            self._grid_distance[method.family] = distance
            return True
        return False

    def _grid_images(self, images: torch.Tensor) -> torch.Tensor:
        per_class = self.config.samples_per_class
        return images[[c * per_class for c in range(10)]].cpu()

    def timing_generate(self, steps: int | None = None, quiet: bool = False) -> torch.Tensor:
        """The timed call: ``timing_per_class`` samples a class (a batch that keeps the GPU busy)."""
        labels = [c for c in range(10) for _ in range(self.config.timing_per_class)]
        return self.generate(labels, steps=steps, quiet=quiet)

    def _time_eager(self) -> None:
        """Rounds over every method, the uncached call timed every ``UNCACHED_EVERY`` methods; a
        method's ratio in a round is against the median uncached time of that round."""
        timed = [(m, r) for m, r in zip(self.methods, self.rows) if r.error is None]
        seconds: dict[int, list[float]] = {i: [] for i in range(len(timed))}
        self.timing_generate()  # warm-up at the timing batch
        bar = tqdm(total=self.config.timing_repeats * len(timed), desc=f"{self.sampler} eager timing", unit="call",
                   disable=not self.config.progress)
        for _ in range(self.config.timing_repeats):
            uncached: list[float] = []
            this_round: list[tuple[int, float]] = []
            for i, (method, _) in enumerate(timed):
                if self.over_time():
                    break
                if i % UNCACHED_EVERY == 0:
                    uncached.append(self.clock(self.timing_generate)[0])
                detach = None
                try:
                    detach = method.attach(self.pipe)
                    elapsed, _ = self.clock(lambda m=method: self.timing_generate(m.steps, m.quiet))
                except Exception as error:  # noqa: BLE001 (it ran in the quality pass; record, do not stop the run)
                    timed[i][1].error = f"eager timing: {type(error).__name__}: {error}"[:400]
                    continue
                finally:
                    if detach is not None:
                        detach()
                this_round.append((i, elapsed))
                bar.update()
            if not uncached:
                break
            uncached.append(self.clock(self.timing_generate)[0])
            baseline = statistics.median(uncached)
            self.result.setdefault("uncached_seconds_eager", []).append(baseline)
            for i, elapsed in this_round:
                timed[i][1].eager_ratios.append(baseline / elapsed)
                seconds[i].append(elapsed)
        bar.close()
        for i, (_, row) in enumerate(timed):
            if row.eager_ratios:
                row.speedup_eager = statistics.median(row.eager_ratios)
                row.seconds_eager = statistics.median(seconds[i])

    def _compiled_call(self, steps: int | None = None, quiet: bool = False) -> torch.Tensor:
        """One generation as its own CUDA graph step: methods that do not mark steps themselves
        (uncached, the peers) would otherwise run on into the previous generation's graphs."""
        torch.compiler.cudagraph_mark_step_begin()
        return self.timing_generate(steps, quiet)

    def _uncached_compiled(self) -> float:
        """One uncached compiled call, timed after an untimed one: going back from a cached model
        makes the first call capture CUDA graphs again (seconds, not milliseconds)."""
        self._compiled_call()
        return self.clock(self._compiled_call)[0]

    def time_compiled(self) -> None:
        """The transformer compiled whole with CUDA graphs (``mode="reduce-overhead"``). Each method
        is attached once, warmed up (compile, graph capture) and timed ``timing_repeats`` times;
        uncached compiled calls are timed just before and just after it, and every row is compared
        with the median of all of them. (Going back to the uncached model sometimes captures CUDA
        graphs again even after an untimed call, 2-6 s instead of 0.2-0.6 s on the H200: a row
        compared with its neighbours alone came out at 15-24x.)"""
        import torch._dynamo.config as dynamo_config

        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, 256)
        transformer = self.pipe.transformer
        transformer.compile(mode="reduce-overhead")
        try:
            for i in range(3):  # compile, then CUDA graph capture; logged, as the first can take minutes
                seconds = self.clock(self._compiled_call)[0]
                logger.info("%s compiled warm-up %d of the uncached pipeline: %.1f s", self.sampler, i + 1, seconds)
            wanted = self.config.compiled_families
            candidates = [(m, r) for m, r in zip(self.methods, self.rows) if m.compiles and r.error is None
                          and (not wanted or m.family.startswith(wanted))]
            candidates.sort(key=lambda pair: compile_priority(pair[0].family))
            for method, row in tqdm(candidates, desc=f"{self.sampler} compiled timing", unit="method",
                                    disable=not self.config.progress):
                if self.over_time():
                    break
                before = self._uncached_compiled()
                detach = None
                try:
                    detach = method.attach(self.pipe)
                    warm_up = self.clock(lambda m=method: [self._compiled_call(m.steps, m.quiet) for _ in range(2)])[0]
                    logger.info("%s compiled %s %s: warm-up %.1f s", self.sampler, method.family, method.setting, warm_up)
                    times = [self.clock(lambda m=method: self._compiled_call(m.steps, m.quiet))[0]
                             for _ in range(self.config.timing_repeats)]
                except Exception as error:  # noqa: BLE001 (one method that cannot compile ends only its row)
                    row.compiled_error = f"{type(error).__name__}: {error}"[:400]
                    logger.warning("%s %s failed compiled: %s", method.family, method.setting, error)
                    continue
                finally:
                    if detach is not None:
                        detach()
                after = self._uncached_compiled()
                row.compiled_seconds, row.seconds_compiled = times, statistics.median(times)
                uncached = self.result.setdefault("uncached_seconds_compiled", [])
                uncached.extend([before, after])
                compare_compiled_rows(self.rows, statistics.median(uncached))
                logger.info("%s compiled %-40s %-24s %.2fx", self.sampler, row.family, row.setting, row.speedup_compiled)
                self.save(figures=False)
        finally:
            transformer._compiled_call_impl = None
            torch._dynamo.reset()


def compare_compiled_rows(rows: list[Row], uncached_seconds: float) -> None:
    """Each compiled row's ratios and speedup against one uncached reference time."""
    for row in rows:
        if row.compiled_seconds:
            row.compiled_ratios = [uncached_seconds / t for t in row.compiled_seconds]
            row.speedup_compiled = statistics.median(row.compiled_ratios)


def run_bench(pipe: Any, scorer: QualityScorer, config: BenchConfig, out: Path,
              describe: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every sampler of ``config`` and write ``out/report.json`` (after each phase) and the figures."""
    from . import bench_figures

    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    device = torch.device(pipe.device)
    report: dict[str, Any] = {
        "benchmark": "every caching method on the bench model through diffusers' DiTPipeline: quality at equal "
                     "compute and measured pipe(...) speed",
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "versions": _versions(),
        "config": asdict(config),
        "dtype": str(pipe.transformer.dtype),
        "model": describe or {},
        "notes": {
            "compute_fraction": "FLOP-weighted share of attn1/ff executions, counted by hooks on Linears inside them, "
                                "relative to the uncached run of the same sampler; ideal speedup = 1 / compute",
            "speedup_eager": "median over rounds of (uncached pipe() seconds / method pipe() seconds), interleaved",
            "speedup_compiled": "transformer.compile(mode='reduce-overhead'); each row's calls against the median of "
                                "every uncached compiled call of the run (timed before and after each row)",
            "psnr": "null where the samples equal the uncached ones (infinite PSNR)",
        },
        "samplers": {},
    }
    grids: dict[str, dict[str, torch.Tensor]] = {}

    def save(figures: bool = True) -> None:
        """The report (and its figures) as they stand: a run stopped later keeps what it measured."""
        report["seconds"] = round(time.perf_counter() - started, 1)
        _write_json(out / "report.json", report)
        if figures:
            bench_figures.draw_all(strict_json(report), grids, out)

    for sampler in config.samplers:
        bench = BenchRun(pipe, scorer, config, sampler, started, save)
        report["samplers"][sampler] = bench.result
        grids[sampler] = bench.grid
        bench.run()
        report["samplers"][sampler]["rows"] = [r.as_dict() for r in bench.rows]
        report["samplers"][sampler]["at_equal_speed"] = summarise(report["samplers"][sampler])
    save()
    return strict_json(report)


def _versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"smoothcache": smoothcache.__version__, "smoothcache_commit": _git_commit()}
    for name in ("diffusers", "cache-dit", "dit-smoothcache", "torchmetrics"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _git_commit() -> str:
    """The commit of the checkout the harness runs from, or "unknown" (an installed package)."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Strict JSON, written atomically: a stopped run never leaves half a file."""
    atomic_write_text(path, json.dumps(strict_json(data), indent=1, allow_nan=False) + "\n")
