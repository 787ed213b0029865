"""Every caching method against every other on the bench model, through diffusers' DiTPipeline:
quality against the uncached samples of the same seeds, and measured speed of ``pipe(...)``.

For each sampler (DDIM 50 steps, the paper's DiT setting, and DPM-Solver++ 20 steps):

1. the uncached pipeline draws ``samples_per_class`` samples of each class (fixed seeds);
2. smoothcache calibrates on a separate, smaller set (other seeds), per layer type and per block,
   with forecast errors, and MagCache calibrates as its documentation says;
3. every method draws the same samples once; the ``ComputeMeter`` counts the attn1/ff work it
   really did; PSNR and SSIM against the uncached samples, FD-clf and class accuracy are scored;
4. timing: each method's ``pipe(...)`` call, interleaved with the uncached call, ``timing_repeats``
   rounds, median of the per-round ratios (eager); then, on a GPU, the transformer compiled with
   CUDA graphs (``mode="reduce-overhead"``) for the methods that support it, each timed right after
   an uncached compiled call.

Everything lands in one ``report.json`` (rewritten after each phase, so a run stopped by a time limit
still leaves what it measured), plus a samples grid and the Pareto figures (``bench_figures``).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import math
import os
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
from smoothcache import Schedule

from . import peers
from .metrics import QualityScorer

__all__ = ["BenchConfig", "Method", "run_bench"]

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
    progress: bool = True  # a progress bar over the methods of each phase

    @staticmethod
    def steps_of(sampler: str) -> int:
        kind, _, steps = sampler.rpartition("-")
        if kind not in SAMPLER_KINDS or not steps.isdigit() or int(steps) < 2:
            raise ValueError(f'a sampler is "<kind>-<steps>" with kind one of {SAMPLER_KINDS}, e.g. "ddim-50"; got {sampler!r}')
        return int(steps)


@dataclass
class Method:
    """One method at one setting: ``attach(pipe)`` turns it on and returns the detach."""

    family: str
    setting: str
    attach: Callable[[Any], Callable[[], None]]
    steps: int | None = None  # its own step count (fewer steps); None: the sampler's
    compiles: bool = False  # timed under torch.compile + CUDA graphs
    quiet: bool = False  # prints while generating (the reference): stdout is silenced


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
    eager_ratios: list[float] = field(default_factory=list)
    compiled_ratios: list[float] = field(default_factory=list)

    @property
    def ideal_speedup(self) -> float:
        return 1 / self.compute_fraction if self.compute_fraction > 0 else math.nan


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


# ---- the methods ---------------------------------------------------------------------------------
def ours(schedule: Schedule, forecast: str = "none") -> Callable[[Any], Callable[[], None]]:
    return lambda pipe: smoothcache.cache(pipe, schedule, forecast=forecast).disable  # type: ignore[arg-type]


def smoothcache_methods(pipe: Any, layers: Any, blocks: Any, budgets: tuple[float, ...], steps: int,
                        tune_generate: Callable[[], Any], config: BenchConfig) -> list[Method]:
    """The paper's method through ours and through the reference package, and our other modes."""
    methods: list[Method] = []
    reference = peers.load_reference_package()
    middle = budgets[len(budgets) // 2]  # layer schedules are timed compiled at one budget (each compiles anew)
    for budget in budgets:
        tag = f"compute {budget:g}"
        greedy, alpha = layers.schedule_and_threshold(compute_fraction=budget, solver="greedy")
        methods.append(Method("smoothcache layers, paper's greedy", f"{tag} (alpha {alpha:.3g})", ours(greedy),
                              compiles=budget == middle))
        if reference is not None:
            plan = greedy.to_dict()
            methods.append(Method("reference dit-smoothcache (greedy)", f"{tag} (alpha {alpha:.3g})",
                                  lambda pipe, plan=plan: peers.attach_reference(pipe, reference, plan), quiet=True))
        methods.append(Method("smoothcache layers, optimal", tag, ours(layers.schedule(compute_fraction=budget)),
                              compiles=budget == middle))
        methods.append(Method("smoothcache layers, optimal + forecast", tag,
                              ours(layers.schedule(compute_fraction=budget, forecast="linear"), "linear"),
                              compiles=budget == middle))
        methods.append(Method("smoothcache layers, per-block", tag,
                              ours(layers.schedule(compute_fraction=budget, solver="per-block"))))
        methods.append(Method("smoothcache blocks, optimal", tag, ours(blocks.schedule(compute_fraction=budget)),
                              compiles=budget == middle))
        methods.append(Method("smoothcache blocks + forecast", tag,
                              ours(blocks.schedule(compute_fraction=budget, forecast="linear"), "linear"),
                              compiles=True))
    for max_error in (0.05, 0.1) if config.few_settings else (0.02, 0.04, 0.08, 0.15):
        result = smoothcache.tune(pipe, blocks, tune_generate, max_error, forecast="linear", progress=False)
        methods.append(Method("smoothcache tune (blocks + forecast)", f"max error {max_error:g}",
                              ours(result.schedule, "linear")))
    for interval in (2, 3) if config.few_settings else (2, 3, 4, 5):
        methods.append(Method("FORA (fixed interval, attn1+ff)", f"every {interval}",
                              ours(Schedule.fixed_interval(["attn1", "ff"], steps, interval)), compiles=interval == 2))
    return methods


COMPILE_ORDER = ("fewer steps", "smoothcache blocks + forecast", "smoothcache layers, optimal + forecast",
                 "smoothcache layers, optimal", "smoothcache layers, paper's greedy", "smoothcache blocks, optimal",
                 "cache-dit", "diffusers", "FORA")


def compile_priority(family: str) -> int:
    """Compiled timing runs in this order, so that a time limit cuts the least telling rows."""
    return next((i for i, prefix in enumerate(COMPILE_ORDER) if family.startswith(prefix)), len(COMPILE_ORDER))


def fewer_steps_methods(steps: int, budgets: tuple[float, ...]) -> list[Method]:
    counts = sorted({max(2, round(steps * b)) for b in budgets}, reverse=True)
    return [Method("fewer steps", f"{n} steps", lambda pipe: (lambda: None), steps=n, compiles=True) for n in counts]


def cache_dit_methods(steps: int, num_blocks: int, config: BenchConfig) -> list[Method]:
    """DBCache at its defaults (F8B0, threshold 0.08, 8 warm-up steps) and around them; F1B0; its
    TaylorSeer calibrator; its static step masks."""
    try:
        import cache_dit
    except ImportError:
        return []
    scale = config.thresholds_scale
    grid = (0.08, 0.2) if config.few_settings else (0.05, 0.08, 0.12, 0.2)  # default 0.08
    methods: list[Method] = []
    for fn in (8, 1):
        if fn >= num_blocks:
            continue
        for taylorseer in (False, True):
            family = f"cache-dit DBCache F{fn}B0" + (" + TaylorSeer" if taylorseer else "")
            for threshold in grid:
                methods.append(Method(family, f"threshold {threshold * scale:g}", lambda pipe, fn=fn, t=threshold * scale, ts=taylorseer:
                                      peers.attach_cache_dit(pipe, steps, fn=fn, threshold=t, taylorseer=ts),
                                      compiles=(fn == 8 and not taylorseer and threshold == 0.08)))
    import cache_dit

    for policy in ("slow", "medium", "fast", "ultra"):
        mask = cache_dit.steps_mask(mask_policy=policy, total_steps=steps)
        methods.append(Method("cache-dit DBCache F1B0 static mask", f"{policy} ({sum(mask)}/{steps} steps)",
                              lambda pipe, m=mask: peers.attach_cache_dit(pipe, steps, fn=1, threshold=1.0, mask=m)))
    return methods


def diffusers_methods(pipe: Any, steps: int, calibration_generate: Callable[[], Any], config: BenchConfig) -> list[Method]:
    """diffusers' hooks at their documented defaults and around them."""
    from diffusers.hooks import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
        apply_faster_cache,
        apply_first_block_cache,
        apply_mag_cache,
        apply_pyramid_attention_broadcast,
        apply_taylorseer_cache,
    )

    model = pipe.transformer
    scale = config.thresholds_scale
    few = config.few_settings
    methods: list[Method] = []

    def hook(apply: Callable[[dict[str, Any]], None]) -> Callable[[Any], Callable[[], None]]:
        return lambda pipe: peers.attach_diffusers_hook(pipe, apply, steps)

    for threshold in (0.05, 0.2) if few else (0.03, 0.05, 0.1, 0.2):  # default 0.05
        methods.append(Method("diffusers FirstBlockCache", f"threshold {threshold * scale:g}", hook(
            lambda _, t=threshold * scale: apply_first_block_cache(model, FirstBlockCacheConfig(threshold=t))),
            compiles=(threshold == 0.05)))
    ratios = peers.calibrate_mag_ratios(pipe, calibration_generate, steps)
    for threshold in (0.06, 0.24) if few else (0.03, 0.06, 0.12, 0.24):  # default 0.06, max_skip_steps 3
        methods.append(Method("diffusers MagCache (calibrated)", f"threshold {threshold * scale:g}", hook(
            lambda _, t=threshold * scale: apply_mag_cache(model, MagCacheConfig(
                threshold=t, num_inference_steps=steps, mag_ratios=ratios)))))
    # Its default identifiers ("^transformer_blocks.*attn", a full match) miss DiT's attn1, so the
    # layers are named; lite mode predicts a module named proj_out, which DiT lacks (proj_out_1/_2).
    for interval in (2, 3) if few else (2, 3, 4, 5):  # default cache_interval 5
        methods.append(Method("diffusers TaylorSeer (attn1+ff)", f"interval {interval}", hook(
            lambda _, n=interval: apply_taylorseer_cache(model, TaylorSeerCacheConfig(
                cache_interval=n, taylor_factors_dtype=torch.float32,
                cache_identifiers=[r"transformer_blocks\.\d+\.(attn1|ff)"])))))
    for skip in (2, 4) if few else (2, 3, 4, 6):  # documented recipe: every 2nd step within t in (100, 800)
        methods.append(Method("diffusers PyramidAttentionBroadcast", f"skip range {skip}", hook(
            lambda state, n=skip: apply_pyramid_attention_broadcast(model, PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=n, spatial_attention_timestep_skip_range=(100, 800),
                current_timestep_callback=lambda: state["timestep"])))))
    # DiTPipeline batches the conditional half first, FasterCache's guidance skip assumes the
    # unconditional half first (and does not split class_labels): its attention skip only.
    for skip in (2, 4) if few else (2, 3, 4):
        methods.append(Method("diffusers FasterCache (attention)", f"skip range {skip}", hook(
            lambda state, n=skip: apply_faster_cache(model, FasterCacheConfig(
                spatial_attention_block_skip_range=n, spatial_attention_timestep_skip_range=(-1, 681),
                current_timestep_callback=lambda: state["timestep"], attention_weight_callback=lambda _: 0.3,
                spatial_attention_block_identifiers=(r"transformer_blocks\.\d+\.attn1",),
                tensor_format="BCHW", is_guidance_distilled=True)))))
    return methods


