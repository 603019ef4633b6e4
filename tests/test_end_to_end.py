"""The README's main job: tiny world -> generate -> score -> build-pairs -> finetune -> evaluate, through the CLI."""

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from sr_finetune.commands.cli import main

TINY_YAML = REPO / "recipes" / "configs" / "tiny.yaml"
SMALL = ["generate.max_prompts=4", "generate.images_per_prompt=3", "generate.steps=3", "finetune.max_train_steps=3", "finetune.checkpointing_steps=0", "finetune.validation_prompts=[]", "finetune.report_to=none",
         "evaluate.prompt_sets.internal.max_prompts=2", "evaluate.prompt_sets.general.max_prompts=2", "evaluate.steps=3", "evaluate.bootstrap_samples=200"]


def weights(folder, component):
    return load_file(str(next((folder / component).glob("*.safetensors"))))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert main(["tiny-world", "runs/tiny"]) == 0
        assert main(["run", "--config", str(TINY_YAML), *SMALL]) == 0
    return root / "runs" / "tiny"


def test_every_stage_writes_its_output(demo_run):
    manifest = pd.read_parquet(demo_run / "generations" / "manifest.parquet")
    assert len(manifest) == 12 and manifest.prompt_id.nunique() == 4
    scores = pd.read_parquet(demo_run / "scores" / "scores.parquet")
    metrics = ["social_reward", "clip", "aesthetic", "hpsv2", "imagereward", "pickscore"]
    assert sorted(scores.image_id) == sorted(manifest.image_id)
    assert torch.isfinite(torch.tensor(scores[metrics].to_numpy())).all()
    summary = json.loads((demo_run / "pairs" / "summary.json").read_text())
    assert summary["counts"] == {"chosen": 4, "rejected": 4, "regularization": 8}
    # the chosen image of each prompt is its highest social_reward
    from datasets import load_from_disk

    pairs = load_from_disk(str(demo_run / "pairs")).to_pandas()
    best = scores.merge(manifest[["image_id", "prompt_id"]]).groupby("prompt_id").social_reward.max()
    chosen = pairs[pairs.role == "chosen"].set_index("prompt_id").score
    assert chosen.sort_index().to_numpy() == pytest.approx(best.sort_index().to_numpy(), rel=1e-6)
    assert all(t.startswith("t@y quality ") for t in pairs[pairs.role == "rejected"].text)


def test_fine_tuned_pipeline_loads_generates_and_differs_from_the_base(demo_run):
    from diffusers import StableDiffusionPipeline

    out, base = demo_run / "finetune", demo_run / "model"
    for component in ("unet", "text_encoder"):
        trained, original = weights(out, component), weights(base, component)
        assert trained.keys() == original.keys()
        assert any(not torch.equal(trained[k], original[k]) for k in trained), component
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", negative_prompt="t@y quality", num_inference_steps=2, height=32, width=32).images[0]
    assert image.size == (32, 32)


def test_run_refuses_unprefixed_overrides_and_unknown_stages(capsys):
    assert main(["run", "--config", str(TINY_YAML), "steps=3"]) == 2
    assert "overrides need their stage prefix, e.g. generate.steps=3" in capsys.readouterr().err
    assert main(["run", "--config", str(TINY_YAML), "--stages", "generate,train"]) == 2
    assert "unknown stage(s) ['train']" in capsys.readouterr().err


def test_run_refuses_a_multi_process_launch(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["run", "--config", str(TINY_YAML)]) == 2
    assert "single-process" in capsys.readouterr().err


def test_evaluation_compares_the_fine_tuned_model_with_its_base(demo_run):
    report = demo_run / "eval"
    wins = pd.read_csv(report / "tables" / "win_rates.csv")
    assert set(wins.prompt_set) == {"internal", "general"} and set(wins.model) == {"ft"}
    assert set(wins.unit) == {"image", "prompt"} and len(wins) == 2 * 6 * 2
    image_unit = wins[wins.unit == "image"]
    assert (image_unit.wins + image_unit.ties + image_unit.losses == 4).all()  # 2 prompts x 2 images
    assert (report / "report.html").stat().st_size > 10_000 and (report / "report.md").is_file()
