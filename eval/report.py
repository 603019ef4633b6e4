"""The evaluation report: one self-contained HTML file (figures and thumbnails embedded as base64)
and a Markdown version that links the figures and the generated images beside it."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image

from .config import EvaluateConfig
from .examples import extreme_pairs, grid_prompt_ids
from .existing_images import Matched
from .plots import means_figure, win_rate_figure
from .stats import DEFINITIONS

FEW_PROMPTS = 20  # below this many prompts, intervals are flagged as rough
SECTIONS = [("setup", "Setup"), ("means", "1. Mean scores"), ("win-rates", "2. Win rates"), ("intervals", "3. Intervals and tests"),
            ("plots", "Plots"), ("grids", "Same-seed images"), ("examples", "Largest gains and losses"), ("method", "Method")]
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:1.5em;color:#222;line-height:1.4}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}h3{margin-bottom:.3em}
nav a{margin-right:1em}table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .55em;text-align:right;vertical-align:top}th{background:#f3f3f3}
td.l,th.l{text-align:left}td.c{text-align:center}td.nw{white-space:nowrap}.ci{color:#666;font-size:.85em}.small{color:#555;font-size:.8em}
td.win{background:#e6f4e7}td.loss{background:#fbe7e7}.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.5em .8em;margin:1em 0}
img.plot{max-width:100%;display:block;margin:.5em 0}.thumb{border:1px solid #bbb;display:block;margin:0 auto}
figure{display:inline-block;margin:0 .4em .6em 0;vertical-align:top}figcaption{font-size:.75em;color:#444;text-align:center}
.unreadable{border:1px dashed #c62828;color:#c62828;font-size:.75em;padding:.5em;overflow-wrap:anywhere}
.prompt{font-style:italic}.gl{display:flex;gap:1.5em}.gl>div{flex:1}h4{margin:.6em 0 .3em}
.pair{display:inline-block;border:1px solid #ddd;padding:.4em;margin:0 .6em .6em 0;vertical-align:top}.pair p{margin:0 0 .3em}
"""


def fmt(value: float, digits: int = 4) -> str:
    return "n/a" if pd.isna(value) else f"{value:.{digits}f}"


def pct(value: float) -> str:
    return "n/a" if pd.isna(value) else f"{100 * value:.1f}%"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def p_value(value: float) -> str:
    return "n/a" if pd.isna(value) else ("<0.001" if value < 0.001 else f"{value:.3f}")


@dataclass
class Cell:
    """A table cell: HTML and Markdown text, plus an optional CSS class."""

    html: str
    md: str
    css: str = ""

    @classmethod
    def text(cls, value: object) -> Cell:
        return cls(html.escape(str(value)), str(value).replace("|", "\\|"))


@dataclass
class Table:
    header: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    left: int = 1  # leading columns aligned left

    def to_html(self) -> str:
        head = "".join(f'<th class="{"l" if i < self.left else ""}">{html.escape(h)}</th>' for i, h in enumerate(self.header))
        body = "".join("<tr>" + "".join(f'<td class="{"l " if i < self.left else ""}{c.css}">{c.html}</td>' for i, c in enumerate(row)) + "</tr>" for row in self.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "|" + "|".join(":---" if i < self.left else "---:" for i in range(len(self.header))) + "|"]
        lines += ["| " + " | ".join(c.md for c in row) + " |" for row in self.rows]
        return "\n".join(lines)


def frame_to_markdown(frame: pd.DataFrame, digits: int = 3) -> str:
    """A data frame as a Markdown table, floats to ``digits`` decimals (cells' ``|`` escaped)."""
    rows = [[Cell.text(f"{v:.{digits}f}" if isinstance(v, float) else v) for v in row] for row in frame.itertuples(index=False)]
    return Table([str(c) for c in frame.columns], rows).to_markdown()


