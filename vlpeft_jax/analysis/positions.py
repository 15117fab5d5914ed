"""Position sets of a VLM's input for the information-flow analysis (thesis, seed ``004_21d0d480fe4006f4.txt``,
§7.4 "Format", App. E.6; spec ``specs/knockout.md`` §3 and A5, A17).

All sets are ``bool [b, T]`` over the language model's sequence, visual tokens included: for a prefix VLM
(visual tokens prepended, our shapes models) positions ``0 … n_v - 1`` are the image, then the left-padded
text; for a placeholder layout (LLaVA) the image is where the placeholder tokens were. Named sets
(:data:`NAMED_SETS`):

=================  ===============================================================================
``image``          every visual token (𝕀)
``image_objects``  visual tokens whose patch holds any pixel of an object the question is about (𝕀_obj,
                   "Related Image Patches"; one pixel of overlap suffices, A17)
``image_other``    the other visual tokens (𝕀_oth, "Other Image Patches")
``image_random``   as many visual tokens of ``image_other`` as ``image_objects`` has, drawn at random per
                   row (a size-matched control the thesis lacks; spec test idea 19)
``question``       the tokens of the question string only (ℚ; not the template, A5)
``template``       the other real text tokens before the last one (``<bos>``, "Question:", "Short answer")
``text``           every real text token (the question, the template and the last position)
``last``           the last position (the final prompt token, where the answer's first token is predicted)
=================  ===============================================================================

Explicit sets for any model (:func:`index_set`): ``"0:16"``, ``"20:24,30"``, ``"-1"``, counting each row's real
positions (padding skipped; visual tokens first in a prefix VLM) from 0, negative indices from the end.

Example (a prefix VLM with 2 visual tokens; the text ``<bos> Question: what color ? Short answer :``):
    >>> ids = np.array([[0, 1, 5, 6, 7, 8, 9, 10, 11]])  # 0 = <pad>
    >>> sets = vqa_sets(ids, ids > 0, [[7, 8]], num_prepended=2)
    >>> {k: np.nonzero(v[0])[0].tolist() for k, v in sets.items() if k in ("image", "question", "last")}
    {'image': [0, 1], 'question': [6, 7], 'last': [10]}
    >>> np.nonzero(index_set("0:2,-1", sets["text"] | sets["image"])[0])[0].tolist()
    [0, 1, 10]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vlpeft_jax.errors import ConfigError, InputError

NAMED_SETS = ("image", "image_objects", "image_other", "image_random", "question", "template", "text", "last")


def find_subsequence(row: Sequence[int], part: Sequence[int]) -> int:
    """First index where ``part`` occurs in ``row`` contiguously, or -1."""
    row, part = list(row), list(part)
    n = len(part)
    for i in range(len(row) - n + 1):
        if row[i:i + n] == part:
            return i
    return -1


def vqa_sets(input_ids: Any, attention_mask: Any, question_ids: Sequence[Sequence[int] | None], *,
             num_prepended: int = 0, image_mask: Any = None, object_patches: Sequence[Any] | None = None,
             seed: int = 0) -> dict[str, np.ndarray]:
    """The named sets (:data:`NAMED_SETS`) of a left-padded batch.

    Args:
      input_ids, attention_mask: the text ``[b, t]`` the model is given (left padding; the last position real).
      question_ids: each row's question tokens, found as a contiguous run in the row (the first occurrence);
        None for a padding row (its question set stays empty).
      num_prepended: visual tokens a prefix VLM puts before the text (0 for a placeholder layout).
      image_mask: ``bool [b, t]`` image placeholder positions of the text, for a placeholder layout.
      object_patches: per row, ``bool [n_v]`` the visual tokens of the asked-about objects (patch order), or
        None where unknown; without it the ``image_objects``/``image_other``/``image_random`` sets are absent.
      seed: the draw of ``image_random``.

    Raises:
      InputError: a question not found in its row, a right-padded row, or patch masks of the wrong size.
    """
    ids, mask = np.asarray(input_ids), np.asarray(attention_mask, bool)
    b, t = ids.shape
    if len(question_ids) != b:
        raise InputError(f"{len(question_ids)} questions for a batch of {b} rows")
    if not mask[:, -1].all():
        raise InputError("the analysis needs left-padded rows (the last position real)")
    n_v = int(num_prepended)
    total = n_v + t
    real = np.concatenate([np.ones((b, n_v), bool), mask], axis=1)
    image = np.zeros((b, total), bool)
    image[:, :n_v] = True
    if image_mask is not None:
        image[:, n_v:] |= np.asarray(image_mask, bool)
    question = np.zeros((b, total), bool)
    for r in range(b):
        if question_ids[r] is None:  # a padding row of the last batch: no question
            continue
        start = find_subsequence(ids[r].tolist(), question_ids[r])
        if start < 0 or not question_ids[r]:
            raise InputError(f"row {r}: the question's tokens {list(question_ids[r])[:12]} do not occur in its "
                             "input ids; the question set cannot be placed")
        question[r, n_v + start:n_v + start + len(question_ids[r])] = True
    last = np.zeros((b, total), bool)
    last[:, -1] = True
    text = real & ~image
    sets = {"image": image, "question": question, "template": text & ~question & ~last, "text": text, "last": last}
    if object_patches is not None:
        sets.update(object_sets(image, object_patches, seed))
    return sets


def object_sets(image: np.ndarray, object_patches: Sequence[Any], seed: int = 0) -> dict[str, np.ndarray]:
    """``image_objects``, ``image_other`` and ``image_random`` from per-row patch masks (see :func:`vqa_sets`)."""
    b = image.shape[0]
    objects, other, rand = (np.zeros_like(image) for _ in range(3))
    rng = np.random.default_rng(seed)
    for r in range(b):
        slots = np.nonzero(image[r])[0]
        patches = object_patches[r]
        if patches is None:
            continue
        patches = np.asarray(patches, bool).reshape(-1)
        if patches.size != slots.size:
            raise InputError(f"row {r}: {patches.size} patch flags for {slots.size} visual tokens (the object sets "
                             "need one visual token per patch: connector.feature='patches')")
        objects[r, slots[patches]] = True
        others = slots[~patches]
        other[r, others] = True
        pick = rng.choice(others, size=min(int(patches.sum()), others.size), replace=False)
        rand[r, pick] = True
    return {"image_objects": objects, "image_other": other, "image_random": rand}


def index_set(spec: str, real: Any) -> np.ndarray:
    """``bool [b, T]`` from a comma-separated list of indices and ``start:stop`` ranges over each row's real
    positions (``real``: ``bool [b, T]``); negative indices count from the end. Out-of-range indices raise.

    Example:
        >>> real = np.array([[0, 1, 1, 1, 1]], bool)
        >>> np.nonzero(index_set("0,-2:", real)[0])[0].tolist()
        [1, 3, 4]
    """
    real = np.asarray(real, bool)
    out = np.zeros_like(real)
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if not parts:
        raise ConfigError(f"position set {spec!r} is empty; give indices or start:stop ranges, e.g. 0:16,20")
    for r in range(real.shape[0]):
        slots = np.nonzero(real[r])[0]
        n = slots.size
        for part in parts:
            try:
                if ":" in part:
                    lo_s, hi_s = part.split(":", 1)
                    lo = int(lo_s) if lo_s else 0
                    hi = int(hi_s) if hi_s else n
                    lo, hi = lo + n if lo < 0 else lo, hi + n if hi < 0 else hi
                    if not (0 <= lo < hi <= n):
                        raise IndexError
                    chosen = slots[lo:hi]
                else:
                    i = int(part)
                    if not -n <= i < n:
                        raise IndexError
                    chosen = slots[[i]]
            except ValueError:
                raise ConfigError(f"position set {spec!r}: {part!r} is not an index or a start:stop range") from None
            except IndexError:
                raise InputError(f"position set {spec!r}: {part!r} falls outside row {r}'s {n} positions "
                                 f"(valid: 0..{n - 1}, or -{n}..-1)") from None
            out[r, chosen] = True
    return out
