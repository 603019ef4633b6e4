import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import image_in_mode, load_tiny_reward
from reward import load_reward
from reward.tiny import METRICS, make_tiny_rewards
from sr_finetune.commands.cli import main


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
        model = load_tiny_reward(settings, name)
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


TEXT_ENCODERS = {"social_reward": ("backbone", "encode_text"), "clip": ("backbone", "encode_text"), "hpsv2": (None, "_text_features"), "pickscore": (None, "_text_embeds")}


@pytest.mark.parametrize("name", sorted(TEXT_ENCODERS))
def test_repeated_prompts_are_encoded_once_and_score_as_alone(tiny_rewards, name, monkeypatch):
    _, settings = tiny_rewards
    model = load_tiny_reward(settings, name).eval()
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
    assert len(rows_encoded) == 1 + len(prompts)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)


def test_openai_clip_and_pickscore_resize_each_rgb_image_once(tiny_rewards, monkeypatch):
    from reward.scoring import plan_inputs

    _, settings = tiny_rewards
    scorers = {name: load_tiny_reward(settings, name) for name in ("clip", "pickscore")}
    plan = plan_inputs(scorers)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (250, 301, 3), dtype=np.uint8))
    expected = {"clip": scorers["clip"].transform(image.copy()), "pickscore": scorers["pickscore"].image_processor(images=image, return_tensors="pt")["pixel_values"][0]}
    resized, real_resize = [], Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, *args, **kwargs: resized.append(self.size) or real_resize(self, *args, **kwargs))
    pixels = plan.preprocess(image)
    assert resized == [(301, 250)]
    for name, tensor in expected.items():
        assert torch.equal(pixels[plan.pixel_keys[name]], tensor), name


def test_shared_preprocessing_of_transparent_images_equals_each_scorers_own(tiny_rewards):
    """OpenAI CLIP resizes before converting, PickScore after: the shared resize must not mix them up."""
    from reward.scoring import plan_inputs

    _, settings = tiny_rewards
    scorers = {name: load_tiny_reward(settings, name) for name in ("clip", "pickscore")}
    plan = plan_inputs(scorers)
    for mode in ("RGBA", "LA", "P+transparency"):
        image = image_in_mode(mode, 301, 250)
        pixels = plan.preprocess(image)
        for name, scorer in scorers.items():
            assert torch.equal(pixels[plan.pixel_keys[name]], scorer.preprocess_image(image)), (mode, name)


def test_loading_several_together_gives_the_same_models_in_the_given_order(tiny_rewards):
    from reward import load_rewards

    _, settings = tiny_rewards
    specs = {name: {"weights": settings["weights"][name], **settings["options"].get(name, {})} for name in reversed(METRICS)}
    together = load_rewards(specs)
    assert list(together) == list(specs)
    # clip and aesthetic, loaded by the thread pool, still share one backbone
    assert together["aesthetic"].backbone is together["clip"].backbone
    image = Image.new("RGB", (40, 30), (30, 160, 90))
    for name, model in together.items():
        alone = load_reward(name, **specs[name])
        pixels = model.preprocess_image(image)[None]
        ids = model.tokenize(["a green square"])
        assert torch.equal(model.score(pixels, ids), alone.score(pixels, ids)), name


def test_concurrent_loaders_run_together_and_the_others_alone_afterwards(monkeypatch):
    import threading

    from reward import base

    events, meeting = [], threading.Barrier(2, timeout=20)

    def loader(name, concurrent):
        def load(weights=None, device="cpu", dtype="fp32"):
            events.append((name, "start", threading.current_thread() is threading.main_thread()))
            if concurrent:
                meeting.wait()  # both concurrent loaders must be running at once to pass
            events.append((name, "end", None))
            return torch.nn.Identity()

        return load

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.setattr(base, "_CONCURRENT_LOADS", set(base._CONCURRENT_LOADS))
    for name, concurrent in [("serial_a", False), ("threaded_a", True), ("threaded_b", True)]:
        base.register_reward(name, concurrent_load=concurrent)(loader(name, concurrent))
    models = base.load_rewards({"serial_a": {}, "threaded_a": {}, "threaded_b": {}})
    assert list(models) == ["serial_a", "threaded_a", "threaded_b"]
    starts = {name: main for name, kind, main in events if kind == "start"}
    assert starts == {"serial_a": True, "threaded_a": False, "threaded_b": False}
    # the loader that may change process-wide state starts after both threaded loads ended
    assert events[-2:] == [("serial_a", "start", True), ("serial_a", "end", None)]


def test_padding_columns_after_the_last_real_token_are_dropped():
    from reward.base import drop_padding_columns

    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 0, 0, 0]])
    tokens = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    cut = drop_padding_columns(tokens)
    assert cut["input_ids"].tolist() == [[5, 6, 7], [5, 6, 0]] and cut["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    left_padded = {"input_ids": ids.flip(1), "attention_mask": (ids != 0).long().flip(1)}
    assert drop_padding_columns(left_padded) is left_padded  # nothing after the last real token
    assert drop_padding_columns({"input_ids": ids}) == {"input_ids": ids}  # no mask: nothing known


@pytest.mark.parametrize("name", ["pickscore", "imagereward"])
def test_masked_text_towers_score_short_prompts_the_same_in_a_cut_batch(tiny_rewards, name):
    _, settings = tiny_rewards
    model = load_tiny_reward(settings, name)
    prompts = ["a cat", "a very long and detailed prompt about a cat sitting on a red chair in the sun"]
    pixels = torch.stack([model.preprocess_image(Image.new("RGB", (40, 30), c)) for c in [(200, 40, 90), (20, 140, 90)]])
    tokens = model.tokenize(prompts)
    lengths = tokens["attention_mask"].sum(dim=1)
    assert tokens["input_ids"].shape[1] > lengths.max() > lengths.min()  # padded to the tokeniser's length
    seen = []
    tower = model.model.text_model if name == "pickscore" else model.blip.text_encoder
    hook = tower.register_forward_pre_hook(lambda _, args, kwargs: seen.append((kwargs.get("input_ids", args[0] if args else None)).shape[1]), with_kwargs=True)
    together = model.score(pixels, tokens)
    alone = torch.cat([model.score(pixels[i : i + 1], {k: v[i : i + 1] for k, v in tokens.items()}) for i in range(2)])
    hook.remove()
    assert seen == [lengths.max(), lengths[0], lengths[1]]  # each batch cut to its longest prompt
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
