"""Curation on a hand-made engagement log whose correct triplets are known.

The log (remix window 7 days, content top share 0.15, influencer ``inf1``, filter column ``nsfw``):

- 19 valid images over prompts A-F. Window remix counts: a1 a6 c1 e1 f1 = 5, a4 b1 c2 = 1,
  d1 = 0 (its 6 remixes, one by inf1, come on day 30). k = ceil(0.15 * 19) = 3, the 3rd largest
  count is 5, so the content positives are the five images with 5 (ties all in); b1 is the
  creator positive (remixed by inf1 on day 1).
- Positive prompts A B C E F; views before the first remix of their remixed images are
  10 10 10 20 30 40 50 60, whose 99th percentile (linear) is 59.3.
- Negatives (no remix, views >= 59.3): a2 (100) a5 (80) b3 (200) e2 (300) f3 (100), and f2 (400)
  which is flagged; a3 (2) and b2 (50) have too few views, b4 has none.
- e1 is flagged, so E has no positive; C has no negative. Kept: A (a1 a6 x a2 a5), B (b1 x b3),
  F (f1 x f3): 6 triplets.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from reward.curate import SKIP_REASONS, CurateConfig, CurationError, Logs, balanced_pairs, curate_triplets, run_curation
from reward.triplets import TRIPLET_COLUMNS, read_triplets
from sr_finetune.commands.cli import main
from sr_finetune.config import load_config
from sr_finetune.errors import ConfigError
from sr_finetune.commands.experiment import ExperimentConfig

EXPECTED = {("a1", "a2"), ("a1", "a5"), ("a6", "a2"), ("a6", "a5"), ("b1", "b3"), ("f1", "f3")}
T0 = pd.Timestamp("2024-01-01", tz="UTC")


def day(d: float) -> pd.Timestamp:
    return T0 + pd.Timedelta(days=d)


def hand_log() -> tuple[pd.DataFrame, pd.DataFrame]:
    views = {"a1": 10, "a2": 100, "a3": 2, "a4": 10, "a5": 80, "a6": 10, "b1": 20, "b2": 50, "b3": 200, "b4": None,
             "c1": 30, "c2": 40, "d1": 5, "d2": 500, "e1": 50, "e2": 300, "f1": 60, "f2": 400, "f3": 100}  # fmt: skip
    images = pd.DataFrame(
        {
            "image_id": list(views),
            "prompt": [f"prompt {i[0].upper()}" for i in views],
            "path": [f"img/{i}.png" for i in views],
            "user_id": [f"creator_{i}" for i in views],
            "posted_at": [day(0)] * len(views),
            "views_before_first_remix": [np.nan if v is None else float(v) for v in views.values()],
            "nsfw": [i in ("e1", "f2") for i in views],
        }
    )
    events = []
    for image, count, when, by in [("a1", 5, 1, None), ("a6", 5, 2, None), ("a4", 1, 3, None), ("b1", 1, 1, "inf1"), ("c1", 5, 1, None),
                                   ("c2", 1, 1, None), ("e1", 5, 1, None), ("f1", 5, 1, None), ("d1", 5, 30, None), ("d1", 1, 30, "inf1")]:  # fmt: skip
        events += [{"image_id": image, "remixer_user_id": by or f"remixer{len(events)}", "at": day(when)} for _ in range(count)]
    return images, pd.DataFrame(events)


def hand_config(**kw) -> CurateConfig:
    return CurateConfig(**{"remix_window_days": 7, "content_top_share": 0.15, "filter_column": "nsfw", **kw})


def curate(images=None, remixes=None, influencers=("inf1",), views=None, content_filter=None, **kw):
    log_images, log_remixes = hand_log()
    logs = Logs.of(log_images if images is None else images, log_remixes if remixes is None else remixes, views, influencers)
    return curate_triplets(logs, hand_config(**kw), content_filter)


def pairs(triplets: pd.DataFrame) -> set[tuple[str, str]]:
    return set(zip(triplets.pos_image_id, triplets.neg_image_id))


def test_hand_made_log_gives_the_known_triplets():
    triplets, stats = curate()
    assert list(triplets.columns) == TRIPLET_COLUMNS
    assert pairs(triplets) == EXPECTED and len(triplets) == 6
    assert triplets.triplet_id.tolist() == list(range(6))
    assert triplets.groupby("prompt").prompt_id.nunique().eq(1).all() and triplets.prompt_id.nunique() == 3
    assert stats["table"][-1] | {"positive_share": 0} == {"split": "all", "images": 8, "positives": 4, "negatives": 4, "triplets": 6, "prompts": 3, "users": 8, "positive_share": 0}


def test_content_signal_takes_the_top_share_with_every_tie_at_the_threshold():
    _, stats = curate(use_creator_signal=False)
    assert stats["thresholds"]["content_min_remixes"] == 5
    assert stats["funnel"]["content_positives"] == 5  # k = 3, but all five images with 5 remixes
    # a larger share reaches down to the images with one remix
    _, wider = curate(use_creator_signal=False, content_top_share=0.3)  # k = ceil(5.7) = 6 -> 6th largest = 1
    assert wider["thresholds"]["content_min_remixes"] == 1 and wider["funnel"]["content_positives"] == 8


def test_creator_signal_is_an_influencer_remix_within_the_window():
    triplets, stats = curate(use_content_signal=False)
    assert stats["funnel"]["creator_positives"] == 1
    assert pairs(triplets) == {("b1", "b2"), ("b1", "b3")}  # not d1: its influencer remix (day 30) is outside the window
    assert stats["thresholds"]["exposure_views"] == pytest.approx(20.0)  # B's only remixed image, b1, had 20 views: b2 (50) and b3 (200) pass


def test_remix_window_none_counts_every_remix():
    triplets, stats = curate(remix_window_days=None)
    # d1 (6 remixes on day 30, one by inf1) becomes a positive by both signals; d2 (500 views) its negative
    assert ("d1", "d2") in pairs(triplets) and len(triplets) == 7
    assert stats["thresholds"]["content_min_remixes"] == 5  # counts 6, 5, 5, ...: the 3rd largest is 5
    assert stats["funnel"]["content_positives"] == 6 and stats["funnel"]["both_signals"] == 1


def test_exposure_threshold_is_the_percentile_of_views_of_remixed_images_of_positive_prompts():
    triplets, stats = curate()
    assert stats["thresholds"]["exposure_views"] == pytest.approx(59.3)
    assert stats["thresholds"]["exposure_sample"] == 8
    assert set(triplets.neg_image_id) == {"a2", "a5", "b3", "f3"}  # e2 lost its prompt, f2 flagged
    _, median = curate(exposure_percentile=50)
    assert median["thresholds"]["exposure_views"] == pytest.approx(25.0)  # (20 + 30) / 2


def test_drops_and_bad_rows_are_counted_by_reason():
    images, remixes = hand_log()
    bad_images = pd.DataFrame(
        {
            "image_id": ["x1", None, "x3", "x4", "a1"],
            "prompt": ["  ", "prompt A", "prompt A", "prompt A", "prompt Z"],
            "path": ["x1.png", "x2.png", "", "x4.png", "dup.png"],
            "user_id": "u", "posted_at": [day(0), day(0), day(0), pd.NaT, day(0)], "views_before_first_remix": 1.0, "nsfw": False,
        }
    )  # fmt: skip
    bad_remixes = pd.DataFrame(
        {
            "image_id": ["zz", "a2", "a3", None, "a5"],
            "remixer_user_id": ["r", "", "r", "r", "r"],
            "at": [day(1), day(1), pd.NaT, day(1), day(-1)],
        }
    )
    triplets, stats = curate(pd.concat([images, bad_images], ignore_index=True), pd.concat([remixes, bad_remixes], ignore_index=True), influencers=("inf1", "ghost"))
    assert pairs(triplets) == EXPECTED  # the bad rows change nothing (a5's remix before posting is dropped)
    expected = dict.fromkeys(SKIP_REASONS, 0) | {
        "image_rows_missing_prompt": 1, "image_rows_missing_image_id": 1, "image_rows_missing_path": 1, "image_rows_bad_posted_at": 1,
        "duplicate_image_rows": 1, "remix_events_missing_value": 2, "remix_events_bad_at": 1, "remix_events_unknown_image": 1,
        "remix_events_before_post": 1, "images_views_missing": 1, "positives_content_filtered": 1, "negatives_content_filtered": 1,
        "prompts_without_positive": 1, "prompts_without_negative": 1,
    }  # fmt: skip
    assert stats["skipped"] == expected
    assert stats["influencers"] == {"given": 2, "unknown": 1, "unknown_examples": ["ghost"]}


def test_content_filter_callable_drops_the_images_it_flags():
    seen = []

    def no_a6(frame: pd.DataFrame) -> np.ndarray:
        seen.append(set(frame.role))
        return (frame.image_id == "a6").to_numpy()

    triplets, stats = curate(content_filter=no_a6, filter_column=None)
    assert "a6" not in set(triplets.pos_image_id)
    assert {("e1", "e2"), ("f1", "f2")} <= pairs(triplets)  # without the column, e1 and f2 are back
    assert stats["skipped"]["positives_content_filtered"] == 1 and seen == [{"positive"}, {"negative"}]


def test_balanced_pairs_cover_every_pair_once_and_any_prefix_evenly():
    for p, n in [(1, 1), (2, 5), (4, 6), (3, 3), (6, 4)]:
        group, a, b = balanced_pairs(np.array([p]), np.array([n]), None)
        assert len(set(zip(a, b))) == p * n == len(a)
        for cut in range(1, p * n + 1):
            assert np.ptp(np.bincount(a[:cut], minlength=p)) <= 1 and np.ptp(np.bincount(b[:cut], minlength=n)) <= 1
    group, a, b = balanced_pairs(np.array([2, 1, 3]), np.array([3, 2, 1]), 4)
    assert np.bincount(group).tolist() == [4, 2, 3]


def test_cap_per_prompt_keeps_a_balanced_seeded_subset():
    triplets, stats = curate(max_triplets_per_prompt=2)
    a = triplets[triplets.prompt == "prompt A"]
    assert len(a) == 2 and set(a.pos_image_id) == {"a1", "a6"} and set(a.neg_image_id) == {"a2", "a5"}
    assert stats["skipped"]["triplets_over_cap"] == 2 and stats["funnel"]["triplets_possible"] == 6


def synthetic_log(prompts: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per prompt: one image remixed by an influencer, one remixed by a regular user, three never remixed."""
    rng = np.random.default_rng(seed)
    n = prompts * 5
    ids = np.array([f"i{k}" for k in range(n)])
    images = pd.DataFrame(
        {
            "image_id": ids, "prompt": np.repeat([f"prompt {p}" for p in range(prompts)], 5), "path": [f"{i}.png" for i in ids],
            "user_id": rng.integers(0, 50, n).astype(str), "posted_at": day(0), "views_before_first_remix": rng.integers(0, 100, n).astype(float),
        }
    )  # fmt: skip
    images.loc[images.index % 5 >= 2, "views_before_first_remix"] = 1000.0
    remixes = pd.DataFrame({"image_id": np.concatenate([ids[0::5], ids[1::5]]), "remixer_user_id": ["inf"] * prompts + ["someone"] * prompts, "at": day(1)})
    return images, remixes


