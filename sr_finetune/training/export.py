"""The fine-tuned model as a diffusers ``StableDiffusionPipeline`` folder, its model card, and the hub upload."""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

# What `push_to_hub` leaves out of the output folder: training state, not the model.
HUB_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", ".tmp-checkpoint-*/**", "logs/**", "cache/**"]


def save_pipeline(cfg, output_dir: Path, unet=None, text_encoder=None) -> Path:
    """Write a full pipeline: the trained modules given here, every other part from the base model as it is."""
    from diffusers import StableDiffusionPipeline

    trained = {name: module for name, module in (("unet", unet), ("text_encoder", text_encoder)) if module is not None}
    pipe = StableDiffusionPipeline.from_pretrained(
        cfg.model, revision=cfg.revision, variant=cfg.variant, safety_checker=None, requires_safety_checker=False, **trained
    )
    pipe.save_pretrained(output_dir, safe_serialization=True)
    return output_dir


def model_card_text(cfg, counts: dict[str, int], global_step: int, prediction_type: str) -> str:
    """The README.md of the saved pipeline: what it was trained from, on what, and how to prompt it."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        base_model=cfg.model,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=["stable-diffusion", "text-to-image", "diffusers", "sr-finetune", "social-reward"] + (["lora"] if cfg.lora.rank else []),
    )
    trained = ", ".join(name for name, on in (("UNet" + (f" (LoRA rank {cfg.lora.rank}, merged)" if cfg.lora.rank else ""), cfg.train_unet), ("text encoder", cfg.train_text_encoder)) if on)
    hyper = {
        "steps": global_step, "resolution": cfg.resolution, "train_batch_size (per process)": cfg.train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "unet_lr": cfg.unet_lr, "text_encoder_lr": cfg.text_encoder_lr,
        "lr_scheduler": cfg.lr_scheduler, "lr_warmup_steps": cfg.lr_warmup_steps, "optimizer": cfg.optimizer, "weight_decay": cfg.weight_decay,
        "max_grad_norm": cfg.max_grad_norm, "prediction_type": prediction_type, "snr_gamma": cfg.snr_gamma, "noise_offset": cfg.noise_offset,
        "use_ema": cfg.use_ema, "ema_decay": cfg.ema_decay if cfg.use_ema else None, "mixed_precision": cfg.mixed_precision, "seed": cfg.seed,
    }
    rows = "\n".join(f"| {k} | {v} |" for k, v in hyper.items())
    count_rows = "\n".join(f"| {role} | {n} |" for role, n in counts.items())
    token = cfg.negative_token
    content = f"""---
{data.to_yaml()}
---

# Reward-guided fine-tune of {cfg.model}

Fine-tuned with `sr-finetune` after *Social Reward* (Isajanyan et al., ICLR 2024):
the best-rated image of each prompt is trained on as is, the worst-rated with the negative token
`{token}` appended to its prompt, and a regularisation set keeps the model close to its base.
Trained: {trained}.

## Use

The negative token names what the model learned to avoid. Pass it as the negative prompt:

```python
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{cfg.hub_model_id or 'path/to/this/folder'}")
image = pipe("a photo of a red fox in the snow", negative_prompt="{token}").images[0]
```

## Training data

| role | rows |
| --- | --- |
{count_rows}

## Hyperparameters

| setting | value |
| --- | --- |
{rows}
"""
    return str(ModelCard(content))


def write_model_card(output_dir: Path, text: str) -> Path:
    from huggingface_hub import ModelCard

    path = output_dir / "README.md"
    ModelCard(text).save(path)
    return path


def push_folder(output_dir: Path, repo_id: str, private: bool = True) -> str:
    """Upload the pipeline folder (not the training state) to the hub with the token from ``HF_TOKEN``."""
    from huggingface_hub import HfApi

    api = HfApi(token=os.environ.get("HF_TOKEN"))  # None falls back to `huggingface-cli login`
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=str(output_dir), repo_id=repo_id, repo_type="model", ignore_patterns=HUB_IGNORE_PATTERNS, commit_message="Upload fine-tuned pipeline (sr-finetune)")
    logger.info("pushed %s to %s", output_dir, url)
    return str(url)
