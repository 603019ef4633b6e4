"""Evaluating images that already exist: real SiD-LSG images of ../shared/data arranged as two
models, one an image table (csv), one a generations folder, against a generated tiny baseline.
Matched by prompt and image index; what cannot be matched is a counted, reported gap."""

import contextlib
import json
import logging
import shutil

import pandas as pd
import pytest
import yaml

from eval.browser_check import static_check
from eval.config import ModelSpec
from eval.existing_images import read_existing_images
from eval.harness import _check_paired
from reward.scoring import read_scores
from sr_finetune.commands.cli import main
from sr_finetune.errors import UserError

METRICS = ["clip"]
NOBODY = "a prompt no model drew"


@contextlib.contextmanager
def log_records():
    """INFO and above of the project's loggers, as the CLI would print them."""
    records, handler = [], logging.Handler()
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("sr_finetune", "eval")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)


@pytest.fixture(scope="module")
def sid(shared_data):
    """The five figure-6 prompts with an SD 2.1-base and an SD 1.5 SiD-LSG image each, and the folder."""
    folder = shared_data / "images" / "sid_lsg"
    manifest = pd.read_csv(folder / "manifest.csv")
    fig6 = manifest[manifest.figure == "figure6"]
    prompts = list(dict.fromkeys(fig6.prompt))
    image = {(p, "21"): fig6[(fig6.prompt == p) & fig6.image_path.str.contains("sd2.1base")].image_path.item() for p in prompts}
    image.update({(p, "15"): fig6[(fig6.prompt == p) & fig6.image_path.str.contains("sd1.5")].image_path.item() for p in prompts})
    elf = manifest[manifest.figure == "figure1"].iloc[5]
    return {"folder": folder, "prompts": prompts, "image": image, "elf": elf}


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory, tiny_sd, tiny_rewards, sid):
    root = tmp_path_factory.mktemp("existing")
    p1, p2, p3, p4, p5, dog = sid["prompts"][:6]
    (root / "prompts.txt").write_text("\n".join([p1, p2, p3, p4, p5, NOBODY]) + "\n")
    # team_a: a csv of SD 2.1-base + SD 1.5 images (image k = k-th row of a prompt); p3 has one image,
    # p5 none; two rows of a prompt outside the set and one row without a prompt
    image = sid["image"]
    rows = [(p, image[(p, v)]) for p in (p1, p2) for v in ("21", "15")] + [(p3, image[(p3, "21")])] + [(p4, image[(p4, v)]) for v in ("21", "15")]
    rows += [(dog, image[(dog, "21")]), (dog, image[(dog, "15")]), ("", sid["elf"].image_path)]
    pd.DataFrame({"prompt": [p for p, _ in rows], "image_path": [i for _, i in rows], "seed": range(len(rows))}).to_csv(root / "team_a.csv", index=False)
    # last_month: a generations folder (manifest.parquet, index column, paths inside the folder); p2 has
    # only image 1, p3 an extra image 2, p4 none
    slots = [(p1, 0, image[(p1, "15")]), (p1, 1, image[(p1, "21")]), (p2, 1, image[(p2, "15")]), (p3, 0, image[(p3, "15")]), (p3, 1, image[(p3, "21")]),
             (p3, 2, sid["elf"].image_path), (p5, 0, image[(p5, "15")]), (p5, 1, image[(p5, "21")])]
    gen = root / "last_month"
    (gen / "images").mkdir(parents=True)
    for _, _, path in slots:
        shutil.copy(sid["folder"] / path, gen / "images" / path.replace("/", "_"))
    pd.DataFrame({"image_id": [f"m{i}" for i in range(len(slots))], "prompt_id": [f"old{i}" for i in range(len(slots))], "prompt": [p for p, _, _ in slots],
                  "path": ["images/" + path.replace("/", "_") for _, _, path in slots], "seed": 7, "negative_prompt": None,
                  "index": [k for _, k, _ in slots]}).to_parquet(gen / "manifest.parquet")
    section = {
        "baseline": {"path": str(tiny_sd)},
        "finetuned": {"team_a": {"images": str(root / "team_a.csv"), "image_root": str(sid["folder"]), "path_column": "image_path"},
                      "last_month": {"images": str(gen)}},
        "prompt_sets": {"sid": {"prompts": str(root / "prompts.txt")}},
        "output_dir": str(root / "out"), "images_per_prompt": 2, "steps": 2, "height": 32, "width": 32, "batch_size": 12, "device": "cpu",
        "metrics": METRICS, "weights": {m: tiny_rewards["weights"][m] for m in METRICS},
        "num_workers": 0, "bootstrap_samples": 200, "grid_prompts": 6, "examples_per_metric": 1, "thumbnail_size": 64,
    }
    config = root / "eval.yaml"
    config.write_text(yaml.safe_dump({"evaluate": section}, sort_keys=False))
    with log_records() as records:
        assert main(["evaluate", "--config", str(config)]) == 0
    out = root / "out"
    return {"root": root, "out": out, "config": config, "sid": sid, "gen": gen, "p": [p1, p2, p3, p4, p5, NOBODY],
            "log": [r.getMessage() for r in records], "scores": pd.read_parquet(out / "scores.parquet")}


