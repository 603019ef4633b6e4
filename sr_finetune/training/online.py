"""Online reward objectives: each step the model being trained samples images for a few prompts,
a reward scores them, and the model is updated toward higher reward.

``backprop`` (AlignProp, Prabhudesai et al. 2023; DRaFT-K, Clark et al. 2024): DDIM sampling with
classifier-free guidance keeps autograd through the last ``grad_steps`` = K denoising steps only
(DRaFT-1: K = 1; K = num_steps: full backpropagation), the frozen VAE decodes, a differentiable
reward scores the [0, 1] image, and the loss is minus the mean reward. The anchor
(``kl_weight`` > 0) is the mean squared difference between the trained and the starting UNet's
conditional noise prediction at the sampled latents of the kept steps (no gradient through
those latents): it holds the UNet near its start where the reward pulls.

``pg`` (DDPO, Black et al. 2024, with GRPO-style advantages): ``prompts_per_step`` prompts x
``group_size`` images are sampled without gradients by stochastic DDIM (eta > 0), storing each
step's log-probability; any reward scores the images as 8-bit RGB (as they would be saved);
advantages are (reward - group mean) / (group std + 1e-6) within each prompt's group
(population std); then ``inner_epochs`` updates, each accumulating over the denoising steps (all,
or a seeded ``timestep_fraction`` of them) the PPO clipped surrogate
``max(-A * r, -A * clip(r, 1 - c, 1 + c))`` with r = exp(log p_now - log p_sampled). On the first
inner epoch the weights are those that sampled, so r is exactly 1. The KL term (``kl_weight`` > 0)
is the exact KL divergence between the trained and the starting model's Gaussian DDIM step at
each trained transition, ``||mean - mean_ref||^2 / (2 sigma_t^2)`` (summed over latent dims).

Every random draw (the prompts, the starting noise, the DDIM noise, the timestep subsets) is
seeded from ``(seed, process, step)``, so a resumed run samples exactly what an uninterrupted run
would have sampled.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import ConfigError
from ..eval_only import refuse_eval_only
from ..models import vae_scale_factor
from .config import FinetuneConfig
from .data import derive_seed, tokenize
from .online_sampling import DDIMTrajectory, ddim_step_mean_std, gaussian_log_prob, guided_unet_output, sample_ddim
from .reference import Reference

ADVANTAGE_EPS = 1e-6

# update(loss, prompt_ids) -> the loss averaged over processes; clips, steps the optimizer, LR schedule and EMA
Update = Callable[[torch.Tensor, list], float]
# (name, weights, device, **options) -> a reward model (reward.load_training_reward from the command layer)
RewardLoader = Callable[..., Any]


class OnlineReward:
    """What an online objective maximises: ``online.reward``'s score plus, for each of
    ``online.added_rewards``, its scale x its score. Each call returns the total [B] and each
    term's mean over the batch (for the logs)."""

    def __init__(self, terms: list[tuple[str, float, Any]]) -> None:
        self.terms = terms  # (metric name, scale, reward model); the first is online.reward at scale 1

    @property
    def is_differentiable(self) -> bool:
        return all(getattr(model, "is_differentiable", False) for _, _, model in self.terms)

    def score_tensor(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Differentiable with respect to ``images`` ([B, 3, H, W] in [0, 1])."""
        return self._total([model.score_tensor(images, prompts).float() for _, _, model in self.terms])

    def score_as_saved(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Through each reward's own scoring path, on the images rounded to 8-bit RGB as they would be saved."""
        from PIL import Image

        arrays = (images.detach() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        pils = [Image.fromarray(a) for a in arrays]
        return self._total([model.score_images(pils, prompts).float().to(images.device) for _, _, model in self.terms])

    def _total(self, scores: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total = scores[0]
        for (_, scale, _), score in zip(self.terms[1:], scores[1:]):
            total = total + scale * score
        means = {f"reward_{name}": score.detach().mean() for (name, _, _), score in zip(self.terms, scores)} if len(self.terms) > 1 else {}
        return total, means


def load_online_reward(cfg: FinetuneConfig, loader: RewardLoader | None, device: torch.device) -> OnlineReward:
    """The reward of ``cfg.online`` (with its added terms), each term loaded by ``loader``;
    evaluation-only metrics are refused, and ``backprop`` refuses a term without a differentiable scoring path."""
    o = cfg.online
    specs = [("finetune.online.reward", o.reward, 1.0, o.reward_weights, o.reward_options)]
    specs += [(f"finetune.online.added_rewards.{name}", name, added.scale, added.weights, added.options) for name, added in o.added_rewards.items()]
    for where, name, *_ in specs:
        refuse_eval_only(name, where, error=ConfigError)
    if loader is None:
        raise ConfigError(
            f"objective={cfg.objective} needs a reward loader: launch recipes/finetune.py or `sr-finetune finetune` "
            "(python -m sr_finetune.training runs sft and dpo only)"
        )
    terms = []
    for where, name, scale, weights, options in specs:
        model = loader(name, weights=weights, device=device, **options)
        refuse_eval_only(name, where, error=ConfigError)  # a loader may register the metric only when it loads
        if cfg.objective == "backprop" and not getattr(model, "is_differentiable", False):
            raise ConfigError(
                f"config error: {where}: '{name}' has no differentiable scoring path, which objective=backprop needs "
                "(pick clip, aesthetic, social_reward, pickscore, hpsv2 or imagereward, or use objective=pg, which takes any reward)"
            )
        terms.append((name, scale, model))
    return OnlineReward(terms)


def step_prompt_indices(num_prompts: int, count: int, seed: int, process: int, step: int) -> list[int]:
    """``count`` prompt indices drawn with replacement, seeded per (process, step)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "online-prompts", process, step))
    return torch.randint(num_prompts, (count,), generator=generator).tolist()


def train_step_indices(num_steps: int, fraction: float, seed: int, process: int, step: int, epoch: int) -> list[int]:
    """The denoising steps trained on in one inner epoch: all, or a seeded subset of ``fraction`` of them."""
    if fraction >= 1.0:
        return list(range(num_steps))
    count = max(1, round(fraction * num_steps))
    generator = torch.Generator().manual_seed(derive_seed(seed, "online-timesteps", process, step, epoch))
    return sorted(torch.randperm(num_steps, generator=generator)[:count].tolist())


def decode_images(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> RGB images [B, 3, H, W] in [0, 1], float32, differentiable through the (frozen) VAE."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    images = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(reward - group mean) / (group std + eps) within consecutive groups of ``group_size``."""
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    return (centred / (groups.std(dim=1, unbiased=False, keepdim=True) + ADVANTAGE_EPS)).flatten()


def group_std(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """The mean over groups of the reward's (population) std within each prompt's group."""
    return rewards.detach().float().view(-1, group_size).std(dim=1, unbiased=False).mean()


def clipped_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, averaged over the batch, and the (detached) importance ratios."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ratio.detach()


def reference_guided_output(reference: Reference, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """The starting model's guided output (no gradient), through ``guided_unet_output`` as the trained one's."""

    def reference_unet(latents: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        return (reference.prediction(latents, t, encoder_hidden_states).float(),)

    return guided_unet_output(reference_unet, latents, t, cond, uncond, guidance_scale)


@dataclass
class OnlineRun:
    """What an online step needs: the models (the trained ones as accelerate prepared them), the
    DDIM scheduler, the reward, the prompts, the starting model (when ``kl_weight`` > 0) and the
    trainer's ``update``."""

    cfg: FinetuneConfig
    accelerator: Any
    unet: Any
    text_encoder: Any
    vae: Any
    tokenizer: Any
    scheduler: Any
    reward: OnlineReward
    prompts: list[str]
    update: Update
    reference: Reference | None = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def step_prompts(self, step: int) -> tuple[list[int], list[str]]:
        """This process's prompts of ``step``: each of ``prompts_per_step`` drawn ones ``group_size`` times in a row."""
        o = self.cfg.online
        picked = step_prompt_indices(len(self.prompts), o.prompts_per_step, self.cfg.seed, self.accelerator.process_index, step)
        rows = [i for i in picked for _ in range(o.group_size)]
        return rows, [self.prompts[i] for i in rows]

    def embeddings(self, prompts: list[str], grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Text embeddings of the prompts and of the empty prompt [1, L, D] (classifier-free guidance)."""
        ids = tokenize(self.tokenizer, [*prompts, ""]).to(self.device)
        with torch.set_grad_enabled(grad):
            states = self.text_encoder(ids)[0]
        return states[:-1], states[-1:]

    def reference_embeddings(self, prompts: list[str], cond: torch.Tensor, uncond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The starting text encoder's embeddings when the text encoder is trained, else the trained ones, detached."""
        if self.reference.text_encoder is None:
            return cond.detach(), uncond.detach()
        states = self.reference.text_states(tokenize(self.tokenizer, [*prompts, ""]).to(self.device))
        return states[:-1], states[-1:]

    def sample(self, prompts: list[str], step: int, cond: torch.Tensor, uncond: torch.Tensor, grad_steps: int) -> DDIMTrajectory:
        """DDIM samples for the prompts from seeded starting noise, gradients through the last ``grad_steps`` steps."""
        o = self.cfg.online
        generator = torch.Generator(self.device).manual_seed(derive_seed(self.cfg.seed, "online-sample", self.accelerator.process_index, step))
        vae_scale = vae_scale_factor(self.vae)
        unet_config = self.accelerator.unwrap_model(self.unet).config
        size = self.cfg.resolution // vae_scale
        latents = torch.randn((len(prompts), unet_config.in_channels, size, size), generator=generator, device=self.device) * self.scheduler.init_noise_sigma
        return sample_ddim(
            self.unet, self.scheduler, latents, cond, uncond, num_steps=o.num_steps, guidance_scale=o.guidance_scale, eta=o.eta,
            generator=generator, grad_steps=grad_steps, checkpoint=self.cfg.gradient_checkpointing and grad_steps > 0,
        )

    def no_sync(self, active: bool) -> ExitStack:
        """Skip DDP's gradient all-reduce of the trained models for a backward that is not the last before an update."""
        stack = ExitStack()
        if active:
            for model in (self.unet, self.text_encoder if self.cfg.train_text_encoder else None):
                if model is not None:
                    stack.enter_context(self.accelerator.no_sync(model))
        return stack


def backprop_step(run: OnlineRun, step: int) -> tuple[float, dict[str, torch.Tensor]]:
    """One reward-backpropagation update (DRaFT-K); returns the loss and the step's monitors."""
    o = run.cfg.online
    rows, prompts = run.step_prompts(step)
    cond, uncond = run.embeddings(prompts, grad=run.cfg.train_text_encoder)
    trajectory = run.sample(prompts, step, cond, uncond, grad_steps=o.grad_steps)
    rewards, term_means = run.reward.score_tensor(decode_images(run.vae, trajectory.final), prompts)
    loss = -rewards.mean()
    metrics = {"reward_mean": rewards.detach().mean(), "reward_group_std": group_std(rewards, o.group_size), **term_means}
    if o.kl_weight:
        anchor = backprop_anchor(run, trajectory, prompts, cond, uncond)
        loss = loss + o.kl_weight * anchor
        metrics["anchor"] = anchor.detach()
    run.accelerator.backward(loss)
    return run.update(loss.detach(), rows), metrics


def backprop_anchor(run: OnlineRun, trajectory: DDIMTrajectory, prompts: list[str], cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """Mean over the kept steps of the mean squared difference between the trained and the starting
    UNet's conditional prediction at the sampled latents."""
    ref_cond, _ = run.reference_embeddings(prompts, cond, uncond)
    kept = range(len(trajectory.timesteps) - run.cfg.online.grad_steps, len(trajectory.timesteps))
    terms = []
    for i in kept:
        x, t = trajectory.latents[i].detach(), trajectory.timesteps[i]
        prediction = run.unet(x, t, encoder_hidden_states=cond, return_dict=False)[0].float()
        terms.append((prediction - run.reference.prediction(x, t, ref_cond).float()).pow(2).mean())
    return torch.stack(terms).mean()


def policy_gradient_step(run: OnlineRun, step: int) -> tuple[float, dict[str, torch.Tensor]]:
    """Sample a group of images per prompt, score them, then ``inner_epochs`` PPO updates on the
    stored transitions; returns the last update's loss and the step's monitors."""
    cfg, o = run.cfg, run.cfg.online
    rows, prompts = run.step_prompts(step)
    with torch.no_grad():
        cond, uncond = run.embeddings(prompts, grad=False)
        trajectory = run.sample(prompts, step, cond, uncond, grad_steps=0)
        images = decode_images(run.vae, trajectory.final)
    rewards, term_means = run.reward.score_as_saved(images, prompts)
    advantages = group_advantages(rewards, o.group_size)
    transitions = list(trajectory.transitions())
    if o.kl_weight:  # the starting model's embeddings do not change over the inner epochs
        ref_cond, ref_uncond = run.reference_embeddings(prompts, cond, uncond)
    clipped, kls, value = [], [], float("nan")
    for epoch in range(o.inner_epochs):
        indices = train_step_indices(o.num_steps, o.timestep_fraction, cfg.seed, run.accelerator.process_index, step, epoch)
        total = torch.zeros((), device=run.device)
        for n, i in enumerate(indices):
            x, next_x, t, prev_t, old_log_prob = transitions[i]
            with run.no_sync(active=n < len(indices) - 1):
                step_cond, step_uncond = run.embeddings(prompts, grad=True) if cfg.train_text_encoder else (cond, uncond)
                output = guided_unet_output(run.unet, x, t, step_cond, step_uncond, o.guidance_scale)
                mean, std = ddim_step_mean_std(run.scheduler, output, t, prev_t, x, o.eta)
                loss, ratio = clipped_policy_loss(gaussian_log_prob(next_x, mean, std), old_log_prob, advantages, o.clip_range)
                if o.kl_weight:
                    ref_mean, _ = ddim_step_mean_std(run.scheduler, reference_guided_output(run.reference, x, t, ref_cond, ref_uncond, o.guidance_scale), t, prev_t, x, o.eta)
                    kl = ((mean - ref_mean) ** 2).flatten(1).sum(dim=1).mean() / (2 * std**2)
                    loss = loss + o.kl_weight * kl
                    kls.append(kl.detach())
                loss = loss / len(indices)
                run.accelerator.backward(loss)
            total = total + loss.detach()
            clipped.append(((ratio - 1.0).abs() > o.clip_range).float().mean())
        value = run.update(total, rows)
    metrics = {
        "reward_mean": rewards.mean(), "reward_group_std": group_std(rewards, o.group_size), "clip_fraction": torch.stack(clipped).mean(), **term_means,
    }
    if kls:
        metrics["kl"] = torch.stack(kls).mean()
    return value, metrics


OBJECTIVE_STEPS: dict[str, Callable[[OnlineRun, int], tuple[float, dict[str, torch.Tensor]]]] = {"backprop": backprop_step, "pg": policy_gradient_step}


def images_per_step(cfg: FinetuneConfig, num_processes: int) -> int:
    """Images sampled by all processes in one step."""
    return cfg.online.prompts_per_step * cfg.online.group_size * num_processes


__all__ = [
    "OBJECTIVE_STEPS", "OnlineRun", "backprop_step", "clipped_policy_loss", "decode_images", "group_advantages", "images_per_step",
    "OnlineReward", "load_online_reward", "policy_gradient_step", "step_prompt_indices", "train_step_indices",
]
