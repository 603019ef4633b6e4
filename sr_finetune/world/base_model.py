"""The world's base text-to-image model: SD-2.1 classes at a size a CPU trains in under an hour.

Compared with the tiny test pipeline (``sr_finetune.tiny_models``), the caption enters
where the features are small: cross-attention in the 8x8 and 4x4 down and up blocks and the
middle (the 16x16 level is plain, which saves a third of a training step on a CPU), a 64-wide
cross-attention and a trained two-layer CLIP text encoder (64 wide) on the real CLIP tokenizer. The VAE halves the
resolution (32 px -> 16x16x4 latents).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from sr_finetune import tiny_models

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
    plain_block: str = "highest"  # no attention at 16x16 (a third of the step time); the caption enters at 8x8, 4x4 and the middle
    norm_num_groups: int = 4  # 4+ channels per group: one channel per group (instance norm) erases flat colours
    sample_size: int = IMAGE_SIZE

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def sd_spec(self) -> tiny_models.TinySDSpec:
        """The same sizes in the tiny-model factory's terms (which builds the three models)."""
        return tiny_models.TinySDSpec(
            unet_channels=self.unet_channels, unet_head_dims=self.unet_heads, layers_per_block=self.layers_per_block,
            vae_channels=self.vae_channels, text_hidden_size=self.text_width, text_layers=self.text_layers, text_heads=self.text_heads,
            text_intermediate_size=self.text_intermediate, sample_size=self.sample_size, norm_num_groups=self.norm_num_groups,
            plain_block=self.plain_block,
        )

    @classmethod
    def from_dict(cls, data: dict) -> "WorldModelSpec":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def build_vae(spec: WorldModelSpec):
    vae = tiny_models.build_vae(spec.sd_spec())
    # Start with a narrow posterior (std e^-4): at the default init (std 1) the sampled latents
    # are mostly noise and reconstruction barely learns for hundreds of steps.
    with torch.no_grad():
        logvar = slice(vae.config.latent_channels, None)
        vae.quant_conv.weight[logvar] = 0
        vae.quant_conv.bias[logvar] = INITIAL_LOGVAR
    return vae


def build_unet(spec: WorldModelSpec):
    return tiny_models.build_unet(spec.sd_spec())


def build_text_encoder(spec: WorldModelSpec):
    return tiny_models.build_text_encoder(spec.sd_spec())


def scheduler_config() -> dict:
    """SD-2.1-base's noise schedule (epsilon prediction)."""
    return dict(tiny_models.SD21_BASE_SCHEDULER_CONFIG)


__all__ = ["WorldModelSpec", "build_text_encoder", "build_unet", "build_vae", "scheduler_config"]