# ---- the run -------------------------------------------------------------------------------------
class BenchRun:
    """One sampler's pass: reference, calibration, every method's quality, then timing."""

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
        self.grid: dict[str, torch.Tensor] = {}

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
            self._quality(meter)
            self.save()
            if self.config.eager and not self.over_time():
                self._time_eager()
                self.save()
            if self.config.compiled and self.device.type == "cuda" and not self.over_time():
                try:
                    self._time_compiled()
                except Exception as error:  # noqa: BLE001 (the eager results stand; say why compiled ones are missing)
                    self.result["compiled_error"] = f"{type(error).__name__}: {error}"[:400]
                    logger.warning("compiled timing stopped: %s", traceback.format_exc(limit=4))
                self.save()
        finally:
            meter.remove()
            self.pipe.scheduler = base_scheduler
        return self.result

    def _quality(self, meter: peers.ComputeMeter) -> None:
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
        self.methods = (fewer_steps_methods(self.steps, self.config.budgets)
                        + smoothcache_methods(self.pipe, layers, blocks, self.config.budgets, self.steps,
                                              self.calibration_generate, self.config)
                        + cache_dit_methods(self.steps, len(self.pipe.transformer.transformer_blocks), self.config)
                        + diffusers_methods(self.pipe, self.steps, self.calibration_generate, self.config))
        meter.take()
        self.result["flop_shares"] = self.shares
        for method in tqdm(self.methods, desc=f"{self.sampler} quality", unit="method", disable=not self.config.progress):
            row = Row(method.family, method.setting)
            self.rows.append(row)
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
        self.result["rows"] = self.rows

    def _is_grid_setting(self, method: Method, row: Row) -> bool:
        """The grid shows each family at the setting whose compute is nearest one half."""
        best = getattr(self, "_grid_best", {})
        self._grid_best = best
        distance = abs(row.compute_fraction - 0.5)
        if method.family not in best or distance < best[method.family]:
            best[method.family] = distance
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
                detach = method.attach(self.pipe)
                try:
                    elapsed, _ = self.clock(lambda m=method: self.timing_generate(m.steps, m.quiet))
                finally:
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

    def _time_compiled(self) -> None:
        """The transformer compiled whole with CUDA graphs (``mode="reduce-overhead"``). Each method
        is attached once, warmed up (compile, graph capture), timed ``timing_repeats`` times, and
        compared with uncached compiled calls made just before and just after it."""
        import torch._dynamo.config as dynamo_config

        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, 256)
        transformer = self.pipe.transformer
        transformer.compile(mode="reduce-overhead")
        try:
            for _ in range(3):
                self.timing_generate()
            candidates = [(m, r) for m, r in zip(self.methods, self.rows) if m.compiles and r.error is None]
            candidates.sort(key=lambda pair: compile_priority(pair[0].family))
            for method, row in tqdm(candidates, desc=f"{self.sampler} compiled timing", unit="method",
                                    disable=not self.config.progress):
                if self.over_time():
                    break
                before = self.clock(self.timing_generate)[0]
                detach = method.attach(self.pipe)
                try:
                    for _ in range(2):
                        self.timing_generate(method.steps, method.quiet)
                    times = [self.clock(lambda m=method: self.timing_generate(m.steps, m.quiet))[0]
                             for _ in range(self.config.timing_repeats)]
                except Exception as error:  # noqa: BLE001
                    row.error = f"compiled: {type(error).__name__}: {error}"[:400]
                    logger.warning("%s %s failed compiled: %s", method.family, method.setting, error)
                    continue
                finally:
                    detach()
                after = self.clock(self.timing_generate)[0]
                row.compiled_ratios = [(before + after) / 2 / t for t in times]
                row.speedup_compiled = statistics.median(row.compiled_ratios)
                row.seconds_compiled = statistics.median(times)
                self.result.setdefault("uncached_seconds_compiled", []).extend([before, after])
                logger.info("%s compiled %-40s %-24s %.2fx", self.sampler, row.family, row.setting, row.speedup_compiled)
                self.save(figures=False)
        finally:
            transformer._compiled_call_impl = None
            torch._dynamo.reset()


