"""PickScore v1 (yuvalkirstain/PickScore_v1): a transformers ``CLIPModel`` (ViT-H-14) fine-tuned
on Pick-a-Pic preferences. Score = ``logit_scale.exp() * cos(e_text, e_image)``, the pre-softmax
logit of the reference's ``calc_probs`` (about 18-24 for SD images).

Matches the PickScore README / ``eval_preference_predictor.py`` (SCORERS.md section 6):

* **Model**: ``CLIPModel.from_pretrained(weights)`` in fp32, ``eval()``; ``logit_scale`` is the
  learned value read from the checkpoint, never assumed to be 100.
* **Processor**: loaded from ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` like the reference (or any
  folder with the same files). The image processor is pinned to transformers' original
  PIL/NumPy ``CLIPImageProcessor`` (``use_fast=False`` in transformers 4, ``backend="pil"`` in 5),
  because the torchvision ("fast") one differs slightly. It converts to RGB *before* resizing,
  resizes the shortest edge to 224 with PIL bicubic (long side truncated by ``int``) and centre
  crops with a floor offset, ``(H - 224) // 2``, which can sit 1 px away from torchvision's
  rounded offset when the excess is odd. ``CLIPProcessorFastPath`` gives the processor's output
  bit for bit in about a third of the time (tested on real images); the processor itself runs
  only when its settings are not the plain CLIP ones. The tokenizer is the processor folder's
  ``AutoTokenizer`` (the fast one, as ``AutoProcessor`` gives the reference).
* **Image modes**: the RGB conversion is PIL's ``convert("RGB")``, which drops alpha and
  transparency entries: what the processor of transformers 4.27.3 (the version PickScore pins)
  does, and what PickScore's own data loader does before calling it. Newer processors (5.x)
  composite transparent pixels onto white instead, so we convert first, for every mode
  (RGBA, LA, P with transparency, L, I;16, CMYK, ...), and hand the processor RGB only.
* **Text**: truncation at 77 tokens. We pad to ``max_length`` (77) instead of the README's
  ``padding=True`` so that prompts tokenised one by one in DataLoader workers stack into a batch;
  CLIP's text encoder is causal and pools at the EOS token, so pad tokens after it cannot change
  the features (the training code padded to max_length too).
* **Scale**: ``scale="raw"`` (default) returns the reference's value, the number PickScore's own
  README, leaderboards and most papers call PickScore. ``scale="div100"`` divides by 100, the
  form the Social Reward paper's tables print (0.199-0.201); with exp(logit_scale) ~ 100 it is
  nearly the raw cosine. Rankings and win-rates do not depend on the choice.
* **Batching**: the reference scores all images of one prompt in one forward with the text
  encoded once; we score N (image, prompt) rows in one forward, which gives the same numbers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sr_finetune.clip_vocab import VOCAB_SIZE, write_clip_tokenizer
from sr_finetune.errors import UserError
from sr_finetune.models import resolve_device, resolve_dtype

from .base import RewardModel, drop_padding_columns, encode_distinct_rows, not_differentiable, register_reward
from .preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    apply_lookup,
    center_crop_tensor,
    convert_rgb,
    lookup_tables,
    normalize_tensor,
    resize_shortest_edge,
    resize_shortest_edge_tensor,
    tensor_resample_mode,
)

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
MAX_LENGTH = 77
SCALES = {"raw": 1.0, "div100": 0.01}

# preprocessor_config.json of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (legacy feature-extractor
# layout, as published): shortest edge 224, centre crop 224, PIL bicubic, OpenAI mean/std.
LAION_VIT_H_14_PREPROCESSOR_CONFIG: dict[str, Any] = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": list(OPENAI_CLIP_MEAN),
    "image_std": list(OPENAI_CLIP_STD),
    "resample": 3,
    "size": 224,
}
# open_clip zero-pads, and the laion ViT-H-14 tokenizer pads with "!" (id 0) to match.
LAION_PAD_TOKEN = "!"


class PickScoreReward(RewardModel):
    """PickScore scorer around a transformers ``CLIPModel``; see the module docstring."""

    name = "pickscore"

    def __init__(self, model: torch.nn.Module, image_processor: Any, tokenizer: Any, *, scale: str = "raw"):
        super().__init__()
        if scale not in SCALES:
            raise UserError(f"unknown pickscore scale '{scale}' (expected one of {sorted(SCALES)})")
        self.model = model
        self.image_processor = image_processor
        self.fast_path = CLIPProcessorFastPath.of(image_processor)  # None: the processor does all images
        self.tokenizer = tokenizer
        self.scale = scale

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        image = convert_rgb(image)  # the reference's conversion, not the installed processor's (module docstring)
        if self.fast_path is not None:
            return self.fast_path(image)
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    @property
    def is_differentiable(self) -> bool:
        return self.fast_path is not None and tensor_resample_mode(self.fast_path.resample) is not None

    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """The processor's steps in torch: shortest-edge resize (PIL's two passes, see
        :func:`resize_shortest_edge_tensor`), floor-offset centre crop, rescale and normalise."""
        if not self.is_differentiable:
            raise not_differentiable(self.name, "its image processor's settings are not the plain CLIP ones")
        processor = self.image_processor
        resized = resize_shortest_edge_tensor(images, self.fast_path.shortest_edge, self.fast_path.resample)
        cropped = center_crop_tensor(resized, *self.fast_path.crop, offset="floor")
        scale = float(processor.rescale_factor) * 255.0  # images are already in [0, 1]: 1/255 gives 1
        if abs(scale - 1.0) > 1e-9:
            cropped = cropped * scale
        return normalize_tensor(cropped, tuple(processor.image_mean), tuple(processor.image_std))

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def encode(self, pixel_values: torch.Tensor, text_inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised image and text embeddings, [N, D] each (projected pooled outputs, as
        ``get_image_features`` / ``get_text_features``; spelled out to be the same in
        transformers 4 and 5, whose return types differ)."""
        model = self.model
        pixel_values = pixel_values.to(model.visual_projection.weight.dtype)
        image_embeds = model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)
        text_embeds = encode_distinct_rows(self._text_embeds, text_inputs)
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        return image_embeds, text_embeds

    def _text_embeds(self, text_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        text_inputs = drop_padding_columns(text_inputs)
        text_out = self.model.text_model(input_ids=text_inputs["input_ids"], attention_mask=text_inputs.get("attention_mask"))
        return self.model.text_projection(text_out.pooler_output)

    def score(self, pixel_values: torch.Tensor, text_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        image_embeds, text_embeds = self.encode(pixel_values, text_inputs)
        # diag(e_t @ e_i.T) of the reference, row by row
        cosine = (text_embeds * image_embeds).sum(dim=-1)
        return (self.model.logit_scale.exp() * cosine * SCALES[self.scale]).float()


class CLIPProcessorFastPath:
    """The PIL ``CLIPImageProcessor``'s output for an RGB image (without a transparency entry),
    bit for bit, in about a third of its time: the same PIL bicubic resize of the shortest edge
    (shared with OpenAI CLIP's transform through :func:`resize_shortest_edge`), the same
    floor-offset centre crop, and the processor's own rescale and normalise run once on the
    256 levels as lookup tables."""

    def __init__(self, shortest_edge: int, crop: tuple[int, int], resample: int, tables: np.ndarray):
        self.shortest_edge, self.crop, self.resample, self.tables = shortest_edge, crop, resample, tables

    @classmethod
    def of(cls, processor: Any) -> "CLIPProcessorFastPath | None":
        """The fast path of ``processor``, or None when its settings are not the plain CLIP ones
        (shortest-edge resize, centre crop no larger, rescale and normalise, no padding)."""
        size, crop = _size_fields(getattr(processor, "size", None)), _size_fields(getattr(processor, "crop_size", None))
        shortest = size.get("shortest_edge")
        plain = (
            all(getattr(processor, flag, False) for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"))
            and not getattr(processor, "do_pad", False)
            and isinstance(shortest, int) and not size.get("longest_edge")
            and isinstance(crop.get("height"), int) and isinstance(crop.get("width"), int)
            and crop["height"] <= shortest and crop["width"] <= shortest
            and getattr(processor, "resample", None) is not None
        )
        if not plain:
            return None
        levels = lambda x: processor.normalize(processor.rescale(x, processor.rescale_factor, input_data_format="channels_first"), processor.image_mean, processor.image_std, input_data_format="channels_first")  # noqa: E731
        return cls(shortest, (crop["height"], crop["width"]), int(processor.resample), lookup_tables(levels))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        resized = resize_shortest_edge(image, self.shortest_edge, self.resample)
        height, width = self.crop
        top, left = (resized.height - height) // 2, (resized.width - width) // 2
        return apply_lookup(resized.crop((left, top, left + width, top + height)), self.tables)


def _size_fields(size: Any) -> dict:
    """A processor's size setting (dict in transformers 4, ``SizeDict`` in 5) as a plain dict."""
    if size is None:
        return {}
    if isinstance(size, dict):
        return dict(size)
    return {k: getattr(size, k) for k in ("height", "width", "shortest_edge", "longest_edge") if hasattr(size, k)}


def _transformers_at_least(version: str) -> bool:
    from accelerate.utils import compare_versions

    return compare_versions("transformers", ">=", version)


def load_pickscore_image_processor(source: str | os.PathLike) -> Any:
    """The original PIL/NumPy ``CLIPImageProcessor`` of ``source`` (hub id or folder), never the
    torchvision ("fast") one."""
    from transformers import AutoImageProcessor

    pin = {"backend": "pil"} if _transformers_at_least("5.0") else {"use_fast": False}
    processor = AutoImageProcessor.from_pretrained(str(source), **pin)
    if type(processor).__name__.endswith("Fast") or "Torchvision" in [c.__name__ for c in type(processor).__mro__]:
        raise UserError(f"could not load the PIL CLIP image processor from {source} (got {type(processor).__name__})")
    return processor


def _load_clip_model(source: str | os.PathLike) -> torch.nn.Module:
    from transformers import CLIPModel

    fp32 = {"dtype": torch.float32} if _transformers_at_least("4.56") else {"torch_dtype": torch.float32}
    return CLIPModel.from_pretrained(str(source), **fp32)


@register_reward("pickscore")
def load_pickscore(
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    *,
    processor: str | os.PathLike | None = None,
    scale: str = "raw",
) -> PickScoreReward:
    """Load PickScore: ``weights`` = CLIPModel hub id or folder (None = ``yuvalkirstain/PickScore_v1``),
    ``processor`` = processor hub id or folder (None = the ``weights`` folder when it holds a
    ``preprocessor_config.json``, else ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` as the reference),
    ``scale`` = ``"raw"`` (reference value) or ``"div100"`` (Social Reward's tables)."""
    from transformers import AutoTokenizer

    if processor is None and weights is not None and (Path(weights) / "preprocessor_config.json").is_file():
        processor = weights
    processor = processor or PICKSCORE_PROCESSOR
    image_processor = load_pickscore_image_processor(processor)
    tokenizer = AutoTokenizer.from_pretrained(str(processor))
    model = _load_clip_model(weights or PICKSCORE_MODEL)
    model = model.to(device=resolve_device(str(device)), dtype=resolve_dtype(dtype)).eval()
    return PickScoreReward(model, image_processor, tokenizer, scale=scale).eval()


def write_laion_vit_h_14_processor(out_dir: str | os.PathLike) -> Path:
    """Write the processor files of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` offline: the real
    CLIP BPE tokenizer (``!`` padding) and the laion ``preprocessor_config.json``."""
    out = write_clip_tokenizer(out_dir, pad_token=LAION_PAD_TOKEN, model_max_length=MAX_LENGTH)
    (out / "preprocessor_config.json").write_text(json.dumps(LAION_VIT_H_14_PREPROCESSOR_CONFIG, indent=2))
    return out


# (text, vision, projection_dim) of the CLIPModel sizes make_tiny_pickscore writes. The token
# ids are the legacy ones of the laion conversion: the text is pooled at argmax(ids) = EOS.
_TEXT_IDS = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=MAX_LENGTH, hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
_VISION_IMAGE = dict(image_size=224, patch_size=14, hidden_act="gelu")
PICKSCORE_SIZES: dict[str, tuple[dict, dict, int]] = {
    "tiny": (
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, **_TEXT_IDS),
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, **_VISION_IMAGE),
        32,
    ),
    # laion/CLIP-ViT-H-14-laion2B-s32B-b79K, PickScore_v1's architecture
    "ViT-H-14": (
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, **_TEXT_IDS),
        dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, **_VISION_IMAGE),
        1024,
    ),
}


