"""The pair builder: best/worst selection, skips by reason, confidence filter, regularisation mix, output."""

from __future__ import annotations

import io
import json
import logging
import math
import tarfile
from pathlib import Path

import datasets
import pandas as pd
import pytest
from PIL import Image

from sr_finetune.pairs import (
    PairsConfig, PairsError, build_pairs, held_out_prompt_ids, held_out_rank, read_generations, regularization_count, select_pairs, split_held_out, write_held_out,
)  # fmt: skip
from sr_finetune.regularization import RegularizationError, read_regularization


def write_generations(folder: Path, scores_by_prompt: dict[str, list[float]], prompts: dict[str, str] | None = None) -> tuple[Path, Path]:
    """A `generate`-style folder (tiny real PNGs + manifest.parquet) and a scores parquet beside it."""
    rows, score_rows = [], []
    for p, (prompt_id, values) in enumerate(scores_by_prompt.items()):
        for i, value in enumerate(values):
            image_id = f"{prompt_id}_{i}"
            rel = f"images/00000/{image_id}.png"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (p * 40 % 256, i * 60 % 256, 128)).save(folder / rel)
            rows.append({"image_id": image_id, "prompt_id": prompt_id, "prompt": (prompts or {}).get(prompt_id, f"a photo of {prompt_id}"), "path": rel, "seed": i, "model": "tiny"})
            score_rows.append({"image_id": image_id, "social_reward": value, "clip": 0.2})
    pd.DataFrame(rows).to_parquet(folder / "manifest.parquet", index=False)
    scores = folder.parent / f"{folder.name}-scores.parquet"
    pd.DataFrame(score_rows).to_parquet(scores, index=False)
    return folder, scores


