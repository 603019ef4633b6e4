"""End to end on tiny models: baseline vs a fine-tuned model, two real prompt sets x 3 prompts x 2
images, six metrics; the tables must equal what the scores parquet says."""

import contextlib
import json
import math

import pandas as pd
import pytest
import yaml

from eval.browser_check import static_check
from eval.harness import _check_paired
from sr_finetune.commands.cli import main
from sr_finetune.errors import UserError

METRICS = ["social_reward", "clip", "aesthetic", "hpsv2", "imagereward", "pickscore"]
KEYS = ["prompt_set", "prompt_id", "index"]


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory, tiny_sd):
    from reward.tiny import make_tiny_rewards
    from sr_finetune.tiny_models import make_tiny_sd_pipeline

    root = tmp_path_factory.mktemp("eval")
    rewards = make_tiny_rewards(root / "rewards")
    finetuned = make_tiny_sd_pipeline(root / "finetuned", seed=1)
    section = {
        "baseline": {"path": str(tiny_sd)},
        "finetuned": {"ft": {"path": str(finetuned)}},
        "prompt_sets": {"internal": {"prompts": "ddpo-animals", "max_prompts": 3}, "general": {"prompts": "parti", "max_prompts": 3}},
        "output_dir": str(root / "out"),
        "images_per_prompt": 2, "steps": 2, "height": 32, "width": 32, "batch_size": 6, "device": "cpu",
        "metrics": rewards["metrics"], "weights": rewards["weights"], "options": rewards["options"],
        "num_workers": 0, "bootstrap_samples": 300, "grid_prompts": 2, "examples_per_metric": 1, "thumbnail_size": 96,
    }
    config = root / "eval.yaml"
    config.write_text(yaml.safe_dump({"evaluate": section}, sort_keys=False))
    with counting_scorer_loads() as loads:
        assert main(["evaluate", "--config", str(config)]) == 0
    return {"config": config, "out": root / "out", "section": section, "loads": loads}


@contextlib.contextmanager
def counting_scorer_loads():
    """The metrics of every scorer load the harness makes, in order."""
    from eval import harness

    loads, load = [], harness.load_scorers
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(harness, "load_scorers", lambda cfg, device: loads.append(tuple(cfg.metrics)) or load(cfg, device))
        yield loads


@pytest.fixture(scope="module")
def scores(evaluation):
    return pd.read_parquet(evaluation["out"] / "scores.parquet")


def test_writes_scores_tables_json_and_report(evaluation, scores):
    out = evaluation["out"]
    for name in ("tables/means.csv", "tables/win_rates.csv", "results.json", "report.md", "report.html", "figures/means.png", "figures/win_rates.png"):
        assert (out / name).is_file(), name
    assert len(scores) == 2 * 2 * 3 * 2  # models x prompt sets x prompts x images
    assert scores[METRICS].notna().all().all()
    assert len(pd.read_csv(out / "tables/means.csv")) == 2 * 2 * 6
    assert len(pd.read_csv(out / "tables/win_rates.csv")) == 1 * 2 * 6 * 2  # fine-tuned x sets x metrics x units


def test_each_scorer_is_loaded_once_for_both_models_and_prompt_sets(evaluation, scores):
    assert evaluation["loads"] == [(metric,) for metric in METRICS]
    assert len(scores) == 2 * 2 * 3 * 2 and scores[METRICS].notna().all().all()


def test_same_seeds_real_prompts_and_the_negative_token(scores):
    base = scores[scores.model == "baseline"].set_index(KEYS).sort_index()
    ft = scores[scores.model == "ft"].set_index(KEYS).sort_index()
    assert base.index.equals(ft.index) and (base.seed == ft.seed).all()
    assert list(base.loc["internal"].prompt.unique()) == ["cat", "dog", "horse"]
    assert base.loc["general"].prompt.nunique() == 3
    assert base.negative_prompt.isna().all() and (ft.negative_prompt == "t@y quality").all()
    assert (base["clip"] != ft["clip"]).all()  # different weights, different images


