"""Does a schedule pay off on this pipeline? Uncached against cached latency, the ideal speedup
from the FLOPs skipped, and memory, with a warning when caching gains little or nothing."""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from .profile import CalibrationProfile
from .recorder import calibration
from .runtime import cache
from .runtime.compile import compiled_anywhere, cuda_graphs_anywhere
from .schedule import Schedule

__all__ = ["BenchResult", "benchmark_schedule", "compile_blocks", "count_host_syncs", "diagnose", "timed", "unchecked",
           "uncompile_blocks"]

logger = logging.getLogger(__name__)


@dataclass
class BenchResult:
    """Medians over the timed repeats (interleaved, or one run after the other with step graphs);
    ``efficiency`` is measured over ideal speedup."""

    uncached_seconds: float
    cached_seconds: float
    speedup: float
    ideal_speedup: float | None
    efficiency: float | None
    compute_fraction: float
    peak_memory_mib: dict[str, float] | None
    host_syncs: int | None = None  # times one cached generation made the host wait for the GPU (CUDA only)
    warnings: list[str] = field(default_factory=list)
    timing: str = "interleaved"  # or "sequential" (step graphs): plain uncached runs, uncached ones, then cached ones
    step_graphs: dict[str, Any] | None = None  # uncached and cached: the step graphs' counts, where replayed
    skip_guards: bool = False  # timed under torch.compiler.set_stance(skip_guard_eval_unsafe=True)
    # with step graphs: the plain pipeline, uncached and without them (what a user runs before either),
    # and the cached replayed pipeline's speedup over it: the graphs' gain and the cache's together
    plain_uncached_seconds: float | None = None
    speedup_over_plain: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def diagnose(
    speedup: float,
    ideal: float | None,
    host_syncs: int | None = None,
    steps: int | None = None,
    caches_layers: bool = False,
    cuda_graphs: bool | None = None,
) -> list[str]:
    """What to tell a user whose cache gains little: nothing at all, or far less than its ideal;
    whether the pipeline's loop makes the host wait for the GPU every step (``host_syncs`` per
    generation of ``steps`` steps), which costs a reusing step, being short, a large share of its
    time; for a schedule of layers (``caches_layers``) far from its ideal, that whole blocks
    skip the work a reused layer leaves behind; and, on a GPU run without CUDA graphs
    (``cuda_graphs=False``; ``None``: not known), that launching the kernels a reusing step still
    runs is what costs, which CUDA graphs remove."""
    found = []
    reach = speedup / ideal if ideal else None  # of the ideal speedup
    if speedup < 1.05:
        compile_hint = "torch.compile with CUDA graphs (mode='reduce-overhead')" if cuda_graphs is False else "torch.compile"
        found.append(
            f"caching gains nothing here ({speedup:.2f}x): the time goes to work the schedule does not skip "
            f"(kernel launches, the layers left uncached, the VAE or the scheduler); try a larger batch, "
            f"{compile_hint}, or more cached layers"
        )
    elif reach is not None and reach < 0.6:
        found.append(
            f"caching reaches {reach:.0%} of its ideal {ideal:.2f}x: most of the skipped FLOPs "
            "do not turn into time here"
        )
    if host_syncs and steps and host_syncs >= steps and not (reach is not None and reach >= 0.95):
        found.append(
            f"the pipeline made the host wait for the GPU {host_syncs} times in one generation of {steps} steps "
            "(a blocking copy of a timestep to the device, or the scheduler reading a device tensor on the host): "
            "after each wait the GPU idles while the host prepares the next step, which costs a step that reuses "
            "a large share of its time; where the loop copies host timesteps to the device (DiTPipeline), "
            "smoothcache.prefetch_timesteps(pipe) answers those copies from one made per generation, outputs "
            "unchanged (smoothcache bench --prefetch-timesteps measures it); in a loop of your own, keep the "
            "scheduler's timesteps on the host and copy them to the device once per generation"
        )
    if steps is not None and steps <= CalibrationProfile.FEW_STEPS:
        found.append(
            f"with {steps} steps each reuse replaces a large share of the denoising: caching rarely pays on few-step "
            "samplers; check the quality of this schedule (smoothcache tune --max-error) before relying on its speed"
        )
    far_from_ideal = reach is not None and speedup >= 1.05 and reach < 0.8  # gains, but well short
    if caches_layers and far_from_ideal:
        found.append(
            "a reused layer leaves its block's norms, modulation and gates to run; where the model supports it, "
            "caching whole blocks (a schedule of the 'block' component) skips them too"
        )
    if cuda_graphs is False and far_from_ideal:
        found.append(
            "without CUDA graphs the host launches every kernel, and the work a reusing step still runs costs "
            "its launch time, not GPU time; compile the transformer with CUDA graphs (torch.compile(transformer, "
            "mode='reduce-overhead'); smoothcache bench --compile model-cudagraphs)"
        )
    return found


