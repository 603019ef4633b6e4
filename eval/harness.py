"""The evaluation run: every model generates every prompt set with the same seeds, every image is
scored with every metric, then the paired statistics, tables and the report are written.

Layout of ``output_dir``::

    generations/<model>/<prompt set>/          the generation stage's folder (resumable)
    images/<model>/<prompt set>.parquet        a model given as existing images: its images matched to the set
    scores/<model>/<prompt set>/<metric>/      one scoring-stage folder per metric (resumable)
    scores.parquet                             one row per image, one column per metric
    tables/means.csv, tables/win_rates.csv     the two tables, long form
    tables/gaps.csv                            existing-images models: image slots found, missing, extra
    results.json                               settings, definitions and both tables
    report.md, report.html                     the report (the HTML is self-contained)
    figures/means.png, figures/win_rates.png   the plots, for the Markdown report

Every image is generated first; scoring then runs metric by metric (each scorer loaded once for
all models and prompt sets) into a folder per metric, so that adding a metric later scores only
that metric. A model given as existing images (``images:``, see ``eval/existing_images.py``) is
not generated: its images are matched to each prompt set by prompt and image index, then scored
like the others; what it lacks is a counted gap (log, summary, ``tables/gaps.csv``, report).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from reward.scoring import ScoreConfig, check_scoring_settings, load_scorers, read_scores, run_scoring
from sr_finetune.config import to_yaml
from sr_finetune.errors import UserError
from sr_finetune.generation import read_manifest, run_generation
from sr_finetune.io import atomic_write_parquet
from sr_finetune.progress import progress, quiet_library_bars

from .config import EvaluateConfig
from .existing_images import Matched, match_existing_models
from .stats import DEFINITIONS, Bootstrap, mean_table, win_table

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ["model", "prompt_set", "image_id", "prompt_id", "prompt", "index", "seed", "negative_prompt", "path"]


@dataclass
class EvaluationSummary:
    output_dir: str
    models: int
    prompt_sets: int
    metrics: int
    images_made: int
    images_total: int
    report: str
    seconds: float
    existing_found: int = 0  # images of the models given as existing images, matched to a prompt set's slot
    existing_missing: int = 0  # their slots without an image (gaps)

    def line(self) -> str:
        existing = ""
        if self.existing_found or self.existing_missing:
            existing = f"; existing images: {self.existing_found} matched, {self.existing_missing} missing (gaps: tables/gaps.csv)"
        return (
            f"evaluate: {self.models} models x {self.prompt_sets} prompt sets x {self.metrics} metrics; "
            f"images: {self.images_made} generated now, {self.images_total} in all{existing}; report -> {self.report}"
        )


class ScorersByMetric:
    """``run_scoring``'s ``load`` for a whole evaluation: each metric's scorer is loaded once for
    every model and prompt set (and only if some image still needs it), and only one metric's
    scorer is held at a time."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.scorers: dict = {}

    def __call__(self, cfg: ScoreConfig, device: Any) -> dict:
        key = (tuple(cfg.metrics), json.dumps([cfg.weights, cfg.options], sort_keys=True, default=str), str(device), cfg.dtype)
        if key != self.key:
            self.scorers = {}  # the previous metric's scorer goes before the next one loads
            self.scorers, self.key = load_scorers(cfg, device), key
        return self.scorers


def _found(grid: pd.DataFrame) -> pd.DataFrame:
    return grid[grid.path.notna()]


