"""The fine-tuning stage on a tiny SD-2.1-shaped model at 32 px: a handful of CPU steps per test."""

from __future__ import annotations

import importlib.util
import json

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sr_finetune.config import load_config
from sr_finetune.errors import ConfigError, MissingDependencyError, UserError
from sr_finetune.training import FinetuneConfig, LoraSettings, run_finetune
from sr_finetune.training import trainer as trainer_module
from sr_finetune.training.trainer import build_optimizer
from sr_finetune.training.losses import min_snr_weights, snr
from conftest import launch_two_cpu_processes, reset_accelerate_state

NEG = "t@y quality"


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def tiny_cfg(model: Path, data: Path, out: Path, **overrides) -> FinetuneConfig:
    settings = dict(
        model=str(model), dataset=str(data), output_dir=str(out), resolution=32, train_batch_size=2, max_train_steps=2,
        unet_lr=1e-3, text_encoder_lr=1e-3, dataloader_num_workers=0, report_to="none", checkpointing_steps=0, seed=0,
    )
    settings.update(overrides)
    cfg = FinetuneConfig(**settings)
    cfg.validate()
    return cfg


def unet_weights(folder: Path) -> dict:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def text_encoder_weights(folder: Path) -> dict:
    return load_file(folder / "text_encoder" / "model.safetensors")


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def assert_changed(trained: dict, base: dict) -> None:
    assert trained.keys() == base.keys()
    assert any(not torch.equal(trained[k], base[k]) for k in base)


