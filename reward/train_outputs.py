"""What Social Reward training leaves behind: the weights file, the summary, the model card, the ablation table."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .losses import LOSS_TITLES

if TYPE_CHECKING:
    from .train_config import TrainRewardConfig

REWARD_WEIGHTS = "social_reward.safetensors"


@dataclass
class RewardTrainingSummary:
    output_dir: str
    loss: str
    global_step: int
    max_train_steps: int
    steps_run: int
    resumed_from: str | None
    seconds: float
    initial_val_accuracy: float | None
    best: dict | None
    test: dict | None
    trainable_parameters: int
    skips: dict = field(default_factory=dict)

    def line(self) -> str:
        rate = self.steps_run / self.seconds if self.seconds > 0 else 0.0
        resumed = f", resumed from {self.resumed_from}" if self.resumed_from else ""
        best = f"best val pairwise accuracy {self.best['val_accuracy']:.4f} (epoch {self.best['epoch'] + 1}, step {self.best['step']})" if self.best else "no validation"
        initial = f" from {self.initial_val_accuracy:.4f}" if self.initial_val_accuracy is not None else ""
        test = f", test {self.test['accuracy']:.4f} on {self.test['triplets']}" if self.test else ""
        return (
            f"train-reward ({self.loss}): step {self.global_step}/{self.max_train_steps} ({self.steps_run} this run{resumed}, {rate:.2f} steps/s), "
            f"{best}{initial}{test} -> {Path(self.output_dir) / REWARD_WEIGHTS}"
        )


@dataclass
class AblationSummary:
    output_dir: str
    runs: list[RewardTrainingSummary]

    def line(self) -> str:
        return "train-reward loss ablation (pairwise accuracy, ties counted as correct):\n" + ablation_table(self.runs)


def save_reward_weights(model: torch.nn.Module, path: Path) -> Path:
    """The model's state dict as fp32 safetensors in the OpenAI CLIP key layout, written atomically."""
    from safetensors.torch import save_file

    state = {name: tensor.detach().to("cpu", torch.float32 if tensor.is_floating_point() else tensor.dtype).contiguous() for name, tensor in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(state, str(tmp), metadata={"format": "pt", "layout": "openai-clip"})
    os.replace(tmp, path)
    return path


def _config_dict(cfg: "TrainRewardConfig") -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))


def write_summary(output_dir: Path, cfg: "TrainRewardConfig", summary: "RewardTrainingSummary", details: dict) -> Path:
    """``training_summary.json``: config, best epoch, accuracies, trainable parameters, skips, speed."""
    best = summary.best
    data = {
        "weights": REWARD_WEIGHTS,
        "config": _config_dict(cfg),
        "loss": cfg.loss,
        "trainable_preset": cfg.trainable,
        "trainable_parameters": summary.trainable_parameters,
        "trainable": details["trainable"],
        "initial_val_accuracy": summary.initial_val_accuracy,
        "best_epoch": best["epoch"] + 1 if best else None,  # 1-based: the epoch whose end (or inside of which the run's end) gave it
        "best_step": best["step"] if best else None,
        "best_val_accuracy": best["val_accuracy"] if best else None,
        "test_accuracy": summary.test["accuracy"] if summary.test else None,
        "test_triplets": summary.test["triplets"] if summary.test else 0,
        "accuracy_rule": "pairwise: score(prompt, pos) >= score(prompt, neg); ties count as correct (as the authors' validate.py)",
        "global_step": summary.global_step,
        "steps_run": summary.steps_run,
        "seconds": summary.seconds,
        "resumed_from": summary.resumed_from,
        "train_triplets": details["train_triplets"],
        "val_triplets": details["val_triplets"],
        "processes": details["processes"],
        "skipped": summary.skips,
        "validations": details["validations"],
    }
    path = output_dir / "training_summary.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def write_model_card(output_dir: Path, cfg: "TrainRewardConfig", summary: "RewardTrainingSummary", details: dict) -> Path:
    """``README.md`` beside the weights: what they are, how they were trained, how to load them."""
    best = summary.best
    accuracy = f"{best['val_accuracy']:.4f} (epoch {best['epoch'] + 1}, step {best['step']})" if best else "n/a"
    test = f"{summary.test['accuracy']:.4f} on {summary.test['triplets']} triplets" if summary.test else "n/a (no test split)"
    initial = f"{summary.initial_val_accuracy:.4f}" if summary.initial_val_accuracy is not None else "n/a"
    text = f"""# Social Reward model

A CLIP fine-tuned with `sr-finetune train-reward` to score how much an online creative community
prefers an image for its prompt (Social Reward, Isajanyan et al., ICLR 2024). The score is the
cosine of the L2-normalised prompt and image embeddings.

| | |
| --- | --- |
| base model | {cfg.base_model or "OpenAI ViT-L/14"} |
| trained parameters | {details["trainable"]} |
| loss | {LOSS_TITLES[cfg.loss]} (`{cfg.loss}`{f", margin {cfg.margin}" if cfg.loss == "triplet" else f", temperature {cfg.temperature}"}) |
| optimiser | AdamW, lr {cfg.learning_rate}, weight decay {cfg.weight_decay}, batch {cfg.batch_size} x {details["processes"]} processes |
| steps | {summary.global_step} |
| triplets | {details["train_triplets"]} train, {details["val_triplets"]} val |
| val pairwise accuracy | before training {initial}, kept weights {accuracy} |
| test pairwise accuracy | {test} |

Pairwise accuracy: the share of triplets whose preferred image scores at least as high as the
other (ties count as correct, as in the authors' `validate.py`).

## Use

`{REWARD_WEIGHTS}` is a plain fp32 state dict in the OpenAI CLIP key layout.

```python
from reward import load_reward
scorer = load_reward("social_reward", weights="{REWARD_WEIGHTS}")
scores = scorer.score_images(images, prompts)
```

`sr-finetune score ... metrics=[social_reward] weights={{social_reward: {REWARD_WEIGHTS}}}`.
The authors' `validate.py` reads checkpoints with `torch.load`; convert once with
`python -c "import torch, safetensors.torch as st; torch.save(st.load_file('{REWARD_WEIGHTS}'), 'classifier_checkpoint.pth')"`.
"""
    path = output_dir / "README.md"
    path.write_text(text)
    return path


def ablation_table(runs: list["RewardTrainingSummary"]) -> str:
    """The paper's Table 7 shape: loss -> val / test pairwise accuracy (%)."""

    def pct(value: float | None) -> str:
        return f"{100 * value:.1f}" if value is not None else "n/a"

    lines = ["| Loss | Val pairwise accuracy (%) | Test pairwise accuracy (%) |", "| --- | --- | --- |"]
    for run in runs:
        lines.append(f"| {LOSS_TITLES[run.loss]} | {pct(run.best['val_accuracy'] if run.best else None)} | {pct(run.test['accuracy'] if run.test else None)} |")
    return "\n".join(lines)


__all__ = ["REWARD_WEIGHTS", "AblationSummary", "RewardTrainingSummary", "ablation_table", "save_reward_weights", "write_model_card", "write_summary"]
