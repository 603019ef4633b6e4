"""Prompt fidelity of a text-to-image model on world prompts, measured from pixels.

Each held-out prompt is generated with its own seeded generator; the pixel reader
(:mod:`sr_finetune.world.pixels`) says which attributes the image shows. The report gives, per
attribute, the share of images that show the caption's value, the share showing all three
fidelity attributes (count, colour, shape), and the chance level of each (a uniform guess among the world's values).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..progress import progress
from .pixels import ATTRIBUTES, FIDELITY_ATTRIBUTES, read_image
from .scenes import COLOURS, COUNTS, SHAPES, SIZES, TEXTURES, split_prompts

CHANCE = {
    "count": 1 / len(COUNTS),
    "size": 1 / len(SIZES),
    "colour": 1 / len(COLOURS),
    "shape": 1 / len(SHAPES),
    "background": 1 / (len(COLOURS) - 1),  # never the shapes' colour
    "texture": 1 / len(TEXTURES),
}
CHANCE["all"] = float(torch.tensor([CHANCE[a] for a in FIDELITY_ATTRIBUTES]).prod())


def image_seed(seed: int, prompt: str, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{prompt}/{index}".encode()).digest()[:8], "big") >> 1


def measure_fidelity(
    model: str | os.PathLike,
    split: str = "test",
    max_prompts: int | None = None,
    images_per_prompt: int = 1,
    guidance: float = 5.0,
    steps: int = 20,
    batch_size: int = 32,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
) -> dict:
    """Generate the split's prompts with the pipeline folder ``model`` and read the images back.

    Returns ``{"rates": {attribute: share, "all": share}, "chance": {...}, "images": n, ...}``;
    with ``out_dir`` also writes the images and ``fidelity.json`` there."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    prompts = [p.text for p in split_prompts(split)][:max_prompts]
    jobs = [(i, p, k) for i, p in enumerate(prompts) for k in range(images_per_prompt)]
    hits = {name: 0 for name in (*ATTRIBUTES, "all")}
    out = Path(out_dir) if out_dir else None
    if out:
        (out / "images").mkdir(parents=True, exist_ok=True)
    for start in progress(range(0, len(jobs), batch_size), desc="fidelity", unit="batch"):
        batch = jobs[start : start + batch_size]
        generators = [torch.Generator().manual_seed(image_seed(seed, p, k)) for _, p, k in batch]
        with torch.no_grad():
            images = pipe([p for _, p, _ in batch], height=size, width=size, num_inference_steps=steps, guidance_scale=guidance, generator=generators).images
        for (i, prompt, k), image in zip(batch, images):
            matches = read_image(image).matches(prompt)
            for name in ATTRIBUTES:
                hits[name] += matches[name]
            hits["all"] += all(matches[name] for name in FIDELITY_ATTRIBUTES)
            if out:
                image.save(out / "images" / f"{i:04d}_{k}.png")
    report = {
        "model": str(model),
        "split": split,
        "prompts": len(prompts),
        "images": len(jobs),
        "guidance": guidance,
        "steps": steps,
        "seed": seed,
        "rates": {name: hits[name] / max(1, len(jobs)) for name in hits},
        "chance": CHANCE,
    }
    if out:
        (out / "fidelity.json").write_text(json.dumps(report, indent=2))
    return report


def format_report(report: dict) -> str:
    """One table row per attribute: rate vs chance."""
    lines = [f"prompt fidelity, {report['images']} images of {report['prompts']} {report['split']} prompts, guidance {report['guidance']}, {report['steps']} DDIM steps:"]
    for name, rate in report["rates"].items():
        lines.append(f"  {name:<10} {rate:6.3f}   (chance {report['chance'][name]:.3f})")
    return "\n".join(lines)


__all__ = ["CHANCE", "format_report", "measure_fidelity"]