def test_saved_pipeline_loads_generates_and_has_trained_unet_and_text_encoder(tiny_sd, finetune_set, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline
    from huggingface_hub import HfApi

    def no_network(*args, **kwargs):
        raise AssertionError("push_to_hub is off by default: nothing may be uploaded")

    monkeypatch.setattr(HfApi, "upload_folder", no_network)
    monkeypatch.setattr(HfApi, "create_repo", no_network)
    out = tmp_path / "ft"
    summary = run_finetune(tiny_cfg(tiny_sd, finetune_set, out))

    assert summary.global_step == 2 and summary.steps_run == 2 and np.isfinite(summary.final_loss)
    assert summary.role_counts == {"chosen": 4, "rejected": 4, "regularization": 2}
    assert_changed(unet_weights(out), unet_weights(tiny_sd))
    assert_changed(text_encoder_weights(out), text_encoder_weights(tiny_sd))
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", negative_prompt=NEG, num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    card = (out / "README.md").read_text()
    assert "base_model:" not in card and f"a local model folder, `{tiny_sd}`" in card and f'negative_prompt="{NEG}"' in card
    assert "| chosen | 4 |" in card and "| regularization | 2 |" in card and "| unet_lr | 0.001 |" in card
    assert json.loads((out / "sampling.json").read_text()) == {"negative_prompt": NEG}  # sft trained the token: evaluate samples with it
    assert load_config(FinetuneConfig, out / "config.yaml").max_train_steps == 2  # resolved config round-trips


def test_frozen_text_encoder_is_saved_unchanged(tiny_sd, finetune_set, tmp_path):
    out = tmp_path / "ft"
    run_finetune(tiny_cfg(tiny_sd, finetune_set, out, train_text_encoder=False))
    assert_same(text_encoder_weights(out), text_encoder_weights(tiny_sd))
    assert_changed(unet_weights(out), unet_weights(tiny_sd))


def test_with_a_frozen_text_encoder_emptied_rows_take_the_cached_embedding_of_the_empty_caption(tiny_sd, finetune_set, tmp_path, monkeypatch):
    from transformers import CLIPTextModel, CLIPTokenizer

    from sr_finetune.training import trainer

    seen = {}

    class Recording(trainer.FinetuneDataset):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["dataset"] = self

    monkeypatch.setattr(trainer, "FinetuneDataset", Recording)
    run_finetune(tiny_cfg(tiny_sd, finetune_set, tmp_path / "ft", train_text_encoder=False, empty_prompt_share=0.5))
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    ids = tokenizer([""], max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        want = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")(ids)[0][0]
    dataset = seen["dataset"]
    torch.testing.assert_close(dataset.empty_prompt_embeds, want, rtol=0, atol=1e-6)
    items = dataset.__getitems__([(0, i) for i in range(len(dataset))])
    emptied = dataset.emptied([(0, i) for i in range(len(dataset))])
    assert any(emptied) and not all(emptied)
    assert all(torch.equal(item["prompt_embeds"], dataset.empty_prompt_embeds) == gone for item, gone in zip(items, emptied))


def test_validation_images_are_written_and_logged_with_ema_swapped_back_out(tiny_sd, finetune_set, tmp_path, monkeypatch):
    out = tmp_path / "ft"
    real_log_validation = trainer_module.log_validation
    swapped_in = []

    def spy(cfg, accelerator, *, unet, **kwargs):
        swapped_in.append(accelerator.unwrap_model(unet).conv_in.weight.detach().clone())
        return real_log_validation(cfg, accelerator, unet=unet, **kwargs)

    monkeypatch.setattr(trainer_module, "log_validation", spy)
    settings = dict(use_ema=True, ema_decay=0.5, checkpointing_steps=2)
    run_finetune(tiny_cfg(tiny_sd, finetune_set, out, validation_prompts=["a cat", "a dog"], validation_steps=1, validation_inference_steps=1, report_to="tensorboard", **settings))
    assert sorted(p.name for p in (out / "validation" / "step-000002").iterdir()) == ["00.png", "01.png"]
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    raw = load_file(out / "checkpoint-2" / "model.safetensors")
    assert torch.equal(swapped_in[1], unet_weights(out)["conv_in.weight"])  # validated with the EMA weights ...
    assert not torch.equal(raw["conv_in.weight"], swapped_in[1])

    reset_accelerate_state()
    run_finetune(tiny_cfg(tiny_sd, finetune_set, tmp_path / "no_validation", **settings))
    assert_same(raw, load_file(tmp_path / "no_validation" / "checkpoint-2" / "model.safetensors"))  # ... and trained on without them


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(tiny_sd, finetune_set, tmp_path, monkeypatch):
    # 10 rows / batch 2 = 5 batches per epoch, accumulation 2 -> steps end after batches 2, 4, 5 (epoch end), 7 ...
    # The checkpoint at step 2 is mid-epoch; steps 3-4 cross the epoch boundary.
    common = dict(
        gradient_accumulation_steps=2, checkpointing_steps=2, use_ema=True, ema_decay=0.9, random_flip=True, snr_gamma=5.0,
        noise_offset=0.1, lr_scheduler="constant_with_warmup", lr_warmup_steps=1,
    )
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_finetune(tiny_cfg(tiny_sd, finetune_set, straight, max_train_steps=4, **common))
    first = run_finetune(tiny_cfg(tiny_sd, finetune_set, stopped, max_train_steps=2, **common))
    assert first.global_step == 2

    batches_run = []
    real_compute_loss = trainer_module.compute_loss

    def counting_compute_loss(batch, **kwargs):
        batches_run.append(list(batch["prompt_id"]))
        return real_compute_loss(batch, **kwargs)

    monkeypatch.setattr(trainer_module, "compute_loss", counting_compute_loss)
    resumed = run_finetune(tiny_cfg(tiny_sd, finetune_set, stopped, max_train_steps=4, resume_from_checkpoint="latest", **common))

    assert resumed.resumed_from == str(stopped / "checkpoint-2") and resumed.steps_run == 2
    assert len(batches_run) == 3  # batch 5 of epoch 0, batches 1-2 of epoch 1: the 4 done before are skipped, not replayed
    assert_same(unet_weights(stopped), unet_weights(straight))  # EMA weights
    assert_same(text_encoder_weights(stopped), text_encoder_weights(straight))
    for name in ("model.safetensors", "model_1.safetensors"):  # raw (non-EMA) UNet and text encoder
        assert_same(load_file(stopped / "checkpoint-4" / name), load_file(straight / "checkpoint-4" / name))


def test_min_snr_weights_match_hand_computed_values():
    snrs = torch.tensor([0.5, 5.0, 20.0])
    # epsilon: min(SNR, 5) / SNR
    torch.testing.assert_close(min_snr_weights(snrs, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.25]))
    # v_prediction: min(SNR, 5) / (SNR + 1)
    torch.testing.assert_close(min_snr_weights(snrs, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5.0 / 6.0, 5.0 / 21.0]))
    alphas_cumprod = torch.tensor([0.8, 0.5, 0.2])
    torch.testing.assert_close(snr(alphas_cumprod, torch.tensor([0, 1, 2])), torch.tensor([4.0, 1.0, 0.25]))


