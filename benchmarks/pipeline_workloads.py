"""The pipelines pipeline_speed.py times (``dit``, ``flux``, ``wan``), each at real size or tiny, and
what each cache is given for them: the step mask, the block and layer keys, how a generation calls
the pipeline and which output is compared. pipeline_speed.py's docstring describes each."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import gpu_bench
import gpu_peers
import torch
from torch import nn

# The tiny DiT: 10 steps, every 2nd computed plus the first and last, as the alpha=0.18 pattern does
DIT_TINY_MASK = (1, 0, 1, 0, 1, 0, 1, 0, 1, 1)
WAN_2_1_T2V_1_3B = {  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json
    "patch_size": (1, 2, 2), "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16,
    "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024,
}
WAN_TINY = {
    "patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 16,
    "out_channels": 16, "text_dim": 32, "freq_dim": 16, "ffn_dim": 32, "num_layers": 2,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 32,
}
WAN_SCHEDULER = {  # Wan 2.1's UniPC flow scheduler; flow_shift 3.0 for 480p (5.0 for 720p)
    "prediction_type": "flow_prediction", "use_flow_sigmas": True, "num_train_timesteps": 1000, "flow_shift": 3.0,
}


@dataclass
class Workload:
    """One model's pipeline, how a generation calls it, and what each cache is given."""

    model: str
    pipe: Any
    steps: int
    mask: tuple[int, ...]
    block_keys: tuple[str, ...]
    layer_keys: tuple[str, ...]
    calls_per_step: int  # transformer calls per denoising step
    generate: Callable[[int, torch.Generator], torch.Tensor]  # (batch, generator) -> output compared
    attentions: Callable[[nn.Module], list[nn.Module]]  # each block's self-attention: every method here skips it on a reused step
    settings: dict[str, Any]
    compile_guess_s: float  # for the run-time estimate only
    compiled_factor: float  # a compiled generation's time over an eager one, for the estimate only


class LatentsOut(nn.Module):
    """Stands in for DiTPipeline's VAE, which the pipeline always calls: ``decode`` returns three of
    the four latent channels (the pipeline then scales and clamps them) and keeps the latents it
    was handed, the output this benchmark compares."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(scaling_factor=1.0)  # DiTPipeline divides the latents by it
        self.register_buffer("anchor", torch.zeros(()), persistent=False)  # for the pipeline's device lookup
        self.latents: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    def decode(self, latents: torch.Tensor) -> SimpleNamespace:
        self.latents = latents
        return SimpleNamespace(sample=latents[:, :3])


def dtype_for(device: str, dtype: torch.dtype) -> torch.dtype:
    """The model's dtype, except float32 on the CPU (half precision is slow there and checks nothing more)."""
    return torch.float32 if torch.device(device).type == "cpu" else dtype


