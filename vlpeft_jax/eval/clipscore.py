"""CLIP-Score and RefCLIP-Score (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric").

- ``CLIP-S(c, v) = w * max(cos(E_image(v), E_text(prefix + c)), 0)`` with ``w = 2.5`` and
  ``prefix = "A photo depicts "`` (the paper's Sec. 3; the authors' ``clipscore.py`` adds the prefix to
  references too).
- ``RefCLIP-S(c, R, v) = H-mean(CLIP-S(c, v), max(max_{r in R} cos(E_text(c), E_text(r)), 0))``, the
  harmonic mean (0 when both terms are 0).
- Corpus scores are the means of the per-image scores.

The embedding-level functions (:func:`clip_score`, :func:`ref_clip_score`) take projected embeddings
from any CLIP; :class:`ClipScorer` computes them with our Flax CLIP towers loaded from a Hugging Face
CLIP checkpoint directory (vision and text towers with their projections, plus the tokenizer files).

Example:
    >>> import numpy as np
    >>> img = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> txt = np.array([[1.0, 1.0], [1.0, -1.0]])
    >>> clip_score(img, txt).round(4).tolist()
    [1.7678, 0.0]
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from vlpeft_jax.data.images import ImagePreprocessor, decode_image, resize_uint8
from vlpeft_jax.errors import InputError

CLIP_SCORE_WEIGHT = 2.5
CLIP_SCORE_PREFIX = "A photo depicts "


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm == 0, 1.0, norm)


def clip_score(image_embeds: np.ndarray, text_embeds: np.ndarray, w: float = CLIP_SCORE_WEIGHT) -> np.ndarray:
    """Per-pair CLIP-S ``w * max(cos(image_i, text_i), 0)`` for ``[n, d]`` embeddings: ``[n]``.

    ``text_embeds`` must embed the prefixed captions (``CLIP_SCORE_PREFIX + caption``).
    """
    image_embeds, text_embeds = np.asarray(image_embeds), np.asarray(text_embeds)
    if image_embeds.shape != text_embeds.shape or image_embeds.ndim != 2:
        raise InputError(f"image and text embeddings must both be [n, d], got {image_embeds.shape} and "
                         f"{text_embeds.shape}")
    cos = np.sum(_normalize(image_embeds) * _normalize(text_embeds), axis=-1)
    return w * np.maximum(cos, 0.0)


def ref_similarity(cand_embeds: np.ndarray, ref_embeds: Sequence[np.ndarray]) -> np.ndarray:
    """``max(max_r cos(cand_i, r), 0)`` over each candidate's references: ``[n]``.

    Args:
      cand_embeds: ``[n, d]`` text embeddings of the (prefixed) candidates.
      ref_embeds: n arrays ``[m_i, d]``, the (prefixed) references of each candidate (m_i >= 1).
    """
    cand = _normalize(cand_embeds)
    if len(ref_embeds) != len(cand):
        raise InputError(f"{len(ref_embeds)} reference sets for {len(cand)} candidates")
    out = np.empty(len(cand))
    for i, refs in enumerate(ref_embeds):
        refs = np.asarray(refs)
        if refs.ndim != 2 or len(refs) == 0 or refs.shape[1] != cand.shape[1]:
            raise InputError(f"references of candidate {i} must be [m >= 1, {cand.shape[1]}], got {refs.shape}")
        out[i] = max(float(np.max(_normalize(refs) @ cand[i])), 0.0)
    return out


def ref_clip_score(image_embeds: np.ndarray, cand_embeds: np.ndarray, ref_embeds: Sequence[np.ndarray],
                   w: float = CLIP_SCORE_WEIGHT) -> tuple[np.ndarray, np.ndarray]:
    """Per-image ``(CLIP-S, RefCLIP-S)``, each ``[n]``; RefCLIP-S is the harmonic mean of CLIP-S and
    :func:`ref_similarity` (0 where both are 0).

    Example:
        >>> img = np.array([[1.0, 0.0]]); cand = np.array([[1.0, 0.0]]); refs = [np.array([[0.6, 0.8]])]
        >>> [x.round(4).tolist() for x in ref_clip_score(img, cand, refs)]
        [[2.5], [0.9677]]
    """
    clip_s = clip_score(image_embeds, cand_embeds, w)
    ref_s = ref_similarity(cand_embeds, ref_embeds)
    total = clip_s + ref_s
    harmonic = np.where(total > 0, 2 * clip_s * ref_s / np.where(total > 0, total, 1.0), 0.0)
    return clip_s, harmonic


@dataclasses.dataclass(frozen=True)
class ClipImagePreprocessor(ImagePreprocessor):
    """CLIP's image processor: the shortest edge resized to the crop size, the long edge to
    ``int(size * long / short)`` (truncated, as transformers' ``CLIPImageProcessor`` and OpenAI CLIP's
    ``Resize`` compute it), bicubic, then a centre crop (offsets ``(resized - crop) // 2``) and the
    normalisation. ``ImagePreprocessor(crop="center")`` rounds the long edge instead, which moves the crop
    by a pixel for some aspect ratios (40 x 36 -> 36 x 32 instead of 35 x 32).

    Example:
        >>> pre = ClipImagePreprocessor(size=32, crop="center")
        >>> pre.to_uint8(np.zeros((40, 36, 3), np.uint8)).shape
        (32, 32, 3)
    """

    def to_uint8(self, image: Any, name: str | None = None) -> np.ndarray:
        rgb = decode_image(image, name)
        h, w = self.height_width
        if rgb.shape[:2] == (h, w):
            return rgb
        edge = max(h, w)  # CLIP crops squares: shortest edge = crop size
        rows, cols = rgb.shape[:2]
        if rows <= cols:
            rh, rw = edge, int(edge * cols / rows)
        else:
            rh, rw = int(edge * rows / cols), edge
        rh, rw = max(rh, h), max(rw, w)
        rgb = resize_uint8(rgb, (rh, rw), self.resample)
        top, left = (rh - h) // 2, (rw - w) // 2
        return np.ascontiguousarray(rgb[top:top + h, left:left + w])


class ClipScorer:
    """CLIP-S / RefCLIP-S with our Flax CLIP towers loaded from a Hugging Face CLIP checkpoint directory.

    The directory needs a full ``CLIPModel`` (or compatible towers) with ``visual_projection`` and
    ``text_projection``, and the CLIP tokenizer files (or pass ``tokenizer``). Images are preprocessed as
    CLIP's processor does (bicubic resize of the shortest edge, centre crop, CLIP mean/std, or the values of
    ``preprocessor_config.json``); captions get ``CLIP_SCORE_PREFIX`` and are truncated to the text tower's
    ``max_position_embeddings`` tokens.

    Example (with a CLIP checkpoint directory ``DIR`` and uint8 RGB images)::

        scorer = ClipScorer(DIR)
        result = scorer.score(images, ["a dog on a beach", ...], references=[["a dog runs", ...], ...])
        result["CLIP-S"], result["RefCLIP-S"]
    """

    def __init__(self, model_dir: str | os.PathLike, *, tokenizer: Any = None, batch_size: int = 32,
                 prefix: str = CLIP_SCORE_PREFIX, w: float = CLIP_SCORE_WEIGHT) -> None:
        import jax

        from vlpeft_jax.hf.vision import image_mean_std, load_clip_text, load_clip_vision

        self.vision, self.vision_params = load_clip_vision(model_dir, with_projection=True)
        self.text, self.text_params = load_clip_text(model_dir, with_projection=True)
        if tokenizer is None:
            import transformers

            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(os.fspath(model_dir), local_files_only=True)
            except (OSError, ValueError) as e:
                raise InputError(f"{model_dir}: no CLIP tokenizer files (vocab/merges or tokenizer.json); "
                                 f"save the tokenizer there or pass tokenizer=... ({e})") from None
        self.tokenizer = tokenizer
        mean, std, size = image_mean_std(model_dir)
        self.preprocess = ClipImagePreprocessor(size=size, mean=mean, std=std, resample="bicubic", crop="center")
        self.max_length = self.text.config.max_position_embeddings
        self.batch_size, self.prefix, self.w = batch_size, prefix, w
        self._image_fn = jax.jit(lambda p, x: self.vision.apply({"params": p}, x).pooled)
        self._text_fn = jax.jit(lambda p, ids, mask: self.text.apply({"params": p}, ids, mask).pooled)

    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        """Projected image embeddings ``[n, d]`` of images (uint8 arrays, PIL images, paths or bytes)."""
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = list(images[start : start + self.batch_size])
            pixels = self.preprocess.batch(chunk)
            pad = self.batch_size - len(chunk)  # fixed batch shape: one compilation
            pixels = np.concatenate([pixels, np.zeros((pad, *pixels.shape[1:]), pixels.dtype)]) if pad else pixels
            out.append(np.asarray(self._image_fn(self.vision_params, pixels))[: len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, self.vision.config.projection_dim))

    def embed_texts(self, texts: Sequence[str], add_prefix: bool = True) -> np.ndarray:
        """Projected text embeddings ``[n, d]`` (of ``prefix + text`` when ``add_prefix``)."""
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise InputError(f"captions must be strings; bad entries at positions {bad[:10]}")
        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = [(self.prefix + t) if add_prefix else t for t in texts[start : start + self.batch_size]]
            pad = self.batch_size - len(chunk)
            enc = self.tokenizer(chunk + [""] * pad, padding="max_length", truncation=True,
                                 max_length=self.max_length, return_tensors="np")
            ids = enc["input_ids"].astype(np.int32)
            mask = enc["attention_mask"].astype(np.int32)
            out.append(np.asarray(self._text_fn(self.text_params, ids, mask))[: len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, self.text.config.projection_dim))

    def score(self, images: Sequence[Any], candidates: Sequence[str],
              references: Sequence[Sequence[str]] | None = None) -> dict[str, Any]:
        """Corpus and per-image CLIP-S (and RefCLIP-S when ``references`` are given).

        Returns:
          ``{"CLIP-S": float, "per_image": {"CLIP-S": [n], "RefCLIP-S": [n]}, "RefCLIP-S": float}``.
        """
        if len(images) != len(candidates):
            raise InputError(f"{len(images)} images for {len(candidates)} candidate captions")
        image_embeds = self.embed_images(images)
        cand_embeds = self.embed_texts(candidates)
        if references is None:
            per = clip_score(image_embeds, cand_embeds, self.w)
            return {"CLIP-S": float(per.mean()), "per_image": {"CLIP-S": per}}
        if len(references) != len(candidates):
            raise InputError(f"{len(references)} reference lists for {len(candidates)} candidates")
        empty = [i for i, r in enumerate(references) if len(r) == 0]
        if empty:
            raise InputError(f"RefCLIP-S needs references for every image; none at positions {empty[:10]}")
        flat = [r for refs in references for r in refs]
        flat_embeds = self.embed_texts(flat)
        splits = np.cumsum([len(r) for r in references])[:-1]
        clip_s, ref_s = ref_clip_score(image_embeds, cand_embeds, np.split(flat_embeds, splits), self.w)
        return {
            "CLIP-S": float(clip_s.mean()),
            "RefCLIP-S": float(ref_s.mean()),
            "per_image": {"CLIP-S": clip_s, "RefCLIP-S": ref_s},
        }
