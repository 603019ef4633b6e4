"""Prompt-distribution analysis: truncation, language filter, KL properties, and a run on real prompt sets."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from eval.prompts import (
    PromptAnalysisConfig,
    PromptSource,
    kl_divergence,
    kl_table,
    over_represented,
    run_prompt_analysis,
    select_prompts,
    smoothed_distribution,
    truncate_words,
)
from sr_finetune.config import load_config
from sr_finetune.errors import ConfigError, UserError


def test_truncation_keeps_the_first_words_and_normalises_spaces():
    assert truncate_words("a  photo\tof a red\ncat sitting on a mat", 5) == "a photo of a red"
    assert truncate_words("two words", 5) == "two words"
    assert truncate_words("masterpiece, best quality, 8k, a castle", 3) == "masterpiece, best quality,"


def test_language_filter_keeps_english_and_counts_the_rest():
    prompts = [
        "a photo of a red cat sitting on a mat",
        "un chat noir assis sur la table de la cuisine",
        "ein großer Hund läuft durch den Park im Regen",
        "a photo of a red cat sitting on a mat",  # duplicate
        "a watercolor painting of a lighthouse at dawn",
        "   ",
    ]
    sample = select_prompts("mixed", prompts, "en")
    assert sample.prompts == ["a photo of a red cat sitting on a mat", "a watercolor painting of a lighthouse at dawn"]
    assert sample.left_out == {"duplicate or blank": 2, "not detected as 'en'": 2} and sample.checked == 4
    everything = select_prompts("mixed", prompts, None)
    assert len(everything.prompts) == 4 and everything.left_out == {"duplicate or blank": 2}


def test_sampling_is_seeded_and_in_file_order():
    prompts = [f"a photo of object number {i} on a table" for i in range(40)]
    first = select_prompts("set", prompts, "en", size=10, seed=3)
    assert len(first.prompts) == 10 and first.prompts == sorted(first.prompts, key=prompts.index)
    assert select_prompts("set", prompts, "en", size=10, seed=3).prompts == first.prompts
    assert select_prompts("set", prompts, "en", size=10, seed=4).prompts != first.prompts


def test_language_filter_with_nothing_left_names_the_dataset():
    with pytest.raises(UserError, match="dataset 'fr': no prompts left"):
        select_prompts("fr", ["un chat noir assis sur la table de la cuisine"], "en")


def test_kl_is_zero_on_identical_sets():
    counts = pd.DataFrame([[5, 0, 3, 2], [5, 0, 3, 2]], index=["a", "b"])
    table = kl_table(counts, alpha=0.5)
    assert np.allclose(table.to_numpy(), 0.0, atol=1e-15)


def test_kl_is_asymmetric_and_matches_the_formula():
    counts = pd.DataFrame([[8, 1, 1], [3, 3, 4]], index=["a", "b"])
    table = kl_table(counts, alpha=1.0)
    p = np.array([9, 2, 2]) / 13
    q = np.array([4, 4, 5]) / 13
    assert table.loc["a", "b"] == pytest.approx(np.sum(p * np.log(p / q)), rel=1e-12)
    assert table.loc["b", "a"] == pytest.approx(np.sum(q * np.log(q / p)), rel=1e-12)
    assert abs(table.loc["a", "b"] - table.loc["b", "a"]) > 1e-3


def test_smoothing_keeps_kl_finite_where_one_set_has_empty_clusters():
    counts = pd.DataFrame([[10, 0, 0], [0, 5, 5]], index=["a", "b"])
    raw = counts.to_numpy() / counts.to_numpy().sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        assert np.isinf(kl_divergence(raw[0], raw[1]))
    table = kl_table(counts, alpha=0.5)
    assert np.isfinite(table.to_numpy()).all() and (table.to_numpy()[~np.eye(2, dtype=bool)] > 0).all()
    assert smoothed_distribution(counts.to_numpy(), 0.5).sum(axis=1) == pytest.approx([1.0, 1.0])


def test_over_represented_clusters_rank_by_kl_contribution():
    counts = pd.DataFrame([[20, 1, 9], [2, 15, 13], [3, 14, 13]], index=["a", "b", "c"], columns=[0, 1, 2])
    top = over_represented(counts, alpha=0.5, top=1).set_index("dataset")
    assert top.loc["a", "cluster"] == 0 and top.loc["a", "count"] == 20 and top.loc["a", "ratio"] > 5
    assert top.loc["b", "cluster_size"] == 30


def test_config_needs_two_datasets(tmp_path):
    from sr_finetune.commands.experiment import ExperimentConfig

    cfg = load_config(ExperimentConfig, None, ["datasets.parti.prompts=parti", f"output_dir={tmp_path}"], section="prompt_analysis")
    with pytest.raises(ConfigError, match="prompt_analysis.datasets: name at least two datasets"):
        run_prompt_analysis(cfg.prompt_analysis)
    with pytest.raises(ConfigError, match="prompt_analysis.words: must be positive, got 0"):
        load_config(ExperimentConfig, None, ["words=0"], section="prompt_analysis")


def _real_config(shared_data, output_dir) -> PromptAnalysisConfig:
    prompts = shared_data / "prompts"
    return PromptAnalysisConfig(
        datasets={
            "parti": PromptSource(prompts=str(prompts / "parti" / "PartiPrompts.tsv")),
            "pickapic": PromptSource(prompts=str(prompts / "pickapic_subset" / "4k_training_prompts.json")),
            "hpdv2": PromptSource(prompts=str(prompts / "hpdv2_photo" / "hps_v2_all.txt")),
        },
        samples_per_dataset=40,
        clusters=8,
        top_clusters=2,
        examples_per_cluster=2,
        tsne_perplexity=10,
        tsne_iterations=250,
        output_dir=str(output_dir),
    )


def test_analysis_of_real_prompt_sets_writes_tables_report_and_plot_deterministically(shared_data, tmp_path):
    summary = run_prompt_analysis(_real_config(shared_data, tmp_path / "a"))
    out = tmp_path / "a"
    frame = pd.read_parquet(out / "prompts.parquet")
    assert frame.groupby("dataset").size().to_dict() == {"parti": 40, "pickapic": 40, "hpdv2": 40}
    assert (frame.text.str.split().str.len() <= 5).all()
    assert all(p.split()[: len(t.split())] == t.split() for p, t in zip(frame.prompt, frame.text))
    counts = pd.read_csv(out / "cluster_counts.csv", index_col=0)
    assert counts.shape == (3, 8) and counts.sum(axis=1).tolist() == [40, 40, 40]
    kl = pd.read_csv(out / "kl.csv", index_col=0)
    assert np.allclose(np.diag(kl.to_numpy()), 0) and (kl.to_numpy()[~np.eye(3, dtype=bool)] > 0).all()
    assert summary.kl_max == pytest.approx(kl.to_numpy().max())
    png = (out / "tsne.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    report = (out / "report.md").read_text()
    assert "| KL(row ‖ column) | parti | pickapic | hpdv2 |" in report and "### pickapic" in report and "smoothing alpha = 0.5" in report
    results = json.loads((out / "results.json").read_text())
    assert [s["sampled"] for s in results["selection"]] == [40, 40, 40]
    assert len(results["over_represented"]) == 6

    run_prompt_analysis(_real_config(shared_data, tmp_path / "b"))
    again = pd.read_parquet(tmp_path / "b" / "prompts.parquet")
    assert again.prompt.tolist() == frame.prompt.tolist() and again.cluster.tolist() == frame.cluster.tolist()
    assert np.allclose(pd.read_csv(tmp_path / "b" / "kl.csv", index_col=0).to_numpy(), kl.to_numpy(), atol=1e-12)
    assert np.allclose(again[["tsne_x", "tsne_y"]].to_numpy(), frame[["tsne_x", "tsne_y"]].to_numpy(), atol=1e-3)
