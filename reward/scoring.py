"""The scoring run: every requested metric for every image of a manifest, in one streaming pass.

Rows are cut into parts of ``rows_per_part`` in manifest order; part ``k`` belongs to process
``k % world_size``. DataLoader workers open each image once and run each distinct CPU
preprocessing and tokenisation once (scorers with equal ``preprocess_key`` / ``tokenize_key``
share the result, see :func:`plan_inputs`); the main loop only runs batched forwards, and one
loader streams all of a process's parts, so the workers never idle at a part boundary. A
finished part has its ``scores/part-XXXXX.parquet`` (and ``errors/part-XXXXX.parquet``) and is
never redone, so a crash loses at most the part in flight. Unreadable images (missing, empty,
truncated, not an image) are recorded with their reason in the errors part, never dropped.
With ``embeddings: [metric]`` the run also writes that metric's image embedding of every scored
row to ``embeddings/<metric>/part-XXXXX.npy`` (float32, the scores part's row order), before the
scores part; a part without it is redone (:func:`read_embeddings` reads them back).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from sr_finetune.config import require, to_yaml
from sr_finetune.cpu_memory import reuse_freed_memory
from sr_finetune.errors import ConfigError, UserError
from sr_finetune.eval_only import mark_table
from sr_finetune.io import atomic_write_parquet, read_parts, read_table
from sr_finetune.tables import blank_cells, describe_skipped, text_cells
from sr_finetune.progress import progress, quiet_library_bars

from .base import RewardModel, available_rewards, load_rewards, no_image_embedding, to_device
from .preprocess import open_image

logger = logging.getLogger(__name__)

ERROR_COLUMNS = ["image_id", "path", "reason"]


@dataclass
class ScoreConfig:
    """Settings of the scoring stage (``score:`` in a recipe config)."""

    generations: Optional[str] = None  # folder written by `generate` (manifest.parquet)
    image_table: Optional[str] = None  # or a csv/parquet/json(l) table of existing images
    image_root: Optional[str] = None  # folder the table's paths are relative to (default: the table's folder)
    path_column: str = "path"
    prompt_column: str = "prompt"
    id_column: Optional[str] = None  # default: image_id if present, else the path
    metrics: list[str] = field(default_factory=lambda: ["social_reward"])
    embeddings: list[str] = field(default_factory=list)  # metrics whose image embeddings are also written (embeddings/<metric>/part-*.npy)
    weights: dict[str, str] = field(default_factory=dict)  # metric -> weights path / hub id
    options: dict[str, Any] = field(default_factory=dict)  # metric -> loader keyword arguments
    output_dir: str = "runs/scores"
    batch_size: int = 32
    num_workers: int = 2
    cpu_threads: Optional[int] = None  # torch threads of the forwards on a CPU device (None: torch's default, every CPU)
    rows_per_part: int = 4096
    device: str = "auto"
    dtype: str = "fp32"

    def validate(self) -> None:
        for key in ("batch_size", "rows_per_part"):
            require(getattr(self, key) > 0, key, f"must be positive, got {getattr(self, key)}")
        require(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        require(self.cpu_threads is None or self.cpu_threads > 0, "cpu_threads", f"must be positive, got {self.cpu_threads}")
        require(len(self.metrics) > 0, "metrics", "name at least one metric")
        require(len(set(self.metrics)) == len(self.metrics), "metrics", f"repeated metric in {self.metrics}")
        require(
            "social_reward" not in self.metrics or bool(self.weights.get("social_reward")),
            "weights.social_reward",
            "social_reward needs the checkpoint of a Social Reward training run (no weights are published)",
        )
        unknown = set(self.weights) - set(self.metrics)
        require(not unknown, "weights", f"weights given for metrics not requested: {sorted(unknown)}")
        unscored = [m for m in self.embeddings if m not in self.metrics]
        require(not unscored, "embeddings", f"embeddings of metrics not requested: {unscored} (add them to metrics)")


@dataclass
class ImageRows:
    """The rows to score (``image_id, prompt, path``, absolute paths) and the input rows skipped
    for an empty cell: reason -> row numbers of the table (from 0)."""

    rows: pd.DataFrame
    skipped: dict[str, list[int]]
    source: str

    def skip_counts(self) -> dict[str, int]:
        return {reason: len(rows) for reason, rows in self.skipped.items()}


# Why a table row is not scored, checked in this order (a row counts under its first reason).
ROW_SKIP_REASONS = ("empty paths", "empty prompts", "missing ids")


def read_image_rows(cfg: ScoreConfig) -> ImageRows:
    """The rows of a generations folder or an image table, less those with an empty path, prompt
    or id cell (counted by reason with their row numbers)."""
    if bool(cfg.generations) == bool(cfg.image_table):
        raise ConfigError("config error: set exactly one of score.generations and score.image_table")
    if cfg.generations:
        from sr_finetune.generation import read_manifest

        return _complete_rows(read_manifest(cfg.generations).reset_index(drop=True), "path", "prompt", "image_id", None, cfg.generations)
    table = Path(cfg.image_table)
    df = read_table(table, csv_as_text=True)
    for column in (cfg.path_column, cfg.prompt_column):
        if column not in df.columns:
            raise UserError(f"{table}: no column '{column}' (columns: {', '.join(map(str, df.columns))})")
    id_column = cfg.id_column or ("image_id" if "image_id" in df.columns else cfg.path_column)
    if id_column not in df.columns:
        raise UserError(f"{table}: no id column '{id_column}' (columns: {', '.join(map(str, df.columns))})")
    found = _complete_rows(df, cfg.path_column, cfg.prompt_column, id_column, Path(cfg.image_root) if cfg.image_root else table.parent, str(table))
    duplicated = found.rows.image_id[found.rows.image_id.duplicated()]
    if len(duplicated):
        raise UserError(f"{table}: image id '{duplicated.iloc[0]}' appears more than once (set score.id_column)")
    return found


def _complete_rows(df: pd.DataFrame, path_column: str, prompt_column: str, id_column: str, root: Path | None, source: str) -> ImageRows:
    """``image_id, prompt, path`` of the rows whose three cells are all filled in; paths joined to ``root``."""
    cells = {"path": text_cells(df[path_column]), "prompt": text_cells(df[prompt_column]), "image_id": text_cells(df[id_column])}
    empty = [blank_cells(cells[column]) for column in ("path", "prompt", "image_id")]
    reason = np.select(empty, ROW_SKIP_REASONS, default="")
    skipped = {r: np.flatnonzero(reason == r).tolist() for r in ROW_SKIP_REASONS if (reason == r).any()}
    keep = reason == ""
    paths = cells["path"][keep]
    rows = pd.DataFrame(
        {
            "image_id": cells["image_id"][keep].to_numpy(),
            "prompt": cells["prompt"][keep].to_numpy(),
            "path": [p if root is None or Path(p).is_absolute() else str(root / p) for p in paths],
        }
    )
    return ImageRows(rows, skipped, source)


def read_image_table(cfg: ScoreConfig) -> pd.DataFrame:
    """Rows ``image_id, prompt, path`` (absolute paths) to score; :func:`read_image_rows` also says
    which input rows were skipped."""
    return read_image_rows(cfg).rows


@dataclass
class InputPlan:
    """The CPU-side work a set of scorers needs, each distinct computation once.

    Scorers with the same ``preprocess_key`` (``tokenize_key``) share one image tensor (token
    batch), made by the first scorer with that key; a scorer without a key gets its own."""

    pixel_keys: dict[str, str]  # metric -> key of its pixel tensor
    text_keys: dict[str, str]  # metric -> key of its token batch
    pixel_makers: dict[str, RewardModel]  # key -> the scorer whose preprocess_image makes it
    text_makers: dict[str, RewardModel]  # key -> the scorer whose tokenize makes it

    def preprocess(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """One image -> {pixel key: tensor [C, H, W]}."""
        return {key: maker.preprocess_image(image) for key, maker in self.pixel_makers.items()}

    def tokenize(self, prompts: list[str]) -> dict[str, Any]:
        """Prompts -> {text key: tokens, one row per prompt}; a repeated prompt is tokenised once."""
        index = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        where = None if len(index) == len(prompts) else torch.tensor([index[p] for p in prompts])
        return {key: _take_rows(maker.tokenize(list(index)), where) for key, maker in self.text_makers.items()}


def _take_rows(tokens: Any, where: torch.Tensor | None) -> Any:
    if where is None:
        return tokens
    if isinstance(tokens, dict):
        return {k: v[where] for k, v in tokens.items()}
    return tokens[where]


def plan_inputs(scorers: dict[str, RewardModel]) -> InputPlan:
    """Group the scorers by ``preprocess_key`` and by ``tokenize_key`` (None: a group of its own)."""
    pixel_keys = {name: s.preprocess_key or f"metric:{name}" for name, s in scorers.items()}
    text_keys = {name: s.tokenize_key or f"metric:{name}" for name, s in scorers.items()}
    pixel_makers: dict[str, RewardModel] = {}
    text_makers: dict[str, RewardModel] = {}
    for name, scorer in scorers.items():
        pixel_makers.setdefault(pixel_keys[name], scorer)
        text_makers.setdefault(text_keys[name], scorer)
    return InputPlan(pixel_keys, text_keys, pixel_makers, text_makers)


class _BatchReader(torch.utils.data.Dataset):
    """Item = one batch of row numbers -> each image decoded once, each distinct preprocessing
    and tokenisation run once, stacked into one batch (in a DataLoader worker).

    Paths and prompts are Arrow strings: reading them touches no Python reference counts, so
    forked workers do not copy the table page by page as they go."""

    def __init__(self, paths: list[str], prompts: list[str], plan: InputPlan):
        import pyarrow as pa

        self.paths = pa.array(paths, type=pa.large_string())
        self.prompts = pa.array(prompts, type=pa.large_string())
        self.plan = plan

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, rows: range) -> dict:
        good, bad = [], []
        pixels: dict[str, list[torch.Tensor]] = {key: [] for key in self.plan.pixel_makers}
        for i in rows:
            image = open_image(self.paths[i].as_py())
            if isinstance(image, str):
                bad.append((i, image))
                continue
            good.append(i)
            for key, tensor in self.plan.preprocess(image).items():
                pixels[key].append(tensor)
        batch: dict[str, Any] = {"i": good, "bad": bad}
        if good:
            # default_collate stacks straight into shared memory inside a worker (no extra copy)
            batch["pixels"] = {key: torch.utils.data.default_collate(tensors) for key, tensors in pixels.items()}
            batch["text"] = self.plan.tokenize([self.prompts[i].as_py() for i in good])
        return batch


class _PartBatches(torch.utils.data.Sampler):
    """Row ranges of at most ``batch_size`` rows, part after part; no batch spans two parts."""

    def __init__(self, parts: list[tuple[int, int, int]], batch_size: int):
        self.parts = parts
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[range]:
        for _, start, stop in self.parts:
            for first in range(start, stop, self.batch_size):
                yield range(first, min(first + self.batch_size, stop))

    def __len__(self) -> int:
        return sum(-(-(stop - start) // self.batch_size) for _, start, stop in self.parts)


def _as_is(batch: dict) -> dict:
    return batch


class _PartResult:
    """Scores and errors of one part (rows ``start:stop``), filled batch by batch."""

    def __init__(self, part: int, start: int, stop: int, metrics: list[str], embed: Sequence[str] = ()):
        self.part, self.start, self.stop = part, start, stop
        self.values = {name: np.full(stop - start, np.nan) for name in metrics}
        self.embeddings: dict[str, np.ndarray | None] = dict.fromkeys(embed)  # [rows, D], made at the first batch
        self.ok = np.zeros(stop - start, dtype=bool)
        self.bad: list[tuple[int, str]] = []
        self.seen = 0

    def add(self, batch: dict, scores: dict[str, torch.Tensor], embeddings: dict[str, torch.Tensor] | None = None) -> None:
        local = np.asarray(batch["i"], dtype=np.int64) - self.start
        for name, values in scores.items():
            self.values[name][local] = values.numpy()
        for name, values in (embeddings or {}).items():
            if self.embeddings[name] is None:
                self.embeddings[name] = np.full((self.stop - self.start, values.shape[1]), np.nan, dtype=np.float32)
            self.embeddings[name][local] = values.numpy()
        self.ok[local] = True
        self.bad += batch["bad"]
        self.seen += len(batch["i"]) + len(batch["bad"])

    @property
    def complete(self) -> bool:
        return self.seen == self.stop - self.start

    def frames(self, ids: np.ndarray, paths: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
        scores = pd.DataFrame({"image_id": ids[self.start : self.stop][self.ok], **{n: v[self.ok] for n, v in self.values.items()}})
        for name, vectors in self.embeddings.items():  # one array per row; run_scoring writes them apart
            scores[embedding_column(name)] = list(vectors[self.ok]) if vectors is not None else []
        errors = pd.DataFrame([(ids[i], paths[i], reason) for i, reason in self.bad], columns=ERROR_COLUMNS)
        return scores, errors


WORKER_NICENESS = 19  # CPU runs: the DataLoader workers' priority, below the forward's


def yield_cpu_to_forward(_: int) -> None:
    """``worker_init_fn`` of CPU runs: the lowest CPU priority for this worker.

    Forward threads and busy workers on the same cores make OpenMP threads wait for descheduled
    peers (on 2 CPUs with 2 busy workers, 2 forward threads ran slower than 1). With the workers
    niced the forward's threads are never descheduled for preprocessing; the workers run in the
    forward's gaps and whenever it waits for data. Measured on 2 CPUs with tiny scorers: 137 img/s
    with 2 forward threads and niced workers, 117 with 1 thread, 90 with 2 threads un-niced."""
    try:
        os.nice(WORKER_NICENESS)
    except (AttributeError, OSError):  # no os.nice on this platform, or not permitted
        pass


class ForwardThreads:
    """Torch's thread count for the forwards on a CPU device: ``fixed`` (``cpu_threads``) or
    torch's own default (every CPU; the workers yield to the forward, see
    :func:`yield_cpu_to_forward`). :meth:`restore` puts the previous count back."""

    def __init__(self, num_workers: int, fixed: int | None = None):
        self.before = torch.get_num_threads()
        self.threads = fixed or self.before
        torch.set_num_threads(self.threads)
        logger.info("score: %d forward thread(s), %d DataLoader worker(s)%s", self.threads, num_workers, " at lower priority" if num_workers else "")

    def restore(self) -> None:
        torch.set_num_threads(self.before)


def embedding_column(metric: str) -> str:
    """The column of a scores frame that holds ``metric``'s image embeddings (see ``embed``)."""
    return f"{metric}.embedding"


