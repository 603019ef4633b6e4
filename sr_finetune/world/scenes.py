"""The demo world's scenes: coloured shapes on coloured, possibly textured backgrounds.

A *prompt* fixes five attributes (count, size class, colour, shape, background colour and
texture) and reads as words: ``"two small red triangles on a blue striped background"``. A
*scene* adds what the prompt leaves open: each shape's exact size within its class, the
positions, and small brightness shifts of both colours. So images of one prompt differ in how
large, how centred and how contrasting their subject is, which is what the world's hidden
taste (:mod:`sr_finetune.world.taste`) rewards. Scenes and renders are deterministic in a seed.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from sr_finetune.errors import UserError

IMAGE_SIZE = 32

# Well separated in RGB even after the brightness shifts below (nearest-colour parsing stays exact).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 180),
    "cyan": (40, 200, 210),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
COUNTS = (1, 2, 3)
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
SIZES = ("small", "large")
TEXTURES = ("plain", "striped", "checkered")
# Extent (side of the bounding box, px at 32 px) of one shape per size class.
SIZE_RANGES = {"small": (6, 9), "large": (11, 14)}
SHADE_SHIFT = 25  # max brightness shift of a scene's colours (the within-prompt contrast variance)
TEXTURE_AMPLITUDE = 15  # textures alternate base + and - this brightness
MARGIN, GAP = 1, 2  # px from the border, px between shapes
PLACEMENT_TRIES = 200  # random positions tried per shape before the extents shrink


@dataclass(frozen=True)
class Prompt:
    """The attributes a caption fixes."""

    count: int
    size: str
    colour: str
    shape: str
    background: str
    texture: str = "plain"

    @property
    def text(self) -> str:
        shape = self.shape + ("s" if self.count > 1 else "")
        texture = "" if self.texture == "plain" else f" {self.texture}"
        return f"{COUNT_WORDS[self.count]} {self.size} {self.colour} {shape} on a {self.background}{texture} background"


@dataclass(frozen=True)
class Shape:
    kind: str
    x0: int
    y0: int
    extent: int


@dataclass(frozen=True)
class Scene:
    """A prompt plus what it leaves open: shapes (positions, extents) and colour shifts."""

    prompt: Prompt
    shapes: tuple[Shape, ...]
    fg_shift: int
    bg_shift: int


def all_prompts() -> list[Prompt]:
    """Every prompt of the world (3,024), in a fixed order."""
    return [
        Prompt(count, size, colour, shape, background, texture)
        for count, size, colour, shape, background, texture in itertools.product(COUNTS, SIZES, COLOURS, SHAPES, COLOURS, TEXTURES)
        if colour != background
    ]


def prompt_split(prompt: Prompt | str, val_share: float = 0.1, test_share: float = 0.1) -> str:
    """``train`` | ``val`` | ``test``, fixed per caption by a hash (held-out prompts never train)."""
    text = prompt.text if isinstance(prompt, Prompt) else prompt
    u = int.from_bytes(hashlib.sha256(f"world-split/{text}".encode()).digest()[:8], "big") / 2**64
    return "test" if u < test_share else "val" if u < test_share + val_share else "train"


def split_prompts(split: str) -> list[Prompt]:
    """The prompts of one split, in :func:`all_prompts` order."""
    if split not in ("train", "val", "test"):
        raise UserError(f"unknown world prompt split '{split}' (train, val, test)")
    return [p for p in all_prompts() if prompt_split(p) == split]


def parse_caption(text: str) -> Prompt:
    """The attributes a world caption names (inverse of ``Prompt.text``); a one-line error otherwise."""
    words = text.strip().lower().split()
    try:
        count = {w: c for c, w in COUNT_WORDS.items()}[words[0]]
        size, colour, shape = words[1], words[2], words[3]
        if count > 1:
            shape = shape[:-1] if shape.endswith("s") else "?"
        rest = words[4:]
        if rest[:2] != ["on", "a"] or rest[-1] != "background" or len(rest) not in (4, 5):
            raise ValueError
        background = rest[2]
        texture = rest[3] if len(rest) == 5 else "plain"
        prompt = Prompt(count, size, colour, shape, background, texture)
    except (KeyError, IndexError, ValueError):
        raise UserError(f"not a world caption: '{text}'") from None
    if size not in SIZES or colour not in COLOURS or shape not in SHAPES or background not in COLOURS or texture not in TEXTURES or prompt.text != " ".join(words):
        raise UserError(f"not a world caption: '{text}'")
    return prompt


def _rng(seed: int, *keys: object) -> np.random.Generator:
    digest = hashlib.sha256("/".join(map(str, (seed, *keys))).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def sample_scene(prompt: Prompt, seed: int) -> Scene:
    """A scene of ``prompt``, deterministic in (prompt, seed): extents, positions and shifts.

    Each shape takes the first of up to ``PLACEMENT_TRIES`` random positions that keeps ``GAP``
    px from the shapes placed before it; when none does, every extent shrinks by a pixel (within
    its class) and placement starts over."""
    rng = _rng(seed, prompt.text)
    lo, hi = SIZE_RANGES[prompt.size]
    extents = [int(rng.integers(lo, hi + 1)) for _ in range(prompt.count)]
    boxes: list[tuple[int, int, int]] = []
    while len(boxes) < prompt.count:
        e = extents[len(boxes)]
        position = _first_free_position(rng, e, boxes)
        if position is None:
            extents = [max(lo, e - 1) for e in extents]
            boxes = []
        else:
            boxes.append((*position, e))
    shapes = tuple(Shape(prompt.shape, x0, y0, e) for x0, y0, e in boxes)
    fg_shift, bg_shift = (int(v) for v in rng.integers(-SHADE_SHIFT, SHADE_SHIFT + 1, size=2))
    return Scene(prompt, shapes, fg_shift, bg_shift)


def _first_free_position(rng: np.random.Generator, extent: int, boxes: list[tuple[int, int, int]]) -> tuple[int, int] | None:
    """The first of ``PLACEMENT_TRIES`` random (x0, y0) drawn one pair at a time that is ``GAP`` px
    clear of ``boxes``, leaving ``rng`` just after that pair (after all of them when none is).

    All tries are drawn at once and checked together; the generator is then rewound and advanced
    by the pairs actually used. ``integers`` draws the same stream whether it is asked for n pairs
    at once or one pair n times, so scenes are those of the one-pair-at-a-time loop, only faster."""
    state = rng.bit_generator.state
    tries = rng.integers(MARGIN, IMAGE_SIZE - MARGIN - extent + 1, size=(PLACEMENT_TRIES, 2))
    x0, y0 = tries[:, 0], tries[:, 1]
    free = np.ones(PLACEMENT_TRIES, dtype=bool)
    for bx, by, be in boxes:
        free &= (x0 + extent + GAP <= bx) | (bx + be + GAP <= x0) | (y0 + extent + GAP <= by) | (by + be + GAP <= y0)
    if not free.any():
        return None
    first = int(free.argmax())
    rng.bit_generator.state = state
    rng.integers(MARGIN, IMAGE_SIZE - MARGIN - extent + 1, size=(first + 1, 2))
    return int(tries[first, 0]), int(tries[first, 1])


def shifted(colour: str, shift: int) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + shift)) for c in COLOURS[colour])  # type: ignore[return-value]


@lru_cache(maxsize=32)
def texture_pattern(texture: str, size: int) -> np.ndarray:
    """The [size, size] +-1 brightness pattern of a texture (0 for plain), one cell per eighth."""
    yy, xx = np.mgrid[0:size, 0:size]
    cell = max(1, size // 8)
    if texture == "striped":
        sign = np.where((yy // cell) % 2 == 0, 1, -1)
    elif texture == "checkered":
        sign = np.where(((yy // cell) + (xx // cell)) % 2 == 0, 1, -1)
    else:
        sign = np.zeros((size, size), dtype=int)
    sign.setflags(write=False)
    return sign


def _background(prompt: Prompt, shift: int, size: int) -> np.ndarray:
    base = np.array(shifted(prompt.background, shift), dtype=np.int16)
    pixels = base[None, None, :] + (texture_pattern(prompt.texture, size) * TEXTURE_AMPLITUDE)[..., None]
    return np.clip(pixels, 0, 255).astype(np.uint8)


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene as an RGB image of ``size`` px (shapes drawn without anti-aliasing)."""
    image = Image.fromarray(_background(scene.prompt, scene.bg_shift, size))
    draw = ImageDraw.Draw(image)
    fill = shifted(scene.prompt.colour, scene.fg_shift)
    scale = size / IMAGE_SIZE
    for s in scene.shapes:
        x0, y0 = round(s.x0 * scale), round(s.y0 * scale)
        x1, y1 = round((s.x0 + s.extent) * scale) - 1, round((s.y0 + s.extent) * scale) - 1
        if s.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif s.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


def render_prompt(prompt: Prompt | str, seed: int, size: int = IMAGE_SIZE) -> Image.Image:
    """``render(sample_scene(prompt, seed))``; ``prompt`` may be a caption."""
    prompt = parse_caption(prompt) if isinstance(prompt, str) else prompt
    return render(sample_scene(prompt, seed), size)


__all__ = [
    "COLOURS", "COUNTS", "IMAGE_SIZE", "Prompt", "SHAPES", "SIZES", "SIZE_RANGES", "Scene", "Shape", "TEXTURES",
    "all_prompts", "parse_caption", "prompt_split", "render", "render_prompt", "sample_scene", "split_prompts", "texture_pattern",
]
