"""Referring-expression comprehension with commonsense facts on the shapes world (CK-Transformer's data).

CK-Transformer (thesis ``seeds/004_21d0d480fe4006f4.txt`` ch. 3; spec ``shared/specs/ckt.md``) is trained on
KB-Ref: every expression needs at least one fact of a knowledge base (category -> facts) to pick its target
among the ground-truth candidate boxes of the image (spec §0, §5). This module is the small faithful stand-in
of spec §11 items 1-4, plus a loader for local files in KB-Ref's own format:

* :class:`Fact` / :class:`FactBase`: a key-value knowledge base, category -> facts. Generated facts give a
  category an invented *non-visual* property from :data:`PROPERTIES` ("a red circle is something you can
  eat") or are distractors that no expression uses ("a red circle was drawn by hand"). Variants (§11.2):
  ``"kbref"`` has 30 (colour, shape) categories with unconditional facts. ``"contextual"`` has one category per
  shape, and some facts hold only in a visual context, the object's colour (``Fact.condition``): "a red cross
  marks a hospital" vs "a green cross marks a pharmacy". ``"conventional"`` is a purely visual/spatial REC
  split (Table 3.3 analogue) over the ``"kbref"`` fact base.
* :class:`RefExpression`: the structure of an expression (property and visual/spatial qualifiers), its
  wording (:meth:`RefExpression.text`), and the solver :func:`candidates_matching`, which returns the objects
  of a scene that satisfy it given the fact base.
* :func:`build_refexp`: seeded splits of :class:`RefExample` (the candidates are all objects of a scene with
  their ground-truth boxes, spec B11). A fact-requiring expression names a property that the target has
  through one of its facts, plus qualifiers (colour, shape, size, position) only as needed. It never names
  both the target's colour and shape. The solver must find exactly the target, and the qualifiers alone
  (property removed) must leave more than one candidate (the KB-Ref rule, spec §11.4). The ground-truth
  fact id is stored, as KB-Ref's ``expression.json`` does.
* :func:`load_kbref`: KB-Ref-format local files into the same records; :func:`write_kbref` writes
  generated splits in that format (conditions of contextual facts are not part of it).
* :func:`geometry`: the 7-d box feature of App. Eq. (1), ordered and normalised as spec B15 proposes.

Example:
    >>> data = build_refexp(RefExpConfig(num_train=6, num_val=2, num_test=2))
    >>> ex = data["train"][0]
    >>> ex.boxes.shape[1], len(ex.categories) == ex.boxes.shape[0], ex.fact_id is not None
    (4, True, True)
    >>> fact = data.fact_base.by_id(ex.fact_id)
    >>> fact.category == ex.categories[ex.target], fact.prop == ex.meta["struct"]["prop"]
    (True, True)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import random
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlpeft_jax.data.batching import ON_ERROR_CHOICES, SkipReport, read_json
from vlpeft_jax.data.shapes.objects import COLORS, GRID, SHAPES, python_rng, randbelow, shuffled
from vlpeft_jax.data.shapes.world import ShapesWorld, ShapesWorldConfig, generate
from vlpeft_jax.errors import ConfigError, InputError

VARIANTS = ("kbref", "contextual", "conventional")
SPLIT_NAMES = ("train", "val", "test")

# Invented non-visual properties (spec §11.3): key -> (verb phrase of a fact, clause of an expression).
PROPERTIES: dict[str, tuple[str, str]] = {
    "edible": ("is something you can eat", "you can eat"),
    "floats": ("floats on water", "that floats on water"),
    "magnetic": ("is magnetic", "that is magnetic"),
    "sacred": ("is sacred", "that is sacred"),
    "cutting": ("is used for cutting", "used for cutting"),
    "kitchen": ("is found in kitchens", "found in kitchens"),
    "heavy": ("is very heavy", "that is very heavy"),
    "fragile": ("is fragile", "that is fragile"),
    "poisonous": ("is poisonous", "that is poisonous"),
    "music": ("makes music", "that makes music"),
    "writing": ("is used for writing", "used for writing"),
    "sleep": ("helps you sleep", "that helps you sleep"),
    "luck": ("brings good luck", "that brings good luck"),
    "cold": ("keeps food cold", "that keeps food cold"),
    "hospital": ("marks a hospital", "that marks a hospital"),
    "pharmacy": ("marks a pharmacy", "that marks a pharmacy"),
    "school": ("is found in schools", "found in schools"),
    "sweet": ("tastes sweet", "that tastes sweet"),
}
# True statements that no expression uses (spec §11.3 "distractor facts").
DISTRACTORS = (
    "was drawn by hand", "has a name", "was first seen in spring", "appears in old stories",
    "is mentioned in a song", "was painted last year", "is known in many countries",
    "has been studied by scientists", "is older than the city", "was once a gift",
)
FACT_TEMPLATES = ("a {cat} {vp}", "any {cat} {vp}")

# Position words (spec §7 fine-grained analysis: left/right/top/bottom/middle; no front/behind in 2-D).
POSITIONS = ("left", "right", "top", "bottom", "middle", "top left", "top right", "bottom left", "bottom right")
_POSITION_PHRASES = {
    "left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
    "middle": "in the middle", "top left": "at the top left", "top right": "at the top right",
    "bottom left": "at the bottom left", "bottom right": "at the bottom right",
}
_QUALIFIER_FIELDS = ("size", "color", "shape", "position")


def _get(obj: Any, key: str) -> Any:
    """An object's attribute, for scene dicts and :class:`ShapeObject` records alike."""
    return obj[key] if isinstance(obj, Mapping) else getattr(obj, key)


