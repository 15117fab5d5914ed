"""The words of the shapes world: caption grammar (source and target domains), VQA questions and answers,
PETAL's instructions, the vocabulary and the word-level tokenizer.

Captions and questions are drawn from a scene's :class:`~.objects.ShapeObject` records with a seeded
``random.Random``; :mod:`.world` calls :func:`source_caption`, :func:`target_caption`,
:func:`vqa_question` and :func:`human_answers` while it generates a split. The tokenizer depends only on
the templates here and the config's instructions, never on generated scenes.

Example:
    >>> from vlpeft_jax.data.shapes.objects import ShapeObject, python_rng
    >>> objs = [ShapeObject("circle", "red", "large", 0, 0, (10.0, 10.0), 8.0, (220, 50, 47)),
    ...         ShapeObject("square", "blue", "small", 2, 2, (53.0, 53.0), 5.0, (45, 95, 230))]
    >>> caption = source_caption(objs, python_rng(0))
    >>> "red circle" in caption and "blue square" in caption
    True
    >>> question, answer, qtype, ids, pool = vqa_question("color", objs, python_rng(1), colors=("red", "blue"),
    ...                                                   shapes=("circle", "square"), max_objects=4,
    ...                                                   allowed_pairs=[("circle", "red"), ("square", "blue")])
    >>> qtype, answer == objs[ids[0]].color, question.endswith("?")
    ('color', True, True)
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import Protocol

from vlpeft_jax.data.batching import VQA_PROMPT_TEMPLATE
from vlpeft_jax.data.shapes.objects import (
    CELL_NAMES,
    COLORS,
    SHAPES,
    SIZES,
    ShapeObject,
    pick,
    randbelow,
    shuffled,
)
from vlpeft_jax.data.tokenizer import WordTokenizer
from vlpeft_jax.errors import InputError

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


def _plural(shape: str) -> str:
    return _PLURALS.get(shape, shape + "s")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


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
    return options[randbelow(rng, len(options))]


def source_caption(objs: Sequence[ShapeObject], rng: random.Random) -> str:
    """A source-domain caption: the objects only, in random order, in one of the plain templates."""
    order = shuffled(rng, len(objs))
    phrases = [objs[i].phrase() for i in order]
    return pick(rng, _SOURCE_TEMPLATES).format(
        objects=_join([f"{_article(p)} {p}" for p in phrases]), bare=_join(phrases))


def target_caption(objs: Sequence[ShapeObject], rng: random.Random) -> str:
    """A target-domain caption: sizes, positions, a relation and the count, in one of the expressive templates."""
    n = len(objs)
    template = pick(rng, _TARGET_TEMPLATES)
    order = shuffled(rng, n)
    full = [objs[i].phrase(with_size=True) for i in order]
    with_art = [f"{_article(p)} {p}" for p in full]
    locs = [pick(rng, _LOCATION_PHRASES[objs[i].cell]) for i in order]
    fields: dict[str, str] = {}
    if "{count}" in template:
        noun = pick(rng, _TARGET_NOUNS)
        fields.update(count=_COUNT_WORDS[n], noun=noun if n > 1 else noun[:-1],
                      there_are="there are" if n > 1 else "there is")
    if "{located}" in template or ("{chain}" in template and n == 1):
        fields["located"] = fields["chain"] = _join([f"{a} {loc}" for a, loc in zip(with_art, locs, strict=True)])
    if n > 1 and ("{chain}" in template or "{relation_sentences}" in template):
        rel = pick(rng, _RELATION_PHRASES[_relation(objs[order[0]], objs[order[1]], rng)])
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


def distinct_texts(make, k: int, rng: random.Random, tries: int = 60) -> tuple[str, ...]:
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


def vqa_question(qtype: str, objs: Sequence[ShapeObject], rng: random.Random, *, colors: Sequence[str],
                 shapes: Sequence[str], max_objects: int, allowed_pairs: Sequence[tuple[str, str]]) -> _Question | None:
    """(question, answer, qtype, object_ids, wrong-answer pool) for one question type, or None if impossible.

    ``colors``, ``shapes`` and ``max_objects`` are the world's (the wrong-answer pools and what count questions
    may ask about); ``allowed_pairs`` are the (shape, colour) pairs an existence question may ask for.
    """
    n = len(objs)
    t = _QUESTION_TEMPLATES
    if qtype == "color":
        cands = [(i, d) for i in range(n) if (d := _unique_description(objs, i, use_color=False))]
        if not cands:
            return None
        i, d = cands[randbelow(rng, len(cands))]
        return pick(rng, t["color"]).format(d=d), objs[i].color, qtype, (i,), colors
    if qtype == "shape":
        cands = [(i, d) for i in range(n) if (d := _unique_description(objs, i, use_shape=False))]
        if not cands:
            return None
        i, d = cands[randbelow(rng, len(cands))]
        return pick(rng, t["shape"]).format(d=d), objs[i].shape, qtype, (i,), shapes
    if qtype == "count":
        counts = [str(k) for k in range(max_objects + 1)]
        kind = randbelow(rng, 3)
        if kind == 0:
            return pick(rng, t["count"]), str(n), qtype, tuple(range(n)), counts
        if kind == 1:
            color = pick(rng, colors)
            ids = tuple(i for i in range(n) if objs[i].color == color)
            return t["count_color"][0].format(color=color), str(len(ids)), qtype, ids, counts
        shape = pick(rng, shapes)
        ids = tuple(i for i in range(n) if objs[i].shape == shape)
        return t["count_shape"][0].format(plural=_plural(shape)), str(len(ids)), qtype, ids, counts
    if qtype == "position":
        cands = [(i, d) for i in range(n) if (d := _unique_description(objs, i))]
        if not cands:
            return None
        i, d = cands[randbelow(rng, len(cands))]
        return pick(rng, t["position"]).format(d=d), objs[i].position, qtype, (i,), CELL_NAMES
    if qtype == "relation":
        described = {i: d for i in range(n) if (d := _unique_description(objs, i))}
        pairs = [(i, j) for i, j in itertools.permutations(described, 2)]
        if not pairs:
            return None
        i, j = pairs[randbelow(rng, len(pairs))]
        rel = _relation(objs[i], objs[j], rng)
        truth = bool(randbelow(rng, 2))
        asked = rel if truth else _OPPOSITE[rel]
        q = t["relation"][0].format(d=described[i], rel=pick(rng, _RELATION_PHRASES[asked]), d2=described[j])
        return q, "yes" if truth else "no", qtype, (i, j), ("yes", "no")
    if qtype == "existence":
        present = {(o.shape, o.color) for o in objs}
        if randbelow(rng, 2):
            i = randbelow(rng, n)
            shape, color, ids, answer = objs[i].shape, objs[i].color, (i,), "yes"
        else:
            absent = [p for p in allowed_pairs if p not in present]
            shape, color = absent[randbelow(rng, len(absent))]
            ids, answer = (), "no"
        q = pick(rng, t["existence"]).format(a=_article(color), color=color, shape=shape)
        return q, answer, qtype, ids, ("yes", "no")
    raise InputError(f"unknown question type {qtype!r}; valid: {', '.join(QUESTION_TYPES)}")


def human_answers(answer: str, pool: Sequence[str], rng: random.Random, *, num_answers: int,
                  answer_noise: float) -> tuple[str, ...]:
    """num_answers answers: the right one, with up to 3 replaced by wrong ones from the pool (annotator noise)."""
    answers = [answer] * num_answers
    wrong = [p for p in pool if p != answer]
    if wrong and answer_noise > 0:
        flips = [k for k in range(num_answers) if rng.random() < answer_noise][:3]
        for k in flips:
            answers[k] = pick(rng, wrong)
    return tuple(answers)


class HasInstructions(Protocol):
    """What the vocabulary reads of a :class:`~vlpeft_jax.data.shapes.world.ShapesWorldConfig`.

    (This module cannot name the config class: :mod:`.world` imports this module, not the other way round.)
    """

    @property
    def caption_instructions(self) -> Sequence[str]: ...

    @property
    def vqa_instructions(self) -> Sequence[str]: ...


def vocabulary_words(config: HasInstructions | None = None) -> list[str]:
    """Every word any template of the world can produce (so a tokenizer covers unseen scenes too).

    ``config`` is a :class:`~vlpeft_jax.data.shapes.world.ShapesWorldConfig` (only its instructions are read);
    None means the default instructions, :data:`CAPTION_INSTRUCTIONS` and :data:`VQA_INSTRUCTIONS`.
    """
    caption_instructions = CAPTION_INSTRUCTIONS if config is None else config.caption_instructions
    vqa_instructions = VQA_INSTRUCTIONS if config is None else config.vqa_instructions
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
    texts += list(caption_instructions) + list(vqa_instructions)
    return texts


def shapes_tokenizer(config: HasInstructions | None = None, model_max_length: int = 128) -> WordTokenizer:
    """The word-level tokenizer of the shapes world: every word any template can produce, ids alphabetical.

    It depends only on the templates and the config's instructions, not on the generated scenes, so worlds
    of any seed or size share token ids (a base model pretrained on one world can be adapted on another).

    Example:
        >>> tok = shapes_tokenizer()
        >>> tok.decode(tok.encode("Two objects: a large red circle above a small blue square."))
        'two objects: a large red circle above a small blue square.'
    """
    return WordTokenizer.train([], extra_words=vocabulary_words(config), model_max_length=model_max_length)
