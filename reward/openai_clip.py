"""OpenAI CLIP (ViT) backbones in the OpenAI key layout: reading the checkpoint formats users hand
us, building an open_clip ``CLIP`` from them, sharing one backbone between scorers, and a tiny
seeded configuration of the same architecture for tests.

Checkpoint formats read by :func:`read_openai_state_dict` (all in the OpenAI key layout,
``visual.transformer.resblocks.N...``, ``transformer.resblocks.N...``, ``ln_final``,
``text_projection``, ``visual.proj``, ``logit_scale``):

* OpenAI's TorchScript archives (``ViT-L-14.pt`` as ``clip.load`` downloads it, fp16 weights):
  ``torch.jit.load(path, map_location="cpu").state_dict()``, dropping the archive's non-weight
  entries (``input_resolution``, ``context_length``, ``vocab_size``, ``attn_mask``);
* plain ``torch.save(model.state_dict())`` pickles (what Social Reward's training saves), also
  wrapped as ``{'state_dict': ...}`` and/or with a DDP ``module.`` prefix, read with
  ``torch.load(map_location="cpu", weights_only=True)``;
* ``.safetensors`` files (e.g. open_clip's hub copy of the OpenAI weights).

Precision: like ``clip.load(name, "cpu")``, the model is fp32 by default (fp16 archives are cast
up exactly). We build the fp32 model ourselves rather than calling open_clip's
``build_model_from_openai_state_dict``, because that helper converts the model to fp16 *before*
loading, which would round an fp32 fine-tuned checkpoint (Social Reward's) to fp16.
``dtype="fp16"``/``"bf16"`` reproduces ``clip.load(name, "cuda")``: linear/conv/attention weights
and projections in low precision, LayerNorms computed in fp32.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
import weakref
import zipfile
from pathlib import Path
from typing import Any

import torch

from sr_finetune.errors import UserError
from sr_finetune.models import resolve_device, resolve_dtype

from .causal_text import encode_text_up_to_eot
from .loading import build_on_meta, ensure_materialized, restore_causal_mask

# Keys of OpenAI's TorchScript archives that are not weights of the model.
_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
_SAFETENSORS_SUFFIX = ".safetensors"

OPENAI_VIT_L_14 = ("ViT-L-14", "openai")  # open_clip (architecture, pretrained tag) of the default

# OpenAI's ViT-L/14 (the backbone of social_reward, clip and aesthetic), in openai_clip_config's terms.
OPENAI_VIT_L_14_CONFIG: dict[str, int] = {
    "embed_dim": 768,
    "image_size": 224,
    "patch_size": 14,
    "vision_width": 1024,
    "vision_layers": 24,
    "context_length": 77,
    "vocab_size": 49408,
    "text_width": 768,
    "text_layers": 12,
}

# A tiny ViT of the same family: real vocabulary, 77-token context and 224 px input (so the
# real tokenizer and preprocessing apply); widths are multiples of 64 because the OpenAI layout
# stores no head count (heads = width // 64); patch 32 keeps the image tower fast.
TINY_OPENAI_CLIP: dict[str, int] = {
    "embed_dim": 32,
    "image_size": 224,
    "patch_size": 32,
    "vision_width": 128,
    "vision_layers": 2,
    "context_length": 77,
    "vocab_size": 49408,
    "text_width": 64,
    "text_layers": 2,
}


# --------------------------------------------------------------------------- reading checkpoints


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """True for a TorchScript archive (a zip with ``code/`` and ``constants.pkl``), False for a
    ``torch.save`` pickle or any other file."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


_WARNINGS_FILTER_LOCK = threading.Lock()


def read_openai_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The OpenAI-layout state dict stored in ``path`` (TorchScript archive, plain or wrapped
    state dict, or safetensors), on the CPU, in the file's dtypes."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"CLIP weights file not found: {path}")
    if path.suffix == _SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    elif is_torchscript_archive(path):
        with _WARNINGS_FILTER_LOCK, warnings.catch_warnings():  # the filters are process-wide: one thread at a time
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still OpenAI's format
            state = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        state = {k: v for k, v in state.items() if k not in _NON_WEIGHT_KEYS}
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"{path} is not a CLIP checkpoint torch.load can read safely: {str(exc).splitlines()[0]}") from None
    return _unwrap_state_dict(state, path)


def _unwrap_state_dict(state: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state dict of tensors")
    if all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k[len("module.") :]: v for k, v in state.items()}
    if "visual.proj" not in state or "text_projection" not in state:
        raise UserError(f"{path} is not an OpenAI-layout CLIP ViT state dict (no visual.proj / text_projection)")
    return state


