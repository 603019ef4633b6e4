"""The demo world's two evaluation-only scorers, computed from pixels with no model:

* ``world_judge``: the world's hidden taste (in [0, 1]), what the simulated community rewards;
  the prompt is ignored. It scores with the taste the world recorded (``weights``: the world's
  folder, its ``community`` folder or ``community.json``), never with a default, so a world
  cannot be judged with another world's taste by accident.
* ``world_fidelity``: 1.0 when the image shows the count, colour and shape of the subject its
  world caption names (:func:`sr_finetune.world.pixels.fidelity`), else 0.0;
  NaN for a prompt that is not a world caption.

Both are registered ``eval_only``: the pair builder and training refuse them as a reward, so an
experiment can never train on the quantity it is judged by. They hold no weights; an empty
parameter carries the device and dtype the scoring run asks a scorer for.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from sr_finetune.errors import UserError
from sr_finetune.models import resolve_device
from sr_finetune.world.pixels import FIDELITY_ATTRIBUTES, read_image
from sr_finetune.world.scenes import COLOURS, COUNTS, SHAPES, SIZES, TEXTURES, Prompt, parse_caption
from sr_finetune.world.taste import Taste, recorded_taste

from .base import PromptFreeReward, RewardModel, register_reward

# Caption attributes as integer codes (one row per prompt; -1 = not a world caption).
_CODES = {"count": list(COUNTS), "size": list(SIZES), "colour": list(COLOURS), "shape": list(SHAPES), "background": list(COLOURS), "texture": list(TEXTURES)}


def encode_caption(text: str) -> list[int]:
    """A world caption's attributes as integer codes; all -1 when ``text`` is no world caption."""
    try:
        prompt = parse_caption(text)
    except UserError:
        return [-1] * len(_CODES)
    return [_CODES[name].index(getattr(prompt, name)) for name in _CODES]


def decode_caption(codes: list[int]) -> Prompt | None:
    if min(codes) < 0:
        return None
    return Prompt(**{name: _CODES[name][c] for name, c in zip(_CODES, codes)})


class PixelScorer(RewardModel):
    """A scorer computed from the image's pixels: ``preprocess_image`` keeps them as uint8."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)

    @property
    def preprocess_key(self) -> str:
        return "rgb-uint8"

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()

    @staticmethod
    def images(pixel_values: torch.Tensor) -> list[Image.Image]:
        array = pixel_values.detach().to("cpu", torch.uint8).permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(a) for a in array]


class WorldJudge(PixelScorer, PromptFreeReward):
    name = "world_judge"

    def __init__(self, taste: Taste) -> None:
        super().__init__()
        self.taste = taste

    def score(self, pixel_values: torch.Tensor, text_inputs: torch.Tensor | None = None) -> torch.Tensor:
        return torch.tensor([self.taste(im) for im in self.images(pixel_values)], dtype=torch.float32)


class WorldFidelity(PixelScorer):
    name = "world_fidelity"

    @property
    def tokenize_key(self) -> str:
        return "world-caption"

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return torch.tensor([encode_caption(p) for p in prompts], dtype=torch.long).reshape(len(prompts), len(_CODES))

    def score(self, pixel_values: torch.Tensor, text_inputs: torch.Tensor) -> torch.Tensor:
        scores = []
        for image, codes in zip(self.images(pixel_values), text_inputs.tolist()):
            prompt = decode_caption(codes)
            if prompt is None:
                scores.append(float("nan"))
                continue
            matches = read_image(image).matches(prompt)
            scores.append(float(all(matches[name] for name in FIDELITY_ATTRIBUTES)))
        return torch.tensor(scores, dtype=torch.float32)


def _no_weights(name: str, weights: str | os.PathLike | None) -> None:
    if weights is not None:
        raise UserError(f"{name} is computed from pixels and takes no weights (got weights={weights})")


@register_reward("world_judge", concurrent_load=True, eval_only=True)
def load_world_judge(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu", dtype: str | torch.dtype = "fp32") -> WorldJudge:
    """The demo world's hidden taste from pixels (evaluation only), as the world at ``weights`` recorded it."""
    if weights is None:
        raise UserError("world_judge scores with the taste a world recorded: give its weights as the world's folder or its community.json (e.g. weights: {world_judge: runs/demo/world})")
    return WorldJudge(recorded_taste(weights)).to(resolve_device(str(device)))


@register_reward("world_fidelity", concurrent_load=True, eval_only=True)
def load_world_fidelity(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu", dtype: str | torch.dtype = "fp32") -> WorldFidelity:
    """1/0 prompt fidelity of a world image from pixels (evaluation only)."""
    _no_weights("world_fidelity", weights)
    return WorldFidelity().to(resolve_device(str(device)))


__all__ = ["WorldFidelity", "WorldJudge", "decode_caption", "encode_caption", "load_world_fidelity", "load_world_judge"]