def _score_batch(
    batch: dict, scorers: dict[str, RewardModel], plan: InputPlan, dtypes: dict[str, torch.dtype], device: torch.device, embed: Sequence[str] = ()
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every scorer's forward on one batch, and the image embeddings of the ``embed`` metrics;
    each shared input goes to the device once."""
    moved: dict[Any, Any] = {}
    out = {}
    embeddings = {}
    for name, scorer in scorers.items():
        pixel_key, text_key = (plan.pixel_keys[name], dtypes[name]), plan.text_keys[name]
        if pixel_key not in moved:
            moved[pixel_key] = to_device(batch["pixels"][pixel_key[0]], device, dtypes[name])
        if text_key not in moved:
            moved[text_key] = to_device(batch["text"][text_key], device)
        out[name] = scorer.score(moved[pixel_key], moved[text_key]).detach().double().cpu()
        if name in embed:
            embeddings[name] = scorer.embed_image(moved[pixel_key]).detach().float().cpu()
    return out, embeddings


def iter_scored_parts(
    rows: pd.DataFrame,
    scorers: dict[str, RewardModel],
    parts: list[tuple[int, int, int]],
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    progress: Any = None,
    cpu_threads: int | None = None,
    embed: Sequence[str] = (),
) -> Iterator[tuple[int, pd.DataFrame, pd.DataFrame]]:
    """Score the row ranges ``parts`` = [(part, start, stop)] of ``rows`` through one DataLoader,
    so the workers stay busy across part boundaries; yield (part, scores, errors) as each part
    completes. Each metric of ``embed`` adds a column :func:`embedding_column` to the scores:
    the image embedding of each row (float32 arrays), computed from the same forward. On a CPU
    device the workers yield the CPUs to the forwards (:func:`yield_cpu_to_forward`) and freed
    activations are kept for reuse (:func:`reuse_freed_memory`)."""
    if device.type == "cpu":
        reuse_freed_memory()
    plan = plan_inputs(scorers)
    dtypes = {name: next(scorer.parameters()).dtype for name, scorer in scorers.items()}
    loader = torch.utils.data.DataLoader(
        _BatchReader(rows.path.tolist(), rows.prompt.tolist(), plan),
        batch_size=None,
        sampler=_PartBatches(parts, batch_size),
        num_workers=num_workers,
        collate_fn=_as_is,
        pin_memory=device.type == "cuda",
        worker_init_fn=yield_cpu_to_forward if device.type == "cpu" else None,
    )
    ids, paths = rows.image_id.to_numpy(), rows.path.to_numpy()
    missing = [name for name in embed if not scorers[name].has_image_embedding()]
    if missing:
        raise no_image_embedding(missing[0])
    pending = (_PartResult(*part, list(scorers), embed) for part in parts)
    current = next(pending)
    threads = ForwardThreads(num_workers, cpu_threads) if device.type == "cpu" else None
    try:
        with torch.inference_mode():
            for batch in loader:
                current.add(batch, *(_score_batch(batch, scorers, plan, dtypes, device, embed) if batch["i"] else ({}, {})))
                if progress is not None:
                    progress.update(len(batch["i"]) + len(batch["bad"]))
                if current.complete:
                    yield (current.part, *current.frames(ids, paths))
                    current = next(pending, None)
    finally:
        if threads is not None:
            threads.restore()


def score_rows(
    rows: pd.DataFrame,
    scorers: dict[str, RewardModel],
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    progress: Any = None,
    cpu_threads: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score ``rows`` (image_id, prompt, path) with every scorer; returns (scores, errors)."""
    parts = iter_scored_parts(rows, scorers, [(0, 0, len(rows))], batch_size=batch_size, num_workers=num_workers, device=device, progress=progress, cpu_threads=cpu_threads)
    [(_, scores, errors)] = list(parts)
    return scores, errors


def load_scorers(cfg: ScoreConfig, device: torch.device) -> dict[str, RewardModel]:
    """The configured metrics' scorers (concurrently where they allow it, see :func:`load_rewards`)."""
    return load_rewards({name: {"weights": cfg.weights.get(name), **cfg.options.get(name, {})} for name in cfg.metrics}, device=device, dtype=cfg.dtype)


@dataclass
class ScoringSummary:
    output_dir: str
    images: int
    scored: int
    errors: dict[str, int]
    parts_total: int
    parts_made: int
    seconds: float
    skipped_rows: dict[str, int] = field(default_factory=dict)  # input rows not scored: reason -> count

    def line(self) -> str:
        rate = self.scored / self.seconds if self.seconds > 0 and self.parts_made else 0.0
        bad = ", ".join(f"{n} {r}" for r, n in self.errors.items()) or "none"
        skipped = f", skipped rows: {', '.join(f'{n} {r}' for r, n in self.skipped_rows.items())}" if self.skipped_rows else ""
        return f"score: {self.scored}/{self.images} images scored, errors: {bad}{skipped}; {self.parts_made}/{self.parts_total} parts made ({rate:.1f} img/s) -> {self.output_dir}"


def check_scoring_settings(path: Path, settings: dict, is_main: bool = True) -> None:
    """Refuse to resume scores made with other settings (they would mix): compare ``settings`` with
    those recorded in ``path`` (JSON), or record them there if it does not exist yet."""
    if path.exists():
        previous = json.loads(path.read_text())
        for key, value in settings.items():
            if previous.get(key) != value:
                raise UserError(f"{path.parent}: already holds scores made with {key}={previous.get(key)!r}, not {value!r}; delete it or use another output_dir")
    elif is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2))


