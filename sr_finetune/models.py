"""One place that loads Stable Diffusion pipelines and their parts, from a hub id or a folder.

The same calls load ``stabilityai/stable-diffusion-2-1-base`` for a user with network and the
tiny folders that ``sr-finetune tiny-model`` writes here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import MissingDependencyError

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "no": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
ATTENTION_BACKENDS = ("sdpa", "xformers", "eager")
SCHEDULERS = ("ddim", "ddpm", "pndm", "euler", "euler_ancestral", "dpmsolver++", "unipc", "model")


def vae_scale_factor(vae: Any) -> int:
    """Pixels per latent cell of a VAE (SD: 8): 2 per downsampling block, as diffusers' pipelines compute it."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map ``"fp16"``/``"bf16"``/``"fp32"`` (and torch names) to a ``torch.dtype``."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype '{name}' (expected one of {sorted(set(DTYPES))})") from None


def resolve_device(name: str | None = None) -> torch.device:
    """``None``/``"auto"`` -> cuda if available, else mps, else cpu."""
    if name and name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """``from_pretrained``'s dtype argument: ``dtype`` in newer diffusers, ``torch_dtype`` before."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def xformers_available() -> bool:
    from diffusers.utils import is_xformers_available

    return is_xformers_available()


def set_attention_backend(model: Any, backend: str) -> None:
    """Use PyTorch SDPA (default), xformers (optional extra) or plain attention on a diffusers model or pipeline."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend '{backend}' (expected one of {ATTENTION_BACKENDS})")
    if backend == "xformers":
        if not xformers_available():
            raise MissingDependencyError("attention 'xformers' was asked for but xformers is not installed: pip install 'sr-finetune[xformers]'")
        model.enable_xformers_memory_efficient_attention()
        return
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    processor_cls = AttnProcessor2_0 if backend == "sdpa" else AttnProcessor
    unet = getattr(model, "unet", model)
    if hasattr(unet, "set_attn_processor"):
        unet.set_attn_processor(processor_cls())
    vae = getattr(model, "vae", None)
    if vae is not None and hasattr(vae, "set_attn_processor"):
        vae.set_attn_processor(processor_cls())


def make_scheduler(name: str, model: str, revision: str | None = None):
    """An inference scheduler built from the model's own scheduler config."""
    import diffusers

    classes = {
        "ddim": diffusers.DDIMScheduler,
        "ddpm": diffusers.DDPMScheduler,
        "pndm": diffusers.PNDMScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
        "euler_ancestral": diffusers.EulerAncestralDiscreteScheduler,
        "dpmsolver++": diffusers.DPMSolverMultistepScheduler,
        "unipc": diffusers.UniPCMultistepScheduler,
    }
    if name not in classes:
        raise ValueError(f"unknown scheduler '{name}' (expected one of {SCHEDULERS})")
    return classes[name].from_pretrained(model, subfolder="scheduler", revision=revision)


def load_pipeline(
    model: str,
    *,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device | None = "cpu",
    scheduler: str = "model",
    attention: str = "sdpa",
    revision: str | None = None,
    variant: str | None = None,
    progress_bar: bool = False,
):
    """Load a ``StableDiffusionPipeline`` (hub id or local folder) ready for inference."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        model,
        **dtype_kwarg(resolve_dtype(dtype)),
        revision=revision,
        variant=variant,
        safety_checker=None,
        requires_safety_checker=False,
        # "model" keeps the scheduler class saved with the pipeline.
        **({} if scheduler == "model" else {"scheduler": make_scheduler(scheduler, model, revision)}),
    )
    set_attention_backend(pipe, attention)
    pipe.to(resolve_device(device) if not isinstance(device, torch.device) else device)
    pipe.set_progress_bar_config(disable=not progress_bar)
    return pipe


@dataclass
class SDComponents:
    """The trainable and frozen parts of an SD pipeline, loaded separately for training."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any


def load_components(model: str, *, revision: str | None = None, variant: str | None = None, attention: str = "sdpa") -> SDComponents:
    """Load UNet, VAE, text encoder, tokenizer and the training noise scheduler (fp32, CPU)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kwargs = {"revision": revision}
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", variant=variant, **kwargs)
    set_attention_backend(unet, attention)
    return SDComponents(
        unet=unet,
        vae=AutoencoderKL.from_pretrained(model, subfolder="vae", variant=variant, **kwargs),
        text_encoder=CLIPTextModel.from_pretrained(model, subfolder="text_encoder", variant=variant, **kwargs),
        tokenizer=CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", **kwargs),
        noise_scheduler=DDPMScheduler.from_pretrained(model, subfolder="scheduler", **kwargs),
    )
