"""Train the ``social_aesthetic`` head: image quality from a social engagement signal.

Input: a scoring run that wrote CLIP image embeddings (``score`` with ``embeddings: [clip]``; one
batched, resumable pass over the images, each read once) and a table of the same images with an
engagement count (favourites, remixes, likes), by default the image table that scoring run read.

Labels (after "production and consumption of quality", Flickr): engagement percentiles of the
training images cut three buckets, by default **low** = bottom 10%, **medium** = the middle 10%
(45th-55th percentile), **high** = top 5%; images between buckets are not used for training. A
bucket holds every image whose engagement lies between its two percentile values (inclusive), so
tied counts at a bound all fall in; buckets that would touch (many equal counts) are an error.
Objectives: 3-way classification (score = expected bucket value) or MSE regression on the
bucket value (0, 0.5, 1); see :mod:`reward.social_aesthetic`.

A seeded ``held_out`` share of all images (labelled or not) is kept out of training and of the
percentiles; the summary reports the head's Spearman correlation with engagement on them, and on
their labelled part the bucket accuracy (classification) and the MSE to the bucket value.
Training reads only the labelled rows' embeddings (memory-mapped parts) and takes seconds.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch

from sr_finetune.config import prepare_output_dir, require
from sr_finetune.errors import ConfigError, UserError
from sr_finetune.io import atomic_write_parquet, read_table
from sr_finetune.models import resolve_device

from .scoring import read_embeddings
from .social_aesthetic import BUCKET_VALUES, BUCKETS, OBJECTIVES, SocialAestheticHead, save_head

logger = logging.getLogger(__name__)


@dataclass
class AestheticTrainConfig:
    """Settings of ``sr-finetune train-aesthetic`` (``social_aesthetic:`` in a config)."""

    scores: Optional[str] = None  # a scoring run's output_dir with embeddings of embedding_metric
    embedding_metric: str = "clip"  # whose CLIP image embeddings the head learns on
    engagement_table: Optional[str] = None  # default: the image table the scoring run read
    engagement_column: str = "engagement"
    id_column: Optional[str] = None  # default: as the scoring run named its images
    objective: str = "classification"  # or regression
    low: list[float] = field(default_factory=lambda: [0.0, 10.0])  # percentile range of each bucket
    medium: list[float] = field(default_factory=lambda: [45.0, 55.0])
    high: list[float] = field(default_factory=lambda: [95.0, 100.0])
    hidden_dim: int = 256  # 0: a linear head
    dropout: float = 0.1
    steps: int = 2000  # optimizer steps (mini-batches, reshuffled every pass over the data)
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 1e-2
    held_out: float = 0.1  # share of all images kept out for evaluation
    seed: int = 0
    device: str = "auto"
    cpu_threads: Optional[int] = None  # torch threads when training on a CPU (None: torch's default)
    output_dir: str = "runs/social_aesthetic"

    def validate(self) -> None:
        require(self.objective in OBJECTIVES, "objective", f"must be one of {', '.join(OBJECTIVES)}, got '{self.objective}'")
        for name in BUCKETS:
            bounds = getattr(self, name)
            require(len(bounds) == 2 and 0 <= bounds[0] < bounds[1] <= 100, name, f"a percentile range [from, to] within [0, 100], got {bounds}")
        require(self.low[1] < self.medium[0] and self.medium[1] < self.high[0], "medium", f"buckets must not overlap: low {self.low}, medium {self.medium}, high {self.high}")
        for key in ("steps", "batch_size"):
            require(getattr(self, key) > 0, key, f"must be positive, got {getattr(self, key)}")
        require(self.hidden_dim >= 0, "hidden_dim", f"must be >= 0, got {self.hidden_dim}")
        require(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        require(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        require(0 <= self.held_out < 1, "held_out", f"must be in [0, 1), got {self.held_out}")
        require(self.cpu_threads is None or self.cpu_threads > 0, "cpu_threads", f"must be positive, got {self.cpu_threads}")

    def require_runnable(self) -> None:
        """What a run needs beyond valid values (the defaults lack it): the scoring run."""
        if not self.scores:
            raise ConfigError("config error: social_aesthetic.scores: set it to a scoring run's output_dir that wrote embeddings (score.embeddings=[clip])")


# --------------------------------------------------------------------------- labels


def bucket_thresholds(engagement: np.ndarray, cfg: AestheticTrainConfig) -> dict[str, tuple[float, float]]:
    """Engagement values at each bucket's percentile bounds; an error when buckets would touch."""
    values = {name: tuple(float(v) for v in np.percentile(engagement, getattr(cfg, name))) for name in BUCKETS}
    for lower, upper in (("low", "medium"), ("medium", "high")):
        if values[lower][1] >= values[upper][0]:
            raise UserError(
                f"engagement: the {lower} bucket's upper bound ({getattr(cfg, lower)[1]:g}th percentile = {values[lower][1]:g}) reaches the "
                f"{upper} bucket's lower bound ({getattr(cfg, upper)[0]:g}th percentile = {values[upper][0]:g}): too many equal counts; choose other percentiles"
            )
    return values


