"""Score generations (or a table of existing images) with reward models, sharded and resumable.

    python recipes/score.py --config recipes/configs/tiny.yaml
    accelerate launch --num_processes 8 recipes/score.py --config recipes/configs/sd21_social_reward.yaml

Writes ``<output_dir>/scores/part-*.parquet`` (image_id + one column per metric), bad images with
their reason in ``errors/``, and the merged ``scores.parquet`` joined to the manifest.
Settings: ``ScoreConfig`` in ``reward/scoring.py``.
"""

import sys

from sr_finetune.commands.cli import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe("score"))
