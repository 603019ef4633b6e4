"""The real SD 2.1 architectures offline: the shipped configs, their sizes, the tiny factory's
kinship with them, and the random-weight writer behind ``sr-finetune real-size-model``.

Real-size models are only ever built on the meta device here; the writer is tested through the
same code path with the published configs shrunk in width (``shrunk``)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from sr_finetune import real_size
from sr_finetune.real_size import PUBLISHED_PARAMETERS, VARIANTS, build_model, parameter_counts, real_size_configs, write_random_pipeline

HUB_FILES = [
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "scheduler/scheduler_config.json",
]
FP16_FILES = [
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "text_encoder/model.fp16.safetensors",
]


def shrunk(variant: str) -> dict[str, dict]:
    """The published configs of ``variant`` at tiny widths and depths; every other setting
    (block types, linear projections, upcasting, sample sizes, tokenizer, scheduler) as published."""
    configs = real_size_configs(variant)
    configs["unet"].update(block_out_channels=[32, 32, 64, 64], attention_head_dim=[2, 2, 4, 4], layers_per_block=1, cross_attention_dim=32)
    configs["vae"].update(block_out_channels=[32, 32, 32, 32], layers_per_block=1)
    configs["text_encoder"].update(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
    return configs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_shipped_configs_give_the_published_parameter_counts(variant):
    assert parameter_counts(real_size_configs(variant)) == PUBLISHED_PARAMETERS


def test_real_size_models_are_built_on_the_meta_device_without_memory():
    unet = build_model("unet", real_size_configs("2-1")["unet"], empty=True)
    assert {p.device.type for p in unet.parameters()} == {"meta"}


@pytest.mark.parametrize(
    "variant, sample_size, upcast, scheduler, prediction",
    [("2-1-base", 64, False, "PNDMScheduler", "epsilon"), ("2-1", 96, True, "DDIMScheduler", "v_prediction")],
)
def test_shipped_configs_hold_the_published_settings(variant, sample_size, upcast, scheduler, prediction):
    c = real_size_configs(variant)
    unet, vae, text, tok, sched = c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"]
    assert unet["block_out_channels"] == [320, 640, 1280, 1280] and unet["attention_head_dim"] == [5, 10, 20, 20]
    assert unet["cross_attention_dim"] == 1024 and unet["use_linear_projection"] is True
    assert unet["sample_size"] == sample_size and unet["upcast_attention"] is upcast
    assert vae["block_out_channels"] == [128, 256, 512, 512] and vae["scaling_factor"] == 0.18215
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"], text["intermediate_size"]) == (1024, 23, 16, 4096)
    assert (text["hidden_act"], text["projection_dim"], text["max_position_embeddings"], text["vocab_size"]) == ("gelu", 512, 77, 49408)
    assert (tok["tokenizer_class"], tok["pad_token"], tok["model_max_length"]) == ("CLIPTokenizer", "!", 77)
    assert sched["_class_name"] == scheduler and c["model_index"]["scheduler"] == ["diffusers", scheduler]
    assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"]) == (0.00085, 0.012, "scaled_linear")
    assert (sched["steps_offset"], sched["clip_sample"], sched["set_alpha_to_one"], sched["prediction_type"]) == (1, False, False, prediction)


def _key_patterns(model: torch.nn.Module) -> set[str]:
    """State-dict keys with every block / layer / resnet index replaced by ``#``."""
    return {re.sub(r"\.\d+(?=\.)", ".#", key) for key in model.state_dict()}


@pytest.mark.parametrize("name", ["unet", "vae", "text_encoder"])
def test_tiny_factory_builds_the_real_classes_with_the_real_key_names(name):
    # Only the number of blocks and layers differs, which the indices absorb: the UNet and VAE
    # have 2 resolution levels of 1 resnet in the tiny spec (4 levels of 2 in the real ones), the
    # text encoder 2 layers (23). Every kind of key exists in both.
    from sr_finetune import tiny_models

    spec = tiny_models.TinySDSpec()
    tiny = getattr(tiny_models, f"build_{name}")(spec)
    real = build_model(name, real_size_configs("2-1-base")[name], empty=True)
    assert type(tiny) is type(real)
    assert _key_patterns(tiny) == _key_patterns(real)


