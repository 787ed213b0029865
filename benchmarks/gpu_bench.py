"""GPU latency of SmoothCache on DiT-XL/2-256 (random weights: latency does not depend on them).

The denoising loop is DiTPipeline's (classifier-free guidance batched, DDIM, 50 steps), without
the VAE decode. Each configuration is timed after warm-up as the median of ``--repeats`` runs;
speedups are against the uncached run of the same compile setting, and the ideal speedup comes
from the FLOPs the schedule skips (measured with torch.utils.flop_counter).

    python benchmarks/gpu_bench.py --out docs/benchmarks/gpu-dit-xl.json [--reference PATH]

``--reference`` is the folder of the reference package ``SmoothCache`` (dit-smoothcache 0.1.1,
installed somewhere off the import path, since it shares its import name with our shim).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

import smoothcache
from smoothcache import Schedule

STEPS = 50
# The reference's 50-step alpha=0.18 DiT schedule (smoothcache_schedules/50-N-3-threshold-0.18.json).
ALPHA_018 = (1, 0, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0,
             1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1)
FORA_2 = Schedule.fixed_interval(["attn1", "ff"], STEPS, 2).plans["attn1"]
SCHEDULES = {
    "attn1 alpha=0.18": {"attn1": ALPHA_018},
    "attn1+ff alpha=0.18": {"attn1": ALPHA_018, "ff": ALPHA_018},
    "attn1+ff fora-2": {"attn1": FORA_2, "ff": FORA_2},
}


def dit_xl(device: str, dtype: torch.dtype, tiny: bool = False):
    """DiT-XL/2 at 256px (28 blocks, width 1152, 32x32 latents); ``tiny`` for a smoke test."""
    from diffusers import DiTTransformer2DModel

    heads, head_dim, layers = (2, 8, 2) if tiny else (16, 72, 28)
    model = DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=layers,
        patch_size=2, sample_size=32, norm_type="ada_norm_zero", num_embeds_ada_norm=1000,
    )
    return model.to(device=device, dtype=dtype).eval()


def make_pipe(model, device: str):
    from diffusers import DDIMScheduler

    return SimpleNamespace(transformer=model, scheduler=DDIMScheduler(), device=torch.device(device))


@torch.no_grad()
def denoise(pipe, batch: int, seed: int = 0, guidance: float = 4.0) -> torch.Tensor:
    """DiTPipeline's loop: CFG batch, scale_model_input, learned-sigma split, scheduler step."""
    model, scheduler, device = pipe.transformer, pipe.scheduler, pipe.device
    generator = torch.Generator(device).manual_seed(seed)
    latents = torch.randn(batch, 4, 32, 32, generator=generator, device=device, dtype=model.dtype)
    labels = torch.arange(batch, device=device) % 1000
    class_in = torch.cat([labels, torch.full_like(labels, 1000)])
    x = torch.cat([latents, latents])
    scheduler.set_timesteps(STEPS, device=device)
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(x, t)
        out = model(x, timestep=t.expand(x.shape[0]), class_labels=class_in).sample
        eps = out[:, :4]
        cond, uncond = eps.chunk(2)
        half = uncond + guidance * (cond - uncond)
        x = scheduler.step(torch.cat([half, half]), t, x).prev_sample
    return x[:batch]