def slots(scores, model):
    return scores[scores.model == model].set_index(["prompt", "index"]).sort_index()


def test_images_are_matched_by_prompt_and_index(evaluation):
    scores, p, image, folder = evaluation["scores"], evaluation["p"], evaluation["sid"]["image"], evaluation["sid"]["folder"]
    assert len(scores) == 3 * 6 * 2  # every model has every slot of the prompt set, found or not
    team_a, last = slots(scores, "team_a"), slots(scores, "last_month")
    root = evaluation["out"]
    assert (root / team_a.loc[(p[0], 1), "path"]).resolve() == (folder / image[(p[0], "15")]).resolve()  # image 1 = the prompt's second row
    assert (root / last.loc[(p[0], 0), "path"]).resolve() == (evaluation["gen"] / "images" / image[(p[0], "15")].replace("/", "_")).resolve()
    assert team_a.loc[(p[0], 0), "seed"] == 0 and last.loc[(p[0], 0), "seed"] == 7  # the tables' seeds are kept
    # the same picture in both models scores the same
    for metric in METRICS:
        assert team_a.loc[(p[0], 0), metric] == pytest.approx(last.loc[(p[0], 1), metric], rel=1e-5)
        assert team_a.loc[(p[0], 1), metric] == pytest.approx(last.loc[(p[0], 0), metric], rel=1e-5)
    assert scores.loc[scores.model != "baseline", "prompt_id"].isin(scores.loc[scores.model == "baseline", "prompt_id"]).all()  # the prompt set's ids


def test_gaps_are_rows_without_an_image_or_score(evaluation):
    scores, p = evaluation["scores"], evaluation["p"]
    gaps = {m: sorted(map(tuple, slots(scores, m)[lambda f: f.path.isna()].index)) for m in ("baseline", "team_a", "last_month")}
    assert gaps == {"baseline": [], "team_a": sorted([(p[2], 1), (p[4], 0), (p[4], 1), (NOBODY, 0), (NOBODY, 1)]),
                    "last_month": sorted([(p[1], 0), (p[3], 0), (p[3], 1), (NOBODY, 0), (NOBODY, 1)])}
    assert scores.loc[scores.path.isna(), METRICS].isna().all().all() and scores.loc[scores.path.notna(), METRICS].notna().all().all()


def test_gap_table_and_results_count_what_could_not_be_matched(evaluation):
    out = evaluation["out"]
    gaps = pd.read_csv(out / "tables" / "gaps.csv").set_index("model")
    expected = {"team_a": (6, 12, 7, 2, 5, 0), "last_month": (6, 12, 7, 2, 5, 1)}
    for model, values in expected.items():
        assert tuple(gaps.loc[model, ["prompts", "images_expected", "images_found", "missing_prompts", "missing_images", "extra_images"]]) == values
    results = json.loads((out / "results.json").read_text())
    team_a = results["existing_images"]["team_a"]
    assert (team_a["table_rows"], team_a["rows_in_no_prompt_set"], team_a["unusable_rows"]) == (10, 2, {"no prompt": 1})
    assert results["existing_images"]["last_month"]["table_rows"] == 8


