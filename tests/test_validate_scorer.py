"""Scorer validation: correlations on hand-made ratings, the TIFA authors' published numbers,
popularity buckets, pairwise agreement, table formats and a registered scorer run on real images."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from eval.stats import Bootstrap
from eval.validation import (
    ValidateScorerConfig,
    correlation_table,
    correlations,
    pairwise_agreement,
    popularity_bucket,
    read_ratings,
    run_validation,
)
from sr_finetune.errors import UserError

# human_annotations/compute_correlation.ipynb in Yushi-Hu/tifa (the outputs the authors published for
# human_annotations_with_scores.json; the TIFA paper's correlation table rounds them). The notebook
# labels np.corrcoef (Pearson's r) as "Spearman's Correlation"; Kendall is scipy's tau-b.
TIFA_PUBLISHED = {  # metric: (printed "Spearman" = Pearson r, Kendall tau-b)
    "meteor": (0.33965916777485317, 0.27407599432086477),
    "bleu": (0.18334016729588443, 0.18791013860699693),
    "rouge": (0.3288894058298478, 0.24485782545105927),
    "spice": (0.3280527854243443, 0.2317581980131657),
    "clipscore_vitb32": (0.3318181645103688, 0.2314458979024208),
    "tifa_vilt": (0.4932251792578269, 0.3824088520807112),
    "tifa_git-large": (0.5445007948927731, 0.42550824027221545),
    "tifa_ofa-large": (0.4961472092111418, 0.37247819040318836),
    "tifa_blip2-flant5xl": (0.5589831246126169, 0.4359972113027652),
    "tifa_mplug-large": (0.5967201059577838, 0.4717164648720951),
}


def test_correlations_of_hand_made_ratings_with_known_values():
    ratings = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    scores = np.array([2.0, 1.0, 4.0, 3.0, 5.0])  # two adjacent swaps
    got = correlations(scores, ratings)
    # Spearman = Pearson of ranks = 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 24 / 120; Kendall = (8 - 2) / 10
    assert got == pytest.approx({"pearson": 0.8, "spearman": 0.8, "kendall": 0.6}, abs=1e-12)
    assert correlations(-ratings * 3 + 1, ratings) == pytest.approx({"pearson": -1.0, "spearman": -1.0, "kendall": -1.0}, abs=1e-12)
    monotone = correlations(np.exp(ratings), ratings)
    assert monotone["spearman"] == pytest.approx(1.0) and monotone["kendall"] == pytest.approx(1.0) and monotone["pearson"] < 0.95
    assert np.isnan(correlations(np.ones(5), ratings)["pearson"])


def test_bootstrap_ci_brackets_the_estimate_and_narrows_with_more_images():
    rng = np.random.default_rng(0)
    boot = Bootstrap(samples=300, confidence=0.9, seed=1)

    def table(n):
        ratings = rng.normal(size=n)
        images = pd.DataFrame({"image_id": [str(i) for i in range(n)], "rating": ratings, "raters": 1, "s": ratings + rng.normal(size=n)})
        return correlation_table(images, ["s"], boot, 10.0).iloc[0]

    small, large = table(40), table(400)
    for row in (small, large):
        for stat in ("pearson", "spearman", "kendall"):
            assert row[f"{stat}_low"] < row[stat] < row[f"{stat}_high"]
    assert large.pearson_high - large.pearson_low < small.pearson_high - small.pearson_low
    assert large.pearson == pytest.approx(1 / np.sqrt(2), abs=0.1)


def test_popularity_buckets_are_log_binned():
    labels = popularity_bucket(np.array([0, 0.5, 1, 9, 10, 99, 100, 1000, 5000, np.nan, -3]), base=10)
    assert labels.tolist() == ["[0, 1)", "[0, 1)", "[1, 10)", "[1, 10)", "[10, 100)", "[10, 100)", "[100, 1000)", "[1000, 10000)", "[1000, 10000)", "unknown", "unknown"]


def test_pairwise_agreement_counts_ties_separately():
    groups = np.array(["a", "a", "a", "b", "b"])
    ratings = np.array([1.0, 2.0, 2.0, 3.0, 1.0])
    scores = np.array([0.1, 0.3, 0.2, 0.5, 0.5])
    per_group = pairwise_agreement(groups, ratings, scores).set_index("group")
    assert per_group.loc["a"].tolist() == [3, 1, 2, 0, 0]  # pairs, human ties, agree, scorer ties, disagree
    assert per_group.loc["b"].tolist() == [1, 0, 0, 1, 0]
    wrong = pairwise_agreement(groups, ratings, -scores).set_index("group")
    assert wrong.loc["a", "disagree"] == 2


def _write_tifa_like(path, rows):
    path.write_text(json.dumps({r["key"]: {k: v for k, v in r.items() if k != "key"} for r in rows}))
    return path


def test_ratings_table_formats_aggregate_to_one_mean_per_image(tmp_path):
    # TIFA's layout: {image id: {text_id, text, human_scores: [..], ...}}
    tifa = _write_tifa_like(tmp_path / "r.json", [
        {"key": "x1", "text_id": "p1", "text": "a cat", "human_scores": [5, 4], "m": 0.9},
        {"key": "x2", "text_id": "p1", "text": "a cat", "human_scores": [1, 2], "m": 0.1},
        {"key": "x3", "text_id": "p2", "text": "a dog", "human_scores": "n/a", "m": 0.5},
    ])
    ratings = read_ratings(ValidateScorerConfig(ratings=str(tifa)))
    images = ratings.images.set_index("image_id")
    assert images.rating.to_dict() == {"x1": 4.5, "x2": 1.5} and images.raters.tolist() == [2, 2]
    assert images.group.tolist() == ["p1", "p1"] and "m" in images
    assert ratings.skipped == {"rating (human_scores) not a finite number or list of numbers": [2]}
    # long format: one row per (image, rater)
    long = tmp_path / "long.csv"
    pd.DataFrame({"image_id": ["a", "a", "a", "b"], "rating": [1, 2, 3, 5], "likes": [7, 7, 7, 300]}).to_csv(long, index=False)
    images = read_ratings(ValidateScorerConfig(ratings=str(long), engagement_column="likes")).images.set_index("image_id")
    assert images.rating.to_dict() == {"a": 2.0, "b": 5.0} and images.raters.to_dict() == {"a": 3, "b": 1}
    assert images.engagement.to_dict() == {"a": 7, "b": 300}


def test_bad_tables_are_one_line_errors(tmp_path):
    table = tmp_path / "r.csv"
    pd.DataFrame({"image_id": ["a"], "stars": [3]}).to_csv(table, index=False)
    with pytest.raises(UserError, match=r"r.csv: no rating column \(looked for human_scores"):
        read_ratings(ValidateScorerConfig(ratings=str(table)))
    with pytest.raises(UserError, match="no score column 'clip'"):
        run_validation(ValidateScorerConfig(ratings=str(table), rating_column="stars", score_columns=["clip"], output_dir=str(tmp_path / "o")))
    with pytest.raises(UserError, match="table not found"):
        read_ratings(ValidateScorerConfig(ratings=str(tmp_path / "missing.csv")))
    with pytest.raises(UserError, match="validate_scorer.ratings: set it to a table of human ratings"):
        run_validation(ValidateScorerConfig(output_dir=str(tmp_path / "o")))


def test_tifa_human_annotations_reproduce_the_published_correlations(shared_data, tmp_path):
    cfg = ValidateScorerConfig(
        ratings=str(shared_data / "ratings" / "tifa" / "human_annotations_with_scores.json"), bootstrap_samples=50, output_dir=str(tmp_path)
    )
    summary = run_validation(cfg)
    corr = pd.read_csv(tmp_path / "correlations.csv").set_index("metric")
    assert sorted(summary.metrics) == sorted(TIFA_PUBLISHED) and summary.images == 800
    assert (corr.n == 800).all() and (corr.groups == 160).all() and (corr.subset == "all").all()
    for metric, (pearson, kendall) in TIFA_PUBLISHED.items():
        assert corr.loc[metric, "pearson"] == pytest.approx(pearson, abs=1e-12), metric
        assert corr.loc[metric, "kendall"] == pytest.approx(kendall, abs=1e-12), metric
    # TIFA with mPLUG agrees best with people, caption metrics and CLIPScore worst (the paper's finding)
    assert summary.best == "tifa_mplug-large"
    assert corr.spearman["tifa_mplug-large"] > 0.55 > 0.35 > corr.spearman["clipscore_vitb32"]
    pairs = pd.read_csv(tmp_path / "pairwise.csv").set_index("metric")
    assert (pairs.pairs == 1600).all()  # 160 prompts x C(5, 2) image pairs
    assert (pairs.agree + pairs.scorer_ties + pairs.disagree + pairs.human_ties == pairs.pairs).all()
    assert pairs.loc["clipscore_vitb32", "scorer_ties"] == 0 and pairs.loc["tifa_mplug-large", "scorer_ties"] > 0
    assert "mean rating 3.890" in (tmp_path / "report.md").read_text()


def test_scores_table_is_joined_on_the_image_id(shared_data, tmp_path):
    tifa = shared_data / "ratings" / "tifa"
    with_scores = json.loads((tifa / "human_annotations_with_scores.json").read_text())
    scores = pd.DataFrame({"image_id": list(with_scores), "clip_b32": [r["clipscore_vitb32"] for r in with_scores.values()]})
    scores.iloc[::-1].iloc[:-10].to_parquet(tmp_path / "scores.parquet")  # another order, 10 images unscored
    cfg = ValidateScorerConfig(ratings=str(tifa / "human_annotations.json"), scores_table=str(tmp_path / "scores.parquet"), bootstrap_samples=20, output_dir=str(tmp_path / "o"))
    run_validation(cfg)
    row = pd.read_csv(tmp_path / "o" / "correlations.csv").iloc[0]
    assert row.metric == "clip_b32" and row.n == 790 and row.missing == 10
    ratings = {k: r["human_avg"] for k, r in with_scores.items()}
    kept = scores.iloc[::-1].iloc[:-10]
    assert row.pearson == pytest.approx(np.corrcoef(kept.clip_b32, kept.image_id.map(ratings))[0, 1], abs=1e-12)


def test_registered_scorer_runs_on_real_images_and_per_bucket_report(shared_data, tmp_path, tiny_rewards):
    from reward import load_reward
    from PIL import Image

    sid = shared_data / "images" / "sid_lsg"
    manifest = pd.read_csv(sid / "manifest.csv").head(12)
    clip = load_reward("clip", weights=tiny_rewards["weights"]["clip"])
    reference = clip.score_images([Image.open(sid / p).convert("RGB") for p in manifest.image_path], manifest.prompt.tolist()).numpy()
    table = pd.DataFrame(
        {
            "image_path": manifest.image_path,
            "prompt": manifest.prompt,
            "rating": reference * 10 + 3,  # ratings that order the images exactly as the scorer does
            "likes": [0, 3, 30, 300] * 3,
        }
    )
    table.to_csv(sid_table := tmp_path / "ratings.csv", index=False)
    cfg = ValidateScorerConfig(
        ratings=str(sid_table), image_root=str(sid), scorers=["clip"], weights={"clip": tiny_rewards["weights"]["clip"]},
        engagement_column="likes", num_workers=0, device="cpu", bootstrap_samples=20, output_dir=str(tmp_path / "out"),
    )
    run_validation(cfg)
    corr = pd.read_csv(tmp_path / "out" / "correlations.csv")
    assert corr.subset.tolist() == ["all", "[0, 1)", "[1, 10)", "[10, 100)", "[100, 1000)"]
    assert corr.n.tolist() == [12, 3, 3, 3, 3]
    overall = corr.iloc[0]
    assert overall.pearson == pytest.approx(1.0, abs=1e-6) and overall.spearman == pytest.approx(1.0) and overall.kendall == pytest.approx(1.0)
    scored = pd.read_parquet(tmp_path / "out" / "images.parquet").set_index("image_id")
    assert np.allclose(scored.loc[manifest.image_path, "clip"].to_numpy(), reference, atol=1e-5)
    assert (tmp_path / "out" / "scores" / "scores.parquet").is_file()


@pytest.fixture(scope="module")
def tiny_rewards(tmp_path_factory):
    from reward.openai_clip import make_tiny_openai_clip

    path = make_tiny_openai_clip(tmp_path_factory.mktemp("tiny_clip") / "clip.pt", seed=0)
    return {"weights": {"clip": str(path)}}