def means_table(means: pd.DataFrame, metrics: list[str]) -> Table:
    """Table 1: rows prompt set x model, one column per metric: mean [CI]."""
    table = Table(["prompt set", "model", *metrics], left=2)
    for (prompt_set, model), group in means.groupby(["prompt_set", "model"], sort=False):
        by_metric = group.set_index("metric")
        cells = [Cell.text(prompt_set), Cell.text(model)]
        for metric in metrics:
            r = by_metric.loc[metric]
            interval = f"[{fmt(r.ci_low)}, {fmt(r.ci_high)}]"
            cells.append(Cell(f'{fmt(r["mean"])}<br><span class="ci">{interval}</span>', f'{fmt(r["mean"])} {interval}'))
        table.rows.append(cells)
    return table


def _tint(r) -> str:
    if pd.isna(r.p_value) or r.p_value >= 0.05:
        return ""
    return "win" if r.wins > r.losses else "loss"


def win_rate_table(wins: pd.DataFrame, metrics: list[str], unit: str) -> Table:
    """Table 2: rows model x prompt set, one column per metric: win rate [CI], W/T/L and p."""
    table = Table(["model", "prompt set", *metrics], left=2)
    for (model, prompt_set), group in wins[wins.unit == unit].groupby(["model", "prompt_set"], sort=False):
        by_metric = group.set_index("metric")
        cells = [Cell.text(model), Cell.text(prompt_set)]
        for metric in metrics:
            r = by_metric.loc[metric]
            interval = f"[{pct(r.ci_low)}, {pct(r.ci_high)}]"
            counts = f"W/T/L {r.wins}/{r.ties}/{r.losses}, p {p_value(r.p_value)}"
            cells.append(Cell(f'<b>{pct(r.win_rate)}</b> <span class="ci">{interval}</span><br><span class="small">{counts}</span>', f"**{pct(r.win_rate)}** {interval} {counts}", _tint(r)))
        table.rows.append(cells)
    return table


def interval_table(wins: pd.DataFrame) -> Table:
    """Table 3: every win rate with its counts, interval, tie rate, p-value and mean difference."""
    header = ["model", "prompt set", "metric", "unit", "n", "prompts", "wins", "ties", "losses", "win rate", "CI", "tie rate", "loss rate", "sign test p", "mean diff", "diff CI"]
    table = Table(header, left=4)
    for r in wins.itertuples():
        values = [r.model, r.prompt_set, r.metric, r.unit, r.n, r.prompts, r.wins, r.ties, r.losses, pct(r.win_rate), f"[{pct(r.ci_low)}, {pct(r.ci_high)}]",
                  pct(r.tie_rate), pct(r.loss_rate), p_value(r.p_value), fmt(r.mean_diff), f"[{fmt(r.diff_ci_low)}, {fmt(r.diff_ci_high)}]"]
        cells = [Cell.text(v) for v in values]
        cells[13].css = _tint(r)
        cells[10].css = cells[15].css = "nw"
        table.rows.append(cells)
    return table


class Thumbnails:
    """Images as base64 JPEG data URIs (each file encoded once), shown at ``size`` px."""

    def __init__(self, root: Path, size: int):
        self.root, self.size, self._cache = root, size, {}

    def uri(self, path: str) -> str:
        if path not in self._cache:
            with Image.open(self.root / path) as image:
                image = image.convert("RGB")
                image.thumbnail((2 * self.size, 2 * self.size))  # 2x for sharp display on dense screens
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=85)
            self._cache[path] = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
        return self._cache[path]

    def figure(self, path: str, caption: str, title: str = "") -> str:
        """The image with a caption; a file that cannot be read is shown as such, not skipped."""
        try:
            image = f'<img class="thumb" src="{self.uri(path)}" width="{self.size}" alt="{html.escape(caption)}" title="{html.escape(title)}">'
        except OSError as exc:
            image = f'<div class="unreadable" style="width:{self.size}px">unreadable image {html.escape(path)}: {html.escape(type(exc).__name__)}</div>'
        return f"<figure>{image}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _score_title(row: pd.Series, metrics: list[str]) -> str:
    return ", ".join(f"{m} {fmt(row[m])}" for m in metrics)