def position_holds(position: str, row: int, col: int) -> bool:
    """Whether the grid cell (row, col) lies at ``position`` (one of :data:`POSITIONS`).

    Example:
        >>> position_holds("top left", 0, 0), position_holds("left", 1, 0), position_holds("middle", 0, 1)
        (True, True, False)
    """
    last = GRID - 1
    tests = {"left": col == 0, "right": col == last, "top": row == 0, "bottom": row == last,
             "middle": row == last // 2 and col == last // 2 and GRID % 2 == 1}
    if position in tests:
        return tests[position]
    if position in POSITIONS:
        vertical, horizontal = position.split()
        return tests[vertical] and tests[horizontal]
    raise InputError(f"unknown position {position!r}; valid: {', '.join(POSITIONS)}")


# ------------------------------------------------------------------------------------------ fact base
@dataclasses.dataclass(frozen=True)
class Fact:
    """One knowledge-base sentence about a category.

    ``prop`` is the property key it assigns (None for a distractor or a loaded KB-Ref fact); ``condition``
    is the visual context under which it holds (the object's colour in the ``"contextual"`` variant, spec
    §11.2b), None when it always holds.

    Example:
        >>> Fact("cross#0", "cross", "a red cross marks a hospital", "hospital", "red").applies_to("red")
        True
    """

    fact_id: str
    category: str
    text: str
    prop: str | None = None
    condition: str | None = None

    def applies_to(self, context: str | None) -> bool:
        """Whether the fact holds for an object whose visual context (colour) is ``context``."""
        return self.condition is None or self.condition == context


class FactBase:
    """A key-value knowledge base: category -> facts (spec §2.1, "fetch all facts of its category").

    ``category_fields`` name the object attributes whose values, joined by spaces, form an object's category
    (``("color", "shape")`` -> ``"red circle"``); ``condition_field`` is the attribute a fact's ``condition``
    is compared with.

    Example:
        >>> kb = FactBase([Fact("c0", "circle", "a circle is sacred", "sacred"),
        ...                Fact("c1", "circle", "a red circle floats on water", "floats", "red")],
        ...               category_fields=("shape",))
        >>> kb.categories, [f.fact_id for f in kb.applicable({"shape": "circle", "color": "blue"})]
        (('circle',), ['c0'])
        >>> FactBase.from_json(kb.to_json()).by_id("c1").condition
        'red'
    """

    def __init__(self, facts: Sequence[Fact], category_fields: Sequence[str] = ("category",),
                 condition_field: str = "color"):
        self.facts: tuple[Fact, ...] = tuple(facts)
        self.category_fields = tuple(category_fields)
        self.condition_field = condition_field
        self._by_id: dict[str, Fact] = {}
        self._by_category: dict[str, list[Fact]] = {}
        for f in self.facts:
            if f.fact_id in self._by_id:
                raise InputError(f"duplicate fact id {f.fact_id!r} in the fact base")
            self._by_id[f.fact_id] = f
            self._by_category.setdefault(f.category, []).append(f)

    def __len__(self) -> int:
        return len(self.facts)

    @property
    def categories(self) -> tuple[str, ...]:
        """The categories in first-seen order."""
        return tuple(self._by_category)

    def _unknown(self, category: str) -> InputError:
        shown = ", ".join(repr(c) for c in self.categories[:8])
        more = f" (+{len(self.categories) - 8} more)" if len(self.categories) > 8 else ""
        return InputError(f"category {category!r} is not in the fact base; its {len(self.categories)} "
                          f"categories are {shown}{more}")

    def of_category(self, category: str) -> list[Fact]:
        """Every fact of ``category``; an unknown category raises :class:`InputError`."""
        if category not in self._by_category:
            raise self._unknown(category)
        return list(self._by_category[category])

    def by_id(self, fact_id: str) -> Fact:
        """The fact with id ``fact_id``; an unknown id raises :class:`InputError`."""
        if fact_id not in self._by_id:
            raise InputError(f"fact id {fact_id!r} is not in the fact base ({len(self.facts)} facts)")
        return self._by_id[fact_id]

    def category_of(self, obj: Any) -> str:
        """The category of a scene object (a dict or :class:`ShapeObject`), from ``category_fields``."""
        return " ".join(str(_get(obj, key)) for key in self.category_fields)

    def applicable(self, obj: Any) -> list[Fact]:
        """The facts of ``obj``'s category whose condition its visual context meets."""
        facts = self.of_category(self.category_of(obj))
        if not any(f.condition is not None for f in facts):
            return facts
        context = _get(obj, self.condition_field)
        return [f for f in facts if f.applies_to(context)]

    def properties_of(self, obj: Any) -> set[str]:
        """The property keys ``obj`` has through its applicable facts."""
        return {f.prop for f in self.applicable(obj) if f.prop is not None}

    def texts(self) -> list[str]:
        """Every fact sentence (for a tokenizer vocabulary)."""
        return [f.text for f in self.facts]

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict that :meth:`from_json` reads back."""
        return {"category_fields": list(self.category_fields), "condition_field": self.condition_field,
                "facts": [dataclasses.asdict(f) for f in self.facts]}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any] | str) -> FactBase:
        """Reads :meth:`to_json`'s dict (or its JSON text); a malformed record raises :class:`InputError`."""
        if isinstance(obj, str):
            try:
                obj = json.loads(obj)
            except json.JSONDecodeError as e:
                raise InputError(f"fact base JSON is malformed: {e}") from None
        if not isinstance(obj, Mapping) or not isinstance(obj.get("facts"), list):
            raise InputError("a fact base JSON needs a 'facts' list (as written by FactBase.to_json)")
        facts = []
        for i, rec in enumerate(obj["facts"]):
            try:
                facts.append(Fact(**rec))
            except TypeError as e:
                raise InputError(f"fact {i} of the fact base JSON is malformed ({rec!r}): {e}") from None
        return cls(facts, obj.get("category_fields", ("category",)), obj.get("condition_field", "color"))


def build_fact_base(variant: str = "kbref", seed: int = 0, *, facts_per_category: int = 3,
                    distractors_per_category: int = 3, context_group_size: int = 2,
                    shapes: Sequence[str] = SHAPES, colors: Sequence[str] = COLORS) -> FactBase:
    """The seeded fact base of a variant (spec §11.2-3).

    ``"kbref"``/``"conventional"``: one category per (colour, shape), ``facts_per_category`` facts giving
    distinct properties, plus ``distractors_per_category`` distractors. ``"contextual"``: one category per
    shape, ``facts_per_category`` unconditional property facts, then the colours in random groups of
    ``context_group_size``: every colour of a group gets a fact with the group's own property and the colour
    as its condition ("a red cross marks a hospital"), plus the distractors. With groups of two, two facts of a
    category share a property and differ only in their condition, so the expression alone cannot tell which one
    is the ground truth: the image must.

    Example:
        >>> kb = build_fact_base("contextual", facts_per_category=1, distractors_per_category=1)
        >>> kb.categories == SHAPES, len(kb.of_category("cross"))   # 1 + 6 conditional + 1 distractor
        (True, 8)
        >>> len(build_fact_base("kbref").categories)
        30
    """
    if variant not in VARIANTS:
        raise ConfigError(f"fact base variant {variant!r} is unknown; valid: {', '.join(VARIANTS)}")
    props = list(PROPERTIES)
    rng = python_rng(seed, 23)
    facts: list[Fact] = []
    counts: dict[str, int] = {}

    def add(category: str, text: str, prop: str | None, condition: str | None = None) -> None:
        counts[category] = counts.get(category, 0) + 1
        facts.append(Fact(f"{category.replace(' ', '_')}#{counts[category] - 1}", category, text, prop, condition))

    def template(cat: str, vp: str) -> str:
        return FACT_TEMPLATES[randbelow(rng, len(FACT_TEMPLATES))].format(cat=cat, vp=vp)

    if variant == "contextual":
        for shape in shapes:
            order = [props[i] for i in shuffled(rng, len(props))]
            for p in order[:facts_per_category]:
                add(shape, template(shape, PROPERTIES[p][0]), p)
            colour_order = [colors[i] for i in shuffled(rng, len(colors))]
            groups = [colour_order[i:i + context_group_size] for i in range(0, len(colors), context_group_size)]
            for g, group in enumerate(groups):
                p = order[facts_per_category + g]
                for colour in group:
                    add(shape, f"a {colour} {shape} {PROPERTIES[p][0]}", p, colour)
            for i in shuffled(rng, len(DISTRACTORS))[:distractors_per_category]:
                add(shape, template(shape, DISTRACTORS[i]), None)
        return FactBase(facts, ("shape",), "color")
    for shape in shapes:
        for colour in colors:
            cat = f"{colour} {shape}"
            for i in shuffled(rng, len(props))[:facts_per_category]:
                add(cat, template(cat, PROPERTIES[props[i]][0]), props[i])
            for i in shuffled(rng, len(DISTRACTORS))[:distractors_per_category]:
                add(cat, template(cat, DISTRACTORS[i]), None)
    return FactBase(facts, ("color", "shape"), "color")


# ----------------------------------------------------------------------------- expressions and solver
@dataclasses.dataclass(frozen=True)
class RefExpression:
    """The structure of a referring expression: a property (None: purely visual) and visual qualifiers.

    Example:
        >>> RefExpression(prop="floats", position="left").text()
        'the thing that floats on water on the left'
        >>> RefExpression(color="red", shape="circle", position="top left").text()
        'the red circle at the top left'
    """

    prop: str | None = None
    color: str | None = None
    shape: str | None = None
    size: str | None = None
    position: str | None = None

    def __post_init__(self) -> None:
        if self.prop is not None and self.prop not in PROPERTIES:
            raise InputError(f"unknown property {self.prop!r}; valid: {', '.join(PROPERTIES)}")
        if self.position is not None and self.position not in POSITIONS:
            raise InputError(f"unknown position {self.position!r}; valid: {', '.join(POSITIONS)}")

    def without_property(self) -> RefExpression:
        """The same qualifiers with the property removed (what the expression says without a fact)."""
        return dataclasses.replace(self, prop=None)

    @property
    def num_qualifiers(self) -> int:
        return sum(getattr(self, k) is not None for k in _QUALIFIER_FIELDS)

    def text(self, prefix: str = "the") -> str:
        """The wording: ``<prefix> [size] [colour] <shape|thing> [property clause] [position phrase]``."""
        words = [prefix, self.size, self.color, self.shape or "thing",
                 PROPERTIES[self.prop][1] if self.prop else None,
                 _POSITION_PHRASES[self.position] if self.position else None]
        return " ".join(w for w in words if w)

    def to_dict(self) -> dict[str, str | None]:
        return dataclasses.asdict(self)


def candidates_matching(expr: RefExpression, scene_objects: Sequence[Any],
                        fact_base: FactBase | None = None) -> list[int]:
    """The solver: indices of the scene objects that satisfy every part of ``expr``.

    An object satisfies the property when one of its category's facts, applicable in its visual context,
    assigns that property (:meth:`FactBase.properties_of`). ``scene_objects`` are scene dicts (with shape,
    color, size, row, col) or :class:`ShapeObject` records.

    Example:
        >>> kb = FactBase([Fact("r", "red circle", "a red circle floats on water", "floats"),
        ...                Fact("b", "blue circle", "a blue circle is sacred", "sacred")], ("color", "shape"))
        >>> objs = [dict(shape="circle", color="red", size="small", row=0, col=0),
        ...         dict(shape="circle", color="blue", size="large", row=0, col=2)]
        >>> candidates_matching(RefExpression(prop="floats"), objs, kb), candidates_matching(RefExpression(), objs)
        ([0], [0, 1])
    """
    if expr.prop is not None and fact_base is None:
        raise InputError(f"expression {expr.text()!r} names a property; the solver needs a fact_base")
    out = []
    for i, o in enumerate(scene_objects):
        if expr.color is not None and _get(o, "color") != expr.color:
            continue
        if expr.shape is not None and _get(o, "shape") != expr.shape:
            continue
        if expr.size is not None and _get(o, "size") != expr.size:
            continue
        if expr.position is not None and not position_holds(expr.position, _get(o, "row"), _get(o, "col")):
            continue
        if expr.prop is not None and expr.prop not in fact_base.properties_of(o):  # type: ignore[union-attr]
            continue
        out.append(i)
    return out


def _qualifier_options(obj: Any) -> list[tuple[str, str]]:
    """Every (field, value) qualifier true of ``obj``."""
    opts = [("size", _get(obj, "size")), ("color", _get(obj, "color")), ("shape", _get(obj, "shape"))]
    opts += [("position", p) for p in POSITIONS if position_holds(p, _get(obj, "row"), _get(obj, "col"))]
    return opts


def _minimal_expression(target: int, objs: Sequence[Any], fact_base: FactBase, prop: str | None,
                        max_qualifiers: int, rng: random.Random, require: str | None = None) -> RefExpression | None:
    """A random expression with the fewest qualifiers that identifies ``target`` (None if there is none).

    With a property, the qualifiers never name both colour and shape, and without the property they must
    leave more than one candidate (the expression needs the fact, spec §11.4). ``require`` names a qualifier
    field every expression must use (the conventional split's head noun, ``"shape"``).
    """
    options = _qualifier_options(objs[target])
    for k in range(0, max_qualifiers + 1):
        found = []
        for combo in itertools.combinations(options, k):
            fields = [f for f, _ in combo]
            if len(set(fields)) < k or (prop is not None and "color" in fields and "shape" in fields):
                continue
            if require is not None and require not in fields:
                continue
            expr = RefExpression(prop=prop, **dict(combo))
            if candidates_matching(expr, objs, fact_base) != [target]:
                continue
            if prop is not None and len(candidates_matching(expr.without_property(), objs, fact_base)) < 2:
                continue
            found.append(expr)
        if found:
            return found[randbelow(rng, len(found))]
    return None


# ------------------------------------------------------------------------------------------- records
@dataclasses.dataclass(frozen=True)
class RefExample:
    """One referring expression with its image and candidates.

    ``boxes`` are float32 ``[n, 4]`` ``(x1, y1, x2, y2)`` pixels of all candidates, ``categories`` their
    categories (the fact-base keys), ``target`` the index of the referred candidate, ``fact_id`` the
    ground-truth fact (None for a conventional expression or a fact missing from the loaded KB). ``image`` is
    ``uint8 [H, W, 3]`` for generated data; loaded KB-Ref data gives ``image_path`` instead.
    """

    expr_id: str
    image_id: str
    image: np.ndarray | None = dataclasses.field(repr=False, compare=False)
    expression: str
    boxes: np.ndarray = dataclasses.field(repr=False, compare=False)
    categories: tuple[str, ...]
    target: int
    fact_id: str | None = None
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)
    image_path: str | None = None

    @property
    def num_candidates(self) -> int:
        return len(self.categories)

    def pixels(self) -> np.ndarray:
        """The ``uint8 [H, W, 3]`` image: ``image`` when held, else decoded from ``image_path`` (loaded KB-Ref)."""
        if self.image is not None:
            return np.asarray(self.image)
        if self.image_path is None:
            raise InputError(f"expression {self.expr_id!r} has neither an image nor an image_path")
        from vlpeft_jax.data.images import decode_image

        return decode_image(self.image_path)

    def box_geometry(self) -> np.ndarray:
        """:func:`geometry` of the candidate boxes, with the image size from ``image`` or ``meta`` width/height."""
        if self.image is not None:
            height, width = self.image.shape[:2]
        elif "width" in self.meta and "height" in self.meta:
            width, height = self.meta["width"], self.meta["height"]
        else:
            raise InputError(f"expression {self.expr_id!r}: no image and no meta width/height to normalise its "
                             "boxes (KB-Ref's image.json gives them)")
        return geometry(self.boxes, float(width), float(height))