def test_splits_are_by_prompt_70_10_20_and_disjoint():
    images, remixes = synthetic_log(200)
    triplets, stats = curate_triplets(Logs.of(images, remixes, influencers=["inf"]), CurateConfig(use_content_signal=False))
    assert len(triplets) == 200 * 3
    assert triplets.groupby("prompt_id").split.nunique().max() == 1
    per_split = triplets.drop_duplicates("prompt_id").split.value_counts().to_dict()
    assert per_split == {"train": 140, "val": 20, "test": 40}
    assert [r["prompts"] for r in stats["table"]] == [140, 20, 40, 200]


def test_same_seed_gives_identical_triplets_whatever_the_row_order(tmp_path):
    images, remixes = synthetic_log(60)
    outputs = []
    for name, shuffle in [("a", None), ("b", None), ("shuffled", 1)]:
        imgs = images if shuffle is None else images.sample(frac=1, random_state=shuffle)
        rems = remixes if shuffle is None else remixes.sample(frac=1, random_state=shuffle)
        imgs.to_parquet(tmp_path / f"images_{name}.parquet")
        rems.to_parquet(tmp_path / f"remixes_{name}.parquet")
        cfg = CurateConfig(images=str(tmp_path / f"images_{name}.parquet"), remixes=str(tmp_path / f"remixes_{name}.parquet"), influencer_ids=["inf"], image_root="/data", max_triplets_per_prompt=2, output_dir=str(tmp_path / name))
        run_curation(cfg)
        outputs.append((tmp_path / name / "triplets.parquet").read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]
    other = run_curation(CurateConfig(images=str(tmp_path / "images_a.parquet"), remixes=str(tmp_path / "remixes_a.parquet"), influencer_ids=["inf"], seed=1, max_triplets_per_prompt=2, output_dir=str(tmp_path / "seed1")))
    assert other.triplets == 120 and (tmp_path / "seed1" / "triplets.parquet").read_bytes() != outputs[0]


