"""Where the host's time goes in each denoising step of a profiler trace (issue 20, batch 1).

``pipeline_speed.py --trace`` writes a Chrome trace of one generation in which each transformer call
is a host range named ``step N computing`` or ``step N reusing``. This summarises it per step: the
call's host time and the parts that set a compiled call's host cost (dynamo's guard check, the
prologue that gathers the graph's inputs, the CUDA graph launch, and the whole compiled region,
the launch included; a compiled region inside another would be counted twice), and the host's time between one call's end and the next call's start (the pipeline's own
work: guidance, the scheduler step, the progress bar). Medians are given per kind of step and per
kind of step before it, because a step's cost can depend on what ran before it (the host's caches).
Where the trace has the GPU's side (the same ranges on the device), each step also gets its span on
the device, the kernels' time within it, and the GPU's idle time since the previous step's span
ended: a step the host holds up shows idle time before it, or a span longer than its kernels.
The whole generation is split too: the host's time before the first model call and after the
last, and the GPU's busy and idle time over it.

    python benchmarks/trace_steps.py TRACE.json.gz [...] --run RESULT.json --out summary.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

STEP_NAME = re.compile(r"^step (\d+) (computing|reusing)$")


def range_name(step: int, computing: bool) -> str:
    """The name a model call's profiler range carries (what :data:`STEP_NAME` reads back)."""
    return f"step {step} {'computing' if computing else 'reusing'}"
# host ranges that make up a compiled call, by the prefix of the profiler's name for them
PARTS = {
    "guard_check_us": "TorchDynamo Cache Lookup",
    "prologue_us": "Pregraph bytecode",
    "graph_launch_us": "cudaGraphLaunch",
    "compiled_region_us": "Torch-Compiled Region",
}
HOST_CATEGORIES = ("cpu_op", "cuda_runtime", "user_annotation", "python_function")
DEVICE_RANGE, KERNEL = "gpu_user_annotation", "kernel"
DEVICE_WORK = (KERNEL, "gpu_memcpy", "gpu_memset")  # what keeps the GPU busy


def load_events(path: Path) -> list[dict[str, Any]]:
    """The complete ('X') events of a Chrome trace, gzipped or not: the host's, the device's step
    ranges and its kernels."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as file:
        trace = json.load(file)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    wanted = (*HOST_CATEGORIES, DEVICE_RANGE, *DEVICE_WORK)
    return [e for e in events if e.get("ph") == "X" and e.get("cat") in wanted]


def device_spans(events: Sequence[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per step name, its range on the device: span, kernel time inside it, idle time before it."""
    ranges = sorted((e for e in events if e.get("cat") == DEVICE_RANGE and STEP_NAME.match(e.get("name", ""))),
                    key=lambda e: e["ts"])
    kernels = sorted((e for e in events if e.get("cat") == KERNEL), key=lambda e: e["ts"])
    found: dict[str, dict[str, float | None]] = {}
    previous_end: float | None = None
    for span in ranges:
        start, end = span["ts"], span["ts"] + span["dur"]
        busy = sum(k["dur"] for k in kernels if start <= k["ts"] and k["ts"] + k["dur"] <= end)
        found[span["name"]] = {"device_us": span["dur"], "kernel_us": busy,
                               "idle_before_us": None if previous_end is None else max(0.0, start - previous_end)}
        previous_end = end
    return found


