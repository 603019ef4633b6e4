"""Evaluate fine-tuned models against a baseline: paired generation, scoring, statistics, report.

    python recipes/evaluate.py --config my_eval.yaml
    accelerate launch --num_processes 8 recipes/evaluate.py --config my_eval.yaml

Every model generates every prompt set with the same per-image seeds (DDIM, 30 steps by default;
fine-tuned models use the negative token as negative prompt), every image is scored with every
metric, then ``<output_dir>`` gets ``scores.parquet``, ``tables/means.csv``,
``tables/win_rates.csv``, ``results.json``, ``report.md`` and a self-contained ``report.html``.
Generation and scoring run as the generate and score stages do (sharded across processes,
resumable); rerunning reuses every finished image and score. A model may also be images that
already exist (``images:`` an image table or a generations folder instead of ``path:``), matched
by prompt and image index, with what is missing counted as gaps (``eval/existing_images.py``).
Settings: ``EvaluateConfig`` in ``eval/config.py``; statistics: ``eval/stats.py``.
"""

import sys

from sr_finetune.commands.cli import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe("evaluate"))
