"""HPS v2 and PickScore scorers: preprocessing, tokenisation and score formulas pinned against
hand-computed values, on tiny models written in the real checkpoint formats."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

import reward
from reward.hpsv2 import HPS_FILES, TINY_HPS_CONFIG, VIT_H_14_CONFIG, hps_preprocess, load_hpsv2, make_tiny_hpsv2
from reward.pickscore import PickScoreReward, load_pickscore, make_tiny_pickscore
from reward.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from sr_finetune.errors import UserError

from conftest import IMAGE_MODES, image_in_mode, real_image_files

MEAN = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]
STD = torch.tensor(OPENAI_CLIP_STD)[:, None, None]
SOT, EOT = 49406, 49407


def random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    channels = len(mode)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


def normalised(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - MEAN) / STD


@pytest.fixture(scope="module")
def hps_file(tmp_path_factory) -> Path:
    return make_tiny_hpsv2(tmp_path_factory.mktemp("hps"), seed=0)


@pytest.fixture(scope="module")
def hps(hps_file):
    return reward.load_reward("hpsv2", weights=hps_file, model_config="tiny")


@pytest.fixture(scope="module")
def pick_dir(tmp_path_factory) -> Path:
    return make_tiny_pickscore(tmp_path_factory.mktemp("pickscore"), seed=0, logit_scale=4.5)


@pytest.fixture(scope="module")
def pick(pick_dir) -> PickScoreReward:
    return reward.load_reward("pickscore", weights=pick_dir, processor=pick_dir)


@pytest.fixture(scope="module")
def long_prompt(shared_data) -> str:
    """A real DiffusionDB prompt longer than CLIP's 77-token context."""
    from open_clip.tokenizer import _tokenizer

    rows = json.loads((shared_data / "prompts" / "diffusiondb_sample" / "refl_data.json").read_text())
    return next(r["text"] for r in rows if len(_tokenizer.encode(r["text"])) > 90)


# ------------------------------------------------------------------ HPS v2: preprocessing


def test_hps_resize_rounds_with_python_round_and_pads_centred_with_minus_mean_over_std():
    pixels = hps_preprocess(random_image(512, 300))  # scale 224/512: 300 -> round(131.25) = 131 rows
    assert pixels.shape == (3, 224, 224)
    pad = (-MEAN / STD).expand(3, 224, 224)
    top, bottom = (224 - 131) // 2, 224 - 131 - (224 - 131) // 2  # 46, 47
    assert torch.allclose(pixels[:, :top], pad[:, :top]) and torch.allclose(pixels[:, 224 - bottom :], pad[:, 224 - bottom :])
    assert not torch.allclose(pixels[:, top], pad[:, top]) and not torch.allclose(pixels[:, 224 - bottom - 1], pad[:, 0])

    # 301 * 224/448 = 150.5: Python's round sends it to the even 150 (int(x + 0.5) would give 151)
    pixels = hps_preprocess(random_image(448, 301))
    content_rows = (~torch.isclose(pixels, pad).all(dim=2).all(dim=0)).sum().item()
    assert content_rows == 150


def test_hps_pixels_equal_a_manual_bicubic_tensor_resize_then_pad():
    image = random_image(512, 300, seed=1)
    raw = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    for antialias in (False, True):
        resized = F.interpolate(raw[None], size=(131, 224), mode="bicubic", align_corners=False, antialias=antialias)[0]
        expected = normalised(F.pad(resized, (0, 0, 46, 47), value=0.0))
        assert torch.allclose(hps_preprocess(image, antialias=antialias), expected, atol=1e-6)


def test_hps_antialias_is_off_by_default_and_changes_pixels(hps, hps_file):
    image = random_image(512, 300, seed=2)
    assert hps.antialias is False
    assert torch.equal(hps.preprocess_image(image), hps_preprocess(image, antialias=False))
    with_aa = load_hpsv2(hps_file, model_config="tiny", antialias=True)
    assert not torch.allclose(with_aa.preprocess_image(image), hps.preprocess_image(image), atol=1e-3)


