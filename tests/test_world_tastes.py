"""Tastes as a setting of the world: named and user tastes, the community that follows them, the
world's record of its taste and the judge that scores with it."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr

from reward import load_reward
from sr_finetune.errors import UserError
from sr_finetune.world.community import CommunityConfig, simulate_community
from sr_finetune.world.pixels import read_image
from sr_finetune.world.scenes import Prompt, Scene, Shape, render
from sr_finetune.world.taste import NAMED_TASTES, recorded_taste, resolve_taste, taste_profile

SMALL = dict(prompts=40, users=120, influencers=4, taste_strength=25, seed=5)
USER_TASTE = '''
def prefers_left(reading):
    """Subjects on the left: 1 at the left border, 0 at the right; nothing painted: 0."""
    return 0.0 if reading.count == 0 else 1.0 - reading.subject_column


def wrong_range(reading):
    return 2.0


def not_a_taste(x):
    return 0.5
'''


def _scene(extent: int, x0: int, y0: int, fg_shift: int = 0) -> Image.Image:
    prompt = Prompt(1, "large" if extent > 10 else "small", "red", "square", "blue")
    return render(Scene(prompt, (Shape("square", x0, y0, extent),), fg_shift, 0))


@pytest.fixture()
def user_taste_module(tmp_path, monkeypatch):
    (tmp_path / "community_tastes.py").write_text(USER_TASTE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "community_tastes"


@pytest.fixture(scope="module")
def two_worlds(tmp_path_factory):
    """The same community settings with the shipped taste and with its mirror."""
    worlds = {}
    for name in ("large-centred", "small-off-centre"):
        out = tmp_path_factory.mktemp(name)
        simulate_community(out, CommunityConfig(**SMALL, taste=name))
        worlds[name] = out
    return worlds


def test_the_mirror_taste_reverses_the_shipped_one_on_size_and_centring():
    large_centred = _scene(13, 10, 10)
    small_corner = _scene(7, 1, 1)
    shipped, mirror = resolve_taste("large-centred"), resolve_taste("small-off-centre")
    assert shipped(large_centred) > shipped(small_corner) + 0.2
    assert mirror(small_corner) > mirror(large_centred) + 0.2
    high = resolve_taste("high")
    assert high(_scene(8, 12, 1)) > high(_scene(8, 12, 23)) + 0.5


def test_every_named_taste_varies_within_a_prompt_and_stays_in_the_unit_interval():
    for name in NAMED_TASTES:
        profile = taste_profile(resolve_taste(name), prompts=30, renders_per_prompt=4)
        assert profile.values.shape == (30, 4)
        assert 0.0 <= profile.values.min() and profile.values.max() <= 1.0
        assert profile.within_prompt_std > 0.02, name  # the caption leaves it free: images of a prompt differ


def test_a_taste_change_changes_the_judges_scores_of_the_same_images(two_worlds):
    images = [_scene(e, x, y) for e, x, y in [(13, 10, 10), (7, 1, 1), (12, 2, 18), (6, 13, 13)]]
    scores = {name: load_reward("world_judge", weights=world).score_images(images, [""] * len(images)) for name, world in two_worlds.items()}
    for name, values in scores.items():
        torch.testing.assert_close(values, torch.tensor([resolve_taste(name)(im) for im in images]), rtol=0, atol=1e-6)
    assert scores["large-centred"].argmax() == 0 and scores["small-off-centre"].argmax() == 1
    assert spearmanr(scores["large-centred"], scores["small-off-centre"]).statistic < 0


def test_remixes_follow_the_worlds_own_taste_and_not_the_other(two_worlds):
    for name, world in two_worlds.items():
        truth = pd.read_parquet(world / "truth.parquet")
        images = pd.read_parquet(world / "images.parquet")
        other = next(n for n in two_worlds if n != name)
        own = [resolve_taste(name)(Image.open(world / p)) for p in images.path]
        foreign = [resolve_taste(other)(Image.open(world / p)) for p in images.path]
        assert np.allclose(truth.taste, own)
        per_view = truth.remixes / truth.views
        assert spearmanr(own, per_view).statistic > 0.8
        assert spearmanr(foreign, per_view).statistic < 0.2, (name, other)


def test_the_typical_taste_comes_from_the_tastes_own_distribution(two_worlds):
    for name, world in two_worlds.items():
        record = json.loads((world / "community.json").read_text())
        assert record["taste"] == name
        profile = taste_profile(resolve_taste(name))
        assert record["typical_taste_used"] == pytest.approx(profile.quantile(0.05))
        assert record["taste_within_prompt_std"] == pytest.approx(profile.within_prompt_std)
    typical = [json.loads((w / "community.json").read_text())["typical_taste_used"] for w in two_worlds.values()]
    assert abs(typical[0] - typical[1]) > 0.1  # not one constant for every taste
    rates = [(lambda t: (t.remixes / t.views).mean())(pd.read_parquet(w / "truth.parquet")) for w in two_worlds.values()]
    assert max(rates) < 2 * min(rates)  # logs of alike density whatever the taste


def test_the_judge_needs_the_worlds_record_and_never_falls_back_to_a_default(tmp_path):
    with pytest.raises(UserError, match="scores with the taste a world recorded"):
        load_reward("world_judge")
    with pytest.raises(UserError, match="no world record at"):
        load_reward("world_judge", weights=tmp_path / "nowhere")
    (tmp_path / "community.json").write_text(json.dumps({"prompts": 10}))
    with pytest.raises(UserError, match="no 'taste' recorded"):
        load_reward("world_judge", weights=tmp_path)


def test_the_judge_finds_the_record_from_the_world_the_community_folder_or_the_file(two_worlds, tmp_path):
    world = two_worlds["small-off-centre"]
    (tmp_path / "community").symlink_to(world, target_is_directory=True)
    for path in (tmp_path, world, world / "community.json"):
        assert recorded_taste(path).spec == "small-off-centre"


def test_a_users_taste_round_trips_through_the_world_files(tmp_path, user_taste_module):
    spec = f"{user_taste_module}:prefers_left"
    simulate_community(tmp_path / "community", CommunityConfig(**SMALL, taste=spec))
    assert json.loads((tmp_path / "community" / "community.json").read_text())["taste"] == spec
    images = [_scene(8, 1, 12), _scene(8, 23, 12)]
    judged = load_reward("world_judge", weights=tmp_path).score_images(images, ["", ""])
    expected = [1.0 - read_image(im).subject_column for im in images]
    torch.testing.assert_close(judged, torch.tensor(expected), rtol=0, atol=1e-6)
    truth = pd.read_parquet(tmp_path / "community" / "truth.parquet")
    assert spearmanr(truth.taste, truth.remixes / truth.views).statistic > 0.8


def test_a_users_taste_may_read_the_image_itself(tmp_path, monkeypatch):
    (tmp_path / "image_tastes.py").write_text("def redness(image):\n    return sum(p[0] for p in image.getdata()) / (255 * image.width * image.height)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    taste = resolve_taste("image_tastes:redness")
    assert taste.reads_image and taste(Image.new("RGB", (4, 4), (255, 0, 0))) == 1.0


def test_bad_tastes_are_one_line_errors_naming_the_taste(tmp_path, user_taste_module):
    with pytest.raises(UserError, match="unknown taste 'round'"):
        resolve_taste("round")
    with pytest.raises(UserError, match="cannot import module 'no_such_module'"):
        resolve_taste("no_such_module:f")
    with pytest.raises(UserError, match="has no function 'missing'"):
        resolve_taste(f"{user_taste_module}:missing")
    with pytest.raises(UserError, match="first parameter must be named 'reading'"):
        resolve_taste(f"{user_taste_module}:not_a_taste")
    with pytest.raises(UserError, match=r"returned 2.0, outside \[0, 1\]"):
        resolve_taste(f"{user_taste_module}:wrong_range")(_scene(8, 1, 1))
    with pytest.raises(UserError, match="unknown taste"):
        simulate_community(tmp_path, CommunityConfig(taste="round"))
