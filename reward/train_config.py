"""Settings of Social Reward training (``train_reward:`` in a recipe config).

Defaults are the authors' training code and script (``scripts/train.sh``): the paper preset
(last 3 visual and last 2 text blocks, final norms, text projection), triplet loss with margin
0.3, AdamW with torch's defaults (weight decay 0.01), batch 32, 10 epochs, fp32, learning rate
3e-5. The paper's text says 3e-4: ``learning_rate=3e-4`` gives the paper's value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from sr_finetune.config import require

from .losses import LOSSES, TRIPLET_MARGIN
from .trainable import PAPER_PRESET, PRESETS

MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class TrainRewardConfig:
    """Settings of the train-reward stage; ``reward/train.py`` says what each does."""

    # data and model
    triplets: Optional[str] = None  # triplets.parquet written by curate (or its folder)
    train_split: str = "train"
    val_split: str = "val"  # pairwise accuracy every epoch; the best epoch's weights are kept
    test_split: Optional[str] = "test"  # accuracy of the kept weights at the end (skipped when the split is empty; null = never)
    base_model: Optional[str] = None  # OpenAI-layout CLIP (file or owner/repo/file); None = OpenAI ViT-L/14 (downloaded by open_clip)
    output_dir: str = "runs/reward"
    # what trains, on what objective
    trainable: str = PAPER_PRESET  # see reward/trainable.py: all | visual | visual_upper_layers | ... | visual_last_layer
    loss: str = "triplet"  # triplet | infonce | supcon | bce | reweighted_ce (reward/losses.py)
    margin: float = TRIPLET_MARGIN  # triplet loss
    temperature: float = 0.05  # the other losses: logits are cosine / temperature
    # optimisation: AdamW (torch defaults); weight_decay=0 gives the Adam of the authors' other modes
    learning_rate: float = 3e-5  # authors' code and script; the paper's text: 3e-4
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    batch_size: int = 32  # triplets per process and step
    num_epochs: int = 10
    max_train_steps: Optional[int] = None  # overrides num_epochs when set
    seed: int = 0
    # speed and memory
    device: str = "auto"  # auto (the accelerator when there is one, else CPU, gloo for several processes) | cpu
    mixed_precision: str = "no"  # no | fp16 | bf16 (autocast on GPU; weights, optimizer and validation stay fp32)
    gradient_checkpointing: bool = False
    num_workers: int = 2  # DataLoader workers decoding and preprocessing images
    eval_batch_size: int = 64
    # checkpoints
    checkpointing_steps: int = 500  # 0 = only at the end of the run
    checkpoints_total_limit: Optional[int] = 2
    resume_from_checkpoint: Optional[str] = None  # "latest" or a checkpoint-<step> folder
    # loss ablation (the paper's Table 7): one run per loss into output_dir/ablation/<loss>
    ablation: bool = False
    ablation_losses: List[str] = field(default_factory=lambda: list(LOSSES))

    def validate(self) -> None:
        for key in ("batch_size", "num_epochs", "eval_batch_size", "temperature", "learning_rate", "adam_epsilon"):
            require(getattr(self, key) > 0, key, f"must be positive, got {getattr(self, key)}")
        for key in ("num_workers", "checkpointing_steps", "margin", "weight_decay"):
            require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        require(self.max_train_steps is None or self.max_train_steps > 0, "max_train_steps", f"must be positive, got {self.max_train_steps}")
        require(self.trainable in PRESETS, "trainable", f"must be one of {list(PRESETS)}, got '{self.trainable}'")
        require(self.loss in LOSSES, "loss", f"must be one of {list(LOSSES)}, got '{self.loss}'")
        bad = [name for name in self.ablation_losses if name not in LOSSES]
        require(not bad and len(self.ablation_losses) > 0, "ablation_losses", f"must name some of {list(LOSSES)}, got {list(self.ablation_losses)}")
        require(self.mixed_precision in MIXED_PRECISION, "mixed_precision", f"must be one of {MIXED_PRECISION}, got '{self.mixed_precision}'")
        require(self.device in ("auto", "cpu"), "device", f"must be auto or cpu, got '{self.device}' (accelerate picks the GPU of each process)")
        require(0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0, "adam_beta1", f"betas must be in [0, 1), got {self.adam_beta1}, {self.adam_beta2}")
        require(self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1, "checkpoints_total_limit", f"must be >= 1, got {self.checkpoints_total_limit}")
        require(
            not self.ablation or self.resume_from_checkpoint in (None, "latest"), "resume_from_checkpoint",
            "with ablation=true use 'latest' (each loss resumes from its own output_dir/ablation/<loss>)",
        )
        splits = [self.train_split, self.val_split] + ([self.test_split] if self.test_split else [])
        require(len(set(splits)) == len(splits), "val_split", f"train, val and test splits must differ, got {splits}")


__all__ = ["MIXED_PRECISION", "TrainRewardConfig"]
