"""The config tree of an experiment: one typed section per stage, all in one YAML file.

A recipe checks key names and types in the whole tree (unknown keys anywhere are errors), validates
the values of its own section and runs it;
sections can refer to each other with OmegaConf interpolation (``${generate.output_dir}``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from eval.config import EvaluateConfig
from reward.accuracy import AccuracyConfig
from reward.curate import CurateConfig
from eval.prompts import PromptAnalysisConfig
from eval.validation import ValidateScorerConfig
from reward.aesthetic_training import AestheticTrainConfig
from reward.scoring import ScoreConfig
from reward.train_config import TrainRewardConfig

from ..generation import GenerateConfig
from ..pairs import PairsConfig
from ..training.config import FinetuneConfig
from .demo_config import DemoConfig


@dataclass
class ExperimentConfig:
    """All stage sections; see ``recipes/configs/*.yaml`` for annotated examples."""

    train_reward: TrainRewardConfig = field(default_factory=TrainRewardConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    accuracy: AccuracyConfig = field(default_factory=AccuracyConfig)
    prompt_analysis: PromptAnalysisConfig = field(default_factory=PromptAnalysisConfig)
    validate_scorer: ValidateScorerConfig = field(default_factory=ValidateScorerConfig)
    social_aesthetic: AestheticTrainConfig = field(default_factory=AestheticTrainConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