def test_view_events_give_the_views_before_the_first_remix():
    images, _ = hand_log()
    # b1 (first remix on day 1): 2 views before it, 1 after; b3 (never remixed): 3 views; b2: 1 view
    views = pd.DataFrame({"image_id": ["b1", "b1", "b1", "b3", "b3", "b3", "b2", "nope"], "at": [day(t) for t in (0.5, 0.9, 2, 0.5, 2, 3, 1, 1)]})
    triplets, stats = curate(images.drop(columns="views_before_first_remix"), views=views, use_content_signal=False)
    assert stats["thresholds"]["exposure_views"] == pytest.approx(2.0)  # b1, the only remixed image of prompt B
    assert pairs(triplets) == {("b1", "b3")}
    assert stats["skipped"]["view_events_unknown_image"] == 1 and stats["skipped"]["images_views_missing"] == 0


def test_a_log_without_positives_is_a_one_line_error():
    _, remixes = hand_log()
    with pytest.raises(CurationError, match=r"^no positive image in images: content signal needs >= 1 remixes in the window .*most remixed: 0\); creator signal found 0") as err:
        curate(remixes=remixes.iloc[:0])
    assert "\n" not in str(err.value)
    with pytest.raises(CurationError, match=r"content signal off; creator signal found 0 influencer remixes in the window \(1 influencer ids, 1 unknown\)$"):
        curate(influencers=("ghost",), use_content_signal=False)


