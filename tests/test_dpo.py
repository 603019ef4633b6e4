"""objective=dpo: the Diffusion-DPO loss against the paper's equation, and the trainer on a tiny
SD-2.1-shaped model at 32 px with a pair table written by the real pair builder."""

from __future__ import annotations

import json
import math
from dataclasses import replace
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
from conftest import launch_two_cpu_processes, reset_accelerate_state
from test_trainer import assert_same, text_encoder_weights, tiny_cfg, unet_weights

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


def test_displacement_is_each_pairs_mean_error_above_the_reference_whatever_the_roles():
    model, ref, target = (t.float() for t in random_preds(4))
    n = len(model) // 2
    err = lambda pred: ((pred - target) ** 2).mean(dim=(1, 2, 3))  # noqa: E731
    rise = err(model) - err(ref)
    terms = diffusion_dpo_loss(model, ref, target, 5000.0)
    assert torch.allclose(terms.displacement, 0.5 * (rise[:n] + rise[n:]), atol=1e-6)
    swap = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    swapped = diffusion_dpo_loss(model[swap], ref[swap], target[swap], 5000.0)
    assert torch.allclose(swapped.displacement, terms.displacement) and not torch.allclose(swapped.reward_margin, terms.reward_margin)
    assert torch.equal(diffusion_dpo_loss(model, model.clone(), target, 5000.0).displacement, torch.zeros(n))


def test_dpo_positive_matches_its_equation_per_pair():
    """Pal et al. (2024), Eq. 3, with diffusion's -error for log-likelihood: the chosen image's rise in
    error above the reference, times lambda, comes off the pair's margin; a fall costs nothing."""
    model, ref, target = random_preds(5, pairs=4)
    n, beta, lam = 4, 20.0, 3.0
    err = lambda pred, j: ((target[j] - pred[j]) ** 2).mean().item()  # noqa: E731
    expected = []
    for i in range(n):
        w, l = i, n + i
        margin = -(err(model, w) - err(ref, w)) + (err(model, l) - err(ref, l))
        inside = beta / 2 * (margin - lam * max(0.0, err(model, w) - err(ref, w)))
        expected.append(math.log1p(math.exp(-inside)))
    terms = diffusion_dpo_loss(model.float(), ref.float(), target.float(), beta, positive_weight=lam)
    assert terms.loss.item() == pytest.approx(sum(expected) / n, rel=1e-5)
    assert diffusion_dpo_loss(model.float(), ref.float(), target.float(), beta, positive_weight=0.0).loss.item() == pytest.approx(
        paper_loss(model, ref, target, beta), rel=1e-5)


def test_dpo_positive_charges_fitting_both_images_worse_and_nothing_for_fitting_the_chosen_better():
    target = torch.zeros(4, 1)
    ref = torch.full((4, 1), 0.5)  # reference error 0.25 on every image
    worse_both = torch.tensor([[0.6], [0.6], [0.8], [0.8]])  # chosen 0.36, rejected 0.64: margin from fitting both worse
    better_chosen = torch.tensor([[0.4], [0.4], [0.6], [0.6]])  # chosen 0.16 (below the reference), rejected 0.36
    plain = [diffusion_dpo_loss(m, ref, target, 10.0).loss.item() for m in (worse_both, better_chosen)]
    positive = [diffusion_dpo_loss(m, ref, target, 10.0, positive_weight=2.0).loss.item() for m in (worse_both, better_chosen)]
    assert plain[0] < plain[1]  # plain DPO prefers the wider margin, however it was reached
    assert positive[0] > plain[0] and positive[1] == pytest.approx(plain[1], abs=1e-7)
    assert positive[0] > positive[1]
    plain_terms, positive_terms = (diffusion_dpo_loss(worse_both, ref, target, 10.0, positive_weight=w) for w in (0.0, 2.0))
    assert positive_terms.reward_margin.item() == pytest.approx(plain_terms.reward_margin.item())  # the monitor is the plain margin


# ---- one training step -------------------------------------------------------------------------


