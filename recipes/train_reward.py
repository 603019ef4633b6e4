"""Train a Social Reward model (CLIP fine-tuned on prompt / preferred / other triplets).

    python recipes/train_reward.py --config my.yaml train_reward.triplets=runs/curate/triplets.parquet
    accelerate launch --num_processes 8 recipes/train_reward.py --config my.yaml
    accelerate launch --multi_gpu --num_processes 2 recipes/train_reward.py ... device=cpu   # 2 CPU processes (gloo)

Writes output_dir/social_reward.safetensors (the best epoch's weights, OpenAI CLIP key layout),
training_summary.json, README.md and checkpoint-<step>/ folders; `resume_from_checkpoint=latest`
continues exactly where a run stopped; `ablation=true` trains once per loss and prints the table.
Settings: TrainRewardConfig in reward/train_config.py; what is supported: reward/train.py.
"""

import sys

from sr_finetune.commands.cli import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe("train-reward"))
