"""Probe (issue 20, batch 1): does replaying each denoising step's transformer call from a CUDA graph
of our own cut the host time that dynamo and cudagraph trees spend per call?

At batch 1 under ``mode="reduce-overhead"`` a cached DiTPipeline is bound by the host (docs/speed.md,
``docs/benchmarks/pipeline-speed-dit-b1-trace-steps.json``): per transformer call the host checks
dynamo's guards, gathers the graph's inputs and does cudagraph trees' bookkeeping before the launch.
Here the transformer is compiled without CUDA graphs (inductor's default mode) and wrapped by
:class:`StepGraphs`: two generations run it as it is (warm-up and compiling), the third captures each
step's call as a ``torch.cuda.CUDAGraph`` (one per step, one memory pool, as cudagraph trees record
one node per call), and later generations only copy the call's tensors into the captured inputs and
replay. Step by step the capture generation runs the cache's Python (its hooks and kept outputs), so
each step's graph holds that step's compute/reuse pattern and reads what earlier steps' graphs
kept, at the same addresses on every replay.

A prototype to decide whether this is worth building into the library: it knows nothing of input
shapes changing or parameters being swapped, and the cache's step bookkeeping does not run on
replayed calls. Configurations, all with ``prefetch_timesteps`` and one process: ``uncached-ro`` and
``blocks-ro`` (``mode="reduce-overhead"``), ``blocks-graphs`` and ``uncached-graphs`` (default mode +
StepGraphs); ``max_abs_diff_vs_ro`` compares each ``-graphs`` output with its ``-ro`` one. DiTPipeline,
DiT-XL/2 shape, random weights, fp16, 50 DDIM steps (24 computed: ``gpu_bench.ALPHA_018``).

    python3 benchmarks/step_graphs_probe.py --out "$OUT/probe"     # one GPU, about 5 minutes
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import pipeline_speed  # noqa: E402
import smoothcache  # noqa: E402
from smoothcache import Schedule  # noqa: E402


class StepGraphs:
    """Calls the model normally for ``plain`` generations, captures each step's call in the next,
    replays the captures after."""

    def __init__(self, model: Any, steps: int, plain: int = 2) -> None:
        # set through __dict__: __getattr__ hands every other attribute to the model
        self.__dict__.update(model=model, steps=steps, plain=plain, calls=0, graphs={}, pool=None,
                             side=torch.cuda.Stream())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["model"], name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        step, generation = self.calls % self.steps, self.calls // self.steps
        self.calls += 1
        if generation < self.plain:  # warm-up on the stream the captures use, as torch's docs advise
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                out = self.model(*args, **kwargs)
            torch.cuda.current_stream().wait_stream(self.side)
            return out
        if generation == self.plain:
            s_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
            s_kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=self.side):
                out = self.model(*s_args, **s_kwargs)
            self.graphs[step] = (graph, s_args, s_kwargs, out)
            graph.replay()
            return out
        graph, s_args, s_kwargs, out = self.graphs[step]
        for static, given in zip(s_args, args):
            if isinstance(static, torch.Tensor):
                static.copy_(given)
        for key, static in s_kwargs.items():
            if isinstance(static, torch.Tensor):
                static.copy_(kwargs[key])
        graph.replay()
        return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-s", type=float, default=150)
    parser.add_argument("--configs", nargs="+", default=["uncached-ro", "blocks-graphs", "uncached-graphs", "blocks-ro"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("step_graphs_probe.py captures CUDA graphs: run it on a machine with a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    work = pipeline_speed.dit_workload(False, "cuda")
    pipe, mask = work.pipe, list(work.mask)
    model = pipe.transformer
    rows, outputs = [], {}
    for name in args.configs:
        if time.perf_counter() - started > args.max_s:
            rows.append({"config": name, "skipped": "time"})
            continue
        torch._dynamo.reset()
        method, how = name.split("-")
        pipe.transformer = torch.compile(model, mode="reduce-overhead") if how == "ro" else torch.compile(model)
        handle = smoothcache.cache(pipe, Schedule({"block": mask})) if method == "blocks" else None
        prefetch = smoothcache.prefetch_timesteps(pipe)
        graphs = None
        if how == "graphs":
            graphs = StepGraphs(pipe.transformer, len(mask))
            object.__setattr__(pipe, "transformer", graphs)

        def generate() -> torch.Tensor:
            torch.compiler.cudagraph_mark_step_begin()
            return work.generate(args.batch, torch.Generator("cuda").manual_seed(0)).detach().clone()

        t0 = time.perf_counter()
        for _ in range(3):
            generate()
        torch.cuda.synchronize()
        warm = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = generate()
            torch.cuda.synchronize()
            times.append(1000 * (time.perf_counter() - t))
        outputs[name] = out.float().cpu()
        row = {"config": name, "ms": statistics.median(times), "runs_ms": times, "warmup_s": warm,
               "graphs_captured": None if graphs is None else len(graphs.graphs)}
        ref = outputs.get(name.replace("graphs", "ro"))
        if ref is not None:
            row["max_abs_diff_vs_ro"] = float((out.float().cpu() - ref).abs().max())
        rows.append(row)
        print(json.dumps(row), flush=True)
        prefetch.disable()
        if handle is not None:
            handle.disable()
        object.__setattr__(pipe, "transformer", model)
        if graphs is not None:
            graphs.graphs.clear()
        (args.out / "step-graphs-probe.json").write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                                                    "torch": torch.__version__, "rows": rows}, indent=1))
    base = {r["config"]: r.get("ms") for r in rows}
    for r in rows:
        if r.get("ms") and base.get("uncached-ro"):
            print(f"{r['config']:18s} {r['ms']:7.1f} ms  {base['uncached-ro'] / r['ms']:.2f}x vs uncached-ro", flush=True)


if __name__ == "__main__":
    main()
