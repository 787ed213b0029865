"""GPU latency of SmoothCache on DiT-XL/2-256 (random weights: latency does not depend on them).

The denoising loop is DiTPipeline's (classifier-free guidance batched, DDIM, 50 steps), without
the VAE decode. Each configuration is timed after warm-up as the median of ``--repeats`` runs;
speedups are against the uncached run of the same compile setting, and the ideal speedup comes
from the FLOPs the schedule skips (measured with torch.utils.flop_counter).

    python benchmarks/gpu_bench.py --out docs/benchmarks/gpu-dit-xl.json [--reference PATH]

``--reference`` is the folder of the reference package ``SmoothCache`` (dit-smoothcache 0.1.1,
installed somewhere off the import path, since it shares its import name with our shim).

Compile settings (``--compile``): ``eager``; ``blocks``, each transformer block compiled (regional);
``model``, the whole transformer compiled (one graph per step pattern); ``model-cudagraphs``, the
same with ``mode="reduce-overhead"`` (CUDA graphs through cudagraph trees). Each row records what
dynamo did: graphs compiled in warm-up and while timed, frames (re)compiled while timed (0 is the
target), graph breaks, and CUDA graph skips; and how often one generation made the host wait for the
GPU (``--loops`` compares diffusers' loop, which waits once per step, with a loop that does not).

CUDA graphs and the cache: cudagraph trees start a new generation, recycling the memory of earlier
outputs, at every compiled call unless ``torch.compiler.cudagraph_mark_step_begin()`` was ever
called; then only at each such call. A kept layer output is an output of the step that computed
it, so the cache marks a step itself at each generation's first model call, never per denoising
step: each step of a generation is then one node of a cudagraph tree (recorded in the second
generation, replayed from the third), and kept outputs stay valid. This script does not mark: it
checks that the cache's marks suffice, and each row records ``max_abs_diff_vs_eager``, the largest
difference of one generation from the same configuration run eagerly (``force_eager``). Memory:
the kept outputs (one per cached layer, as in eager) live in the cudagraph pool, plus the pool's
activations, shared by all nodes of the tree; peak memory is in ``peak_mib``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

import smoothcache
from smoothcache import Schedule
from smoothcache.bench import count_host_syncs

STEPS = 50
# The reference's 50-step alpha=0.18 DiT schedule (smoothcache_schedules/50-N-3-threshold-0.18.json).
ALPHA_018 = (1, 0, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0,
             1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1)
FORA_2 = Schedule.fixed_interval(["attn1", "ff"], STEPS, 2).plans["attn1"]
SCHEDULES = {
    "attn1 alpha=0.18": {"attn1": ALPHA_018},
    "attn1+ff alpha=0.18": {"attn1": ALPHA_018, "ff": ALPHA_018},
    "attn1+ff fora-2": {"attn1": FORA_2, "ff": FORA_2},
    # whole blocks cached (input + kept residual): also skips the norms, modulation and gates
    "block alpha=0.18": {"block": ALPHA_018},
    "block fora-2": {"block": FORA_2},
}


def dit_xl(device: str, dtype: torch.dtype, tiny: bool = False):
    """DiT-XL/2 at 256px (28 blocks, width 1152, 32x32 latents); ``tiny`` for a smoke test. Made on
    ``device``: initialising 750M random weights on the host is slow (an H100 run, made on the host
    and moved, reported a 27 s build)."""
    from diffusers import DiTTransformer2DModel

    heads, head_dim, layers = (2, 8, 2) if tiny else (16, 72, 28)
    with torch.device(device):
        model = DiTTransformer2DModel(
            num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=layers,
            patch_size=2, sample_size=32, norm_type="ada_norm_zero", num_embeds_ada_norm=1000,
        )
    return model.to(device=device, dtype=dtype).eval()


def make_pipe(model, device: str):
    from diffusers import DDIMScheduler

    return SimpleNamespace(transformer=model, scheduler=DDIMScheduler(), device=torch.device(device))


LOOPS = ("synced", "sync-free")


@torch.no_grad()
def denoise(pipe, batch: int, seed: int = 0, guidance: float = 4.0, loop: str = "synced") -> torch.Tensor:
    """DiTPipeline's loop: CFG batch, scale_model_input, learned-sigma split, scheduler step.

    ``loop="synced"`` waits for the GPU once per step, as diffusers' loops do: here DDIM's step tests
    a device timestep on the host (``prev_timestep >= 0``); DiTPipeline copies each host timestep
    to the device (``t[None].to(device)``, a blocking copy). ``"sync-free"`` keeps the scheduler's
    timesteps on the host and copies them to the device once per generation, so the host can queue
    the next steps while the GPU runs this one. The host's per-step work is then hidden behind the
    GPU's, which matters most where a step's GPU work is small: a step that reuses."""
    model, scheduler, device = pipe.transformer, pipe.scheduler, pipe.device
    generator = torch.Generator(device).manual_seed(seed)
    latents = torch.randn(batch, 4, 32, 32, generator=generator, device=device, dtype=model.dtype)
    labels = torch.arange(batch, device=device) % 1000
    class_in = torch.cat([labels, torch.full_like(labels, 1000)])
    x = torch.cat([latents, latents])
    if loop == "sync-free":
        scheduler.set_timesteps(STEPS)
        model_timesteps = scheduler.timesteps.to(device)
    else:
        scheduler.set_timesteps(STEPS, device=device)
        model_timesteps = scheduler.timesteps
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.scale_model_input(x, t)
        out = model(x, timestep=model_timesteps[i].expand(x.shape[0]), class_labels=class_in).sample
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
    with smoothcache.calibration(pipe, components=["attn1", "ff", "block"], steps=STEPS) as rec:
        denoise(pipe, batch)
    profile = rec.profile
    shares = {k: v / profile.total_flops for k, v in profile.key_costs().items()}
    return {name: profile.estimated_speedup(Schedule(plans)) for name, plans in SCHEDULES.items()} | {"_flops_share": shares}


def dynamo_counts() -> dict[str, int]:
    """Dynamo's running totals: graphs compiled, frames compiled (first compiles and recompiles),
    graph breaks, and graphs inductor left without CUDA graphs."""
    from torch._dynamo.utils import counters

    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "frames": int(counters["frames"]["total"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]),
    }


def compile_model(model, compile_mode: str, backend: str) -> Any:
    """``model`` compiled as ``compile_mode`` says: each block in place (regional), or wrapped whole as
    diffusers' docs do (``pipe.transformer = torch.compile(pipe.transformer)``), with CUDA graphs for
    ``model-cudagraphs``. Wrapped, the cache's step hook sits on the wrapper, outside dynamo."""
    if compile_mode == "blocks":
        for block in model.transformer_blocks:
            block.compile(backend=backend)
    elif compile_mode == "model":
        return torch.compile(model, backend=backend)
    elif compile_mode == "model-cudagraphs":
        return torch.compile(model, backend=backend, mode="reduce-overhead")
    return model


