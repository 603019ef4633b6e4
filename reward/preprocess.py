"""Image preprocessing shared by several reward models, written to equal the references exactly."""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
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
    height, width = shortest_edge_size(image.height, image.width, size)
    resized = image.resize((width, height), resample)
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


# --------------------------------------------------------------------------- differentiable (tensor) path
#
# Online objectives score images the model has just decoded, as tensors in [0, 1] that must keep
# their gradient. These functions are the torch counterparts of the PIL transforms above; they
# agree with them up to PIL's rounding to uint8 (see tests/test_differentiable_scoring.py).

_TENSOR_MODES = {int(Image.BICUBIC): "bicubic", int(Image.BILINEAR): "bilinear"}


def tensor_resample_mode(resample: int) -> str | None:
    """The ``F.interpolate`` mode that mimics PIL filter ``resample`` (antialiased), or None."""
    return _TENSOR_MODES.get(int(resample))


def shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after :func:`resize_shortest_edge`: shorter side ``size``, longer truncated."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def resize_shortest_edge_tensor(images: torch.Tensor, size: int, resample: int = Image.BICUBIC) -> torch.Tensor:
    """:func:`resize_shortest_edge` for a batch [B, C, H, W] in [0, 1], differentiably.

    PIL resamples in two passes, horizontal then vertical (skipping a pass whose size does not
    change), and clips to [0, 255] after each; torch's antialiased bicubic uses PIL's kernel
    (a = -0.5, support widened by the downscale factor). Doing the same two passes with a clamp
    after each brings the result within one uint8 level of PIL's on real images; a single 2-D
    pass differs by up to ~6 levels where the kernel overshoots near edges."""
    mode = tensor_resample_mode(resample)
    if mode is None:
        raise ValueError(f"no differentiable counterpart of PIL resample filter {resample} (bicubic and bilinear have one)")
    height, width = images.shape[-2:]
    new_height, new_width = shortest_edge_size(height, width, size)
    out = images
    if new_width != width:
        out = F.interpolate(out, size=(height, new_width), mode=mode, antialias=True, align_corners=False).clamp(0, 1)
    if new_height != height:
        out = F.interpolate(out, size=(new_height, new_width), mode=mode, antialias=True, align_corners=False).clamp(0, 1)
    return out


def center_crop_tensor(images: torch.Tensor, height: int, width: int, offset: str = "round") -> torch.Tensor:
    """Centre crop of [..., H, W] (no padding: the image must be at least the crop's size).
    ``offset="round"``: torchvision's ``int(round(excess / 2))`` (round half to even);
    ``"floor"``: transformers' ``excess // 2``; the two differ by 1 px for odd excesses."""
    full_height, full_width = images.shape[-2:]
    if full_height < height or full_width < width:
        raise ValueError(f"cannot centre crop {full_height}x{full_width} to {height}x{width}")
    if offset == "round":
        top, left = int(round((full_height - height) / 2.0)), int(round((full_width - width) / 2.0))
    elif offset == "floor":
        top, left = (full_height - height) // 2, (full_width - width) // 2
    else:
        raise ValueError(f"offset must be 'round' or 'floor', got {offset!r}")
    return images[..., top : top + height, left : left + width]


def normalize_tensor(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``(images - mean) / std`` per channel of [B, C, H, W], out of place."""
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def openai_clip_tensor_transform(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """:func:`openai_clip_transform` for a batch [B, 3, H, W] of RGB values in [0, 1], differentiably."""
    resized = resize_shortest_edge_tensor(images, size, Image.BICUBIC)
    return normalize_tensor(center_crop_tensor(resized, size, size, "round"), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def open_image(path: str) -> Image.Image | str:
    """The decoded image, or why it cannot be read (missing, empty, truncated, not an image)."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except Exception as exc:  # record, never crash
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