def _grids(cfg: EvaluateConfig, scores: pd.DataFrame, thumbs: Thumbnails) -> tuple[str, str]:
    """Per prompt set, the first ``grid_prompts`` prompts: one row per model, one column per seed."""
    parts_html, parts_md = [], []
    models = list(cfg.models())
    for prompt_set in cfg.prompt_sets:
        parts_html.append(f"<h3>{html.escape(prompt_set)}</h3>")
        parts_md.append(f"### {prompt_set}\n")
        for prompt_id in grid_prompt_ids(scores, cfg.baseline_name, prompt_set, cfg.grid_prompts):
            rows = scores[(scores.prompt_set == prompt_set) & (scores.prompt_id == prompt_id)].sort_values("index")
            prompt = rows.prompt.iloc[0]
            base = rows[rows.model == cfg.baseline_name].set_index("index")
            table = Table(["model", *[f"image {k}" + ("" if pd.isna(s) else f", seed {s}") for k, s in base.seed.items()]])
            for model in models:
                mine = rows[rows.model == model].set_index("index")
                cells = [Cell.text(model)]
                for k in base.index:
                    r = mine.loc[k] if k in mine.index else None
                    if r is None or pd.isna(r.path):
                        cells.append(Cell('<span class="small">no image</span>', "no image", "c"))
                        continue
                    cells.append(Cell(thumbs.figure(r.path, f"{cfg.metrics[0]} {fmt(r[cfg.metrics[0]], 3)}", _score_title(r, cfg.metrics)), f"![{model} {k}]({r.path})", "c"))
                table.rows.append(cells)
            parts_html.append(f'<p><span class="prompt">“{html.escape(prompt)}”</span> <span class="small">(prompt {html.escape(str(prompt_id))})</span></p>{table.to_html()}')
            parts_md.append(f"*{prompt}* (prompt {prompt_id})\n\n{table.to_markdown()}\n")
    return "\n".join(parts_html), "\n".join(parts_md)


def _examples(cfg: EvaluateConfig, scores: pd.DataFrame, thumbs: Thumbnails) -> tuple[str, str]:
    """Per metric, model and prompt set: the pairs with the largest gains beside those with the largest losses."""
    parts_html, parts_md = [], []
    k = cfg.examples_per_metric
    for metric in cfg.metrics:
        parts_html.append(f"<h3>{html.escape(metric)}</h3>")
        parts_md.append(f"### {metric}\n")
        for model in cfg.finetuned:
            for prompt_set in cfg.prompt_sets:
                gains, losses = extreme_pairs(scores, cfg.baseline_name, model, prompt_set, metric, k)
                columns = []
                for label, rows in (("largest gains", gains), ("largest losses", losses)):
                    heading = f"{model} vs {cfg.baseline_name}, {prompt_set}: {label}"
                    parts_md.append(f"**{heading}**\n")
                    column = [f"<h4>{html.escape(heading)}</h4>"]
                    if rows.empty:
                        column.append('<p class="small">none</p>')
                        parts_md.append("none\n")
                    for r in rows.itertuples():
                        caption = f"prompt {r.prompt_id}, image {r.index}, seed {r.seed}: {metric} {fmt(r.base)} → {fmt(r.ft)} ({r.diff:+.4f})"
                        column.append(f'<div class="pair"><p class="small"><span class="prompt">“{html.escape(r.prompt)}”</span><br>{html.escape(caption)}</p>'
                                      f"{thumbs.figure(r.path_base, f'{cfg.baseline_name} {fmt(r.base, 3)}')}{thumbs.figure(r.path_ft, f'{model} {fmt(r.ft, 3)}')}</div>")
                        parts_md.append(f"- *{r.prompt}*: {caption}  \n  ![{cfg.baseline_name}]({r.path_base}) ![{model}]({r.path_ft})")
                    parts_md.append("")
                    columns.append("<div>" + "".join(column) + "</div>")
                parts_html.append('<div class="gl">' + "".join(columns) + "</div>")
    return "\n".join(parts_html), "\n".join(parts_md)


