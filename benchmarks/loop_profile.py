"""Where does one generation's time go? The GPU's busy share of the wall time, and its kernels.

A cached generation can fall short of its ideal speedup in two ways: the GPU still has work on a
reusing step (then it is busy all along and the kernel table says which work), or the GPU waits
for the host (then its busy share of the wall time is low). This script times one generation of
``gpu_bench.py``'s loop under the profiler, after warm-up, for each configuration asked for, and
records both. It writes a JSON summary and one kernel table per configuration.

    python benchmarks/loop_profile.py --out-dir /tmp/prof --compile model-cudagraphs --loop sync-free
    python benchmarks/loop_profile.py --tiny --device cpu --compile eager --out-dir /tmp/prof   # smoke test
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from itertools import pairwise
from pathlib import Path

import torch
from gpu_bench import LOOPS, SCHEDULES, compiled_pipe, denoise
from trace_steps import union_us

import smoothcache
from smoothcache import Schedule


def busy_ms(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of ``(start, end)`` intervals (microseconds in, milliseconds out)."""
    return union_us(intervals) / 1000


def profile_generation(generate, table_path: Path) -> dict[str, float]:
    """One profiled ``generate()``: wall time, GPU busy time and kernels; the kernel table to ``table_path``."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        generate()
        if cuda:
            torch.cuda.synchronize()
        wall_ms = 1000 * (time.perf_counter() - start)
    table_path.write_text(prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=40))
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    spans = [(e.time_range.start, e.time_range.end) for e in kernels]
    gpu_busy = busy_ms(spans) if spans else 0.0
    return {"profiled_wall_ms": wall_ms, "gpu_busy_ms": gpu_busy, "gpu_busy_share": gpu_busy / wall_ms,
            "kernels": len(kernels), "gpu_kernel_ms": sum(e.device_time for e in kernels) / 1000,
            "idle_ms_by_gap": idle_by_gap(spans)}


# Gaps between kernels: a few microseconds is the GPU launching the next kernel of a graph or
# stream; tens of microseconds and more, the GPU waiting for the host to launch anything.
GAP_BOUNDS_US = (5.0, 20.0, 100.0)


def idle_by_gap(intervals: list[tuple[float, float]]) -> dict[str, float]:
    """The GPU's idle time between kernels (ms), split by gap length, with how many gaps of each."""
    ranges = list(pairwise((0.0, *GAP_BOUNDS_US, float("inf"))))
    names = [f"{lo:g}-{hi:g}us" if hi != float("inf") else f">={lo:g}us" for lo, hi in ranges]
    idle = dict.fromkeys(names, 0.0)
    counts = dict.fromkeys(names, 0)
    reach = None
    for start, end in sorted(intervals):
        if reach is not None and start > reach:
            gap = start - reach
            name = next(n for n, (lo, hi) in zip(names, ranges) if lo <= gap < hi)
            idle[name] += gap / 1000
            counts[name] += 1
        reach = end if reach is None else max(reach, end)
    return {name: round(idle[name], 3) for name in names} | {f"gaps {name}": counts[name] for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--compile", default="model-cudagraphs", choices=["eager", "blocks", "model", "model-cudagraphs"])
    parser.add_argument("--loop", default="sync-free", choices=LOOPS)
    parser.add_argument("--schedules", nargs="+", default=["uncached", "block alpha=0.18"], choices=["uncached", *SCHEDULES])
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 64
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.schedules:
        pipe = compiled_pipe(args.device, args.dtype, args.tiny, args.compile)
        handle = smoothcache.cache(pipe, Schedule(SCHEDULES[name])) if name != "uncached" else None
        generate = partial(denoise, pipe, args.batch, loop=args.loop)
        for _ in range(3):  # compile, record the CUDA graphs, replay once
            generate()
        stem = f"{args.compile}-{args.loop}-{name.replace(' ', '-').replace('=', '').replace('+', '-')}"
        row = {"schedule": name, "compile": args.compile, "loop": args.loop, "batch": args.batch}
        row |= profile_generation(generate, args.out_dir / f"{stem}.txt")
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        if handle is not None:
            handle.disable()
    summary = {"benchmark": "loop_profile: GPU busy share and kernels of one generation (DiT-XL/2-256, 50 DDIM steps)",
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "dtype": args.dtype, "rows": rows}
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
