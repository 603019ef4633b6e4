"""Statistics of a paired evaluation: means, win/tie/loss rates, bootstrap CIs and sign tests.

The input is one row per scored image: ``model, prompt_set, prompt_id, index`` and one column
per metric (NaN where an image could not be scored). Image ``index`` of ``prompt_id`` was made
with the same seed by every model, so a fine-tuned image and the baseline image with the same
``(prompt_set, prompt_id, index)`` form a pair.

Two units of comparison are reported:

- ``image``: each same-seed pair is one comparison (fine-tuned score >, =, < baseline score);
- ``prompt``: each prompt is one comparison, of the mean scores of its paired images.

Ties are counted separately: ``win_rate = wins / n``, ``tie_rate = ties / n``,
``loss_rate = losses / n``. Confidence intervals are percentile bootstrap intervals that
resample prompts with replacement (images of one prompt are not independent, so they move
together); within a prompt set every model and metric uses the same resamples. The p-value is
the exact two-sided sign test of wins against losses, ties left out; for the ``image`` unit it
treats images as independent, so the ``prompt`` unit's p-value is the conservative one.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

KEYS = ["prompt_set", "prompt_id", "index"]
MEAN_COLUMNS = ["model", "prompt_set", "metric", "mean", "ci_low", "ci_high", "std", "images", "prompts", "missing"]
WIN_COLUMNS = [
    "model", "baseline", "prompt_set", "metric", "unit", "n", "prompts", "wins", "ties", "losses",
    "win_rate", "tie_rate", "loss_rate", "ci_low", "ci_high", "p_value", "mean_diff", "diff_ci_low", "diff_ci_high",
]
DEFINITIONS = {
    "pair": "image k of prompt p from a fine-tuned model and from the baseline, made with the same seed (for a model given as existing images: its image k of prompt p)",
    "image unit": "each same-seed pair is one comparison: fine-tuned score >, = or < baseline score",
    "prompt unit": "each prompt is one comparison, of the mean scores of its paired images",
    "rates": "win rate = wins / n, tie rate = ties / n, loss rate = losses / n; ties are not split",
    "confidence interval": "percentile bootstrap over prompts resampled with replacement (a prompt's images move together); the same resamples for every model and metric of a prompt set",
    "p-value": "exact two-sided sign test of wins vs losses, ties left out; the image unit treats images of one prompt as independent, so the prompt unit's p-value is the conservative one",
    "mean difference": "mean of fine-tuned minus baseline score over pairs (image unit) or over prompt means (prompt unit)",
    "unscored images": "an image that could not be scored, or one a model given as existing images lacks (a gap), is left out of the means and its pair out of the win rates (see 'missing')",
}
# Prompt means count as tied when they differ by float rounding only (sums in different orders).
_PROMPT_TIE_RTOL = 1e-12


@dataclass(frozen=True)
class Bootstrap:
    """How confidence intervals are drawn: ``samples`` resamples of prompts, seeded."""

    samples: int = 2000
    confidence: float = 0.95
    seed: int = 0

    def rng(self, prompt_set: str) -> np.random.Generator:
        """The generator of one prompt set: the same draws whatever other sets or models exist."""
        return np.random.default_rng([self.seed, zlib.crc32(prompt_set.encode())])


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test p-value of ``wins`` vs ``losses`` (ties excluded beforehand)."""
    n = wins + losses
    if n == 0:
        return 1.0
    term, tail = 1, 0  # exact integers: C(n, i) for i = 0..min(wins, losses)
    for i in range(min(wins, losses) + 1):
        tail += term
        term = term * (n - i) // (i + 1)
    return min(1.0, 2 * tail / 2**n)


