"""A synthetic triplet set with a learnable preference, for tests and the tiny demo.

Every prompt describes a scene ("a red circle on a blue background"); its two images both show
that scene (the shape jittered in place and size), and the preferred one also has a bright
frame, a cue the prompt does not mention. A reward model can therefore only beat chance by
learning the cue from the triplets. Written as PNGs plus a ``triplets.parquet`` in the shared
triplet-table layout (paths relative to the table's folder, split by prompt).

    python -m reward.synthetic_triplets OUT_DIR [--prompts 48] [--triplets-per-prompt 2] [--size 32] [--seed 0]
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from .triplets import TRIPLET_COLUMNS, TRIPLETS_FILENAME

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (230, 200, 40), "purple": (140, 60, 170), "orange": (235, 130, 30)}
BACKGROUNDS = {"grey": (110, 110, 110), "dark": (30, 30, 40), "teal": (30, 110, 110), "brown": (100, 70, 40)}
SHAPES = ("circle", "square", "triangle")
FRAME_COLOUR = (255, 255, 255)


def scene_prompts(count: int) -> list[tuple[str, str, str]]:
    """``count`` distinct (colour, shape, background) scenes, in a fixed shuffled order."""
    scenes = list(itertools.product(COLOURS, SHAPES, BACKGROUNDS))
    if count > len(scenes):
        raise ValueError(f"at most {len(scenes)} distinct scenes, asked for {count}")
    order = np.random.default_rng(12345).permutation(len(scenes))
    return [scenes[i] for i in order[:count]]


def render_scene(colour: str, shape: str, background: str, size: int, rng: np.random.Generator, framed: bool) -> Image.Image:
    """The scene at ``size`` px, the shape placed and sized at random; ``framed`` adds the preferred cue."""
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    extent = int(rng.integers(size * 4 // 10, size * 6 // 10))
    x0, y0 = (int(v) for v in rng.integers(size // 8, size - extent - size // 8 + 1, size=2))
    box = (x0, y0, x0 + extent, y0 + extent)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(x0 + extent // 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=COLOURS[colour])
    if framed:
        width = max(1, size // 12)
        draw.rectangle((0, 0, size - 1, size - 1), outline=FRAME_COLOUR, width=width)
    return image


def make_synthetic_triplets(
    out_dir: str | Path, prompts: int = 48, triplets_per_prompt: int = 2, size: int = 32, seed: int = 0, shares: tuple[float, float] = (0.5, 0.25)
) -> Path:
    """Write the images and ``triplets.parquet`` into ``out_dir``; return the table's path.

    ``shares``: the train and val shares of the prompts; the rest are test prompts."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scenes = scene_prompts(prompts)
    n_train, n_val = round(prompts * shares[0]), round(prompts * shares[1])
    rows = []
    for p, (colour, shape, background) in enumerate(scenes):
        split = "train" if p < n_train else "val" if p < n_train + n_val else "test"
        prompt = f"a {colour} {shape} on a {background} background"
        for k in range(triplets_per_prompt):
            ids = {}
            for side, framed in (("pos", True), ("neg", False)):
                image_id = f"p{p:03d}-{k}-{side}"
                render_scene(colour, shape, background, size, rng, framed).save(out / "images" / f"{image_id}.png")
                ids[side] = image_id
            rows.append(
                {"triplet_id": len(rows), "prompt_id": f"p{p:03d}", "prompt": prompt, "pos_image_id": ids["pos"], "pos_path": f"images/{ids['pos']}.png",
                 "neg_image_id": ids["neg"], "neg_path": f"images/{ids['neg']}.png", "split": split}
            )
    table = pd.DataFrame(rows, columns=list(TRIPLET_COLUMNS)).astype({"triplet_id": "int64"})
    path = out / TRIPLETS_FILENAME
    table.to_parquet(path, index=False)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reward.synthetic_triplets", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--triplets-per-prompt", type=int, default=2)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = make_synthetic_triplets(args.out_dir, args.prompts, args.triplets_per_prompt, args.size, args.seed)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
