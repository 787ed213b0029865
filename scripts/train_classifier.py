"""Train the demo's digit classifier and write everything the demo's quality metrics ship with.

Usage:
    python scripts/export_demo_data.py              # once: .data/digits.npz
    python scripts/train_classifier.py --seed 0     # CPU is fine: about a minute on 2 cores

Writes into --out (default: the package's shipped weights folder):
    classifier/config.json, classifier/model.safetensors   the CNN (smoothcache.demo.classifier)
    classifier/fid_reference.safetensors                   real-feature sums over all digits
    heldout_digits.safetensors                             the held-out split (uint8), for tests
and prints the held-out accuracy, plus a check that the shipped statistics give the same FID as
feeding the real images to torchmetrics directly.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torchmetrics.image.fid import FrechetInceptionDistance

from smoothcache.demo.classifier import (
    DigitClassifier,
    DigitClassifierConfig,
    DigitFeatures,
)
from smoothcache.demo.metrics import FidReference, QualityScorer

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "smoothcache" / "demo" / "weights"


def load_digits(path: Path) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Images as float (N, 1, 28, 28) in [0, 1], labels, and the held-out indices."""
    data = np.load(path)
    images = torch.from_numpy(data["images"]).float()[:, None] / 255.0
    return images, torch.from_numpy(data["labels"]).long(), data["test_index"]


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small random rotations, scalings and shifts, so the classifier also reads imperfect samples."""
    b = images.shape[0]
    angle = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(12)
    scale = 1 + (torch.rand(b, generator=generator) * 2 - 1) * 0.1
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * (2.5 / 14)  # +-2.5 px in [-1, 1] units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


def first_per_class(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the first ``k`` images of every class, class by class (a balanced small sample)."""
    return torch.cat([torch.nonzero(labels == c).flatten()[:k] for c in labels.unique()])


@torch.no_grad()
def evaluate(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    preds = torch.cat([model.predict(images[i:i + 500]) for i in range(0, len(images), 500)])
    return (preds == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(".data/digits.npz"))
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-features", type=int, default=DigitClassifierConfig.num_features)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    images, labels, test_index = load_digits(args.data)
    is_test = torch.zeros(len(images), dtype=torch.bool)
    is_test[torch.from_numpy(test_index)] = True
    x_train, y_train = images[~is_test], labels[~is_test]
    x_test, y_test = images[is_test], labels[is_test]
    print(f"train {len(x_train)}  held out {len(x_test)}  device {args.device}")

    model = DigitClassifier(DigitClassifierConfig(num_features=args.num_features)).to(args.device)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * steps_per_epoch)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for i in range(0, len(order), args.batch_size):
            idx = order[i:i + args.batch_size]
            x = augment(x_train[idx], gen).to(args.device)
            loss = F.cross_entropy(model(x), y_train[idx].to(args.device), label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        acc = evaluate(model, x_test.to(args.device), y_test.to(args.device))
        print(f"epoch {epoch + 1:2d}  loss {total / len(x_train):.4f}  held-out acc {acc:.4f}  "
              f"{time.perf_counter() - start:.0f}s", flush=True)
    train_seconds = time.perf_counter() - start

    model = model.cpu().eval()
    (args.out / "classifier").mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out / "classifier")
    features = DigitFeatures(model)
    reference = FidReference.from_images(features, images)
    reference.save(args.out / "classifier" / "fid_reference.safetensors")
    save_file({"images": (x_test[:, 0] * 255).round().to(torch.uint8).contiguous(), "labels": y_test.contiguous()},
              str(args.out / "heldout_digits.safetensors"))

    # The shipped sums must give what torchmetrics computes from the real images themselves.
    scorer = QualityScorer(model, FidReference.load(args.out / "classifier" / "fid_reference.safetensors"))
    checks = {}
    subsets = {"heldout_500": x_test, "heldout_48": x_test[first_per_class(y_test, 5)[:48]],
               "train_48": x_train[first_per_class(y_train, 5)[:48]]}
    for name, fake in subsets.items():
        direct = FrechetInceptionDistance(feature=DigitFeatures(model))
        direct.update(images, real=True)
        direct.update(fake, real=False)
        checks[name] = {"shipped_stats": scorer.fid(fake), "direct": direct.compute().item()}
    summary = {
        "seed": args.seed, "device": args.device, "epochs": args.epochs, "train_seconds": round(train_seconds, 1),
        "final_train_loss": round(total / len(x_train), 4),
        "heldout_accuracy": evaluate(model, x_test, y_test), "train_accuracy": evaluate(model, x_train, y_train),
        "num_features": model.config.num_features, "reference_num_samples": reference.num_samples,
        "fid_checks": checks,
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
