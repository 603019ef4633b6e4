"""Social Reward training on the tiny OpenAI-layout CLIP and a synthetic triplet set with a visual cue."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from reward.openai_clip import make_tiny_openai_clip, read_openai_state_dict
from reward.synthetic_triplets import make_synthetic_triplets
from reward.train_config import TrainRewardConfig
from sr_finetune.config import load_config
from sr_finetune.errors import ConfigError, UserError
from conftest import launch_two_cpu_processes, reset_accelerate_state

WEIGHTS = "social_reward.safetensors"


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return make_tiny_openai_clip(tmp_path_factory.mktemp("clip") / "tiny.pt", seed=0)


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory) -> Path:
    """The tiny CLIP at 64 px (patch 16): the same code paths for a fraction of the compute."""
    from reward.openai_clip import TINY_OPENAI_CLIP

    return make_tiny_openai_clip(tmp_path_factory.mktemp("clip64") / "tiny64.pt", seed=0, config={**TINY_OPENAI_CLIP, "image_size": 64, "patch_size": 16})


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    """12 prompts x 1 triplet: 6 train, 3 val, 3 test."""
    return make_synthetic_triplets(tmp_path_factory.mktemp("small"), prompts=12, triplets_per_prompt=1, seed=1)


@pytest.fixture(scope="module")
def cue_set(tmp_path_factory) -> Path:
    """20 prompts x 2 triplets (20 train, 10 val, 10 test; the preferred image has a bright frame),
    plus three bad train rows: a missing file, the same image twice, an undecodable PNG."""
    root = tmp_path_factory.mktemp("cue")
    table_path = make_synthetic_triplets(root, prompts=20, triplets_per_prompt=2, seed=0)
    table = pd.read_parquet(table_path)
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    first = table.iloc[0]
    bad = [
        dict(first, triplet_id=100, prompt_id="bad0", neg_image_id="gone", neg_path="images/gone.png"),
        dict(first, triplet_id=101, prompt_id="bad1", neg_image_id=first.pos_image_id, neg_path=first.pos_path),
        dict(first, triplet_id=102, prompt_id="bad2", neg_image_id="broken", neg_path="images/broken.png"),
    ]
    pd.concat([table, pd.DataFrame(bad)], ignore_index=True).to_parquet(table_path, index=False)
    return table_path


def settings(triplets: Path, base_model: Path, out: Path, **overrides) -> TrainRewardConfig:
    values = dict(
        triplets=str(triplets), base_model=str(base_model), output_dir=str(out), batch_size=7, num_epochs=2, learning_rate=1e-3,
        num_workers=0, eval_batch_size=16, checkpointing_steps=2, device="cpu", seed=0,
    )
    values.update(overrides)
    cfg = TrainRewardConfig(**values)
    cfg.validate()
    return cfg


@pytest.fixture(scope="module")
def trained(cue_set, tiny_clip, tmp_path_factory):
    """One uninterrupted run: 2 epochs of 3 batches (21 train triplets pass the up-front checks; batch 7)."""
    from reward.train import run_train_reward

    out = tmp_path_factory.mktemp("trained") / "reward"
    summary = run_train_reward(settings(cue_set, tiny_clip, out))
    reset_accelerate_state()
    return summary, out


def test_training_on_the_visual_cue_lifts_held_out_pairwise_accuracy_above_90_percent(trained):
    summary, out = trained
    report = json.loads((out / "training_summary.json").read_text())
    assert summary.global_step == 6 and summary.initial_val_accuracy <= 0.75
    assert summary.best["val_accuracy"] > 0.9 and summary.test["accuracy"] > 0.9 and summary.test["triplets"] == 10
    assert report["best_val_accuracy"] == summary.best["val_accuracy"] and report["best_epoch"] == summary.best["epoch"] + 1
    assert [v["step"] for v in report["validations"]] == [0, 3, 6]  # before training and after every epoch
    assert report["trainable_parameters"] == summary.trainable_parameters and "visual blocks 1 of 2, text blocks 1 of 2" in report["trainable"]
    assert report["config"]["loss"] == "triplet" and report["config"]["margin"] == 0.3
    assert "## Use" in (out / "README.md").read_text()


def test_bad_rows_are_skipped_and_counted_by_reason(trained):
    summary, out = trained
    assert summary.skips["train"] == {"missing image file": 1, "positive and negative are the same image": 1, "unreadable image": 1}
    assert summary.skips["val"] == {} and json.loads((out / "training_summary.json").read_text())["skipped"] == summary.skips


def test_saved_weights_are_an_openai_layout_state_dict_with_only_the_preset_trained(trained, tiny_clip):
    from reward.openai_clip import build_openai_clip, openai_clip_config

    _, out = trained
    saved, base = load_file(out / WEIGHTS), read_openai_state_dict(tiny_clip)
    model = build_openai_clip(openai_clip_config(base))
    model.load_state_dict(saved, strict=True)  # what the authors' validate.py does with an OpenAI clip model
    assert saved.keys() == base.keys() and all(t.dtype == torch.float32 for t in saved.values())
    changed = {k for k in base if not torch.equal(saved[k], base[k].float())}
    assert "text_projection" in changed and "visual.ln_post.weight" in changed
    assert all(k.startswith(("visual.transformer.resblocks.1.", "transformer.resblocks.1.", "visual.ln_post", "ln_final", "text_projection")) for k in changed)
    assert "visual.proj" not in changed  # not trained in the paper's preset


def test_sr_finetune_score_gives_the_validation_scores_of_the_saved_weights(trained, tmp_path):
    from sr_finetune.commands.cli import main

    _, out = trained
    val = pd.read_parquet(out / "val_scores.parquet")
    table = read_val_images(out)
    table.to_csv(tmp_path / "images.csv", index=False)
    assert main(["score", f"image_table={tmp_path / 'images.csv'}", "metrics=[social_reward]", f"weights={{social_reward: '{out / WEIGHTS}'}}", f"output_dir={tmp_path / 'scores'}", "num_workers=0", "device=cpu"]) == 0
    scored = pd.read_parquet(tmp_path / "scores" / "scores.parquet").set_index("image_id").social_reward
    np.testing.assert_allclose(scored[val.pos_image_id].to_numpy(), val.pos_score.to_numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(scored[val.neg_image_id].to_numpy(), val.neg_score.to_numpy(), rtol=0, atol=1e-5)
    assert len(val) == 10


def read_val_images(out: Path) -> pd.DataFrame:
    from reward.triplets import read_triplets

    config = load_config(TrainRewardConfig, out / "config.yaml")
    rows = read_triplets(config.triplets, "val")
    return pd.concat(
        [rows[["pos_image_id", "pos_path", "prompt"]].set_axis(["image_id", "path", "prompt"], axis=1), rows[["neg_image_id", "neg_path", "prompt"]].set_axis(["image_id", "path", "prompt"], axis=1)]
    )


def test_a_run_interrupted_mid_epoch_and_resumed_ends_with_the_uninterrupted_weights(trained, cue_set, tiny_clip, tmp_path, monkeypatch):
    import reward.train as train_module

    straight_summary, straight = trained
    real_loss, calls = train_module.preference_loss, []

    def crash_at_step_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("simulated crash")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "preference_loss", crash_at_step_5)
    out = tmp_path / "reward"
    with pytest.raises(KeyboardInterrupt):
        train_module.run_train_reward(settings(cue_set, tiny_clip, out))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    reset_accelerate_state()
    calls.clear()
    resumed = train_module.run_train_reward(settings(cue_set, tiny_clip, out, resume_from_checkpoint="latest"))

    assert resumed.resumed_from == str(out / "checkpoint-4") and resumed.steps_run == 2 and len(calls) == 2  # steps 5-6, none replayed
    assert resumed.best == straight_summary.best and resumed.test == straight_summary.test
    for name in (WEIGHTS, "checkpoint-6/model.safetensors"):
        a, b = load_file(out / name), load_file(straight / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_loss_ablation_prints_a_table_of_val_and_test_accuracy_per_loss(small_set, small_clip, tmp_path, caplog):
    import logging

    from sr_finetune.commands.cli import main

    caplog.set_level(logging.INFO, logger="sr_finetune")
    args = ["train-reward", f"triplets={small_set}", f"base_model={small_clip}", f"output_dir={tmp_path / 'runs'}", "ablation=true", "max_train_steps=1",
            "batch_size=3", "learning_rate=1e-3", "num_workers=0", "checkpointing_steps=0", "device=cpu"]
    assert main(args) == 0
    table = (tmp_path / "runs" / "ablation.md").read_text().splitlines()
    assert "\n".join(table) in caplog.text  # the command prints it
    assert table[0] == "| Loss | Val pairwise accuracy (%) | Test pairwise accuracy (%) |"
    assert [line.split(" | ")[0] for line in table[2:]] == ["| Triplet", "| InfoNCE", "| Supervised contrastive", "| Binary cross-entropy", "| Reweighted cross-entropy"]
    results = pd.read_csv(tmp_path / "runs" / "ablation.csv")
    assert results[["val_accuracy", "test_accuracy"]].notna().all().all()  # every loss trained without NaN
    for loss in results.loss:
        assert (tmp_path / "runs" / "ablation" / loss / WEIGHTS).is_file()


def test_two_cpu_processes_train_one_model(small_set, small_clip, tmp_path):
    from conftest import REPO

    out = tmp_path / "reward"
    config = tmp_path / "reward.yaml"
    config.write_text(
        f"train_reward:\n  triplets: {small_set}\n  base_model: {small_clip}\n  output_dir: {out}\n  batch_size: 2\n  max_train_steps: 2\n"
        "  num_workers: 1\n  checkpointing_steps: 1\n  learning_rate: 0.001\n"
    )
    result = launch_two_cpu_processes(["recipes/train_reward.py", "--config", str(config), "device=cpu"], port=29523, PYTHONPATH=str(REPO))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes x batch 2" in result.stderr
    report = json.loads((out / "training_summary.json").read_text())
    assert report["processes"] == 2 and report["global_step"] == 2 and (out / WEIGHTS).is_file()
    assert [v["val_triplets"] for v in report["validations"]] == [3, 3]  # each val triplet scored once across both processes
    assert (out / "checkpoint-2" / "random_states_1.pkl").exists()


def test_bf16_autocast_run_trains_and_keeps_fp32_weights(small_set, small_clip, tmp_path):
    from reward.train import run_train_reward

    out = tmp_path / "reward"
    summary = run_train_reward(settings(small_set, small_clip, out, mixed_precision="bf16", max_train_steps=2, batch_size=3, checkpointing_steps=0))
    assert summary.global_step == 2 and np.isfinite(summary.best["val_accuracy"])
    saved, base = load_file(out / WEIGHTS), read_openai_state_dict(small_clip)
    assert all(t.dtype == torch.float32 for t in saved.values()) and not torch.equal(saved["text_projection"], base["text_projection"].float())


def test_gradient_checkpointing_gives_the_same_gradients(small_clip):
    from reward.losses import preference_loss
    from reward.train import TripletEncoder, load_clip_for_training
    from reward.trainable import apply_preset

    grads = []
    for checkpointing in (False, True):
        model, scorer = load_clip_for_training(str(small_clip))
        params = apply_preset(model, "all")
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(0)
        pos, neg = torch.randn(3, 3, 64, 64), torch.randn(3, 3, 64, 64)
        text, p, n = TripletEncoder(model)(scorer.tokenize(["a red circle", "a blue square on a grey background", "x"]), pos, neg)
        preference_loss("triplet", text, p, n, margin=0.3).mean().backward()
        grads.append([param.grad for param in params])
    assert all(a is not None for a in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss=hinge", "train_reward.loss: must be one of"),
        ("trainable=top", "train_reward.trainable: must be one of"),
        ("ablation_losses=[triplet,focal]", "train_reward.ablation_losses: must name some of"),
        ("test_split=val", "train_reward.val_split: train, val and test splits must differ"),
        ("ablation=true resume_from_checkpoint=runs/reward/checkpoint-4", "train_reward.resume_from_checkpoint: with ablation=true use 'latest'"),
    ],
)
def test_bad_settings_are_one_line_config_errors(override, message):
    from sr_finetune.commands.experiment import ExperimentConfig

    with pytest.raises(ConfigError, match=message) as err:
        load_config(ExperimentConfig, None, ["triplets=t.parquet", *override.split()], section="train_reward")
    assert len(str(err.value).splitlines()) == 1


def test_a_run_without_triplets_is_a_one_line_config_error_before_any_model_loads(tiny_clip, tmp_path, monkeypatch):
    import reward.train as train_module

    monkeypatch.setattr(train_module, "load_clip_for_training", lambda *a: pytest.fail("a model was loaded"))
    cfg = settings(tmp_path / "t.parquet", tiny_clip, tmp_path / "out")
    cfg.triplets = None
    with pytest.raises(ConfigError, match="train_reward.triplets: required") as err:
        train_module.run_train_reward(cfg)
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.drop(columns=["neg_path", "split"]), r"missing column\(s\) neg_path, split"),
        (lambda t: t.assign(triplet_id=t.triplet_id.clip(upper=5)), r"triplet_id 5 appears more than once \(18 repeats\)"),
        (lambda t: t[t.split != "val"], r"has no rows in split 'val' \(rows per split: train 12, test 6\)"),
        (lambda t: t.assign(prompt=" "), r"no usable triplets in split 'train' .* \(all 12 skipped: 12 blank prompt"),
    ],
)
def test_unusable_tables_are_one_line_errors_before_any_model_loads(change, message, tmp_path, monkeypatch):
    import reward.train as train_module

    path = make_synthetic_triplets(tmp_path, prompts=24, triplets_per_prompt=1, seed=2)
    change(pd.read_parquet(path)).to_parquet(path, index=False)
    monkeypatch.setattr(train_module, "load_clip_for_training", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(UserError, match=message) as err:
        train_module.run_train_reward(settings(path, tmp_path / "none.pt", tmp_path / "out"))
    assert len(str(err.value).splitlines()) == 1
