"""The embedded demo world: everything the tiny end-to-end run needs, made offline in seconds.

``make_tiny_world(root)`` writes::

    root/model/            tiny SD-2.1-base-shaped pipeline (sr_finetune.tiny_models)
    root/rewards/          tiny weights of the six scorers (reward.tiny)
    root/regularization/   an imagefolder of captioned pictures (coloured shapes), standing in
                           for the LAION subset the paper mixes in

``recipes/configs/tiny.yaml`` points every stage at these folders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..progress import progress, quiet_library_bars

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 170),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def make_shapes_caption_set(out_dir: str | os.PathLike, n: int = 48, size: int = 64, seed: int = 0) -> Path:
    """Write ``n`` captioned pictures ("a red circle on a blue background") as an imagefolder:
    ``images/XXXX.png`` + ``metadata.jsonl`` (``file_name``, ``caption``). Deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    records = []
    for i in range(n):
        fg, bg = rng.choice(len(names), size=2, replace=False)
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        half = int(rng.integers(size // 5, size // 2 - 1))
        cx, cy = (int(v) for v in rng.integers(half, size - half, size=2))
        image = Image.new("RGB", (size, size), COLOURS[names[bg]])
        _draw_shape(ImageDraw.Draw(image), shape, (cx - half, cy - half, cx + half, cy + half), COLOURS[names[fg]])
        file_name = f"images/{i:04d}.png"
        image.save(out / file_name)
        records.append({"file_name": file_name, "caption": f"a {names[fg]} {shape} on a {names[bg]} background"})
    with open(out / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return out


@quiet_library_bars()
def make_tiny_world(root: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Write the tiny model, the six tiny scorers and the regularisation set under ``root``."""
    from reward.tiny import make_tiny_rewards

    from ..tiny_models import make_tiny_sd_pipeline

    root = Path(root)
    paths = {"model": root / "model", "rewards": root / "rewards", "regularization": root / "regularization"}
    makers = {"model": make_tiny_sd_pipeline, "rewards": make_tiny_rewards, "regularization": make_shapes_caption_set}
    with progress(desc="tiny-world", total=len(makers), unit="part") as bar:
        for name, make in makers.items():
            bar.set_postfix_str(name)
            make(paths[name], seed=seed)
            bar.update()
    return paths


__all__ = ["make_shapes_caption_set", "make_tiny_world"]