def manifest_and_scores(scores_by_prompt: dict[str, list[float]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    manifest = pd.DataFrame(
        [{"image_id": f"{p}_{i}", "prompt_id": p, "prompt": f"a photo of {p}", "path": f"/nowhere/{p}_{i}.png"} for p, vals in scores_by_prompt.items() for i in range(len(vals))]
    )
    scores = pd.DataFrame([{"image_id": f"{p}_{i}", "social_reward": v} for p, vals in scores_by_prompt.items() for i, v in enumerate(vals)])
    return manifest, scores


@pytest.fixture(scope="module")
def sid_lsg(shared_data) -> pd.DataFrame:
    """The real SiD-LSG example images with their real prompts (absolute paths); the first 6."""
    root = shared_data / "images" / "sid_lsg"
    table = pd.read_csv(root / "manifest.csv").head(6)
    table["abs_path"] = [str(root / p) for p in table["image_path"]]
    return table


# ---- selection -------------------------------------------------------------------------------


def test_chosen_is_the_highest_and_rejected_the_lowest_score():
    manifest, scores = manifest_and_scores({"a": [0.5, 2.0, -1.0, 1.0], "b": [3.0, 4.0]})
    pairs, _ = select_pairs(manifest, scores, PairsConfig(), check_files=False)
    got = {(r.prompt_id, r.role): (r.image_id, r.score) for r in pairs.itertuples()}
    assert got == {("a", "chosen"): ("a_1", 2.0), ("a", "rejected"): ("a_2", -1.0), ("b", "chosen"): ("b_1", 4.0), ("b", "rejected"): ("b_0", 3.0)}
    assert list(pairs.role) == ["chosen", "rejected", "chosen", "rejected"]


def test_ties_are_broken_by_image_id_and_chosen_differs_from_rejected():
    manifest, scores = manifest_and_scores({"a": [1.0, 5.0, 5.0, 0.0, 0.0], "flat": [2.0, 2.0, 2.0]})
    pairs, _ = select_pairs(manifest, scores.iloc[::-1], PairsConfig(), check_files=False)  # input order must not matter
    got = {(r.prompt_id, r.role): r.image_id for r in pairs.itertuples()}
    assert got == {("a", "chosen"): "a_1", ("a", "rejected"): "a_4", ("flat", "chosen"): "flat_0", ("flat", "rejected"): "flat_2"}


def test_pairs_per_prompt_matches_the_i_th_best_with_the_i_th_worst_and_never_reuses_an_image():
    manifest, scores = manifest_and_scores({"a": [3.0, 5.0, 1.0, 4.0, 2.0], "b": [1.0, 0.0]})
    pairs, _ = select_pairs(manifest, scores, PairsConfig(pairs_per_prompt=3), check_files=False)
    got = [(r.prompt_id, r.role, r.image_id) for r in pairs.itertuples()]
    # a: 5 images -> 2 pairs (5 vs 1, 4 vs 2; the median image 3 takes no role); b: 2 images -> 1 pair
    assert got == [("a", "chosen", "a_1"), ("a", "rejected", "a_2"), ("a", "chosen", "a_3"), ("a", "rejected", "a_4"), ("b", "chosen", "b_0"), ("b", "rejected", "b_1")]
    one, _ = select_pairs(manifest, scores, PairsConfig(), check_files=False)
    assert list(one.image_id) == ["a_1", "a_2", "b_0", "b_1"]
    quarter, _ = select_pairs(manifest, scores, PairsConfig(pairs_per_prompt=3, max_pair_share=0.25), check_files=False)
    assert list(quarter.image_id) == ["a_1", "a_2", "b_0", "b_1"]  # 5 x 0.25 < 2: the best and worst only; never fewer than one pair
    eight, _ = select_pairs(*manifest_and_scores({"c": [float(v) for v in range(8)]}), PairsConfig(pairs_per_prompt=4, max_pair_share=0.25), check_files=False)
    assert list(eight.image_id) == ["c_7", "c_0", "c_6", "c_1"]  # 8 x 0.25 = 2 pairs: the best quarter against the worst
    with pytest.raises(ValueError, match="pairs_per_prompt"):
        PairsConfig(pairs_per_prompt=0).validate()
    with pytest.raises(ValueError, match="max_pair_share"):
        PairsConfig(max_pair_share=0.6).validate()


def test_confidence_of_a_second_pair_is_its_own_softmax_probability():
    # [3, 2, 1, 0], k = 1, N = 4: p(2) = e^2 / (e^3 + e^2 + e^1 + 1) = 0.237 < 1/4 -> the second chosen is dropped;
    # p_worst of 1 under softmax(-s) = e^-1 / (e^-3 + e^-2 + e^-1 + 1) = 0.237 -> the second rejected is dropped too.
    assert math.exp(2) / (math.exp(3) + math.exp(2) + math.e + 1) == pytest.approx(0.2369, abs=1e-4)
    manifest, scores = manifest_and_scores({"p": [3.0, 2.0, 1.0, 0.0]})
    pairs, skipped = select_pairs(manifest, scores, PairsConfig(pairs_per_prompt=2, confidence_k=1), check_files=False)
    assert list(zip(pairs.role, pairs.image_id)) == [("chosen", "p_0"), ("rejected", "p_3")]
    assert skipped["chosen_low_confidence"] == 1 and skipped["rejected_low_confidence"] == 1


def test_swap_chosen_rejected_trains_the_worst_image_as_chosen_and_tags_the_best():
    manifest, scores = manifest_and_scores({"a": [0.5, 2.0, -1.0, 1.0], "b": [3.0, 4.0]})
    pairs, _ = select_pairs(manifest, scores, PairsConfig(swap_chosen_rejected=True), check_files=False)
    got = {(r.prompt_id, r.role): (r.image_id, r.score, r.text) for r in pairs.itertuples()}
    assert got == {
        ("a", "chosen"): ("a_2", -1.0, "a photo of a"), ("a", "rejected"): ("a_1", 2.0, "t@y quality a photo of a"),
        ("b", "chosen"): ("b_0", 3.0, "a photo of b"), ("b", "rejected"): ("b_1", 4.0, "t@y quality a photo of b"),
    }  # fmt: skip


def test_random_roles_draw_two_distinct_images_per_prompt_whatever_the_scores_and_row_order():
    scores_by_prompt = {f"p{i}": [float(j) for j in range(6)] for i in range(40)}
    manifest, scores = manifest_and_scores(scores_by_prompt)
    cfg = PairsConfig(random_roles=True)
    pairs, _ = select_pairs(manifest, scores, cfg, check_files=False)
    again, _ = select_pairs(manifest.iloc[::-1], scores.sample(frac=1.0, random_state=3), cfg, check_files=False)
    assert again.sort_values(["prompt_id", "role"]).image_id.tolist() == pairs.sort_values(["prompt_id", "role"]).image_id.tolist()
    picked = pairs.pivot(index="prompt_id", columns="role", values="score")
    assert len(picked) == 40 and (picked.chosen != picked.rejected).all()
    assert 0.3 < (picked.chosen > picked.rejected).mean() < 0.7  # the scores give the roles no direction
    assert (picked.chosen != 5.0).sum() > 10 and (picked.rejected != 0.0).sum() > 10  # not the best and worst
    reseeded, _ = select_pairs(manifest, scores, PairsConfig(random_roles=True, seed=1), check_files=False)
    assert reseeded.image_id.tolist() != pairs.image_id.tolist()
    mirrored, _ = select_pairs(manifest, scores, PairsConfig(random_roles=True, swap_chosen_rejected=True), check_files=False)
    mirror = mirrored.pivot(index="prompt_id", columns="role", values="image_id")
    drawn = pairs.pivot(index="prompt_id", columns="role", values="image_id")
    assert mirror.chosen.tolist() == drawn.rejected.tolist() and mirror.rejected.tolist() == drawn.chosen.tolist()
    with pytest.raises(ValueError, match="confidence_k: null"):
        PairsConfig(random_roles=True, confidence_k=2).validate()


def test_max_pairs_keeps_the_pairs_with_the_largest_score_gap_over_all_prompts():
    # a: gaps 9 (9 vs 0) and 5 (7 vs 2); b: gap 1 (1 vs 0); c: gaps 8 and 2
    manifest, scores = manifest_and_scores({"a": [9.0, 7.0, 2.0, 0.0], "b": [1.0, 0.0], "c": [10.0, 6.0, 4.0, 2.0]})
    pairs, skipped = select_pairs(manifest, scores, PairsConfig(pairs_per_prompt=2, max_pairs=3), check_files=False)
    got = [(r.prompt_id, r.role, r.score) for r in pairs.itertuples()]
    assert got == [("a", "chosen", 9.0), ("a", "rejected", 0.0), ("a", "chosen", 7.0), ("a", "rejected", 2.0), ("c", "chosen", 10.0), ("c", "rejected", 2.0)]
    assert skipped["pairs_below_gap_cut"] == 2  # c's second pair (gap 2) and b's only pair (gap 1)
    everything, skipped_none = select_pairs(manifest, scores, PairsConfig(pairs_per_prompt=2, max_pairs=5), check_files=False)
    assert len(everything) == 10 and skipped_none["pairs_below_gap_cut"] == 0
    swapped, _ = select_pairs(manifest, scores, PairsConfig(pairs_per_prompt=2, max_pairs=3, swap_chosen_rejected=True), check_files=False)
    assert sorted(swapped.image_id) == sorted(pairs.image_id)  # the same pairs, roles reversed
    with pytest.raises(ValueError, match="max_pairs: must be >= 1"):
        PairsConfig(max_pairs=0).validate()


def test_max_pairs_with_random_roles_is_a_seeded_draw_shared_by_the_mirror():
    scores_by_prompt = {f"p{i}": [float(j) for j in range(8)] for i in range(30)}
    manifest, scores = manifest_and_scores(scores_by_prompt)
    cfg = PairsConfig(random_roles=True, pairs_per_prompt=4, max_pairs=40)
    pairs, skipped = select_pairs(manifest, scores, cfg, check_files=False)
    assert len(pairs) == 80 and skipped["pairs_below_gap_cut"] == 80
    assert pairs.prompt_id.nunique() > 15  # spread over the prompts, not the first ones in order
    again, _ = select_pairs(manifest.iloc[::-1], scores.sample(frac=1.0, random_state=1), cfg, check_files=False)
    assert sorted(again.image_id) == sorted(pairs.image_id)
    mirror, _ = select_pairs(manifest, scores, PairsConfig(random_roles=True, pairs_per_prompt=4, max_pairs=40, swap_chosen_rejected=True), check_files=False)
    assert sorted(mirror[mirror.role == "chosen"].image_id) == sorted(pairs[pairs.role == "rejected"].image_id)


def test_rejected_text_carries_the_negative_token_in_the_configured_format():
    manifest, scores = manifest_and_scores({"a": [1.0, 0.0]})
    pairs, _ = select_pairs(manifest, scores, PairsConfig(), check_files=False)
    assert pairs.set_index("role").text.to_dict() == {"chosen": "a photo of a", "rejected": "t@y quality a photo of a"}
    hps = PairsConfig(negative_token="Weird image. ", rejected_format="{token}{prompt}")
    pairs, _ = select_pairs(manifest, scores, hps, check_files=False)
    assert pairs.set_index("role").text["rejected"] == "Weird image. a photo of a"


def test_include_rejected_false_gives_only_chosen_rows():
    manifest, scores = manifest_and_scores({"a": [1.0, 0.0], "b": [0.0, 1.0]})
    pairs, _ = select_pairs(manifest, scores, PairsConfig(include_rejected=False), check_files=False)
    assert list(pairs.role) == ["chosen", "chosen"]


def test_every_skip_reason_is_counted(tmp_path):
    folder, scores_file = write_generations(tmp_path / "gen", {"ok": [1.0, 2.0, 3.0], "nan": [1.0, float("nan"), 2.0], "inf": [float("inf"), 1.0, 0.5], "short": [1.0, 2.0], "gone": [1.0, 2.0, 3.0]})
    (folder / "images/00000/gone_0.png").unlink()
    scores = pd.read_parquet(scores_file)
    scores = scores[scores.image_id != "short_1"]  # an image the scorer could not read
    extra = pd.DataFrame({"image_id": ["stranger_0", "ok_0"], "social_reward": [9.0, 9.0], "clip": [0.0, 0.0]})  # not in manifest; a repeat
    pd.concat([scores, extra]).to_parquet(scores_file, index=False)
    summary = build_pairs(PairsConfig(generations=str(folder), scores=str(scores_file), output_dir=str(tmp_path / "out")))
    assert summary.skipped == {
        "score_rows_not_in_manifest": 1,
        "duplicate_score_rows": 1,
        "images_without_score": 1,
        "images_nonfinite_score": 2,
        "images_file_missing": 1,
        "prompts_too_few_images": 1,  # "short": one image left
        "chosen_low_confidence": 0,
        "rejected_low_confidence": 0,
        "rejected_over_ratio_cap": 0,
        "pairs_below_gap_cut": 0,
    }
    assert summary.counts == {"chosen": 4, "rejected": 4, "regularization": 0}
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["skipped"] == summary.skipped and written["config"]["reward_column"] == "social_reward"
    assert "1 duplicate_score_rows" not in summary.line() and "duplicate_score_rows 1" in summary.line()


def test_nothing_left_is_a_one_line_error_with_the_reasons(tmp_path):
    folder, scores = write_generations(tmp_path / "gen", {"a": [1.0], "b": [float("nan"), 2.0]})
    with pytest.raises(PairsError, match=r"^no prompt left to make pairs from \(3 manifest images; skipped: images_nonfinite_score 1, prompts_too_few_images 2\)$"):
        build_pairs(PairsConfig(generations=str(folder), scores=str(scores), output_dir=str(tmp_path / "out")))


def test_duplicate_score_rows_keep_the_first_value():
    manifest, scores = manifest_and_scores({"a": [1.0, 0.0]})
    scores = pd.concat([scores, pd.DataFrame({"image_id": ["a_1"], "social_reward": [10.0]})])
    pairs, skipped = select_pairs(manifest, scores, PairsConfig(), check_files=False)
    assert skipped["duplicate_score_rows"] == 1 and pairs.set_index("role").image_id["chosen"] == "a_0"


def test_unknown_reward_column_is_a_one_line_error_listing_the_columns():
    manifest, scores = manifest_and_scores({"a": [1.0, 0.0]})
    scores["aesthetic"] = 5.0
    with pytest.raises(PairsError) as err:
        select_pairs(manifest, scores, PairsConfig(reward_column="hpsv2"), check_files=False)
    assert str(err.value) == "scores: no reward column 'hpsv2' (available: social_reward, aesthetic); set reward_column"


def test_unknown_reward_column_from_files_names_the_scores_file(tmp_path):
    folder, scores_file = write_generations(tmp_path / "gen", {"a": [1.0, 0.0]})
    with pytest.raises(PairsError, match=rf"{scores_file}: no reward column 'pickscore' \(available: social_reward, clip\)"):
        build_pairs(PairsConfig(generations=str(folder), scores=str(scores_file), reward_column="pickscore", output_dir=str(tmp_path / "out")))


def test_confidence_filter_matches_a_hand_computed_softmax():
    # "sure": [3, 1, 0]: p_best = e^3 / (e^3 + e^1 + e^0) = 0.844 > 2/3, p_worst = 1 / (e^-3 + e^-1 + 1) = 0.705 > 2/3: both kept.
    # "close": [2, 1.9, 0]: p_best = e^2 / (e^2 + e^1.9 + 1) = 0.490 < 2/3: chosen dropped; p_worst = 1 / (e^-2 + e^-1.9 + 1) = 0.778: kept.
    assert math.exp(3) / (math.exp(3) + math.e + 1) == pytest.approx(0.8438, abs=1e-4)
    assert math.exp(2) / (math.exp(2) + math.exp(1.9) + 1) == pytest.approx(0.4901, abs=1e-4)
    manifest, scores = manifest_and_scores({"sure": [3.0, 1.0, 0.0], "close": [2.0, 1.9, 0.0]})
    pairs, skipped = select_pairs(manifest, scores, PairsConfig(confidence_k=2), check_files=False)
    assert sorted(zip(pairs.prompt_id, pairs.role)) == [("close", "rejected"), ("sure", "chosen"), ("sure", "rejected")]
    assert skipped["chosen_low_confidence"] == 1 and skipped["rejected_low_confidence"] == 0


def test_confidence_temperature_rescales_raw_cosine_scores():
    # HPS v1 softmaxed 100 * cosine: raw cosines with T = 0.01 must equal x100 scores with T = 1.
    raw = {"p": [0.215, 0.201, 0.2, 0.199], "q": [0.21, 0.2095, 0.209, 0.18]}
    manifest, scores = manifest_and_scores(raw)
    scaled = scores.assign(social_reward=scores.social_reward * 100)
    a, _ = select_pairs(manifest, scores, PairsConfig(confidence_k=2, confidence_temperature=0.01), check_files=False)
    b, _ = select_pairs(manifest, scaled, PairsConfig(confidence_k=2), check_files=False)
    assert list(zip(a.prompt_id, a.role)) == list(zip(b.prompt_id, b.role)) == [("p", "chosen"), ("q", "rejected")]


def test_rejected_ratio_cap_subsamples_deterministically_from_the_seed():
    manifest, scores = manifest_and_scores({f"p{i}": [1.0, 0.0] for i in range(10)})
    cfg = PairsConfig(max_rejected_ratio=0.3, seed=7)
    first, skipped = select_pairs(manifest, scores, cfg, check_files=False)
    again, _ = select_pairs(manifest, scores, cfg, check_files=False)
    assert (first.role == "rejected").sum() == 3 and (first.role == "chosen").sum() == 10
    assert skipped["rejected_over_ratio_cap"] == 7
    pd.testing.assert_frame_equal(first, again)
    other, _ = select_pairs(manifest, scores, PairsConfig(max_rejected_ratio=0.3, seed=8), check_files=False)
    assert set(other[other.role == "rejected"].prompt_id) != set(first[first.role == "rejected"].prompt_id)


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match="^min_images_per_prompt: must be >= 2"):
        PairsConfig(min_images_per_prompt=1).validate()
    with pytest.raises(ValueError, match="^rejected_format: '{negative} {prompt}'"):
        PairsConfig(rejected_format="{negative} {prompt}").validate()
    with pytest.raises(ValueError, match="^on_short_regularization: must be 'error' or 'warn'"):
        PairsConfig(on_short_regularization="ignore").validate()
    with pytest.raises(ValueError, match=r"^held_out_share: must be in \[0, 1\), got 1.0"):
        PairsConfig(held_out_share=1.0).validate()
    with pytest.raises(ValueError, match="^held_out_prompts: must be >= 0"):
        PairsConfig(held_out_prompts=-1).validate()
    with pytest.raises(ValueError, match="^held_out_share: and held_out_prompts both size the held-out split; set one"):
        PairsConfig(held_out_share=0.1, held_out_prompts=5).validate()
    PairsConfig().validate()


def test_pairs_config_loads_from_yaml_with_one_line_errors(tmp_path):
    from dataclasses import dataclass, field

    from sr_finetune.config import load_config
    from sr_finetune.errors import ConfigError

    @dataclass
    class Tree:
        pairs: PairsConfig = field(default_factory=PairsConfig)

    path = tmp_path / "exp.yaml"
    path.write_text("pairs:\n  confidence_k: 2\n  regularization_share: 0.25\n")
    tree = load_config(Tree, path, ["max_rejected_ratio=1.0"], section="pairs")
    assert (tree.pairs.confidence_k, tree.pairs.regularization_share, tree.pairs.max_rejected_ratio) == (2, 0.25, 1.0)
    with pytest.raises(ConfigError, match=r"^config error: pairs\.regularization_share: must be in \[0, 1\), got 1\.0$"):
        load_config(Tree, path, ["regularization_share=1.0"], section="pairs")
    path.write_text("pairs:\n  held_out_share: 0.1\n")  # a count on the command line replaces the file's share
    tree = load_config(Tree, path, ["held_out_prompts=5"], section="pairs")
    assert (tree.pairs.held_out_share, tree.pairs.held_out_prompts) == (0.0, 5)


# ---- regularisation sources ------------------------------------------------------------------


def test_imagefolder_with_metadata_jsonl(tmp_path, sid_lsg):
    folder = tmp_path / "laion"
    (folder / "train").mkdir(parents=True)
    lines = []
    for i, row in enumerate(sid_lsg.head(3).itertuples()):
        Path(folder / "train" / f"{i}.png").symlink_to(row.abs_path)
        lines.append(json.dumps({"file_name": f"{i}.png", "text": row.prompt}))
    lines.append(json.dumps({"file_name": "missing.png", "text": "gone"}))
    lines.append(json.dumps({"file_name": "0.png", "text": ""}))
    (folder / "train" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    reg = read_regularization(str(folder))
    assert reg.format == "imagefolder" and len(reg) == 3
    assert list(reg.rows.text) == list(sid_lsg.prompt.head(3))
    assert reg.skipped == {"missing_file": 1, "empty_caption": 1}


@pytest.mark.parametrize("metadata", ["metadata.jsonl", "metadata.csv"])
@pytest.mark.parametrize("check_files", [True, False])
def test_imagefolder_rows_without_a_file_name_or_caption_are_skipped_and_logged_by_row(tmp_path, sid_lsg, metadata, check_files, caplog):
    folder = tmp_path / "laion"
    folder.mkdir()
    Path(folder / "0.png").symlink_to(sid_lsg.abs_path.iloc[0])
    records = [{"file_name": "0.png", "text": "a cat"}, {"file_name": "", "text": "no file"}, {"file_name": None, "text": "none"}, {"file_name": "0.png", "text": None}, {"text": "no key"}]
    if metadata == "metadata.csv":
        pd.DataFrame(records).to_csv(folder / metadata, index=False)
    else:
        (folder / metadata).write_text("\n".join(json.dumps(r) for r in records) + "\n")
    with caplog.at_level(logging.WARNING):
        reg = read_regularization(str(folder), check_files=check_files)
    assert reg.rows.text.tolist() == ["a cat"] and reg.rows.path.tolist() == [str(folder / "0.png")]
    assert reg.skipped == {"no_image": 3, "empty_caption": 1}
    assert f"skipped 3 no_image (rows {metadata}:1, {metadata}:2, {metadata}:4)" in caplog.text
    assert f"skipped 1 empty_caption (rows {metadata}:3)" in caplog.text


def test_parquet_rows_without_a_caption_or_image_are_logged_by_file_and_row(tmp_path, sid_lsg, caplog):
    Path(tmp_path / "0.png").symlink_to(sid_lsg.abs_path.iloc[0])
    pd.DataFrame({"image_path": ["0.png", "", None, "0.png"], "caption": ["a cat", "x", "y", None]}).to_parquet(tmp_path / "pairs.parquet")
    with caplog.at_level(logging.WARNING):
        reg = read_regularization(str(tmp_path / "pairs.parquet"))
    assert len(reg) == 1 and reg.skipped == {"empty_caption": 1, "no_image": 2}
    assert reg.skipped_rows == {"empty_caption": ["pairs.parquet:3"], "no_image": ["pairs.parquet:1", "pairs.parquet:2"]}
    assert "skipped 2 no_image (rows pairs.parquet:1, pairs.parquet:2)" in caplog.text


def test_imagefolder_with_metadata_csv_and_a_named_caption_column(tmp_path, sid_lsg):
    folder = tmp_path / "laion"
    folder.mkdir()
    for i, row in enumerate(sid_lsg.head(2).itertuples()):
        Path(folder / f"{i}.png").symlink_to(row.abs_path)
    pd.DataFrame({"file_name": ["0.png", "1.png"], "TEXT": sid_lsg.prompt.head(2)}).to_csv(folder / "metadata.csv", index=False)
    assert list(read_regularization(str(folder), caption_column="TEXT").rows.text) == list(sid_lsg.prompt.head(2))
    with pytest.raises(RegularizationError, match=r"metadata.csv: no caption column 'caption' \(columns: file_name, TEXT\)"):
        read_regularization(str(folder), caption_column="caption")


def test_imagefolder_with_same_stem_txt_captions(tmp_path, sid_lsg):
    folder = tmp_path / "laion"
    folder.mkdir()
    for i, row in enumerate(sid_lsg.head(3).itertuples()):
        Path(folder / f"{i:03d}.png").symlink_to(row.abs_path)
        if i < 2:
            (folder / f"{i:03d}.txt").write_text(row.prompt + "\n")
    reg = read_regularization(str(folder))
    assert list(reg.rows.key) == ["000.png", "001.png"] and list(reg.rows.text) == list(sid_lsg.prompt.head(2))
    assert reg.skipped == {"no_caption": 1}


def test_parquet_with_relative_paths_and_with_bytes(tmp_path, sid_lsg):
    (tmp_path / "imgs").mkdir()
    for i, row in enumerate(sid_lsg.head(2).itertuples()):
        Path(tmp_path / "imgs" / f"{i}.png").symlink_to(row.abs_path)
    pd.DataFrame({"image_path": ["imgs/0.png", "imgs/1.png", "imgs/none.png"], "caption": [*sid_lsg.prompt.head(2), "x"]}).to_parquet(tmp_path / "paths.parquet")
    reg = read_regularization(str(tmp_path / "paths.parquet"))
    assert reg.format == "parquet" and len(reg) == 2 and reg.skipped == {"missing_file": 1}
    assert reg.rows.path.iloc[0] == str(tmp_path / "imgs" / "0.png")

    blobs = [Path(p).read_bytes() for p in sid_lsg.abs_path.head(2)]
    pd.DataFrame({"jpg": blobs + [None], "caption": [*sid_lsg.prompt.head(2), "no image"]}).to_parquet(tmp_path / "bytes.parquet")
    reg = read_regularization(str(tmp_path / "bytes.parquet"))
    assert len(reg) == 2 and reg.skipped == {"no_image": 1}


def make_webdataset(folder: Path, images: list[Path], captions: list[str], per_tar: int = 2) -> Path:
    """Shards as img2dataset writes them: 00000.tar with 000000000.jpg + .txt + .json, plus a parquet beside."""
    folder.mkdir(parents=True)
    for shard in range(math.ceil(len(images) / per_tar)):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(shard * per_tar, min(len(images), (shard + 1) * per_tar)):
                key = f"{i:09d}"
                jpg = io.BytesIO()
                Image.open(images[i]).convert("RGB").resize((64, 64)).save(jpg, format="JPEG")
                for ext, data in (("jpg", jpg.getvalue()), ("txt", captions[i].encode()), ("json", json.dumps({"caption": captions[i], "key": key}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        pd.DataFrame({"key": [f"{i:09d}" for i in range(len(images))]}).to_parquet(folder / f"{shard:05d}.parquet")
    return folder


def test_webdataset_tar_shards(tmp_path, sid_lsg):
    folder = make_webdataset(tmp_path / "wds", list(sid_lsg.abs_path.head(3)), list(sid_lsg.prompt.head(3)))
    reg = read_regularization(str(folder))
    assert reg.format == "webdataset"
    assert list(reg.rows.key) == ["00000.tar/000000000", "00000.tar/000000001", "00001.tar/000000002"]
    assert list(reg.rows.text) == list(sid_lsg.prompt.head(3))


def test_hub_id_without_network_is_a_one_line_error():
    with pytest.raises(RegularizationError, match=r"^cannot load regularisation dataset 'nobody/laion-subset' \(split 'train'\): ") as err:
        read_regularization("nobody/laion-subset")
    assert "\n" not in str(err.value)


# ---- the mix and the written set ---------------------------------------------------------------


def test_regularization_share_arithmetic():
    assert regularization_count(10, 0.5) == 10  # the paper: half of the final set
    assert regularization_count(30, 0.25) == 10
    assert regularization_count(10, 0.0) == 0
    assert regularization_count(6, 0.75) == 18


@pytest.fixture
def scored(tmp_path):
    return write_generations(tmp_path / "gen", {"p0": [0.1, 0.9, 0.5], "p1": [2.0, 1.0], "p2": [0.3, 0.2]})


def test_regularization_rows_are_the_configured_share_and_seeded(tmp_path, scored, sid_lsg):
    folder, scores = scored
    wds = make_webdataset(tmp_path / "wds", list(sid_lsg.abs_path), list(sid_lsg.prompt), per_tar=4)
    cfg = PairsConfig(generations=str(folder), scores=str(scores), regularization=str(wds), regularization_share=0.5, max_rejected_ratio=0.0, output_dir=str(tmp_path / "a"))
    summary = build_pairs(cfg)  # 3 chosen, 0 rejected -> 3 regularisation rows
    assert summary.counts == {"chosen": 3, "rejected": 0, "regularization": 3}
    assert summary.regularization["available"] == 6 and summary.regularization["used"] == 3
    first = datasets.load_from_disk(str(tmp_path / "a"))
    cfg.output_dir = str(tmp_path / "b")
    build_pairs(cfg)
    assert datasets.load_from_disk(str(tmp_path / "b"))["image_id"] == first["image_id"]
    reg_rows = first.filter(lambda r: r["role"] == "regularization")
    assert set(reg_rows["text"]) <= set(sid_lsg.prompt) and reg_rows["score"] == [None] * 3 and reg_rows["prompt_id"] == [None] * 3
    assert reg_rows[0]["image"].size == (64, 64)  # tar members are stored as bytes and decode


def test_short_regularization_is_an_error_with_both_counts(tmp_path, scored, sid_lsg):
    folder, scores = scored
    wds = make_webdataset(tmp_path / "wds", list(sid_lsg.abs_path.head(2)), list(sid_lsg.prompt.head(2)))
    cfg = PairsConfig(generations=str(folder), scores=str(scores), regularization=str(wds), output_dir=str(tmp_path / "out"))
    with pytest.raises(PairsError, match=r"has 2 usable image-caption pairs, 6 wanted for share 0.5 of 6 preference rows"):
        build_pairs(cfg)
    assert not (tmp_path / "out").exists()


def test_short_regularization_warn_uses_all_and_logs_counts(tmp_path, scored, sid_lsg, caplog):
    folder, scores = scored
    wds = make_webdataset(tmp_path / "wds", list(sid_lsg.abs_path.head(2)), list(sid_lsg.prompt.head(2)))
    cfg = PairsConfig(generations=str(folder), scores=str(scores), regularization=str(wds), on_short_regularization="warn", output_dir=str(tmp_path / "out"))
    with caplog.at_level(logging.WARNING, logger="sr_finetune.pairs"):
        summary = build_pairs(cfg)
    assert summary.counts["regularization"] == 2
    assert "has 2 usable image-caption pairs, 6 wanted" in caplog.text and "using all 2" in caplog.text


def test_dataset_round_trip_gives_the_rows_and_lazy_images(tmp_path, scored, sid_lsg):
    folder, scores = scored
    laion = tmp_path / "laion"
    laion.mkdir()
    for i, row in enumerate(sid_lsg.itertuples()):
        Path(laion / f"{i}.png").symlink_to(row.abs_path)
        (laion / f"{i}.txt").write_text(row.prompt)
    summary = build_pairs(PairsConfig(generations=str(folder), scores=str(scores), regularization=str(laion), regularization_share=0.5, seed=3, output_dir=str(tmp_path / "out")))
    ds = datasets.load_from_disk(str(tmp_path / "out"))
    assert summary.counts == {"chosen": 3, "rejected": 3, "regularization": 6} and len(ds) == 12
    assert isinstance(ds.features["image"], datasets.Image)
    head = ds.select(range(6)).remove_columns("image").to_pandas()
    assert list(head.role) == ["chosen", "rejected"] * 3
    assert list(head.image_id) == ["p0_1", "p0_0", "p1_0", "p1_1", "p2_0", "p2_1"]
    assert list(head.score) == [0.9, 0.1, 2.0, 1.0, 0.3, 0.2]
    assert head.text[1] == "t@y quality a photo of p0" and head.prompt_id[2] == "p1"
    raw = ds.cast_column("image", datasets.Image(decode=False))[0]["image"]
    assert raw["bytes"] is None and raw["path"] == str(folder / "images/00000/p0_1.png")  # stored as a path
    assert isinstance(ds[0]["image"], Image.Image) and ds[0]["image"].size == (8, 8)
    reg = ds.select(range(6, 12))
    assert set(reg["role"]) == {"regularization"} and set(reg["text"]) == set(sid_lsg.prompt)
    assert reg[0]["image"].size == (512, 512)


def test_keep_pairs_writes_one_pair_per_prompt(tmp_path, scored):
    folder, scores = scored
    build_pairs(PairsConfig(generations=str(folder), scores=str(scores), keep_pairs=True, max_rejected_ratio=0.0, output_dir=str(tmp_path / "out")))
    pairs = datasets.load_from_disk(str(tmp_path / "out" / "pairs"))
    assert pairs["prompt_id"] == ["p0", "p1", "p2"]  # the ratio cap shapes the mix, not the pairs
    assert pairs["chosen_image_id"] == ["p0_1", "p1_0", "p2_0"] and pairs["rejected_image_id"] == ["p0_0", "p1_1", "p2_1"]
    assert pairs[0]["rejected_text"] == "t@y quality a photo of p0" and pairs[0]["chosen_score"] == 0.9
    assert isinstance(pairs[0]["chosen_image"], Image.Image) and isinstance(pairs[0]["rejected_image"], Image.Image)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["pairs"] == 3


def test_scores_folder_of_parts_and_rebuild_replaces_the_previous_output(tmp_path, scored):
    folder, scores = scored
    parts = tmp_path / "score-run" / "scores"
    parts.mkdir(parents=True)
    table = pd.read_parquet(scores)
    table.iloc[:3].to_parquet(parts / "part-00000.parquet")
    table.iloc[3:].to_parquet(parts / "part-00001.parquet")
    cfg = PairsConfig(generations=str(folder), scores=str(tmp_path / "score-run"), output_dir=str(tmp_path / "out"))
    assert build_pairs(cfg).counts["chosen"] == 3
    cfg.include_rejected = False
    assert build_pairs(cfg).counts["chosen"] == 3
    assert set(datasets.load_from_disk(str(tmp_path / "out"))["role"]) == {"chosen"}


def test_refuses_to_overwrite_a_folder_it_did_not_write(tmp_path, scored):
    folder, scores = scored
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(PairsError, match="exists and is not a pair-builder output"):
        build_pairs(PairsConfig(generations=str(folder), scores=str(scores), output_dir=str(tmp_path / "out")))
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_embed_images_copies_the_files_into_the_dataset(tmp_path, scored):
    folder, scores = scored
    build_pairs(PairsConfig(generations=str(folder), scores=str(scores), embed_images=True, output_dir=str(tmp_path / "out")))
    raw = datasets.load_from_disk(str(tmp_path / "out")).cast_column("image", datasets.Image(decode=False))[0]["image"]
    assert raw["bytes"] == (folder / "images/00000/p0_1.png").read_bytes()


# ---- held-out prompts --------------------------------------------------------------------------

POOL = [f"p{i:02d}" for i in range(20)]


@pytest.fixture
def pool(tmp_path):
    """20 prompts x 3 scored images."""
    return write_generations(tmp_path / "pool", {p: [0.1 * i, 1.0, -1.0] for i, p in enumerate(POOL)})


def held_out_lines(out: Path) -> list[str]:
    return (out / "held_out.txt").read_text().splitlines()


def test_held_out_prompts_never_reach_the_fine_tune_set(tmp_path, pool):
    folder, scores = pool
    out = tmp_path / "out"
    summary = build_pairs(PairsConfig(generations=str(folder), scores=str(scores), held_out_share=0.3, keep_pairs=True, output_dir=str(out)))
    held = held_out_lines(out)
    held_ids = {p for p in POOL if f"a photo of {p}" in held}
    assert 0 < len(held) < len(POOL) and len(held_ids) == len(held)
    rows = datasets.load_from_disk(str(out)).remove_columns("image").to_pandas()
    pairs = datasets.load_from_disk(str(out / "pairs")).remove_columns(["chosen_image", "rejected_image"]).to_pandas()
    texts = set(rows.text) | set(pairs.chosen_text) | set(pairs.rejected_text)
    assert not [t for t in texts for prompt in held if prompt in t]  # not as chosen, not behind the negative token
    assert set(rows.prompt_id) | set(pairs.prompt_id) == set(POOL) - held_ids  # every other prompt is trained on
    assert summary.counts["chosen"] == len(POOL) - len(held) and not any(summary.skipped.values())  # held-out scores are no "unknown rows"
    written = json.loads((out / "summary.json").read_text())
    assert written["held_out"] == {"prompts": len(held), "images": 3 * len(held), "file": "held_out.txt"}
    assert written["prompts"] == len(POOL) and f"held out: {len(held)} prompts" in summary.line()


def test_the_held_out_split_is_a_seeded_hash_of_the_prompt_id_whatever_the_row_order(pool):
    manifest = read_generations(pool[0])
    cfg = PairsConfig(held_out_share=0.3)
    rank = dict(zip(POOL, held_out_rank(POOL, cfg.seed)))
    held = set(split_held_out(manifest, cfg)[1].prompt_id)
    assert held == {p for p in POOL if rank[p] < 0.3}
    assert set(split_held_out(manifest.sample(frac=1, random_state=1), cfg)[1].prompt_id) == held
    # the id alone decides: a manifest of half the prompts (another shard, another world size) agrees
    assert set(split_held_out(manifest[manifest.prompt_id < "p10"], cfg)[1].prompt_id) == {p for p in held if p < "p10"}
    assert set(split_held_out(manifest, PairsConfig(held_out_share=0.3, seed=1))[1].prompt_id) != held
    # held_out_prompts: N takes the N lowest ranks
    five = held_out_prompt_ids(POOL, PairsConfig(held_out_prompts=5))
    assert five == set(sorted(POOL, key=rank.get)[:5]) == held_out_prompt_ids(POOL[::-1], PairsConfig(held_out_prompts=5))
    assert held_out_prompt_ids(POOL, PairsConfig()) == set()  # off by default


def test_a_rebuild_from_reordered_rows_writes_the_same_held_out_file(tmp_path, pool):
    folder, scores = pool
    cfg = PairsConfig(generations=str(folder), scores=str(scores), held_out_prompts=6, output_dir=str(tmp_path / "a"))
    build_pairs(cfg)
    first = (tmp_path / "a" / "held_out.txt").read_bytes()
    pd.read_parquet(folder / "manifest.parquet").iloc[::-1].to_parquet(folder / "manifest.parquet", index=False)
    pd.read_parquet(scores).sample(frac=1, random_state=0).to_parquet(scores, index=False)
    cfg.output_dir = str(tmp_path / "b")
    assert build_pairs(cfg).held_out["prompts"] == 6
    assert (tmp_path / "b" / "held_out.txt").read_bytes() == first and len(first.splitlines()) == 6


def test_a_prompt_sharing_a_held_out_prompts_text_is_held_out_with_it():
    manifest = pd.DataFrame({"image_id": ["a0", "a1", "b0", "b1"], "prompt_id": ["a", "a", "b", "b"], "prompt": "the same prompt", "path": "x.png"})
    cfg = PairsConfig(held_out_prompts=1)
    tuning, held = split_held_out(manifest, cfg)
    assert tuning.empty and len(held) == 4


def test_the_held_out_file_has_one_prompt_per_line(tmp_path):
    held = pd.DataFrame({"prompt_id": ["2", "1", "2"], "prompt": ["a cat\nin a hat ", "a dog", "a cat\nin a hat "]})
    assert write_held_out(held, tmp_path / "h.txt") == 2
    assert (tmp_path / "h.txt").read_text() == "a dog\na cat in a hat\n"  # in prompt-id order, line breaks folded


def test_holding_out_every_prompt_is_an_error_naming_the_key(tmp_path, pool):
    folder, scores = pool
    with pytest.raises(PairsError, match="^held_out_prompts: 20 leaves no prompt to fine-tune on"):
        build_pairs(PairsConfig(generations=str(folder), scores=str(scores), held_out_prompts=20, output_dir=str(tmp_path / "out")))


def test_the_held_out_file_is_a_prompt_set_of_evaluate(tmp_path, pool, tiny_rewards):
    import yaml

    from sr_finetune.commands.cli import main

    folder, scores = pool
    build_pairs(PairsConfig(generations=str(folder), scores=str(scores), held_out_prompts=4, output_dir=str(tmp_path / "pairs")))
    # both models are the pool's own images, matched to the held-out prompts by their text
    section = {"baseline": {"images": str(folder)}, "finetuned": {"pool": {"images": str(folder)}},
               "prompt_sets": {"held_out": {"prompts": str(tmp_path / "pairs" / "held_out.txt")}}, "output_dir": str(tmp_path / "eval"),
               "images_per_prompt": 3, "device": "cpu", "metrics": ["clip"], "weights": {"clip": tiny_rewards["weights"]["clip"]}, "num_workers": 0,
               "bootstrap_samples": 50, "grid_prompts": 1, "examples_per_metric": 0, "thumbnail_size": 32}  # fmt: skip
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump({"evaluate": section}))
    assert main(["evaluate", "--config", str(tmp_path / "eval.yaml")]) == 0
    evaluated = pd.read_parquet(tmp_path / "eval" / "scores.parquet")
    assert sorted(set(evaluated.prompt)) == sorted(held_out_lines(tmp_path / "pairs")) and evaluated.path.notna().all()
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["prompt_sets"]["held_out"]["prompts_used"] == 4


def test_parquet_bytes_regularization_is_written_as_bytes(tmp_path, scored, sid_lsg):
    folder, scores = scored
    blobs = [Path(p).read_bytes() for p in sid_lsg.abs_path]
    pd.DataFrame({"jpg": blobs, "caption": sid_lsg.prompt}).to_parquet(tmp_path / "laion.parquet", row_group_size=4)
    build_pairs(PairsConfig(generations=str(folder), scores=str(scores), regularization=str(tmp_path / "laion.parquet"), output_dir=str(tmp_path / "out")))
    reg = datasets.load_from_disk(str(tmp_path / "out")).filter(lambda r: r["role"] == "regularization")
    raw = reg.cast_column("image", datasets.Image(decode=False))
    by_key = dict(zip(raw["image_id"], (r["bytes"] for r in raw["image"])))
    assert len(by_key) == 6 and all(by_key[f"laion.parquet/{i}"] == blobs[i] for i in range(6))
    assert dict(zip(reg["image_id"], reg["text"])) == {f"laion.parquet/{i}": p for i, p in enumerate(sid_lsg.prompt)}


def test_hub_dataset_rows_are_sampled_without_decoding(monkeypatch, sid_lsg):
    # No network here: stand in for the hub download with an in-memory `datasets` Dataset.
    table = datasets.Dataset.from_dict({"image": list(sid_lsg.abs_path), "caption": [*sid_lsg.prompt[:5], ""]}, features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}))
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: table)
    from sr_finetune.regularization import image_values, sample_rows

    reg = read_regularization("laion/laion-subset")
    assert reg.format == "hub" and len(reg) == 5 and reg.skipped == {"empty_caption": 1}
    rows = sample_rows(reg, 2, seed=0)
    values = image_values(reg, rows)
    assert [v["path"] for v in values] == [sid_lsg.abs_path[int(r)] for r in rows["row"]]
