"""The methods the bench harness runs, each at its settings: smoothcache's modes, the reference
package, fewer steps, and the peers (cache-dit, diffusers' hooks) at their documented defaults and
around them. A ``Method`` is data plus an ``attach(pipe) -> detach``; nothing here times or scores."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import smoothcache
from smoothcache import Schedule

from . import peers

__all__ = ["Method", "cache_dit_methods", "compile_priority", "diffusers_methods", "fewer_steps_methods",
           "smoothcache_methods", "step_split_methods"]


@dataclass
class Method:
    """One method at one setting: ``attach(pipe)`` turns it on and returns the detach."""

    family: str
    setting: str
    attach: Callable[[Any], Callable[[], None]]
    steps: int | None = None  # its own step count (fewer steps); None: the sampler's
    compiles: bool = False  # timed under torch.compile + CUDA graphs
    quiet: bool = False  # prints while generating (the reference): stdout is silenced


def ours(schedule: Schedule, forecast: str = "none") -> Callable[[Any], Callable[[], None]]:
    return lambda pipe: smoothcache.cache(pipe, schedule, forecast=forecast).disable  # type: ignore[arg-type]


def smoothcache_methods(pipe: Any, layers: Any, blocks: Any, budgets: tuple[float, ...], steps: int,
                        tune_generate: Callable[[], Any], few: bool = False, compile_every_budget: bool = False
                        ) -> list[Method]:
    """The paper's method through ours and through the reference package, and our other modes."""
    methods: list[Method] = []
    reference = peers.load_reference_package()
    # layer schedules are timed compiled at one budget unless asked (each compiles anew, up to minutes)
    middle = budgets[len(budgets) // 2]
    for budget in budgets:
        tag = f"compute {budget:g}"
        greedy, alpha = layers.schedule_and_threshold(compute_fraction=budget, solver="greedy")
        methods.append(Method("smoothcache layers, paper's greedy", f"{tag} (alpha {alpha:.3g})", ours(greedy),
                              compiles=compile_every_budget or budget == middle))
        if reference is not None:
            plan = greedy.to_dict()
            methods.append(Method("reference dit-smoothcache (greedy)", f"{tag} (alpha {alpha:.3g})",
                                  lambda pipe, plan=plan: peers.attach_reference(pipe, reference, plan), quiet=True))
        methods.append(Method("smoothcache layers, optimal", tag, ours(layers.schedule(compute_fraction=budget)),
                              compiles=compile_every_budget or budget == middle))
        methods.append(Method("smoothcache layers, optimal + forecast", tag,
                              ours(layers.schedule(compute_fraction=budget, forecast="linear"), "linear"),
                              compiles=compile_every_budget or budget == middle))
        methods.append(Method("smoothcache layers, per-block", tag,
                              ours(layers.schedule(compute_fraction=budget, solver="per-block"))))
        methods.append(Method("smoothcache blocks, optimal", tag, ours(blocks.schedule(compute_fraction=budget)),
                              compiles=compile_every_budget or budget == middle))
        methods.append(Method("smoothcache blocks + forecast", tag,
                              ours(blocks.schedule(compute_fraction=budget, forecast="linear"), "linear"),
                              compiles=True))
    for max_error in (0.05,) if few else (0.02, 0.04, 0.08, 0.15):
        result = smoothcache.tune(pipe, blocks, tune_generate, max_error, forecast="linear", progress=False)
        methods.append(Method("smoothcache tune (blocks + forecast)", f"max error {max_error:g}",
                              ours(result.schedule, "linear")))
    for interval in (2,) if few else (2, 3, 4, 5):
        methods.append(Method("FORA (fixed interval, attn1+ff)", f"every {interval}",
                              ours(Schedule.fixed_interval(["attn1", "ff"], steps, interval)), compiles=interval == 2))
    return methods


SPLIT_FAMILY = "smoothcache fewer steps + blocks + forecast (split_steps)"


def step_split_methods(pipe: Any, generate_at: Callable[[int], Any], steps: int, budgets: tuple[float, ...]
                       ) -> list[Method]:
    """At each budget, the split between fewer steps and whole blocks with forecasting that
    ``smoothcache.split_steps`` measures best on the calibration set (``generate_at(n)``)."""
    methods, reference = [], generate_at(steps)  # the full-step output every budget's split is measured against
    for budget in budgets:
        split = smoothcache.split_steps(pipe, generate_at, steps, budget, components=["block"], forecast="linear",
                                        reference=reference, progress=False)
        attach = ours(split.schedule, "linear") if split.uses_cache else (lambda pipe: (lambda: None))
        setting = f"compute {budget:g} ({split.num_steps} steps, cache {split.schedule.compute_fraction():.2f})"
        methods.append(Method(SPLIT_FAMILY, setting, attach, steps=split.num_steps, compiles=True))
    return methods


# cache-dit last: its disable_cache leaves the transformer's forward patched.
COMPILE_ORDER = ("fewer steps", "smoothcache fewer steps", "smoothcache blocks + forecast", "smoothcache layers, optimal + forecast",
                 "smoothcache layers, optimal", "smoothcache layers, paper's greedy", "smoothcache blocks, optimal",
                 "FORA", "diffusers", "cache-dit")


def compile_priority(family: str) -> int:
    """Compiled timing runs in this order, so that a time limit cuts the least telling rows."""
    return next((i for i, prefix in enumerate(COMPILE_ORDER) if family.startswith(prefix)), len(COMPILE_ORDER))


def fewer_steps_methods(steps: int, budgets: tuple[float, ...]) -> list[Method]:
    counts = sorted({max(2, round(steps * b)) for b in budgets}, reverse=True)
    return [Method("fewer steps", f"{n} steps", lambda pipe: (lambda: None), steps=n, compiles=True) for n in counts]


def cache_dit_methods(steps: int, num_blocks: int, few: bool = False, scale: float = 1.0) -> list[Method]:
    """DBCache at its defaults (F8B0, threshold 0.08, 8 warm-up steps) and around them; F1B0; its
    TaylorSeer calibrator; its static step masks."""
    try:
        import cache_dit
    except ImportError:
        return []
    grid = (0.08,) if few else (0.05, 0.08, 0.12, 0.2)  # default 0.08
    methods: list[Method] = []
    for fn in (8, 1):
        if fn >= num_blocks:
            continue
        for taylorseer in (False, True) if not few or fn == 1 else (False,):
            family = f"cache-dit DBCache F{fn}B0" + (" + TaylorSeer" if taylorseer else "")
            for threshold in grid:
                methods.append(Method(family, f"threshold {threshold * scale:g}", lambda pipe, fn=fn, t=threshold * scale, ts=taylorseer:
                                      peers.attach_cache_dit(pipe, steps, fn=fn, threshold=t, taylorseer=ts),
                                      compiles=(fn == 8 and not taylorseer and threshold == 0.08)))
    import cache_dit

    for policy in ("medium",) if few else ("slow", "medium", "fast", "ultra"):
        mask = cache_dit.steps_mask(mask_policy=policy, total_steps=steps)
        methods.append(Method("cache-dit DBCache F1B0 static mask", f"{policy} ({sum(mask)}/{steps} steps)",
                              lambda pipe, m=mask: peers.attach_cache_dit(pipe, steps, fn=1, threshold=1.0, mask=m)))
    return methods


def diffusers_methods(pipe: Any, steps: int, calibration_generate: Callable[[], Any], few: bool = False,
                      scale: float = 1.0) -> list[Method]:
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
    methods: list[Method] = []

    def hook(apply: Callable[[dict[str, Any]], None]) -> Callable[[Any], Callable[[], None]]:
        return lambda pipe: peers.attach_diffusers_hook(pipe, apply, steps)

    for threshold in (0.05,) if few else (0.03, 0.05, 0.1, 0.2):  # default 0.05
        methods.append(Method("diffusers FirstBlockCache", f"threshold {threshold * scale:g}", hook(
            lambda _, t=threshold * scale: apply_first_block_cache(model, FirstBlockCacheConfig(threshold=t))),
            compiles=(threshold == 0.05)))
    ratios = peers.calibrate_mag_ratios(pipe, calibration_generate, steps)
    for threshold in (0.06,) if few else (0.03, 0.06, 0.12, 0.24):  # default 0.06, max_skip_steps 3
        methods.append(Method("diffusers MagCache (calibrated)", f"threshold {threshold * scale:g}", hook(
            lambda _, t=threshold * scale: apply_mag_cache(model, MagCacheConfig(
                threshold=t, num_inference_steps=steps, mag_ratios=ratios)))))
    # Its default identifiers ("^transformer_blocks.*attn", a full match) miss DiT's attn1, so the
    # layers are named; lite mode predicts a module named proj_out, which DiT lacks (proj_out_1/_2).
    for interval in (2,) if few else (2, 3, 4, 5):  # default cache_interval 5
        methods.append(Method("diffusers TaylorSeer (attn1+ff)", f"interval {interval}", hook(
            lambda _, n=interval: apply_taylorseer_cache(model, TaylorSeerCacheConfig(
                cache_interval=n, taylor_factors_dtype=torch.float32,
                cache_identifiers=[r"transformer_blocks\.\d+\.(attn1|ff)"])))))
    for skip in (2,) if few else (2, 3, 4, 6):  # documented recipe: every 2nd step within t in (100, 800)
        methods.append(Method("diffusers PyramidAttentionBroadcast", f"skip range {skip}", hook(
            lambda state, n=skip: apply_pyramid_attention_broadcast(model, PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=n, spatial_attention_timestep_skip_range=(100, 800),
                current_timestep_callback=lambda: state["timestep"])))))
    # DiTPipeline batches the conditional half first, FasterCache's guidance skip assumes the
    # unconditional half first (and does not split class_labels): its attention skip only.
    for skip in (2,) if few else (2, 3, 4):
        methods.append(Method("diffusers FasterCache (attention)", f"skip range {skip}", hook(
            lambda state, n=skip: apply_faster_cache(model, FasterCacheConfig(
                spatial_attention_block_skip_range=n, spatial_attention_timestep_skip_range=(-1, 681),
                current_timestep_callback=lambda: state["timestep"], attention_weight_callback=lambda _: 0.3,
                spatial_attention_block_identifiers=(r"transformer_blocks\.\d+\.attn1",),
                tensor_format="BCHW", is_guidance_distilled=True)))))
    return methods
