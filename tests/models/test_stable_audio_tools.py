"""Stable Audio Open as stable-audio-tools samples it, outside diffusers: a DiffusionTransformer whose
ContinuousTransformer holds TransformerBlocks (self_attn, cross_attn, ff). A small model with the
module layout of stable-audio-tools 0.0.19 (models/dit.py, models/transformer.py), written here:
the package pins torch, numpy, pandas and torchmetrics versions that cannot install next to ours.
Sampled as its v-objective sampler does, with batched classifier-free guidance."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import smoothcache
from smoothcache import find_layers

from .conftest import STEPS, FamilyCase

DIM, HEADS, COND_DIM, CHANNELS = 16, 2, 8, 4


class Attention(nn.Module):
    def __init__(self, dim: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q = self.to_q(x).reshape(b, n, HEADS, c // HEADS).transpose(1, 2)
        k, v = self.to_kv(x if context is None else context).chunk(2, dim=-1)
        k, v = (t.reshape(b, -1, HEADS, c // HEADS).transpose(1, 2) for t in (k, v))
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.pre_norm = nn.LayerNorm(dim)
        self.self_attn = Attention(dim)
        self.cross_attend_norm = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, COND_DIM)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.pre_norm(x))
        x = x + self.cross_attn(self.cross_attend_norm(x), context=context)
        return x + self.ff(self.ff_norm(x))


class ContinuousTransformer(nn.Module):
    def __init__(self, dim: int, depth: int) -> None:
        super().__init__()
        self.project_in = nn.Linear(dim, dim, bias=False)
        self.layers = nn.ModuleList(TransformerBlock(dim) for _ in range(depth))
        self.project_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.project_in(x)
        for layer in self.layers:
            x = layer(x, context)
        return self.project_out(x)


class DiffusionTransformer(nn.Module):
    def __init__(self, depth: int = 2) -> None:
        super().__init__()
        self.timestep_features = nn.Linear(1, DIM)
        self.preprocess_conv = nn.Conv1d(CHANNELS, DIM, 1)
        self.transformer = ContinuousTransformer(DIM, depth)
        self.postprocess_conv = nn.Conv1d(DIM, CHANNELS, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cross_attn_cond: torch.Tensor) -> torch.Tensor:
        h = self.preprocess_conv(x).transpose(1, 2) + self.timestep_features(t[:, None])[:, None]
        return self.postprocess_conv(self.transformer(h, cross_attn_cond).transpose(1, 2))


def generate(model: DiffusionTransformer, seed: int = 0, cfg_scale: float = 6.0) -> torch.Tensor:
    """A v-objective Euler sampler over t in (1, 0] with conditional and null halves in one call."""
    g = torch.Generator().manual_seed(100)
    cond, null = torch.randn(1, 3, COND_DIM, generator=g), torch.zeros(1, 3, COND_DIM)
    x = torch.randn(1, CHANNELS, 12, generator=torch.Generator().manual_seed(seed))
    ts = torch.linspace(1, 0, STEPS + 1)
    with torch.no_grad():
        for t, t_next in itertools.pairwise(ts):
            v = model(torch.cat([x, x]), t.repeat(2), torch.cat([cond, null]))
            v_cond, v_null = v.chunk(2)
            v = v_null + cfg_scale * (v_cond - v_null)
            alpha, sigma = math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)
            denoised, eps = alpha * x - sigma * v, sigma * x + alpha * v
            a_next, s_next = math.cos(t_next * math.pi / 2), math.sin(t_next * math.pi / 2)
            x = denoised * a_next + eps * s_next
    return x


def make_model() -> DiffusionTransformer:
    torch.manual_seed(0)
    return DiffusionTransformer().eval()


CASE = FamilyCase(
    "stable_audio_tools", make_model, generate, steps=STEPS,
    default_keys=["self_attn-0", "ff-0", "self_attn-1", "ff-1"],  # found by model class, with its own keys
    schedule_keys={"self_attn", "ff"},
    all_ones_components=["self_attn", "cross_attn", "ff"],
)  # fmt: skip


@pytest.fixture
def model():
    return make_model()


def test_cross_attention_is_opt_in_under_its_own_key(model):
    assert [layer.layer_type for layer in find_layers(model, ["cross_attn"])] == ["cross_attn", "cross_attn"]


def test_other_models_with_a_transformerblock_class_are_not_taken_for_it():
    class Other(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([TransformerBlock(DIM)])

    assert find_layers(Other(), ["layers.*.ff"])[0].layer_type == "ff"  # patterns still work
    with pytest.raises(smoothcache.NoCacheableLayersError, match="Other has no block class smoothcache knows"):
        find_layers(Other())
