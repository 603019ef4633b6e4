"""Atomic file writes and shard-part reading shared by the sharded stages."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd


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
