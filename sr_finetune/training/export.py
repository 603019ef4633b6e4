"""The fine-tuned model as a diffusers ``StableDiffusionPipeline`` folder and its model card (the upload is ``sr_finetune.hub``)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..errors import UserError

logger = logging.getLogger(__name__)


def save_pipeline(cfg, output_dir: Path, unet=None, text_encoder=None) -> Path:
    """Write a full pipeline: the trained modules given here, every other part from the base model as it is."""
    from diffusers import StableDiffusionPipeline

    trained = {name: module for name, module in (("unet", unet), ("text_encoder", text_encoder)) if module is not None}
    pipe = StableDiffusionPipeline.from_pretrained(
        cfg.model, revision=cfg.revision, variant=cfg.variant, safety_checker=None, requires_safety_checker=False, **trained
    )
    pipe.save_pretrained(output_dir, safe_serialization=True)
    return output_dir


def read_pairs_summary(dataset: str | None) -> dict | None:
    """The pair builder's ``summary.json`` beside the fine-tune set (counts and settings), if it is there."""
    path = Path(dataset) / "summary.json" if dataset else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        logger.warning("%s is not readable JSON; the model card leaves out how the pairs were made", path)
        return None


def rejected_sentence(token: str, rejected_format: str | None) -> str:
    """How a rejected image's caption was written, as the pair builder's ``rejected_format`` made it."""
    if rejected_format is None:
        return f"the worst-rated with captions that carry the negative token `{token}`"
    caption = rejected_format.format(token=token, prompt="<prompt>")
    where = "before" if rejected_format.startswith("{token}") else "after" if rejected_format.endswith("{token}") else "inside"
    return f"the worst-rated with the caption `{caption}` (the negative token {where} the prompt: `rejected_format: \"{rejected_format}\"`)"


def curation_text(summary: dict | None, dataset: str | None) -> str:
    """Where the training rows came from: the reward that ranked the generations, the filters, the regularisation set."""
    if summary is None:
        return f"Fine-tune set: `{dataset}` (built without the pair builder's summary.json, so its curation is not recorded here)."
    pairs = summary.get("config", {})
    filters = []
    if pairs.get("confidence_k"):
        filters.append(f"a best (worst) image kept only when confidently best (worst): HPS v1 filter, k={pairs['confidence_k']}, T={pairs.get('confidence_temperature')}")
    if pairs.get("max_rejected_ratio") is not None:
        filters.append(f"at most {pairs['max_rejected_ratio']} rejected rows per chosen row")
    skipped = ", ".join(f"{reason.replace('_', ' ')}: {n}" for reason, n in summary.get("skipped", {}).items() if n)
    text = (f"Fine-tune set: {summary.get('images')} generated images of {summary.get('prompts')} prompts, ranked per prompt by the "
            f"`{pairs.get('reward_column')}` reward; the highest-scoring image of each prompt is *chosen*, the lowest *rejected*"
            + "".join(f"; {f}" for f in filters) + (f". Left out: {skipped}." if skipped else "."))
    reg = summary.get("regularization") or {}
    if reg.get("used"):
        text += f" Regularisation: {reg['used']} captioned images of `{reg.get('source')}` ({pairs.get('regularization_share', 0):.0%} of the set)."
    return text


