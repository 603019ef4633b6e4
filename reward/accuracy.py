"""Pairwise accuracy of reward models on a triplet split (the Social Reward paper's Table 4).

A scorer ranks a triplet right when it scores the positive image above the negative one for
the triplet's prompt. Ties (equal scores) are counted and reported separately, under two rules:

- ``accuracy``: a tie counts as half right, ``(wins + ties / 2) / n``;
- ``accuracy_ge``: the authors' rule (their ``validate.py`` tests ``s(pos) >= s(neg)``), a tie
  counts as right, ``(wins + ties) / n``.

Confidence intervals are percentile bootstrap intervals over prompts resampled with
replacement (a prompt's triplets move together; every metric uses the same resamples). Scores
come from the scoring run (:func:`reward.scoring.run_scoring`) on the distinct images of the
split, each with its prompt, so scoring is batched and resumable and each image is read once
for all metrics. Triplets with an image that could not be scored are left out and counted as
``missing``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd

from sr_finetune.config import require, to_yaml
from sr_finetune.errors import ConfigError, UserError
from sr_finetune.io import atomic_write_parquet

from .scoring import ScoreConfig, check_scoring_settings, load_scorers, read_scores, run_scoring
from .triplets import SPLITS, read_triplets

logger = logging.getLogger(__name__)

RULES = {
    "win / tie / loss": "score(prompt, positive) >, = or < score(prompt, negative)",
    "accuracy": "(wins + ties / 2) / triplets: a tie counts as half right",
    "accuracy_ge": "(wins + ties) / triplets: the authors' rule (validate.py: s(pos) >= s(neg)), a tie counts as right",
    "confidence interval": "percentile bootstrap over prompts resampled with replacement (a prompt's triplets move together); the same resamples for every metric",
    "missing": "triplets with an image that could not be scored, left out of every rate",
}
RESULT_COLUMNS = ["metric", "triplets", "prompts", "wins", "ties", "losses", "missing", "accuracy", "ci_low", "ci_high", "accuracy_ge", "ge_ci_low", "ge_ci_high"]


@dataclass
class AccuracyConfig:
    """Settings of the pairwise-accuracy stage (``accuracy:`` in a recipe config)."""

    triplets: Optional[str] = None  # triplets.parquet or a `curate` output folder
    split: str = "test"  # train | val | test | all
    metrics: list[str] = field(default_factory=lambda: ["social_reward"])
    weights: dict[str, str] = field(default_factory=dict)  # metric -> weights path / hub id
    options: dict[str, Any] = field(default_factory=dict)  # metric -> loader keyword arguments
    output_dir: str = "runs/accuracy"
    batch_size: int = 32
    num_workers: int = 2
    device: str = "auto"
    dtype: str = "fp32"
    bootstrap: int = 2000  # resamples of prompts for the confidence intervals (0: none)
    confidence: float = 0.95
    seed: int = 0

    def validate(self) -> None:
        require(self.split in (*SPLITS, "all"), "split", f"must be one of {', '.join(SPLITS)} or all, got '{self.split}'")
        require(self.bootstrap >= 0, "bootstrap", f"must be >= 0, got {self.bootstrap}")
        require(0 < self.confidence < 1, "confidence", f"must be in (0, 1), got {self.confidence}")
        if self.triplets:  # an unused section (no triplets) need not name loadable scorers
            self.score_config().validate()

    def score_config(self) -> ScoreConfig:
        """The scoring run over the split's images (``output_dir/images.parquet`` -> ``output_dir/scores``)."""
        out = Path(self.output_dir)
        return ScoreConfig(
            image_table=str(out / "images.parquet"), id_column="image_id", metrics=list(self.metrics), weights=dict(self.weights), options=dict(self.options),
            output_dir=str(out / "scores"), batch_size=self.batch_size, num_workers=self.num_workers, device=self.device, dtype=self.dtype,
        )  # fmt: skip


