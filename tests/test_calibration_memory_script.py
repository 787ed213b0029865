"""benchmarks/calibration_memory.py on tiny configs: every model and key set runs through the real
recorder on the meta device, its counted history is the layers' output bytes (summed by plain
hooks here) times the steps kept, and DiT-XL/2's count matches the GPU's measured history."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch

import smoothcache
from smoothcache.adapters import whole_block_components
from smoothcache.recorder import group_of, largest_group_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
calibration_memory = importlib.import_module("calibration_memory")


def output_bytes(workload, components) -> list[int]:
    """Each layer's output bytes in one plain meta call, in the recorder's layer order."""
    layers = smoothcache.find_layers(workload.model, components)
    sizes = [0] * len(layers)

    def count(index: int, output) -> None:
        tensors = [output] if isinstance(output, torch.Tensor) else [t for t in output if isinstance(t, torch.Tensor)]
        sizes[index] = sum(t.numel() * t.element_size() for t in tensors)

    handles = [layer.module.register_forward_hook(lambda m, a, out, i=i: count(i, out)) for i, layer in enumerate(layers)]
    with torch.no_grad():
        workload.model(**workload.inputs)
    for handle in handles:
        handle.remove()
    return sizes


def test_the_counted_history_is_the_output_bytes_kept(tmp_path):
    path = calibration_memory.main(["--tiny", "--jobs", "1", "--lookaheads", "2", "--layer-groups", "1", "2",
                                    "--out", str(tmp_path)])
    result = json.loads(path.read_text())
    assert path.with_suffix(".png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert result["settings"]["tiny"] and result["gpu_cross_check"] == []
    rows = result["rows"]
    assert [(r["model"], r["keys"], r["lookahead"], r["layer_groups"]) for r in rows] == [
        (m, k, 2, g) for m in ("flux", "dit-xl", "wan") for k in ("layers", "blocks") for g in (1, 2)
    ]
    for model in ("flux", "dit-xl", "wan"):
        workload = calibration_memory.BUILDERS[model](True)
        assert next(workload.model.parameters()).device.type == "meta"
        for keys, components in (("layers", None), ("blocks", whole_block_components(workload.model))):
            sizes = output_bytes(workload, components)
            for row in (r for r in rows if r["model"] == model and r["keys"] == keys):
                groups = row["layer_groups"]
                largest = largest_group_bytes(sizes, group_of(smoothcache.find_layers(workload.model, components), groups))
                expected = row["lookahead"] * workload.calls_per_step * largest
                assert row["history_peak_bytes"] == row["predicted_bytes"] == expected > 0, row
                assert row["prediction_exact"] and row["layers"] == len(sizes)
        assert smoothcache.ownership.holder(workload.model) is None  # every recorder let go
    flux_layers = next(r for r in rows if r["model"] == "flux" and r["keys"] == "layers")
    assert flux_layers["components"] == ["attn", "ff", "ff_context", "single_attn", "single_proj_mlp"]


def test_dit_xl_is_counted_as_the_gpu_measured_it(tmp_path):
    """The full DiT-XL/2 on meta, against stacking_speed.py's H200 rows for the same settings."""
    path = calibration_memory.main(["--models", "dit-xl", "--jobs", "1", "--lookaheads", "1", "--layer-groups", "1",
                                    "--out", str(tmp_path)])
    checks = json.loads(path.read_text())["gpu_cross_check"]
    assert [(c["keys"], c["counted_mib"], c["gpu_history_peak_mib"]) for c in checks] == [
        ("layers", 504.0, 504.0), ("blocks", 252.0, 252.0)
    ]
    assert all(c["agree"] and abs(c["gpu_extra_peak_mib"] - c["counted_mib"]) < 1 for c in checks)