@dataclasses.dataclass(frozen=True)
class RefExpConfig:
    """Everything that determines a generated referring-expression dataset (spec §11.1-4).

    Attributes:
        variant: ``"kbref"`` (fact-requiring, (colour, shape) categories), ``"contextual"`` (fact-requiring,
            shape categories with colour-conditional facts; the ground-truth fact is always a conditional
            one) or ``"conventional"`` (visual/spatial expressions over the kbref fact base).
        seed: seeds the world, the fact base and the expressions.
        num_train, num_val, num_test: expressions per split.
        expressions_per_image: at most this many expressions (distinct targets) per scene.
        min_objects, max_objects: candidates per scene (KB-Ref has 10; spec §11.1 uses 4-9).
        image_size: the shapes world's image side.
        facts_per_category: unconditional property facts per category.
        distractors_per_category: distractor facts per category (from :data:`DISTRACTORS`).
        context_group_size: ``"contextual"``: colours that share one conditional property per shape.
        max_qualifiers: the most visual/spatial qualifiers an expression may carry (a conventional
            expression's shape noun counts).
        conventional_names_shape: conventional expressions always name the target's shape as their head noun
            ("the red circle at the top left", as RefCOCO expressions name the object), else "thing" is allowed.
    """

    variant: str = "kbref"
    seed: int = 0
    num_train: int = 200
    num_val: int = 50
    num_test: int = 50
    expressions_per_image: int = 2
    min_objects: int = 4
    max_objects: int = 9
    image_size: int = 64
    facts_per_category: int = 3
    distractors_per_category: int = 3
    context_group_size: int = 2
    max_qualifiers: int = 3
    conventional_names_shape: bool = True

    def __post_init__(self) -> None:
        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(f"RefExpConfig.{key}={getattr(self, key)!r}: {msg}")

        if self.variant not in VARIANTS:
            raise bad("variant", f"valid: {', '.join(VARIANTS)}")
        for key in ("num_train", "num_val", "num_test"):
            if getattr(self, key) < 0:
                raise bad(key, "must be >= 0")
        if self.expressions_per_image < 1:
            raise bad("expressions_per_image", "must be >= 1")
        if not 2 <= self.min_objects <= self.max_objects <= GRID * GRID:
            raise bad("min_objects", f"need 2 <= min_objects <= max_objects ({self.max_objects}) <= {GRID * GRID}")
        if self.image_size < 24:
            raise bad("image_size", "must be >= 24")
        if self.variant == "kbref" and self.facts_per_category < 1:
            raise bad("facts_per_category", "the kbref variant needs >= 1 property fact per category")
        if not 0 <= self.facts_per_category <= len(PROPERTIES):
            raise bad("facts_per_category", f"must be in [0, {len(PROPERTIES)}] (the property pool)")
        if not 0 <= self.distractors_per_category <= len(DISTRACTORS):
            raise bad("distractors_per_category", f"must be in [0, {len(DISTRACTORS)}]")
        if not 1 <= self.context_group_size <= len(COLORS):
            raise bad("context_group_size", f"must be in [1, {len(COLORS)}]")
        groups = math.ceil(len(COLORS) / self.context_group_size)
        if self.variant == "contextual" and self.facts_per_category + groups > len(PROPERTIES):
            raise bad("facts_per_category", f"plus {groups} conditional properties exceeds the {len(PROPERTIES)} "
                                            "properties of the pool")
        if not 1 <= self.max_qualifiers <= len(_QUALIFIER_FIELDS):
            raise bad("max_qualifiers", f"must be in [1, {len(_QUALIFIER_FIELDS)}]")

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}

    def world_config(self) -> ShapesWorldConfig:
        """The shapes world the expressions are drawn on: enough scenes per split, no held-out pairs."""
        scenes = {k: 2 * math.ceil(v / self.expressions_per_image) + 8 for k, v in self.split_sizes().items()}
        return ShapesWorldConfig(seed=self.seed, image_size=self.image_size, num_train=scenes["train"],
                                 num_val=scenes["val"], num_test=scenes["test"], num_ood=0,
                                 min_objects=self.min_objects, max_objects=self.max_objects, num_captions=1,
                                 num_questions=0, num_held_out_pairs=0)


