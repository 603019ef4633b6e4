"""Reading a world image from its pixels alone: the attributes a caption names, and the
measurements the hidden taste uses. No model is involved, so this is the world's ground truth
for prompt fidelity and for the judge.

Every pixel is labelled with its nearest palette colour (the brightness shifts and textures of
the renderer never move a pixel to another colour). The background is the most common label of
the outer ring of pixels; the foreground is every pixel with another label, cut into connected
components (scipy), of which those of at least ``MIN_AREA`` px count as shapes. A shape's kind is
read from how much of its bounding box it fills (square ~1, circle ~pi/4, triangle ~1/2), its
size class from its extent, the colour from the majority label of the foreground, the texture
from the background's brightness pattern.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from .scenes import COLOURS, SIZE_RANGES, Prompt, parse_caption, texture_pattern

PALETTE_NAMES = list(COLOURS)
PALETTE = np.array([COLOURS[c] for c in PALETTE_NAMES], dtype=np.float32)
MIN_AREA = 8  # px at 32 px; smaller components are noise
SQUARE_FILL, CIRCLE_FILL = 0.9, 0.66  # fill >= 0.9: square; >= 0.66: circle; else triangle
SIZE_SPLIT = (SIZE_RANGES["small"][1] + SIZE_RANGES["large"][0]) / 2  # extent threshold, px at 32 px
MAX_CONTRAST = float(np.sqrt(3) * 255)
ATTRIBUTES = ("count", "size", "colour", "shape", "background", "texture")
FIDELITY_ATTRIBUTES = ("count", "colour", "shape")  # what world_fidelity requires: the subject the caption names


@dataclass
class Reading:
    """What the pixels say. Attributes are None when no shape was found."""

    count: int
    size: str | None
    colour: str | None
    shape: str | None
    background: str
    texture: str
    foreground_share: float  # share of the image covered by shapes
    centre_offset: float  # distance of the shapes' centroid from the image centre, / half-diagonal
    contrast: float  # RGB distance of mean shape colour and mean background colour, / sqrt(3)*255
    subject_extent: float  # extent of the largest shape, the main subject (px at 32 px); 0 without shapes
    subject_offset: float  # distance of the main subject's centroid from the image centre, / half-diagonal
    subject_row: float = 0.5  # the main subject's centroid, 0 = top row, 1 = bottom row
    subject_column: float = 0.5  # the main subject's centroid, 0 = left column, 1 = right column
    spacing: float = 0.0  # mean distance between the shapes' centroids, / half-diagonal (0 with fewer than two)

    def matches(self, prompt: Prompt | str) -> dict[str, bool]:
        """Per attribute, whether the pixels show what the caption says."""
        prompt = parse_caption(prompt) if isinstance(prompt, str) else prompt
        return {name: getattr(self, name) == getattr(prompt, name) for name in ATTRIBUTES}


def palette_labels(pixels: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 -> [H, W] index of the nearest palette colour (computed once per distinct colour)."""
    rgb = pixels.reshape(-1, 3).astype(np.int32)
    colours, inverse = np.unique((rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2], return_inverse=True)
    distinct = np.stack([colours >> 16, (colours >> 8) & 255, colours & 255], axis=-1).astype(np.float32)
    nearest = ((distinct[:, None, :] - PALETTE[None]) ** 2).sum(-1).argmin(-1)
    return nearest[inverse.reshape(-1)].reshape(pixels.shape[:2])


def _texture(brightness: np.ndarray, background: np.ndarray) -> str:
    size = brightness.shape[0]
    values = brightness[background]
    if values.size < 16 or values.std() < 4:
        return "plain"
    striped, checkered = texture_pattern("striped", size), texture_pattern("checkered", size)
    centred = values - values.mean()
    scores = {name: abs(float((centred * t[background]).mean())) for name, t in (("striped", striped), ("checkered", checkered))}
    best = max(scores, key=scores.get)
    return best if scores[best] > 0.5 * values.std() else "plain"


def read_image(image: Image.Image) -> Reading:
    """The :class:`Reading` of a world image (any size; measured as if 32 px)."""
    pixels = np.asarray(image.convert("RGB"))
    size = pixels.shape[0]
    scale = size / 32
    labels = palette_labels(pixels)
    ring = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    bg_label = Counter(ring.tolist()).most_common(1)[0][0]
    foreground = labels != bg_label
    components, n = ndimage.label(foreground)
    areas = np.bincount(components.ravel(), minlength=n + 1)[1:]  # px per component
    kept = [i + 1 for i in range(n) if areas[i] >= MIN_AREA * scale**2]
    is_kept = np.zeros(n + 1, dtype=bool)
    is_kept[kept] = True
    shape_mask = is_kept[components]
    brightness = pixels.astype(np.float32).mean(-1)
    texture = _texture(brightness, ~foreground)
    background = PALETTE_NAMES[bg_label]
    if not kept:
        return Reading(0, None, None, None, background, texture, 0.0, 1.0, 0.0, 0.0, 1.0)
    kinds, extents = [], {}
    for box, index in zip(ndimage.find_objects(components), range(1, n + 1)):
        if index not in kept:
            continue
        h, w = box[0].stop - box[0].start, box[1].stop - box[1].start
        fill = float((components[box] == index).sum()) / (h * w)
        kinds.append("square" if fill >= SQUARE_FILL else "circle" if fill >= CIRCLE_FILL else "triangle")
        extents[index] = max(h, w) / scale
    colour = PALETTE_NAMES[Counter(labels[shape_mask].tolist()).most_common(1)[0][0]]
    shape = Counter(kinds).most_common(1)[0][0]
    size_class = "small" if float(np.median(list(extents.values()))) < SIZE_SPLIT else "large"
    ys, xs = np.nonzero(shape_mask)
    centre = (size - 1) / 2
    half_diagonal = np.hypot(centre, centre)
    offset = float(np.hypot(ys.mean() - centre, xs.mean() - centre) / half_diagonal)
    subject = kept[int(np.argmax([areas[i - 1] for i in kept]))]  # the largest shape (the first of equals)
    sy, sx = (float(v.sum()) / v.size for v in np.nonzero(components == subject))  # its centre of mass (exact sums)
    subject_offset = float(np.hypot(sy - centre, sx - centre) / half_diagonal)
    centroids = np.array(ndimage.center_of_mass(shape_mask, components, kept)) if len(kept) > 1 else np.zeros((1, 2))
    gaps = np.hypot(*(centroids[:, None, :] - centroids[None, :, :]).transpose(2, 0, 1))[np.triu_indices(len(centroids), 1)]
    spacing = float(gaps.mean() / half_diagonal) if gaps.size else 0.0
    fg_mean = pixels[shape_mask].astype(np.float32).mean(0)
    bg_mean = pixels[~foreground].astype(np.float32).mean(0) if (~foreground).any() else PALETTE[bg_label]
    contrast = float(np.linalg.norm(fg_mean - bg_mean) / MAX_CONTRAST)
    return Reading(len(kept), size_class, colour, shape, background, texture, float(shape_mask.mean()), offset, contrast, extents[subject], subject_offset,
                   subject_row=sy / (size - 1), subject_column=sx / (size - 1), spacing=spacing)  # fmt: skip


def fidelity(image: Image.Image, prompt: Prompt | str) -> float:
    """1.0 when the pixels show the caption's count, colour and shape (its subject), else 0.0."""
    matches = read_image(image).matches(prompt)
    return float(all(matches[name] for name in FIDELITY_ATTRIBUTES))


__all__ = ["ATTRIBUTES", "FIDELITY_ATTRIBUTES", "Reading", "fidelity", "palette_labels", "read_image"]
