"""The evaluation run: every model generates every prompt set with the same seeds, every image is
scored with every metric, then the paired statistics, tables and the report are written.

Layout of ``output_dir``::

    generations/<model>/<prompt set>/          the generation stage's folder (resumable)
    scores/<model>/<prompt set>/<metric>/      one scoring-stage folder per metric (resumable)
    scores.parquet                             one row per image, one column per metric
    tables/means.csv, tables/win_rates.csv     the two tables, long form
    results.json                               settings, definitions and both tables
    report.md, report.html                     the report (the HTML is self-contained)
    figures/means.png, figures/win_rates.png   the plots, for the Markdown report

Every image is generated first; scoring then runs metric by metric (each scorer loaded once for
all models and prompt sets) into a folder per metric, so that adding a metric later scores only
that metric.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from reward.scoring import ScoreConfig, check_scoring_settings, load_scorers, read_scores, run_scoring
from sr_finetune.config import to_yaml
from sr_finetune.errors import UserError
from sr_finetune.generation import read_manifest, run_generation
from sr_finetune.io import atomic_write_parquet

from .config import EvaluateConfig
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

    def line(self) -> str:
        return (
            f"evaluate: {self.models} models x {self.prompt_sets} prompt sets x {self.metrics} metrics; "
            f"images: {self.images_made} generated now, {self.images_total} in all; report -> {self.report}"
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


def generate_and_score(cfg: EvaluateConfig) -> tuple[int, int]:
    """Run (or resume) the generation stage for every model x prompt set, then the scoring stage
    metric by metric (each scorer loaded once, see :class:`ScorersByMetric`).

    Returns (images made by this process, images in all)."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    state = PartialState(cpu=cfg.device == "cpu")
    runs = [(model, spec, prompt_set) for model, spec in cfg.models().items() for prompt_set in cfg.prompt_sets]
    made = total = 0
    scorers = ScorersByMetric()
    with tqdm(total=len(runs) * (1 + len(cfg.metrics)), desc="evaluate", unit="stage", position=1, disable=not state.is_main_process) as bar:
        for model, spec, prompt_set in runs:
            bar.set_postfix_str(f"generate {model}/{prompt_set}")
            summary = run_generation(cfg.generate_config(model, spec, prompt_set))
            logger.info(summary.line())
            made += summary.images_made
            total += summary.prompts * cfg.images_per_prompt
            bar.update()
        for metric in cfg.metrics:
            for model, _, prompt_set in runs:
                bar.set_postfix_str(f"score {metric} {model}/{prompt_set}")
                score_cfg = cfg.score_config(model, prompt_set, metric)
                settings = {"metric": metric, "weights": score_cfg.weights.get(metric), "options": score_cfg.options.get(metric, {}), "dtype": score_cfg.dtype}
                check_scoring_settings(Path(score_cfg.output_dir) / "evaluation.json", settings, state.is_main_process)
                state.wait_for_everyone()
                logger.info(run_scoring(score_cfg, load=scorers).line())
                bar.update()
    return made, total


def collect_scores(cfg: EvaluateConfig) -> pd.DataFrame:
    """One row per generated image of every model and prompt set, one column per metric (NaN = unscored).

    ``path`` is relative to ``output_dir``. Raises if a model's seeds differ from the baseline's."""
    root = Path(cfg.output_dir).resolve()
    frames = []
    for model in cfg.models():
        for prompt_set in cfg.prompt_sets:
            manifest = read_manifest(cfg.generations_dir(model, prompt_set))
            frame = manifest.assign(model=model, prompt_set=prompt_set, path=[str(Path(p).relative_to(root)) for p in manifest.path])
            frame = frame[IMAGE_COLUMNS]
            for metric in cfg.metrics:
                scores = read_scores(cfg.scores_dir(model, prompt_set, metric))[["image_id", metric]]
                frame = frame.merge(scores, on="image_id", how="left", validate="one_to_one")
            frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    _check_paired(table, cfg.baseline_name)
    return table


def _check_paired(table: pd.DataFrame, baseline: str) -> None:
    keys = ["prompt_set", "prompt_id", "index"]
    base = table.loc[table.model == baseline, keys + ["seed"]]
    for model, frame in table[table.model != baseline].groupby("model", sort=False):
        joined = frame[keys + ["seed"]].merge(base, on=keys, how="outer", suffixes=("", "_base"), indicator=True)
        bad = joined[(joined._merge != "both") | (joined.seed != joined.seed_base)]
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


def write_results(cfg: EvaluateConfig, scores: pd.DataFrame, means: pd.DataFrame, wins: pd.DataFrame) -> dict[str, Path]:
    """scores.parquet, tables/*.csv and results.json under ``output_dir``."""
    root = Path(cfg.output_dir)
    paths = {"scores": root / "scores.parquet", "means": root / "tables" / "means.csv", "win_rates": root / "tables" / "win_rates.csv", "json": root / "results.json"}
    atomic_write_parquet(scores, paths["scores"])
    paths["means"].parent.mkdir(parents=True, exist_ok=True)
    means.to_csv(paths["means"], index=False)
    wins.to_csv(paths["win_rates"], index=False)
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
    }
    paths["json"].write_text(json.dumps(results, indent=2))
    return paths


def run_evaluation(cfg: EvaluateConfig) -> EvaluationSummary:
    """Generate, score, tabulate and report; rerunning reuses every finished generation and score."""
    from accelerate import PartialState

    from .report import write_report

    cfg.require_runnable()
    start = time.perf_counter()
    made, total = generate_and_score(cfg)
    state = PartialState(cpu=cfg.device == "cpu")
    report = Path(cfg.output_dir) / "report.html"
    if state.is_main_process:
        (Path(cfg.output_dir) / "config.yaml").write_text(to_yaml(cfg))
        scores = collect_scores(cfg)
        means, wins = compute_tables(cfg, scores)
        write_results(cfg, scores, means, wins)
        report = write_report(cfg, scores, means, wins)
    state.wait_for_everyone()
    return EvaluationSummary(cfg.output_dir, len(cfg.models()), len(cfg.prompt_sets), len(cfg.metrics), made, total, str(report), time.perf_counter() - start)
