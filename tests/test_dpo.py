"""objective=dpo: the Diffusion-DPO loss against the paper's equation, and the trainer on a tiny
SD-2.1-shaped model at 32 px with a pair table written by the real pair builder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from sr_finetune.config import load_config
from sr_finetune.errors import ConfigError, UserError
from sr_finetune.pairs import PairsConfig, build_pairs
from sr_finetune.training import FinetuneConfig, LoraSettings, run_finetune
from sr_finetune.training import trainer as trainer_module
from sr_finetune.training.losses import diffusion_dpo_loss
from conftest import reset_accelerate_state

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


# ---- the loss ----------------------------------------------------------------------------------


def paper_loss(model_pred, ref_pred, target, beta):
    """Eq. 14 of Wallace et al. (2023) as written, one pair at a time, with the authors' -beta/2 scale
    (T * omega(lambda_t) folded into beta) and errors averaged over the latent dimensions."""
    n = len(model_pred) // 2
    losses = []
    for i in range(n):
        err = lambda pred, j: ((target[j] - pred[j]) ** 2).mean()  # noqa: E731
        w, l = i, n + i
        inner = (err(model_pred, w) - err(ref_pred, w)) - (err(model_pred, l) - err(ref_pred, l))
        losses.append(-math.log(1.0 / (1.0 + math.exp(beta / 2 * inner.item()))))
    return sum(losses) / n


def random_preds(seed: int, pairs: int = 3, shape=(4, 2, 2)):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(2 * pairs, *shape, generator=g, dtype=torch.float64)
    model = target + 0.5 * torch.randn(2 * pairs, *shape, generator=g, dtype=torch.float64)
    ref = target + 0.5 * torch.randn(2 * pairs, *shape, generator=g, dtype=torch.float64)
    return model, ref, target


@pytest.mark.parametrize("beta", [1.0, 10.0])
def test_dpo_loss_equals_the_papers_equation_per_pair(beta):
    model, ref, target = random_preds(0)
    terms = diffusion_dpo_loss(model.float(), ref.float(), target.float(), beta)
    assert terms.loss.item() == pytest.approx(paper_loss(model, ref, target, beta), rel=1e-5)


def test_dpo_loss_is_the_mean_of_pair_losses_not_of_the_mean_margin():
    # pair 0: model much better than the reference on the chosen image; pair 1: slightly worse
    target = torch.zeros(4, 1)
    model = torch.tensor([[0.0], [0.5], [1.0], [0.0]])  # chosen 0, 1 | rejected 0, 1
    ref = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
    beta = 2.0
    terms = diffusion_dpo_loss(model, ref, target, beta)
    inside = torch.tensor([-0.5 * beta * ((0 - 1) - (1 - 1)), -0.5 * beta * ((0.25 - 0) - (0 - 0))])  # [1.0, -0.25]
    assert terms.loss.item() == pytest.approx((-F.logsigmoid(inside)).mean().item(), rel=1e-6)
    assert terms.loss.item() != pytest.approx(-F.logsigmoid(inside.mean()).item(), rel=1e-3)
    assert terms.reward_accuracy.item() == 0.5 and terms.reward_margin.item() == pytest.approx(0.375)


def test_larger_beta_sharpens_the_loss():
    model, ref, target = random_preds(1, pairs=1)
    terms = diffusion_dpo_loss(model.float(), ref.float(), target.float(), 1.0)
    inside = terms.reward_margin.item()
    assert inside != 0
    sharp = diffusion_dpo_loss(model.float(), ref.float(), target.float(), 100.0)
    assert sharp.reward_margin.item() == pytest.approx(100 * inside, rel=1e-4)  # the margin scales with beta
    # the loss moves toward 0 (right side) or toward the margin itself (wrong side), away from log 2
    assert abs(sharp.loss.item() - math.log(2)) > abs(terms.loss.item() - math.log(2))


def test_swapping_chosen_and_rejected_flips_the_gradient():
    model, ref, target = (t.float() for t in random_preds(2))
    n = len(model) // 2
    swap = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    grads = []
    for order in (torch.arange(2 * n), swap):
        pred = model[order].clone().requires_grad_(True)
        diffusion_dpo_loss(pred, ref[order], target[order], 50.0).loss.backward()
        grads.append(pred.grad[order.argsort()])  # back in the original order
    (g, g_swapped) = grads
    assert g.abs().sum() > 0
    # per pair, the gradient of the swapped loss points the other way (its size differs: sigmoid(-x) vs sigmoid(x))
    for i in range(n):
        pair = torch.cat([g[i], g[n + i]]).flatten()
        swapped = torch.cat([g_swapped[i], g_swapped[n + i]]).flatten()
        assert torch.dot(pair, swapped) < 0
        assert torch.allclose(swapped / swapped.norm(), -pair / pair.norm(), atol=1e-5)


def test_model_equal_to_reference_gives_log_2_and_no_pair_right():
    model, _, target = (t.float() for t in random_preds(3))
    terms = diffusion_dpo_loss(model, model.clone(), target, 5000.0)
    assert terms.loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert terms.reward_accuracy.item() == 0.0 and terms.reward_margin.item() == 0.0


# ---- the trainer -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dpo_set(tmp_path_factory) -> Path:
    """build-pairs output with keep_pairs: 4 prompts x 3 generated 40x48 images, 3 regularisation images."""
    root = tmp_path_factory.mktemp("dpo_set")
    rng = np.random.default_rng(0)
    rows, scores = [], []
    for p in range(4):
        for i in range(3):
            rel = f"images/p{p}_{i}.png"
            (root / "gen" / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "gen" / rel)
            rows.append({"image_id": f"p{p}_{i}", "prompt_id": f"p{p}", "prompt": f"a photo of animal {p}", "path": rel, "seed": i, "model": "tiny"})
            scores.append({"image_id": f"p{p}_{i}", "social_reward": float(rng.random())})
    pd.DataFrame(rows).to_parquet(root / "gen" / "manifest.parquet")
    pd.DataFrame(scores).to_parquet(root / "scores.parquet")
    reg = root / "laion"
    reg.mkdir()
    with open(reg / "metadata.jsonl", "w") as meta:
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(reg / f"{i}.png")
            meta.write(json.dumps({"file_name": f"{i}.png", "text": f"a laion caption {i}"}) + "\n")
    out = root / "set"
    build_pairs(PairsConfig(generations=str(root / "gen"), scores=str(root / "scores.parquet"), keep_pairs=True, regularization=str(reg), regularization_share=0.25, output_dir=str(out)))
    return out


def dpo_cfg(model: Path, data: Path, out: Path, **overrides) -> FinetuneConfig:
    settings = dict(
        model=str(model), dataset=str(data), output_dir=str(out), resolution=32, train_batch_size=2, max_train_steps=2, objective="dpo", dpo_beta=500.0,
        unet_lr=1e-3, text_encoder_lr=1e-3, dataloader_num_workers=0, report_to="none", checkpointing_steps=0, seed=0,
    )
    settings.update(overrides)
    cfg = FinetuneConfig(**settings)
    cfg.validate()
    return cfg


def unet_weights(folder: Path) -> dict:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_dpo_run_saves_a_pipeline_and_logs_reward_accuracy_and_margin(tiny_sd, dpo_set, tmp_path):
    from diffusers import StableDiffusionPipeline
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "ft"
    summary = run_finetune(dpo_cfg(tiny_sd, dpo_set, out, report_to="tensorboard", dpo_sft_weight=0.5))

    assert summary.global_step == 2 and summary.role_counts == {"pairs": 4, "regularization": 3}
    assert set(summary.metrics) == {"reward_accuracy", "reward_margin", "sft_loss"} and 0.0 <= summary.metrics["reward_accuracy"] <= 1.0
    assert "reward accuracy" in summary.line()
    assert summary.images_seen == 2 * 2 * 3  # 2 steps x 2 pairs x (chosen, rejected, regularisation)
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"loss", "dpo/reward_accuracy", "dpo/reward_margin", "dpo/sft_loss"} <= set(tags)
    assert [e.step for e in events.Scalars("dpo/reward_margin")] == [1, 2]
    assert abs(events.Scalars("dpo/reward_margin")[1].value) > 1e-2  # the reference stays the starting model
    # the first step starts from the reference itself: margin 0 (to rounding: the UNet's batch has
    # the regularisation rows too, the reference's not), loss = log 2 + 0.5 x sft
    first = {tag: events.Scalars(tag)[0].value for tag in ("loss", "dpo/reward_margin", "dpo/sft_loss")}
    assert abs(first["dpo/reward_margin"]) < 1e-3
    assert first["loss"] == pytest.approx(math.log(2) + 0.5 * first["dpo/sft_loss"], rel=1e-4)
    assert not torch.equal(unet_weights(out)["conv_in.weight"], unet_weights(tiny_sd)["conv_in.weight"])
    card = (out / "README.md").read_text()
    assert "Diffusion-DPO" in card and "| pairs | 4 |" in card and "| dpo_beta | 500.0 |" in card
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a cat", num_inference_steps=1, height=32, width=32).images[0].size == (32, 32)


def test_dpo_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(tiny_sd, dpo_set, tmp_path, monkeypatch):
    import shutil

    # 4 pairs / batch 1 = 4 batches per epoch, accumulation 2: steps end after batches 2, 4, 6.
    # The uninterrupted run's checkpoint at step 1 (mid-epoch) is the state a run stopped there
    # leaves behind; resuming from it crosses the epoch boundary.
    common = dict(
        gradient_accumulation_steps=2, checkpointing_steps=1, use_ema=True, ema_decay=0.9, random_flip=True, noise_offset=0.1,
        lr_scheduler="constant_with_warmup", lr_warmup_steps=1, dpo_sft_weight=0.5, train_batch_size=1,
    )
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_finetune(dpo_cfg(tiny_sd, dpo_set, straight, max_train_steps=3, **common))
    stopped.mkdir()
    shutil.copytree(straight / "checkpoint-1", stopped / "checkpoint-1")

    batches_run = []
    real = trainer_module.compute_dpo_loss

    def counting(batch, **kwargs):
        batches_run.append(list(batch["prompt_id"]))
        return real(batch, **kwargs)

    monkeypatch.setattr(trainer_module, "compute_dpo_loss", counting)
    reset_accelerate_state()
    resumed = run_finetune(dpo_cfg(tiny_sd, dpo_set, stopped, max_train_steps=3, resume_from_checkpoint="latest", **common))

    assert resumed.resumed_from == str(stopped / "checkpoint-1") and resumed.steps_run == 2
    assert len(batches_run) == 4  # batches 3-4 of epoch 0, 1-2 of epoch 1: the two done before are skipped
    assert_same(unet_weights(stopped), unet_weights(straight))  # EMA weights
    for name in ("model.safetensors", "model_1.safetensors"):  # raw UNet and text encoder
        assert_same(load_file(stopped / "checkpoint-3" / name), load_file(straight / "checkpoint-3" / name))


def test_dpo_with_lora_uses_the_unet_with_adapters_off_as_reference(tiny_sd, dpo_set, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    from sr_finetune.training import reference as reference_module

    disabled = []
    real = reference_module.adapters_disabled

    def spy(unet):
        disabled.append(unet)
        return real(unet)

    monkeypatch.setattr(reference_module, "adapters_disabled", spy)
    copies = []
    real_copy = trainer_module.frozen_copy

    def counting_copy(module, *args):
        copies.append(module)
        return real_copy(module, *args)

    monkeypatch.setattr(trainer_module, "frozen_copy", counting_copy)
    out = tmp_path / "ft"
    summary = run_finetune(dpo_cfg(tiny_sd, dpo_set, out, lora=LoraSettings(rank=4), train_text_encoder=False, unet_lr=1e-2, max_train_steps=2))

    assert copies == [] and len(disabled) == 2  # no copy: the trained UNet, adapters off, once per step
    assert isinstance(disabled[0], UNet2DConditionModel)
    assert abs(summary.metrics["reward_margin"]) > 1e-3 and math.isfinite(summary.final_loss)  # adapters on != off
    trained, base = unet_weights(out), unet_weights(tiny_sd)
    assert trained.keys() == base.keys()  # merged
    changed = {k for k in base if not torch.equal(trained[k], base[k])}
    assert changed and all(any(f".{t}." in k for t in ("to_q", "to_k", "to_v", "to_out.0")) for k in changed)


def test_reference_with_adapters_off_predicts_as_the_base_unet(tiny_sd):
    from diffusers import UNet2DConditionModel

    from sr_finetune.training.config import FinetuneConfig
    from sr_finetune.training.reference import Reference
    from sr_finetune.training.trainer import add_lora

    base = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()
    tuned = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    add_lora(tuned, FinetuneConfig(lora=LoraSettings(rank=4)))
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "lora_B" in name:
                param.normal_()  # adapters that change the output
    tuned.train()
    g = torch.Generator().manual_seed(0)
    latents, states = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 77, base.config.cross_attention_dim, generator=g)
    timesteps = torch.tensor([10, 500])
    with torch.no_grad():
        expected = base(latents, timesteps, states).sample
        with_adapters = tuned(latents, timesteps, states).sample
    got = Reference(tuned, lora=True).prediction(latents, timesteps, states)
    assert not torch.allclose(with_adapters, expected, atol=1e-3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert tuned.training and all(p.requires_grad for n, p in tuned.named_parameters() if "lora_" in n)


def test_dpo_without_the_pair_table_names_the_folder_and_keep_pairs(tiny_sd, finetune_set, tmp_path):
    with pytest.raises(UserError, match=r"objective=dpo needs the pair table .*pairs, which does not exist; .*pairs.keep_pairs=true") as err:
        run_finetune(dpo_cfg(tiny_sd, finetune_set, tmp_path / "ft"))
    assert str(finetune_set / "pairs") in str(err.value) and len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize(
    "override, message",
    [
        ("objective=ppo", "objective: must be one of ('sft', 'dpo')"),
        ("objective=dpo dpo_beta=0", "dpo_beta: must be positive"),
        ("objective=dpo dpo_sft_weight=-1", "dpo_sft_weight: must be >= 0"),
        ("objective=dpo snr_gamma=5", "snr_gamma: weights the sft loss"),
    ],
)
def test_bad_dpo_settings_are_one_line_config_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        load_config(FinetuneConfig, None, override.split())
    assert len(str(err.value).splitlines()) == 1
