"""Upload a finished folder (a fine-tuned pipeline, a reward checkpoint) to the Hugging Face hub.

    python recipes/push.py runs/finetune --repo me/sd21-social-reward
    python recipes/push.py runs/finetune --repo me/sd21-social-reward --eval runs/eval --public --revision v1

Uploads the folder minus training state (checkpoints, caches, logs, optimizer/scheduler/RNG
states) in one commit; with ``--eval`` the card gains the evaluation's tables, its model-index
results, plots and image grids. Token: ``HF_TOKEN`` or ``hf auth login``. Library: ``sr_finetune/hub.py``
and ``eval/card.py``.
"""

import sys

from sr_finetune.commands.cli import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe("push"))