def test_v_prediction_model_trains(finetune_set, tmp_path):
    from sr_finetune.tiny_models import TinySDSpec, make_tiny_sd_pipeline

    model = make_tiny_sd_pipeline(tmp_path / "v_model", seed=0, spec=TinySDSpec(prediction_type="v_prediction"))
    out = tmp_path / "ft"
    summary = run_finetune(tiny_cfg(model, finetune_set, out, prediction_type="v_prediction", snr_gamma=5.0))
    assert np.isfinite(summary.final_loss)
    assert '"prediction_type": "v_prediction"' in (out / "scheduler" / "scheduler_config.json").read_text()
    assert_changed(unet_weights(out), unet_weights(model))


def test_prediction_type_that_the_scheduler_lacks_is_refused(tiny_sd, finetune_set, tmp_path):
    with pytest.raises(ConfigError, match="prediction_type: config says 'v_prediction' but .* predicts 'epsilon'"):
        run_finetune(tiny_cfg(tiny_sd, finetune_set, tmp_path / "ft", prediction_type="v_prediction"))


def test_nan_loss_stops_the_run_naming_the_step_and_prompt_ids(tiny_sd, finetune_set, tmp_path, monkeypatch):
    seen = []
    real_compute_loss = trainer_module.compute_loss

    def nan_on_second_batch(batch, **kwargs):
        seen.append(list(batch["prompt_id"]))
        loss = real_compute_loss(batch, **kwargs)
        return loss * float("nan") if len(seen) == 2 else loss

    monkeypatch.setattr(trainer_module, "compute_loss", nan_on_second_batch)
    with pytest.raises(UserError, match=r"loss is nan at step 2 \(epoch 0, batch 1\)") as err:
        run_finetune(tiny_cfg(tiny_sd, finetune_set, tmp_path / "ft", max_train_steps=3))
    assert all(pid in str(err.value) for pid in seen[1])
    assert not (tmp_path / "ft" / "model_index.json").exists()


def test_checkpoints_total_limit_keeps_the_newest(tiny_sd, finetune_set, tmp_path):
    out = tmp_path / "ft"
    run_finetune(tiny_cfg(tiny_sd, finetune_set, out, max_train_steps=4, checkpointing_steps=1, checkpoints_total_limit=2))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert not list(out.glob(".tmp-checkpoint-*"))


