"""Social Reward training speed: steps/s and peak memory of ``train-reward`` on a tiny CLIP, side by
side with the authors' training loop, and one real-size ViT-L/14 step on the CPU.

Tiny comparison: the tiny OpenAI-layout CLIP's widths (``TINY_OPENAI_CLIP``) at ViT-L/14's depths
(24 visual, 12 text blocks), so that our paper preset and the authors' ``training_mode
visual_upper_layers_textual_upper_layers`` (``resblocks[21:]``, ``[10:]``) train the same
parameters; 224 px input, batch 32, triplet loss, fp32, CPU. Both read the same triplets (64 px
PNGs of ``reward.synthetic_triplets``). Every run is a fresh process timed from launch to exit;
the steady-state rate is ``(N2 - N1) / (t2 - t1)`` over two run lengths (start-up, validation and
saving cancel out), best of ``--repeats`` per length, ours and theirs interleaved. Peak memory is
the largest resident set of the run's process (``wait4``; DataLoader workers are separate
processes and not included).

``--reference PATH`` runs ``src/train_pair_pos_neg.py`` from a Social-Reward checkout unchanged.
It imports OpenAI's ``clip`` package, which is replaced for the run by a stand-in written here:
``clip.load`` returns the same tiny model (an open_clip ``CLIP`` built from the same file, every
parameter requiring grad as OpenAI's does) with openai/CLIP's torchvision transform, and
``clip.tokenize`` is open_clip's (= ``clip.tokenize(..., truncate=True)``). Only the training loops
differ. Target: ours >= 1.5x their steps/s.

``--real-size``: one training step of a real-size ViT-L/14 (weights built from its config, seeded,
no download) with the default preset on random pixels and real prompts, in a fresh process:
seconds per step (the second of two steps) and peak memory.

    python benchmarks/bench_reward_train.py [--steps 8 32] [--repeats 2] [--workers 2] [--threads N] [--reference ~/src/Social-Reward] [--real-size [--real-batch 32]]
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

BATCH = 32
IMAGE_SIZE = 64  # the PNGs; the CLIP preprocessing resizes them to 224 px
LEARNING_RATE = 1e-4
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
REPO = Path(__file__).resolve().parents[1]

CLIP_STAND_IN = '''"""Stand-in for OpenAI's clip package (bench_reward_train.py): the bench's tiny model, openai/CLIP's transform."""
import os

from open_clip.tokenizer import tokenize as _open_clip_tokenize
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor


def _convert_image_to_rgb(image):
    return image.convert("RGB")


def _transform(n_px):
    return Compose([Resize(n_px, interpolation=InterpolationMode.BICUBIC), CenterCrop(n_px), _convert_image_to_rgb, ToTensor(),
                    Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])


def load(name, device="cpu", jit=False):
    from reward.openai_clip import openai_clip_from_state_dict, read_openai_state_dict

    model = openai_clip_from_state_dict(read_openai_state_dict(os.environ["BENCH_CLIP_WEIGHTS"])).to(device)
    return model, _transform(model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size)


def tokenize(texts, context_length=77, truncate=False):
    return _open_clip_tokenize(texts, context_length)
