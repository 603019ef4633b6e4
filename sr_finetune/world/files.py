"""The world's inputs to the library stages, as the files those stages read: prompt lists of a
split and a captioned regularisation set of true renders (the LAION share of the paper).

Both are deterministic in their seed and rewritten only when missing, so a resumed demo reads
the same files it started with.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .scenes import Prompt, render, sample_scene, split_prompts


def sample_prompts(split: str, limit: int | None, seed: int) -> list[Prompt]:
    """``limit`` prompts of ``split`` drawn without replacement (all of them when ``limit`` is None),
    in split order; a seeded draw spreads them over every attribute (the split's order does not)."""
    prompts = split_prompts(split)
    if limit is None or limit >= len(prompts):
        return prompts
    keep = np.random.default_rng(seed).choice(len(prompts), size=limit, replace=False)
    return [prompts[i] for i in sorted(keep)]


def write_prompt_file(path: str | os.PathLike, split: str, limit: int | None = None, seed: int = 0) -> Path:
    """One caption per line (a ``.txt`` prompt set); kept as is when it exists."""
    path = Path(path)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(p.text + "\n" for p in sample_prompts(split, limit, seed)))
        os.replace(tmp, path)
    return path


def write_regularization_set(out_dir: str | os.PathLike, n: int, split: str = "train", size: int = 32, seed: int = 0) -> Path:
    """``n`` true renders of ``split`` prompts with their captions, as an imagefolder
    (``images/XXXXX.png`` + ``metadata.jsonl`` with ``file_name`` and ``caption``); kept when complete."""
    out = Path(out_dir)
    metadata = out / "metadata.jsonl"
    if metadata.is_file():
        return out
    (out / "images").mkdir(parents=True, exist_ok=True)
    prompts = split_prompts(split)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        prompt = prompts[int(rng.integers(len(prompts)))]
        file_name = f"images/{i:05d}.png"
        render(sample_scene(prompt, int(rng.integers(2**62))), size).save(out / file_name)
        records.append({"file_name": file_name, "caption": prompt.text})
    tmp = metadata.with_name("metadata.jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, metadata)  # last: its presence marks the set complete
    return out


__all__ = ["sample_prompts", "write_prompt_file", "write_regularization_set"]
