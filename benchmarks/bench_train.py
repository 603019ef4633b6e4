"""Training speed on the tiny model: steady-state steps/s, start-up time and loop overhead.

Fine-tunes a tiny SD-2.1-shaped model (``make_tiny_sd_pipeline``: UNet 32/64 channels, one layer
per block, a 4-layer text encoder of width 64) at 32 px, batch 8, on the CPU, with
``run_finetune`` exactly as a user would, for the UNet alone and for UNet + text encoder. Every
run is a fresh process, timed from launch to exit; the steady-state rate is ``(N2 - N1) /
(t2 - t1)`` over two run lengths, so start-up and the final save cancel out.

- start-up: launch to the end of the first optimizer step (imports, model load, latent and
  text-embedding cache, first step);
- overhead share: in the longer run, the share of wall time per step spent outside the
  UNet / text-encoder forward, the backward, gradient clipping and the optimizer (data,
  noise sampling, loss checks, logging, progress bar, checkpoint checks); timed by wrapping
  those calls, over all steps after the first five;
- model step alone: the same loss, backward and optimizer on one in-memory batch in a bare
  loop, the ceiling the training loop can reach.

Targets: UNet-only >= 1.5x the steps/s of diffusers' examples/text_to_image/train_text_to_image.py
(``--reference PATH`` runs it from a diffusers checkout on the same model and data, same two
lengths) and an overhead share under 15%.

    python benchmarks/bench_train.py [--steps 20 120] [--repeats 2] [--workers 0] [--reference ~/src/diffusers] [--dynamo-backend inductor]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESOLUTION = 32
BATCH = 8
WARMUP_STEPS = 5  # steps left out of the overhead window
TEXT_ENCODER = {"text_hidden_size": 64, "text_layers": 4, "text_heads": 4, "text_intermediate_size": 256}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
OUR_ENV: dict[str, str] = {}  # added to our runs' environment only (--dynamo-backend)


# ---------------------------------------------------------------------------------------------
# data: one set of images, as a fine-tune set (ours) and as an imagefolder (the reference)


def build_data(root: Path, prompts: int, regularization: int, size: int = 64) -> tuple[Path, Path]:
    """Random ``size`` px images: ``prompts`` chosen/rejected pairs plus regularisation rows."""
    import numpy as np
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    rows = []
    for i in range(prompts):
        rows.append({"text": f"a photo of animal {i}", "role": "chosen", "prompt_id": f"p{i}"})
        rows.append({"text": f"t@y quality a photo of animal {i}", "role": "rejected", "prompt_id": f"p{i}"})
    rows += [{"text": f"a laion caption {i}", "role": "regularization", "prompt_id": f"laion{i}"} for i in range(regularization)]
    folder = root / "imagefolder"
    folder.mkdir(parents=True)
    with open(folder / "metadata.jsonl", "w") as meta:
        for i, row in enumerate(rows):
            name = f"{i:05d}.png"
            PILImage.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / name)
            meta.write(json.dumps({"file_name": name, "text": row["text"]}) + "\n")
            row.update(image=str(folder / name), score=float(rng.random()))
    features = Features({"text": Value("string"), "role": Value("string"), "prompt_id": Value("string"), "image": Image(), "score": Value("float32")})
    pairs = root / "pairs"
    Dataset.from_list(rows, features=features).save_to_disk(str(pairs))
    return pairs, folder


# ---------------------------------------------------------------------------------------------
# child process: one training run with timers around the model's own work


class StepTimer:
    """Intervals spent inside wrapped calls, and when each optimizer step ended."""

    def __init__(self) -> None:
        self.inside: list[tuple[float, float]] = []
        self.step_ends: list[float] = []

    def wrap(self, owner: type, name: str, step_end: bool = False) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                end = time.perf_counter()
                self.inside.append((start, end))
                if step_end:
                    self.step_ends.append(end)

        setattr(owner, name, timed)

    def overhead_share(self, warmup: int) -> tuple[float, float]:
        """(share of the window outside wrapped calls, window seconds), from the end of step ``warmup`` to the last."""
        start, end = self.step_ends[warmup - 1], self.step_ends[-1]
        inside = sum(b - a for a, b in self.inside if a >= start and b <= end)
        return 1.0 - inside / (end - start), end - start


def install_timers() -> StepTimer:
    """Time the UNet and text-encoder forwards, the backward, clipping and the optimizer step."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    timer = StepTimer()
    for owner, name in ((UNet2DConditionModel, "forward"), (CLIPTextModel, "forward"), (Accelerator, "backward"), (Accelerator, "clip_grad_norm_"), (AcceleratedOptimizer, "step")):
        timer.wrap(owner, name)
    timer.wrap(AcceleratedOptimizer, "zero_grad", step_end=True)  # the trainer's last call of a step
    return timer


