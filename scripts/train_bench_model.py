"""Train the bench model (a 16-block DiT on Fashion-MNIST) and its judge (a classifier), within a time budget.

Usage (one H200: about 8 minutes; CPU works with --tiny for a smoke run):
    apt-get install dataset-fashion-mnist          # all 70,000 images, /usr/share/datasets/fashion-mnist
    python scripts/train_bench_model.py --out out/bench --dit-minutes 6
    python scripts/train_bench_model.py --tiny --out /tmp/bench   # the code paths, on a CPU, in a minute

Writes into --out, only once everything has finished (a stopped run leaves nothing that looks done):
    bench-dit/          DiTPipeline.save_pretrained: EMA transformer in float16, PixelSpaceVAE, DDIM
    bench-classifier/   the judge's config.json, model.safetensors, fid_reference.safetensors
    train_log.json      config, steps, time, device, loss curve, held-out accuracy, sample quality
    loss.png            the training loss
    samples.png         100 samples per guidance scale checked (10 per class), DDIM 50 steps

The DiT trains on all 70,000 images (epsilon prediction, DiT's linear betas, label dropout 0.1 for
classifier-free guidance, EMA). The classifier trains on the 60,000 training images only; its
accuracy on the 10,000 test images is the ceiling that sample accuracy is read against, and the
test images' features are the real side of the Fréchet distance (FD-clf).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import LabelEmbedding

from smoothcache.demo.bench_model import (
    DIT_NULL_CLASS,
    BenchModelConfig,
    build_bench_pipeline,
    build_bench_scheduler,
    build_bench_transformer,
    pad_to_model,
)
from smoothcache.demo.classifier import (
    DigitClassifier,
    DigitClassifierConfig,
    DigitFeatures,
)
from smoothcache.demo.fashion_mnist import (
    CLASS_NAMES,
    FashionMnistError,
    load_fashion_mnist,
)
from smoothcache.demo.metrics import FidReference, QualityScorer


@dataclass
class TrainPlan:
    """Optimisation settings; the step count follows from the time budget (see ``plan_steps``)."""

    batch_size: int = 512
    lr: float = 4e-4
    warmup_steps: int = 500
    ema_decay: float = 0.9995
    label_dropout: float = 0.1
    grad_clip: float = 1.0
    classifier_epochs: int = 12
    seed: int = 0


TINY_MODEL = BenchModelConfig(depth=2, hidden_size=32, num_heads=2)


def as_model_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) photos as float (N, 1, 32, 32) in [0, 1]."""
    return pad_to_model(torch.from_numpy(images).float()[:, None] / 255.0)


