"""How far a cached generation's peak memory rises above an uncached one's, against what the cache
holds between generations (issue 20's item 4): ``WanPipeline`` with guidance run as two model calls a
step (two call slots, each keeping its own), eagerly, compiled whole and (``--modes regional``) with each
block compiled on its own, for whole blocks (``block``,
one chain), layers (``attn1`` + ``ffn``), whole blocks with ``forecast="linear"`` (the last two
residuals), and cache-dit's F1B0 on the same steps (``--methods``), set up the way its docs say
(``enable_cache`` before ``torch.compile``).

Each configuration starts from a reset dynamo and runs two generations (the first compiles), then the
measured one, whose peak and what was held as it began are counted above what was allocated before
the configuration was set up (``AllocationCount``), so whatever a method holds between generations
counts, whichever library it is: on a GPU from the CUDA allocator's statistics, on the CPU from the
profiler's memory events (torch's CPU allocator keeps no peak).
Figures are in bytes and in hidden states (one call's ``batch x tokens x dim``), the unit the cache
keeps in: whole blocks keep one per call slot, layers one per layer and slot. The cache holds its
peak's worth by design; a rise above it is memory the cache's bookkeeping costs (the test of that is
``tests/test_kept_memory.py``).

    python benchmarks/peak_memory.py --out docs/benchmarks          # CPU, narrow Wan, inductor: about 5 min on 2 cores
    python benchmarks/peak_memory.py --size tiny --backend eager --out /tmp/pm   # small, dynamo only: 20 s (the test)
    # a GPU: the Wan 2.1 1.3B shape on a short video (33 frames of 480x832), bf16; one H100: 8.3 min (before cache-dit)
    python3 benchmarks/peak_memory.py --device cuda --size full --out "$OUT/peak"
    # the shape of issue 20's Wan batch-8 cells (81 frames, batch 8), compiled, against cache-dit in one process
    python3 benchmarks/peak_memory.py --device cuda --size wan-b8 --modes compile regional eager --methods uncached blocks cache-dit --out "$OUT/peak-b8"

Writes peak-memory-wan-DEVICE.json and .png into --out after every configuration: a run cut short (a
GPU lease running out) keeps what it measured, ``"complete": false``. Modes run in the order given.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pipeline_methods import cache_dit_enabled
from pipeline_workloads import WAN_2_1_T2V_1_3B, WAN_TINY, wan_pipeline

import smoothcache
from smoothcache.bench import compile_blocks, uncompile_blocks
from smoothcache.files import atomic_write_text

if TYPE_CHECKING:
    from typing_extensions import Self

# the Wan block's proportions (ffn 5.8x the width, 2 heads here), narrow enough for a CPU
WAN_NARROW = {**WAN_TINY, "num_attention_heads": 2, "attention_head_dim": 48, "ffn_dim": 560, "num_layers": 3}
MODES = ("eager", "compile", "regional")  # regional: each block compiled on its own
SIZES: dict[str, dict[str, Any]] = {  # model config, batch, frames, height, width, steps; tiny still peaks in the blocks
    "tiny": {"config": WAN_NARROW, "batch": 1, "frames": 5, "height": 128, "width": 128, "steps": 6},
    "narrow": {"config": WAN_NARROW, "batch": 2, "frames": 9, "height": 512, "width": 512, "steps": 10},
    "full": {"config": WAN_2_1_T2V_1_3B, "batch": 1, "frames": 33, "height": 480, "width": 832, "steps": 10},
    # issue 20's Wan batch-8 cells (32,760 tokens); four steps still compute twice in a row, reuse, and compute after it
    "wan-b8": {"config": WAN_2_1_T2V_1_3B, "batch": 8, "frames": 81, "height": 480, "width": 832, "steps": 4},
}
Forecast = Literal["none", "linear"]
SMOOTHCACHE: dict[str, tuple[tuple[str, ...], Forecast]] = {  # schedule keys, forecast
    "blocks": (("block",), "none"), "layers": (("attn1", "ffn"), "none"), "blocks-forecast": (("block",), "linear"),
}
CACHE_DIT = "cache-dit"
METHODS = ("uncached", *SMOOTHCACHE, CACHE_DIT)
TEXT_TOKENS, GUIDANCE = 8, 5.0
MEASURED = "peak_memory: the measured generation"  # the profiler's label for its window


def step_mask(steps: int) -> list[int]:
    """The first two and the last step compute, between them every other one: reuses after a
    keeping step and computing steps in a row both occur."""
    return [1 if s < 2 or s == steps - 1 or s % 2 == 1 else 0 for s in range(steps)]


def build(size: dict[str, Any], device: str) -> tuple[Any, Callable[[], Any], int]:
    """The pipeline, one generation as a call, and the bytes of one call's hidden states."""
    config, dtype = size["config"], torch.bfloat16 if device == "cuda" else torch.float32
    pipe = wan_pipeline(config, device, dtype)
    g = torch.Generator().manual_seed(100)
    prompt, negative = (torch.randn(size["batch"], TEXT_TOKENS, config["text_dim"], generator=g).to(device, dtype)
                        for _ in range(2))

    def generate() -> Any:
        return pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, height=size["height"], width=size["width"],
                    num_frames=size["frames"], num_inference_steps=size["steps"], guidance_scale=GUIDANCE,
                    generator=torch.Generator().manual_seed(1), output_type="latent").frames

    _, patch_h, patch_w = config["patch_size"]
    tokens = ((size["frames"] - 1) // 4 + 1) * (size["height"] // 8 // patch_h) * (size["width"] // 8 // patch_w)
    width = config["num_attention_heads"] * config["attention_head_dim"]
    return pipe, generate, size["batch"] * tokens * width * torch.finfo(dtype).bits // 8


class AllocationCount:
    """Bytes allocated since it was entered: as one window inside it began (``held``) and at the
    window's peak (``peak``), so that whatever a configuration set up inside it holds between
    generations counts, whichever library it is.

    On a GPU from the CUDA allocator's statistics: the net change, so memory allocated before entry
    and freed inside (the scheduler's state from the configuration before) counts against it. On the
    CPU from the profiler's memory events (torch's CPU allocator keeps no peak), which see only memory
    allocated while the profiler runs: it runs from entry on, and counts what was allocated since and
    is still live, so such frees count nothing. Only figures above uncached's compare across devices."""

    def __init__(self, device: str) -> None:
        self.device, self.peak, self.held, self.baseline = device, 0, 0, 0
        self.profiler: Any = None

    def __enter__(self) -> Self:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            self.baseline = torch.cuda.memory_allocated()
        else:
            from torch.profiler import ProfilerActivity, profile

            self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.profiler.__enter__()
        return self

    @contextlib.contextmanager
    def window(self) -> Iterator[None]:
        """The measured stretch, with Python's cycle collector off: tensors in reference cycles
        (pytest's captured log records hold some) are freed before it, not at a moment that varies."""
        from torch.profiler import record_function

        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.held = torch.cuda.memory_allocated() - self.baseline
            torch.cuda.reset_peak_memory_stats()
        collecting = gc.isenabled()
        gc.disable()
        try:
            with record_function(MEASURED) if self.device == "cpu" else contextlib.nullcontext():
                yield
        finally:
            if collecting:
                gc.enable()
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.baseline

    def __exit__(self, *exc: object) -> None:
        if self.profiler is None:
            return
        self.profiler.__exit__(*exc)
        if exc[0] is not None:
            return
        with tempfile.TemporaryDirectory() as folder:
            trace = Path(folder) / "trace.json"
            self.profiler.export_chrome_trace(str(trace))
            events = json.loads(trace.read_text())["traceEvents"]
        window = next(e for e in events if e.get("name") == MEASURED and e.get("ph") == "X")
        self.peak, self.held = allocated_since_start(events, window["ts"], window["ts"] + window["dur"])


def allocated_since_start(events: list[dict[str, Any]], start: float, end: float) -> tuple[int, int]:
    """From a profile's memory events: the bytes allocated since it began and still live, at their
    peak between ``start`` and ``end`` and as ``start`` came. Counted by address, not from the
    profiler's own running total: that total and its table of sizes carry over from earlier profiles,
    so a free of memory an earlier profile saw allocated would count against this one."""
    memory = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0),
                    key=lambda e: e["ts"])  # the CPU's (device type 0); a stable sort: ties keep their order
    live: dict[int, int] = {}
    total, peak, held = 0, 0, None
    for event in memory:
        ts, size, address = event["ts"], event["args"]["Bytes"], event["args"]["Addr"]
        if held is None and ts >= start:
            held = peak = total
        if size > 0:
            live[address] = size
            total += size
        elif address in live:
            total -= live.pop(address)
        if start <= ts <= end:
            peak = max(peak, total)
    if held is None:  # nothing happened from the start on
        held = peak = total
    return peak, held