def triplet_images(triplets: pd.DataFrame) -> pd.DataFrame:
    """The distinct positive and negative images of ``triplets``: ``image_id, prompt, path``, each id once."""
    pos = triplets[["pos_image_id", "prompt", "pos_path"]].set_axis(["image_id", "prompt", "path"], axis=1)
    neg = triplets[["neg_image_id", "prompt", "neg_path"]].set_axis(["image_id", "prompt", "path"], axis=1)
    images = pd.concat([pos, neg], ignore_index=True).drop_duplicates().reset_index(drop=True)
    repeated = images["image_id"][images["image_id"].duplicated()]
    if len(repeated):
        first = images[images["image_id"] == repeated.iloc[0]]
        raise UserError(f"image '{repeated.iloc[0]}' appears with {len(first)} different prompts or paths in the triplets (e.g. '{first.prompt.iloc[0]}' and '{first.prompt.iloc[1]}'); an image id must name one image of one prompt")
    return images.sort_values("image_id", kind="stable").reset_index(drop=True)


def outcomes(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Per triplet: 1 (positive scored higher), 0 (tie), -1 (negative higher), NaN (a score missing)."""
    out = np.sign(pos - neg).astype(np.float64)
    out[np.isnan(pos) | np.isnan(neg)] = np.nan
    return out


def per_triplet_results(triplets: pd.DataFrame, scores: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """The triplets with ``<metric>_pos``, ``<metric>_neg`` and ``<metric>_outcome`` columns (NaN where unscored)."""
    keep = ["triplet_id", "prompt_id", "prompt", "pos_image_id", "neg_image_id", "split"]
    table = triplets[keep].copy()
    by_id = scores.set_index("image_id")
    for metric in metrics:
        pos = by_id[metric].reindex(table["pos_image_id"]).to_numpy(dtype=np.float64)
        neg = by_id[metric].reindex(table["neg_image_id"]).to_numpy(dtype=np.float64)
        table[f"{metric}_pos"], table[f"{metric}_neg"], table[f"{metric}_outcome"] = pos, neg, outcomes(pos, neg)
    return table


def bootstrap_ratios(numer: np.ndarray, denom: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """``sum(numer) / sum(denom)`` over ``samples`` resamples of the rows (prompts) with replacement.

    ``numer`` and ``denom`` are ``[prompts, statistics]``; returns ``[samples, statistics]`` (NaN
    where a resample has no denominator)."""
    rng = np.random.default_rng(seed)
    prompts = numer.shape[0]
    out = np.empty((samples, numer.shape[1]))
    for start in range(0, samples, 256):  # weights of 256 resamples at a time: bounded memory
        count = min(256, samples - start)
        weights = rng.multinomial(prompts, np.full(prompts, 1.0 / prompts), size=count).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start : start + count] = (weights @ numer) / (weights @ denom)
    return out


def accuracy_table(results: pd.DataFrame, metrics: list[str], samples: int = 2000, confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """One row per metric (``RESULT_COLUMNS``): counts, both accuracy rules and their bootstrap CIs."""
    codes, prompts = pd.factorize(results["prompt_id"])
    rows, numer, denom = [], [], []
    for metric in metrics:
        outcome = results[f"{metric}_outcome"].to_numpy(dtype=np.float64)
        scored = ~np.isnan(outcome)
        wins, ties = (outcome == 1), (outcome == 0)
        n = int(scored.sum())
        per_prompt = [np.bincount(codes, weights=w.astype(np.float64), minlength=len(prompts)) for w in (wins + 0.5 * ties, wins + ties, scored)]
        numer += per_prompt[:2]
        denom += [per_prompt[2], per_prompt[2]]
        rows.append(
            {
                "metric": metric, "triplets": n, "prompts": int((per_prompt[2] > 0).sum()),
                "wins": int(wins.sum()), "ties": int(ties.sum()), "losses": int((outcome == -1).sum()), "missing": int((~scored).sum()),
                "accuracy": (wins.sum() + 0.5 * ties.sum()) / n if n else np.nan,
                "accuracy_ge": (wins.sum() + ties.sum()) / n if n else np.nan,
            }
        )  # fmt: skip
    table = pd.DataFrame(rows)
    low, high = np.full(2 * len(metrics), np.nan), np.full(2 * len(metrics), np.nan)
    if samples and len(prompts):
        stats = bootstrap_ratios(np.stack(numer, axis=1), np.stack(denom, axis=1), samples, seed)
        tail = (1 - confidence) / 2
        with np.errstate(invalid="ignore"):
            finite = ~np.isnan(stats).all(axis=0)
            low[finite], high[finite] = np.nanquantile(stats[:, finite], [tail, 1 - tail], axis=0)
    table["ci_low"], table["ci_high"] = low[0::2], high[0::2]
    table["ge_ci_low"], table["ge_ci_high"] = low[1::2], high[1::2]
    return table[RESULT_COLUMNS]


def accuracy_markdown(table: pd.DataFrame, confidence: float) -> str:
    """The metrics side by side, as in the paper's Table 4."""
    pct = f"{confidence:.0%}"

    def rate(value: float) -> str:
        return "n/a" if np.isnan(value) else f"{value:.2%}"

    lines = [
        f"| metric | triplets | accuracy (tie = ½) | {pct} CI | accuracy (tie = right, `>=`) | {pct} CI | wins | ties | losses | missing |",
        "| --- | ---: | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in table.itertuples():
        lines.append(
            f"| {r.metric} | {r.triplets:,} | {rate(r.accuracy)} | {rate(r.ci_low)} – {rate(r.ci_high)} | {rate(r.accuracy_ge)} | {rate(r.ge_ci_low)} – {rate(r.ge_ci_high)} "
            f"| {r.wins:,} | {r.ties:,} | {r.losses:,} | {r.missing:,} |"
        )
    return "\n".join(lines) + "\n"


@dataclass
class AccuracySummary:
    output_dir: str
    split: str
    triplets: int
    prompts: int
    images: int
    table: str  # Markdown
    seconds: float

    def line(self) -> str:
        return f"accuracy: {self.triplets} triplets of split '{self.split}' ({self.prompts} prompts, {self.images} images) -> {self.output_dir} ({self.seconds:.1f}s)\n{self.table}"


def run_accuracy(cfg: AccuracyConfig, load: Callable[[ScoreConfig, Any], dict] = load_scorers) -> AccuracySummary:
    """Score the split's images, compare each triplet's positive and negative, write the results.

    Writes ``accuracy.parquet`` (per triplet), ``accuracy.json`` (rules, settings, per-metric
    table), ``accuracy.md``; the scores stay in ``output_dir/scores`` for a resumed run."""
    if not cfg.triplets:
        raise ConfigError("config error: accuracy.triplets is required (a triplets.parquet or a `curate` output folder)")
    start = time.perf_counter()
    triplets = read_triplets(cfg.triplets, cfg.split)
    if triplets.empty:
        raise UserError(f"no triplets in split '{cfg.split}' of {cfg.triplets}")
    images = triplet_images(triplets)
    out = Path(cfg.output_dir)
    digest = hashlib.sha256(pd.util.hash_pandas_object(images, index=False).to_numpy().tobytes()).hexdigest()
    check_scoring_settings(out / "scores" / "settings.json", {"images_sha256": digest, "metrics": list(cfg.metrics), "weights": dict(cfg.weights), "options": dict(cfg.options), "dtype": cfg.dtype})
    atomic_write_parquet(images, out / "images.parquet")
    score_cfg = cfg.score_config()
    logger.info(run_scoring(score_cfg, load=load).line())
    scores = read_scores(score_cfg.output_dir)
    results = per_triplet_results(triplets, scores, list(cfg.metrics))
    table = accuracy_table(results, list(cfg.metrics), cfg.bootstrap, cfg.confidence, cfg.seed)
    markdown = accuracy_markdown(table, cfg.confidence)
    atomic_write_parquet(results, out / "accuracy.parquet")
    report = {
        "triplets_source": str(cfg.triplets), "split": cfg.split, "triplets": len(triplets), "prompts": int(triplets["prompt_id"].nunique()), "images": len(images),
        "rules": RULES, "bootstrap": {"samples": cfg.bootstrap, "confidence": cfg.confidence, "seed": cfg.seed, "unit": "prompt"},
        "metrics": json.loads(table.to_json(orient="records")), "config": asdict(cfg),
    }  # fmt: skip
    (out / "accuracy.json").write_text(json.dumps(report, indent=2))
    (out / "accuracy.md").write_text(markdown)
    (out / "config.yaml").write_text(to_yaml(cfg))
    return AccuracySummary(str(out), cfg.split, len(triplets), report["prompts"], len(images), markdown, time.perf_counter() - start)
