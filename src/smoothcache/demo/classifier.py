"""The small digit classifier that judges demo samples: class accuracy and Fréchet features.

One CNN does both jobs: its logits say whether a sample shows the requested digit, and its
penultimate layer is the feature space of the demo's Fréchet distance (an Inception network would
be 100 MB and know nothing about 28x28 digits).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["DigitClassifier", "DigitClassifierConfig", "DigitFeatures"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class DigitClassifierConfig:
    """Shape of the classifier; saved beside its weights as JSON."""

    image_size: int = 28
    num_classes: int = 10
    channels: tuple[int, int] = (32, 64)
    num_features: int = 32  # small, so Fréchet distances of ~50 samples are not all estimator bias


class DigitClassifier(nn.Module):
    """Two conv stages, then a ``num_features`` embedding, then class logits.

    Takes images in [0, 1] of shape (B, 1, image_size, image_size).
    """

    def __init__(self, config: DigitClassifierConfig | None = None):
        super().__init__()
        self.config = config or DigitClassifierConfig()
        c1, c2 = self.config.channels
        self.conv = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.GroupNorm(8, c1), nn.SiLU(),
            nn.Conv2d(c1, c1, 3, padding=1), nn.GroupNorm(8, c1), nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.GroupNorm(8, c2), nn.SiLU(),
            nn.Conv2d(c2, c2, 3, padding=1), nn.GroupNorm(8, c2), nn.SiLU(),
            nn.MaxPool2d(2),
        )
        side = self.config.image_size // 4
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(c2 * side * side, self.config.num_features), nn.SiLU())
        self.head = nn.Linear(self.config.num_features, self.config.num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations, shape (B, num_features)."""
        size = self.config.image_size
        if images.ndim != 4 or images.shape[1:] != (1, size, size):
            raise ValueError(
                f"DigitClassifier expects images of shape (B, 1, {size}, {size}) in [0, 1], "
                f"got {tuple(images.shape)}"
            )
        return self.embed(self.conv(images * 2 - 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits, shape (B, num_classes)."""
        return self.head(self.features(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The most likely class of each image."""
        return self(images).argmax(dim=1)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(directory / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> DigitClassifier:
        """Load what ``save_pretrained`` wrote, in eval mode. Errors are the raw I/O or safetensors ones;
        ``smoothcache.demo.assets.load_classifier`` turns them into advice."""
        directory = Path(directory)
        raw = json.loads((directory / CONFIG_NAME).read_text())
        config = DigitClassifierConfig(**{**raw, "channels": tuple(raw["channels"])})
        model = cls(config)
        model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        return model.to(device).eval()


class DigitFeatures(nn.Module):
    """The classifier's feature map as torchmetrics' FID wants it: a module with ``num_features``."""

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.config.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images.float())