def _counted(run: Callable[[], Any], bar: Any) -> Callable[[], Any]:
    def counted() -> Any:
        result = run()
        bar.update()
        return result

    return counted


def count_host_syncs(run: Callable[[], Any], device: torch.device) -> int | None:
    """How often one ``run()`` made the host wait for the GPU, counted by torch's CUDA sync debug
    mode, which warns at every synchronizing call; ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    mode = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(mode)
    syncs = 0
    for w in caught:
        if "synchronizing" in str(w.message):
            syncs += 1
        else:  # the run's own warnings, passed on
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return syncs


def _marking_steps(run: Callable[[], Any]) -> Callable[[], Any]:
    """``run`` preceded by ``torch.compiler.cudagraph_mark_step_begin()``. Once the cache has marked
    a step, cudagraph trees start a new generation only at marks, for every compiled function of
    the process: an uncached run after a cached one would otherwise extend the cached run's
    generation, and record anew while timed."""

    def marked() -> Any:
        torch.compiler.cudagraph_mark_step_begin()
        return run()

    return marked


def _eagerly() -> contextlib.AbstractContextManager[Any]:
    """Compiled code run as plain PyTorch (FLOP counting and recording hooks need the modules to run),
    where torch has ``torch.compiler.set_stance`` (2.6+)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return contextlib.nullcontext() if set_stance is None else set_stance("force_eager")


def unchecked(run: Callable[[], Any]) -> Callable[[], Any]:
    """``run`` with dynamo checking only the guards that tell its compiled graphs apart (after a
    warm-up that compiled every graph it needs; docs/speed.md says when that is safe)."""

    def fast() -> Any:
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
            return run()

    return fast


def _attach_step_graphs(pipe: Any) -> Any:
    """``smoothcache.step_graphs(pipe)`` (a seam: tests on the CPU attach a stand-in capture); a
    pipeline it cannot take is a ValueError, as the command line reports it."""
    from .graph_replay import step_graphs

    try:
        return step_graphs(pipe)
    except TypeError as error:
        if not str(error).startswith("step_graphs "):  # not one of its refusals: a bug, shown as it is
            raise
        raise ValueError(f"--step-graphs cannot replay this pipeline: {error}") from error


# step graphs per timed phase: a plain generation (compiling where compiled), the capture, one replay;
# also the warm-up of the plain uncached phase before them (three where eager needs one: a little time, no harm)
STEP_GRAPHS_WARMUP = 3
# the fewest warm-up runs that leave nothing to compile or record while timed: under torch.compile the
# first run compiles every compute/reuse pattern; torch's cudagraph trees warm a function up in its
# first run, record it in its second and replay it from its third
FEWEST_WARMUPS_COMPILED = 1
FEWEST_WARMUPS_CUDA_GRAPHS = 2
# the same per ``smoothcache bench --compile`` setting (eager needs one: the first run allocates and loads kernels)
FEWEST_WARMUPS = {"none": 1, "model": FEWEST_WARMUPS_COMPILED, "model-cudagraphs": FEWEST_WARMUPS_CUDA_GRAPHS,
                  "regional": FEWEST_WARMUPS_COMPILED}


