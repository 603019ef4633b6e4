"""Tiny Stable-Diffusion-2.1-shaped pipelines, written in the real on-disk format.

The folder holds the same classes and config conventions as
``stabilityai/stable-diffusion-2-1-base`` (UNet2DConditionModel with linear projections and
per-block head dims, AutoencoderKL, CLIPTextModel, the real CLIP BPE tokenizer with SD 2.x's
``!`` padding, the base model's noise-schedule config, no safety checker), but weighs a few
MB, so every code path can be tested on a CPU through the same ``from_pretrained`` calls that
load the real model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .clip_vocab import VOCAB_SIZE, write_clip_tokenizer

# scheduler/scheduler_config.json of stabilityai/stable-diffusion-2-1-base (minus its class).
SD21_BASE_SCHEDULER_CONFIG = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SD21_VAE_SCALING_FACTOR = 0.18215


@dataclass
class TinySDSpec:
    """Sizes of a tiny SD-2.1-shaped pipeline; the defaults give about 8 MB of weights."""

    unet_channels: tuple[int, ...] = (32, 64)
    unet_head_dims: tuple[int, ...] = (2, 4)
    layers_per_block: int = 1
    vae_channels: tuple[int, ...] = (32, 64)
    text_hidden_size: int = 32
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate_size: int = 64
    sample_size: int = 32
    prediction_type: str = "epsilon"
    norm_num_groups: int = 32
    # Which resolution level has no attention: "lowest" as SD, "highest" (attention only where
    # the feature map is small: cheaper on a CPU), or "none" (cross-attention in every block).
    plain_block: str = "lowest"
    extra: dict = field(default_factory=dict)


def build_unet(spec: TinySDSpec):
    from diffusers import UNet2DConditionModel

    n = len(spec.unet_channels)
    if spec.plain_block not in ("lowest", "highest", "none"):
        raise ValueError(f"plain_block must be lowest, highest or none (got {spec.plain_block!r})")
    plain = 0 if spec.plain_block == "none" else 1
    attn = ("CrossAttnDownBlock2D",) * (n - plain)
    down = ("DownBlock2D",) * plain + attn if spec.plain_block == "highest" else attn + ("DownBlock2D",) * plain
    up = tuple("CrossAttnUpBlock2D" if b.startswith("CrossAttn") else "UpBlock2D" for b in reversed(down))
    vae_factor = 2 ** (len(spec.vae_channels) - 1)
    return UNet2DConditionModel(
        sample_size=spec.sample_size // vae_factor,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(spec.unet_channels),
        layers_per_block=spec.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=tuple(spec.unet_head_dims),
        cross_attention_dim=spec.text_hidden_size,
        use_linear_projection=True,
        norm_num_groups=spec.norm_num_groups,
        flip_sin_to_cos=True,
        freq_shift=0,
        act_fn="silu",
        norm_eps=1e-5,
    )


def build_vae(spec: TinySDSpec):
    from diffusers import AutoencoderKL

    n = len(spec.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(spec.vae_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=spec.norm_num_groups,
        sample_size=spec.sample_size,
        scaling_factor=SD21_VAE_SCALING_FACTOR,
    )


def build_text_encoder(spec: TinySDSpec):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=spec.text_hidden_size,
        intermediate_size=spec.text_intermediate_size,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        max_position_embeddings=77,
        hidden_act="gelu",  # SD 2.x (OpenCLIP ViT-H) uses GELU, not CLIP's quick_gelu
        projection_dim=spec.text_hidden_size,
        # SD 2.1's text_encoder/config.json keeps these legacy ids; eos_token_id == 2 makes
        # transformers pool at argmax(input_ids), i.e. at <|endoftext|>, as the real model does.
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return CLIPTextModel(config)


def make_tiny_sd_pipeline(out_dir: str | os.PathLike, seed: int = 0, spec: TinySDSpec | None = None) -> Path:
    """Write a tiny SD-2.1-base-shaped ``StableDiffusionPipeline`` folder, deterministic in ``seed``."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    spec = spec or TinySDSpec()
    out = Path(out_dir)
    torch.manual_seed(seed)
    unet = build_unet(spec)
    vae = build_vae(spec)
    text_encoder = build_text_encoder(spec)
    tokenizer_dir = write_clip_tokenizer(out / "tokenizer", pad_token="!")
    from transformers import CLIPTokenizer

    scheduler_config = dict(SD21_BASE_SCHEDULER_CONFIG, prediction_type=spec.prediction_type)
    scheduler = DDPMScheduler.from_config(scheduler_config)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # DDPMScheduler drops the keys it does not know (set_alpha_to_one, skip_prk_steps); keep
    # the base model's file verbatim so DDIM/PNDM built from it get the same settings.
    sched_file = out / "scheduler" / "scheduler_config.json"
    saved = json.loads(sched_file.read_text())
    saved.update(scheduler_config)
    sched_file.write_text(json.dumps(saved, indent=2, sort_keys=True))
    return out
