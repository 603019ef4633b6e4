"""``sr-finetune world ...``: make and inspect the demo world (command layer; wires the core's
world with the reward floor's world CLIP, importing each lazily).

    sr-finetune world community OUT [--prompts N] [--users N] [--taste T] [--appeal A] [--seed S]
    sr-finetune world train-base OUT [--vae-steps N] [--steps N] [...] [--resume] [--export-checkpoint]
    sr-finetune world train-clip OUT [--steps N] [--batch-size N] [--resume]
    sr-finetune world fidelity MODEL_DIR [--prompts N] [--guidance G] [--out DIR]
    sr-finetune world pack --base MODEL_DIR --clip FILE [--dest DIR]
    sr-finetune world materialize OUT
"""

from __future__ import annotations

import argparse
import json
import logging

logger = logging.getLogger("sr_finetune")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _community(args: argparse.Namespace) -> int:
    from ..world.community import CommunityConfig, simulate_community

    cfg = CommunityConfig(prompts=args.prompts, users=args.users, seed=args.seed, **_given(args, "taste", "appeal"))
    paths = simulate_community(args.out_dir, cfg)
    logger.info("community logs written: %s", ", ".join(f"{k} -> {v}" for k, v in paths.items()))
    return 0


def _given(args: argparse.Namespace, *names: str) -> dict:
    """The options given on the command line; the others keep the training config's defaults."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _train_base(args: argparse.Namespace) -> int:
    from ..world.base_model import WorldModelSpec
    from ..world.train_base import BaseTrainConfig, export_checkpoint, train_base

    if args.export_checkpoint:
        logger.info("pipeline written to %s", export_checkpoint(args.out_dir))
        return 0
    spec = WorldModelSpec(**{name: _ints(value) for name, value in _given(args, "unet_channels", "unet_heads").items()})
    cfg = BaseTrainConfig(args.out_dir, spec=spec, **_given(args, "vae_steps", "vae_lr", "steps", "batch_size", "lr", "warmup_steps", "checkpoint_every", "seed", "threads"))
    train_base(cfg, resume=args.resume)
    return 0


def _train_clip(args: argparse.Namespace) -> int:
    from reward.world_clip import ClipTrainConfig, train_world_clip

    cfg = ClipTrainConfig(args.out_dir, **_given(args, "steps", "batch_size", "lr", "seed", "threads"))
    logger.info("world CLIP written to %s", train_world_clip(cfg, resume=args.resume))
    return 0


def _fidelity(args: argparse.Namespace) -> int:
    from ..world.fidelity import format_report, measure_fidelity

    report = measure_fidelity(args.model, split=args.split, max_prompts=args.prompts, images_per_prompt=args.images_per_prompt, guidance=args.guidance, steps=args.steps, seed=args.seed, out_dir=args.out)
    print(format_report(report))
    return 0


def _pack(args: argparse.Namespace) -> int:
    from reward.world_clip import pack_world_clip

    from ..world.assets import ASSETS_DIR, pack_pipeline

    dest = args.dest or ASSETS_DIR
    written = [pack_pipeline(args.base, dest), pack_world_clip(args.clip, dest)]
    logger.info("packed: %s", ", ".join(f"{p} ({p.stat().st_size / 1e6:.2f} MB)" for p in written))
    return 0


def _materialize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from reward.world_clip import materialize_world_clip

    from ..world.assets import ASSETS_DIR, materialize_pipeline

    assets = args.assets or ASSETS_DIR
    out = Path(args.out_dir)
    paths = {"model": materialize_pipeline(out / "model", assets), "clip": materialize_world_clip(out / "world_clip.safetensors", assets)}
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


def add_world_parser(sub: argparse._SubParsersAction) -> None:
    """The ``world`` subcommand and its own subcommands."""
    world = sub.add_parser("world", help="the demo world: community logs, base model and CLIP training, fidelity, shipped weights")
    cmds = world.add_subparsers(dest="world_command", required=True)

    community = cmds.add_parser("community", help="simulate a community: images + engagement logs in the curation schema")
    community.add_argument("out_dir")
    community.add_argument("--prompts", type=int, default=300)
    community.add_argument("--users", type=int, default=400)
    community.add_argument("--taste", help="a named taste or module:function (default: CommunityConfig's, large-centred)")
    community.add_argument("--appeal", help="absolute (default) or relative: each post against its prompt's other posts")
    community.add_argument("--seed", type=int, default=0)
    community.set_defaults(func=_community)

    base = cmds.add_parser("train-base", help="train the world's base model (VAE, then UNet + text encoder); resumable")
    base.add_argument("out_dir")
    # options left out keep BaseTrainConfig's / WorldModelSpec's defaults (the recipe of the shipped weights)
    base.add_argument("--vae-steps", type=int)
    base.add_argument("--vae-lr", type=float)
    base.add_argument("--steps", type=int)
    base.add_argument("--batch-size", type=int)
    base.add_argument("--lr", type=float)
    base.add_argument("--warmup-steps", type=int)
    base.add_argument("--unet-channels", help="comma-separated block widths (default: WorldModelSpec's, 32,64,64)")
    base.add_argument("--unet-heads", help="comma-separated attention heads per block (default: WorldModelSpec's, 2,4,4)")
    base.add_argument("--checkpoint-every", type=int)
    base.add_argument("--seed", type=int)
    base.add_argument("--threads", type=int, help="torch CPU threads (default 0: torch's default; 1 on a shared machine)")
    base.add_argument("--resume", action="store_true", help="continue the checkpoint in OUT_DIR")
    base.add_argument("--export-checkpoint", action="store_true", help="write OUT_DIR/model from the latest checkpoint and exit")
    base.set_defaults(func=_train_base)

    clip = cmds.add_parser("train-clip", help="train the world CLIP (OpenAI layout) contrastively on world captions; resumable")
    clip.add_argument("out_dir")
    clip.add_argument("--steps", type=int)  # numeric options default to ClipTrainConfig's
    clip.add_argument("--batch-size", type=int)
    clip.add_argument("--lr", type=float)
    clip.add_argument("--seed", type=int)
    clip.add_argument("--threads", type=int)
    clip.add_argument("--resume", action="store_true")
    clip.set_defaults(func=_train_clip)

    fidelity = cmds.add_parser("fidelity", help="prompt fidelity of a pipeline on held-out world prompts, from pixels")
    fidelity.add_argument("model")
    fidelity.add_argument("--split", default="test")
    fidelity.add_argument("--prompts", type=int, default=None, help="first N prompts of the split (default: all)")
    fidelity.add_argument("--images-per-prompt", type=int, default=1)
    fidelity.add_argument("--guidance", type=float, default=5.0)
    fidelity.add_argument("--steps", type=int, default=20)
    fidelity.add_argument("--seed", type=int, default=0)
    fidelity.add_argument("--out", default=None, help="folder for the images and fidelity.json")
    fidelity.set_defaults(func=_fidelity)

    pack = cmds.add_parser("pack", help="pack a trained base pipeline and world CLIP into the shipped assets (fp16, used token rows)")
    pack.add_argument("--base", required=True)
    pack.add_argument("--clip", required=True)
    pack.add_argument("--dest", default=None, help="default: sr_finetune/world/assets")
    pack.set_defaults(func=_pack)

    materialize = cmds.add_parser("materialize", help="write the shipped world weights as OUT/model (pipeline) + OUT/world_clip.safetensors")
    materialize.add_argument("out_dir")
    materialize.add_argument("--assets", default=None)
    materialize.set_defaults(func=_materialize)
