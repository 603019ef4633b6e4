"""Training speed and memory of the online objectives (``backprop``, ``pg``) against ``sft`` on the tiny model, one run.

Tiny SD-2.1-shaped model (``make_tiny_sd_pipeline``), 32 px, fp32, CPU, UNet only. Each step of
every configuration handles B images:

- ``sft``: batch B rows of a fine-tune set (random 64 px images of ``bench_dpo.build_data``);
- ``backprop``: B/4 prompts x 4 images sampled with ``--ddim-steps`` DDIM steps (guidance 5, eta 1),
  gradients through the last ``--grad-steps`` of them, scored by the tiny ``aesthetic`` scorer
  (CLIP ViT at 224 px) through its differentiable path;
- ``pg``: the same sampling without gradients, the same scorer on 8-bit images, then one inner
  epoch over all the DDIM steps (one UNet forward and backward per step).

Every run is a fresh process timed from launch to exit; the steady-state rate is ``(N2 - N1) /
(t2 - t1)`` over two run lengths (start-up and saving cancel out), best of ``--repeats`` per length,
configurations interleaved. Peak memory is the largest resident set of the run's process
(``wait4``; it includes about 0.7 GiB of imported libraries). Prints the date, the CPU model and the
load average (the machine may be shared).

    python benchmarks/bench_online.py [--steps 3 8] [--repeats 1] [--batch 8] [--ddim-steps 10] [--grad-steps 1] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

RESOLUTION = 32
GROUP = 4


def child(spec: dict) -> None:
    from reward import load_training_reward
    from sr_finetune.training import FinetuneConfig, run_finetune
    from sr_finetune.training.config import OnlineSettings

    online = spec.pop("online", None)
    cfg = FinetuneConfig(**spec, **({"online": OnlineSettings(**online)} if online else {}))
    cfg.validate()
    run_finetune(cfg, reward_loader=load_training_reward)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs=2, default=[3, 8], metavar=("N1", "N2"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8, help="B: images per step (a multiple of 4)")
    parser.add_argument("--ddim-steps", type=int, default=10)
    parser.add_argument("--grad-steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs (default: torch's)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    if not 0 < args.steps[0] < args.steps[1] or args.batch % GROUP:
        sys.exit("bench_online: --steps needs 0 < N1 < N2 and --batch a multiple of 4")

    from bench_dpo import build_data, run_timed  # benchmarks/ is on sys.path when this script runs
    from bench_score import cpu_model

    from reward.tiny import make_tiny_rewards
    from sr_finetune.tiny_models import make_tiny_sd_pipeline

    with tempfile.TemporaryDirectory(prefix="bench_online-") as tmp:
        root = Path(tmp)
        model = make_tiny_sd_pipeline(root / "model", seed=0)
        rewards = make_tiny_rewards(root / "rewards")
        data = build_data(root, 16)
        online = dict(
            prompts="ddpo-animals", reward="aesthetic", reward_weights=rewards["weights"]["aesthetic"], reward_options=rewards["options"]["aesthetic"],
            prompts_per_step=args.batch // GROUP, group_size=GROUP, num_steps=args.ddim_steps, guidance_scale=5.0, eta=1.0, grad_steps=args.grad_steps,
        )
        configs = {
            f"sft, batch {args.batch} rows": dict(objective="sft", dataset=str(data), train_batch_size=args.batch, dataloader_num_workers=0),
            f"backprop, {args.batch} images, K={args.grad_steps} of {args.ddim_steps}": dict(objective="backprop", online=online),
            f"pg, {args.batch} images, {args.ddim_steps} DDIM steps": dict(objective="pg", online=online),
        }
        print(f"tiny model, {RESOLUTION} px, fp32, CPU ({os.cpu_count()} cores), threads {args.threads or 'default'}, UNet only, tiny aesthetic reward")
        print(f"{time.strftime('%Y-%m-%d')}, {cpu_model()}; load average at start: {os.getloadavg()[0]:.2f}")
        best: dict[tuple[str, int], tuple[float, float]] = {}
        for r in range(args.repeats):
            for steps in args.steps:
                for i, (name, setting) in enumerate(configs.items()):
                    tag = f"{setting['objective']}-{steps}-{r}"
                    spec = dict(
                        model=str(model), output_dir=str(root / tag), resolution=RESOLUTION, max_train_steps=steps, train_text_encoder=False,
                        device="cpu", report_to="none", checkpointing_steps=0, seed=0, **setting,
                    )
                    seconds, peak = run_timed([sys.executable, __file__, "--child", json.dumps(spec)], root / f"{tag}.log", args.threads)
                    old = best.get((name, steps))
                    best[(name, steps)] = (min(seconds, old[0]) if old else seconds, max(peak, old[1]) if old else peak)
        n1, n2 = args.steps
        rates = {}
        for name in configs:
            (t1, m1), (t2, m2) = best[(name, n1)], best[(name, n2)]
            rates[name] = ((n2 - n1) / (t2 - t1), max(m1, m2))
            print(f"{name}: {rates[name][0]:.2f} steps/s (runs of {n1} / {n2} steps: {t1:.2f} / {t2:.2f} s), peak RSS {rates[name][1]:.0f} MiB")
        sft_rate, sft_peak = next(iter(rates.values()))
        for name, (rate, peak) in list(rates.items())[1:]:
            print(f"{name.split(',')[0]} / sft: steps/s {rate / sft_rate:.3f}x, peak RSS {peak / sft_peak:.2f}x ({peak - sft_peak:+.0f} MiB)")
        print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
