import json

import numpy as np
import pytest
import torch
from PIL import Image

from reward import load_reward
from reward.tiny import METRICS, make_tiny_rewards
from sr_finetune.cli import main


@pytest.fixture(scope="module")
def tiny_rewards(tmp_path_factory):
    out = tmp_path_factory.mktemp("rewards")
    return out, make_tiny_rewards(out)


def test_every_scorer_loads_from_the_written_files_alone(tiny_rewards):
    out, settings = tiny_rewards
    assert settings["metrics"] == METRICS
    assert json.loads((out / "hpsv2" / "open_clip_config.json").read_text())["model_cfg"]["embed_dim"] == 32
    image = Image.new("RGB", (40, 30), (200, 40, 90))
    scores = {}
    for name in METRICS:
        model = load_reward(name, weights=settings["weights"][name], **settings["options"].get(name, {}))
        pixels = model.preprocess_image(image)[None]
        ids = model.tokenize(["a red square"])
        scores[name] = model.score(pixels, ids)
        assert scores[name].shape == (1,) and torch.isfinite(scores[name]).all(), name
    # distinct seeds: social reward and clip are different models of the same architecture
    assert not torch.equal(scores["social_reward"], scores["clip"])


def test_pickscore_processor_defaults_to_a_local_weights_folder(tiny_rewards):
    _, settings = tiny_rewards
    folder = settings["weights"]["pickscore"]
    implicit = load_reward("pickscore", weights=folder)
    explicit = load_reward("pickscore", weights=folder, processor=folder)
    image = Image.new("RGB", (50, 37), (10, 120, 200))
    assert torch.equal(implicit.preprocess_image(image), explicit.preprocess_image(image))


def test_cli_writes_the_same_files(tmp_path, tiny_rewards):
    out, _ = tiny_rewards
    assert main(["tiny-rewards", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "aesthetic.pth").read_bytes() == (out / "aesthetic.pth").read_bytes()
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == sorted(p.name for p in out.iterdir())


TEXT_ENCODERS = {"social_reward": ("backbone", "encode_text"), "clip": ("backbone", "encode_text"), "hpsv2": ("model", "encode_text"), "pickscore": (None, "_text_embeds")}


@pytest.mark.parametrize("name", sorted(TEXT_ENCODERS))
def test_repeated_prompts_are_encoded_once_and_score_as_alone(tiny_rewards, name, monkeypatch):
    _, settings = tiny_rewards
    model = load_reward(name, weights=settings["weights"][name], **settings["options"].get(name, {})).eval()
    prompts = ["a red square", "a blue circle", "a red square", "a red square", "a green star"]
    images = [Image.new("RGB", (40 + 3 * i, 30), (40 * i, 200 - 30 * i, 90)) for i in range(len(prompts))]
    pixels = torch.stack([model.preprocess_image(im) for im in images])
    owner_name, method = TEXT_ENCODERS[name]
    owner = getattr(model, owner_name) if owner_name else model
    encode, rows_encoded = getattr(owner, method), []

    def counting(tokens, *args, **kwargs):
        rows_encoded.append(len(tokens["input_ids"] if isinstance(tokens, dict) else tokens))
        return encode(tokens, *args, **kwargs)

    monkeypatch.setattr(owner, method, counting)
    with torch.no_grad():
        batched = model.score(pixels, model.tokenize(prompts))
        alone = torch.cat([model.score(pixels[i : i + 1], model.tokenize([p])) for i, p in enumerate(prompts)])
    assert rows_encoded[0] == 3  # three distinct prompts in the batch of five
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)


def test_openai_clip_and_pickscore_resize_each_rgb_image_once(tiny_rewards, monkeypatch):
    from reward.scoring import plan_inputs

    _, settings = tiny_rewards
    scorers = {name: load_reward(name, weights=settings["weights"][name], **settings["options"].get(name, {})) for name in ("clip", "pickscore")}
    plan = plan_inputs(scorers)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (250, 301, 3), dtype=np.uint8))
    expected = {"clip": scorers["clip"].transform(image.copy()), "pickscore": scorers["pickscore"].image_processor(images=image, return_tensors="pt")["pixel_values"][0]}
    resized, real_resize = [], Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, *args, **kwargs: resized.append(self.size) or real_resize(self, *args, **kwargs))
    pixels = plan.preprocess(image)
    assert resized == [(301, 250)]
    for name, tensor in expected.items():
        assert torch.equal(pixels[plan.pixel_keys[name]], tensor), name
