"""Reward-guided fine-tuning of a Stable Diffusion UNet and text encoder, with accelerate.

Supported:
- full fine-tune of the UNet and/or the text encoder (separate learning rates), or LoRA on the
  UNet attention projections (merged into the saved UNet); the VAE is always frozen;
- two offline objectives (``objective``): ``sft``, the denoising loss on every row of the fine-tune
  set (Social Reward), and ``dpo``, Diffusion-DPO (Wallace et al. 2023) on the pair table that
  build-pairs writes with ``keep_pairs: true``, against the starting model as reference (a frozen
  copy, or the UNet with its LoRA adapters off), optionally plus ``dpo_sft_weight`` times the
  denoising loss on the regularisation rows; every option below works with both;
- two online objectives on ``online.prompts`` instead of a fine-tune set (``sr_finetune/training/online.py``):
  ``backprop`` (AlignProp / DRaFT-K: the reward's gradient through the last K DDIM steps) and ``pg``
  (DDPO with per-prompt group advantages and PPO clipping), with an optional anchor to the starting
  model; the options below work with them too, except as refused below. Per step they log the mean
  reward, the mean within-group reward std, the anchor / KL term, the clip fraction (pg), the
  images sampled so far and the seconds (``FinetuneSummary.history`` holds them for the run);
- epsilon and v_prediction models (read from the model's scheduler), min-SNR-gamma weighting (sft),
  noise offset, EMA of the trained weights, gradient accumulation and clipping, AdamW (fused on
  CUDA and CPU) or 8-bit AdamW (bitsandbytes), fp16 / bf16 mixed precision, gradient checkpointing,
  SDPA / xformers / eager attention;
- caches of the latent distribution (mean, logvar; a fresh latent is sampled every step) and,
  when the text encoder is frozen, of the text embeddings, computed once per row;
- any number of processes (DDP over NCCL or gloo) from ``accelerate launch``;
- exact resume: a run stopped at a checkpoint and resumed with ``resume_from_checkpoint: latest``
  ends with the same weights as one that never stopped (same data order, augmentations, noise,
  optimizer, LR schedule, EMA and RNG states);
- validation images every ``validation_steps`` (with EMA weights swapped in, the negative token
  as negative prompt for sft, the training text encoder reused) to ``validation/`` and the tracker.

Refused (config errors): nothing to train; LoRA without ``train_unet``; ``snr_gamma`` with ``dpo``;
online objectives with a ``dataset``, without ``online.prompts``, ``online.reward`` or ``max_train_steps``,
with ``gradient_accumulation_steps`` > 1, ``snr_gamma`` or a frozen UNet; an evaluation-only reward
(world_judge, world_fidelity); ``backprop`` with a reward that has no differentiable path; ``pg`` with
``eta`` = 0 or ``group_size`` < 2;
``dpo`` on a fine-tune set without its pair table; ``cache_latents`` with
random crops; a ``prediction_type`` the model's scheduler does not have; ``push_to_hub`` without
a well-formed ``hub_model_id``, without a hub token or with ``HF_HUB_OFFLINE`` set (checked before
training). A push that fails after training is one error naming the saved folder and the
``sr-finetune push`` command that retries it. Untested: FSDP and DeepSpeed (the EMA expects
unsharded parameters).

Output: ``output_dir/`` becomes a ``StableDiffusionPipeline`` folder (+ README.md model card,
config.yaml), beside ``checkpoint-<step>/`` folders, ``logs/`` and ``cache/``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import to_yaml
from ..distributed import warn_if_single_cpu_launch
from ..errors import ConfigError, MissingDependencyError, UserError
from ..hub import HubError, check_hub_access, push_folder
from ..progress import progress as progress_bar
from ..progress import quiet_library_bars
from .checkpoint import TrainingProgress, resume_training_state, save_checkpoint
from .config import ONLINE_OBJECTIVES, FinetuneConfig
from .data import EpochSampler, FinetuneDataset, build_cached_table, check_negative_token, collate, derive_seed, encode_texts, load_finetune_table, role_counts
from .export import model_card_text, read_pairs_summary, save_pipeline, trained_negative_prompt, write_model_card, write_sampling_record
from .losses import denoising_loss, diffusion_dpo_loss, min_snr_weights, snr, training_target
from .online import OBJECTIVE_STEPS, OnlineRun, RewardLoader, images_per_step, load_online_reward
from .pair_data import PairDataset, collate_pairs, load_pair_table, pair_image_table, reward_gap_weights, rows_with_role
from .reference import Reference, frozen_copy

logger = logging.getLogger(__name__)

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class FinetuneSummary:
    output_dir: str
    global_step: int
    max_train_steps: int
    resumed_from: str | None
    steps_run: int
    images_seen: int
    seconds: float
    final_loss: float
    role_counts: dict = field(default_factory=dict)
    peak_memory_gb: float | None = None
    hub_url: str | None = None
    metrics: dict = field(default_factory=dict)  # the last step's monitors (dpo: reward_accuracy, reward_margin, displacement, sft_loss; online: reward_mean, ...)
    history: list = field(default_factory=list)  # online objectives: one dict of monitors per step of this run

    def line(self) -> str:
        rate = self.images_seen / self.seconds if self.seconds > 0 else 0.0
        resumed = f", resumed from {self.resumed_from}" if self.resumed_from else ""
        memory = f", peak GPU memory {self.peak_memory_gb:.1f} GB" if self.peak_memory_gb is not None else ""
        metrics = "".join(f", {name.replace('_', ' ')} {value if isinstance(value, int) else f'{value:.4f}'}" for name, value in self.metrics.items() if name != "seconds")
        return (
            f"finetune: step {self.global_step}/{self.max_train_steps} ({self.steps_run} this run{resumed}), "
            f"{rate:.1f} img/s{memory}, final loss {self.final_loss:.4f}{metrics} -> {self.output_dir}"
        )


# ---------------------------------------------------------------------------------------------
# builders


def resolve_prediction_type(cfg: FinetuneConfig, noise_scheduler) -> str:
    """The model's prediction type, from its scheduler; a different one in the config is refused."""
    actual = noise_scheduler.config.prediction_type
    if cfg.prediction_type is not None and cfg.prediction_type != actual:
        raise ConfigError(
            f"config error: prediction_type: config says '{cfg.prediction_type}' but {cfg.model} predicts '{actual}' "
            "(scheduler/scheduler_config.json); remove prediction_type or use a matching model"
        )
    if actual not in ("epsilon", "v_prediction"):
        raise UserError(f"{cfg.model}: prediction type '{actual}' is not supported (epsilon or v_prediction)")
    return actual


