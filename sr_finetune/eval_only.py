"""Evaluation-only metrics: scores that may judge a model but must never train one.

A metric that is also the training signal stops measuring anything (the model learns to please
it). The demo world's judge and fidelity scorers are such metrics. The reward registry marks
them (``register_reward(..., eval_only=True)`` calls :func:`mark_eval_only`), the scoring stage
writes the mark into its score tables (``DataFrame.attrs``, kept in the parquet metadata), and
every consumer that would train on a score column calls :func:`refuse_eval_only`, which checks
both, so the refusal holds in a process that never imported the scorers.
"""

from __future__ import annotations

from typing import Iterable

import pandas as pd

from .errors import UserError

ATTRS_KEY = "eval_only_metrics"
_EVAL_ONLY: set[str] = set()


def mark_eval_only(name: str) -> None:
    _EVAL_ONLY.add(name)


def eval_only_metrics(table: pd.DataFrame | None = None) -> frozenset[str]:
    """Metrics known as evaluation-only in this process, plus those ``table`` is marked with."""
    marked = table.attrs.get(ATTRS_KEY, []) if table is not None else []
    return frozenset(_EVAL_ONLY) | frozenset(marked)


def mark_table(table: pd.DataFrame, metrics: Iterable[str]) -> pd.DataFrame:
    """Record in ``table.attrs`` which of ``metrics`` are evaluation-only (survives to_parquet)."""
    table.attrs[ATTRS_KEY] = sorted(set(metrics) & eval_only_metrics())
    return table


def refuse_eval_only(metric: str, where: str, table: pd.DataFrame | None = None, error: type[UserError] = UserError) -> None:
    """A one-line ``error`` if ``metric`` is evaluation-only."""
    if metric in eval_only_metrics(table):
        raise error(f"{where}: '{metric}' is an evaluation-only metric and cannot be a training signal; pick another reward column")


__all__ = ["ATTRS_KEY", "eval_only_metrics", "mark_eval_only", "mark_table", "refuse_eval_only"]
