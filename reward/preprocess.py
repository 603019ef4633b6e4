"""Image preprocessing shared by several reward models, written to equal the references exactly."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


class RGBToNormalizedTensor:
    """``Normalize(mean, std)(ToTensor()(rgb_image))`` with the same float32 operations in the
    same order (``x / 255``, ``- mean``, ``/ std``), so bit-identical, but done in place on the
    H x W x 3 array and transposed once at the end: about half of torchvision's time."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode}")
        pixels = torch.from_numpy(np.array(image, dtype=np.float32)).div_(255)
        return pixels.sub_(self.mean).div_(self.std).permute(2, 0, 1).contiguous()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={tuple(self.mean.tolist())}, std={tuple(self.std.tolist())})"


def openai_clip_transform(size: int = 224) -> T.Compose:
    """openai/CLIP's ``_transform(size)`` (also ImageReward's): bicubic resize of the short side,
    centre crop, RGB conversion *after* the crop, ToTensor, CLIP mean/std (the last two fused,
    bit-identical, see :class:`RGBToNormalizedTensor`)."""
    return T.Compose(
        [
            T.Resize(size, interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            _to_rgb,
            RGBToNormalizedTensor(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        ]
    )


def openai_clip_key(size: int) -> str:
    """The ``preprocess_key`` of :func:`openai_clip_transform` at ``size`` px."""
    return f"openai-clip-{size}"


def open_clip_tokens_key(context_length: int) -> str:
    """The ``tokenize_key`` of open_clip's ``tokenize`` (= ``clip.tokenize(..., truncate=True)``)."""
    return f"open_clip-{context_length}"