def test_means_equal_those_recomputed_from_the_scores_parquet(evaluation, scores):
    means = pd.read_csv(evaluation["out"] / "tables/means.csv").set_index(["model", "prompt_set", "metric"])
    recomputed = scores.groupby(["model", "prompt_set"])[METRICS].mean()
    for (model, prompt_set), row in recomputed.iterrows():
        for metric in METRICS:
            cell = means.loc[(model, prompt_set, metric)]
            assert cell["mean"] == pytest.approx(row[metric], rel=1e-12, abs=1e-12)
            assert cell.ci_low <= cell["mean"] <= cell.ci_high
            assert (cell.images, cell.prompts) == (6, 3)
    from_json = {(r["model"], r["prompt_set"], r["metric"]): r["mean"] for r in json.loads((evaluation["out"] / "results.json").read_text())["means"]}
    assert from_json == means["mean"].to_dict()


def sign_p(wins, losses):
    n, k = wins + losses, min(wins, losses)
    return 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def test_win_rates_equal_those_recomputed_from_the_scores_parquet(evaluation, scores):
    wins = pd.read_csv(evaluation["out"] / "tables/win_rates.csv").set_index(["prompt_set", "metric", "unit"])
    base = scores[scores.model == "baseline"].set_index(KEYS)
    ft = scores[scores.model == "ft"].set_index(KEYS)
    for metric in METRICS:
        diff = (ft[metric] - base[metric]).rename("diff").reset_index()
        prompt_diff = (ft[metric].groupby(level=[0, 1]).mean() - base[metric].groupby(level=[0, 1]).mean()).rename("diff").reset_index()
        for unit, frame in (("image", diff), ("prompt", prompt_diff)):
            for prompt_set, d in frame.groupby("prompt_set"):
                row = wins.loc[(prompt_set, metric, unit)]
                w, t, l = int((d["diff"] > 0).sum()), int((d["diff"] == 0).sum()), int((d["diff"] < 0).sum())
                assert (row.wins, row.ties, row.losses, row.n) == (w, t, l, len(d)), (prompt_set, metric, unit)
                assert row.win_rate == pytest.approx(w / len(d)) and row.tie_rate == pytest.approx(t / len(d))
                assert row.p_value == pytest.approx(sign_p(w, l))
                assert row.mean_diff == pytest.approx(d["diff"].mean())
                assert row.ci_low <= row.win_rate <= row.ci_high


def test_report_shows_the_table_numbers(evaluation):
    out = evaluation["out"]
    markdown, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    means = pd.read_csv(out / "tables/means.csv")
    wins = pd.read_csv(out / "tables/win_rates.csv")
    for value in [f"{m:.4f}" for m in means["mean"]] + [f"{100 * r:.1f}%" for r in wins.win_rate]:
        assert value in markdown and value in page
    assert "t@y quality" in page and "per-prompt" in page.lower() and "“cat”" in page
    assert page.count("<img ") >= 2 + 2 * 2 * 2 * 2  # two plots + a same-seed grid of 2 prompts x 2 models x 2 images per set
    assert "generations/ft/internal/images/" in markdown  # the Markdown links the generated images
    assert static_check(out / "report.html").ok


def test_rerun_reuses_every_generation_and_score(evaluation):
    out = evaluation["out"]
    files = sorted(p for p in (out / "generations").rglob("*.png")) + sorted((out / "scores").rglob("part-*.parquet"))
    before = {p: p.stat().st_mtime_ns for p in files}
    means_before = pd.read_csv(out / "tables/means.csv")
    with counting_scorer_loads() as loads:
        assert main(["evaluate", "--config", str(evaluation["config"])]) == 0
    assert loads == []  # nothing left to score: no scorer is even loaded
    assert {p: p.stat().st_mtime_ns for p in files} == before
    pd.testing.assert_frame_equal(pd.read_csv(out / "tables/means.csv"), means_before)


def test_changed_scorer_weights_are_refused(evaluation, capsys):
    out = evaluation["out"]
    weights = dict(evaluation["section"]["weights"], clip=evaluation["section"]["weights"]["social_reward"])
    overrides = [f"weights.clip={weights['clip']}"]
    assert main(["evaluate", "--config", str(evaluation["config"]), *overrides]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("sr-finetune evaluate: error: ") and str(out / "scores/baseline/internal/clip") in error and "weights=" in error


def test_generations_without_a_same_seed_baseline_are_refused():
    rows = pd.DataFrame({"model": ["b", "b", "f", "f"], "prompt_set": "s", "prompt_id": ["p", "q", "p", "q"], "index": 0, "seed": [1, 2, 1, 3]})
    with pytest.raises(UserError, match="image 0 of prompt 'q'"):
        _check_paired(rows, "b")