def generate_and_score(cfg: EvaluateConfig, matched: Matched) -> tuple[int, int]:
    """Run (or resume) the generation stage for every generated model x prompt set, then the
    scoring stage metric by metric (each scorer loaded once, see :class:`ScorersByMetric`) for
    every model, those given as existing images (``matched``) included.

    Returns (images made by this process, images generated in all)."""
    from accelerate import PartialState

    state = PartialState(cpu=cfg.device == "cpu")
    runs = [(model, spec, prompt_set) for model, spec in cfg.models().items() for prompt_set in cfg.prompt_sets]
    generated = [run for run in runs if run[1].generated]
    if state.is_main_process:
        for (model, prompt_set), grid in matched.grids.items():
            atomic_write_parquet(_found(grid), cfg.existing_images_file(model, prompt_set))
    made = total = 0
    scorers = ScorersByMetric()
    with progress(total=len(generated) + len(runs) * len(cfg.metrics), desc="evaluate", unit="stage", disable=not state.is_main_process) as bar:
        for model, spec, prompt_set in generated:
            bar.set_postfix_str(f"generate {model}/{prompt_set}")
            summary = run_generation(cfg.generate_config(model, spec, prompt_set))
            logger.info(summary.line())
            made += summary.images_made
            total += summary.prompts * cfg.images_per_prompt
            bar.update()
        for metric in cfg.metrics:
            for model, spec, prompt_set in runs:
                bar.set_postfix_str(f"score {metric} {model}/{prompt_set}")
                score_cfg = cfg.score_config(model, prompt_set, metric)
                settings = {"metric": metric, "weights": score_cfg.weights.get(metric), "options": score_cfg.options.get(metric, {}), "dtype": score_cfg.dtype}
                if not spec.generated:
                    found = _found(matched.grids[(model, prompt_set)])
                    if found.empty:  # nothing of this model in this prompt set: all gaps
                        bar.update()
                        continue
                    # the scores of a changed table would mix with the old ones: refuse, as for changed weights
                    settings["matched_images"] = hashlib.sha256(found[["image_id", "path"]].to_csv(index=False).encode()).hexdigest()[:16]
                check_scoring_settings(Path(score_cfg.output_dir) / "evaluation.json", settings, state.is_main_process)
                state.wait_for_everyone()
                logger.info(run_scoring(score_cfg, load=scorers).line())
                bar.update()
    return made, total


def collect_scores(cfg: EvaluateConfig, matched: Matched) -> pd.DataFrame:
    """One row per image slot of every model and prompt set, one column per metric (NaN = unscored,
    or no image: ``path`` missing, for a model given as existing images).

    ``path`` is relative to ``output_dir``. Raises if a generated model's seeds differ from the baseline's."""
    root = Path(cfg.output_dir).resolve()
    frames = []
    for model, spec in cfg.models().items():
        for prompt_set in cfg.prompt_sets:
            images = read_manifest(cfg.generations_dir(model, prompt_set)) if spec.generated else matched.grids[(model, prompt_set)]
            paths = [None if pd.isna(p) else os.path.relpath(p, root) for p in images.path]
            frame = images.assign(model=model, prompt_set=prompt_set, path=paths)[IMAGE_COLUMNS]
            for metric in cfg.metrics:
                if spec.generated or not _found(images).empty:
                    scores = read_scores(cfg.scores_dir(model, prompt_set, metric))[["image_id", metric]]
                    frame = frame.merge(scores, on="image_id", how="left", validate="one_to_one")
                else:
                    frame[metric] = float("nan")
            frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    _check_paired(table, cfg.baseline_name, unseeded=[name for name, spec in cfg.models().items() if not spec.generated])
    return table


def _check_paired(table: pd.DataFrame, baseline: str, unseeded: Sequence[str] = ()) -> None:
    """Every model has the baseline's image slots, and (both generated here) the same seeds."""
    keys = ["prompt_set", "prompt_id", "index"]
    base = table.loc[table.model == baseline, keys + ["seed"]]
    for model, frame in table[table.model != baseline].groupby("model", sort=False):
        joined = frame[keys + ["seed"]].merge(base, on=keys, how="outer", suffixes=("", "_base"), indicator=True)
        bad = joined._merge != "both"
        if model not in unseeded and baseline not in unseeded:
            bad |= joined.seed != joined.seed_base
        bad = joined[bad]
        if len(bad):
            first = bad.iloc[0]
            raise UserError(f"{model}: image {first['index']} of prompt {first.prompt_id!r} ({first.prompt_set}) has no same-seed baseline image; were the generations made with other prompts or seed?")


