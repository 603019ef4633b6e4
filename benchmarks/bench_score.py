"""Scoring throughput and memory: all six reward metrics in one streaming run (``run_scoring``).

Three modes, each printing its figures on labelled lines:

* default: tiny scorers (``reward.tiny``) on a few thousand small images written to disk
  (64-256 px, PNG and JPEG) with real prompts: end-to-end img/s of the scoring run, the pure
  model-forward img/s of the same scorers on tensors already in memory, and their ratio
  (target >= 0.8: decoding and preprocessing overlapped with compute);
* ``--flat-memory N``: a run over N table rows (a small pool of files reused) with the RSS of
  the run (main process + DataLoader workers) sampled over time, printed at 10/50/100 %;
* ``--real-size``: seeded random weights of the real architectures in the real file formats
  (OpenAI ViT-L/14 for social_reward/clip/aesthetic, open_clip ViT-H-14 for HPS v2, BLIP ViT-L +
  med BERT for ImageReward, transformers CLIP ViT-H-14 for PickScore), cached in ``--cache``,
  and 24 real 512 px images: seconds for all six metrics in one run (an absolute figure: record
  it with the date and the CPU model). A speed-up over the reference implementations is only
  a ratio of two runs side by side on the same machine, same weights and images; this script
  prints no ratio against a figure from another run.

    python benchmarks/bench_score.py [--images 3000]
    python benchmarks/bench_score.py --flat-memory 100000
    python benchmarks/bench_score.py --real-size [--cache runs/bench_score_weights] [--images-dir ../shared/data/images]
"""

from __future__ import annotations

import os

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")

import argparse
import logging
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from PIL import Image

from reward.scoring import ScoreConfig, load_scorers, plan_inputs, run_scoring
from sr_finetune.prompts import load_prompts

REPO = Path(__file__).resolve().parents[1]
PROMPT_SET = "parti"
IMAGES_PER_PROMPT = 4


# --------------------------------------------------------------------------- inputs


