"""What does storing the cache's kept outputs in a lower precision cost in quality? Measured on the
shipped demo model (issue 21, its quality half: stacking_speed.py measured memory and time on a
random-weight DiT-XL, where PSNR means nothing).

For the layers (``attn1`` + ``ff``) and for whole blocks (``block``, the module list on one key,
reused as one chain), one profile is calibrated and one schedule solved per compute budget
(``profile.schedule(compute_fraction=...)``, the optimal solver, as lora_profile.py does). Each
schedule runs with its kept outputs as they are (``default``), in bf16
(``cache(kept_dtype=torch.bfloat16)``), in float8 (``kept_dtype=torch.float8_e4m3fn``) and on the
host (``kept_device="cpu"``: on the CPU that moves nothing, so it is kept as a check that it changes
nothing, bit for bit). Every form computes the same steps, so compute is equal within a budget.

Each row: ``handle.state.kept_bytes()`` after a generation (by device, their sum in MiB, and the
fraction of the default form's); the mean per-image PSNR (dB, images in [0, 1]) against the
uncached samples and against the default-kept ones (None where identical; where only some images
are identical, the mean over those that differ); the max abs difference from the default-kept
samples; the classifier's accuracy; and the generation's wall seconds (CPU, noisy: a guide only).
Same classes and seeds as lora_profile.py: 100 samples, 20 DDIM steps, guidance 1.5.

    python benchmarks/kept_forms_quality.py --out docs/combinations   # CPU, about 2 minutes on 2 cores
    python benchmarks/kept_forms_quality.py --quick --out /tmp/kept    # code paths only: 10 samples, 10 steps

Writes kept-forms-quality-demo.json and .png into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import smoothcache
from smoothcache.demo.assets import load_demo_pipeline, load_quality_scorer
from smoothcache.files import atomic_write_text

BUDGETS = (0.7, 0.5, 0.4, 0.3)
STEPS, GUIDANCE, SEED = 20, 1.5, 0
COMPONENTS: dict[str, list[str]] = {"layers": ["attn1", "ff"], "blocks": ["block"]}
KEPT_FORMS: dict[str, dict[str, Any]] = {
    "default": {},
    "bfloat16": {"kept_dtype": torch.bfloat16},
    "float8_e4m3fn": {"kept_dtype": torch.float8_e4m3fn},
    "cpu": {"kept_device": "cpu"},
}
QUICK = {"samples_per_class": 1, "calibration_samples_per_class": 1, "steps": 10, "budgets": [0.5]}
DEFAULTS = {"samples_per_class": 10, "calibration_samples_per_class": 2, "steps": STEPS, "budgets": list(BUDGETS)}
RESULT_NAME = "kept-forms-quality-demo.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples-per-class", type=int, help=f"default {DEFAULTS['samples_per_class']} (10 classes)")
    parser.add_argument("--calibration-samples-per-class", type=int,
                        help=f"default {DEFAULTS['calibration_samples_per_class']}")
    parser.add_argument("--steps", type=int, help=f"DDIM steps, default {STEPS}")
    parser.add_argument("--budgets", type=float, nargs="+", help=f"compute fractions, default {' '.join(map(str, BUDGETS))}")
    parser.add_argument("--quick", action="store_true",
                        help="what is not given explicitly from " + ", ".join(f"{k}={v}" for k, v in QUICK.items()) +
                        ": checks the code paths in seconds, measures little")
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def psnr_between(scorer: Any, images: torch.Tensor, reference: torch.Tensor) -> float | None:
    """The scorer's mean per-image PSNR; None where all images are identical. An identical image
    has an infinite PSNR, which would make the mean infinite: the mean is then over the others."""
    differ = (images != reference).flatten(1).any(dim=1)
    if not differ.any():
        return None
    return scorer.psnr(images[differ], reference[differ])


def main(argv: Sequence[str] | None = None) -> Path:
    """Run every (budget, components, kept form); returns the JSON's path."""
    args = parse_args(argv)
    pipe = load_demo_pipeline(progress_bar=False)
    scorer = load_quality_scorer()
    labels = [c for _ in range(args.samples_per_class) for c in range(10)]
    calibration_labels = [c for _ in range(args.calibration_samples_per_class) for c in range(10)]

    def generate(class_labels: list[int], seed: int = SEED) -> torch.Tensor:
        return pipe(class_labels=class_labels, num_inference_steps=args.steps, guidance_scale=GUIDANCE,
                    generator=torch.Generator().manual_seed(seed), output_type="pt").images.float()

    started = time.perf_counter()
    reference = generate(labels)
    reference_seconds = time.perf_counter() - started  # includes the first call's warm-up
    result: dict[str, Any] = {
        "benchmark": "kept_forms_quality", "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "settings": {
            "model": "shipped demo DiT (float32)", "steps": args.steps, "guidance": GUIDANCE, "seed": SEED,
            "samples": len(labels), "calibration_samples": len(calibration_labels), "calibration_seed": 1,
            "budgets": list(args.budgets), "components": COMPONENTS,
            "solver": "profile.schedule(compute_fraction=budget): the default (optimal) solver",
            "kept_forms": {name: f"cache(pipe, schedule, {', '.join(f'{k}={v!r}' for k, v in kw.items())})".replace(", )", ")")
                           for name, kw in KEPT_FORMS.items()},
            "psnr": "mean per-image PSNR in dB, images in [0, 1]; vs default kept: None where identical, "
                    "else the mean over the images that differ",
            "seconds": "wall seconds of one generation on a shared CPU: a guide only",
        },
        "uncached": {"accuracy": scorer.accuracy(reference, labels), "seconds": round(reference_seconds, 2)},
        "calibrations": {}, "schedules": [], "rows": [],
    }
    for name, components in COMPONENTS.items():
        calibration_started = time.perf_counter()
        with smoothcache.calibration(pipe, components=components) as rec:
            generate(calibration_labels, seed=1)
        profile = rec.profile
        result["calibrations"][name] = {"seconds": round(time.perf_counter() - calibration_started, 2), "keys": profile.keys()}
        for budget in args.budgets:
            schedule = profile.schedule(compute_fraction=budget)
            result["schedules"].append({"compute_fraction": budget, "components": name,
                                        "schedule_compute_fraction": schedule.compute_fraction(),
                                        "plans": {key: list(plan) for key, plan in schedule.plans.items()}})
            default: dict[str, Any] = {}
            for kept, options in KEPT_FORMS.items():
                row, images = run_form(pipe, schedule, options, lambda: generate(labels))
                if kept == "default":
                    default = {"images": images, "bytes": row["kept_bytes"]}
                row = {"compute_fraction": budget, "components": name, "kept": kept, **row,
                       "kept_fraction_vs_default": row["kept_bytes"] / default["bytes"] if default["bytes"] else None,
                       "psnr_vs_uncached": psnr_between(scorer, images, reference),
                       "psnr_vs_default_kept": psnr_between(scorer, images, default["images"]),
                       "max_abs_diff_vs_default_kept": float((images - default["images"]).abs().max()),
                       "images_differing_from_default_kept": int((images != default["images"]).flatten(1).any(dim=1).sum()),
                       "identical_to_default_kept": bool(torch.equal(images, default["images"])),
                       "accuracy": scorer.accuracy(images, labels)}
                result["rows"].append(row)
                print(line(row))
    cpu_rows = [r for r in result["rows"] if r["kept"] == "cpu"]
    result["checks"] = {"kept_device_cpu_bit_identical_to_default": all(r["identical_to_default_kept"] for r in cpu_rows)}
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / RESULT_NAME
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    plot(result, path.with_suffix(".png"))
    print(f"uncached accuracy {result['uncached']['accuracy']:.3f}; checks {result['checks']}; {result['seconds']} s -> {path}")
    return path