@contextlib.contextmanager
def configured(pipe: Any, original: Any, mode: str, method: str, mask: list[int], steps: int,
               backend: str) -> Iterator[Any]:
    """The pipeline with ``method`` in place, compiled whole or by blocks where ``mode`` says, each library its
    documented way round (cache-dit's ``enable_cache`` before ``torch.compile``; smoothcache's
    ``cache`` after it); smoothcache's handle, or None. Undone afterwards from a reset dynamo."""
    torch._dynamo.reset()
    try:
        with contextlib.ExitStack() as undo:
            if method == CACHE_DIT:
                undo.enter_context(cache_dit_enabled(pipe, steps, mask))
            undo.callback(setattr, pipe, "transformer", original)
            pipe.transformer = torch.compile(original, backend=backend) if mode == "compile" else original
            if mode == "regional":  # diffusers' regional compilation: each block compiled in place
                undo.callback(uncompile_blocks, original)
                compile_blocks(original, backend=backend)
            handle = None
            if method in SMOOTHCACHE:
                keys, forecast = SMOOTHCACHE[method]
                handle = smoothcache.cache(pipe, smoothcache.Schedule({key: mask for key in keys}), forecast=forecast)
                undo.callback(handle.disable)
            yield handle
    finally:
        torch._dynamo.reset()


