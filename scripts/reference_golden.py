"""Regenerate tests/data/reference_golden/: schedules written by the reference package's
DiffuserCalibrationHelper on the tiny test DiT, to check ours writes the same bytes.

Usage: python scripts/reference_golden.py PATH_TO_A_CHECKOUT_OF_Roblox/SmoothCache [--ours]
(the reference is not installable with its calibration sub-package from PyPI, so it is imported
from a checkout; with --ours the same runs go through smoothcache.compat instead).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import make_dit_pipeline

CASES = [(10, ["attn1"], 0.3), (20, ["attn1", "ff"], 0.15), (20, ["attn1", "ff"], 0.4), (30, ["attn1", "ff"], 0.25)]


def golden_name(steps: int, components: list[str], threshold: float) -> str:
    return f"{steps}-{'-'.join(components)}-{threshold}.json"


def run_case(helper_class, steps: int, components: list[str], threshold: float, out: Path) -> Path:
    pipe = make_dit_pipeline(num_layers=3, seed=7)
    path = out / golden_name(steps, components, threshold)
    helper = helper_class(
        pipe.transformer,
        calibration_lookahead=3,
        calibration_threshold=threshold,
        schedule_length=steps,
        log_file=str(path),
        components_to_wrap=components,
    )
    helper.enable()
    with contextlib.redirect_stdout(io.StringIO()):  # the reference prints
        pipe(class_labels=[1, 2, 3], num_inference_steps=steps, generator=torch.manual_seed(33), output_type="pt")
        helper.disable()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("reference_checkout", type=Path)
    parser.add_argument("--ours", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "reference_golden")
    args = parser.parse_args()
    if args.ours:
        from smoothcache.compat import DiffuserCalibrationHelper
    else:
        sys.path.insert(0, str(args.reference_checkout))
        from SmoothCache.calibration.diffuser_calibration_helper import (
            DiffuserCalibrationHelper,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        print(run_case(DiffuserCalibrationHelper, *case, args.out))


if __name__ == "__main__":
    main()