def model_card_text(cfg, counts: dict[str, int], global_step: int, prediction_type: str, pairs_summary: dict | None = None) -> str:
    """The README.md of the saved pipeline: what it was trained from, on what, and how to prompt it.

    ``base_model`` is set only when the base is a hub id (a local base is named in the text);
    ``pairs_summary`` is the pair builder's summary.json (how rejected captions were written,
    which reward ranked the images)."""
    from huggingface_hub import ModelCard, ModelCardData

    from ..hub import REPO_PLACEHOLDER, base_license, hub_id_of

    base_id = hub_id_of(cfg.model)
    data = ModelCardData(
        base_model=base_id,
        license=base_license(cfg.model, cfg.revision),
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=["stable-diffusion", "text-to-image", "diffusers", "sr-finetune", "social-reward"] + (["lora"] if cfg.lora.rank else []),
    )
    revision = f" (revision `{cfg.revision}`)" if cfg.revision else ""
    base = f"[`{base_id}`](https://huggingface.co/{base_id}){revision}" if base_id else f"a local model folder, `{cfg.model}`{revision}, that is not on the hub"
    trained = ", ".join(name for name, on in (("UNet" + (f" (LoRA rank {cfg.lora.rank}, merged)" if cfg.lora.rank else ""), cfg.train_unet), ("text encoder", cfg.train_text_encoder)) if on)
    hyper = {
        "steps": global_step, "resolution": cfg.resolution, "train_batch_size (per process)": cfg.train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "unet_lr": cfg.unet_lr, "text_encoder_lr": cfg.text_encoder_lr,
        "lr_scheduler": cfg.lr_scheduler, "lr_warmup_steps": cfg.lr_warmup_steps, "optimizer": cfg.optimizer, "weight_decay": cfg.weight_decay,
        "max_grad_norm": cfg.max_grad_norm, "prediction_type": prediction_type, "snr_gamma": cfg.snr_gamma, "noise_offset": cfg.noise_offset,
        "use_ema": cfg.use_ema, "ema_decay": cfg.ema_decay if cfg.use_ema else None, "mixed_precision": cfg.mixed_precision, "seed": cfg.seed,
        "objective": cfg.objective, **({"dpo_beta": cfg.dpo_beta, "dpo_sft_weight": cfg.dpo_sft_weight, "dpo_anchor_weight": cfg.dpo_anchor_weight, "dpo_positive_weight": cfg.dpo_positive_weight, "alternate_roles": cfg.alternate_roles, "dpo_gap_weighting": cfg.dpo_gap_weighting} if cfg.objective == "dpo" else {}),
    }
    if cfg.objective in ("backprop", "pg"):
        hyper.update({f"online.{k}": v for k, v in vars(cfg.online).items() if k not in ("prompts", "reward_options", "added_rewards")})
    rows = "\n".join(f"| {k} | {v} |" for k, v in hyper.items())
    count_rows = "\n".join(f"| {role} | {n} |" for role, n in counts.items())
    token = cfg.negative_token
    rejected_format = (pairs_summary or {}).get("config", {}).get("rejected_format")
    if cfg.objective in ("backprop", "pg"):
        method = f"online, {online_method(cfg)}. Trained: {trained}."
        usage = 'image = pipe("a photo of a red fox in the snow").images[0]'
    elif cfg.objective == "dpo":
        regularization = f", plus {cfg.dpo_sft_weight} x the denoising loss on a regularisation set" if cfg.dpo_sft_weight else ""
        if cfg.dpo_anchor_weight:
            regularization += f", plus {cfg.dpo_anchor_weight:g} x the denoising loss on the pairs' own images"
        if cfg.dpo_positive_weight:
            regularization += f"; DPO-Positive (Pal et al. 2024, lambda {cfg.dpo_positive_weight:g}): no margin from fitting the chosen image worse than the base"
        if cfg.alternate_roles:
            regularization += "; each pair's roles swapped in every odd epoch (a control with no direction)"
        if cfg.dpo_gap_weighting:
            regularization += "; each pair's loss weighted by its reward gap over the mean gap"
        per_prompt = int((pairs_summary or {}).get("config", {}).get("pairs_per_prompt", 1))
        pairing = ("one pair per prompt,\nthe best- against the worst-rated image" if per_prompt == 1
                   else f"up to {per_prompt} pairs per prompt,\nthe i-th best- against the i-th worst-rated image")
        method = (f"by Diffusion-DPO (Wallace et al. 2023, beta {cfg.dpo_beta:g}) on {pairing}, "
                  f"with the base model as reference{regularization}. Trained: {trained}.")
        usage = 'image = pipe("a photo of a red fox in the snow").images[0]'
    else:
        method = (f"after *Social Reward* (Isajanyan et al., ICLR 2024):\nthe best-rated image of each prompt is trained on with its prompt as caption,\n"
                  f"{rejected_sentence(token, rejected_format)},\nand a regularisation set keeps the model close to its base. Trained: {trained}.")
        usage = f'image = pipe("a photo of a red fox in the snow", negative_prompt="{token}").images[0]'
    use = "" if cfg.objective != "sft" else "The negative token names what the model learned to avoid. Pass it as the negative prompt:\n\n"
    if cfg.objective in ("backprop", "pg"):
        data_text, count_header = f"No fixed fine-tune set: the model sampled its own training images from the prompts `{cfg.online.prompts}`.", "source | count"
    else:
        data_text, count_header = curation_text(pairs_summary, cfg.dataset), "role | rows"
    content = f"""---
{data.to_yaml()}
---

# Reward-guided fine-tune of {base_id or 'a local Stable Diffusion model'}

Base model: {base}.

Fine-tuned with `sr-finetune` {method}

## Use

{use}```python
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{REPO_PLACEHOLDER}")
{usage}
```

## Training data

{data_text}

| {count_header} |
| --- | --- |
{count_rows}

## Hyperparameters

| setting | value |
| --- | --- |
{rows}
"""
    return str(ModelCard(content))