def shift_augment(images: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random whole-pixel shifts (no flips: Fashion-MNIST's shoes all face one way)."""
    dx, dy = (torch.randint(-max_shift, max_shift + 1, (2,), generator=generator)).tolist()
    return torch.roll(images, shifts=(dy, dx), dims=(2, 3))


def train_classifier(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                     plan: TrainPlan, device: str) -> tuple[DigitClassifier, dict]:
    """The judge: the demo's CNN shape at 32x32, trained on the training split only."""
    generator = torch.Generator().manual_seed(plan.seed)
    model = DigitClassifier(DigitClassifierConfig(image_size=32, num_features=32)).to(device)
    steps_per_epoch = math.ceil(len(x_train) / 256)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=plan.classifier_epochs * steps_per_epoch)
    x_train, y_train = x_train.to(device), y_train.to(device)
    start = time.perf_counter()
    for epoch in range(plan.classifier_epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator).to(device)
        for i in range(0, len(order), 256):
            idx = order[i:i + 256]
            loss = F.cross_entropy(model(shift_augment(x_train[idx], generator)), y_train[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"classifier epoch {epoch + 1}: loss {loss.item():.4f}", flush=True)
    model.eval()
    scorer = QualityScorer(model, device=device)
    record = {"epochs": plan.classifier_epochs, "seconds": round(time.perf_counter() - start, 1),
              "heldout_accuracy": round(scorer.accuracy(x_test, y_test), 4),
              "train_accuracy": round(scorer.accuracy(x_train[:10_000], y_train[:10_000]), 4)}
    print(f"classifier: {record}", flush=True)
    return model, record


def lr_at(step: int, total: int, plan: TrainPlan) -> float:
    """Linear warm-up, then cosine decay to a tenth at ``total``."""
    if step < plan.warmup_steps:
        return plan.lr * (step + 1) / plan.warmup_steps
    progress = min(1.0, (step - plan.warmup_steps) / max(1, total - plan.warmup_steps))
    return plan.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_dit(images: torch.Tensor, labels: torch.Tensor, model_config: BenchModelConfig, plan: TrainPlan,
              device: str, minutes: float, max_steps: int | None) -> tuple[torch.nn.Module, dict]:
    """Epsilon-prediction training with label dropout; returns the EMA model and the log.

    The step count is fixed after 200 timed steps so that the cosine decay ends inside ``minutes``.
    """
    torch.manual_seed(plan.seed)
    model = build_bench_transformer(model_config).to(device)
    ema = build_bench_transformer(model_config).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False).eval()
    model.train()
    for module in model.modules():  # dropped once per sample below, not independently in every block
        if isinstance(module, LabelEmbedding):
            module.eval()
    alphas_cumprod = build_bench_scheduler().alphas_cumprod.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=plan.lr, weight_decay=0.0, betas=(0.9, 0.99),
                            fused=device.startswith("cuda"))
    params, ema_params = list(model.parameters()), list(ema.parameters())
    x_all, y_all = images.to(device) * 2 - 1, labels.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))

    total = max_steps or 10**9
    log: dict = {"loss": []}
    window: list[torch.Tensor] = []
    start = time.perf_counter()
    step = 0
    while step < total:
        idx = torch.randint(0, len(x_all), (plan.batch_size,), device=device)
        x0, y = x_all[idx], y_all[idx]
        y = torch.where(torch.rand(plan.batch_size, device=device) < plan.label_dropout, DIT_NULL_CLASS, y)
        t = torch.randint(0, 1000, (plan.batch_size,), device=device)
        noise = torch.randn_like(x0)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        with autocast:
            pred = model(a.sqrt() * x0 + (1 - a).sqrt() * noise, timestep=t, class_labels=y).sample
        loss = F.mse_loss(pred.float(), noise)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, plan)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, plan.grad_clip)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - min(plan.ema_decay, (1 + step) / (10 + step)))
        window.append(loss.detach())
        step += 1
        if step == 200 and max_steps is None:
            rate = step / (time.perf_counter() - start)
            total = int(rate * minutes * 60)
            log["steps_per_second"] = round(rate, 2)
            print(f"{rate:.1f} steps/s: planning {total} steps for {minutes} minutes", flush=True)
        if step % 100 == 0 or step == total:
            mean = torch.stack(window).mean().item()
            window = []
            log["loss"].append([step, round(mean, 5)])
            if step % 1000 == 0 or step == total:
                print(f"step {step}/{total}  loss {mean:.4f}  {time.perf_counter() - start:.0f}s", flush=True)
    full_windows = [loss for logged_step, loss in log["loss"] if logged_step % 100 == 0]  # a last partial window is noisy
    log.update(steps=step, seconds=round(time.perf_counter() - start, 1),
               final_loss=full_windows[-1] if full_windows else log["loss"][-1][1],
               samples_seen=step * plan.batch_size, epochs=round(step * plan.batch_size / len(x_all), 1))
    return ema, log


@torch.no_grad()
def evaluate_samples(pipe, scorer: QualityScorer, scales: list[float], per_class: int, steps: int) -> tuple[dict, dict]:
    """Accuracy and FD-clf of ``per_class`` samples a class at each guidance scale; and the images."""
    labels = torch.arange(10).repeat_interleave(per_class)
    results, grids = {}, {}
    for scale in scales:
        images = pipe(labels.tolist(), guidance_scale=scale, num_inference_steps=steps,
                      generator=torch.Generator(pipe.device).manual_seed(0), output_type="pt").images.float()
        results[str(scale)] = {"accuracy": round(scorer.accuracy(images, labels), 4),
                               "fd_clf": round(scorer.fid(images), 3)}
        grids[str(scale)] = images.reshape(10, per_class, 1, 32, 32)[:, :10].cpu()
        print(f"guidance {scale}: {results[str(scale)]}", flush=True)
    return results, grids


