"""Publishing: `sr-finetune push`, the model card and its evaluation, and push_to_hub in the fine-tune config.

No hub is reachable from these machines: every test captures the upload at the huggingface_hub
boundary (HfApi.create_repo / create_branch / create_commit are replaced), and the card and its
metadata are checked with huggingface_hub's own parsers.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import httpx2  # huggingface_hub's HTTP client
import pandas as pd
import pytest
import yaml
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from PIL import Image

from conftest import REPO
from sr_finetune.commands.cli import main
from sr_finetune.hub import REPO_PLACEHOLDER, plan_upload
from sr_finetune.training import FinetuneConfig, run_finetune
from sr_finetune.training.export import model_card_text

TOKEN = "hf_test_token_never_printed"
NEG = "t@y quality"
PIPELINE_FILES = {"model_index.json", "README.md", "config.yaml", "sampling.json", "scheduler/scheduler_config.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                  "text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A stand-in hub: records what would be sent; a token in HF_TOKEN, no stored login, offline mode off."""
    import huggingface_hub.constants

    sent = {"tokens": set(), "commits": [], "branches": []}
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))

    def create_repo(self, repo_id, **kw):
        sent["tokens"].add(self.token)
        sent["repo"] = (repo_id, kw)
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, **kw):
        ops = list(operations)
        contents = {}
        for op in ops:
            source = op.path_or_fileobj
            contents[op.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()
        sent["commits"].append({"repo_id": repo_id, "files": contents, **kw})

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", lambda self, repo_id, branch, **kw: sent["branches"].append(branch))
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return sent


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def pairs_with_summary(finetune_set, tmp_path_factory) -> Path:
    """The shared fine-tune set with the pair builder's summary.json beside it (its rejected texts end with the token)."""
    path = tmp_path_factory.mktemp("pairs") / "pairs"
    shutil.copytree(finetune_set, path)
    config = {"reward_column": "social_reward", "negative_token": NEG, "rejected_format": "{prompt} {token}", "regularization_share": 0.2, "confidence_k": None, "max_rejected_ratio": None}
    summary = {"counts": {"chosen": 4, "rejected": 4, "regularization": 2}, "skipped": {"images_nonfinite_score": 1}, "prompts": 4, "images": 16,
               "regularization": {"source": "laion-tiny", "used": 2}, "config": config}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def finetune_settings(model: Path, data: Path, out: Path) -> dict:
    return dict(model=str(model), dataset=str(data), output_dir=str(out), resolution=32, train_batch_size=2, max_train_steps=1, dataloader_num_workers=0,
                checkpointing_steps=1, report_to="tensorboard", validation_prompts=["a cat"], validation_steps=1, validation_inference_steps=1, seed=0)


@pytest.fixture(scope="module")
def run_dir(tiny_sd, pairs_with_summary, tmp_path_factory) -> Path:
    """A finished tiny fine-tune: pipeline + card beside checkpoints, latent cache, tensorboard logs and validation images."""
    out = tmp_path_factory.mktemp("run") / "ft"
    run_finetune(FinetuneConfig(**finetune_settings(tiny_sd, pairs_with_summary, out)))
    return out


@pytest.fixture(scope="module")
def eval_dir(tiny_sd, run_dir, tmp_path_factory) -> Path:
    """`sr-finetune evaluate` of the base vs the run: two real prompt sets x 2 prompts x 2 images, two metrics."""
    from reward.tiny import make_tiny_rewards

    root = tmp_path_factory.mktemp("eval")
    rewards = make_tiny_rewards(root / "rewards")
    metrics = ["social_reward", "clip"]
    section = {
        "baseline": {"path": str(tiny_sd)}, "finetuned": {"ft": {"path": str(run_dir)}},
        "prompt_sets": {"internal": {"prompts": "ddpo-animals", "max_prompts": 2}, "general": {"prompts": "parti", "max_prompts": 2}},
        "output_dir": str(root / "out"), "images_per_prompt": 2, "steps": 1, "height": 32, "width": 32, "batch_size": 8, "device": "cpu",
        "metrics": metrics, "weights": {m: rewards["weights"][m] for m in metrics}, "num_workers": 0, "bootstrap_samples": 200, "grid_prompts": 2,
        "examples_per_metric": 1, "thumbnail_size": 48,
    }
    config = root / "eval.yaml"
    config.write_text(yaml.safe_dump({"evaluate": section}, sort_keys=False))
    assert main(["evaluate", "--config", str(config)]) == 0
    return root / "out"


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and TOKEN not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# --- the card written at the end of training


def card_of(model: str) -> ModelCard:
    cfg = FinetuneConfig(model=model, dataset="pairs")
    return ModelCard(model_card_text(cfg, {"chosen": 4, "rejected": 4, "regularization": 2}, 2, "epsilon"))


def test_base_model_is_set_only_for_a_hub_id_and_its_license_is_carried(tiny_sd, tmp_path):
    hub_base = card_of("stabilityai/stable-diffusion-2-1-base")
    assert hub_base.data.base_model == "stabilityai/stable-diffusion-2-1-base" and hub_base.data.license == "openrail++"
    local = card_of(str(tiny_sd))
    assert local.data.base_model is None and local.data.license is None
    assert f"a local model folder, `{tiny_sd}`" in local.text
    # a snapshot in the hub cache is the hub model it came from; its own card's licence wins
    snapshot = tmp_path / "hub" / "models--stabilityai--stable-diffusion-2-base" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: my-licence\n---\n# card\n")
    cached = card_of(str(snapshot))
    assert cached.data.base_model == "stabilityai/stable-diffusion-2-base" and cached.data.license == "my-licence"


def test_card_says_where_the_pair_builder_put_the_negative_token(run_dir):
    card = ModelCard.load(run_dir / "README.md")
    assert f"the caption `<prompt> {NEG}` (the negative token after the prompt" in card.text
    assert "appended" not in card.text and f'negative_prompt="{NEG}"' in card.text
    assert "16 generated images of 4 prompts, ranked per prompt by the `social_reward` reward" in card.text
    assert "images nonfinite score: 1" in card.text and "2 captioned images of `laion-tiny` (20% of the set)" in card.text
    assert "| chosen | 4 |" in card.text and card.data.base_model is None


def test_the_pair_builders_default_puts_the_negative_token_before_the_prompt():
    from sr_finetune.pairs import PairsConfig
    from sr_finetune.training.export import rejected_sentence

    default = PairsConfig().rejected_format
    assert rejected_sentence(NEG, default) == f"the worst-rated with the caption `{NEG} <prompt>` (the negative token before the prompt: `rejected_format: \"{{token}} {{prompt}}\"`)"
    assert "carry the negative token" in rejected_sentence(NEG, None)  # no summary.json: no claim about its place


# --- sr-finetune push


def test_push_uploads_the_pipeline_and_leaves_training_state_out(run_dir, hub, capsys, caplog):
    kept, left_out = plan_upload(run_dir)
    assert any(p.startswith("checkpoint-1/") for p in left_out) and any(p.startswith("cache/") for p in left_out)
    assert any("events.out.tfevents" in p for p in left_out) and any(p.startswith("validation/") for p in left_out)

    assert main(["push", str(run_dir), "--repo", "me/tiny-sr"]) == 0
    (commit,) = hub["commits"]
    assert set(commit["files"]) == set(kept) == PIPELINE_FILES
    assert commit["revision"] is None and hub["repo"] == ("me/tiny-sr", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert hub["tokens"] == {TOKEN}
    card = commit["files"]["README.md"].decode()
    assert 'from_pretrained("me/tiny-sr")' in card and REPO_PLACEHOLDER not in card
    assert commit["files"]["unet/diffusion_pytorch_model.safetensors"] == (run_dir / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert REPO_PLACEHOLDER in (run_dir / "README.md").read_text()  # the local card is left as it was
    assert TOKEN not in capsys.readouterr().err + caplog.text


def test_push_of_a_reward_checkpoint_folder_uploads_weights_and_card_only(tmp_path, hub):
    folder = tmp_path / "reward"
    for rel in ("social_reward.safetensors", "README.md", "config.yaml", "checkpoints/step-10/model.safetensors", "optimizer.pt", "scheduler.pt", "random_states_0.pkl",
                "train.lock", "logs/run/events.out.tfevents.1.host", "cache/embeddings.npy", ".tmp-checkpoint-3/model.safetensors"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(b"---\nlicense: mit\n---\n# Social Reward\n" if rel == "README.md" else b"x")
    assert main(["push", str(folder), "--repo", "me/social-reward", "--public", "--revision", "v1"]) == 0
    (commit,) = hub["commits"]
    assert set(commit["files"]) == {"social_reward.safetensors", "README.md", "config.yaml"}
    assert hub["branches"] == ["v1"] and commit["revision"] == "v1" and hub["repo"][1]["private"] is False


@pytest.fixture
def pushed_with_eval(run_dir, eval_dir, hub) -> dict:
    assert main(["push", str(run_dir), "--repo", "me/tiny-sr", "--eval", str(eval_dir)]) == 0
    (commit,) = hub["commits"]
    return commit["files"]


def test_card_with_eval_has_model_index_equal_to_the_eval_tables(pushed_with_eval, eval_dir):
    card = ModelCard(pushed_with_eval["README.md"].decode())  # the hub's own parser validates the metadata
    name, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert name == "me/tiny-sr" and card.data.eval_results == results
    means = pd.read_csv(eval_dir / "tables" / "means.csv").set_index(["model", "prompt_set", "metric"])
    wins = pd.read_csv(eval_dir / "tables" / "win_rates.csv").set_index(["model", "prompt_set", "metric", "unit"])
    seen_means, seen_wins = set(), set()
    for r in results:
        assert r.task_type == "text-to-image" and r.dataset_type == {"internal": "ddpo-animals", "general": "parti"}[r.dataset_config]
        if r.metric_config == "mean":
            row, base = means.loc[("ft", r.dataset_config, r.metric_type)], means.loc[("baseline", r.dataset_config, r.metric_type)]
            assert r.metric_value == row["mean"] and r.metric_args["baseline_mean"] == base["mean"]
            assert (r.metric_args["ci_low"], r.metric_args["ci_high"], r.metric_args["prompts"]) == (row.ci_low, row.ci_high, row.prompts)
            seen_means.add((r.dataset_config, r.metric_type))
        else:
            metric, unit = r.metric_config.split("/")
            row = wins.loc[("ft", r.dataset_config, metric, unit)]
            assert r.metric_type == "win_rate" and r.metric_value == row.win_rate
            for key in ("wins", "ties", "losses", "n", "ci_low", "ci_high", "p_value", "mean_diff"):
                assert r.metric_args[key] == row[key], key
            seen_wins.add((r.dataset_config, metric, unit))
    # every table row of the model is there once
    assert seen_means == {(s, m) for _, s, m in means.loc["ft"].reset_index()[["prompt_set", "metric"]].itertuples()}
    assert len(seen_wins) == len(wins.loc["ft"]) == 2 * 2 * 2 and len(results) == len(seen_means) + len(seen_wins)


def test_card_with_eval_shows_the_tables_plots_and_grids_uploaded_beside_it(pushed_with_eval, eval_dir):
    files = pushed_with_eval
    text = files["README.md"].decode()
    wins = pd.read_csv(eval_dir / "tables" / "win_rates.csv")
    row = wins[(wins.model == "ft") & (wins.unit == "prompt")].iloc[0]
    assert f"**{100 * row.win_rate:.1f}%** [{100 * row.ci_low:.1f}%, {100 * row.ci_high:.1f}%] W/T/L {row.wins}/{row.ties}/{row.losses}" in text
    assert "`ft` in the evaluation" in text
    for rel in ("figures/means.png", "figures/win_rates.png", "figures/grid_internal.png", "figures/grid_general.png"):
        assert f"](eval/{rel})" in text
        Image.open(io.BytesIO(files[f"eval/{rel}"])).verify()
    grid = Image.open(io.BytesIO(files["eval/figures/grid_general.png"]))
    assert grid.size == (120 + 2 * 48, 2 * (18 + 2 * 48))  # label column + 2 seeds; 2 prompts x (caption + 2 models)
    assert files["eval/tables/win_rates.csv"] == (eval_dir / "tables" / "win_rates.csv").read_bytes()
    assert {"eval/report.html", "eval/results.json", "eval/tables/means.csv"} <= set(files)
    assert PIPELINE_FILES <= set(files)


def test_eval_of_several_models_puts_only_the_pushed_one_on_the_card(run_dir, eval_dir, hub, tmp_path, capsys):
    # a second fine-tuned model, 'other', in a copy of the evaluation: its rows are ft's with another name
    two = tmp_path / "eval"
    shutil.copytree(eval_dir, two, ignore=shutil.ignore_patterns("generations", "scores"))
    config = yaml.safe_load((two / "config.yaml").read_text())
    config["finetuned"]["other"] = {**config["finetuned"]["ft"], "path": str(tmp_path / "other")}
    (two / "config.yaml").write_text(yaml.safe_dump(config))
    for table in ("means", "win_rates"):
        frame = pd.read_csv(two / "tables" / f"{table}.csv")
        other = frame[frame.model == "ft"].assign(model="other", **({"mean": 123.0} if table == "means" else {"win_rate": 0.123}))
        pd.concat([frame, other]).to_csv(two / "tables" / f"{table}.csv", index=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "README.md").write_text("# another model\n")

    assert main(["push", str(run_dir), "--repo", "me/ft", "--eval", str(two)]) == 0  # found by its path
    card = ModelCard(hub["commits"][0]["files"]["README.md"].decode())
    assert "| other |" not in card.text and "123.0" not in card.text and "12.3%" not in card.text
    assert {r.metric_value for r in card.data.eval_results}.isdisjoint({123.0, 0.123})
    assert main(["push", str(tmp_path / "other"), "--repo", "me/other", "--eval", str(two), "--eval-model", "other", "--revision", "eval"]) == 0
    assert {r.metric_value for r in ModelCard(hub["commits"][1]["files"]["README.md"].decode()).data.eval_results} >= {123.0, 0.123}

    (tmp_path / "third").mkdir()
    (tmp_path / "third" / "README.md").write_text("# a third model\n")
    assert main(["push", str(tmp_path / "third"), "--repo", "me/x", "--eval", str(two)]) == 2
    assert f"none of them is {tmp_path / 'third'}: pass --eval-model NAME" in one_line_error(capsys)
    assert main(["push", str(run_dir), "--repo", "me/x", "--eval", str(two), "--eval-model", "nope"]) == 2
    assert "no fine-tuned model named 'nope' (it evaluates ft (" in one_line_error(capsys)
    assert len(hub["commits"]) == 2


@pytest.mark.parametrize(
    "setup, args, message",
    [
        ({"HF_TOKEN": None}, [], "no hub token to push to me/tiny-sr: set HF_TOKEN"),
        ({"HF_HUB_OFFLINE": "1"}, [], "HF_HUB_OFFLINE=1 is set, so the hub is switched off"),
        ({}, ["--repo", "me/tiny--sr"], "'me/tiny--sr' is not a hub repo id"),
        ({"unreachable": True}, [], "ConnectError: [Errno -2] Name or service not known); nothing local was changed, retry with: sr-finetune push {dir} --repo me/tiny-sr --eval {eval}"),
    ],
    ids=["no-token", "offline", "bad-repo-id", "unreachable"],
)
def test_push_failures_are_one_line(setup, args, message, run_dir, eval_dir, hub, monkeypatch, capsys):
    for var, value in setup.items():
        if var == "unreachable":
            monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **kw: (_ for _ in ()).throw(httpx2.ConnectError("[Errno -2] Name or service not known")))
        elif value is None:
            monkeypatch.delenv(var)
        else:
            monkeypatch.setenv(var, value)
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    assert main(["push", str(run_dir), "--repo", "me/tiny-sr", "--eval", str(eval_dir), *args]) == 2
    line = one_line_error(capsys)
    assert line.startswith("sr-finetune push: error: ") and message.format(dir=run_dir, eval=eval_dir) in line
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before and not hub["commits"]


def test_push_of_a_folder_without_a_card_is_refused(tmp_path, hub, capsys):
    assert main(["push", str(tmp_path), "--repo", "me/x"]) == 2
    assert f"{tmp_path} has no README.md model card" in one_line_error(capsys)


# --- push_to_hub in the fine-tune config


@pytest.mark.parametrize("env, message", [({}, "no hub token"), ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE=1 is set")], ids=["no-token", "offline"])
def test_push_to_hub_is_refused_before_training(env, message, hub, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("HF_TOKEN")
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.chdir(tmp_path)  # tiny.yaml's relative paths: nothing there, and nothing may be made
    config = REPO / "recipes" / "configs" / "tiny.yaml"
    assert main(["finetune", "--config", str(config), "push_to_hub=true", "hub_model_id=me/tiny-sr"]) == 2
    line = one_line_error(capsys)
    assert line.startswith("sr-finetune finetune: error: push_to_hub=true: ") and message in line and "nothing was trained" in line
    assert not any(tmp_path.iterdir())


def test_failed_upload_after_training_names_the_saved_folder_and_the_retry(tiny_sd, finetune_set, hub, monkeypatch, tmp_path, capsys):
    out = tmp_path / "ft"
    overrides = [f"{k}={v}" for k, v in finetune_settings(tiny_sd, finetune_set, out).items() if k not in ("validation_prompts", "report_to")]
    create_repo = HfApi.create_repo
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **kw: (_ for _ in ()).throw(httpx2.ConnectError("[Errno -2] Name or service not known")))
    assert main(["finetune", *overrides, "report_to=none", "push_to_hub=true", "hub_model_id=me/tiny-sr", "hub_private=false"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and TOKEN not in err
    line = err.strip().splitlines()[-1]  # above it: the progress bar of the training that finished
    assert line == (f"sr-finetune finetune: error: training finished and the pipeline is saved in {out} (step 1), but the upload of {out} to me/tiny-sr failed "
                    f"(ConnectError: [Errno -2] Name or service not known); nothing local was changed, retry with: sr-finetune push {out} --repo me/tiny-sr --public")
    assert (out / "model_index.json").is_file() and (out / "checkpoint-1").is_dir()
    monkeypatch.setattr(HfApi, "create_repo", create_repo)  # the hub is back: the command it names works
    assert main(line.split("retry with: sr-finetune ")[1].split()) == 0
    assert set(hub["commits"][0]["files"]) == PIPELINE_FILES and hub["repo"][1]["private"] is False