def test_tables_leave_the_gaps_out_of_means_and_pairs(evaluation):
    out, scores = evaluation["out"], evaluation["scores"]
    means = pd.read_csv(out / "tables" / "means.csv").set_index(["model", "metric"])
    for model, images, missing in (("baseline", 12, 0), ("team_a", 7, 5), ("last_month", 7, 5)):
        for metric in METRICS:
            cell = means.loc[(model, metric)]
            assert (cell.images, cell.missing) == (images, missing)
            assert cell["mean"] == pytest.approx(scores.loc[scores.model == model, metric].mean(), rel=1e-12)
    wins = pd.read_csv(out / "tables" / "win_rates.csv")
    image_unit = wins[wins.unit == "image"].set_index(["model", "metric"])
    assert set(image_unit.n) == {7} and (image_unit.wins + image_unit.ties + image_unit.losses == 7).all()
    assert set(wins[wins.unit == "prompt"].prompts) == {4}  # prompts with at least one pair


def test_gaps_are_logged_summarised_and_reported(evaluation):
    log = evaluation["log"]
    assert any("team_a on sid: 7 of 12 images found (2 prompts without images, 5 image slots empty)" in line for line in log)
    assert any("last_month on sid: 7 of 12 images found" in line and "1 extra images beyond 2 per prompt left out" in line for line in log)
    assert any("team_a: 3 of 10 rows of" in line and "2 with a prompt in no prompt set, 1 with no prompt" in line for line in log)
    assert any(line.startswith("evaluate: ") and "existing images: 14 matched, 10 missing (gaps: tables/gaps.csv)" in line for line in log)
    markdown, page = (evaluation["out"] / "report.md").read_text(), (evaluation["out"] / "report.html").read_text()
    for text in ("Gap: team_a has 7 of 12 images on sid (2 prompts without any image, 5 images missing)", "left out; 1 extra image beyond 2 per prompt left out.",
                 "paired with the other models by prompt and image index, not by seed", "Existing images matched to the prompt sets"):
        assert text in markdown and text in page
    assert markdown.count("| no image") >= 10  # the grid shows each gap
    assert static_check(evaluation["out"] / "report.html").ok


