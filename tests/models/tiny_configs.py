"""The tiny random-weight models the tests build, as data: one row per diffusers model class, with its config.

Each transformer is two blocks of two attention heads (HunyuanDiT: four blocks), so that a whole
pipeline runs in a fraction of a second on a CPU. A family file builds its pipeline from these rows
(``tiny_pipeline`` builds them) and sizes its text-embedding stand-ins by their configs
(``caption_channels``, ``joint_attention_dim``, ...); ``tests/conftest.py`` builds its DiT pipeline
from ``DIT_TRANSFORMER`` and ``kl_vae()``.
"""

from __future__ import annotations

from typing import Any

from torch import nn


class TinyModel:
    """One row: a diffusers model class (by name; imported only when built) and the tiny config it is built from."""

    def __init__(self, class_name: str, **config: Any) -> None:
        self.class_name = class_name
        self.config = config

    def __getitem__(self, name: str) -> Any:
        """A config value, for the inputs a test sizes to the model (``FLUX_TRANSFORMER["joint_attention_dim"]``)."""
        return self.config[name]

    def with_config(self, **config: Any) -> TinyModel:
        """The same class with ``config`` added or replaced, for a variant (SD3.5, a DiT of more blocks, ...)."""
        return TinyModel(self.class_name, **{**self.config, **config})

    def build(self) -> nn.Module:
        """The model with weights drawn from the current torch seed, in eval mode as every test uses it."""
        import diffusers

        return getattr(diffusers, self.class_name)(**self.config).eval()


def kl_vae(latent_channels: int = 4, levels: int = 1) -> TinyModel:
    """The image pipelines' AutoencoderKL: 8 channels per level, downsampling by ``2 ** (levels - 1)``."""
    return TinyModel(
        "AutoencoderKL",
        block_out_channels=(8,) * levels,
        norm_num_groups=8,
        latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        sample_size=8,
    )


# ---- Allegro --------------------------------------------------------------------------------
ALLEGRO_TRANSFORMER = TinyModel(
    "AllegroTransformer3DModel",
    num_attention_heads=2,
    attention_head_dim=12,  # the rotary embedding splits it in three
    in_channels=4,
    out_channels=4,
    num_layers=2,
    cross_attention_dim=24,  # the projected captions have the inner width, 2 x 12
    sample_width=4,
    sample_height=4,
    sample_frames=2,
    caption_channels=16,
)
# Sets the pipeline's 8x spatial and 4x temporal compression; never run.
ALLEGRO_VAE = TinyModel(
    "AutoencoderKLAllegro",
    block_out_channels=(8,) * 4,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=2,
    temporal_compression_ratio=4,
)

# ---- AuraFlow -------------------------------------------------------------------------------
AURAFLOW_TRANSFORMER = TinyModel(
    "AuraFlowTransformer2DModel",
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_mmdit_layers=2,
    num_single_dit_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    caption_projection_dim=16,
    joint_attention_dim=16,
    out_channels=4,
    pos_embed_max_size=16,
)

# ---- CogVideoX-2b and -5b --------------------------------------------------------------------
COGVIDEOX_TRANSFORMER = TinyModel(
    "CogVideoXTransformer3DModel",
    num_attention_heads=2,
    attention_head_dim=16,  # the rotary embedding splits it 4 + 6 + 6 over frames, height, width
    in_channels=4,
    out_channels=4,
    time_embed_dim=8,
    text_embed_dim=16,
    num_layers=2,
    sample_width=4,
    sample_height=4,
    sample_frames=5,
    patch_size=2,
    temporal_compression_ratio=4,
    max_text_seq_length=6,
    use_rotary_positional_embeddings=False,
)
COGVIDEOX_5B_TRANSFORMER = COGVIDEOX_TRANSFORMER.with_config(use_rotary_positional_embeddings=True)
COGVIDEOX_VAE = TinyModel(
    "AutoencoderKLCogVideoX",
    down_block_types=("CogVideoXDownBlock3D",) * 2,
    up_block_types=("CogVideoXUpBlock3D",) * 2,
    block_out_channels=(8, 8),
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=2,
    temporal_compression_ratio=4,
)

# ---- CogView4 -------------------------------------------------------------------------------
COGVIEW4_TRANSFORMER = TinyModel(
    "CogView4Transformer2DModel",
    patch_size=2,
    in_channels=4,
    num_layers=2,
    attention_head_dim=4,
    num_attention_heads=2,
    out_channels=4,
    text_embed_dim=16,
    time_embed_dim=8,
    condition_dim=4,
)

