"""Image preprocessing shared by several reward models, written to equal the references exactly."""

from __future__ import annotations

from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def openai_clip_transform(size: int = 224) -> T.Compose:
    """openai/CLIP's ``_transform(size)`` (also ImageReward's): bicubic resize of the short side,
    centre crop, RGB conversion *after* the crop, ToTensor, CLIP mean/std."""
    return T.Compose(
        [
            T.Resize(size, interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            _to_rgb,
            T.ToTensor(),
            T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        ]
    )


def openai_clip_key(size: int) -> str:
    """The ``preprocess_key`` of :func:`openai_clip_transform` at ``size`` px."""
    return f"openai-clip-{size}"


def open_clip_tokens_key(context_length: int) -> str:
    """The ``tokenize_key`` of open_clip's ``tokenize`` (= ``clip.tokenize(..., truncate=True)``)."""
    return f"open_clip-{context_length}"
