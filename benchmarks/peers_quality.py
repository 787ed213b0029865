"""Quality at equal compute: SmoothCache schedules against the peers' caches, on the shipped demo model.

Every method generates the same classes and seeds as benchmarks/solvers.py (100 samples, 20 DDIM
steps, guidance 1.5) and is scored against the uncached samples (PSNR, SSIM) and by the demo's
classifier (FID, accuracy). Compute is *measured*, the same way for every method: forward hooks on
a Linear inside each block's attn1 (``to_q``) and ff (``net[2]``) count how often those layers
really ran (hooks on attn1/ff themselves would also fire when a cache hands back a kept output),
weighted by the two layers' FLOP shares from a calibration pass. Threshold-driven peers are swept
over their thresholds to land near our budgets.

Peers: diffusers 0.42's hooks applied to the demo's ``DiTTransformer2DModel`` (FirstBlockCache,
MagCache with ratios calibrated on this model, TaylorSeer, PyramidAttentionBroadcast). diffusers'
DiTPipeline sets no cache context, so a pre-hook on the transformer sets one per call.

    python benchmarks/peers_quality.py --out docs/peers-quality          # CPU, about 10 minutes on 2 cores
    python benchmarks/peers_quality.py --quick --out /tmp/peers-quality  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import smoothcache
from smoothcache import Schedule
from smoothcache.demo.assets import load_demo_pipeline, load_quality_scorer
from smoothcache.demo.harness import DemoConfig
from smoothcache.demo.peers import (
    ComputeMeter,
    attach_diffusers_hook,
    calibrate_mag_ratios,
)
from smoothcache.plots import pyplot, save_figure

SETTINGS = ("steps", "guidance_scale", "samples_per_class", "num_classes", "seed", "calibration_samples_per_class")
Apply = Callable[[Any], Callable[[], None] | None]  # attaches a method to the pipeline; returns its undo


@dataclass
class Run:
    family: str  # the series in the plot
    setting: str  # budget or threshold
    compute_fraction: float = float("nan")  # measured: FLOP-weighted share of attn1/ff executions
    psnr: float = float("nan")
    ssim: float = float("nan")
    fid: float = float("nan")
    accuracy: float = float("nan")
    seconds: float = float("nan")
    error: str | None = None


def ours(schedule: Schedule, forecast: str = "none") -> Apply:
    def apply(pipe: Any) -> Callable[[], None]:
        return smoothcache.cache(pipe, schedule, forecast=forecast).disable  # type: ignore[arg-type]

    return apply


def diffusers_hook(make: Callable[[dict[str, Any]], None], steps: int) -> Apply:
    """A diffusers hook: ``make(state)`` applies it; the cache context is set around every call."""
    return lambda pipe: attach_diffusers_hook(pipe, make, steps)


def peer_methods(pipe: Any, generate: Callable[[], torch.Tensor], settings: DemoConfig, quick: bool) -> list[tuple[str, str, Apply]]:
    from diffusers.hooks import (
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
        apply_first_block_cache,
        apply_mag_cache,
        apply_pyramid_attention_broadcast,
        apply_taylorseer_cache,
    )

    steps, model = settings.steps, pipe.transformer
    methods: list[tuple[str, str, Apply]] = []
    for threshold in (0.1, 0.3) if quick else (0.05, 0.1, 0.2, 0.3, 0.5):
        methods.append(("diffusers FirstBlockCache", f"threshold {threshold}", diffusers_hook(
            lambda _, t=threshold: apply_first_block_cache(model, FirstBlockCacheConfig(threshold=t)), steps)))
    ratios = calibrate_mag_ratios(pipe, generate, steps)
    for threshold in (0.06, 0.24) if quick else (0.02, 0.06, 0.12, 0.24, 0.5):
        methods.append(("diffusers MagCache", f"threshold {threshold}", diffusers_hook(
            lambda _, t=threshold: apply_mag_cache(model, MagCacheConfig(
                threshold=t, max_skip_steps=3, num_inference_steps=steps, mag_ratios=ratios)), steps)))
    # Its default patterns ("^transformer_blocks.*attn", full match) miss DiT's attn1, so name the
    # layers; its lite mode predicts a module named proj_out, which DiT lacks (proj_out_1/_2): left out.
    for interval in (2, 3) if quick else (2, 3, 4):
        methods.append(("diffusers TaylorSeer", f"interval {interval}", diffusers_hook(
            lambda _, n=interval: apply_taylorseer_cache(model, TaylorSeerCacheConfig(
                cache_interval=n, disable_cache_before_step=2, taylor_factors_dtype=torch.float32,
                cache_identifiers=[r"transformer_blocks\.\d+\.(attn1|ff)"])), steps)))
    for skip in (2, 4) if quick else (2, 3, 4):
        methods.append(("diffusers PyramidAttentionBroadcast", f"skip range {skip}", diffusers_hook(
            lambda state, n=skip: apply_pyramid_attention_broadcast(model, PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=n, spatial_attention_timestep_skip_range=(0, 1000),
                current_timestep_callback=lambda: state["timestep"])), steps)))
    return methods


def our_methods(pipe: Any, generate: Callable[[], torch.Tensor], settings: DemoConfig, budgets: tuple[float, ...]) -> tuple[list[tuple[str, str, Apply]], dict[str, float]]:
    """Our schedules at each budget, and the attn1/ff FLOP shares (from the same calibration)."""
    with smoothcache.calibration(pipe, components=["attn1", "ff"], steps=settings.steps, forecast="linear") as rec:
        generate()
    with smoothcache.calibration(pipe, components=["block"], steps=settings.steps, forecast="linear") as block_rec:
        generate()
    profile, blocks = rec.profile, block_rec.profile
    costs = profile.key_costs()
    shares = {key: cost / sum(costs.values()) for key, cost in costs.items()}
    methods: list[tuple[str, str, Apply]] = []
    for budget in budgets:
        methods.append(("smoothcache (optimal)", f"budget {budget}", ours(profile.schedule(compute_fraction=budget))))
        methods.append(("smoothcache (optimal, unweighted)", f"budget {budget}",
                        ours(profile.schedule(compute_fraction=budget, weigh_steps=False))))
        methods.append(("smoothcache (optimal) + linear forecast", f"budget {budget}",
                        ours(profile.schedule(compute_fraction=budget, forecast="linear"), forecast="linear")))
        methods.append(("smoothcache (paper's greedy)", f"budget {budget}", ours(profile.schedule(compute_fraction=budget, solver="greedy"))))
        methods.append(("smoothcache blocks (optimal)", f"budget {budget}", ours(blocks.schedule(compute_fraction=budget))))
        methods.append(("smoothcache blocks (optimal) + linear forecast", f"budget {budget}",
                        ours(blocks.schedule(compute_fraction=budget, forecast="linear"), forecast="linear")))
    for interval in (2, 3):
        methods.append(("fixed interval (FORA)", f"every {interval}", ours(Schedule.fixed_interval(["attn1", "ff"], settings.steps, interval))))
    return methods, shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/peers-quality"))
    parser.add_argument("--quick", action="store_true", help="2 samples per class and fewer settings")
    parser.add_argument("--plot-from", type=Path, help="only redraw the plot of a report.json")
    args = parser.parse_args()
    if args.plot_from:
        print(plot(json.loads(args.plot_from.read_text()), args.plot_from.parent / "quality-vs-compute.png"))
        return
    settings = DemoConfig(samples_per_class=2 if args.quick else 10, calibration_samples_per_class=2)  # as benchmarks/solvers.py
    budgets = (0.65, 0.4) if args.quick else (0.8, 0.65, 0.5, 0.4, 0.35, 0.3)
    torch.manual_seed(0)
    pipe = load_demo_pipeline(progress_bar=False)
    scorer = load_quality_scorer()
    labels = [c for _ in range(settings.samples_per_class) for c in range(settings.num_classes)]
    calibration_labels = [c for _ in range(settings.calibration_samples_per_class) for c in range(settings.num_classes)]

    def generate(class_labels: list[int] = labels, seed: int = settings.seed) -> torch.Tensor:
        return pipe(class_labels=class_labels, num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                    generator=torch.Generator().manual_seed(seed), output_type="pt").images.float()

    def calibration_run() -> torch.Tensor:
        return generate(calibration_labels, settings.seed + 10_000)

    methods, shares = our_methods(pipe, calibration_run, settings, budgets)
    methods += peer_methods(pipe, calibration_run, settings, args.quick)
    meter = ComputeMeter(pipe.transformer)
    started = time.perf_counter()
    reference = generate()
    seconds = time.perf_counter() - started
    full = meter.take()
    runs = [Run("uncached", "", 1.0, fid=scorer.fid(reference), accuracy=scorer.accuracy(reference, labels), seconds=seconds)]
    for family, setting, apply in methods:
        run = Run(family, setting)
        undo = None
        try:
            undo = apply(pipe)
            started = time.perf_counter()
            images = generate()
            run.seconds = time.perf_counter() - started
            counts = meter.take()
            run.compute_fraction = sum(shares[k] * counts[k] / full[k] for k in full)
            run.psnr, run.ssim = scorer.psnr(images, reference), scorer.ssim(images, reference)
            run.fid, run.accuracy = scorer.fid(images), scorer.accuracy(images, labels)
        except Exception as error:  # noqa: BLE001 (a peer that cannot run on this model is recorded, not fatal)
            run.error = f"{type(error).__name__}: {error}"[:500]
            meter.take()
        finally:
            if undo is not None:
                undo()
        runs.append(run)
        print(f"{family:36} {setting:16} compute {run.compute_fraction:5.3f}  PSNR {run.psnr:5.1f}  FID {run.fid:5.2f}"
              + (f"  FAILED {run.error}" if run.error else ""), flush=True)
    report = {
        "benchmark": "quality at equal measured compute on the demo model: smoothcache vs diffusers' cache hooks",
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "device": f"cpu ({torch.get_num_threads()} threads)",
        "settings": {key: getattr(settings, key) for key in SETTINGS} | {"samples": len(labels), "quick": args.quick, "flop_shares": shares},
        "runs": [asdict(run) for run in runs],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(plot(report, args.out / "quality-vs-compute.png"))


def plot(report: dict[str, Any], path: Path) -> Path:
    """PSNR and FID against measured compute, one series per method."""
    plt = pyplot()

    runs = [r for r in report["runs"] if r["family"] != "uncached" and r["error"] is None]
    families = list(dict.fromkeys(r["family"] for r in runs))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for metric, ax in zip(("psnr", "fid"), axes):
        for family in families:
            points = sorted((r["compute_fraction"], r[metric]) for r in runs if r["family"] == family)
            style = "-o" if family.startswith(("smoothcache", "fixed")) else "--s"
            ax.plot(*zip(*points), style, label=family, markersize=4)
        ax.set_xlabel("measured compute (FLOP-weighted share of attn1/ff executions)")
        ax.set_ylabel("PSNR vs uncached (dB)" if metric == "psnr" else "FID (demo classifier features)")
        ax.grid(alpha=0.3)
    uncached_fid = next(r["fid"] for r in report["runs"] if r["family"] == "uncached")
    axes[1].axhline(uncached_fid, color="gray", lw=0.8, label="uncached")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Demo DiT, {report['settings']['samples']} samples, {report['settings']['steps']} DDIM steps")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


if __name__ == "__main__":
    main()
