"""DDIM sampling that keeps what online reward objectives need.

Online objectives sample from the model while it trains. Policy-gradient methods (DDPO-style
PPO) need each step's transition and its Gaussian log-density, re-evaluated later under newer
weights; direct reward backpropagation (DRaFT-K) needs autograd through the last K steps only.
:func:`sample_ddim` does both on diffusers' ``UNet2DConditionModel`` and ``DDIMScheduler``
(``epsilon``, ``v_prediction`` and ``sample`` prediction types), step by step the same as
``DDIMScheduler.step``:

    x_{t-1} = sqrt(a_prev) * x0_pred + sqrt(1 - a_prev - sigma_t^2) * eps_pred + sigma_t * z,
    sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev),

so a step is a Gaussian with that mean and standard deviation sigma_t. With ``eta=0`` the step
is deterministic (sigma_t = 0) and has no density: the sampler then records zeros as log-probs
and :func:`ddim_step_log_prob` refuses (a policy ratio needs ``eta > 0``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.utils.checkpoint import checkpoint as activation_checkpoint

LOG_SQRT_2PI = 0.5 * float(torch.log(torch.tensor(2 * torch.pi)))


def guided_unet_output(unet: Any, latents: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor, uncond: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
    """The UNet's output with classifier-free guidance, ``uncond + g * (cond - uncond)``, both
    halves in one batched call as diffusers' pipelines do. ``uncond`` None or ``g == 1``: the
    conditional output alone (one call). ``uncond`` of batch 1 is broadcast to the batch."""
    if uncond is None or guidance_scale == 1.0:
        return unet(latents, t, encoder_hidden_states=cond, return_dict=False)[0]
    if uncond.shape[0] == 1 and cond.shape[0] != 1:
        uncond = uncond.expand(cond.shape[0], *uncond.shape[1:])
    both = unet(torch.cat([latents, latents]), t, encoder_hidden_states=torch.cat([uncond, cond]), return_dict=False)[0]
    out_uncond, out_cond = both.chunk(2)
    return out_uncond + guidance_scale * (out_cond - out_uncond)


def previous_timestep(scheduler: Any, t: torch.Tensor | int) -> int:
    """The timestep ``DDIMScheduler.step`` goes to from ``t``: ``t - T // num_inference_steps``
    (negative past the end, where it uses ``final_alpha_cumprod``)."""
    return int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def _alpha_prod(scheduler: Any, t: int, like: torch.Tensor) -> torch.Tensor:
    value = scheduler.alphas_cumprod[t] if t >= 0 else scheduler.final_alpha_cumprod
    return torch.as_tensor(value).to(like.device)


def ddim_step_mean_std(scheduler: Any, model_output: torch.Tensor, t: torch.Tensor | int, prev_t: torch.Tensor | int, latents: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation (a 0-d tensor) of the DDIM step ``t -> prev_t``; the mean is
    ``DDIMScheduler.step``'s ``prev_sample`` before its noise is added (same formula, same order
    of operations, clipping of x0 included; ``use_clipped_model_output`` and thresholding are not
    supported)."""
    config = scheduler.config
    if getattr(config, "thresholding", False):
        raise ValueError("ddim_step_mean_std: schedulers with thresholding=True are not supported")
    t, prev_t = int(t), int(prev_t)
    alpha_prod_t = _alpha_prod(scheduler, t, latents)
    alpha_prod_prev = _alpha_prod(scheduler, prev_t, latents)
    beta_prod_t = 1 - alpha_prod_t
    if config.prediction_type == "epsilon":
        pred_x0 = (latents - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
        pred_eps = model_output
    elif config.prediction_type == "v_prediction":
        pred_x0 = (alpha_prod_t**0.5) * latents - (beta_prod_t**0.5) * model_output
        pred_eps = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * latents
    elif config.prediction_type == "sample":
        pred_x0 = model_output
        pred_eps = (latents - alpha_prod_t ** (0.5) * pred_x0) / beta_prod_t ** (0.5)
    else:
        raise ValueError(f"ddim_step_mean_std: unknown prediction_type {config.prediction_type!r}")
    if config.clip_sample:
        pred_x0 = pred_x0.clamp(-config.clip_sample_range, config.clip_sample_range)
    variance = ((1 - alpha_prod_prev) / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_prev)
    std = eta * variance ** (0.5)
    direction = (1 - alpha_prod_prev - std**2) ** (0.5) * pred_eps
    mean = alpha_prod_prev ** (0.5) * pred_x0 + direction
    return mean, std


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """Log-density [B] of ``x`` under N(mean, std^2), summed over every dimension but the batch.
    ``std`` must be positive (a deterministic step has no density)."""
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    if bool((std <= 0).any()):
        raise ValueError("gaussian_log_prob: std must be > 0 (an eta=0 DDIM step is deterministic and has no density)")
    log_density = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return log_density.flatten(1).sum(dim=1)


def ddim_step_log_prob(
    unet: Any, scheduler: Any, latents: torch.Tensor, next_latents: torch.Tensor, t: torch.Tensor | int, prev_t: torch.Tensor | int,
    cond: torch.Tensor, uncond: torch.Tensor | None, guidance_scale: float, eta: float,
) -> torch.Tensor:
    """Log-probability [B] of a stored transition ``latents -> next_latents`` under the UNet's
    current weights (differentiable in them): the numerator of a PPO ratio. Needs ``eta > 0``."""
    if eta <= 0:
        raise ValueError("ddim_step_log_prob: eta must be > 0 (with eta=0 a DDIM step is deterministic and has no log-probability)")
    output = guided_unet_output(unet, latents, t, cond, uncond, guidance_scale)
    mean, std = ddim_step_mean_std(scheduler, output, t, prev_t, latents, eta)
    return gaussian_log_prob(next_latents, mean, std)


@dataclass
class DDIMTrajectory:
    """One sampling run: ``latents[0]`` is the starting noise, ``latents[i + 1]`` the result of
    step i (from ``timesteps[i]`` to ``prev_timesteps[i]``); ``log_probs[:, i]`` its log-density
    (detached; zeros when ``eta == 0``). Latents of the steps run with gradients keep their graph."""

    latents: list[torch.Tensor]
    timesteps: torch.Tensor
    prev_timesteps: torch.Tensor
    log_probs: torch.Tensor
    eta: float

    @property
    def final(self) -> torch.Tensor:
        """The sampled latents x_0 (with their graph when the last steps kept gradients)."""
        return self.latents[-1]

    def transitions(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(latents, next_latents, t, prev_t, log_prob)`` per step, detached, for re-evaluation."""
        for i in range(len(self.timesteps)):
            yield self.latents[i].detach(), self.latents[i + 1].detach(), self.timesteps[i], self.prev_timesteps[i], self.log_probs[:, i]


def sample_ddim(
    unet: Any, scheduler: Any, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None = None, *,
    num_steps: int, guidance_scale: float, eta: float, generator: torch.Generator | None = None, grad_steps: int = 0, checkpoint: bool = False,
) -> DDIMTrajectory:
    """DDIM sampling from ``latents`` (the starting noise, already scaled: DDIM's
    ``init_noise_sigma`` is 1) in ``num_steps`` steps, keeping every step's latents and
    log-density. Noise is drawn as ``DDIMScheduler.step`` draws it (diffusers' ``randn_tensor``
    with ``generator``), so equal seeds give equal trajectories.

    ``grad_steps=K`` keeps autograd through the last K steps only (DRaFT-K): the earlier ones run
    under ``torch.no_grad``, so no gradient reaches them or the starting latents unless
    K == num_steps. ``checkpoint=True`` recomputes the UNet calls of those K steps in the
    backward pass instead of storing their activations. Calls ``scheduler.set_timesteps``."""
    from diffusers.utils.torch_utils import randn_tensor

    if not 0 <= grad_steps <= num_steps:
        raise ValueError(f"sample_ddim: grad_steps must be in [0, num_steps={num_steps}], got {grad_steps}")
    if eta < 0:
        raise ValueError(f"sample_ddim: eta must be >= 0, got {eta}")
    scheduler.set_timesteps(num_steps, device=latents.device)
    timesteps = scheduler.timesteps
    prev_timesteps = torch.tensor([previous_timestep(scheduler, t) for t in timesteps], device=timesteps.device)
    states, log_probs = [latents], []
    grad_allowed = torch.is_grad_enabled()
    for i, t in enumerate(timesteps):
        keep_grad = grad_allowed and i >= num_steps - grad_steps
        with torch.set_grad_enabled(keep_grad):
            x = states[-1]
            if keep_grad and checkpoint:
                output = activation_checkpoint(guided_unet_output, unet, x, t, cond, uncond, guidance_scale, use_reentrant=False)
            else:
                output = guided_unet_output(unet, x, t, cond, uncond, guidance_scale)
            mean, std = ddim_step_mean_std(scheduler, output, t, prev_timesteps[i], x, eta)
            if eta > 0:
                noise = randn_tensor(output.shape, generator=generator, device=output.device, dtype=output.dtype)
                next_x = mean + std * noise
                log_probs.append(gaussian_log_prob(next_x.detach(), mean.detach(), std.detach()))
            else:
                next_x = mean
                log_probs.append(torch.zeros(x.shape[0], device=x.device, dtype=torch.float32))
        states.append(next_x)
    return DDIMTrajectory(states, timesteps, prev_timesteps, torch.stack(log_probs, dim=1), float(eta))


__all__ = ["DDIMTrajectory", "ddim_step_log_prob", "ddim_step_mean_std", "gaussian_log_prob", "guided_unet_output", "previous_timestep", "sample_ddim"]
