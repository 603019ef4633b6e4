"""The stage registry: every flow stage and config-section tool, with its config section and runner.

``sr-finetune <stage>``, ``sr-finetune run``, ``sr-finetune demo`` and the scripts in ``recipes/``
all read these tables. A runner imports its stage lazily: only the stage that runs is loaded.
"""

from __future__ import annotations

from typing import Callable


def _curate(cfg):
    from reward.curate import run_curation

    return run_curation(cfg)


def _accuracy(cfg):
    from reward.accuracy import run_accuracy

    return run_accuracy(cfg)


def _generate(cfg):
    from ..generation import run_generation

    return run_generation(cfg)


def _build_pairs(cfg):
    from ..pairs import build_pairs

    return build_pairs(cfg)


def _finetune(cfg):
    from reward import load_training_reward

    from ..training import run_finetune

    return run_finetune(cfg, reward_loader=load_training_reward)


def _score(cfg):
    from reward.scoring import run_scoring

    return run_scoring(cfg)


def _train_reward(cfg):
    from reward.train import run_train_reward

    return run_train_reward(cfg)


def _evaluate(cfg):
    from eval.harness import run_evaluation

    return run_evaluation(cfg)


def _analyze_prompts(cfg):
    from eval.prompts import run_prompt_analysis

    return run_prompt_analysis(cfg)


def _validate_scorer(cfg):
    from eval.validation import run_validation

    return run_validation(cfg)


def _train_aesthetic(cfg):
    from reward.aesthetic_training import run_aesthetic_training

    return run_aesthetic_training(cfg)


def stage_runners() -> dict[str, tuple[str, Callable[[object], object]]]:
    """subcommand -> (config section, runner) of every flow stage."""
    return {command: (section, run) for command, section, run, _ in STAGES}


# (subcommand, config section, runner, help), in the order of the flow
STAGES = [
    ("curate", "curate", _curate, "engagement logs -> (prompt, positive, negative) triplets split by prompt"),
    ("train-reward", "train_reward", _train_reward, "train a Social Reward model on curated triplets (resumable, multi-process, loss ablation)"),
    ("accuracy", "accuracy", _accuracy, "pairwise accuracy of reward models on a triplet split, with ties and bootstrap CIs"),
    ("generate", "generate", _generate, "generate images for a prompt set (sharded, resumable)"),
    ("score", "score", _score, "score generations with reward models (sharded, resumable)"),
    ("build-pairs", "pairs", _build_pairs, "build the fine-tune set: chosen / rejected / regularisation"),
    ("finetune", "finetune", _finetune, "fine-tune UNet and text encoder on a fine-tune set, or online on prompts and a reward (resumable, multi-process)"),
    ("evaluate", "evaluate", _evaluate, "baseline vs fine-tuned: paired generation, six metrics, win-rates with CIs, HTML report"),
]

# (subcommand, config section, runner, help): analyses and tools with a config section, outside the flow
# (``run`` does not run them)
TOOLS = [
    ("analyze-prompts", "prompt_analysis", _analyze_prompts, "compare prompt sets: Sentence-BERT embeddings, Ward clusters, KL table, t-SNE plot"),
    ("train-aesthetic", "social_aesthetic", _train_aesthetic, "train the social_aesthetic scorer: a head on CLIP embeddings predicting engagement buckets"),
    ("validate-scorer", "validate_scorer", _validate_scorer, "correlate scores with human ratings: Pearson/Spearman/Kendall with CIs, per popularity bucket, pairwise agreement"),
]


__all__ = ["STAGES", "TOOLS", "stage_runners"]
