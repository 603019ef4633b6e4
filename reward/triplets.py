"""The triplet table: (prompt, positive image, negative image) rows written by curation and read
by reward training and pairwise accuracy.

``<curate output_dir>/triplets.parquet``, one row per triplet, columns ``TRIPLET_COLUMNS``;
``split`` is ``train`` | ``val`` | ``test`` and no prompt is in two splits. Paths are written
resolved; a relative path is read against the folder of ``triplets.parquet``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from sr_finetune.errors import UserError

TRIPLET_COLUMNS = ["triplet_id", "prompt_id", "prompt", "pos_image_id", "pos_path", "neg_image_id", "neg_path", "split"]
SPLITS = ("train", "val", "test")
TRIPLETS_FILENAME = "triplets.parquet"


def triplets_file(source: str | os.PathLike) -> Path:
    """``triplets.parquet`` itself, or the one inside a curation output folder."""
    path = Path(source)
    if path.is_dir():
        path = path / TRIPLETS_FILENAME
    if not path.is_file():
        raise UserError(f"triplets not found: {path} (a triplets.parquet or a `curate` output folder)")
    return path


def read_triplets(source: str | os.PathLike, split: str | None = None) -> pd.DataFrame:
    """The triplets of ``split`` (None or ``all``: every row), with paths resolved against the file's folder."""
    path = triplets_file(source)
    try:
        table = pd.read_parquet(path)
    except Exception as exc:
        raise UserError(f"{path}: cannot read triplets: {str(exc).splitlines()[0]}") from None
    missing = [c for c in TRIPLET_COLUMNS if c not in table.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} (columns: {', '.join(map(str, table.columns))})")
    repeated = table["triplet_id"][table["triplet_id"].duplicated()]
    if len(repeated):
        raise UserError(f"{path}: triplet_id {repeated.iloc[0]} appears more than once ({len(repeated)} repeats); ids must be unique")
    if split not in (None, "all"):
        if split not in SPLITS:
            raise UserError(f"unknown split '{split}' (expected one of {', '.join(SPLITS)} or all)")
        table = table[table["split"] == split].reset_index(drop=True)
    root = path.parent.resolve()
    for column in ("pos_path", "neg_path"):
        table[column] = resolve_paths(table[column], root).to_pandas()
    return table


def resolve_paths(paths, root: str | os.PathLike) -> "pa.Array":
    """``root/path`` for every relative path (absolute ones kept), column-wise; ``root`` is made absolute."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = pa.array(paths, type=pa.string()) if not isinstance(paths, (pa.Array, pa.ChunkedArray)) else pc.cast(paths, pa.string())
    prefix = os.path.abspath(root).rstrip(os.sep) + os.sep
    return pc.if_else(pc.starts_with(values, os.sep), values, pc.binary_join_element_wise(prefix, values, ""))