def dit_workload(tiny: bool, device: str) -> Workload:
    from diffusers import DDIMScheduler, DiTPipeline

    dtype = dtype_for(device, torch.float16)
    torch.manual_seed(0)
    pipe = DiTPipeline(transformer=gpu_bench.dit_xl(device, dtype, tiny), vae=LatentsOut().to(device), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    mask = DIT_TINY_MASK if tiny else gpu_bench.ALPHA_018

    def generate(batch: int, generator: torch.Generator) -> torch.Tensor:
        pipe(class_labels=[i % 1000 for i in range(batch)], guidance_scale=4.0, num_inference_steps=len(mask),
             generator=generator, output_type="pt")
        return pipe.vae.latents

    return Workload(
        "dit", pipe, len(mask), tuple(mask), ("block",), ("attn1", "ff"), 1, generate,
        attentions=lambda model: [block.attn1 for block in model.transformer_blocks],
        settings={"pipeline": "DiTPipeline", "transformer": "DiT-XL/2-256 shape" + (" (tiny)" if tiny else ""),
                  "dtype": str(dtype), "scheduler": "DDIMScheduler()", "guidance_scale": 4.0, "cfg": "batched (2x batch)",
                  "vae": "LatentsOut stand-in: decode returns 3 of 4 latent channels (no convolution)",
                  "output_compared": "the latents handed to decode", "image": "256x256 (32x32 latents)"},
        compile_guess_s=2.0 if tiny else 45.0, compiled_factor=0.3,
    )


def flux_workload(tiny: bool, device: str) -> Workload:
    dtype = dtype_for(device, torch.bfloat16)
    setup = gpu_peers.build(tiny, device, dtype)
    mask = medium_mask(setup.steps)

    def generate(batch: int, generator: torch.Generator) -> torch.Tensor:
        # the embeddings repeated to the batch, as encode_prompt gives them from prompts (passed in, they are not)
        return setup.pipe(
            prompt_embeds=setup.prompt_embeds.repeat(batch, 1, 1), pooled_prompt_embeds=setup.pooled_prompt_embeds.repeat(batch, 1),
            height=setup.size, width=setup.size, num_inference_steps=setup.steps, guidance_scale=3.5,
            num_images_per_prompt=1, generator=generator, output_type="latent",
        ).images

    return Workload(
        "flux", setup.pipe, setup.steps, mask, ("block", "single_block"),
        ("attn", "ff", "ff_context", "single_attn", "single_proj_mlp"), 1, generate,
        attentions=lambda model: [block.attn for block in gpu_peers.blocks_of(model)],
        settings={"pipeline": "FluxPipeline", "transformer": gpu_peers.FLUX_TINY if tiny else gpu_peers.FLUX_DEV,
                  "dtype": str(dtype), "scheduler": gpu_peers.FLUX_DEV_SCHEDULER, "guidance_scale": 3.5,
                  "image": f"{setup.size}x{setup.size}", "text_tokens": setup.prompt_embeds.shape[1],
                  "vae": "excluded (output_type='latent')", "output_compared": "packed latents"},
        compile_guess_s=2.0 if tiny else 100.0, compiled_factor=0.85,
    )


def cast_as_loaded(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model``'s parameters in ``dtype`` except those of the modules its class keeps in float32,
    as ``from_pretrained(torch_dtype=dtype)`` loads them (Wan: rope, time embedder, modulation
    tables, norms); buffers stay as built (Wan's rotary tables: float32)."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, parameter in model.named_parameters():
        if not keep.intersection(name.split(".")):
            parameter.data = parameter.data.to(dtype)
    return model


def wan_pipeline(config: dict[str, Any], device: str, dtype: torch.dtype) -> Any:
    """A ``WanPipeline`` around a transformer of ``config`` with random weights (seed 0), as loaded
    in ``dtype``, with Wan 2.1's scheduler and no text encoder or VAE (embeddings are passed in,
    latents come out)."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device(device):  # made on the device: no copy on the host
        transformer = cast_as_loaded(WanTransformer3DModel(**config), dtype).eval().requires_grad_(False)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                       scheduler=UniPCMultistepScheduler(**WAN_SCHEDULER))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_workload(tiny: bool, device: str) -> Workload:
    dtype = dtype_for(device, torch.bfloat16)
    config = WAN_TINY if tiny else WAN_2_1_T2V_1_3B
    pipe = wan_pipeline(config, device, dtype)
    height, width, frames, steps, tokens = (32, 32, 5, 12, 8) if tiny else (480, 832, 81, 30, 512)
    g = torch.Generator().manual_seed(100)
    prompt, negative = (torch.randn(1, tokens, config["text_dim"], generator=g).to(device, dtype) for _ in range(2))

    def generate(batch: int, generator: torch.Generator) -> torch.Tensor:
        # the embeddings repeated to the batch, as encode_prompt gives them from prompt strings: passed in,
        # they are not repeated, and cross-attention with a batch-1 key falls back to torch's math kernel
        return pipe(
            prompt_embeds=prompt.repeat(batch, 1, 1), negative_prompt_embeds=negative.repeat(batch, 1, 1),
            height=height, width=width, num_frames=frames, num_inference_steps=steps, guidance_scale=5.0,
            num_videos_per_prompt=1, generator=generator, output_type="latent",
        ).frames

    return Workload(
        "wan", pipe, steps, medium_mask(steps), ("block",), ("attn1", "ffn"), 2, generate,
        attentions=lambda model: [block.attn1 for block in model.blocks],
        settings={"pipeline": "WanPipeline", "transformer": config, "dtype": str(dtype),
                  "scheduler": {"class": "UniPCMultistepScheduler", **WAN_SCHEDULER}, "guidance_scale": 5.0,
                  "cfg": "sequential (two transformer calls per step)", "video": f"{frames}x{height}x{width}",
                  "text_tokens": tokens, "vae": "excluded (output_type='latent')", "output_compared": "latents"},
        compile_guess_s=2.0 if tiny else 60.0, compiled_factor=0.9,
    )


def medium_mask(steps: int) -> tuple[int, ...]:
    """cache-dit's 'medium' step mask for ``steps`` (15 of 28 steps computed at 28)."""
    import cache_dit

    return tuple(int(m) for m in cache_dit.steps_mask(mask_policy="medium", total_steps=steps))


BUILDERS: dict[str, Callable[[bool, str], Workload]] = {"dit": dit_workload, "flux": flux_workload, "wan": wan_workload}
