"""The demo world end to end: community logs -> curate -> train Social Reward -> accuracy ->
generate a pool -> score -> build pairs -> fine-tune UNet + text encoder -> evaluate vs the base.

    python recipes/demo.py                      # recipes/configs/demo.yaml -> runs/demo
    python recipes/demo.py --quick --out runs/demo-quick
    python recipes/demo.py --arms sft,swapped   # + the swapped-pairs ablation

Writes ``<out>/summary.md`` (the acceptance numbers) and the HTML report ``<out>/eval/report.html``.
Resumable: finished stages are skipped, an interrupted one resumes. Settings: ``DemoConfig`` in
``sr_finetune/demo.py`` and every stage's own section.
"""

import sys

from sr_finetune.commands.cli import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe("demo"))
