"""Does a profile calibrated without a LoRA still serve with one? Measured on the shipped demo model.

A LoRA adapter (peft, rank 8, on attn1's projections and ff) with random weights stands in for a
style adapter: it moves the samples but keeps them digits. With the adapter active, schedules from
a profile calibrated *without* it and from one calibrated *with* it are run at the same compute
budgets, and each is scored against the uncached samples of the adapted model (PSNR) and by the
demo's classifier (accuracy). Same classes and seeds as benchmarks/solvers.py: 100 samples, 20
DDIM steps, guidance 1.5.

    python benchmarks/lora_profile.py --out docs/combinations      # CPU, about 6 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import smoothcache
from smoothcache.demo.assets import load_demo_pipeline, load_quality_scorer
from smoothcache.files import atomic_path, atomic_write_text

BUDGETS = (0.7, 0.5, 0.4, 0.3)
STEPS, GUIDANCE, SEED = 20, 1.5, 0
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def add_random_lora(transformer: torch.nn.Module, rank: int, scale: float, seed: int) -> None:
    """A LoRA adapter whose up-projection is random (peft starts it at zero, which changes nothing)."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS), transformer)
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in transformer.named_parameters():
        if "lora_B" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scale", type=float, default=0.1, help="std of the adapter's up-projection weights")
    parser.add_argument("--samples-per-class", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pipe = load_demo_pipeline(progress_bar=False)
    scorer = load_quality_scorer()
    labels = [c for _ in range(args.samples_per_class) for c in range(10)]
    calibration_labels = list(range(10)) * 2

    def generate(class_labels: list[int], seed: int = SEED) -> torch.Tensor:
        return pipe(class_labels=class_labels, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    generator=torch.Generator().manual_seed(seed), output_type="pt").images.float()

    def calibrate() -> smoothcache.CalibrationProfile:
        with smoothcache.calibration(pipe, components=["attn1", "ff"]) as rec:
            generate(calibration_labels, seed=1)
        return rec.profile

    started = time.perf_counter()
    plain_reference = generate(labels)
    without = calibrate()
    add_random_lora(pipe.transformer, rank=8, scale=args.scale, seed=0)
    with_lora = calibrate()
    reference = generate(labels)
    result = {
        "benchmark": "lora_profile", "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "settings": {"steps": STEPS, "guidance": GUIDANCE, "samples": len(labels), "lora_rank": 8,
                     "lora_up_std": args.scale, "targets": TARGETS},
        "adapter_effect": {"psnr_vs_no_adapter": scorer.psnr(reference, plain_reference),
                           "accuracy_without_adapter": scorer.accuracy(plain_reference, labels),
                           "accuracy_with_adapter": scorer.accuracy(reference, labels)},
        "rows": [],
    }
    for budget in BUDGETS:
        schedules = {source: profile.schedule(compute_fraction=budget)
                     for source, profile in (("calibrated without the adapter", without), ("calibrated with it", with_lora))}
        plans = list(schedules.values())
        differ = sum(a != b for key in plans[0].keys for a, b in zip(plans[0].plans[key], plans[1].plans[key]))
        for source, schedule in schedules.items():
            with smoothcache.cache(pipe, schedule):
                images = generate(labels)
            result["rows"].append({"compute_fraction": budget, "profile": source, "plan_entries_that_differ": differ,
                                   "psnr": scorer.psnr(images, reference), "accuracy": scorer.accuracy(images, labels)})
            print(f"compute {budget}: {source:32s} PSNR {result['rows'][-1]['psnr']:.2f} dB")
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "lora-profile-demo.json", json.dumps(result, indent=1) + "\n")
    plot(result, args.out / "lora-profile-demo.png")
    print(f"adapter: {result['adapter_effect']}; {result['seconds']} s -> {args.out}")


def plot(result: dict, path: Path) -> None:
    from smoothcache.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for source, marker in (("calibrated without the adapter", "o"), ("calibrated with it", "s")):
        rows = [r for r in result["rows"] if r["profile"] == source]
        ax.plot([r["compute_fraction"] for r in rows], [r["psnr"] for r in rows], marker=marker, label=f"profile {source}")
    ax.set_xlabel("compute fraction of attn1 + ff")
    ax.set_ylabel("PSNR vs uncached, same adapter (dB)")
    ax.set_title("Demo DiT with a LoRA adapter: whose profile?", fontsize=10)
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
