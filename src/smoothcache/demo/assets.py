"""Where the demo's shipped weights live, and loading them with errors that say what to do.

Everything here loads offline from files inside the installed package (``demo/weights/``):

    demo-dit/                      DemoDiTPipeline.save_pretrained (model_index.json, transformer/, scheduler/)
    classifier/                    DigitClassifier config.json + model.safetensors
    classifier/fid_reference.safetensors   real-digit feature sums for the Fréchet distance
    heldout_digits.safetensors     500 real digits the classifier never trained on (for checks)

Example:
    >>> pipe = load_demo_pipeline()
    >>> scorer = load_quality_scorer()
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from diffusers.utils import logging as diffusers_logging
from safetensors import safe_open
from safetensors.torch import load_file

from ..errors import DemoAssetError
from .classifier import DigitClassifier
from .pipeline import DemoDiTPipeline

if TYPE_CHECKING:  # the scorers need torchmetrics (the demo extra); loading a model does not
    from .metrics import FidReference, QualityScorer

__all__ = [
    "BENCH_CLASSIFIER_DIR",
    "BENCH_DIT_DIR",
    "CLASSIFIER_DIR",
    "DEMO_DIT_DIR",
    "FID_REFERENCE_PATH",
    "HELDOUT_DIGITS_PATH",
    "WEIGHTS_DIR",
    "DemoAssetError",
    "load_bench_pipeline",
    "load_bench_scorer",
    "load_classifier",
    "load_demo_pipeline",
    "load_fid_reference",
    "load_heldout_digits",
    "load_quality_scorer",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEMO_DIT_DIR = WEIGHTS_DIR / "demo-dit"
CLASSIFIER_DIR = WEIGHTS_DIR / "classifier"
FID_REFERENCE_PATH = CLASSIFIER_DIR / "fid_reference.safetensors"
HELDOUT_DIGITS_PATH = WEIGHTS_DIR / "heldout_digits.safetensors"

DEMO_DIT_FILES = (
    "model_index.json", "scheduler/scheduler_config.json",
    "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
)
CLASSIFIER_FILES = ("config.json", "model.safetensors")

FIX_DEMO_DIT = ("reinstall smoothcache (pip install --force-reinstall --no-deps smoothcache) "
                "or retrain it with scripts/train_demo_model.py (docs/demo_training.md)")
FIX_CLASSIFIER = ("reinstall smoothcache (pip install --force-reinstall --no-deps smoothcache) "
                  "or retrain it with scripts/train_classifier.py (docs/demo_training.md)")

T = TypeVar("T")


def load_demo_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *,
                       directory: str | Path | None = None, progress_bar: bool = True) -> DemoDiTPipeline:
    """The shipped demo DiT as a ``DemoDiTPipeline`` on ``device``.

    ``directory`` overrides the shipped folder (for a retrained model); ``progress_bar=False``
    silences diffusers' per-step bar.
    """
    directory = Path(directory) if directory is not None else DEMO_DIT_DIR
    _check_files(directory, DEMO_DIT_FILES, "demo model", FIX_DEMO_DIT)
    with _diffusers_loading(progress_bar):
        pipe = _load(lambda: DemoDiTPipeline.from_pretrained(directory), directory, "demo model", FIX_DEMO_DIT)
    pipe.set_progress_bar_config(disable=not progress_bar)
    # The weights are stored in float32; cast only when asked for another dtype.
    return pipe.to(device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)


def load_classifier(device: str | torch.device = "cpu", *, directory: str | Path | None = None) -> DigitClassifier:
    """The shipped digit classifier, in eval mode on ``device``."""
    directory = Path(directory) if directory is not None else CLASSIFIER_DIR
    _check_files(directory, CLASSIFIER_FILES, "digit classifier", FIX_CLASSIFIER)
    return _load(lambda: DigitClassifier.from_pretrained(directory, device), directory, "digit classifier",
                 FIX_CLASSIFIER)


def load_fid_reference(path: str | Path | None = None) -> FidReference:
    """The real-digit statistics that ``QualityScorer.fid`` compares against."""
    from .metrics import FidReference

    path = Path(path) if path is not None else FID_REFERENCE_PATH
    _check_files(path.parent, (path.name,), "Fréchet reference statistics", FIX_CLASSIFIER)
    return _load(lambda: FidReference.load(path), path, "Fréchet reference statistics", FIX_CLASSIFIER)


def load_heldout_digits(path: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The 500 held-out real digits: images float (N, 1, 28, 28) in [0, 1] and their labels."""
    path = Path(path) if path is not None else HELDOUT_DIGITS_PATH
    _check_files(path.parent, (path.name,), "held-out digits", FIX_CLASSIFIER)
    tensors = _load(lambda: load_file(str(path)), path, "held-out digits", FIX_CLASSIFIER)
    return tensors["images"].float()[:, None] / 255.0, tensors["labels"].long()


