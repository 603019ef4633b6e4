"""The pair builder: scored generations -> the fine-tune set (chosen / rejected / regularisation).

Per prompt, the highest-scoring valid image becomes ``chosen`` (text = the prompt) and the
lowest becomes ``rejected`` (text = ``rejected_format`` with the negative token, which is the
negative prompt at inference), as in Social Reward (ICLR 2024, section 4.3). Optionally, the
HPS v1 confidence filter keeps a best/worst image only when it stands out (SCORERS.md section 7),
and a LAION-style regularisation set is mixed in to a given share of the final set.

Selection is columnar (pyarrow hashing + one numpy sort), linear in rows: 1M scores take
seconds. Everything dropped on the way is counted by reason in ``summary.json``.

Output (``output_dir``): a `datasets` Dataset (``save_to_disk``) with columns ``image`` (an
Image feature; generated and imagefolder/parquet-path images are stored as absolute paths
and decoded lazily, so keep those folders in place, unless ``embed_images``; tar/bytes images
are stored as bytes),
``text``, ``role``, ``prompt_id``, ``score`` (null for regularisation), ``image_id``; rows in
prompt order, chosen before rejected, then regularisation (shuffle when training).
With ``keep_pairs``, ``output_dir/pairs`` holds one row per prompt for pairwise objectives.
With ``held_out_share`` or ``held_out_prompts``, some prompts stay out of the set (chosen by a
seeded hash of the prompt id) and ``output_dir/held_out.txt`` lists them, one per line: a prompt
file for ``evaluate``'s prompt sets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Iterable, Optional

import numpy as np
import pandas as pd

from .config import require
from .errors import ConfigError, UserError
from .eval_only import ATTRS_KEY as EVAL_ONLY_KEY, refuse_eval_only
from .io import read_parts
from .progress import progress, quiet_library_bars
from .regularization import REGULARIZATION_FORMATS, RegularizationSet, image_values, read_regularization, sample_rows

logger = logging.getLogger(__name__)

ROLES = ("chosen", "rejected", "regularization")
# Everything the selection can drop, counted in this order (units: rows, images or prompts).
SKIP_REASONS = (
    "score_rows_not_in_manifest",  # scores rows whose image_id the manifest does not have
    "duplicate_score_rows",  # repeated image_id in the scores (first row kept)
    "images_without_score",  # manifest images absent from the scores (e.g. unreadable at scoring)
    "images_nonfinite_score",  # NaN / inf reward
    "images_file_missing",  # image file no longer on disk (only with check_files)
    "prompts_too_few_images",  # fewer than min_images_per_prompt valid images
    "chosen_low_confidence",  # confidence filter: best image not confidently best
    "rejected_low_confidence",  # confidence filter: worst image not confidently worst
    "rejected_over_ratio_cap",  # beyond max_rejected_ratio * chosen
    "pairs_below_gap_cut",  # beyond max_pairs: a smaller score gap than the kept pairs (random_roles: a seeded draw)
)
HELD_OUT_FILE = "held_out.txt"
PAIR_COLUMNS = ["image_id", "prompt_id", "prompt", "path", "score", "role", "text", "n_images"]
WRITE_CHUNK_ROWS = 1024


class PairsError(UserError):
    """Scores, a manifest or a regularisation set that cannot make a fine-tune set."""


@dataclass
class PairsConfig:
    """Settings of the pair-building stage (``pairs:`` in a recipe config)."""

    generations: Optional[str] = None  # folder written by `generate` (manifest.parquet + images)
    scores: Optional[str] = None  # scores parquet, a folder of part-*.parquet, or a `score` output folder
    reward_column: str = "social_reward"
    negative_token: str = "t@y quality"  # the Social Reward token; HPS v1 used "Weird image. "
    # Text of a rejected row; {token} and {prompt} are replaced. HPS v1 style: "{token}{prompt}"
    # with negative_token "Weird image. " (their prefix carries its own trailing space).
    rejected_format: str = "{token} {prompt}"
    include_rejected: bool = True
    keep_pairs: bool = False  # also write output_dir/pairs: the chosen/rejected pairs (pairwise objectives)
    # Ablation: the worst image of a prompt becomes "chosen" and the best "rejected" (a sanity
    # check of the whole loop: a model tuned on swapped pairs should move against the reward).
    swap_chosen_rejected: bool = False
    # Its control: two images of each prompt drawn at random (seeded, by image_id) take the roles,
    # so a fine-tune on them shows what tuning on the pool does without the reward's direction.
    # With swap_chosen_rejected too: the mirror of that draw (the same pairs, roles reversed). A
    # single draw carries a direction of its own, which a pairwise objective learns; the draw and
    # its mirror move the model opposite ways, and their mean leaves what fine-tuning itself does.
    random_roles: bool = False
    min_images_per_prompt: int = 2
    # Pairs per prompt: the i-th best image against the i-th worst, i < pairs_per_prompt. 1 = the
    # paper: best against worst. Each role takes at most max_pair_share of a prompt's images (at
    # least one; 0.5: no image takes both roles), so 0.25 keeps pairs to the best and worst quarter.
    pairs_per_prompt: int = 1
    max_pair_share: float = 0.5
    # HPS v1 confidence filter (None = off; HPS v1 used 2): keep the best image only if its
    # softmax(scores / T) probability within its prompt is > k/N, the worst only if its
    # softmax(-scores / T) probability is > k/N (N = valid images of the prompt).
    confidence_k: Optional[float] = None
    # HPS v1 applied the softmax to 100 * cosine (T = 1 on that scale); for raw cosine
    # scores (~0.2) use 0.01 to reproduce it.
    confidence_temperature: float = 1.0
    max_rejected_ratio: Optional[float] = None  # at most ratio * chosen rejected rows (seeded subsample)
    # At most this many pairs (None = all): those whose chosen image out-scores its rejected one by
    # the most, over all prompts, so prompts where the reward is surest give more pairs. With
    # random_roles a seeded draw of as many pairs (the scores give no order), the same for its mirror.
    max_pairs: Optional[int] = None
    regularization: Optional[str] = None  # imagefolder, parquet, webdataset tar folder, or `datasets` id
    regularization_format: str = "auto"  # auto | imagefolder | parquet | webdataset | hub
    regularization_share: float = 0.5  # of the final set; the paper used half LAION
    regularization_caption_column: Optional[str] = None  # default: caption, text, TEXT, prompt, Prompt
    regularization_image_column: Optional[str] = None  # parquet / hub; default: image, jpg, png, path, ...
    regularization_split: str = "train"  # hub datasets only
    on_short_regularization: str = "error"  # error | warn (warn: use all there is)
    check_files: bool = True  # skip (and count) images whose file is gone
    # false: the dataset stores image paths (lazy, no copy; keep the image folders in place);
    # true: the images are copied into the dataset (self-contained, portable, as large as the images)
    embed_images: bool = False
    # Prompts kept out of the fine-tune set for evaluation, written to output_dir/held_out.txt: a
    # share of the manifest's prompts, or a number of them; picked by a seeded hash of the prompt id
    held_out_share: float = 0.0
    held_out_prompts: int = 0
    seed: int = 0
    output_dir: str = "runs/pairs"
    # a config layer (file, command line) that sizes the held-out split one way drops the other way
    EXCLUSIVE: ClassVar[tuple[tuple[str, ...], ...]] = (("held_out_share", "held_out_prompts"),)

    def validate(self) -> None:
        require(bool(self.reward_column), "reward_column", "must name a scores column")
        require(self.min_images_per_prompt >= 2, "min_images_per_prompt", f"must be >= 2 (chosen and rejected are different images), got {self.min_images_per_prompt}")
        require(self.pairs_per_prompt >= 1, "pairs_per_prompt", f"must be >= 1, got {self.pairs_per_prompt}")
        require(0 < self.max_pair_share <= 0.5, "max_pair_share", f"must be in (0, 0.5] (chosen and rejected are different images), got {self.max_pair_share}")
        require(self.confidence_k is None or self.confidence_k > 0, "confidence_k", f"must be positive or null, got {self.confidence_k}")
        require(not (self.random_roles and self.confidence_k is not None), "random_roles", "ignores the scores, so the confidence filter (confidence_k) cannot apply; set confidence_k: null")
        require(self.confidence_temperature > 0, "confidence_temperature", f"must be positive, got {self.confidence_temperature}")
        require(self.max_pairs is None or self.max_pairs >= 1, "max_pairs", f"must be >= 1 or null, got {self.max_pairs}")
        require(self.max_rejected_ratio is None or self.max_rejected_ratio >= 0, "max_rejected_ratio", f"must be >= 0 or null, got {self.max_rejected_ratio}")
        require(0 <= self.regularization_share < 1, "regularization_share", f"must be in [0, 1), got {self.regularization_share}")
        require(self.on_short_regularization in ("error", "warn"), "on_short_regularization", f"must be 'error' or 'warn', got '{self.on_short_regularization}'")
        require(0 <= self.held_out_share < 1, "held_out_share", f"must be in [0, 1), got {self.held_out_share}")
        require(self.held_out_prompts >= 0, "held_out_prompts", f"must be >= 0, got {self.held_out_prompts}")
        require(not (self.held_out_share and self.held_out_prompts), "held_out_share", "and held_out_prompts both size the held-out split; set one")
        require(self.regularization_format in REGULARIZATION_FORMATS, "regularization_format", f"must be one of {REGULARIZATION_FORMATS}, got '{self.regularization_format}'")
        try:
            sample = self.rejected_format.format(token="<t>", prompt="<p>")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"rejected_format: '{self.rejected_format}' must use only {{token}} and {{prompt}} ({exc!r})") from None
        require("<p>" in sample, "rejected_format", f"'{self.rejected_format}' must contain {{prompt}}")


def rejected_text(cfg: PairsConfig, prompt: str) -> str:
    """The caption of a rejected image: the prompt tagged with the negative token."""
    return cfg.rejected_format.format(token=cfg.negative_token, prompt=prompt)


def _arrow(values) -> "pa.Array":
    import pyarrow as pa

    arr = pa.array(values) if not isinstance(values, (pa.Array, pa.ChunkedArray)) else values
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def _require_columns(df: pd.DataFrame, columns: list[str], source: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise PairsError(f"{source}: missing column(s) {', '.join(missing)} (columns: {', '.join(map(str, df.columns))})")


def best_and_worst(manifest: pd.DataFrame, scores: pd.DataFrame, cfg: PairsConfig, check_files: Optional[bool] = None, sources: tuple[str, str] = ("manifest", "scores")) -> tuple[pd.DataFrame, dict[str, int]]:
    """One row per pair: a usable prompt's best and worst valid image (with ``pairs_per_prompt`` > 1
    also its second best and second worst, ...), with confidence flags; plus skip counts.

    Images rank by score (high first), ties by ``image_id`` (smaller first): chosen is the first
    image of that order, rejected the last, so they always differ. With ``random_roles`` they rank
    by a hash of ``image_id`` and the seed instead, which no input order changes.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    check_files = cfg.check_files if check_files is None else check_files
    manifest_src, scores_src = sources
    _require_columns(manifest, ["image_id", "prompt_id", "prompt", "path"], manifest_src)
    _require_columns(scores, ["image_id"], scores_src)
    if cfg.reward_column not in scores.columns:
        available = [str(c) for c in scores.columns if c != "image_id"]
        raise PairsError(f"{scores_src}: no reward column '{cfg.reward_column}' (available: {', '.join(available) or 'none'}); set reward_column")
    refuse_eval_only(cfg.reward_column, f"{scores_src}: reward_column", scores, PairsError)
    skipped = dict.fromkeys(SKIP_REASONS, 0)

    manifest_ids = _arrow(manifest["image_id"])
    if pc.count_distinct(manifest_ids).as_py() != len(manifest_ids):
        dup = manifest["image_id"][manifest["image_id"].duplicated()].iloc[0]
        raise PairsError(f"{manifest_src}: image_id '{dup}' appears more than once")
    score_ids = _arrow(scores["image_id"])
    try:
        values = scores[cfg.reward_column].to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError):
        raise PairsError(f"{scores_src}: reward column '{cfg.reward_column}' is not numeric (dtype {scores[cfg.reward_column].dtype})") from None
    if manifest["prompt_id"].isna().any():
        row = int(np.flatnonzero(manifest["prompt_id"].isna().to_numpy())[0])
        raise PairsError(f"{manifest_src}: row {row} (image_id '{manifest['image_id'].iloc[row]}') has no prompt_id")
    pos = pc.index_in(score_ids, value_set=manifest_ids).to_numpy(zero_copy_only=False)
    known = ~np.isnan(pos) if pos.dtype.kind == "f" else np.ones(len(pos), dtype=bool)
    skipped["score_rows_not_in_manifest"] = int((~known).sum())
    pos, values = pos[known].astype(np.int64), values[known]
    first = np.zeros(len(manifest), dtype=bool)
    order = np.argsort(pos, kind="stable")
    is_first = np.ones(len(pos), dtype=bool)
    is_first[order[1:]] = pos[order[1:]] != pos[order[:-1]]
    skipped["duplicate_score_rows"] = int((~is_first).sum())
    pos, values = pos[is_first], values[is_first]
    first[pos] = True
    skipped["images_without_score"] = int(len(manifest) - first.sum())
    finite = np.isfinite(values)
    skipped["images_nonfinite_score"] = int((~finite).sum())
    pos, values = pos[finite], values[finite]
    paths = _arrow(manifest["path"])
    if check_files:
        exists = np.fromiter((os.path.exists(p) for p in paths.take(pa.array(pos)).to_pylist()), dtype=bool, count=len(pos))
        skipped["images_file_missing"] = int((~exists).sum())
        pos, values = pos[exists], values[exists]

    prompt_codes = _arrow(manifest["prompt_id"]).dictionary_encode()
    codes = prompt_codes.indices.to_numpy(zero_copy_only=False)
    prompt_ids = prompt_codes.dictionary
    group = codes[pos]
    counts = np.bincount(group, minlength=len(prompt_ids))
    skipped["prompts_too_few_images"] = int((counts < cfg.min_images_per_prompt).sum())
    enough = counts[group] >= cfg.min_images_per_prompt
    pos, values, group = pos[enough], values[enough], group[enough]

    # One sort: prompt, then score descending, then image_id ascending (rank of the string).
    kept_ids = manifest_ids.take(pa.array(pos))
    id_rank = pc.rank(kept_ids, sort_keys="ascending", tiebreaker="min").to_numpy(zero_copy_only=False)
    rank_key = _random_key(kept_ids, cfg.seed) if cfg.random_roles else -values
    order = np.lexsort((id_rank, rank_key, group))
    pos, values, group = pos[order], values[order], group[order]
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]]) if len(group) else np.zeros(0, dtype=np.int64)
    ends = np.r_[starts[1:], len(group)][: len(starts)] - 1
    n = (ends - starts + 1).astype(np.int64)
    # pair j of a prompt: its j-th best image against its j-th worst (j < pairs_per_prompt, <= n x max_pair_share)
    per_group = np.minimum(cfg.pairs_per_prompt, np.maximum(1, np.floor(n * cfg.max_pair_share + 1e-9).astype(np.int64)))
    owner = np.repeat(np.arange(len(starts)), per_group)
    rank = np.arange(len(owner)) - np.repeat(np.cumsum(per_group) - per_group, per_group)
    chosen_at, rejected_at = starts[owner] + rank, ends[owner] - rank
    best, worst = values[chosen_at], values[rejected_at]
    keep_best = np.ones(len(owner), dtype=bool)
    keep_worst = np.ones(len(owner), dtype=bool)
    p_best = p_worst = np.full(len(owner), np.nan)
    if cfg.confidence_k is not None and len(starts):
        # softmax probability of an image within its prompt = exp(±(s - s_top) / T) / sum_i exp(±(s_i - s_top) / T);
        # exponents <= 0, no overflow
        t = cfg.confidence_temperature
        top, bottom = values[starts], values[ends]
        p_top = 1.0 / np.add.reduceat(np.exp((values - np.repeat(top, n)) / t), starts)
        p_bottom = 1.0 / np.add.reduceat(np.exp((np.repeat(bottom, n) - values) / t), starts)
        p_best = p_top[owner] * np.exp((best - top[owner]) / t)
        p_worst = p_bottom[owner] * np.exp((bottom[owner] - worst) / t)
        keep_best = p_best > cfg.confidence_k / n[owner]
        keep_worst = p_worst > cfg.confidence_k / n[owner]
        skipped["chosen_low_confidence"] = int((~keep_best).sum())
        skipped["rejected_low_confidence"] = int((~keep_worst).sum())

    if cfg.max_pairs is not None and len(owner) > cfg.max_pairs:
        # ascending: the largest gaps first (ties to the earlier pair); with random_roles a seeded order
        order_key = ~_random_key(manifest_ids.take(pa.array(pos[chosen_at])), cfg.seed + 1) if cfg.random_roles else -(best - worst)
        kept = np.sort(np.argsort(order_key, kind="stable")[: cfg.max_pairs])
        skipped["pairs_below_gap_cut"] = len(owner) - len(kept)
        owner, chosen_at, rejected_at, best, worst = owner[kept], chosen_at[kept], rejected_at[kept], best[kept], worst[kept]
        keep_best, keep_worst, p_best, p_worst = keep_best[kept], keep_worst[kept], p_best[kept], p_worst[kept]
    chosen_pos, rejected_pos = pa.array(pos[chosen_at]), pa.array(pos[rejected_at])
    prompts = _arrow(manifest["prompt"])

    def take(column, rows):  # only the picked rows become Python objects
        return column.take(rows).to_pandas()

    per_prompt = pd.DataFrame(
        {
            "prompt_id": take(prompt_ids, pa.array(group[starts][owner])),
            "prompt": take(prompts, chosen_pos),
            "n_images": n[owner],
            "chosen_image_id": take(manifest_ids, chosen_pos),
            "chosen_path": take(paths, chosen_pos),
            "chosen_score": best,
            "chosen_confidence": p_best,
            "chosen_kept": keep_best,
            "rejected_image_id": take(manifest_ids, rejected_pos),
            "rejected_path": take(paths, rejected_pos),
            "rejected_score": worst,
            "rejected_confidence": p_worst,
            "rejected_kept": keep_worst,
        }
    )
    per_prompt["prompt_id"] = per_prompt["prompt_id"].astype(str)
    if cfg.swap_chosen_rejected:
        per_prompt = per_prompt.rename(columns=_swapped_role)
    return per_prompt, skipped


