"""Training speed and memory of ``objective: dpo`` against ``sft`` on the tiny model, same data, one run.

The pair builder (``keep_pairs: true``) turns ``--prompts`` prompts x 2 generated 64 px images into
one fine-tune set: ``sft`` trains on its chosen and rejected rows, ``dpo`` on its pair table (the
same images as pairs). Tiny SD-2.1-shaped model (``make_tiny_sd_pipeline``), 32 px, fp32, CPU,
UNet trained (``--train-text-encoder`` adds the text encoder), DataLoader workers 0. Three
configurations side by side:

- ``sft``, batch B rows: B images per step;
- ``sft``, batch 2B rows: the images of a dpo step, without the reference;
- ``dpo``, batch B pairs: 2B images per step, plus the frozen reference's forward on them.

Every run is a fresh process timed from launch to exit; the steady-state rate is ``(N2 - N1) /
(t2 - t1)`` over two run lengths (start-up, caching and saving cancel out), best of ``--repeats``
per length, configurations interleaved. Peak memory is the largest resident set of the run's
process (``wait4``; it includes about 0.7 GiB of imported libraries). Prints the ratios, the date
and the CPU model.

    python benchmarks/bench_dpo.py [--steps 10 40] [--repeats 2] [--batch 8] [--prompts 64] [--threads N] [--train-text-encoder]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESOLUTION = 32
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}


def build_data(root: Path, prompts: int, size: int = 64) -> Path:
    """A generate-style folder (2 random PNGs per prompt) and its scores, through build-pairs with keep_pairs."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from sr_finetune.pairs import PairsConfig, build_pairs

    rng = np.random.default_rng(0)
    rows, scores = [], []
    (root / "gen" / "images").mkdir(parents=True)
    for p in range(prompts):
        for i in range(2):
            rel = f"images/p{p}_{i}.png"
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "gen" / rel)
            rows.append({"image_id": f"p{p}_{i}", "prompt_id": f"p{p}", "prompt": f"a photo of animal {p}", "path": rel, "seed": i, "model": "tiny"})
            scores.append({"image_id": f"p{p}_{i}", "social_reward": float(rng.random())})
    pd.DataFrame(rows).to_parquet(root / "gen" / "manifest.parquet")
    pd.DataFrame(scores).to_parquet(root / "scores.parquet")
    out = root / "set"
    build_pairs(PairsConfig(generations=str(root / "gen"), scores=str(root / "scores.parquet"), keep_pairs=True, output_dir=str(out)))
    return out


def child(spec: dict) -> None:
    from sr_finetune.training import FinetuneConfig, run_finetune

    cfg = FinetuneConfig(**spec)
    cfg.validate()
    run_finetune(cfg)


def run_timed(cmd: list[str], log: Path, threads: int | None) -> tuple[float, float]:
    """Run ``cmd`` to completion: (seconds to exit, peak resident set in MiB)."""
    env = dict(os.environ, **OFFLINE_ENV, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"bench_dpo: {log.stem} failed (exit {code}); last lines of {log}:\n" + "".join(open(log).readlines()[-15:]))
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs=2, default=[10, 40], metavar=("N1", "N2"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="B: rows (sft) or pairs (dpo) per step")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs (default: torch's)")
    parser.add_argument("--train-text-encoder", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    if not 0 < args.steps[0] < args.steps[1]:
        sys.exit("bench_dpo: --steps needs 0 < N1 < N2")

    from bench_score import cpu_model  # benchmarks/ is on sys.path when this script runs

    from sr_finetune.tiny_models import make_tiny_sd_pipeline

    with tempfile.TemporaryDirectory(prefix="bench_dpo-") as tmp:
        root = Path(tmp)
        model = make_tiny_sd_pipeline(root / "model", seed=0)
        data = build_data(root, args.prompts)
        configs = {
            f"sft, batch {args.batch} rows": dict(objective="sft", train_batch_size=args.batch, images=args.batch),
            f"sft, batch {2 * args.batch} rows": dict(objective="sft", train_batch_size=2 * args.batch, images=2 * args.batch),
            f"dpo, batch {args.batch} pairs": dict(objective="dpo", train_batch_size=args.batch, images=2 * args.batch),
        }
        print(f"tiny model, {args.prompts} prompts x 2 images ({args.prompts} pairs), {RESOLUTION} px, fp32, CPU ({os.cpu_count()} cores), "
              f"threads {args.threads or 'default'}, {'UNet + text encoder' if args.train_text_encoder else 'UNet only'}")
        print(f"{time.strftime('%Y-%m-%d')}, {cpu_model()}; load average at start: {os.getloadavg()[0]:.2f}")
        best: dict[tuple[str, int], tuple[float, float]] = {}
        for r in range(args.repeats):
            for steps in args.steps:
                for name, setting in configs.items():
                    tag = f"{setting['objective']}-{setting['train_batch_size']}-{steps}-{r}"
                    spec = dict(
                        model=str(model), dataset=str(data), output_dir=str(root / tag), resolution=RESOLUTION, max_train_steps=steps,
                        train_batch_size=setting["train_batch_size"], objective=setting["objective"], train_text_encoder=args.train_text_encoder,
                        dataloader_num_workers=0, device="cpu", report_to="none", checkpointing_steps=0, seed=0,
                    )
                    seconds, peak = run_timed([sys.executable, __file__, "--child", json.dumps(spec)], root / f"{tag}.log", args.threads)
                    old = best.get((name, steps))
                    best[(name, steps)] = (min(seconds, old[0]) if old else seconds, max(peak, old[1]) if old else peak)
        n1, n2 = args.steps
        rates = {}
        for name, setting in configs.items():
            (t1, m1), (t2, m2) = best[(name, n1)], best[(name, n2)]
            rate = (n2 - n1) / (t2 - t1)
            rates[name] = (rate, rate * setting["images"], max(m1, m2))
            print(f"{name}: {rate:.2f} steps/s, {rate * setting['images']:.1f} img/s steady state (runs of {n1} / {n2} steps: {t1:.2f} / {t2:.2f} s), peak RSS {max(m1, m2):.0f} MiB")
        dpo, same_batch, same_images = rates[f"dpo, batch {args.batch} pairs"], rates[f"sft, batch {args.batch} rows"], rates[f"sft, batch {2 * args.batch} rows"]
        print(f"dpo / sft at batch {args.batch}: steps/s {dpo[0] / same_batch[0]:.2f}x, peak RSS {dpo[2] / same_batch[2]:.2f}x ({dpo[2] - same_batch[2]:+.0f} MiB)")
        print(f"dpo / sft at the same images per step ({2 * args.batch}): steps/s {dpo[0] / same_images[0]:.2f}x, peak RSS {dpo[2] / same_images[2]:.2f}x ({dpo[2] - same_images[2]:+.0f} MiB)")
        print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
