import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from reward.hpsv2 import make_tiny_hpsv2
from reward.pickscore import make_tiny_pickscore
from reward.scoring import ScoreConfig, read_errors, read_image_table, run_scoring
from sr_finetune.errors import ConfigError


@pytest.fixture(scope="module")
def tiny_scorers(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorers")
    hps = make_tiny_hpsv2(root / "hps")
    pick = make_tiny_pickscore(root / "pick")
    weights = {"hpsv2": str(hps), "pickscore": str(pick)}
    options = {"hpsv2": {"model_config": "tiny"}, "pickscore": {"processor": str(pick)}}
    return weights, options


@pytest.fixture
def sid_table(shared_data, tmp_path):
    """Eight real 512 px generated images with their prompts, plus four broken files."""
    sid = shared_data / "images" / "sid_lsg"
    manifest = pd.read_csv(sid / "manifest.csv").head(8)
    rows = [{"image_id": f"sid{i}", "path": str(sid / p), "prompt": t} for i, (p, t) in enumerate(zip(manifest.image_path, manifest.prompt))]
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    good = (sid / manifest.image_path.iloc[0]).read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 3])
    rows += [
        {"image_id": "missing", "path": str(tmp_path / "nope.png"), "prompt": "x"},
        {"image_id": "empty", "path": str(tmp_path / "empty.png"), "prompt": "x"},
        {"image_id": "text", "path": str(tmp_path / "text.png"), "prompt": "x"},
        {"image_id": "truncated", "path": str(tmp_path / "truncated.png"), "prompt": "x"},
    ]
    path = tmp_path / "images.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def config(tiny_scorers, out, **kw):
    weights, options = tiny_scorers
    base = dict(metrics=["hpsv2", "pickscore"], weights=weights, options=options, output_dir=str(out), batch_size=3, num_workers=0, rows_per_part=5, device="cpu")
    base.update(kw)
    return ScoreConfig(**base)


def test_scores_every_metric_and_records_bad_images(tiny_scorers, sid_table, tmp_path):
    cfg = config(tiny_scorers, tmp_path / "scores", image_table=str(sid_table))
    summary = run_scoring(cfg)
    table = pd.read_parquet(tmp_path / "scores" / "scores.parquet")
    assert sorted(table.image_id) == sorted(f"sid{i}" for i in range(8))
    assert table[["hpsv2", "pickscore"]].notna().all().all()
    errors = read_errors(cfg.output_dir).set_index("image_id").reason
    assert sorted(errors.index) == ["empty", "missing", "text", "truncated"]
    assert errors["missing"].startswith("FileNotFoundError")
    assert summary.scored == 8 and sum(summary.errors.values()) == 4 and summary.parts_total == 3


def test_scores_equal_direct_scorer_calls(tiny_scorers, sid_table, tmp_path):
    from reward import load_reward

    weights, options = tiny_scorers
    cfg = config(tiny_scorers, tmp_path / "scores", image_table=str(sid_table), num_workers=1)
    run_scoring(cfg)
    table = pd.read_parquet(tmp_path / "scores" / "scores.parquet").head(3)
    images = [Image.open(p) for p in table.path]
    for metric in ("hpsv2", "pickscore"):
        direct = load_reward(metric, weights=weights[metric], **options[metric]).score_images(images, list(table.prompt))
        assert table[metric].tolist() == pytest.approx(direct.tolist(), abs=1e-5)


def test_killed_run_resumes_to_the_same_table(tiny_scorers, sid_table, tmp_path):
    full = config(tiny_scorers, tmp_path / "full", image_table=str(sid_table))
    run_scoring(full)
    resumed = config(tiny_scorers, tmp_path / "resumed", image_table=str(sid_table))
    run_scoring(resumed)
    # simulate a crash during part 1: its files never got written
    os.remove(tmp_path / "resumed" / "scores" / "part-00001.parquet")
    os.remove(tmp_path / "resumed" / "errors" / "part-00001.parquet")
    before = (tmp_path / "resumed" / "scores" / "part-00000.parquet").stat().st_mtime_ns
    summary = run_scoring(resumed)
    assert summary.parts_made == 1
    assert (tmp_path / "resumed" / "scores" / "part-00000.parquet").stat().st_mtime_ns == before
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "full" / "scores.parquet"), pd.read_parquet(tmp_path / "resumed" / "scores.parquet"))


