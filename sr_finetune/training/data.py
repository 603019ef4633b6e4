"""The fine-tune set as training batches: loading, augmentation, latent / text caches, the sampler.

Everything random in the data path is a pure function of ``(seed, epoch, row)`` rather than of
a generator's running state, so a resumed run sees exactly the images, flips and order that an
uninterrupted run would have seen, whatever the number of DataLoader workers.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from pathlib import Path
from typing import Iterator

import torch

from ..errors import UserError
from ..models import vae_scale_factor
from ..progress import progress

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("image", "text", "role", "prompt_id", "score")
ROLES = ("chosen", "rejected", "regularization")


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, stable across runs, processes and machines."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def load_finetune_table(path: str):
    """Open a fine-tune set saved with ``datasets.save_to_disk`` and check its columns and roles."""
    from datasets import DatasetDict, load_from_disk

    if not Path(path).exists():
        raise UserError(f"dataset: {path} does not exist (expected a folder written by datasets.save_to_disk)")
    try:
        table = load_from_disk(path)
    except FileNotFoundError as exc:
        raise UserError(f"dataset: {path} is not a datasets folder ({str(exc).splitlines()[0]})") from None
    if isinstance(table, DatasetDict):
        if "train" not in table:
            raise UserError(f"dataset: {path} holds splits {list(table)}, expected a 'train' split or a single dataset")
        table = table["train"]
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise UserError(f"dataset: {path} lacks column(s) {missing}; a fine-tune set has columns {list(REQUIRED_COLUMNS)}")
    if len(table) == 0:
        raise UserError(f"dataset: {path} has no rows")
    roles = table["role"]
    bad = [(i, r) for i, r in enumerate(roles) if r not in ROLES]
    if bad:
        row, role = bad[0]
        raise UserError(f"dataset: {path} row {row} has role {role!r}; roles are {ROLES} ({len(bad)} bad rows)")
    return table


def role_counts(table) -> dict[str, int]:
    counts = Counter(table["role"])
    return {role: counts.get(role, 0) for role in ROLES}


def check_negative_token(table, negative_token: str) -> int:
    """Count rejected rows whose text lacks the negative token (warned about: the token is what they teach)."""
    lacking = sum(1 for text, role in zip(table["text"], table["role"]) if role == "rejected" and negative_token not in text)
    if lacking:
        logger.warning("%d rejected rows do not contain the negative token %r; is negative_token set to the pair builder's token?", lacking, negative_token)
    return lacking


def preprocess_image(image, resolution: int, center_crop: bool, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """PIL image -> float tensor [3, R, R] in [-1, 1]: resize the short side, crop, optionally mirror."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    image = TF.resize(image.convert("RGB"), resolution, interpolation=InterpolationMode.BILINEAR, antialias=True)
    width, height = image.size
    if center_crop:
        image = TF.center_crop(image, [resolution, resolution])
    else:
        top = int(torch.randint(0, height - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - resolution + 1, (1,), generator=generator))
        image = TF.crop(image, top, left, resolution, resolution)
    if flip:
        image = TF.hflip(image)
    return TF.normalize(TF.to_tensor(image), [0.5], [0.5])


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def encode_texts(text_encoder, tokenizer, texts: list[str], device: torch.device) -> torch.Tensor:
    """The frozen text encoder's embeddings of ``texts`` (fp32, on the CPU): what the text cache holds."""
    return text_encoder(tokenize(tokenizer, texts).to(device))[0].float().cpu()


class EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation of the rows per epoch, yielding ``(epoch, row)`` keys.

    The order depends only on (seed, epoch), so ``skip_first_batches`` after a resume lands on
    exactly the batch an uninterrupted run would have trained on next.
    """

    def __init__(self, num_rows: int, seed: int):
        self.num_rows = num_rows
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_rows

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "order", self.epoch))
        for row in torch.randperm(self.num_rows, generator=generator).tolist():
            yield (self.epoch, row)


class FinetuneDataset(torch.utils.data.Dataset):
    """Rows of the fine-tune set as training examples, from cached latents/embeddings where present.

    The DataLoader fetches a whole batch with one ``__getitems__`` call: one table read and one
    tokenizer call per batch instead of one per row, and cached arrays straight from arrow.
    """

    def __init__(
        self, table, tokenizer, resolution: int, center_crop: bool, random_flip: bool, seed: int,
        empty_prompt_share: float = 0.0, empty_prompt_embeds: torch.Tensor | None = None,
    ):  # fmt: skip
        self.table = table
        self.empty_prompt_share = empty_prompt_share
        self.empty_prompt_embeds = empty_prompt_embeds  # the empty caption's cached embedding (text cache only)
        if empty_prompt_share > 0 and "prompt_embeds" in table.column_names and empty_prompt_embeds is None:
            raise ValueError("FinetuneDataset: cached text embeddings with empty_prompt_share > 0 need empty_prompt_embeds")
        self.arrays = FixedShapeColumns(table)
        self.rest = table.remove_columns(self.arrays.names) if self.arrays.names else table
        self.tokenizer = tokenizer
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[dict]:
        """The examples of ``(epoch, row)`` keys, in order."""
        return self.examples(keys)

    def examples(self, keys: list[tuple[int, int]], augment_keys: list[tuple[int, int]] | None = None) -> list[dict]:
        """The examples of ``(epoch, row)`` keys; ``augment_keys`` (default ``keys``) seed the flips and
        crops, so rows given the same augment key (the two images of a pair) are augmented alike."""
        indices = [index for _, index in keys]
        rows = self.rest[indices]
        rows.update({name: self.arrays.take(name, indices) for name in self.arrays.names})
        generators = [torch.Generator().manual_seed(derive_seed(self.seed, "augment", epoch, index)) for epoch, index in (augment_keys or keys)]
        flips = [self.random_flip and bool(torch.rand(1, generator=g) < 0.5) for g in generators]
        columns = {}
        if "latent_mean" in rows:
            columns["latent_mean"] = _pick_flipped(rows, "latent_mean", flips)
            columns["latent_logvar"] = _pick_flipped(rows, "latent_logvar", flips)
        else:
            columns["pixel_values"] = [
                preprocess_image(image, self.resolution, self.center_crop, flip, g) for image, flip, g in zip(rows["image"], flips, generators)
            ]
        emptied = self.emptied(augment_keys or keys)
        if "prompt_embeds" in rows:
            columns["prompt_embeds"] = [self.empty_prompt_embeds if empty else embeds for embeds, empty in zip(rows["prompt_embeds"], emptied)]
        else:
            columns["input_ids"] = tokenize(self.tokenizer, ["" if empty else text for text, empty in zip(rows["text"], emptied)])
        columns["prompt_id"] = [str(p) for p in rows["prompt_id"]]
        columns["role"] = rows["role"]
        return [{name: values[i] for name, values in columns.items()} for i in range(len(keys))]

    def emptied(self, keys: list[tuple[int, int]]) -> list[bool]:
        """Which of ``keys`` train on the empty caption this epoch: ``empty_prompt_share`` of them, by a
        draw seeded per (epoch, row), so a resumed run empties the same rows."""
        if self.empty_prompt_share <= 0:
            return [False] * len(keys)
        draws = [torch.rand(1, generator=torch.Generator().manual_seed(derive_seed(self.seed, "empty-prompt", epoch, index))) for epoch, index in keys]
        return [bool(draw < self.empty_prompt_share) for draw in draws]


class FixedShapeColumns:
    """Zero-copy batch reads of a dataset's fixed-shape array columns (the latent and text caches).

    ``datasets`` converts such columns row by row in Python (milliseconds per batch); a numpy view
    of each (memory-mapped) arrow chunk gathers a batch in microseconds. The views are rebuilt
    lazily after pickling, so DataLoader workers receive only the dataset.
    """

    def __init__(self, table):
        from datasets import Array2D, Array3D, Array4D, Array5D

        self.table = table
        self._chunks: dict | None = None
        fixed = (Array2D, Array3D, Array4D, Array5D)
        candidates = [name for name, feature in table.features.items() if isinstance(feature, fixed) and None not in feature.shape]
        if table._indices is not None:  # rows reordered by an indices mapping: leave them to datasets
            candidates = []
        self.names = [name for name in candidates if self._views(name) is not None]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_chunks": None}

    def _views(self, name: str) -> tuple[list, list[int]] | None:
        """Per arrow chunk a numpy view of shape [rows, *shape], and each chunk's first row (None: not zero-copy)."""
        import pyarrow as pa

        if self._chunks is None:
            self._chunks = {}
        if name not in self._chunks:
            shape = tuple(self.table.features[name].shape)
            views, starts, start = [], [], 0
            try:
                for chunk in self.table.data.column(name).chunks:
                    values = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
                    if values.null_count:
                        return None
                    for _ in shape:
                        values = values.flatten()
                    view = values.to_numpy(zero_copy_only=True).reshape(-1, *shape)
                    if len(view) != len(chunk):
                        return None
                    views.append(view)
                    starts.append(start)
                    start += len(chunk)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
                return None
            self._chunks[name] = (views, starts)
        return self._chunks[name]

    def take(self, name: str, indices: list[int]) -> torch.Tensor:
        """Rows ``indices`` of column ``name`` as one tensor [len(indices), *shape] (a copy)."""
        import numpy as np

        views, starts = self._views(name)
        chunks = np.searchsorted(starts, indices, side="right") - 1
        return torch.from_numpy(np.stack([views[c][i - starts[c]] for c, i in zip(chunks, indices)]))