def plot(result: dict[str, Any], path: Path) -> Path:
    """Speedup over uncached (same compile setting) per schedule; bars for ours and the reference, ticks for ideal."""
    from smoothcache.plots import pyplot, save_figure

    plt = pyplot()
    panels = sorted({(r["compile"], r["batch"], r.get("loop", "synced")) for r in result["rows"]})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), sharey=True, squeeze=False)
    for ax, (compile_mode, batch, loop) in zip(axes[0], panels, strict=True):
        rows = [r for r in result["rows"] if r["compile"] == compile_mode and r["batch"] == batch
                and r.get("loop", "synced") == loop and r["schedule"] != "uncached" and "speedup" in r]
        names = list(dict.fromkeys(r["schedule"] for r in rows))
        impls = [i for i in ("smoothcache", "smoothcache+forecast", "reference") if any(r["implementation"] == i for r in rows)]
        width = 0.8 / max(len(impls), 1)
        for position, impl in enumerate(impls):
            offset = (position - (len(impls) - 1) / 2) * width
            values = [next((r["speedup"] for r in rows if r["schedule"] == n and r["implementation"] == impl), 0) for n in names]
            ax.bar([i + offset for i in range(len(names))], values, width=width, label=impl)
        ideal = [next(r["ideal_speedup"] for r in rows if r["schedule"] == n) for n in names]
        ax.scatter(range(len(names)), ideal, marker="_", s=900, color="black", label="ideal (FLOPs)", zorder=3)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(names)), [n.replace(" ", "\n", 1) for n in names], fontsize=7)
        ax.set_title(f"{compile_mode}, batch {batch}, {loop} loop", fontsize=9)
    axes[0][0].set_ylabel("speedup vs uncached")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(f"DiT-XL/2-256, {result['settings']['steps']} DDIM steps, {result['settings']['dtype']}, {result['device']}", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return save_figure(fig, path, dpi=120)


def fresh_pipe(shared: SimpleNamespace | None, compile_mode: str, args: argparse.Namespace) -> SimpleNamespace:
    """Eager: one shared model. Compiled: a fresh model and a cleared dynamo cache per
    configuration, so no configuration pays for guards that an earlier one left behind."""
    if shared is not None:
        return shared
    gc.collect()  # the last configuration's model and CUDA graph pool, so that its memory is not counted here
    return compiled_pipe(args.device, args.dtype, args.tiny, compile_mode, args.backend)


def compiled_pipe(device: str, dtype: str, tiny: bool, compile_mode: str, backend: str = "inductor") -> SimpleNamespace:
    """A fresh DiT-XL/2 pipe compiled as ``compile_mode`` says, with dynamo's cache cleared first."""
    torch._dynamo.reset()
    return make_pipe(compile_model(dit_xl(device, getattr(torch, dtype), tiny), compile_mode, backend), device)


def run_reference(reference: Any, pipe: SimpleNamespace, plans: dict[str, tuple[int, ...]], batch: int, loop: str) -> None:
    """One generation with the reference package's helper (enable() resets its counters: without it a
    second run would be uncached)."""
    from diffusers.models.attention import BasicTransformerBlock

    helper = getattr(pipe, "reference_helper", None)
    if helper is None:
        helper = pipe.reference_helper = reference.SmoothCacheHelper(
            pipe.transformer, BasicTransformerBlock, list(plans), {k: list(v) for k, v in plans.items()}
        )
    helper.enable()
    torch.compiler.cudagraph_mark_step_begin()  # its kept outputs must last the generation, as ours do
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        denoise(pipe, batch, loop=loop)
    helper.disable()


def measure(fn: Callable[[], Any], warmup: int, repeats: int, keep_going: bool) -> dict[str, Any]:
    """Latency, peak memory and what dynamo did, in warm-up and while timed; with ``keep_going`` a
    failure is recorded instead of raised (a CUDA graph configuration may fail where others run)."""
    try:
        before = dynamo_counts()
        time_runs(fn, 0, warmup)
        after_warmup = dynamo_counts()
        times, peak = time_runs(fn, repeats, 0)
        syncs = count_host_syncs(fn, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    except Exception as error:
        if not keep_going:
            raise
        torch._dynamo.reset()
        return {"error": f"{type(error).__name__}: {error}"[:1000]}
    end = dynamo_counts()
    return {
        "ms": 1000 * statistics.median(times), "runs_ms": [1000 * t for t in times], "peak_mib": peak,
        "host_syncs_per_generation": syncs,
        "graphs_compiled_in_warmup": after_warmup["graphs"] - before["graphs"],
        "graphs_compiled_while_timed": end["graphs"] - after_warmup["graphs"],
        "frames_compiled_in_warmup": after_warmup["frames"] - before["frames"],
        "recompiles_while_timed": end["frames"] - after_warmup["frames"],
        "graph_breaks": end["graph_breaks"] - before["graph_breaks"],
        "cudagraph_skips": end["cudagraph_skips"] - before["cudagraph_skips"],
    }


def difference_from_eager(fn: Callable[[], torch.Tensor]) -> float:
    """The largest difference between one generation and the same generation run eagerly (compiled
    regions skipped, the cache as it is): compiling may round differently, but must not change what
    is computed or reused."""
    with torch.compiler.set_stance("force_eager"):
        eager = fn()
    return float((fn() - eager).abs().max())


def save(args: argparse.Namespace, rows: list[dict[str, Any]], ideal_by_batch: dict[int, Any]) -> dict[str, Any]:
    """Speedups against the uncached row of the same compile setting; the result JSON, rewritten after
    every configuration so that a run cut short keeps what it measured."""
    for row in rows:
        base = next((r for r in rows if r["compile"] == row["compile"] and r["batch"] == row["batch"]
                     and r.get("loop") == row.get("loop") and r["implementation"] == "none"), {})
        if "ms" in row and "ms" in base:
            row["speedup"] = base["ms"] / row["ms"]
            row["efficiency"] = row["speedup"] / row["ideal_speedup"]
            # host noise only ever slows a run down: the fastest runs are the steadier comparison
            row["speedup_of_fastest"] = min(base["runs_ms"]) / min(row["runs_ms"])
    result = {
        "benchmark": "gpu_bench DiT-XL/2-256",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "settings": {"steps": STEPS, "dtype": args.dtype, "repeats": args.repeats, "cfg": "batched (2x batch)", "vae": "excluded",
                     "backend": args.backend, "recompile_limit": torch._dynamo.config.recompile_limit},
        "flops_share": {b: i["_flops_share"] for b, i in ideal_by_batch.items()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--compile", nargs="+", default=["eager", "blocks", "model", "model-cudagraphs"],
                        choices=["eager", "blocks", "model", "model-cudagraphs"])
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    parser.add_argument("--backend", default="inductor", help="torch.compile backend ('eager' to check dynamo only)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--reference", type=Path)
    parser.add_argument("--loops", nargs="+", default=["synced"], choices=LOOPS,
                        help="the denoising loop: 'synced' waits for the GPU every step as diffusers' loops do; "
                        "'sync-free' does not (see denoise)")
    parser.add_argument("--forecast", action="store_true",
                        help="also time each schedule with forecast='linear' (implementation 'smoothcache+forecast')")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/gpu-dit-xl.json"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-block model: checks the script, measures nothing")
    parser.add_argument("--keep-going", action="store_true", help="record a failing configuration and go on")
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
        shared = make_pipe(dit_xl(device, dtype, args.tiny), device) if compile_mode == "eager" else None
        setup = partial(fresh_pipe, shared, compile_mode, args)
        warmup = 2 if compile_mode == "eager" else 3
        for batch, loop in [(b, lp) for b in args.batches for lp in args.loops]:
            if batch not in ideal_by_batch:
                ideal_by_batch[batch] = ideal_speedups(make_pipe(dit_xl(device, dtype, args.tiny), device), batch)
            ideal = ideal_by_batch[batch]

            def record(impl: str, schedule_name: str, fn: Callable[[], Any], patterns: int = 1, *,
                       compile_mode: str = compile_mode, batch: int = batch, loop: str = loop, ideal: dict = ideal,
                       warmup: int = warmup) -> None:
                row = {"compile": compile_mode, "batch": batch, "loop": loop, "implementation": impl, "schedule": schedule_name,
                       "ideal_speedup": ideal.get(schedule_name, 1.0), "decision_patterns": patterns}
                row |= measure(fn, warmup, args.repeats, args.keep_going)
                if compile_mode != "eager" and impl != "reference" and "ms" in row:
                    row["max_abs_diff_vs_eager"] = difference_from_eager(fn)
                rows.append(row)
                save(args, rows, ideal_by_batch)
                done = rows[-1]
                result = f"{done['ms']:8.1f} ms, {done['graphs_compiled_in_warmup']} graphs, " \
                    f"{done['recompiles_while_timed']} recompiles timed" if "ms" in done else f"FAILED {done['error'][:300]}"
                print(f"{compile_mode:16} b{batch} {loop:9} {impl:11} {schedule_name:22} {result}", flush=True)

            generate = partial(denoise, batch=batch, loop=loop)

            def run_cached(impl: str, name: str, forecast: str, *, generate=generate, record=record, setup=setup) -> None:
                """One cached configuration; its model and kept outputs go out of scope when it returns, so
                the next configuration's peak memory does not count them."""
                pipe = setup()
                handle = smoothcache.cache(pipe, Schedule(SCHEDULES[name]), forecast=forecast)
                record(impl, name, partial(generate, pipe), handle.decision_patterns())
                handle.disable()

            record("none", "uncached", partial(generate, setup()))
            for name in args.schedules:
                run_cached("smoothcache", name, "none")
                if args.forecast:  # layer outputs or block residuals extrapolated
                    run_cached("smoothcache+forecast", name, "linear")
                if reference is not None and "block" not in SCHEDULES[name]:  # the reference caches layers only
                    record("reference", name, partial(run_reference, reference, setup(), SCHEDULES[name], batch, loop))
    result = save(args, rows, ideal_by_batch)
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps([{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "runs_ms"} for r in rows]))

if __name__ == "__main__":
    main()
