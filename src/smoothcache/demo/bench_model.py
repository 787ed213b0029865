"""The bench model: a 16-block class-conditional DiT on Fashion-MNIST, run by diffusers' own DiTPipeline.

The demo model (4 blocks, digits) is small enough for a 2-core CPU but too shallow for the peers
built for deep models. The bench model is deep enough for them (cache-dit's DBCache computes its
first 8 blocks; diffusers' FirstBlockCache judges a step by the first block), trained here on real
images, and small enough to ship (about 21 MB in float16).

It draws 32x32 images (the 28x28 photos padded by 2 pixels) straight in pixel space, so its "VAE"
is ``PixelSpaceVAE``, a decoder that returns its input: with it the model runs through an
unmodified ``diffusers.DiTPipeline``, which is what users call. DiTPipeline takes label 1000 as the
null class of classifier-free guidance, so the label table has ImageNet's 1000 rows; only rows 0-9
(Fashion-MNIST's classes) and 1000 are trained.

Example:
    >>> pipe = load_bench_pipeline("cuda", torch.float16)          # smoothcache.demo.assets
    >>> images = pipe([0, 7], num_inference_steps=50, output_type="pt").images   # (2, 1, 32, 32)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin

from .metrics import QualityScorer

__all__ = ["DIT_NULL_CLASS", "BenchModelConfig", "PixelSpaceVAE", "build_bench_pipeline",
           "build_bench_scheduler", "build_bench_transformer", "pad_to_model", "tiny_bench", "zero_init_adaln"]

DIT_NULL_CLASS = 1000  # DiTPipeline's hard-coded "no class" label


@dataclass
class BenchModelConfig:
    """Architecture of the bench model (DiT-S-like depth, narrower so that it ships)."""

    depth: int = 16
    hidden_size: int = 160
    num_heads: int = 5
    patch_size: int = 2
    image_size: int = 32
    num_classes: int = 10  # labels actually trained; the table itself has DIT_NULL_CLASS + 1 rows


class PixelSpaceVAE(ModelMixin, ConfigMixin):
    """The identity "autoencoder" of a pixel-space model, so that DiTPipeline needs no change.

    DiTPipeline decodes with ``vae.decode(latents / vae.config.scaling_factor).sample``; with a
    scaling factor of 1 and this decoder the pipeline returns the model's own pixels.
    """

    @register_to_config
    def __init__(self, scaling_factor: float = 1.0):
        super().__init__()
        # One saved buffer gives the module a dtype, a device and a weights file, as diffusers'
        # loaders expect of a model; the decoder never reads it.
        self.register_buffer("anchor", torch.zeros(1))

    def decode(self, latents: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        return DecoderOutput(sample=latents) if return_dict else (latents,)


def build_bench_transformer(config: BenchModelConfig | None = None) -> DiTTransformer2DModel:
    """A freshly initialised bench DiT (adaLN-Zero)."""
    config = config or BenchModelConfig()
    model = DiTTransformer2DModel(
        num_attention_heads=config.num_heads, attention_head_dim=config.hidden_size // config.num_heads,
        in_channels=1, out_channels=1, num_layers=config.depth, sample_size=config.image_size,
        patch_size=config.patch_size, num_embeds_ada_norm=DIT_NULL_CLASS, norm_type="ada_norm_zero",
    )
    return zero_init_adaln(model)


def zero_init_adaln(model: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """adaLN-Zero (DiT paper): every block starts as the identity and the output layer at zero."""
    for block in model.transformer_blocks:
        torch.nn.init.zeros_(block.norm1.linear.weight)
        torch.nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    return model


def build_bench_scheduler() -> DDIMScheduler:
    """DiT's own DDIM settings (facebook/DiT-XL-2-256: linear betas 1e-4..0.02, epsilon prediction)."""
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                         prediction_type="epsilon", clip_sample=False, set_alpha_to_one=True)


def build_bench_pipeline(transformer: DiTTransformer2DModel) -> DiTPipeline:
    """diffusers' DiTPipeline around ``transformer``, with the identity VAE and DiT's scheduler."""
    return DiTPipeline(transformer=transformer, vae=PixelSpaceVAE(), scheduler=build_bench_scheduler())


def tiny_bench(device: str | torch.device = "cpu") -> tuple[DiTPipeline, QualityScorer]:
    """A random 10-block bench pipeline and a random judge: the harness's code paths on a CPU in
    seconds, not a model (10 blocks so that cache-dit's F8 has blocks left to cache; patch 4: 64 tokens)."""
    from .classifier import DigitClassifier, DigitClassifierConfig, DigitFeatures
    from .metrics import FidReference

    torch.manual_seed(0)
    transformer = build_bench_transformer(BenchModelConfig(depth=10, hidden_size=16, num_heads=2, patch_size=4))
    for parameter in transformer.parameters():  # adaLN-Zero starts as the identity: give it work to do
        parameter.data.normal_(0, 0.05)
    pipe = build_bench_pipeline(transformer.eval()).to(device)
    pipe.set_progress_bar_config(disable=True)
    classifier = DigitClassifier(DigitClassifierConfig(image_size=32, channels=(8, 8), num_features=4)).eval()
    reference = FidReference.from_images(DigitFeatures(classifier), torch.rand(32, 1, 32, 32))
    return pipe, QualityScorer(classifier, reference, device=device)


def pad_to_model(images: torch.Tensor, size: int = 32) -> torch.Tensor:
    """28x28 images (B, 1, 28, 28) in [0, 1] centred on a black ``size`` x ``size`` canvas."""
    pad = (size - images.shape[-1]) // 2
    return torch.nn.functional.pad(images, (pad, pad, pad, pad))
