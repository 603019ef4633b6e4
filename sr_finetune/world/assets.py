"""The world's shipped weights: packed small, written back out in the formats everything loads.

A CLIP token embedding has 49,408 rows, but world captions use about thirty tokens; the other
rows never receive a gradient. A packed file keeps only the rows of the tokens the world uses
(``token_ids``), in fp16, so the base pipeline and the world CLIP together stay a few MB. Writing
them back out (``materialize_*``) gives an ordinary ``StableDiffusionPipeline`` folder or
OpenAI-layout CLIP file in fp32, with zero rows for the tokens the world never uses (prompts
outside the world are out of distribution for these models anyway).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from sr_finetune.clip_vocab import VOCAB_SIZE
from sr_finetune.errors import UserError

from .scenes import all_prompts

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
BASE_WEIGHTS, BASE_CONFIG = "base.safetensors", "base.json"
TOKEN_IDS = "token_ids"
COMPONENTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors"}


def world_token_ids() -> torch.Tensor:
    """Sorted ids of every token in world captions, the empty caption, start, end and padding (0)."""
    from open_clip.tokenizer import tokenize

    tokens = tokenize([p.text for p in all_prompts()] + [""])
    return torch.unique(torch.cat([tokens.flatten(), torch.tensor([0])]))


def compact_rows(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The rows ``ids`` of an embedding matrix."""
    return weight[ids].clone()


def expand_rows(rows: torch.Tensor, ids: torch.Tensor, vocab_size: int = VOCAB_SIZE) -> torch.Tensor:
    """A [vocab_size, D] matrix with ``rows`` at ``ids`` and zeros elsewhere (inverse of :func:`compact_rows`)."""
    full = torch.zeros(vocab_size, rows.shape[1], dtype=rows.dtype)
    full[ids.long()] = rows
    return full


def pack_state(state: dict[str, torch.Tensor], embedding_keys: list[str], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """fp16 copy of ``state`` with the embeddings under ``embedding_keys`` cut to rows ``ids``."""
    packed = {k: (compact_rows(v, ids) if k in embedding_keys else v).to(torch.float16 if v.is_floating_point() else v.dtype).contiguous() for k, v in state.items()}
    packed[TOKEN_IDS] = ids.to(torch.int32)
    return packed


def unpack_state(packed: dict[str, torch.Tensor], embedding_keys: list[str]) -> dict[str, torch.Tensor]:
    """fp32 state dict from :func:`pack_state` (embeddings expanded to the full vocabulary)."""
    ids = packed[TOKEN_IDS]
    return {k: (expand_rows(v, ids) if k in embedding_keys else v).float() for k, v in packed.items() if k != TOKEN_IDS}


def pack_pipeline(model_dir: str | os.PathLike, dest_dir: str | os.PathLike = ASSETS_DIR) -> Path:
    """Pack a world ``StableDiffusionPipeline`` folder into ``dest_dir/base.safetensors`` + ``base.json``."""
    from safetensors.torch import load_file, save_file

    model, dest = Path(model_dir), Path(dest_dir)
    state, configs = {}, {}
    for component, weights in COMPONENTS.items():
        path = model / component / weights
        if not path.is_file():
            raise UserError(f"{model} is not a pipeline folder with {component}/{weights}")
        state.update({f"{component}.{k}": v for k, v in load_file(str(path)).items()})
        configs[component] = json.loads((model / component / "config.json").read_text())
    configs["scheduler"] = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    configs["tokenizer"] = {"model_max_length": json.loads((model / "tokenizer" / "tokenizer_config.json").read_text())["model_max_length"]}
    dest.mkdir(parents=True, exist_ok=True)
    # the key differs between transformers versions (text_model. prefix or not)
    configs["packed_embeddings"] = [k for k in state if k.startswith("text_encoder.") and k.endswith("token_embedding.weight")]
    save_file(pack_state(state, configs["packed_embeddings"], world_token_ids()), str(dest / BASE_WEIGHTS))
    (dest / BASE_CONFIG).write_text(json.dumps(configs, indent=1, sort_keys=True))
    return dest / BASE_WEIGHTS


def materialize_pipeline(out_dir: str | os.PathLike, assets_dir: str | os.PathLike = ASSETS_DIR) -> Path:
    """Write the packed base model as a ``StableDiffusionPipeline`` folder (fp32 safetensors)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sr_finetune.clip_vocab import write_clip_tokenizer

    assets, out = Path(assets_dir), Path(out_dir)
    if not (assets / BASE_WEIGHTS).is_file():
        raise UserError(f"no packed world base model in {assets} ({BASE_WEIGHTS}); train one with `sr-finetune world train-base`")
    configs = json.loads((assets / BASE_CONFIG).read_text())
    state = unpack_state(load_file(str(assets / BASE_WEIGHTS)), configs["packed_embeddings"])
    parts = {c: {k[len(c) + 1 :]: v for k, v in state.items() if k.startswith(c + ".")} for c in COMPONENTS}
    unet = UNet2DConditionModel.from_config(configs["unet"])
    vae = AutoencoderKL.from_config(configs["vae"])
    text_config = {k: v for k, v in configs["text_encoder"].items() if not k.startswith("_") and k not in ("architectures", "transformers_version", "dtype", "torch_dtype")}
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    for module, name in ((unet, "unet"), (vae, "vae"), (text_encoder, "text_encoder")):
        missing, unexpected = module.load_state_dict(parts[name], strict=False)
        if unexpected or [m for m in missing if "position_ids" not in m]:
            raise UserError(f"{assets / BASE_WEIGHTS}: {name} weights do not fit its config ({(unexpected or missing)[:3]})")
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(out / "tokenizer", pad_token="!", model_max_length=configs["tokenizer"]["model_max_length"]))
    pipe = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
        scheduler=DDIMScheduler.from_config(configs["scheduler"]), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


__all__ = ["ASSETS_DIR", "compact_rows", "expand_rows", "materialize_pipeline", "pack_pipeline", "pack_state", "unpack_state", "world_token_ids"]