def online_method(cfg) -> str:
    """What an online objective did, in a sentence for the model card."""
    o = cfg.online
    anchor = f", anchored to the base model (kl_weight {o.kl_weight:g})" if o.kl_weight else ""
    reward = " + ".join([f"`{o.reward}`", *(f"{added.scale:g} x `{name}`" for name, added in o.added_rewards.items())])
    if cfg.objective == "backprop":
        what = (f"by reward backpropagation (AlignProp / DRaFT-K, K={o.grad_steps} of {o.num_steps} DDIM steps): the gradient of the "
                f"{reward} reward flowed back through the VAE and the last {o.grad_steps} denoising steps")
    else:
        what = (f"by group policy gradient (DDPO with per-prompt group-normalised advantages over {o.group_size} images per prompt, "
                f"PPO clip {o.clip_range:g}, {o.inner_epochs} inner epochs) on the {reward} reward")
    return f"{what}, sampling with guidance {o.guidance_scale:g} and eta {o.eta:g}{anchor}"


SAMPLING_RECORD = "sampling.json"  # how the saved pipeline is meant to be sampled (read by `evaluate`)


def trained_negative_prompt(cfg, counts: dict[str, int]) -> str | None:
    """The negative prompt a fine-tune taught its model: the token when sft trained tagged rejected rows, else none."""
    return cfg.negative_token if cfg.objective == "sft" and counts.get("rejected", 0) > 0 else None


def write_sampling_record(output_dir: Path, negative_prompt: str | None) -> Path:
    """Write ``sampling.json`` beside the saved pipeline: the negative prompt to sample it with (or null)."""
    path = Path(output_dir) / SAMPLING_RECORD
    path.write_text(json.dumps({"negative_prompt": negative_prompt}, indent=2) + "\n")
    return path


def recorded_negative_prompt(model: str | os.PathLike, default: str | None) -> str | None:
    """The negative prompt recorded in a saved fine-tune's folder; ``default`` where there is no record."""
    path = Path(model) / SAMPLING_RECORD
    if not path.is_file():
        return default
    try:
        record = json.loads(path.read_text())
        return record["negative_prompt"] or None
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a sampling record ({exc!r}); expected {{\"negative_prompt\": <text or null>}}") from None


def write_model_card(output_dir: Path, text: str) -> Path:
    from huggingface_hub import ModelCard

    path = output_dir / "README.md"
    ModelCard(text).save(path)
    return path
