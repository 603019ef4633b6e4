"""An evaluation on a model card: the report's win-rate and mean tables as Markdown, the same
results as ``model-index`` metadata (``huggingface_hub.EvalResult``), and the report's plots,
same-seed image grids, tables and HTML as files beside the card (under ``eval/`` in the repo).

Everything is read from the folder ``sr-finetune evaluate`` wrote (config.yaml, tables/*.csv,
scores.parquet, figures/, report.html); nothing is recomputed.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from sr_finetune.config import load_config
from sr_finetune.errors import UserError

from .config import EvaluateConfig
from .examples import grid_prompt_ids
from .report import caveats, means_table, plural, win_rate_table

REPO_DIR = "eval"  # where the report's files go in the model repo
TASK = {"task_type": "text-to-image", "task_name": "Text-to-image generation"}
COPIED = ("report.html", "results.json", "tables/means.csv", "tables/win_rates.csv", "figures/means.png", "figures/win_rates.png")
REQUIRED = ("config.yaml", "scores.parquet", "tables/means.csv", "tables/win_rates.csv")
LABEL_WIDTH, LINE_HEIGHT = 120, 18  # image grid: model-name column, prompt line


@dataclass
class Evaluation:
    """One fine-tuned model's results in an evaluation folder, against the baseline."""

    root: Path
    cfg: EvaluateConfig  # restricted to the baseline and this model
    model: str
    means: pd.DataFrame
    wins: pd.DataFrame
    scores: pd.DataFrame

    @property
    def metrics(self) -> list[str]:
        return list(self.cfg.metrics)


@dataclass
class CardEvaluation:
    """What a push adds to a card: the section, the metadata and the files."""

    markdown: str
    eval_results: list = field(default_factory=list)  # huggingface_hub.EvalResult
    files: dict[str, bytes | Path] = field(default_factory=dict)  # path in repo -> content


def _same_model(path: str | None, folder: Path, repo_id: str | None) -> bool:
    if not path:
        return False
    return path == repo_id or (Path(path).exists() and Path(path).resolve() == folder.resolve())


def pick_model(cfg: EvaluateConfig, folder: Path, repo_id: str | None, model: str | None, root: Path) -> str:
    """The fine-tuned model of the evaluation that ``folder`` is: named, or found by its path."""
    names = ", ".join(f"{name} ({spec.path})" for name, spec in cfg.finetuned.items())
    if model is not None:
        if model not in cfg.finetuned:
            raise UserError(f"{root}: no fine-tuned model named '{model}' (it evaluates {names})")
        return model
    found = [name for name, spec in cfg.finetuned.items() if _same_model(spec.path, folder, repo_id)]
    if len(found) != 1:
        raise UserError(f"{root} evaluates {names}; {'none' if not found else 'several'} of them {'is' if not found else 'are'} {folder}: pass --eval-model NAME to put one of them on this card")
    return found[0]