def child_train(spec: dict, result_path: Path) -> None:
    """One ``run_finetune`` with timers; writes step times and the overhead share as JSON."""
    wall_offset = time.time() - time.perf_counter()
    from sr_finetune.training import FinetuneConfig, run_finetune

    timer = install_timers()
    cfg = FinetuneConfig(**spec)
    cfg.validate()
    summary = run_finetune(cfg)
    share, window = timer.overhead_share(WARMUP_STEPS) if len(timer.step_ends) > WARMUP_STEPS + 1 else (float("nan"), 0.0)
    result = {
        "steps": summary.global_step,
        "first_step_end": timer.step_ends[0] + wall_offset,
        "overhead_share": share,
        "window_s": window,
        "window_steps": len(timer.step_ends) - WARMUP_STEPS,
        "final_loss": summary.final_loss,
    }
    result_path.write_text(json.dumps(result))


def child_model_step(spec: dict, result_path: Path, steps: int = 40) -> None:
    """The trainer's loss, backward, clipping and optimizer on one in-memory batch, in a bare loop."""
    import torch

    from sr_finetune.models import load_components
    from sr_finetune.training import FinetuneConfig
    from sr_finetune.training.data import tokenize
    from sr_finetune.training.trainer import build_optimizer, compute_loss

    cfg = FinetuneConfig(**spec)
    parts = load_components(cfg.model, attention=cfg.attention)
    parts.vae.requires_grad_(False)
    parts.text_encoder.requires_grad_(cfg.train_text_encoder)
    trained = [parts.unet] + ([parts.text_encoder] if cfg.train_text_encoder else [])
    params = [p for m in trained for p in m.parameters()]
    optimizer = build_optimizer(cfg, [{"params": params, "lr": cfg.unet_lr}], torch.device("cpu"))
    for module in trained:
        module.train()
    latent_shape = (BATCH, 4, RESOLUTION // 2, RESOLUTION // 2)
    batch = {"latent_mean": torch.randn(latent_shape), "latent_logvar": torch.full(latent_shape, -4.0)}
    texts = [f"a photo of animal {i}" for i in range(BATCH)]
    if cfg.train_text_encoder:
        batch["input_ids"] = tokenize(parts.tokenizer, texts)
    else:
        with torch.no_grad():
            batch["prompt_embeds"] = parts.text_encoder(tokenize(parts.tokenizer, texts))[0]

    def step(i: int) -> None:
        generator = torch.Generator().manual_seed(i)
        loss = compute_loss(batch, unet=parts.unet, text_encoder=parts.text_encoder, vae=parts.vae, noise_scheduler=parts.noise_scheduler, prediction_type="epsilon", cfg=cfg, generator=generator, weight_dtype=torch.float32, unet_dtype=torch.float32)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(WARMUP_STEPS):
        step(i)
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    result_path.write_text(json.dumps({"steps_per_s": steps / (time.perf_counter() - start)}))


# ---------------------------------------------------------------------------------------------
# parent: launching and timing runs


def run_timed(cmd: list[str], log: Path, result: Path | None = None, extra_env: dict | None = None) -> tuple[float, float, dict]:
    """Run ``cmd`` to completion: (launch wall time, seconds to exit, the child's JSON result)."""
    env = dict(os.environ, **OFFLINE_ENV, **(extra_env or {}))
    launched = time.time()
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        sys.exit(f"bench_train: {' '.join(cmd[:3])} ... failed (exit {code}); last lines of {log}:\n" + "".join(open(log).readlines()[-15:]))
    return launched, seconds, json.loads(result.read_text()) if result else {}


def our_spec(model: Path, pairs: Path, out: Path, steps: int, train_text_encoder: bool, workers: int) -> dict:
    return dict(
        model=str(model), dataset=str(pairs), output_dir=str(out), resolution=RESOLUTION, train_batch_size=BATCH, max_train_steps=steps,
        train_text_encoder=train_text_encoder, dataloader_num_workers=workers, device="cpu", report_to="tensorboard", seed=0,
    )


def run_ours(root: Path, tag: str, spec: dict, mode: str = "train") -> tuple[float, float, dict]:
    result = root / f"{tag}.json"
    cmd = [sys.executable, __file__, "--child", mode, "--spec", json.dumps(spec), "--result", str(result)]
    return run_timed(cmd, root / f"{tag}.log", result, extra_env=OUR_ENV)


def run_reference(root: Path, tag: str, script: Path, model: Path, images: Path, steps: int, workers: int) -> tuple[float, float, dict]:
    """diffusers' train_text_to_image.py on the same model and images (UNet only, fp32, CPU)."""
    cmd = [
        sys.executable, str(script), "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(images),
        "--caption_column", "text", "--resolution", str(RESOLUTION), "--center_crop", "--train_batch_size", str(BATCH),
        "--max_train_steps", str(steps), "--learning_rate", "1e-5", "--dataloader_num_workers", str(workers), "--seed", "0",
        "--output_dir", str(root / f"{tag}-out"), "--cache_dir", str(root / "hf-cache"), "--report_to", "tensorboard",
    ]
    return run_timed(cmd, root / f"{tag}.log")


def steady_rate(lengths: tuple[int, int], seconds: tuple[float, float]) -> float:
    """(N2 - N1) / (t2 - t1)."""
    return (lengths[1] - lengths[0]) / (seconds[1] - seconds[0])


def measure_ours(root: Path, args, model: Path, pairs: Path, train_text_encoder: bool) -> dict:
    """Both run lengths (best of ``repeats`` each), start-up and overhead from the runs, plus the bare model step."""
    name = "unet_te" if train_text_encoder else "unet"
    # one untimed step first: file caches, and (with --dynamo-backend) the compiled graphs cached,
    # so both timed lengths start alike and their difference holds training steps only
    run_ours(root, f"{name}-warmup", our_spec(model, pairs, root / f"{name}-warmup", 1, train_text_encoder, args.workers))
    best = {}
    for r in range(args.repeats):  # lengths interleaved, so a busy spell does not hit one length only
        for steps in args.steps:
            tag = f"{name}-{steps}-{r}"
            launched, seconds, result = run_ours(root, tag, our_spec(model, pairs, root / tag, steps, train_text_encoder, args.workers))
            result.update(seconds=seconds, startup=result["first_step_end"] - launched)
            if steps not in best or seconds < best[steps]["seconds"]:
                best[steps] = result
    longer = best[args.steps[1]]
    _, _, bare = run_ours(root, f"{name}-model-step", our_spec(model, pairs, root / "unused", 1, train_text_encoder, 0), mode="model-step")
    return {
        "steps_per_s": steady_rate(args.steps, (best[args.steps[0]]["seconds"], longer["seconds"])),
        "seconds": [best[n]["seconds"] for n in args.steps],
        "startup": min(r["startup"] for r in best.values()),
        "overhead_share": longer["overhead_share"],
        "window": (longer["window_steps"], longer["window_s"]),
        "model_step_per_s": bare["steps_per_s"],
    }


def measure_reference(root: Path, args, model: Path, images: Path) -> dict:
    script = Path(args.reference) / "examples" / "text_to_image" / "train_text_to_image.py"
    if not script.is_file():
        sys.exit(f"bench_train: --reference {args.reference}: no {script.relative_to(args.reference)} there (expected a diffusers checkout)")
    run_reference(root, "reference-warmup", script, model, images, 1, args.workers)  # builds the imagefolder cache once
    best = {}
    for r in range(args.repeats):
        for steps in args.steps:
            _, seconds, _ = run_reference(root, f"reference-{steps}-{r}", script, model, images, steps, args.workers)
            best[steps] = min(seconds, best.get(steps, seconds))
    return {"steps_per_s": steady_rate(args.steps, (best[args.steps[0]], best[args.steps[1]])), "seconds": [best[n] for n in args.steps]}


def report(label: str, lengths: tuple[int, int], m: dict) -> None:
    n1, n2 = lengths
    print(f"{label}: {m['steps_per_s']:.2f} steps/s steady state ({n2 - n1} steps in {m['seconds'][1] - m['seconds'][0]:.2f} s; runs of {n1} / {n2} steps took {m['seconds'][0]:.2f} / {m['seconds'][1]:.2f} s)")
    print(f"{label} start-up to first step: {m['startup']:.2f} s")
    steps, window = m["window"]
    print(f"{label} overhead share (outside forward/backward/optimizer): {100 * m['overhead_share']:.1f}% (over {steps} steps, {window:.2f} s)")
    print(f"{label} in-run rate, steps {WARMUP_STEPS + 1}-{n2} of the {n2}-step run: {steps / window:.2f} steps/s (a check on the steady state)")
    print(f"{label} model step alone (in-memory batch, bare loop): {m['model_step_per_s']:.2f} steps/s")
    if abs(m["steps_per_s"] * window / steps - 1.0) > 0.2:
        print(f"{label}: WARNING steady-state and in-run rates differ by more than 20%: the CPU was busy, rerun on a quiet machine")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs=2, default=[20, 120], metavar=("N1", "N2"), help="the two run lengths")
    parser.add_argument("--repeats", type=int, default=2, help="runs per length; the fastest counts (other processes on the CPU only ever slow a run)")
    parser.add_argument("--workers", type=int, default=0, help="dataloader_num_workers (both trainers)")
    parser.add_argument("--prompts", type=int, default=96, help="chosen/rejected pairs in the data (plus 64 regularisation rows)")
    parser.add_argument("--reference", help="a diffusers checkout: also time its examples/text_to_image/train_text_to_image.py")
    parser.add_argument("--dynamo-backend", help="our runs only: compile the trained models through accelerate (as 'accelerate launch --dynamo_backend'), e.g. inductor")
    parser.add_argument("--child", choices=("train", "model-step"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return (child_train if args.child == "train" else child_model_step)(json.loads(args.spec), args.result)
    if not 0 < args.steps[0] < args.steps[1] or args.steps[0] <= WARMUP_STEPS:
        sys.exit(f"bench_train: --steps needs {WARMUP_STEPS} < N1 < N2")

    if args.dynamo_backend:
        OUR_ENV["ACCELERATE_DYNAMO_BACKEND"] = args.dynamo_backend.upper()
    from datasets import disable_progress_bars
    from transformers.utils.logging import disable_progress_bar

    from sr_finetune.tiny_models import TinySDSpec, make_tiny_sd_pipeline

    disable_progress_bars()
    disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        root = Path(tmp)
        model = make_tiny_sd_pipeline(root / "model", seed=0, spec=TinySDSpec(**TEXT_ENCODER))
        pairs, images = build_data(root, args.prompts, 64)
        print(f"tiny model, {2 * args.prompts + 64} rows, {RESOLUTION} px, batch {BATCH}, CPU ({os.cpu_count()} cores), dataloader_num_workers {args.workers}")
        print(f"load average at start: {os.getloadavg()[0]:.2f} (other processes on the CPU slow every figure)")
        if args.dynamo_backend:
            print(f"our runs compile the trained models with accelerate's dynamo backend '{args.dynamo_backend}' (the bare model step does not)")
        unet = measure_ours(root, args, model, pairs, train_text_encoder=False)
        report("UNet only", args.steps, unet)
        report("UNet + text encoder", args.steps, measure_ours(root, args, model, pairs, train_text_encoder=True))
        if args.reference:
            ref = measure_reference(root, args, model, images)
            n1, n2 = args.steps
            print(f"reference train_text_to_image.py: {ref['steps_per_s']:.2f} steps/s steady state (runs of {n1} / {n2} steps took {ref['seconds'][0]:.2f} / {ref['seconds'][1]:.2f} s)")
            print(f"UNet only vs reference: {unet['steps_per_s'] / ref['steps_per_s']:.2f}x (target >= 1.5x)")
        print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