def _part_file(output_dir: Path, kind: str, part: int) -> Path:
    return output_dir / kind / f"part-{part:05d}.parquet"


def _embedding_file(output_dir: Path, metric: str, part: int) -> Path:
    return output_dir / "embeddings" / metric / f"part-{part:05d}.npy"


def _part_done(output_dir: Path, part: int, embed: Sequence[str]) -> bool:
    """A part is finished when its scores part and the embeddings asked for exist."""
    return _part_file(output_dir, "scores", part).exists() and all(_embedding_file(output_dir, m, part).exists() for m in embed)


def _atomic_save_npy(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


@quiet_library_bars()
def run_scoring(cfg: ScoreConfig, load: Callable[[ScoreConfig, torch.device], dict[str, RewardModel]] = load_scorers) -> ScoringSummary:
    """Score this process's parts, then (main process) merge them into ``scores.parquet``.

    ``load`` makes the scorers, called only when some part is left to score (a caller scoring
    several folders with the same metrics can pass one that keeps them loaded)."""
    from accelerate import PartialState

    from sr_finetune.distributed import warn_if_single_cpu_launch
    from sr_finetune.models import resolve_device

    found = read_image_rows(cfg)
    rows, skipped = found.rows, describe_skipped(found.source, found.skipped)
    if rows.empty:
        raise UserError(f"nothing to score: {found.source} has no rows" + (f" to score ({'; '.join(skipped.splitlines())})" if skipped else ""))
    warn_if_single_cpu_launch()
    state = PartialState(cpu=cfg.device == "cpu")
    if skipped and state.is_main_process:
        logger.warning(skipped)
    output_dir = Path(cfg.output_dir)
    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(to_yaml(cfg))
    n_parts = -(-len(rows) // cfg.rows_per_part)
    todo = [k for k in range(state.process_index, n_parts, state.num_processes) if not _part_done(output_dir, k, cfg.embeddings)]
    start = time.perf_counter()
    if todo:
        device = state.device if cfg.device == "auto" else resolve_device(cfg.device)
        if device.type == "cpu":
            reuse_freed_memory()  # before loading too: buffers freed while loading are reused
        scorers = load(cfg, device)
        start = time.perf_counter()  # throughput excludes model loading
        total = sum(min((k + 1) * cfg.rows_per_part, len(rows)) - k * cfg.rows_per_part for k in todo)
        with progress(total=total, unit="img", desc=f"score [{state.process_index}/{state.num_processes}]", position=state.process_index) as bar:
            parts = [(k, k * cfg.rows_per_part, min((k + 1) * cfg.rows_per_part, len(rows))) for k in todo]
            scored = iter_scored_parts(
                rows, scorers, parts, batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=device, progress=bar,
                cpu_threads=cfg.cpu_threads, embed=cfg.embeddings,
            )
            for k, scores, errors in scored:
                # errors and embeddings first: a scores part is the "finished" marker
                for name in cfg.embeddings:
                    vectors = scores.pop(embedding_column(name))
                    _atomic_save_npy(np.stack(vectors.tolist()) if len(vectors) else np.zeros((0, 0), np.float32), _embedding_file(output_dir, name, k))
                atomic_write_parquet(errors, _part_file(output_dir, "errors", k))
                atomic_write_parquet(mark_table(scores, cfg.metrics), _part_file(output_dir, "scores", k))
    seconds = time.perf_counter() - start
    state.wait_for_everyone()
    merged_scores, merged_errors = read_scores(output_dir), read_errors(output_dir)
    available_rewards()  # registers every scorer's eval-only mark, also when no part was left to score
    if state.is_main_process:
        atomic_write_parquet(mark_table(rows.merge(merged_scores, on="image_id", how="inner"), cfg.metrics), output_dir / "scores.parquet")
        atomic_write_parquet(merged_errors, output_dir / "errors.parquet")
    reasons = merged_errors.reason.str.split(":").str[0].value_counts().to_dict() if len(merged_errors) else {}
    if reasons and state.is_main_process:
        logger.warning("score: %d unreadable images (see %s): %s", len(merged_errors), output_dir / "errors.parquet", reasons)
    return ScoringSummary(str(output_dir), len(rows), len(merged_scores), reasons, n_parts, len(todo), seconds, found.skip_counts())


def read_scores(output_dir: str | Path) -> pd.DataFrame:
    """All score parts of a scoring folder: ``image_id`` + one column per metric."""
    return read_parts(Path(output_dir) / "scores")


def read_embeddings(output_dir: str | Path, metric: str, image_ids: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The image embeddings a scoring run wrote for ``metric``: (image ids [N], float32 [N, D]),
    part after part in the scores parts' row order; with ``image_ids``, only those rows (parts
    are memory-mapped, so a subset of a large run costs only its own rows)."""
    output_dir = Path(output_dir)
    files = sorted((output_dir / "scores").glob("part-*.parquet"))
    if not files:
        raise UserError(f"{output_dir}: no scoring parts (run the score stage first)")
    wanted = None if image_ids is None else set(map(str, image_ids))
    ids, vectors = [], []
    for scores_file in files:
        npy = output_dir / "embeddings" / metric / scores_file.name.replace(".parquet", ".npy")
        if not npy.is_file():
            raise UserError(f"{output_dir}: no {metric} embeddings for {scores_file.name} (score with embeddings=[{metric}])")
        part_ids = pd.read_parquet(scores_file, columns=["image_id"]).image_id.astype(str).to_numpy()
        part = np.load(npy, mmap_mode="r")
        if len(part) != len(part_ids):
            raise UserError(f"{npy}: {len(part)} embeddings for {len(part_ids)} scored rows")
        if len(part_ids) == 0:  # every image of the part unreadable
            continue
        keep = np.ones(len(part_ids), dtype=bool) if wanted is None else np.fromiter((i in wanted for i in part_ids), bool, len(part_ids))
        ids.append(part_ids[keep])
        vectors.append(np.asarray(part[keep], dtype=np.float32))
    if not vectors:
        return np.zeros(0, dtype=object), np.zeros((0, 0), np.float32)
    return np.concatenate(ids), np.concatenate(vectors)


def read_errors(output_dir: str | Path) -> pd.DataFrame:
    """All error parts of a scoring folder: ``image_id, path, reason``."""
    return read_parts(Path(output_dir) / "errors")