def test_scores_a_generations_folder(tiny_sd, tiny_scorers, tmp_path):
    from sr_finetune.generation import GenerateConfig, run_generation

    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    gen = GenerateConfig(model=str(tiny_sd), prompts=str(tmp_path / "p.txt"), output_dir=str(tmp_path / "gen"), images_per_prompt=2, steps=2, height=32, width=32, device="cpu")
    run_generation(gen)
    run_scoring(config(tiny_scorers, tmp_path / "scores", generations=gen.output_dir, metrics=["hpsv2"], weights={"hpsv2": tiny_scorers[0]["hpsv2"]}))
    table = pd.read_parquet(tmp_path / "scores" / "scores.parquet")
    assert len(table) == 4 and set(table.columns) == {"image_id", "prompt", "path", "hpsv2"}


def test_bad_tables_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of score.generations and score.image_table"):
        read_image_table(ScoreConfig())
    (tmp_path / "t.csv").write_text("file,prompt\na.png,x\n")
    with pytest.raises(ValueError, match=r"t.csv: no column 'path' \(columns: file, prompt\)"):
        read_image_table(ScoreConfig(image_table=str(tmp_path / "t.csv")))


def score_cli(tiny_scorers, table, out) -> int:
    """``sr-finetune score image_table=...`` with the tiny HPS v2 scorer."""
    from sr_finetune.commands.cli import main

    weights, _ = tiny_scorers
    overrides = [f"image_table={table}", "metrics=[hpsv2]", f"weights={{hpsv2: {weights['hpsv2']}}}", "options={hpsv2: {model_config: tiny}}"]
    return main(["score", *overrides, f"output_dir={out}", "device=cpu", "num_workers=0", "batch_size=4"])


def test_rows_with_an_empty_prompt_path_or_id_are_skipped_and_counted_with_their_rows(tiny_scorers, tmp_path, caplog):
    for name in ("a", "b", "c"):
        Image.new("RGB", (40, 30), (10, 200, 90)).save(tmp_path / f"{name}.png")
    # rows 1-3 each lack one cell; "NA" and "None" are prompts, not missing values
    (tmp_path / "t.csv").write_text("image_id,path,prompt\nx0,a.png,NA\nx1,b.png,\nx2,,a dog\n,c.png,a cow\nx4,c.png,None\n")
    with caplog.at_level("INFO"):
        assert score_cli(tiny_scorers, tmp_path / "t.csv", tmp_path / "out") == 0
    table = pd.read_parquet(tmp_path / "out" / "scores.parquet")
    assert table.image_id.tolist() == ["x0", "x4"] and table.prompt.tolist() == ["NA", "None"]
    for line in ("t.csv: skipped 1 empty prompts (rows 1)", "t.csv: skipped 1 empty paths (rows 2)", "t.csv: skipped 1 missing ids (rows 3)"):
        assert line in caplog.text
    assert "2/2 images scored, errors: none, skipped rows: 1 empty paths, 1 empty prompts, 1 missing ids;" in caplog.text