def load_reference(path: Path):
    """Import the reference package from ``path`` under another name (ours owns ``SmoothCache``)."""
    spec = importlib.util.spec_from_file_location("SmoothCache_reference", path / "__init__.py", submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["SmoothCache_reference"] = module
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        spec.loader.exec_module(module)
    return module


def time_runs(fn: Callable[[], Any], repeats: int, warmup: int) -> tuple[list[float], float]:
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times, torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")


def ideal_speedups(pipe, batch: int) -> dict[str, float]:
    with smoothcache.calibration(pipe, components=["attn1", "ff"], steps=STEPS) as rec:
        denoise(pipe, batch)
    profile = rec.profile
    shares = {k: v / profile.total_flops for k, v in profile.key_costs().items()}
    return {name: profile.estimated_speedup(Schedule(plans)) for name, plans in SCHEDULES.items()} | {"_flops_share": shares}


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def plot(result: dict[str, Any], path: Path) -> Path:
    """Speedup over uncached (same compile setting) per schedule; bars for ours and the reference, ticks for ideal."""
    from smoothcache.plots import pyplot

    plt = pyplot()
    panels = sorted({(r["compile"], r["batch"]) for r in result["rows"]})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), sharey=True, squeeze=False)
    for ax, (compile_mode, batch) in zip(axes[0], panels, strict=True):
        rows = [r for r in result["rows"] if r["compile"] == compile_mode and r["batch"] == batch and r["schedule"] != "uncached"]
        names = list(dict.fromkeys(r["schedule"] for r in rows))
        for offset, impl in ((-0.2, "smoothcache"), (0.2, "reference")):
            values = [next((r["speedup"] for r in rows if r["schedule"] == n and r["implementation"] == impl), 0) for n in names]
            ax.bar([i + offset for i in range(len(names))], values, width=0.4, label=impl)
        ideal = [next(r["ideal_speedup"] for r in rows if r["schedule"] == n) for n in names]
        ax.scatter(range(len(names)), ideal, marker="_", s=900, color="black", label="ideal (FLOPs)", zorder=3)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(names)), [n.replace(" ", "\n", 1) for n in names], fontsize=7)
        ax.set_title(f"{compile_mode}, batch {batch}", fontsize=9)
    axes[0][0].set_ylabel("speedup vs uncached")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"DiT-XL/2-256, {result['settings']['steps']} DDIM steps, {result['settings']['dtype']}, {result['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--compile", nargs="+", default=["eager", "blocks"], choices=["eager", "blocks"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--reference", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/gpu-dit-xl.json"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-block model: checks the script, measures nothing")
    parser.add_argument("--plot-from", type=Path, help="only redraw the plot of a result JSON")
    args = parser.parse_args()
    if args.plot_from:
        print(plot(json.loads(args.plot_from.read_text()), args.plot_from.with_suffix(".png")))
        return
    device, dtype = args.device, getattr(torch, args.dtype)
    # every schedule and implementation adds graphs; keep them all compiled rather than falling back
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 4096
    reference = load_reference(args.reference) if args.reference else None
    rows: list[dict[str, Any]] = []
    ideal_by_batch = {}
    for compile_mode in args.compile:
        eager_pipe = make_pipe(dit_xl(device, dtype, args.tiny), device) if compile_mode == "eager" else None

        def setup() -> SimpleNamespace:
            """Eager: one shared model. Compiled: a fresh model and a cleared dynamo cache per
            configuration, so no configuration pays for guards that an earlier one left behind."""
            if eager_pipe is not None:
                return eager_pipe
            torch._dynamo.reset()
            model = dit_xl(device, dtype, args.tiny)
            for block in model.transformer_blocks:
                block.compile()
            return make_pipe(model, device)

        for batch in args.batches:
            if batch not in ideal_by_batch:
                ideal_by_batch[batch] = ideal_speedups(make_pipe(dit_xl(device, dtype, args.tiny), device), batch)
            ideal = ideal_by_batch[batch]
            warmup = 2 if compile_mode == "eager" else 3

            def record(impl: str, schedule_name: str, fn: Callable[[], Any]) -> None:
                before = graphs_compiled()
                time_runs(fn, 0, warmup)
                after_warmup = graphs_compiled()
                times, peak = time_runs(fn, args.repeats, 0)
                rows.append({
                    "compile": compile_mode, "batch": batch, "implementation": impl, "schedule": schedule_name,
                    "ms": 1000 * statistics.median(times), "runs_ms": [1000 * t for t in times],
                    "ideal_speedup": ideal.get(schedule_name, 1.0), "peak_mib": peak,
                    "graphs_compiled_in_warmup": after_warmup - before,
                    "graphs_compiled_while_timed": graphs_compiled() - after_warmup,
                })
                print(f"{compile_mode:6} b{batch} {impl:10} {schedule_name:22} {rows[-1]['ms']:8.1f} ms", flush=True)

            pipe = setup()
            record("none", "uncached", lambda: denoise(pipe, batch))
            for name, plans in SCHEDULES.items():
                pipe = setup()
                handle = smoothcache.cache(pipe, Schedule(plans))
                record("smoothcache", name, lambda: denoise(pipe, batch))
                handle.disable()
                if reference is not None:
                    from diffusers.models.attention import BasicTransformerBlock

                    pipe = setup()
                    helper = reference.SmoothCacheHelper(
                        pipe.transformer, BasicTransformerBlock, list(plans), {k: list(v) for k, v in plans.items()}
                    )

                    def run_reference() -> None:
                        helper.enable()  # enable() resets its counters: without it a 2nd run is uncached
                        with contextlib.redirect_stdout(open(os.devnull, "w")):
                            denoise(pipe, batch)
                        helper.disable()

                    record("reference", name, run_reference)
    for row in rows:
        base = next(r for r in rows if r["compile"] == row["compile"] and r["batch"] == row["batch"] and r["implementation"] == "none")
        row["speedup"] = base["ms"] / row["ms"]
        row["efficiency"] = row["speedup"] / row["ideal_speedup"]
    result = {
        "benchmark": "gpu_bench DiT-XL/2-256",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "settings": {"steps": STEPS, "dtype": args.dtype, "repeats": args.repeats, "cfg": "batched (2x batch)", "vae": "excluded"},
        "flops_share": {b: i["_flops_share"] for b, i in ideal_by_batch.items()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps([{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "runs_ms"} for r in rows]))


if __name__ == "__main__":
    main()