def host_steps(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The host's named step ranges (one per model call), in time order."""
    return sorted((e for e in events if e.get("cat") in HOST_CATEGORIES and STEP_NAME.match(e.get("name", ""))),
                  key=lambda e: e["ts"])


def step_rows(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per named step, in order: its kind, the kind before it, its host time and parts, and
    the gap to the next step's start (None for the last)."""
    steps = host_steps(events)
    on_device = device_spans(events)
    if not steps:
        return []
    thread = steps[0]["tid"]
    on_thread = sorted((e for e in events if e.get("tid") == thread), key=lambda e: e["ts"])
    rows, previous = [], None
    for index, step in enumerate(steps):
        match = STEP_NAME.match(step["name"])
        assert match is not None
        start, end = step["ts"], step["ts"] + step["dur"]
        inside = [e for e in on_thread if start <= e["ts"] <= end and e is not step]
        row: dict[str, Any] = {"step": int(match.group(1)), "kind": match.group(2), "after": previous,
                               "call_us": step["dur"]}
        for key, prefix in PARTS.items():
            row[key] = sum(e["dur"] for e in inside if e["name"].startswith(prefix))
        row.update(on_device.get(step["name"], {}))
        following = steps[index + 1] if index + 1 < len(steps) else None
        row["between_calls_us"] = None if following is None else following["ts"] - end
        rows.append(row)
        previous = row["kind"]
    return rows


def union_us(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length of the union of ``(start, end)`` intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def generation_totals(events: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Where one generation's wall time went: the host's span (its traced thread's first event to
    its last), the host's time before the first model call and after the last (the pipeline's own
    setup and ending, while the GPU has nothing of the denoising loop to do), and the GPU's busy
    time (kernels, copies and fills, overlaps counted once) against its idle time over the host's span."""
    steps = host_steps(events)
    if not steps:
        return {}
    thread = steps[0]["tid"]
    on_thread = [e for e in events if e.get("tid") == thread and e.get("cat") in HOST_CATEGORIES]
    start = min(e["ts"] for e in on_thread)
    end = max(e["ts"] + e["dur"] for e in on_thread)
    # the GPU's work within the host's span only (a trace may hold work queued before it)
    work = [(max(e["ts"], start), min(e["ts"] + e["dur"], end)) for e in events
            if e.get("cat") in DEVICE_WORK and e["ts"] < end and e["ts"] + e["dur"] > start]
    busy = union_us(work) if work else None
    return {"host_us": end - start, "before_first_call_us": steps[0]["ts"] - start,
            "after_last_call_us": end - (steps[-1]["ts"] + steps[-1]["dur"]),
            "device_busy_us": busy, "device_idle_us": None if busy is None else end - start - busy,
            "device_first_work_after_us": min(w[0] for w in work) - start if work else None,
            "longest_setup_gaps": setup_gaps(on_thread, start, steps[0]["ts"])}


def setup_gaps(on_thread: Sequence[dict[str, Any]], start: float, first_call: float, count: int = 3) -> list[dict[str, Any]]:
    """The ``count`` longest stretches before the first model call in which the host ran no traced
    operator (Python work: the profiler records operators, not Python), each with the operator
    that ended it (what the Python work was preparing)."""
    gaps, reach = [], start
    for event in sorted(on_thread, key=lambda e: e["ts"]):
        if event["ts"] >= first_call:
            break
        if event["ts"] > reach:
            gaps.append({"at_us": reach - start, "gap_us": event["ts"] - reach, "before": event["name"]})
        reach = max(reach, event["ts"] + event["dur"])
    if first_call > reach:
        gaps.append({"at_us": reach - start, "gap_us": first_call - reach, "before": "the first model call"})
    return sorted(gaps, key=lambda g: g["gap_us"], reverse=True)[:count]


def medians(rows: Iterable[dict[str, Any]]) -> dict[str, float | int | None]:
    """The median of every timed field over ``rows``, and how many there were."""
    rows = list(rows)
    found: dict[str, float | int | None] = {"steps": len(rows)}
    for key in ("call_us", *PARTS, "between_calls_us", "device_us", "kernel_us", "idle_before_us"):
        values = [r[key] for r in rows if r.get(key) is not None]
        found[key] = statistics.median(values) if values else None
    return found


def summarise(path: Path) -> dict[str, Any]:
    """Per-step rows of one trace, and their medians by kind and by (kind, kind before)."""
    events = load_events(path)
    rows = step_rows(events)
    by_kind = {kind: medians(r for r in rows if r["kind"] == kind) for kind in ("computing", "reusing")}
    by_pair = {f"{kind} after {after}": medians(r for r in rows if r["kind"] == kind and r["after"] == after)
               for kind in ("computing", "reusing") for after in ("computing", "reusing")}
    return {"trace_file": path.name, "generation": generation_totals(events), "by_kind": {k: v for k, v in by_kind.items() if v["steps"]},
            "by_kind_after": {k: v for k, v in by_pair.items() if v["steps"]}, "steps": rows}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, help="write the summaries here as JSON (else print the medians)")
    parser.add_argument("--run", type=Path,
                        help="the result JSON of the run that wrote the traces: its device, versions, date and settings are copied in")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {}
    if args.run is not None:
        run = json.loads(args.run.read_text())
        result["run"] = {"file": args.run.name, **{key: run.get(key) for key in ("device", "versions", "date", "settings")}}
    result["summaries"] = [summarise(path) for path in args.traces]
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    for summary in result["summaries"]:
        print(summary["trace_file"])
        totals = summary["generation"]
        if totals:
            print("  generation us: " + ", ".join(f"{key[:-3]} {value:.0f}" for key, value in totals.items()
                                                  if isinstance(value, float | int)))
            print("  longest setup gaps us: " + ", ".join(f"{g['gap_us']:.0f} before {g['before']}"
                                                         for g in totals["longest_setup_gaps"]))
        for kind, found in summary["by_kind"].items():
            parts = ", ".join(f"{key[:-3]} {found[key]:.0f}" for key in
                              ("call_us", *PARTS, "between_calls_us", "device_us", "kernel_us", "idle_before_us")
                              if found[key] is not None)
            print(f"  {kind:9s} ({found['steps']} steps) median us: {parts}")
    return result


if __name__ == "__main__":
    main()
