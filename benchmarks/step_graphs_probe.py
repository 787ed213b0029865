"""Probe (issue 20, batch 1): does ``smoothcache.step_graphs`` (each denoising step's transformer call
replayed from a CUDA graph captured once) beat ``mode="reduce-overhead"`` on the pipeline path?

At batch 1 under ``mode="reduce-overhead"`` a cached DiTPipeline is bound by the host (docs/speed.md,
``docs/benchmarks/pipeline-speed-dit-b1-trace-steps.json``): per transformer call the host checks
dynamo's guards, gathers the graph's inputs and does cudagraph trees' bookkeeping before the launch.
``step_graphs`` replays each step's graph with only the input copies before the launch. Here the
transformer is compiled in inductor's default mode (no CUDA graphs) for the ``-graphs`` rows.

Configurations, all with ``prefetch_timesteps``, in one process, in this order: ``uncached-ro`` and
``blocks-ro`` (``mode="reduce-overhead"``), ``blocks-graphs`` and ``uncached-graphs`` (default mode +
``step_graphs``); ``max_abs_diff_vs_ro`` compares each ``-graphs`` output with its ``-ro`` one, and
each ``-graphs`` row records the graphs' counts (captured, replayed, run as they are). DiTPipeline,
DiT-XL/2 shape, random weights, fp16, 50 DDIM steps (24 computed by ``blocks``:
``gpu_bench.ALPHA_018``), a user's ``pipe(...)`` call timed from the host, median of ``--repeats``
after three warm-up generations.

    python3 benchmarks/step_graphs_probe.py --out "$OUT/probe"     # one GPU, about 5 minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import pipeline_speed

import smoothcache
from smoothcache import Schedule


def timed(name: str, work: Any, args: argparse.Namespace, graphs: Any, outputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Three warm-up generations (compile; capture; replay), then ``--repeats`` timed ones."""

    def generate() -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return work.generate(args.batch, torch.Generator("cuda").manual_seed(0)).detach().clone()

    start = time.perf_counter()
    for _ in range(3):
        generate()
    torch.cuda.synchronize()
    warm = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = generate()
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    outputs[name] = out.float().cpu()
    row = {"config": name, "ms": statistics.median(times), "runs_ms": times, "warmup_s": warm,
           "graphs": None if graphs is None else dataclasses.asdict(graphs.stats)}
    reference = outputs.get(name.replace("graphs", "ro"))
    if reference is not None and reference is not outputs[name]:
        row["max_abs_diff_vs_ro"] = float((outputs[name] - reference).abs().max())
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-s", type=float, default=330, help="start no configuration after this many seconds")
    parser.add_argument("--configs", nargs="+", default=["uncached-ro", "blocks-ro", "blocks-graphs", "uncached-graphs"])
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
        undo: list[Any] = []
        try:
            pipe.transformer = torch.compile(model, mode="reduce-overhead") if how == "ro" else torch.compile(model)
            undo.append(lambda: setattr(pipe, "transformer", model))
            if method == "blocks":
                undo.append(smoothcache.cache(pipe, Schedule({"block": mask})).disable)
            undo.append(smoothcache.prefetch_timesteps(pipe).disable)
            graphs = smoothcache.step_graphs(pipe) if how == "graphs" else None
            if graphs is not None:
                undo.append(graphs.disable)
            rows.append(timed(name, work, args, graphs, outputs))
        except Exception as error:  # noqa: BLE001 - recorded; the next configuration goes on
            rows.append({"config": name, "error": f"{type(error).__name__}: {error}"[:1000]})
        finally:
            for step in reversed(undo):
                step()
        print(json.dumps(rows[-1]), flush=True)
        (args.out / "step-graphs-probe.json").write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                                                    "torch": torch.__version__, "rows": rows}, indent=1))
    base = {r["config"]: r.get("ms") for r in rows}
    for r in rows:
        if r.get("ms") and base.get("uncached-ro"):
            print(f"{r['config']:18s} {r['ms']:7.1f} ms  {base['uncached-ro'] / r['ms']:.2f}x vs uncached-ro", flush=True)


if __name__ == "__main__":
    main()
