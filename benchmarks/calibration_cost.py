"""What does calibrating cost on the GPU? One Flux-dev-sized generation (random weights, 1024x1024,
28 steps, bf16, the real FluxPipeline; see gpu_peers.py) uncached, then calibrated with lookahead
3: with the FLOP count of one model call, without it, and recording forecast errors as well
(``forecast="linear"``, opt-in). Every calibration also probes the scheduler's step for the
steps' sensitivity (smoothcache/step_weights.py).

    python benchmarks/calibration_cost.py --out docs/benchmarks/calibration-cost-flux-h200.json
    python benchmarks/calibration_cost.py --tiny --device cpu --out /tmp/cost.json     # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from unittest import mock

import torch

import smoothcache
from smoothcache.step_weights import StepProbe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_peers import build, generate, peak_mib, sync


def seconds(fn) -> float:
    sync()
    started = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--lookahead", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    setup = build(args.tiny, args.device, torch.bfloat16)
    generate(setup)  # warm-up
    uncached = min(seconds(lambda: generate(setup)) for _ in range(args.repeats))
    rows = {"uncached": {"seconds": uncached, "ratio": 1.0}}
    for label, measure_flops, forecast in (("calibration, FLOPs counted", True, "none"),
                                           ("calibration, no FLOP count", False, "none"),
                                           ("calibration, no FLOP count, no step probe", False, "none"),
                                           ("calibration + forecast errors", False, "linear")):
        best, peak, runs = float("inf"), None, []
        for _ in range(args.repeats):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            # what the step-sensitivity probe costs: the same calibration with the probe left unattached
            probe = mock.patch.object(StepProbe, "attach", lambda self: self) if "no step probe" in label else contextlib.nullcontext()
            with probe, smoothcache.calibration(setup.pipe, lookahead=args.lookahead, measure_flops=measure_flops, forecast=forecast) as rec:
                runs.append(seconds(lambda: generate(setup)))
                best = min(best, runs[-1])
            peak = peak_mib()
        rows[label] = {"seconds": best, "ratio": best / uncached, "peak_mib": peak, "layers": len(rec.profile.layers),
                       "step_weights": rec.profile.step_weights is not None, "runs_s": runs}
        print(f"{label:28} {best:7.3f} s  {best / uncached:5.2f}x uncached", flush=True)
    result = {
        "benchmark": "calibration cost, Flux-dev-sized transformer through FluxPipeline",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "settings": {"steps": setup.steps, "size": setup.size, "dtype": "bfloat16", "lookahead": args.lookahead,
                     "repeats": args.repeats, "tiny": args.tiny, "timing": "fastest of repeats, one generation each"},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"uncached {uncached:.3f} s -> {args.out}")


if __name__ == "__main__":
    main()
