"""The shapes world itself: its config, per-image records, scene sampling, splits, labels, the
:class:`ShapesWorld` container, :func:`generate`, and saving/loading/caching a generated world.

Generation draws each split's scenes from its own random streams ``(seed, split)``, renders them with
:mod:`.rendering` and words them with :mod:`.language`; this module imports both, neither imports it.

Example:
    >>> world = generate(ShapesWorldConfig(num_train=4, num_val=1, num_test=1, num_ood=1))
    >>> len(world.train), world.train.labels("shape_presence").shape, world["ood"][0].image_id
    (4, (4, 5), 'ood_000000')
    >>> any((o.shape, o.color) in world.held_out_pairs for o in world.ood[0].objects)
    True
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

from vlpeft_jax.data.batching import CaptionExample, VQAExample
from vlpeft_jax.data.shapes.language import (
    CAPTION_INSTRUCTIONS,
    CAPTION_TASK_PROMPT,
    QUESTION_TYPES,
    VQA_INSTRUCTIONS,
    VQA_TASK_TEMPLATE,
    distinct_texts,
    human_answers,
    shapes_tokenizer,
    source_caption,
    target_caption,
    vqa_question,
)
from vlpeft_jax.data.shapes.objects import (
    CELL_NAMES,
    COLOR_RGB,
    COLORS,
    GRID,
    SHAPES,
    SIZES,
    ShapeObject,
    python_rng,
    randbelow,
    shuffled,
)
from vlpeft_jax.data.shapes.rendering import patch_masks, render_batch
from vlpeft_jax.data.tokenizer import WordTokenizer
from vlpeft_jax.errors import ConfigError, InputError

GENERATOR_VERSION = 2  # bump when generation changes, so cached worlds are regenerated
# 2: the ood split's existence questions draw held-out pairs in config order (a set's order changed with
#    PYTHONHASHSEED, so two processes generated different ood questions from one config)

# Object radius as a fraction of the cell size, by size.
_RADIUS_FRACTION = {"small": 0.25, "large": 0.40}
SPLITS = ("train", "val", "test", "ood")

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
# Patch-level (dense) labels: name -> class names; class 0 is the background. A patch's class is the attribute of the
# object covering most of its pixels when that object covers at least PATCH_MIN_FRACTION of them, else background.
PATCH_LABEL_CLASSES: dict[str, tuple[str, ...]] = {
    "patch_shape": ("background", *SHAPES),
    "patch_color": ("background", *COLORS),
}
PATCH_MIN_FRACTION = 0.1


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

    def patch_labels(self, name: str, patch_size: int, min_fraction: float = PATCH_MIN_FRACTION) -> np.ndarray:
        """Patch-level label ``name`` (:data:`PATCH_LABEL_CLASSES`) for every example: int32 ``[N, (H/p)·(W/p)]``
        class ids in the row-major patch order a ViT uses.

        A patch takes the class of the object covering most of its pixels if that object covers at least
        ``min_fraction`` of them; otherwise it is background (class 0).

        Example:
            >>> w = generate(ShapesWorldConfig(num_train=2, num_val=1, num_test=1, num_ood=1, image_size=32))
            >>> y = w.train.patch_labels("patch_shape", 16)
            >>> y.shape, int(y.min()) >= 0, int(y.max()) <= len(SHAPES)
            ((2, 4), True, True)
        """
        if name not in PATCH_LABEL_CLASSES:
            raise InputError(f"unknown patch label {name!r}; valid: {', '.join(PATCH_LABEL_CLASSES)}")
        attribute = "shape" if name == "patch_shape" else "color"
        classes = PATCH_LABEL_CLASSES[name]
        out = []
        for seg, scene in zip(self.segmentations, self.scenes, strict=True):
            objs = scene["objects"]
            h, w = seg.shape
            if patch_size < 1 or h % patch_size or w % patch_size:
                raise InputError(f"patch_size={patch_size} must divide the image size {h}x{w}")
            gh, gw = h // patch_size, w // patch_size
            blocks = seg.reshape(gh, patch_size, gw, patch_size).transpose(0, 2, 1, 3).reshape(gh * gw, -1)
            counts = np.stack([(blocks == k + 1).mean(axis=1) for k in range(len(objs))]) if objs else None
            label = np.zeros(gh * gw, np.int32)
            if counts is not None:
                best = counts.argmax(axis=0)
                ids = np.array([classes.index(o[attribute]) for o in objs], np.int32)
                label = np.where(counts.max(axis=0) >= min_fraction, ids[best], 0).astype(np.int32)
            out.append(label)
        return np.stack(out)

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
        n = cfg.min_objects + randbelow(rng, cfg.max_objects - cfg.min_objects + 1)
        cells = sorted(shuffled(rng, GRID * GRID)[:n])  # reading order
        pairs = [allowed[randbelow(rng, len(allowed))] for _ in range(n)]
        if split == "ood":
            # at least one held-out object; the rest drawn from all pairs
            everything = allowed + list(held_out)
            pairs = [everything[randbelow(rng, len(everything))] for _ in range(n)]
            pairs[randbelow(rng, n)] = held_out[randbelow(rng, len(held_out))]
        objs = []
        for c, (shape, color) in zip(cells, pairs, strict=True):
            size = SIZES[randbelow(rng, 2)]
            radius = _RADIUS_FRACTION[size] * cell
            slack = max(0.0, cell / 2 - radius - 1.0)
            row, col = divmod(int(c), GRID)
            cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
            cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
            j = cfg.color_jitter
            rgb = tuple(min(255, max(0, v + randbelow(rng, 2 * j + 1) - j)) for v in COLOR_RGB[color])
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
    scene_rng = python_rng(cfg.seed, code, 0)
    text_rng = python_rng(cfg.seed, code, 1)
    noise_rng = np.random.default_rng([cfg.seed, code, 2])
    scenes = _sample_scenes(cfg, split, num, held_out, scene_rng)
    rows = [(n, k, o["center"][0], o["center"][1], o["radius"], SHAPES.index(o["shape"]), o["rgb"])
            for n, objs in enumerate(scenes) for k, o in enumerate(objs)]
    size = cfg.image_size
    # Luminance noise (one channel, added to all three): a third of the cost of per-channel noise.
    noise = (np.round(noise_rng.standard_normal((num, size, size, 1), dtype=np.float32) * np.float32(cfg.noise_std))
             .astype(np.int16) if cfg.noise_std > 0 else None)
    images, seg = render_batch(num, size, rows, noise)

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
                made = vqa_question(qtype, objs, text_rng, colors=cfg.colors, shapes=cfg.shapes,
                                    max_objects=cfg.max_objects,
                                    allowed_pairs=allowed if split != "ood" else allowed + list(held_out))
                if made is not None:
                    break
            question, answer, qtype, ids, pool = made  # type: ignore[misc]
            vqa.append({"question_id": f"{image_id}_q{q}", "question": question, "answer": answer,
                        "answers": list(human_answers(answer, pool, text_rng, num_answers=cfg.num_answers,
                                                      answer_noise=cfg.answer_noise)),
                        "qtype": qtype,
                        "object_ids": list(ids)})
        records.append({
            "image_id": image_id,
            "objects": [{**o, "center": list(o["center"]), "rgb": list(o["rgb"]), "bbox": list(o["bbox"])}
                        for o in raw],
            "relations": [list(r) for r in relations],
            "captions_source": list(distinct_texts(lambda r, o=objs: source_caption(o, r), cfg.num_captions,
                                                   text_rng)),
            "captions_target": list(distinct_texts(lambda r, o=objs: target_caption(o, r), cfg.num_captions,
                                                   text_rng)),
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
