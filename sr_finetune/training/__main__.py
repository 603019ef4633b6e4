"""``python -m sr_finetune.training [--config FILE] [key=value ...]``: the trainer on a flat ``FinetuneConfig`` YAML.

A stand-alone entry for launching with ``accelerate launch -m sr_finetune.training``; the
``sr-finetune finetune`` subcommand and ``recipes/finetune.py`` read the ``finetune:`` section
of an experiment config instead. This entry runs sft and dpo only: the online objectives load a
reward from the reward registry, a floor above the trainer, which the command layer passes in.
"""

import argparse
import logging
import sys

from ..config import load_config
from ..errors import UserError
from ..progress import progress_output
from . import FinetuneConfig, run_finetune


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sr_finetune.training")
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, datefmt="%H:%M:%S")
    try:
        with progress_output():
            summary = run_finetune(load_config(FinetuneConfig, args.config, args.overrides))
    except (UserError, FileNotFoundError) as exc:
        print(f"finetune: error: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("sr_finetune").info(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