@dataclasses.dataclass
class RefExpData:
    """What :func:`build_refexp` returns: split name -> examples, the fact base, the config and the world."""

    splits: dict[str, list[RefExample]]
    fact_base: FactBase
    config: RefExpConfig | None = None
    world: ShapesWorld | None = None

    def __getitem__(self, split: str) -> list[RefExample]:
        if split not in self.splits:
            raise InputError(f"unknown split {split!r}; valid: {', '.join(self.splits)}")
        return self.splits[split]

    def texts(self) -> Iterator[str]:
        """Every expression and fact sentence (for a tokenizer vocabulary)."""
        for examples in self.splits.values():
            for ex in examples:
                yield ex.expression
        yield from self.fact_base.texts()


_PREFIXES = ("the", "the", "find the", "give me the")


def _split_examples(cfg: RefExpConfig, split: str, world_split: Any, fact_base: FactBase,
                    num: int) -> list[RefExample]:
    rng = python_rng(cfg.seed, 41, SPLIT_NAMES.index(split))
    out: list[RefExample] = []
    for index, scene in enumerate(world_split.scenes):
        if len(out) >= num:
            break
        objs = scene["objects"]
        made = 0
        for target in shuffled(rng, len(objs)):
            if made >= cfg.expressions_per_image or len(out) >= num:
                break
            expr = None
            fact = None
            if cfg.variant == "conventional":
                expr = _minimal_expression(target, objs, fact_base, None, cfg.max_qualifiers, rng,
                                           "shape" if cfg.conventional_names_shape else None)
            else:
                usable = [f for f in fact_base.applicable(objs[target]) if f.prop is not None
                          and (cfg.variant == "kbref" or f.condition is not None)]
                for k in shuffled(rng, len(usable)):
                    expr = _minimal_expression(target, objs, fact_base, usable[k].prop, cfg.max_qualifiers, rng)
                    if expr is not None:
                        fact = usable[k]
                        break
            if expr is None:
                continue  # no expression identifies this target: try another one
            made += 1
            image = world_split.images[index]
            h, w = int(image.shape[0]), int(image.shape[1])
            out.append(RefExample(
                expr_id=f"{scene['image_id']}_{target}", image_id=scene["image_id"], image=image,
                expression=expr.text(_PREFIXES[randbelow(rng, len(_PREFIXES))]),
                boxes=np.array([o["bbox"] for o in objs], np.float32).reshape(len(objs), 4),
                categories=tuple(fact_base.category_of(o) for o in objs), target=target,
                fact_id=fact.fact_id if fact is not None else None,
                meta={"split": split, "scene_index": index, "variant": cfg.variant, "struct": expr.to_dict(),
                      "width": w, "height": h,
                      "objects": [{k: o[k] for k in ("shape", "color", "size", "row", "col", "area")}
                                  for o in objs]}))
    if len(out) < num:
        raise ConfigError(f"split {split!r}: only {len(out)} of {num} expressions could be made from "
                          f"{len(world_split.scenes)} scenes; give a world with more scenes or lower num_{split}")
    return out