def measure(generate: Callable[[], Any], setup: contextlib.AbstractContextManager[Any], device: str) -> dict[str, Any]:
    """Peak, held and kept bytes of one configuration's third generation (the first compiles), counted
    from before it was set up. ``kept_bytes`` is what smoothcache's handle says it keeps (None for
    cache-dit and uncached)."""
    started = time.perf_counter()
    with AllocationCount(device) as count, setup as handle:
        generate()
        generate()
        with count.window():
            generate()
        kept = sum(handle.state.kept_bytes().values()) if handle is not None else None
    return {"peak_bytes": count.peak, "held_bytes": count.held, "kept_bytes": kept,
            "seconds": time.perf_counter() - started}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--size", choices=tuple(SIZES), help="default: narrow on the CPU, full on a GPU")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled rows (eager: dynamo only)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="compile: the transformer compiled whole; regional: each block compiled on its own "
                             "(diffusers' compile_repeated_blocks)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="uncached is always measured: the rises are above it")
    args = parser.parse_args(argv)
    args.methods = ["uncached", *(m for m in METHODS[1:] if m in args.methods)]
    if CACHE_DIT in args.methods and importlib.util.find_spec("cache_dit") is None:
        parser.error("cache-dit is not installed: pip install cache-dit==1.5.3, or leave it out of --methods")
    return args


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")  # read when cache_dit is first imported: no table per generation
    size_name = args.size or ("full" if args.device == "cuda" else "narrow")
    size = SIZES[size_name]
    if args.device == "cpu":
        torch.set_num_threads(1)  # per-thread scratch buffers (attention, matmuls) would vary the peak from run to run
    pipe, generate, hidden = build(size, args.device)
    mask, original = step_mask(size["steps"]), pipe.transformer
    # every configuration then starts alike: the scheduler holds a generation's last outputs, and the
    # GPU's libraries have their workspaces (else counted against the first configuration alone)
    generate()
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.machine()})"
    versions = {"torch": torch.__version__, "diffusers": importlib.metadata.version("diffusers"),
                "smoothcache": smoothcache.__version__}
    if CACHE_DIT in args.methods:
        versions[CACHE_DIT] = importlib.metadata.version("cache-dit")
    rows: list[dict[str, Any]] = []
    result = {
        "benchmark": "peak_memory.py", "device": device, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "versions": versions,
        "settings": {"size": size_name, **{k: v for k, v in size.items() if k != "config"}, "transformer": size["config"],
                     "guidance_scale": GUIDANCE, "text_tokens": TEXT_TOKENS, "mask": mask, "backend": args.backend,
                     "modes": args.modes, "methods": args.methods,
                     "hidden_state_bytes": hidden, "cache-dit": "DBCacheConfig(Fn_compute_blocks=1, "
                     "Bn_compute_blocks=0, steps_computation_mask=mask, steps_computation_policy='static'), "
                     "enable_cache(pipe) before torch.compile", "measured": "the third generation of each "
                     "configuration: its peak allocated and what was allocated as it began (held), above what was "
                     "allocated before the configuration was set up"},
        "complete": False,  # written after every row: a run cut short keeps what it measured
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"peak-memory-wan-{args.device}.json"
    for mode in args.modes:
        for method in args.methods:  # uncached first: the rows after it are counted above it
            setup = configured(pipe, original, mode, method, mask, size["steps"], args.backend)
            row = {"mode": mode, "method": method, **measure(generate, setup, args.device)}
            if method == "uncached":
                row["kept_bytes"] = 0
            rows.append(above_uncached(row, next(r for r in rows + [row] if r["mode"] == mode and r["method"] == "uncached"),
                                       hidden))
            print(line(row, hidden), flush=True)
            result["complete"] = len(rows) == len(args.modes) * len(args.methods)
            atomic_write_text(path, json.dumps(result, indent=1) + "\n")
            if any(r["method"] != "uncached" for r in rows):
                plot(result, path.with_suffix(".png"))
    print(path)
    return path


def above_uncached(row: dict[str, Any], uncached: dict[str, Any], hidden: int) -> dict[str, Any]:
    """``row`` with its peak and held bytes above its mode's uncached row, also in hidden states."""
    row["rise_over_uncached_bytes"] = row["peak_bytes"] - uncached["peak_bytes"]
    row["rise_in_hidden_states"] = row["rise_over_uncached_bytes"] / hidden
    # on the CPU every configuration holds the scheduler's state (UniPC's last outputs) anew: above uncached, not
    row["held_over_uncached_bytes"] = row["held_bytes"] - uncached["held_bytes"]
    row["held_in_hidden_states"] = row["held_over_uncached_bytes"] / hidden
    row["kept_in_hidden_states"] = None if row["kept_bytes"] is None else row["kept_bytes"] / hidden
    return row


def line(row: dict[str, Any], hidden: int) -> str:
    kept = "" if row["kept_bytes"] is None else f", kept {row['kept_bytes'] / hidden:5.2f}"
    return (f"{row['mode']:8} {row['method']:15} peak {row['peak_bytes'] / hidden:6.2f} hidden states, "
            f"held {row['held_bytes'] / hidden:5.2f}{kept} ({row['seconds']:.0f} s)")


def plot(result: dict[str, Any], path: Path) -> None:
    """Top: per mode, each cached method's peak rise above uncached beside what it held as the measured
    generation began (for smoothcache, what it keeps). Bottom: every method's peak per mode, uncached
    included, since modes differ in the model's own activations as much as caches differ in what they
    keep. Both in hidden states."""
    from smoothcache.plots import pyplot, save_figure

    plt = pyplot()
    cached = [r for r in result["rows"] if r["method"] != "uncached"]
    modes = list(dict.fromkeys(r["mode"] for r in result["rows"]))
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    fig, (ax, peaks) = plt.subplots(2, 1, figsize=(max(6.0, 1.6 + 0.95 * len(cached)), 7.0))
    rise_and_held(ax, cached)
    peaks_by_mode(peaks, result, modes, methods)
    settings = result["settings"]
    fig.suptitle(f"WanPipeline ({settings['size']}), {result['device']}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def rise_and_held(ax: Any, cached: list[dict[str, Any]]) -> None:
    """Each cached row's peak rise above its mode's uncached row beside what it held as the measured
    generation began: the two match where the cache's bookkeeping costs nothing."""
    positions = range(len(cached))
    rise = ax.bar([p - 0.2 for p in positions], [r["rise_in_hidden_states"] for r in cached], 0.4,
                  label="peak above uncached")
    held = ax.bar([p + 0.2 for p in positions], [r["held_in_hidden_states"] for r in cached], 0.4,
                  label="held between generations, above uncached")
    for bars in (rise, held):
        ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=1)
    ax.set_xticks(list(positions), [f"{r['mode']}\n{r['method']}" for r in cached], fontsize=8)
    ax.set_title("peak rise vs held, above the same mode's uncached", fontsize=9)
    top = max(max(r["rise_in_hidden_states"], r["held_in_hidden_states"]) for r in cached)
    low = min(0.0, *(min(r["rise_in_hidden_states"], r["held_in_hidden_states"]) for r in cached))
    smallest = min((r["held_in_hidden_states"] for r in cached if r["held_in_hidden_states"] > 0), default=top)
    logarithmic = top > 20 * smallest  # layers keep one per layer: a linear axis would flatten the blocks' bars
    if logarithmic:
        ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylabel("hidden states (batch x tokens x dim)" + (",\nlogarithmic above 1" if logarithmic else ""),
                  fontsize=8)
    ax.set_ylim(low, 12 * top if logarithmic else 1.3 * top if top > 0 else 1.0)  # room for the bar labels
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.legend(fontsize=7, loc="upper left")


def peaks_by_mode(ax: Any, result: dict[str, Any], modes: list[str], methods: list[str]) -> None:
    """Every row's peak above what was allocated before its configuration was set up, grouped by mode:
    which mode and method gives the lowest peak."""
    hidden = result["settings"]["hidden_state_bytes"]
    width = 0.8 / len(methods)
    for index, method in enumerate(methods):
        rows = {r["mode"]: r for r in result["rows"] if r["method"] == method}
        xs = [m + (index - (len(methods) - 1) / 2) * width for m, mode in enumerate(modes) if mode in rows]
        bars = ax.bar(xs, [rows[mode]["peak_bytes"] / hidden for mode in modes if mode in rows], width, label=method)
        ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=1)
    ax.set_xticks(range(len(modes)), modes, fontsize=8)
    ax.set_title("peak per mode", fontsize=9)
    ax.set_ylabel("hidden states above the configuration's start", fontsize=8)
    ax.set_ylim(0, 1.2 * max(r["peak_bytes"] / hidden for r in result["rows"]))
    ax.legend(fontsize=7, loc="upper left", ncols=len(methods))


if __name__ == "__main__":
    main()
