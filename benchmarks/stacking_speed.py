"""Speed and memory of a cached pipeline with what users stack on it: quantized weights, kept outputs
stored elsewhere, calibration (issue 21, its GPU half; tests/test_combinations_cuda.py checks that
each combination is correct).

The pipeline is pipeline_speed.py's ``dit``: diffusers' ``DiTPipeline`` with a DiT-XL/2-256
transformer of random weights (``gpu_bench.dit_xl``: latency does not depend on them), a stand-in
VAE whose ``decode`` keeps the latents it is handed (the output compared), fp16, 50 DDIM steps,
batch 8 (16 rows with classifier-free guidance), a user's ordinary ``pipe(...)`` call. The cached
schedules compute the same 24 of 50 steps (``gpu_bench.ALPHA_018``): ``smoothcache blocks``
(``Schedule({"block": mask})``) and ``smoothcache layers`` (``attn1`` + ``ff``), so every
comparison is at equal compute.

Parts (``--parts``):

- ``a``, speed with quantized weights. A cell per ``--compile`` setting (``eager``; ``compile``, the
  transformer compiled whole in the default mode, cached after compiling as docs/speed.md says;
  torchao needs compile to be fast) and each of ``--weights`` (``fp16`` unquantized; ``int8``,
  torchao ``Int8WeightOnlyConfig`` on the fp16 model; ``float8``, torchao ``Float8WeightOnlyConfig``
  on the model in bf16, which needs compute capability 8.9). A cell's three methods, the uncached
  call and both schedules, are timed in turn on one pipeline (``"timing": "interleaved"``, as
  ``smoothcache.bench`` times uncached against cached): the host's speed drifts over minutes
  (under torch.compile at batch 8 one H100 process timed fp16 uncached at 626 ms and, minutes
  later, the blocks schedule at 720 ms, 0.87x; another 1080 ms and 565 ms), so rows timed one
  after another do not compare. In a cell the transformer is compiled once
  (pipeline_methods.configured: dynamo reset before and after the cell), then each schedule attached
  with ``smoothcache.cache(pipe, schedule)`` and at once disabled. One handle may hold a model at
  a time (a second one enabled is refused, ``ModelInUseError``) but disabled handles coexist, so
  each cached generation runs between its handle's ``enable()`` and ``disable()``: that puts the
  same caching forwards back, which the graphs compiled in the warm-up accept (no recompiles
  while timed: ``recompiles_while_timed``, counted per method), and ``disable()`` releases the
  kept outputs, so no method's memory stays behind for the next. Then
  ``pipeline_settings.WARMUP[compile]`` rounds of uncached, blocks, layers (each method compiles its
  own graphs there: ``graphs_compiled_in_warmup``), then ``--repeats`` timed rounds, one
  generation of each per round, each round starting one method later than the one before (so no
  method always runs first or last) (enabling and disabling a cache is not timed). Each method keeps its own row: ``ms`` the median of its
  ``runs_ms``, ``runs_at_s`` when each of them started (seconds after the cell's first timed
  generation), ``peak_mib`` the largest of its timed generations' peaks (the counter reset before
  each), its kept bytes after its last generation, its output's difference from the uncached one.
  Each row's ``speedup`` is against the uncached row of the same cell; a quantized row's
  ``speedup_ratio`` is its speedup over the unquantized model's (same compile setting and
  schedule). The issue's target: ``speedup_ratio`` >= 0.95. A second estimate pairs each round's
  generations: ``speedup_per_round`` (the round's uncached time over the method's),
  ``speedup_paired`` (their median) and ``speedup_ratio_paired``. torchao's ``set_inductor_config`` is
  off, so every row compiles with the same inductor settings. A method that fails (attaching,
  warming up or in a turn) records its error and leaves the rounds; one that fails the whole cell
  (building, quantizing, compiling) records it in each of the cell's rows. Cells run compile
  setting by compile setting, the weights in the order given within each (fp16 first by default,
  so that the quantized cells' ratios have their reference), so that a run cut short by
  ``--max-minutes`` keeps whole cells.
- ``b``, the memory option, eager, fp16: the uncached call, then each schedule with kept outputs
  as they are (``default``), in float8 (``cache(kept_dtype=torch.float8_e4m3fn)``: a quarter of
  fp32's bytes, half of fp16's; bf16 would save nothing on an fp16 model) and on the host
  (``kept_device="cpu"``). Each row: time and speedup, peak GPU memory over the timed runs
  (``torch.cuda.max_memory_allocated``) and above the uncached peak, ``handle.state.kept_bytes()``
  by device, and the output's difference from the uncached one and from the default-kept one
  (max abs, and PSNR in dB on the latents, peak = the reference latents' range; None where equal).
  ``device_kept_fraction`` is what the option keeps on the GPU over what the default keeps; the
  issue's target is <= 0.5 at equal compute. Note: a module list cached whole on one key is reused
  as one chain with one residual per stream (runtime/streams.py ``BlockChain``), so the blocks
  schedule holds little to begin with; both are reported.
- ``c``, calibration's peak memory: one ``pipe(...)`` call inside ``smoothcache.calibration(pipe,
  components=..., lookahead=k)`` for the layers (``attn1``, ``ff``) and the blocks, per
  ``--lookaheads``, against an uncached call measured the same way; ``extra_peak_mib`` is the peak
  above the uncached call's. (The issue: Flux at lookahead 3 peaked at about 48 GB.)

Each row is written to the JSON as soon as it is measured (atomically; part a's rows when their
cell is), and printed as one line; no row or cell starts past ``--max-minutes`` (the last may run a
little over), and a cell not started records each of its rows as ``skipped``. A row records
``skipped`` (and why) or ``error`` where it could not run. ``--tiny`` swaps in pipeline_speed's
tiny DiT (10 steps, batch 2; float32 and dynamo without inductor on the CPU) to check the code
paths: it measures nothing. On the CPU, float8 weights and kept outputs on the host are skipped and
calibration's peak memory is not measured; the rows say so.

    python benchmarks/stacking_speed.py --tiny --device cpu --out /tmp/stack   # CPU smoke: ~25 s on 2 cores

On one H200 (a command may run 10 minutes at most; estimates from DiT-XL/2 fp16 b8 at ~0.5 s a
compiled and ~2 s an eager generation, torchao's eager weights 1.5-3x slower, 30-90 s of compiling
per compiled configuration, and ~0.5 min to import and build). torchao is not in the machine's
image: put a wheel for its torch (torchao 0.18 needs torch >= 2.11) in .whl-bench first and carry
.whl-bench; without it the torchao rows say ``skipped``::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl-bench/*.whl &&
    export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
    # every part eagerly (all GPU paths but inductor's): ~4-5 min
    python3 benchmarks/stacking_speed.py --parts b c a --compile eager --out "$OUT/eager"
    # part a compiled, one command per weights (one cell each): ~3-5 min each
    python3 benchmarks/stacking_speed.py --parts a --compile compile --weights fp16 --out "$OUT/c-fp16"
    python3 benchmarks/stacking_speed.py --parts a --compile compile --weights int8 --out "$OUT/c-int8"
    python3 benchmarks/stacking_speed.py --parts a --compile compile --weights float8 --out "$OUT/c-float8"

Then ``--merge $OUT/eager/stacking-speed.json $OUT/c-fp16/... $OUT/c-int8/... --out DIR`` (no GPU) puts the
parts into one JSON and plot, each cell's rows from one file (the last that has it: part a's cells
are (weights, compile setting); parts b and c are one cell each), so every speedup is within one
process (part a's: within one cell's interleaved rounds); quantized speedups are then compared with
the unquantized ones of the other file.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bench
import pipeline_measures
import pipeline_methods
import pipeline_results
import pipeline_settings
import pipeline_speed
import pipeline_workloads
from pipeline_settings import BLOCKS, LAYERS, UNCACHED, Config
from pipeline_workloads import Workload

import smoothcache
from smoothcache.files import atomic_write_text

PARTS = ("a", "b", "c")
WEIGHTS = ("fp16", "int8", "float8")
COMPILES = ("eager", "compile")
KEPT_FORMS: dict[str, dict[str, Any]] = {
    "default": {},
    "float8_e4m3fn": {"kept_dtype": torch.float8_e4m3fn},
    "cpu": {"kept_device": "cpu"},
}
CALIBRATED = {"layers": ["attn1", "ff"], "blocks": ["block"]}
CALIBRATION = "calibration"  # part c's method: one pipe(...) call inside smoothcache.calibration
TARGET_RATIO = 0.95  # quantized speedup within 5% of the unquantized one
TARGET_FRACTION = 0.5  # the memory option keeps at most half on the GPU
RESULT_NAME = "stacking-speed.json"


# ---- the pipelines ------------------------------------------------------------------------------
def torchao_skip_reason() -> str | None:
    try:
        import torchao  # noqa: F401
    except ImportError as error:
        return f"torchao does not import ({error}): put a wheel for this torch in .whl-bench"
    return None


def weights_skip_reason(weights: str, device: torch.device) -> str | None:
    """Why ``weights`` cannot run on ``device``, or None."""
    if weights == "fp16":
        return None
    if weights == "float8" and (device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9)):
        return "torchao's float8 weights need a CUDA GPU of compute capability 8.9 or later"
    return torchao_skip_reason()


def quantized(work: Workload, weights: str) -> Workload:
    """``work`` with its transformer's weights as ``weights`` says (float8: on the model in bf16).
    torchao's inductor settings are left alone, so unquantized rows compile with the same ones."""
    if weights == "fp16":
        return work
    from torchao.quantization import (
        Float8WeightOnlyConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    transformer = work.pipe.transformer
    if weights == "float8":
        transformer.to(torch.bfloat16)
    config = Int8WeightOnlyConfig if weights == "int8" else Float8WeightOnlyConfig
    quantize_(transformer, config(set_inductor_config=False))
    return work


@dataclass
class Pipelines:
    """One DiT pipeline per weights, built when first asked for and released when a part needs it no more."""

    tiny: bool
    device: str
    built: dict[str, Workload] = field(default_factory=dict)

    def get(self, weights: str) -> Workload:
        if weights not in self.built:
            self.built[weights] = quantized(pipeline_workloads.dit_workload(self.tiny, self.device), weights)
        return self.built[weights]

    def keep_only(self, weights: Sequence[str]) -> None:
        for name in set(self.built) - set(weights):
            del self.built[name]
        release_memory()


def release_memory() -> None:
    """Drop what the last row left on the GPU, so that the next row's peak is its own (on the CPU
    nothing is measured, and a full collection costs a tenth of a second)."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def dtype_of(work: Workload) -> str:
    return str(pipeline_methods.unwrapped(work.pipe.transformer).dtype)


def compute_device(work: Workload) -> str:
    """Where the transformer computes, as ``kept_bytes()`` names devices ("cuda:0")."""
    return str(next(pipeline_methods.unwrapped(work.pipe.transformer).parameters()).device)


# ---- measuring ------------------------------------------------------------------------------------
def generation(work: Workload, batch: int, device: str) -> Callable[[], torch.Tensor]:
    """A user's ``pipe(...)`` call from a fixed seed; returns the latents it decoded."""
    return lambda: work.generate(batch, torch.Generator(device).manual_seed(0))


def measure(generate: Callable[[], torch.Tensor], warmup: int, repeats: int) -> tuple[dict[str, Any], torch.Tensor]:
    """Warm-up generations, then ``repeats`` timed ones (gpu_bench.time_runs: peak memory over the
    timed ones); the row's timings, and the last output on the host."""
    last: list[torch.Tensor] = []

    def run() -> None:
        last[:] = [generate()]

    allocated_before = pipeline_measures.allocated_mib()
    before = gpu_bench.dynamo_counts()
    start = time.perf_counter()
    gpu_bench.time_runs(run, 0, warmup)
    warmup_s = time.perf_counter() - start
    after_warmup = gpu_bench.dynamo_counts()
    times, _ = gpu_bench.time_runs(run, repeats, 0)
    end = gpu_bench.dynamo_counts()
    return {
        "ms": 1000 * statistics.median(times), "runs_ms": [1000 * t for t in times], "warmup_s": warmup_s,
        "warmup_generations": warmup, "peak_mib": pipeline_measures.peaks_mib()[0], "allocated_before_mib": allocated_before,
        "graphs_compiled_in_warmup": after_warmup["graphs"] - before["graphs"],
        "recompiles_while_timed": end["frames"] - after_warmup["frames"],
    }, last[0].detach().float().cpu()


def kept_fields(handle: Any, device: str) -> dict[str, Any]:
    """What the cache holds after a generation: bytes by device, and MiB on the computing device and elsewhere."""
    kept = handle.state.kept_bytes()
    on_device = kept.get(device, 0)
    return {"kept_bytes_by_device": kept, "kept_device_mib": on_device / 2**20,
            "kept_elsewhere_mib": (sum(kept.values()) - on_device) / 2**20}


def psnr_db(output: torch.Tensor, reference: torch.Tensor) -> float | None:
    """PSNR of ``output`` against ``reference``, peak = the reference's range; None where they are equal."""
    mse = float(((output - reference) ** 2).mean())
    if mse == 0.0:
        return None
    return 10 * math.log10(float(reference.max() - reference.min()) ** 2 / mse)


def differences(output: torch.Tensor, reference: torch.Tensor | None, against: str) -> dict[str, float | None]:
    if reference is None:
        return {}
    return {f"max_abs_diff_vs_{against}": float((output - reference).abs().max()), f"psnr_db_vs_{against}": psnr_db(output, reference)}


# ---- the parts ------------------------------------------------------------------------------------
@dataclass
class Run:
    """One run of the script: its settings, pipelines, rows so far, and the result file kept current."""

    args: argparse.Namespace
    pipelines: Pipelines
    started: float = field(default_factory=time.perf_counter)
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return torch.device(self.args.device)

    def over_budget(self) -> bool:
        return (time.perf_counter() - self.started) / 60 > self.args.max_minutes

    def add(self, row: dict[str, Any]) -> None:
        """Keep ``row``, rewrite the result file, print the row's line."""
        self.rows.append(row)
        result = self.result()
        atomic_write_text(self.args.out / RESULT_NAME, json.dumps(result, indent=1) + "\n")
        print(row_line(result["rows"][-1]), flush=True)

    def budget_skip(self) -> str | None:
        return f"over the time budget (--max-minutes {self.args.max_minutes})" if self.over_budget() else None

    def row(self, fields: dict[str, Any], measure_row: Callable[[], dict[str, Any]], skip: str | None = None) -> None:
        """Measure one row unless it is skipped (or over the budget); an error is recorded, not raised."""
        skip = skip or self.budget_skip()
        if skip is not None:
            self.add({**fields, "skipped": skip})
            return
        try:
            fields = {**fields, **measure_row()}
        except Exception as error:  # noqa: BLE001 - a configuration that cannot run here is recorded, not fatal
            fields = {**fields, **pipeline_measures.error_fields(error)}
        release_memory()
        self.add(fields)

    def cell(self, rows: list[dict[str, Any]], measure_cell: Callable[[], list[dict[str, Any]]], skip: str | None = None) -> None:
        """Measure a cell's rows together (``measure_cell`` gives each row's measured fields, in order)
        unless the cell is skipped (or over the budget): a cell starts whole or not at all. An error
        that ends the whole cell is recorded in each of its rows, not raised."""
        skip = skip or self.budget_skip()
        if skip is not None:
            for fields in rows:
                self.add({**fields, "skipped": skip})
            return
        try:
            measured = measure_cell()
        except Exception as error:  # noqa: BLE001 - a cell that cannot run here is recorded, not fatal
            measured = [pipeline_measures.error_fields(error)] * len(rows)
        release_memory()
        for fields, found in zip(rows, measured, strict=True):
            self.add({**fields, **found})

    def result(self) -> dict[str, Any]:
        return {
            "benchmark": "stacking_speed: quantized weights, kept-output memory options and calibration memory "
                         "on a cached DiTPipeline (issue 21)",
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
            "versions": versions(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "settings": settings(self.args),
            "minutes": (time.perf_counter() - self.started) / 60,
            "rows": with_derived(self.rows),
        }


CELL_METHODS = (UNCACHED, BLOCKS, LAYERS)  # part a's order within each round of a cell


def part_a(run: Run) -> None:
    """Speed with quantized weights: per compile setting, a cell per weights, its methods timed in turn."""
    args = run.args
    skips = {w: weights_skip_reason(w, run.device) for w in args.weights}
    run.pipelines.keep_only([w for w in args.weights if skips[w] is None])
    for compile_mode in args.compile:
        for weights in args.weights:
            rows = [{"part": "a", "weights": weights, "compile": compile_mode, "method": method, "batch": args.batch,
                     "timing": "interleaved"} for method in CELL_METHODS]
            run.cell(rows, lambda w=weights, c=compile_mode: timed_cell(run, w, c), skips[weights])


@dataclass
class MethodTurns:
    """One method of a part-a cell: its cache handle (None: uncached), switched on for its own
    generations only, and what those generations measured."""

    method: str
    handle: Any = None
    how: str = "pipe(...)"
    warmup_s: float = 0.0
    graphs_compiled: int = 0  # in its warm-up generations
    recompiles: int = 0  # in its timed generations
    allocated_before: float | None = None  # MiB, before its first generation (its cache attached)
    generations: int = 0
    times: list[float] = field(default_factory=list)
    starts: list[float] = field(default_factory=list)  # seconds after the cell's first timed generation
    peak: float | None = None
    kept: dict[str, Any] = field(default_factory=dict)
    output: torch.Tensor | None = None  # the last timed generation's
    error: dict[str, str] | None = None  # set: the method has left the rounds


def take_turn(turn: MethodTurns, generate: Callable[[], torch.Tensor], timed_since: float | None, device: str) -> None:
    """One generation of ``turn``'s method, its cache enabled for this generation only. Timed (where
    ``timed_since`` is the cell's first timed start) it adds its time, start, peak memory (the counter
    reset first), recompiles, output and kept bytes (by ``device``, where the model computes); else
    its seconds and graphs to the warm-up."""
    with turn.handle if turn.handle is not None else contextlib.nullcontext():  # a handle enables for its block
        if turn.generations == 0:
            turn.allocated_before = pipeline_measures.allocated_mib()
        before = gpu_bench.dynamo_counts()
        pipeline_measures.sync()
        if timed_since is not None:
            pipeline_measures.reset_peaks()
        output, start, seconds = pipeline_measures.clocked(generate)
        after = gpu_bench.dynamo_counts()
        turn.generations += 1
        if timed_since is None:
            turn.warmup_s += seconds
            turn.graphs_compiled += after["graphs"] - before["graphs"]
            return
        turn.times.append(seconds)
        turn.starts.append(start - timed_since)
        peak = pipeline_measures.peaks_mib()[0]
        if peak is not None:
            turn.peak = max(turn.peak or 0.0, peak)
        turn.recompiles += after["frames"] - before["frames"]
        turn.output = output.detach()
        if turn.handle is not None:  # what it holds after a generation: disable() releases it
            turn.kept = kept_fields(turn.handle, device)


def timed_cell(run: Run, weights: str, compile_mode: str) -> list[dict[str, Any]]:
    """One part-a cell: the pipeline compiled once, each schedule's cache attached (compiled first,
    then cached, as pipeline_speed does it) and disabled, then warm-up and timed rounds of
    uncached, blocks, layers in turn; a row per method, in ``CELL_METHODS``' order."""
    args = run.args
    work = run.pipelines.get(weights)
    generate = generation(work, args.batch, args.device)
    warmup = pipeline_settings.WARMUP[compile_mode]
    turns = [MethodTurns(method) for method in CELL_METHODS]
    with pipeline_methods.configured(work, Config(compile_mode, args.batch, False, UNCACHED), args.backend) as attached:
        try:
            for turn in turns:
                turn.how = "; then ".join(attached.how) or turn.how
                if turn.method != UNCACHED:
                    attach_switched(turn, work, attached.how)
            device = compute_device(work)
            timed_since: list[float] = []  # the first timed turn's start; empty: warming up

            def take(turn: MethodTurns, round_index: int) -> None:
                if round_index >= warmup and not timed_since:
                    timed_since.append(time.perf_counter())
                take_turn(turn, generate, timed_since[0] if timed_since else None, device)

            def left_on() -> list[str]:  # a disable() that failed: every later turn would run with its cache
                return [f"the cache of {t.method}" for t in turns if t.handle is not None and t.handle.enabled]

            pipeline_speed.take_rounds(turns, warmup + args.repeats, take, left_on)
        finally:
            for turn in turns:
                if turn.handle is not None:
                    try:
                        turn.handle.disable()  # already disabled unless a turn failed to
                    except Exception as error:  # noqa: BLE001 - recorded in the rows
                        attached.teardown_errors.append(f"{turn.method}: {type(error).__name__}: {error}"[:500])
    uncached = turns[0].output.float().cpu() if turns[0].error is None and turns[0].output is not None else None
    rows = [turn_row(turn, warmup, dtype_of(work), uncached) for turn in turns]
    return [{**row, "teardown_errors": attached.teardown_errors} if attached.teardown_errors else row for row in rows]


def attach_switched(turn: MethodTurns, work: Workload, compiled: list[str]) -> None:
    """``turn``'s schedule cached on the (compiled) pipeline, switched off until its turns
    (``pipeline_methods.cached_switched_off``). An error is the method's, not the cell's."""
    turn.how = "; then ".join([*compiled, pipeline_methods.smoothcache_how(work, turn.method), pipeline_methods.SWITCHED_HOW])
    try:
        turn.handle = pipeline_methods.cached_switched_off(work, turn.method)
    except Exception as error:  # noqa: BLE001 - this method's row records it; the others go on
        turn.error = pipeline_measures.error_fields(error)


def turn_row(turn: MethodTurns, warmup: int, dtype: str, uncached: torch.Tensor | None) -> dict[str, Any]:
    """A method's row from its turns: its median and runs (and when each started), warm-up, peak
    memory, graphs and recompiles, what its cache kept, its output's difference from uncached."""
    if turn.error is not None:
        return {"how": turn.how, **turn.error}
    assert turn.output is not None  # every round gave one, and there is at least one timed round
    output = turn.output.float().cpu()
    return {
        "ms": 1000 * statistics.median(turn.times), "runs_ms": [1000 * t for t in turn.times],
        "runs_at_s": turn.starts, "warmup_s": turn.warmup_s, "warmup_generations": warmup, "peak_mib": turn.peak,
        "allocated_before_mib": turn.allocated_before, "graphs_compiled_in_warmup": turn.graphs_compiled,
        "recompiles_while_timed": turn.recompiles, "how": turn.how, "dtype": dtype, **turn.kept,
        **differences(output, uncached, "uncached"),
    }


def part_b(run: Run) -> None:
    """The memory option: each schedule with its kept outputs as they are, in float8 and on the host (eager, fp16)."""
    run.pipelines.keep_only(["fp16"])
    outputs: dict[str, torch.Tensor] = {}  # "uncached", and per schedule its default-kept output
    run.row({"part": "b", "method": UNCACHED, "batch": run.args.batch}, lambda: kept_form_row(run, UNCACHED, None, outputs))
    for method in (LAYERS, BLOCKS):
        for kept in KEPT_FORMS:
            skip = None
            if kept == "cpu" and run.device.type == "cpu":
                skip = "the model computes on the CPU: kept_device='cpu' moves nothing"
            fields = {"part": "b", "method": method, "kept": kept, "batch": run.args.batch}
            run.row(fields, lambda m=method, k=kept: kept_form_row(run, m, k, outputs), skip)


def kept_form_row(run: Run, method: str, kept: str | None, outputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One part-b row, eager: uncached, or cached with the kept outputs in ``KEPT_FORMS[kept]``."""
    work = run.pipelines.get("fp16")
    generate = generation(work, run.args.batch, run.args.device)
    if method == UNCACHED:
        row, outputs[UNCACHED] = measure(generate, 1, run.args.repeats)
        return {**row, "dtype": dtype_of(work)}
    with smoothcache.cache(work.pipe, pipeline_methods.schedule_of(work, method), **KEPT_FORMS[kept]) as handle:
        row, output = measure(generate, 1, run.args.repeats)
        row.update(kept_fields(handle, compute_device(work)), dtype=dtype_of(work))
    if kept == "default":
        outputs[method] = output
    return {**row, **differences(output, outputs.get(UNCACHED), "uncached"), **differences(output, outputs.get(method), "default_kept")}


def part_c(run: Run) -> None:
    """Calibration's peak memory per lookahead, for the layers and the blocks, against an uncached call."""
    run.pipelines.keep_only(["fp16"])
    generate = generation(run.pipelines.get("fp16"), run.args.batch, run.args.device)
    if not run.over_budget():
        generate()  # first-call allocations (kernels, cuBLAS workspaces) out of the first row's peak
    run.row({"part": "c", "method": UNCACHED, "batch": run.args.batch}, lambda: calibration_row(run, generate, None, 0))
    for name, components in CALIBRATED.items():
        for lookahead in run.args.lookaheads:
            fields = {"part": "c", "method": CALIBRATION, "components": name, "lookahead": lookahead, "batch": run.args.batch}
            run.row(fields, lambda c=components, k=lookahead: calibration_row(run, generate, c, k))
        # the bound on calibration's history: every 2nd layer per generation, two generations
        lookahead = max(run.args.lookaheads)
        fields = {"part": "c", "method": CALIBRATION, "components": name, "lookahead": lookahead, "batch": run.args.batch,
                  "layer_groups": 2}
        run.row(fields, lambda c=components, k=lookahead: calibration_row(run, generate, c, k, layer_groups=2))


def calibration_row(
    run: Run, generate: Callable[[], Any], components: list[str] | None, lookahead: int, layer_groups: int = 1
) -> dict[str, Any]:
    """``layer_groups`` ``pipe(...)`` calls (one uncalibrated where ``components`` is None), calibrated
    with ``components``: seconds, peak GPU memory, and the history calibration held."""
    pipeline_measures.sync()
    pipeline_measures.reset_peaks()
    allocated_before, start = pipeline_measures.allocated_mib(), time.perf_counter()
    profile_layers = history_mib = None
    if components is None:
        generate()
    else:
        pipe = run.pipelines.get("fp16").pipe
        with smoothcache.calibration(pipe, components=components, lookahead=lookahead, layer_groups=layer_groups) as recorder:
            for _ in range(layer_groups):
                generate()
        profile_layers = len(recorder.profile.layers)
        history_mib = recorder.profile.metadata.get("history_peak_mib")
    pipeline_measures.sync()
    row = {"seconds": time.perf_counter() - start, "peak_mib": pipeline_measures.peaks_mib()[0], "allocated_before_mib": allocated_before,
           "profile_layers": profile_layers, "history_peak_mib": history_mib, "generations": layer_groups}
    if not torch.cuda.is_available():
        row["peak_not_measured"] = "no CUDA GPU: peak memory is measured on the GPU only"
    return row


PART_RUNNERS: dict[str, Callable[[Run], None]] = {"a": part_a, "b": part_b, "c": part_c}


# ---- derived numbers ---------------------------------------------------------------------------------
def with_derived(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``rows`` with what compares them: part a's speedups and quantized/unquantized ratios,
    part b's speedups and kept-memory fractions, part c's peak above the uncached call."""
    rows = [dict(row) for row in rows]
    measured = [r for r in rows if "error" not in r and "skipped" not in r]

    def find(**match: Any) -> dict[str, Any]:
        return next((r for r in measured if all(r.get(k) == v for k, v in match.items())), {})

    for row in measured:
        if row["part"] == "a":
            base = find(part="a", weights=row["weights"], compile=row["compile"], method=UNCACHED)
            if base:
                row["speedup"] = base["ms"] / row["ms"]
                row.update(pipeline_results.paired_speedups(base, row))
        elif row["part"] == "b":
            base = find(part="b", method=UNCACHED)
            if base:
                row["speedup"] = base["ms"] / row["ms"]
                if row["peak_mib"] is not None:
                    row["peak_above_uncached_mib"] = row["peak_mib"] - base["peak_mib"]
            default = find(part="b", method=row["method"], kept="default")
            if row["method"] != UNCACHED and default.get("kept_device_mib"):
                row["device_kept_fraction"] = row["kept_device_mib"] / default["kept_device_mib"]
                row["halves_cache_memory"] = row["device_kept_fraction"] <= TARGET_FRACTION
        elif row["part"] == "c" and row["method"] == CALIBRATION:
            base = find(part="c", method=UNCACHED)
            if base and row["peak_mib"] is not None:
                row["extra_peak_mib"] = row["peak_mib"] - base["peak_mib"]
    for row in measured:  # after every speedup is known
        if row["part"] == "a" and row["weights"] != "fp16" and row["method"] != UNCACHED and "speedup" in row:
            reference = find(part="a", weights="fp16", compile=row["compile"], method=row["method"])
            if "speedup" in reference:
                row["unquantized_speedup"] = reference["speedup"]
                row["speedup_ratio"] = row["speedup"] / reference["speedup"]
                row["within_5_percent"] = row["speedup_ratio"] >= TARGET_RATIO
                if "speedup_paired" in row and "speedup_paired" in reference:
                    row["speedup_ratio_paired"] = row["speedup_paired"] / reference["speedup_paired"]
    return rows


def row_line(row: dict[str, Any]) -> str:
    head = f"{row['part']} " + " ".join(str(row[k]) for k in ("weights", "compile", "method", "kept", "components", "lookahead") if row.get(k) is not None)
    if "skipped" in row or "error" in row:
        return f"{head}: {row.get('skipped') or 'FAILED ' + row['error'][:300]}"
    if row["part"] == "c":
        peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f} MiB"
        return f"{head}: {row['seconds']:.2f} s, peak {peak}" + (f" (+{row['extra_peak_mib']:.0f})" if "extra_peak_mib" in row else "")
    line = f"{head}: {row['ms']:.1f} ms"
    line += f", {row['speedup']:.2f}x" if "speedup" in row else ""
    line += f" (ratio to unquantized {row['speedup_ratio']:.3f})" if "speedup_ratio" in row else ""
    line += f", round by round {row['speedup_paired']:.2f}x" if "speedup_paired" in row else ""
    line += f", kept {row['kept_device_mib']:.1f} MiB on device" if "kept_device_mib" in row else ""
    line += f" + {row['kept_elsewhere_mib']:.1f} MiB on the host" if row.get("kept_elsewhere_mib") else ""
    line += f" (fraction {row['device_kept_fraction']:.2f})" if "device_kept_fraction" in row else ""
    psnr = row.get("psnr_db_vs_uncached")
    line += f", PSNR {psnr:.1f} dB" if psnr is not None else ""
    return line + (f", {row['recompiles_while_timed']} recompiles timed" if row.get("compile") == "compile" else "")


# ---- the result file and plot -------------------------------------------------------------------------
def versions() -> dict[str, str | None]:
    found = pipeline_speed.versions()
    try:
        found["torchao"] = metadata.version("torchao")
    except metadata.PackageNotFoundError:
        found["torchao"] = None
    return found


def settings(args: argparse.Namespace) -> dict[str, Any]:
    mask = pipeline_workloads.DIT_TINY_MASK if args.tiny else gpu_bench.ALPHA_018
    return {
        "pipeline": "DiTPipeline", "transformer": "DiT-XL/2-256 shape" + (" (tiny)" if args.tiny else ""),
        "tiny": args.tiny, "steps": len(mask), "mask": list(mask), "computed_steps": sum(mask), "batch": args.batch,
        "parts": args.parts, "weights": args.weights, "compile": args.compile, "lookaheads": args.lookaheads,
        "repeats": args.repeats, "warmup": {c: pipeline_settings.WARMUP[c] for c in COMPILES}, "backend": args.backend,
        "max_minutes": args.max_minutes,
        "torchao": "quantize_(transformer, Int8WeightOnlyConfig / Float8WeightOnlyConfig(set_inductor_config=False))",
        "compile_how": "pipe.transformer = torch.compile(pipe.transformer), then smoothcache.cache(pipe, schedule) per "
                       "schedule, each disabled at once; torch._dynamo.reset() before and after each part-a cell",
        "timing": {"a": f"interleaved: per (compile, weights) cell, warm-up rounds (the warmup above), then {args.repeats} "
                        f"timed rounds, each one generation of {', '.join(CELL_METHODS)} in turn, each round starting one method later; a cached method's handle "
                        "enabled for its own generations only (handle.enable() before, handle.disable() after); ms = "
                        "median of a method's runs_ms; peak_mib = max over its timed generations, the counter reset "
                        "before each",
                   "b": "one configuration after another, each its warm-up generation then its repeats",
                   "c": "one configuration after another (peak memory, not time)"},
        "part_b": "eager, fp16; kept forms: " + ", ".join(f"{k}: cache(..., {v})" for k, v in KEPT_FORMS.items()),
        "psnr": "on the latents, peak = the reference's range; None where equal",
        "targets": {"speedup_ratio": f">= {TARGET_RATIO}", "device_kept_fraction": f"<= {TARGET_FRACTION}"},
    }


def plot(result: dict[str, Any], path: Path) -> Path:
    """Three panels: part a's speedups per (weights, compile), part b's GPU-kept MiB per option,
    part c's calibration peak per lookahead."""
    from smoothcache.plots import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    plot_speedups(axes[0], result["rows"])
    plot_kept(axes[1], result["rows"])
    plot_calibration(axes[2], result["rows"])
    fig.suptitle(f"DiTPipeline, {result['settings']['transformer']}, {result['settings']['steps']} steps "
                 f"({result['settings']['computed_steps']} computed), batch {result['settings']['batch']}, {result['device']}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_speedups(ax: Any, rows: list[dict[str, Any]]) -> None:
    rows = [r for r in rows if r["part"] == "a" and r["method"] != UNCACHED and "speedup" in r]
    cells = list(dict.fromkeys((r["weights"], r["compile"]) for r in rows))
    for offset, method in ((-0.2, BLOCKS), (0.2, LAYERS)):
        values = [next((r["speedup"] for r in rows if (r["weights"], r["compile"], r["method"]) == (*cell, method)), 0) for cell in cells]
        ax.bar([i + offset for i in range(len(cells))], values, 0.4, label=method)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(cells)), [f"{w}\n{c}" for w, c in cells], fontsize=7)
    ax.set_ylabel("speedup over uncached (same weights, compile)")
    ax.set_title("a. quantized weights", fontsize=9)
    ax.legend(fontsize=7)


def plot_kept(ax: Any, rows: list[dict[str, Any]]) -> None:
    rows = [r for r in rows if r["part"] == "b" and r["method"] != UNCACHED and "kept_device_mib" in r]
    ax.bar(range(len(rows)), [r["kept_device_mib"] for r in rows], color="tab:cyan")
    for i, r in enumerate(rows):
        psnr = r.get("psnr_db_vs_uncached")
        ax.text(i, r["kept_device_mib"], f"{r.get('speedup', 0):.2f}x\n{'-' if psnr is None else f'{psnr:.0f} dB'}", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(rows)), [f"{r['method'].split()[-1]}\n{r['kept']}" for r in rows], fontsize=7)
    ax.set_ylabel("kept on the GPU (MiB)")
    ax.set_title("b. kept outputs (speedup, PSNR vs uncached)", fontsize=9)


def plot_calibration(ax: Any, rows: list[dict[str, Any]]) -> None:
    rows = [r for r in rows if r["part"] == "c" and "seconds" in r]
    uncached = next((r for r in rows if r["method"] == UNCACHED), None)
    measure_key, label = ("peak_mib", "peak GPU memory (MiB)") if rows and rows[0]["peak_mib"] is not None else ("seconds", "seconds (no GPU)")
    for name in CALIBRATED:
        mine = [r for r in rows if r.get("components") == name]
        ax.plot([r["lookahead"] for r in mine], [r[measure_key] for r in mine], marker="o", label=name)
    if uncached is not None:
        ax.axhline(uncached[measure_key], color="grey", linewidth=0.8, label="uncached")
    ax.set_xlabel("lookahead")
    ax.set_ylabel(label)
    ax.set_title("c. calibration", fontsize=9)
    ax.legend(fontsize=7)


def merge(files: Sequence[Path]) -> dict[str, Any]:
    """Parts of a run (one command each) as one result: each cell's rows from the last file that has
    it (part a: (weights, compile); parts b and c: one cell each), so no speedup mixes processes."""
    results = [json.loads(f.read_text()) for f in files]

    def cell(row: dict[str, Any]) -> tuple[Any, ...]:
        return (row["part"], row.get("weights"), row.get("compile")) if row["part"] == "a" else (row["part"],)

    owner = {cell(row): i for i, r in enumerate(results) for row in r["rows"]}
    rows = [row for i, r in enumerate(results) for row in r["rows"] if owner[cell(row)] == i]
    merged = dict(results[-1])
    merged["rows"] = with_derived(rows)
    merged["merged_from"] = [{"file": str(f), "date": r["date"], "device": r["device"], "settings": r["settings"]}
                             for f, r in zip(files, results, strict=True)]
    return merged


# ---- the command line -----------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="run in the order given")
    parser.add_argument("--weights", nargs="+", choices=WEIGHTS, default=list(WEIGHTS), help="part a's weights")
    parser.add_argument("--compile", nargs="+", choices=COMPILES, default=list(COMPILES), help="part a's compile settings, in order")
    parser.add_argument("--lookaheads", type=int, nargs="+", default=[1, 2, 3], help="part c's calibration lookaheads")
    parser.add_argument("--batch", type=int, help="images per call (default 8; 2 with --tiny)")
    parser.add_argument("--repeats", type=int, help="timed generations per configuration (default 3; 1 with --tiny)")
    parser.add_argument("--max-minutes", type=float, default=7.5, help="start no configuration after this many minutes")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help=f"writes OUT/{RESULT_NAME} and its .png")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", help="torch.compile backend (default: inductor; eager on the CPU, dynamo only)")
    parser.add_argument("--tiny", action="store_true", help="the tiny DiT, 10 steps: checks the code paths, measures nothing")
    parser.add_argument("--merge", type=Path, nargs="+", help="only merge these result files (parts of one run) into --out, and plot")
    args = parser.parse_args(argv)
    args.batch = args.batch or (2 if args.tiny else 8)
    args.repeats = args.repeats or (1 if args.tiny else 3)
    if args.backend is None:
        args.backend = "eager" if torch.device(args.device).type == "cpu" else "inductor"
    return args


def run_parts(args: argparse.Namespace) -> Path:
    """Every part asked for, in order; returns the result file's path."""
    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(1)  # tiny models on a shared CPU: thread pools cost more than they give
    # each cached configuration adds graphs (one per compute/reuse pattern): keep them compiled
    torch._dynamo.config.recompile_limit = 1024
    torch._dynamo.config.accumulated_recompile_limit = 8192
    run = Run(args, Pipelines(args.tiny, args.device))
    for part in args.parts:
        PART_RUNNERS[part](run)
    run.pipelines.keep_only([])
    path = args.out / RESULT_NAME
    try:
        plot(json.loads(path.read_text()), path.with_suffix(".png"))
    except ImportError as error:  # the GPU machine may lack matplotlib: the JSON is the result
        print(f"no plot ({error}); draw it where matplotlib is: --merge {path} --out DIR", flush=True)
    return path


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.merge:
        path = args.out / RESULT_NAME
        atomic_write_text(path, json.dumps(merge(args.merge), indent=1) + "\n")
        plot(json.loads(path.read_text()), path.with_suffix(".png"))
    else:
        path = run_parts(args)
    print(path, flush=True)
    return path


if __name__ == "__main__":
    main()
