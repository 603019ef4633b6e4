"""The pair table as training batches for pairwise objectives (``objective: dpo``).

The pair builder with ``keep_pairs: true`` writes ``<fine-tune set>/pairs``: one row per prompt
with its chosen and rejected image. Here both images of every pair, and the fine-tune set's
regularisation rows when they are trained on too, become one table of images in the fine-tune
set's layout (chosen rows, then rejected rows, then regularisation rows), so that the latent and
text caches and the batched reads are the very ones of the ``sft`` objective.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from .data import FinetuneDataset, collate, derive_seed

PAIR_TABLE = "pairs"
PAIR_COLUMNS = ("prompt_id", "chosen_image", "rejected_image", "chosen_text")
PARTS = ("chosen", "rejected", "regularization")


def load_pair_table(dataset: str):
    """Open ``dataset/pairs`` (written by build-pairs with ``keep_pairs: true``) and check its columns."""
    from datasets import load_from_disk

    folder = Path(dataset) / PAIR_TABLE
    if not (folder / "dataset_info.json").is_file():
        raise UserError(f"objective=dpo needs the pair table {folder}, which does not exist; rebuild {dataset} with build-pairs and pairs.keep_pairs=true")
    table = load_from_disk(str(folder))
    missing = [c for c in PAIR_COLUMNS if c not in table.column_names]
    if missing:
        raise UserError(f"dataset: {folder} lacks column(s) {missing}; the pair table has columns {list(PAIR_COLUMNS)} (written by build-pairs with keep_pairs=true)")
    if len(table) == 0:
        raise UserError(f"dataset: {folder} has no pairs")
    return table


def rows_with_role(table, role: str):
    """The rows of one role, as contiguous slices of ``table`` (None if there are none).

    Slices keep the rows plain arrow tables: a row selection would add an indices mapping, which
    the caches' column concatenation would write out as a copy beside the user's dataset.
    """
    import numpy as np
    from datasets import concatenate_datasets

    rows = np.flatnonzero(np.asarray(list(table["role"]), dtype=object) == role)
    if len(rows) == 0:
        return None
    runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1)
    return concatenate_datasets([table.select(range(int(run[0]), int(run[-1]) + 1)) for run in runs])


def reward_gap_weights(pairs, source: str = "pair table") -> torch.Tensor:
    """One weight per pair: its reward gap ``|chosen_score - rejected_score|`` over the mean gap (mean 1)."""
    import numpy as np

    missing = [c for c in ("chosen_score", "rejected_score") if c not in pairs.column_names]
    if missing:
        raise UserError(f"dpo_gap_weighting: {source} lacks column(s) {missing} (rebuild it with build-pairs and pairs.keep_pairs=true)")
    gaps = np.abs(np.asarray(pairs["chosen_score"], dtype=np.float64) - np.asarray(pairs["rejected_score"], dtype=np.float64))
    bad = np.flatnonzero(~np.isfinite(gaps))
    if len(bad):
        raise UserError(f"dpo_gap_weighting: {source} row {int(bad[0])} has a score that is not a number ({len(bad)} such rows)")
    if gaps.mean() <= 0:
        raise UserError(f"dpo_gap_weighting: every pair of {source} has equal scores; there is no gap to weight by")
    return torch.from_numpy(gaps / gaps.mean()).float()


def pair_image_table(pairs, regularization=None):
    """One row per image (``image, text, role, prompt_id``): the chosen images of the pairs, their
    rejected images in the same order, then the regularisation rows.

    Both images of a pair carry the chosen text, the prompt: DPO compares the two images under the
    same condition (the rejected text's negative token is an ``sft`` device).
    """
    from datasets import concatenate_datasets

    parts = [
        pairs.select_columns([f"{part}_image", "chosen_text", "prompt_id"])
        .rename_columns({f"{part}_image": "image", "chosen_text": "text"})
        .add_column("role", [part] * len(pairs))
        for part in ("chosen", "rejected")
    ]
    if regularization is not None:
        parts.append(regularization.select_columns(["image", "text", "role", "prompt_id"]))
    return concatenate_datasets([part.select_columns(["image", "text", "role", "prompt_id"]) for part in parts])


class PairDataset(torch.utils.data.Dataset):
    """Pairs as training examples, keyed ``(epoch, pair)`` like :class:`FinetuneDataset`'s rows.

    An example holds the chosen and the rejected image of a pair, flipped and cropped alike, and,
    when ``num_regularization`` > 0, one regularisation row: per epoch a seeded permutation of those
    rows, indexed by the pair, so the draw is a pure function of ``(seed, epoch, pair)`` (exact resume).
    With ``alternate_roles`` the chosen and the rejected image trade places in every odd epoch.
    With ``weights`` (one per pair) each example carries its pair's ``weight``.
    """

    def __init__(self, images: FinetuneDataset, num_pairs: int, num_regularization: int, seed: int, alternate_roles: bool = False, weights: torch.Tensor | None = None):
        if len(images) != 2 * num_pairs + num_regularization:
            raise ValueError(f"{len(images)} image rows for {num_pairs} pairs and {num_regularization} regularisation rows")
        if weights is not None and len(weights) != num_pairs:
            raise ValueError(f"{len(weights)} pair weights for {num_pairs} pairs")
        self.weights = weights
        self.images = images
        self.num_pairs = num_pairs
        self.num_regularization = num_regularization
        self.seed = seed
        self.alternate_roles = alternate_roles
        self._order: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        return self.num_pairs

    def __getitem__(self, key: tuple[int, int]) -> dict:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[dict]:
        n = self.num_pairs
        swapped = [self.alternate_roles and epoch % 2 == 1 for epoch, _ in keys]
        chosen = self.images.examples([(epoch, pair + n * s) for (epoch, pair), s in zip(keys, swapped)], augment_keys=keys)
        rejected = self.images.examples([(epoch, pair + n * (not s)) for (epoch, pair), s in zip(keys, swapped)], augment_keys=keys)
        items = [{"chosen": c, "rejected": r, "prompt_id": c["prompt_id"]} for c, r in zip(chosen, rejected)]
        if self.weights is not None:
            for item, (_, pair) in zip(items, keys):
                item["weight"] = self.weights[pair]
        if self.num_regularization:
            regularization = self.images.examples([(epoch, 2 * n + self.regularization_row(epoch, pair)) for epoch, pair in keys])
            for item, row in zip(items, regularization):
                item["regularization"] = row
        return items

    def regularization_row(self, epoch: int, pair: int) -> int:
        """Which regularisation row (0-based among them) is trained beside ``pair`` in ``epoch``."""
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "regularization", epoch))
            self._order = (epoch, torch.randperm(self.num_regularization, generator=generator).tolist())
        return self._order[1][pair % self.num_regularization]


def collate_pairs(items: list[dict]) -> dict:
    """A batch of pairs: ``chosen``, ``rejected`` (and ``regularization``) sub-batches, each as :func:`collate` makes them."""
    batch = {part: collate([item[part] for item in items]) for part in PARTS if part in items[0]}
    batch["prompt_id"] = [item["prompt_id"] for item in items]
    if "weight" in items[0]:
        batch["weight"] = torch.stack([item["weight"] for item in items])
    return batch
