"""The fine-tuning stage: fine-tune set (``datasets`` folder), or prompts and a reward for the online
objectives -> diffusers pipeline folder + model card."""

from .config import FinetuneConfig, LoraSettings, OnlineSettings
from .trainer import FinetuneSummary, run_finetune

__all__ = ["FinetuneConfig", "LoraSettings", "OnlineSettings", "FinetuneSummary", "run_finetune"]
