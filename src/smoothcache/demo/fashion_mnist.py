"""Fashion-MNIST as Debian ships it: the bench model's training data, read from the IDX files.

Debian's package ``dataset-fashion-mnist`` holds all 70,000 images (60,000 training, 10,000 test;
28x28 grayscale product photos in 10 classes; MIT licence, Zalando Research) as gzipped IDX files
under ``/usr/share/datasets/fashion-mnist``. Nothing here downloads: a missing package or a damaged
file is one ``FashionMnistError`` that says what to install.

Example:
    >>> images, labels = load_fashion_mnist("train")   # uint8 (60000, 28, 28), int64 (60000,)
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from ..errors import FashionMnistError

__all__ = ["CLASS_NAMES", "DEBIAN_DIR", "FashionMnistError", "load_fashion_mnist", "read_idx"]

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SPLITS = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60_000),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10_000)}
INSTALL = "install it with: apt-get install dataset-fashion-mnist (Debian/Ubuntu), or pass the folder that holds the files"
IDX_UBYTE = 0x08  # the IDX type code of unsigned bytes, the only one Fashion-MNIST uses


def read_idx(path: str | Path) -> np.ndarray:
    """One IDX file (gzipped or not) as a uint8 array of its declared shape.

    The header is checked against the bytes that follow, so a truncated or foreign file is refused
    instead of being reshaped into nonsense.
    """
    path = Path(path)
    if not path.is_file():
        raise FashionMnistError(f"Fashion-MNIST file {path} is missing; {INSTALL}.")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise FashionMnistError(f"Fashion-MNIST file {path} is not readable gzip data ({exc}); "
                                f"reinstall it: apt-get install --reinstall dataset-fashion-mnist.") from exc
    if len(raw) < 4 or raw[0:2] != b"\x00\x00" or raw[2] != IDX_UBYTE or not 1 <= raw[3] <= 4:
        raise FashionMnistError(f"Fashion-MNIST file {path} has no IDX header of unsigned bytes; "
                                f"reinstall it: apt-get install --reinstall dataset-fashion-mnist.")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise FashionMnistError(f"Fashion-MNIST file {path} ends inside its header; reinstall the package.")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise FashionMnistError(f"Fashion-MNIST file {path} holds {len(raw)} bytes but its header {shape} "
                                f"needs {expected}; reinstall it: apt-get install --reinstall dataset-fashion-mnist.")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(split: str = "all", directory: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 28, 28) and labels int64 (N,) of ``split``: "train", "test" or "all" (train first)."""
    if split not in (*SPLITS, "all"):
        raise ValueError(f'split must be "train", "test" or "all", got {split!r}')
    directory = Path(directory) if directory is not None else DEBIAN_DIR
    if not directory.is_dir():
        raise FashionMnistError(f"Fashion-MNIST folder {directory} does not exist; {INSTALL}.")
    parts = [_load_split(name, directory) for name in (SPLITS if split == "all" else (split,))]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _load_split(split: str, directory: Path) -> tuple[np.ndarray, np.ndarray]:
    image_file, label_file, count = SPLITS[split]
    images, labels = read_idx(directory / image_file), read_idx(directory / label_file)
    if images.shape != (count, 28, 28) or labels.shape != (count,) or labels.max(initial=0) >= len(CLASS_NAMES):
        raise FashionMnistError(f"Fashion-MNIST {split} split in {directory} has images {images.shape} and labels "
                                f"{labels.shape} (max {labels.max(initial=0)}); expected ({count}, 28, 28) and "
                                f"({count},) in 0..9. Reinstall it: apt-get install --reinstall dataset-fashion-mnist.")
    return images, labels.astype(np.int64)
