"""Batched, sharded, resumable image generation: prompts -> images + a parquet manifest.

Work is cut into shards of ``prompts_per_shard`` prompts; shard ``k`` belongs to process
``k % world_size``. A finished shard has its manifest part ``manifest/part-XXXXX.parquet``
and is never redone; inside an unfinished shard, images already written (atomically) are
kept, so a crash loses at most the batch in flight. Every image has its own seed, derived
from (global seed, prompt id, index), so any image can be regenerated alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional

import pandas as pd

from .config import require, to_yaml
from .distributed import warn_if_single_cpu_launch
from .errors import ConfigError, UserError
from .io import atomic_write_parquet, atomic_save_image, read_parts
from .progress import progress, quiet_library_bars
from .prompts import PromptSet, load_prompts

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["image_id", "prompt_id", "prompt", "path", "seed", "model", "negative_prompt", "steps", "guidance", "index", "height", "width", "scheduler"]
IMAGE_FORMATS = ("png", "jpg", "webp")


@dataclass
class GenerateConfig:
    """Settings of the generation stage (``generate:`` in a recipe config)."""

    model: str = "stabilityai/stable-diffusion-2-1-base"
    revision: Optional[str] = None
    variant: Optional[str] = None
    prompts: Optional[str] = None  # file, named set (e.g. "parti") or `datasets` id
    prompt_column: Optional[str] = None
    id_column: Optional[str] = None
    split: str = "train"
    max_prompts: Optional[int] = None
    dedupe_prompts: bool = True
    output_dir: str = "runs/generations"
    images_per_prompt: int = 4
    seed: int = 0
    scheduler: str = "ddim"
    steps: int = 30
    guidance_scale: float = 7.5
    # several scales: image i of each prompt is sampled at guidance_scales[i % len] (a pool whose
    # images differ in what guidance changes: contrast, saturation); empty = guidance_scale for all
    guidance_scales: List[float] = field(default_factory=list)
    height: int = 512
    width: int = 512
    negative_prompt: Optional[str] = None
    batch_size: int = 8
    prompts_per_shard: int = 256
    dtype: str = "auto"  # auto = fp16 on GPU, fp32 on CPU
    device: str = "auto"
    attention: str = "sdpa"
    image_format: str = "png"
    model_name: Optional[str] = None  # recorded in the manifest; defaults to `model`

    def validate(self) -> None:
        for key in ("images_per_prompt", "steps", "batch_size", "prompts_per_shard", "height", "width"):
            require(getattr(self, key) > 0, key, f"must be positive, got {getattr(self, key)}")
        require(self.height % 8 == 0 and self.width % 8 == 0, "height", f"height and width must be multiples of 8, got {self.height}x{self.width}")
        require(self.guidance_scale >= 0, "guidance_scale", f"must be >= 0, got {self.guidance_scale}")
        require(all(g >= 0 for g in self.guidance_scales), "guidance_scales", f"must all be >= 0, got {list(self.guidance_scales)}")
        require(self.max_prompts is None or self.max_prompts > 0, "max_prompts", f"must be positive, got {self.max_prompts}")
        require(self.image_format in IMAGE_FORMATS, "image_format", f"must be one of {IMAGE_FORMATS}, got '{self.image_format}'")
        from .models import ATTENTION_BACKENDS, DTYPES, SCHEDULERS

        require(self.scheduler in SCHEDULERS, "scheduler", f"must be one of {SCHEDULERS}, got '{self.scheduler}'")
        require(self.attention in ATTENTION_BACKENDS, "attention", f"must be one of {ATTENTION_BACKENDS}, got '{self.attention}'")
        require(self.dtype == "auto" or self.dtype.lower() in DTYPES, "dtype", f"must be auto or one of {sorted(DTYPES)}, got '{self.dtype}'")


@dataclass(frozen=True)
class WorkItem:
    """One image to make."""

    prompt_id: str
    prompt: str
    index: int
    seed: int
    image_id: str
    path: str  # relative to the output folder
    guidance: float  # its guidance scale


def image_seed(global_seed: int, prompt_id: str, index: int) -> int:
    """Seed of image ``index`` of ``prompt_id``: a 63-bit hash, stable across runs and machines."""
    digest = hashlib.sha256(f"{global_seed}/{prompt_id}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def image_id_for(prompt_id: str, index: int) -> str:
    return f"{prompt_id}_{index}"


def shard_items(cfg: GenerateConfig, prompt_set: PromptSet, shard: int) -> list[WorkItem]:
    """The images of one shard, in a fixed order."""
    start = shard * cfg.prompts_per_shard
    items = []
    for prompt_id, prompt in zip(prompt_set.ids[start : start + cfg.prompts_per_shard], prompt_set.prompts[start : start + cfg.prompts_per_shard]):
        for index in range(cfg.images_per_prompt):
            image_id = image_id_for(prompt_id, index)
            filename = _UNSAFE.sub("-", image_id) + f"-{hashlib.sha1(image_id.encode()).hexdigest()[:6]}.{cfg.image_format}"
            items.append(WorkItem(prompt_id, prompt, index, image_seed(cfg.seed, prompt_id, index), image_id, f"images/{shard:05d}/{filename}", image_guidance(cfg, index)))
    return items


def image_guidance(cfg: GenerateConfig, index: int) -> float:
    """The guidance scale of image ``index`` of a prompt."""
    return float(cfg.guidance_scales[index % len(cfg.guidance_scales)]) if cfg.guidance_scales else float(cfg.guidance_scale)


def num_shards(cfg: GenerateConfig, prompt_set: PromptSet) -> int:
    return -(-len(prompt_set) // cfg.prompts_per_shard)


def part_path(output_dir: Path, shard: int) -> Path:
    return output_dir / "manifest" / f"part-{shard:05d}.parquet"


def _settings_fingerprint(cfg: GenerateConfig, prompt_set: PromptSet) -> dict:
    """What must not change between a run and its resume (anything that changes the images)."""
    prompts_hash = hashlib.sha256("\n".join(f"{i}\t{p}" for i, p in zip(prompt_set.ids, prompt_set.prompts)).encode()).hexdigest()
    keys = ("model", "revision", "variant", "images_per_prompt", "seed", "scheduler", "steps", "guidance_scale", "height", "width", "negative_prompt", "prompts_per_shard", "image_format")
    several = {"guidance_scales": list(cfg.guidance_scales)} if cfg.guidance_scales else {}  # absent: folders made before it stay valid
    return {**{k: getattr(cfg, k) for k in keys}, **several, "prompts_sha256": prompts_hash, "num_prompts": len(prompt_set)}


GENERATION_RECORD = "generation.json"  # the settings a generation folder's images were made with


def generation_record(output_dir: str | os.PathLike) -> dict | None:
    """The settings recorded in a generation folder (model, seed, ...), or None before its first run."""
    path = Path(output_dir) / GENERATION_RECORD
    return json.loads(path.read_text()) if path.exists() else None


def _check_or_write_fingerprint(output_dir: Path, fingerprint: dict, is_main: bool) -> None:
    path = output_dir / GENERATION_RECORD
    previous = generation_record(output_dir)
    if previous is not None:
        changed = [k for k in {**previous, **fingerprint} if previous.get(k) != fingerprint.get(k)]  # a setting recorded only when used counts too
        if changed:
            k = changed[0]
            raise UserError(f"{output_dir}: already holds generations made with {k}={previous.get(k)!r}, not {fingerprint.get(k)!r}; use another output_dir")
    elif is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(fingerprint, indent=2))


def _batches(items: list[WorkItem], size: int) -> Iterator[list[WorkItem]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _pick_dtype(cfg: GenerateConfig, device) -> str:
    if cfg.dtype != "auto":
        return cfg.dtype
    return "fp16" if device.type == "cuda" else "fp32"


def _manifest_rows(cfg: GenerateConfig, items: list[WorkItem]) -> pd.DataFrame:
    model_name = cfg.model_name or cfg.model
    return pd.DataFrame(
        {
            "image_id": [it.image_id for it in items],
            "prompt_id": [it.prompt_id for it in items],
            "prompt": [it.prompt for it in items],
            "path": [it.path for it in items],
            "seed": [it.seed for it in items],
            "model": model_name,
            "negative_prompt": cfg.negative_prompt,
            "steps": cfg.steps,
            "guidance": [it.guidance for it in items],
            "index": [it.index for it in items],
            "height": cfg.height,
            "width": cfg.width,
            "scheduler": cfg.scheduler,
        },
        columns=MANIFEST_COLUMNS,
    )


def generate_images(pipe, cfg: GenerateConfig, items: list[WorkItem]) -> list:
    """Run the pipeline on one batch, each image with its own generator (batch-size independent noise)."""
    import torch

    images = {}
    for guidance in dict.fromkeys(it.guidance for it in items):  # one pipeline call per guidance scale
        group = [it for it in items if it.guidance == guidance]
        generators = [torch.Generator("cpu").manual_seed(it.seed) for it in group]
        negative = [cfg.negative_prompt] * len(group) if cfg.negative_prompt else None
        with torch.inference_mode():
            result = pipe(
                prompt=[it.prompt for it in group],
                negative_prompt=negative,
                generator=generators,
                num_inference_steps=cfg.steps,
                guidance_scale=guidance,
                height=cfg.height,
                width=cfg.width,
            )
        images.update(zip((it.image_id for it in group), result.images))
    return [images[it.image_id] for it in items]


@dataclass
class GenerationSummary:
    output_dir: str
    shards_total: int
    shards_done_before: int
    shards_made: int
    images_made: int
    images_reused: int
    prompts: int
    prompts_skipped: dict
    seconds: float

    def line(self) -> str:
        rate = self.images_made / self.seconds if self.seconds > 0 else 0.0
        skipped = f" (skipped: {', '.join(f'{n} {r}' for r, n in self.prompts_skipped.items())})" if self.prompts_skipped else ""
        return (
            f"generate: {self.prompts} prompts{skipped}, {self.shards_total} shards ({self.shards_done_before} already done), "
            f"{self.images_made} images made ({rate:.2f} img/s), {self.images_reused} reused -> {self.output_dir}"
        )


@quiet_library_bars()
def run_generation(cfg: GenerateConfig) -> GenerationSummary:
    """Generate this process's shards; the main process then writes the merged manifest."""
    from accelerate import PartialState

    from .models import load_pipeline, resolve_device

    require_prompts(cfg)
    prompt_set = load_prompts(cfg.prompts, column=cfg.prompt_column, id_column=cfg.id_column, split=cfg.split, dedupe=cfg.dedupe_prompts, limit=cfg.max_prompts)
    warn_if_single_cpu_launch()
    state = PartialState(cpu=cfg.device == "cpu")
    if prompt_set.skipped and state.is_main_process:
        logger.warning(prompt_set.skip_summary())
    output_dir = Path(cfg.output_dir)
    _check_or_write_fingerprint(output_dir, _settings_fingerprint(cfg, prompt_set), state.is_main_process)
    state.wait_for_everyone()
    if state.is_main_process:
        (output_dir / "config.yaml").write_text(to_yaml(cfg))

    total = num_shards(cfg, prompt_set)
    mine = [k for k in range(total) if k % state.num_processes == state.process_index]
    todo = [k for k in mine if not part_path(output_dir, k).exists()]
    made = reused = 0
    start = time.perf_counter()
    if todo:
        device = state.device if cfg.device == "auto" else resolve_device(cfg.device)
        pipe = load_pipeline(cfg.model, dtype=_pick_dtype(cfg, device), device=device, scheduler=cfg.scheduler, attention=cfg.attention, revision=cfg.revision, variant=cfg.variant)
        start = time.perf_counter()  # throughput excludes model loading
        n_images = sum(min(cfg.prompts_per_shard, len(prompt_set) - k * cfg.prompts_per_shard) for k in todo) * cfg.images_per_prompt
        desc = f"generate [{state.process_index}/{state.num_processes}]"
        with progress(total=n_images, unit="img", desc=desc, position=state.process_index, disable=not state.is_local_main_process and state.num_processes > 8) as bar:
            for shard in todo:
                items = shard_items(cfg, prompt_set, shard)
                missing = [it for it in items if not (output_dir / it.path).exists()]
                reused += len(items) - len(missing)
                bar.update(len(items) - len(missing))
                for batch in _batches(missing, cfg.batch_size):
                    for item, image in zip(batch, generate_images(pipe, cfg, batch)):
                        atomic_save_image(image, output_dir / item.path)
                    made += len(batch)
                    bar.set_postfix(shard=shard, refresh=False)
                    bar.update(len(batch))
                atomic_write_parquet(_manifest_rows(cfg, items), part_path(output_dir, shard))
    state.wait_for_everyone()
    if state.is_main_process:
        merged = read_parts(output_dir / "manifest")
        atomic_write_parquet(merged, output_dir / "manifest.parquet")
    return GenerationSummary(
        output_dir=str(output_dir),
        shards_total=total,
        shards_done_before=len(mine) - len(todo),
        shards_made=len(todo),
        images_made=made,
        images_reused=reused,
        prompts=len(prompt_set),
        prompts_skipped={k: len(v) for k, v in prompt_set.skipped.items()},
        seconds=time.perf_counter() - start,
    )


def require_prompts(cfg: GenerateConfig) -> None:
    if not cfg.prompts:
        raise ConfigError("config error: generate.prompts is required (a prompt file, a named set such as 'parti', or a datasets id)")


def read_manifest(output_dir: str | os.PathLike, absolute_paths: bool = True) -> pd.DataFrame:
    """The generations manifest of a folder (merged file, or the shard parts if not merged yet)."""
    output_dir = Path(output_dir)
    merged = output_dir / "manifest.parquet"
    df = pd.read_parquet(merged) if merged.exists() else read_parts(output_dir / "manifest")
    if absolute_paths:
        df["path"] = [str((output_dir / p).resolve()) for p in df["path"]]
    return df