def use_cpu(device: str) -> bool:
    """``cpu`` -> True; ``auto`` -> True only on a machine without an accelerator (CUDA, MPS, XPU, ...)."""
    if device == "cpu":
        return True
    accelerator_api = getattr(torch, "accelerator", None)
    return not (accelerator_api.is_available() if accelerator_api is not None else torch.cuda.is_available())


def make_accelerator(cfg: FinetuneConfig, output_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    if cfg.report_to == "wandb":
        from accelerate.utils import is_wandb_available

        if not is_wandb_available():
            raise MissingDependencyError("report_to 'wandb' was asked for but wandb is not installed: pip install 'sr-finetune[wandb]'")
    return Accelerator(
        cpu=use_cpu(cfg.device),  # accelerate needs to be told, or a multi-process launch without GPUs runs N single processes
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )


def add_lora(unet, cfg: FinetuneConfig) -> None:
    """Freeze the UNet and add trainable LoRA adapters to its attention projections."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha or cfg.lora.rank, init_lora_weights="gaussian", target_modules=list(cfg.lora.target_modules))
    )


def place(module, device: torch.device, dtype: torch.dtype) -> None:
    """Move a module (loaded in fp32) to the device, casting only when the dtype changes."""
    module.to(device)
    if dtype != torch.float32:
        module.to(dtype=dtype)


def trained_param_groups(cfg: FinetuneConfig, unet, text_encoder) -> tuple[dict[str, torch.nn.Module], list[dict]]:
    """The trained modules by name (``unet``, ``text_encoder``) and one optimizer group each, at its own rate."""
    trained = {name: module for name, module, on in (("unet", unet, cfg.train_unet), ("text_encoder", text_encoder, cfg.train_text_encoder)) if on}
    lrs = {"unet": cfg.unet_lr, "text_encoder": cfg.text_encoder_lr}
    return trained, [{"params": [p for p in m.parameters() if p.requires_grad], "lr": lrs[name]} for name, m in trained.items()]


def build_optimizer(cfg: FinetuneConfig, param_groups: list[dict], device: torch.device):
    kwargs = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise MissingDependencyError("optimizer 'adamw8bit' was asked for but bitsandbytes is not installed: pip install 'sr-finetune[bnb]'") from None
        return bnb.optim.AdamW8bit(param_groups, **kwargs)
    return torch.optim.AdamW(param_groups, fused=True if fused_adamw_available(device) else None, **kwargs)


def fused_adamw_available(device: torch.device) -> bool:
    """Whether AdamW has a fused kernel here (one kernel for all parameters): CUDA, and CPU since torch 2.4."""
    from accelerate.utils import is_torch_version

    return device.type == "cuda" or (device.type == "cpu" and is_torch_version(">=", "2.4"))


def _tracker_config(cfg: FinetuneConfig) -> dict:
    """The config flattened to scalars, as TensorBoard's hparams want."""
    from omegaconf import OmegaConf

    flat = {}

    def walk(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk(OmegaConf.to_container(OmegaConf.structured(cfg)))
    return flat


@dataclass
class TrainingModels:
    """The models of a run as the trainer holds them: trained ones fp32 on the device (LoRA added,
    gradient checkpointing on as configured), frozen ones in ``weight_dtype``, and the frozen copies
    of the starting model that an anchored objective (dpo, or an online one with kl_weight) compares with."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object
    prediction_type: str
    weight_dtype: torch.dtype
    unet_dtype: torch.dtype
    reference_unet: torch.nn.Module | None = None
    reference_text_encoder: torch.nn.Module | None = None
    lora: int = 0  # LoRA rank (0: full fine-tune)

    def reference(self, trained_unet) -> Reference:
        """The starting model: the frozen copies, or ``trained_unet`` (unwrapped) with its LoRA adapters off."""
        unet = trained_unet if self.reference_unet is None else self.reference_unet
        return Reference(unet, self.reference_text_encoder, lora=bool(self.lora))


def prepare_models(cfg: FinetuneConfig, device: torch.device) -> TrainingModels:
    """Load ``cfg.model`` and set its modules up for training on ``device`` (see :class:`TrainingModels`)."""
    from ..models import load_components

    parts = load_components(cfg.model, revision=cfg.revision, variant=cfg.variant, attention=cfg.attention)
    unet, vae, text_encoder = parts.unet, parts.vae, parts.text_encoder
    prediction_type = resolve_prediction_type(cfg, parts.noise_scheduler)
    weight_dtype = WEIGHT_DTYPES[cfg.mixed_precision]
    vae.requires_grad_(False)
    unet.requires_grad_(cfg.train_unet)
    text_encoder.requires_grad_(cfg.train_text_encoder)
    reference_unet = reference_text_encoder = None
    if cfg.anchored:  # the starting model, before any adapter or training touches it
        reference_unet = frozen_copy(unet, device, weight_dtype) if cfg.train_unet and not cfg.lora.rank else None
        reference_text_encoder = frozen_copy(text_encoder, device, weight_dtype) if cfg.train_text_encoder else None
    if cfg.lora.rank:
        add_lora(unet, cfg)
    if cfg.gradient_checkpointing:
        if cfg.train_unet and cfg.objective != "backprop":  # backprop checkpoints whole UNet calls of the kept DDIM steps
            unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    unet_dtype = torch.float32 if cfg.train_unet else weight_dtype
    place(vae, device, weight_dtype)
    place(unet, device, unet_dtype)
    place(text_encoder, device, torch.float32 if cfg.train_text_encoder else weight_dtype)
    return TrainingModels(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=parts.tokenizer, noise_scheduler=parts.noise_scheduler, prediction_type=prediction_type,
        weight_dtype=weight_dtype, unet_dtype=unet_dtype, reference_unet=reference_unet, reference_text_encoder=reference_text_encoder, lora=cfg.lora.rank,
    )


# ---------------------------------------------------------------------------------------------
# one training step


def sample_latents(batch: dict, vae, generator: torch.Generator, weight_dtype: torch.dtype) -> torch.Tensor:
    """A scaled latent sample per image, from the cached distribution or by encoding the pixels now."""
    if "latent_mean" in batch:
        mean, logvar = batch["latent_mean"].float(), batch["latent_logvar"].float()
    else:
        with torch.no_grad():
            dist = vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist
        mean, logvar = dist.mean.float(), dist.logvar.float()
    latents = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator, device=mean.device)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def draw_noise(latents: torch.Tensor, cfg: FinetuneConfig, noise_scheduler, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise (with ``noise_offset``) and a random training timestep per latent."""
    bsz, channels = latents.shape[:2]
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    if cfg.noise_offset:
        noise = noise + cfg.noise_offset * torch.randn((bsz, channels, 1, 1), generator=generator, device=latents.device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=generator, device=latents.device)
    return noise, timesteps


def encoder_states(batches: list[dict], text_encoder, train_text_encoder: bool) -> torch.Tensor:
    """The text embeddings of the rows of ``batches``, in order: cached, or one text-encoder forward."""
    if "prompt_embeds" in batches[0]:
        return torch.cat([b["prompt_embeds"] for b in batches])
    with torch.set_grad_enabled(train_text_encoder):
        return text_encoder(torch.cat([b["input_ids"] for b in batches]))[0]


def compute_loss(batch: dict, *, unet, text_encoder, vae, noise_scheduler, prediction_type: str, cfg: FinetuneConfig, generator: torch.Generator, weight_dtype: torch.dtype, unet_dtype: torch.dtype) -> torch.Tensor:
    """The denoising loss of one batch: noise the latents at random timesteps, predict, compare."""
    latents = sample_latents(batch, vae, generator, weight_dtype)
    noise, timesteps = draw_noise(latents, cfg, noise_scheduler, generator)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    encoder_hidden_states = encoder_states([batch], text_encoder, cfg.train_text_encoder)
    model_pred = unet(noisy_latents.to(unet_dtype), timesteps, encoder_hidden_states.to(unet_dtype)).sample
    target = training_target(noise_scheduler, latents, noise, timesteps, prediction_type)
    weights = min_snr_weights(snr(noise_scheduler.alphas_cumprod, timesteps), cfg.snr_gamma, prediction_type) if cfg.snr_gamma else None
    return denoising_loss(model_pred, target, weights)


def compute_dpo_loss(batch: dict, *, unet, text_encoder, vae, noise_scheduler, prediction_type: str, cfg: FinetuneConfig, generator: torch.Generator, weight_dtype: torch.dtype, unet_dtype: torch.dtype, reference: Reference) -> tuple[torch.Tensor, dict]:
    """The Diffusion-DPO loss of a batch of pairs (+ ``dpo_anchor_weight`` x the pairs' own denoising loss,
    + ``dpo_sft_weight`` x the regularisation rows' denoising loss).

    Both images of a pair get the same noise and timestep and the prompt's embedding; one UNet
    forward runs on ``[chosen; rejected; regularization]``, the reference on ``[chosen; rejected]``.
    Returns the loss and the detached monitors (reward accuracy, reward margin, sft loss).
    """
    chosen = sample_latents(batch["chosen"], vae, generator, weight_dtype)
    rejected = sample_latents(batch["rejected"], vae, generator, weight_dtype)
    noise, timesteps = draw_noise(chosen, cfg, noise_scheduler, generator)
    latents, noise, timesteps = torch.cat([chosen, rejected]), noise.repeat(2, 1, 1, 1), timesteps.repeat(2)
    texts = [batch["chosen"]]
    if "regularization" in batch:
        reg_latents = sample_latents(batch["regularization"], vae, generator, weight_dtype)
        reg_noise, reg_timesteps = draw_noise(reg_latents, cfg, noise_scheduler, generator)
        latents, noise, timesteps = torch.cat([latents, reg_latents]), torch.cat([noise, reg_noise]), torch.cat([timesteps, reg_timesteps])
        texts.append(batch["regularization"])
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    states = encoder_states(texts, text_encoder, cfg.train_text_encoder)
    n = len(chosen)
    prompts = states[:n]
    model_pred = unet(noisy_latents.to(unet_dtype), timesteps, torch.cat([prompts, prompts, states[n:]]).to(unet_dtype)).sample
    target = training_target(noise_scheduler, latents, noise, timesteps, prediction_type)
    ref_prompts = reference.text_states(batch["chosen"]["input_ids"]) if reference.text_encoder is not None else prompts.detach()
    ref_pred = reference.prediction(noisy_latents[: 2 * n], timesteps[: 2 * n], torch.cat([ref_prompts, ref_prompts]))
    weights = batch["weight"].to(model_pred.device) if "weight" in batch else None
    terms = diffusion_dpo_loss(model_pred[: 2 * n], ref_pred, target[: 2 * n], cfg.dpo_beta, cfg.dpo_positive_weight, weights)
    metrics = {"reward_accuracy": terms.reward_accuracy, "reward_margin": terms.reward_margin, "displacement": terms.displacement.mean()}
    loss = terms.loss
    if cfg.dpo_anchor_weight:  # the pairs' own images, both roles: holds the fit to them, not a direction
        anchor_loss = denoising_loss(model_pred[: 2 * n], target[: 2 * n])
        loss = loss + cfg.dpo_anchor_weight * anchor_loss
        metrics["anchor_loss"] = anchor_loss.detach()
    if "regularization" in batch:
        sft_loss = denoising_loss(model_pred[2 * n :], target[2 * n :])
        loss = loss + cfg.dpo_sft_weight * sft_loss
        metrics["sft_loss"] = sft_loss.detach()
    return loss, metrics


def gathered_metrics(metrics: dict, accelerator) -> dict:
    """Scalar monitors averaged over processes."""
    if not metrics:
        return {}
    values = accelerator.gather(torch.stack([value.float() for value in metrics.values()])[None]).mean(dim=0)
    return dict(zip(metrics, values.tolist()))


def checked_loss(loss: torch.Tensor, accelerator, prompt_ids: list, step: int, position: str) -> float:
    """The loss averaged over processes; a NaN/inf on any process stops every process with a UserError
    naming the step, ``position`` (where in the data) and the prompt ids of the offending batch."""
    losses = accelerator.gather(loss.detach().float().reshape(1))
    if torch.isfinite(losses).all():
        return losses.mean().item()
    from accelerate.utils import gather_object

    bad_ids = gather_object([str(i) for i in prompt_ids] if not torch.isfinite(loss).item() else [])
    value = losses[~torch.isfinite(losses)][0].item()
    raise UserError(
        f"loss is {value} at step {step} ({position}); prompt ids of the batch: {', '.join(bad_ids)}. "
        "Lower the learning rate, prefer bf16 to fp16, or inspect these rows; earlier checkpoints are intact"
    )


# ---------------------------------------------------------------------------------------------
# validation


@torch.no_grad()
def log_validation(cfg: FinetuneConfig, accelerator, *, unet, text_encoder, vae, tokenizer, noise_scheduler, step: int, output_dir: Path) -> list:
    """Generate one image per validation prompt, with the negative token as negative prompt for sft (main process)."""
    import numpy as np
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    unet, text_encoder = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler.from_config(noise_scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    was_training = {module: module.training for module in (unet, text_encoder)}
    for module in was_training:
        module.eval()
    images = []
    negative_prompt = cfg.negative_token if cfg.objective == "sft" else None  # dpo trains no token
    with accelerator.autocast():
        for i, prompt in enumerate(cfg.validation_prompts):
            generator = torch.Generator(accelerator.device).manual_seed(derive_seed(cfg.seed, "validation", i))
            images.append(pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=cfg.validation_inference_steps, guidance_scale=cfg.validation_guidance_scale, height=cfg.resolution, width=cfg.resolution, generator=generator).images[0])
    for module, mode in was_training.items():
        module.train(mode)
    folder = output_dir / "validation" / f"step-{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"{i:02d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(im, caption=p) for im, p in zip(images, cfg.validation_prompts)]}, step=step)
    return images