def openai_clip_config(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Architecture of an OpenAI-layout CLIP ViT, read off its tensor shapes (the layout stores
    no config; head counts are width // 64 as in OpenAI's ``build_model``)."""

    def n_blocks(prefix: str) -> int:
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
        return len({m.group(1) for k in state if (m := pattern.match(k))})

    conv = state["visual.conv1.weight"]  # [width, 3, patch, patch]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    return {
        "embed_dim": int(state["text_projection"].shape[1]),
        "image_size": int(conv.shape[-1] * grid),
        "patch_size": int(conv.shape[-1]),
        "vision_width": int(conv.shape[0]),
        "vision_layers": n_blocks("visual.transformer.resblocks."),
        "context_length": int(state["positional_embedding"].shape[0]),
        "vocab_size": int(state["token_embedding.weight"].shape[0]),
        "text_width": int(state["ln_final.weight"].shape[0]),
        "text_layers": n_blocks("transformer.resblocks."),
    }


def build_openai_clip(config: dict[str, int], cast_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A randomly initialised open_clip ``CLIP`` with OpenAI's architecture choices (QuickGELU,
    64-wide heads) for ``config`` (see :func:`openai_clip_config`)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=config["vision_layers"], width=config["vision_width"], head_width=64, patch_size=config["patch_size"], image_size=config["image_size"])
    text = CLIPTextCfg(context_length=config["context_length"], vocab_size=config["vocab_size"], width=config["text_width"], heads=config["text_width"] // 64, layers=config["text_layers"])
    return CLIP(config["embed_dim"], vision_cfg=vision, text_cfg=text, quick_gelu=True, cast_dtype=cast_dtype)


def openai_clip_from_state_dict(state: dict[str, torch.Tensor], dtype: str | torch.dtype = "fp32") -> torch.nn.Module:
    """Build an open_clip ``CLIP`` from an OpenAI-layout state dict (exact fp32 values, assigned
    to a model built without random init; then, for fp16/bf16, OpenAI's partial low-precision
    conversion)."""
    from open_clip.model import convert_weights_to_lp

    dtype = resolve_dtype(dtype)
    try:
        config = openai_clip_config(state)
    except KeyError as exc:
        raise UserError(f"not an OpenAI-layout CLIP ViT state dict: no {exc}") from None
    low_precision = dtype in (torch.float16, torch.bfloat16)
    model = build_on_meta(lambda: build_openai_clip(config, cast_dtype=dtype if low_precision else None))
    fp32_state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(fp32_state, strict=True, assign=True)
    except RuntimeError as exc:
        raise UserError(f"CLIP state dict does not fit the architecture read off its shapes: {str(exc).splitlines()[0]}") from None
    restore_causal_mask(model)
    ensure_materialized(model, "the CLIP state dict")
    if low_precision:
        convert_weights_to_lp(model, dtype=dtype)
    elif dtype != torch.float32:
        model = model.to(dtype)
    return model.eval()


# --------------------------------------------------------------------------- locating weights


def download_openai_vit_l_14() -> Path:
    """The published OpenAI ViT-L/14 weights, fetched by open_clip (its Hugging Face hub copy
    ``timm/vit_large_patch14_clip_224.openai``, else OpenAI's ``ViT-L-14.pt`` archive)."""
    from open_clip import pretrained

    try:
        path = pretrained.download_pretrained(pretrained.get_pretrained_cfg(*OPENAI_VIT_L_14))
    except Exception as exc:
        raise UserError(f"could not fetch the OpenAI ViT-L/14 weights ({type(exc).__name__}); pass weights=<local ViT-L-14.pt, .pth or .safetensors>") from None
    if not path:
        raise UserError("open_clip knows no download for ViT-L-14/openai; pass weights=<local file>")
    return Path(path)


def resolve_weights_file(weights: str | os.PathLike, what: str, default_filename: str | None = None) -> Path:
    """``weights`` as a local file, or a hub spec ``owner/repo`` (with ``default_filename``) or
    ``owner/repo/path/in/repo``, downloaded with ``hf_hub_download``."""
    if Path(weights).is_file():
        return Path(weights)
    spec = str(weights)
    parts = spec.split("/")
    if Path(weights).exists() or spec.startswith((".", "/", "~")) or len(parts) < 2 or not all(parts):
        raise UserError(f"{what} weights '{weights}' is neither a file nor a hub spec owner/repo[/file]")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or default_filename
    if not filename:
        raise UserError(f"{what} weights '{weights}': name the file inside the hub repo (owner/repo/file)")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename))
    except Exception as exc:
        raise UserError(f"could not fetch {what} weights {filename} from hub repo {repo} ({type(exc).__name__})") from None


# --------------------------------------------------------------------------- shared backbone