def make_tiny_pickscore(out_dir: str | os.PathLike, seed: int = 0, logit_scale: float = 4.5, size: str = "tiny") -> Path:
    """Write a PickScore folder: a ``CLIPModel`` of the real family (GELU, 224 px, patch 14, real
    vocabulary, 77 positions) with seeded random weights and ``logit_scale`` (exp(4.5) ~ 90,
    deliberately not 100), plus the laion processor files, so ``weights=processor=out_dir``.
    ``size``: ``"tiny"`` (for tests) or ``"ViT-H-14"`` (the real size)."""
    from transformers import CLIPConfig, CLIPModel

    if size not in PICKSCORE_SIZES:
        raise UserError(f"unknown pickscore size '{size}' (expected one of {sorted(PICKSCORE_SIZES)})")
    text, vision, projection_dim = PICKSCORE_SIZES[size]
    text_config, vision_config = dict(text, projection_dim=projection_dim), dict(vision, projection_dim=projection_dim)
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim, logit_scale_init_value=logit_scale)
    torch.manual_seed(seed)
    model = CLIPModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(logit_scale)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    write_laion_vit_h_14_processor(out)
    return out


__all__ = [
    "LAION_VIT_H_14_PREPROCESSOR_CONFIG",
    "PickScoreReward",
    "load_pickscore",
    "load_pickscore_image_processor",
    "make_tiny_pickscore",
    "write_laion_vit_h_14_processor",
]
