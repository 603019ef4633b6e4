"""The demo world's CLIP: a small OpenAI-layout CLIP trained contrastively on world renders and
their captions, the stand-in for OpenAI's ViT-L/14 from which Social Reward is fine-tuned.

Built with :func:`reward.openai_clip.build_openai_clip`, trained on images preprocessed exactly
as the ``clip`` / ``social_reward`` scorers preprocess them (openai/CLIP's transform at 32 px)
and tokenised as they tokenise (open_clip, ``WORLD_CLIP["context_length"]`` tokens), and saved
as an OpenAI-layout safetensors state dict, so ``load_reward("clip", weights=PATH)`` and
``load_reward("social_reward", weights=PATH)`` load it. The loss is CLIP's symmetric
cross-entropy, with every row of the same caption counted as a match (a batch of 3,024 possible
captions often holds one caption twice). Batches come from the *train* prompts only;
checkpoints and ``resume`` work as in :mod:`sr_finetune.world.train_base`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sr_finetune.errors import UserError
from sr_finetune.world.assets import pack_state, unpack_state, world_token_ids
from sr_finetune.world.scenes import IMAGE_SIZE, split_prompts
from sr_finetune.world.train_base import Phase, open_run, sample_renders, seed_of

from .openai_clip import build_openai_clip
from .preprocess import openai_clip_transform

logger = logging.getLogger(__name__)

WORLD_CLIP: dict[str, int] = {
    "embed_dim": 64,
    "image_size": IMAGE_SIZE,
    "patch_size": 4,
    "vision_width": 64,
    "vision_layers": 2,
    "context_length": 24,
    "vocab_size": 49408,
    "text_width": 64,
    "text_layers": 2,
}
WEIGHTS_FILE = "world_clip.safetensors"


@dataclass
class ClipTrainConfig:
    out_dir: str
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 30
    checkpoint_every: int = 50
    seed: int = 0
    threads: int = 0


def caption_matches(captions: list[str]) -> torch.Tensor:
    """Row-normalised [N, N] targets: 1 where two rows share a caption."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    index = torch.tensor([ids[c] for c in captions])
    same = (index[:, None] == index[None, :]).float()
    return same / same.sum(1, keepdim=True)


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy on L2-normalised features, with soft targets for repeats."""
    image_features = torch.nn.functional.normalize(image_features, dim=-1)
    text_features = torch.nn.functional.normalize(text_features, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * image_features @ text_features.T
    return 0.5 * (torch.nn.functional.cross_entropy(logits, targets) + torch.nn.functional.cross_entropy(logits.T, targets))


def train_world_clip(cfg: ClipTrainConfig, resume: bool = False) -> Path:
    """Train (or resume) the world CLIP; returns ``out_dir/world_clip.safetensors``."""
    from open_clip.tokenizer import tokenize
    from safetensors.torch import save_file

    if cfg.steps < 1 or cfg.batch_size < 2:
        raise UserError(f"train-clip: steps must be >= 1 and batch_size >= 2 (got {cfg.steps}, {cfg.batch_size})")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out_dir", "threads", "checkpoint_every")} | {"config": WORLD_CLIP}
    ckpt = open_run(out, settings, "train_clip.json", resume, "train-clip")

    torch.manual_seed(cfg.seed)
    model = build_openai_clip(WORLD_CLIP).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1)
    start = 0
    if resume and ckpt.exists():
        ckpt.load_models({"clip": model})
        ckpt.load_optimizer(optimizer)
        start = ckpt.state()["step"]
    transform = openai_clip_transform(WORLD_CLIP["image_size"])
    prompts = split_prompts("train")
    phase = Phase("world clip", optimizer, ckpt, {"clip": model}, {"phase": "clip"}, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.checkpoint_every, digits=3)
    for step in phase.steps(start):
        images, captions = sample_renders(prompts, cfg.batch_size, seed_of(cfg.seed, "clip", step))
        pixels = torch.stack([transform(im) for im in images])
        tokens = tokenize(captions, context_length=WORLD_CLIP["context_length"])
        phase.update(step, contrastive_loss(model.encode_image(pixels), model.encode_text(tokens), model.logit_scale, caption_matches(captions)))
    path = out / WEIGHTS_FILE
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "attn_mask"}, str(path))
    return path


CLIP_ASSET = "world_clip.safetensors"
CLIP_EMBEDDING = "token_embedding.weight"


def pack_world_clip(weights: str | os.PathLike, dest_dir: str | os.PathLike) -> Path:
    """Pack a world CLIP file (fp16, used token rows only) into ``dest_dir/world_clip.safetensors``."""
    from safetensors.torch import load_file, save_file

    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    save_file(pack_state(load_file(str(weights)), [CLIP_EMBEDDING], world_token_ids()), str(dest / CLIP_ASSET))
    return dest / CLIP_ASSET


def materialize_world_clip(path: str | os.PathLike, assets_dir: str | os.PathLike) -> Path:
    """Write the packed world CLIP as an fp32 OpenAI-layout safetensors file at ``path``."""
    from safetensors.torch import load_file, save_file

    packed = Path(assets_dir) / CLIP_ASSET
    if not packed.is_file():
        raise UserError(f"no packed world CLIP in {assets_dir} ({CLIP_ASSET}); train one with `sr-finetune world train-clip`")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in unpack_state(load_file(str(packed)), [CLIP_EMBEDDING]).items()}, str(path))
    return path


__all__ = ["ClipTrainConfig", "WEIGHTS_FILE", "WORLD_CLIP", "caption_matches", "contrastive_loss", "materialize_world_clip", "pack_world_clip", "train_world_clip"]
