"""The world's hidden taste: what its community likes, computed from pixels alone.

A taste is a setting of the world (``demo.community.taste``): one of the named tastes below, or
``module:function`` for a user's own. Every named taste reads what a caption leaves free (the
main subject's size within its class, its position, its contrast with the background, the
spacing of several shapes), so images of one prompt differ in taste and a reward model can only
learn it from what the community did. The community's logs follow the taste; the world records
its taste with its files (``community.json``) and the judge (``world_judge``) scores with that
record, never with a default.

A taste function takes one argument and returns a value in [0, 1] (higher = liked more). Its
first parameter's name says what it receives: ``reading`` gets the :class:`Reading` of the image
(``subject_extent``, ``subject_offset``, ``subject_row``, ``subject_column``, ``contrast``,
``spacing``, ``count``, ...), ``image`` gets the RGB ``PIL.Image``.

Size and position are read from the main subject, the largest shape. Clutter does not pass for
taste (scattered fragments centre the centroid of them all, but the largest is small and
off-centre), and a second or third shape that the caption asks for costs nothing. An image
with no shape scores 0 under every named taste.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from sr_finetune.errors import UserError

from .pixels import Reading, read_image
from .scenes import SIZE_RANGES, render, sample_scene, split_prompts

DEFAULT_TASTE = "large-centred"
RECORD = "community.json"  # the community's settings, its taste among them
FULL_EXTENT = float(SIZE_RANGES["large"][1])  # a subject extent (px at 32 px) at or above this counts as fully large


def _size(reading: Reading) -> float:
    return min(1.0, reading.subject_extent / FULL_EXTENT)


def _contrast(reading: Reading) -> float:
    return min(1.0, reading.contrast)


def large_centred(reading: Reading) -> float:
    """Large, centred subjects that stand out: 0.4 size + 0.4 centring + 0.2 contrast (the shipped taste)."""
    if reading.count == 0:
        return 0.0
    return 0.4 * _size(reading) + 0.4 * max(0.0, 1.0 - reading.subject_offset) + 0.2 * _contrast(reading)


def small_off_centre(reading: Reading) -> float:
    """The mirror of ``large-centred``: small, off-centre subjects that stand out (contrast kept)."""
    if reading.count == 0:
        return 0.0
    return 0.4 * (1.0 - _size(reading)) + 0.4 * min(1.0, reading.subject_offset) + 0.2 * _contrast(reading)


def high(reading: Reading) -> float:
    """Subjects high in the frame: 0.8 height of the main subject + 0.2 contrast."""
    if reading.count == 0:
        return 0.0
    return 0.8 * (1.0 - reading.subject_row) + 0.2 * _contrast(reading)


def muted(reading: Reading) -> float:
    """Subjects that blend in: 0.8 low contrast with the background + 0.2 size."""
    if reading.count == 0:
        return 0.0
    return 0.8 * (1.0 - _contrast(reading)) + 0.2 * _size(reading)


def spread(reading: Reading) -> float:
    """Shapes far apart (one shape: far from the centre): 0.8 spacing + 0.2 contrast."""
    if reading.count == 0:
        return 0.0
    apart = reading.spacing if reading.count > 1 else reading.subject_offset
    return 0.8 * min(1.0, apart) + 0.2 * _contrast(reading)


NAMED_TASTES: dict[str, Callable[[Reading], float]] = {
    "large-centred": large_centred,
    "small-off-centre": small_off_centre,
    "high": high,
    "muted": muted,
    "spread": spread,
}


@dataclass(frozen=True)
class Taste:
    """A resolved taste: its ``spec`` (what the world records) and the function behind it."""

    spec: str
    function: Callable
    reads_image: bool = False  # True: the function takes the PIL image, else the Reading

    def of_reading(self, reading: Reading, image: Image.Image | None = None) -> float:
        """The taste of an image whose :class:`Reading` is known (``image`` for image tastes)."""
        return self._checked(self.function(image) if self.reads_image else self.function(reading))

    def __call__(self, image: Image.Image) -> float:
        """The taste of one image, in [0, 1]."""
        return self._checked(self.function(image) if self.reads_image else self.function(read_image(image)))

    def _checked(self, value: object) -> float:
        try:
            value = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise UserError(f"taste {self.spec!r} returned {value!r}, not a number in [0, 1]") from None
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise UserError(f"taste {self.spec!r} returned {value}, outside [0, 1]")
        return value


def _import_function(spec: str) -> Callable:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"taste {spec!r}: cannot import module {module_name!r} ({exc})") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise UserError(f"taste {spec!r}: module {module_name!r} has no function {attr!r}")
    return function


def resolve_taste(spec: str) -> Taste:
    """A named taste (``large-centred``, ``small-off-centre``, ``high``, ``muted``, ``spread``) or a
    user's ``module:function``; a one-line error otherwise."""
    if spec in NAMED_TASTES:
        return Taste(spec, NAMED_TASTES[spec])
    if ":" not in spec or not all(spec.partition(":")[::2]):
        raise UserError(f"unknown taste {spec!r}: use one of {', '.join(NAMED_TASTES)} or module:function")
    function = _import_function(spec)
    try:
        params = list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        params = []
    if not params or params[0] not in ("reading", "image"):
        raise UserError(f"taste {spec!r}: its first parameter must be named 'reading' (gets the pixel Reading) or 'image' (gets the PIL image)")
    return Taste(spec, function, reads_image=params[0] == "image")


def recorded_taste(world: str | os.PathLike) -> Taste:
    """The taste a world recorded with its files: ``world`` is the world's folder, its community
    folder, or that folder's ``community.json``. A one-line error when there is no record."""
    path = Path(world)
    for candidate in (path, path / RECORD, path / "community" / RECORD):
        if candidate.is_file():
            try:
                spec = json.loads(candidate.read_text()).get("taste")
            except (json.JSONDecodeError, AttributeError):
                spec = None
            if not isinstance(spec, str):
                raise UserError(f"{candidate}: no 'taste' recorded (a community written before tastes were a setting: write it again)")
            return resolve_taste(spec)
    raise UserError(f"no world record at {path}: expected {RECORD} of a community (sr-finetune world community / demo writes it)")


@dataclass(frozen=True)
class TasteProfile:
    """A taste's distribution over true renders of a split: every value, and the spread within a prompt."""

    values: np.ndarray  # [prompts, renders_per_prompt]

    @property
    def deviations(self) -> np.ndarray:
        """Each value minus the mean of its prompt's values."""
        return self.values - self.values.mean(1, keepdims=True)

    @property
    def within_prompt_std(self) -> float:
        """Pooled standard deviation around each prompt's mean."""
        return float(np.sqrt((self.deviations**2).sum() / (self.values.size - len(self.values))))

    def quantile(self, q: float, within_prompt: bool = False) -> float:
        """The ``q`` quantile of the values, or with ``within_prompt`` of their deviations."""
        return float(np.quantile(self.deviations if within_prompt else self.values, q))


def taste_profile(taste: Taste, split: str = "train", prompts: int = 200, renders_per_prompt: int = 5, seed: int = 0) -> TasteProfile:
    """Measure ``taste`` on ``renders_per_prompt`` true renders of ``prompts`` prompts of ``split``,
    deterministic in ``seed`` (about a second for the default 1,000 renders)."""
    pool = split_prompts(split)
    rng = np.random.default_rng(seed)
    picked = [pool[i] for i in rng.choice(len(pool), size=min(prompts, len(pool)), replace=False)]
    return TasteProfile(np.array([[taste(render(sample_scene(p, int(rng.integers(2**62))))) for _ in range(renders_per_prompt)] for p in picked]))


__all__ = [
    "DEFAULT_TASTE", "FULL_EXTENT", "NAMED_TASTES", "Taste", "TasteProfile",
    "high", "large_centred", "muted", "recorded_taste", "resolve_taste", "small_off_centre", "spread", "taste_profile",
]  # fmt: skip
