"""The online objectives (objective=backprop | pg) on the tiny SD-2.1-shaped model at 32 px with
3-step DDIM sampling: a few CPU steps per test.

The reward of most tests is ``brightness``, registered here as a user would register their own:
the mean of the [0, 1] image, differentiable, with a PIL path that agrees with it.

Measured (2026-12-06, CPU, one thread, fp32): backprop (K=2 of 3, lr 3e-3, 4 images a step) raised
the mean brightness every step, 0.5667, 0.5691, 0.5714, 0.5732, 0.5754, 0.5770, at 0.35-0.44 s a
step; pg's first inner epoch gave ratios of exactly 1 (bit-identical re-evaluation), and resumed
runs of both objectives ended bit-identical to uninterrupted ones (EMA and raw weights). pg did not
move brightness in 6 steps (group stds of 4e-4 to 7e-4 after 8-bit rounding; with clip 1e-4 and
lr 3e-3 every ratio of the second inner epoch was clipped): its tests check the mechanics, not a
reward gain. One pg update at lr 1e-7 raised the surrogate mean(A * (ratio - 1)) on each of the 3
re-evaluated steps (0.022, 0.21, 0.0002; the same to 2 digits with the reward's sign flipped, as
advantages and update flip together); at lr 1e-4 the same ratios reached 9e10 and inf, because a
step's log-density sums 1024 latent dims at sigma_t down to about 0.03: why DDPO clips at 1e-4."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from reward import load_training_reward, register_reward
from reward.base import PromptFreeReward
from sr_finetune.config import load_config
from sr_finetune.errors import ConfigError
from sr_finetune.training import FinetuneConfig, LoraSettings, run_finetune
from sr_finetune.training.config import AddedReward, OnlineSettings
from sr_finetune.training import online as online_module
from sr_finetune.training.online import group_advantages
from conftest import launch_two_cpu_processes, reset_accelerate_state
from test_trainer import assert_changed, assert_same, unet_weights

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """One torch thread per run: on the shared 2-core test machine, two spinning threads made a
    backprop step of these tests 13 s instead of 0.3 s (measured 2026-12-06, load average 4)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Brightness(PromptFreeReward):
    """The mean pixel value in [0, 1] (times ``sign``): a toy reward a user might register."""

    name = "brightness"

    def __init__(self, sign: float = 1.0):
        super().__init__()
        self.sign = torch.nn.Parameter(torch.tensor(float(sign)))

    @property
    def is_differentiable(self) -> bool:
        return True

    def preprocess_image(self, image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)

    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def score(self, pixel_values: torch.Tensor, text_inputs) -> torch.Tensor:
        return self.sign * pixel_values.float().mean(dim=(1, 2, 3))


@register_reward("brightness")
def _load_brightness(weights=None, device="cpu", dtype="fp32", sign: float = 1.0) -> Brightness:
    return Brightness(sign).to(device)


class NotDifferentiable(Brightness):
    name = "brightness_pil_only"

    @property
    def is_differentiable(self) -> bool:
        return False


@register_reward("brightness_pil_only")
def _load_pil_only(weights=None, device="cpu", dtype="fp32") -> NotDifferentiable:
    return NotDifferentiable().to(device)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "animals.txt"
    path.write_text("a cat\na dog\na horse\na fox\n")
    return path


def online_cfg(model: Path, prompts: Path, out: Path, objective: str, **overrides) -> FinetuneConfig:
    online = dict(prompts=str(prompts), reward="brightness", prompts_per_step=2, group_size=2, num_steps=3, guidance_scale=3.0, eta=1.0, grad_steps=1)
    online.update(overrides.pop("online", {}))
    settings = dict(
        model=str(model), output_dir=str(out), resolution=32, max_train_steps=2, objective=objective, train_text_encoder=False,
        unet_lr=1e-3, report_to="none", checkpointing_steps=0, seed=0,
    )
    settings.update(overrides)
    cfg = FinetuneConfig(**settings, online=OnlineSettings(**online))
    cfg.online.validate()
    cfg.validate()
    return cfg


