"""Training the world's base model and CLIP at toy sizes: files, exact resume, packing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sr_finetune.errors import UserError
from sr_finetune.world import train_base as tb
from sr_finetune.world.assets import materialize_pipeline, pack_pipeline, world_token_ids
from sr_finetune.world.base_model import WorldModelSpec
from sr_finetune.world.train_base import BaseTrainConfig, export_checkpoint, train_base

TOY = WorldModelSpec(vae_channels=(8, 16), unet_channels=(8, 16), unet_heads=(1, 2), text_width=16, text_heads=2, text_intermediate=32, norm_num_groups=4)


def toy_config(out, **kw) -> BaseTrainConfig:
    return BaseTrainConfig(str(out), vae_steps=2, vae_batch_size=2, steps=4, batch_size=2, warmup_steps=1, checkpoint_every=2, threads=1, spec=TOY, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    return out, train_base(toy_config(out))


def unet_weights(model_dir):
    return load_file(str(model_dir / "unet" / "diffusion_pytorch_model.safetensors"))


def test_train_base_writes_an_sd_pipeline_that_generates(trained):
    from diffusers import StableDiffusionPipeline

    out, model = trained
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"} <= {p.name for p in model.iterdir()}
    pipe = StableDiffusionPipeline.from_pretrained(model)
    assert pipe.tokenizer.model_max_length == tb.CONTEXT_LENGTH and pipe.vae.config.scaling_factor != 0.18215
    image = pipe("two small red circles on a blue background", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    assert json.loads((out / "checkpoint" / "state.json").read_text()) == {"phase": "unet", "step": 4, "scaling_factor": pytest.approx(pipe.vae.config.scaling_factor)}


def test_an_interrupted_run_resumes_to_the_uninterrupted_weights(trained, tmp_path, monkeypatch):
    _, model = trained
    saves = []
    original = tb.Checkpoint.save

    def save_then_crash(self, state, models, optimizer):
        original(self, state, models, optimizer)
        saves.append(state)
        if state == {"phase": "unet", "step": 2, "scaling_factor": state.get("scaling_factor")}:
            raise KeyboardInterrupt

    monkeypatch.setattr(tb.Checkpoint, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_base(toy_config(tmp_path))
    monkeypatch.setattr(tb.Checkpoint, "save", original)
    resumed = train_base(toy_config(tmp_path), resume=True)
    expected, got = unet_weights(model), unet_weights(resumed)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_resume_refuses_changed_settings_and_a_fresh_run_refuses_an_existing_checkpoint(trained):
    out, _ = trained
    with pytest.raises(UserError, match="pass --resume"):
        train_base(toy_config(out))
    with pytest.raises(UserError, match="settings differ.*lr"):
        train_base(toy_config(out, lr=1.0), resume=True)


def test_export_checkpoint_writes_the_checkpoint_weights(trained, tmp_path):
    out, model = trained
    expected = unet_weights(model)
    exported = unet_weights(export_checkpoint(out))
    assert all(torch.equal(expected[k], exported[k]) for k in expected)


def test_packed_pipeline_keeps_only_world_tokens_and_materializes_equivalent_outputs(trained, tmp_path):
    from diffusers import StableDiffusionPipeline

    _, model = trained
    packed = pack_pipeline(model, tmp_path / "assets")
    state = load_file(str(packed))
    (embedding,) = [v for k, v in state.items() if k.endswith("token_embedding.weight")]
    assert embedding.shape == (len(world_token_ids()), TOY.text_width)
    assert state["unet.conv_in.weight"].dtype == torch.float16
    a = StableDiffusionPipeline.from_pretrained(model)
    b = StableDiffusionPipeline.from_pretrained(materialize_pipeline(tmp_path / "model", tmp_path / "assets"))
    ids = a.tokenizer(["three large cyan triangles on a white striped background", ""], padding="max_length", max_length=a.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(b.text_encoder(ids)[0], a.text_encoder(ids)[0], atol=5e-3, rtol=5e-3)  # fp16 storage
    assert b.text_encoder.get_input_embeddings().weight[1000].abs().sum() == 0  # not a world token
    assert b.vae.config.scaling_factor == a.vae.config.scaling_factor


def test_a_missing_asset_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="train-base"):
        materialize_pipeline(tmp_path / "model", tmp_path / "nothing")


def test_fidelity_report_reads_generations_back_and_states_chance(trained, tmp_path):
    from sr_finetune.world.fidelity import CHANCE, format_report, measure_fidelity

    _, model = trained
    report = measure_fidelity(model, max_prompts=3, steps=2, batch_size=2, out_dir=tmp_path)
    assert (report["prompts"], report["images"]) == (3, 3) and len(list((tmp_path / "images").glob("*.png"))) == 3
    assert set(report["rates"]) == {"count", "size", "colour", "shape", "background", "texture", "all"}
    assert all(0 <= r <= 1 for r in report["rates"].values()) and report["rates"]["all"] <= min(report["rates"][a] for a in ("count", "colour", "shape"))
    assert CHANCE["all"] == pytest.approx(1 / 72)  # count x colour x shape: 1/3 x 1/8 x 1/3
    assert "chance 0.014" in format_report(report)
