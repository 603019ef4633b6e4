"""The reference model of Diffusion-DPO: the starting model, frozen, in eval mode, never given gradients.

A full fine-tune keeps a frozen copy of the starting UNet (and of the starting text encoder when
that is trained too); with LoRA the reference is the trained UNet itself with its adapters switched
off for the reference's forward, so no copy is made. A module that is not trained is its own reference.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch


def frozen_copy(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``module`` as it is now: no gradients, eval mode, on ``device`` in ``dtype``."""
    frozen = copy.deepcopy(module).requires_grad_(False).eval()
    return frozen.to(device=device, dtype=dtype)


@contextmanager
def adapters_disabled(unet):
    """The UNet without its LoRA adapters, in eval mode, for the duration of the block."""
    was_training = unet.training
    unet.eval()
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()  # also makes the adapter weights trainable again
        unet.train(was_training)


class Reference:
    """Predictions and text embeddings of the starting model.

    ``unet``: a frozen copy, the frozen UNet itself, or (``lora=True``) the unwrapped trained UNet,
    run with adapters off. ``text_encoder``: a frozen copy of the starting text encoder when the
    text encoder is trained, else None (the trained model's own embeddings are the reference's).
    """

    def __init__(self, unet, text_encoder=None, lora: bool = False):
        self.unet = unet
        self.text_encoder = text_encoder
        self.lora = lora

    @torch.no_grad()
    def prediction(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = self.unet.dtype
        if self.lora:
            with adapters_disabled(self.unet) as unet:
                return unet(noisy_latents.to(dtype), timesteps, encoder_hidden_states.to(dtype)).sample
        return self.unet(noisy_latents.to(dtype), timesteps, encoder_hidden_states.to(dtype)).sample

    @torch.no_grad()
    def text_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids)[0]