def build_refexp(config: RefExpConfig | None = None, world: ShapesWorld | None = None) -> RefExpData:
    """The seeded referring-expression splits of ``config`` (spec §11.1-4), on ``world`` or a fresh one.

    Each split walks its scenes in order and, per scene, up to ``expressions_per_image`` targets in a random
    order. For a target it tries the properties it has through its facts in a random order (``"contextual"``:
    only conditional facts whose condition matches the target's colour). For each it looks for the fewest
    qualifiers that make the solver's answer exactly the target while the qualifiers alone leave > 1
    candidates. Targets with no such expression are skipped. ``world`` (e.g. a cached one) must have
    train/val/test splits with enough scenes; its shapes and colours define the categories.

    Example:
        >>> d = build_refexp(RefExpConfig(variant="contextual", num_train=4, num_val=0, num_test=0))
        >>> ex = d["train"][0]
        >>> fact = d.fact_base.by_id(ex.fact_id)
        >>> fact.condition == ex.meta["objects"][ex.target]["color"], ex.categories[ex.target] in SHAPES
        (True, True)
    """
    cfg = config or RefExpConfig()
    if world is None:
        world = generate(cfg.world_config())
    wcfg = world.config
    fact_base = build_fact_base(
        "kbref" if cfg.variant == "conventional" else cfg.variant, cfg.seed,
        facts_per_category=cfg.facts_per_category, distractors_per_category=cfg.distractors_per_category,
        context_group_size=cfg.context_group_size, shapes=wcfg.shapes, colors=wcfg.colors)
    splits = {name: _split_examples(cfg, name, world[name], fact_base, num)
              for name, num in cfg.split_sizes().items()}
    return RefExpData(splits, fact_base, cfg, world)


