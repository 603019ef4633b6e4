"""Real-size Stable Diffusion 2.1 architectures, offline: the published configs and a random-weight writer.

The configs of ``stabilityai/stable-diffusion-2-1-base`` and ``stabilityai/stable-diffusion-2-1``
ship in ``sr_finetune/data/real_size/<variant>/`` (their sources are in the README.md there).
From them, :func:`parameter_counts` sizes each module on the meta device (no memory), and
:func:`make_real_size_pipeline` writes a seeded random-weight ``StableDiffusionPipeline`` folder
with the hub's classes and file names, so that memory, speed and loading can be tried at full
size before any weights are downloaded or a GPU is at hand.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
from contextlib import nullcontext
from pathlib import Path

import torch

from .errors import UserError
from .progress import progress, quiet_library_bars

logger = logging.getLogger(__name__)

CONFIG_ROOT = Path(__file__).parent / "data" / "real_size"
VARIANTS = {"2-1-base": "stabilityai/stable-diffusion-2-1-base", "2-1": "stabilityai/stable-diffusion-2-1"}
# component -> its config file inside a pipeline folder (and inside CONFIG_ROOT/<variant>)
CONFIG_FILES = {
    "model_index": "model_index.json",
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "tokenizer": "tokenizer/tokenizer_config.json",
    "scheduler": "scheduler/scheduler_config.json",
}
MODELS = ("unet", "vae", "text_encoder")  # the components with weights, in the order they are written
# The weight file of each model, as the hub names it (the fp16 variant inserts ".fp16").
WEIGHT_FILES = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}
# Published sizes (README.md beside the configs says where each was checked); both variants.
PUBLISHED_PARAMETERS = {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise UserError(f"unknown variant {variant!r} (expected one of {', '.join(VARIANTS)})")
    return variant


def real_size_configs(variant: str) -> dict[str, dict]:
    """The published configs of one variant: component -> config dict (a fresh copy)."""
    folder = CONFIG_ROOT / check_variant(variant)
    return {name: json.loads((folder / file).read_text()) for name, file in CONFIG_FILES.items()}


def build_model(name: str, config: dict, empty: bool = False) -> torch.nn.Module:
    """The model of component ``name`` (unet, vae or text_encoder) built from its config dict;
    ``empty=True`` puts its parameters on the meta device (sizes without memory)."""
    from accelerate import init_empty_weights

    with init_empty_weights() if empty else nullcontext():
        if name == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel.from_config(config)
        if name == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL.from_config(config)
        if name == "text_encoder":
            from transformers import CLIPTextConfig, CLIPTextModel

            return CLIPTextModel(CLIPTextConfig.from_dict(config))
    raise ValueError(f"no model for component {name!r} (expected one of {MODELS})")


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def parameter_counts(configs: dict[str, dict]) -> dict[str, int]:
    """Parameters of each model of a config set, counted on the meta device."""
    return {name: count_parameters(build_model(name, configs[name], empty=True)) for name in MODELS}


def _check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder; choose a new OUT")


def _write_fp16_copy(weights: Path) -> Path:
    """``name.safetensors`` -> ``name.fp16.safetensors``, the same keys in float16, one tensor at a
    time from the file (the fp32 model is already freed, so the peak stays one fp16 copy)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(weights, framework="pt") as f:
        half = {key: f.get_tensor(key).to(torch.float16) for key in f.keys()}
    target = weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors"))
    save_file(half, target, metadata={"format": "pt"})
    return target


