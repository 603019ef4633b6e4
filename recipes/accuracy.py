"""Pairwise accuracy of reward models on a triplet split (the paper's Table 4), side by side.

    python recipes/accuracy.py triplets=runs/triplets metrics=[social_reward,clip,pickscore] weights={social_reward: runs/reward/social_reward.safetensors}

Writes ``<output_dir>/accuracy.parquet`` (per triplet), ``accuracy.json`` and ``accuracy.md``;
the scores of the split's images stay in ``scores/`` so a rerun resumes.
Settings: ``AccuracyConfig`` in ``reward/accuracy.py``.
"""

import sys

from sr_finetune.commands.cli import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe("accuracy"))
