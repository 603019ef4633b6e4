"""Generate images for a prompt set, sharded over accelerate processes and resumable.

    python recipes/generate.py --config recipes/configs/tiny.yaml
    accelerate launch --num_processes 8 recipes/generate.py --config recipes/configs/sd21_social_reward.yaml

Writes ``<output_dir>/images/``, one manifest part per shard and a merged ``manifest.parquet``.
A rerun skips finished shards. Settings: ``GenerateConfig`` in ``sr_finetune/generation.py``.
"""

import sys

from sr_finetune.commands.cli import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe("generate"))
