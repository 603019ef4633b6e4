"""Train the ``social_aesthetic`` scorer: a head on CLIP image embeddings that predicts social
engagement buckets (low = bottom 10%, medium = 45th-55th percentile, high = top 5%).

    sr-finetune score image_table=engagement.csv metrics=[clip] embeddings=[clip] output_dir=runs/engagement
    python recipes/train_aesthetic.py scores=runs/engagement engagement_column=likes objective=classification

The embeddings come from one scoring pass (batched, resumable, each image read once); training
the head takes seconds. Writes ``social_aesthetic.safetensors`` + ``social_aesthetic.json`` (the
CLIP it sits on) to ``output_dir``: score with ``metrics=[social_aesthetic]
weights.social_aesthetic=<output_dir>``. Settings: ``AestheticTrainConfig`` in
``reward/aesthetic_training.py``.
"""

import sys

from sr_finetune.commands.cli import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe("train-aesthetic"))