# ---- DiT (tests/conftest.py; the caller picks num_layers) ------------------------------------
DIT_TRANSFORMER = TinyModel(
    "DiTTransformer2DModel",
    sample_size=8,
    patch_size=2,
    in_channels=4,
    out_channels=8,
    attention_head_dim=8,
    num_attention_heads=2,
    num_embeds_ada_norm=1000,
    norm_type="ada_norm_zero",
)

# ---- Flux -----------------------------------------------------------------------------------
FLUX_TRANSFORMER = TinyModel(
    "FluxTransformer2DModel",
    patch_size=1,
    in_channels=4,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=16,
    pooled_projection_dim=16,
    guidance_embeds=True,
    axes_dims_rope=(2, 2, 4),
)

# ---- HunyuanVideo ---------------------------------------------------------------------------
HUNYUAN_VIDEO_TRANSFORMER = TinyModel(
    "HunyuanVideoTransformer3DModel",
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=8,
    num_layers=2,
    num_single_layers=2,
    num_refiner_layers=1,
    patch_size=1,
    patch_size_t=1,
    guidance_embeds=True,
    text_embed_dim=16,
    pooled_projection_dim=8,
    rope_axes_dim=(2, 2, 4),
)
HUNYUAN_VIDEO_VAE = TinyModel(
    "AutoencoderKLHunyuanVideo",
    latent_channels=4,
    down_block_types=("HunyuanVideoDownBlock3D",) * 4,
    up_block_types=("HunyuanVideoUpBlock3D",) * 4,
    block_out_channels=(8,) * 4,
    layers_per_block=1,
    norm_num_groups=4,
    mid_block_add_attention=False,
)

# ---- HunyuanDiT -----------------------------------------------------------------------------
HUNYUANDIT_TRANSFORMER = TinyModel(
    "HunyuanDiT2DModel",
    sample_size=4,
    num_layers=4,  # the last block takes a long skip connection from the first
    patch_size=2,
    attention_head_dim=8,
    num_attention_heads=2,
    in_channels=4,
    hidden_size=16,
    cross_attention_dim=16,  # CLIP's (here: BERT's) width
    cross_attention_dim_t5=16,
    pooled_projection_dim=16,
    text_len=5,
    text_len_t5=6,
)

# ---- LTX-Video ------------------------------------------------------------------------------
LTX_VIDEO_TRANSFORMER = TinyModel(
    "LTXVideoTransformer3DModel",
    in_channels=4,
    out_channels=4,
    patch_size=1,
    patch_size_t=1,
    num_attention_heads=2,
    attention_head_dim=8,
    cross_attention_dim=16,
    num_layers=2,
    caption_channels=16,
)
# 8x spatial, 4x temporal compression: a 32x32, 5-frame video is 2 latent frames of 4x4.
LTX_VIDEO_VAE = TinyModel(
    "AutoencoderKLLTXVideo",
    latent_channels=4,
    block_out_channels=(8, 8),
    decoder_block_out_channels=(8, 8),
    layers_per_block=(1, 1, 1),
    decoder_layers_per_block=(1, 1, 1),
    down_block_types=("LTXVideoDownBlock3D",) * 2,
    spatio_temporal_scaling=(True, True),
    decoder_spatio_temporal_scaling=(True, True),
    decoder_inject_noise=(False,) * 3,
    downsample_type=("conv", "conv"),
    upsample_residual=(False, False),
    upsample_factor=(1, 1),
    patch_size=2,
    patch_size_t=1,
)

# ---- Mochi ----------------------------------------------------------------------------------
MOCHI_TRANSFORMER = TinyModel(
    "MochiTransformer3DModel",
    patch_size=2,
    num_attention_heads=2,
    attention_head_dim=8,
    num_layers=2,
    pooled_projection_dim=16,
    in_channels=12,  # the pipeline hard-codes Mochi's 12 latent channels
    qk_norm="rms_norm",
    text_embed_dim=16,
    time_embed_dim=4,
    activation_fn="swiglu",
    max_sequence_length=16,
)
# 8x spatial, 6x temporal compression: a 32x32, 7-frame video is 2 latent frames of 4x4.
MOCHI_VAE = TinyModel(
    "AutoencoderKLMochi",
    latent_channels=12,
    encoder_block_out_channels=(32,) * 4,  # group norms of 32 groups
    decoder_block_out_channels=(32,) * 4,
    layers_per_block=(1,) * 5,
    add_attention_block=(False,) * 5,
)