def _setup(cfg: EvaluateConfig, scores: pd.DataFrame) -> Table:
    table = Table(["item", "value"], left=2)
    for name, spec in cfg.models().items():
        role = "baseline" if name == cfg.baseline_name else "fine-tuned"
        table.rows.append([Cell.text(f"{role}: {name}"), Cell.text(spec.describe())])
    for name, spec in cfg.prompt_sets.items():
        n = scores.loc[(scores.prompt_set == name) & (scores.model == cfg.baseline_name), "prompt_id"].nunique()
        table.rows.append([Cell.text(f"prompt set: {name}"), Cell.text(f"{spec.prompts}: {plural(n, 'prompt')} x {plural(cfg.images_per_prompt, 'image')}")])
    sampling = f"{cfg.scheduler}, {cfg.steps} steps, guidance {cfg.guidance_scale}, {cfg.width}x{cfg.height}, seed {cfg.seed} (image k of prompt p: same seed for every generated model)"
    table.rows.append([Cell.text("sampling"), Cell.text(sampling)])
    table.rows.append([Cell.text("metrics"), Cell.text(", ".join(cfg.metrics))])
    table.rows.append([Cell.text("intervals"), Cell.text(f"{cfg.confidence:.0%} percentile bootstrap, {cfg.bootstrap_samples} resamples of prompts, seed {cfg.bootstrap_seed}")])
    return table


def gap_table(matched: Matched) -> Table:
    """Per existing-images model and prompt set: image slots asked for, found, missing, extra."""
    table = Table(["model", "prompt set", "source", "prompts", "images asked for", "found", "prompts without images", "images missing", "extra images (left out)"], left=3)
    for r in matched.gaps.itertuples():
        values = [r.model, r.prompt_set, matched.sources[r.model]["images"], r.prompts, r.images_expected, r.images_found, r.missing_prompts, r.missing_images, r.extra_images]
        cells = [Cell.text(v) for v in values]
        cells[7].css = "loss" if r.missing_images else ""
        table.rows.append(cells)
    return table


def gap_notes(matched: Matched) -> list[str]:
    """The gaps of the models given as existing images, and the table rows they could not use."""
    notes = []
    for r in matched.gaps[(matched.gaps.missing_images > 0) | (matched.gaps.extra_images > 0)].itertuples():
        extra = f"; {plural(r.extra_images, 'extra image')} beyond {r.images_expected // r.prompts} per prompt left out" if r.extra_images else ""
        notes.append(f"Gap: {r.model} has {r.images_found} of {r.images_expected} images on {r.prompt_set} ({plural(r.missing_prompts, 'prompt')} without any image, "
                     f"{plural(r.missing_images, 'image')} missing); the missing images are counted in 'missing' and their pairs left out{extra}.")
    for model, source in matched.sources.items():
        left_out = {"with a prompt in no prompt set": source["rows_in_no_prompt_set"], **{f"with {k}": v for k, v in source["unusable_rows"].items()}}
        if any(left_out.values()):
            listed = ", ".join(f"{n} {reason}" for reason, n in left_out.items() if n)
            notes.append(f"{model}: {sum(left_out.values())} of {source['table_rows']} rows of {source['images']} are not used ({listed}).")
    return notes