def assign_buckets(engagement: np.ndarray, thresholds: dict[str, tuple[float, float]]) -> np.ndarray:
    """Bucket index per image (0 low, 1 medium, 2 high) or -1 outside every bucket."""
    labels = np.full(len(engagement), -1, dtype=np.int64)
    for k, name in enumerate(BUCKETS):
        lo, hi = thresholds[name]
        labels[(engagement >= lo) & (engagement <= hi)] = k
    return labels


# --------------------------------------------------------------------------- data


def _scoring_settings(scores_dir: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    config = scores_dir / "config.yaml"
    if not config.is_file():
        raise UserError(f"{scores_dir}: no config.yaml (not a scoring run's output_dir)")
    return OmegaConf.to_container(OmegaConf.load(config), resolve=True)


def read_engagement(cfg: AestheticTrainConfig, scoring: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, int]]:
    """``image_id, engagement`` of every usable row, and skip counts by reason."""
    table = cfg.engagement_table or scoring.get("image_table")
    if not table:
        raise UserError(f"{cfg.scores} scored a generations folder: set engagement_table to the table of engagement counts")
    df = read_table(table)
    path_column = scoring.get("path_column") or "path"
    id_column = cfg.id_column or scoring.get("id_column") or ("image_id" if "image_id" in df.columns else path_column)
    for column in (id_column, cfg.engagement_column):
        if column not in df.columns:
            raise UserError(f"{table}: no column '{column}' (columns: {', '.join(map(str, df.columns))})")
    engagement = pd.to_numeric(df[cfg.engagement_column], errors="coerce")
    bad = engagement.isna() | (engagement < 0) | ~np.isfinite(engagement.fillna(0))
    frame = pd.DataFrame({"image_id": df[id_column].astype(str), "engagement": engagement.astype(np.float64)})[~bad]
    duplicated = frame.image_id[frame.image_id.duplicated()]
    if len(duplicated):
        raise UserError(f"{table}: image id '{duplicated.iloc[0]}' appears more than once")
    return frame.reset_index(drop=True), {f"engagement ({cfg.engagement_column}) missing, negative or not a number": int(bad.sum())}


def _clip_note(scoring: dict[str, Any], metric: str) -> dict[str, Any]:
    """Which CLIP the embeddings came from, as ``load_reward`` needs it again."""
    if metric == "social_aesthetic":
        raise UserError("embedding_metric social_aesthetic: use the CLIP metric the head itself sits on (e.g. clip)")
    options = dict((scoring.get("options") or {}).get(metric) or {})
    # aesthetic names its CLIP in options; clip and social_reward are the CLIP
    weights = options.get("clip_weights") if metric == "aesthetic" else (scoring.get("weights") or {}).get(metric)
    if weights is not None and Path(weights).exists():
        weights = str(Path(weights).resolve())
    return {"metric": metric, "weights": weights, "dtype": scoring.get("dtype", "fp32")}


# --------------------------------------------------------------------------- training


def fit_head(embeddings: np.ndarray, labels: np.ndarray, cfg: AestheticTrainConfig, device: torch.device) -> tuple[SocialAestheticHead, list[float]]:
    """Train a head on labelled embeddings (bucket index per row) for ``cfg.steps`` mini-batches;
    returns it (eval, CPU) and the mean loss of each pass over the data."""
    torch.manual_seed(cfg.seed)
    head = SocialAestheticHead(embeddings.shape[1], cfg.objective, cfg.hidden_dim, cfg.dropout).to(device).train()
    x = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)).to(device)
    y = torch.from_numpy(labels).to(device)
    values = torch.tensor(BUCKET_VALUES, device=device)[y]
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
    losses: list[float] = []
    step = 0
    while step < cfg.steps:
        order = torch.randperm(len(x), generator=generator).to(device)
        total = seen = 0.0
        for start in range(0, len(x), cfg.batch_size):
            if step == cfg.steps:
                break
            step += 1
            rows = order[start : start + cfg.batch_size]
            out = head(x[rows])
            if cfg.objective == "classification":
                loss = torch.nn.functional.cross_entropy(out, y[rows])
            else:
                loss = torch.nn.functional.mse_loss(out[:, 0], values[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
            seen += len(rows)
        losses.append(total / seen)
    return head.cpu().eval(), losses


@torch.no_grad()
def head_scores(head: SocialAestheticHead, embeddings: np.ndarray) -> np.ndarray:
    """Scores [N] of raw embeddings, as the scorer computes them after its CLIP forward."""
    return head.score(torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))).numpy().astype(np.float64)