def _with_hub_key_names(weights: Path, prefix: str) -> None:
    """Put ``prefix`` back in front of every key that lacks it. transformers 5 saves
    ``CLIPTextModel`` without the ``text_model.`` prefix that the hub's files carry (they were
    written by transformers 4, which needs it to load them, as do tools that recognise SD 2.x's
    text encoder by ``text_model.encoder.layers.22.*``); transformers 5 loads either form."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(weights, framework="pt") as f:
        if all(key.startswith(prefix) for key in f.keys()):
            return
        tensors = {(key if key.startswith(prefix) else prefix + key): f.get_tensor(key) for key in f.keys()}
        metadata = f.metadata()
    save_file(tensors, weights, metadata=metadata or {"format": "pt"})


def _write_model(out: Path, name: str, config: dict, fp16_variant: bool) -> int:
    model = build_model(name, config)
    n = count_parameters(model)
    model.save_pretrained(out / name)
    del model
    gc.collect()
    if name == "text_encoder":
        _with_hub_key_names(out / WEIGHT_FILES[name], "text_model.")
    if fp16_variant:
        _write_fp16_copy(out / WEIGHT_FILES[name])
    return n


def _write_tokenizer(out: Path, config: dict) -> None:
    from .clip_vocab import write_clip_tokenizer

    folder = write_clip_tokenizer(out / "tokenizer", pad_token=config["pad_token"], model_max_length=config["model_max_length"])
    # The hub's folder also has special_tokens_map.json (transformers 5 no longer writes one).
    special = folder / "special_tokens_map.json"
    if not special.exists():
        tokens = {key: config[key] for key in ("bos_token", "eos_token", "pad_token", "unk_token")}
        special.write_text(json.dumps(tokens, indent=2, sort_keys=True) + "\n")


def _write_scheduler(out: Path, config: dict) -> None:
    import diffusers

    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    scheduler.save_pretrained(out / "scheduler")
    # A scheduler drops the keys it does not know (DDIM: skip_prk_steps); keep the published file's
    # values too, so that any scheduler built from this folder gets the same settings.
    path = out / CONFIG_FILES["scheduler"]
    saved = json.loads(path.read_text())
    saved.update(config)
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def _write_model_index(out: Path, config: dict) -> None:
    """model_index.json as the hub's, written by hand: the pipeline is never whole in memory here
    (one model at a time: writing 2-1-base with its fp16 variant peaked at 6.0 GB RSS, most of it
    the UNet and its serialised copy). No feature extractor is written
    (it only serves the safety checker that SD 2.1 does not ship), so its entry is null."""
    import diffusers

    index = dict(config, _diffusers_version=diffusers.__version__, feature_extractor=[None, None])
    (out / CONFIG_FILES["model_index"]).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


@quiet_library_bars()
def write_random_pipeline(out_dir: str | os.PathLike, configs: dict[str, dict], seed: int = 0, fp16_variant: bool = False) -> Path:
    """Write a ``StableDiffusionPipeline`` folder of seeded random weights for a config set (as
    :func:`real_size_configs` returns), in the hub's layout; with ``fp16_variant`` also the
    ``*.fp16.safetensors`` weights. One model is in memory at a time."""
    out = Path(out_dir)
    _check_out_dir(out)
    configs = copy.deepcopy(configs)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    parts = [*MODELS, "tokenizer", "scheduler", "model_index"]
    with progress(desc="real-size-model", total=len(parts), unit="part") as bar:
        for name in parts:
            bar.set_postfix_str(name)
            if name in MODELS:
                n = _write_model(out, name, configs[name], fp16_variant)
                logger.info("%s: %s parameters, %.2f GB in fp32%s", name, f"{n:,}", n * 4 / 1e9, " (+ fp16 variant)" if fp16_variant else "")
            elif name == "tokenizer":
                _write_tokenizer(out, configs[name])
            elif name == "scheduler":
                _write_scheduler(out, configs[name])
            else:
                _write_model_index(out, configs[name])
            bar.update()
    return out


def make_real_size_pipeline(out_dir: str | os.PathLike, variant: str = "2-1-base", seed: int = 0, fp16_variant: bool = False) -> Path:
    """Write a random-weight pipeline of the real size and architecture of ``variant``
    (``2-1-base``: 512 px, epsilon; ``2-1``: 768 px, v-prediction): 5.2 GB in fp32, 2.6 GB
    more with the fp16 variant; about 45 s and 6 GB of RAM on a 2-core CPU."""
    configs = real_size_configs(variant)
    _check_out_dir(Path(out_dir))  # before any model is built
    logger.info("real-size-model: %s (%s architecture), seed %d, random weights", variant, VARIANTS[variant], seed)
    return write_random_pipeline(out_dir, configs, seed=seed, fp16_variant=fp16_variant)


__all__ = [
    "CONFIG_FILES",
    "MODELS",
    "PUBLISHED_PARAMETERS",
    "VARIANTS",
    "WEIGHT_FILES",
    "build_model",
    "count_parameters",
    "make_real_size_pipeline",
    "parameter_counts",
    "real_size_configs",
    "write_random_pipeline",
]
