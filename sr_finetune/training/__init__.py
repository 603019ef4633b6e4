"""The fine-tuning stage: fine-tune set (``datasets`` folder) -> diffusers pipeline folder + model card."""

from .config import FinetuneConfig, LoraSettings
from .trainer import FinetuneSummary, run_finetune

__all__ = ["FinetuneConfig", "LoraSettings", "FinetuneSummary", "run_finetune"]
