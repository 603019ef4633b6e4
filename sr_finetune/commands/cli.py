"""The ``sr-finetune`` command: one subcommand per stage, each also a script in ``recipes/``.

    sr-finetune tiny-model OUT_DIR [--seed N]
    sr-finetune real-size-model OUT_DIR --variant 2-1-base|2-1 [--seed N] [--fp16-variant]
    sr-finetune tiny-rewards OUT_DIR [--seed N]
    sr-finetune tiny-world ROOT [--seed N]
    sr-finetune curate | train-reward | accuracy | generate | score | build-pairs | finetune | evaluate [--config FILE] [key=value ...]
    sr-finetune plan --config FILE [--device cpu|cuda] [key=value ...]
    sr-finetune run --config FILE [--stages generate,score,...] [section.key=value ...]
    sr-finetune push DIR --repo ID [--eval EVAL_DIR [--eval-model NAME]] [--private | --public] [--revision BRANCH]
    sr-finetune analyze-prompts | train-aesthetic | validate-scorer [--config FILE] [key=value ...]
    sr-finetune world community | train-base | train-clip | fidelity | pack | materialize ...
    sr-finetune demo [--config FILE] [--out DIR] [--quick] [--arms sft,swapped] [--tastes a,b] [section.key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Sequence

from ..config import load_config, to_yaml
from ..errors import ConfigError, UserError
from ..progress import progress_output
from .stages import STAGES, TOOLS, stage_runners

logger = logging.getLogger("sr_finetune")


def _setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "accelerate.accelerator", "accelerate.checkpointing"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes (which peft imports when it is installed) tries to fetch a 4-bit CPU matmul kernel
    # from the hub as it is imported and warns when it cannot; the toolkit uses only its 8-bit AdamW
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (see recipes/configs/)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=20 or generate.steps=20")


def _stage(section: str, run: Callable[[object], object]) -> Callable[[argparse.Namespace], int]:
    """A subcommand that loads the experiment config, then runs one stage on its section."""

    def handler(args: argparse.Namespace) -> int:
        from .experiment import ExperimentConfig

        cfg = load_config(ExperimentConfig, args.config, args.overrides, section=section)
        if args.print_config:
            print(to_yaml(getattr(cfg, section)), end="")
            return 0
        summary = run(getattr(cfg, section))
        logger.info(summary.line())
        return 0

    return handler


def _run_tiny_model(args: argparse.Namespace) -> int:
    from ..tiny_models import make_tiny_sd_pipeline

    out = make_tiny_sd_pipeline(args.out_dir, seed=args.seed)
    logger.info("tiny SD-2.1-shaped pipeline written to %s", out)
    return 0


def _run_real_size_model(args: argparse.Namespace) -> int:
    from ..real_size import make_real_size_pipeline

    out = make_real_size_pipeline(args.out_dir, variant=args.variant, seed=args.seed, fp16_variant=args.fp16_variant)
    logger.info("random-weight SD %s pipeline of the real size written to %s", args.variant, out)
    return 0


def _run_tiny_rewards(args: argparse.Namespace) -> int:
    from reward.tiny import make_tiny_rewards

    settings = make_tiny_rewards(args.out_dir, seed=args.seed)
    logger.info("tiny weights of %s written to %s", ", ".join(settings["metrics"]), args.out_dir)
    return 0


def _run_tiny_world(args: argparse.Namespace) -> int:
    from .tiny_world import make_tiny_world

    paths = make_tiny_world(args.root, seed=args.seed)
    logger.info("tiny world written: %s", ", ".join(f"{k} -> {v}" for k, v in paths.items()))
    return 0


def _run_plan(args: argparse.Namespace) -> int:
    """Print the memory plan of the config's finetune section; nothing is trained or loaded."""
    from ..training.memory_plan import plan_memory
    from .experiment import ExperimentConfig

    cfg = load_config(ExperimentConfig, args.config, args.overrides, section="finetune").finetune
    print("\n".join(plan_memory(cfg, device=args.device).lines()))
    return 0


