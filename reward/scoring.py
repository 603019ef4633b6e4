"""The scoring run: every requested metric for every image of a manifest, in one streaming pass.

Rows are cut into parts of ``rows_per_part`` in manifest order; part ``k`` belongs to process
``k % world_size``. DataLoader workers open each image once and run every scorer's CPU
preprocessing; the main loop only runs batched forwards. A finished part has its
``scores/part-XXXXX.parquet`` (and ``errors/part-XXXXX.parquet``) and is never redone, so a crash
loses at most the part in flight. Unreadable images (missing, empty, truncated, not an image)
are recorded with their reason in the errors part, never dropped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import torch
from PIL import Image

from sr_finetune.config import require, to_yaml
from sr_finetune.errors import ConfigError, UserError
from sr_finetune.io import atomic_write_parquet, read_parts

from .base import RewardModel, load_reward, to_device

logger = logging.getLogger(__name__)

ERROR_COLUMNS = ["image_id", "path", "reason"]


@dataclass
class ScoreConfig:
    """Settings of the scoring stage (``score:`` in a recipe config)."""

    generations: Optional[str] = None  # folder written by `generate` (manifest.parquet)
    image_table: Optional[str] = None  # or a csv/parquet/json(l) table of existing images
    image_root: Optional[str] = None  # folder the table's paths are relative to (default: the table's folder)
    path_column: str = "path"
    prompt_column: str = "prompt"
    id_column: Optional[str] = None  # default: image_id if present, else the path
    metrics: list[str] = field(default_factory=lambda: ["social_reward"])
    weights: dict[str, str] = field(default_factory=dict)  # metric -> weights path / hub id
    options: dict[str, Any] = field(default_factory=dict)  # metric -> loader keyword arguments
    output_dir: str = "runs/scores"
    batch_size: int = 32
    num_workers: int = 2
    rows_per_part: int = 4096
    device: str = "auto"
    dtype: str = "fp32"

    def validate(self) -> None:
        for key in ("batch_size", "rows_per_part"):
            require(getattr(self, key) > 0, key, f"must be positive, got {getattr(self, key)}")
        require(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        require(len(self.metrics) > 0, "metrics", "name at least one metric")
        require(len(set(self.metrics)) == len(self.metrics), "metrics", f"repeated metric in {self.metrics}")
        require(
            "social_reward" not in self.metrics or bool(self.weights.get("social_reward")),
            "weights.social_reward",
            "social_reward needs the checkpoint of a Social Reward training run (no weights are published)",
        )
        unknown = set(self.weights) - set(self.metrics)
        require(not unknown, "weights", f"weights given for metrics not requested: {sorted(unknown)}")


def read_image_table(cfg: ScoreConfig) -> pd.DataFrame:
    """Rows ``image_id, prompt, path`` (absolute paths) from a generations folder or an image table."""
    if bool(cfg.generations) == bool(cfg.image_table):
        raise ConfigError("config error: set exactly one of score.generations and score.image_table")
    if cfg.generations:
        from sr_finetune.generation import read_manifest

        df = read_manifest(cfg.generations)
        return df[["image_id", "prompt", "path"]].reset_index(drop=True)
    table = Path(cfg.image_table)
    if not table.is_file():
        raise UserError(f"image table not found: {table}")
    suffix = table.suffix.lower()
    readers = {".csv": pd.read_csv, ".tsv": lambda p: pd.read_csv(p, sep="\t"), ".parquet": pd.read_parquet, ".jsonl": lambda p: pd.read_json(p, lines=True), ".json": pd.read_json}
    if suffix not in readers:
        raise UserError(f"{table}: unsupported image table type '{suffix}' (csv, tsv, parquet, json, jsonl)")
    df = readers[suffix](table)
    for column in (cfg.path_column, cfg.prompt_column):
        if column not in df.columns:
            raise UserError(f"{table}: no column '{column}' (columns: {', '.join(map(str, df.columns))})")
    root = Path(cfg.image_root) if cfg.image_root else table.parent
    id_column = cfg.id_column or ("image_id" if "image_id" in df.columns else cfg.path_column)
    out = pd.DataFrame(
        {
            "image_id": df[id_column].astype(str),
            "prompt": df[cfg.prompt_column].astype(str),
            "path": [str(p if Path(p).is_absolute() else root / p) for p in df[cfg.path_column].astype(str)],
        }
    )
    duplicated = out.image_id[out.image_id.duplicated()]
    if len(duplicated):
        raise UserError(f"{table}: image id '{duplicated.iloc[0]}' appears more than once (set score.id_column)")
    return out


class _ImageRows(torch.utils.data.Dataset):
    """Opens each image once and runs every scorer's CPU-side preprocessing (in DataLoader workers)."""

    def __init__(self, rows: pd.DataFrame, scorers: dict[str, RewardModel]):
        self.ids = rows.image_id.tolist()
        self.prompts = rows.prompt.tolist()
        self.paths = rows.path.tolist()
        self.scorers = scorers

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        try:
            with Image.open(self.paths[i]) as im:
                im.load()
                image = im.copy()
        except Exception as exc:  # missing, empty, truncated, not an image: record, never crash
            return {"i": i, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")}
        item = {"i": i, "pixels": {}, "text": {}}
        for name, scorer in self.scorers.items():
            item["pixels"][name] = scorer.preprocess_image(image)
            item["text"][name] = _first_row(scorer.tokenize([self.prompts[i]]))
        return item


def _first_row(tokens: Any) -> Any:
    if isinstance(tokens, dict):
        return {k: v[0] for k, v in tokens.items()}
    return tokens[0]


def _collate(items: list[dict]) -> dict:
    good = [it for it in items if "error" not in it]
    batch = {"bad": [(it["i"], it["error"]) for it in items if "error" in it], "i": [it["i"] for it in good]}
    if good:
        batch["pixels"] = {name: torch.stack([it["pixels"][name] for it in good]) for name in good[0]["pixels"]}
        batch["text"] = {name: torch.utils.data.default_collate([it["text"][name] for it in good]) for name in good[0]["text"]}
    return batch


def score_rows(rows: pd.DataFrame, scorers: dict[str, RewardModel], *, batch_size: int, num_workers: int, device: torch.device, progress=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score ``rows`` (image_id, prompt, path) with every scorer; returns (scores, errors)."""
    loader = torch.utils.data.DataLoader(_ImageRows(rows, scorers), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate, persistent_workers=False)
    results = {name: torch.full((len(rows),), float("nan"), dtype=torch.float64) for name in scorers}
    ok = torch.zeros(len(rows), dtype=torch.bool)
    errors = []
    with torch.inference_mode():
        for batch in loader:
            errors += [(rows.image_id.iloc[i], rows.path.iloc[i], reason) for i, reason in batch["bad"]]
            if batch["i"]:
                index = torch.tensor(batch["i"])
                for name, scorer in scorers.items():
                    dtype = next(scorer.parameters()).dtype
                    values = scorer.score(to_device(batch["pixels"][name], device, dtype), to_device(batch["text"][name], device))
                    results[name][index] = values.detach().double().cpu()
                ok[index] = True
            if progress is not None:
                progress.update(len(batch["i"]) + len(batch["bad"]))
    keep = ok.numpy()
    scores = pd.DataFrame({"image_id": rows.image_id.to_numpy()[keep], **{name: v.numpy()[keep] for name, v in results.items()}})
    return scores, pd.DataFrame(errors, columns=ERROR_COLUMNS)


def load_scorers(cfg: ScoreConfig, device: torch.device) -> dict[str, RewardModel]:
    return {name: load_reward(name, weights=cfg.weights.get(name), device=device, dtype=cfg.dtype, **cfg.options.get(name, {})) for name in cfg.metrics}


@dataclass
class ScoringSummary:
    output_dir: str
    images: int
    scored: int
    errors: dict[str, int]
    parts_total: int
    parts_made: int
    seconds: float

    def line(self) -> str:
        rate = self.scored / self.seconds if self.seconds > 0 and self.parts_made else 0.0
        bad = ", ".join(f"{n} {r}" for r, n in self.errors.items()) or "none"
        return f"score: {self.scored}/{self.images} images scored, errors: {bad}; {self.parts_made}/{self.parts_total} parts made ({rate:.1f} img/s) -> {self.output_dir}"


def _part_file(output_dir: Path, kind: str, part: int) -> Path:
    return output_dir / kind / f"part-{part:05d}.parquet"


def run_scoring(cfg: ScoreConfig) -> ScoringSummary:
    """Score this process's parts, then (main process) merge them into ``scores.parquet``."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from sr_finetune.distributed import warn_if_single_cpu_launch
    from sr_finetune.models import resolve_device

    rows = read_image_table(cfg)
    if rows.empty:
        raise UserError("nothing to score: the manifest has no rows")
    warn_if_single_cpu_launch()
    state = PartialState(cpu=cfg.device == "cpu")
    output_dir = Path(cfg.output_dir)
    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(to_yaml(cfg))
    n_parts = -(-len(rows) // cfg.rows_per_part)
    todo = [k for k in range(state.process_index, n_parts, state.num_processes) if not _part_file(output_dir, "scores", k).exists()]
    start = time.perf_counter()
    if todo:
        device = state.device if cfg.device == "auto" else resolve_device(cfg.device)
        scorers = load_scorers(cfg, device)
        start = time.perf_counter()  # throughput excludes model loading
        total = sum(len(rows.iloc[k * cfg.rows_per_part : (k + 1) * cfg.rows_per_part]) for k in todo)
        with tqdm(total=total, unit="img", desc=f"score [{state.process_index}/{state.num_processes}]", position=state.process_index) as bar:
            for k in todo:
                part_rows = rows.iloc[k * cfg.rows_per_part : (k + 1) * cfg.rows_per_part].reset_index(drop=True)
                scores, errors = score_rows(part_rows, scorers, batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=device, progress=bar)
                # errors first: a scores part is the "finished" marker
                atomic_write_parquet(errors, _part_file(output_dir, "errors", k))
                atomic_write_parquet(scores, _part_file(output_dir, "scores", k))
    seconds = time.perf_counter() - start
    state.wait_for_everyone()
    merged_scores, merged_errors = read_scores(output_dir), read_errors(output_dir)
    if state.is_main_process:
        atomic_write_parquet(rows.merge(merged_scores, on="image_id", how="inner"), output_dir / "scores.parquet")
        atomic_write_parquet(merged_errors, output_dir / "errors.parquet")
    reasons = merged_errors.reason.str.split(":").str[0].value_counts().to_dict() if len(merged_errors) else {}
    if reasons and state.is_main_process:
        logger.warning("score: %d unreadable images (see %s): %s", len(merged_errors), output_dir / "errors.parquet", reasons)
    return ScoringSummary(str(output_dir), len(rows), len(merged_scores), reasons, n_parts, len(todo), seconds)


def read_scores(output_dir: str | Path) -> pd.DataFrame:
    """All score parts of a scoring folder: ``image_id`` + one column per metric."""
    return read_parts(Path(output_dir) / "scores")


def read_errors(output_dir: str | Path) -> pd.DataFrame:
    """All error parts of a scoring folder: ``image_id, path, reason``."""
    return read_parts(Path(output_dir) / "errors")
