"""The ``sr-finetune`` command: one subcommand per stage, each also a script in ``recipes/``.

    sr-finetune tiny-model OUT_DIR [--seed N]
    sr-finetune generate [--config FILE] [key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from .config import load_config, to_yaml
from .errors import UserError

logger = logging.getLogger("sr_finetune")


def _setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (see recipes/configs/)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=20 or generate.steps=20")


def _run_generate(args: argparse.Namespace) -> int:
    from .experiment import ExperimentConfig

    cfg = load_config(ExperimentConfig, args.config, args.overrides, section="generate")
    if args.print_config:
        print(to_yaml(cfg.generate), end="")
        return 0
    from .generation import run_generation

    summary = run_generation(cfg.generate)
    logger.info(summary.line())
    return 0


def _run_tiny_model(args: argparse.Namespace) -> int:
    from .tiny_models import make_tiny_sd_pipeline

    out = make_tiny_sd_pipeline(args.out_dir, seed=args.seed)
    logger.info("tiny SD-2.1-shaped pipeline written to %s", out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sr-finetune", description="Reward-guided fine-tuning of text-to-image diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("tiny-model", help="write a tiny SD-2.1-shaped pipeline folder (for tests and demos)")
    tiny.add_argument("out_dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_run_tiny_model)

    gen = sub.add_parser("generate", help="generate images for a prompt set (sharded, resumable)")
    _add_config_args(gen)
    gen.set_defaults(func=_run_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _setup_logging()
    args = build_parser().parse_args(argv)
    try:
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
