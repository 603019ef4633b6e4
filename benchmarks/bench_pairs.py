"""Pair selection on 1,000,000 scored images (100k prompts x 10): wall time and peak memory.

Measures ``select_pairs`` (join, validity checks, best/worst per prompt, confidence filter,
ratio cap) without image I/O (``check_files=False``). Target: < 5 s and < 1 GiB.

    python benchmarks/bench_pairs.py [--prompts 100000] [--images-per-prompt 10]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from sr_finetune.pairs import PairsConfig, select_pairs


def synthetic(prompts: int, per_prompt: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A generations manifest and a shuffled scores table with a few NaNs, like a real scoring run."""
    rng = np.random.default_rng(seed)
    n = prompts * per_prompt
    prompt_ids = np.repeat([f"p{i:07d}" for i in range(prompts)], per_prompt)
    image_ids = [f"{p}_{i % per_prompt}" for i, p in enumerate(prompt_ids)]
    manifest = pd.DataFrame(
        {
            "image_id": image_ids,
            "prompt_id": prompt_ids,
            "prompt": np.repeat([f"a photo of thing number {i}, highly detailed" for i in range(prompts)], per_prompt),
            "path": [f"/data/generations/images/{i // 2560:05d}/{x}.png" for i, x in enumerate(image_ids)],
        }
    )
    order = rng.permutation(n)
    scores = pd.DataFrame({"image_id": manifest["image_id"].to_numpy()[order], "social_reward": rng.normal(size=n) * 3})
    scores.loc[rng.choice(n, size=n // 1000, replace=False), "social_reward"] = np.nan
    return manifest, scores


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0), so the selection's own peak can be read."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_child(folder: Path, repeats: int) -> None:
    """Read the tables as the pair builder does (parquet -> arrow-backed frames) and time the selection."""
    import pyarrow  # noqa: F401

    manifest = pd.read_parquet(folder / "manifest.parquet")
    scores = pd.read_parquet(folder / "scores.parquet")
    cfg = PairsConfig(confidence_k=2, max_rejected_ratio=0.8)
    inputs_rss = _vm_kib("VmRSS") / 1024
    resettable = _reset_peak()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pairs, skipped = select_pairs(manifest, scores, cfg, check_files=False)
        times.append(time.perf_counter() - start)
    selection_peak = _vm_kib("VmHWM") / 1024
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"rows: {len(scores):,} scores, {manifest.prompt_id.nunique():,} prompts -> {len(pairs):,} pair rows ({pairs.role.value_counts().to_dict()}); skipped {({k: v for k, v in skipped.items() if v})}")
    print(f"select_pairs: best {min(times):.2f} s, median {sorted(times)[len(times) // 2]:.2f} s over {repeats} runs")
    peak = f"peak RSS during selection {selection_peak:.0f} MiB (inputs loaded: {inputs_rss:.0f} MiB, selection adds {selection_peak - inputs_rss:.0f} MiB)" if resettable else f"peak RSS {process_peak:.0f} MiB"
    print(f"{peak}; whole process peak {process_peak:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=100_000)
    parser.add_argument("--images-per-prompt", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args.child, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        manifest, scores = synthetic(args.prompts, args.images_per_prompt)
        manifest.to_parquet(Path(tmp) / "manifest.parquet", index=False)
        scores.to_parquet(Path(tmp) / "scores.parquet", index=False)
        del manifest, scores
        # a fresh process, so that building the synthetic data does not count in the peak
        subprocess.run([sys.executable, __file__, "--child", tmp, "--repeats", str(args.repeats)], check=True)


if __name__ == "__main__":
    main()
