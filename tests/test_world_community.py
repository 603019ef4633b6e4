"""The simulated community: curation-schema logs, determinism, heavy tails, the hidden taste."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.stats import spearmanr

from sr_finetune.errors import UserError
from sr_finetune.world.community import CommunityConfig, simulate_community
from sr_finetune.world.scenes import parse_caption, prompt_split
from sr_finetune.world.taste import resolve_taste

taste = resolve_taste("large-centred")  # the default CommunityConfig.taste

SMALL = dict(prompts=40, users=120, influencers=4)


@pytest.fixture(scope="module")
def community(tmp_path_factory):
    out = tmp_path_factory.mktemp("community")
    paths = simulate_community(out, CommunityConfig(**SMALL, seed=3))
    return out, {k: (pd.read_parquet(v) if v.suffix == ".parquet" else v.read_text().split()) for k, v in paths.items()}


def test_logs_follow_the_curation_schema(community):
    out, logs = community
    images, remixes, influencers = logs["images"], logs["remixes"], logs["influencers"]
    assert list(images.columns) == ["image_id", "prompt", "path", "user_id", "posted_at", "views_before_first_remix"]
    assert list(remixes.columns) == ["image_id", "remixer_user_id", "at"]
    assert images.image_id.is_unique and images.views_before_first_remix.dtype.kind == "i"
    assert all((out / p).is_file() for p in images.path)
    assert all(prompt_split(parse_caption(p)) == "train" for p in images.prompt.unique())
    joined = remixes.merge(images, on="image_id", how="left")
    assert joined.user_id.notna().all()
    assert (joined["at"] >= joined["posted_at"]).all()
    assert (joined.remixer_user_id != joined.user_id).all()
    assert len(influencers) == 4 and set(influencers) <= {f"u{i:04d}" for i in range(120)}


def test_the_same_seed_gives_the_same_logs(community, tmp_path):
    _, logs = community
    again = simulate_community(tmp_path, CommunityConfig(**SMALL, seed=3))
    pd.testing.assert_frame_equal(pd.read_parquet(again["images"]), logs["images"])
    pd.testing.assert_frame_equal(pd.read_parquet(again["remixes"]), logs["remixes"])


def test_remix_counts_are_heavy_tailed(community):
    _, logs = community
    counts = logs["remixes"].image_id.value_counts().reindex(logs["images"].image_id, fill_value=0).to_numpy()
    top = np.sort(counts)[::-1][: len(counts) // 10].sum()
    assert (counts == 0).any() and counts.max() > 5 * max(1, np.median(counts))
    assert top > 0.35 * counts.sum()  # the top tenth of images gets over a third of all remixes


def test_remixes_follow_the_hidden_taste_per_view(community):
    out, logs = community
    truth = logs["truth"]
    assert np.allclose(truth.taste, [taste(Image.open(out / p)) for p in logs["images"].path])
    assert spearmanr(truth.taste, truth.remixes / truth.views).statistic > 0.5
    assert spearmanr(truth.taste, truth.remixes).statistic > 0.2


def test_bad_settings_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="remix_rate"):
        simulate_community(tmp_path, CommunityConfig(remix_rate=1.5))
    with pytest.raises(UserError, match="split has"):
        simulate_community(tmp_path, CommunityConfig(prompts=10_000))


def test_relative_appeal_judges_each_post_against_the_other_posts_of_its_prompt(tmp_path):
    import json

    from sr_finetune.world.community import remix_probability
    from sr_finetune.world.taste import taste_profile

    cfg = CommunityConfig(**SMALL, seed=3, appeal="relative")
    paths = simulate_community(tmp_path, cfg)
    truth, images = pd.read_parquet(paths["truth"]), pd.read_parquet(paths["images"])
    record = json.loads((tmp_path / "community.json").read_text())
    profile = taste_profile(taste, "train").values
    assert record["appeal"] == "relative"
    assert record["typical_taste_used"] == pytest.approx(np.quantile(profile - profile.mean(1, keepdims=True), 0.05))
    deviation = truth.taste - truth.taste.groupby(images.prompt).transform("mean")
    assert np.allclose(truth.remix_probability, remix_probability(deviation.to_numpy(), cfg, record["typical_taste_used"]))
    assert spearmanr(deviation, truth.remixes / truth.views).statistic > 0.5
    # what a prompt's posts share no longer counts: the prompts' mean appeal is the same for all
    assert abs(spearmanr(truth.taste.groupby(images.prompt).mean(), truth.remix_probability.groupby(images.prompt).mean()).statistic) < 0.5


def test_an_unknown_appeal_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="appeal must be one of absolute, relative, got 'popular'"):
        simulate_community(tmp_path, CommunityConfig(**SMALL, appeal="popular"))


def test_the_world_community_command_takes_the_taste_and_the_appeal(tmp_path):
    import json

    from sr_finetune.commands.cli import main

    assert main(["world", "community", str(tmp_path), "--prompts", "12", "--users", "40", "--taste", "muted", "--appeal", "relative"]) == 0
    record = json.loads((tmp_path / "community.json").read_text())
    assert (record["taste"], record["appeal"], record["prompts"]) == ("muted", "relative", 12)
    truth = pd.read_parquet(tmp_path / "truth.parquet")
    assert np.allclose(truth.taste, [resolve_taste("muted")(Image.open(tmp_path / p)) for p in pd.read_parquet(tmp_path / "images.parquet").path])