def save_plots(log: dict, grids: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = zip(*log["dit"]["loss"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses)
    ax.set(xlabel="training step", ylabel="MSE on the noise (mean of 100 steps)", yscale="log",
           title=f"bench DiT on Fashion-MNIST ({log['device']}, {log['dit']['seconds']:.0f} s)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.6))
    for ax, (scale, grid) in zip(np.atleast_1d(axes), grids.items()):
        tiles = grid[:, :, 0].permute(0, 2, 1, 3).reshape(10 * 32, -1)
        ax.imshow(tiles.numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"guidance {scale}")
        ax.set_yticks([16 + 32 * i for i in range(10)], CLASS_NAMES, fontsize=6)
        ax.set_xticks([])
    fig.tight_layout()
    fig.savefig(out / "samples.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=None, help="folder of the IDX files (default: Debian's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dit-minutes", type=float, default=6.0, help="training time of the DiT")
    parser.add_argument("--guidance-scales", type=float, nargs="+", default=[1.5, 2.0, 3.0, 4.0])
    parser.add_argument("--tiny", action="store_true", help="a two-block model and a few steps: the code paths")
    args = parser.parse_args()

    plan = TrainPlan()
    model_config = TINY_MODEL if args.tiny else BenchModelConfig()
    if args.tiny:
        plan = TrainPlan(batch_size=16, warmup_steps=5, classifier_epochs=1)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    try:
        train_images, train_labels = load_fashion_mnist("train", args.data)
        test_images, test_labels = load_fashion_mnist("test", args.data)
    except FashionMnistError as error:
        raise SystemExit(f"train_bench_model: {error}") from None
    if args.tiny:
        train_images, train_labels, test_images, test_labels = (
            train_images[:512], train_labels[:512], test_images[:256], test_labels[:256])
    x_train, y_train = as_model_input(train_images), torch.from_numpy(train_labels)
    x_test, y_test = as_model_input(test_images), torch.from_numpy(test_labels)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"{len(x_train)} training and {len(x_test)} test images on {device_name}", flush=True)

    classifier, classifier_log = train_classifier(x_train, y_train, x_test.to(args.device), y_test.to(args.device),
                                                  plan, args.device)
    reference = FidReference.from_images(DigitFeatures(classifier), x_test.to(args.device))
    scorer = QualityScorer(classifier, reference, device=args.device)
    # The estimator's floor: real training photos against the test photos, at the harness's sample count.
    floor_count = min(1000, len(x_train))
    classifier_log["fd_clf_real_train_photos"] = {"count": floor_count,
                                                  "value": round(scorer.fid(x_train[:floor_count]), 3)}

    ema, dit_log = train_dit(torch.cat([x_train, x_test]), torch.cat([y_train, y_test]), model_config, plan,
                             args.device, args.dit_minutes, 20 if args.tiny else None)
    pipe = build_bench_pipeline(ema.to(torch.float16) if args.device.startswith("cuda") else ema).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    quality, grids = evaluate_samples(pipe, scorer, args.guidance_scales, per_class=10 if args.tiny else 100,
                                      steps=5 if args.tiny else 50)

    log = {"device": device_name, "torch": torch.__version__, "model": asdict(model_config), "plan": asdict(plan),
           "parameters": sum(p.numel() for p in ema.parameters()), "dit": dit_log, "classifier": classifier_log,
           "samples_ddim50_100_per_class": quality, "data": "Fashion-MNIST, Debian dataset-fashion-mnist"}
    # Everything goes to a sibling folder first and is moved into place only when it is complete.
    staging = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    build_bench_pipeline(ema.cpu().to(torch.float16)).save_pretrained(staging / "bench-dit", safe_serialization=True)
    classifier.cpu().save_pretrained(staging / "bench-classifier")
    reference.save(staging / "bench-classifier" / "fid_reference.safetensors")
    save_plots(log, grids, staging)
    (staging / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    shutil.rmtree(args.out, ignore_errors=True)
    staging.rename(args.out)
    print(json.dumps({k: v for k, v in log.items() if k != "dit"}, indent=1), flush=True)
    print(f"saved to {args.out}", flush=True)


if __name__ == "__main__":
    main()
