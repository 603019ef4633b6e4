"""Models given as images that already exist (another team's model, an API, last month's run)
instead of a pipeline: ``images:`` is an image table (csv/tsv/parquet/json/jsonl with prompt and
path columns, optionally an image index and a prompt id) or a generations folder (what
``sr-finetune generate`` writes: ``manifest.parquet``).

Each prompt set asks every model for images ``0 .. images_per_prompt - 1`` of each of its
prompts. A table's rows are matched to a prompt set's prompts by prompt text (or, with
``prompt_id_column``, by prompt id), and to image slots by the index column (``index_column``,
default ``index`` when the table has one) or else by the order of a prompt's rows. What cannot be
matched is a counted gap, never an error: prompts with no image, image slots with no image,
images beyond ``images_per_prompt`` (left out), rows whose prompt is in no prompt set, and rows
without a prompt, path or index.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from sr_finetune.errors import UserError
from sr_finetune.generation import read_manifest
from sr_finetune.io import read_table

from .config import EvaluateConfig, ModelSpec

logger = logging.getLogger(__name__)

GAP_COLUMNS = ["model", "prompt_set", "prompts", "images_expected", "images_found", "missing_prompts", "missing_images", "extra_images"]
GRID_COLUMNS = ["image_id", "prompt_id", "prompt", "index", "seed", "negative_prompt", "path"]


@dataclass
class ExistingImages:
    """One model's images as read: one row per usable table row, plus what the table held."""

    source: str
    rows: pd.DataFrame  # key, index, path (absolute), seed (Int64), negative_prompt, row (number in the table)
    table_rows: int
    unusable: dict[str, int] = field(default_factory=dict)  # reason -> rows


def _id_key(value: object) -> str:
    """A prompt id as text, equal for ``42``, ``"42"`` and ``"000042"`` (tables lose leading zeros)."""
    text = str(value).strip()
    return str(int(text)) if text.isdigit() else text


def _column(df: pd.DataFrame, name: str, source: str) -> pd.Series:
    if name not in df.columns:
        raise UserError(f"{source}: no column '{name}' (columns: {', '.join(map(str, df.columns))})")
    return df[name]


def _present(values: pd.Series) -> pd.Series:
    """Cells that hold something: not NaN/None and not blank text."""
    return values.notna() & (values.astype(str).str.strip() != "")


def read_existing_images(spec: ModelSpec) -> ExistingImages:
    """The rows of a model's image table or generations folder that have a prompt (or id), a path and an index."""
    source = Path(spec.images)
    if source.is_dir():
        if not (source / "manifest.parquet").exists() and not (source / "manifest").is_dir():
            raise UserError(f"{source}: a folder without manifest.parquet (expected a generations folder or an image table file)")
        df, root = read_manifest(source), source  # paths already absolute
    else:
        df, root = read_table(source, csv_as_text=True), Path(spec.image_root) if spec.image_root else source.parent
    name = str(source)
    key = _column(df, spec.prompt_id_column or spec.prompt_column, name)
    path = _column(df, spec.path_column, name)
    index_column = spec.index_column or ("index" if "index" in df.columns else None)
    index = _column(df, index_column, name) if index_column else None
    checks = {"no prompt id" if spec.prompt_id_column else "no prompt": _present(key), "no path": _present(path)}
    if index is not None:
        checks["no image index"] = _present(index)
    unusable, usable = {}, pd.Series(True, index=df.index)
    for reason, ok in checks.items():
        if (usable & ~ok).any():
            unusable[reason] = int((usable & ~ok).sum())
        usable = usable & ok
    n = int(usable.sum())
    rows = pd.DataFrame({
        "key": [_id_key(v) if spec.prompt_id_column else str(v).strip() for v in key[usable]],
        "path": [str(p if Path(p).is_absolute() else root / p) for p in path[usable].astype(str).str.strip()],
        "seed": pd.to_numeric(df["seed"][usable], errors="coerce").astype("Int64").array if "seed" in df.columns else pd.array([pd.NA] * n, dtype="Int64"),
        "negative_prompt": df["negative_prompt"][usable].tolist() if "negative_prompt" in df.columns else [None] * n,
        "row": df.index[usable].to_numpy(),
    })
    if index is None:
        rows["index"] = rows.groupby("key", sort=False).cumcount()
    else:
        numbers = pd.to_numeric(index[usable], errors="coerce")
        bad = numbers.isna() | (numbers < 0) | (numbers % 1 != 0)
        if bad.any():
            row = int(df.index[usable][bad.to_numpy()][0])
            raise UserError(f"{name}: row {row}: image index {index[row]!r} in column '{index_column}' is not a whole number >= 0")
        rows["index"] = numbers.astype("int64").to_numpy()
    twice = rows[rows.duplicated(["key", "index"], keep=False)]
    if len(twice):
        first = twice.iloc[0]
        again = twice[(twice.key == first.key) & (twice["index"] == first["index"])].row.tolist()
        raise UserError(f"{name}: rows {again[0]} and {again[1]} are both image {first['index']} of prompt {first.key!r}; give each image its own index")
    return ExistingImages(name, rows, len(df), unusable)