def _pick_flipped(rows: dict, name: str, flips: list[bool]) -> list[torch.Tensor]:
    """Per row, the cached latent of the image or of its mirror image."""
    plain, mirrored = rows[name], rows.get(f"{name}_flipped")
    return [mirrored[i] if flip else plain[i] for i, flip in enumerate(flips)]


def collate(items: list[dict]) -> dict:
    batch = {key: torch.stack([it[key] for it in items]) for key in items[0] if isinstance(items[0][key], torch.Tensor)}
    batch["prompt_id"] = [it["prompt_id"] for it in items]
    batch["role"] = [it["role"] for it in items]
    return batch


def build_cached_table(table, *, accelerator, vae, text_encoder, tokenizer, cfg, cache_dir: Path, weight_dtype: torch.dtype, cache_latents: bool, cache_text: bool):
    """Encode every row once: latent distribution parameters (mean, logvar) and/or text embeddings.

    Each process encodes a contiguous shard into its own arrow file under ``cache_dir``; all
    processes then read all shards. Files are named by a fingerprint of everything that changes
    their content, so a resumed run reuses them and a changed setting makes new ones.
    """
    from datasets import Array2D, Array3D, Dataset, Features, concatenate_datasets

    if not (cache_latents or cache_text):
        return table
    world, rank = accelerator.num_processes, accelerator.process_index
    features = {}
    if cache_latents:
        factor = vae_scale_factor(vae)
        shape = (vae.config.latent_channels, cfg.resolution // factor, cfg.resolution // factor)
        names = ["latent_mean", "latent_logvar"] + (["latent_mean_flipped", "latent_logvar_flipped"] if cfg.random_flip else [])
        features.update({name: Array3D(shape=shape, dtype="float32") for name in names})
    if cache_text:
        features["prompt_embeds"] = Array2D(shape=(tokenizer.model_max_length, text_encoder.config.hidden_size), dtype="float32")
    fingerprint = derive_seed(table._fingerprint, cfg.model, cfg.revision, cfg.variant, cfg.resolution, cfg.center_crop, cfg.random_flip, sorted(features), str(weight_dtype))
    device = accelerator.device

    @torch.no_grad()
    def encode(rows: dict) -> dict:
        out = {}
        if cache_latents:
            pixels = torch.stack([preprocess_image(im, cfg.resolution, True, False) for im in rows["image"]])
            n = len(pixels)
            if cfg.random_flip:  # a centre crop mirrored == the mirrored image centre-cropped
                pixels = torch.cat([pixels, pixels.flip(-1)])
            dist = vae.encode(pixels.to(device, weight_dtype)).latent_dist
            mean, logvar = dist.mean.float().cpu().numpy(), dist.logvar.float().cpu().numpy()
            out["latent_mean"], out["latent_logvar"] = mean[:n], logvar[:n]
            if cfg.random_flip:
                out["latent_mean_flipped"], out["latent_logvar_flipped"] = mean[n:], logvar[n:]
        if cache_text:
            out["prompt_embeds"] = encode_texts(text_encoder, tokenizer, rows["text"], device).numpy()
        return out

    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = [cache_dir / f"encoded-{fingerprint:016x}-{r:05d}-of-{world:05d}.arrow" for r in range(world)]
    shard = table.shard(num_shards=world, index=rank, contiguous=True)
    reused = len(shard) if paths[rank].exists() else 0  # map then reads the file and encodes nothing
    desc = f"cache {' and '.join(n for n, on in (('latents', cache_latents), ('text embeddings', cache_text)) if on)} [{rank}/{world}]"
    with progress(desc=desc, total=len(shard), initial=reused, unit="row", disable=not accelerator.is_local_main_process) as bar:

        def encode_and_count(rows: dict) -> dict:
            out = encode(rows)
            bar.update(len(rows["text"]))
            return out

        shard.map(
            encode_and_count,
            batched=True,
            batch_size=max(cfg.train_batch_size, 8),
            remove_columns=shard.column_names,
            features=Features(features),
            cache_file_name=str(paths[rank]),
            new_fingerprint=f"{fingerprint:016x}-{rank}",
            load_from_cache_file=True,
        )
    accelerator.wait_for_everyone()
    encoded = concatenate_datasets([Dataset.from_file(str(p)) for p in paths])
    base = table.remove_columns(["image"]) if cache_latents else table
    cached = concatenate_datasets([base, encoded], axis=1)
    cached.set_format("torch", columns=list(features), output_all_columns=True)
    return cached
