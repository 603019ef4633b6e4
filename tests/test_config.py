import pytest

from sr_finetune.config import load_config, to_yaml
from sr_finetune.errors import ConfigError
from sr_finetune.commands.experiment import ExperimentConfig


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_merge_with_stage_relative_keys(tmp_path):
    path = write(tmp_path, "generate:\n  steps: 20\n  prompts: parti\n")
    cfg = load_config(ExperimentConfig, path, ["guidance_scale=5", "generate.height=64", "width=64"], section="generate")
    assert (cfg.generate.steps, cfg.generate.guidance_scale, cfg.generate.height, cfg.generate.width) == (20, 5.0, 64, 64)
    assert cfg.generate.prompts == "parti"


def test_unknown_key_in_file_names_it_and_suggests(tmp_path):
    path = write(tmp_path, "generate:\n  stepz: 20\n")
    with pytest.raises(ConfigError) as err:
        load_config(ExperimentConfig, path)
    msg = str(err.value)
    assert "unknown key 'generate.stepz'" in msg and "steps" in msg and str(path) in msg
    assert "\n" not in msg


def test_unknown_override_and_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'generate.colour'"):
        load_config(ExperimentConfig, None, ["colour=red"], section="generate")
    with pytest.raises(ConfigError, match=r"unknown key 'trainer'"):
        load_config(ExperimentConfig, write(tmp_path, "trainer:\n  lr: 1\n"))


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError) as err:
        load_config(ExperimentConfig, None, ["steps=many"], section="generate")
    assert "bad value for 'generate.steps'" in str(err.value) and "\n" not in str(err.value)


def test_bad_value_caught_by_validation():
    with pytest.raises(ConfigError, match=r"generate.height: height and width must be multiples of 8"):
        load_config(ExperimentConfig, None, ["height=30"], section="generate")
    with pytest.raises(ConfigError, match=r"generate.scheduler: must be one of"):
        load_config(ExperimentConfig, None, ["scheduler=magic"], section="generate")


def test_missing_config_file_and_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(ExperimentConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(ExperimentConfig, None, ["steps"], section="generate")


def test_shipped_configs_validate_and_round_trip(tmp_path):
    from conftest import REPO

    for name in ("tiny.yaml", "sd21_social_reward.yaml"):
        cfg = load_config(ExperimentConfig, REPO / "recipes" / "configs" / name)
        again = load_config(ExperimentConfig, write(tmp_path, to_yaml(cfg)))
        assert again == cfg


def test_values_are_validated_only_in_the_stage_that_runs(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("generate:\n  steps: 5\nscore:\n  metrics: [social_reward]\n")
    assert load_config(ExperimentConfig, path, [], section="generate").generate.steps == 5
    with pytest.raises(ConfigError, match="score.weights.social_reward: social_reward needs the checkpoint"):
        load_config(ExperimentConfig, path, [], section="score")