class RecordingUNet(torch.nn.Module):
    """Predicts ``scale * noisy latents`` and records what it was given."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.9))
        self.calls = []

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def forward(self, noisy, timesteps, states):
        from types import SimpleNamespace

        self.calls.append((noisy.detach().clone(), timesteps.clone(), states.detach().clone()))
        return SimpleNamespace(sample=noisy * self.scale)


def test_dpo_step_noises_both_images_of_a_pair_alike_in_one_unet_forward():
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from sr_finetune.training.reference import Reference

    g = torch.Generator().manual_seed(0)
    n, shape = 3, (4, 2, 2)
    image = torch.randn(n, *shape, generator=g)  # chosen and rejected latents alike: only the noise can tell them apart
    part = lambda mean, embeds: {"latent_mean": mean, "latent_logvar": torch.full_like(mean, -40.0), "prompt_embeds": embeds}  # noqa: E731
    prompts = torch.randn(n, 5, 8, generator=g)
    batch = {
        "chosen": part(image, prompts), "rejected": part(image.clone(), torch.randn(n, 5, 8, generator=g)),  # rejected texts are not used
        "regularization": part(torch.randn(n, *shape, generator=g), torch.randn(n, 5, 8, generator=g)), "prompt_id": ["a", "b", "c"],
    }
    unet, ref_unet = RecordingUNet(), RecordingUNet()
    cfg = FinetuneConfig(objective="dpo", dpo_sft_weight=0.5, train_text_encoder=False, noise_offset=0.1)
    loss, metrics = trainer_module.compute_dpo_loss(
        batch, unet=unet, text_encoder=None, vae=SimpleNamespace(config=SimpleNamespace(scaling_factor=1.0)), noise_scheduler=DDPMScheduler(),
        prediction_type="epsilon", cfg=cfg, generator=torch.Generator().manual_seed(1), weight_dtype=torch.float32, unet_dtype=torch.float32,
        reference=Reference(ref_unet),
    )
    ((noisy, t, states),) = unet.calls
    ((ref_noisy, ref_t, ref_states),) = ref_unet.calls
    assert len(noisy) == 3 * n and torch.equal(t[:n], t[n : 2 * n]) and torch.allclose(noisy[:n], noisy[n : 2 * n], atol=1e-6)
    assert torch.equal(states[:n], prompts) and torch.equal(states[n : 2 * n], prompts) and torch.equal(states[2 * n :], batch["regularization"]["prompt_embeds"])
    assert torch.equal(ref_noisy, noisy[: 2 * n]) and torch.equal(ref_t, t[: 2 * n]) and torch.equal(ref_states, states[: 2 * n])
    # equal images noised alike: model and reference see no difference between w and l
    assert abs(metrics["reward_margin"].item()) < 1e-3 and metrics["reward_accuracy"].item() in (0.0, 1 / 3, 2 / 3, 1.0)
    assert loss.item() == pytest.approx(math.log(2) + 0.5 * metrics["sft_loss"].item(), rel=1e-4)
    loss.backward()
    assert unet.scale.grad is not None and ref_unet.scale.grad is None
    # the anchor: the denoising loss of the pairs' own images, both roles, on the same forward
    anchored, anchored_metrics = trainer_module.compute_dpo_loss(
        batch, unet=unet, text_encoder=None, vae=SimpleNamespace(config=SimpleNamespace(scaling_factor=1.0)), noise_scheduler=DDPMScheduler(),
        prediction_type="epsilon", cfg=replace(cfg, dpo_anchor_weight=2.0), generator=torch.Generator().manual_seed(1), weight_dtype=torch.float32,
        unet_dtype=torch.float32, reference=Reference(ref_unet),
    )
    noisy, _, _ = unet.calls[-1]
    assert len(unet.calls) == 2 and torch.equal(noisy, unet.calls[0][0])  # the same draw of noise: one extra loss term, no extra forward
    assert anchored_metrics["anchor_loss"].item() > 0
    expected = math.log(2) + 0.5 * anchored_metrics["sft_loss"].item() + 2.0 * anchored_metrics["anchor_loss"].item()
    assert anchored.item() == pytest.approx(expected, rel=1e-4)


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
    """The trainer tests' tiny settings with objective=dpo (beta 500: a visible margin in two steps)."""
    return tiny_cfg(model, data, out, **{"objective": "dpo", "dpo_beta": 500.0, **overrides})


