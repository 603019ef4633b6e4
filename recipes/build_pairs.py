"""Build the fine-tune set from scored generations: per prompt the best image (chosen) and the
worst (rejected, tagged with the negative token), plus a regularisation mix.

    python recipes/build_pairs.py --config recipes/configs/tiny.yaml

Settings: ``PairsConfig`` in ``sr_finetune/pairs.py``.
"""

import sys

from sr_finetune.commands.cli import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe("build-pairs"))
