"""The shipped demo: model and classifier load offline, draw and recognise digits, metrics behave."""

from __future__ import annotations

import ast
import math
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("torchmetrics")

from torchmetrics.image.fid import FrechetInceptionDistance

from smoothcache.demo import assets
from smoothcache.demo.classifier import DigitFeatures
from smoothcache.demo.metrics import FidReference, QualityScorer

# Measured on the shipped weights (docs/demo_training.md): 20 digits (2 per class), seed 0,
# 20 steps, guidance 4 -> 20/20 correct. The floor leaves room for CPU/BLAS differences.
SAMPLE_ACCURACY_FLOOR = 0.9
HELDOUT_ACCURACY_FLOOR = 0.97


@pytest.fixture(scope="module")
def pipe():
    return assets.load_demo_pipeline(progress_bar=False)


@pytest.fixture(scope="module")
def scorer():
    return assets.load_quality_scorer()


@pytest.fixture(scope="module")
def heldout():
    return assets.load_heldout_digits()


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ---- the demo model -------------------------------------------------------------------------

def test_demo_model_draws_the_requested_digits(pipe, scorer):
    labels = list(range(10)) * 2
    images = pipe(labels, num_inference_steps=20, generator=torch.manual_seed(0), output_type="pt").images
    assert images.shape == (20, 1, 28, 28) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert scorer.accuracy(images, labels) >= SAMPLE_ACCURACY_FLOOR


def test_one_transformer_call_per_step_on_the_guidance_batch(pipe):
    calls, set_timesteps_calls = [], []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((args[0].shape[0], kwargs["class_labels"].tolist())),
        with_kwargs=True,
    )
    original = pipe.scheduler.set_timesteps
    pipe.scheduler.set_timesteps = lambda *a, **k: (set_timesteps_calls.append(a), original(*a, **k))[1]
    try:
        pipe([3, 7], num_inference_steps=4, output_type="pt")
        assert calls == [(4, [3, 7, 10, 10])] * 4
        calls.clear()
        pipe([3, 7], guidance_scale=1.0, num_inference_steps=4, output_type="pt")
        assert calls == [(2, [3, 7])] * 4
        assert set_timesteps_calls == [(4,), (4,)]
    finally:
        hook.remove()
        del pipe.scheduler.set_timesteps


def test_output_types_and_seeding(pipe):
    run = lambda **kw: pipe([1, 2], num_inference_steps=2, generator=torch.manual_seed(5), **kw)
    pil = run().images
    assert [(im.mode, im.size) for im in pil] == [("L", (28, 28))] * 2
    assert run(output_type="np").images.shape == (2, 28, 28, 1)
    (pt,) = run(output_type="pt", return_dict=False)
    assert torch.equal(pt, run(output_type="pt").images)


def test_rejects_class_labels_outside_the_digits(pipe):
    with pytest.raises(ValueError, match=r"0\.\.9"):
        pipe([10], num_inference_steps=2)


# ---- the classifier and metrics -------------------------------------------------------------

def test_classifier_reads_heldout_real_digits(scorer, heldout):
    images, labels = heldout
    assert images.shape == (500, 1, 28, 28) and torch.bincount(labels).tolist() == [50] * 10
    assert scorer.accuracy(images, labels) >= HELDOUT_ACCURACY_FLOOR


def test_shipped_fid_reference_ranks_real_digits_far_above_noise(scorer, heldout):
    reference = assets.load_fid_reference()
    assert reference.num_samples == 5000 and reference.features_cov_sum.shape == (32, 32)
    real = scorer.fid(heldout[0])
    noise = scorer.fid(torch.rand(500, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    assert real < 2.0 and noise > 50 * real


def test_fid_of_digits_against_themselves_is_zero(scorer, heldout):
    features = DigitFeatures(scorer.classifier)
    own = QualityScorer(scorer.classifier, FidReference.from_images(features, heldout[0]))
    assert own.fid(heldout[0]) == pytest.approx(0.0, abs=1e-2)


def test_loaded_statistics_give_the_same_fid_as_feeding_real_images(scorer, heldout):
    images, labels = heldout
    real, fake = images[labels < 5], images[labels >= 5][:60]
    direct = FrechetInceptionDistance(feature=DigitFeatures(scorer.classifier))
    direct.update(real, real=True)
    direct.update(fake, real=False)
    loaded = QualityScorer(scorer.classifier, FidReference.from_images(DigitFeatures(scorer.classifier), real))
    assert loaded.fid(fake) == pytest.approx(direct.compute().item(), rel=1e-5)
    assert loaded.fid(fake) == pytest.approx(direct.compute().item(), rel=1e-5)  # repeat: real side kept


def test_psnr_and_ssim(scorer, heldout):
    images = heldout[0][:8]
    assert scorer.psnr(images, images) == math.inf
    assert scorer.ssim(images, images) == pytest.approx(1.0, abs=1e-5)
    dark, grey = torch.zeros(4, 1, 28, 28), torch.full((4, 1, 28, 28), 0.1)
    assert scorer.psnr(grey, dark) == pytest.approx(20.0, abs=1e-4)  # MSE 0.01 -> 20 dB
    assert scorer.ssim(images.flip(-1), images) < 0.9
    with pytest.raises(ValueError, match="same seed"):
        scorer.psnr(images, images[:4])


# ---- broken installs ------------------------------------------------------------------------

def _copy_demo_dit(tmp_path: Path) -> Path:
    target = tmp_path / "demo-dit"
    shutil.copytree(assets.DEMO_DIT_DIR, target)
    return target


def test_missing_weights_file_is_named(tmp_path):
    directory = _copy_demo_dit(tmp_path)
    weights = directory / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    with pytest.raises(assets.DemoAssetError, match=rf"{weights}.*missing.*reinstall"):
        assets.load_demo_pipeline(directory=directory)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupted_weights_file_is_named(tmp_path, damage):
    directory = _copy_demo_dit(tmp_path)
    weights = directory / "transformer" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"not a safetensors file" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(assets.DemoAssetError, match=rf"{weights}.*corrupted.*train_demo_model\.py"):
        assets.load_demo_pipeline(directory=directory)


def test_corrupted_classifier_is_named(tmp_path):
    directory = tmp_path / "classifier"
    shutil.copytree(assets.CLASSIFIER_DIR, directory)
    (directory / "config.json").write_text("{ not json")
    with pytest.raises(assets.DemoAssetError, match=r"config\.json.*corrupted.*train_classifier\.py"):
        assets.load_classifier(directory=directory)


def test_demo_runtime_imports_no_training_packages():
    imported = set()
    for source in Path(assets.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    assert "torch" in imported and not imported & {"mlxtend", "sklearn", "pickle"}
