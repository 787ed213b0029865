"""How far a cached generation's peak memory rises above an uncached one's, against what the cache
keeps (issue 20's item 4): ``WanPipeline`` with guidance run as two model calls a step (two call
slots, each keeping its own), eagerly and compiled whole, for whole blocks (``block``, one chain),
layers (``attn1`` + ``ffn``) and whole blocks with ``forecast="linear"`` (the last two residuals).

A generation's peak is measured from what was allocated before it, plus what the cache still held
from the generation before (it releases that at the first model call): on a GPU by
``torch.cuda.max_memory_allocated``, on the CPU from the profiler's memory events (torch's CPU
allocator keeps no peak). Each configuration starts from a reset dynamo, runs two generations
(the first compiles), then the measured one (on the CPU, profiled from the generation before). Figures are in bytes and in hidden states (one call's
``batch x tokens x dim``), the unit the cache keeps in: whole blocks keep one per call slot, layers
one per layer and slot. The cache holds its peak's worth by design; a rise above it is memory the
cache's bookkeeping costs (the test of that is ``tests/test_kept_memory.py``).

    python benchmarks/peak_memory.py --out docs/benchmarks          # CPU, narrow Wan, inductor: about 3 min on 2 cores
    python benchmarks/peak_memory.py --size tiny --backend eager --out /tmp/pm   # small, dynamo only: 15 s (the test)
    # a GPU: the Wan 2.1 1.3B shape on a short video (33 frames of 480x832), bf16; one H100: 8.3 min
    python3 benchmarks/peak_memory.py --device cuda --size full --out "$OUT/peak"

Writes peak-memory-wan-DEVICE.json and .png into --out.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pipeline_workloads import WAN_2_1_T2V_1_3B, WAN_TINY, wan_pipeline

import smoothcache
from smoothcache.files import atomic_write_text

# the Wan block's proportions (ffn 5.8x the width, 2 heads here), narrow enough for a CPU
WAN_NARROW = {**WAN_TINY, "num_attention_heads": 2, "attention_head_dim": 48, "ffn_dim": 560, "num_layers": 3}
SIZES: dict[str, dict[str, Any]] = {  # model config, batch, frames, height, width, steps; tiny still peaks in the blocks
    "tiny": {"config": WAN_NARROW, "batch": 1, "frames": 5, "height": 128, "width": 128, "steps": 6},
    "narrow": {"config": WAN_NARROW, "batch": 2, "frames": 9, "height": 512, "width": 512, "steps": 10},
    "full": {"config": WAN_2_1_T2V_1_3B, "batch": 1, "frames": 33, "height": 480, "width": 832, "steps": 10},
}
Forecast = Literal["none", "linear"]
METHODS: dict[str, tuple[tuple[str, ...], Forecast]] = {  # schedule keys, forecast
    "uncached": ((), "none"), "blocks": (("block",), "none"), "layers": (("attn1", "ffn"), "none"),
    "blocks-forecast": (("block",), "linear"),
}
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


def peak_bytes(generate: Callable[[], Any], device: str) -> int:
    """What one ``generate()`` allocated at its peak above what was allocated before it.

    On the CPU the profiler sees a free only of memory allocated while it ran, so it runs over one
    generation before the measured one: what the measured one frees of the previous generation's
    (kept outputs) is then counted, and what it frees from earlier is a constant offset, which the
    difference cancels."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        generate()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        generate()
        with record_function(MEASURED):
            generate()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    window = next(e for e in events if e.get("name") == MEASURED and e.get("ph") == "X")
    start, end = window["ts"], window["ts"] + window["dur"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    inside = [e["args"]["Total Allocated"] for e in memory if start <= e["ts"] <= end]
    earlier = [e["args"]["Total Allocated"] for e in memory if e["ts"] < start]
    return max(inside) - (earlier[-1] if earlier else 0)


def measure(pipe: Any, generate: Callable[[], Any], keys: tuple[str, ...], forecast: Forecast, mask: list[int],
            device: str) -> dict[str, Any]:
    """Peak and kept bytes of one configuration, after two generations (the first compiles)."""
    started = time.perf_counter()
    handle = None
    if keys:
        handle = smoothcache.cache(pipe, smoothcache.Schedule({key: mask for key in keys}), forecast=forecast)
    try:
        generate()
        generate()
        peak = peak_bytes(generate, device)
        kept = sum(handle.state.kept_bytes().values()) if handle is not None else 0
        # what was allocated before the measured generation includes the outputs the cache kept from
        # the one before (released at its first model call): they count toward the cache's peak too
        peak += kept
    finally:
        if handle is not None:
            handle.disable()
    return {"peak_bytes": peak, "kept_bytes": kept, "seconds": time.perf_counter() - started}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--size", choices=tuple(SIZES), help="default: narrow on the CPU, full on a GPU")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled rows (eager: dynamo only)")
    parser.add_argument("--modes", nargs="+", choices=("eager", "compile"), default=["eager", "compile"])
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    size_name = args.size or ("full" if args.device == "cuda" else "narrow")
    size = SIZES[size_name]
    if args.device == "cpu":
        torch.set_num_threads(1)  # per-thread scratch buffers (attention, matmuls) would vary the peak from run to run
    pipe, generate, hidden = build(size, args.device)
    mask, original = step_mask(size["steps"]), pipe.transformer
    rows = []
    for mode in args.modes:
        for method, (keys, forecast) in METHODS.items():
            torch._dynamo.reset()
            pipe.transformer = original if mode == "eager" else torch.compile(original, backend=args.backend)
            row = {"mode": mode, "method": method, **measure(pipe, generate, keys, forecast, mask, args.device)}
            rows.append(row)
            print(line(row, hidden), flush=True)
    pipe.transformer = original
    torch._dynamo.reset()
    for row in rows:
        uncached = next(r for r in rows if r["mode"] == row["mode"] and r["method"] == "uncached")
        row["rise_over_uncached_bytes"] = row["peak_bytes"] - uncached["peak_bytes"]
        row["rise_in_hidden_states"] = row["rise_over_uncached_bytes"] / hidden
        row["kept_in_hidden_states"] = row["kept_bytes"] / hidden
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.machine()})"
    result = {
        "benchmark": "peak_memory.py", "device": device, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "versions": {"torch": torch.__version__, "diffusers": importlib.metadata.version("diffusers"),
                     "smoothcache": smoothcache.__version__},
        "settings": {"size": size_name, **{k: v for k, v in size.items() if k != "config"}, "transformer": size["config"],
                     "guidance_scale": GUIDANCE, "text_tokens": TEXT_TOKENS, "mask": mask, "backend": args.backend,
                     "hidden_state_bytes": hidden, "measured": "peak allocated during one generation above what was "
                     "allocated before it; the third generation of each configuration"},
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"peak-memory-wan-{args.device}.json"
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    plot(result, path.with_suffix(".png"))
    print(path)
    return path


def line(row: dict[str, Any], hidden: int) -> str:
    return (f"{row['mode']:8} {row['method']:15} peak {row['peak_bytes'] / hidden:6.2f} hidden states, "
            f"kept {row['kept_bytes'] / hidden:5.2f} ({row['seconds']:.0f} s)")


def plot(result: dict[str, Any], path: Path) -> None:
    """Per mode, each cached method's peak rise above uncached beside what it keeps, in hidden states."""
    from smoothcache.plots import pyplot, save_figure

    plt = pyplot()
    cached = [r for r in result["rows"] if r["method"] != "uncached"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(cached), 3.6))
    positions = range(len(cached))
    rise = ax.bar([p - 0.2 for p in positions], [r["rise_in_hidden_states"] for r in cached], 0.4,
                  label="peak above uncached")
    kept = ax.bar([p + 0.2 for p in positions], [r["kept_in_hidden_states"] for r in cached], 0.4,
                  label="kept by the cache")
    for bars in (rise, kept):
        ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=1)
    ax.set_xticks(list(positions), [f"{r['mode']}\n{r['method']}" for r in cached])
    settings = result["settings"]
    ax.set_title(f"WanPipeline ({settings['size']}), {result['device']}: peak rise vs kept", fontsize=9)
    top = max(max(r["rise_in_hidden_states"], r["kept_in_hidden_states"]) for r in cached)
    low = min(0.0, *(r["rise_in_hidden_states"] for r in cached))
    smallest = min((r["kept_in_hidden_states"] for r in cached if r["kept_in_hidden_states"] > 0), default=top)
    logarithmic = top > 20 * smallest  # layers keep one per layer: a linear axis would flatten the blocks' bars
    if logarithmic:
        ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylabel("hidden states (batch x tokens x dim)" + (",\nlogarithmic above 1" if logarithmic else ""),
                  fontsize=8 if logarithmic else None)
    ax.set_ylim(low, 12 * top if logarithmic else 1.3 * top if top > 0 else 1.0)  # room for the bar labels
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.legend(fontsize=8, loc="upper left", ncols=2)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
