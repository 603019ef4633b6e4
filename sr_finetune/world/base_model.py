"""The world's base text-to-image model: SD-2.1 classes at a size a CPU trains in under an hour.

Compared with the tiny test pipeline (``sr_finetune.tiny_models``), the caption enters
everywhere: cross-attention in every down, mid and up block, a 64-wide cross-attention and a
trained two-layer CLIP text encoder (64 wide) on the real CLIP tokenizer. The VAE halves the
resolution (32 px -> 16x16x4 latents).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from sr_finetune.clip_vocab import VOCAB_SIZE
from sr_finetune.tiny_models import SD21_BASE_SCHEDULER_CONFIG

from .scenes import IMAGE_SIZE


INITIAL_LOGVAR = -8.0


@dataclass
class WorldModelSpec:
    """Sizes of the world's base model (the defaults are what ships)."""

    vae_channels: tuple[int, ...] = (16, 32)
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_heads: tuple[int, ...] = (2, 4, 4)
    layers_per_block: int = 1
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 256
    norm_num_groups: int = 4  # 4+ channels per group: one channel per group (instance norm) erases flat colours
    sample_size: int = IMAGE_SIZE

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "WorldModelSpec":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def build_vae(spec: WorldModelSpec):
    from diffusers import AutoencoderKL

    n = len(spec.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(spec.vae_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=spec.norm_num_groups,
        sample_size=spec.sample_size,
    )
    # Start with a narrow posterior (std e^-4): at the default init (std 1) the sampled latents
    # are mostly noise and reconstruction barely learns for hundreds of steps.
    with torch.no_grad():
        logvar = slice(vae.config.latent_channels, None)
        vae.quant_conv.weight[logvar] = 0
        vae.quant_conv.bias[logvar] = INITIAL_LOGVAR
    return vae


def build_unet(spec: WorldModelSpec):
    from diffusers import UNet2DConditionModel

    n = len(spec.unet_channels)
    return UNet2DConditionModel(
        sample_size=spec.sample_size // 2 ** (len(spec.vae_channels) - 1),
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(spec.unet_channels),
        layers_per_block=spec.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        attention_head_dim=tuple(spec.unet_heads),  # diffusers' legacy name: the number of heads
        cross_attention_dim=spec.text_width,
        use_linear_projection=True,
        norm_num_groups=spec.norm_num_groups,
        flip_sin_to_cos=True,
        freq_shift=0,
        act_fn="silu",
        norm_eps=1e-5,
    )


def build_text_encoder(spec: WorldModelSpec):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=spec.text_width,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=spec.text_width,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return CLIPTextModel(config)


def scheduler_config() -> dict:
    """SD-2.1-base's noise schedule (epsilon prediction)."""
    return dict(SD21_BASE_SCHEDULER_CONFIG)


__all__ = ["WorldModelSpec", "build_text_encoder", "build_unet", "build_vae", "scheduler_config"]