class OpenAICLIPBackbone(torch.nn.Module):
    """An open_clip ``CLIP`` plus a one-batch image-feature cache, so that several scorers built
    on the same weights (``clip`` and ``aesthetic``) run the image tower once per batch.

    The cache remembers the last pixel batch and its features; a call with an equal batch (same
    shape, dtype, device and values) returns the stored features. It is used only with gradients
    off (scoring), never in training. Being one module, it moves with either scorer (``.to()``).
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        # plain ints, so that CPU-side preprocessing never touches the parameters
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.context_length = int(model.context_length)
        self._cached: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual.conv1.weight.dtype

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings [N, D] (``model.encode_image``), cached per batch."""
        pixel_values = pixel_values.to(self.dtype)  # as OpenAI's encode_image: image.type(self.dtype)
        if torch.is_grad_enabled():
            return self.model.encode_image(pixel_values)
        if self._cached is not None and _same_batch(self._cached[0], pixel_values):
            return self._cached[1]
        features = self.model.encode_image(pixel_values)
        self._cached = (pixel_values, features)
        return features

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Unnormalised text embeddings [N, D] at the EOT (argmax) position."""
        return encode_text_up_to_eot(self.model, input_ids)

    def clear_cache(self) -> None:
        self._cached = None


def _same_batch(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


# Backbones alive in this process, keyed by (weights file, device, dtype): a second scorer on
# the same weights gets the same module. Weak values: the backbone goes when its scorers go.
_SHARED: "weakref.WeakValueDictionary[tuple, OpenAICLIPBackbone]" = weakref.WeakValueDictionary()
_SHARED_BUILDS: dict[tuple, threading.Lock] = {}  # one lock per key: concurrent loads build it once
_SHARED_BUILDS_GUARD = threading.Lock()


def load_openai_clip_backbone(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    share: bool = True,
) -> OpenAICLIPBackbone:
    """An :class:`OpenAICLIPBackbone` from a local checkpoint file, in eval mode on ``device``.
    With ``share=True`` an already loaded backbone of the same file/device/dtype is reused."""
    path = Path(path).resolve()
    device, dtype = resolve_device(str(device)), resolve_dtype(dtype)
    stat = path.stat() if path.is_file() else None
    key = (str(path), stat.st_mtime_ns if stat else None, stat.st_size if stat else None, str(device), dtype)
    if not share:
        return _build_backbone(path, device, dtype)
    with _SHARED_BUILDS_GUARD:
        build_lock = _SHARED_BUILDS.setdefault(key, threading.Lock())
    with build_lock:
        backbone = _SHARED.get(key)
        if backbone is None:
            backbone = _SHARED[key] = _build_backbone(path, device, dtype)
    return backbone


def _build_backbone(path: Path, device: torch.device, dtype: torch.dtype) -> OpenAICLIPBackbone:
    model = openai_clip_from_state_dict(read_openai_state_dict(path), dtype).to(device)
    return OpenAICLIPBackbone(model).eval().requires_grad_(False)


# --------------------------------------------------------------------------- tiny weights


def make_tiny_openai_clip(path: str | os.PathLike, seed: int = 0, fmt: str | None = None, config: dict[str, int] | None = None) -> Path:
    """Write a tiny OpenAI-layout CLIP (``TINY_OPENAI_CLIP``, seeded random weights) to ``path``.

    ``fmt``: ``"state_dict"`` (plain ``torch.save``, fp32, as Social Reward saves), ``"wrapped"``
    (``{'state_dict': ...}``), ``"safetensors"`` or ``"torchscript"`` (a traced archive with fp16
    weights and OpenAI's extra ``input_resolution``/``context_length``/``vocab_size`` entries);
    default from the suffix (``.safetensors`` -> safetensors, else state_dict). The random weights
    are rounded to fp16-representable values, so every format holds exactly the same model.
    """
    fmt = fmt or ("safetensors" if str(path).endswith(_SAFETENSORS_SUFFIX) else "state_dict")
    if fmt not in ("state_dict", "wrapped", "safetensors", "torchscript"):
        raise ValueError(f"unknown format '{fmt}'")
    config = dict(TINY_OPENAI_CLIP if config is None else config)
    torch.manual_seed(seed)
    model = build_openai_clip(config).eval()
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if fmt == "state_dict":
        torch.save(state, path)
    elif fmt == "wrapped":
        torch.save({"state_dict": state, "epoch": 1}, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        _save_torchscript(model, config, path)
    return path


def _save_torchscript(model: torch.nn.Module, config: dict[str, int], path: Path) -> None:
    # OpenAI's archives carry these three as tensors; open_clip keeps two as plain attributes
    for name, key in (("input_resolution", "image_size"), ("context_length", "context_length"), ("vocab_size", "vocab_size")):
        if name in vars(model):
            delattr(model, name)
        model.register_buffer(name, torch.tensor(config[key]))
    # ... and no attention mask entry (OpenAI keeps the mask as a plain attribute): trace it as a constant
    mask = model._buffers.pop("attn_mask")
    object.__setattr__(model, "attn_mask", mask)
    pixels = torch.zeros(1, 3, config["image_size"], config["image_size"])
    tokens = torch.zeros(1, config["context_length"], dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(model, {"encode_image": (pixels,), "encode_text": (tokens,)}, check_trace=False)
    traced = traced.half()  # OpenAI's archives store fp16 weights
    traced.save(str(path))


__all__ = [
    "OPENAI_VIT_L_14",
    "OPENAI_VIT_L_14_CONFIG",
    "OpenAICLIPBackbone",
    "TINY_OPENAI_CLIP",
    "build_openai_clip",
    "download_openai_vit_l_14",
    "is_torchscript_archive",
    "load_openai_clip_backbone",
    "make_tiny_openai_clip",
    "openai_clip_config",
    "openai_clip_from_state_dict",
    "read_openai_state_dict",
    "resolve_weights_file",
]
