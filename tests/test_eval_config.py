"""The evaluate section: defaults, overrides of models and prompt sets, one-line errors."""

import json

import pytest
import yaml

from eval.config import EvaluateConfig, FinetunedSpec, ModelSpec
from sr_finetune.config import load_config
from sr_finetune.errors import ConfigError, UserError
from sr_finetune.commands.experiment import ExperimentConfig

SOCIAL_REWARD = ["weights.social_reward=sr.pt"]


def evaluate(*overrides, weights=SOCIAL_REWARD):
    return load_config(ExperimentConfig, None, [*weights, *overrides], section="evaluate").evaluate


def test_models_and_prompt_sets_come_from_overrides_with_paper_defaults():
    cfg = evaluate("finetuned.ft.path=runs/ft", "baseline.path=runs/base", "prompt_sets.general.prompts=parti", "prompt_sets.internal.prompts=held_out.txt")
    assert list(cfg.models()) == ["baseline", "ft"]
    assert cfg.finetuned["ft"].negative_prompt == "auto" and cfg.baseline.negative_prompt is None
    assert cfg.finetuned["ft"].sampling_negative_prompt() == "t@y quality"  # no sampling record in runs/ft: the Social Reward token
    assert (cfg.scheduler, cfg.steps, cfg.images_per_prompt) == ("ddim", 30, 4)
    assert len(cfg.metrics) == 6


def test_negative_prompt_is_configurable_per_model():
    cfg = evaluate("finetuned.a.path=x", "finetuned.b.path=y", "finetuned.b.negative_prompt=null", "finetuned.c.path=z", "finetuned.c.negative_prompt=blurry", "prompt_sets.g.prompts=parti")
    negatives = {name: cfg.generate_config(name, spec, "g").negative_prompt for name, spec in cfg.models().items()}
    assert negatives == {"baseline": None, "a": "t@y quality", "b": None, "c": "blurry"}


def test_auto_negative_prompt_follows_the_record_the_fine_tune_left(tmp_path):
    for name, record in (("sft", {"negative_prompt": "t@y quality"}), ("dpo", {"negative_prompt": None})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "sampling.json").write_text(json.dumps(record))
    (tmp_path / "other").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "sampling.json").write_text("[1]")
    cfg = evaluate(*(f"finetuned.{n}.path={tmp_path / n}" for n in ("sft", "dpo", "other")), f"finetuned.forced.path={tmp_path / 'dpo'}", "finetuned.forced.negative_prompt=blurry", "prompt_sets.g.prompts=parti")
    negatives = {name: cfg.generate_config(name, spec, "g").negative_prompt for name, spec in cfg.models().items()}
    assert negatives == {"baseline": None, "sft": "t@y quality", "dpo": None, "other": "t@y quality", "forced": "blurry"}
    with pytest.raises(UserError, match=r"broken/sampling.json: not a sampling record"):
        FinetunedSpec(path=str(tmp_path / "broken")).sampling_negative_prompt()


def test_every_model_gets_the_same_seed_and_sampling_settings():
    cfg = evaluate("finetuned.ft.path=x", "prompt_sets.g.prompts=parti", "seed=7", "steps=12")
    base, ft = (cfg.generate_config(name, spec, "g") for name, spec in cfg.models().items())
    for key in ("seed", "steps", "scheduler", "guidance_scale", "height", "width", "images_per_prompt", "prompts"):
        assert getattr(base, key) == getattr(ft, key), key
    assert (base.output_dir, ft.output_dir) == ("runs/eval/generations/baseline/g", "runs/eval/generations/ft/g")
    assert ft.model_name == "ft"


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["prompt_sets.g.prompts=parti"], "evaluate.finetuned"),
        (["finetuned.ft.path=x"], "evaluate.prompt_sets"),
        (["finetuned.baseline.path=x", "prompt_sets.g.prompts=parti"], "evaluate.finetuned.baseline"),
        (["finetuned.ft.path=x", "prompt_sets.g.max_prompts=3"], "evaluate.prompt_sets.g.prompts"),
        (["finetuned.ft.path=x", "prompt_sets.g.prompts=parti", "metrics=[clip,nima]"], "evaluate.metrics"),
        (["finetuned.ft.path=x", "prompt_sets.g.prompts=parti", "confidence=95"], "evaluate.confidence"),
        (["finetuned.ft.path=x", "prompt_sets.g.prompts=parti", "steps=0"], "evaluate.steps"),
        (["finetuned.my/model.path=x", "prompt_sets.g.prompts=parti"], "evaluate.finetuned.my/model"),
        (["finetuned.ft.path=x", "prompt_sets.g.prompts=parti", "metrics=[clip,clip]"], "evaluate.metrics"),
        (["finetuned.ft.path=x", "prompt_sets.g.prompts=parti", "weights.nima=n.pt"], "evaluate.weights"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        evaluate(*overrides).require_runnable()
    assert f"{key}:" in str(err.value) and "\n" not in str(err.value)


def test_unknown_model_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown key 'evaluate.finetuned.ft.pth' \(did you mean 'path'"):
        evaluate("finetuned.ft.pth=x")


def test_defaults_validate_so_configs_without_an_evaluate_section_load():
    cfg = EvaluateConfig()
    cfg.validate()  # whole-tree validation of a config file without an evaluate section
    assert cfg.finetuned == {} and cfg.baseline.path == "stabilityai/stable-diffusion-2-1-base"


def test_a_run_needs_social_reward_weights_when_it_asks_for_social_reward():
    cfg = evaluate("finetuned.ft.path=x", "prompt_sets.g.prompts=parti", weights=[])
    with pytest.raises(ConfigError, match="evaluate.weights.social_reward: social_reward needs the checkpoint"):
        cfg.require_runnable()
    evaluate("finetuned.ft.path=x", "prompt_sets.g.prompts=parti", "metrics=[clip,hpsv2]", weights=[]).require_runnable()


# ---- a model is a pipeline (path) or existing images (images), whichever the last layer names ----


def evaluate_from_file(tmp_path, section, *overrides):
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"evaluate": section}))
    return load_config(ExperimentConfig, config, [*SOCIAL_REWARD, *overrides], section="evaluate").evaluate


