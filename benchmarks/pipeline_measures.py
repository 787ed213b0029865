"""What the pipeline benchmarks measure of one generation (issue 20): its time between two device
syncs, its FLOPs and computed steps, the host's waits for the GPU, each step's host and device
time, a profiler trace, dynamo's counts and how far two outputs are apart; and a failure as a row
records it. The tests replace ``step_clock`` here, so the scripts call it through this module.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
import trace_steps
from pipeline_methods import unwrapped
from pipeline_workloads import Workload
from torch import nn

from smoothcache.bench import count_host_syncs
from smoothcache.files import atomic_path


def counts_between(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """dynamo's counts (``gpu_bench.dynamo_counts``) from ``before`` to ``after``."""
    return {key: value - before[key] for key, value in after.items()}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peaks() -> None:
    """Start counting peak GPU memory afresh (nothing off CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peaks_mib() -> tuple[float | None, float | None]:
    """Peak GPU memory since ``reset_peaks``, allocated and reserved (graph pools are reserved at
    capture and not allocated again by replays); None off CUDA."""
    if not torch.cuda.is_available():
        return None, None
    return torch.cuda.max_memory_allocated() / 2**20, torch.cuda.max_memory_reserved() / 2**20


def allocated_mib() -> float | None:
    return torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else None


def clocked(generate: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float, float]:
    """One generation between two device syncs, so that its time is its own: its output, its start
    (``time.perf_counter``) and its seconds. Every timed generation in these benchmarks is one."""
    sync()
    start = time.perf_counter()
    output = generate()
    sync()
    return output, start, time.perf_counter() - start


def first_linear(module: nn.Module) -> nn.Linear:
    return next(m for m in module.modules() if isinstance(m, nn.Linear))


@contextlib.contextmanager
def calls_counted(modules: Sequence[nn.Module]) -> Iterator[list[int]]:
    """How often ``modules`` ran: a pre-hook on each (a cache that skips a module never reaches it)."""
    count = [0]

    def hook(*_: Any) -> None:
        count[0] += 1

    handles = [module.register_forward_pre_hook(hook) for module in modules]
    try:
        yield count
    finally:
        for handle in handles:
            handle.remove()


def counted_generation(work: Workload, generate: Callable[[], Any]) -> dict[str, float]:
    """One generation under the FLOP counter: the FLOPs dispatched; ``computed_steps``, the steps
    that ran the last block's self-attention; ``attention_fraction``, the share of all blocks'
    self-attention calls that ran (counted at each attention's first Linear: a reused layer, a
    block cached whole and a block cache-dit skips never reach it; cache-dit runs its first block
    at every step)."""
    from torch.utils.flop_counter import FlopCounterMode

    attentions = [first_linear(a) for a in work.attentions(unwrapped(work.pipe.transformer))]
    with calls_counted(attentions) as all_calls, calls_counted(attentions[-1:]) as last_calls, \
            FlopCounterMode(display=False) as flops, warnings.catch_warnings():
        # the counter's global module hooks meet the compiled wrapper (run eagerly here): torch warns they fire twice
        warnings.filterwarnings("ignore", message=r"Using `torch.compile\(module\)` when there are global hooks")
        generate()
    return {"flops": float(flops.get_total_flops()), "computed_steps": last_calls[0] / work.calls_per_step,
            "attention_fraction": all_calls[0] / (len(attentions) * work.calls_per_step * work.steps)}


def host_syncs_of(run: Callable[[], Any], device: torch.device) -> int | None:
    """Runs ``run`` once, counting the host's waits for the GPU where there is a GPU
    (``count_host_syncs`` runs nothing off CUDA)."""
    if device.type != "cuda":
        run()
        return None
    return count_host_syncs(run, device)


@contextlib.contextmanager
def step_clock(model: nn.Module, device: torch.device) -> Iterator[list[tuple[float, Any]]]:
    """Marks each call of ``model`` (the pipeline's transformer, or its compiled wrapper: the hook
    runs outside any graph) with the host's clock and, on a GPU, a CUDA event in the stream: the
    host's time from one call to the next is what the host spent on a step (all of it where the
    loop never waits for the GPU), the events' time is what the GPU did in it (idle gaps included
    where the host is behind)."""
    marks: list[tuple[float, Any]] = []

    def mark(*_: Any) -> None:
        event = None
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        marks.append((time.perf_counter(), event))

    handle = model.register_forward_pre_hook(mark)
    try:
        yield marks
    finally:
        handle.remove()


def step_times(marks: Sequence[tuple[float, Any]], mask: Sequence[int], calls_per_step: int) -> dict[str, Any]:
    """Median host and device milliseconds of computing and of reusing steps, from the marks of one
    generation's model calls (a step runs from its first call to the next step's; the last step,
    which runs into the pipeline's ending, is left out). Steps are named by the cell's mask, so for
    the uncached row "reusing" means the steps the cached rows reuse (it computes them all)."""
    firsts = marks[::calls_per_step]
    spans: dict[str, list[float]] = {"host_computing": [], "host_reusing": [], "device_computing": [], "device_reusing": []}
    for step, ((host, event), (next_host, next_event)) in enumerate(pairwise(firsts)):
        kind = "computing" if mask[step] else "reusing"
        spans[f"host_{kind}"].append(1000 * (next_host - host))
        if event is not None:
            spans[f"device_{kind}"].append(event.elapsed_time(next_event))
    found: dict[str, Any] = {key: statistics.median(values) if values else None for key, values in spans.items()}
    found["steps_measured"] = len(firsts) - 1
    return found


def clocked_steps(work: Workload, generate: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """One more generation with each step clocked (``step_clock``): ``step_times``' medians."""
    with step_clock(work.pipe.transformer, device) as marks:
        generate()
        sync()
    return step_times(marks, work.mask, work.calls_per_step)


