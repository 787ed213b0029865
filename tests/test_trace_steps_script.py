"""benchmarks/trace_steps.py: a trace's named steps are split into the parts of a compiled call and
the host's time between calls, and summarised by kind of step and the kind before it."""

from __future__ import annotations

import gzip
import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
trace_steps = importlib.import_module("trace_steps")


def event(name: str, ts: float, dur: float, cat: str = "cpu_op", tid: int = 1) -> dict:
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "cat": cat, "tid": tid}


def synthetic_trace() -> list[dict]:
    """Three steps (computing, reusing, computing) 1000 us apart, with known parts inside each call."""
    events = []
    for step, (kind, call, guard, launch) in enumerate([("computing", 600, 100, 300), ("reusing", 200, 50, 20),
                                                       ("computing", 500, 80, 250)]):
        start = 1000.0 * step
        events += [
            event(f"step {step} {kind}", start, call, cat="user_annotation"),
            event("TorchDynamo Cache Lookup", start + 1, guard),
            event("Torch-Compiled Region: 0/0", start + guard + 2, call - guard - 3),
            event("cudaGraphLaunch", start + guard + 10, launch, cat="cuda_runtime"),
            event("aten::mul", start + call + 50, 30),  # the pipeline's own work, between calls
            event("cudaGraphLaunch", start + 5, 999, cat="cuda_runtime", tid=2),  # another thread: not counted
            # the device: the step's range 50 us after the host's, and two kernels in it
            event(f"step {step} {kind}", start + 50, call + 100, cat="gpu_user_annotation", tid=7),
            event("kernel", start + 60, 40, cat="kernel", tid=7),
            event("kernel", start + 120, 30, cat="kernel", tid=7),
        ]
    return events


def test_steps_are_split_and_summarised(tmp_path):
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as file:
        json.dump({"traceEvents": synthetic_trace()}, file)
    summary = trace_steps.summarise(path)
    first, second, third = summary["steps"]
    assert (first["kind"], first["after"], second["after"], third["after"]) == ("computing", None, "computing", "reusing")
    assert (first["call_us"], first["guard_check_us"], first["graph_launch_us"]) == (600, 100, 300)
    assert first["compiled_region_us"] == 497 and first["prologue_us"] == 0
    assert (first["between_calls_us"], second["between_calls_us"], third["between_calls_us"]) == (400, 800, None)
    assert (first["device_us"], first["kernel_us"], first["idle_before_us"]) == (700, 70, None)
    assert second["idle_before_us"] == 1000 - 700 and second["device_us"] == 300
    computing = summary["by_kind"]["computing"]
    assert computing["steps"] == 2 and computing["call_us"] == 550 and computing["graph_launch_us"] == 275
    assert computing["between_calls_us"] == 400  # the last step has no following call
    assert set(summary["by_kind_after"]) == {"reusing after computing", "computing after reusing"}
    assert summary["by_kind_after"]["computing after reusing"]["call_us"] == 500


def test_the_generation_is_split_into_host_setup_ending_and_device_busy_and_idle():
    events = [event("aten::empty", -300, 20)]  # the pipeline's setup before the first call
    events += synthetic_trace()
    events += [event("kernel", 2100, 60, cat="kernel", tid=7),  # overlaps the last step's second kernel by 10
               event("Memcpy DtoH", 2700, 50, cat="gpu_memcpy", tid=7),
               event("aten::to", 2900, 100)]  # the ending: the host waits for the copy
    totals = trace_steps.generation_totals(events)
    assert totals["host_us"] == 3000 + 300 and totals["before_first_call_us"] == 300
    assert totals["after_last_call_us"] == 3000 - (2000 + 500)
    # kernels: 40 + 30 per step, the third step's second kernel (2120-2150) overlapped by 2100-2160
    assert totals["device_busy_us"] == 70 + 70 + 40 + 60 + 50
    assert totals["device_idle_us"] == 3300 - 290 and totals["device_first_work_after_us"] == 60 + 300
    # before the first call: aten::empty at -300 for 20 us, then nothing until step 0 at 0
    assert totals["longest_setup_gaps"] == [{"at_us": 20, "gap_us": 280, "before": "the first model call"}]
    early = [event("kernel", -1000, 500, cat="kernel", tid=7)]  # queued before the host's span: clipped away
    assert trace_steps.generation_totals(early + events)["device_busy_us"] == totals["device_busy_us"]


def test_the_longest_setup_gaps_name_the_operator_that_ends_them():
    events = [event("aten::a", 0, 10), event("aten::randn", 5010, 10), event("aten::b", 5030, 10),
              event("aten::empty", 7040, 5), event("aten::c", 7050, 5), event("step 0 computing", 7055, 100,
                                                                                 cat="user_annotation")]
    gaps = trace_steps.setup_gaps(events, 0, 7055, count=2)
    assert gaps == [{"at_us": 10, "gap_us": 5000, "before": "aten::randn"},
                    {"at_us": 5040, "gap_us": 2000, "before": "aten::empty"}]


def test_command_line_writes_the_summaries(tmp_path, capsys):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": synthetic_trace()}))
    out, run = tmp_path / "summary.json", tmp_path / "run.json"
    run.write_text(json.dumps({"device": "NVIDIA H200", "date": "2026-12-05", "settings": {"batch": 1}, "rows": []}))
    trace_steps.main([str(path), "--run", str(run), "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["run"] == {"file": "run.json", "device": "NVIDIA H200", "versions": None, "date": "2026-12-05",
                              "settings": {"batch": 1}}
    assert written["summaries"][0]["by_kind"]["reusing"]["call_us"] == 200
    assert "reusing" in capsys.readouterr().out