def _random_key(image_ids, seed: int) -> np.ndarray:
    """A seeded pseudo-random number per image, from its id alone (the same on every machine)."""
    ids = pd.Series(image_ids.to_pandas(), dtype=str) + f"#{seed}"
    return pd.util.hash_pandas_object(ids, index=False).to_numpy()


def held_out_rank(prompt_ids: Iterable[str], seed: int) -> np.ndarray:
    """A number in [0, 1) per prompt id, from a seeded sha256 of the id alone: the same on every
    rerun and machine, whatever the manifest's row order or the world size that generated it."""
    salt = f"sr-finetune/held-out/{seed}/"
    return np.array([(int.from_bytes(hashlib.sha256(f"{salt}{i}".encode()).digest()[:8], "big") >> 11) / 2**53 for i in prompt_ids], dtype=np.float64)


def held_out_prompt_ids(prompt_ids: Iterable[str], cfg: PairsConfig) -> set[str]:
    """The prompt ids kept out of the fine-tune set: those ranked below ``held_out_share``, or the
    ``held_out_prompts`` lowest ranks (equal ranks by id); none when both are 0."""
    if not (cfg.held_out_share or cfg.held_out_prompts):
        return set()
    ids = np.array(sorted(set(map(str, prompt_ids))), dtype=object)
    rank = held_out_rank(ids, cfg.seed)
    if cfg.held_out_prompts:
        if cfg.held_out_prompts >= len(ids):
            raise PairsError(f"held_out_prompts: {cfg.held_out_prompts} leaves no prompt to fine-tune on (the manifest has {len(ids)} prompts)")
        return set(ids[np.argsort(rank, kind="stable")[: cfg.held_out_prompts]])
    return set(ids[rank < cfg.held_out_share])


