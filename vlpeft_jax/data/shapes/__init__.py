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

The package is layered one way (each module imports only those above it in this list):
:mod:`.objects` (shapes, colours, sizes, cells, :class:`ShapeObject`, seeded draws) →
:mod:`.rendering` (images, segmentations, patch masks) and :mod:`.language` (captions, questions, answers,
instructions, vocabulary, tokenizer) → :mod:`.world` (config, records, sampling, splits, labels,
:class:`ShapesWorld`, :func:`generate`, save/load/cache). Everything is re-exported here, so
``from vlpeft_jax.data.shapes import X`` works for every public name.

Example:
    >>> world = generate(ShapesWorldConfig(num_train=8, num_val=2, num_test=2, num_ood=2))
    >>> ex = world.train[0]
    >>> ex.image.shape, ex.image.dtype, len(ex.captions_source), len(ex.vqa[0].answers)
    ((64, 64, 3), dtype('uint8'), 5, 10)
    >>> ex.patch_masks(8).shape[1:]
    (8, 8)
"""

# The caption grammar's phrase tables stay reachable under their old names (tests check captions against them).
from vlpeft_jax.data.shapes.language import _COUNT_WORDS as _COUNT_WORDS
from vlpeft_jax.data.shapes.language import _LOCATION_PHRASES as _LOCATION_PHRASES
from vlpeft_jax.data.shapes.language import _RELATION_PHRASES as _RELATION_PHRASES
from vlpeft_jax.data.shapes.language import (
    CAPTION_INSTRUCTIONS,
    CAPTION_TASK_PROMPT,
    QUESTION_TYPES,
    RELATIONS,
    VQA_INSTRUCTIONS,
    VQA_TASK_TEMPLATE,
    shapes_tokenizer,
    vocabulary_words,
)
from vlpeft_jax.data.shapes.objects import CELL_NAMES, COLOR_RGB, COLORS, GRID, SHAPES, SIZES, ShapeObject
from vlpeft_jax.data.shapes.rendering import BACKGROUND_RGB, patch_masks, render_scene
from vlpeft_jax.data.shapes.world import (
    GENERATOR_VERSION,
    LABEL_CLASSES,
    MULTI_HOT_LABELS,
    PATCH_LABEL_CLASSES,
    PATCH_MIN_FRACTION,
    SPLITS,
    ShapesExample,
    ShapesSplit,
    ShapesWorld,
    ShapesWorldConfig,
    VQAItem,
    generate,
    load_or_generate,
)

__all__ = [
    "BACKGROUND_RGB", "CAPTION_INSTRUCTIONS", "CAPTION_TASK_PROMPT", "CELL_NAMES", "COLORS", "COLOR_RGB",
    "GENERATOR_VERSION", "GRID", "LABEL_CLASSES", "MULTI_HOT_LABELS", "PATCH_LABEL_CLASSES", "PATCH_MIN_FRACTION",
    "QUESTION_TYPES", "RELATIONS", "SHAPES",
    "SIZES", "SPLITS", "VQA_INSTRUCTIONS", "VQA_TASK_TEMPLATE", "ShapeObject", "ShapesExample", "ShapesSplit",
    "ShapesWorld", "ShapesWorldConfig", "VQAItem", "generate", "load_or_generate", "patch_masks", "render_scene",
    "shapes_tokenizer", "vocabulary_words",
]
