"""Image preprocessing shared by several reward models, written to equal the references exactly."""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def convert_rgb(image: Image.Image) -> Image.Image:
    """PIL's ``image.convert("RGB")``, the conversion every reference scorer uses: alpha and
    transparency entries are dropped (the RGB values under transparent pixels are kept), never
    composited onto a background. An RGB image without a transparency entry is returned as is;
    the result never carries one, so a processor that composites transparency sees none."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    rgb = image.convert("RGB")
    rgb.info.pop("transparency", None)
    return rgb


def lookup_tables(normalize: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Per channel, the float32 value ``normalize`` gives each uint8 level: [3, 256].

    ``normalize`` maps a uint8 array [3, H, W] (channels first) to float32, pixel by pixel (each
    output value depends only on its own input value and channel), so running it once on all
    256 levels yields tables that reproduce it bit for bit, by construction."""
    levels = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256)).copy()
    tables = np.asarray(normalize(levels), dtype=np.float32).reshape(3, 256)
    return np.ascontiguousarray(tables)


def apply_lookup(image: Image.Image, tables: np.ndarray) -> torch.Tensor:
    """RGB image -> float32 tensor [3, H, W] of ``tables[c][pixel]`` (a gather, no arithmetic)."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    pixels = np.asarray(image)
    out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
    for channel in range(3):
        np.take(tables[channel], pixels[:, :, channel], out=out[channel])
    return torch.from_numpy(out)


class RGBToNormalizedTensor:
    """``Normalize(mean, std)(ToTensor()(rgb_image))``, bit-identical: torchvision's own two
    transforms run once on the 256 levels (see :func:`lookup_tables`), then a table lookup per
    pixel, about a third of their time."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean, self.std = tuple(mean), tuple(std)
        to_tensor, normalize = T.ToTensor(), T.Normalize(mean, std)
        self.tables = lookup_tables(lambda levels: normalize(to_tensor(levels.transpose(1, 2, 0))).numpy())

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return apply_lookup(image, self.tables)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


_last_resize = threading.local()


def resize_shortest_edge(image: Image.Image, size: int, resample: int = Image.BICUBIC) -> Image.Image:
    """PIL resize of the shorter side to ``size``, the longer side ``int(size * long / short)``:
    what torchvision's ``Resize(int)`` and transformers' ``shortest_edge`` resize do to a PIL image.

    The last result is remembered (per thread), so the scorers whose transforms share this step
    (OpenAI CLIP's and PickScore's, on an RGB image) resize each image once."""
    key = (size, int(resample))
    cached = getattr(_last_resize, "entry", None)
    if cached is not None and cached[0] is image and cached[1] == key:
        return cached[2]
    width, height = image.size
    if width <= height:
        target = (size, int(size * height / width))
    else:
        target = (int(size * width / height), size)
    resized = image.resize(target, resample)
    _last_resize.entry = (image, key, resized)
    return resized


class ShortestEdgeResize:
    """``T.Resize(size, interpolation=BICUBIC)`` for PIL images, through :func:`resize_shortest_edge`."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        return resize_shortest_edge(image, self.size, Image.BICUBIC)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, interpolation=bicubic)"


def openai_clip_transform(size: int = 224) -> T.Compose:
    """openai/CLIP's ``_transform(size)`` (also ImageReward's): bicubic resize of the short side,
    centre crop, RGB conversion *after* the crop, ToTensor, CLIP mean/std (the last two fused,
    bit-identical, see :class:`RGBToNormalizedTensor`)."""
    return T.Compose(
        [
            ShortestEdgeResize(size),
            T.CenterCrop(size),
            convert_rgb,
            RGBToNormalizedTensor(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        ]
    )


def openai_clip_key(size: int) -> str:
    """The ``preprocess_key`` of :func:`openai_clip_transform` at ``size`` px."""
    return f"openai-clip-{size}"


def open_clip_tokens_key(context_length: int) -> str:
    """The ``tokenize_key`` of open_clip's ``tokenize`` (= ``clip.tokenize(..., truncate=True)``)."""
    return f"open_clip-{context_length}"