def split_held_out(manifest: pd.DataFrame, cfg: PairsConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the manifest rows left to fine-tune on, the held-out rows). A prompt whose text is also a
    held-out prompt's, under another id, is held out with it: no held-out text is trained on."""
    has_id = manifest["prompt_id"].notna()
    ids = manifest["prompt_id"].astype(str)
    held = has_id & ids.isin(held_out_prompt_ids(ids[has_id].unique(), cfg))
    held |= manifest["prompt"].isin(set(manifest.loc[held, "prompt"].dropna()))
    return manifest[~held], manifest[held]


def write_held_out(held_out: pd.DataFrame, path: Path) -> int:
    """Write the held-out prompts as a prompt file, one per line in prompt-id order (line breaks
    inside a prompt become spaces); returns the number of lines."""
    rows = held_out.assign(_id=held_out["prompt_id"].astype(str)).drop_duplicates("_id").sort_values("_id", kind="stable")
    lines = [" ".join(part.strip() for part in prompt.splitlines() if part.strip()) for prompt in rows["prompt"] if isinstance(prompt, str)]
    lines = list(dict.fromkeys(line for line in lines if line))
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return len(lines)


def _swapped_role(column: str) -> str:
    for old, new in (("chosen_", "rejected_"), ("rejected_", "chosen_")):
        if column.startswith(old):
            return new + column[len(old):]
    return column


