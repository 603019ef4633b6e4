"""Pairwise accuracy: hand-computed tie rules and CIs, tiny scorers on real images, the CLI path."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import load_tiny_reward
from reward.accuracy import AccuracyConfig, accuracy_table, bootstrap_ratios, outcomes, run_accuracy, triplet_images
from reward.openai_clip import make_tiny_openai_clip
from reward.tiny import tiny_reward_settings
from reward.triplets import TRIPLET_COLUMNS
from sr_finetune.commands.cli import main
from sr_finetune.config import load_config
from sr_finetune.errors import ConfigError, UserError
from sr_finetune.commands.experiment import ExperimentConfig

METRICS = ["social_reward", "clip"]


@pytest.fixture(scope="module")
def clip_scorers(tmp_path_factory):
    """Tiny weights of the two CLIP-backbone scorers (the same files ``reward.tiny`` writes)."""
    settings = tiny_reward_settings(tmp_path_factory.mktemp("rewards"))
    make_tiny_openai_clip(settings["weights"]["social_reward"], seed=1, fmt="state_dict")
    make_tiny_openai_clip(settings["weights"]["clip"], seed=0, fmt="torchscript")
    return settings


@pytest.fixture
def real_triplets(shared_data, tmp_path):
    """Triplets of real generated images: 4 sid_lsg prompts with two images (first = positive),
    the 4 ImageReward demo images of one prompt in their published order (6 triplets), and one
    triplet whose negative file is missing."""
    sid = shared_data / "images" / "sid_lsg"
    manifest = pd.read_csv(sid / "manifest.csv")
    twice = manifest[manifest.prompt.duplicated(keep=False)].sort_values(["prompt", "image_path"])
    rows = []
    for k, (prompt, group) in enumerate(list(twice.groupby("prompt", sort=True))[:4]):
        pos, neg = group.image_path.tolist()
        rows.append((f"sid{k}", prompt, pos, str(sid / pos), neg, str(sid / neg)))
    demo = shared_data / "images" / "imagereward_demo"
    demo_prompt = "a painting of an ocean with clouds and birds, day time, low depth field effect"
    for better in range(1, 5):
        for worse in range(better + 1, 5):
            rows.append(("demo", demo_prompt, f"demo{better}", str(demo / f"{better}.webp"), f"demo{worse}", str(demo / f"{worse}.webp")))
    rows.append(("lost", "a lost image", "sid_lost_pos", rows[0][3], "lost", str(tmp_path / "missing.png")))
    table = pd.DataFrame(rows, columns=["prompt_id", "prompt", "pos_image_id", "pos_path", "neg_image_id", "neg_path"])
    table.insert(0, "triplet_id", np.arange(len(table), dtype=np.int64))
    table["split"] = ["test"] * (len(table) - 2) + ["train", "test"]
    path = tmp_path / "triplets" / "triplets.parquet"
    path.parent.mkdir()
    table[TRIPLET_COLUMNS].to_parquet(path)
    return path


def config(settings, triplets, out, **kw) -> AccuracyConfig:
    base = dict(triplets=str(triplets), metrics=METRICS, weights={m: settings["weights"][m] for m in METRICS}, output_dir=str(out), batch_size=4, num_workers=0, device="cpu", bootstrap=200)
    return AccuracyConfig(**{**base, **kw})


def test_tie_rules_on_a_hand_computed_case():
    pos = np.array([0.3, 0.5, 0.2, 0.1, np.nan])
    neg = np.array([0.1, 0.4, 0.2, 0.3, 0.2])
    results = pd.DataFrame({"prompt_id": ["p1", "p1", "p2", "p2", "p3"], "m_outcome": outcomes(pos, neg)})
    np.testing.assert_array_equal(results.m_outcome, [1, 1, 0, -1, np.nan])
    row = accuracy_table(results, ["m"], samples=0).iloc[0]
    assert (row.triplets, row.prompts, row.wins, row.ties, row.losses, row.missing) == (4, 2, 2, 1, 1, 1)
    assert row.accuracy == pytest.approx(2.5 / 4)  # a tie is half right
    assert row.accuracy_ge == pytest.approx(3 / 4)  # the authors' >=: a tie is right
    assert np.isnan(row.ci_low) and np.isnan(row.ge_ci_high)  # no resamples asked


def test_bootstrap_ci_resamples_prompts_on_a_hand_computed_case():
    # prompt A: 3 triplets, all right; prompt B: 1 triplet, wrong. Resampling the two prompts gives
    # AA -> 1, AB or BA -> 3/4 (not the mean of prompt rates, 1/2), BB -> 0 with odds 1/4, 1/2, 1/4.
    values = bootstrap_ratios(np.array([[3.0], [0.0]]), np.array([[3.0], [1.0]]), samples=4000, seed=0)[:, 0]
    assert set(np.unique(values)) == {0.0, 0.75, 1.0}
    assert [np.mean(values == v) for v in (0.0, 0.75, 1.0)] == pytest.approx([0.25, 0.5, 0.25], abs=0.03)
    results = pd.DataFrame({"prompt_id": ["A", "A", "A", "B"], "m_outcome": [1.0, 1.0, 1.0, -1.0]})
    narrow = accuracy_table(results, ["m"], samples=4000, confidence=0.4).iloc[0]  # quantiles 0.3 and 0.7
    assert (narrow.accuracy, narrow.ci_low, narrow.ci_high) == (0.75, 0.75, 0.75)
    wide = accuracy_table(results, ["m"], samples=4000, confidence=0.95).iloc[0]
    assert (wide.ci_low, wide.ci_high, wide.ge_ci_low, wide.ge_ci_high) == (0.0, 1.0, 0.0, 1.0)
    again = accuracy_table(results, ["m"], samples=4000, confidence=0.95)
    pd.testing.assert_frame_equal(again, accuracy_table(results, ["m"], samples=4000, confidence=0.95))  # seeded


def test_scores_real_image_triplets_like_direct_scorer_calls_and_resumes(clip_scorers, real_triplets, tmp_path):
    cfg = config(clip_scorers, real_triplets, tmp_path / "acc")
    summary = run_accuracy(cfg)
    assert (summary.triplets, summary.prompts, summary.images) == (10, 6, 14)  # demo3 > demo4 is in the train split
    results = pd.read_parquet(tmp_path / "acc" / "accuracy.parquet")
    assert len(results) == 10 and "demo4" not in set(results.neg_image_id[results.pos_image_id == "demo3"])
    lost = results[results.neg_image_id == "lost"]
    assert lost[[f"{m}_outcome" for m in METRICS]].isna().all().all()
    scored = results[results.neg_image_id != "lost"].merge(pd.read_parquet(real_triplets)[["triplet_id", "pos_path", "neg_path"]], on="triplet_id")
    for metric in METRICS:
        scorer = load_tiny_reward(clip_scorers, metric)
        pos = scorer.score_images([Image.open(p) for p in scored.pos_path], scored.prompt.tolist())
        neg = scorer.score_images([Image.open(p) for p in scored.neg_path], scored.prompt.tolist())
        assert scored[f"{metric}_pos"].tolist() == pytest.approx(pos.tolist(), abs=1e-5)
        assert scored[f"{metric}_neg"].tolist() == pytest.approx(neg.tolist(), abs=1e-5)
        np.testing.assert_array_equal(scored[f"{metric}_outcome"], np.sign(scored[f"{metric}_pos"] - scored[f"{metric}_neg"]))
    report = json.loads((tmp_path / "acc" / "accuracy.json").read_text())
    by_metric = {r["metric"]: r for r in report["metrics"]}
    for metric in METRICS:
        r = by_metric[metric]
        assert (r["triplets"], r["missing"], r["wins"] + r["ties"] + r["losses"]) == (9, 1, 9)
        assert r["accuracy"] == pytest.approx((r["wins"] + r["ties"] / 2) / 9) and r["ci_low"] <= r["accuracy"] <= r["ci_high"]
    assert report["rules"]["accuracy_ge"].startswith("(wins + ties) / triplets")
    assert "| social_reward | 9 |" in summary.table

    def must_not_load(*_):
        raise AssertionError("a finished scoring run was redone")

    rerun = run_accuracy(cfg, load=must_not_load)  # every image is scored: nothing is loaded again
    assert rerun.table == summary.table
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "acc" / "accuracy.parquet"), results)


def test_other_scorer_settings_on_the_same_folder_are_refused(clip_scorers, real_triplets, tmp_path):
    run_accuracy(config(clip_scorers, real_triplets, tmp_path / "acc", metrics=["clip"], weights={"clip": clip_scorers["weights"]["clip"]}))
    with pytest.raises(UserError, match=r"already holds scores made with metrics=\['clip'\], not \['social_reward', 'clip'\]"):
        run_accuracy(config(clip_scorers, real_triplets, tmp_path / "acc"))
    with pytest.raises(UserError, match="images_sha256"):
        run_accuracy(config(clip_scorers, real_triplets, tmp_path / "acc", metrics=["clip"], weights={"clip": clip_scorers["weights"]["clip"]}, split="train"))


def test_an_image_id_with_two_prompts_is_a_one_line_error():
    triplets = pd.DataFrame({"prompt": ["p", "q"], "pos_image_id": ["a", "a"], "pos_path": ["/x/a.png", "/x/a.png"], "neg_image_id": ["b", "c"], "neg_path": ["/b", "/c"]})
    with pytest.raises(UserError, match="image 'a' appears with 2 different prompts or paths"):
        triplet_images(triplets)


def test_config_section_checks_split_and_scorers():
    with pytest.raises(ConfigError, match="accuracy.split: must be one of train, val, test or all"):
        load_config(ExperimentConfig, None, ["split=dev"], section="accuracy")
    with pytest.raises(ConfigError, match="accuracy.weights.social_reward"):
        load_config(ExperimentConfig, None, ["triplets=t.parquet"], section="accuracy")
    cfg = load_config(ExperimentConfig, None, ["triplets=t.parquet", "metrics=[clip,pickscore]"], section="accuracy").accuracy
    assert (cfg.split, cfg.bootstrap, cfg.score_config().image_table) == ("test", 2000, "runs/accuracy/images.parquet")


def test_cli_curates_logs_of_real_images_then_measures_accuracy(clip_scorers, shared_data, tmp_path):
    """sr-finetune curate -> sr-finetune accuracy, end to end on the real sid_lsg images."""
    sid = shared_data / "images" / "sid_lsg"
    manifest = pd.read_csv(sid / "manifest.csv").head(30)
    n = len(manifest)
    # 6 prompts of 5 images: image 0 remixed by an influencer, image 1 by a regular user, 2-4 never remixed
    images = pd.DataFrame(
        {
            "image_id": [f"img{i}" for i in range(n)], "prompt": [manifest.prompt.iloc[i - i % 5] for i in range(n)], "path": manifest.image_path,
            "user_id": [f"u{i % 7}" for i in range(n)], "posted_at": "2024-05-01T12:00:00", "views_before_first_remix": [10 if i % 5 < 2 else 50 for i in range(n)],
        }
    )  # fmt: skip
    remixes = pd.DataFrame({"image_id": [f"img{i}" for i in range(n) if i % 5 < 2], "remixer_user_id": ["star" if i % 5 == 0 else "fan" for i in range(n) if i % 5 < 2], "at": "2024-05-02T08:00:00"})
    images.to_csv(tmp_path / "images.csv", index=False)
    remixes.to_parquet(tmp_path / "remixes.parquet")
    curated = tmp_path / "curated"
    args = [f"images={tmp_path / 'images.csv'}", f"image_root={sid}", f"remixes={tmp_path / 'remixes.parquet'}", "influencer_ids=[star]", "use_content_signal=false", f"output_dir={curated}"]
    assert main(["curate", *args]) == 0
    assert len(pd.read_parquet(curated / "triplets.parquet")) == 6 * 3
    weights = [f"weights.{m}={clip_scorers['weights'][m]}" for m in METRICS]
    out = tmp_path / "accuracy"
    assert main(["accuracy", f"triplets={curated}", "split=all", "metrics=[social_reward,clip]", *weights, "device=cpu", "num_workers=0", "batch_size=8", "bootstrap=100", f"output_dir={out}"]) == 0
    report = json.loads((out / "accuracy.json").read_text())
    assert [r["metric"] for r in report["metrics"]] == METRICS and all(r["triplets"] == 18 and r["missing"] == 0 for r in report["metrics"])
    assert len(pd.read_parquet(out / "accuracy.parquet")) == 18 and (out / "accuracy.md").read_text().startswith("| metric | triplets |")
