"""Compare the prompt distributions of several datasets (Social Reward, section 3.3.1).

    python recipes/analyze_prompts.py --config recipes/configs/analyze_prompts.yaml
    python recipes/analyze_prompts.py --config recipes/configs/analyze_prompts.yaml clusters=50 words=8

Samples the same number of unique English prompts per dataset, keeps their first words, embeds
them with Sentence-BERT (all-MiniLM-L6-v2, offline), clusters all of them with Ward's method and
writes the per-dataset cluster counts, the pairwise KL table, each dataset's over-represented
clusters with examples, a t-SNE plot and ``report.md`` to ``output_dir``.
Settings: ``PromptAnalysisConfig`` in ``eval/prompts.py``.
"""

import sys

from sr_finetune.commands.cli import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe("analyze-prompts"))