def _long_rows(per_prompt: pd.DataFrame, role: str, cfg: PairsConfig) -> pd.DataFrame:
    prompts = per_prompt["prompt"]
    text = prompts if role == "chosen" else pd.Series([rejected_text(cfg, p) for p in prompts], index=prompts.index, dtype=object)
    return pd.DataFrame(
        {
            "image_id": per_prompt[f"{role}_image_id"],
            "prompt_id": per_prompt["prompt_id"],
            "prompt": prompts,
            "path": per_prompt[f"{role}_path"],
            "score": per_prompt[f"{role}_score"],
            "role": role,
            "text": text,
            "n_images": per_prompt["n_images"],
            "_prompt_order": per_prompt.index.to_numpy(),
        }
    )


def select_pairs(manifest: pd.DataFrame, scores: pd.DataFrame, cfg: PairsConfig, check_files: Optional[bool] = None) -> tuple[pd.DataFrame, dict[str, int]]:
    """The chosen and rejected rows (``PAIR_COLUMNS``) of a scored manifest, and skip counts by reason."""
    per_prompt, skipped = best_and_worst(manifest, scores, cfg, check_files)
    return pairs_from_prompts(per_prompt, skipped, cfg)


def pairs_from_prompts(per_prompt: pd.DataFrame, skipped: dict[str, int], cfg: PairsConfig) -> tuple[pd.DataFrame, dict[str, int]]:
    """Long chosen/rejected rows from ``best_and_worst``'s per-prompt table (confidence filter, ratio cap)."""
    skipped = dict(skipped)
    per_prompt = per_prompt.reset_index(drop=True)
    chosen = _long_rows(per_prompt[per_prompt["chosen_kept"]], "chosen", cfg)
    parts = [chosen]
    if cfg.include_rejected:
        rejected = _long_rows(per_prompt[per_prompt["rejected_kept"]], "rejected", cfg)
        if cfg.max_rejected_ratio is not None:
            allowed = math.floor(cfg.max_rejected_ratio * len(chosen) + 1e-9)
            if len(rejected) > allowed:
                keep = np.sort(np.random.default_rng(cfg.seed).choice(len(rejected), size=allowed, replace=False))
                skipped["rejected_over_ratio_cap"] = len(rejected) - allowed
                rejected = rejected.iloc[keep]
        parts.append(rejected)
    pairs = pd.concat(parts, ignore_index=True)
    pairs["_role_order"] = (pairs["role"] == "rejected").astype(np.int8)
    pairs = pairs.sort_values(["_prompt_order", "_role_order"], kind="stable").reset_index(drop=True)
    return pairs[PAIR_COLUMNS], skipped