def test_rerun_reuses_scores_and_a_changed_table_is_refused(evaluation, capsys):
    out = evaluation["out"]
    parts = sorted((out / "scores").rglob("part-*.parquet"))
    before = {p: p.stat().st_mtime_ns for p in parts}
    assert main(["evaluate", "--config", str(evaluation["config"])]) == 0
    assert {p: p.stat().st_mtime_ns for p in parts} == before
    table = pd.read_csv(evaluation["root"] / "team_a.csv")
    changed = evaluation["root"] / "team_a_changed.csv"
    table.iloc[::-1].to_csv(changed, index=False)  # other images in the same slots
    assert main(["evaluate", "--config", str(evaluation["config"]), f"finetuned.team_a.images={changed}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "scores/team_a/sid/" in error and "matched_images=" in error


def test_a_slot_given_twice_is_an_error_naming_both_rows(tmp_path):
    pd.DataFrame({"prompt": ["a cat", "a dog", "a cat"], "path": ["x.png", "y.png", "z.png"], "index": [0, 0, 0]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(UserError, match=r"t.csv: rows 0 and 2 are both image 0 of prompt 'a cat'"):
        read_existing_images(ModelSpec(images=str(tmp_path / "t.csv")))


def test_a_table_without_the_path_column_is_an_error_naming_it(tmp_path):
    pd.DataFrame({"prompt": ["a cat"], "file": ["x.png"]}).to_json(tmp_path / "t.jsonl", orient="records", lines=True)
    with pytest.raises(UserError, match=r"t.jsonl: no column 'path' \(columns: prompt, file\)"):
        read_existing_images(ModelSpec(images=str(tmp_path / "t.jsonl")))


def test_a_model_with_both_a_pipeline_and_images_is_a_config_error(tmp_path, capsys):
    config = tmp_path / "e.yaml"
    config.write_text(yaml.safe_dump({"evaluate": {"finetuned": {"ft": {"path": "runs/ft", "images": "t.csv"}}}}))
    assert main(["evaluate", "--config", str(config)]) == 2
    assert "evaluate.finetuned.ft.path: set either path (a pipeline folder or hub id) or images" in capsys.readouterr().err


def test_existing_images_are_paired_without_comparing_seeds():
    rows = pd.DataFrame({"model": ["b", "b", "t", "t"], "prompt_set": "s", "prompt_id": ["p", "q", "p", "q"], "index": 0, "seed": [1, 2, 5, None]})
    _check_paired(rows, "b", unseeded=["t"])  # no error: the table's images need not share seeds


def test_two_existing_image_sets_compare_like_independent_scoring_runs(tmp_path, tiny_rewards, sid):
    """SD 1.5 images (baseline) against SD 2.1-base images, one table each, as the README writes it:
    no pipeline anywhere, no ``path: null``; the win/tie/loss counts equal a recount from ``score`` runs."""
    prompts, image, folder = sid["prompts"][:5], sid["image"], sid["folder"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    tables = {"sd15": [image[(p, "15")] for p in prompts], "sd21": [image[(p, "21")] for p in prompts[:4]] + [image[(prompts[4], "15")]]}  # last: a tie
    for name, paths in tables.items():
        pd.DataFrame({"prompt": prompts, "image_path": paths}).to_csv(tmp_path / f"{name}.csv", index=False)
    weights = {"clip": tiny_rewards["weights"]["clip"]}
    table = {"image_root": str(folder), "path_column": "image_path"}
    section = {"baseline": {"images": str(tmp_path / "sd15.csv"), **table}, "baseline_name": "sd15", "finetuned": {"sd21": {"images": str(tmp_path / "sd21.csv"), **table}},
               "prompt_sets": {"fig6": {"prompts": str(tmp_path / "prompts.txt")}}, "output_dir": str(tmp_path / "eval"), "images_per_prompt": 1, "device": "cpu",
               "metrics": ["clip"], "weights": weights, "num_workers": 0, "bootstrap_samples": 50, "grid_prompts": 1, "examples_per_metric": 0, "thumbnail_size": 32}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump({"evaluate": section}))
    assert main(["evaluate", "--config", str(tmp_path / "eval.yaml")]) == 0

    scores = {}
    for name in tables:
        out = tmp_path / f"score_{name}"
        assert main(["score", f"image_table={tmp_path / name}.csv", f"image_root={folder}", "path_column=image_path", "metrics=[clip]",
                     f"weights.clip={weights['clip']}", f"output_dir={out}", "device=cpu", "num_workers=0"]) == 0
        by_path = read_scores(out).set_index("image_id")["clip"]  # a table without image ids: the path is the id
        scores[name] = pd.Series([by_path[p] for p in tables[name]], index=prompts)
    diff = scores["sd21"] - scores["sd15"]
    wins = pd.read_csv(tmp_path / "eval" / "tables" / "win_rates.csv").set_index("unit")
    for unit in ("image", "prompt"):  # one image per prompt: both units count the same pairs
        row = wins.loc[unit]
        assert (row.model, row.baseline, row.n) == ("sd21", "sd15", 5)
        assert (row.wins, row.ties, row.losses) == (int((diff > 0).sum()), int((diff == 0).sum()), int((diff < 0).sum()))
        assert row.mean_diff == pytest.approx(diff.mean(), rel=1e-6)
    assert (diff == 0).sum() == 1  # the shared image