# ------------------------------------------------------------------------------------------ geometry
def geometry(boxes: np.ndarray | Sequence[Sequence[float]], width: float, height: float) -> np.ndarray:
    """The 7-d geometry feature of App. Eq. (1): ``[x1/W, y1/H, x2/W, y2/H, w/W, h/H, w·h/(W·H)]`` (spec B15).

    ``boxes`` are ``[n, 4]`` ``(x1, y1, x2, y2)`` pixels; returns float32 ``[n, 7]``.

    Example:
        >>> geometry([[0, 0, 64, 32]], 64, 64).tolist()
        [[0.0, 0.0, 1.0, 0.5, 1.0, 0.5, 0.5]]
    """
    b = np.asarray(boxes, np.float64)
    if b.ndim != 2 or b.shape[1] != 4:
        raise InputError(f"boxes must be [n, 4] (x1, y1, x2, y2); got shape {b.shape}")
    if not (width > 0 and height > 0):
        raise InputError(f"image width and height must be > 0; got {width}x{height}")
    w = b[:, 2] - b[:, 0]
    h = b[:, 3] - b[:, 1]
    if (w < 0).any() or (h < 0).any():
        raise InputError("boxes need x2 >= x1 and y2 >= y1")
    feats = np.stack([b[:, 0] / width, b[:, 1] / height, b[:, 2] / width, b[:, 3] / height,
                      w / width, h / height, (w * h) / (width * height)], axis=1)
    return feats.astype(np.float32)


