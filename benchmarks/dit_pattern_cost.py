"""What does one DiT-XL/2 transformer call cost for each compute/reuse pattern?

The end-to-end speedup of a schedule is bounded by what a step that reuses still costs. This
script times 50 transformer calls on fixed GPU inputs where the first call computes and the other
49 follow one pattern: compute everything, reuse attn1, reuse ff, reuse both, or reuse whole blocks
(``block``: each block returns its input plus its kept residual). The cost of one reusing call is
``(loop - full_call) / 49``, reported as a fraction of a full call. ``--profile`` also writes the
profiler's kernel table of the reuse-both loop, to see which kernels remain.

    python benchmarks/dit_pattern_cost.py --out docs/benchmarks/dit-pattern-cost.json --profile-dir /tmp/prof
    python benchmarks/dit_pattern_cost.py --tiny --device cpu --compile eager --out /tmp/p.json   # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch

import smoothcache
from smoothcache import Schedule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import STEPS, compile_model, dit_xl, make_pipe, time_runs

FIRST_ONLY = (1,) + (0,) * (STEPS - 1)
ALWAYS = (1,) * STEPS
PATTERNS: dict[str, dict[str, tuple[int, ...]] | None] = {
    "compute": None,
    "reuse attn1": {"attn1": FIRST_ONLY, "ff": ALWAYS},
    "reuse ff": {"attn1": ALWAYS, "ff": FIRST_ONLY},
    "reuse attn1+ff": {"attn1": FIRST_ONLY, "ff": FIRST_ONLY},
    "reuse block": {"block": FIRST_ONLY},
}


@torch.no_grad()
def transformer_loop(pipe, batch: int) -> None:
    model, device = pipe.transformer, pipe.device
    if getattr(pipe, "cudagraphs", False):
        torch.compiler.cudagraph_mark_step_begin()
    pipe.scheduler.set_timesteps(STEPS, device=device)
    x = torch.randn(2 * batch, 4, 32, 32, device=device, dtype=pipe.dtype)
    labels = torch.arange(2 * batch, device=device) % 1000
    for t in pipe.scheduler.timesteps:
        model(x, timestep=t.expand(x.shape[0]), class_labels=labels)


def profile_table(pipe, batch: int, path: Path) -> dict[str, float]:
    """The kernel table of one loop; returns the kernels launched and the GPU time, per call."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], acc_events=False) as prof:
        transformer_loop(pipe, batch)
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    events = prof.key_averages()
    path.write_text(
        events.table(sort_by="self_cuda_time_total", row_limit=30)
        + "\n\nBy CPU time:\n"
        + events.table(sort_by="self_cpu_time_total", row_limit=30)
    )
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.device_time for e in kernels)
    return {"kernels_per_call": len(kernels) / STEPS, "gpu_ms_per_call": gpu_us / 1000 / STEPS,
            "profiled_wall_ms_per_call": 1000 * wall / STEPS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", nargs="+", default=["eager", "blocks", "model", "model-cudagraphs"])
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--profile-dir", type=Path)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 64
    dtype = getattr(torch, args.dtype)
    rows = []
    for mode in args.compile:
        torch._dynamo.reset()
        model = dit_xl(args.device, dtype, args.tiny)
        pipe = make_pipe(compile_model(model, mode, args.backend), args.device)
        pipe.cudagraphs, pipe.dtype = mode == "model-cudagraphs", dtype
        row: dict[str, object] = {"compile": mode, "batch": args.batch, "dtype": args.dtype}
        names = ["compute"] + [p for p in args.patterns if p != "compute"]
        profiling = args.profile_dir is not None and args.device == "cuda"
        # every pattern timed first: a profiler run slows the kernel launches of what follows it
        for phase in ("time", "profile") if profiling else ("time",):
            for name in names:
                plans = PATTERNS[name]
                handle = smoothcache.cache(pipe, Schedule(plans)) if plans is not None else None
                if phase == "time":
                    times, _ = time_runs(partial(transformer_loop, pipe, args.batch), args.repeats, 2 if mode == "eager" else 3)
                    row[f"{name} loop_ms"] = 1000 * sorted(times)[len(times) // 2]
                    print(f"{mode} {name}: {row[f'{name} loop_ms']:.1f} ms", flush=True)
                else:
                    args.profile_dir.mkdir(parents=True, exist_ok=True)
                    transformer_loop(pipe, args.batch)  # a CUDA graph tree re-records after a detach
                    stem = f"{mode}-{name.replace(' ', '-').replace('+', '-')}"
                    for key, value in profile_table(pipe, args.batch, args.profile_dir / f"{stem}.txt").items():
                        row[f"{name} {key}"] = value
                if handle is not None:
                    handle.disable()
        full_call = row["compute loop_ms"] / STEPS  # type: ignore[operator]
        row["full_call_ms"] = full_call
        for name in [p for p in args.patterns if p != "compute"]:
            reuse_call = (row[f"{name} loop_ms"] - full_call) / (STEPS - 1)  # type: ignore[operator]
            row[f"{name} call_ms"] = reuse_call
            row[f"{name} fraction_of_full"] = reuse_call / full_call
        rows.append(row)
        save(args, dtype, rows)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


def save(args: argparse.Namespace, dtype: torch.dtype, rows: list[dict[str, object]]) -> None:
    """The result JSON, rewritten after every compile setting so that a run cut short keeps what it measured."""
    result = {
        "benchmark": "DiT-XL/2-256: the cost of one transformer call per compute/reuse pattern",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "settings": {"steps": STEPS, "batch": args.batch, "cfg_batch": 2 * args.batch, "dtype": args.dtype,
                     "repeats": args.repeats, "timing": "median", "tiny": args.tiny},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