def load_evaluation(root: Path, folder: Path, repo_id: str | None = None, model: str | None = None) -> Evaluation:
    """Read a finished evaluation folder; keep the baseline and the model that ``folder`` holds."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--eval {root} is not a folder; pass the output_dir of a finished `sr-finetune evaluate`")
    missing = [name for name in REQUIRED if not (root / name).is_file()]
    if missing:
        raise UserError(f"{root}: no {', '.join(missing)}; pass the output_dir of a finished `sr-finetune evaluate`")
    full = load_config(EvaluateConfig, root / "config.yaml")
    name = pick_model(full, Path(folder), repo_id, model, root)
    cfg = replace(full, finetuned={name: full.finetuned[name]})
    keep = {cfg.baseline_name, name}
    means = pd.read_csv(root / "tables" / "means.csv")
    wins = pd.read_csv(root / "tables" / "win_rates.csv")
    scores = pd.read_parquet(root / "scores.parquet")
    return Evaluation(root, cfg, name, means[means.model.isin(keep)], wins[wins.model == name], scores[scores.model.isin(keep)])


def _plain(value):
    """A plain Python value for YAML: str as is, NaN as None, integers as int, other numbers as float (exact repr)."""
    if isinstance(value, str):
        return value
    if pd.isna(value):
        return None
    return int(value) if isinstance(value, (int, np.integer)) else float(value)


def _dataset(ev: Evaluation, prompt_set: str) -> dict:
    source = ev.cfg.prompt_sets[prompt_set].prompts
    source = Path(source).name if Path(source).exists() else source
    return {"dataset_type": source, "dataset_name": f"{prompt_set} prompts ({source})", "dataset_config": prompt_set}


def eval_results(ev: Evaluation) -> list:
    """The tables as ``EvalResult``s: this model's mean per metric and prompt set, and its win rate
    over the baseline per metric, prompt set and unit, with intervals, counts and p-values as args.
    A NaN value (nothing to compare) is left out."""
    from huggingface_hub import EvalResult

    results = []
    base = ev.means[ev.means.model == ev.cfg.baseline_name].set_index(["prompt_set", "metric"])
    for r in ev.means[ev.means.model == ev.model].itertuples():
        if pd.isna(r.mean):
            continue
        args = {"ci_low": r.ci_low, "ci_high": r.ci_high, "confidence": ev.cfg.confidence, "images": r.images, "prompts": r.prompts,
                "baseline": ev.cfg.baseline_name, "baseline_mean": base.loc[(r.prompt_set, r.metric), "mean"]}
        results.append(EvalResult(**TASK, **_dataset(ev, r.prompt_set), metric_type=r.metric, metric_name=f"mean {r.metric}", metric_config="mean",
                                  metric_value=float(r.mean), metric_args={k: _plain(v) for k, v in args.items()}))
    for r in ev.wins.itertuples():
        if pd.isna(r.win_rate):
            continue
        args = {"metric": r.metric, "unit": r.unit, "baseline": r.baseline, "n": r.n, "wins": r.wins, "ties": r.ties, "losses": r.losses,
                "ci_low": r.ci_low, "ci_high": r.ci_high, "confidence": ev.cfg.confidence, "p_value": r.p_value,
                "mean_diff": r.mean_diff, "diff_ci_low": r.diff_ci_low, "diff_ci_high": r.diff_ci_high}
        results.append(EvalResult(**TASK, **_dataset(ev, r.prompt_set), metric_type="win_rate", metric_name=f"{r.metric} win rate vs {r.baseline} (per {r.unit})",
                                  metric_config=f"{r.metric}/{r.unit}", metric_value=float(r.win_rate),
                                  metric_args={k: _plain(v) for k, v in args.items()}))
    return results


def grid_png(ev: Evaluation, prompt_set: str) -> bytes:
    """The report's same-seed grid of one prompt set as one PNG: per prompt (its first
    ``grid_prompts``) a line of text, then one row per model, one column per seed."""
    from PIL import Image, ImageDraw

    size, models = ev.cfg.thumbnail_size, list(ev.cfg.models())
    in_set = ev.scores[ev.scores.prompt_set == prompt_set]
    prompt_ids = grid_prompt_ids(ev.scores, ev.cfg.baseline_name, prompt_set, ev.cfg.grid_prompts)
    columns = max(int((in_set.model == ev.cfg.baseline_name).groupby(in_set.prompt_id).sum().max()), 1)
    width = LABEL_WIDTH + columns * size
    canvas = Image.new("RGB", (width, len(prompt_ids) * (LINE_HEIGHT + len(models) * size)), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for prompt_id in prompt_ids:
        rows = in_set[in_set.prompt_id == prompt_id].sort_values("index")
        caption = f"{rows.prompt.iloc[0]} (prompt {prompt_id})"
        draw.text((4, y + 3), caption[: width // 6], fill="black")
        y += LINE_HEIGHT
        for model in models:
            draw.text((4, y + size // 2 - 6), model, fill="black")
            for k, path in enumerate(rows.loc[rows.model == model, "path"]):
                try:
                    with Image.open(ev.root / path) as image:
                        canvas.paste(image.convert("RGB").resize((size, size)), (LABEL_WIDTH + k * size, y))
                except OSError:
                    draw.rectangle((LABEL_WIDTH + k * size, y, LABEL_WIDTH + (k + 1) * size - 1, y + size - 1), outline="red")
                    draw.text((LABEL_WIDTH + k * size + 4, y + 4), "unreadable", fill="red")
            y += size
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def evaluation_markdown(ev: Evaluation, grids: list[str]) -> str:
    """The card's Evaluation section: setup, win-rate tables, mean table, plots and image grids."""
    cfg, model, base = ev.cfg, ev.model, ev.cfg.baseline_name
    spec = cfg.finetuned[model]
    negative = spec.sampling_negative_prompt()
    sampled = f"with the negative prompt `{negative}`" if negative else "without a negative prompt"
    sets = ", ".join(f"{name} ({cfg.prompt_sets[name].prompts}, {plural(int(ev.scores.loc[(ev.scores.prompt_set == name) & (ev.scores.model == base), 'prompt_id'].nunique()), 'prompt')})" for name in cfg.prompt_sets)
    notes = "\n".join(f"> **Note.** {n}\n" for n in caveats(cfg, ev.scores, ev.means))
    files = ", ".join(f"[{name}]({REPO_DIR}/{name})" for name in COPIED[1:4] if (ev.root / name).is_file())
    report = f"Full report: [{REPO_DIR}/report.html]({REPO_DIR}/report.html) (one self-contained file; download it). " if (ev.root / "report.html").is_file() else ""
    lines = [
        "## Evaluation\n",
        f"This model (`{model}` in the evaluation) against its base (`{base}`: `{cfg.baseline.path or cfg.baseline.images}`), made with "
        f"`sr-finetune evaluate`: prompt sets {sets}; {plural(cfg.images_per_prompt, 'image')} per prompt, made with the same seeds by both "
        f"models ({cfg.scheduler}, {plural(cfg.steps, 'step')}, guidance {cfg.guidance_scale}, {cfg.width}x{cfg.height}); this model is sampled {sampled}, "
        f"the base {'with `' + cfg.baseline.negative_prompt + '`' if cfg.baseline.negative_prompt else 'without one'}. In brackets: {cfg.confidence:.0%} "
        f"percentile bootstrap intervals over prompts ({cfg.bootstrap_samples} resamples); p: exact two-sided sign test of wins vs losses, ties left out. "
        f"{report}Tables: {files}.\n",
        notes,
        f"### Win rates over {base}\n",
        "Ties are counted separately, so win rate + loss rate < 100% when there are ties.\n",
        f"Per prompt (mean of its {plural(cfg.images_per_prompt, 'same-seed image')}):\n",
        win_rate_table(ev.wins, ev.metrics, "prompt").to_markdown() + "\n",
        "Per same-seed image:\n",
        win_rate_table(ev.wins, ev.metrics, "image").to_markdown() + "\n",
        "### Mean scores\n",
        f"Mean over images; in brackets the {cfg.confidence:.0%} bootstrap interval over prompts.\n",
        means_table(ev.means, ev.metrics).to_markdown() + "\n",
    ]
    plots = [(name, alt) for name, alt in (("means", "mean scores with confidence intervals"), ("win_rates", "win, tie and loss rates with confidence intervals")) if (ev.root / "figures" / f"{name}.png").is_file()]
    if plots:
        lines += ["### Plots\n", *[f"![{alt}]({REPO_DIR}/figures/{name}.png)\n" for name, alt in plots]]
    lines += ["### Same-seed images\n", f"The first {plural(cfg.grid_prompts, 'prompt')} of each set (not picked by score): one row per model, one column per seed.\n"]
    lines += [f"{name}:\n\n![same-seed images, {name}]({REPO_DIR}/figures/grid_{name}.png)\n" for name in grids]
    return "\n".join(lines)


def card_evaluation(root: Path, folder: Path, repo_id: str | None = None, model: str | None = None) -> CardEvaluation:
    """The section, ``EvalResult``s and files that put evaluation ``root`` on the card of ``folder``."""
    ev = load_evaluation(root, folder, repo_id, model)
    files: dict[str, bytes | Path] = {f"{REPO_DIR}/{name}": ev.root / name for name in COPIED if (ev.root / name).is_file()}
    grids = list(ev.cfg.prompt_sets)
    files.update({f"{REPO_DIR}/figures/grid_{name}.png": grid_png(ev, name) for name in grids})
    return CardEvaluation(evaluation_markdown(ev, grids), eval_results(ev), files)


def card_with_evaluation(card_text: str, evaluation: CardEvaluation, model_name: str) -> str:
    """The card with the Evaluation section appended and its results as ``model-index`` metadata."""
    from huggingface_hub import ModelCard

    card = ModelCard(card_text)
    card.data.model_name = model_name
    card.data.eval_results = evaluation.eval_results or None
    card.text = card.text.rstrip("\n") + "\n\n" + evaluation.markdown
    return str(ModelCard(str(card)))  # parsed again: the metadata is what the hub will read