def load_quality_scorer(device: str | torch.device = "cpu") -> QualityScorer:
    """A ``QualityScorer`` built from the shipped classifier and reference statistics."""
    from .metrics import QualityScorer

    return QualityScorer(load_classifier(device), load_fid_reference(), device=device)


@contextlib.contextmanager
def _diffusers_loading(progress_bar: bool, errors_only: bool = False) -> Iterator[None]:
    """diffusers' loading bar (and, with ``errors_only``, its warnings) off while loading, as before after."""
    was_enabled, verbosity = diffusers_logging.is_progress_bar_enabled(), diffusers_logging.get_verbosity()
    if not progress_bar:
        diffusers_logging.disable_progress_bar()  # also silences "Loading pipeline components..."
    if errors_only:
        diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)
        if was_enabled:
            diffusers_logging.enable_progress_bar()


def _check_files(directory: Path, names: tuple[str, ...], what: str, fix: str) -> None:
    """Fail early, naming the file, when a shipped file is absent or its header does not parse."""
    for name in names:
        path = directory / name
        if not path.is_file():
            raise DemoAssetError(f"The {what} file {path} is missing; {fix}.")
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    f.keys()
        except Exception as exc:
            raise DemoAssetError(f"The {what} file {path} is corrupted ({type(exc).__name__}: {exc}); {fix}.") from exc


def _load(load: Callable[[], T], where: Path, what: str, fix: str) -> T:
    """Run ``load``; a failure the header checks missed (truncated data, wrong shapes) gets the same advice."""
    try:
        return load()
    except DemoAssetError:
        raise
    except Exception as exc:
        raise DemoAssetError(f"Could not load the {what} from {where} ({type(exc).__name__}: {exc}); {fix}.") from exc


# ---- the bench model (16 blocks, Fashion-MNIST; smoothcache.demo.bench_model) ---------------------
BENCH_DIT_DIR = WEIGHTS_DIR / "bench-dit"
BENCH_CLASSIFIER_DIR = WEIGHTS_DIR / "bench-classifier"
BENCH_DIT_FILES = (
    "model_index.json", "scheduler/scheduler_config.json", "vae/config.json",
    "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
)
FIX_BENCH = ("reinstall smoothcache (pip install --force-reinstall --no-deps smoothcache) or retrain it with "
             "scripts/train_bench_model.py (docs/bench/training.md)")


def load_bench_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *,
                        directory: str | Path | None = None, progress_bar: bool = True) -> Any:
    """The shipped bench DiT as diffusers' own ``DiTPipeline`` on ``device`` (weights stored in float16)."""
    from diffusers import DiTPipeline

    from . import bench_model  # noqa: F401 (diffusers loads the "vae" only from a module already imported)

    directory = Path(directory) if directory is not None else BENCH_DIT_DIR
    _check_files(directory, BENCH_DIT_FILES, "bench model", FIX_BENCH)
    # errors_only: diffusers warns "Expected types for vae: AutoencoderKL"; the identity VAE is intended.
    with _diffusers_loading(progress_bar, errors_only=True):
        pipe = _load(lambda: DiTPipeline.from_pretrained(directory, dtype=dtype), directory, "bench model", FIX_BENCH)
    pipe.set_progress_bar_config(disable=not progress_bar)
    return pipe.to(device)


def load_bench_scorer(device: str | torch.device = "cpu", *, directory: str | Path | None = None) -> QualityScorer:
    """Accuracy and FD-clf for bench samples: the Fashion-MNIST classifier and its test-set statistics."""
    from .metrics import FidReference, QualityScorer

    directory = Path(directory) if directory is not None else BENCH_CLASSIFIER_DIR
    _check_files(directory, (*CLASSIFIER_FILES, "fid_reference.safetensors"), "bench classifier", FIX_BENCH)
    classifier = _load(lambda: DigitClassifier.from_pretrained(directory, device), directory, "bench classifier", FIX_BENCH)
    reference = _load(lambda: FidReference.load(directory / "fid_reference.safetensors"), directory,
                      "bench classifier", FIX_BENCH)
    return QualityScorer(classifier, reference, device=device)
