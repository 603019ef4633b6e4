"""Cells of the tables users hand us (prompt files, image tables), read as text, and the rows
skipped for an empty cell, described by row for the logs and one-line errors."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd


def read_csv_as_text(path, sep: str = ",") -> pd.DataFrame:
    """A CSV/TSV with every cell a string, exactly as written: an empty cell is ``""`` (never
    NaN), and ``NA``, ``None`` or ``null`` stay the words they are."""
    return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)


def text_cells(values: pd.Series) -> pd.Series:
    """A column as strings, ``""`` where a cell is missing (None, NaN, NA). A float column of
    whole numbers (an integer id column with a missing cell, as JSON reads it) loses its ``.0``."""
    if pd.api.types.is_float_dtype(values) and bool((values.dropna() % 1 == 0).all()):
        values = values.astype("Int64")
    present = values.notna().to_numpy()
    text = values.astype(object).to_numpy()
    return pd.Series(np.where(present, text, ""), index=values.index, dtype=object).astype(str)


def blank_cells(text: pd.Series) -> np.ndarray:
    """Where a column of :func:`text_cells` is empty or only whitespace."""
    return text.str.strip().eq("").to_numpy(dtype=bool)


def describe_skipped(source: str, skipped: dict[str, Sequence], shown: int = 10) -> str:
    """One line per reason, ``"{source}: skipped 2 empty prompt (rows 3, 7)"``, or '' when nothing
    was skipped. Rows are numbered from 0, the header not counted."""
    lines = []
    for reason, rows in skipped.items():
        if len(rows):
            listed = ", ".join(str(r) for r in rows[:shown]) + (" ..." if len(rows) > shown else "")
            lines.append(f"{source}: skipped {len(rows)} {reason} (rows {listed})")
    return "\n".join(lines)
