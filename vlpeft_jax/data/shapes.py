"""The shapes world: a small, deterministic visual world for captioning, VQA and multi-task experiments.

Every image (default 64x64 RGB) holds 1-4 objects on a dark, slightly noisy background. An object has a
shape (circle, square, triangle, diamond, cross), a colour (red, green, blue, yellow, purple, white), a size
(small/large) and a cell of a 3x3 grid (its position, with a little jitter inside the cell); objects never
share a cell, so "left of"/"above" relations between any two objects are unambiguous. From the scene graph
the generator writes:

* captions in two domains, ``num_captions`` different references each (the source/target gap of KLAFT,
  seed 000, and the style gap of seed 003):
  *source* — short and plain, objects only: ``"a red circle and a blue square"``;
  *target* — expressive, with sizes, positions, relations and counts:
  ``"two objects: a large red circle on the left above a small blue square"``;
* VQA items of six types (colour, shape, count, position, relation, existence), each with ``num_answers``
  (10) human-style answers, a few replaced by plausible wrong ones (``answer_noise``) as real annotators do,
  and the ids of the objects the question is about (for attention-knockout studies, thesis seed 004 ch. 7);
* PETAL's instruction templates (seed 001, Appendix C, Table 7) for captioning and VQA;
* multi-task labels (object count, dominant colour, position class, shape of the largest object, shape and
  colour presence);
* pixel segmentation (``0`` background, ``k + 1`` object ``k``), bounding boxes and patch-level object
  masks for any patch size.

Some shape-colour pairs are held out: they never occur (and are never mentioned) in ``train``/``val``/
``test``; the ``ood`` split puts at least one held-out object in every image, for out-of-domain evaluation.
Each split draws from its own random streams ``(seed, split)``, so a split does not change when the size of
another does. Drawing is vectorised over all objects with numpy masks; the default sizes
(2000/200/200/200) take a few seconds. :meth:`ShapesWorld.save`/:meth:`ShapesWorld.load` (npz + json) and
:func:`load_or_generate` cache a world so that runs can reuse it.

Example:
    >>> world = generate(ShapesWorldConfig(num_train=8, num_val=2, num_test=2, num_ood=2))
    >>> ex = world.train[0]
    >>> ex.image.shape, ex.image.dtype, len(ex.captions_source), len(ex.vqa[0].answers)
    ((64, 64, 3), dtype('uint8'), 5, 10)
    >>> ex.patch_masks(8).shape[1:]
    (8, 8)
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlpeft_jax.data.batching import VQA_PROMPT_TEMPLATE, CaptionExample, VQAExample
from vlpeft_jax.data.tokenizer import WordTokenizer
from vlpeft_jax.errors import ConfigError, InputError

GENERATOR_VERSION = 1  # bump when generation changes, so cached worlds are regenerated

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
BACKGROUND_RGB = (28, 28, 34)
GRID = 3  # objects sit in distinct cells of a GRID x GRID layout
# Object radius as a fraction of the cell size, by size.
_RADIUS_FRACTION = {"small": 0.25, "large": 0.40}
SPLITS = ("train", "val", "test", "ood")

CELL_NAMES = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
_LOCATION_PHRASES = (
    ("in the top left corner", "at the top left"),
    ("at the top", "at the top center"),
    ("in the top right corner", "at the top right"),
    ("on the left", "at the left side"),
    ("in the center", "in the middle"),
    ("on the right", "at the right side"),
    ("in the bottom left corner", "at the bottom left"),
    ("at the bottom", "at the bottom center"),
    ("in the bottom right corner", "at the bottom right"),
)
RELATIONS = ("left of", "right of", "above", "below")
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_RELATION_PHRASES = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under"),
}
_COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_PLURALS = {"cross": "crosses"}

_SOURCE_TEMPLATES = (
    "{objects}",
    "there is {objects}",
    "a picture of {objects}",
    "an image of {objects}",
    "{bare}",
    "{objects} on a plain background",
)
_TARGET_TEMPLATES = (
    "{count} {noun}: {located}",
    "{there_are} {count} {noun}: {located}",
    "{located}, {count} {noun} in total",
    "{count} {noun}: {chain}",
    "the image shows {count} {noun}. {relation_sentences}",
    "{location_first}",
)
_TARGET_NOUNS = ("objects", "shapes")
_QUESTION_TEMPLATES = {
    "color": ("what color is the {d}?", "what is the color of the {d}?"),
    "shape": ("what shape is the {d} object?", "what is the shape of the {d} object?"),
    "count": ("how many objects are there?", "how many shapes are in the image?"),
    "count_color": ("how many {color} objects are there?",),
    "count_shape": ("how many {plural} are there?",),
    "position": ("where is the {d}?", "in which part of the image is the {d}?"),
    "relation": ("is the {d} {rel} the {d2}?",),
    "existence": ("is there {a} {color} {shape}?", "does the image contain {a} {color} {shape}?"),
}
QUESTION_TYPES = ("color", "shape", "count", "position", "relation", "existence")

# PETAL (seed 001), Appendix C, Table 7: "original" instructions (several per image, mixed by the adaptive
# instruction MoE) and the task-specific instruction of each task.
CAPTION_INSTRUCTIONS = (
    "What objects are in the picture?",
    "What are the characteristics of the objects in the picture?",
    "What is the relationship between the objects in the picture?",
)
VQA_INSTRUCTIONS = (
    "What objects are in the picture?",
    "What color are the objects in the picture?",
    "What are the characteristics of the objects in the picture?",
)
CAPTION_TASK_PROMPT = "A photo of"
VQA_TASK_TEMPLATE = VQA_PROMPT_TEMPLATE

# Multi-task labels: name -> class names. "*_presence" labels are multi-hot over their classes.
LABEL_CLASSES: dict[str, tuple[str, ...]] = {
    "count": ("1", "2", "3", "4", "5", "6", "7", "8", "9"),
    "dominant_color": COLORS,
    "position": CELL_NAMES,
    "largest_shape": SHAPES,
    "shape_presence": SHAPES,
    "color_presence": COLORS,
}
MULTI_HOT_LABELS = ("shape_presence", "color_presence")


def _plural(shape: str) -> str:
    return _PLURALS.get(shape, shape + "s")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


# ----------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class ShapesWorldConfig:
    """Everything that determines a shapes world; equal configs give identical worlds.

    Attributes:
        seed: the world's seed (scenes, rendering noise, wording, answers, held-out pairs).
        image_size: square image side in pixels (>= 24).
        num_train, num_val, num_test, num_ood: split sizes (``ood`` holds the held-out pairs).
        min_objects, max_objects: objects per image (1 <= min <= max <= 9).
        shapes, colors: the vocabulary of objects (subsets of :data:`SHAPES` and :data:`COLORS`).
        num_captions: references per image and domain.
        num_questions: VQA items per image (cycling through :data:`QUESTION_TYPES`).
        num_answers: human-style answers per question (10 as in VQAv2).
        answer_noise: probability that one of those answers is a plausible wrong one (at most 3 per question).
        held_out_pairs: (shape, colour) pairs kept out of train/val/test; None draws ``num_held_out_pairs``
            pairs with distinct shapes and colours from the seed.
        noise_std, color_jitter: std of the (luminance) pixel noise and per-object colour jitter, uint8 units.
        patch_size: default patch size of :meth:`ShapesExample.patch_masks`.
        caption_instructions, vqa_instructions: the instruction templates stored with every image.
    """

    seed: int = 0
    image_size: int = 64
    num_train: int = 2000
    num_val: int = 200
    num_test: int = 200
    num_ood: int = 200
    min_objects: int = 1
    max_objects: int = 4
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = COLORS
    num_captions: int = 5
    num_questions: int = 6
    num_answers: int = 10
    answer_noise: float = 0.1
    held_out_pairs: tuple[tuple[str, str], ...] | None = None
    num_held_out_pairs: int = 3
    noise_std: float = 4.0
    color_jitter: int = 12
    patch_size: int = 8
    caption_instructions: tuple[str, ...] = CAPTION_INSTRUCTIONS
    vqa_instructions: tuple[str, ...] = VQA_INSTRUCTIONS

    def __post_init__(self) -> None:
        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(f"ShapesWorldConfig.{key}={getattr(self, key)!r}: {msg}")

        if self.image_size < 24:
            raise bad("image_size", "must be >= 24 (small objects would vanish)")
        for key in ("num_train", "num_val", "num_test", "num_ood"):
            if getattr(self, key) < 0:
                raise bad(key, "must be >= 0")
        if not 1 <= self.min_objects <= self.max_objects <= GRID * GRID:
            raise bad("max_objects", f"need 1 <= min_objects ({self.min_objects}) <= max_objects <= {GRID * GRID}")
        unknown = [s for s in self.shapes if s not in SHAPES]
        if unknown or not self.shapes:
            raise bad("shapes", f"valid shapes: {', '.join(SHAPES)}")
        unknown = [c for c in self.colors if c not in COLOR_RGB]
        if unknown or len(self.colors) < 2:
            raise bad("colors", f"need >= 2 of: {', '.join(COLORS)}")
        if self.num_captions < 1 or self.num_answers < 1 or self.num_questions < 0:
            raise bad("num_captions", "num_captions and num_answers must be >= 1, num_questions >= 0")
        if not 0.0 <= self.answer_noise < 0.5:
            raise bad("answer_noise", "must be in [0, 0.5)")
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise bad("patch_size", f"must divide image_size={self.image_size}")
        if self.held_out_pairs is not None:
            for pair in self.held_out_pairs:
                if len(pair) != 2 or pair[0] not in self.shapes or pair[1] not in self.colors:
                    raise bad("held_out_pairs", f"{pair!r} is not a (shape, colour) pair of this world")
            held = set(map(tuple, self.held_out_pairs))
            for s in self.shapes:
                if all((s, c) in held for c in self.colors):
                    raise bad("held_out_pairs", f"holds out every colour of {s!r}; it could never be trained")
            for c in self.colors:
                if all((s, c) in held for s in self.shapes):
                    raise bad("held_out_pairs", f"holds out every shape of colour {c!r}")
        elif not 0 <= self.num_held_out_pairs <= min(len(self.shapes), len(self.colors)) - 1:
            raise bad("num_held_out_pairs", f"must be in [0, {min(len(self.shapes), len(self.colors)) - 1}]")

    def resolved_held_out_pairs(self) -> tuple[tuple[str, str], ...]:
        """The held-out (shape, colour) pairs: the given ones, or distinct shapes x colours drawn from the seed."""
        if self.held_out_pairs is not None:
            return tuple((str(s), str(c)) for s, c in self.held_out_pairs)
        rng = np.random.default_rng([self.seed, 99])
        shapes = rng.permutation(len(self.shapes))[:self.num_held_out_pairs]
        colors = rng.permutation(len(self.colors))[:self.num_held_out_pairs]
        return tuple((self.shapes[s], self.colors[c]) for s, c in zip(shapes, colors, strict=True))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShapesWorldConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown ShapesWorldConfig keys {unknown}; valid: {sorted(known)}")
        d = dict(d)
        for key in ("shapes", "colors", "caption_instructions", "vqa_instructions"):
            if key in d:
                d[key] = tuple(d[key])
        if d.get("held_out_pairs") is not None:
            d["held_out_pairs"] = tuple(tuple(p) for p in d["held_out_pairs"])
        return cls(**d)

    def label_classes(self) -> dict[str, tuple[str, ...]]:
        """:data:`LABEL_CLASSES` with the count classes limited to ``max_objects`` (sizes of the task heads)."""
        return {**LABEL_CLASSES, "count": LABEL_CLASSES["count"][:self.max_objects]}

    def fingerprint(self) -> str:
        """A short hash of the config and generator version (names cache directories)."""
        blob = json.dumps({"version": GENERATOR_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- records
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


@dataclasses.dataclass(frozen=True)
class VQAItem:
    """A question with its answers; ``object_ids`` index the objects it is about."""

    question_id: str
    question: str
    answer: str
    answers: tuple[str, ...]
    qtype: str
    object_ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ShapesExample:
    """One image of the world with everything known about it."""

    image_id: str
    split: str
    image: np.ndarray  # uint8 [H, W, 3]
    segmentation: np.ndarray  # int8 [H, W]: 0 background, k + 1 object k
    objects: tuple[ShapeObject, ...]
    relations: tuple[tuple[int, str, int], ...]  # (subject, relation, object): subject is <relation> object
    captions_source: tuple[str, ...]
    captions_target: tuple[str, ...]
    vqa: tuple[VQAItem, ...]
    instructions: dict[str, tuple[str, ...]]
    labels: dict[str, Any]
    patch_size: int = 8

    def captions(self, domain: str) -> tuple[str, ...]:
        if domain not in ("source", "target"):
            raise InputError(f"caption domain must be 'source' or 'target'; got {domain!r}")
        return self.captions_source if domain == "source" else self.captions_target

    def patch_masks(self, patch_size: int | None = None, min_fraction: float = 0.0) -> np.ndarray:
        """``bool [num_objects, H/p, W/p]``: which vision patches contain each object (see :func:`patch_masks`)."""
        return patch_masks(self.segmentation, len(self.objects), patch_size or self.patch_size, min_fraction)

    def question_patch_mask(self, question_index: int, patch_size: int | None = None) -> np.ndarray:
        """``bool [H/p, W/p]``: the patches of the objects a VQA item is about (all False if none)."""
        masks = self.patch_masks(patch_size)
        ids = list(self.vqa[question_index].object_ids)
        return masks[ids].any(axis=0) if ids else np.zeros(masks.shape[1:], bool)


def patch_masks(segmentation: np.ndarray, num_objects: int, patch_size: int, min_fraction: float = 0.0) -> np.ndarray:
    """Which ``patch_size`` x ``patch_size`` patches hold each object: ``bool [num_objects, H/p, W/p]``.

    A patch counts when more than ``min_fraction`` of its pixels belong to the object (0.0: any pixel).
    Patches are in row-major order, as a ViT flattens them (``mask.reshape(n, -1)`` gives patch indices).

    Example:
        >>> seg = np.zeros((16, 16), np.int8); seg[0:3, 9:12] = 1
        >>> patch_masks(seg, 1, 8)[0].astype(int).tolist()
        [[0, 1], [0, 0]]
    """
    h, w = segmentation.shape
    if patch_size < 1 or h % patch_size or w % patch_size:
        raise InputError(f"patch_size={patch_size} must divide the image size {h}x{w}")
    gh, gw = h // patch_size, w // patch_size
    seg = segmentation.reshape(gh, patch_size, gw, patch_size)
    ids = np.arange(1, num_objects + 1, dtype=segmentation.dtype)[:, None, None, None, None]
    fraction = (seg[None] == ids).mean(axis=(2, 4))
    return fraction > min_fraction


# -------------------------------------------------------------------------------------------- rendering
def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Pixel mask of ``shape`` from offsets (dx, dy) to the centre, for radius r (all broadcastable)."""
    adx, ady = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(adx, ady) <= 0.82 * r
    if shape == "triangle":  # pointing up: apex at -r, base at +0.8r, base half-width 0.95r
        return (dy >= -r) & (dy <= 0.8 * r) & (adx <= 0.95 * r * (dy + r) / (1.8 * r))
    if shape == "diamond":
        return adx + ady <= 1.05 * r
    if shape == "cross":
        return ((adx <= 0.33 * r) & (ady <= r)) | ((ady <= 0.33 * r) & (adx <= r))
    raise InputError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


