"""Regularisation sets (LAION-style image-caption pairs) that the pair builder mixes in.

Four sources, one result: a :class:`RegularizationSet` whose rows only *locate* each image
(a file path, a tar member's byte range, a parquet row or a hub row), so that a 625k-image set
can be indexed and sampled without reading any image; :func:`image_values` then loads the
images of the sampled rows, a chunk at a time.

- ``imagefolder``: a folder as Hugging Face ``imagefolder`` reads it (``metadata.jsonl`` or
  ``metadata.csv`` with ``file_name`` + a caption column, possibly in sub-folders), or image
  files with a same-stem ``.txt`` caption beside them.
- ``parquet``: a parquet file (or a folder of them) with an image column (path relative to the
  file, raw bytes, or the ``{bytes, path}`` struct of a `datasets` Image) and a caption column.
- ``webdataset``: a folder of ``*.tar`` shards as img2dataset writes them (``000000000.jpg`` +
  ``.txt`` (+ ``.json``) per sample), or a single tar.
- ``hub``: a `datasets` hub id with an Image column and a caption column.

Rows without a usable caption or image are skipped and counted by reason, and logged with where
they are (``metadata.jsonl:3`` = data row 3 of that file, from 0), never dropped silently.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import pandas as pd

from .errors import UserError
from .tables import blank_cells, describe_skipped, read_csv_as_text, text_cells

logger = logging.getLogger(__name__)

REGULARIZATION_FORMATS = ("auto", "imagefolder", "parquet", "webdataset", "hub")
CAPTION_COLUMNS = ("caption", "text", "TEXT", "prompt", "Prompt")
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "image_path", "path", "file_name", "filepath")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Row locators: `kind` says which of the other columns find the image.
ROW_COLUMNS = ["key", "text", "kind", "path", "offset", "size", "row"]


class RegularizationError(UserError):
    """A regularisation source that cannot be used."""


@dataclass
class RegularizationSet:
    """Located (not yet loaded) image-caption rows of one source, and what was skipped and why."""

    source: str
    format: str
    rows: pd.DataFrame  # ROW_COLUMNS, in a stable order (sorted by key within each file)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    skipped_rows: dict[str, list[str]] = field(default_factory=dict)  # reason -> where ("file:row", tar member, hub row)
    image_column: Optional[str] = None  # parquet / hub: the column holding the image
    dataset: Any = None  # hub: the loaded `datasets.Dataset` (images not decoded)

    def __len__(self) -> int:
        return len(self.rows)


def _rows(records: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame.from_records(records, columns=ROW_COLUMNS)
    for col in ("offset", "size", "row"):
        df[col] = df[col].astype("Int64")
    return df


def _caption_ok(text: Any) -> bool:
    return isinstance(text, str) and text.strip() != ""


def _skip(skips: dict[str, list[str]], reason: str, where: Iterable[str]) -> None:
    skips.setdefault(reason, []).extend(where)


def _rows_of(file_name: str, mask: np.ndarray) -> list[str]:
    """``"file:row"`` of the rows where ``mask`` is set."""
    return [f"{file_name}:{row}" for row in np.flatnonzero(mask)]


def _with_skips(reg: RegularizationSet, skips: dict[str, list[str]]) -> RegularizationSet:
    reg.skipped_rows = {reason: rows for reason, rows in skips.items() if rows}
    reg.skipped = {reason: len(rows) for reason, rows in reg.skipped_rows.items()}
    return reg


def _pick(columns: Iterable[str], wanted: Optional[str], candidates: tuple[str, ...], source: str, what: str) -> str:
    columns = list(columns)
    if wanted is not None:
        if wanted not in columns:
            raise RegularizationError(f"{source}: no {what} column '{wanted}' (columns: {', '.join(map(str, columns))})")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise RegularizationError(f"{source}: no {what} column found (looked for {', '.join(candidates)}; columns: {', '.join(map(str, columns))}); set regularization_{what}_column")


def detect_format(source: str) -> str:
    """The format of a source: by what the path holds, or ``hub`` for a non-existent ``owner/name``."""
    path = Path(source)
    if path.is_file():
        if path.suffix == ".tar":
            return "webdataset"
        if path.suffix == ".parquet":
            return "parquet"
        raise RegularizationError(f"{source}: cannot tell the regularisation format of a '{path.suffix}' file (use a .parquet, a .tar, or a folder)")
    if path.is_dir():
        if any(path.glob("*.tar")):
            return "webdataset"  # img2dataset also writes NNNNN.parquet metadata beside its tars
        has_images = any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*"))
        has_metadata = any(path.rglob("metadata.jsonl")) or any(path.rglob("metadata.csv"))
        if not has_images and not has_metadata and any(path.glob("*.parquet")):
            return "parquet"
        return "imagefolder"
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return "hub"
    raise RegularizationError(f"regularisation source not found: {source}")


def read_imagefolder(folder: str | os.PathLike, caption_column: Optional[str] = None, check_files: bool = True) -> RegularizationSet:
    """An imagefolder: ``metadata.jsonl``/``metadata.csv`` files, else images with same-stem ``.txt`` captions."""
    folder = Path(folder)
    skips: dict[str, list[str]] = {}
    records: list[dict] = []
    metadata = sorted([*folder.rglob("metadata.jsonl"), *folder.rglob("metadata.csv")])
    for meta in metadata:
        if meta.suffix == ".csv":
            table = read_csv_as_text(meta)
        else:
            with meta.open(encoding="utf-8") as f:
                table = pd.DataFrame([json.loads(line) for line in f if line.strip()])
        if "file_name" not in table.columns:
            raise RegularizationError(f"{meta}: no 'file_name' column (columns: {', '.join(map(str, table.columns))})")
        caption = _pick(table.columns, caption_column, CAPTION_COLUMNS, str(meta), "caption")
        file_names = text_cells(table["file_name"])
        no_file_name = blank_cells(file_names)
        where = os.path.relpath(meta, folder)
        for row, (file_name, text) in enumerate(zip(file_names, table[caption])):
            path = Path(os.path.abspath(meta.parent / file_name))  # abspath, not resolve: keep symlinked folders
            if not _caption_ok(text):
                _skip(skips, "empty_caption", [f"{where}:{row}"])
            elif no_file_name[row]:
                _skip(skips, "no_image", [f"{where}:{row}"])
            elif check_files and not path.is_file():
                _skip(skips, "missing_file", [f"{where}:{row}"])
            else:
                records.append({"key": os.path.relpath(path, folder), "text": text, "kind": "file", "path": str(path)})
    if not metadata:
        for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            caption_file = image.with_suffix(".txt")
            text = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else None
            if text is None:
                _skip(skips, "no_caption", [str(image.relative_to(folder))])
            elif not _caption_ok(text):
                _skip(skips, "empty_caption", [str(image.relative_to(folder))])
            else:
                records.append({"key": str(image.relative_to(folder)), "text": text, "kind": "file", "path": os.path.abspath(image)})
    return _with_skips(RegularizationSet(str(folder), "imagefolder", _rows(records)), skips)


def read_parquet_pairs(source: str | os.PathLike, caption_column: Optional[str] = None, image_column: Optional[str] = None, check_files: bool = True) -> RegularizationSet:
    """A parquet file or folder of them: an image column (path, bytes or Image struct) + a caption column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = Path(source)
    files = sorted(source.glob("*.parquet")) if source.is_dir() else [source]
    if not files:
        raise RegularizationError(f"{source}: no .parquet files")
    skips: dict[str, list[str]] = {}
    frames = []
    image_col = None
    for file in files:
        schema = pq.read_schema(file)
        caption = _pick(schema.names, caption_column, CAPTION_COLUMNS, str(file), "caption")
        image_col = _pick(schema.names, image_column, IMAGE_COLUMNS, str(file), "image")
        kind_type = schema.field(image_col).type
        if pa.types.is_string(kind_type) or pa.types.is_large_string(kind_type):
            table = pq.read_table(file, columns=[caption, image_col]).to_pandas()
            paths = text_cells(table[image_col])
            has_image = pd.Series(~blank_cells(paths))
            resolved = [None if not p.strip() else p if os.path.isabs(p) else os.path.abspath(file.parent / p) for p in paths]
            df = pd.DataFrame({"key": [f"{file.name}/{i}" for i in range(len(table))], "text": table[caption], "kind": "file", "path": resolved, "row": np.arange(len(table))})
        else:  # bytes or {bytes, path} struct: located by row, read after sampling
            table = pq.read_table(file, columns=[caption]).to_pandas()
            has_image = pd.Series(pq.read_table(file, columns=[image_col]).column(0).is_valid().to_numpy(zero_copy_only=False))
            df = pd.DataFrame({"key": [f"{file.name}/{i}" for i in range(len(table))], "text": table[caption], "kind": "parquet", "path": os.path.abspath(file), "row": np.arange(len(table))})
        good_text = df["text"].map(_caption_ok).to_numpy(dtype=bool)
        has_image = has_image.to_numpy(dtype=bool)
        _skip(skips, "empty_caption", _rows_of(file.name, ~good_text))
        _skip(skips, "no_image", _rows_of(file.name, good_text & ~has_image))
        keep = good_text & has_image
        if check_files and (df["kind"] == "file").all():
            exists = np.fromiter((os.path.isfile(p) if k else True for p, k in zip(df["path"], keep)), dtype=bool, count=len(df))
            _skip(skips, "missing_file", _rows_of(file.name, keep & ~exists))
            keep &= exists
        frames.append(df[keep])
    rows = pd.concat(frames, ignore_index=True).reindex(columns=ROW_COLUMNS)
    rows = _rows(rows.to_dict("records")) if rows.empty else rows.astype({"offset": "Int64", "size": "Int64", "row": "Int64"})
    return _with_skips(RegularizationSet(str(source), "parquet", rows, image_column=image_col), skips)


