"""Curation of a synthetic engagement log of 2M images and 5M remix events: wall time and peak memory.

Measures ``run_curation`` as the CLI runs it (read the parquet logs, select, pair, split, write
``triplets.parquet`` and the statistics) in a fresh process, so building the synthetic log does
not count in its peak. Target: < 30 s and < 4 GiB. Prints the peak RSS, then the seconds last.

    python benchmarks/bench_curate.py [--images 2000000] [--remixes 5000000]
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
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def _labels(prefix: str, numbers: np.ndarray) -> pa.Array:
    """``prefix + str(n)`` for every number, column-wise."""
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(numbers), pa.string()), "")


def synthetic_logs(images: int, remixes: int, seed: int = 0) -> tuple[pa.Table, pa.Table, list[str]]:
    """An images table, remix events and influencer ids shaped like a creative platform's logs.

    About 8 images per prompt; 30% of the images can be remixed, with heavy-tailed (Pareto)
    popularity; remixes come 0-60 days after posting (exponential, mean 10 days); remixed images
    got few views before their first remix, the others a wide lognormal spread of views;
    influencers are 2,000 of the 300k creators (users u0-u999999 remix)."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, max(1, images // 8), images)
    posted = np.datetime64("2024-01-01T00:00:00", "s") + rng.integers(0, 180 * 86400, images).astype("timedelta64[s]")
    popularity = np.where(rng.random(images) < 0.3, rng.pareto(1.2, images) + 0.05, 0.0)
    target = np.searchsorted(np.cumsum(popularity), rng.random(remixes) * popularity.sum())
    remixed = np.bincount(target, minlength=images) > 0
    views = np.where(remixed, rng.geometric(1 / 20, images), np.round(rng.lognormal(3.0, 2.0, images))).astype(np.int64)
    image_ids = _labels("img", np.arange(images))
    image_table = pa.table(
        {
            "image_id": image_ids,
            "prompt": pc.binary_join_element_wise("a detailed painting of subject ", pc.cast(pa.array(prompt), pa.string()), ", trending on artstation", ""),
            "path": pc.binary_join_element_wise("images/", image_ids, ".png", ""),
            "user_id": _labels("u", rng.integers(0, 300_000, images)),
            "posted_at": pa.array(posted),
            "views_before_first_remix": pa.array(views),
            "nsfw": pa.array(rng.random(images) < 0.001),
        }
    )
    delay = (rng.exponential(10 * 86400, remixes)).astype("timedelta64[s]")
    remix_table = pa.table(
        {
            "image_id": image_ids.take(pa.array(target)),
            "remixer_user_id": _labels("u", rng.integers(0, 1_000_000, remixes)),
            "at": pa.array(posted[target] + delay),
        }
    )
    influencers = [f"u{i}" for i in rng.choice(300_000, 2000, replace=False)]
    return image_table, remix_table, influencers


def run_child(folder: Path) -> None:
    from reward.curate import CurateConfig, run_curation

    cfg = CurateConfig(
        images=str(folder / "images.parquet"), remixes=str(folder / "remixes.parquet"), influencers=str(folder / "influencers.txt"),
        remix_window_days=30, filter_column="nsfw", output_dir=str(folder / "out"),
    )  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    summary = run_curation(cfg)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    print(summary.line())
    print(f"CPU time {cpu:.2f} s (all threads; wall time below it means threads ran in parallel, above it that other processes took the CPUs)")
    print(f"peak RSS {after.ru_maxrss / 1024:.0f} MiB (whole process, Python and libraries included)")  # KiB on Linux
    print(f"seconds: {seconds:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2_000_000)
    parser.add_argument("--remixes", type=int, default=5_000_000)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args.child)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        images, remixes, influencers = synthetic_logs(args.images, args.remixes)
        pq.write_table(images, folder / "images.parquet")
        pq.write_table(remixes, folder / "remixes.parquet")
        (folder / "influencers.txt").write_text("\n".join(influencers) + "\n")
        print(f"synthetic log: {images.num_rows:,} images, {remixes.num_rows:,} remix events, {len(influencers):,} influencers")
        del images, remixes
        subprocess.run([sys.executable, __file__, "--child", str(folder)], check=True)


if __name__ == "__main__":
    main()
