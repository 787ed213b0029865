"""How much history does calibration keep for a real model? Counted on the meta device: no GPU and
no weights (issue 21, item 4: calibration's peak memory, which on Flux ran a 80 GB card to about
42 GB).

Each model is built from its config under ``torch.device("meta")``, in the dtype it runs in, and
called directly with its real input shapes inside ``smoothcache.calibration(model, components,
steps=..., lookahead=..., layer_groups=..., measure_flops=False)``: the real recorder, its real
hooks and rings, over meta tensors that have shapes and dtypes but no data. Its
``history_peak_bytes`` is then exactly what the rings would hold on a GPU (the extra peak on the
GPU adds the model's own activations, which are not counted here). ``history_predicted_bytes``,
what calibration predicts after the first step (and checks against a CUDA device's free memory),
is recorded beside it. The profile cannot be built from meta tensors (it copies the errors to the
host), so each recorder is read and then ended with ``smoothcache.disable``.

- ``flux``: FLUX.1-dev (benchmarks/gpu_peers.py ``FLUX_DEV``), bf16, 1024x1024: 4096 image
  tokens and 512 text tokens, batch 1, one call per step (guidance-distilled).
- ``dit-xl``: DiT-XL/2 at 256px (benchmarks/gpu_bench.py ``dit_xl``), fp16, batch 8 with
  classifier-free guidance: 16 rows in one call per step, as DiTPipeline runs it.
- ``wan``: Wan 2.1 T2V 1.3B (benchmarks/pipeline_workloads.py ``WAN_2_1_T2V_1_3B``), bf16 with the
  modules its class keeps in float32 as loaded, 480x832, 81 frames (21x60x104 latents), 512 text
  tokens, batch 1, two calls per step (WanPipeline runs guidance as separate calls).

For each model: its default layer keys and its whole blocks, lookahead 1, 2, 3 and layer_groups
1, 2, 4 (each of a ``layer_groups`` run's generations is counted; the peak is their maximum). A
generation runs ``lookahead`` steps (at least 2): the history's peak is reached by then and a
longer generation holds no more. With ``forecast="linear"`` a layer keeps ``2 * lookahead + 1``
outputs; ``--forecast`` counts that too.

    python benchmarks/calibration_memory.py --out docs/combinations              # about 3-4 minutes on 2 cores
    python benchmarks/calibration_memory.py --tiny --jobs 1 --out /tmp/history   # tiny configs, seconds

Writes calibration-history-meta.json and .png into --out. With ``--against`` (default
docs/benchmarks/stacking-speed.json) DiT-XL/2's counts are set beside the GPU's measured history.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import smoothcache
from smoothcache.adapters import whole_block_components
from smoothcache.files import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import dit_xl
from gpu_peers import FLUX_DEV, FLUX_TINY
from pipeline_workloads import WAN_2_1_T2V_1_3B, WAN_TINY, cast_as_loaded

RESULT_NAME = "calibration-history-meta.json"
MODELS = ("flux", "dit-xl", "wan")
LOOKAHEADS = (1, 2, 3)
LAYER_GROUPS = (1, 2, 4)
GPU_RESULT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "stacking-speed.json"
META = torch.device("meta")


@dataclass
class Workload:
    """A model on the meta device and one call's inputs, as its pipeline would pass them."""

    name: str
    model: nn.Module
    inputs: dict[str, Any]
    calls_per_step: int
    description: str


def empty(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, device=META, dtype=dtype)


def flux(tiny: bool) -> Workload:
    from diffusers import FluxTransformer2DModel

    config, dtype = (FLUX_TINY if tiny else FLUX_DEV), torch.bfloat16
    image, text = (64, 8) if tiny else (4096, 512)  # 1024x1024: (1024 / 8 / 2) ** 2 packed latent tokens
    with META:
        model = FluxTransformer2DModel(**config).to(dtype).eval()
    inputs = {
        "hidden_states": empty(1, image, config["in_channels"], dtype=dtype),
        "encoder_hidden_states": empty(1, text, config["joint_attention_dim"], dtype=dtype),
        "pooled_projections": empty(1, config["pooled_projection_dim"], dtype=dtype),
        "timestep": empty(1, dtype=dtype), "guidance": empty(1, dtype=dtype),
        "img_ids": empty(image, 3, dtype=dtype), "txt_ids": empty(text, 3, dtype=dtype), "return_dict": False,
    }
    size = "tiny config" if tiny else "FLUX.1-dev, 1024x1024"
    return Workload("flux", model, inputs, 1, f"{size}: {image} image + {text} text tokens, batch 1, bf16, one call per step")