# ---- PixArt-α and -Σ, and Latte (built from the same blocks) --------------------------------
PIXART_TRANSFORMER = TinyModel(
    "PixArtTransformer2DModel",
    sample_size=8,
    num_layers=2,
    patch_size=2,
    attention_head_dim=8,
    num_attention_heads=2,
    caption_channels=16,
    in_channels=4,
    out_channels=8,
    cross_attention_dim=16,
    attention_bias=True,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
)
# PixArt's blocks, a spatial and a temporal one per depth, over 3 frames.
LATTE_TRANSFORMER = TinyModel("LatteTransformer3DModel", **PIXART_TRANSFORMER.config, video_length=3)

# ---- QwenImage ------------------------------------------------------------------------------
QWENIMAGE_TRANSFORMER = TinyModel(
    "QwenImageTransformer2DModel",
    patch_size=2,
    in_channels=16,
    out_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=16,
    axes_dims_rope=(2, 2, 4),
)
QWENIMAGE_VAE = TinyModel(
    "AutoencoderKLQwenImage",
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 2, 4],
    num_res_blocks=1,
    temperal_downsample=[False, True],
    latents_mean=[0.0] * 4,
    latents_std=[1.0] * 4,
)

# ---- Sana -----------------------------------------------------------------------------------
SANA_TRANSFORMER = TinyModel(
    "SanaTransformer2DModel",
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=2,
    num_attention_heads=2,
    attention_head_dim=4,
    num_cross_attention_heads=2,
    cross_attention_head_dim=4,
    cross_attention_dim=8,
    caption_channels=8,
    sample_size=8,
)
# A deep-compression autoencoder.
SANA_VAE = TinyModel(
    "AutoencoderDC",
    in_channels=3,
    latent_channels=4,
    attention_head_dim=2,
    encoder_block_types=("ResBlock", "EfficientViTBlock"),
    decoder_block_types=("ResBlock", "EfficientViTBlock"),
    encoder_block_out_channels=(8, 8),
    decoder_block_out_channels=(8, 8),
    encoder_qkv_multiscales=((), (5,)),
    decoder_qkv_multiscales=((), (5,)),
    encoder_layers_per_block=(1, 1),
    decoder_layers_per_block=(1, 1),
    upsample_block_type="interpolate",
    downsample_block_type="conv",
    decoder_norm_types="rms_norm",
    decoder_act_fns="silu",
    scaling_factor=0.41407,
)

# ---- Stable Diffusion 3 and 3.5 -------------------------------------------------------------
SD3_TRANSFORMER = TinyModel(
    "SD3Transformer2DModel",
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=16,
    caption_projection_dim=16,
    pooled_projection_dim=32,
    out_channels=4,
    pos_embed_max_size=8,
    dual_attention_layers=(),
    qk_norm=None,
)
# SD3.5's extra image self-attention (attn2) in the first block, and normalised queries and keys.
SD35_TRANSFORMER = SD3_TRANSFORMER.with_config(dual_attention_layers=(0,), qk_norm="rms_norm")

# ---- Stable Audio Open ----------------------------------------------------------------------
STABLE_AUDIO_TRANSFORMER = TinyModel(
    "StableAudioDiTModel",
    sample_size=8,
    in_channels=3,
    num_layers=2,
    attention_head_dim=4,
    num_attention_heads=2,
    num_key_value_attention_heads=2,
    out_channels=3,
    cross_attention_dim=4,
    time_proj_dim=8,
    global_states_input_dim=8,
    cross_attention_input_dim=4,
)
STABLE_AUDIO_VAE = TinyModel(
    "AutoencoderOobleck",
    encoder_hidden_size=6,
    downsampling_ratios=[1, 2],
    decoder_channels=3,
    decoder_input_channels=3,
    audio_channels=2,
    channel_multiples=[2, 4],
    sampling_rate=4,
)
STABLE_AUDIO_PROJECTION = TinyModel(
    "StableAudioProjectionModel", text_encoder_dim=16, conditioning_dim=4, min_value=0, max_value=32
)

# ---- Wan 2.1 / 2.2 and Wan VACE ------------------------------------------------------------
# The size Wan and Wan VACE share.
WAN_SIZE = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 16,
    "freq_dim": 16,
    "ffn_dim": 32,
    "num_layers": 2,
}
WAN_TRANSFORMER = TinyModel(
    "WanTransformer3DModel", **WAN_SIZE, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32
)
WAN_VACE_TRANSFORMER = TinyModel("WanVACETransformer3DModel", **WAN_SIZE, vace_layers=[0], vace_in_channels=4)
WAN_VAE = TinyModel(
    "AutoencoderKLWan",
    base_dim=3,
    z_dim=4,
    dim_mult=[1, 1, 1, 1],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
    latents_mean=[0.0] * 4,
    latents_std=[1.0] * 4,
)
