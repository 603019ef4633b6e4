"""DDIM sampling for online objectives, on the tiny SD-2.1-shaped UNet and its DDIM scheduler.

Measured (fp32, CPU, torch 2.14, diffusers 0.42; epsilon and v_prediction): every comparison
below came out bit-identical: the step mean/std against ``DDIMScheduler.step`` (eta 0, 0.5, 1),
the stored log-probs (|value| up to 2.6e3, summed over 4x16x16 latents) against
``torch.distributions.Normal``, their re-evaluation under unchanged weights (ratio exactly 1),
eta=0 and eta=1 trajectories against diffusers' own ``scheduler.step`` loop, and checkpointed
against plain DRaFT-K gradients. The asserted tolerances leave room for other kernels and
devices: 1e-5 relative (2e-3 absolute on log-probs), ratios within 1e-5 of 1.
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_tiny_reward
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from sr_finetune.training.online_sampling import (
    ddim_step_log_prob,
    ddim_step_mean_std,
    gaussian_log_prob,
    guided_unet_output,
    previous_timestep,
    sample_ddim,
)

BATCH, STEPS, GUIDANCE = 3, 5, 5.0


@pytest.fixture(scope="module")
def unet(tiny_sd):
    return UNet2DConditionModel.from_pretrained(tiny_sd / "unet").eval()


@pytest.fixture(params=["epsilon", "v_prediction"])
def scheduler(tiny_sd, request):
    return DDIMScheduler.from_pretrained(tiny_sd, subfolder="scheduler", prediction_type=request.param)


@pytest.fixture(scope="module")
def inputs(unet):
    """Starting noise [3, 4, 16, 16], prompt embeddings [3, 8, 32] and one negative [1, 8, 32]."""
    g = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    return torch.randn(BATCH, 4, size, size, generator=g), torch.randn(BATCH, 8, 32, generator=g), torch.randn(1, 8, 32, generator=g)


def sample(unet, scheduler, inputs, seed: int = 1, **kwargs):
    latents, cond, uncond = inputs
    options = dict(num_steps=STEPS, guidance_scale=GUIDANCE, eta=1.0, generator=torch.Generator().manual_seed(seed)) | kwargs
    return sample_ddim(unet, scheduler, latents, cond, uncond, **options)


def pipeline_guidance(unet, x, t, cond, uncond):
    """Classifier-free guidance written as StableDiffusionPipeline does it."""
    out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond.expand(len(cond), -1, -1), cond])).sample
    out_uncond, out_text = out.chunk(2)
    return out_uncond + GUIDANCE * (out_text - out_uncond)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_step_mean_and_std_are_ddim_scheduler_step_without_and_with_its_noise(scheduler, eta):
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(3)
    for t in scheduler.timesteps:
        x, output, noise = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
        prev_t = previous_timestep(scheduler, t)
        mean, std = ddim_step_mean_std(scheduler, output, t, prev_t, x, eta)
        expected = scheduler.step(output, t, x, eta=eta, variance_noise=noise).prev_sample
        torch.testing.assert_close(mean + std * noise, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(std, eta * scheduler._get_variance(t, prev_t) ** 0.5, rtol=1e-6, atol=0)


def test_stored_log_prob_is_the_normal_density_of_the_sampled_latent(unet, scheduler, inputs):
    _, cond, uncond = inputs
    trajectory = sample(unet, scheduler, inputs)
    assert trajectory.log_probs.shape == (BATCH, STEPS) and len(trajectory.latents) == STEPS + 1
    with torch.no_grad():
        for i, t in enumerate(trajectory.timesteps):
            x, next_x = trajectory.latents[i], trajectory.latents[i + 1]
            output = pipeline_guidance(unet, x, t, cond, uncond)
            mean = scheduler.step(output, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
            std = scheduler._get_variance(t, previous_timestep(scheduler, t)) ** 0.5
            expected = torch.distributions.Normal(mean, std).log_prob(next_x).flatten(1).sum(1)
            torch.testing.assert_close(trajectory.log_probs[:, i], expected, rtol=1e-5, atol=2e-3)


def test_reevaluating_a_transition_under_unchanged_weights_gives_ratio_one(unet, scheduler, inputs):
    _, cond, uncond = inputs
    trajectory = sample(unet, scheduler, inputs)
    with torch.no_grad():
        for x, next_x, t, prev_t, stored in trajectory.transitions():
            fresh = ddim_step_log_prob(unet, scheduler, x, next_x, t, prev_t, cond, uncond, GUIDANCE, eta=1.0)
            torch.testing.assert_close(torch.exp(fresh - stored), torch.ones(BATCH), rtol=0, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_trajectory_equals_diffusers_own_ddim_loop(unet, scheduler, inputs, eta):
    latents, cond, uncond = inputs
    trajectory = sample(unet, scheduler, inputs, eta=eta)
    reference = DDIMScheduler.from_config(scheduler.config)
    reference.set_timesteps(STEPS)
    generator, x = torch.Generator().manual_seed(1), latents
    with torch.no_grad():
        for i, t in enumerate(reference.timesteps):
            x = reference.step(pipeline_guidance(unet, x, t, cond, uncond), t, x, eta=eta, generator=generator).prev_sample
            torch.testing.assert_close(trajectory.latents[i + 1], x, rtol=1e-5, atol=1e-5)
    if eta == 0.0:
        assert torch.equal(trajectory.log_probs, torch.zeros(BATCH, STEPS))  # deterministic steps: no density, zeros by convention


def test_guidance_one_or_no_negative_is_the_conditional_output_alone(unet, inputs):
    latents, cond, uncond = inputs
    with torch.no_grad():
        plain = unet(latents, 500, encoder_hidden_states=cond).sample
        assert torch.equal(guided_unet_output(unet, latents, 500, cond, None, GUIDANCE), plain)
        assert torch.equal(guided_unet_output(unet, latents, 500, cond, uncond, 1.0), plain)


def count_unet_calls_with_grad(unet):
    calls = []
    handle = unet.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    return calls, handle


def test_grad_steps_one_backpropagates_through_the_last_step_only(unet, scheduler, inputs):
    latents, cond, uncond = inputs
    start = latents.clone().requires_grad_(True)
    calls, handle = count_unet_calls_with_grad(unet)
    try:
        trajectory = sample(unet, scheduler, (start, cond, uncond), grad_steps=1)
    finally:
        handle.remove()
    assert calls == [False] * (STEPS - 1) + [True]
    assert all(not x.requires_grad for x in trajectory.latents[1:-1]) and trajectory.final.requires_grad
    unet.zero_grad(set_to_none=True)
    trajectory.final.square().mean().backward()
    assert start.grad is None
    grads = [p.grad for p in unet.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def test_all_steps_kept_reach_the_starting_noise(unet, scheduler, inputs):
    latents, cond, uncond = inputs
    start = latents.clone().requires_grad_(True)
    sample(unet, scheduler, (start, cond, uncond), grad_steps=STEPS).final.square().mean().backward()
    assert start.grad is not None and float(start.grad.abs().sum()) > 0


def unet_gradient(unet, trajectory_fn, sign: float = 1.0) -> torch.Tensor:
    unet.zero_grad(set_to_none=True)
    (sign * trajectory_fn().final.square().mean()).backward()
    return torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None])


def test_checkpointed_steps_give_the_same_gradient(unet, scheduler, inputs):
    plain = unet_gradient(unet, lambda: sample(unet, scheduler, inputs, grad_steps=2))
    checkpointed = unet_gradient(unet, lambda: sample(unet, scheduler, inputs, grad_steps=2, checkpoint=True))
    assert float(plain.abs().sum()) > 0
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-8)


def test_flipping_the_reward_sign_flips_the_gradient_through_vae_and_scorer(unet, inputs, tiny_sd, tiny_rewards):
    scheduler = DDIMScheduler.from_pretrained(tiny_sd, subfolder="scheduler")
    vae = AutoencoderKL.from_pretrained(tiny_sd / "vae").eval().requires_grad_(False)
    scorer = load_tiny_reward(tiny_rewards, "aesthetic")

    def reward_gradient(sign: float) -> torch.Tensor:
        trajectory = sample(unet, scheduler, inputs, grad_steps=1)
        images = (vae.decode(trajectory.final / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        unet.zero_grad(set_to_none=True)
        (-sign * scorer.score_tensor(images, ["a cat"] * BATCH).mean()).backward()
        return torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None])

    up, down = reward_gradient(1.0), reward_gradient(-1.0)
    assert float(up.abs().sum()) > 0
    torch.testing.assert_close(down, -up, rtol=1e-6, atol=0)


def test_same_seed_same_trajectory_other_seed_another(unet, scheduler, inputs):
    with torch.no_grad():
        first, again, other = sample(unet, scheduler, inputs, seed=1), sample(unet, scheduler, inputs, seed=1), sample(unet, scheduler, inputs, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(first.latents, again.latents)) and torch.equal(first.log_probs, again.log_probs)
    assert not torch.equal(first.final, other.final)


def test_deterministic_steps_have_no_log_prob_to_reevaluate(unet, scheduler, inputs):
    _, cond, uncond = inputs
    x, next_x, t, prev_t, _ = next(sample(unet, scheduler, inputs, eta=0.0).transitions())
    with pytest.raises(ValueError, match="eta must be > 0"):
        ddim_step_log_prob(unet, scheduler, x, next_x, t, prev_t, cond, uncond, GUIDANCE, eta=0.0)
    with pytest.raises(ValueError, match="std must be > 0"):
        gaussian_log_prob(x, next_x, 0.0)


def test_grad_steps_beyond_the_step_count_are_refused(unet, scheduler, inputs):
    with pytest.raises(ValueError, match="grad_steps"):
        sample(unet, scheduler, inputs, grad_steps=STEPS + 1)