def compile_blocks(transformer: torch.nn.Module, **compile_kwargs: Any) -> str:
    """Regional compile, each block compiled in place (``Module.compile``): diffusers'
    ``compile_repeated_blocks`` where the model names its repeated blocks (Flux, Wan), else each of
    its ``transformer_blocks`` (DiT names none). Returns how, in words; undone by :func:`uncompile_blocks`."""
    shown = "".join(f", {k}={v!r}" for k, v in compile_kwargs.items()).removeprefix(", ")
    if getattr(transformer, "_repeated_blocks", None):
        transformer.compile_repeated_blocks(**compile_kwargs)  # type: ignore[operator]
        return f"pipe.transformer.compile_repeated_blocks({shown})"
    blocks = getattr(transformer, "transformer_blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise TypeError(f"{type(transformer).__name__} names no repeated blocks (_repeated_blocks) and has no "
                         "transformer_blocks to compile one by one: compile it whole instead")
    for block in blocks:
        block.compile(**compile_kwargs)
    return f"block.compile({shown}) for each block of pipe.transformer.transformer_blocks"


def uncompile_blocks(model: torch.nn.Module) -> None:
    """Undo :func:`compile_blocks`: ``Module.compile`` keeps the compiled call on each module, and
    torch has no call that takes it away."""
    for module in model.modules():
        module._compiled_call_impl = None


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """``fn()`` and its wall-clock seconds, with the GPU synchronised on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def benchmark_schedule(
    pipe: Any,
    schedule: Schedule,
    run: Callable[[], Any],
    *,
    repeats: int = 3,
    calls_per_step: int | None = None,
    measure_ideal: bool = True,
    forecast: Literal["none", "linear"] = "none",
    warmup: int = 1,
    cuda_graphs: bool | None = None,
    progress: bool = False,
    step_graphs: bool = False,
    skip_guards: bool = False,
) -> BenchResult:
    """Time ``run()`` (one pipeline call) uncached and cached on ``schedule``, interleaved, after
    ``warmup`` runs of each (under torch.compile the cached patterns compile there, not while
    timed; with CUDA graphs, cudagraph trees record on a function's second run and replay from its
    third, so warm up at least twice: ``FEWEST_WARMUPS_CUDA_GRAPHS``).

    ``step_graphs`` replays each step's model call from a CUDA graph (:func:`smoothcache.step_graphs`)
    in both: the uncached runs, then the cached ones, each after a plain generation, the capture
    and one replay (attaching or removing the cache drops the graphs, so the two cannot take turns).
    Before them the plain pipeline is timed too, uncached and without step graphs: ``speedup`` is
    the cache's gain with graphs on both sides, ``speedup_over_plain`` the user's gain from both.
    ``skip_guards`` times compiled runs under ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``,
    after the warm-up.

    The ideal speedup comes from one extra calibration pass that counts FLOPs per layer, run
    eagerly where the model is compiled; on CUDA one more cached run, untimed, counts the host's
    waits for the GPU (:func:`count_host_syncs`). ``forecast`` is passed to :func:`~smoothcache.cache`;
    ``cuda_graphs`` says whether ``run`` replays CUDA graphs, for the diagnosis (``None``: read from how
    the model was compiled).
    ``progress`` shows a bar over the pipeline calls (all of them: ideal, warm-up, timed, syncs).
    """
    if repeats < 1 or warmup < 1:
        raise ValueError(f"repeats and warmup must be >= 1, got {repeats} and {warmup}")
    model = getattr(pipe, "transformer", pipe)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    compiled = compiled_anywhere(model)
    if compiled:  # each run its own CUDA graph generation, uncached ones too
        run = _marking_steps(run)
        cuda_graphs = cuda_graphs_anywhere(model) if cuda_graphs is None else cuda_graphs
    if step_graphs:
        warmup, cuda_graphs = STEP_GRAPHS_WARMUP, True
    phases = 3 if step_graphs else 2  # with step graphs, the plain uncached pipeline first
    calls = int(measure_ideal) + phases * (warmup + repeats) + int(device.type == "cuda")  # the last: counting syncs
    bar = tqdm(total=calls, desc="bench", unit="call", disable=not progress)
    run = _counted(run, bar)
    ideal = None
    handle = cache(pipe, schedule, calls_per_step=calls_per_step, forecast=forecast)
    handle.disable()
    if measure_ideal:  # the FLOPs of the layers the schedule caches (whole blocks included)
        components = list(dict.fromkeys(layer.layer_type for layer in handle.layers))
        with _eagerly(), calibration(
            pipe, components=components, lookahead=1, steps=schedule.num_steps, calls_per_step=calls_per_step
        ) as rec:
            run()
        ideal = rec.profile.estimated_speedup(schedule)
    timing = _timed_one_after_the_other if step_graphs else _timed_in_turn
    times, peaks, host_syncs, graph_counts = timing(
        pipe, handle, run, device, warmup, repeats, skip_guards=skip_guards and compiled)
    bar.close()
    uncached, cached = (statistics.median(times[n]) for n in ("uncached", "cached"))
    speedup = uncached / cached
    efficiency = speedup / ideal if ideal else None
    plain = statistics.median(times["plain"]) if "plain" in times else None
    result = BenchResult(
        uncached, cached, speedup, ideal, efficiency, schedule.compute_fraction(), peaks or None, host_syncs,
        timing="sequential" if step_graphs else "interleaved", step_graphs=graph_counts, skip_guards=skip_guards and compiled,
        plain_uncached_seconds=plain, speedup_over_plain=None if plain is None else plain / cached,
    )
    caches_layers = any(layer.streams is None for layer in handle.layers)
    graphs = cuda_graphs if device.type == "cuda" else None  # launches cost the host on a GPU only
    result.warnings = diagnose(speedup, ideal, host_syncs, schedule.num_steps, caches_layers, graphs)
    for warning in result.warnings:
        logger.warning(warning)
    return result


# per run kind: seconds of each timed run; peak GPU MiB; the host's waits in one cached run; step graphs' counts
Timings = tuple[dict[str, list[float]], dict[str, float], int | None, dict[str, Any] | None]


def _timed_in_turn(pipe: Any, handle: Any, run: Callable[[], Any], device: torch.device, warmup: int, repeats: int,
                   *, skip_guards: bool) -> Timings:
    """Uncached and cached runs taking turns (drift in the host's speed hits both alike), after
    ``warmup`` runs of each; then the host's waits in one cached run."""
    times: dict[str, list[float]] = {"uncached": [], "cached": []}
    peaks: dict[str, float] = {}
    for _ in range(warmup):
        run()
    handle.enable()
    try:
        for _ in range(warmup):
            run()
    finally:
        handle.disable()
    run = unchecked(run) if skip_guards else run
    for _ in range(repeats):
        for name in ("uncached", "cached"):
            if name == "cached":
                handle.enable()
            try:
                times[name].append(_timed_with_peak(run, device, peaks, name))
            finally:
                handle.disable()
    handle.enable()
    try:
        host_syncs = count_host_syncs(run, device)
    finally:
        handle.disable()
    return times, peaks, host_syncs, None


def _timed_one_after_the_other(pipe: Any, handle: Any, run: Callable[[], Any], device: torch.device, warmup: int,
                               repeats: int, *, skip_guards: bool) -> Timings:
    """With step graphs: the plain pipeline's runs (uncached, no graphs), then the uncached runs and
    the cached ones, each with step graphs attached afresh and warmed up through one replay; the
    host's waits counted in one more cached replay."""
    times: dict[str, list[float]] = {"plain": [], "uncached": [], "cached": []}
    peaks: dict[str, float] = {}
    counts: dict[str, Any] = {}
    host_syncs = None
    for _ in range(warmup):
        run()
    timed_plain = unchecked(run) if skip_guards else run
    for _ in range(repeats):
        times["plain"].append(_timed_with_peak(timed_plain, device, peaks, "plain"))
    for name in ("uncached", "cached"):
        try:
            if name == "cached":
                handle.enable()
            graphs = _attach_step_graphs(pipe)
            try:
                for _ in range(warmup):
                    run()
                timed_run = unchecked(run) if skip_guards else run
                for _ in range(repeats):
                    times[name].append(_timed_with_peak(timed_run, device, peaks, name))
                if name == "cached":
                    host_syncs = count_host_syncs(timed_run, device)
                counts[name] = asdict(graphs.stats)
            finally:
                graphs.disable()
        finally:
            handle.disable()
    return times, peaks, host_syncs, counts


def _timed_with_peak(run: Callable[[], Any], device: torch.device, peaks: dict[str, float], name: str) -> float:
    """One timed ``run()``; its peak GPU memory joins ``peaks[name]``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _, seconds = timed(run, device)
    if device.type == "cuda":
        peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**20)
    return seconds