def build_loader(cfg: FinetuneConfig, table, counts: dict, accelerator, vae, text_encoder, tokenizer, output_dir: Path, weight_dtype: torch.dtype, dpo: bool, pair_weights: torch.Tensor | None = None):
    """The fine-tune set's DataLoader (latent / text caches built first), its sampler, and the run's
    number of optimizer steps and epochs (``pair_weights``: dpo's per-pair loss weights)."""
    device = accelerator.device
    cache_text = cfg.cache_text_embeddings and not cfg.train_text_encoder
    table = build_cached_table(
        table, accelerator=accelerator, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, cfg=cfg, cache_dir=output_dir / "cache",
        weight_dtype=weight_dtype, cache_latents=cfg.cache_latents, cache_text=cache_text,
    )
    empty_embeds = None
    if cache_text and cfg.empty_prompt_share > 0:  # the rows that drop their caption take the empty one's embedding
        empty_embeds = encode_texts(text_encoder, tokenizer, [""], device)[0]
    dataset = FinetuneDataset(table, tokenizer, cfg.resolution, cfg.center_crop, cfg.random_flip, cfg.seed, cfg.empty_prompt_share, empty_embeds)
    if dpo:
        dataset = PairDataset(dataset, counts["pairs"], counts["regularization"], cfg.seed, cfg.alternate_roles, pair_weights)
    sampler = EpochSampler(len(dataset), cfg.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.train_batch_size, sampler=sampler, collate_fn=collate_pairs if dpo else collate, num_workers=cfg.dataloader_num_workers,
        persistent_workers=cfg.dataloader_num_workers > 0,  # workers start once, not at every epoch
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),  # worker seeds do not draw from the global RNG
    )
    loader = accelerator.prepare(loader)
    updates_per_epoch = math.ceil(len(loader) / cfg.gradient_accumulation_steps)
    max_train_steps = cfg.max_train_steps or cfg.num_epochs * updates_per_epoch
    num_epochs = math.ceil(max_train_steps / updates_per_epoch)
    return loader, sampler, max_train_steps, num_epochs