def held_out_metrics(scores: np.ndarray, engagement: np.ndarray, labels: np.ndarray, objective: str) -> dict[str, float]:
    """Spearman with engagement (all held-out images), and on the labelled ones Spearman with the
    bucket value, bucket accuracy (classification: the nearest bucket value) and MSE."""
    from scipy.stats import spearmanr

    out: dict[str, float] = {"images": int(len(scores)), "labelled": int((labels >= 0).sum())}
    out["spearman_engagement"] = float(spearmanr(scores, engagement)[0]) if len(scores) > 2 else float("nan")
    labelled = labels >= 0
    if labelled.sum() > 2:
        values = np.asarray(BUCKET_VALUES)[labels[labelled]]
        out["spearman_bucket"] = float(spearmanr(scores[labelled], values)[0])
        out["mse_bucket"] = float(np.mean((scores[labelled] - values) ** 2))
        if objective == "classification":
            nearest = np.abs(scores[labelled, None] - np.asarray(BUCKET_VALUES)[None, :]).argmin(axis=1)
            out["accuracy"] = float(np.mean(nearest == labels[labelled]))
    return out


@dataclass
class AestheticTrainSummary:
    output_dir: str
    trained_on: dict[str, int]
    held_out: dict[str, float]
    skipped: dict[str, int]
    seconds: float

    def line(self) -> str:
        counts = ", ".join(f"{n} {b}" for b, n in self.trained_on.items())
        rho = self.held_out.get("spearman_engagement", float("nan"))
        skipped = ", ".join(f"{n} {r}" for r, n in self.skipped.items() if n) or "none"
        return f"train-aesthetic: trained on {counts}; held-out Spearman with engagement {rho:.3f}; skipped: {skipped} ({self.seconds:.1f} s) -> {self.output_dir}"


def run_aesthetic_training(cfg: AestheticTrainConfig) -> AestheticTrainSummary:
    """Label, train, evaluate on the held-out images and save the head (+ note) in ``output_dir``.

    Output: ``social_aesthetic.safetensors`` + ``social_aesthetic.json`` (load with
    ``load_reward("social_aesthetic", weights=output_dir)``), ``held_out.parquet`` (image_id,
    engagement, bucket, score), ``summary.json`` and ``config.yaml``."""
    cfg.require_runnable()
    start = time.perf_counter()
    scores_dir = Path(cfg.scores)
    scoring = _scoring_settings(scores_dir)
    clip = _clip_note(scoring, cfg.embedding_metric)
    frame, skipped = read_engagement(cfg, scoring)
    ids, embeddings = read_embeddings(scores_dir, cfg.embedding_metric, frame.image_id)
    skipped["no embedding (not in the scoring run, or unreadable)"] = len(frame) - len(ids)
    if len(ids) < 10:
        raise UserError(f"{scores_dir}: only {len(ids)} images have both an embedding and an engagement count")
    engagement = frame.set_index("image_id").engagement.reindex(ids).to_numpy()

    rng = np.random.default_rng(cfg.seed)
    is_held_out = np.zeros(len(ids), dtype=bool)
    is_held_out[rng.permutation(len(ids))[: int(round(cfg.held_out * len(ids)))]] = True
    thresholds = bucket_thresholds(engagement[~is_held_out], cfg)
    labels = assign_buckets(engagement, thresholds)
    train = ~is_held_out & (labels >= 0)
    device = resolve_device(cfg.device)
    threads = torch.get_num_threads()
    if device.type == "cpu" and cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    try:
        head, losses = fit_head(embeddings[train], labels[train], cfg, device)
    finally:
        torch.set_num_threads(threads)

    held_scores = head_scores(head, embeddings[is_held_out])
    metrics = held_out_metrics(held_scores, engagement[is_held_out], labels[is_held_out], cfg.objective)
    trained_on = {name: int((labels[train] == k).sum()) for k, name in enumerate(BUCKETS)}
    out = prepare_output_dir(cfg.output_dir, cfg)
    note = {
        "clip": clip,
        "percentiles": {name: list(getattr(cfg, name)) for name in BUCKETS},
        "thresholds": thresholds,
        "engagement_column": cfg.engagement_column,
        "trained_on": trained_on,
        "held_out": metrics,
        "training": {k: getattr(cfg, k) for k in ("steps", "batch_size", "lr", "weight_decay", "dropout", "held_out", "seed")},
    }
    save_head(head, out, note)
    bucket_names = np.array([*BUCKETS, None], dtype=object)[labels[is_held_out]]  # label -1 (no bucket) -> None
    atomic_write_parquet(pd.DataFrame({"image_id": ids[is_held_out], "engagement": engagement[is_held_out], "bucket": bucket_names, "score": held_scores}), out / "held_out.parquet")
    summary = AestheticTrainSummary(str(out), trained_on, metrics, skipped, time.perf_counter() - start)
    (out / "summary.json").write_text(json.dumps({**asdict(summary), "final_loss": losses[-1], "thresholds": thresholds}, indent=2), encoding="utf-8")
    return summary


__all__ = ["AestheticTrainConfig", "assign_buckets", "bucket_thresholds", "fit_head", "head_scores", "held_out_metrics", "run_aesthetic_training"]