def compute_tables(cfg: EvaluateConfig, scores: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(means, win-rates) of a scores table, as ``eval.stats`` defines them."""
    boot = Bootstrap(samples=cfg.bootstrap_samples, confidence=cfg.confidence, seed=cfg.bootstrap_seed)
    means = mean_table(scores, cfg.metrics, boot)
    wins = win_table(scores, cfg.baseline_name, list(cfg.finetuned), cfg.metrics, boot)
    return means, wins


def _records(frame: pd.DataFrame) -> list[dict]:
    """Rows as JSON-ready dicts at full float precision, NaN as null."""
    return frame.astype(object).where(frame.notna(), None).to_dict(orient="records")


def write_results(cfg: EvaluateConfig, scores: pd.DataFrame, means: pd.DataFrame, wins: pd.DataFrame, matched: Matched) -> dict[str, Path]:
    """scores.parquet, tables/*.csv and results.json under ``output_dir``."""
    root = Path(cfg.output_dir)
    paths = {"scores": root / "scores.parquet", "means": root / "tables" / "means.csv", "win_rates": root / "tables" / "win_rates.csv", "json": root / "results.json"}
    atomic_write_parquet(scores, paths["scores"])
    paths["means"].parent.mkdir(parents=True, exist_ok=True)
    means.to_csv(paths["means"], index=False)
    wins.to_csv(paths["win_rates"], index=False)
    if matched.sources:
        paths["gaps"] = root / "tables" / "gaps.csv"
        matched.gaps.to_csv(paths["gaps"], index=False)
    results = {
        "baseline": cfg.baseline_name,
        "models": {name: asdict(spec) for name, spec in cfg.models().items()},
        "prompt_sets": {name: {**asdict(spec), "prompts_used": int(scores.loc[scores.prompt_set == name, "prompt_id"].nunique())} for name, spec in cfg.prompt_sets.items()},
        "metrics": list(cfg.metrics),
        "images_per_prompt": cfg.images_per_prompt,
        "definitions": DEFINITIONS,
        "bootstrap": {"samples": cfg.bootstrap_samples, "confidence": cfg.confidence, "seed": cfg.bootstrap_seed, "resampled": "prompts"},
        "means": _records(means),
        "win_rates": _records(wins),
        "existing_images": matched.sources,
        "gaps": _records(matched.gaps),
    }
    paths["json"].write_text(json.dumps(results, indent=2))
    return paths


@quiet_library_bars()
def run_evaluation(cfg: EvaluateConfig) -> EvaluationSummary:
    """Generate, score, tabulate and report; rerunning reuses every finished generation and score."""
    from accelerate import PartialState

    from .report import write_report

    cfg.require_runnable()
    start = time.perf_counter()
    matched = match_existing_models(cfg)
    made, total = generate_and_score(cfg, matched)
    state = PartialState(cpu=cfg.device == "cpu")
    report = Path(cfg.output_dir) / "report.html"
    if state.is_main_process:
        (Path(cfg.output_dir) / "config.yaml").write_text(to_yaml(cfg))
        scores = collect_scores(cfg, matched)
        means, wins = compute_tables(cfg, scores)
        write_results(cfg, scores, means, wins, matched)
        report = write_report(cfg, scores, means, wins, matched)
    state.wait_for_everyone()
    found = int(matched.gaps.images_found.sum()) if len(matched.gaps) else 0
    return EvaluationSummary(cfg.output_dir, len(cfg.models()), len(cfg.prompt_sets), len(cfg.metrics), made, total, str(report), time.perf_counter() - start,
                             existing_found=found, existing_missing=matched.missing_images)