def _tar_samples(tar_path: Path) -> tuple[list[dict], dict[str, list[str]]]:
    """Index one webdataset shard: (key, caption, image byte range) per sample, images not read."""
    samples: dict[str, dict] = {}
    with tarfile.open(tar_path) as tf:
        for member in tf:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            stem, _, ext = base.partition(".")  # webdataset: the key ends at the first dot of the basename
            key = os.path.join(os.path.dirname(member.name), stem)
            sample = samples.setdefault(key, {})
            ext = ext.lower()
            if ext in ("jpg", "jpeg", "png", "webp") and "image" not in sample:
                sample["image"] = (member.offset_data, member.size)
            elif ext in ("txt", "json"):
                sample[ext] = tf.extractfile(member).read().decode("utf-8")
    records: list[dict] = []
    skips: dict[str, list[str]] = {}
    for key in sorted(samples):
        sample = samples[key]
        text = sample.get("txt")
        if text is None and "json" in sample:
            text = json.loads(sample["json"]).get("caption")
        where = [f"{tar_path.name}/{key}"]
        if "image" not in sample:
            _skip(skips, "no_image", where)
        elif text is None:
            _skip(skips, "no_caption", where)
        elif not _caption_ok(text):
            _skip(skips, "empty_caption", where)
        else:
            offset, size = sample["image"]
            records.append({"key": f"{tar_path.name}/{key}", "text": text, "kind": "tar", "path": os.path.abspath(tar_path), "offset": offset, "size": size})
    return records, skips