# ------------------------------------------------------------------------------------------ detection
def box_iou(a: np.ndarray | Sequence[Sequence[float]], b: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Intersection over union of every box of ``a [n, 4]`` with every box of ``b [m, 4]`` (``(x1, y1, x2, y2)``);
    returns float64 ``[n, m]`` (0 where both boxes are empty).

    Example:
        >>> box_iou([[0, 0, 2, 2]], [[1, 0, 3, 2], [0, 0, 2, 2], [5, 5, 6, 6]]).round(3).tolist()
        [[0.333, 1.0, 0.0]]
    """
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


DETECTION_KEYS = ("max_boxes", "jitter", "flip", "spurious", "seed")


@dataclasses.dataclass(frozen=True)
class DetectionNoise:
    """A simulated detector for the detected-box setting of Table 3.2 (seed 004 §3.4; spec §4.4 CK-T-m10/m100,
    B9-B10 and §11.9 "jittered boxes, category flips with probability q, spurious boxes, top-3 vs top-9 boxes").

    Every ground-truth object becomes a detection whose edges move by Gaussian noise of ``jitter`` x the box's
    width (x) or height (y), with a confidence drawn from U(0.3, 1) and its category replaced by another of the
    fact base's categories with probability ``flip`` (the detector's class error; the facts are then searched under
    the wrong category, as in the thesis). ``spurious`` boxes per image (random position, side 8-35 % of the
    image, confidence U(0, 0.6), a random category) are added; the ``max_boxes`` most confident detections are the
    candidates (the thesis keeps at most 10 or 100). The noise depends only on ``seed`` and the image id, so the
    expressions of one image see the same detections.

    Example:
        >>> DetectionNoise(max_boxes=3).flip
        0.2
    """

    max_boxes: int = 9
    jitter: float = 0.1
    flip: float = 0.2
    spurious: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [(k, m) for k, ok, m in (
            ("max_boxes", self.max_boxes >= 1, ">= 1"), ("jitter", self.jitter >= 0, ">= 0"),
            ("flip", 0 <= self.flip <= 1, "in [0, 1]"), ("spurious", self.spurious >= 0, ">= 0")) if not ok]
        if bad:
            k, m = bad[0]
            raise ConfigError(f"eval.detect.{k}={getattr(self, k)!r}: must be {m}")

    @classmethod
    def from_config(cls, settings: Mapping[str, Any]) -> DetectionNoise:
        """From a config dict (``eval.detect``); an unknown key raises :class:`ConfigError` naming the valid ones."""
        unknown = sorted(set(settings) - set(DETECTION_KEYS))
        if unknown:
            raise ConfigError(f"eval.detect: unknown key(s) {', '.join(unknown)}; valid: {', '.join(DETECTION_KEYS)}")
        return cls(**dict(settings))


def detect(ex: RefExample, noise: DetectionNoise, categories: Sequence[str]) -> RefExample:
    """``ex`` with its candidates replaced by :class:`DetectionNoise`'s detections (most confident first).

    The returned example's ``target`` is the detection with the largest IoU with the ground-truth target box when
    that IoU is >= 0.5, else -1 (the target was not detected: no choice can be right, spec B9). ``meta`` adds
    ``gt_box`` (the target's ground-truth box, for IoU scoring), ``target_detected`` and ``category_correct``
    (whether the matched detection kept the target's category; the two counts the thesis gives for Table 3.2).

    Example (no noise, no spurious boxes: the candidates are the ground truth, sorted by confidence):
        >>> ex = RefExample("e0", "img7", np.zeros((32, 32, 3), np.uint8), "the red circle",
        ...                 np.array([[0, 0, 8, 8], [10, 10, 20, 20]], np.float32), ("red circle", "blue square"), 1)
        >>> d = detect(ex, DetectionNoise(jitter=0.0, flip=0.0, spurious=0), ["red circle", "blue square"])
        >>> d.categories[d.target], d.meta["target_detected"], d.meta["category_correct"]
        ('blue square', True, True)
    """
    cats = list(dict.fromkeys(categories))
    unknown = sorted(set(ex.categories) - set(cats))
    if unknown:
        raise InputError(f"expression {ex.expr_id!r}: categories {unknown} are not among the detector's categories")
    image = ex.pixels()
    h, w = image.shape[:2]
    rng = np.random.default_rng([noise.seed, zlib.crc32(str(ex.image_id).encode())])
    gt = np.asarray(ex.boxes, np.float64)
    size = np.stack([gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]], 1)
    boxes = gt + rng.normal(0.0, noise.jitter, gt.shape) * np.tile(size, 2)
    conf = rng.uniform(0.3, 1.0, len(gt))
    labels = list(ex.categories)
    for i in range(len(labels)):
        if rng.random() < noise.flip and len(cats) > 1:
            labels[i] = str(rng.choice([c for c in cats if c != labels[i]]))
    if noise.spurious:
        side = rng.uniform(0.08, 0.35, (noise.spurious, 2)) * np.array([w, h])
        x1y1 = rng.uniform(0.0, 1.0, (noise.spurious, 2)) * (np.array([w, h]) - side)
        boxes = np.concatenate([boxes, np.concatenate([x1y1, x1y1 + side], 1)])
        conf = np.concatenate([conf, rng.uniform(0.0, 0.6, noise.spurious)])
        labels += [str(c) for c in rng.choice(cats, noise.spurious)]
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, w)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, h)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1.0)  # at least one pixel
    keep = np.argsort(-conf, kind="stable")[:noise.max_boxes]
    boxes, labels = boxes[keep].astype(np.float32), tuple(labels[i] for i in keep)
    iou = box_iou(boxes, gt[ex.target:ex.target + 1])[:, 0]
    target = int(iou.argmax()) if iou.max() >= 0.5 else -1
    meta = dict(ex.meta, gt_box=gt[ex.target].astype(np.float32).tolist(), target_detected=target >= 0,
                category_correct=target >= 0 and labels[target] == ex.categories[ex.target])
    return dataclasses.replace(ex, boxes=boxes, categories=labels, target=target, meta=meta)


# ------------------------------------------------------------------------------------- KB-Ref loader
KB_FILES = ("Wikipedia.json", "ConceptNet.json", "WebChild.json")


def _update_json(path: Path, new: dict[str, Any] | list[Any]) -> None:
    if path.is_file() and isinstance(new, dict):
        old = read_json(path)
        if isinstance(old, dict):
            new = {**old, **new}
    path.write_text(json.dumps(new))


def write_kbref(examples: Sequence[RefExample], fact_base: FactBase, root: str | os.PathLike,
                split: str | None = None, kb_file: str = "ShapesKB.json") -> Path:
    """Writes examples and their fact base in KB-Ref's file format under ``root`` (read back by :func:`load_kbref`).

    ``expression.json`` maps ``<imageid>_<candidate index>`` to ``[expression, ground-truth fact text]``
    (the text is ``""`` without a fact); ``candidate.json``, ``objects.json`` (two tiers,
    ``[category, category, x, y, w, h]``), ``image.json`` and ``kb_file`` (category -> fact sentences) follow
    KB-Ref; with ``split``, ``<split>.json`` lists its image ids. Files already there are merged into, so the
    splits of one dataset can be written one after the other. KB-Ref facts have no conditions: a
    contextual fact base is written as its sentences only. Images are not written.

    Example:
        >>> import tempfile
        >>> d = build_refexp(RefExpConfig(num_train=3, num_val=0, num_test=0))
        >>> root = write_kbref(d["train"], d.fact_base, tempfile.mkdtemp(), "train")
        >>> back = load_kbref(root, "train", kb_files=("ShapesKB.json",))
        >>> [e.expression for e in back] == [e.expression for e in d["train"]]
        True
    """
    out = Path(root)
    out.mkdir(parents=True, exist_ok=True)
    expressions, candidates, objects, sizes = {}, {}, {}, {}
    for ex in examples:
        fact = fact_base.by_id(ex.fact_id).text if ex.fact_id is not None else ""
        expressions[f"{ex.image_id}_{ex.target}"] = [ex.expression, fact]
        candidates[ex.image_id] = [str(k) for k in range(ex.num_candidates)]
        objects[ex.image_id] = {str(k): [cat, cat, float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]
                                for k, (cat, b) in enumerate(zip(ex.categories, ex.boxes.tolist(), strict=True))}
        if ex.image is not None:
            sizes[ex.image_id] = [int(ex.image.shape[1]), int(ex.image.shape[0])]
        elif "width" in ex.meta and "height" in ex.meta:
            sizes[ex.image_id] = [ex.meta["width"], ex.meta["height"]]
    kb: dict[str, list[str]] = {}
    for f in fact_base.facts:
        kb.setdefault(f.category, []).append(f.text)
    for name, obj in (("expression.json", expressions), ("candidate.json", candidates),
                      ("objects.json", objects), ("image.json", sizes), (kb_file, kb)):
        _update_json(out / name, obj)
    if split is not None:
        (out / f"{split}.json").write_text(json.dumps(sorted(candidates)))
    return out


@dataclasses.dataclass
class KBRefData(Sequence):
    """What :func:`load_kbref` returns: the examples (a sequence), the fact base and the skip report."""

    examples: list[RefExample]
    fact_base: FactBase
    report: SkipReport

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):  # type: ignore[override]
        return self.examples[i]

    def __iter__(self) -> Iterator[RefExample]:
        return iter(self.examples)


def _is_object_record(value: Any) -> bool:
    return isinstance(value, list) or (isinstance(value, Mapping)
                                       and any(k in value for k in ("bbox", "category", "name")))


def _object_table(raw: Any, path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """``objects.json`` as (image id -> object id -> record, object id -> record): KB-Ref's two tiers
    (image id -> object id -> record) go in the first, flat entries (object id -> record) in the second."""
    if not isinstance(raw, Mapping):
        raise InputError(f"{path} must be a JSON object (object id -> record, or image id -> object id -> record)")
    per_image: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if _is_object_record(value):
            flat[str(key)] = value
        elif isinstance(value, Mapping):
            per_image[str(key)] = {str(oid): rec for oid, rec in value.items()}
        else:
            raise InputError(f"{path}: entry {key!r} is neither an object record nor an image's objects")
    return per_image, flat


def _parse_object(rec: Any) -> tuple[str | None, list[float] | None]:
    """(category, [x1, y1, x2, y2]) of an object record; KB-Ref boxes are (x, y, width, height)."""
    if isinstance(rec, list):  # KB-Ref: [category, name, x, y, w, h]
        category = str(rec[0]) if rec else None
        xywh = rec[2:6] if len(rec) >= 6 else None
    elif isinstance(rec, Mapping):
        category = rec.get("category", rec.get("name"))
        category = None if category is None else str(category)
        xywh = rec.get("bbox")
    else:
        return None, None
    try:
        x, y, w, h = (float(v) for v in xywh)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return category, None
    if w < 0 or h < 0:
        return category, None
    return category, [x, y, x + w, y + h]


def load_kbref(root: str | os.PathLike, split: str | None = None, *, kb_files: Sequence[str] = KB_FILES,
               image_dir: str = "images", image_ext: str = ".jpg", on_error: str = "raise") -> KBRefData:
    """KB-Ref-format local files under ``root`` as :class:`RefExample` records and a :class:`FactBase`.

    Files (spec §5; the public KB-Ref README):

    * ``expression.json``: ``"<imageid>_<objectid>"`` (split at the last ``_``) -> ``[expression, fact]``;
    * ``candidate.json``: image id -> object ids (the candidates);
    * ``objects.json``: object id -> record, or image id -> object id -> record, a record being
      ``[category, name, x, y, w, h]`` or ``{"category" (or "name"), "bbox": [x, y, w, h]}``;
    * the KB files (those of ``kb_files`` that exist, at least one): category -> list of fact sentences;
    * optionally ``<split>.json`` (the image ids of the split; without ``split`` every expression is used)
      and ``image.json`` (image id -> [width, height]).

    The ground-truth fact id is the id of the first fact of the target's category with the expression's
    fact text, None if the KB lacks it (``meta["fact_text"]`` keeps the text). A candidate without a
    valid box, a candidate whose category is not in the KB, an expression whose image has no candidates,
    and a target that is not one of the candidates each raise :class:`InputError`, or with
    ``on_error="skip"`` drop the expression and are counted in ``report``.

    Example:
        >>> import json, tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> files = {"expression.json": {"7_1": ["the thing you eat", "apple is food"]},
        ...          "candidate.json": {"7": ["1", "2"]},
        ...          "objects.json": {"7": {"1": ["apple", "apple", 0, 0, 10, 10], "2": ["cup", "cup", 10, 0, 5, 5]}},
        ...          "Wikipedia.json": {"apple": ["apple is food"], "cup": ["cup holds tea"]}}
        >>> for name, obj in files.items(): _ = (d / name).write_text(json.dumps(obj))
        >>> data = load_kbref(d)
        >>> ex = data[0]
        >>> ex.categories, ex.target, ex.boxes.tolist()[1], data.fact_base.by_id(ex.fact_id).text
        (('apple', 'cup'), 0, [10.0, 0.0, 15.0, 5.0], 'apple is food')
    """
    if on_error not in ON_ERROR_CHOICES:
        raise InputError(f"on_error must be one of {ON_ERROR_CHOICES}; got {on_error!r}")
    base = Path(root)
    if not base.is_dir():
        raise InputError(f"KB-Ref root {base} is not a directory")
    report = SkipReport(f"KB-Ref {base}" + (f" [{split}]" if split else ""), on_error)

    facts: list[Fact] = []
    seen: dict[str, int] = {}
    found_kb = [name for name in kb_files if (base / name).is_file()]
    if not found_kb:
        raise InputError(f"no knowledge-base file in {base}; looked for {', '.join(kb_files)}")
    for name in found_kb:
        kb = read_json(base / name)
        if not isinstance(kb, Mapping):
            raise InputError(f"{base / name} must be a JSON object: category -> list of fact sentences")
        source = Path(name).stem
        for category, sentences in kb.items():
            if isinstance(sentences, str):
                sentences = [sentences]
            if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
                raise InputError(f"{base / name}: category {category!r} must map to a list of fact sentences")
            for s in sentences:
                k = seen.get(str(category), 0)
                seen[str(category)] = k + 1
                facts.append(Fact(f"{source}:{category}#{k}", str(category), s))
    fact_base = FactBase(facts, ("category",))

    expressions = read_json(base / "expression.json")
    candidates = read_json(base / "candidate.json")
    objects, flat_objects = _object_table(read_json(base / "objects.json"), base / "objects.json")
    sizes = read_json(base / "image.json") if (base / "image.json").is_file() else {}
    if not isinstance(expressions, Mapping) or not isinstance(candidates, Mapping):
        raise InputError(f"expression.json and candidate.json under {base} must be JSON objects")
    wanted: set[str] | None = None
    if split is not None:
        split_file = base / f"{split}.json"
        if not split_file.is_file():
            raise InputError(f"split file {split_file} not found (it lists the image ids of split {split!r})")
        ids = read_json(split_file)
        wanted = {str(i) for i in (ids.keys() if isinstance(ids, Mapping) else ids)}

    examples: list[RefExample] = []
    for key, value in expressions.items():
        image_id, sep, object_id = str(key).rpartition("_")
        if not sep:
            report.problem("bad expression key", f"expression key {key!r} is not '<imageid>_<objectid>'")
            continue
        if wanted is not None and image_id not in wanted:
            continue
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not isinstance(value[0], str):
            report.problem("bad expression", f"expression {key!r}: value must be [expression, fact]; got {value!r}")
            continue
        fact_text = value[1] if len(value) > 1 and isinstance(value[1], str) and value[1] else None
        cand_ids = [str(c) for c in (candidates.get(image_id) or [])]
        if not cand_ids:
            report.problem("no candidates", f"expression {key!r}: image {image_id!r} has no candidates in "
                                            "candidate.json")
            continue
        if object_id not in cand_ids:
            report.problem("target not a candidate", f"expression {key!r}: target object {object_id!r} is not "
                                                     f"among image {image_id!r}'s candidates {cand_ids}")
            continue
        boxes, cats, problem = [], [], None
        for cid in cand_ids:
            rec = objects.get(image_id, {}).get(cid, flat_objects.get(cid))
            category, box = _parse_object(rec)
            if box is None:
                problem = ("candidate without a box", f"expression {key!r}: candidate {cid!r} of image "
                           f"{image_id!r} has no valid box in objects.json")
                break
            if category is None or category not in fact_base.categories:
                problem = ("unknown category", f"expression {key!r}: candidate {cid!r} has category "
                           f"{category!r}, which the fact base ({', '.join(found_kb)}) does not hold")
                break
            boxes.append(box)
            cats.append(category)
        if problem is not None:
            report.problem(*problem)
            continue
        target = cand_ids.index(object_id)
        fact_id = None
        if fact_text is not None:
            fact_id = next((f.fact_id for f in fact_base.of_category(cats[target]) if f.text == fact_text), None)
        meta: dict[str, Any] = {"candidate_ids": cand_ids, "fact_text": fact_text}
        size = sizes.get(image_id) if isinstance(sizes, Mapping) else None
        if isinstance(size, list | tuple) and len(size) >= 2:
            meta["width"], meta["height"] = size[0], size[1]
        examples.append(RefExample(
            expr_id=str(key), image_id=image_id, image=None, expression=value[0],
            boxes=np.array(boxes, np.float32).reshape(len(boxes), 4), categories=tuple(cats), target=target,
            fact_id=fact_id, meta=meta, image_path=str(base / image_dir / f"{image_id}{image_ext}")))
    report.finish(len(examples))
    return KBRefData(examples, fact_base, report)
