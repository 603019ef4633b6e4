"""Which images the report shows: same-seed grids, and each metric's largest gains and losses."""

from __future__ import annotations

import pandas as pd

from .stats import KEYS, paired


def grid_prompt_ids(scores: pd.DataFrame, baseline: str, prompt_set: str, n: int) -> list[str]:
    """The first ``n`` prompts of a set, in prompt-set order (no cherry-picking)."""
    rows = scores[(scores.model == baseline) & (scores.prompt_set == prompt_set)]
    return list(dict.fromkeys(rows.prompt_id))[:n]


def extreme_pairs(scores: pd.DataFrame, baseline: str, model: str, prompt_set: str, metric: str, k: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``k`` pairs where ``model`` beats the baseline by most on ``metric``, and the ``k`` where it loses by most.

    Rows: prompt_id, index, prompt, seed, base, ft, diff, path_base, path_ft; gains are only
    pairs with diff > 0, losses only pairs with diff < 0 (either may be shorter than ``k``)."""
    in_set = scores[scores.prompt_set == prompt_set]
    pairs = paired(in_set, baseline, model, metric)
    info = in_set.loc[in_set.model == baseline, KEYS + ["prompt", "seed", "path"]].rename(columns={"path": "path_base"})
    ft_paths = in_set.loc[in_set.model == model, KEYS + ["path"]].rename(columns={"path": "path_ft"})
    pairs = pairs.merge(info, on=KEYS).merge(ft_paths, on=KEYS)
    gains = pairs[pairs["diff"] > 0].sort_values("diff", ascending=False, kind="stable").head(k)
    losses = pairs[pairs["diff"] < 0].sort_values("diff", ascending=True, kind="stable").head(k)
    return gains.reset_index(drop=True), losses.reset_index(drop=True)