def test_the_tiny_models_differ_from_the_real_ones_only_in_depth_and_width():
    from sr_finetune import tiny_models

    tiny = tiny_models.build_text_encoder(tiny_models.TinySDSpec())
    real = build_model("text_encoder", real_size_configs("2-1-base")["text_encoder"], empty=True)
    layers = lambda model: {int(k.split(".")[2]) for k in model.state_dict() if k.startswith("encoder.layers.")}  # noqa: E731
    assert layers(tiny) == {0, 1} and layers(real) == set(range(23))
    tiny_cfg, real_cfg = tiny.config.to_dict(), real.config.to_dict()
    differing = {k for k in real_cfg if k in tiny_cfg and tiny_cfg[k] != real_cfg[k] and not k.startswith("_")}
    assert differing <= {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "projection_dim", "architectures", "model_type", "dtype", "torch_dtype", "transformers_version"}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_writer_gives_the_hub_layout_and_a_folder_diffusers_loads(tmp_path, variant):
    from diffusers import StableDiffusionPipeline

    out = write_random_pipeline(tmp_path / "m", shrunk(variant), seed=0, fp16_variant=True)
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert set(HUB_FILES + FP16_FILES) <= written
    pipe = StableDiffusionPipeline.from_pretrained(out)
    published = real_size_configs(variant)
    assert type(pipe.scheduler).__name__ == published["scheduler"]["_class_name"]
    assert pipe.scheduler.config.prediction_type == published["scheduler"]["prediction_type"]
    assert pipe.unet.config.upcast_attention is published["unet"]["upcast_attention"]
    assert pipe.unet.config.sample_size == published["unet"]["sample_size"]
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.tokenizer.pad_token == "!" and pipe.tokenizer.pad_token_id == 0 and pipe.tokenizer.model_max_length == 77
    assert pipe.text_encoder.config.hidden_act == "gelu"
    index = json.loads((out / "model_index.json").read_text())
    assert {k: index[k] for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")} == {
        k: published["model_index"][k] for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    }


def test_text_encoder_file_has_the_hub_key_names_and_loads_its_weights(tmp_path):
    from safetensors import safe_open
    from transformers import CLIPTextModel

    out = write_random_pipeline(tmp_path / "m", shrunk("2-1-base"), seed=0)
    with safe_open(out / "text_encoder" / "model.safetensors", framework="pt") as f:
        assert all(key.startswith("text_model.") for key in f.keys())  # as transformers 4 wrote the hub's
        embedding = f.get_tensor("text_model.embeddings.token_embedding.weight")
    loaded = CLIPTextModel.from_pretrained(out, subfolder="text_encoder")
    assert torch.equal(loaded.get_input_embeddings().weight, embedding)


def test_fp16_variant_loads_in_half_precision_with_the_same_weights(tmp_path):
    from diffusers import StableDiffusionPipeline

    out = write_random_pipeline(tmp_path / "m", shrunk("2-1-base"), seed=0, fp16_variant=True)
    full = StableDiffusionPipeline.from_pretrained(out)
    half = StableDiffusionPipeline.from_pretrained(out, variant="fp16", torch_dtype=torch.float16)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(full, name).state_dict(), getattr(half, name).state_dict()
        assert a.keys() == b.keys()
        key = next(k for k in a if k.endswith("weight"))
        assert b[key].dtype == torch.float16
        assert torch.equal(b[key], a[key].to(torch.float16))


def test_same_seed_gives_identical_weights_and_another_seed_differs(tmp_path):
    configs = shrunk("2-1-base")
    a = write_random_pipeline(tmp_path / "a", configs, seed=5)
    b = write_random_pipeline(tmp_path / "b", configs, seed=5)
    c = write_random_pipeline(tmp_path / "c", configs, seed=6)
    for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_bytes() != (c / name).read_bytes()


def test_cli_writes_the_variant_through_the_same_writer(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from sr_finetune.commands.cli import main

    asked = []
    monkeypatch.setattr(real_size, "real_size_configs", lambda variant: asked.append(variant) or shrunk(variant))
    assert main(["real-size-model", str(tmp_path / "m"), "--variant", "2-1", "--seed", "1"]) == 0
    assert asked == ["2-1"]
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "m")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.prediction_type == "v_prediction"
    assert not (tmp_path / "m" / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()


def _refuse_to_build(*args, **kwargs):
    raise AssertionError("a model was built")


def test_cli_refuses_an_unknown_variant_in_one_line(tmp_path, monkeypatch, capsys):
    from sr_finetune.commands.cli import main

    monkeypatch.setattr(real_size, "build_model", _refuse_to_build)
    assert main(["real-size-model", str(tmp_path / "m"), "--variant", "2-2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "sr-finetune real-size-model: error: unknown variant '2-2' (expected one of 2-1-base, 2-1)"
    assert not (tmp_path / "m").exists()


def test_cli_refuses_a_non_empty_out_folder_in_one_line(tmp_path, monkeypatch, capsys):
    from sr_finetune.commands.cli import main

    monkeypatch.setattr(real_size, "build_model", _refuse_to_build)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("mine")
    assert main(["real-size-model", str(tmp_path / "m"), "--variant", "2-1-base"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not an empty folder" in err[0]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["keep.txt"]