def pairwise_table(per_prompt: pd.DataFrame, cfg: PairsConfig) -> pd.DataFrame:
    """One row per prompt whose best and worst images both pass the confidence filter (pairwise objectives)."""
    both = per_prompt[per_prompt["chosen_kept"] & per_prompt["rejected_kept"]]
    return pd.DataFrame(
        {
            "prompt_id": both["prompt_id"],
            "prompt": both["prompt"],
            "chosen_image": both["chosen_path"],
            "rejected_image": both["rejected_path"],
            "chosen_text": both["prompt"],
            "rejected_text": [rejected_text(cfg, p) for p in both["prompt"]],
            "chosen_score": both["chosen_score"],
            "rejected_score": both["rejected_score"],
            "chosen_image_id": both["chosen_image_id"],
            "rejected_image_id": both["rejected_image_id"],
            "n_images": both["n_images"],
        }
    ).reset_index(drop=True)


def regularization_count(n_preference: int, share: float) -> int:
    """Regularisation rows so that they are ``share`` of the final set (share 0.5: as many as preference rows)."""
    return int(round(n_preference * share / (1.0 - share))) if share > 0 else 0


def read_scores_table(source: str | os.PathLike, reward_column: Optional[str] = None) -> pd.DataFrame:
    """Scores from a parquet file, a folder of ``part-*.parquet``, or a scoring output folder (``scores/``)."""
    import pyarrow.parquet as pq

    path = Path(source)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(path.glob("part-*.parquet")) or sorted((path / "scores").glob("part-*.parquet"))
        if not files:
            raise PairsError(f"{path}: no part-*.parquet files (nor scores/part-*.parquet)")
    else:
        raise PairsError(f"scores not found: {path}")
    names = pq.read_schema(files[0]).names
    columns = ["image_id", reward_column] if reward_column in names and "image_id" in names else None  # else let the checks report
    try:
        table = pd.concat([pd.read_parquet(f, columns=columns) for f in files], ignore_index=True)
    except Exception as exc:
        raise PairsError(f"{path}: cannot read scores: {str(exc).splitlines()[0]}") from None
    marked = {m for f in files for m in (pq.read_schema(f).pandas_metadata or {}).get("attributes", {}).get(EVAL_ONLY_KEY, [])}
    table.attrs[EVAL_ONLY_KEY] = sorted(marked)
    return table