def test_hps_pads_a_non_square_image_whose_longer_side_is_already_224():
    image = random_image(100, 224, seed=3)  # the reference would return it unpadded, 224 x 100
    pixels = hps_preprocess(image)
    assert pixels.shape == (3, 224, 224)
    exact = normalised(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255)
    assert torch.allclose(pixels[:, :, 62:162], exact, atol=1e-6)  # not resized, left pad 124 // 2
    assert torch.allclose(pixels[:, :, :62], (-MEAN / STD).expand(3, 224, 62))


def hpsv2_reference_transform(image: Image.Image, antialias: bool) -> torch.Tensor:
    """hpsv2's validation transform (``light_augmentation=True``) from torchvision's functions:
    RGBA kept, every other mode ``convert("RGB")``; ToTensor; ``ResizeMaxSize(224)`` on the
    tensor (resize and pad only when the scale is not 1); ``MaskAwareNormalize`` (alpha as is)."""
    image = image if image.mode == "RGBA" else image.convert("RGB")
    pixels = T.functional.to_tensor(image)
    height, width = pixels.shape[1:]
    scale = 224 / float(max(height, width))
    if scale != 1.0:
        height, width = round(height * scale), round(width * scale)
        pixels = T.functional.resize(pixels, [height, width], interpolation=T.InterpolationMode.BICUBIC, antialias=antialias)
        pad_h, pad_w = 224 - height, 224 - width
        pixels = T.functional.pad(pixels, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return torch.cat([T.functional.normalize(pixels[:3], OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), pixels[3:]])


@pytest.mark.parametrize("mode", IMAGE_MODES)
def test_hps_equals_the_reference_transform_in_every_image_mode(mode):
    for i, size in enumerate([(300, 200), (180, 333)]):
        image = image_in_mode(mode, *size, seed=i)
        for antialias in (False, True):
            ours, theirs = hps_preprocess(image, antialias=antialias), hpsv2_reference_transform(image, antialias)
            if mode != "RGBA":  # the same torchvision calls in the same order: exact by construction
                assert torch.equal(ours, theirs), (size, antialias)
                continue
            # the reference keeps alpha as a 4th channel (which its ViT rejects); ours are its first
            # three. Resizing 4 planes instead of 3 may take another kernel path: fp32 tolerance.
            assert theirs.shape[0] == 4 and ours.shape[0] == 3
            torch.testing.assert_close(ours, theirs[:3], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ HPS v2: text and score


def test_hps_tokenize_truncates_a_long_prompt_with_eot_like_the_hf_clip_tokenizer(hps, pick, long_prompt):
    ids = hps.tokenize([long_prompt, "a cat"])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0, 0] == SOT and ids[0, -1] == EOT and (ids[0] == EOT).sum() == 1
    # an independent BPE implementation (transformers' CLIPTokenizer on the same vocabulary)
    hf_ids = pick.tokenizer(long_prompt, truncation=False)["input_ids"]
    assert len(hf_ids) > 77 and ids[0, :76].tolist() == hf_ids[:76]
    short = pick.tokenizer("a cat")["input_ids"]
    assert ids[1, : len(short)].tolist() == short and (ids[1, len(short) :] == 0).all()


def test_hps_score_is_the_raw_cosine_of_normalised_features_without_logit_scale(hps):
    images = [random_image(512, 512, seed=s) for s in range(3)]
    prompts = ["a red car", "a watercolor of a fox", "portrait of an astronaut"]
    pixels = torch.stack([hps.preprocess_image(im) for im in images])
    ids = hps.tokenize(prompts)
    with torch.no_grad():
        image_features = F.normalize(hps.model.encode_image(pixels), dim=-1)
        text_features = F.normalize(hps.model.encode_text(ids), dim=-1)
        expected = torch.diagonal(image_features @ text_features.T)
        scores = hps.score(pixels, ids)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert torch.allclose(scores, expected, atol=1e-6)
    assert hps.model.logit_scale.exp().item() != pytest.approx(1.0)  # so a stray logit scale would show


def test_hps_checkpoint_is_an_fp16_state_dict_and_round_trips(hps, hps_file):
    checkpoint = torch.load(hps_file, map_location="cpu", weights_only=True)
    assert hps_file.name == HPS_FILES["v2.0"] and set(checkpoint) == {"state_dict"}
    state = checkpoint["state_dict"]
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    loaded = hps.model.state_dict()
    assert set(state) <= set(loaded)
    assert all(loaded[k].dtype == torch.float32 and torch.equal(loaded[k], v.float()) for k, v in state.items())


def test_hps_weights_may_be_the_file_or_its_folder(hps, hps_file):
    from_folder = load_hpsv2(hps_file.parent, model_config="tiny", version="v2.0")
    assert all(torch.equal(a, b) for a, b in zip(from_folder.state_dict().values(), hps.state_dict().values()))
    with pytest.raises(UserError, match="HPS_v2.1_compressed.pt"):
        load_hpsv2(hps_file.parent, model_config="tiny", version="v2.1")
    with pytest.raises(UserError, match="version"):
        load_hpsv2(hps_file, model_config="tiny", version="v3")


def test_hps_batch_scores_equal_one_by_one(hps):
    images = [random_image(w, h, seed=i) for i, (w, h) in enumerate([(512, 512), (640, 384), (300, 500)])]
    prompts = ["a castle", "a dog on a beach", "a bowl of fruit"]
    batch = hps.score_images(images, prompts)
    single = torch.cat([hps.score_images([im], [p]) for im, p in zip(images, prompts)])
    assert torch.allclose(batch, single, atol=1e-5)


def test_hps_configs_are_open_clip_vit_h_14_and_its_tiny_sibling():
    import open_clip

    assert VIT_H_14_CONFIG == open_clip.get_model_config("ViT-H-14")
    for cfg in (VIT_H_14_CONFIG, TINY_HPS_CONFIG):
        assert cfg["vision_cfg"]["image_size"] == 224 and cfg["vision_cfg"]["patch_size"] == 14
        assert cfg["text_cfg"]["vocab_size"] == 49408 and cfg["text_cfg"]["context_length"] == 77
        assert not cfg.get("quick_gelu", False)


# ------------------------------------------------------------------ PickScore: preprocessing


def test_pickscore_centre_crop_uses_hf_floor_offset_not_torchvision_round(pick):
    # 299 x 224: no resize, horizontal excess 75 -> HF crops from 75 // 2 = 37, torchvision from round(37.5) = 38
    columns = np.tile(np.arange(299, dtype=np.uint8)[None, :, None], (224, 1, 3))
    image = Image.fromarray(columns)
    pixels = pick.preprocess_image(image)
    first_column = pixels[0, 0, 0] * OPENAI_CLIP_STD[0] + OPENAI_CLIP_MEAN[0]
    assert round(first_column.item() * 255) == 37
    torchvision_crop = T.CenterCrop(224)(image)
    assert np.asarray(torchvision_crop)[0, 0, 0] == 38


def test_pickscore_pixels_equal_pil_bicubic_shortest_edge_resize_then_floor_crop(pick):
    image = random_image(504, 333, seed=5)  # long side int(224 * 504 / 333) = 339, excess 115
    resized = image.resize((339, 224), Image.BICUBIC)
    cropped = np.asarray(resized)[:, 57 : 57 + 224]  # floor(115 / 2) = 57
    expected = normalised(torch.from_numpy(cropped.copy()).permute(2, 0, 1).double() / 255).float()
    assert torch.allclose(pick.preprocess_image(image), expected, atol=1e-6)


def test_pickscore_converts_to_rgb_before_resizing(pick):
    palette = random_image(400, 300, seed=6).quantize(colors=64)  # PIL resizes "P" images with NEAREST
    assert torch.equal(pick.preprocess_image(palette), pick.preprocess_image(palette.convert("RGB")))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_pickscore_fast_path_is_bit_identical_to_the_pil_processor(pick, mode):
    assert pick.fast_path is not None  # the laion processor's settings are the plain CLIP ones
    for i, size in enumerate([(64, 64), (97, 255), (301, 180), (225, 301), (512, 512), (224, 224), (1000, 223)]):
        image = random_image(*size, seed=i, mode="RGB")
        image = image.quantize(colors=64) if mode == "P" else image.convert(mode)
        expected = pick.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        assert torch.equal(pick.preprocess_image(image), expected), size


def test_pickscore_fast_path_is_bit_identical_to_the_pil_processor_on_real_images(pick, shared_data):
    for path in real_image_files(shared_data):
        with Image.open(path) as image:
            expected = pick.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
            assert torch.equal(pick.preprocess_image(image), expected), path


def reference_pickscore_input(image: Image.Image) -> Image.Image:
    """The RGB image the reference's processor works on: PIL's ``convert("RGB")`` (transformers
    4.27.3, the version PickScore pins, and PickScore's own data loader), with no transparency
    entry left for a newer processor to composite onto white."""
    rgb = image.convert("RGB")
    rgb.info.pop("transparency", None)
    return rgb


@pytest.mark.parametrize("mode", IMAGE_MODES)
def test_pickscore_equals_the_reference_processor_in_every_image_mode(pick, mode):
    """(Also checked against transformers 4.27.3 itself, in a separate environment: bit-identical.)"""
    for i, size in enumerate([(64, 64), (301, 180), (225, 301), (512, 512)]):
        image = image_in_mode(mode, *size, seed=i)
        expected = pick.image_processor(images=reference_pickscore_input(image), return_tensors="pt")["pixel_values"][0]
        assert torch.equal(pick.preprocess_image(image), expected), size


def test_pickscore_drops_alpha_instead_of_compositing_onto_white(pick):
    transparent_red = Image.new("RGBA", (224, 224), (255, 0, 0, 0))
    pixels = pick.preprocess_image(transparent_red) * STD + MEAN
    torch.testing.assert_close(pixels, torch.tensor([1.0, 0.0, 0.0])[:, None, None].expand(3, 224, 224), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P+transparency", "RGB+transparency"])
def test_pickscore_without_a_fast_path_hands_the_processor_the_references_rgb_image(pick, mode):
    processor = copy.deepcopy(pick.image_processor)
    processor.do_center_crop = False
    slow = PickScoreReward(pick.model, processor, pick.tokenizer)
    assert slow.fast_path is None
    image = image_in_mode(mode, 301, 180)
    expected = processor(images=reference_pickscore_input(image), return_tensors="pt")["pixel_values"][0]
    assert torch.equal(slow.preprocess_image(image), expected)


def test_pickscore_processor_with_other_settings_has_no_fast_path(pick):
    from reward.pickscore import CLIPProcessorFastPath

    processor = copy.deepcopy(pick.image_processor)
    processor.do_center_crop = False
    assert CLIPProcessorFastPath.of(processor) is None


def test_pickscore_image_processor_is_pinned_to_the_pil_implementation(pick):
    from transformers.image_processing_utils import BaseImageProcessor

    names = [c.__name__ for c in type(pick.image_processor).__mro__]
    assert isinstance(pick.image_processor, BaseImageProcessor)
    assert not any(n.endswith("Fast") or n.startswith("Torchvision") for n in names)


# ------------------------------------------------------------------ PickScore: text and score


def test_pickscore_tokenize_truncates_to_77_and_pads_with_zero_like_open_clip(pick, hps, long_prompt):
    text = pick.tokenize([long_prompt, "a cat"])
    assert text["input_ids"].shape == (2, 77)
    assert torch.equal(text["input_ids"], hps.tokenize([long_prompt, "a cat"]))  # "!" = id 0
    assert text["attention_mask"][1].tolist() == [1] * 4 + [0] * 73  # SOT a cat EOT
    # fixed length even alone, so prompts tokenised one by one in DataLoader workers stack
    assert pick.tokenize(["a cat"])["input_ids"].shape == (1, 77)


def _embeds(output) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4, an output object in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def test_pickscore_score_is_the_learned_logit_scale_times_cosine(pick, pick_dir):
    assert pick.model.logit_scale.item() == pytest.approx(4.5) and pick.scale == "raw"
    images = [random_image(512, 512, seed=s) for s in range(3)]
    prompts = ["a red car", "a watercolor of a fox, highly detailed", "portrait"]
    pixels = torch.stack([pick.preprocess_image(im) for im in images])
    with torch.no_grad():
        scores = pick.score(pixels, pick.tokenize(prompts))
        expected = []
        for i, prompt in enumerate(prompts):  # the README's path: padding=True, one prompt per call
            text = pick.tokenizer(prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
            e_t = _embeds(pick.model.get_text_features(**text))
            e_i = _embeds(pick.model.get_image_features(pixel_values=pixels[i : i + 1]))
            cosine = F.cosine_similarity(e_t, e_i).item()
            expected.append(math.exp(4.5) * cosine)
    assert torch.allclose(scores, torch.tensor(expected), atol=1e-4)
    div100 = load_pickscore(pick_dir, processor=pick_dir, scale="div100")
    with torch.no_grad():
        assert torch.allclose(div100.score(pixels, div100.tokenize(prompts)), scores / 100, atol=1e-6)
    with pytest.raises(UserError, match="scale"):
        load_pickscore(pick_dir, processor=pick_dir, scale="percent")


def test_pickscore_folder_round_trips_in_the_hf_format(pick, pick_dir):
    from safetensors.torch import load_file

    assert {"config.json", "model.safetensors", "preprocessor_config.json", "vocab.json", "merges.txt"} <= {p.name for p in pick_dir.iterdir()}
    saved = load_file(pick_dir / "model.safetensors")
    loaded = pick.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())
    assert json.loads((pick_dir / "preprocessor_config.json").read_text())["size"] == 224
    assert pick.tokenizer.pad_token == "!" and pick.tokenizer.model_max_length == 77


def test_pickscore_batch_scores_equal_one_by_one(pick):
    images = [random_image(w, h, seed=i) for i, (w, h) in enumerate([(512, 512), (640, 384), (300, 500)])]
    prompts = ["a castle", "a dog on a beach at sunset with dramatic clouds", "fruit"]
    batch = pick.score_images(images, prompts)
    single = torch.cat([pick.score_images([im], [p]) for im, p in zip(images, prompts)])
    assert torch.allclose(batch, single, atol=1e-4)


# ------------------------------------------------------------------ both, through the registry


def test_registry_lists_hpsv2_and_pickscore():
    assert {"hpsv2", "pickscore"} <= set(reward.available_rewards())


@pytest.mark.parametrize("name", ["hpsv2", "pickscore"])
def test_real_images_score_end_to_end_through_load_reward(name, hps_file, pick_dir, long_prompt, shared_data):
    kwargs = {"model_config": "tiny"} if name == "hpsv2" else {"processor": pick_dir}
    weights = hps_file if name == "hpsv2" else pick_dir
    model = reward.load_reward(name, weights=str(weights), device="cpu", dtype="fp32", **kwargs)
    paths = sorted((shared_data / "images" / "imagereward_demo").glob("*.webp"))
    paths.append(shared_data / "images" / "hpsv2_demo" / "demo_image.jpg")
    images = [Image.open(p) for p in paths]
    scores = model.score_images(images, [long_prompt] * len(images))
    assert len(images) == 5 and scores.shape == (5,) and torch.isfinite(scores).all()