def random_image(rng: np.random.Generator) -> Image.Image:
    """A 64-256 px RGB image: a smooth random colour field plus noise (compresses like a photo)."""
    width, height = (int(v) for v in rng.integers(64, 257, size=2))
    field = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    noise = rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(field, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` random images, alternately PNG and JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"{i:06d}.{'png' if i % 2 else 'jpg'}"
        image = random_image(rng)  # drawn even when the file exists: the sequence stays the same
        if not path.is_file():
            image.save(path)
        paths.append(path)
    return paths


def write_table(path: Path, files: list[Path], rows: int) -> Path:
    """A csv image table of ``rows`` rows (files reused in turn), ``IMAGES_PER_PROMPT`` per prompt."""
    prompts = load_prompts(PROMPT_SET).prompts
    table = pd.DataFrame(
        {
            "image_id": [f"img{i:07d}" for i in range(rows)],
            "path": [str(files[i % len(files)]) for i in range(rows)],
            "prompt": [prompts[(i // IMAGES_PER_PROMPT) % len(prompts)] for i in range(rows)],
        }
    )
    table.to_csv(path, index=False)
    return path


def tiny_settings(folder: Path) -> dict:
    """Tiny weights of all six scorers (written once per folder)."""
    from reward.tiny import make_tiny_rewards, tiny_reward_settings

    if (folder / "pickscore" / "config.json").is_file():
        return tiny_reward_settings(folder)
    return make_tiny_rewards(folder)


def fresh(folder: Path) -> Path:
    """A new output folder beside ``folder`` (a scoring run in an existing one would resume)."""
    return folder.with_name(f"{folder.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")


def score_config(settings: dict, table: Path, output_dir: Path, args: argparse.Namespace, **overrides) -> ScoreConfig:
    values = dict(
        image_table=str(table), output_dir=str(output_dir), batch_size=args.batch_size, num_workers=args.num_workers,
        rows_per_part=args.rows_per_part, cpu_threads=args.cpu_threads, device="cpu", **settings,
    )
    values.update(overrides)
    return ScoreConfig(**values)


# --------------------------------------------------------------------------- tiny: end-to-end vs forward-only


def in_memory_batches(cfg: ScoreConfig, scorers: dict, files: list[Path], prompts: list[str], images: int) -> list[tuple[dict, dict]]:
    """The first ``images`` rows preprocessed and tokenised as the run does (shared keys, its
    batch size), held in memory."""
    plan = plan_inputs(scorers)
    batches = []
    for first in range(0, images, cfg.batch_size):
        rows = range(first, min(first + cfg.batch_size, images))
        per_image = [plan.preprocess(Image.open(files[i % len(files)])) for i in rows]
        pixels = {key: torch.stack([p[key] for p in per_image]) for key in plan.pixel_makers}
        batches.append((pixels, plan.tokenize([prompts[i] for i in rows])))
    return batches


def forward_only_rate(scorers: dict, batches: list[tuple[dict, dict]], threads: int, repeats: int) -> float:
    """img/s of the scorers' batched ``score`` calls alone with ``threads`` torch threads, best of
    ``repeats`` passes over ``batches``."""
    plan = plan_inputs(scorers)
    images = sum(len(next(iter(pixels.values()))) for pixels, _ in batches)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            for pixels, text in batches:
                for name, scorer in scorers.items():
                    scorer.score(pixels[plan.pixel_keys[name]], text[plan.text_keys[name]])
            best = min(best, time.perf_counter() - start)
    torch.set_num_threads(before)
    return images / best


def bench_tiny(args: argparse.Namespace, work: Path) -> None:
    settings = tiny_settings(work / "weights")
    start = time.perf_counter()
    files = write_images(work / "images", args.images)
    table = write_table(work / "images.csv", files, args.images)
    print(f"inputs: {args.images} images (64-256 px, PNG/JPEG) ready in {time.perf_counter() - start:.1f} s; prompts from '{PROMPT_SET}', {IMAGES_PER_PROMPT} images per prompt")
    cfg = score_config(settings, table, fresh(work / "scores"), args)
    start = time.perf_counter()
    summary = run_scoring(cfg)
    wall = time.perf_counter() - start
    end_to_end = summary.scored / summary.seconds
    print(f"settings: metrics {','.join(cfg.metrics)}; batch_size {cfg.batch_size}, num_workers {cfg.num_workers}, {len(os.sched_getaffinity(0))} CPUs (forward threads: the 'score:' log lines)")
    print(f"end-to-end: {end_to_end:.1f} img/s ({summary.scored} images in {summary.seconds:.1f} s; {wall:.1f} s with model loading and merge)")
    scorers = load_scorers(cfg, torch.device("cpu"))
    n = min(args.forward_images, args.images)
    batches = in_memory_batches(cfg, scorers, files, pd.read_csv(table).prompt.tolist(), n)
    rates = {t: forward_only_rate(scorers, batches, t, args.repeats) for t in sorted({1, torch.get_num_threads()})}
    best_threads = max(rates, key=rates.get)
    detail = ", ".join(f"{r:.1f} with {t} thread{'s' if t > 1 else ''}" for t, r in rates.items())
    print(f"forward-only: {rates[best_threads]:.1f} img/s (best of: {detail}; same scorers on {n} preprocessed images in memory, best of {args.repeats} passes)")
    print(f"ratio end-to-end / forward-only: {end_to_end / rates[best_threads]:.2f} (target >= 0.80)")


# --------------------------------------------------------------------------- flat memory


class RSSSampler(threading.Thread):
    """Every ``interval`` seconds: the RSS of this process, the PSS of this process plus its
    children (the DataLoader workers; PSS splits the pages they share, so the sum counts each
    page once) and the number of finished parts."""

    def __init__(self, parts_dir: Path, interval: float = 0.5):
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process()
        self.parts_dir = parts_dir
        self.interval = interval
        self.samples: list[tuple[float, int, float, float]] = []  # (t, parts done, main RSS MiB, all PSS MiB)
        self.stopped = threading.Event()

    def memory(self) -> tuple[float, float]:
        import psutil

        main = self.process.memory_full_info()
        total = main.pss
        for child in self.process.children(recursive=True):
            try:
                total += child.memory_full_info().pss
            except psutil.Error:  # a worker that just exited
                continue
        return main.rss / 2**20, total / 2**20

    def run(self) -> None:
        start = time.perf_counter()
        while not self.stopped.wait(self.interval):
            parts = len(list(self.parts_dir.glob("part-*.parquet"))) if self.parts_dir.is_dir() else 0
            self.samples.append((time.perf_counter() - start, parts, *self.memory()))


def bench_flat_memory(args: argparse.Namespace, work: Path) -> None:
    n = args.flat_memory
    settings = tiny_settings(work / "weights")
    files = write_images(work / "images", args.pool)
    table = write_table(work / "images.csv", files, n)
    rows_per_part = max(1, n // 20)
    cfg = score_config(settings, table, fresh(work / "scores"), args, rows_per_part=rows_per_part)
    sampler = RSSSampler(Path(cfg.output_dir) / "scores")
    sampler.start()
    summary = run_scoring(cfg)
    sampler.stopped.set()
    sampler.join()
    sampler.samples.append((sampler.samples[-1][0] if sampler.samples else 0.0, summary.parts_total, *sampler.memory()))  # after the merge
    print(f"flat-memory: {n} rows over a pool of {args.pool} files, parts of {rows_per_part}; batch_size {cfg.batch_size}, num_workers {cfg.num_workers}")
    print(f"flat-memory rate: {summary.scored / summary.seconds:.1f} img/s ({summary.scored} images in {summary.seconds:.1f} s)")
    for share in (0.1, 0.5, 1.0):
        done = [s for s in sampler.samples if s[1] * rows_per_part >= share * n]
        upto = [s for s in sampler.samples if s[1] * rows_per_part <= share * n]
        if done and upto:
            print(f"RSS at {share:.0%}: main {done[0][2]:.0f} MiB, main + workers {done[0][3]:.0f} MiB PSS (peaks so far: {max(s[2] for s in upto):.0f} / {max(s[3] for s in upto):.0f} MiB)")
    peak = max(sampler.samples, key=lambda s: s[3])
    print(f"peak: main RSS {max(s[2] for s in sampler.samples):.0f} MiB, main + workers PSS {peak[3]:.0f} MiB at {peak[1] * rows_per_part / n:.0%} ({len(sampler.samples)} samples over {sampler.samples[-1][0]:.0f} s)")


# --------------------------------------------------------------------------- real size


def real_size_builders() -> dict[str, Callable[[Path], object]]:
    """File or folder name in the weights folder -> its builder: seeded random weights of the real
    architectures, in the real formats, laid out as ``reward.tiny`` lays out the tiny ones."""
    from reward.blip import BLIP_VIT_LARGE
    from reward.clip_scorers import make_tiny_aesthetic_head
    from reward.hpsv2 import make_tiny_hpsv2
    from reward.imagereward import MED_CONFIG, make_tiny_imagereward
    from reward.openai_clip import OPENAI_VIT_L_14_CONFIG, make_tiny_openai_clip
    from reward.pickscore import make_tiny_pickscore

    vit_l = OPENAI_VIT_L_14_CONFIG
    return {
        "social_reward.pt": lambda p: make_tiny_openai_clip(p, seed=1, fmt="state_dict", config=vit_l),  # fp32 pickle, as training saves
        "clip.pt": lambda p: make_tiny_openai_clip(p, seed=0, fmt="torchscript", config=vit_l),  # OpenAI's fp16 TorchScript archive
        "aesthetic.pth": lambda p: make_tiny_aesthetic_head(p, embed_dim=vit_l["embed_dim"], seed=2),
        "hpsv2": lambda p: make_tiny_hpsv2(p, seed=3, model_config="ViT-H-14"),  # {'state_dict'} fp16, open_clip ViT-H-14
        "imagereward": lambda p: make_tiny_imagereward(p, seed=4, vision_config=BLIP_VIT_LARGE, med_config=MED_CONFIG),
        "pickscore": lambda p: make_tiny_pickscore(p, seed=5, size="ViT-H-14", logit_scale=4.6052),  # transformers CLIPModel
    }


def real_size_weights(cache: Path) -> dict:
    """Score settings for the real-size weights in ``cache``, building whatever is missing (each
    under a temporary name, renamed when complete, so an interrupted build is redone)."""
    from reward.tiny import tiny_reward_settings

    cache.mkdir(parents=True, exist_ok=True)
    for name, build in real_size_builders().items():
        target = cache / name
        if target.exists():
            continue
        start = time.perf_counter()
        partial = cache / f".partial-{name}"
        if partial.is_dir():
            shutil.rmtree(partial)
        partial.unlink(missing_ok=True)
        build(partial)
        os.replace(partial, target)
        print(f"built {target} in {time.perf_counter() - start:.0f} s", flush=True)
    return tiny_reward_settings(cache)


def real_images_table(images_dir: Path, count: int, table: Path) -> Path:
    """The first ``count`` 512 px generated images of ``images_dir/sid_lsg`` with their prompts."""
    folder = (images_dir / "sid_lsg").resolve()  # the table lives elsewhere: absolute paths
    manifest = pd.read_csv(folder / "manifest.csv")
    manifest = manifest[(manifest.width == 512) & (manifest.height == 512)].head(count)
    if len(manifest) < count:
        raise SystemExit(f"{folder}: only {len(manifest)} images of 512 px, {count} wanted")
    rows = pd.DataFrame({"image_id": [f"sid{i:02d}" for i in range(count)], "path": [str(folder / p) for p in manifest.image_path], "prompt": manifest.prompt.tolist()})
    rows.to_csv(table, index=False)
    return table


def cpu_model() -> str:
    """The CPU's model name, for absolute figures (they hold for one machine and day only)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def write_random_images(folder: Path, count: int) -> Path:
    """``count`` 512 px smooth random images with parti prompts, laid out as ``sid_lsg`` (manifest.csv),
    for a machine without the shared data folder (the scores then measure speed and memory only)."""
    rng = np.random.default_rng(0)
    target = folder / "sid_lsg"
    target.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts(PROMPT_SET).prompts
    rows = []
    for i in range(count):
        field = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((512, 512), Image.BICUBIC)
        field.save(target / f"{i:03d}.png")
        rows.append({"image_path": f"{i:03d}.png", "prompt": prompts[i % len(prompts)], "width": 512, "height": 512})
    pd.DataFrame(rows).to_csv(target / "manifest.csv", index=False)
    return folder


def bench_real_size(args: argparse.Namespace, work: Path) -> None:
    settings = real_size_weights(args.cache)
    images_dir = args.images_dir if args.images_dir.is_dir() else write_random_images(work / "random_images", args.real_images)
    if images_dir != args.images_dir:
        print(f"real-size: no {args.images_dir}; {args.real_images} random 512 px images instead (speed and memory only)")
    table = real_images_table(images_dir, args.real_images, work / "real_images.csv")
    cfg = score_config(settings, table, fresh(work / "real_scores"), args, rows_per_part=args.real_images, device=args.device, dtype=args.dtype)
    if cfg.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    summary = run_scoring(cfg)
    total = time.perf_counter() - start
    if summary.scored != args.real_images:
        raise SystemExit(f"real-size: only {summary.scored} of {args.real_images} images scored (see {cfg.output_dir}/errors.parquet); no figure")
    loading = total - summary.seconds
    device = torch.cuda.get_device_name() if cfg.device == "cuda" else cpu_model()
    print(f"real-size: metrics {','.join(cfg.metrics)}; {summary.scored} 512 px images; batch_size {cfg.batch_size}, num_workers {cfg.num_workers}, {cfg.dtype} on {cfg.device}, {len(os.sched_getaffinity(0))} CPUs, THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}")
    print(f"real-size seconds: {total:.1f} s for all six metrics in one run (model loading {loading:.1f} s, scoring {summary.seconds:.1f} s); {time.strftime('%Y-%m-%d')}, {device}")
    if cfg.device == "cuda":
        print(f"real-size peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (torch.cuda.max_memory_allocated, all six scorers)")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"real-size peak RSS: {usage.ru_maxrss / 2**20:.1f} GiB (all six scorers loaded, clip and aesthetic on one backbone)")
    print(f"real-size CPU: user {usage.ru_utime:.0f} s, system {usage.ru_stime:.0f} s, {usage.ru_majflt} major page faults (file pages read back from disk)")
    scores = pd.read_parquet(Path(cfg.output_dir) / "scores.parquet")
    print("real-size mean scores: " + ", ".join(f"{m} {scores[m].mean():.4f}" for m in cfg.metrics))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000, help="tiny mode: images written to disk and scored")
    parser.add_argument("--forward-images", type=int, default=512, help="tiny mode: images held in memory for the forward-only figure")
    parser.add_argument("--repeats", type=int, default=3, help="forward-only passes (best is kept)")
    parser.add_argument("--flat-memory", type=int, default=0, metavar="N", help="run over N table rows and sample RSS")
    parser.add_argument("--pool", type=int, default=512, help="flat-memory mode: distinct files reused by the N rows")
    parser.add_argument("--real-size", action="store_true", help="real architectures with seeded random weights, 24 real 512 px images")
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "bench_score_weights", help="real-size weights folder (made once)")
    parser.add_argument("--images-dir", type=Path, default=REPO.parent / "shared" / "data" / "images", help="real-size: the shared data images folder")
    parser.add_argument("--device", default="cpu", help="real-size: score.device (cpu, cuda)")
    parser.add_argument("--dtype", default="fp32", help="real-size: score.dtype (fp32, fp16, bf16)")
    parser.add_argument("--real-images", type=int, default=24, help="real-size: images scored")
    parser.add_argument("--batch-size", type=int, help="default: 32 (tiny modes), 8 (real size)")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--rows-per-part", type=int, default=1024)
    parser.add_argument("--cpu-threads", type=int, help="score.cpu_threads: fixed forward threads (default: torch's, every CPU)")
    parser.add_argument("--workdir", type=Path, help="keep inputs and outputs here (default: a temporary folder)")
    args = parser.parse_args()
    args.batch_size = args.batch_size or (8 if args.real_size else 32)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("reward.scoring").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory(prefix="bench_score-") as tmp:
        work = args.workdir or Path(tmp)
        if args.real_size:
            bench_real_size(args, work)
        elif args.flat_memory:
            bench_flat_memory(args, work)
        else:
            bench_tiny(args, work)


if __name__ == "__main__":
    main()