def bootstrap_ratio_ci(numer: np.ndarray, denom: np.ndarray, boot: Bootstrap, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Percentile CI of ``sum(numer) / sum(denom)`` over prompts resampled with replacement.

    ``numer`` and ``denom`` are ``[prompts]`` or ``[prompts, statistics]``; row ``p`` holds prompt
    ``p``'s contribution (e.g. its wins and its number of pairs). Returns (low, high) per statistic.
    """
    numer, denom = np.asarray(numer, dtype=np.float64), np.asarray(denom, dtype=np.float64)
    flat = numer.ndim == 1
    numer, denom = numer.reshape(len(numer), -1), denom.reshape(len(denom), -1)
    n = len(numer)
    if n == 0:
        nan = np.full(numer.shape[1], np.nan)
        return (nan[0], nan[0]) if flat else (nan, nan)
    stats = np.empty((boot.samples, numer.shape[1]))
    chunk = max(1, 2_000_000 // n)  # bound the [resamples, prompts] count matrix
    for start in range(0, boot.samples, chunk):
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=min(chunk, boot.samples - start)).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            stats[start : start + len(counts)] = (counts @ numer) / (counts @ denom)
    alpha = 1.0 - boot.confidence
    low, high = np.nanquantile(stats, [alpha / 2, 1 - alpha / 2], axis=0)
    return (low[0], high[0]) if flat else (low, high)


def mean_table(scores: pd.DataFrame, metrics: Sequence[str], boot: Bootstrap) -> pd.DataFrame:
    """Mean score per model x prompt set x metric, over images, with a CI from resampled prompts."""
    rows = []
    for prompt_set, in_set in scores.groupby("prompt_set", sort=False):
        prompts = pd.Index(in_set.prompt_id.unique())
        cells, numer, denom = [], [], []
        for model, frame in in_set.groupby("model", sort=False):
            for metric in metrics:
                values = frame[["prompt_id", metric]].dropna()
                per_prompt = values.groupby("prompt_id")[metric].agg(["sum", "count"]).reindex(prompts, fill_value=0)
                cells.append((model, metric, values[metric], values.prompt_id.nunique(), int(frame[metric].isna().sum())))
                numer.append(per_prompt["sum"].to_numpy())
                denom.append(per_prompt["count"].to_numpy())
        low, high = bootstrap_ratio_ci(np.stack(numer, axis=1), np.stack(denom, axis=1), boot, boot.rng(str(prompt_set)))
        for (model, metric, values, n_prompts, missing), lo, hi in zip(cells, low, high):
            mean = values.mean() if len(values) else np.nan
            std = values.std(ddof=1) if len(values) > 1 else np.nan
            rows.append((model, prompt_set, metric, mean, lo, hi, std, len(values), n_prompts, missing))
    return pd.DataFrame(rows, columns=MEAN_COLUMNS)


def paired(scores: pd.DataFrame, baseline: str, model: str, metric: str) -> pd.DataFrame:
    """Same-seed pairs of ``model`` and ``baseline``: ``prompt_set, prompt_id, index, base, ft, diff``.

    Pairs where either image has no score are left out."""
    base = scores.loc[scores.model == baseline, KEYS + [metric]].rename(columns={metric: "base"})
    ft = scores.loc[scores.model == model, KEYS + [metric]].rename(columns={metric: "ft"})
    pairs = base.merge(ft, on=KEYS, how="inner", validate="one_to_one").dropna(subset=["base", "ft"])
    return pairs.assign(diff=pairs.ft - pairs.base)


def _outcomes(diff: pd.Series, tol: pd.Series | float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tie = np.abs(diff.to_numpy()) <= np.asarray(tol)
    return (~tie & (diff.to_numpy() > 0)), tie, (~tie & (diff.to_numpy() < 0))


def win_table(scores: pd.DataFrame, baseline: str, models: Sequence[str], metrics: Sequence[str], boot: Bootstrap) -> pd.DataFrame:
    """Win / tie / loss of each model over ``baseline`` per prompt set, metric and unit (image, prompt)."""
    rows = []
    for prompt_set, in_set in scores.groupby("prompt_set", sort=False):
        prompts = pd.Index(in_set.loc[in_set.model == baseline, "prompt_id"].unique())
        cells, numer, denom = [], [], []
        for model in models:
            for metric in metrics:
                pairs = paired(in_set, baseline, model, metric)
                win, tie, loss = _outcomes(pairs["diff"])
                by_prompt = pairs.assign(win=win, tie=tie, loss=loss).groupby("prompt_id")
                per_prompt = by_prompt.agg(n=("diff", "size"), wins=("win", "sum"), diff=("diff", "sum"), base=("base", "mean"), ft=("ft", "mean"))
                per_prompt["pdiff"] = per_prompt.ft - per_prompt.base
                p_win, p_tie, p_loss = _outcomes(per_prompt.pdiff, _PROMPT_TIE_RTOL * np.maximum(per_prompt.base.abs(), per_prompt.ft.abs()))
                full = per_prompt.assign(p_win=p_win.astype(float), p_any=1.0).reindex(prompts, fill_value=0)
                counts = {"image": (int(win.sum()), int(tie.sum()), int(loss.sum())), "prompt": (int(p_win.sum()), int(p_tie.sum()), int(p_loss.sum()))}
                mean_diffs = {"image": pairs["diff"].mean(), "prompt": per_prompt.pdiff.mean()}
                cells += [(model, metric, unit, counts[unit], mean_diffs[unit], len(per_prompt)) for unit in ("image", "prompt")]
                # per unit, two ratio statistics: the win rate and the mean difference
                numer += [full.wins, full["diff"], full.p_win, full.pdiff]
                denom += [full.n, full.n, full.p_any, full.p_any]
        low, high = bootstrap_ratio_ci(np.stack(numer, axis=1), np.stack(denom, axis=1), boot, boot.rng(str(prompt_set)))
        for i, (model, metric, unit, (w, t, l), mean_diff, n_prompts) in enumerate(cells):
            n = w + t + l
            rates = [k / n if n else np.nan for k in (w, t, l)]
            rows.append((model, baseline, prompt_set, metric, unit, n, n_prompts, w, t, l, *rates,
                         low[2 * i], high[2 * i], sign_test(w, l), mean_diff, low[2 * i + 1], high[2 * i + 1]))
    return pd.DataFrame(rows, columns=WIN_COLUMNS)
