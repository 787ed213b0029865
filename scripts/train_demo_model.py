"""Train the demo's class-conditional pixel-space DiT and save it as a diffusers pipeline.

Usage (GPU; CPU works too, only slower):
    python scripts/export_demo_data.py                      # once: .data/digits.npz
    python scripts/train_demo_model.py --device cuda --steps 20000 --out out/demo-dit \
        --classifier src/smoothcache/demo/weights/classifier

Epsilon-prediction DDPM training on the 28x28 digits, with label dropout so that the null class
(index ``num_embeds_ada_norm``) learns the unconditional model for classifier-free guidance. The
saved pipeline holds the EMA weights. With --classifier, the script also samples 50 digits per
class at 20 steps for a few guidance scales and reports classifier accuracy (and FID when the
classifier folder has ``fid_reference.safetensors``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding
from PIL import Image
from safetensors.torch import load_file, save_file

from smoothcache.demo.bench_model import zero_init_adaln
from smoothcache.demo.pipeline import DemoDiTPipeline


@dataclass
class TrainConfig:
    """Architecture and optimisation of the demo model (sized for a 2-core CPU demo, see docs)."""

    hidden_size: int = 128
    num_heads: int = 4
    depth: int = 4
    patch_size: int = 4
    image_size: int = 28
    num_classes: int = 10
    steps: int = 20000
    batch_size: int = 512
    lr: float = 5e-4
    warmup_steps: int = 500
    weight_decay: float = 0.0
    ema_decay: float = 0.9995
    label_dropout: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0


def build_transformer(cfg: TrainConfig) -> DiTTransformer2DModel:
    model = DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=1, out_channels=1, num_layers=cfg.depth, sample_size=cfg.image_size,
        patch_size=cfg.patch_size, num_embeds_ada_norm=cfg.num_classes, norm_type="ada_norm_zero",
    )
    return zero_init_adaln(model)


def build_scheduler(cfg: TrainConfig) -> DDIMScheduler:
    # Cosine betas suit small images. Sampling starts at t=951 ("leading" + offset 1), not 999: the
    # capped cosine schedule has alpha_bar(999) ~ 0, where the x0 estimate divides by ~0. And no
    # x0 clipping: clipping x0 while keeping the guided epsilon broke guidance (accuracy fell from
    # 0.98 to 0.03 at guidance 4; docs/demo_training.md).
    return DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
        clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading", steps_offset=1,
    )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(cfg: TrainConfig, images: torch.Tensor, labels: torch.Tensor, device: str, max_minutes: float,
          log_every: int, init: Path | None) -> tuple[DiTTransformer2DModel, DiTTransformer2DModel, dict]:
    """Returns (raw model, EMA model, log)."""
    torch.manual_seed(cfg.seed)
    model = build_transformer(cfg)
    if init is not None:
        model.load_state_dict(load_file(str(init)))
        print(f"initialised from {init}")
    model.to(device)
    ema = build_transformer(cfg).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False).eval()
    scheduler = build_scheduler(cfg)
    alphas_cumprod = scheduler.alphas_cumprod.to(device)

    model.train()
    # diffusers' LabelEmbedding drops labels on its own in train mode, independently in every block;
    # we drop once per sample below instead, as the DiT paper does.
    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            m.eval()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    params, ema_params = list(model.parameters()), list(ema.parameters())
    x_all = (images.to(device) * 2 - 1)
    y_all = labels.to(device)

    log = {"loss": [], "steps_done": 0, "stopped_early": False}
    start, window = time.perf_counter(), []
    for step in range(cfg.steps):
        idx = torch.randint(0, len(x_all), (cfg.batch_size,), device=device)
        x0, y = x_all[idx], y_all[idx]
        y = torch.where(torch.rand(cfg.batch_size, device=device) < cfg.label_dropout, cfg.num_classes, y)
        t = torch.randint(0, 1000, (cfg.batch_size,), device=device)
        noise = torch.randn_like(x0)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(model(xt, timestep=t, class_labels=y).sample, noise)

        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema_params, params):
                e.lerp_(p, 1 - decay)

        window.append(loss.detach())
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            mean = torch.stack(window).mean().item()
            window = []
            elapsed = time.perf_counter() - start
            log["loss"].append([step + 1, round(mean, 5)])
            print(f"step {step + 1:6d}  loss {mean:.4f}  lr {lr_at(step, cfg):.2e}  "
                  f"{(step + 1) / elapsed:.1f} it/s  {elapsed:.0f}s", flush=True)
            if elapsed > max_minutes * 60 and step + 1 < cfg.steps:
                print(f"stopping early at step {step + 1}: --max-minutes {max_minutes} reached", flush=True)
                log["stopped_early"] = True
                break
    log["steps_done"] = step + 1
    log["train_seconds"] = round(time.perf_counter() - start, 1)
    log["final_loss"] = log["loss"][-1][1]
    return model, ema, log


def save_grid(images: torch.Tensor, rows: int, path: Path) -> None:
    """Images (N, 1, H, W) in [0, 1] as one PNG of ``rows`` rows."""
    n, _, h, w = images.shape
    cols = n // rows
    grid = images[: rows * cols, 0].reshape(rows, cols, h, w).permute(0, 2, 1, 3).reshape(rows * h, cols * w)
    Image.fromarray((grid.cpu().numpy() * 255).round().astype(np.uint8)).save(path)


@torch.no_grad()
def evaluate(pipe: DemoDiTPipeline, classifier_dir: Path, device: str, scales: list[float],
             per_class: int = 50, steps: int = 20) -> dict:
    """Classifier accuracy (and FID, if the reference is there) of samples at several guidance scales."""
    from smoothcache.demo.classifier import DigitClassifier
    from smoothcache.demo.metrics import FidReference, QualityScorer

    ref_path = classifier_dir / "fid_reference.safetensors"
    reference = FidReference.load(ref_path) if ref_path.exists() else None
    scorer = QualityScorer(DigitClassifier.from_pretrained(classifier_dir), reference, device=device)
    labels = torch.arange(10).repeat_interleave(per_class).tolist()
    results = {}
    for scale in scales:
        out = pipe(labels, guidance_scale=scale, num_inference_steps=steps,
                   generator=torch.Generator().manual_seed(0), output_type="pt").images
        entry = {"accuracy": round(scorer.accuracy(out, labels), 4)}
        if reference is not None:
            entry["fid"] = round(scorer.fid(out), 3)
        results[str(scale)] = entry
        print(f"guidance {scale}: {entry}", flush=True)
    return results


def main() -> None:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(".data/digits.npz"))
    parser.add_argument("--out", type=Path, default=Path("out/demo-dit"), help="pipeline folder (save_pretrained)")
    parser.add_argument("--extras", type=Path, default=None,
                        help="folder for log JSON, sample grid and raw (non-EMA) weights; default: --out's parent")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-minutes", type=float, default=1e9, help="stop (and still save) after this long")
    parser.add_argument("--log-every", type=int, default=500)
    parser.add_argument("--init", type=Path, default=None, help="raw weights (.safetensors) to continue from")
    parser.add_argument("--classifier", type=Path, default=None, help="classifier folder for the final evaluation")
    parser.add_argument("--guidance-scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0])
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args()
    cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    extras = args.extras or args.out.parent
    extras.mkdir(parents=True, exist_ok=True)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"device {torch.cuda.get_device_name()}", flush=True)

    data = np.load(args.data)
    images = torch.from_numpy(data["images"]).float()[:, None] / 255.0
    labels = torch.from_numpy(data["labels"]).long()
    print(f"{len(images)} digits; config {asdict(cfg)}", flush=True)

    model, ema, log = train(cfg, images, labels, args.device, args.max_minutes, args.log_every, args.init)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(extras / "raw_transformer.safetensors"))
    pipe = DemoDiTPipeline(transformer=ema.cpu(), scheduler=build_scheduler(cfg))
    pipe.save_pretrained(args.out, safe_serialization=True)
    print(f"saved pipeline to {args.out}", flush=True)

    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    grid = pipe(torch.arange(10).repeat_interleave(10).tolist(), guidance_scale=3.0, num_inference_steps=20,
                generator=torch.Generator().manual_seed(0), output_type="pt").images
    save_grid(grid, 10, extras / "samples_g3_20steps.png")
    if args.classifier is not None:
        log["evaluation_20_steps"] = evaluate(pipe, args.classifier, args.device, args.guidance_scales)
    log["config"] = asdict(cfg)
    log["device"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    (extras / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(json.dumps({k: v for k, v in log.items() if k != "loss"}, indent=1))


if __name__ == "__main__":
    main()
