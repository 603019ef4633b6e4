"""The denoising loss: targets per prediction type and min-SNR weighting (Hang et al., 2023)."""

from __future__ import annotations

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


def denoising_loss(model_pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error in float32, averaged per sample, optionally weighted per sample, then over the batch."""
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, model_pred.ndim)))
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()