@contextlib.contextmanager
def steps_named(model: nn.Module, mask: Sequence[int], calls_per_step: int) -> Iterator[None]:
    """Each call of ``model`` as a profiler range named by its step and the mask ("step 7
    reusing"), so that a trace shows where each step's host and device time goes."""
    calls, open_ranges = [0], []

    def enter(*_: Any) -> None:
        step = calls[0] // calls_per_step
        open_ranges.append(torch.profiler.record_function(trace_steps.range_name(step, step < len(mask) and bool(mask[step]))))
        open_ranges[-1].__enter__()
        calls[0] += 1

    def leave(*_: Any) -> None:
        if open_ranges:
            open_ranges.pop().__exit__(None, None, None)

    handles = [model.register_forward_pre_hook(enter), model.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def traced_generation(work: Workload, generate: Callable[[], Any], device: torch.device, path: Path) -> dict[str, Any]:
    """One generation under the torch profiler (host, and the GPU where there is one), each model
    call a range named by its step: the trace written to ``path`` (gzipped Chrome trace, for
    Perfetto or chrome://tracing), the host operators that took most of the time summarised, and
    each kind of step's host and device time split by :mod:`trace_steps` (``step_us``)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler, steps_named(work.pipe.transformer, work.mask, work.calls_per_step):
        generate()
        sync()
    with atomic_path(path) as temporary:
        profiler.export_chrome_trace(str(temporary))
    events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    steps = trace_steps.summarise(path)
    return {
        "trace_file": path.name,
        "generation_us": steps["generation"],
        "step_us": {"by_kind": steps["by_kind"], "by_kind_after": steps["by_kind_after"]},
        "top_host_ops": [{"name": e.key, "count": e.count, "self_host_ms": e.self_cpu_time_total / 1000}
                         for e in events[:15]],
    }


def max_abs_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    return None if a is None or b is None else float((a - b).abs().max())


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:1000]


def error_fields(error: BaseException) -> dict[str, str]:
    """A failure as a row records it; call it inside the ``except`` block (it reads the traceback there)."""
    return {"error": error_text(error), "traceback": traceback.format_exc(limit=8)[-4000:]}