def _render(num_images: int, image_size: int, objects: Sequence[tuple[int, int, float, float, float, int,
                                                                      tuple[int, int, int]]],
            noise: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Draws objects ``(image, slot, cx, cy, radius, shape_id, rgb)``; returns (uint8 images, int8 segmentation).

    Vectorised over objects: for every (slot, shape) the masks of all such objects are computed at once in
    a window around each object (a window per object, not the whole image), then scattered into the
    segmentation; colours come from a per-image palette indexed by the segmentation. Within one slot every
    image appears at most once, so the scatter has no conflicts.
    """
    size = image_size
    seg = np.zeros((num_images, size, size), np.int8)
    if not objects:
        images = np.broadcast_to(np.array(BACKGROUND_RGB, np.uint8), (num_images, size, size, 3))
        if noise is not None:
            images = np.clip(images.astype(np.int16) + noise, 0, 255)
        return images.astype(np.uint8), seg
    table = np.array([o[:6] for o in objects], np.float64)  # image, slot, cx, cy, radius, shape id
    rgb = np.array([o[6] for o in objects], np.uint8)
    img, slot, sid = table[:, 0].astype(np.int64), table[:, 1].astype(np.int64), table[:, 5].astype(np.int64)
    cx, cy, r = table[:, 2], table[:, 3], table[:, 4]
    win = min(size, int(np.ceil(2 * r.max())) + 4)
    x0 = np.clip(np.floor(cx - win / 2).astype(np.int64), 0, size - win)
    y0 = np.clip(np.floor(cy - win / 2).astype(np.int64), 0, size - win)
    offs = np.arange(win)
    for k in range(int(slot.max()) + 1):
        for s_id, shape in enumerate(SHAPES):
            sel = np.flatnonzero((slot == k) & (sid == s_id))
            if not len(sel):
                continue
            xs = x0[sel, None] + offs[None]  # [m, win] pixel columns
            ys = y0[sel, None] + offs[None]
            dx = (xs + 0.5 - cx[sel, None])[:, None, :]  # pixel centres minus object centre
            dy = (ys + 0.5 - cy[sel, None])[:, :, None]
            mask = _shape_mask(shape, dx, dy, r[sel, None, None])
            ii, yy, xx = img[sel, None, None], ys[:, :, None], xs[:, None, :]
            seg[ii, yy, xx] = np.where(mask, np.int8(k + 1), seg[ii, yy, xx])
    palette = np.zeros((num_images, int(slot.max()) + 2, 3), np.uint8)
    palette[:, 0] = BACKGROUND_RGB
    palette[img, slot + 1] = rgb
    flat = (np.arange(num_images, dtype=np.int64)[:, None, None] * palette.shape[1] + seg).ravel()
    images = np.take(palette.reshape(-1, 3), flat, axis=0).reshape(num_images, size, size, 3)
    if noise is not None:
        images = np.clip(images.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return images, seg


def render_scene(objects: Sequence[dict[str, Any] | ShapeObject], image_size: int = 64) -> tuple[np.ndarray,
                                                                                                   np.ndarray]:
    """Renders one scene without noise: ``(uint8 [H, W, 3] image, int8 [H, W] segmentation)``.

    Each object gives ``shape``, ``center`` (x, y in pixels), ``radius`` and ``color`` (a name) or ``rgb``.

    Example:
        >>> img, seg = render_scene([{"shape": "square", "center": (16, 16), "radius": 10, "color": "red"}], 32)
        >>> int(seg.max()), tuple(int(v) for v in img[16, 16])
        (1, (220, 50, 47))
    """
    rows = []
    for k, o in enumerate(objects):
        get = (lambda key, o=o: getattr(o, key)) if isinstance(o, ShapeObject) else o.get
        shape = get("shape")
        if shape not in SHAPES:
            raise InputError(f"object {k}: unknown shape {shape!r}; valid: {', '.join(SHAPES)}")
        rgb = get("rgb") or COLOR_RGB[get("color")]
        cx, cy = get("center")
        rows.append((0, k, float(cx), float(cy), float(get("radius")), SHAPES.index(shape), tuple(rgb)))
    images, seg = _render(1, image_size, rows, None)
    return images[0], seg[0]


# ------------------------------------------------------------------------------------------------- text
def _unique_description(objs: Sequence[ShapeObject], i: int, use_color: bool = True,
                        use_shape: bool = True) -> str | None:
    """The shortest phrase naming object i unambiguously among objs (None when there is none)."""
    o = objs[i]
    options = []
    if use_shape and not use_color:
        options = [lambda x: (x.shape,), lambda x: (x.size, x.shape)]
    elif use_color and not use_shape:
        options = [lambda x: (x.color,), lambda x: (x.size, x.color)]
    else:
        options = [lambda x: (x.shape,), lambda x: (x.color, x.shape), lambda x: (x.size, x.color, x.shape)]
    for key in options:
        if sum(key(x) == key(o) for x in objs) == 1:
            return " ".join(key(o))
    return None


def _relation(a: ShapeObject, b: ShapeObject, rng: random.Random) -> str:
    """A true relation 'a <rel> b' (a random one of the horizontal/vertical pair when both hold)."""
    options = []
    if a.col != b.col:
        options.append("left of" if a.col < b.col else "right of")
    if a.row != b.row:
        options.append("above" if a.row < b.row else "below")
    return options[_below(rng, len(options))]


def _python_rng(*key: int) -> random.Random:
    """A ``random.Random`` seeded from a numpy SeedSequence of ``key`` (fast scalar draws, stable across versions)."""
    return random.Random(int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0]))


def _below(rng: random.Random, n: int) -> int:
    """A uniform int in [0, n): ``int(random() * n)`` is several times faster than ``randrange``."""
    return int(rng.random() * n)


def _shuffled(rng: random.Random, n: int) -> list[int]:
    order = list(range(n))
    for i in range(n - 1, 0, -1):  # Fisher-Yates
        j = _below(rng, i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def _pick(rng: random.Random, seq: Sequence[str]) -> str:
    return seq[_below(rng, len(seq))]


def _source_caption(objs: Sequence[ShapeObject], rng: random.Random) -> str:
    order = _shuffled(rng, len(objs))
    phrases = [objs[i].phrase() for i in order]
    return _pick(rng, _SOURCE_TEMPLATES).format(
        objects=_join([f"{_article(p)} {p}" for p in phrases]), bare=_join(phrases))


def _target_caption(objs: Sequence[ShapeObject], rng: random.Random) -> str:
    n = len(objs)
    template = _pick(rng, _TARGET_TEMPLATES)
    order = _shuffled(rng, n)
    full = [objs[i].phrase(with_size=True) for i in order]
    with_art = [f"{_article(p)} {p}" for p in full]
    locs = [_pick(rng, _LOCATION_PHRASES[objs[i].cell]) for i in order]
    fields: dict[str, str] = {}
    if "{count}" in template:
        noun = _pick(rng, _TARGET_NOUNS)
        fields.update(count=_COUNT_WORDS[n], noun=noun if n > 1 else noun[:-1],
                      there_are="there are" if n > 1 else "there is")
    if "{located}" in template or ("{chain}" in template and n == 1):
        fields["located"] = fields["chain"] = _join([f"{a} {loc}" for a, loc in zip(with_art, locs, strict=True)])
    if n > 1 and ("{chain}" in template or "{relation_sentences}" in template):
        rel = _pick(rng, _RELATION_PHRASES[_relation(objs[order[0]], objs[order[1]], rng)])
        # "in the middle right of ..." reads badly: keep the location only before a vertical relation.
        loc0 = "" if rel.endswith(" of") else f" {locs[0]}"
        fields["chain"] = f"{with_art[0]}{loc0} {rel} {with_art[1]}" + "".join(
            f", and {a} {loc}" for a, loc in zip(with_art[2:], locs[2:], strict=True))
        fields["relation_sentences"] = f"the {full[0]} is {rel} the {full[1]}." + "".join(
            f" the {p} is {loc}." for p, loc in zip(full[2:], locs[2:], strict=True))
    elif n == 1:
        fields["relation_sentences"] = f"the {full[0]} is {locs[0]}."
    if "{location_first}" in template:
        fields["location_first"] = f"{locs[0]} there is {with_art[0]}" + "".join(
            f", and {loc} {a}" for a, loc in zip(with_art[1:], locs[1:], strict=True))
    return template.format(**fields)


def _distinct(make, k: int, rng: random.Random, tries: int = 60) -> tuple[str, ...]:
    """k different outputs of make(rng) where possible (repeats only when the scene allows fewer)."""
    out: list[str] = []
    for _ in range(tries):
        c = make(rng)
        if c not in out:
            out.append(c)
            if len(out) == k:
                return tuple(out)
    distinct = list(out)
    while len(out) < k:
        out.append(distinct[len(out) % len(distinct)])
    return tuple(out)


_Question = tuple[str, str, str, tuple[int, ...], Sequence[str]]


def _question(qtype: str, objs: Sequence[ShapeObject], rng: random.Random, cfg: ShapesWorldConfig,
              allowed_pairs: Sequence[tuple[str, str]]) -> _Question | None:
    """(question, answer, qtype, object_ids, wrong-answer pool) for one question type, or None if impossible."""
    n = len(objs)
    t = _QUESTION_TEMPLATES
    if qtype == "color":
        cands = [(i, d) for i in range(n) if (d := _unique_description(objs, i, use_color=False))]
        if not cands:
            return None
        i, d = cands[_below(rng, len(cands))]
        return _pick(rng, t["color"]).format(d=d), objs[i].color, qtype, (i,), cfg.colors
    if qtype == "shape":
        cands = [(i, d) for i in range(n) if (d := _unique_description(objs, i, use_shape=False))]
        if not cands:
            return None
        i, d = cands[_below(rng, len(cands))]
        return _pick(rng, t["shape"]).format(d=d), objs[i].shape, qtype, (i,), cfg.shapes
    if qtype == "count":
        counts = [str(k) for k in range(cfg.max_objects + 1)]
        kind = _below(rng, 3)
        if kind == 0:
            return _pick(rng, t["count"]), str(n), qtype, tuple(range(n)), counts
        if kind == 1:
            color = _pick(rng, cfg.colors)
            ids = tuple(i for i in range(n) if objs[i].color == color)
            return t["count_color"][0].format(color=color), str(len(ids)), qtype, ids, counts
        shape = _pick(rng, cfg.shapes)
        ids = tuple(i for i in range(n) if objs[i].shape == shape)
        return t["count_shape"][0].format(plural=_plural(shape)), str(len(ids)), qtype, ids, counts
    if qtype == "position":
        cands = [(i, d) for i in range(n) if (d := _unique_description(objs, i))]
        if not cands:
            return None
        i, d = cands[_below(rng, len(cands))]
        return _pick(rng, t["position"]).format(d=d), objs[i].position, qtype, (i,), CELL_NAMES
    if qtype == "relation":
        described = {i: d for i in range(n) if (d := _unique_description(objs, i))}
        pairs = [(i, j) for i, j in itertools.permutations(described, 2)]
        if not pairs:
            return None
        i, j = pairs[_below(rng, len(pairs))]
        rel = _relation(objs[i], objs[j], rng)
        truth = bool(_below(rng, 2))
        asked = rel if truth else _OPPOSITE[rel]
        q = t["relation"][0].format(d=described[i], rel=_pick(rng, _RELATION_PHRASES[asked]), d2=described[j])
        return q, "yes" if truth else "no", qtype, (i, j), ("yes", "no")
    if qtype == "existence":
        present = {(o.shape, o.color) for o in objs}
        if _below(rng, 2):
            i = _below(rng, n)
            shape, color, ids, answer = objs[i].shape, objs[i].color, (i,), "yes"
        else:
            absent = [p for p in allowed_pairs if p not in present]
            shape, color = absent[_below(rng, len(absent))]
            ids, answer = (), "no"
        q = _pick(rng, t["existence"]).format(a=_article(color), color=color, shape=shape)
        return q, answer, qtype, ids, ("yes", "no")
    raise InputError(f"unknown question type {qtype!r}; valid: {', '.join(QUESTION_TYPES)}")


def _answers(answer: str, pool: Sequence[str], rng: random.Random, cfg: ShapesWorldConfig) -> tuple[str, ...]:
    """num_answers answers: the right one, with up to 3 replaced by wrong ones from the pool (annotator noise)."""
    answers = [answer] * cfg.num_answers
    wrong = [p for p in pool if p != answer]
    if wrong and cfg.answer_noise > 0:
        flips = [k for k in range(cfg.num_answers) if rng.random() < cfg.answer_noise][:3]
        for k in flips:
            answers[k] = _pick(rng, wrong)
    return tuple(answers)


# ------------------------------------------------------------------------------------------------ splits
@dataclasses.dataclass
class ShapesSplit:
    """One split: image and segmentation arrays plus per-example metadata (JSON-able dicts)."""

    name: str
    images: np.ndarray  # uint8 [N, H, W, 3]
    segmentations: np.ndarray  # int8 [N, H, W]
    scenes: list[dict[str, Any]]
    config: ShapesWorldConfig

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> ShapesExample:
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.name} has {len(self)} examples; index {i} is out of range")
        s = self.scenes[i]
        cfg = self.config
        return ShapesExample(
            image_id=s["image_id"], split=self.name, image=self.images[i], segmentation=self.segmentations[i],
            objects=tuple(ShapeObject(**{**o, "center": tuple(o["center"]), "rgb": tuple(o["rgb"]),
                                         "bbox": tuple(o["bbox"])}) for o in s["objects"]),
            relations=tuple(tuple(r) for r in s["relations"]),  # type: ignore[misc]
            captions_source=tuple(s["captions_source"]), captions_target=tuple(s["captions_target"]),
            vqa=tuple(VQAItem(**{**q, "answers": tuple(q["answers"]), "object_ids": tuple(q["object_ids"])})
                      for q in s["vqa"]),
            instructions={"caption": cfg.caption_instructions, "vqa": cfg.vqa_instructions},
            labels={k: (np.array(v, np.int8) if k in MULTI_HOT_LABELS else int(v)) for k, v in s["labels"].items()},
            patch_size=cfg.patch_size)

    def __iter__(self) -> Iterator[ShapesExample]:
        for i in range(len(self)):
            yield self[i]

    def caption_examples(self, domain: str = "source", prompt: str | None = None) -> list[CaptionExample]:
        """The split as :class:`CaptionExample` records (for the batching/eval code shared with real data)."""
        if domain not in ("source", "target"):
            raise InputError(f"caption domain must be 'source' or 'target'; got {domain!r}")
        key = f"captions_{domain}"
        return [CaptionExample(s["image_id"], tuple(s[key]), image=self.images[i], prompt=prompt,
                               meta={"split": self.name, "index": i, "domain": domain})
                for i, s in enumerate(self.scenes)]

    def vqa_examples(self) -> list[VQAExample]:
        """Every VQA item of the split as a :class:`VQAExample` (``meta`` keeps qtype and object ids)."""
        out = []
        for i, s in enumerate(self.scenes):
            for q in s["vqa"]:
                out.append(VQAExample(q["question_id"], s["image_id"], q["question"], tuple(q["answers"]),
                                      image=self.images[i],
                                      meta={"split": self.name, "index": i, "qtype": q["qtype"],
                                            "object_ids": tuple(q["object_ids"])}))
        return out

    def labels(self, name: str) -> np.ndarray:
        """Multi-task label ``name`` for every example: int32 ``[N]`` classes or ``[N, k]`` multi-hot."""
        if name not in LABEL_CLASSES:
            raise InputError(f"unknown label {name!r}; valid: {', '.join(LABEL_CLASSES)}")
        return np.array([s["labels"][name] for s in self.scenes], np.int32)


def _sample_scenes(cfg: ShapesWorldConfig, split: str, num: int, held_out: Sequence[tuple[str, str]],
                   rng: random.Random) -> list[list[dict[str, Any]]]:
    held = set(held_out)
    allowed = [(s, c) for s in cfg.shapes for c in cfg.colors if (s, c) not in held]
    cell = cfg.image_size / GRID
    scenes = []
    for _ in range(num):
        n = cfg.min_objects + _below(rng, cfg.max_objects - cfg.min_objects + 1)
        cells = sorted(_shuffled(rng, GRID * GRID)[:n])  # reading order
        pairs = [allowed[_below(rng, len(allowed))] for _ in range(n)]
        if split == "ood":
            # at least one held-out object; the rest drawn from all pairs
            everything = allowed + list(held_out)
            pairs = [everything[_below(rng, len(everything))] for _ in range(n)]
            pairs[_below(rng, n)] = held_out[_below(rng, len(held_out))]
        objs = []
        for c, (shape, color) in zip(cells, pairs, strict=True):
            size = SIZES[_below(rng, 2)]
            radius = _RADIUS_FRACTION[size] * cell
            slack = max(0.0, cell / 2 - radius - 1.0)
            row, col = divmod(int(c), GRID)
            cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
            cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
            j = cfg.color_jitter
            rgb = tuple(min(255, max(0, v + _below(rng, 2 * j + 1) - j)) for v in COLOR_RGB[color])
            objs.append({"shape": shape, "color": color, "size": size, "row": row, "col": col,
                         "center": (round(cx, 3), round(cy, 3)), "radius": round(radius, 3), "rgb": rgb})
        scenes.append(objs)
    return scenes


def _labels(objs: Sequence[ShapeObject], cfg: ShapesWorldConfig) -> dict[str, Any]:
    area_by_color: dict[str, int] = collections.defaultdict(int)
    for o in objs:
        area_by_color[o.color] += o.area
    dominant = max(COLORS, key=lambda c: (area_by_color.get(c, 0), -COLORS.index(c)))
    largest = max(range(len(objs)), key=lambda i: (objs[i].area, -i))
    return {
        "count": len(objs) - 1,
        "dominant_color": COLORS.index(dominant),
        "position": objs[largest].cell,
        "largest_shape": SHAPES.index(objs[largest].shape),
        "shape_presence": [int(any(o.shape == s for o in objs)) for s in SHAPES],
        "color_presence": [int(any(o.color == c for o in objs)) for c in COLORS],
    }


def _generate_split(cfg: ShapesWorldConfig, split: str, num: int,
                    held_out: Sequence[tuple[str, str]]) -> ShapesSplit:
    code = SPLITS.index(split)
    scene_rng = _python_rng(cfg.seed, code, 0)
    text_rng = _python_rng(cfg.seed, code, 1)
    noise_rng = np.random.default_rng([cfg.seed, code, 2])
    scenes = _sample_scenes(cfg, split, num, held_out, scene_rng)
    rows = [(n, k, o["center"][0], o["center"][1], o["radius"], SHAPES.index(o["shape"]), o["rgb"])
            for n, objs in enumerate(scenes) for k, o in enumerate(objs)]
    size = cfg.image_size
    # Luminance noise (one channel, added to all three): a third of the cost of per-channel noise.
    noise = (np.round(noise_rng.standard_normal((num, size, size, 1), dtype=np.float32) * np.float32(cfg.noise_std))
             .astype(np.int16) if cfg.noise_std > 0 else None)
    images, seg = _render(num, size, rows, noise)

    # Bounding boxes and areas from the rendered masks, one slot at a time over all images.
    max_slots = max((len(s) for s in scenes), default=0)
    boxes = np.zeros((num, max_slots, 4), np.int64)
    areas = np.zeros((num, max_slots), np.int64)
    for k in range(max_slots):
        m = seg == k + 1
        rows_any, cols_any = m.any(axis=2), m.any(axis=1)
        areas[:, k] = m.sum(axis=(1, 2))
        boxes[:, k, 0] = cols_any.argmax(axis=1)
        boxes[:, k, 1] = rows_any.argmax(axis=1)
        boxes[:, k, 2] = size - cols_any[:, ::-1].argmax(axis=1)
        boxes[:, k, 3] = size - rows_any[:, ::-1].argmax(axis=1)

    held = set(held_out)
    allowed = [(s, c) for s in cfg.shapes for c in cfg.colors if (s, c) not in held]
    records = []
    for n, raw in enumerate(scenes):
        for k, o in enumerate(raw):
            if areas[n, k] == 0:
                raise ConfigError(f"object {k} of {split} image {n} rendered no pixels; increase image_size "
                                  f"(now {size})")
            o["bbox"] = tuple(int(v) for v in boxes[n, k])
            o["area"] = int(areas[n, k])
        objs = [ShapeObject(**o) for o in raw]
        relations = []
        for i, j in itertools.permutations(range(len(objs)), 2):
            a, b = objs[i], objs[j]
            if a.col != b.col:
                relations.append((i, "left of" if a.col < b.col else "right of", j))
            if a.row != b.row:
                relations.append((i, "above" if a.row < b.row else "below", j))
        image_id = f"{split}_{n:06d}"
        vqa = []
        for q in range(cfg.num_questions):
            # Cycle through the types; fall back to the next type the scene supports (count always works).
            for offset in range(len(QUESTION_TYPES)):
                qtype = QUESTION_TYPES[(q + offset) % len(QUESTION_TYPES)]
                made = _question(qtype, objs, text_rng, cfg, allowed if split != "ood" else allowed + list(held))
                if made is not None:
                    break
            question, answer, qtype, ids, pool = made  # type: ignore[misc]
            vqa.append({"question_id": f"{image_id}_q{q}", "question": question, "answer": answer,
                        "answers": list(_answers(answer, pool, text_rng, cfg)), "qtype": qtype,
                        "object_ids": list(ids)})
        records.append({
            "image_id": image_id,
            "objects": [{**o, "center": list(o["center"]), "rgb": list(o["rgb"]), "bbox": list(o["bbox"])}
                        for o in raw],
            "relations": [list(r) for r in relations],
            "captions_source": list(_distinct(lambda r, o=objs: _source_caption(o, r), cfg.num_captions, text_rng)),
            "captions_target": list(_distinct(lambda r, o=objs: _target_caption(o, r), cfg.num_captions, text_rng)),
            "vqa": vqa,
            "labels": _labels(objs, cfg),
        })
    return ShapesSplit(split, images, seg, records, cfg)


# ------------------------------------------------------------------------------------------------- world
class ShapesWorld:
    """All splits of one generated world; index by split name (``world["train"]``) or attribute."""

    def __init__(self, config: ShapesWorldConfig, splits: dict[str, ShapesSplit]):
        self.config = config
        self.splits = splits
        self.held_out_pairs = config.resolved_held_out_pairs()

    def __getitem__(self, name: str) -> ShapesSplit:
        if name not in self.splits:
            raise InputError(f"unknown split {name!r}; valid: {', '.join(self.splits)}")
        return self.splits[name]

    train = property(lambda self: self["train"])
    val = property(lambda self: self["val"])
    test = property(lambda self: self["test"])
    ood = property(lambda self: self["ood"])

    def texts(self) -> Iterator[str]:
        """Every caption, question, answer and instruction of every split."""
        cfg = self.config
        yield from cfg.caption_instructions
        yield from cfg.vqa_instructions
        yield CAPTION_TASK_PROMPT
        yield " ".join(VQA_TASK_TEMPLATE.format(question="").split())
        for split in self.splits.values():
            for s in split.scenes:
                yield from s["captions_source"]
                yield from s["captions_target"]
                for q in s["vqa"]:
                    yield q["question"]
                    yield from q["answers"]

    def build_tokenizer(self, model_max_length: int = 128) -> WordTokenizer:
        """:func:`shapes_tokenizer` of this world's config."""
        return shapes_tokenizer(self.config, model_max_length)

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes ``world.json`` (config + metadata) and ``<split>.npz`` (images, segmentations) atomically."""
        final = Path(directory)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            meta = {"version": GENERATOR_VERSION, "config": self.config.to_dict(),
                    "splits": {name: split.scenes for name, split in self.splits.items()}}
            with open(tmp / "world.json", "w") as fh:
                json.dump(meta, fh)
            for name, split in self.splits.items():
                np.savez(tmp / f"{name}.npz", images=split.images, segmentations=split.segmentations)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ShapesWorld:
        """Reads a world written by :meth:`save`; raises :class:`InputError` if missing, stale or damaged."""
        d = Path(directory)
        if not (d / "world.json").is_file():
            raise InputError(f"no shapes world in {d} (world.json missing)")
        try:
            with open(d / "world.json") as fh:
                meta = json.load(fh)
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{d / 'world.json'} is unreadable: {e}") from None
        if meta.get("version") != GENERATOR_VERSION:
            raise InputError(f"{d} holds a shapes world of generator version {meta.get('version')}, "
                             f"this code writes version {GENERATOR_VERSION}; regenerate it")
        config = ShapesWorldConfig.from_dict(meta["config"])
        splits = {}
        for name, scenes in meta["splits"].items():
            try:
                with np.load(d / f"{name}.npz") as z:
                    images, segs = z["images"], z["segmentations"]
            except (OSError, KeyError, ValueError) as e:
                raise InputError(f"{d / (name + '.npz')} is missing or damaged: {e}") from None
            if len(images) != len(scenes) or len(segs) != len(scenes):
                raise InputError(f"{d}: split {name} has {len(images)} images for {len(scenes)} scenes")
            splits[name] = ShapesSplit(name, images, segs, scenes, config)
        return cls(config, splits)


def generate(config: ShapesWorldConfig | None = None) -> ShapesWorld:
    """Generates the world of ``config`` (default :class:`ShapesWorldConfig`)."""
    cfg = config or ShapesWorldConfig()
    held_out = cfg.resolved_held_out_pairs()
    if cfg.num_ood and not held_out:
        raise ConfigError("ShapesWorldConfig.num_ood > 0 needs held-out pairs (num_held_out_pairs >= 1)")
    sizes = {"train": cfg.num_train, "val": cfg.num_val, "test": cfg.num_test, "ood": cfg.num_ood}
    splits = {name: _generate_split(cfg, name, num, held_out) for name, num in sizes.items()}
    return ShapesWorld(cfg, splits)


def load_or_generate(config: ShapesWorldConfig | None = None,
                     cache_dir: str | os.PathLike | None = None) -> ShapesWorld:
    """The cached world of ``config`` under ``cache_dir/shapes_<fingerprint>``, generated and saved if absent.

    Example:
        >>> import tempfile
        >>> cfg = ShapesWorldConfig(num_train=4, num_val=1, num_test=1, num_ood=1)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     a = load_or_generate(cfg, d); b = load_or_generate(cfg, d)
        >>> bool((a.train.images == b.train.images).all())
        True
    """
    cfg = config or ShapesWorldConfig()
    if cache_dir is None:
        return generate(cfg)
    path = Path(cache_dir) / f"shapes_{cfg.fingerprint()}"
    if (path / "world.json").is_file():
        try:
            world = ShapesWorld.load(path)
            if world.config == cfg:
                return world
        except InputError:
            pass  # stale or damaged cache: regenerate below
    world = generate(cfg)
    try:
        world.save(path)
    except OSError:
        # Another process may have saved the same world at the same moment: use it if it is complete.
        try:
            return ShapesWorld.load(path)
        except InputError:
            raise InputError(f"cannot write the shapes world cache {path}") from None
    return world


def vocabulary_words(config: ShapesWorldConfig | None = None) -> list[str]:
    """Every word any template of the world can produce (so a tokenizer covers unseen scenes too)."""
    cfg = config or ShapesWorldConfig()
    texts: list[str] = []
    strip = lambda s: s.replace("{", " ").replace("}", " ")  # placeholders become throwaway words
    fields = {"objects", "bare", "count", "noun", "there_are", "located", "chain", "relation_sentences",
              "location_first", "d", "d2", "rel", "color", "shape", "plural", "a", "question"}
    for t in (*_SOURCE_TEMPLATES, *_TARGET_TEMPLATES, *itertools.chain(*_QUESTION_TEMPLATES.values()),
              VQA_TASK_TEMPLATE, CAPTION_TASK_PROMPT):
        texts.extend(w for w in strip(t).split() if w not in fields)
    texts += list(itertools.chain(*_LOCATION_PHRASES, *_RELATION_PHRASES.values(), CELL_NAMES))
    texts += list(SHAPES) + [_plural(s) for s in SHAPES] + list(COLORS) + list(SIZES) + list(_COUNT_WORDS)
    texts += [str(k) for k in range(10)] + list(_TARGET_NOUNS) + [n[:-1] for n in _TARGET_NOUNS]
    texts += ["a", "an", "the", "is", "there", "are", "and", "in", "total", "yes", "no", ",", ".", ":", "?"]
    texts += list(cfg.caption_instructions) + list(cfg.vqa_instructions)
    return texts


def shapes_tokenizer(config: ShapesWorldConfig | None = None, model_max_length: int = 128) -> WordTokenizer:
    """The word-level tokenizer of the shapes world: every word any template can produce, ids alphabetical.

    It depends only on the templates and the config's instructions, not on the generated scenes, so worlds
    of any seed or size share token ids (a base model pretrained on one world can be adapted on another).

    Example:
        >>> tok = shapes_tokenizer()
        >>> tok.decode(tok.encode("Two objects: a large red circle above a small blue square."))
        'two objects: a large red circle above a small blue square.'
    """
    return WordTokenizer.train([], extra_words=vocabulary_words(config), model_max_length=model_max_length)