def read_webdataset(source: str | os.PathLike) -> RegularizationSet:
    """A folder of img2dataset ``*.tar`` shards (or one tar): image + ``.txt`` caption (or ``.json`` ``caption``)."""
    source = Path(source)
    tars = sorted(source.glob("*.tar")) if source.is_dir() else [source]
    if not tars:
        raise RegularizationError(f"{source}: no .tar shards")
    records: list[dict] = []
    skips: dict[str, list[str]] = {}
    for tar in tars:
        try:
            found, tar_skips = _tar_samples(tar)
        except tarfile.TarError as exc:
            raise RegularizationError(f"{tar}: not a readable tar: {exc}") from None
        records += found
        for reason, where in tar_skips.items():
            _skip(skips, reason, where)
    return _with_skips(RegularizationSet(str(source), "webdataset", _rows(records)), skips)


def read_hub_dataset(name: str, split: str = "train", caption_column: Optional[str] = None, image_column: Optional[str] = None) -> RegularizationSet:
    """A `datasets` hub id; images stay undecoded until sampled."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown id, bad split: all one line for the user
        raise RegularizationError(f"cannot load regularisation dataset '{name}' (split '{split}'): {str(exc).splitlines()[0]}") from None
    image_candidates = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)] + list(IMAGE_COLUMNS)
    image_col = _pick(ds.column_names, image_column, tuple(image_candidates), name, "image")
    caption = _pick(ds.column_names, caption_column, CAPTION_COLUMNS, name, "caption")
    if isinstance(ds.features[image_col], datasets.Image):
        ds = ds.cast_column(image_col, datasets.Image(decode=False))
    texts = ds[caption]
    good = np.array([_caption_ok(t) for t in texts], dtype=bool)
    rows = pd.DataFrame({"key": [f"{name}/{i}" for i in np.flatnonzero(good)], "text": [t for t, g in zip(texts, good) if g], "kind": "hub", "path": None, "row": np.flatnonzero(good)})
    rows = rows.reindex(columns=ROW_COLUMNS).astype({"offset": "Int64", "size": "Int64", "row": "Int64"})
    reg = RegularizationSet(name, "hub", rows, image_column=image_col, dataset=ds)
    return _with_skips(reg, {"empty_caption": [str(row) for row in np.flatnonzero(~good)]})


def read_regularization(
    source: str,
    format: str = "auto",
    caption_column: Optional[str] = None,
    image_column: Optional[str] = None,
    split: str = "train",
    check_files: bool = True,
) -> RegularizationSet:
    """Index a regularisation source of any supported format (``auto`` detects it)."""
    fmt = detect_format(source) if format == "auto" else format
    if fmt != "hub" and not Path(source).exists():
        raise RegularizationError(f"regularisation source not found: {source}")
    if fmt == "imagefolder":
        reg = read_imagefolder(source, caption_column, check_files)
    elif fmt == "parquet":
        reg = read_parquet_pairs(source, caption_column, image_column, check_files)
    elif fmt == "webdataset":
        reg = read_webdataset(source)
    elif fmt == "hub":
        reg = read_hub_dataset(source, split, caption_column, image_column)
    else:
        raise RegularizationError(f"unknown regularisation format '{format}' (use one of {', '.join(REGULARIZATION_FORMATS)})")
    if reg.skipped_rows:
        logger.warning(describe_skipped(reg.source, reg.skipped_rows))
    return reg


def sample_rows(reg: RegularizationSet, n: int, seed: int) -> pd.DataFrame:
    """``n`` rows drawn without replacement, reproducibly from ``seed``, kept in source order."""
    n = min(n, len(reg.rows))
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(reg.rows), size=n, replace=False)) if n < len(reg.rows) else np.arange(n)
    return reg.rows.iloc[picked].reset_index(drop=True)


def image_values(reg: RegularizationSet, rows: pd.DataFrame) -> list[dict]:
    """The `datasets` Image values ``{bytes, path}`` of ``rows``: paths for files, bytes otherwise."""
    import pyarrow.parquet as pq

    values: list[Optional[dict]] = [None] * len(rows)
    handles: dict[str, Any] = {}
    row_group_cache: dict[tuple[str, int], Any] = {}
    try:
        for i, row in enumerate(rows.itertuples(index=False)):
            if row.kind == "file":
                values[i] = {"bytes": None, "path": row.path}
            elif row.kind == "tar":
                f = handles.get(row.path) or handles.setdefault(row.path, open(row.path, "rb"))
                f.seek(int(row.offset))
                values[i] = {"bytes": f.read(int(row.size)), "path": row.key}
            elif row.kind == "parquet":
                pf = handles.get(row.path) or handles.setdefault(row.path, pq.ParquetFile(row.path))
                group, index = _row_group_of(pf, int(row.row))
                if (row.path, group) not in row_group_cache:
                    row_group_cache.clear()  # rows arrive in file order: keep one row group in memory
                    row_group_cache[(row.path, group)] = pf.read_row_group(group, columns=[reg.image_column]).column(0)
                values[i] = _as_image_value(row_group_cache[(row.path, group)][index].as_py(), row.key, Path(row.path).parent)
            else:  # hub
                values[i] = None
        hub = [i for i, k in enumerate(rows["kind"]) if k == "hub"]
        if hub:
            picked = reg.dataset.select(rows["row"].iloc[hub].astype(int).tolist())[reg.image_column]
            for i, value in zip(hub, picked):
                values[i] = _as_image_value(value, rows["key"].iloc[i], None)
    finally:
        for h in handles.values():
            if hasattr(h, "close"):
                h.close()
    return values


def _row_group_of(pf, row: int) -> tuple[int, int]:
    bounds = np.cumsum([pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
    group = int(np.searchsorted(bounds, row, side="right"))
    return group, row - (int(bounds[group - 1]) if group else 0)


def _as_image_value(value: Any, key: str, root: Optional[Path]) -> dict:
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value), "path": key}
    if isinstance(value, dict):  # a `datasets` Image struct
        if value.get("bytes") is not None:
            return {"bytes": value["bytes"], "path": value.get("path") or key}
        path = value.get("path")
        if path and root is not None and not os.path.isabs(path):
            path = os.path.abspath(root / path)
        return {"bytes": None, "path": path}
    raise RegularizationError(f"{key}: image value of type {type(value).__name__} is neither bytes nor an Image struct")