def dit(tiny: bool) -> Workload:
    dtype, rows = torch.float16, 16  # batch 8, doubled by classifier-free guidance
    with META:
        model = dit_xl("meta", dtype, tiny=tiny)
    inputs = {"hidden_states": empty(rows, 4, 32, 32, dtype=dtype), "timestep": empty(rows, dtype=torch.long),
              "class_labels": empty(rows, dtype=torch.long), "return_dict": False}
    size = "tiny config" if tiny else "DiT-XL/2, 256x256"
    return Workload("dit-xl", model, inputs, 1, f"{size}: 256 tokens, batch 8 with guidance (16 rows), fp16, one call per step")


def wan(tiny: bool) -> Workload:
    from diffusers import WanTransformer3DModel

    config, dtype = (WAN_TINY if tiny else WAN_2_1_T2V_1_3B), torch.bfloat16
    frames, height, width, text = (2, 4, 4, 8) if tiny else (21, 60, 104, 512)  # 81 frames, 480x832 in latents
    with META:
        model = cast_as_loaded(WanTransformer3DModel(**config), dtype).eval()
    inputs = {"hidden_states": empty(1, config["in_channels"], frames, height, width, dtype=dtype),
              "timestep": empty(1, dtype=torch.long), "encoder_hidden_states": empty(1, text, config["text_dim"], dtype=dtype),
              "return_dict": False}
    tokens = frames * (height // 2) * (width // 2)
    size = "tiny config" if tiny else "Wan 2.1 T2V 1.3B, 480x832, 81 frames"
    return Workload("wan", model, inputs, 2,
                    f"{size}: {tokens} video + {text} text tokens, batch 1, bf16, two calls per step (guidance)")


BUILDERS: dict[str, Callable[[bool], Workload]] = {"flux": flux, "dit-xl": dit, "wan": wan}


def count(workload: Workload, components: list[str] | None, lookahead: int, layer_groups: int,
          forecast: str) -> dict[str, Any]:
    """One calibration of ``layer_groups`` generations on the meta device: the rings' peak bytes and
    what calibration predicted at each generation's second step."""
    steps = max(2, lookahead + (lookahead + 1 if forecast == "linear" else 0))  # the rings are full by the last
    started = time.perf_counter()
    recorder = smoothcache.calibration(workload.model, components, steps=steps, calls_per_step=workload.calls_per_step,
                                       lookahead=lookahead, layer_groups=layer_groups, forecast=forecast,
                                       measure_flops=False)
    try:
        with torch.no_grad():
            for _ in range(layer_groups * steps * workload.calls_per_step):
                workload.model(**workload.inputs)
        peak, predicted = recorder.history_peak_bytes, recorder.history_predicted_bytes
        measured = len(recorder.layers)
    finally:
        smoothcache.disable(workload.model)  # stop() would copy meta errors to the host
    return {"history_peak_bytes": peak, "history_peak_mib": round(peak / 2**20, 3),
            "history_peak_gib": round(peak / 2**30, 3), "predicted_bytes": predicted, "prediction_exact": predicted == peak,
            "layers": measured, "steps": steps, "seconds": round(time.perf_counter() - started, 2)}


KEY_SETS = ("layers", "blocks")


def run_keys(model: str, keys: str, tiny: bool, lookaheads: Sequence[int], groups: Sequence[int],
             forecasts: Sequence[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every (forecast, lookahead, layer_groups) of one model and key set (the family's default
    layers, or its whole blocks): the model's description and the rows. One unit of work for a
    process of its own (a meta call of the full Flux takes about a second on this CPU)."""
    workload = BUILDERS[model](tiny)
    components = None if keys == "layers" else whole_block_components(workload.model)
    names = sorted({layer.layer_type for layer in smoothcache.find_layers(workload.model, components)})
    weights = sum(p.numel() * p.element_size() for p in workload.model.parameters())
    described = {"description": workload.description, "weights_mib": round(weights / 2**20, 1)}
    rows = [
        {"model": model, "keys": keys, "components": names, "forecast": forecast, "lookahead": lookahead,
         "layer_groups": layer_groups, **count(workload, components, lookahead, layer_groups, forecast)}
        for forecast in forecasts for lookahead in lookaheads for layer_groups in groups
    ]
    return described, rows


def gpu_cross_check(rows: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """DiT-XL/2's counted history beside stacking_speed.py's GPU rows (part c: the recorder's
    ``history_peak_mib`` and the extra peak over an uncached call, eager fp16, batch 8)."""
    if not path.exists():
        return []
    measured = [r for r in json.loads(path.read_text())["rows"] if r.get("part") == "c" and r.get("method") == "calibration"]
    checks = []
    for gpu in measured:
        keys = gpu["components"]
        counted = next((r for r in rows if r["model"] == "dit-xl" and r["keys"] == keys and r["forecast"] == "none"
                        and r["lookahead"] == gpu["lookahead"] and r["layer_groups"] == gpu.get("layer_groups", 1)), None)
        if counted is None:
            continue
        checks.append({
            "keys": keys, "lookahead": gpu["lookahead"], "layer_groups": gpu.get("layer_groups", 1),
            "counted_mib": counted["history_peak_mib"], "gpu_history_peak_mib": gpu["history_peak_mib"],
            "gpu_extra_peak_mib": round(gpu["extra_peak_mib"], 3),
            "agree": abs(counted["history_peak_mib"] - gpu["history_peak_mib"]) < 0.01,
        })
    return checks


def plot(result: dict[str, Any], path: Path) -> None:
    from smoothcache.plots import pyplot, save_figure

    plt = pyplot()

    models = list(dict.fromkeys(r["model"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.9), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in result["rows"] if r["model"] == model and r["forecast"] == "none"]
        for keys, style in (("layers", "-o"), ("blocks", "--s")):
            for color, groups in zip(("C0", "C1", "C2", "C3"), sorted({r["layer_groups"] for r in rows})):
                line = sorted((r["lookahead"], r["history_peak_gib"]) for r in rows
                              if r["keys"] == keys and r["layer_groups"] == groups)
                if line:
                    ax.plot(*zip(*line), style, color=color, label=f"{keys}, layer_groups={groups}")
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("lookahead")
        ax.set_xticks(sorted({r["lookahead"] for r in rows}))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("calibration history (GiB)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle("Layer outputs calibration keeps, counted on the meta device (not measured on a GPU)", fontsize=9)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    save_figure(fig, path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--lookaheads", type=int, nargs="+", default=list(LOOKAHEADS))
    parser.add_argument("--layer-groups", type=int, nargs="+", default=list(LAYER_GROUPS))
    parser.add_argument("--forecast", nargs="+", choices=("none", "linear"), default=["none"],
                        help="linear also counts forecasting's history (2 * lookahead + 1 outputs a layer)")
    parser.add_argument("--tiny", action="store_true", help="tiny configs and inputs: checks the code paths in seconds")
    parser.add_argument("--jobs", type=int, default=2, help="processes, one (model, keys) at a time each; 1: this one")
    parser.add_argument("--against", type=Path, default=GPU_RESULT,
                        help="stacking_speed.py's GPU result, for DiT-XL/2's cross-check (left out with --tiny)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    """Count every (model, keys, forecast, lookahead, layer_groups); returns the JSON's path."""
    args = parse_args(argv)
    started = time.perf_counter()
    units = [(model, keys, args.tiny, args.lookaheads, args.layer_groups, args.forecast)
             for model in args.models for keys in KEY_SETS]
    if args.jobs > 1:  # spawned, not forked: a forked torch may hang in its thread pools
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(run_keys, *zip(*units)))
    else:
        done = [run_keys(*unit) for unit in units]
    rows, workloads = [], {}
    for (model, *_), (described, unit_rows) in zip(units, done):
        workloads[model] = described
        rows += unit_rows
    result: dict[str, Any] = {
        "benchmark": "calibration_memory", "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "smoothcache": smoothcache.__version__,
        "device": f"meta (counted, not measured; host {platform.machine()}, {torch.get_num_threads()} threads)",
        "settings": {
            "tiny": args.tiny, "models": workloads, "lookaheads": list(args.lookaheads),
            "layer_groups": list(args.layer_groups), "forecast": list(args.forecast),
            "keys": {"layers": "the family's default layer keys", "blocks": "whole blocks (whole_block_components)"},
            "how": "smoothcache.calibration(model, components, steps=..., lookahead=..., layer_groups=..., "
                   "measure_flops=False) on the meta device; the model called directly, layer_groups generations",
            "steps": "lookahead (2 * lookahead + 1 with forecast), at least 2: the rings are full by the last step",
            "history": "history_peak_bytes: the bytes of layer outputs the rings hold at their fullest; the GPU's "
                       "extra peak also holds the model's activations",
        },
        "rows": rows,
        "gpu_cross_check": [] if args.tiny else gpu_cross_check(rows, args.against),
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / RESULT_NAME
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    plot(result, path.with_suffix(".png"))
    return path


if __name__ == "__main__":
    print(main())