def record_calls(monkeypatch, owner, name: str) -> list:
    """Wrap ``owner.name`` so that each call's first argument is recorded; returns the record."""
    calls, real = [], getattr(owner, name)

    def recording(first, *args, **kwargs):
        calls.append(first)
        return real(first, *args, **kwargs)

    monkeypatch.setattr(owner, name, recording)
    return calls


def test_dpo_run_saves_a_pipeline_and_logs_reward_accuracy_and_margin(tiny_sd, dpo_set, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    references = []

    class CapturedReference(trainer_module.Reference):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            references.append(self)

    monkeypatch.setattr(trainer_module, "Reference", CapturedReference)
    out = tmp_path / "ft"
    summary = run_finetune(dpo_cfg(tiny_sd, dpo_set, out, report_to="tensorboard", dpo_sft_weight=0.5))

    assert summary.global_step == 2 and summary.role_counts == {"pairs": 4, "regularization": 3}
    assert set(summary.metrics) == {"reward_accuracy", "reward_margin", "displacement", "sft_loss"} and 0.0 <= summary.metrics["reward_accuracy"] <= 1.0
    assert "reward accuracy" in summary.line()
    assert summary.images_seen == 2 * 2 * 3  # 2 steps x 2 pairs x (chosen, rejected, regularisation)
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"loss", "dpo/reward_accuracy", "dpo/reward_margin", "dpo/displacement", "dpo/sft_loss"} <= set(tags)
    assert [e.step for e in events.Scalars("dpo/reward_margin")] == [1, 2]
    assert abs(events.Scalars("dpo/reward_margin")[1].value) > 1e-2  # the reference stays the starting model
    # the first step starts from the reference itself: margin 0 (to rounding: the UNet's batch has
    # the regularisation rows too, the reference's not), loss = log 2 + 0.5 x sft
    first = {tag: events.Scalars(tag)[0].value for tag in ("loss", "dpo/reward_margin", "dpo/sft_loss")}
    assert abs(first["dpo/reward_margin"]) < 1e-3
    assert first["loss"] == pytest.approx(math.log(2) + 0.5 * first["dpo/sft_loss"], rel=1e-4)
    # after training, the reference still holds the starting UNet and text encoder, in eval mode
    (reference,) = references
    for module, base, trained in ((reference.unet, unet_weights(tiny_sd), unet_weights(out)), (reference.text_encoder, text_encoder_weights(tiny_sd), text_encoder_weights(out))):
        state = module.state_dict()
        assert not module.training and all(torch.equal(state[k], v) for k, v in base.items())
        assert any(not torch.equal(trained[k], v) for k, v in base.items())
    card = (out / "README.md").read_text()
    assert "Diffusion-DPO" in card and "| pairs | 4 |" in card and "| dpo_beta | 500.0 |" in card
    assert json.loads((out / "sampling.json").read_text()) == {"negative_prompt": None}  # dpo never saw the token: sampled without it
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

    batches_run = record_calls(monkeypatch, trainer_module, "compute_dpo_loss")
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

    disabled = record_calls(monkeypatch, reference_module, "adapters_disabled")
    copies = record_calls(monkeypatch, trainer_module, "frozen_copy")
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


def test_regularization_rows_anywhere_in_the_set_are_taken_in_order_as_plain_slices():
    from datasets import Dataset

    from sr_finetune.training.pair_data import rows_with_role

    roles = ["regularization", "chosen", "regularization", "regularization", "rejected", "regularization"]
    table = Dataset.from_dict({"role": roles, "text": [f"row {i}" for i in range(len(roles))]})
    rows = rows_with_role(table, "regularization")
    assert rows["text"] == ["row 0", "row 2", "row 3", "row 5"]
    assert rows._indices is None  # no indices mapping: the latent cache would write a flattened copy of it
    assert rows_with_role(table, "other") is None


class RowImages:
    """A stand-in for the fine-tune set: each example is the row it was asked for, with its augment key."""

    def __init__(self, rows: int):
        self.rows = rows

    def __len__(self) -> int:
        return self.rows

    def examples(self, keys, augment_keys=None):
        return [{"row": row, "augment": augment, "prompt_id": str(row)} for (_, row), augment in zip(keys, augment_keys or keys)]