def test_latent_cache_encodes_each_image_once(tiny_sd, finetune_set, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    encoded = []
    real_encode = AutoencoderKL.encode

    def counting_encode(self, x, *args, **kwargs):
        encoded.append(x.shape[0])
        return real_encode(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting_encode)
    summary = run_finetune(tiny_cfg(tiny_sd, finetune_set, tmp_path / "ft", max_train_steps=None, num_epochs=2))
    assert summary.global_step == 10  # 2 epochs of 5 batches
    assert sum(encoded) == 10  # the 10 rows, once each, although each was trained on twice

    encoded.clear()
    reset_accelerate_state()
    run_finetune(tiny_cfg(tiny_sd, finetune_set, tmp_path / "nocache", cache_latents=False))
    assert sum(encoded) == 4  # without the cache: every training image, every step (2 steps x batch 2)


def test_lora_run_saves_a_merged_pipeline(tiny_sd, finetune_set, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "ft"
    run_finetune(tiny_cfg(tiny_sd, finetune_set, out, lora=LoraSettings(rank=4), train_text_encoder=False, unet_lr=1e-2))
    trained, base = unet_weights(out), unet_weights(tiny_sd)
    assert trained.keys() == base.keys()  # merged: plain UNet keys, no lora_A / lora_B
    changed = {k for k in base if not torch.equal(trained[k], base[k])}
    assert changed and all(any(f".{t}." in k for t in ("to_q", "to_k", "to_v", "to_out.0")) for k in changed)
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a cat", num_inference_steps=1, height=32, width=32).images[0].size == (32, 32)


def test_two_processes_train_one_model(tiny_sd, finetune_set, tmp_path):
    out = tmp_path / "ft"
    config = tmp_path / "finetune.yaml"
    config.write_text(
        f"model: {tiny_sd}\ndataset: {finetune_set}\noutput_dir: {out}\nresolution: 32\ntrain_batch_size: 2\n"
        "max_train_steps: 2\ndataloader_num_workers: 0\nreport_to: none\ncheckpointing_steps: 1\nuse_ema: true\n"
    )
    result = launch_two_cpu_processes(["-m", "sr_finetune.training", "--config", str(config)], port=29519)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes x batch 2" in result.stderr
    assert sorted(p.name.split("-", 2)[2] for p in (out / "cache").glob("encoded-*.arrow")) == ["00000-of-00002.arrow", "00001-of-00002.arrow"]
    assert (out / "checkpoint-2" / "random_states_1.pkl").exists()  # rank 1 saved its RNG state
    assert_changed(unet_weights(out), unet_weights(tiny_sd))


@pytest.mark.parametrize(
    "override, message",
    [
        ("train_unet=false train_text_encoder=false", "nothing to train"),
        ("lora.rank=4 train_unet=false", "lora.rank: LoRA adapts the UNet"),
        ("center_crop=false", "cache_latents: cache_latents=true needs center_crop=true"),
        ("push_to_hub=true", "hub_model_id: push_to_hub=true needs hub_model_id"),
        ("push_to_hub=true hub_model_id=me/tiny--sr", "hub_model_id: 'me/tiny--sr' is not a hub repo id"),
        ("optimizer=sgd", "optimizer: must be one of"),
        ("prediction_type=sample", "prediction_type: must be one of"),
        ("empty_prompt_share=1.0", "empty_prompt_share: must be in"),
    ],
)
def test_bad_settings_are_one_line_config_errors(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(FinetuneConfig, None, override.split())
    assert len(str(err.value).splitlines()) == 1


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    cfg = FinetuneConfig(optimizer="adamw8bit")
    with pytest.raises(MissingDependencyError, match=r"pip install 'sr-finetune\[bnb\]'"):
        trainer_module.build_optimizer(cfg, [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-5}], torch.device("cpu"))


def test_dataset_without_a_role_column_is_refused(tiny_sd, tmp_path):
    from datasets import Dataset

    path = tmp_path / "bad"
    Dataset.from_dict({"text": ["a"], "prompt_id": ["p"], "score": [1.0]}).save_to_disk(str(path))
    with pytest.raises(UserError, match=r"lacks column\(s\) \['image', 'role'\]"):
        run_finetune(tiny_cfg(tiny_sd, path, tmp_path / "ft"))


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed (pip install -e '.[dev]' installs it)")
def test_eight_bit_adamw_trains_and_resumes_to_the_weights_of_an_uninterrupted_run(tiny_sd, finetune_set, tmp_path):
    import bitsandbytes as bnb

    common = dict(optimizer="adamw8bit", checkpointing_steps=2, train_batch_size=2)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_finetune(tiny_cfg(tiny_sd, finetune_set, straight, max_train_steps=4, **common))
    run_finetune(tiny_cfg(tiny_sd, finetune_set, stopped, max_train_steps=2, **common))
    resumed = run_finetune(tiny_cfg(tiny_sd, finetune_set, stopped, max_train_steps=4, resume_from_checkpoint="latest", **common))
    assert resumed.resumed_from == str(stopped / "checkpoint-2") and resumed.steps_run == 2
    assert_same(unet_weights(stopped), unet_weights(straight))
    assert_same(text_encoder_weights(stopped), text_encoder_weights(straight))
    start, trained = unet_weights(tiny_sd), unet_weights(straight)
    assert any(not torch.equal(start[k], trained[k]) for k in start)
    cfg = tiny_cfg(tiny_sd, finetune_set, tmp_path / "x", **common)
    assert isinstance(build_optimizer(cfg, [{"params": [torch.nn.Parameter(torch.ones(8192))], "lr": 1e-3}], torch.device("cpu")), bnb.optim.AdamW8bit)


def test_resume_with_another_batch_size_is_refused(tiny_sd, finetune_set, tmp_path):
    out = tmp_path / "ft"
    run_finetune(tiny_cfg(tiny_sd, finetune_set, out, max_train_steps=1))
    reset_accelerate_state()
    with pytest.raises(UserError, match="checkpoint was written with 10 rows, batch 2 x 1 processes, accumulation 1, this run has 10 rows, batch 3"):
        run_finetune(tiny_cfg(tiny_sd, finetune_set, out, max_train_steps=2, train_batch_size=3, resume_from_checkpoint="latest"))


def test_batched_fetch_reads_cached_arrays_exactly_as_datasets_does(tmp_path):
    import pickle

    from datasets import Array2D, Array3D, Dataset, Features, Value, concatenate_datasets

    from sr_finetune.training.data import FinetuneDataset, derive_seed

    rng = np.random.default_rng(0)
    latents = ("latent_mean", "latent_logvar", "latent_mean_flipped", "latent_logvar_flipped")
    arrays = {**{n: Array3D(shape=(4, 2, 2), dtype="float32") for n in latents}, "prompt_embeds": Array2D(shape=(3, 2), dtype="float32")}
    features = Features({"text": Value("string"), "role": Value("string"), "prompt_id": Value("string"), **arrays})
    parts = []
    for part in range(3):  # three memory-mapped files: several arrow chunks
        rows = {"text": [f"t{part}{i}" for i in range(5)], "role": ["chosen"] * 5, "prompt_id": [f"p{part}{i}" for i in range(5)]}
        rows.update({n: rng.normal(size=(5, *f.shape)).astype("float32") for n, f in arrays.items()})
        Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / f"part{part}"))
        parts.append(Dataset.load_from_disk(str(tmp_path / f"part{part}")))
    table = concatenate_datasets(parts)
    table.set_format("torch", columns=list(arrays), output_all_columns=True)
    dataset = FinetuneDataset(table, tokenizer=None, resolution=4, center_crop=True, random_flip=True, seed=0)
    assert sorted(dataset.arrays.names) == sorted(arrays)  # read from arrow directly, not through datasets' formatter

    keys = [(1, i) for i in (14, 0, 7, 5, 9, 3, 12, 1)]
    items = pickle.loads(pickle.dumps(dataset)).__getitems__(keys)  # as a DataLoader worker sees it
    flips = []
    for (epoch, index), item in zip(keys, items):
        flip = bool(torch.rand(1, generator=torch.Generator().manual_seed(derive_seed(0, "augment", epoch, index))) < 0.5)
        suffix = "_flipped" if flip else ""
        row = table[index]
        assert torch.equal(item["latent_mean"], row[f"latent_mean{suffix}"]) and torch.equal(item["latent_logvar"], row[f"latent_logvar{suffix}"])
        assert torch.equal(item["prompt_embeds"], row["prompt_embeds"])
        assert item["prompt_id"] == row["prompt_id"] and item["role"] == "chosen"
        flips.append(flip)
    assert any(flips) and not all(flips)


