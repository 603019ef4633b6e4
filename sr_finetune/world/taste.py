"""The world's hidden taste: what its community likes, computed from pixels alone.

The community prefers large, centred subjects that stand out from the background. A caption
fixes none of the three exactly (size is a class with a range, positions and colour shifts are
free), so images of one prompt differ in taste, and a reward model can only learn it from what
the community did. Evaluation uses the same function as the world's judge; training never does.

Size and centring are read from the main subject, the largest shape: its extent and its distance
from the centre. Clutter does not pass for taste (scattered fragments cover much of an image and
centre the centroid of them all, but the largest is small and off-centre), and a second or third
shape that the caption asks for costs nothing.
"""

from __future__ import annotations

from PIL import Image

from .pixels import Reading, read_image
from .scenes import SIZE_RANGES

TASTE_WEIGHTS = {"size": 0.4, "centred": 0.4, "contrast": 0.2}
FULL_EXTENT = float(SIZE_RANGES["large"][1])  # a subject extent (px at 32 px) at or above this counts as fully large


def taste_of_reading(reading: Reading) -> float:
    """Taste in [0, 1] from a :class:`Reading`; an image with no shape scores 0."""
    if reading.count == 0:
        return 0.0
    size = min(1.0, reading.subject_extent / FULL_EXTENT)
    centred = max(0.0, 1.0 - reading.subject_offset)
    return TASTE_WEIGHTS["size"] * size + TASTE_WEIGHTS["centred"] * centred + TASTE_WEIGHTS["contrast"] * min(1.0, reading.contrast)


def taste(image: Image.Image) -> float:
    """The hidden taste of one image, in [0, 1] (higher = the community likes it more)."""
    return taste_of_reading(read_image(image))


__all__ = ["FULL_EXTENT", "TASTE_WEIGHTS", "taste", "taste_of_reading"]
