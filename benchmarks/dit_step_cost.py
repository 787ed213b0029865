"""Where does the time of a cached DiT-XL/2 step go? The transformer alone against the whole step.

gpu_bench.py times DiTPipeline's loop end to end. This script also times the transformer alone
(50 calls on fixed GPU inputs, no scheduler step), uncached and with the alpha=0.18-style attn1+ff
schedule, for eager, whole-model compile and whole-model compile with CUDA graphs. The
difference between the two loops is the per-step cost that caching cannot remove (DDIM's step,
guidance arithmetic, host syncs), which bounds the end-to-end speedup.

    python benchmarks/dit_step_cost.py --out docs/benchmarks/dit-step-cost-h200-b8.json   # the earlier run: docs/benchmarks/archive/
    python benchmarks/dit_step_cost.py --tiny --device cpu --backend eager --out /tmp/cost.json   # smoke test
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
from gpu_bench import (
    SCHEDULES,
    STEPS,
    compile_model,
    denoise,
    dit_xl,
    ideal_speedups,
    make_pipe,
    time_runs,
)

SCHEDULE = "attn1+ff alpha=0.18"


@torch.no_grad()
def transformer_loop(pipe, batch: int) -> None:
    """The transformer's 50 calls of a generation, on fixed inputs: no scheduler, no guidance maths."""
    model, device = pipe.transformer, pipe.device
    if getattr(pipe, "cudagraphs", False):
        torch.compiler.cudagraph_mark_step_begin()
    pipe.scheduler.set_timesteps(STEPS, device=device)  # a new generation for the cache's step count
    x = torch.randn(2 * batch, 4, 32, 32, device=device, dtype=model.dtype)
    labels = (torch.arange(2 * batch, device=device) % 1000)
    for t in pipe.scheduler.timesteps:
        model(x, timestep=t.expand(x.shape[0]), class_labels=labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", nargs="+", default=["eager", "model", "model-cudagraphs"])
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 64
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    ideal = ideal_speedups(make_pipe(dit_xl(args.device, dtype, args.tiny), args.device), args.batch)[SCHEDULE]
    rows = []
    for mode in args.compile:
        torch._dynamo.reset()
        model = dit_xl(args.device, dtype, args.tiny)
        pipe = make_pipe(compile_model(model, mode, args.backend), args.device)
        pipe.cudagraphs = mode == "model-cudagraphs"
        warmup = 2 if mode == "eager" else 3
        row: dict[str, object] = {"compile": mode, "batch": args.batch, "ideal_speedup": ideal}
        for label, schedule in (("uncached", None), ("cached", Schedule(SCHEDULES[SCHEDULE]))):
            handle = smoothcache.cache(pipe, schedule) if schedule is not None else None
            for loop_name, loop in (("transformer", transformer_loop), ("pipeline_loop", denoise)):
                times, _ = time_runs(partial(loop, pipe, args.batch), args.repeats, warmup)
                row[f"{loop_name}_{label}_ms"] = 1000 * sorted(times)[len(times) // 2]
            if handle is not None:
                handle.disable()
        for loop_name in ("transformer", "pipeline_loop"):
            speedup = row[f"{loop_name}_uncached_ms"] / row[f"{loop_name}_cached_ms"]  # type: ignore[operator]
            row[f"{loop_name}_speedup"] = speedup
            row[f"{loop_name}_efficiency"] = speedup / ideal
        row["other_work_per_step_ms"] = (row["pipeline_loop_uncached_ms"] - row["transformer_uncached_ms"]) / STEPS  # type: ignore[operator]
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    result = {
        "benchmark": "DiT-XL/2-256 step cost: transformer alone vs DiTPipeline's loop",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "settings": {"steps": STEPS, "batch": args.batch, "cfg_batch": 2 * args.batch, "dtype": str(dtype),
                     "schedule": SCHEDULE, "repeats": args.repeats, "timing": "median", "tiny": args.tiny},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
