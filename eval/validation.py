"""How far to trust a scorer: its agreement with human ratings of the same images.

Input: a table of human ratings, one or more per image (e.g. 1-5 "how beautiful is this
image"), and the scores to check: columns of the same table, a separate scores table, or any
registered scorer run on the images through the scoring stage (batched, resumable).

Reported per metric (definitions also in ``results.json`` and the report):

* Pearson r, Spearman rho and Kendall tau-b between the score and the **mean** human rating of
  each image, over all images and per popularity bucket (log-binned engagement, when the table
  has an engagement column), each with a percentile bootstrap CI. The bootstrap resamples
  groups (images of one prompt move together) when there is a group or prompt column, images
  otherwise; every metric sees the same resamples;
* pairwise agreement: over all pairs of images of the same prompt (group) that people rated
  differently (different mean ratings), the share the scorer orders the same way. Pairs people
  rated equally are counted as human ties and left out; pairs the scorer scores equally are
  scorer ties, counted in the denominator and reported separately (never half a win).

Note on TIFA's published numbers: the TIFA authors' notebook (``compute_correlation.ipynb``,
repository Yushi-Hu/tifa) prints ``np.corrcoef`` as "Spearman's Correlation", so their table's
"Spearman" column is Pearson's r; their Kendall column is scipy's tau-b, as ours.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from sr_finetune.config import prepare_output_dir, require
from sr_finetune.errors import ConfigError, UserError
from sr_finetune.io import JSON_KEY, atomic_write_parquet, read_table

from .report import frame_to_markdown
from .stats import Bootstrap, bootstrap_ratio_ci

logger = logging.getLogger(__name__)

ID_COLUMNS = ("image_id", "id")
RATING_COLUMNS = ("human_scores", "ratings", "rating", "human_avg", "mean_rating", "score")
PROMPT_COLUMNS = ("prompt", "text", "caption")
GROUP_COLUMNS = ("prompt_id", "text_id")
PATH_COLUMNS = ("path", "image_path", "image")
STATISTICS = ("pearson", "spearman", "kendall")
CORRELATION_COLUMNS = [
    "metric", "subset", "n", "groups", "missing",
    *[f"{s}{suffix}" for s in STATISTICS for suffix in ("", "_low", "_high")],
]
PAIRWISE_COLUMNS = ["metric", "groups", "pairs", "human_ties", "agree", "scorer_ties", "disagree", "agreement", "ci_low", "ci_high", "agreement_untied"]
DEFINITIONS = {
    "rating": "the mean of an image's human ratings (all raters, all rows with its id)",
    "pearson": "Pearson's r between score and mean rating",
    "spearman": "Spearman's rho (Pearson's r of average ranks) between score and mean rating",
    "kendall": "Kendall's tau-b (ties corrected, scipy.stats.kendalltau) between score and mean rating",
    "confidence interval": "percentile bootstrap; resamples groups (a prompt's images together) with replacement, or images when there are no groups; the same resamples for every metric",
    "popularity bucket": "engagement binned on a log scale: [0, 1), [1, b), [b, b^2), ... with b = engagement_log_base",
    "pairwise agreement": "over pairs of images of the same group with different mean ratings: agree / (agree + scorer ties + disagree); pairs with equal mean ratings are human ties, left out; agreement_untied = agree / (agree + disagree)",
    "missing": "images with a rating but no score for the metric (not scored, unreadable, NaN); left out of that metric's statistics",
}


@dataclass
class ValidateScorerConfig:
    """Settings of ``sr-finetune validate-scorer`` (``validate_scorer:`` in a config)."""

    ratings: Optional[str] = None  # csv/tsv/parquet/json/jsonl of human ratings (see README for the formats)
    id_column: Optional[str] = None  # default: image_id or id, else a JSON object's keys, else the path column
    rating_column: Optional[str] = None  # default: the first of human_scores, ratings, rating, human_avg, mean_rating, score
    prompt_column: Optional[str] = None  # default: prompt, text or caption
    group_column: Optional[str] = None  # images compared in pairs; default: prompt_id or text_id, else the prompt
    engagement_column: Optional[str] = None  # popularity buckets (e.g. likes); none: overall only
    engagement_log_base: float = 10.0
    score_columns: list[str] = field(default_factory=list)  # precomputed scores: columns of the scores table if given, else of the ratings table
    scores_table: Optional[str] = None  # a separate table of scores joined on the image id (e.g. scores.parquet)
    scorers: list[str] = field(default_factory=list)  # registered scorers to run on the images
    weights: dict[str, str] = field(default_factory=dict)  # scorer -> weights path / hub id
    options: dict[str, Any] = field(default_factory=dict)  # scorer -> loader keyword arguments
    path_column: Optional[str] = None  # image files, for scorers; default: path, image_path or image
    image_root: Optional[str] = None  # folder the paths are relative to (default: the ratings file's folder)
    batch_size: int = 32
    num_workers: int = 2
    device: str = "auto"
    dtype: str = "fp32"
    bootstrap_samples: int = 2000
    confidence: float = 0.95
    seed: int = 0
    output_dir: str = "runs/validate_scorer"

    def validate(self) -> None:
        require(self.engagement_log_base > 1, "engagement_log_base", f"must be > 1, got {self.engagement_log_base}")
        require(self.bootstrap_samples > 0, "bootstrap_samples", f"must be positive, got {self.bootstrap_samples}")
        require(0 < self.confidence < 1, "confidence", f"must be in (0, 1), got {self.confidence}")
        require(self.batch_size > 0, "batch_size", f"must be positive, got {self.batch_size}")
        require(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        clash = set(self.scorers) & set(self.score_columns)
        require(not clash, "scorers", f"{sorted(clash)} named both as scorer and as score column")
        unknown = set(self.weights) - set(self.scorers)
        require(not unknown, "weights", f"weights given for scorers not requested: {sorted(unknown)}")

    def require_runnable(self) -> None:
        """What a run needs beyond valid values (the defaults lack it): the ratings table."""
        if not self.ratings:
            raise ConfigError("config error: validate_scorer.ratings: set it to a table of human ratings (csv, tsv, parquet, json, jsonl)")


# --------------------------------------------------------------------------- reading tables


def _column(df: pd.DataFrame, wanted: str | None, candidates: Sequence[str], source: str, what: str, required: bool = True) -> str | None:
    if wanted:
        if wanted not in df.columns:
            raise UserError(f"{source}: no {what} column '{wanted}' (columns: {', '.join(map(str, df.columns))})")
        return wanted
    found = next((c for c in candidates if c in df.columns), None)
    if found is None and required:
        raise UserError(f"{source}: no {what} column (looked for {', '.join(candidates)}; columns: {', '.join(map(str, df.columns))}); set {what}_column")
    return found


def _rating_values(cell: Any) -> list[float] | None:
    """The ratings in one cell: a number, or a list of numbers (one per rater); None if not numeric."""
    values = list(cell) if isinstance(cell, (list, tuple, np.ndarray)) else [cell]
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    return numbers if numbers and all(math.isfinite(v) for v in numbers) else None


@dataclass
class Ratings:
    """One row per image: ``image_id, rating (mean), raters`` and the optional ``prompt, group,
    engagement, path`` and score columns; ``skipped`` = reason -> row numbers of the file."""

    images: pd.DataFrame
    source: str
    skipped: dict[str, list[int]]


def read_ratings(cfg: ValidateScorerConfig) -> Ratings:
    """Read and aggregate the ratings table (see the README for the formats it accepts)."""
    source = str(cfg.ratings)
    df = read_table(source)
    if df.empty:
        raise UserError(f"{source}: no rows")
    id_col = _column(df, cfg.id_column, ID_COLUMNS, source, "id", required=False)
    path_col = _column(df, cfg.path_column, PATH_COLUMNS, source, "path", required=False)
    id_col = id_col or (JSON_KEY if JSON_KEY in df.columns else path_col)
    if id_col is None:
        raise UserError(f"{source}: no id column (looked for {', '.join(ID_COLUMNS)} or a path column); set id_column")
    rating_col = _column(df, cfg.rating_column, RATING_COLUMNS, source, "rating")
    prompt_col = _column(df, cfg.prompt_column, PROMPT_COLUMNS, source, "prompt", required=False)
    group_col = _column(df, cfg.group_column, GROUP_COLUMNS, source, "group", required=False) or prompt_col
    engagement_col = _column(df, cfg.engagement_column, (), source, "engagement", required=False)

    skipped: dict[str, list[int]] = {}
    rows = []
    for row, (image_id, cell) in enumerate(zip(df[id_col], df[rating_col])):
        values = _rating_values(cell)
        if image_id is None or (isinstance(image_id, float) and math.isnan(image_id)):
            skipped.setdefault("no image id", []).append(row)
        elif values is None:
            skipped.setdefault(f"rating ({rating_col}) not a finite number or list of numbers", []).append(row)
        else:
            rows.append((row, str(image_id), sum(values), len(values)))
    if not rows:
        raise UserError(f"{source}: no usable ratings ({_skip_text(skipped)})")
    kept = pd.DataFrame(rows, columns=["row", "image_id", "rating_sum", "raters"])
    per_image = kept.groupby("image_id", sort=False).agg(rating_sum=("rating_sum", "sum"), raters=("raters", "sum"), first_row=("row", "first"))
    images = pd.DataFrame({"image_id": per_image.index, "rating": per_image.rating_sum / per_image.raters, "raters": per_image.raters.to_numpy()})
    first = df.iloc[per_image.first_row.to_numpy()].reset_index(drop=True)
    for name, column in (("prompt", prompt_col), ("group", group_col), ("engagement", engagement_col), ("path", path_col)):
        if column is not None:
            images[name] = first[column].to_numpy()
    if "group" in images:
        images["group"] = images["group"].astype(str)
    if "engagement" in images:
        images["engagement"] = pd.to_numeric(images["engagement"], errors="coerce")
    reserved = {id_col, rating_col, prompt_col, group_col, engagement_col, path_col, JSON_KEY}
    for column in df.columns:
        if column not in reserved and column not in images:
            images[column] = first[column].to_numpy()
    return Ratings(images.reset_index(drop=True), source, skipped)


def _skip_text(skipped: dict[str, list[int]]) -> str:
    return "; ".join(f"{len(rows)} {reason} (rows {', '.join(map(str, rows[:5]))}{' ...' if len(rows) > 5 else ''})" for reason, rows in skipped.items()) or "none"


def numeric_score_columns(images: pd.DataFrame) -> list[str]:
    """The numeric columns, other than the ratings' own and other human-rating columns (e.g.
    ``human_avg`` beside ``human_scores``): what is validated when no metric is named."""
    own = {"image_id", "rating", "raters", "prompt", "group", "engagement", "path", *RATING_COLUMNS}
    return [c for c in images.columns if c not in own and pd.api.types.is_numeric_dtype(images[c]) and not pd.api.types.is_bool_dtype(images[c])]


# --------------------------------------------------------------------------- statistics


def popularity_bucket(engagement: np.ndarray, base: float) -> np.ndarray:
    """Log-binned engagement labels: ``[0, 1)``, ``[1, b)``, ``[b, b^2)``, ...; NaN or negative -> ``unknown``."""
    engagement = np.asarray(engagement, dtype=np.float64)
    labels = np.full(len(engagement), "unknown", dtype=object)
    valid = np.isfinite(engagement) & (engagement >= 0)
    labels[valid & (engagement < 1)] = "[0, 1)"
    positive = valid & (engagement >= 1)
    # the small offset keeps exact powers of the base (100 = 10^2) in their own bin despite log rounding
    k = np.floor(np.log(engagement[positive]) / np.log(base) + 1e-9).astype(int)
    labels[positive] = [f"[{_fmt(base ** i)}, {_fmt(base ** (i + 1))})" for i in k]
    return labels


def _fmt(x: float) -> str:
    return f"{x:g}" if x < 1e6 else f"{x:.3g}"


def _bucket_order(label: str) -> float:
    return math.inf if label == "unknown" else float(label[1:].split(",")[0])


def _rank_rows(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, axis=-1)


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson's r of each row pair of [B, n] arrays (NaN where a row is constant)."""
    x = x - x.mean(axis=-1, keepdims=True)
    y = y - y.mean(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (x * y).sum(axis=-1) / np.sqrt((x * x).sum(axis=-1) * (y * y).sum(axis=-1))


def correlations(scores: np.ndarray, ratings: np.ndarray) -> dict[str, float]:
    """Pearson, Spearman and Kendall tau-b of ``scores`` with ``ratings`` (NaN below 3 images or
    with a constant side)."""
    from scipy.stats import kendalltau, pearsonr, spearmanr

    scores, ratings = np.asarray(scores, dtype=np.float64), np.asarray(ratings, dtype=np.float64)
    if len(scores) < 3 or np.ptp(scores) == 0 or np.ptp(ratings) == 0:
        return dict.fromkeys(STATISTICS, math.nan)
    return {
        "pearson": float(pearsonr(scores, ratings)[0]),
        "spearman": float(spearmanr(scores, ratings)[0]),
        "kendall": float(kendalltau(scores, ratings)[0]),
    }


def _resamples(groups: np.ndarray, boot: Bootstrap, rng: np.random.Generator) -> list[np.ndarray]:
    """``boot.samples`` index arrays, each the rows of groups drawn with replacement."""
    codes, members = np.unique(groups, return_inverse=True)
    order = np.argsort(members, kind="stable")
    starts = np.searchsorted(members[order], np.arange(len(codes) + 1))
    blocks = [order[starts[g] : starts[g + 1]] for g in range(len(codes))]
    draws = rng.integers(0, len(codes), size=(boot.samples, len(codes)))
    return [np.concatenate([blocks[g] for g in draw]) for draw in draws]


def bootstrap_correlations(scores: np.ndarray, ratings: np.ndarray, resamples: list[np.ndarray], confidence: float) -> dict[str, tuple[float, float]]:
    """Percentile CIs of the three correlations over the given resamples (index arrays)."""
    from scipy.stats import kendalltau

    if len(scores) < 3:
        return {s: (math.nan, math.nan) for s in STATISTICS}
    values = {s: np.empty(len(resamples)) for s in STATISTICS}
    # resamples of equal length (every group the same size) stack into one vectorised pass
    lengths = {len(r) for r in resamples}
    batches = [np.stack(resamples)] if len(lengths) == 1 else [r[None, :] for r in resamples]
    done = 0
    for batch in batches:
        x, y = scores[batch], ratings[batch]
        count = len(batch)
        values["pearson"][done : done + count] = _pearson_rows(x, y)
        values["spearman"][done : done + count] = _pearson_rows(_rank_rows(x), _rank_rows(y))
        with np.errstate(invalid="ignore", divide="ignore"):
            values["kendall"][done : done + count] = [kendalltau(a, b)[0] for a, b in zip(x, y)]
        done += count
    alpha = 1 - confidence
    out = {}
    for s, v in values.items():
        finite = v[np.isfinite(v)]
        out[s] = tuple(np.quantile(finite, [alpha / 2, 1 - alpha / 2])) if len(finite) else (math.nan, math.nan)
    return out


def pairwise_agreement(groups: np.ndarray, ratings: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """Per group: pairs, human ties, and the scorer's agree / tie / disagree counts over the pairs
    people rated differently."""
    frame = pd.DataFrame({"group": groups, "rating": ratings, "score": scores})
    rows = []
    for group, members in frame.groupby("group", sort=False):
        r, s = members.rating.to_numpy(), members.score.to_numpy()
        i, j = np.triu_indices(len(r), k=1)
        human = np.sign(r[i] - r[j])
        scorer = np.sign(s[i] - s[j])
        rated = human != 0
        rows.append((group, len(i), int((~rated).sum()), int((rated & (scorer == human)).sum()), int((rated & (scorer == 0)).sum()), int((rated & (scorer == -human)).sum())))
    return pd.DataFrame(rows, columns=["group", "pairs", "human_ties", "agree", "scorer_ties", "disagree"])


# --------------------------------------------------------------------------- the run


def _scores_from_scorers(cfg: ValidateScorerConfig, images: pd.DataFrame, out: Path) -> pd.DataFrame:
    """Run the configured scorers on the images through the scoring stage (resumable)."""
    from reward.scoring import ScoreConfig, run_scoring

    if "path" not in images:
        raise UserError(f"{cfg.ratings}: scorers need image files, but there is no path column (looked for {', '.join(PATH_COLUMNS)}); set path_column")
    root = Path(cfg.image_root) if cfg.image_root else Path(cfg.ratings).parent
    table = pd.DataFrame(
        {
            "image_id": images.image_id,
            "prompt": images.prompt.astype(str) if "prompt" in images else "",
            "path": [str(p if Path(p).is_absolute() else root / p) for p in images.path.astype(str)],
        }
    )
    atomic_write_parquet(table, out / "images.parquet")
    score_cfg = ScoreConfig(
        image_table=str(out / "images.parquet"), id_column="image_id", metrics=list(cfg.scorers), weights=dict(cfg.weights), options=dict(cfg.options),
        output_dir=str(out / "scores"), batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=cfg.device, dtype=cfg.dtype,
    )
    try:
        score_cfg.validate()
    except ValueError as exc:
        raise UserError(f"config error: validate_scorer.{exc}") from None
    logger.info(run_scoring(score_cfg).line())
    scored = pd.read_parquet(out / "scores" / "scores.parquet")
    return scored[["image_id", *cfg.scorers]]


def gather_scores(cfg: ValidateScorerConfig, ratings: Ratings, out: Path) -> tuple[pd.DataFrame, list[str]]:
    """The images with one column per metric to validate (NaN where an image has no score)."""
    images = ratings.images
    metrics = list(cfg.score_columns)
    if cfg.scores_table:
        table = read_table(cfg.scores_table)
        id_col = _column(table, None, ID_COLUMNS, str(cfg.scores_table), "id")
        columns = metrics or [c for c in numeric_score_columns(table.drop(columns=[id_col])) if c not in images]
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise UserError(f"{cfg.scores_table}: no score column {missing[0]} (columns: {', '.join(map(str, table.columns))})")
        scores = table[[id_col, *columns]].rename(columns={id_col: "image_id"}).assign(image_id=lambda t: t.image_id.astype(str))
        if scores.image_id.duplicated().any():
            raise UserError(f"{cfg.scores_table}: image id '{scores.image_id[scores.image_id.duplicated()].iloc[0]}' appears more than once")
        images = images.drop(columns=[c for c in columns if c in images]).merge(scores, on="image_id", how="left")
        metrics = list(columns)
    else:
        missing = [c for c in metrics if c not in images]
        if missing:
            raise UserError(f"{ratings.source}: no score column '{missing[0]}' (columns: {', '.join(map(str, images.columns))})")
        if not metrics and not cfg.scorers:
            metrics = numeric_score_columns(images)
            logger.info("validate-scorer: every numeric column validated: %s", ", ".join(metrics))
    if cfg.scorers:
        images = images.merge(_scores_from_scorers(cfg, images, out), on="image_id", how="left")
        metrics += list(cfg.scorers)
    if not metrics:
        raise UserError(f"{ratings.source}: nothing to validate: no score columns, scores_table or scorers")
    for metric in metrics:
        images[metric] = pd.to_numeric(images[metric], errors="coerce").astype(np.float64)
    return images, metrics


def correlation_table(images: pd.DataFrame, metrics: Sequence[str], boot: Bootstrap, engagement_log_base: float) -> pd.DataFrame:
    """Correlations with CIs per metric, over all images and per popularity bucket."""
    subsets = [("all", np.ones(len(images), dtype=bool))]
    if "engagement" in images:
        buckets = popularity_bucket(images.engagement.to_numpy(), engagement_log_base)
        subsets += [(label, buckets == label) for label in sorted(set(buckets), key=_bucket_order)]
    groups = images.group.to_numpy() if "group" in images else images.image_id.to_numpy()
    ratings = images.rating.to_numpy(dtype=np.float64)
    rows = []
    for subset, mask in subsets:
        for metric in metrics:
            scores = images[metric].to_numpy()
            ok = mask & np.isfinite(scores)
            # the same resamples for every metric of a subset: drawn from the subset's groups with one seed
            resamples = _resamples(groups[ok], boot, boot.rng(subset)) if ok.sum() >= 3 else []
            point = correlations(scores[ok], ratings[ok])
            cis = bootstrap_correlations(scores[ok], ratings[ok], resamples, boot.confidence)
            stats = [v for s in STATISTICS for v in (point[s], *cis[s])]
            rows.append((metric, subset, int(ok.sum()), len(set(groups[ok])), int((mask & ~np.isfinite(scores)).sum()), *stats))
    return pd.DataFrame(rows, columns=CORRELATION_COLUMNS)


def pairwise_table(images: pd.DataFrame, metrics: Sequence[str], boot: Bootstrap) -> pd.DataFrame:
    """Pairwise agreement with people per metric, with a CI from resampled groups."""
    rows = []
    for metric in metrics:
        ok = np.isfinite(images[metric].to_numpy())
        per_group = pairwise_agreement(images.group.to_numpy()[ok], images.rating.to_numpy()[ok], images[metric].to_numpy()[ok])
        decided = (per_group.agree + per_group.scorer_ties + per_group.disagree).to_numpy()
        low, high = bootstrap_ratio_ci(per_group.agree.to_numpy(), decided, boot, boot.rng("pairs"))
        totals = per_group[["pairs", "human_ties", "agree", "scorer_ties", "disagree"]].sum()
        agreement = totals.agree / decided.sum() if decided.sum() else math.nan
        untied = totals.agree / (totals.agree + totals.disagree) if totals.agree + totals.disagree else math.nan
        rows.append((metric, len(per_group), *map(int, totals), agreement, low, high, untied))
    return pd.DataFrame(rows, columns=PAIRWISE_COLUMNS)


@dataclass
class ValidationSummary:
    output_dir: str
    images: int
    metrics: list[str]
    best: str
    best_spearman: float
    seconds: float

    def line(self) -> str:
        return (
            f"validate-scorer: {len(self.metrics)} metric(s) on {self.images} rated images; highest Spearman: "
            f"{self.best} ({self.best_spearman:.3f}) ({self.seconds:.1f} s) -> {self.output_dir}"
        )


def _with_ci(frame: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    shown = frame[["metric", "subset", "n"]].copy()
    for name in names:
        shown[name] = [f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi in zip(frame[name], frame[f"{name}_low"], frame[f"{name}_high"])]
    return shown


def write_report(out: Path, cfg: ValidateScorerConfig, ratings: Ratings, corr: pd.DataFrame, pairs: pd.DataFrame | None) -> None:
    """``report.md``: the correlation tables (overall, per bucket), pairwise agreement, definitions."""
    images = ratings.images
    unit = "groups (a prompt's images together)" if "group" in images else "images"
    lines = [
        "# Scorer validation against human ratings",
        "",
        f"{len(images)} rated images from `{ratings.source}` ({int(images.raters.sum())} ratings, "
        f"mean rating {images.rating.mean():.3f}); skipped rows: {_skip_text(ratings.skipped)}.",
        f"CIs: {cfg.confidence:.0%} percentile bootstrap, {cfg.bootstrap_samples} resamples of {unit}, seed {cfg.seed}.",
        "",
        "## Correlation with the mean human rating, all images",
        "",
        frame_to_markdown(_with_ci(corr[corr.subset == "all"], STATISTICS)),
        "",
    ]
    if (corr.subset != "all").any():
        lines += [f"## Per popularity bucket (log base {cfg.engagement_log_base:g} engagement)", "", frame_to_markdown(_with_ci(corr[corr.subset != "all"], STATISTICS)), ""]
    if pairs is not None:
        lines += ["## Pairwise agreement with people (image pairs of the same prompt)", "", frame_to_markdown(pairs), ""]
    lines += ["## Definitions", ""] + [f"- **{k}**: {v}" for k, v in DEFINITIONS.items()]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def run_validation(cfg: ValidateScorerConfig) -> ValidationSummary:
    """Read the ratings, gather or compute the scores, write the tables and the report.

    Output in ``output_dir``: ``correlations.csv``, ``pairwise.csv`` (when images share prompts),
    ``images.parquet`` (ratings joined to every metric), ``report.md``, ``results.json``,
    ``config.yaml``; ``scores/`` is the scoring run of ``scorers`` (reused by a rerun)."""
    cfg.require_runnable()
    start = time.perf_counter()
    out = prepare_output_dir(cfg.output_dir, cfg)
    ratings = read_ratings(cfg)
    if ratings.skipped:
        logger.warning("validate-scorer: %s: skipped %s", ratings.source, _skip_text(ratings.skipped))
    images, metrics = gather_scores(cfg, ratings, out)
    boot = Bootstrap(cfg.bootstrap_samples, cfg.confidence, cfg.seed)
    corr = correlation_table(images, metrics, boot, cfg.engagement_log_base)
    pairs = pairwise_table(images, metrics, boot) if "group" in images and images.group.duplicated().any() else None
    kept = [c for c in ("image_id", "rating", "raters", "prompt", "group", "engagement", "path") if c in images]
    atomic_write_parquet(images[kept + list(metrics)], out / "images.parquet")
    corr.to_csv(out / "correlations.csv", index=False)
    if pairs is not None:
        pairs.to_csv(out / "pairwise.csv", index=False)
    write_report(out, cfg, ratings, corr, pairs)
    results = {
        "settings": asdict(cfg),
        "definitions": DEFINITIONS,
        "images": len(images),
        "skipped": {reason: len(rows) for reason, rows in ratings.skipped.items()},
        "correlations": corr.to_dict(orient="records"),
        "pairwise": None if pairs is None else pairs.to_dict(orient="records"),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float), encoding="utf-8")
    overall = corr[corr.subset == "all"].set_index("metric").spearman
    best = str(overall.idxmax()) if overall.notna().any() else metrics[0]
    return ValidationSummary(str(out), len(images), list(metrics), best, float(overall.get(best, math.nan)), time.perf_counter() - start)


__all__ = [
    "ValidateScorerConfig",
    "correlation_table",
    "correlations",
    "pairwise_agreement",
    "pairwise_table",
    "popularity_bucket",
    "read_ratings",
    "run_validation",
]
