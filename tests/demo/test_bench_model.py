"""The bench model: Fashion-MNIST read strictly, the shipped DiT loads offline through diffusers'
own DiTPipeline and draws the requested classes, and training never leaves half a model behind."""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("torchmetrics")

from diffusers import DiTPipeline

from smoothcache.demo import assets
from smoothcache.demo.bench_model import (
    BenchModelConfig,
    PixelSpaceVAE,
    build_bench_pipeline,
    build_bench_transformer,
)
from smoothcache.demo.fashion_mnist import (
    DEBIAN_DIR,
    FashionMnistError,
    load_fashion_mnist,
    read_idx,
)

ROOT = Path(__file__).resolve().parents[2]


def write_idx(path: Path, array: np.ndarray, *, gz: bool = True, lie_about: tuple[int, ...] | None = None,
              compresslevel: int = 9) -> Path:
    shape = lie_about or array.shape
    raw = bytes([0, 0, 0x08, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw, compresslevel=compresslevel) if gz else raw)
    return path


def fake_fashion_mnist(folder: Path, train: int = 60_000, test: int = 10_000) -> Path:
    """IDX files shaped as Debian's (the loader checks the real counts), filled with random photos.

    Stored uncompressed inside the gzip container: still gzip to the loader, and random photos would not
    shrink anyway (deflating 47 MB of them took seconds)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images, compresslevel=0)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10, compresslevel=0)
    return folder


# ---- the data -----------------------------------------------------------------------------------

def test_idx_files_are_read_with_their_declared_shape(tmp_path):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    assert (read_idx(write_idx(tmp_path / "a.gz", array)) == array).all()
    assert (read_idx(write_idx(tmp_path / "a", array, gz=False)) == array).all()


@pytest.mark.parametrize("damage", ["truncated", "header lies", "not gzip", "not idx"])
def test_a_damaged_idx_file_is_one_clear_error_naming_the_file(tmp_path, damage):
    path = tmp_path / "x-idx3-ubyte.gz"
    array = np.zeros((4, 28, 28))
    if damage == "truncated":
        write_idx(path, array)
        path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-10]))
    elif damage == "header lies":
        write_idx(path, array, lie_about=(5, 28, 28))
    elif damage == "not gzip":
        path.write_bytes(b"\x1f\x8b not really gzip")
    else:
        path.write_bytes(gzip.compress(b"PK\x03\x04 a zip file"))
    with pytest.raises(FashionMnistError, match=str(path)) as raised:
        read_idx(path)
    assert "dataset-fashion-mnist" in str(raised.value)


def test_a_missing_package_says_what_to_install(tmp_path):
    with pytest.raises(FashionMnistError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path / "nowhere")
    with pytest.raises(FashionMnistError, match="train-images-idx3-ubyte.gz is missing"):
        load_fashion_mnist("train", tmp_path)


def test_splits_are_checked_against_fashion_mnist_sizes(tmp_path):
    fake_fashion_mnist(tmp_path, train=100, test=10_000)
    with pytest.raises(FashionMnistError, match=r"expected \(60000, 28, 28\)"):
        load_fashion_mnist("train", tmp_path)
    images, labels = load_fashion_mnist("test", tmp_path)
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8 and labels.dtype == np.int64


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_debians_package_holds_all_70000_images():
    images, labels = load_fashion_mnist("all")
    assert images.shape == (70_000, 28, 28)
    assert np.bincount(labels).tolist() == [7000] * 10


# ---- the shipped model --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bench_pipe():
    return assets.load_bench_pipeline(progress_bar=False)


def test_the_shipped_bench_model_is_diffusers_own_dit_pipeline(bench_pipe):
    assert type(bench_pipe) is DiTPipeline
    assert isinstance(bench_pipe.vae, PixelSpaceVAE)
    config = bench_pipe.transformer.config
    assert config.num_layers >= 12 and config.sample_size == 32 and config.num_embeds_ada_norm == 1000
    weights = assets.BENCH_DIT_DIR / "transformer" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= 25 * 2**20


def test_a_few_step_sample_lands_in_the_requested_class(bench_pipe):
    scorer = assets.load_bench_scorer()
    labels = [0, 1, 5, 7, 9]  # T-shirt, trouser, sandal, sneaker, ankle boot
    images = bench_pipe(labels, guidance_scale=1.5, num_inference_steps=8, generator=torch.Generator().manual_seed(0),
                        output_type="pt").images
    assert images.shape == (5, 1, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert scorer.classifier.predict(images).tolist() == labels


def test_pixel_space_vae_returns_the_models_pixels():
    latents = torch.randn(2, 1, 32, 32)
    assert torch.equal(PixelSpaceVAE().decode(latents).sample, latents)
    assert PixelSpaceVAE().decode(latents, return_dict=False)[0] is latents


def test_a_bench_pipeline_round_trips_through_save_and_from_pretrained(tmp_path):
    pipe = build_bench_pipeline(build_bench_transformer(BenchModelConfig(depth=2, hidden_size=16, num_heads=2)))
    pipe.save_pretrained(tmp_path)
    loaded = assets.load_bench_pipeline(directory=tmp_path, progress_bar=False)
    saved, restored = pipe.transformer.state_dict(), loaded.transformer.state_dict()
    assert saved.keys() == restored.keys()
    for name, tensor in saved.items():
        assert torch.equal(tensor, restored[name]), name


@pytest.mark.parametrize("missing", ["vae/config.json", "transformer/diffusion_pytorch_model.safetensors"])
def test_absent_bench_weights_say_how_to_get_them(tmp_path, missing):
    shutil.copytree(assets.BENCH_DIT_DIR, tmp_path / "bench")
    (tmp_path / "bench" / missing).unlink()
    with pytest.raises(assets.DemoAssetError, match="scripts/train_bench_model.py") as raised:
        assets.load_bench_pipeline(directory=tmp_path / "bench")
    assert missing in str(raised.value)


# ---- training -----------------------------------------------------------------------------------

def run_training(data: Path, out: Path, monkeypatch) -> None:
    """The training script's main(), in this process (a subprocess would import torch again)."""
    spec = importlib.util.spec_from_file_location("train_bench_model", ROOT / "scripts" / "train_bench_model.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "train_bench_model", script)  # its dataclasses look themselves up there
    spec.loader.exec_module(script)
    monkeypatch.setattr(sys, "argv", ["train_bench_model.py", "--tiny", "--data", str(data), "--out", str(out),
                                      "--device", "cpu", "--guidance-scales", "2.0"])
    script.main()


def test_tiny_training_writes_a_complete_loadable_model(tmp_path, monkeypatch):
    run_training(fake_fashion_mnist(tmp_path / "data"), tmp_path / "out", monkeypatch)
    out = tmp_path / "out"
    assert not (tmp_path / "out.partial").exists()
    log = json.loads((out / "train_log.json").read_text())
    assert log["dit"]["steps"] == 20 and log["classifier"]["heldout_accuracy"] >= 0
    assert (out / "loss.png").stat().st_size > 0 and (out / "samples.png").stat().st_size > 0
    pipe = assets.load_bench_pipeline(directory=out / "bench-dit", progress_bar=False)
    assert pipe.transformer.dtype == torch.float32  # stored in float16, loaded as asked
    assets.load_bench_scorer(directory=out / "bench-classifier")


def test_training_without_the_data_stops_at_once_and_saves_nothing(tmp_path, monkeypatch):
    with pytest.raises(SystemExit) as stopped:
        run_training(tmp_path / "absent", tmp_path / "out", monkeypatch)
    message = str(stopped.value.code)
    assert "apt-get install dataset-fashion-mnist" in message and "\n" not in message  # one line
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
