"""Curate engagement logs into (prompt, positive image, negative image) triplets.

    python recipes/curate.py images=logs/images.parquet remixes=logs/remixes.parquet influencers=logs/influencers.txt output_dir=runs/triplets

Writes ``<output_dir>/triplets.parquet`` (split by prompt into train/val/test),
``curate_summary.json`` and ``stats.md`` (the statistics in the shape of the paper's Table 1).
Settings: ``CurateConfig`` in ``reward/curate.py``.
"""

import sys

from sr_finetune.commands.cli import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe("curate"))
