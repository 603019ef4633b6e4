"""Settings of the fine-tuning stage (``finetune:`` in a recipe config).

Defaults follow the Social Reward paper where it states them (UNet and text encoder both
fine-tuned at 1e-5); the rest are the usual Stable Diffusion fine-tuning defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..config import require

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
OPTIMIZERS = ("adamw", "adamw8bit")
MIXED_PRECISION = ("no", "fp16", "bf16")
PREDICTION_TYPES = ("epsilon", "v_prediction")
REPORT_TO = ("tensorboard", "wandb", "none")
OFFLINE_OBJECTIVES = ("sft", "dpo")  # learn from a fixed fine-tune set
ONLINE_OBJECTIVES = ("backprop", "pg")  # sample from the model being trained, score, update
OBJECTIVES = OFFLINE_OBJECTIVES + ONLINE_OBJECTIVES
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class LoraSettings:
    """LoRA adapters on the UNet attention projections instead of a full UNet fine-tune (rank 0 = off)."""

    rank: int = 0
    alpha: Optional[float] = None  # None = rank (scale 1)
    target_modules: List[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def validate(self) -> None:
        require(self.rank >= 0, "rank", f"must be >= 0 (0 turns LoRA off), got {self.rank}")
        require(self.alpha is None or self.alpha > 0, "alpha", f"must be positive, got {self.alpha}")
        require(len(self.target_modules) > 0, "target_modules", "must name at least one module")


@dataclass
class AddedReward:
    """A further term of an online objective's reward: ``scale`` x this metric's score."""

    scale: float = 1.0
    weights: Optional[str] = None  # hub id or local path of its weights (None = its published default)
    options: Dict[str, Any] = field(default_factory=dict)  # more keyword arguments of its loader


@dataclass
class OnlineSettings:
    """The online objectives (``objective: backprop | pg``): sample from the model being trained,
    score with a reward, update. See ``sr_finetune/training/online.py`` for what each does."""

    prompts: Optional[str] = None  # a prompt file or a named set, read as `generate` reads them (sr_finetune.prompts)
    prompt_column: Optional[str] = None  # for table files without a 'prompt' column
    reward: Optional[str] = None  # a metric name of the reward registry (clip, aesthetic, social_reward, ...)
    reward_weights: Optional[str] = None  # hub id or local path of the reward's weights (None = its published default)
    reward_options: Dict[str, Any] = field(default_factory=dict)  # more keyword arguments of the reward's loader
    # metric -> {scale, weights, options}: terms added to the reward, e.g. clip (prompt alignment), which holds
    # prompt fidelity where the reward alone is maximised by images that lose their subject (README, demo results)
    added_rewards: Dict[str, AddedReward] = field(default_factory=dict)
    prompts_per_step: int = 2  # per process and step
    group_size: int = 4  # images per prompt; pg normalises rewards within each prompt's group
    num_steps: int = 20  # DDIM steps of each sample
    guidance_scale: float = 5.0
    eta: float = 1.0  # DDIM stochasticity; pg needs eta > 0 (each step then has a log-probability)
    grad_steps: int = 1  # backprop: keep gradients through the last K denoising steps (DRaFT-K; K = num_steps: AlignProp without truncation)
    kl_weight: float = 0.0  # weight of the anchor to the starting model (0 = off); see online.py for the term of each objective
    inner_epochs: int = 1  # pg: optimizer steps on each sampled batch
    timestep_fraction: float = 1.0  # pg: share of the denoising steps trained on per inner epoch (a seeded random subset)
    clip_range: float = 1e-4  # pg: PPO clip of the importance ratio (DDPO's default)

    def validate(self) -> None:
        for key in ("prompts_per_step", "group_size", "num_steps", "inner_epochs"):
            require(getattr(self, key) > 0, key, f"must be positive, got {getattr(self, key)}")
        require(self.guidance_scale >= 1.0, "guidance_scale", f"must be >= 1 (1 = no classifier-free guidance), got {self.guidance_scale}")
        require(self.eta >= 0, "eta", f"must be >= 0, got {self.eta}")
        require(1 <= self.grad_steps <= self.num_steps, "grad_steps", f"must be in [1, num_steps={self.num_steps}], got {self.grad_steps}")
        require(self.kl_weight >= 0, "kl_weight", f"must be >= 0 (0 turns the anchor off), got {self.kl_weight}")
        require(0.0 < self.timestep_fraction <= 1.0, "timestep_fraction", f"must be in (0, 1], got {self.timestep_fraction}")
        require(self.clip_range > 0, "clip_range", f"must be positive, got {self.clip_range}")
        for name, added in self.added_rewards.items():
            require(name != self.reward, f"added_rewards.{name}", "is the reward itself; change online.reward's weight by scaling the others")
            require(math.isfinite(added.scale) and added.scale != 0, f"added_rewards.{name}.scale", f"must be a finite, non-zero number, got {added.scale}")


@dataclass
class FinetuneConfig:
    """Settings of the fine-tuning stage; see ``sr_finetune/training/trainer.py`` for what each does."""

    # what to train, on what
    model: str = "stabilityai/stable-diffusion-2-1-base"
    revision: Optional[str] = None
    variant: Optional[str] = None
    dataset: Optional[str] = None  # a `datasets.save_to_disk` folder: image, text, role, prompt_id, score
    output_dir: str = "runs/finetune"
    negative_token: str = "t@y quality"  # carried by rejected texts; the negative prompt at inference
    train_unet: bool = True
    train_text_encoder: bool = True
    lora: LoraSettings = field(default_factory=LoraSettings)
    prediction_type: Optional[str] = None  # None = the model's scheduler; set it to assert what you expect
    # sft: the denoising loss on every row (Social Reward). dpo: Diffusion-DPO (Wallace et al. 2023)
    # on the pair table `dataset/pairs` (build-pairs with keep_pairs=true), against the starting model.
    # backprop (AlignProp / DRaFT-K) and pg (DDPO with group advantages): online, on `online.prompts`.
    objective: str = "sft"
    online: OnlineSettings = field(default_factory=OnlineSettings)
    # Diffusion-DPO's beta: 5000, the default of `--beta_dpo` in the authors' train.py and the value
    # of their SD 1.5 launcher, launchers/sd15.sh (github.com/SalesforceAIResearch/DiffusionDPO);
    # it goes with the 1/2 and the per-element mean of losses.diffusion_dpo_loss.
    dpo_beta: float = 5000.0
    dpo_sft_weight: float = 0.0  # dpo: weight of an added denoising loss on the regularization rows (0 = off)
    # dpo: weight of a denoising loss on the pairs' own images, chosen and rejected alike (0 = off). DPO
    # moves the difference of their errors; this holds their sum, the model's fit to its own samples,
    # whatever the roles. Its gradient is comparable with the DPO term's near dpo_beta / 4.
    dpo_anchor_weight: float = 0.0
    # dpo: DPO-Positive's lambda (Pal et al. 2024): inside the sigmoid, lambda x how much worse the model
    # fits the chosen image than the reference does (0 = plain Diffusion-DPO). Rules out widening a
    # margin by fitting both images worse, which moves the model off its own samples whatever the roles.
    dpo_positive_weight: float = 0.0
    # dpo: swap each pair's chosen and rejected image in every odd epoch (epoch 0 as the pairs say). A
    # control with no direction: every pair is trained both ways in turn, so no draw of roles can
    # carry one through the run.
    alternate_roles: bool = False
    # dpo: weight each pair's loss by its reward gap, |chosen_score - rejected_score| over the mean gap of
    # the pair table (mean weight 1): a pair the reward barely tells apart, more often wrong, counts less.
    dpo_gap_weighting: bool = False
    # data
    resolution: int = 512
    center_crop: bool = True
    random_flip: bool = False
    # share of training rows whose caption is replaced by the empty one (diffusers' proportion_empty_prompts):
    # the unconditional branch that classifier-free guidance subtracts learns from the same images
    empty_prompt_share: float = 0.0
    cache_latents: bool = True  # the VAE is always frozen: encode each image once, sample each step
    cache_text_embeddings: bool = True  # only when the text encoder is frozen
    dataloader_num_workers: int = 4
    # schedule
    train_batch_size: int = 4  # per process
    gradient_accumulation_steps: int = 1
    max_train_steps: Optional[int] = None  # optimizer steps; overrides num_epochs when set
    num_epochs: int = 1
    # optimisation
    unet_lr: float = 1e-5
    text_encoder_lr: float = 1e-5
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    optimizer: str = "adamw"  # adamw (fused on CUDA and CPU) | adamw8bit (bitsandbytes)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0  # 0 = no clipping
    noise_offset: float = 0.0
    snr_gamma: Optional[float] = None  # min-SNR-gamma loss weighting (Hang et al. 2023 recommend 5.0); None = off
    use_ema: bool = False
    ema_decay: float = 0.9999
    # speed and memory
    device: str = "auto"  # auto (the accelerator when there is one, else CPU, gloo for several processes) | cpu
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    attention: str = "sdpa"  # sdpa | xformers | eager
    # checkpoints, validation, logging
    checkpointing_steps: int = 500  # 0 = only at the end
    checkpoints_total_limit: Optional[int] = None  # keep the newest K checkpoints
    resume_from_checkpoint: Optional[str] = None  # "latest" or a checkpoint folder
    validation_prompts: List[str] = field(default_factory=list)
    validation_steps: int = 500
    validation_inference_steps: int = 25
    validation_guidance_scale: float = 7.5
    report_to: str = "tensorboard"  # tensorboard | wandb | none
    seed: int = 0
    # publishing
    push_to_hub: bool = False
    hub_model_id: Optional[str] = None
    hub_private: bool = True

    @property
    def anchored(self) -> bool:
        """Whether the objective compares with the starting model (dpo; an online one with kl_weight > 0)."""
        return self.objective == "dpo" or (self.objective in ONLINE_OBJECTIVES and self.online.kl_weight > 0)

    def validate(self) -> None:
        from ..models import ATTENTION_BACKENDS

        for key in ("resolution", "train_batch_size", "gradient_accumulation_steps", "num_epochs", "validation_inference_steps"):
            require(getattr(self, key) > 0, key, f"must be positive, got {getattr(self, key)}")
        for key in ("lr_warmup_steps", "dataloader_num_workers", "checkpointing_steps", "validation_steps", "noise_offset", "max_grad_norm", "weight_decay", "unet_lr", "text_encoder_lr"):
            require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        require(self.resolution % 8 == 0, "resolution", f"must be a multiple of 8, got {self.resolution}")
        require(self.max_train_steps is None or self.max_train_steps > 0, "max_train_steps", f"must be positive, got {self.max_train_steps}")
        require(self.train_unet or self.train_text_encoder, "train_unet", "train_unet and train_text_encoder are both false: nothing to train")
        require(self.lora.rank == 0 or self.train_unet, "lora.rank", "LoRA adapts the UNet; it needs train_unet=true")
        require(self.lr_scheduler in LR_SCHEDULERS, "lr_scheduler", f"must be one of {LR_SCHEDULERS}, got '{self.lr_scheduler}'")
        require(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {OPTIMIZERS}, got '{self.optimizer}'")
        require(self.mixed_precision in MIXED_PRECISION, "mixed_precision", f"must be one of {MIXED_PRECISION}, got '{self.mixed_precision}'")
        require(self.attention in ATTENTION_BACKENDS, "attention", f"must be one of {ATTENTION_BACKENDS}, got '{self.attention}'")
        require(self.prediction_type is None or self.prediction_type in PREDICTION_TYPES, "prediction_type", f"must be one of {PREDICTION_TYPES}, got '{self.prediction_type}'")
        require(self.device in ("auto", "cpu"), "device", f"must be auto or cpu, got '{self.device}' (accelerate picks the GPU of each process)")
        require(self.report_to in REPORT_TO, "report_to", f"must be one of {REPORT_TO}, got '{self.report_to}'")
        require(self.objective in OBJECTIVES, "objective", f"must be one of {OBJECTIVES}, got '{self.objective}'")
        require(self.dpo_beta > 0, "dpo_beta", f"must be positive, got {self.dpo_beta}")
        require(self.dpo_sft_weight >= 0, "dpo_sft_weight", f"must be >= 0 (0 turns the regularisation term off), got {self.dpo_sft_weight}")
        require(self.dpo_positive_weight >= 0, "dpo_positive_weight", f"must be >= 0 (0 is plain Diffusion-DPO), got {self.dpo_positive_weight}")
        require(self.dpo_anchor_weight >= 0, "dpo_anchor_weight", f"must be >= 0 (0 turns the anchor off), got {self.dpo_anchor_weight}")
        require(not self.dpo_gap_weighting or self.objective == "dpo", "dpo_gap_weighting", f"weights dpo's pairs; objective={self.objective} has none (set objective=dpo or dpo_gap_weighting=false)")
        require(not self.alternate_roles or self.objective == "dpo", "alternate_roles", f"swaps the roles of dpo's pairs; objective={self.objective} has none (set objective=dpo or alternate_roles=false)")
        require(self.objective != "dpo" or self.snr_gamma is None, "snr_gamma", "weights the sft loss; objective=dpo does not use it (set snr_gamma=null)")
        require(self.snr_gamma is None or self.snr_gamma > 0, "snr_gamma", f"must be positive, got {self.snr_gamma}")
        require(0.0 < self.ema_decay < 1.0, "ema_decay", f"must be in (0, 1), got {self.ema_decay}")
        require(0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0, "adam_beta1", f"betas must be in [0, 1), got {self.adam_beta1}, {self.adam_beta2}")
        require(self.adam_epsilon > 0, "adam_epsilon", f"must be positive, got {self.adam_epsilon}")
        require(self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1, "checkpoints_total_limit", f"must be >= 1, got {self.checkpoints_total_limit}")
        # A cached latent is of one crop of the image; random crops would need a new encode each step.
        require(not (self.cache_latents and not self.center_crop), "cache_latents", "cache_latents=true needs center_crop=true (random crops change the latents every step); set cache_latents=false for random crops")
        require(not self.push_to_hub or bool(self.hub_model_id), "hub_model_id", "push_to_hub=true needs hub_model_id (e.g. 'me/sd21-social-reward')")
        if self.hub_model_id:
            from ..hub import repo_id_problem

            problem = repo_id_problem(self.hub_model_id)
            require(problem is None, "hub_model_id", f"'{self.hub_model_id}' is not a hub repo id: {problem}")
        require(bool(self.negative_token.strip()), "negative_token", "must not be empty")
        if self.objective in ONLINE_OBJECTIVES:
            self.validate_online()
        require(0.0 <= self.empty_prompt_share < 1.0, "empty_prompt_share", f"must be in [0, 1), got {self.empty_prompt_share}")

    def validate_online(self) -> None:
        """What an online objective needs and refuses (it samples its own images from prompts)."""
        objective = f"objective={self.objective}"
        require(self.train_unet, "train_unet", f"{objective} trains the UNet that samples; set train_unet=true")
        require(self.max_train_steps is not None, "max_train_steps", f"{objective} has no epochs over a fine-tune set; set max_train_steps (one step = one sampled batch)")
        require(not self.dataset, "dataset", f"{objective} samples its own images from online.prompts; remove dataset (it trains on no fine-tune set)")
        require(self.gradient_accumulation_steps == 1, "gradient_accumulation_steps", f"{objective} makes one update per sampled batch; set it to 1 and grow online.prompts_per_step instead")
        require(self.snr_gamma is None, "snr_gamma", f"weights the sft loss; {objective} does not use it (set snr_gamma=null)")
        require(self.objective != "pg" or self.online.eta > 0, "online.eta", "objective=pg needs eta > 0: a deterministic DDIM step (eta=0) has no log-probability")
        require(self.objective != "pg" or self.online.group_size >= 2, "online.group_size", "objective=pg normalises rewards within each prompt's group; it needs group_size >= 2")

    def check_inputs(self) -> None:
        """The inputs a run needs, checked before any model loads (a config section may be filled in
        by another stage, so these are not part of ``validate``)."""
        from ..errors import ConfigError

        if self.objective in ONLINE_OBJECTIVES:
            for key, what in (("prompts", "a prompt file or a named set, e.g. ddpo-animals"), ("reward", "a reward metric, e.g. aesthetic")):
                if not getattr(self.online, key):
                    raise ConfigError(f"config error: finetune.online.{key} is required for objective={self.objective} ({what})")
        elif not self.dataset:
            raise ConfigError("config error: finetune.dataset is required (a folder written by datasets.save_to_disk, e.g. from build-pairs)")
