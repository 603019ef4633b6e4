"""Check a scorer against human ratings of the same images.

    python recipes/validate_scorer.py ratings=../shared/data/ratings/tifa/human_annotations_with_scores.json
    python recipes/validate_scorer.py ratings=ratings.csv scorers=[aesthetic] engagement_column=likes

Reports Pearson, Spearman and Kendall tau-b of each score with the mean human rating, overall and
per popularity bucket (log-binned engagement), with bootstrap CIs, and the pairwise agreement with
people on images of the same prompt. Scores come from columns of the table, a scores table, or
any registered scorer run on the images (the scoring stage, resumable).
Settings: ``ValidateScorerConfig`` in ``eval/validation.py``.
"""

import sys

from sr_finetune.commands.cli import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe("validate-scorer"))