def read_generations(folder: str | os.PathLike) -> pd.DataFrame:
    """The manifest of a generations folder with absolute image paths (``image_id, prompt_id, prompt, path``)."""
    folder = Path(folder)
    merged = folder / "manifest.parquet"
    if merged.exists():
        df = pd.read_parquet(merged, columns=["image_id", "prompt_id", "prompt", "path"])
    elif (folder / "manifest").is_dir():
        df = read_parts(folder / "manifest")[["image_id", "prompt_id", "prompt", "path"]]
    else:
        raise PairsError(f"{folder}: no manifest.parquet (is it a `generate` output folder?)")
    root = os.path.abspath(folder)
    df["path"] = [p if os.path.isabs(p) else os.path.join(root, p) for p in df["path"]]
    return df


@dataclass
class PairsSummary:
    output_dir: str
    counts: dict  # role -> rows in the fine-tune set
    skipped: dict  # reason -> count (see SKIP_REASONS)
    prompts: int  # distinct prompts in the manifest
    images: int  # manifest rows
    pairs: Optional[int]  # rows of output_dir/pairs when keep_pairs
    regularization: dict = field(default_factory=dict)  # source, format, available, wanted, used, skipped
    held_out: dict = field(default_factory=dict)  # prompts (lines of the file), images, file; empty when off
    seconds: float = 0.0

    def line(self) -> str:
        roles = ", ".join(f"{self.counts.get(r, 0)} {r}" for r in ROLES)
        skips = ", ".join(f"{k} {v}" for k, v in self.skipped.items() if v) or "nothing"
        pairs = f", {self.pairs} pairs" if self.pairs is not None else ""
        held_out = f"; held out: {self.held_out['prompts']} prompts -> {self.output_dir}/{self.held_out['file']}" if self.held_out else ""
        return f"build-pairs: {self.prompts} prompts, {self.images} images -> {roles}{pairs}; skipped: {skips}{held_out} -> {self.output_dir} ({self.seconds:.1f}s)"