def caveats(cfg: EvaluateConfig, scores: pd.DataFrame, means: pd.DataFrame, matched: Matched | None = None) -> list[str]:
    """What a reader must know before trusting the numbers."""
    notes = gap_notes(matched) if matched is not None else []
    existing = [name for name, spec in cfg.models().items() if not spec.generated]
    if existing:
        notes.append(f"{', '.join(existing)}: existing images, paired with the other models by prompt and image index, not by seed; "
                     "their sampler settings and negative prompts are whatever made them.")
    negatives = {name: negative for name, spec in cfg.models().items() if spec.generated and (negative := spec.sampling_negative_prompt())}
    if negatives:
        listed = ", ".join(f"{n} uses {v!r}" for n, v in negatives.items())
        notes.append(f"Models are sampled with different negative prompts ({listed}); the comparison includes that inference-time difference.")
    base = scores[scores.model == cfg.baseline_name]
    for name in cfg.prompt_sets:
        n = base.loc[base.prompt_set == name, "prompt_id"].nunique()
        if n < FEW_PROMPTS:
            notes.append(f"Prompt set {name} has only {plural(n, 'prompt')}: its intervals and p-values are rough (a bootstrap interval can even shrink to a point, "
                         "e.g. [100%, 100%] when every prompt is won); use at least a few hundred prompts for decisions.")
    images = scores[scores.path.notna()]  # the slots without an image are the gaps above
    unscored = images[cfg.metrics].isna().groupby([images.model, images.prompt_set], sort=False).sum().stack()
    if unscored.sum():
        (model, prompt_set, metric), worst = unscored.idxmax(), unscored.max()
        notes.append(f"{int(unscored.sum())} image scores are missing (e.g. {worst} for {model} / {prompt_set} / {metric}); those images are left out.")
    notes.append("Per-image p-values treat the images of one prompt as independent and so overstate significance; prefer the per-prompt unit.")
    return notes


