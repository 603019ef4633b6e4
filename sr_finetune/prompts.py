"""Read prompt sets: plain text, TSV/CSV, JSON/JSONL, parquet, named sets, or a `datasets` id.

Blank and duplicate prompts, and prompts whose id cell is empty, are skipped, counted and
reported by row, never dropped silently.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .errors import PromptError
from .tables import describe_skipped, read_csv_as_text, text_cells

logger = logging.getLogger(__name__)

PROMPT_COLUMNS = ("prompt", "Prompt", "caption", "text", "TEXT")
ID_COLUMNS = ("prompt_id", "id")
_SETS_DIR = Path(__file__).parent / "data" / "prompt_sets"
NAMED_PROMPT_SETS = {
    "parti": _SETS_DIR / "parti" / "PartiPrompts.tsv",
    "diffusiondb": _SETS_DIR / "diffusiondb_sample" / "refl_data.json",
    "imagereward-benchmark": _SETS_DIR / "imagereward_benchmark" / "benchmark-prompts.json",
    "hpdv2-photo": _SETS_DIR / "hpdv2_photo" / "hps_v2_all.txt",
    "hpdv2-photo-eval": _SETS_DIR / "hpdv2_photo" / "hps_v2_all_eval.txt",
    "ddpo-animals": _SETS_DIR / "ddpo" / "simple_animals.txt",
}


@dataclass
class PromptSet:
    """Prompts with stable ids, plus what was skipped and why (reason -> row numbers)."""

    ids: list[str]
    prompts: list[str]
    source: str
    skipped: dict[str, list[int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def skip_summary(self) -> str:
        """One line per skip reason, with the count and the first rows, or '' when nothing was skipped."""
        return describe_skipped(self.source, self.skipped)


def _read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix in (".txt", ".lst"):
        lines = path.read_text(encoding="utf-8").splitlines()
        return pd.DataFrame({"prompt": lines})
    if suffix in (".tsv", ".csv"):
        return read_csv_as_text(path, sep="\t" if suffix == ".tsv" else ",")
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            return pd.DataFrame([json.loads(line) for line in f if line.strip()])
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):  # {"prompts": [...]} or {id: prompt}
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else [{"prompt_id": k, "prompt": v} for k, v in data.items()]
        if data and all(isinstance(x, str) for x in data):
            return pd.DataFrame({"prompt": data})
        return pd.DataFrame(data)
    if suffix == ".parquet":
        return pd.read_parquet(path)
    raise PromptError(f"{path}: unsupported prompt file type '{suffix}' (use .txt, .tsv, .csv, .json, .jsonl or .parquet)")


def _read_hub_dataset(name: str, split: str) -> pd.DataFrame:
    import datasets

    try:
        return datasets.load_dataset(name, split=split).to_pandas()
    except Exception as exc:  # network, missing dataset, bad split: one line naming the id
        raise PromptError(f"prompt source '{name}' is neither a file, a named set ({', '.join(NAMED_PROMPT_SETS)}) nor a loadable dataset: {exc}") from None


def _pick_column(df: pd.DataFrame, wanted: str | None, candidates: tuple[str, ...], source: str, what: str) -> str | None:
    if wanted:
        if wanted not in df.columns:
            raise PromptError(f"{source}: no {what} column '{wanted}' (columns: {', '.join(map(str, df.columns))})")
        return wanted
    for name in candidates:
        if name in df.columns:
            return name
    return None


def resolve_prompt_source(source: str) -> str:
    """A named set's file path, or the source unchanged."""
    return str(NAMED_PROMPT_SETS[source]) if source in NAMED_PROMPT_SETS else source


def load_prompts(
    source: str,
    *,
    column: str | None = None,
    id_column: str | None = None,
    split: str = "train",
    dedupe: bool = True,
    limit: int | None = None,
) -> PromptSet:
    """Load prompts and their ids; without an id column the id is the row number (``"000042"``)."""
    if not source:
        raise PromptError("no prompt source given (set 'prompts' to a file, a named set or a dataset id)")
    resolved = resolve_prompt_source(source)
    path = Path(resolved)
    if path.exists():
        try:
            df = _read_table(path)
        except PromptError:
            raise
        except Exception as exc:  # malformed JSON/CSV/parquet: name the file
            raise PromptError(f"{path}: cannot read prompts: {str(exc).splitlines()[0]}") from None
    elif path.suffix.lower() in (".txt", ".tsv", ".csv", ".json", ".jsonl", ".parquet") or "/" not in resolved:
        raise PromptError(f"prompt file not found: {resolved}")
    else:
        df = _read_hub_dataset(resolved, split)

    prompt_col = _pick_column(df, column, PROMPT_COLUMNS, source, "prompt")
    if prompt_col is None:
        raise PromptError(f"{source}: no prompt column found (looked for {', '.join(PROMPT_COLUMNS)}; columns: {', '.join(map(str, df.columns))}); set prompt_column")
    id_col = _pick_column(df, id_column, ID_COLUMNS, source, "id")

    ids, prompts, skipped = [], [], {}
    seen_prompts: set[str] = set()
    seen_ids: set[str] = set()
    raw_prompts = text_cells(df[prompt_col]).tolist()
    raw_ids = text_cells(df[id_col]).tolist() if id_col else None
    width = max(6, len(str(len(df))))
    for row, value in enumerate(raw_prompts):
        prompt = value.strip()
        if not prompt:
            skipped.setdefault("blank prompts", []).append(row)
            continue
        if raw_ids is not None and not raw_ids[row].strip():
            skipped.setdefault("missing ids", []).append(row)
            continue
        if dedupe and prompt in seen_prompts:
            skipped.setdefault("duplicate prompts", []).append(row)
            continue
        prompt_id = raw_ids[row] if raw_ids is not None else f"{row:0{width}d}"
        if prompt_id in seen_ids:
            raise PromptError(f"{source}: duplicate prompt id '{prompt_id}' at row {row}")
        seen_prompts.add(prompt)
        seen_ids.add(prompt_id)
        ids.append(prompt_id)
        prompts.append(prompt)
        if limit is not None and len(prompts) >= limit:
            break
    result = PromptSet(ids=ids, prompts=prompts, source=source, skipped=skipped)
    if not prompts:
        detail = f" ({result.skip_summary()})" if skipped else ""
        raise PromptError(f"{source}: no usable prompts{detail}")
    return result
