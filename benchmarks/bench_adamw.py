"""AdamW step time on the CPU: torch's fused kernel against its foreach and for-loop versions.

The parameters are those the demo trains, with their real shapes: the world base model's UNet +
text encoder (``finetune``) and the world CLIP (``train-reward``), both materialized from the
shipped assets; gradients are seeded random tensors. The three implementations step the same
tensors in turn (interleaved, ``--steps`` steps each per round, ``--rounds`` rounds); the figure
is the median milliseconds per step. One process, fp32, the default torch threads. Prints the
ratios, the date and the CPU model.

    python benchmarks/bench_adamw.py [--steps 20] [--rounds 5] [--threads N]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time
from pathlib import Path

IMPLEMENTATIONS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


def demo_parameter_sets(root: Path) -> dict[str, list]:
    """name -> the shapes of the tensors each demo training updates (from the shipped assets)."""
    from safetensors import safe_open

    from reward.world_clip import materialize_world_clip
    from sr_finetune.world.assets import ASSETS_DIR, materialize_pipeline

    pipeline = materialize_pipeline(root / "model")
    clip = materialize_world_clip(root / "world_clip.safetensors", ASSETS_DIR)

    def shapes(*files: Path) -> list:
        out = []
        for file in files:
            with safe_open(str(file), "pt") as f:
                out += [f.get_slice(k).get_shape() for k in f.keys()]
        return out

    return {
        "finetune: world UNet + text encoder": shapes(pipeline / "unet" / "diffusion_pytorch_model.safetensors", pipeline / "text_encoder" / "model.safetensors"),
        "train-reward: world CLIP": shapes(clip),
    }


def time_steps(shapes: list, options: dict, steps: int, seed: int = 0) -> float:
    """Milliseconds per AdamW step over ``steps`` steps (after one warm-up step)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **options)
    optimizer.step()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    import torch
    from bench_score import cpu_model  # benchmarks/ is on sys.path when this script runs

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        sets = demo_parameter_sets(Path(tmp))
    print(f"{datetime.date.today()}, {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, shapes in sets.items():
        numel = sum(int(torch.Size(s).numel()) for s in shapes)
        times = {impl: [] for impl in IMPLEMENTATIONS}
        for _ in range(args.rounds):
            for impl, options in IMPLEMENTATIONS.items():
                times[impl].append(time_steps(shapes, options, args.steps))
        median = {impl: statistics.median(t) for impl, t in times.items()}
        print(f"{name}: {len(shapes)} tensors, {numel / 1e6:.2f} M parameters")
        for impl, ms in median.items():
            print(f"  {impl:9s} {ms:8.2f} ms/step   fused is {ms / median['fused']:.2f}x as fast")


if __name__ == "__main__":
    main()