def render(cfg: EvaluateConfig, scores: pd.DataFrame, means: pd.DataFrame, wins: pd.DataFrame, figures: dict[str, bytes], matched: Matched | None = None) -> tuple[str, str]:
    """(HTML, Markdown) of the report."""
    root = Path(cfg.output_dir)
    thumbs = Thumbnails(root, cfg.thumbnail_size)
    metrics = list(cfg.metrics)
    grids_html, grids_md = _grids(cfg, scores, thumbs)
    examples_html, examples_md = _examples(cfg, scores, thumbs)
    notes = caveats(cfg, scores, means, matched)
    existing = matched is not None and bool(matched.sources)
    lead = (f"{', '.join(cfg.finetuned)} vs {cfg.baseline_name} ({cfg.baseline.path or cfg.baseline.images}): {plural(len(cfg.prompt_sets), 'prompt set')}, "
            f"{plural(cfg.images_per_prompt, 'image')} per prompt with the same seeds for every {'generated ' if existing else ''}model, {plural(len(metrics), 'metric')}.")
    gaps = gap_table(matched) if existing else None
    ties = "Ties are counted separately, so win rate + loss rate < 100% when there are ties."
    tinted = "Tinted cells: sign test p < 0.05 (green: more wins, red: more losses). " + ties
    plots = {name: "data:image/png;base64," + base64.b64encode(png).decode() for name, png in figures.items()}
    win_tables = {unit: win_rate_table(wins, metrics, unit) for unit in ("prompt", "image")}
    setup, means_t, intervals = _setup(cfg, scores), means_table(means, metrics), interval_table(wins)
    definitions = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in DEFINITIONS.items())

    body = [
        f"<h1>{html.escape(cfg.title)}</h1><p>{html.escape(lead)}</p>",
        "<nav>" + "".join(f'<a href="#{anchor}">{html.escape(title)}</a>' for anchor, title in SECTIONS) + "</nav>",
        "".join(f'<div class="note">{html.escape(n)}</div>' for n in notes),
        f'<h2 id="setup">Setup</h2>{setup.to_html()}' + (f"<h3>Existing images matched to the prompt sets</h3>{gaps.to_html()}" if gaps else ""),
        f'<h2 id="means">1. Mean scores</h2><p class="small">Mean over images; in brackets the {cfg.confidence:.0%} bootstrap interval over prompts.</p>{means_t.to_html()}',
        f'<h2 id="win-rates">2. Win rates of the fine-tuned models over {html.escape(cfg.baseline_name)}</h2><p class="small">{html.escape(tinted)}</p>',
        f"<h3>Per prompt (mean of its {plural(cfg.images_per_prompt, 'same-seed image')})</h3>{win_tables['prompt'].to_html()}",
        f"<h3>Per same-seed image</h3>{win_tables['image'].to_html()}",
        f'<h2 id="intervals">3. Intervals and sign tests</h2>{intervals.to_html()}',
        f'<h2 id="plots">Plots</h2><img class="plot" src="{plots["means"]}" alt="mean scores with confidence intervals"><img class="plot" src="{plots["win_rates"]}" alt="win, tie and loss rates with confidence intervals">',
        f'<h2 id="grids">Same-seed images</h2><p class="small">The first {cfg.grid_prompts} prompts of each set (not selected by score); hover an image for all its scores.</p>{grids_html}',
        f'<h2 id="examples">Largest gains and losses</h2><p class="small">Per metric, the {plural(cfg.examples_per_metric, "same-seed pair")} where the fine-tuned model gains most, beside those where it loses most.</p>{examples_html}',
        f'<h2 id="method">Method</h2><ul>{definitions}</ul><p class="small">Machine-readable results: results.json, tables/means.csv, tables/win_rates.csv and scores.parquet beside this file.</p>',
    ]
    pair_css = f".pair p{{max-width:{2 * cfg.thumbnail_size + 20}px}}"  # captions as wide as the two images
    page = f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>{html.escape(cfg.title)}</title><style>{CSS}{pair_css}</style></head>\n<body>\n' + "\n".join(body) + "\n</body></html>\n"

    md = [
        f"# {cfg.title}\n", lead + "\n", *[f"> **Note.** {n}\n" for n in notes],
        "## Setup\n", setup.to_markdown() + "\n", *([f"### Existing images matched to the prompt sets\n\n{gaps.to_markdown()}\n"] if gaps else []),
        f"## 1. Mean scores\n\nMean over images; in brackets the {cfg.confidence:.0%} bootstrap interval over prompts.\n", means_t.to_markdown() + "\n",
        f"## 2. Win rates of the fine-tuned models over {cfg.baseline_name}\n\n{ties}\n",
        f"### Per prompt (mean of its {plural(cfg.images_per_prompt, 'same-seed image')})\n", win_tables["prompt"].to_markdown() + "\n",
        "### Per same-seed image\n", win_tables["image"].to_markdown() + "\n",
        "## 3. Intervals and sign tests\n", intervals.to_markdown() + "\n",
        "## Plots\n", "![mean scores](figures/means.png)\n", "![win rates](figures/win_rates.png)\n",
        "## Same-seed images\n", grids_md, "## Largest gains and losses\n", examples_md,
        "## Method\n", *[f"- **{k}**: {v}" for k, v in DEFINITIONS.items()], "",
    ]
    return page, "\n".join(md)


def write_report(cfg: EvaluateConfig, scores: pd.DataFrame, means: pd.DataFrame, wins: pd.DataFrame, matched: Matched | None = None) -> Path:
    """Write ``report.html``, ``report.md`` and ``figures/*.png`` under ``output_dir``; return the HTML path."""
    root = Path(cfg.output_dir)
    figures = {"means": means_figure(means, list(cfg.models()), cfg.confidence), "win_rates": win_rate_figure(wins, cfg.confidence)}
    (root / "figures").mkdir(parents=True, exist_ok=True)
    for name, png in figures.items():
        (root / "figures" / f"{name}.png").write_bytes(png)
    page, md = render(cfg, scores, means, wins, figures, matched)
    (root / "report.md").write_text(md, encoding="utf-8")
    (root / "report.html").write_text(page, encoding="utf-8")
    return root / "report.html"