SPEED_TARGETS = (1.3, 1.5, 1.75, 2.0, 2.5, 3.0)


def compare_at_speed(rows: list[dict[str, Any]], key: str, targets: tuple[float, ...] = SPEED_TARGETS,
                     tolerance: float = 0.05, metric: str = "psnr") -> list[dict[str, Any]]:
    """At each target speedup, the best smoothcache row and the best other row within +-``tolerance``.

    ``key`` is "speedup_eager", "speedup_compiled" or "ideal_speedup" (equal compute). A row counts
    at a target when its speedup is within the tolerance; the margin is ours minus theirs, in dB for
    PSNR. Rows identical to uncached (PSNR null) and failed rows take no part.
    """
    table = []
    for target in targets:
        near = [r for r in rows if r.get("error") is None and r.get(key) is not None and r.get(metric) is not None
                and abs(r[key] / target - 1) <= tolerance]
        ours = max((r for r in near if r["family"].startswith("smoothcache")), key=lambda r: r[metric], default=None)
        others = max((r for r in near if not r["family"].startswith("smoothcache")), key=lambda r: r[metric], default=None)
        entry: dict[str, Any] = {"target": target}
        for side, row in (("smoothcache", ours), ("best_other", others)):
            entry[side] = None if row is None else {
                "family": row["family"], "setting": row["setting"], metric: row[metric], key: row[key],
                "fd_clf": row.get("fd_clf"), "accuracy": row.get("accuracy")}
        entry["margin"] = (ours[metric] - others[metric]) if ours and others else None
        table.append(entry)
    return table