def test_missing_columns_name_the_file_and_the_column(tmp_path, capsys):
    images, remixes = hand_log()
    images.drop(columns="user_id").to_csv(tmp_path / "images.csv", index=False)
    remixes.to_csv(tmp_path / "remixes.csv", index=False)
    assert main(["curate", f"images={tmp_path / 'images.csv'}", f"remixes={tmp_path / 'remixes.csv'}", f"output_dir={tmp_path / 'out'}"]) == 2
    assert f"{tmp_path / 'images.csv'}: missing column 'user_id'" in capsys.readouterr().err
    images.to_csv(tmp_path / "images.csv", index=False)
    remixes.rename(columns={"at": "time"}).to_parquet(tmp_path / "remixes.parquet")
    with pytest.raises(CurationError, match=r"remixes.parquet: missing column 'at' \(columns: image_id, remixer_user_id, time\)"):
        run_curation(CurateConfig(images=str(tmp_path / "images.csv"), remixes=str(tmp_path / "remixes.parquet")))


def test_config_values_are_checked_with_the_key_named(tmp_path):
    with pytest.raises(ConfigError, match="curate.content_top_share: must be in"):
        load_config(ExperimentConfig, None, ["content_top_share=2"], section="curate")
    with pytest.raises(ConfigError, match="curate.test_share: val_share \\+ test_share must be in"):
        load_config(ExperimentConfig, None, ["val_share=0.5", "test_share=0.5"], section="curate")
    cfg = load_config(ExperimentConfig, None, ["remix_window_days=30", "max_triplets_per_prompt=8"], section="curate").curate
    assert (cfg.remix_window_days, cfg.max_triplets_per_prompt, cfg.exposure_percentile, cfg.content_top_share) == (30, 8, 99.0, 0.01)


def test_cli_curates_csv_logs_into_the_triplet_table_and_statistics(tmp_path, capsys):
    images, remixes = hand_log()
    images["posted_at"] = images.posted_at.dt.strftime("%Y-%m-%dT%H:%M:%SZ")  # ISO strings, as a CSV export has them
    logs = tmp_path / "logs"
    logs.mkdir()
    images.to_csv(logs / "images.csv", index=False)
    remixes.to_csv(logs / "remixes.csv", index=False)
    (logs / "influencers.txt").write_text("# influencer user ids\ninf1\n\nghost\n")
    out = tmp_path / "triplets"
    args = [f"images={logs / 'images.csv'}", f"remixes={logs / 'remixes.csv'}", f"influencers={logs / 'influencers.txt'}", "remix_window_days=7", "content_top_share=0.15", "filter_column=nsfw", f"output_dir={out}"]
    assert main(["curate", *args]) == 0
    triplets = read_triplets(out, split="all")
    assert pairs(triplets) == EXPECTED
    assert set(triplets.pos_path) == {str(logs / "img" / f"{i}.png") for i in ("a1", "a6", "b1", "f1")}  # resolved against the images table's folder
    summary = json.loads((out / "curate_summary.json").read_text())
    assert summary["thresholds"]["exposure_views"] == pytest.approx(59.3) and summary["influencers"]["unknown"] == 1
    assert (out / "stats.md").read_text().startswith("| split | images | positives | negatives | positive share | triplets | prompts | users |")
    assert "| all | 8 | 4 | 4 | 50.0% | 6 | 3 | 8 |" in (out / "stats.md").read_text()
    split_sizes = {s: len(read_triplets(out, split=s)) for s in ("train", "val", "test")}
    assert sum(split_sizes.values()) == 6
