"""Report figures as PNG bytes (matplotlib, Agg backend): means and win/tie/loss rates with CIs."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd

WIN, TIE, LOSS = "#2e7d32", "#b0b0b0", "#c62828"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


def _yerr(frame: pd.DataFrame, value: str, low: str, high: str) -> np.ndarray:
    """Asymmetric error bars; NaN bounds (no interval) draw no bar."""
    err = np.stack([frame[value] - frame[low], frame[high] - frame[value]]).astype(float)
    return np.nan_to_num(np.clip(err, 0, None))


def means_figure(means: pd.DataFrame, models: list[str], confidence: float) -> bytes:
    """One panel per metric: bars of each model's mean per prompt set, bootstrap CI as error bars.

    Bars start at zero so their heights compare honestly; the value is written on each bar."""
    plt = _pyplot()
    metrics = list(dict.fromkeys(means.metric))
    sets = list(dict.fromkeys(means.prompt_set))
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    width = 0.8 / len(models)
    colors = plt.get_cmap("tab10").colors
    for ax, metric in zip(axes.flat, metrics):
        for i, model in enumerate(models):
            cell = means[(means.metric == metric) & (means.model == model)].set_index("prompt_set").reindex(sets)
            x = np.arange(len(sets)) + (i - (len(models) - 1) / 2) * width
            bars = ax.bar(x, cell["mean"], width, yerr=_yerr(cell, "mean", "ci_low", "ci_high"), capsize=3, color=colors[i % 10], label=model)
            ax.bar_label(bars, labels=[f"{v:.3g}" for v in cell["mean"]], fontsize=7, padding=2)
        ax.set_title(metric)
        ax.set_xticks(np.arange(len(sets)), sets)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="upper center", ncol=len(models), bbox_to_anchor=(0.5, 1.04), frameon=False)
    fig.suptitle(f"Mean score per prompt set (error bars: {confidence:.0%} bootstrap CI over prompts)", y=1.09, fontsize=11)
    fig.tight_layout()
    return _png(fig)


def win_rate_figure(wins: pd.DataFrame, confidence: float) -> bytes:
    """One panel per unit: stacked win / tie / loss shares, CI of the win rate as an error bar."""
    plt = _pyplot()
    units = list(dict.fromkeys(wins.unit))
    several_models = wins.model.nunique() > 1
    n_rows = int((wins.unit == units[0]).sum())
    fig, axes = plt.subplots(1, len(units), figsize=(6.4 * len(units), 0.9 + 0.34 * n_rows), squeeze=False)
    for ax, unit in zip(axes.flat, units):
        rows = wins[wins.unit == unit].reset_index(drop=True)
        y = np.arange(len(rows))[::-1]
        ax.barh(y, rows.win_rate * 100, color=WIN, label="win")
        ax.barh(y, rows.tie_rate * 100, left=rows.win_rate * 100, color=TIE, label="tie")
        ax.barh(y, rows.loss_rate * 100, left=(rows.win_rate + rows.tie_rate) * 100, color=LOSS, label="loss")
        ax.errorbar(rows.win_rate * 100, y, xerr=_yerr(rows, "win_rate", "ci_low", "ci_high") * 100, fmt="none", ecolor="black", capsize=3, linewidth=1)
        ax.axvline(50, color="black", linestyle="--", linewidth=0.8)
        ax.set_xlim(0, 100)
        ax.set_xlabel("% of comparisons")
        ax.set_title(f"per {unit}")
        who = [f"{r.model} / {r.prompt_set}" if several_models else r.prompt_set for r in rows.itertuples()]
        ax.set_yticks(y, [f"{r.metric} · {w} (n={r.n})" for r, w in zip(rows.itertuples(), who)], fontsize=8)
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, frameon=False)
    fig.suptitle(f"Fine-tuned vs baseline: win / tie / loss (error bar: {confidence:.0%} CI of the win rate)", fontsize=11)
    fig.tight_layout()
    return _png(fig)
