import json

import open_clip
import pytest
import torch

from sr_finetune.tiny_models import SD21_BASE_SCHEDULER_CONFIG, make_tiny_sd_pipeline


def test_tiny_pipeline_loads_offline_with_sd21_classes(tiny_sd):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert type(pipe.vae).__name__ == "AutoencoderKL"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"
    assert pipe.safety_checker is None
    assert pipe.unet.config.use_linear_projection is True
    assert list(pipe.unet.config.attention_head_dim) == [2, 4]  # per-block head dims, as SD 2.1
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    assert pipe.text_encoder.config.hidden_act == "gelu"


def test_scheduler_config_is_sd21_base(tiny_sd):
    saved = json.loads((tiny_sd / "scheduler" / "scheduler_config.json").read_text())
    for key, value in SD21_BASE_SCHEDULER_CONFIG.items():
        assert saved[key] == value, key
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_pretrained(tiny_sd, subfolder="scheduler")
    assert ddim.config.set_alpha_to_one is False and ddim.config.steps_offset == 1


def test_tokenizer_matches_open_clip_on_a_real_prompt(tiny_sd):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    prompt = "portrait of a distinguished older gentleman in a vintage study, 8K, hyper-realistic, cinematic"
    ours = tok(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    ref = open_clip.tokenize([prompt])[0].tolist()
    n = ref.index(49407) + 1
    assert ours[:n] == ref[:n]
    assert ours[n:] == [0] * (77 - n)  # SD 2.x pads with "!" (id 0), like open_clip's zeros
    assert len(tok) == 49408


def test_same_seed_gives_identical_weights_and_another_seed_differs(tmp_path):
    a = make_tiny_sd_pipeline(tmp_path / "a", seed=3)
    b = make_tiny_sd_pipeline(tmp_path / "b", seed=3)
    c = make_tiny_sd_pipeline(tmp_path / "c", seed=4)
    name = "unet/diffusion_pytorch_model.safetensors"
    assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / name).read_bytes() != (c / name).read_bytes()
    total = sum(f.stat().st_size for f in a.rglob("*") if f.is_file())
    assert total < 25 * 2**20


def test_cli_writes_tiny_model(tmp_path):
    from sr_finetune.commands.cli import main

    assert main(["tiny-model", str(tmp_path / "m"), "--seed", "1"]) == 0
    assert (tmp_path / "m" / "model_index.json").is_file()
    assert (tmp_path / "m" / "text_encoder" / "model.safetensors").is_file()


def test_load_components_gives_training_parts(tiny_sd):
    from sr_finetune.models import load_components

    parts = load_components(str(tiny_sd))
    assert type(parts.noise_scheduler).__name__ == "DDPMScheduler"
    ids = parts.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    hidden = parts.text_encoder(ids)[0]
    assert hidden.shape == (1, 77, 32)
    assert torch.isfinite(hidden).all()
