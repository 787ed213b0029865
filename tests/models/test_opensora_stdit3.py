"""Open-Sora 1.2's STDiT3, sampled outside diffusers: spatial_blocks and temporal_blocks of one class,
STDiT3Block (attn, cross_attn, mlp), interleaved. A small model with the module layout of
hpcaitech/Open-Sora's opensora/models/stdit/stdit3.py, written here (Open-Sora is not imported),
sampled the way its rectified-flow sampler does: batched classifier-free guidance, one call per step."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smoothcache import find_layers

from .conftest import STEPS, FamilyCase

HIDDEN, HEADS, CAPTION_DIM, PATCH = 16, 2, 8, (1, 2, 2)


# ---- the model ------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention over dim 1 (Open-Sora's qkv / proj layout)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class MultiHeadCrossAttention(nn.Module):
    """Attention from the video tokens to the caption tokens."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q_linear(x).reshape(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv_linear(cond).reshape(b, cond.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class STDiT3Block(nn.Module):
    """adaLN-single modulated attention (within a frame, or across frames), cross-attention, MLP."""

    def __init__(self, dim: int, heads: int, temporal: bool = False) -> None:
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.cross_attn = MultiHeadCrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, frames: int, patches: int) -> torch.Tensor:
        b, n, c = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t.reshape(b, 6, c)
        ).chunk(6, dim=1)
        x_m = (self.norm1(x) * (1 + scale_msa) + shift_msa).reshape(b, frames, patches, c)
        if self.temporal:  # attend across frames at each patch position
            x_m = x_m.transpose(1, 2)
        grouped = x_m.shape
        x_m = self.attn(x_m.reshape(-1, grouped[2], c)).reshape(grouped)
        if self.temporal:
            x_m = x_m.transpose(1, 2)
        x = x + gate_msa * x_m.reshape(b, n, c)
        x = x + self.cross_attn(x, y)
        return x + gate_mlp * self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)


class STDiT3(nn.Module):
    def __init__(self, in_channels: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.x_embedder = nn.Conv3d(in_channels, HIDDEN, PATCH, stride=PATCH)
        self.t_embedder = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.SiLU(), nn.Linear(HIDDEN, HIDDEN))
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(HIDDEN, 6 * HIDDEN))
        self.y_embedder = nn.Linear(CAPTION_DIM, HIDDEN)
        self.spatial_blocks = nn.ModuleList(STDiT3Block(HIDDEN, HEADS) for _ in range(depth))
        self.temporal_blocks = nn.ModuleList(STDiT3Block(HIDDEN, HEADS, temporal=True) for _ in range(depth))
        self.final_layer = nn.Linear(HIDDEN, math.prod(PATCH) * in_channels)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x)  # (B, C, T, H, W)
        b, _, frames, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, T*H*W, C)
        half = torch.exp(-math.log(10000) * torch.arange(HIDDEN // 2) / (HIDDEN // 2))
        angles = timestep[:, None].float() * half[None]
        t = self.t_embedder(torch.cat([angles.cos(), angles.sin()], dim=-1))
        t_mlp, y = self.t_block(t), self.y_embedder(y)
        for spatial_block, temporal_block in zip(self.spatial_blocks, self.temporal_blocks, strict=True):
            x = spatial_block(x, y, t_mlp, frames, h * w)
            x = temporal_block(x, y, t_mlp, frames, h * w)
        pt, ph, pw = PATCH
        x = self.final_layer(x).reshape(b, frames, h, w, pt, ph, pw, self.in_channels)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, self.in_channels, frames * pt, h * ph, w * pw)


# ---- sampling -------------------------------------------------------------------------------
def generate(model: STDiT3, seed: int = 0, guidance_scale: float = 4.0) -> torch.Tensor:
    """Open-Sora's rectified-flow sampling: conditional and unconditional halves in one call per step."""
    g = torch.Generator().manual_seed(100)
    caption, null_caption = torch.randn(1, 5, CAPTION_DIM, generator=g), torch.zeros(1, 5, CAPTION_DIM)
    z = torch.randn(1, model.in_channels, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    timesteps = [(1.0 - i / STEPS) * 1000 for i in range(STEPS)] + [0.0]
    with torch.no_grad():
        for t, t_next in itertools.pairwise(timesteps):
            pred = model(torch.cat([z, z]), torch.full((2,), t), torch.cat([caption, null_caption]))
            cond, uncond = pred.chunk(2)
            z = z + (uncond + guidance_scale * (cond - uncond)) * (t - t_next) / 1000
    return z


def make_model() -> STDiT3:
    torch.manual_seed(0)
    return STDiT3().eval()


# ---- tests ----------------------------------------------------------------------------------
CASE = FamilyCase(
    "opensora_stdit3", make_model, generate, steps=STEPS,
    default_keys=[
        "spatial_attn-0", "spatial_mlp-0", "spatial_attn-1", "spatial_mlp-1",
        "temporal_attn-0", "temporal_mlp-0", "temporal_attn-1", "temporal_mlp-1",
    ],  # spatial and temporal blocks get their own keys
    schedule_keys={"spatial_attn", "spatial_mlp", "temporal_attn", "temporal_mlp"},
    all_ones_components=["spatial_attn", "spatial_cross_attn", "temporal_mlp"],
)  # fmt: skip


@pytest.fixture
def model():
    return make_model()


def test_cross_attention_is_opt_in_per_block_kind(model):
    layers = find_layers(model, ["temporal_cross_attn", "spatial_blocks.*.cross_attn"])
    assert [layer.block_key for layer in layers] == [
        "spatial_cross_attn-0", "spatial_cross_attn-1", "temporal_cross_attn-0", "temporal_cross_attn-1"
    ]  # fmt: skip
