"""The social_aesthetic scorer: embeddings from the scoring run, engagement buckets, both objectives
learning a visual cue, and the trained head as a registered scorer."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr

from reward import load_reward
from reward.aesthetic_training import AestheticTrainConfig, assign_buckets, bucket_thresholds, run_aesthetic_training
from reward.base import RewardModel
from reward.openai_clip import make_tiny_openai_clip
from reward.scoring import ScoreConfig, iter_scored_parts, read_embeddings, read_image_table, run_scoring
from sr_finetune.errors import UserError

N_IMAGES = 240


@pytest.fixture(scope="module")
def engagement_world(tmp_path_factory):
    """Images whose brightness (the cue) drives their likes, scored once with embeddings."""
    root = tmp_path_factory.mktemp("engagement")
    rng = np.random.default_rng(0)
    cue = rng.uniform(0, 1, N_IMAGES)
    rows = []
    for i, c in enumerate(cue):
        texture = rng.normal(0, 25, (32, 32, 3))
        pixels = np.clip(40 + 170 * c + texture, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"img{i:03d}.png")
        likes = int(round(np.exp(6 * c + rng.normal(0, 0.3))))
        rows.append({"image_id": f"img{i:03d}", "path": f"img{i:03d}.png", "prompt": "a photo", "likes": likes, "cue": c})
    pd.DataFrame(rows).to_csv(root / "engagement.csv", index=False)
    clip = make_tiny_openai_clip(root / "clip.pt", seed=0)
    score_cfg = ScoreConfig(
        image_table=str(root / "engagement.csv"), metrics=["clip"], weights={"clip": str(clip)}, embeddings=["clip"],
        output_dir=str(root / "scores"), batch_size=32, num_workers=0, rows_per_part=100, device="cpu",
    )
    run_scoring(score_cfg)
    return root, score_cfg, pd.DataFrame(rows).set_index("image_id")


def test_buckets_follow_percentiles_and_refuse_touching_bounds():
    engagement = np.arange(200, dtype=float)
    cfg = AestheticTrainConfig(scores="x")
    thresholds = bucket_thresholds(engagement, cfg)
    assert thresholds == {"low": (0.0, pytest.approx(19.9)), "medium": (pytest.approx(89.55), pytest.approx(109.45)), "high": (pytest.approx(189.05), 199.0)}
    labels = assign_buckets(engagement, thresholds)
    assert [(labels == k).sum() for k in (0, 1, 2, -1)] == [20, 20, 10, 150]
    assert labels[0] == 0 and labels[100] == 1 and labels[199] == 2 and labels[50] == -1
    zeros = np.r_[np.zeros(120), np.arange(80.0)]  # 60% of the images have no likes
    with pytest.raises(UserError, match=r"low bucket's upper bound \(10th percentile = 0\) reaches the medium bucket's lower bound \(45th percentile = 0\)"):
        bucket_thresholds(zeros, cfg)


def test_scoring_run_writes_embeddings_that_match_the_scorer(engagement_world):
    root, score_cfg, truth = engagement_world
    ids, vectors = read_embeddings(score_cfg.output_dir, "clip")
    assert len(ids) == N_IMAGES and vectors.shape == (N_IMAGES, 32) and vectors.dtype == np.float32
    assert sorted((root / "scores" / "embeddings" / "clip").glob("part-*.npy")) and len(list((root / "scores" / "embeddings" / "clip").glob("*.npy"))) == 3
    clip = load_reward("clip", weights=score_cfg.weights["clip"])
    some = ["img007", "img123", "img200"]
    pixels = torch.stack([clip.preprocess_image(Image.open(root / f"{i}.png").convert("RGB")) for i in some])
    with torch.no_grad():
        direct = clip.embed_image(pixels).numpy()
    subset_ids, subset = read_embeddings(score_cfg.output_dir, "clip", image_ids=some)
    assert subset_ids.tolist() == some
    np.testing.assert_allclose(subset, direct, atol=1e-5)  # fp32, batched vs alone


def test_embeddings_part_lost_is_remade_alone(engagement_world, tmp_path):
    import shutil

    root, score_cfg, _ = engagement_world
    copy = tmp_path / "scores"
    shutil.copytree(score_cfg.output_dir, copy)
    before = np.load(copy / "embeddings" / "clip" / "part-00001.npy")
    (copy / "embeddings" / "clip" / "part-00001.npy").unlink()
    cfg = ScoreConfig(**{**score_cfg.__dict__, "output_dir": str(copy)})
    summary = run_scoring(cfg)
    assert summary.parts_made == 1 and summary.parts_total == 3
    np.testing.assert_allclose(np.load(copy / "embeddings" / "clip" / "part-00001.npy"), before, atol=1e-6)


class _NoEmbedding(RewardModel):
    name = "plain"

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def preprocess_image(self, image):
        return torch.zeros(3, 4, 4)

    def tokenize(self, prompts):
        return torch.zeros(len(prompts), 0, dtype=torch.long)

    def score(self, pixel_values, text_inputs):
        return pixel_values.mean(dim=(1, 2, 3))


def test_embeddings_of_a_scorer_without_one_are_a_one_line_error(engagement_world):
    _, score_cfg, _ = engagement_world
    rows = read_image_table(score_cfg)
    with pytest.raises(UserError, match="metric 'plain' has no image embedding"):
        next(iter_scored_parts(rows, {"plain": _NoEmbedding()}, [(0, 0, 4)], batch_size=2, num_workers=0, device=torch.device("cpu"), embed=["plain"]))


@pytest.mark.parametrize("objective", ["classification", "regression"])
def test_both_objectives_learn_the_visual_cue_on_held_out_images(engagement_world, tmp_path, objective):
    root, score_cfg, truth = engagement_world
    cfg = AestheticTrainConfig(scores=score_cfg.output_dir, engagement_column="likes", objective=objective, held_out=0.25, steps=300, device="cpu", cpu_threads=1, output_dir=str(tmp_path / objective))
    summary = run_aesthetic_training(cfg)
    held = pd.read_parquet(tmp_path / objective / "held_out.parquet")
    assert len(held) == N_IMAGES // 4 and sum(summary.trained_on.values()) > 30
    rho = spearmanr(held.score, truth.loc[held.image_id, "cue"])[0]
    assert rho > 0.8, (objective, rho)
    assert summary.held_out["spearman_engagement"] > 0.7
    assert held.score.between(-0.5, 1.5).all()
    note = json.loads((tmp_path / objective / "social_aesthetic.json").read_text())
    assert note["objective"] == objective and note["clip"]["weights"] == str((root / "clip.pt").resolve()) and note["embed_dim"] == 32

    # the saved head is a registered scorer: from pixels it gives the held-out scores
    scorer = load_reward("social_aesthetic", weights=str(tmp_path / objective))
    some = held.head(5)
    direct = scorer.score_images([Image.open(root / f"{i}.png").convert("RGB") for i in some.image_id], [""] * 5).numpy()
    np.testing.assert_allclose(direct, some.score.to_numpy(), atol=1e-5)


def test_trained_head_scores_through_the_scoring_run(engagement_world, tmp_path):
    root, score_cfg, _ = engagement_world
    run_aesthetic_training(AestheticTrainConfig(scores=score_cfg.output_dir, engagement_column="likes", hidden_dim=0, steps=100, device="cpu", cpu_threads=1, output_dir=str(tmp_path / "head")))
    table = pd.read_csv(root / "engagement.csv").head(40).assign(path=lambda t: [str(root / p) for p in t.path])
    table.to_csv(tmp_path / "some.csv", index=False)
    cfg = ScoreConfig(
        image_table=str(tmp_path / "some.csv"), metrics=["social_aesthetic", "clip"], weights={"social_aesthetic": str(tmp_path / "head"), "clip": score_cfg.weights["clip"]},
        output_dir=str(tmp_path / "scores"), batch_size=32, num_workers=0, rows_per_part=500, device="cpu",
    )
    run_scoring(cfg)
    scores = pd.read_parquet(tmp_path / "scores" / "scores.parquet").set_index("image_id")
    assert scores.social_aesthetic.notna().all() and len(scores) == 40
    # the head's scores from the run's pixels equal the head on the embeddings the first run wrote
    from reward.aesthetic_training import head_scores
    from reward.social_aesthetic import load_head

    ids, vectors = read_embeddings(score_cfg.output_dir, "clip", image_ids=scores.index)
    np.testing.assert_allclose(scores.loc[ids, "social_aesthetic"].to_numpy(), head_scores(load_head(tmp_path / "head")[0], vectors), atol=1e-5)


def test_missing_engagement_column_and_unscored_run_are_one_line_errors(engagement_world, tmp_path):
    _, score_cfg, _ = engagement_world
    with pytest.raises(UserError, match="engagement.csv: no column 'favs'"):
        run_aesthetic_training(AestheticTrainConfig(scores=score_cfg.output_dir, engagement_column="favs", output_dir=str(tmp_path)))
    with pytest.raises(UserError, match="social_aesthetic.scores: set it to a scoring run's output_dir"):
        run_aesthetic_training(AestheticTrainConfig(output_dir=str(tmp_path)))
    with pytest.raises(UserError, match="no config.yaml"):
        run_aesthetic_training(AestheticTrainConfig(scores=str(tmp_path), output_dir=str(tmp_path / "o")))
