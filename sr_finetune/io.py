"""Atomic file writes and shard-part reading shared by the sharded stages."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from .errors import UserError
from .tables import read_csv_as_text

JSON_KEY = "__key__"  # column of a JSON object's keys, for tables stored as {id: record}


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_parquet(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``df`` to ``path`` so that readers see either nothing or the whole file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def atomic_save_image(image, path: str | os.PathLike) -> Path:
    """Save a PIL image atomically; the format follows the file suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}[path.suffix.lower()]
    kwargs = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    image.save(tmp, format=fmt, **kwargs)
    os.replace(tmp, path)
    return path


def read_parts(folder: str | os.PathLike, pattern: str = "part-*.parquet") -> pd.DataFrame:
    """Concatenate the parquet parts of a folder in name order."""
    files = sorted(Path(folder).glob(pattern))
    if not files:
        raise FileNotFoundError(f"no {pattern} files in {folder}")
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def read_table(path: str | os.PathLike, csv_as_text: bool = False) -> pd.DataFrame:
    """A csv, tsv, parquet or jsonl file, or a JSON list of records or object of ``{id: record}``
    (whose keys become column ``__key__``); a missing or malformed file is a one-line error.
    ``csv_as_text`` reads CSV/TSV cells as written (empty cells ``""``, see ``tables.read_csv_as_text``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"table not found: {path}")
    suffix = path.suffix.lower()
    read_csv = read_csv_as_text if csv_as_text else pd.read_csv
    readers = {".csv": read_csv, ".tsv": lambda p: read_csv(p, sep="\t"), ".parquet": pd.read_parquet, ".jsonl": lambda p: pd.read_json(p, lines=True), ".json": _read_json_table}
    if suffix not in readers:
        raise UserError(f"{path}: unsupported table type '{suffix}' (csv, tsv, parquet, json, jsonl)")
    try:
        return readers[suffix](path)
    except UserError:
        raise
    except Exception as exc:  # malformed file: name it
        raise UserError(f"{path}: cannot read table: {str(exc).splitlines()[0]}") from None


def _read_json_table(path: Path) -> pd.DataFrame:
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        return pd.DataFrame([{JSON_KEY: key, **record} for key, record in data.items()])
    if isinstance(data, list) and all(isinstance(v, dict) for v in data):
        return pd.DataFrame(data)
    raise UserError(f"{path}: a JSON table is a list of records or an object of {{id: record}}")