@pytest.mark.parametrize("alternate", [False, True])
def test_alternate_roles_swap_each_pair_in_every_odd_epoch(alternate):
    from sr_finetune.training.pair_data import PairDataset

    pairs = PairDataset(RowImages(2 * 3 + 2), num_pairs=3, num_regularization=2, seed=0, alternate_roles=alternate)
    for epoch in range(4):
        items = pairs.__getitems__([(epoch, 0), (epoch, 2)])
        swap = alternate and epoch % 2 == 1
        assert [item["chosen"]["row"] for item in items] == ([3, 5] if swap else [0, 2])
        assert [item["rejected"]["row"] for item in items] == ([0, 2] if swap else [3, 5])
        # both images of a pair are still flipped and cropped alike, and take the same regularisation row as without
        assert all(item["chosen"]["augment"] == item["rejected"]["augment"] for item in items)
        assert [item["regularization"]["row"] for item in items] == [6 + pairs.regularization_row(epoch, p) for p in (0, 2)]


def test_dpo_run_with_alternate_roles_trains_on_the_alternating_pairs(tiny_sd, dpo_set, tmp_path, monkeypatch):
    from sr_finetune.training import pair_data

    calls = record_calls(monkeypatch, pair_data.PairDataset, "__getitems__")
    run_finetune(dpo_cfg(tiny_sd, dpo_set, tmp_path / "ft", alternate_roles=True, max_train_steps=4))  # 2 pairs a step: epochs 0 and 1
    assert len(calls) == 4 and all(dataset.alternate_roles for dataset in calls)
    assert (tmp_path / "ft" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    card = (tmp_path / "ft" / "README.md").read_text()
    assert "| alternate_roles | True |" in card and "roles swapped in every odd epoch" in card


def test_dpo_without_the_pair_table_names_the_folder_and_keep_pairs(tiny_sd, finetune_set, tmp_path):
    with pytest.raises(UserError, match=r"objective=dpo needs the pair table .*pairs, which does not exist; .*pairs.keep_pairs=true") as err:
        run_finetune(dpo_cfg(tiny_sd, finetune_set, tmp_path / "ft"))
    assert str(finetune_set / "pairs") in str(err.value) and len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize(
    "override, message",
    [
        ("objective=ppo", "objective: must be one of ('sft', 'dpo', 'backprop', 'pg')"),
        ("objective=dpo dpo_beta=0", "dpo_beta: must be positive"),
        ("objective=dpo dpo_sft_weight=-1", "dpo_sft_weight: must be >= 0"),
        ("objective=dpo dpo_anchor_weight=-1", "dpo_anchor_weight: must be >= 0"),
        ("objective=dpo dpo_positive_weight=-0.5", "dpo_positive_weight: must be >= 0"),
        ("objective=dpo snr_gamma=5", "snr_gamma: weights the sft loss"),
        ("alternate_roles=true", "alternate_roles: swaps the roles of dpo's pairs; objective=sft has none"),
        ("dpo_gap_weighting=true", "dpo_gap_weighting: weights dpo's pairs; objective=sft has none"),
    ],
)
def test_bad_dpo_settings_are_one_line_config_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        load_config(FinetuneConfig, None, override.split())
    assert len(str(err.value).splitlines()) == 1


def test_two_processes_train_dpo_with_lora(tiny_sd, dpo_set, tmp_path):
    out = tmp_path / "ft"
    config = tmp_path / "finetune.yaml"
    config.write_text(
        f"model: {tiny_sd}\ndataset: {dpo_set}\noutput_dir: {out}\nresolution: 32\ntrain_batch_size: 1\nmax_train_steps: 2\n"
        "dataloader_num_workers: 0\nreport_to: none\ncheckpointing_steps: 1\nuse_ema: true\nobjective: dpo\ndpo_sft_weight: 0.5\n"
        "lora:\n  rank: 4\nunet_lr: 0.01\n"
    )
    result = launch_two_cpu_processes(["-m", "sr_finetune.training", "--config", str(config)], port=29531)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 pairs + regularization" in result.stderr and "2 processes x batch 1" in result.stderr and "objective dpo" in result.stderr
    assert "reward accuracy" in result.stderr and "reward margin" in result.stderr
    assert (out / "checkpoint-2" / "random_states_1.pkl").exists()
    trained, base = unet_weights(out), unet_weights(tiny_sd)
    assert any(not torch.equal(trained[k], base[k]) for k in base)


# ---- pairs weighted by their reward gap ------------------------------------------------------------


def test_pair_weights_multiply_each_pairs_loss_before_the_mean():
    model, ref, target = random_preds(3, pairs=4)
    weights = torch.tensor([0.5, 2.0, 0.0, 1.5])
    per_pair = [diffusion_dpo_loss(model[[i, 4 + i]].float(), ref[[i, 4 + i]].float(), target[[i, 4 + i]].float(), 10.0).loss.item() for i in range(4)]
    weighted = diffusion_dpo_loss(model.float(), ref.float(), target.float(), 10.0, pair_weights=weights)
    assert weighted.loss.item() == pytest.approx(sum(w * l for w, l in zip(weights.tolist(), per_pair)) / 4, rel=1e-5)
    plain = diffusion_dpo_loss(model.float(), ref.float(), target.float(), 10.0, pair_weights=torch.ones(4))
    assert plain.loss.item() == pytest.approx(sum(per_pair) / 4, rel=1e-5)
    # the monitors stay those of the plain margin
    assert weighted.reward_margin.item() == pytest.approx(plain.reward_margin.item(), rel=1e-6)


def test_reward_gap_weights_are_the_gaps_over_their_mean_whatever_the_roles():
    from datasets import Dataset

    from sr_finetune.training.pair_data import reward_gap_weights

    table = Dataset.from_dict({"chosen_score": [0.9, 0.5, 0.2], "rejected_score": [0.1, 0.4, 0.5]})  # gaps 0.8, 0.1, 0.3 (swapped)
    np.testing.assert_allclose(reward_gap_weights(table).numpy(), np.array([0.8, 0.1, 0.3]) / 0.4, rtol=1e-6)
    with pytest.raises(UserError, match=r"dpo_gap_weighting: t/pairs row 1 has a score that is not a number \(1 such rows\)"):
        reward_gap_weights(Dataset.from_dict({"chosen_score": [0.9, float("nan")], "rejected_score": [0.1, 0.2]}), "t/pairs")
    with pytest.raises(UserError, match="every pair of t/pairs has equal scores"):
        reward_gap_weights(Dataset.from_dict({"chosen_score": [0.5, 0.2], "rejected_score": [0.5, 0.2]}), "t/pairs")
    with pytest.raises(UserError, match=r"t/pairs lacks column\(s\) \['rejected_score'\]"):
        reward_gap_weights(Dataset.from_dict({"chosen_score": [0.5]}), "t/pairs")


def test_each_example_carries_its_pairs_weight_into_the_batch():
    from sr_finetune.training.pair_data import PairDataset, collate_pairs

    weights = torch.tensor([0.5, 1.0, 1.5])
    pairs = PairDataset(RowImages(2 * 3), num_pairs=3, num_regularization=0, seed=0, weights=weights)
    items = pairs.__getitems__([(1, 2), (1, 0)])
    assert [item["weight"].item() for item in items] == [1.5, 0.5]
    with pytest.raises(ValueError, match="2 pair weights for 3 pairs"):
        PairDataset(RowImages(6), num_pairs=3, num_regularization=0, seed=0, weights=weights[:2])


def test_dpo_run_with_gap_weighting_weights_its_pairs_by_the_reward_gap(tiny_sd, dpo_set, tmp_path, monkeypatch):
    from datasets import load_from_disk

    from sr_finetune.training import pair_data

    calls = record_calls(monkeypatch, pair_data.PairDataset, "__getitems__")
    run_finetune(dpo_cfg(tiny_sd, dpo_set, tmp_path / "ft", dpo_gap_weighting=True, max_train_steps=2))
    table = load_from_disk(str(dpo_set / "pairs"))
    gaps = np.abs(np.asarray(table["chosen_score"]) - np.asarray(table["rejected_score"]))
    np.testing.assert_allclose(calls[0].weights.numpy(), gaps / gaps.mean(), rtol=1e-6)
    assert "| dpo_gap_weighting | True |" in (tmp_path / "ft" / "README.md").read_text()
    # a different weighting trains different weights from the same pairs and seed
    run_finetune(dpo_cfg(tiny_sd, dpo_set, tmp_path / "plain", max_train_steps=2))
    assert not torch.equal(unet_weights(tmp_path / "ft")["conv_in.weight"], unet_weights(tmp_path / "plain")["conv_in.weight"])
