"""The triplet table (``triplets.parquet``, written by curation) as Social Reward training data.

Contract (shared with curation and the accuracy readers): one row per triplet with columns
``triplet_id, prompt_id, prompt, pos_image_id, pos_path, neg_image_id, neg_path, split``
(``split`` in train / val / test, split by prompt); relative paths resolve against the folder of
``triplets.parquet``.

Rows that cannot train are skipped and counted by reason, never dropped silently: a blank
prompt, the same image as positive and negative, a missing image file (checked up front), and
an image that cannot be decoded (found when a DataLoader worker opens it). Images are
preprocessed in the workers with the social_reward scorer's own ``preprocess_image`` and
``tokenize``, the functions scoring runs use, so training and scoring see identical inputs.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
import pandas as pd
import torch

from sr_finetune.errors import UserError

from .base import RewardModel
from .preprocess import open_image

logger = logging.getLogger(__name__)


SKIP_BLANK_PROMPT = "blank prompt"
SKIP_SAME_IMAGE = "positive and negative are the same image"
SKIP_MISSING_FILE = "missing image file"
SKIP_UNREADABLE = "unreadable image"


@dataclass
class SkipCounter:
    """Triplets left out, by reason, with the first example of each reason."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, example: str, n: int = 1) -> None:
        self.counts[reason] += n
        self.examples.setdefault(reason, example)

    def merge(self, other: "SkipCounter") -> None:
        for reason, n in other.counts.items():
            self.add(reason, other.examples[reason], n)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def line(self) -> str:
        return "; ".join(f"{n} {reason} (e.g. {self.examples[reason]})" for reason, n in self.counts.most_common()) or "none"

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)


def usable_triplets(table: pd.DataFrame, split: str, file: str | Path) -> tuple[pd.DataFrame, SkipCounter]:
    """The rows of ``split`` that can train, and the skips by reason. No row of the split at all,
    or none left after the skips, is a :class:`UserError` naming the split."""
    rows = table[table["split"] == split].reset_index(drop=True)
    if rows.empty:
        per_split = ", ".join(f"{k} {v}" for k, v in table["split"].value_counts().items()) or "none"
        raise UserError(f"triplets: {file} has no rows in split '{split}' (rows per split: {per_split})")
    skips = SkipCounter()
    keep = []
    for row in rows.itertuples(index=False):
        reason = _skip_reason(row)
        if reason is None:
            keep.append(True)
            continue
        keep.append(False)
        skips.add(reason, f"triplet {row.triplet_id}" + (f", {_missing_path(row)}" if reason == SKIP_MISSING_FILE else ""))
    usable = rows[keep].reset_index(drop=True)
    if skips.total:
        logger.warning("triplets %s: skipped %d of %d '%s' triplets: %s", file, skips.total, len(rows), split, skips.line())
    if usable.empty:
        raise UserError(f"triplets: no usable triplets in split '{split}' of {file} (all {len(rows)} skipped: {skips.line()})")
    return usable, skips


def _skip_reason(row) -> str | None:
    if not isinstance(row.prompt, str) or not row.prompt.strip():
        return SKIP_BLANK_PROMPT
    if str(row.pos_image_id) == str(row.neg_image_id) or row.pos_path == row.neg_path:
        return SKIP_SAME_IMAGE
    if _missing_path(row) is not None:
        return SKIP_MISSING_FILE
    return None


def _missing_path(row) -> str | None:
    for path in (row.pos_path, row.neg_path):
        if not isinstance(path, str) or not Path(path).is_file():
            return str(path)
    return None


def warn_on_prompts_in_several_splits(table: pd.DataFrame, file: str | Path) -> int:
    """Count prompts found in more than one split (the contract splits by prompt); warn if any."""
    splits_per_prompt = table.groupby("prompt_id")["split"].nunique()
    shared = splits_per_prompt[splits_per_prompt > 1]
    if len(shared):
        logger.warning("triplets %s: %d prompt(s) appear in several splits (e.g. prompt_id %s): held-out accuracy is then optimistic", file, len(shared), shared.index[0])
    return len(shared)


def prompt_weights(rows: pd.DataFrame) -> torch.Tensor:
    """Per triplet ``1 / (triplets of its prompt)``, rescaled to mean 1 (see ``reweighted_ce``)."""
    counts = rows["prompt_id"].map(rows["prompt_id"].value_counts()).to_numpy(dtype="float64")
    weights = 1.0 / counts
    return torch.tensor(weights * len(weights) / weights.sum(), dtype=torch.float32)


class TripletDataset(torch.utils.data.Dataset):
    """Item key ``(epoch, row)`` (what :class:`~sr_finetune.training.data.EpochSampler` yields) or a
    row number -> the triplet's tokens and both images, preprocessed by the scorer.

    Arrow strings hold the paths and prompts, so forked workers do not copy the table as they read."""

    def __init__(self, rows: pd.DataFrame, scorer: RewardModel, weights: torch.Tensor | None = None):
        import pyarrow as pa

        self.columns = {c: pa.array(rows[c].astype(str).tolist(), type=pa.large_string()) for c in ("prompt_id", "prompt", "pos_path", "neg_path")}
        self.triplet_ids = torch.tensor(rows["triplet_id"].to_numpy(dtype="int64"))
        self.weights = weights if weights is not None else torch.ones(len(rows))
        self.scorer = scorer

    def __len__(self) -> int:
        return len(self.triplet_ids)

    def __getitem__(self, key: tuple[int, int] | int) -> dict:
        row = key[1] if isinstance(key, tuple) else key
        item: dict = {"triplet_id": int(self.triplet_ids[row]), "prompt_id": self.columns["prompt_id"][row].as_py(), "weight": self.weights[row]}
        for side in ("pos", "neg"):
            path = self.columns[f"{side}_path"][row].as_py()
            image = open_image(path)
            if isinstance(image, str):
                item["error"] = (path, image)
                return item
            item[side] = self.scorer.preprocess_image(image)
        item["tokens"] = self.scorer.tokenize([self.columns["prompt"][row].as_py()])[0]
        return item


def collate_triplets(items: list[dict]) -> dict:
    """Stack the readable triplets; the others go to ``unreadable`` as (triplet_id, path, reason)."""
    good = [item for item in items if "error" not in item]
    batch: dict = {"unreadable": [(item["triplet_id"], *item["error"]) for item in items if "error" in item], "size": len(good)}
    if good:
        for key in ("pos", "neg", "tokens", "weight"):
            batch[key] = torch.stack([item[key] for item in good])
        batch["triplet_id"] = torch.tensor([item["triplet_id"] for item in good])
        batch["prompt_id"] = [item["prompt_id"] for item in good]
    return batch


__all__ = [
    "SKIP_BLANK_PROMPT",
    "SKIP_MISSING_FILE",
    "SKIP_SAME_IMAGE",
    "SKIP_UNREADABLE",
    "SkipCounter",
    "TripletDataset",
    "collate_triplets",
    "prompt_weights",
    "usable_triplets",
    "warn_on_prompts_in_several_splits",
]
