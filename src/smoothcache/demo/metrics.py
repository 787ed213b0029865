"""Quality of demo samples: class accuracy, Fréchet distance, and PSNR/SSIM against uncached samples.

Images everywhere are float tensors in [0, 1] of shape (B, 1, H, W).

The Fréchet distance uses torchmetrics' ``FrechetInceptionDistance`` with the demo classifier as
its feature extractor. The real side is not recomputed: ``FidReference`` holds the running sums
torchmetrics keeps for real images (feature sum, sum of outer products, count), computed once on
the training digits and shipped, so scoring needs no dataset.

Example:
    >>> scorer = QualityScorer(classifier, reference)
    >>> scorer.accuracy(images, labels), scorer.fid(images)
    >>> scorer.psnr(cached_images, uncached_images), scorer.ssim(cached_images, uncached_images)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)
from torchmetrics.image.fid import FrechetInceptionDistance

from .classifier import DigitClassifier, DigitFeatures

__all__ = ["FidReference", "QualityScorer"]


@dataclass
class FidReference:
    """The real-image statistics of a Fréchet distance, in torchmetrics' own (summed) form."""

    features_sum: torch.Tensor  # (F,) float64
    features_cov_sum: torch.Tensor  # (F, F) float64: sum of outer products, not yet centred
    num_samples: int

    @classmethod
    @torch.no_grad()
    def from_images(cls, feature_extractor: nn.Module, images: torch.Tensor, batch_size: int = 500) -> FidReference:
        """Accumulate the statistics of ``images`` exactly as ``FrechetInceptionDistance.update`` does."""
        feats = torch.cat([feature_extractor(images[i:i + batch_size]).double()
                           for i in range(0, len(images), batch_size)])
        return cls(feats.sum(0).cpu(), (feats.t() @ feats).cpu(), len(feats))

    def save(self, path: str | Path) -> None:
        save_file({
            "real_features_sum": self.features_sum.double().contiguous(),
            "real_features_cov_sum": self.features_cov_sum.double().contiguous(),
            "real_features_num_samples": torch.tensor([self.num_samples], dtype=torch.int64),
        }, str(path))

    @classmethod
    def load(cls, path: str | Path) -> FidReference:
        t = load_file(str(path))
        return cls(t["real_features_sum"], t["real_features_cov_sum"], int(t["real_features_num_samples"][0]))


class QualityScorer:
    """Scores batches of demo samples with one classifier and one set of real statistics."""

    def __init__(self, classifier: DigitClassifier, reference: FidReference | None = None,
                 device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.classifier = classifier.to(self.device).eval()
        self.reference = reference
        self._fid: FrechetInceptionDistance | None = None

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, labels: torch.Tensor | list[int]) -> float:
        """Fraction of images that the classifier reads as their requested class."""
        labels = torch.as_tensor(labels, device=self.device).reshape(-1)
        if len(labels) != len(images):
            raise ValueError(f"accuracy got {len(images)} images but {len(labels)} labels")
        return (self.classifier.predict(images.to(self.device)) == labels).float().mean().item()

    @torch.no_grad()
    def fid(self, images: torch.Tensor) -> float:
        """Fréchet distance between ``images`` and the reference digits, in classifier features."""
        if len(images) < 2:
            raise ValueError(f"fid needs at least 2 images to estimate a covariance, got {len(images)}")
        metric = self._fid_metric()
        metric.reset()  # drops the previous fake images only: reset_real_features=False
        metric.update(images.to(self.device).float(), real=False)
        return metric.compute().item()

    def psnr(self, images: torch.Tensor, reference: torch.Tensor) -> float:
        """Mean per-image PSNR in dB of ``images`` against ``reference``; inf when identical."""
        self._check_pair(images, reference)
        return peak_signal_noise_ratio(images.float(), reference.float(), data_range=1.0,
                                       dim=(1, 2, 3), reduction="elementwise_mean").item()

    def ssim(self, images: torch.Tensor, reference: torch.Tensor) -> float:
        """Mean SSIM of ``images`` against ``reference``; 1 when identical."""
        self._check_pair(images, reference)
        return structural_similarity_index_measure(images.float(), reference.float(), data_range=1.0).item()

    def _fid_metric(self) -> FrechetInceptionDistance:
        if self.reference is None:
            raise ValueError("QualityScorer has no FidReference; pass reference=... to compute fid")
        if self._fid is None:
            metric = FrechetInceptionDistance(feature=DigitFeatures(self.classifier), reset_real_features=False)
            metric.real_features_sum = self.reference.features_sum.double().clone()
            metric.real_features_cov_sum = self.reference.features_cov_sum.double().clone()
            metric.real_features_num_samples = torch.tensor(self.reference.num_samples, dtype=torch.long)
            self._fid = metric.to(self.device)
        return self._fid

    @staticmethod
    def _check_pair(images: torch.Tensor, reference: torch.Tensor) -> None:
        if images.shape != reference.shape:
            raise ValueError(f"images {tuple(images.shape)} and reference {tuple(reference.shape)} differ in shape; "
                             "compare each cached sample with the uncached sample of the same seed")