def run(cfg: FinetuneConfig):
    return run_finetune(cfg, reward_loader=load_training_reward)


# ---- backprop -----------------------------------------------------------------------------------


def test_backprop_raises_the_reward_and_saves_a_pipeline_with_its_model_card(tiny_sd, prompt_file, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "bp"
    summary = run(online_cfg(tiny_sd, prompt_file, out, "backprop", max_train_steps=6, unet_lr=3e-3, online={"grad_steps": 2}))

    rewards = [row["reward_mean"] for row in summary.history]
    assert summary.global_step == 6 and len(rewards) == 6
    assert np.mean(rewards[-2:]) > np.mean(rewards[:2]), rewards
    assert [row["images_sampled"] for row in summary.history] == [4, 8, 12, 16, 20, 24] and summary.images_seen == 24
    assert all(row["seconds"] > 0 and row["reward_group_std"] >= 0 for row in summary.history)
    assert_changed(unet_weights(out), unet_weights(tiny_sd))
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a cat", num_inference_steps=2, height=32, width=32).images[0].size == (32, 32)
    card = (out / "README.md").read_text()
    assert "reward backpropagation (AlignProp / DRaFT-K, K=2 of 3 DDIM steps)" in card and "`brightness` reward" in card
    assert f"prompts `{prompt_file}`" in card and "| images sampled | 24 |" in card and "| online.grad_steps | 2 |" in card


def first_update(tiny_sd, prompt_file, out: Path, sign: float, objective: str = "backprop") -> dict:
    """The UNet after one step at a tiny learning rate (plain SGD-like Adam first step: sign of the gradient)."""
    cfg = online_cfg(tiny_sd, prompt_file, out, objective, max_train_steps=1, max_grad_norm=0.0, weight_decay=0.0, online={"reward_options": {"sign": sign}})
    run(cfg)
    reset_accelerate_state()
    return unet_weights(out)


def test_flipping_the_rewards_sign_flips_the_first_update(tiny_sd, prompt_file, tmp_path):
    base = unet_weights(tiny_sd)
    up, down = first_update(tiny_sd, prompt_file, tmp_path / "up", 1.0), first_update(tiny_sd, prompt_file, tmp_path / "down", -1.0)
    delta_up = torch.cat([(up[k] - base[k]).flatten() for k in base])
    delta_down = torch.cat([(down[k] - base[k]).flatten() for k in base])
    moved = delta_up.abs() > 1e-6
    assert moved.sum() > 100
    # Adam's first step is lr * g / (|g| + eps): the same size, the opposite sign
    torch.testing.assert_close(delta_down[moved], -delta_up[moved], rtol=1e-3, atol=1e-6)


@register_reward("dimness")
def _load_dimness(weights=None, device="cpu", dtype="fp32") -> Brightness:
    return Brightness(-1.0).to(device)


def test_an_added_reward_term_adds_its_scaled_score(tiny_sd, prompt_file, tmp_path):
    """brightness + 2 x dimness = -brightness: the same first update as the sign-flipped reward,
    and each term's mean logged beside the total."""
    base = unet_weights(tiny_sd)
    down = first_update(tiny_sd, prompt_file, tmp_path / "down", -1.0)
    cfg = online_cfg(tiny_sd, prompt_file, tmp_path / "sum", "backprop", max_train_steps=1, max_grad_norm=0.0, weight_decay=0.0,
                     online={"added_rewards": {"dimness": AddedReward(scale=2.0)}})
    summary = run(cfg)
    summed = unet_weights(tmp_path / "sum")
    delta_down = torch.cat([(down[k] - base[k]).flatten() for k in base])
    delta_sum = torch.cat([(summed[k] - base[k]).flatten() for k in base])
    moved = delta_down.abs() > 1e-6
    assert moved.sum() > 100
    torch.testing.assert_close(delta_sum[moved], delta_down[moved], rtol=1e-3, atol=1e-6)
    row = summary.history[0]
    assert row["reward_dimness"] == pytest.approx(-row["reward_brightness"], abs=1e-6)
    assert row["reward_mean"] == pytest.approx(row["reward_brightness"] + 2 * row["reward_dimness"], abs=1e-6)
    assert "the `brightness` + 2 x `dimness` reward" in (tmp_path / "sum" / "README.md").read_text()


def test_pg_adds_the_terms_through_their_scoring_paths(tiny_sd, prompt_file, tmp_path):
    summary = run(online_cfg(tiny_sd, prompt_file, tmp_path / "pg", "pg", max_train_steps=1,
                             online={"reward": "brightness_pil_only", "added_rewards": {"dimness": AddedReward(scale=0.5)}}))
    row = summary.history[0]
    assert row["reward_mean"] == pytest.approx(row["reward_brightness_pil_only"] + 0.5 * row["reward_dimness"], abs=1e-6)
    assert row["reward_dimness"] == pytest.approx(-row["reward_brightness_pil_only"], abs=1e-6)


def test_draft_1_runs_only_the_last_denoising_step_with_gradients(tiny_sd, prompt_file, tmp_path, monkeypatch):
    grad_enabled = []
    real = online_module.sample_ddim

    def recording(unet, *args, **kwargs):
        handle = unet.register_forward_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
        try:
            return real(unet, *args, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr(online_module, "sample_ddim", recording)
    run(online_cfg(tiny_sd, prompt_file, tmp_path / "bp", "backprop", max_train_steps=1, online={"grad_steps": 1}))
    assert grad_enabled == [False, False, True]  # 3 DDIM steps, one batched guided UNet call each


def test_lora_backprop_with_anchor_and_checkpointing_trains_only_the_adapted_projections(tiny_sd, prompt_file, tmp_path):
    out = tmp_path / "lora"
    summary = run(online_cfg(tiny_sd, prompt_file, out, "backprop", lora=LoraSettings(rank=4), unet_lr=1e-2, gradient_checkpointing=True, online={"kl_weight": 1.0}))
    trained, base = unet_weights(out), unet_weights(tiny_sd)
    changed = {k for k in base if not torch.equal(trained[k], base[k])}
    assert changed and all(any(f".{t}." in k for t in ("to_q", "to_k", "to_v", "to_out.0")) for k in changed)
    anchors = [row["anchor"] for row in summary.history]
    assert anchors[0] == 0.0 and anchors[1] > 0.0  # the adapters start as the base model, then move away from it


# ---- pg -----------------------------------------------------------------------------------------


def spy_on_ratios(monkeypatch) -> list:
    """Record (importance ratio, advantages) of every clipped policy loss the run computes."""
    seen = []
    real = online_module.clipped_policy_loss

    def spy(log_prob, old_log_prob, advantages, clip_range):
        loss, ratio = real(log_prob, old_log_prob, advantages, clip_range)
        seen.append((ratio, advantages.detach().clone()))
        return loss, ratio

    monkeypatch.setattr(online_module, "clipped_policy_loss", spy)
    return seen


def test_pg_ratio_is_exactly_one_and_nothing_clipped_on_the_first_inner_epoch(tiny_sd, prompt_file, tmp_path, monkeypatch):
    seen = spy_on_ratios(monkeypatch)
    out = tmp_path / "pg"
    summary = run(online_cfg(tiny_sd, prompt_file, out, "pg", max_train_steps=1, unet_lr=1e-2, online={"inner_epochs": 2, "clip_range": 1e-4}))

    first_epoch, second_epoch = seen[:3], seen[3:]  # 3 DDIM steps per inner epoch
    assert len(first_epoch) == 3 and len(second_epoch) == 3
    assert all(torch.equal(ratio, torch.ones_like(ratio)) for ratio, _ in first_epoch)
    assert any(not torch.equal(ratio, torch.ones_like(ratio)) for ratio, _ in second_epoch)
    advantages = first_epoch[0][1].view(-1, 2)
    torch.testing.assert_close(advantages.mean(dim=1), torch.zeros(2), rtol=0, atol=1e-3)  # up to rounding, with rewards close within a group
    # clip fraction: 0 over the first epoch's 3 steps, so the run's mean over 6 is the second epoch's / 2
    clipped_second = np.mean([float(((r - 1).abs() > 1e-4).float().mean()) for r, _ in second_epoch])
    assert summary.metrics["clip_fraction"] == pytest.approx(clipped_second / 2)
    assert_changed(unet_weights(out), unet_weights(tiny_sd))


def test_a_pg_update_makes_the_above_average_images_of_each_group_more_likely(tiny_sd, prompt_file, tmp_path, monkeypatch):
    seen = spy_on_ratios(monkeypatch)
    run(online_cfg(tiny_sd, prompt_file, tmp_path / "pg", "pg", max_train_steps=1, unet_lr=1e-7, online={"group_size": 4, "inner_epochs": 2, "clip_range": 10.0}))
    # the second inner epoch re-evaluates the same transitions after one update: the surrogate A * ratio rose
    # (a tiny step: the ratios of a 1024-dim Gaussian step overflow after an Adam step of 1e-4)
    gains = [float((advantages * (ratio - 1)).mean()) for ratio, advantages in seen[3:]]
    assert len(gains) == 3 and sum(gains) > 0, gains


def test_pg_takes_a_reward_without_a_differentiable_path_and_logs_its_kl(tiny_sd, prompt_file, tmp_path):
    summary = run(online_cfg(tiny_sd, prompt_file, tmp_path / "pg", "pg", online={"reward": "brightness_pil_only", "kl_weight": 0.1, "timestep_fraction": 0.5}))
    assert summary.global_step == 2 and all(np.isfinite(row["kl"]) for row in summary.history)
    assert summary.history[0]["kl"] == 0.0 and summary.history[1]["kl"] > 0.0


def test_group_advantages_are_zero_mean_and_unit_scale_per_group():
    rewards = torch.tensor([1.0, 3.0, 5.0, 5.0, 0.0, 10.0])
    advantages = group_advantages(rewards, 2).view(3, 2)
    torch.testing.assert_close(advantages, torch.tensor([[-1.0, 1.0], [0.0, 0.0], [-1.0, 1.0]]), rtol=0, atol=1e-5)


# ---- resume -------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["backprop", "pg"])
def test_resumed_online_run_ends_with_the_weights_of_an_uninterrupted_run(objective, tiny_sd, prompt_file, tmp_path):
    common = dict(checkpointing_steps=2, use_ema=True, ema_decay=0.9, lr_scheduler="constant_with_warmup", lr_warmup_steps=1, online={"inner_epochs": 2})
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    full = run(online_cfg(tiny_sd, prompt_file, straight, objective, max_train_steps=3, **common))
    reset_accelerate_state()
    run(online_cfg(tiny_sd, prompt_file, stopped, objective, max_train_steps=2, **common))
    reset_accelerate_state()
    resumed = run(online_cfg(tiny_sd, prompt_file, stopped, objective, max_train_steps=3, resume_from_checkpoint="latest", **common))

    assert resumed.resumed_from == str(stopped / "checkpoint-2") and resumed.steps_run == 1
    assert resumed.history[0]["images_sampled"] == full.history[-1]["images_sampled"] == 12
    assert resumed.history[0]["reward_mean"] == full.history[-1]["reward_mean"]  # the same prompts and noise were sampled
    assert_same(unet_weights(stopped), unet_weights(straight))  # EMA weights
    assert_same(load_file(stopped / "checkpoint-3" / "model.safetensors"), load_file(straight / "checkpoint-3" / "model.safetensors"))


def test_two_processes_train_online(tiny_sd, prompt_file, tiny_rewards, tmp_path):
    out = tmp_path / "pg"
    config = tmp_path / "experiment.yaml"
    config.write_text(
        f"finetune:\n  model: {tiny_sd}\n  output_dir: {out}\n  objective: pg\n  resolution: 32\n  max_train_steps: 2\n  train_text_encoder: false\n"
        "  report_to: none\n  checkpointing_steps: 1\n  unet_lr: 0.001\n"
        f"  online:\n    prompts: {prompt_file}\n    reward: aesthetic\n    reward_weights: {tiny_rewards['weights']['aesthetic']}\n"
        f"    reward_options: {{clip_weights: {tiny_rewards['options']['aesthetic']['clip_weights']}}}\n"
        "    prompts_per_step: 1\n    group_size: 2\n    num_steps: 2\n"
    )
    result = launch_two_cpu_processes(["recipes/finetune.py", "--config", str(config), "device=cpu"], port=29531)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 prompts x 2 images x 2 processes" in result.stderr
    assert (out / "checkpoint-2" / "random_states_1.pkl").exists()
    assert_changed(unet_weights(out), unet_weights(tiny_sd))


# ---- config errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("objective=pg online.eta=0", "online.eta: objective=pg needs eta > 0"),
        ("objective=pg online.group_size=1", "online.group_size: objective=pg normalises rewards"),
        ("objective=backprop dataset=some/pairs", "dataset: objective=backprop samples its own images"),
        ("objective=backprop max_train_steps=null", "max_train_steps: objective=backprop has no epochs"),
        ("objective=backprop gradient_accumulation_steps=2", "gradient_accumulation_steps: objective=backprop makes one update"),
        ("objective=backprop online.grad_steps=30", r"online.grad_steps: must be in \[1, num_steps=20\]"),
        ("objective=pg online.timestep_fraction=0", r"online.timestep_fraction: must be in \(0, 1\]"),
    ],
)
def test_bad_online_settings_are_one_line_config_errors(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(FinetuneConfig, None, ["max_train_steps=2", *override.split()])
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize("missing", ["prompts", "reward"])
def test_an_online_objective_without_prompts_or_reward_is_refused(missing, tiny_sd, prompt_file, tmp_path):
    cfg = online_cfg(tiny_sd, prompt_file, tmp_path / "ft", "backprop")
    setattr(cfg.online, missing, None)
    with pytest.raises(ConfigError, match=f"finetune.online.{missing} is required for objective=backprop"):
        run(cfg)


def test_backprop_refuses_a_reward_without_a_differentiable_path(tiny_sd, prompt_file, tmp_path):
    with pytest.raises(ConfigError, match="'brightness_pil_only' has no differentiable scoring path, which objective=backprop needs"):
        run(online_cfg(tiny_sd, prompt_file, tmp_path / "ft", "backprop", online={"reward": "brightness_pil_only"}))


@pytest.mark.parametrize("objective", ["backprop", "pg"])
def test_the_world_judge_is_refused_as_evaluation_only(objective, tiny_sd, prompt_file, tmp_path):
    with pytest.raises(ConfigError, match="'world_judge' is an evaluation-only metric and cannot be a training signal"):
        run(online_cfg(tiny_sd, prompt_file, tmp_path / "ft", objective, online={"reward": "world_judge"}))


def test_the_core_entry_without_a_reward_loader_points_to_the_recipe(tiny_sd, prompt_file, tmp_path):
    with pytest.raises(ConfigError, match="launch recipes/finetune.py or `sr-finetune finetune`"):
        run_finetune(online_cfg(tiny_sd, prompt_file, tmp_path / "ft", "pg"))