def test_empty_prompt_share_empties_a_seeded_share_of_captions_or_their_cached_embeddings(tmp_path):
    from datasets import Array2D, Array3D, Dataset, Features, Value

    from sr_finetune.training.data import FinetuneDataset, derive_seed

    class Tokenizer:  # one id per caption, its length: what the dataset tokenized, row by row
        model_max_length = 1

        def __call__(self, texts, **kwargs):
            return type("Encoded", (), {"input_ids": torch.tensor([[len(t)] for t in texts])})

    n = 400
    rows = {"text": [f"caption {i:03d}" for i in range(n)], "role": ["chosen"] * n, "prompt_id": [str(i) for i in range(n)]}
    arrays = {"latent_mean": Array3D(shape=(1, 1, 1), dtype="float32"), "latent_logvar": Array3D(shape=(1, 1, 1), dtype="float32"), "prompt_embeds": Array2D(shape=(1, 2), dtype="float32")}
    embeds = np.arange(n * 2, dtype="float32").reshape(n, 1, 2) + 1
    values = {"latent_mean": np.zeros((n, 1, 1, 1), "float32"), "latent_logvar": np.zeros((n, 1, 1, 1), "float32"), "prompt_embeds": embeds}
    features = Features({"text": Value("string"), "role": Value("string"), "prompt_id": Value("string"), **arrays})
    Dataset.from_dict({**rows, **values}, features=features).save_to_disk(str(tmp_path / "cached"))
    cached = Dataset.load_from_disk(str(tmp_path / "cached"))
    keys = [(2, i) for i in range(n)]
    expected = [bool(torch.rand(1, generator=torch.Generator().manual_seed(derive_seed(7, "empty-prompt", 2, i))) < 0.25) for i in range(n)]
    assert 0.18 < np.mean(expected) < 0.32

    texts = FinetuneDataset(cached.remove_columns("prompt_embeds"), Tokenizer(), 4, True, False, seed=7, empty_prompt_share=0.25)
    assert texts.emptied(keys) == expected  # seeded per (epoch, row): a resume empties the same rows
    assert texts.emptied([(3, i) for i in range(n)]) != expected  # another epoch, another draw
    ids = [int(item["input_ids"][0]) for item in texts.__getitems__(keys)]
    assert ids == [0 if gone else len(rows["text"][i]) for i, gone in enumerate(expected)]
    assert FinetuneDataset(cached, Tokenizer(), 4, True, False, seed=7).emptied(keys) == [False] * n

    empty = torch.tensor([[-1.0, -1.0]])
    with_cache = FinetuneDataset(cached, None, 4, True, False, seed=7, empty_prompt_share=0.25, empty_prompt_embeds=empty)
    for (_, index), item, gone in zip(keys, with_cache.__getitems__(keys), expected):
        assert torch.equal(item["prompt_embeds"], empty if gone else torch.from_numpy(embeds[index]))


