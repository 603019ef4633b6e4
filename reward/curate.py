"""Curation: engagement logs -> (prompt, positive image, negative image) triplets (Social Reward, section 3).

Inputs (parquet or CSV; see the README for the schema): the images table, the remix events, the
views each image got before its first remix (a column of the images table or a view-events table)
and the influencers' user ids. The procedure, every threshold a ``CurateConfig`` value:

1. **Remix counts.** An image's window count is its remix events at most ``remix_window_days``
   after posting (None: all events); events before posting are dropped and counted.
2. **Positives.** Content signal: images whose window count is in the top ``content_top_share``
   (1%) of all valid images. Tie rule: with ``n`` images, the count threshold is the
   ``ceil(share * n)``-th largest window count (at least 1), and every image with a count at or
   above it is positive, so ties at the threshold are all in and the positive share may exceed the
   nominal share. Creator signal: images remixed within the window by at least
   ``min_influencer_remixes`` influencers' remix events.
3. **Exposure threshold.** Over the prompts of the positives, the ``exposure_percentile``-th
   percentile (numpy's linear interpolation) of views-before-first-remix of every image with at
   least one remix (any time).
4. **Negatives.** Images of those prompts with no remix at all (any time) and at least the
   threshold views: enough exposure that "no remix" means something.
5. **Filters.** Images flagged by ``filter_column`` (or a ``content_filter`` callable) never
   become positives or negatives (they still count in the thresholds, which describe the
   platform); prompts left with no positive or no negative are dropped, counted by reason.
6. **Pairs and splits.** Within each prompt every positive meets every negative, or at most
   ``max_triplets_per_prompt`` pairs: positives and negatives are shuffled by a seeded hash of
   their ids and paired in a balanced order (every positive and every negative is used as evenly
   as the cap allows). Prompts are split train/val/test (70/10/20) by a seeded hash of the prompt
   text, so no prompt is in two splits. Nothing depends on the order of the input rows.

Columnar throughout (pyarrow hashing, numpy bincounts and sorts), linear in the log size:
``benchmarks/bench_curate.py`` curates 2M images and 5M remix events.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from sr_finetune.config import require, to_yaml
from sr_finetune.errors import ConfigError, UserError
from sr_finetune.io import atomic_write_parquet

from .triplets import SPLITS, TRIPLET_COLUMNS, resolve_paths

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ["image_id", "prompt", "path", "user_id", "posted_at"]
REMIX_COLUMNS = ["image_id", "remixer_user_id", "at"]
VIEW_COLUMNS = ["image_id", "at"]
# Everything curation can drop, in pipeline order (units: rows, events, images, prompts or triplets).
SKIP_REASONS = (
    "image_rows_missing_image_id",  # null or blank image_id
    "image_rows_missing_prompt",
    "image_rows_missing_path",
    "image_rows_bad_posted_at",  # missing or not a timestamp
    "duplicate_image_rows",  # repeated image_id (first row kept)
    "remix_events_missing_value",  # null or blank image_id or remixer_user_id
    "remix_events_bad_at",
    "remix_events_unknown_image",  # image_id not among the valid images
    "remix_events_before_post",  # at < the image's posted_at
    "view_events_missing_value",
    "view_events_bad_at",
    "view_events_unknown_image",
    "images_views_missing",  # images of positive prompts without a views-before-first-remix value
    "positives_content_filtered",
    "negatives_content_filtered",
    "prompts_without_positive",  # positive prompts whose positives were all filtered out
    "prompts_without_negative",  # positive prompts with no negative
    "triplets_over_cap",  # beyond max_triplets_per_prompt
)
NS_PER_DAY = 86_400 * 10**9


class CurationError(UserError):
    """Engagement logs that cannot make triplets."""


@dataclass
class CurateConfig:
    """Settings of the curation stage (``curate:`` in a recipe config); defaults are the paper's."""

    images: Optional[str] = None  # image_id, prompt, path, user_id, posted_at (+ views column, filter column)
    remixes: Optional[str] = None  # image_id, remixer_user_id, at
    views: Optional[str] = None  # view events (image_id, at); default: the images table's views_column
    views_column: str = "views_before_first_remix"
    influencers: Optional[str] = None  # text file, one user id per line
    influencer_ids: list[str] = field(default_factory=list)  # or (also) listed here
    image_root: Optional[str] = None  # folder relative paths are resolved against (default: the images table's)
    remix_window_days: Optional[float] = None  # remixes counted for the signals: within this many days of posting (None: all)
    use_content_signal: bool = True
    content_top_share: float = 0.01  # top 1% by window remix count
    use_creator_signal: bool = True
    min_influencer_remixes: int = 1  # remixed at least once by an influencer
    exposure_percentile: float = 99.0
    filter_column: Optional[str] = None  # boolean column of the images table; true = never a positive or negative
    max_triplets_per_prompt: Optional[int] = None  # None: every positive x negative pair of a prompt
    val_share: float = 0.1
    test_share: float = 0.2
    seed: int = 0
    output_dir: str = "runs/curate"

    def validate(self) -> None:
        require(self.use_content_signal or self.use_creator_signal, "use_content_signal", "at least one of use_content_signal and use_creator_signal must be true")
        require(0 < self.content_top_share <= 1, "content_top_share", f"must be in (0, 1], got {self.content_top_share}")
        require(self.min_influencer_remixes >= 1, "min_influencer_remixes", f"must be >= 1, got {self.min_influencer_remixes}")
        require(0 <= self.exposure_percentile <= 100, "exposure_percentile", f"must be in [0, 100], got {self.exposure_percentile}")
        require(self.remix_window_days is None or self.remix_window_days >= 0, "remix_window_days", f"must be >= 0 or null, got {self.remix_window_days}")
        require(self.max_triplets_per_prompt is None or self.max_triplets_per_prompt >= 1, "max_triplets_per_prompt", f"must be >= 1 or null, got {self.max_triplets_per_prompt}")
        require(self.val_share >= 0 and self.test_share >= 0 and self.val_share + self.test_share < 1, "test_share", f"val_share + test_share must be in [0, 1), got {self.val_share} + {self.test_share}")
        require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        require(bool(self.views_column), "views_column", "must name a column")