def test_images_in_a_config_file_replace_the_default_baseline_path(tmp_path):
    cfg = evaluate_from_file(tmp_path, {"baseline": {"images": "sd14.csv"}, "finetuned": {"sd21": {"images": "sd21.csv"}}})
    assert (cfg.baseline.path, cfg.baseline.images) == (None, "sd14.csv")
    assert (cfg.finetuned["sd21"].path, cfg.finetuned["sd21"].images) == (None, "sd21.csv")
    assert not any(spec.generated for spec in cfg.models().values())


def test_images_on_the_command_line_replace_the_default_baseline_path():
    cfg = evaluate("baseline.images=sd14.csv", "finetuned.sd21.images=sd21.csv")
    assert (cfg.baseline.path, cfg.baseline.images) == (None, "sd14.csv")
    assert (cfg.finetuned["sd21"].path, cfg.finetuned["sd21"].images) == (None, "sd21.csv")


@pytest.mark.parametrize("entry", ["baseline", "finetuned.ft"])
def test_the_command_line_replaces_a_files_path_with_images_and_the_other_way_round(tmp_path, entry):
    def section(spec):
        return {"baseline": spec} if entry == "baseline" else {"finetuned": {"ft": spec}}

    def spec_of(cfg):
        return cfg.baseline if entry == "baseline" else cfg.finetuned["ft"]

    to_images = spec_of(evaluate_from_file(tmp_path, section({"path": "runs/model", "revision": "main"}), f"{entry}.images=t.csv"))
    assert (to_images.path, to_images.images, to_images.revision) == (None, "t.csv", "main")  # only the alternative is dropped
    to_path = spec_of(evaluate_from_file(tmp_path, section({"images": "t.csv", "path_column": "file"}), f"{entry}.path=runs/model"))
    assert (to_path.path, to_path.images, to_path.path_column) == ("runs/model", None, "file")


def test_python_specs_name_images_or_path_without_a_default_to_drop():
    cfg = EvaluateConfig(baseline=ModelSpec(images="sd14.csv"), finetuned={"sd21": FinetunedSpec(images="sd21.csv"), "ft": FinetunedSpec(path="runs/ft")})
    cfg.validate()
    assert [spec.generated for spec in cfg.models().values()] == [False, False, True]


@pytest.mark.parametrize("entry, key", [("baseline", "evaluate.baseline.path"), ("finetuned.ft", "evaluate.finetuned.ft.path")])
def test_path_and_images_set_together_are_a_one_line_error(tmp_path, entry, key):
    with pytest.raises(ConfigError) as err:
        evaluate(f"{entry}.path=runs/model", f"{entry}.images=t.csv")
    assert f"{key}: set either path" in str(err.value) and "\n" not in str(err.value)
    both = {"path": "runs/model", "images": "t.csv"}
    with pytest.raises(ConfigError, match=f"{key}: set either path"):
        evaluate_from_file(tmp_path, {"baseline": both} if entry == "baseline" else {"finetuned": {"ft": both}})