def test_compiled_models_under_accelerate_dynamo_train_checkpoint_resume_and_save(tiny_sd, finetune_set, tmp_path, monkeypatch):
    # 'accelerate launch --dynamo_backend X' sets this; the eager backend runs dynamo's graphs without codegen
    common = dict(checkpointing_steps=1, use_ema=True, ema_decay=0.5, validation_prompts=["a cat"], validation_steps=2, validation_inference_steps=1)
    plain = tmp_path / "plain"
    run_finetune(tiny_cfg(tiny_sd, finetune_set, plain, max_train_steps=3, **common))
    reset_accelerate_state()
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "EAGER")
    compiled_models, real_compile = [], torch.compile

    def counting_compile(model, **kwargs):
        compiled_models.append(type(model).__name__)
        return real_compile(model, **kwargs)

    monkeypatch.setattr(torch, "compile", counting_compile)
    compiled = tmp_path / "compiled"
    run_finetune(tiny_cfg(tiny_sd, finetune_set, compiled, max_train_steps=2, **common))
    reset_accelerate_state()
    resumed = run_finetune(tiny_cfg(tiny_sd, finetune_set, compiled, max_train_steps=3, resume_from_checkpoint="latest", **common))
    assert resumed.steps_run == 1 and compiled_models == ["UNet2DConditionModel", "CLIPTextModel"] * 2
    checkpoint = load_file(compiled / "checkpoint-3" / "model.safetensors")
    assert not any("_orig_mod" in k for k in checkpoint)  # the checkpoint names the model's own weights
    torch.testing.assert_close(unet_weights(compiled), unet_weights(plain), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(text_encoder_weights(compiled), text_encoder_weights(plain), rtol=1e-5, atol=1e-6)