# ---------------------------------------------------------------------------------------------
# the run


@quiet_library_bars()
def run_finetune(cfg: FinetuneConfig, reward_loader: RewardLoader | None = None) -> FinetuneSummary:
    """Fine-tune ``cfg.model`` on the fine-tune set ``cfg.dataset`` (sft, dpo) or online on
    ``cfg.online.prompts`` (backprop, pg: ``reward_loader(name, weights=..., device=..., **options)``
    loads the reward; the command layer passes ``reward.load_training_reward``); save a pipeline
    into ``cfg.output_dir``."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    cfg.check_inputs()
    online = cfg.objective in ONLINE_OBJECTIVES
    if cfg.push_to_hub:  # before any training: a push that cannot work must not cost a run
        try:
            check_hub_access(cfg.hub_model_id)
        except HubError as exc:
            raise HubError(f"push_to_hub=true: {exc}; nothing was trained (or set push_to_hub=false and upload later with `sr-finetune push`)") from None
    warn_if_single_cpu_launch()
    output_dir = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg, output_dir)
    device, is_main = accelerator.device, accelerator.is_main_process
    set_seed(cfg.seed)  # LoRA's initial weights; everything random after this has its own seed

    dpo = cfg.objective == "dpo"
    if online:  # the prompts and the reward are checked before the diffusion model loads
        from ..prompts import load_prompts

        prompt_set = load_prompts(cfg.online.prompts, column=cfg.online.prompt_column)
        reward = load_online_reward(cfg, reward_loader, device)
        counts = {"prompts": len(prompt_set)}
    else:
        table = load_finetune_table(cfg.dataset)  # checked before any model loads
    pair_weights = None
    if dpo:
        pairs = load_pair_table(cfg.dataset)
        regularization = rows_with_role(table, "regularization") if cfg.dpo_sft_weight else None
        if cfg.dpo_sft_weight and regularization is None:
            raise UserError(f"dpo_sft_weight={cfg.dpo_sft_weight} trains on the regularization rows, but {cfg.dataset} has none (set dpo_sft_weight=0)")
        counts = {"pairs": len(pairs), "regularization": 0 if regularization is None else len(regularization)}
        if cfg.dpo_gap_weighting:
            pair_weights = reward_gap_weights(pairs, f"{cfg.dataset}/pairs")
        table = pair_image_table(pairs, regularization)
    elif not online:
        counts = role_counts(table)
        check_negative_token(table, cfg.negative_token)

    # --- models: the trained ones stay fp32 (accelerate autocasts), the frozen ones run in weight_dtype
    loaded = prepare_models(cfg, device)
    unet, vae, text_encoder, tokenizer, noise_scheduler = loaded.unet, loaded.vae, loaded.text_encoder, loaded.tokenizer, loaded.noise_scheduler
    prediction_type, weight_dtype, unet_dtype = loaded.prediction_type, loaded.weight_dtype, loaded.unet_dtype

    # --- data
    if online:
        loader = sampler = None
        max_train_steps, num_epochs = cfg.max_train_steps, 1
        updates_per_step = cfg.online.inner_epochs if cfg.objective == "pg" else 1
        rows = f"{len(prompt_set)} prompts from {cfg.online.prompts}"
        layout = f"{rows}, {cfg.online.prompts_per_step} prompts x {cfg.online.group_size} images x {accelerator.num_processes} processes"
    else:
        loader, sampler, max_train_steps, num_epochs = build_loader(cfg, table, counts, accelerator, vae, text_encoder, tokenizer, output_dir, weight_dtype, dpo, pair_weights)
        updates_per_step = 1
        rows = (f"{len(loader.dataset)} pairs" + (" + regularization" if counts["regularization"] else "")) if dpo else f"{len(loader.dataset)} rows"
        if pair_weights is not None:
            rows += f" weighted by reward gap (weights {pair_weights.min():.2f}-{pair_weights.max():.2f}, mean 1)"
        layout = f"{rows}, batch {cfg.train_batch_size} x {accelerator.num_processes} processes, accumulation {cfg.gradient_accumulation_steps}"

    # --- optimizer, schedule, EMA
    trained, param_groups = trained_param_groups(cfg, unet, text_encoder)
    optimizer = build_optimizer(cfg, param_groups, device)
    # accelerate steps a prepared scheduler once per process per optimizer step
    # (pg makes inner_epochs optimizer steps per training step; warmup and length count training steps)
    lr_steps = updates_per_step * accelerator.num_processes
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * lr_steps, num_training_steps=max_train_steps * lr_steps)
    *models, optimizer, lr_scheduler = accelerator.prepare(*trained.values(), optimizer, lr_scheduler)
    trained = dict(zip(trained, models))
    unet, text_encoder = trained.get("unet", unet), trained.get("text_encoder", text_encoder)
    params = [p for m in trained.values() for p in accelerator.unwrap_model(m).parameters() if p.requires_grad]
    ema = EMAModel(params, decay=cfg.ema_decay) if cfg.use_ema else None  # outside the DDP wrapper
    if ema is not None:
        ema.to(device)
    reference = None
    if cfg.anchored:
        reference = loaded.reference(accelerator.unwrap_model(unet))
    progress = TrainingProgress(data_layout=layout)
    accelerator.register_for_checkpointing(progress, *([ema] if ema is not None else []))

    # --- resume
    resume_dir = resume_training_state(accelerator, cfg.resume_from_checkpoint, output_dir)
    if resume_dir is not None:
        if ema is not None:
            ema.to(device)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", resume_dir, progress.global_step, progress.epoch, progress.batches_in_epoch)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(to_yaml(cfg))
    if cfg.report_to != "none":
        accelerator.init_trackers("sr-finetune", config=_tracker_config(cfg))
    if is_main and online:
        logger.info("finetune: %s, %d steps, prediction %s, objective %s, reward %s", layout, max_train_steps, prediction_type, cfg.objective, cfg.online.reward)
    elif is_main:
        logger.info(
            "finetune: %s %s, %d processes x batch %d x accumulation %d, %d steps (%d epochs), prediction %s, objective %s",
            rows, counts, accelerator.num_processes, cfg.train_batch_size, cfg.gradient_accumulation_steps, max_train_steps, num_epochs, prediction_type, cfg.objective,
        )

    # --- train
    for module in trained.values():
        module.train()
    start_step, images_seen, last_loss, last_metrics, history = progress.global_step, 0, float("nan"), {}, []
    last_saved = progress.global_step if resume_dir is not None else None
    bar = progress_bar(total=max_train_steps, initial=progress.global_step, desc="finetune", unit="step", disable=not accelerator.is_local_main_process)

    def after_step(loss: float, logged: dict, shown: dict) -> None:
        """Once per training step: progress bar, tracker, checkpoint, validation images."""
        nonlocal last_saved
        lrs_now = lr_scheduler.get_last_lr()
        bar.set_postfix(loss=f"{loss:.4f}", **{k: f"{v:.3g}" for k, v in shown.items()}, lr=f"{lrs_now[0]:.2e}", refresh=False)
        bar.update(1)  # redraws at most every tqdm mininterval
        accelerator.log({"loss": loss, **logged, **{f"lr/{name}": lr for name, lr in zip(trained, lrs_now)}}, step=progress.global_step)
        if cfg.checkpointing_steps and progress.global_step % cfg.checkpointing_steps == 0:
            save_checkpoint(accelerator, output_dir, progress.global_step, cfg.checkpoints_total_limit)
            last_saved = progress.global_step
        if cfg.validation_prompts and cfg.validation_steps and progress.global_step % cfg.validation_steps == 0:
            if is_main:
                if ema is not None:
                    ema.store(params)
                    ema.copy_to(params)
                try:
                    log_validation(cfg, accelerator, unet=unet, text_encoder=text_encoder, vae=vae, tokenizer=tokenizer, noise_scheduler=noise_scheduler, step=progress.global_step, output_dir=output_dir)
                finally:
                    if ema is not None:
                        ema.restore(params)
            accelerator.wait_for_everyone()

    start = time.perf_counter()
    if online:
        from diffusers import DDIMScheduler

        def update(loss: torch.Tensor, prompt_rows: list) -> float:
            """One optimizer step on the gradients the objective accumulated (clipped), then LR schedule and EMA."""
            value = checked_loss(loss, accelerator, [prompt_set.ids[i] for i in prompt_rows], progress.global_step + 1, f"objective {cfg.objective}")
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(params)
            return value

        run = OnlineRun(
            cfg, accelerator, unet=unet, text_encoder=text_encoder, vae=vae, tokenizer=tokenizer, scheduler=DDIMScheduler.from_config(noise_scheduler.config),
            reward=reward, prompts=prompt_set.prompts, update=update, reference=reference,
        )
        objective_step, sampled_per_step = OBJECTIVE_STEPS[cfg.objective], images_per_step(cfg, accelerator.num_processes)
        while progress.global_step < max_train_steps:
            step_start = time.perf_counter()
            last_loss, metrics = objective_step(run, progress.global_step)
            progress.global_step += 1
            progress.images_sampled += sampled_per_step
            images_seen += sampled_per_step
            last_metrics = {**gathered_metrics(metrics, accelerator), "images_sampled": progress.images_sampled, "seconds": time.perf_counter() - step_start}
            history.append({"step": progress.global_step, "loss": last_loss, **last_metrics})
            after_step(last_loss, {f"online/{name}": value for name, value in last_metrics.items()}, {"reward": last_metrics["reward_mean"]})
    else:
        micro_losses, micro_metrics = [], []
        images_per_row = 2 + bool(counts["regularization"]) if dpo else 1
        step_args = dict(
            unet=unet, text_encoder=text_encoder, vae=vae, noise_scheduler=noise_scheduler, prediction_type=prediction_type, cfg=cfg,
            weight_dtype=weight_dtype, unet_dtype=unet_dtype,
        )
        start_epoch, skip = progress.epoch, progress.batches_in_epoch
        if skip >= len(loader):
            start_epoch, skip = start_epoch + 1, 0
        for epoch in range(start_epoch, num_epochs):
            if progress.global_step >= max_train_steps:
                break
            # skipped batches are dropped at the sampler: never loaded, never run through the model
            batches = accelerator.skip_first_batches(loader, skip) if skip else loader
            batches.set_epoch(epoch)  # accelerate re-sets the sampler's epoch from its own counter, which restarts at 0 on resume
            sampler.set_epoch(epoch)
            for batch_index, batch in enumerate(batches, start=skip):
                generator = torch.Generator(device).manual_seed(derive_seed(cfg.seed, "noise", accelerator.process_index, epoch, batch_index))
                with accelerator.accumulate(*trained.values()):
                    if dpo:
                        loss, metrics = compute_dpo_loss(batch, generator=generator, reference=reference, **step_args)
                    else:
                        loss, metrics = compute_loss(batch, generator=generator, **step_args), {}
                    micro_losses.append(checked_loss(loss, accelerator, batch["prompt_id"], progress.global_step + 1, f"epoch {epoch}, batch {batch_index}"))
                    micro_metrics.append(gathered_metrics(metrics, accelerator))
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                images_seen += len(batch["prompt_id"]) * images_per_row * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue

                # one optimizer step done
                progress.global_step += 1
                progress.epoch, progress.batches_in_epoch = epoch, batch_index + 1
                if ema is not None:
                    ema.step(params)
                last_loss, micro_losses = sum(micro_losses) / len(micro_losses), []
                last_metrics = {name: sum(m[name] for m in micro_metrics) / len(micro_metrics) for name in micro_metrics[0]}
                micro_metrics = []
                shown = {"acc": last_metrics["reward_accuracy"], "margin": last_metrics["reward_margin"]} if dpo else {}
                after_step(last_loss, {f"dpo/{name}": value for name, value in last_metrics.items()}, shown)
                if progress.global_step >= max_train_steps:
                    break
            skip = 0
    bar.close()
    seconds = time.perf_counter() - start

    # --- save: the final training state (so a longer run can resume), then the pipeline
    accelerator.wait_for_everyone()
    if progress.global_step > 0 and last_saved != progress.global_step:
        save_checkpoint(accelerator, output_dir, progress.global_step, cfg.checkpoints_total_limit)
    hub_url = push_error = None
    if is_main:
        if ema is not None:
            ema.copy_to(params)
        final_unet = accelerator.unwrap_model(unet) if cfg.train_unet else None
        if final_unet is not None and cfg.lora.rank:
            final_unet.fuse_lora()
            final_unet.unload_lora()
        save_pipeline(cfg, output_dir, unet=final_unet, text_encoder=accelerator.unwrap_model(text_encoder) if cfg.train_text_encoder else None)
        card_counts = {**counts, "images sampled": progress.images_sampled} if online else counts
        write_model_card(output_dir, model_card_text(cfg, card_counts, progress.global_step, prediction_type, read_pairs_summary(cfg.dataset)))
        write_sampling_record(output_dir, trained_negative_prompt(cfg, counts))
        if cfg.push_to_hub:
            try:
                hub_url = push_folder(output_dir, cfg.hub_model_id, private=cfg.hub_private)
            except HubError as exc:  # raised after every process has finished, so none waits for the main one
                push_error = exc
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if push_error is not None:
        raise HubError(f"training finished and the pipeline is saved in {output_dir} (step {progress.global_step}), but the {push_error}")
    return FinetuneSummary(
        output_dir=str(output_dir),
        global_step=progress.global_step,
        max_train_steps=max_train_steps,
        resumed_from=str(resume_dir) if resume_dir else None,
        steps_run=progress.global_step - start_step,
        images_seen=images_seen,
        seconds=seconds,
        final_loss=last_loss,
        role_counts=counts,
        peak_memory_gb=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        hub_url=hub_url,
        metrics=last_metrics,
        history=history,
    )