def match_to_prompt_set(images: ExistingImages, prompt_ids: list[str], prompts: list[str], images_per_prompt: int, by_id: bool) -> tuple[pd.DataFrame, dict]:
    """The image slots of a prompt set filled from ``images``: one row per prompt x index (``path``
    missing where the model has no image), and the counts of what did not fit."""
    keys = [_id_key(i) for i in prompt_ids] if by_id else prompts
    grid = pd.DataFrame({"key": [k for k in keys for _ in range(images_per_prompt)], "prompt_id": [i for i in prompt_ids for _ in range(images_per_prompt)],
                         "prompt": [p for p in prompts for _ in range(images_per_prompt)], "index": list(range(images_per_prompt)) * len(prompts)})
    in_set = images.rows[images.rows.key.isin(set(keys))]
    grid = grid.merge(in_set.drop(columns="row"), on=["key", "index"], how="left", validate="one_to_one")
    grid["image_id"] = [f"{p}/{k}" for p, k in zip(grid.prompt_id, grid["index"])]
    found = grid.path.notna()
    counts = {
        "prompts": len(prompts), "images_expected": len(grid), "images_found": int(found.sum()),
        "missing_prompts": int((~found).groupby(grid.prompt_id).all().sum()), "missing_images": int((~found).sum()),
        "extra_images": int((in_set["index"] >= images_per_prompt).sum()),
    }
    return grid[GRID_COLUMNS], counts


@dataclass
class Matched:
    """Every existing-images model matched to every prompt set."""

    grids: dict[tuple[str, str], pd.DataFrame]  # (model, prompt set) -> image slots, path missing for a gap
    gaps: pd.DataFrame  # GAP_COLUMNS, one row per model x prompt set
    sources: dict[str, dict]  # model -> source, table rows, rows in no prompt set, unusable rows by reason

    @property
    def missing_images(self) -> int:
        return int(self.gaps.missing_images.sum()) if len(self.gaps) else 0


def match_existing_models(cfg: EvaluateConfig) -> Matched:
    """Read and match every model given as ``images``; log each gap."""
    from sr_finetune.prompts import load_prompts

    grids, gaps, sources = {}, [], {}
    existing = {name: spec for name, spec in cfg.models().items() if not spec.generated}
    prompt_sets = {}
    for name in cfg.prompt_sets if existing else ():
        gen = cfg.generate_config(cfg.baseline_name, cfg.baseline, name)  # the prompts, exactly as the generate stage reads them
        prompt_sets[name] = load_prompts(gen.prompts, column=gen.prompt_column, id_column=gen.id_column, split=gen.split, dedupe=gen.dedupe_prompts, limit=gen.max_prompts)
    for model, spec in existing.items():
        images = read_existing_images(spec)
        matched_keys: set[str] = set()
        for name, prompt_set in prompt_sets.items():
            grid, counts = match_to_prompt_set(images, prompt_set.ids, prompt_set.prompts, cfg.images_per_prompt, by_id=bool(spec.prompt_id_column))
            grids[(model, name)] = grid
            gaps.append({"model": model, "prompt_set": name, **counts})
            matched_keys |= set(_id_key(i) for i in prompt_set.ids) if spec.prompt_id_column else set(prompt_set.prompts)
            if counts["missing_images"] or counts["extra_images"]:
                logger.warning("evaluate: %s on %s: %d of %d images found (%d prompts without images, %d image slots empty); %d extra images beyond %d per prompt left out",
                               model, name, counts["images_found"], counts["images_expected"], counts["missing_prompts"], counts["missing_images"],
                               counts["extra_images"], cfg.images_per_prompt)
        unmatched = int((~images.rows.key.isin(matched_keys)).sum())
        sources[model] = {"images": images.source, "table_rows": images.table_rows, "rows_in_no_prompt_set": unmatched, "unusable_rows": images.unusable}
        if unmatched or images.unusable:
            logger.warning("evaluate: %s: %d of %d rows of %s left out: %d with a prompt in no prompt set%s", model, unmatched + sum(images.unusable.values()),
                           images.table_rows, images.source, unmatched, "".join(f", {n} with {reason}" for reason, n in images.unusable.items()))
    return Matched(grids, pd.DataFrame(gaps, columns=GAP_COLUMNS), sources)
