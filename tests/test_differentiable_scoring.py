"""The differentiable scoring path of the reward models (``score_tensor``): on real generated
images it gives the scores of the PIL path, and gradients reach the image.

Measured on 24 SiD-LSG images (512x512 and two non-square crops of them, 512x383 and 293x512,
whose odd crop excesses tell torchvision's rounded crop offset from transformers' floored one),
tiny scorers, fp32 on the CPU. Largest |score_tensor - score_images| as a share of the score
spread over the batch (max - min):

    clip 0.03 %, social_reward 0.04 %, aesthetic 0.14 %, social_aesthetic 0.19 %,
    pickscore 0.07 %, imagereward 0.08 %, hpsv2 0.00 % (1.2e-7 absolute: the same tensor ops)

Pixels: the tensor path is within 1.06 uint8 levels of the PIL path everywhere (1.03 on the
squares), since PIL rounds to uint8 after each of its two resampling passes; a one-pass 2-D
resize would be up to 6.5 levels off. hpsv2's reference transform already works on tensors
and is matched exactly. The tests assert 1 % of the spread and 1.5 levels.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_tiny_reward
from reward import load_reward
from reward.base import NotDifferentiableError
from reward.preprocess import center_crop_tensor
from reward.social_aesthetic import SocialAestheticHead, save_head

DIFFERENTIABLE = ["clip", "social_reward", "aesthetic", "social_aesthetic", "pickscore", "hpsv2", "imagereward"]
CROPS = {"square": None, "landscape": (0, 0, 512, 383), "portrait": (7, 0, 300, 512)}
SCORE_SHARE_OF_SPREAD = 0.01  # measured at most 0.0019 (module docstring)
PIXEL_LEVELS = 1.5 / 255  # measured at most 1.06 / 255
IMAGES = 24


@pytest.fixture(scope="module")
def settings(tiny_rewards, tmp_path_factory):
    """The six tiny scorers plus a tiny social_aesthetic head on the tiny clip backbone."""
    folder = tmp_path_factory.mktemp("social_aesthetic")
    torch.manual_seed(7)
    save_head(SocialAestheticHead(32, "classification", 16), folder, {"clip": {"weights": tiny_rewards["weights"]["clip"]}})
    return {"weights": {**tiny_rewards["weights"], "social_aesthetic": str(folder)}, "options": tiny_rewards["options"]}


@pytest.fixture(scope="module")
def real_batch(shared_data):
    """24 real generated images (512x512 PNG) with their prompts."""
    root = shared_data / "images" / "sid_lsg"
    with open(root / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["format"] == "PNG"][:IMAGES]
    return [Image.open(root / r["image_path"]).convert("RGB") for r in rows], [r["prompt"] for r in rows]


def as_tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]).float() / 255


def cropped(images: list[Image.Image], crop: str) -> list[Image.Image]:
    box = CROPS[crop]
    return images if box is None else [im.crop(box) for im in images]


@pytest.mark.parametrize("crop", sorted(CROPS))
@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_score_tensor_equals_the_pil_scores_within_one_percent_of_their_spread(settings, real_batch, name, crop):
    images, prompts = real_batch
    images = cropped(images, crop)
    scorer = load_tiny_reward(settings, name)
    assert scorer.is_differentiable
    reference = scorer.score_images(images, prompts)
    scores = scorer.score_tensor(as_tensor(images), prompts).detach()
    spread = float(reference.max() - reference.min())
    assert spread > 0
    assert float((scores - reference).abs().max()) <= SCORE_SHARE_OF_SPREAD * spread


@pytest.mark.parametrize("crop", sorted(CROPS))
@pytest.mark.parametrize("name", ["clip", "pickscore", "imagereward", "hpsv2"])
def test_preprocess_tensor_is_within_one_and_a_half_uint8_levels_of_the_pil_pixels(settings, real_batch, name, crop):
    images = cropped(real_batch[0][:6], crop)
    scorer = load_tiny_reward(settings, name)
    pil = torch.stack([scorer.preprocess_image(im) for im in images])
    tensor = scorer.preprocess_tensor(as_tensor(images))
    assert tensor.shape == pil.shape
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)  # every scorer here uses OpenAI CLIP's
    tolerance = 1e-6 if name == "hpsv2" else PIXEL_LEVELS
    assert float(((tensor - pil) * std).abs().max()) <= tolerance


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_gradients_reach_the_image_and_not_the_frozen_scorer(settings, real_batch, name):
    images, prompts = real_batch
    scorer = load_tiny_reward(settings, name)
    assert not any(p.requires_grad for p in scorer.parameters())
    pixels = as_tensor(images[:4]).requires_grad_(True)
    scorer.score_tensor(pixels, prompts[:4]).sum().backward()
    assert torch.isfinite(pixels.grad).all()
    assert (pixels.grad.flatten(1).abs().sum(1) > 0).all()  # every image gets a gradient
    assert all(p.grad is None for p in scorer.parameters())


def test_score_tensor_takes_token_ids_as_well_as_prompts(settings, real_batch):
    images, prompts = real_batch
    scorer = load_tiny_reward(settings, "pickscore")
    pixels = as_tensor(images[:3])
    torch.testing.assert_close(scorer.score_tensor(pixels, scorer.tokenize(prompts[:3])), scorer.score_tensor(pixels, prompts[:3]), rtol=0, atol=0)


def test_trainable_load_keeps_the_scorer_parameters_trainable(settings):
    scorer = load_reward("hpsv2", weights=settings["weights"]["hpsv2"], trainable=True)
    assert all(p.requires_grad for p in scorer.parameters())


def test_score_tensor_refuses_images_that_are_not_a_float_rgb_batch(settings):
    scorer = load_tiny_reward(settings, "clip")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        scorer.score_tensor(torch.zeros(3, 32, 32), ["a cat"])


@pytest.mark.parametrize("name", ["world_judge", "world_fidelity"])
def test_the_world_scorers_refuse_as_evaluation_only(tmp_path, name):
    (tmp_path / "community.json").write_text('{"taste": "large-centred"}')
    scorer = load_reward(name, weights=tmp_path if name == "world_judge" else None)
    assert not scorer.is_differentiable
    for call in (lambda: scorer.score_tensor(torch.rand(1, 3, 32, 32), ["two red circles"]), lambda: scorer.preprocess_tensor(torch.rand(1, 3, 32, 32))):
        with pytest.raises(NotDifferentiableError, match=f"'{name}' is evaluation-only") as info:
            call()
        assert isinstance(info.value, (NotImplementedError, ValueError))


def test_centre_crop_offsets_follow_torchvision_rounding_and_transformers_floor():
    rows = torch.arange(7.0).view(7, 1)  # excess 7 - 2 = 5: round(2.5) = 2 (half to even), floor = 2; excess 3 -> round(1.5) = 2, floor 1
    assert center_crop_tensor(rows, 2, 1, "round")[:, 0].tolist() == [2.0, 3.0]
    assert center_crop_tensor(rows[:5], 2, 1, "round")[:, 0].tolist() == [2.0, 3.0]
    assert center_crop_tensor(rows[:5], 2, 1, "floor")[:, 0].tolist() == [1.0, 2.0]