def _image_array(values: list[dict]):
    import pyarrow as pa

    return pa.StructArray.from_arrays(
        [pa.array([v["bytes"] for v in values], type=pa.binary()), pa.array([v["path"] for v in values], type=pa.string())],
        names=["bytes", "path"],
    )


def _write_dataset(batches, spec: dict, folder: Path, scratch: Path, embed_images: bool, bar) -> int:
    """Stream record batches into an Arrow file, then ``save_to_disk`` it (images never all in memory).

    ``save_to_disk`` copies the files behind Image paths into the dataset. To keep paths (lazy
    loading, no copy of a million images) the image columns are written as plain
    ``{bytes, path}`` structs, the Image type's storage, and declared Image in ``dataset_info.json``.
    """
    import datasets
    import pyarrow as pa

    scratch.mkdir(parents=True, exist_ok=True)
    arrow_file = scratch / "rows.arrow"
    features = _features(spec, images_as_structs=not embed_images)
    schema = features.arrow_schema
    with pa.OSFile(str(arrow_file), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in batches:
            writer.write_table(pa.Table.from_pydict(batch, schema=schema))
            bar.update(len(batch["prompt_id"]))
    ds = datasets.Dataset.from_file(str(arrow_file), info=datasets.DatasetInfo(features=features))
    ds.save_to_disk(str(folder))
    n = len(ds)
    del ds
    arrow_file.unlink()
    if not embed_images:
        info_file = folder / "dataset_info.json"
        info = json.loads(info_file.read_text())
        info["features"] = _features(spec).to_dict()
        info_file.write_text(json.dumps(info, indent=2))
    return n


FEATURES_SPEC = {"image": "image", "text": "string", "role": "string", "prompt_id": "string", "score": "float64", "image_id": "string"}


def _features(spec: dict, images_as_structs: bool = False):
    import datasets

    image = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")} if images_as_structs else datasets.Image()
    return datasets.Features({k: image if v == "image" else datasets.Value(v) for k, v in spec.items()})


def _set_batches(pairs: pd.DataFrame, reg: Optional[RegularizationSet], reg_rows: Optional[pd.DataFrame]):
    for start in range(0, len(pairs), WRITE_CHUNK_ROWS * 64):  # path-only rows: cheap, large chunks
        chunk = pairs.iloc[start : start + WRITE_CHUNK_ROWS * 64]
        yield {
            "image": _image_array([{"bytes": None, "path": p} for p in chunk["path"]]),
            "text": chunk["text"].tolist(),
            "role": chunk["role"].tolist(),
            "prompt_id": chunk["prompt_id"].tolist(),
            "score": chunk["score"].astype(float).tolist(),
            "image_id": chunk["image_id"].astype(str).tolist(),
        }
    if reg_rows is None:
        return
    for start in range(0, len(reg_rows), WRITE_CHUNK_ROWS):
        chunk = reg_rows.iloc[start : start + WRITE_CHUNK_ROWS]
        yield {
            "image": _image_array(image_values(reg, chunk)),
            "text": chunk["text"].tolist(),
            "role": ["regularization"] * len(chunk),
            "prompt_id": [None] * len(chunk),
            "score": [None] * len(chunk),
            "image_id": chunk["key"].tolist(),
        }


def _pair_batches(table: pd.DataFrame):
    for start in range(0, len(table), WRITE_CHUNK_ROWS * 64):
        chunk = table.iloc[start : start + WRITE_CHUNK_ROWS * 64]
        batch = {c: chunk[c].tolist() for c in chunk.columns if c not in ("chosen_image", "rejected_image")}
        batch["chosen_image"] = _image_array([{"bytes": None, "path": p} for p in chunk["chosen_image"]])
        batch["rejected_image"] = _image_array([{"bytes": None, "path": p} for p in chunk["rejected_image"]])
        yield batch


PAIRS_FEATURES_SPEC = {
    "prompt_id": "string", "prompt": "string", "chosen_image": "image", "rejected_image": "image", "chosen_text": "string", "rejected_text": "string",
    "chosen_score": "float64", "rejected_score": "float64", "chosen_image_id": "string", "rejected_image_id": "string", "n_images": "int64",
}  # fmt: skip


def _mix_regularization(cfg: PairsConfig, n_preference: int) -> tuple[Optional[RegularizationSet], Optional[pd.DataFrame], dict]:
    if not cfg.regularization or cfg.regularization_share == 0:
        return None, None, {}
    reg = read_regularization(cfg.regularization, cfg.regularization_format, cfg.regularization_caption_column, cfg.regularization_image_column, cfg.regularization_split, cfg.check_files)
    wanted = regularization_count(n_preference, cfg.regularization_share)
    info = {"source": reg.source, "format": reg.format, "available": len(reg), "wanted": wanted, "skipped": reg.skipped}
    if len(reg) < wanted:
        message = f"regularisation set {reg.source} has {len(reg)} usable image-caption pairs, {wanted} wanted for share {cfg.regularization_share} of {n_preference} preference rows"
        if cfg.on_short_regularization == "error":
            raise PairsError(message + " (lower regularization_share, or set on_short_regularization: warn to use all)")
        logger.warning("%s; using all %d", message, len(reg))
    rows = sample_rows(reg, wanted, cfg.seed)
    info["used"] = len(rows)
    return reg, rows, info


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished build into place; an earlier build there (it has summary.json) is replaced."""
    if final.exists():
        if not (final / "summary.json").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            raise PairsError(f"{final}: exists and is not a pair-builder output; use another output_dir")
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


@quiet_library_bars()
def build_pairs(cfg: PairsConfig) -> PairsSummary:
    """Read generations + scores (+ a regularisation source), select pairs, write the fine-tune set."""
    if not cfg.generations:
        raise ConfigError("config error: pairs.generations is required (the folder written by `generate`)")
    if not cfg.scores:
        raise ConfigError("config error: pairs.scores is required (a scores parquet or folder written by `score`)")
    start = time.perf_counter()
    if cfg.random_roles:
        mirror = " (mirrored by swap_chosen_rejected: the same draw with its roles reversed)" if cfg.swap_chosen_rejected else ""
        logger.warning("build-pairs: random_roles=true (control): two images of each prompt drawn at random are chosen and rejected%s; the scores are not used", mirror)
    elif cfg.swap_chosen_rejected:
        logger.warning("build-pairs: swap_chosen_rejected=true (ablation): each prompt's worst image is chosen, its best rejected")
    manifest = read_generations(cfg.generations)
    scores = read_scores_table(cfg.scores, cfg.reward_column)
    tuning, held_out = split_held_out(manifest, cfg)
    if len(held_out):  # their scores are not "rows not in the manifest"
        scores = scores[~scores["image_id"].isin(held_out["image_id"])]
    per_prompt, skipped = best_and_worst(tuning, scores, cfg, sources=(str(Path(cfg.generations) / "manifest.parquet"), str(cfg.scores)))
    pairs, skipped = pairs_from_prompts(per_prompt, skipped, cfg)
    if pairs.empty:
        reasons = ", ".join(f"{k} {v}" for k, v in skipped.items() if v) or "no rows"
        held = f", {len(held_out)} of them held out" if len(held_out) else ""
        raise PairsError(f"no prompt left to make pairs from ({len(manifest)} manifest images{held}; skipped: {reasons})")
    reg, reg_rows, reg_info = _mix_regularization(cfg, len(pairs))

    final = Path(cfg.output_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    scratch = final.with_name(f".{final.name}.scratch-{os.getpid()}")
    table = pairwise_table(per_prompt, cfg) if cfg.keep_pairs else None
    rows = len(pairs) + (0 if reg_rows is None else len(reg_rows)) + (0 if table is None else len(table))
    try:
        with progress(desc="build-pairs", total=rows, unit="row") as bar:
            _write_dataset(_set_batches(pairs, reg, reg_rows), FEATURES_SPEC, tmp, scratch, cfg.embed_images, bar)
            n_pairs = None if table is None else _write_dataset(_pair_batches(table), PAIRS_FEATURES_SPEC, tmp / "pairs", scratch, cfg.embed_images, bar)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    held_out_info = {}
    if cfg.held_out_share or cfg.held_out_prompts:
        held_out_info = {"prompts": write_held_out(held_out, tmp / HELD_OUT_FILE), "images": len(held_out), "file": HELD_OUT_FILE}
        if not held_out_info["prompts"]:
            logger.warning("build-pairs: held_out_share=%s holds out none of the %d prompts; %s is empty", cfg.held_out_share, manifest["prompt_id"].nunique(), HELD_OUT_FILE)
    counts = pairs["role"].value_counts().reindex(list(ROLES), fill_value=0).to_dict()
    counts["regularization"] = 0 if reg_rows is None else len(reg_rows)
    summary = PairsSummary(
        output_dir=str(final),
        counts={k: int(v) for k, v in counts.items()},
        skipped={k: int(v) for k, v in skipped.items()},
        prompts=int(manifest["prompt_id"].nunique()),
        images=len(manifest),
        pairs=n_pairs,
        regularization=reg_info,
        held_out=held_out_info,
        seconds=time.perf_counter() - start,
    )
    (tmp / "summary.json").write_text(json.dumps({**asdict(summary), "total": sum(summary.counts.values()), "config": asdict(cfg)}, indent=2))
    _replace_dir(tmp, final)
    return summary
