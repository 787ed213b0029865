"""Tiny random-weight models and pipelines, built from configs, offline."""

from __future__ import annotations

import pytest
import torch
from models.tiny_configs import DIT_TRANSFORMER, kl_vae
from torch import nn

STEPS = 10

# Tiny models run far faster on one thread than with threads fighting over a 2-core machine.
torch.set_num_threads(1)


def make_dit_pipeline(num_layers: int = 2, seed: int = 0, cross_attention: bool = False):
    """A diffusers DiTPipeline small enough for a CPU test (8x8 latents, 2 heads of 8)."""
    from diffusers import DDIMScheduler, DiTPipeline

    torch.manual_seed(seed)
    transformer = DIT_TRANSFORMER.with_config(num_layers=num_layers).build()
    vae = kl_vae().build()
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed: int = 0, steps: int = STEPS, labels=(1, 2)) -> torch.Tensor:
    return pipe(
        class_labels=list(labels),
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images


@pytest.fixture
def dit_pipe():
    return make_dit_pipeline()


class CallCounter:
    """Counts real executions of a module (a forward hook runs only when forward runs)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.count = 0
        self.handles = [m.register_forward_hook(self._hit) for m in modules]

    def _hit(self, *args) -> None:
        self.count += 1

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# ---- a model shaped like facebookresearch/DiT's models.py (DiTBlock with .attn and .mlp) ----
class Attention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v))


class DiTBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = Attention(dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 4), nn.GELU(), nn.Linear(dim * 4, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=-1)
        x = x + g1 * self.attn(self.norm1(x) * (1 + sc1) + s1)
        return x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + s2)


class OriginalStyleDiT(nn.Module):
    """Token-space toy with the original DiT's interface: forward(x, t, y) and forward_with_cfg."""

    def __init__(self, dim: int = 16, depth: int = 2, num_classes: int = 4, tokens: int = 6) -> None:
        super().__init__()
        self.tokens = tokens
        self.t_embedder = nn.Linear(1, dim)
        self.y_embedder = nn.Embedding(num_classes + 1, dim)
        self.x_embedder = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(DiTBlock(dim) for _ in range(depth))
        self.final_layer = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.t_embedder(t[:, None].float() / 1000) + self.y_embedder(y)
        h = self.x_embedder(x)
        for block in self.blocks:
            h = block(h, c)
        return self.final_layer(h)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        cond, uncond = out.chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([guided, guided])


def sample_loop(model_fn, x: torch.Tensor, steps: int, **kwargs) -> torch.Tensor:
    """A plain deterministic sampler calling the model once per step, like DiT's p_sample_loop."""
    for i in reversed(range(steps)):
        t = torch.full((len(x),), i * (1000 // steps), dtype=torch.long)
        x = x - 0.1 * model_fn(x, t, **kwargs)
    return x


@pytest.fixture
def original_dit():
    torch.manual_seed(0)
    return OriginalStyleDiT().eval()


@pytest.fixture
def deterministic_convolutions():
    """cuDNN picks the same convolution algorithm at every call, so GPU outputs compare bit for bit."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved
