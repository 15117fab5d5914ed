"""What every part of the shapes world shares: the object vocabulary, the object record, seeded draws.

The shapes, colours (with their RGB values), sizes and the 3x3 grid of cells a scene is built from; the
:class:`ShapeObject` record of one placed object; and the scalar random draws that scene sampling
(:mod:`.world`) and wording (:mod:`.language`) both go through, so that a world is the same on every
machine and Python version. This module sits below :mod:`.rendering`, :mod:`.language` and :mod:`.world`
and imports none of them.

Example:
    >>> o = ShapeObject("circle", "red", "large", row=0, col=2, center=(53.0, 10.0), radius=8.5,
    ...                 rgb=COLOR_RGB["red"])
    >>> o.cell, o.position, o.phrase(with_size=True)
    (2, 'top right', 'large red circle')
    >>> rng = python_rng(0, 1); r = [randbelow(rng, 6) for _ in range(1000)]
    >>> min(r), max(r)
    (0, 5)
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOR_RGB = {
    "red": (220, 50, 47),
    "green": (60, 180, 75),
    "blue": (45, 95, 230),
    "yellow": (235, 205, 40),
    "purple": (150, 70, 190),
    "white": (235, 235, 235),
}
COLORS = tuple(COLOR_RGB)
SIZES = ("small", "large")
GRID = 3  # objects sit in distinct cells of a GRID x GRID layout
CELL_NAMES = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One object of a scene. ``bbox`` is ``(x0, y0, x1, y1)`` in pixels, end-exclusive, from the rendered mask."""

    shape: str
    color: str
    size: str
    row: int
    col: int
    center: tuple[float, float]  # (x, y) in pixels
    radius: float
    rgb: tuple[int, int, int]
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)
    area: int = 0

    @property
    def cell(self) -> int:
        return self.row * GRID + self.col

    @property
    def position(self) -> str:
        return CELL_NAMES[self.cell]

    def phrase(self, with_size: bool = False) -> str:
        return f"{self.size} {self.color} {self.shape}" if with_size else f"{self.color} {self.shape}"


# ------------------------------------------------------------------------------------------ seeded draws
def python_rng(*key: int) -> random.Random:
    """A ``random.Random`` seeded from a numpy SeedSequence of ``key`` (fast scalar draws, stable across versions)."""
    return random.Random(int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0]))


def randbelow(rng: random.Random, n: int) -> int:
    """A uniform int in [0, n): ``int(random() * n)`` is several times faster than ``randrange``."""
    return int(rng.random() * n)


def shuffled(rng: random.Random, n: int) -> list[int]:
    """A random permutation of ``range(n)`` drawn with :func:`randbelow`."""
    order = list(range(n))
    for i in range(n - 1, 0, -1):  # Fisher-Yates
        j = randbelow(rng, i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def pick(rng: random.Random, seq: Sequence[str]) -> str:
    """A uniformly drawn element of ``seq``."""
    return seq[randbelow(rng, len(seq))]
