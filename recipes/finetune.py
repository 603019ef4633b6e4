"""Fine-tune Stable Diffusion on a fine-tune set (chosen / rejected + negative token / regularisation),
or online on prompts and a reward (finetune.objective=backprop | pg, settings under finetune.online).

    accelerate launch recipes/finetune.py --config recipes/configs/sd21_social_reward.yaml
    accelerate launch --multi_gpu --num_processes 2 recipes/finetune.py --config recipes/configs/tiny.yaml   # 2 CPU processes (gloo)
    accelerate launch recipes/finetune.py --config recipes/configs/tiny.yaml objective=pg dataset=null \
        train_text_encoder=false online.prompts=ddpo-animals online.reward=aesthetic ...   # see README, "Online objectives"

Writes a StableDiffusionPipeline folder + README.md model card into output_dir and checkpoint-<step>/
folders; `resume_from_checkpoint=latest` continues exactly where a run stopped. Settings:
FinetuneConfig in sr_finetune/training/config.py; supported and refused combinations are listed in
sr_finetune/training/trainer.py.
"""

import sys

from sr_finetune.commands.cli import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe("finetune"))