def run_form(pipe: Any, schedule: smoothcache.Schedule, options: dict[str, Any],
             generate: Callable[[], torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
    """One cached generation with the kept outputs in the form ``options`` asks for; what the
    cache holds is read before the handle is disabled, which releases it."""
    with smoothcache.cache(pipe, schedule, **options) as handle:
        started = time.perf_counter()
        images = generate()
        seconds = time.perf_counter() - started
        by_device = handle.state.kept_bytes()
    total = sum(by_device.values())
    return {"kept_bytes_by_device": by_device, "kept_bytes": total, "kept_mib": total / 2**20,
            "seconds": round(seconds, 2)}, images


def line(row: dict[str, Any]) -> str:
    def db(value: float | None) -> str:
        return "  equal" if value is None else f"{value:7.2f}"

    return (f"compute {row['compute_fraction']:.2f} {row['components']:6s} {row['kept']:13s} kept {row['kept_mib']:7.2f} MiB "
            f"({row['kept_fraction_vs_default']:.2f})  PSNR vs uncached {db(row['psnr_vs_uncached'])}  "
            f"vs default {db(row['psnr_vs_default_kept'])}  acc {row['accuracy']:.3f}  {row['seconds']:.1f} s")


def plot(result: dict[str, Any], path: Path) -> None:
    """PSNR against the budget, one line per kept form; top: against the uncached samples (the
    quality), bottom: against the default-kept ones (what the form alone changes). A panel per components."""
    from smoothcache.plots import pyplot, save_figure

    plt = pyplot()
    names = list(result["settings"]["components"])
    fig, axes = plt.subplots(2, len(names), figsize=(5 * len(names), 6.4), squeeze=False)
    styles = {"default": ("o", "-", "tab:blue"), "bfloat16": ("s", "-", "tab:orange"),
              "float8_e4m3fn": ("^", "-", "tab:green"), "cpu": ("x", ":", "tab:red")}
    for column, name in enumerate(names):
        top, bottom = axes[0][column], axes[1][column]
        for kept, (marker, linestyle, color) in styles.items():
            rows = sorted((r for r in result["rows"] if r["components"] == name and r["kept"] == kept),
                          key=lambda r: r["compute_fraction"])
            if not rows:
                continue
            fraction = rows[0]["kept_fraction_vs_default"]
            label = f"{kept} ({fraction:.2f}x memory)" if fraction is not None else kept
            budgets = [r["compute_fraction"] for r in rows]
            top.plot(budgets, [nan_for_none(r["psnr_vs_uncached"]) for r in rows], marker=marker, linestyle=linestyle,
                     color=color, label=label, alpha=0.8)
            if kept in ("bfloat16", "float8_e4m3fn"):
                bottom.plot(budgets, [nan_for_none(r["psnr_vs_default_kept"]) for r in rows], marker=marker,
                            linestyle=linestyle, color=color, label=label)
        top.set_title(f"{name} ({' + '.join(result['settings']['components'][name])})", fontsize=10)
        top.set_ylabel("PSNR vs uncached (dB)")
        bottom.set_ylabel("PSNR vs default kept (dB)")
        for ax in (top, bottom):
            ax.set_xlabel("compute fraction")
            ax.invert_xaxis()
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"Demo DiT, kept outputs in a lower precision ({result['settings']['samples']} samples, "
                 f"{result['settings']['steps']} steps)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def nan_for_none(value: float | None) -> float:
    return math.nan if value is None else value


if __name__ == "__main__":
    main()