def interpolate_families(rows: list[dict[str, Any]], key: str, targets: tuple[float, ...] = SPEED_TARGETS,
                         metric: str = "psnr") -> list[dict[str, Any]]:
    """At each target speedup, each family's quality read off its own curve (linear between its two
    measured settings around the target, never extrapolated); the best smoothcache family against
    the best other. Where a family's settings are sparse, this is fairer than nearest points."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r.get("error") is None and r.get(key) is not None and r.get(metric) is not None:
            curves.setdefault(r["family"], []).append((r[key], r[metric]))
    table = []
    for target in targets:
        values = {}
        for family, points in curves.items():
            points.sort()
            for (x0, y0), (x1, y1) in itertools.pairwise(points):
                if x0 <= target <= x1:
                    value = y0 if x1 == x0 else y0 + (y1 - y0) * (target - x0) / (x1 - x0)
                    values[family] = max(values.get(family, -math.inf), value)
        ours = max(((f, v) for f, v in values.items() if f.startswith("smoothcache")), key=lambda p: p[1], default=None)
        others = max(((f, v) for f, v in values.items() if not f.startswith("smoothcache")), key=lambda p: p[1],
                     default=None)
        table.append({"target": target,
                      "smoothcache": None if ours is None else {"family": ours[0], metric: ours[1]},
                      "best_other": None if others is None else {"family": others[0], metric: others[1]},
                      "margin": (ours[1] - others[1]) if ours and others else None})
    return table


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Comparisons at equal measured speed (eager, compiled) and at equal compute: measured rows within
    +-5% of each target, and each family's curve read at the target."""
    rows = [r if isinstance(r, dict) else asdict(r) | {"ideal_speedup": r.ideal_speedup} for r in result["rows"]]
    keys = ("speedup_eager", "speedup_compiled", "ideal_speedup")
    return {"within_5_percent": {key: compare_at_speed(rows, key) for key in keys},
            "along_each_curve": {key: interpolate_families(rows, key) for key in keys}}


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
            "speedup_compiled": "transformer.compile(mode='reduce-overhead'); each timed call follows an uncached one",
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
            bench_figures.draw_all(_finite(report), grids, out)

    for sampler in config.samplers:
        bench = BenchRun(pipe, scorer, config, sampler, started, save)
        report["samplers"][sampler] = bench.result
        grids[sampler] = bench.grid
        bench.run()
        report["samplers"][sampler]["rows"] = [asdict(r) | {"ideal_speedup": r.ideal_speedup} for r in bench.rows]
        report["samplers"][sampler]["at_equal_speed"] = summarise(report["samplers"][sampler])
    save()
    return _finite(report)


def _versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in ("smoothcache", "diffusers", "cache-dit", "dit-smoothcache", "torchmetrics"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Written beside the target and renamed over it: a stopped run never leaves half a file."""

    def default(value: Any) -> Any:
        if isinstance(value, Row):
            return asdict(value) | {"ideal_speedup": value.ideal_speedup}
        if isinstance(value, float):
            return None
        raise TypeError(type(value).__name__)

    text = json.dumps(_finite(data), indent=1, default=default) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _finite(value: Any) -> Any:
    """NaN and infinity as null: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, Row):
        return _finite(asdict(value) | {"ideal_speedup": value.ideal_speedup})
    return value