'''


# ---------------------------------------------------------------------------------------------
# data and model


def build_data(root: Path, train_triplets: int, val_triplets: int = 32) -> tuple[Path, Path]:
    """The synthetic set cut to ``train_triplets`` train and ``val_triplets`` val rows (no test rows),
    as our triplets.parquet and as the authors' training file (absolute paths)."""
    import math

    import pandas as pd

    from reward.synthetic_triplets import make_synthetic_triplets
    from reward.triplets import read_triplets

    prompts = 72
    per_prompt = math.ceil(train_triplets / (prompts // 2))
    path = make_synthetic_triplets(root / "triplets", prompts=prompts, triplets_per_prompt=per_prompt, size=IMAGE_SIZE, seed=0)
    table = read_triplets(path)
    train, val = table[table.split == "train"].head(train_triplets), table[table.split == "val"].head(val_triplets)
    pd.concat([train, val]).to_parquet(path, index=False)
    reference_file = root / "reference_train.parquet"
    train[["prompt", "pos_path", "neg_path"]].to_parquet(reference_file, index=False)
    return path, reference_file


def bench_clip_config() -> dict:
    from reward.openai_clip import OPENAI_VIT_L_14_CONFIG, TINY_OPENAI_CLIP

    return {**TINY_OPENAI_CLIP, "vision_layers": OPENAI_VIT_L_14_CONFIG["vision_layers"], "text_layers": OPENAI_VIT_L_14_CONFIG["text_layers"]}


# ---------------------------------------------------------------------------------------------
# timed runs


def run_timed(cmd: list[str], log: Path, extra_env: dict | None = None, cwd: Path | None = None) -> tuple[float, float]:
    """Run ``cmd`` to completion: (seconds to exit, peak resident set in MiB)."""
    env = dict(os.environ, **OFFLINE_ENV, **(extra_env or {}))
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.exit(f"bench_reward_train: {' '.join(map(str, cmd[:4]))} ... failed (exit {process.returncode}); last lines of {log}:\n" + "".join(open(log).readlines()[-15:]))
    return seconds, usage.ru_maxrss / 1024


def run_ours(root: Path, tag: str, triplets: Path, weights: Path, steps: int, workers: int) -> tuple[float, float]:
    out = root / tag
    cmd = [
        sys.executable, "-m", "sr_finetune.commands.cli", "train-reward", f"triplets={triplets}", f"base_model={weights}", f"output_dir={out}",
        f"max_train_steps={steps}", f"batch_size={BATCH}", f"num_workers={workers}", f"learning_rate={LEARNING_RATE}",
        "checkpointing_steps=0", "test_split=null", "device=cpu", "eval_batch_size=64",
    ]
    return run_timed(cmd, root / f"{tag}.log", extra_env={"PYTHONPATH": str(REPO)})


def run_reference(root: Path, tag: str, checkout: Path, stand_in: Path, train_file: Path, weights: Path) -> tuple[float, float]:
    """The authors' train_pair_pos_neg.py, one epoch of ``train_file`` (its row count sets the steps)."""
    cmd = [
        sys.executable, str(checkout / "src" / "train_pair_pos_neg.py"), "--training_file", str(train_file),
        "--training_mode", "visual_upper_layers_textual_upper_layers", "--batch_size", str(BATCH), "--n_epochs", "1",
        "--save_folder", str(root / f"{tag}-out"), "--loss_name", "triplet", "--learning_rate", str(LEARNING_RATE),
    ]
    env = {"PYTHONPATH": os.pathsep.join([str(stand_in), str(REPO)]), "BENCH_CLIP_WEIGHTS": str(weights)}
    return run_timed(cmd, root / f"{tag}.log", extra_env=env, cwd=checkout / "src")


def steady_rate(lengths: tuple[int, int], seconds: tuple[float, float]) -> float:
    return (lengths[1] - lengths[0]) / (seconds[1] - seconds[0])


def compare(root: Path, args, triplets: Path, reference_train: Path, weights: Path) -> None:
    import pandas as pd

    n1, n2 = args.steps
    reference_files = {}
    if args.reference:
        checkout = Path(args.reference).expanduser()
        if not (checkout / "src" / "train_pair_pos_neg.py").is_file():
            sys.exit(f"bench_reward_train: --reference {checkout}: no src/train_pair_pos_neg.py there (expected a Social-Reward checkout)")
        stand_in = root / "clip-stand-in"
        (stand_in / "clip").mkdir(parents=True)
        (stand_in / "clip" / "__init__.py").write_text(CLIP_STAND_IN)
        rows = pd.read_parquet(reference_train)
        for n in (n1, n2):
            reference_files[n] = root / f"reference-{n}.parquet"
            rows.head(n * BATCH).to_parquet(reference_files[n], index=False)
        run_reference(root, "reference-warmup", checkout, stand_in, reference_files[n1], weights)  # file caches
    run_ours(root, "ours-warmup", triplets, weights, 1, args.workers)
    ours, theirs = {}, {}
    for r in range(args.repeats):  # interleaved, so a busy spell does not hit one trainer or one length only
        for n in (n1, n2):
            seconds, peak = run_ours(root, f"ours-{n}-{r}", triplets, weights, n, args.workers)
            ours[n] = min(ours.get(n, (seconds, peak, r)), (seconds, peak, r))
            if args.reference:
                seconds, peak = run_reference(root, f"reference-{n}-{r}", checkout, stand_in, reference_files[n], weights)
                theirs[n] = min(theirs.get(n, (seconds, peak)), (seconds, peak))
    rate = steady_rate((n1, n2), (ours[n1][0], ours[n2][0]))
    in_run = json.loads((root / f"ours-{n2}-{ours[n2][2]}" / "training_summary.json").read_text())
    print(f"ours: {rate:.2f} steps/s steady state (runs of {n1} / {n2} steps took {ours[n1][0]:.2f} / {ours[n2][0]:.2f} s); peak memory {ours[n2][1]:.0f} MiB")
    print(f"ours, in-run check: {in_run['steps_run'] / in_run['seconds']:.2f} steps/s over the training loop of that {n2}-step run")
    if args.reference:
        reference_rate = steady_rate((n1, n2), (theirs[n1][0], theirs[n2][0]))
        print(f"reference train_pair_pos_neg.py: {reference_rate:.2f} steps/s steady state (runs of {n1} / {n2} steps took {theirs[n1][0]:.2f} / {theirs[n2][0]:.2f} s); peak memory {theirs[n2][1]:.0f} MiB")
        print(f"ours vs reference: {rate / reference_rate:.2f}x steps/s (target >= 1.5x)")


# ---------------------------------------------------------------------------------------------
# real size


def child_real_step(batch: int, result: Path) -> None:
    """Two training steps of a seeded real-size ViT-L/14 with the default preset (the trainer's
    forward, loss and AdamW); the second is timed."""
    import resource

    import torch

    from reward.clip_scorers import SocialReward
    from reward.losses import preference_loss
    from reward.openai_clip import OPENAI_VIT_L_14_CONFIG, OpenAICLIPBackbone, build_openai_clip
    from reward.train import TripletEncoder
    from reward.train_config import TrainRewardConfig
    from reward.trainable import apply_preset, describe_trainable
    from sr_finetune.training.trainer import fused_adamw_available

    cfg = TrainRewardConfig(triplets="unused")
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_openai_clip(OPENAI_VIT_L_14_CONFIG)
    built = time.perf_counter() - start
    scorer = SocialReward(OpenAICLIPBackbone(model))
    trained = apply_preset(model, cfg.trainable)
    encoder = TripletEncoder(model).train()
    optimizer = torch.optim.AdamW(trained, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True if fused_adamw_available(torch.device("cpu")) else None)
    prompts = [f"a photo of a {animal} in a {place}, detailed, trending on artstation" for animal, place in zip(["cat", "dog", "fox", "owl"] * 8, ["forest", "city", "desert", "studio"] * 8)][:batch]
    tokens = scorer.tokenize(prompts)
    generator = torch.Generator().manual_seed(0)
    pos, neg = (torch.randn(batch, 3, 224, 224, generator=generator) for _ in range(2))
    times = []
    for _ in range(2):
        start = time.perf_counter()
        text, p, n = encoder(tokens, pos, neg)
        loss = preference_loss(cfg.loss, text, p, n, margin=cfg.margin).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result.write_text(json.dumps({"seconds": times, "build_s": built, "peak_mib": peak, "trainable": describe_trainable(model, cfg.trainable), "threads": torch.get_num_threads()}))


def real_size(root: Path, batch: int) -> None:
    result = root / "real.json"
    seconds, _ = run_timed([sys.executable, __file__, "--child-real-step", str(result), "--real-batch", str(batch)], root / "real.log", extra_env={"PYTHONPATH": str(REPO)})
    r = json.loads(result.read_text())
    print(f"real-size ViT-L/14, batch {batch} triplets ({2 * batch} images), {r['threads']} threads: {r['trainable']}")
    print(f"real-size step: {r['seconds'][1]:.1f} s per step (first step {r['seconds'][0]:.1f} s); peak memory {r['peak_mib'] / 1024:.2f} GiB; building the seeded model {r['build_s']:.1f} s; process {seconds:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs=2, default=[8, 32], metavar=("N1", "N2"), help="the two run lengths")
    parser.add_argument("--repeats", type=int, default=2, help="runs per length and trainer; the fastest counts")
    parser.add_argument("--workers", type=int, default=2, help="our DataLoader workers (the authors' loader has none)")
    parser.add_argument("--reference", help="a Social-Reward checkout: also time its src/train_pair_pos_neg.py")
    parser.add_argument("--real-size", action="store_true", help="also time one real-size ViT-L/14 training step")
    parser.add_argument("--real-batch", type=int, default=BATCH, help="triplets in the real-size step")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of every run, ours and theirs (default: torch's, every core); 1 on a CPU shared with other jobs")
    parser.add_argument("--skip-tiny", action="store_true", help="only the real-size step")
    parser.add_argument("--child-real-step", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_real_step:
        return child_real_step(args.real_batch, args.child_real_step)
    if not 0 < args.steps[0] < args.steps[1]:
        sys.exit("bench_reward_train: --steps needs 0 < N1 < N2")
    if args.threads:
        OFFLINE_ENV["OMP_NUM_THREADS"] = str(args.threads)

    from reward.openai_clip import make_tiny_openai_clip

    with tempfile.TemporaryDirectory(prefix="bench_reward_train-") as tmp:
        root = Path(tmp)
        print(f"CPU: {os.cpu_count()} cores, {f'{args.threads} torch thread(s) per run' if args.threads else 'torch default threads'}; load average at start {os.getloadavg()[0]:.2f} (other processes on the CPU slow every figure)")
        if not args.skip_tiny:
            weights = make_tiny_openai_clip(root / "clip.pt", seed=0, config=bench_clip_config())
            triplets, reference_train = build_data(root, (args.steps[1] + 1) * BATCH)  # one batch more: no run ends an epoch (no validation inside the loop)
            print(f"tiny CLIP (widths {bench_clip_config()['vision_width']}/{bench_clip_config()['text_width']}, 24 visual + 12 text blocks), 224 px, batch {BATCH}, {(args.steps[1] + 1) * BATCH} train triplets of {IMAGE_SIZE} px PNGs, our workers {args.workers}")
            compare(root, args, triplets, reference_train, weights)
        if args.real_size:
            real_size(root, args.real_batch)
        print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
