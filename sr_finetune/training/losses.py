"""The training losses: the denoising loss (targets per prediction type, min-SNR weighting after
Hang et al., 2023) and the Diffusion-DPO loss (Wallace et al., 2023)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_t^2 / sigma_t^2 of each timestep, as float32 on the timesteps' device."""
    alphas_cumprod = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)
    alpha_bar = alphas_cumprod[timesteps]
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(snr_values: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-gamma.

    epsilon: min(SNR, gamma) / SNR. v_prediction: min(SNR, gamma) / (SNR + 1), because the
    v-loss already carries a factor (SNR + 1) relative to the x0-loss, where epsilon's carries SNR.
    """
    clipped = torch.clamp(snr_values, max=gamma)
    if prediction_type == "epsilon":
        weights = clipped / snr_values
        return torch.where(snr_values == 0, torch.ones_like(weights), weights)  # zero-terminal-SNR schedules
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1.0)
    raise ValueError(f"unsupported prediction type '{prediction_type}'")


def training_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity (v_prediction)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type '{prediction_type}'")


def per_sample_mse(model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error in float32, averaged over every dimension but the first: one value per sample."""
    return F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, model_pred.ndim)))


def denoising_loss(model_pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error in float32, averaged per sample, optionally weighted per sample, then over the batch."""
    per_sample = per_sample_mse(model_pred, target)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


@dataclass
class DpoTerms:
    """The Diffusion-DPO loss of a batch of pairs and what to monitor beside it."""

    loss: torch.Tensor  # mean over pairs of -log sigmoid(inside)
    reward_accuracy: torch.Tensor  # share of pairs with inside > 0
    reward_margin: torch.Tensor  # mean over pairs of inside
    displacement: torch.Tensor  # per pair: ((e(model, x_w) - e(ref, x_w)) + (e(model, x_l) - e(ref, x_l))) / 2


def diffusion_dpo_loss(model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor, beta: float, positive_weight: float = 0.0, pair_weights: torch.Tensor | None = None) -> DpoTerms:
    """Diffusion-DPO (Wallace et al. 2023, Eq. 14 with one timestep per pair) on ``[chosen; rejected]`` batches.

    The first half of each tensor holds the chosen images x_w, the second half the rejected x_l of
    the same pairs, noised with the same noise and timestep t. With per-sample errors
    e(pred, x) = mean over latent dims of ||target - pred||^2 (target: eps, or v for v-prediction)::

        model_diff = e(model, x_w) - e(model, x_l)
        ref_diff   = e(ref, x_w)   - e(ref, x_l)
        inside     = -beta / 2 * (model_diff - ref_diff)
        loss       = mean over pairs of -log sigmoid(inside)

    Eq. 14's constant T * omega(lambda_t) is folded into beta, and the factor 1/2 is that of the
    authors' train.py (``inside_term = -0.5 * beta_dpo * (model_diff - ref_diff)``), which their beta
    of 5000 goes with. The loss is the mean of the per-pair losses, not -log sigmoid of the mean.

    ``inside`` is the implicit reward margin of a pair, r(x_w) - r(x_l) of the model relative to the
    reference: positive when the model, relative to the reference, denoises the chosen image better
    than the rejected one. ``reward_accuracy`` is the share of pairs with inside > 0 (0 while the
    model equals the reference, where the loss is log 2); ``reward_margin`` is the mean of inside.
    ``displacement`` is what the loss leaves free: the pair's mean error relative to the reference,
    which rises when the model widens the margin by fitting both images worse.

    ``positive_weight`` (lambda > 0) is DPO-Positive (Pal et al. 2024, "Smaug", Eq. 3) in these terms::

        inside = -beta / 2 * ((model_diff - ref_diff) + lambda * max(0, e(model, x_w) - e(ref, x_w)))

    so a pair gains nothing from fitting its chosen image worse than the reference does: the
    margin has to come from the rejected image, not from fitting both worse. The monitors
    (``reward_accuracy``, ``reward_margin``) stay those of the plain margin.

    ``pair_weights`` (one per pair) multiply the per-pair losses before their mean.
    """
    model_w, model_l = per_sample_mse(model_pred, target).chunk(2)
    ref_w, ref_l = per_sample_mse(ref_pred, target).detach().chunk(2)
    inside = -0.5 * beta * ((model_w - model_l) - (ref_w - ref_l))
    penalised = inside - 0.5 * beta * positive_weight * F.relu(model_w - ref_w) if positive_weight else inside
    per_pair = -F.logsigmoid(penalised)
    return DpoTerms(
        loss=(per_pair if pair_weights is None else per_pair * pair_weights.to(per_pair.dtype)).mean(),
        reward_accuracy=(inside > 0).float().mean().detach(),
        reward_margin=inside.mean().detach(),
        displacement=(0.5 * ((model_w - ref_w) + (model_l - ref_l))).detach(),
    )