def test_empty_cells_of_json_and_parquet_tables_are_skipped_and_ids_stay_integers(tmp_path):
    from reward.scoring import read_image_rows

    rows = [{"image_id": 7, "path": "a.png", "prompt": "a cat"}, {"image_id": None, "path": "b.png", "prompt": "x"}, {"image_id": 9, "path": "c.png", "prompt": None}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pd.DataFrame(rows).astype({"image_id": "Int64"}).to_parquet(tmp_path / "t.parquet")
    for name in ("t.jsonl", "t.parquet"):
        found = read_image_rows(ScoreConfig(image_table=str(tmp_path / name)))
        assert found.rows.image_id.tolist() == ["7"] and found.rows.path.tolist() == [str(tmp_path / "a.png")], name
        assert found.skipped == {"empty prompts": [2], "missing ids": [1]}, name


def test_a_table_without_a_complete_row_is_a_one_line_error(tiny_scorers, tmp_path, capsys):
    (tmp_path / "t.csv").write_text("path,prompt\n,a cat\nb.png,\n")
    assert score_cli(tiny_scorers, tmp_path / "t.csv", tmp_path / "out") == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "nothing to score: " in error
    assert "t.csv: skipped 1 empty paths (rows 0); " in error and "t.csv: skipped 1 empty prompts (rows 1)" in error


def test_two_processes_score_every_image_once(tiny_scorers, sid_table, tmp_path):
    from conftest import REPO, launch_two_cpu_processes

    weights, _ = tiny_scorers
    out = tmp_path / "scores"
    result = launch_two_cpu_processes(
        [
            str(REPO / "recipes" / "score.py"),
            f"image_table={sid_table}", "metrics=[hpsv2]", f"weights={{hpsv2: '{weights['hpsv2']}'}}", "options={hpsv2: {model_config: tiny}}",
            f"output_dir={out}", "rows_per_part=3", "batch_size=2", "num_workers=0", "device=cpu",
        ],
        port=29518,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    parts = [pd.read_parquet(p) for p in sorted((out / "scores").glob("part-*.parquet"))]
    assert len(parts) == 4
    ids = pd.concat(parts).image_id
    assert ids.is_unique and sorted(ids) == sorted(f"sid{i}" for i in range(8))
    assert "score [1/2]" in result.stderr


# --------------------------------------------------------------------------- shared CPU-side work


@pytest.fixture(scope="module")
def six_scorers(tmp_path_factory):
    from reward.scoring import load_scorers
    from reward.tiny import make_tiny_rewards

    settings = make_tiny_rewards(tmp_path_factory.mktemp("six"))
    return load_scorers(ScoreConfig(**settings), torch.device("cpu"))


def _no_sharing(monkeypatch):
    """Every scorer computes its own preprocessing and tokens, as before keys existed."""
    from reward.clip_scorers import AestheticReward, CLIPScoreReward
    from reward.hpsv2 import HPSv2Reward
    from reward.imagereward import ImageRewardModel

    for cls in (CLIPScoreReward, AestheticReward, HPSv2Reward, ImageRewardModel):
        monkeypatch.setattr(cls, "preprocess_key", property(lambda self: None))
        monkeypatch.setattr(cls, "tokenize_key", property(lambda self: None))


def _count_calls(monkeypatch, cls, method, calls):
    original = getattr(cls, method)

    def counted(self, arg):
        calls[f"{cls.__name__}.{method}"] += len(arg) if method == "tokenize" else 1
        return original(self, arg)

    monkeypatch.setattr(cls, method, counted)


def test_identical_preprocessing_and_tokenisation_form_one_group(six_scorers):
    from reward.scoring import plan_inputs

    plan = plan_inputs(six_scorers)
    clip224 = "openai-clip-224"
    assert plan.pixel_keys == {
        "social_reward": clip224, "clip": clip224, "aesthetic": clip224, "imagereward": clip224,
        "hpsv2": "hpsv2-224", "pickscore": "metric:pickscore",
    }
    assert plan.text_keys == {
        "social_reward": "open_clip-77", "clip": "open_clip-77", "hpsv2": "open_clip-77",
        "aesthetic": "empty", "imagereward": "metric:imagereward", "pickscore": "metric:pickscore",
    }
    assert len(plan.pixel_makers) == 3 and len(plan.text_makers) == 4


def test_shared_tokens_equal_each_scorers_own_and_repeats_are_tokenised_once(six_scorers):
    from reward.scoring import plan_inputs

    plan = plan_inputs(six_scorers)
    prompts = ["a cat", "a red car at night", "a cat", "a cat"]
    shared = plan.tokenize(prompts)
    for name, scorer in six_scorers.items():
        own, got = scorer.tokenize(prompts), shared[plan.text_keys[name]]
        if isinstance(own, dict):
            assert own.keys() == got.keys() and all(torch.equal(own[k], got[k]) for k in own)
        else:
            assert torch.equal(own, got)


def test_each_shared_preprocessing_runs_once_per_image_and_scores_are_unchanged(six_scorers, sid_table, monkeypatch):
    from collections import Counter

    from reward.clip_scorers import AestheticReward, CLIPScoreReward
    from reward.hpsv2 import HPSv2Reward
    from reward.imagereward import ImageRewardModel
    from reward.scoring import score_rows

    rows = read_image_table(ScoreConfig(image_table=str(sid_table)))
    calls = Counter()
    for cls in (CLIPScoreReward, AestheticReward, HPSv2Reward, ImageRewardModel):
        _count_calls(monkeypatch, cls, "preprocess_image", calls)
        _count_calls(monkeypatch, cls, "tokenize", calls)
    threads = torch.get_num_threads()
    run = dict(batch_size=3, num_workers=0, device=torch.device("cpu"))
    shared, errors = score_rows(rows, six_scorers, **run)
    assert torch.get_num_threads() == threads
    assert len(shared) == 8 and len(errors) == 4
    # social_reward, clip, aesthetic and imagereward: one OpenAI transform per readable image;
    # social_reward, clip and hpsv2: one open_clip tokenisation per prompt
    assert calls == {"CLIPScoreReward.preprocess_image": 8, "HPSv2Reward.preprocess_image": 8, "CLIPScoreReward.tokenize": 8, "AestheticReward.tokenize": 8, "ImageRewardModel.tokenize": 8}
    calls.clear()
    _no_sharing(monkeypatch)
    separate, _ = score_rows(rows, six_scorers, **run)
    assert calls["CLIPScoreReward.preprocess_image"] == 2 * 8 and calls["AestheticReward.preprocess_image"] == 8
    assert calls["ImageRewardModel.preprocess_image"] == 8 and calls["HPSv2Reward.tokenize"] == 8
    pd.testing.assert_frame_equal(shared, separate)


def test_scores_do_not_depend_on_batch_size_workers_or_part_boundaries(six_scorers, sid_table):
    from reward.scoring import iter_scored_parts, score_rows

    rows = read_image_table(ScoreConfig(image_table=str(sid_table)))
    one, _ = score_rows(rows, six_scorers, batch_size=1, num_workers=0, device=torch.device("cpu"))
    parts = list(iter_scored_parts(rows, six_scorers, [(3, 0, 5), (7, 5, 12)], batch_size=4, num_workers=2, device=torch.device("cpu")))
    assert [p for p, _, _ in parts] == [3, 7]
    assert sorted(parts[0][2].image_id) == [] and sorted(parts[1][2].image_id) == ["empty", "missing", "text", "truncated"]
    streamed = pd.concat([scores for _, scores, _ in parts], ignore_index=True)
    pd.testing.assert_frame_equal(streamed, one, atol=1e-5, rtol=1e-5)  # fp32 rounding: text batches are cut to their longest prompt


class _Niceness(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        return os.nice(0)


def test_cpu_workers_yield_the_cpus_to_the_forward_which_keeps_its_threads():
    from reward import scoring

    base = os.nice(0)
    loader = torch.utils.data.DataLoader(_Niceness(), batch_size=None, num_workers=1, worker_init_fn=scoring.yield_cpu_to_forward)
    assert list(loader) == [min(19, base + scoring.WORKER_NICENESS)] * 2
    assert os.nice(0) == base  # the main process keeps its priority

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        default = scoring.ForwardThreads(num_workers=2)
        assert default.threads == 2 and torch.get_num_threads() == 2
        default.restore()
        fixed = scoring.ForwardThreads(num_workers=2, fixed=1)
        assert torch.get_num_threads() == 1
        fixed.restore()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_runs_score_every_metric_close_to_fp32(tmp_path, sid_table, dtype):
    """The half-precision path GPU runs take (here on the CPU): every metric, near its fp32 value."""
    from reward.tiny import make_tiny_rewards

    settings = make_tiny_rewards(tmp_path / "rewards")
    tables = {}
    for run_dtype in ("fp32", dtype):
        cfg = ScoreConfig(**settings, image_table=str(sid_table), output_dir=str(tmp_path / run_dtype), device="cpu", dtype=run_dtype, batch_size=4, num_workers=0)
        assert run_scoring(cfg).scored == 8
        tables[run_dtype] = pd.read_parquet(tmp_path / run_dtype / "scores.parquet").set_index("image_id")[settings["metrics"]]
    error = (tables[dtype] - tables["fp32"]).abs().max()
    scale = tables["fp32"].abs().max()
    spread = tables["fp32"].max() - tables["fp32"].min()
    assert tables[dtype].notna().all().all()
    assert (error > 0).sum() >= 4  # the run did compute in half precision
    # bf16 keeps 8 bits of mantissa: within 2% of the largest score, or, for a logit such as PickScore's
    # (100 x a cosine: a cosine's rounding times 100; 0.29 on an Intel Xeon), within 5% of the spread
    # between the images, which is what a ranking reads
    tolerance = np.maximum(0.02 * scale + 0.01, 0.05 * spread)
    assert (error <= tolerance).all(), (error.to_dict(), tolerance.to_dict())