# ---------------------------------------------------------------- reading


def _header(path: Path, delimiter: str) -> list[str]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return next(csv.reader(f, delimiter=delimiter), [])


def read_log_table(source: str | os.PathLike, required: Sequence[str], optional: Sequence[str] = (), string_columns: Sequence[str] = ()) -> pa.Table:
    """The ``required`` (+ present ``optional``) columns of a parquet or CSV/TSV log;
    ``string_columns`` are ids or text (integers become strings).

    A missing file or column is a one-line error naming both."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    path = Path(source)
    if not path.is_file():
        raise CurationError(f"log table not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        names = pq.read_schema(path).names
    elif suffix in (".csv", ".tsv"):
        names = _header(path, "\t" if suffix == ".tsv" else ",")
    else:
        raise CurationError(f"{path}: unsupported log table type '{suffix}' (parquet, csv, tsv)")
    missing = [c for c in required if c not in names]
    if missing:
        raise CurationError(f"{path}: missing column '{missing[0]}' (columns: {', '.join(names)})")
    columns = list(required) + [c for c in optional if c in names and c not in required]
    try:
        if suffix == ".parquet":
            table = pq.read_table(path, columns=columns)
        else:
            convert = pcsv.ConvertOptions(include_columns=columns, column_types={c: pa.string() for c in string_columns if c in columns}, strings_can_be_null=True)
            table = pcsv.read_csv(path, parse_options=pcsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ","), convert_options=convert)
    except (pa.ArrowInvalid, OSError) as exc:
        raise CurationError(f"{path}: cannot read: {str(exc).splitlines()[0]}") from None
    return _with_strings(table, string_columns, str(path))


def _with_strings(table: pa.Table, names: Sequence[str], source: str) -> pa.Table:
    """``table`` with each of ``names`` as one string (or dictionary-of-string) array."""
    for name in names:
        if name not in table.column_names:
            continue
        column = _flat(table[name])
        if pa.types.is_dictionary(column.type) and not pa.types.is_string(column.type.value_type):
            column = column.dictionary_decode()
        if not (pa.types.is_string(column.type) or pa.types.is_dictionary(column.type)):
            try:
                column = pc.cast(column, pa.string())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise CurationError(f"{source}: column '{name}' must hold ids or text (strings or integers), got {column.type}") from None
        table = table.set_column(table.column_names.index(name), name, column)
    return table


def read_influencers(cfg: CurateConfig) -> list[str]:
    """Influencer user ids from ``influencers`` (one per line; blank lines and ``#`` comments skipped) and ``influencer_ids``."""
    ids = [str(i) for i in cfg.influencer_ids]
    if cfg.influencers:
        path = Path(cfg.influencers)
        if not path.is_file():
            raise CurationError(f"influencers file not found: {path}")
        ids += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return list(dict.fromkeys(ids))


# ---------------------------------------------------------------- column helpers


def _flat(column) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _plain(column) -> pa.Array:
    """A string column without dictionary encoding."""
    column = _flat(column)
    return column.dictionary_decode() if pa.types.is_dictionary(column.type) else column


def _codes(column) -> tuple[np.ndarray, pa.Array]:
    """(code of every row, -1 for null; the distinct values) of a string or dictionary column."""
    column = _flat(column)
    if not pa.types.is_dictionary(column.type):
        column = pc.dictionary_encode(column)
    return pc.fill_null(column.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64), column.dictionary


def _blank(column) -> np.ndarray:
    """True where a string column is null, empty or only whitespace (dictionaries: checked per value)."""
    column = _flat(column)
    if pa.types.is_dictionary(column.type):
        codes, values = _codes(column)
        return np.append(_blank(values), True)[codes]  # code -1 (null) -> the appended True
    empty = pc.or_kleene(pc.equal(pc.binary_length(column), 0), pc.utf8_is_space(column))
    return pc.fill_null(empty, True).to_numpy(zero_copy_only=False)


def _lookup(column, universe: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Row of each value of a string column in ``universe`` (distinct strings) and whether it is there
    (a dictionary's values are looked up once each)."""
    column = _flat(column)
    if not pa.types.is_dictionary(column.type):
        return _index_in(column, universe)
    codes, values = _codes(column)
    where, found = _index_in(values, universe)
    return np.append(where, 0)[codes], np.append(found, False)[codes]


def _is_in(column, value_set: pa.Array) -> np.ndarray:
    """Whether each value of a string column is in ``value_set`` (a dictionary's values are tested once each)."""
    column = _flat(column)
    if not pa.types.is_dictionary(column.type):
        return pc.fill_null(pc.is_in(column, value_set=value_set), False).to_numpy(zero_copy_only=False)
    codes, values = _codes(column)
    return np.append(pc.is_in(values, value_set=value_set).to_numpy(zero_copy_only=False), False)[codes]


def _epoch_ns(column, source: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(nanoseconds since the epoch, valid mask) of a timestamp or ISO-string column (naive = UTC)."""
    column = _flat(column)
    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        try:
            values = pc.cast(pc.cast(column, pa.timestamp("ns", tz=getattr(column.type, "tz", None))), pa.int64())
        except pa.ArrowInvalid as exc:  # e.g. dates beyond the nanosecond range (years 1677-2262)
            raise CurationError(f"{source}: column '{name}': {str(exc).splitlines()[0]}") from None
        valid = pc.is_valid(values).to_numpy(zero_copy_only=False)
        return pc.fill_null(values, 0).to_numpy(zero_copy_only=False), valid
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_null(column.type):
        parsed = pd.to_datetime(column.to_pandas(), utc=True, errors="coerce", format="ISO8601").dt.as_unit("ns")
        return parsed.array.asi8, parsed.notna().to_numpy()
    raise CurationError(f"{source}: column '{name}' must hold timestamps or ISO date strings, got {column.type}")


def _index_in(values, universe: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Row of each value in ``universe`` (distinct strings) and whether it was found."""
    where = pc.index_in(values, value_set=universe)
    found = pc.is_valid(where).to_numpy(zero_copy_only=False)
    return pc.fill_null(where, 0).to_numpy(zero_copy_only=False).astype(np.int64), found


def _hash_strings(values, key: str) -> np.ndarray:
    """A 64-bit keyed hash of every string (stable across runs and platforms)."""
    array = _flat(values).to_numpy(zero_copy_only=False).astype(object)
    return pd.util.hash_array(array, hash_key=key, categorize=False)


def _hash_key(purpose: str, seed: int) -> str:
    return f"{purpose[:2]}{seed:014d}"[-16:]


def _hex(hashes: np.ndarray) -> np.ndarray:
    """uint64 -> 16-character lowercase hex strings, column-wise."""
    if not len(hashes):
        return np.zeros(0, dtype=str)
    return np.frombuffer(hashes.astype(">u8").tobytes().hex().encode(), dtype="S16").astype(str)


def _group_bounds(sorted_codes: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and size of each of ``groups`` in ``sorted_codes``."""
    start = np.searchsorted(sorted_codes, groups, side="left")
    return start, np.searchsorted(sorted_codes, groups, side="right") - start


def balanced_pairs(n_pos: np.ndarray, n_neg: np.ndarray, cap: Optional[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group ``k``: ``min(P*N, cap)`` distinct (positive, negative) index pairs, as (group, pos, neg).

    Pair ``m`` of a group is ``(m mod P, (m + m // lcm(P, N)) mod N)``: a bijection of
    ``0..P*N-1`` onto all pairs, in an order where any prefix uses every positive and every
    negative equally often, up to one."""
    n_pos, n_neg = n_pos.astype(np.int64), n_neg.astype(np.int64)
    total = n_pos * n_neg
    take = total if cap is None else np.minimum(total, cap)
    group = np.repeat(np.arange(len(take)), take)
    m = np.arange(int(take.sum()), dtype=np.int64) - np.repeat(np.cumsum(take) - take, take)
    p, n = n_pos[group], n_neg[group]
    lcm = np.lcm(p, n)
    return group, m % p, (m + m // lcm) % n


def _split_of(ranks: np.ndarray, cfg: CurateConfig) -> np.ndarray:
    """``test`` for the first ``round(test_share * n)`` ranks, then ``val``, then ``train``."""
    n = len(ranks)
    n_test, n_val = int(round(cfg.test_share * n)), int(round(cfg.val_share * n))
    out = np.full(n, "train", dtype=object)
    out[ranks < n_test + n_val] = "val"
    out[ranks < n_test] = "test"
    return out


# ---------------------------------------------------------------- the procedure


@dataclass
class Logs:
    """The engagement logs as Arrow tables, with the names used in messages."""

    images: pa.Table
    remixes: pa.Table
    views: Optional[pa.Table] = None
    influencers: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=lambda: {"images": "images", "remixes": "remixes", "views": "views"})

    @staticmethod
    def of(images, remixes, views=None, influencers: Sequence[str] = ()) -> "Logs":
        """From pandas frames or Arrow tables (tests and library use)."""

        def arrow(t):
            return None if t is None else t if isinstance(t, pa.Table) else pa.Table.from_pandas(t, preserve_index=False)

        return Logs(arrow(images), arrow(remixes), arrow(views), [str(i) for i in influencers])


def _valid_images(logs: Logs, cfg: CurateConfig, skipped: dict) -> tuple[pa.Table, np.ndarray]:
    """Image rows with id, prompt and path (and a posted_at), each id once; and their posting times."""
    images, source = logs.images, logs.sources["images"]
    for column in IMAGE_COLUMNS:
        if column not in images.column_names:
            raise CurationError(f"{source}: missing column '{column}' (columns: {', '.join(images.column_names)})")
    images = _with_strings(images, ("image_id", "prompt", "path", "user_id"), source)
    for column in ("image_id", "path"):  # per-row values: no dictionary
        images = images.set_column(images.column_names.index(column), column, _plain(images[column]))
    keep = np.ones(images.num_rows, dtype=bool)
    for column in ("image_id", "prompt", "path"):
        bad = _blank(images[column]) & keep
        skipped[f"image_rows_missing_{column}"] = int(bad.sum())
        keep &= ~bad
    posted, valid = _epoch_ns(images["posted_at"], source, "posted_at")
    skipped["image_rows_bad_posted_at"] = int((~valid & keep).sum())
    keep &= valid
    rows = np.flatnonzero(keep)
    ids = _flat(images["image_id"]).take(pa.array(rows))
    codes, distinct = _codes(ids)
    if len(distinct) < len(rows):
        _, first = np.unique(codes, return_index=True)
        skipped["duplicate_image_rows"] = int(len(rows) - len(first))
        rows = rows[np.sort(first)]
    if len(rows) == images.num_rows:
        return images, posted
    return images.take(pa.array(rows)), posted[rows]


def _event_images(events: pa.Table, columns: Sequence[str], image_ids: pa.Array, source: str, kind: str, skipped: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image row, event time ns, kept mask) of an event table; bad rows counted under ``kind``."""
    for column in columns:
        if column not in events.column_names:
            raise CurationError(f"{source}: missing column '{column}' (columns: {', '.join(events.column_names)})")
    events = _with_strings(events, [c for c in columns if c != "at"], source)
    keep = np.ones(events.num_rows, dtype=bool)
    for column in columns:
        if column != "at":
            keep &= ~_blank(events[column])
    skipped[f"{kind}_missing_value"] = int((~keep).sum())
    at, valid = _epoch_ns(events["at"], source, "at")
    skipped[f"{kind}_bad_at"] = int((keep & ~valid).sum())
    keep &= valid
    row, found = _lookup(events["image_id"], image_ids)
    skipped[f"{kind}_unknown_image"] = int((keep & ~found).sum())
    keep &= found
    return row, at, keep


def _views_before_first_remix(logs: Logs, cfg: CurateConfig, images: pa.Table, first_remix: np.ndarray, skipped: dict) -> np.ndarray:
    """Views before each image's first remix (all views if never remixed); NaN where unknown."""
    n = images.num_rows
    if logs.views is not None:
        ids = _flat(images["image_id"])
        row, at, keep = _event_images(logs.views, VIEW_COLUMNS, ids, logs.sources["views"], "view_events", skipped)
        before = keep & (at < first_remix[row])
        return np.bincount(row[before], minlength=n).astype(np.float64)
    if cfg.views_column not in images.column_names:
        raise CurationError(f"{logs.sources['images']}: missing column '{cfg.views_column}' (views before the first remix; or set curate.views to a view-events table)")
    try:
        return pc.cast(images[cfg.views_column], pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise CurationError(f"{logs.sources['images']}: column '{cfg.views_column}' must be numeric, got {images.schema.field(cfg.views_column).type}") from None


def _flags(images: pa.Table, rows: np.ndarray, role: str, cfg: CurateConfig, content_filter: Optional[Callable], source: str) -> np.ndarray:
    """True for the candidate ``rows`` flagged by the filter column or the callable."""
    flagged = np.zeros(len(rows), dtype=bool)
    if cfg.filter_column:
        if cfg.filter_column not in images.column_names:
            raise CurationError(f"{source}: missing column '{cfg.filter_column}' (curate.filter_column)")
        column = _flat(images[cfg.filter_column]).take(pa.array(rows))
        try:
            flagged |= pc.fill_null(pc.cast(column, pa.bool_()), False).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise CurationError(f"{source}: filter column '{cfg.filter_column}' must be boolean, got {column.type}") from None
    if content_filter is not None and len(rows):
        frame = pd.DataFrame({c: _plain(images[c]).take(pa.array(rows)).to_pandas() for c in ("image_id", "prompt", "path", "user_id")}).assign(role=role)
        result = np.asarray(content_filter(frame), dtype=bool)
        if result.shape != (len(rows),):
            raise CurationError(f"content_filter returned shape {result.shape}, expected ({len(rows)},): one flag per image")
        flagged |= result
    return flagged


@dataclass
class RemixCounts:
    """Per image (rows of the valid images table): remix counts and the first remix time."""

    window: np.ndarray  # remixes within the window
    influencer: np.ndarray  # influencers' remixes within the window
    total: np.ndarray  # remixes at any time
    first: np.ndarray  # ns since the epoch of the first remix (int64 max if none)
    events_used: int
    unknown_influencers: list[str]


def count_remixes(logs: Logs, cfg: CurateConfig, images: pa.Table, posted: np.ndarray, skipped: dict) -> RemixCounts:
    """Count each image's remix events (bad and pre-posting events are counted skips)."""
    n = images.num_rows
    row, at, keep = _event_images(logs.remixes, REMIX_COLUMNS, _flat(images["image_id"]), logs.sources["remixes"], "remix_events", skipped)
    early = keep & (at < posted[row])
    skipped["remix_events_before_post"] = int(early.sum())
    keep &= ~early
    influencers = pa.array(logs.influencers, type=pa.string())
    remixers = _with_strings(logs.remixes, ["remixer_user_id"], logs.sources["remixes"])["remixer_user_id"]
    remixed_by = _is_in(remixers, influencers)
    created_by = _is_in(images["user_id"], influencers)
    known = set(_plain(_flat(remixers).filter(pa.array(remixed_by))).unique().to_pylist()) | set(_plain(_flat(images["user_id"]).filter(pa.array(created_by))).unique().to_pylist())
    unknown = [i for i in logs.influencers if i not in known]
    if unknown:
        logger.warning("curate: %d influencer id(s) are no user of the logs (not an image creator nor a remixer), e.g. %s", len(unknown), unknown[:5])

    row, at, by_influencer = row[keep], at[keep], remixed_by[keep]
    in_window = np.ones(len(row), dtype=bool) if cfg.remix_window_days is None else (at - posted[row]) <= cfg.remix_window_days * NS_PER_DAY
    first = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, row, at)
    return RemixCounts(
        window=np.bincount(row[in_window], minlength=n),
        influencer=np.bincount(row[in_window & by_influencer], minlength=n),
        total=np.bincount(row, minlength=n),
        first=first,
        events_used=len(row),
        unknown_influencers=unknown,
    )


def content_threshold(window_counts: np.ndarray, top_share: float) -> int:
    """The remix count of the ``ceil(top_share * n)``-th most remixed image (at least 1): every image
    at or above it is a content positive, so ties at the threshold are all in."""
    n = len(window_counts)
    k = max(1, math.ceil(top_share * n))
    return max(1, int(np.partition(window_counts, n - k)[n - k]))


def prompt_groups(images: pa.Table) -> tuple[np.ndarray, pa.Array]:
    """(prompt code of every image, the distinct prompts); prompts are compared after trimming whitespace."""
    codes, texts = _codes(images["prompt"])
    trimmed = pc.dictionary_encode(pc.utf8_trim_whitespace(texts))  # "a cat " and "a cat" are one prompt
    return trimmed.indices.to_numpy(zero_copy_only=False).astype(np.int64)[codes], trimmed.dictionary


def pair_and_split(images: pa.Table, prompt_code: np.ndarray, prompt_dict: pa.Array, kept: np.ndarray, pos_rows: np.ndarray, neg_rows: np.ndarray, cfg: CurateConfig) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The triplets of the ``kept`` prompts (``TRIPLET_COLUMNS``) and their positive and negative image rows.

    Prompts come in ``prompt_id`` order (a fixed hash of the text); the images of a prompt in the
    order of a seeded hash of their ids, paired by :func:`balanced_pairs` up to the cap; prompts
    go to splits by a seeded hash of their text (:func:`_split_of`)."""
    ids = _flat(images["image_id"])
    kept_text = prompt_dict.take(pa.array(kept))
    prompt_ids = _hex(_hash_strings(kept_text, "sr-prompt-id-v1."))
    order = np.argsort(prompt_ids, kind="stable")
    kept, kept_text, prompt_ids = kept[order], kept_text.take(pa.array(order)), prompt_ids[order]
    slot = np.full(len(prompt_dict), -1, dtype=np.int64)
    slot[kept] = np.arange(len(kept))

    def arrange(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = rows[slot[prompt_code[rows]] >= 0]
        shuffle = _hash_strings(ids.take(pa.array(rows)), _hash_key("image", cfg.seed))
        rows = rows[np.lexsort((shuffle, slot[prompt_code[rows]]))]
        start, size = _group_bounds(slot[prompt_code[rows]], np.arange(len(kept)))
        return rows, start, size

    pos_sorted, pos_start, pos_size = arrange(pos_rows)
    neg_sorted, neg_start, neg_size = arrange(neg_rows)
    group, a, b = balanced_pairs(pos_size, neg_size, cfg.max_triplets_per_prompt)
    pos_take, neg_take = pos_sorted[pos_start[group] + a], neg_sorted[neg_start[group] + b]

    split_rank = np.empty(len(kept), dtype=np.int64)
    split_rank[np.argsort(_hash_strings(kept_text, _hash_key("split", cfg.seed)), kind="stable")] = np.arange(len(kept))
    g = pa.array(group)
    paths = _flat(images["path"])
    triplets = pa.table(
        {
            "triplet_id": pa.array(np.arange(len(group), dtype=np.int64)),
            "prompt_id": pa.array(prompt_ids).take(g),
            "prompt": kept_text.take(g),
            "pos_image_id": ids.take(pa.array(pos_take)),
            "pos_path": paths.take(pa.array(pos_take)),
            "neg_image_id": ids.take(pa.array(neg_take)),
            "neg_path": paths.take(pa.array(neg_take)),
            "split": pa.array(_split_of(split_rank, cfg), type=pa.string()).take(g),
        }
    )
    return triplets.to_pandas(), pos_take, neg_take


def curate_triplets(logs: Logs, cfg: CurateConfig, content_filter: Optional[Callable[[pd.DataFrame], Sequence[bool]]] = None) -> tuple[pd.DataFrame, dict]:
    """The triplet table (``TRIPLET_COLUMNS``, paths as in the log) and the statistics of the run.

    ``content_filter`` gets a frame of candidate images (``image_id, prompt, path, user_id, role``)
    and returns one flag per row; flagged images are dropped like ``filter_column``'s."""
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    images, posted = _valid_images(logs, cfg, skipped)
    n = images.num_rows
    if n == 0:
        raise CurationError(f"{logs.sources['images']}: no usable image rows ({_reasons(skipped)})")
    remixes = count_remixes(logs, cfg, images, posted, skipped)

    content_min = content_threshold(remixes.window, cfg.content_top_share)
    content = (remixes.window >= content_min) if cfg.use_content_signal else np.zeros(n, dtype=bool)
    creator = (remixes.influencer >= cfg.min_influencer_remixes) if cfg.use_creator_signal else np.zeros(n, dtype=bool)
    positive = content | creator
    if not positive.any():
        content_says = f"content signal needs >= {content_min} remixes in the window (top {cfg.content_top_share:g} of {n} images; most remixed: {int(remixes.window.max())})" if cfg.use_content_signal else "content signal off"
        creator_says = f"creator signal found {int(remixes.influencer.sum())} influencer remixes in the window ({len(logs.influencers)} influencer ids, {len(remixes.unknown_influencers)} unknown)" if cfg.use_creator_signal else "creator signal off"
        raise CurationError(f"no positive image in {logs.sources['images']}: {content_says}; {creator_says}")

    # exposure threshold over the positives' prompts
    prompt_code, prompt_dict = prompt_groups(images)
    positive_prompt = np.zeros(len(prompt_dict), dtype=bool)
    positive_prompt[prompt_code[positive]] = True
    in_positive_prompts = positive_prompt[prompt_code]
    views = _views_before_first_remix(logs, cfg, images, remixes.first, skipped)
    known_views = ~np.isnan(views)
    skipped["images_views_missing"] = int((in_positive_prompts & ~known_views).sum())
    sample = views[in_positive_prompts & (remixes.total > 0) & known_views]
    if not len(sample):
        raise CurationError(f"no views-before-first-remix value for any remixed image of the {int(positive_prompt.sum())} positive prompts; check {cfg.views_column if logs.views is None else logs.sources['views']}")
    exposure = float(np.percentile(sample, cfg.exposure_percentile))
    negative = in_positive_prompts & (remixes.total == 0) & known_views & (views >= exposure)

    # filters
    pos_rows, neg_rows = np.flatnonzero(positive), np.flatnonzero(negative)
    pos_flag = _flags(images, pos_rows, "positive", cfg, content_filter, logs.sources["images"])
    neg_flag = _flags(images, neg_rows, "negative", cfg, content_filter, logs.sources["images"])
    skipped["positives_content_filtered"], skipped["negatives_content_filtered"] = int(pos_flag.sum()), int(neg_flag.sum())
    pos_rows, neg_rows = pos_rows[~pos_flag], neg_rows[~neg_flag]
    pos_per_prompt = np.bincount(prompt_code[pos_rows], minlength=len(prompt_dict))
    neg_per_prompt = np.bincount(prompt_code[neg_rows], minlength=len(prompt_dict))
    has_pos, has_neg = pos_per_prompt > 0, neg_per_prompt > 0
    skipped["prompts_without_positive"] = int((positive_prompt & ~has_pos).sum())
    skipped["prompts_without_negative"] = int((has_pos & ~has_neg).sum())
    kept = np.flatnonzero(has_pos & has_neg)

    triplets, pos_take, neg_take = pair_and_split(images, prompt_code, prompt_dict, kept, pos_rows, neg_rows, cfg)
    possible = int((pos_per_prompt * neg_per_prompt)[kept].sum())
    skipped["triplets_over_cap"] = possible - len(triplets)

    stats = {
        "table": _split_table(triplets, _plain(images["user_id"]), pos_take, neg_take),
        "thresholds": {
            "remix_window_days": cfg.remix_window_days,
            "content_top_share": cfg.content_top_share if cfg.use_content_signal else None,
            "content_min_remixes": content_min if cfg.use_content_signal else None,
            "min_influencer_remixes": cfg.min_influencer_remixes if cfg.use_creator_signal else None,
            "exposure_percentile": cfg.exposure_percentile,
            "exposure_views": exposure,
            "exposure_sample": int(len(sample)),
            "max_triplets_per_prompt": cfg.max_triplets_per_prompt,
        },
        "funnel": {
            "image_rows": logs.images.num_rows,
            "images": n,
            "prompts": int(np.count_nonzero(np.bincount(prompt_code, minlength=len(prompt_dict)))),
            "remix_events": logs.remixes.num_rows,
            "remix_events_used": remixes.events_used,
            "remixed_images": int((remixes.total > 0).sum()),
            "content_positives": int(content.sum()),
            "creator_positives": int(creator.sum()),
            "both_signals": int((content & creator).sum()),
            "positives": int(positive.sum()),
            "positive_prompts": int(positive_prompt.sum()),
            "negatives": int(negative.sum()),
            "prompts_kept": len(kept),
            "triplets_possible": possible,
            "triplets": len(triplets),
        },
        "skipped": skipped,
        "influencers": {"given": len(logs.influencers), "unknown": len(remixes.unknown_influencers), "unknown_examples": remixes.unknown_influencers[:10]},
    }
    return triplets[TRIPLET_COLUMNS], stats


def _split_table(triplets: pd.DataFrame, creators: pa.Array, pos_rows: np.ndarray, neg_rows: np.ndarray) -> list[dict]:
    """Table 1's rows: per split and in all, images, positives, negatives, triplets, prompts, users, positive share."""
    split = triplets["split"].to_numpy()
    rows = []
    for name in (*SPLITS, "all"):
        mask = np.ones(len(split), dtype=bool) if name == "all" else split == name
        pos, neg = np.unique(pos_rows[mask]), np.unique(neg_rows[mask])
        image_rows = np.concatenate([pos, neg])
        users = creators.take(pa.array(image_rows)).drop_null() if len(image_rows) else pa.array([], pa.string())
        images = len(pos) + len(neg)
        rows.append(
            {
                "split": name,
                "images": images,
                "positives": len(pos),
                "negatives": len(neg),
                "triplets": int(mask.sum()),
                "prompts": int(triplets["prompt_id"][mask].nunique()),
                "users": len(pc.unique(users)),
                "positive_share": len(pos) / images if images else 0.0,
            }
        )
    return rows


def _reasons(skipped: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in skipped.items() if v) or "nothing skipped"


def stats_markdown(stats: dict) -> str:
    """The statistics in the shape of the paper's Table 1, then the thresholds and what was dropped."""
    lines = ["| split | images | positives | negatives | positive share | triplets | prompts | users |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in stats["table"]:
        lines.append(f"| {r['split']} | {r['images']:,} | {r['positives']:,} | {r['negatives']:,} | {r['positive_share']:.1%} | {r['triplets']:,} | {r['prompts']:,} | {r['users']:,} |")
    t, f = stats["thresholds"], stats["funnel"]
    window = "all remixes" if t["remix_window_days"] is None else f"remixes within {t['remix_window_days']:g} days of posting"
    content = f"top {t['content_top_share']:g} by remix count (>= {t['content_min_remixes']} remixes)" if t["content_top_share"] is not None else "off"
    creator = f">= {t['min_influencer_remixes']} influencer remix(es)" if t["min_influencer_remixes"] is not None else "off"
    lines += [
        "",
        f"- signals over {window}: content {content}, {f['content_positives']:,} images; creator {creator}, {f['creator_positives']:,} images; both {f['both_signals']:,}",
        f"- exposure threshold: {t['exposure_views']:g} views before the first remix (percentile {t['exposure_percentile']:g} of {t['exposure_sample']:,} remixed images of {f['positive_prompts']:,} positive prompts)",
        f"- from {f['image_rows']:,} image rows ({f['images']:,} usable, {f['prompts']:,} prompts) and {f['remix_events']:,} remix events ({f['remix_events_used']:,} used): {f['positives']:,} positives, {f['negatives']:,} negatives, {f['prompts_kept']:,} prompts kept",
        f"- skipped: {_reasons(stats['skipped'])}",
    ]
    if stats["influencers"]["unknown"]:
        lines.append(f"- influencer ids that are no user of the logs: {stats['influencers']['unknown']} of {stats['influencers']['given']} (e.g. {', '.join(stats['influencers']['unknown_examples'][:5])})")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the stage


@dataclass
class CurateSummary:
    output_dir: str
    triplets: int
    prompts: int
    images: int
    exposure_views: float
    skipped: dict
    table: str  # the Markdown statistics
    seconds: float

    def line(self) -> str:
        return f"curate: {self.triplets} triplets over {self.prompts} prompts and {self.images} images (exposure threshold {self.exposure_views:g} views) -> {self.output_dir} ({self.seconds:.1f}s)\n{self.table}"


def read_logs(cfg: CurateConfig) -> Logs:
    """The configured log files as Arrow tables (only the columns curation uses)."""
    if not cfg.images:
        raise ConfigError("config error: curate.images is required (the images table: image_id, prompt, path, user_id, posted_at)")
    if not cfg.remixes:
        raise ConfigError("config error: curate.remixes is required (the remix events: image_id, remixer_user_id, at)")
    optional = [c for c in (cfg.views_column, cfg.filter_column) if c]
    images = read_log_table(cfg.images, IMAGE_COLUMNS, optional, string_columns=["image_id", "prompt", "path", "user_id"])
    remixes = read_log_table(cfg.remixes, REMIX_COLUMNS, string_columns=["image_id", "remixer_user_id"])
    views = read_log_table(cfg.views, VIEW_COLUMNS, string_columns=["image_id"]) if cfg.views else None
    sources = {"images": str(cfg.images), "remixes": str(cfg.remixes), "views": str(cfg.views)}
    return Logs(images, remixes, views, read_influencers(cfg), sources)


def run_curation(cfg: CurateConfig, content_filter: Optional[Callable[[pd.DataFrame], Sequence[bool]]] = None) -> CurateSummary:
    """Read the logs, curate, write ``triplets.parquet`` (paths resolved), ``curate_summary.json`` and ``stats.md``."""
    start = time.perf_counter()
    logs = read_logs(cfg)
    triplets, stats = curate_triplets(logs, cfg, content_filter)
    if triplets.empty:
        raise CurationError(f"no triplets: no positive prompt has both a positive and a negative ({stats['funnel']['positive_prompts']} positive prompts; skipped: {_reasons(stats['skipped'])})")
    root = cfg.image_root or Path(cfg.images).parent
    for column in ("pos_path", "neg_path"):
        triplets[column] = resolve_paths(triplets[column], root).to_pandas()
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_parquet(triplets, output_dir / "triplets.parquet")
    seconds = time.perf_counter() - start
    table = stats_markdown(stats)
    (output_dir / "curate_summary.json").write_text(json.dumps({**stats, "seconds": seconds, "config": asdict(cfg)}, indent=2))
    (output_dir / "stats.md").write_text(table)
    (output_dir / "config.yaml").write_text(to_yaml(cfg))
    everything = stats["table"][-1]
    return CurateSummary(str(output_dir), len(triplets), everything["prompts"], everything["images"], stats["thresholds"]["exposure_views"], stats["skipped"], table, seconds)