def _run_push(args: argparse.Namespace) -> int:
    """Upload a finished folder (minus training state); with --eval, its card carries the evaluation."""
    from pathlib import Path

    from ..hub import check_hub_access, push_command, push_folder, read_card

    card = read_card(Path(args.dir))
    token = check_hub_access(args.repo)  # before the card and grids are made
    files = {}
    if args.eval:
        from eval.card import card_evaluation, card_with_evaluation

        evaluation = card_evaluation(Path(args.eval), Path(args.dir), args.repo, args.eval_model)
        card, files = card_with_evaluation(card, evaluation, args.repo), evaluation.files
        logger.info("push: the card carries %d results of %s", len(evaluation.eval_results), args.eval)
    extra = (("--eval", args.eval) if args.eval else ()) + (("--eval-model", args.eval_model) if args.eval_model else ())
    retry = push_command(args.dir, args.repo, private=args.private, revision=args.revision, extra=extra)
    url = push_folder(args.dir, args.repo, private=args.private, revision=args.revision, card=card, files=files, token=token, retry=retry)
    logger.info("push: %s -> %s", args.dir, url)
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo, run_tastes

    overrides = list(args.overrides) + ([f"demo.out_dir={args.out}"] if args.out else [])
    arms = args.arms.split(",") if args.arms else None
    if args.tastes:
        summary = run_tastes(args.tastes.split(","), args.config, overrides, quick=args.quick, arms=arms)
    else:
        summary = run_demo(args.config, overrides, quick=args.quick, arms=arms)
    print(summary.read_text(), end="")
    return 0


def _stages_in_file(path: str) -> list[str]:
    """The stages whose section the config file has, in flow order."""
    from omegaconf import OmegaConf

    if not os.path.isfile(path):
        raise ConfigError(f"config error: config file not found: {path}")
    present = set(OmegaConf.load(path).keys())
    wanted = [command for command, section, _, _ in STAGES if section in present]
    if not wanted:
        raise ConfigError(f"config error: {path} has no stage section ({', '.join(s for _, s, _, _ in STAGES)})")
    return wanted


def _run_stages(args: argparse.Namespace) -> int:
    """Run several stages of one experiment config in order, validating all of them first."""
    from .experiment import ExperimentConfig

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("sr-finetune run is single-process; under accelerate launch run each stage's recipe instead")
    sections = stage_runners()
    wanted = args.stages.split(",") if args.stages else _stages_in_file(args.config)
    unknown = [name for name in wanted if name not in sections]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown} in --stages (expected some of {list(sections)})")
    unprefixed = [o for o in args.overrides if "." not in o.partition("=")[0]]
    if unprefixed:
        raise ConfigError(f"run: overrides need their stage prefix, e.g. generate.{unprefixed[0]} (got {unprefixed})")
    configs = {name: load_config(ExperimentConfig, args.config, args.overrides, section=sections[name][0]) for name in wanted}
    for name in wanted:
        section, run = sections[name]
        logger.info("stage %s", name)
        logger.info(run(getattr(configs[name], section)).line())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sr-finetune", description="Reward-guided fine-tuning of text-to-image diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("tiny-model", help="write a tiny SD-2.1-shaped pipeline folder (for tests and demos)")
    tiny.add_argument("out_dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_run_tiny_model)

    real = sub.add_parser("real-size-model", help="write a random-weight pipeline of the real SD 2.1 size and architecture (about 5 GB; to try memory and loading offline)")
    real.add_argument("out_dir", help="a new or empty folder")
    real.add_argument("--variant", required=True, help="2-1-base (512 px, epsilon) or 2-1 (768 px, v-prediction)")
    real.add_argument("--seed", type=int, default=0)
    real.add_argument("--fp16-variant", action="store_true", help="also write the *.fp16.safetensors weights, as the hub has them")
    real.set_defaults(func=_run_real_size_model)

    rewards = sub.add_parser("tiny-rewards", help="write tiny weights of the six scorers (for tests and demos)")
    rewards.add_argument("out_dir")
    rewards.add_argument("--seed", type=int, default=0)
    rewards.set_defaults(func=_run_tiny_rewards)

    world = sub.add_parser("tiny-world", help="write the tiny model, scorers and regularisation set of recipes/configs/tiny.yaml")
    world.add_argument("root")
    world.add_argument("--seed", type=int, default=0)
    world.set_defaults(func=_run_tiny_world)

    from .world import add_world_parser

    add_world_parser(sub)

    for command, section, run, help_text in STAGES + TOOLS:
        stage = sub.add_parser(command, help=help_text)
        _add_config_args(stage)
        stage.set_defaults(func=_stage(section, run))

    plan = sub.add_parser("plan", help="memory plan of a finetune config (parameters, weights, gradients, optimizer, EMA, reference, estimated activations, peak, which GPU it fits); loads no weights")
    plan.add_argument("--config", help="YAML config file with a finetune section (see recipes/configs/)")
    plan.add_argument("--device", choices=["cpu", "cuda"], help="plan for this device (default: where the config would train here): a GPU runs 8-bit AdamW without the CPU's step temporaries, and its autocast is traced in fp32 (an upper bound)")
    plan.add_argument("overrides", nargs="*", help="key=value overrides of the finetune section, e.g. train_batch_size=2")
    plan.set_defaults(func=_run_plan)

    run_all = sub.add_parser("run", help="run several stages of one config in order (single process; each stage resumes)")
    run_all.add_argument("--config", required=True, help="YAML config file with a section per stage")
    run_all.add_argument("--stages", help=f"comma-separated, in flow order ({','.join(c for c, *_ in STAGES)}); default: those with a section in the config")
    run_all.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. generate.steps=20")
    run_all.set_defaults(func=_run_stages)

    demo = sub.add_parser("demo", help="the whole loop in the demo world: community -> Social Reward -> pairs -> fine-tune -> report (resumable)")
    demo.add_argument("--config", help="default: recipes/configs/demo.yaml")
    demo.add_argument("--out", help="output folder (demo.out_dir; default runs/demo)")
    demo.add_argument("--quick", action="store_true", help="smaller sizes (the config's demo.quick overrides)")
    demo.add_argument("--arms", help="comma-separated arm presets to fine-tune and compare (default: demo.arms of the config)")
    demo.add_argument("--tastes", help="comma-separated community tastes: the demo once per taste in OUT/<taste>, one table in OUT/tastes.md")
    demo.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. finetune.max_train_steps=100")
    demo.set_defaults(func=_run_demo)

    push = sub.add_parser("push", help="upload a finished folder (pipeline or reward checkpoint) to the hub, optionally with an evaluation on its card")
    push.add_argument("dir", help="a folder written by sr-finetune with a README.md card (e.g. runs/finetune)")
    push.add_argument("--repo", required=True, help="hub repo id, e.g. me/sd21-social-reward (token: HF_TOKEN or `hf auth login`)")
    push.add_argument("--eval", help="an evaluate output_dir: its tables, model-index results, plots and image grids go on the card")
    push.add_argument("--eval-model", help="which fine-tuned model of --eval this folder is (default: the one whose path is DIR)")
    visibility = push.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_true", default=True, help="a new repo is private (default)")
    visibility.add_argument("--public", dest="private", action="store_false", help="a new repo is public")
    push.add_argument("--revision", help="push to this branch (created if needed) instead of main")
    push.set_defaults(func=_run_push)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _setup_logging()
    args = build_parser().parse_args(argv)
    try:
        with progress_output():  # log lines through the stage's bar; no library bars
            return args.func(args)
    except (UserError, FileNotFoundError) as exc:
        # Expected user errors: one line, no traceback.
        print(f"sr-finetune {args.command}: error: {exc}", file=sys.stderr)
        return 2


def run_recipe(command: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of the scripts in ``recipes/``: the same as ``sr-finetune <command> ...``."""
    return main([command, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
