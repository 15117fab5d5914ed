"""Region features pooled from a frozen vision tower over each box: the shapes-world stand-in for CK-Transformer's
Faster R-CNN RoI features (thesis ``004_21d0d480fe4006f4.txt`` App. A.5; spec ``specs/ckt.md`` §11.5, issue #19).

The thesis extracts each candidate's feature with a Faster R-CNN (ResNet-101) pretrained on Visual Genome *object
and attribute* annotations (App. A.5, after Anderson et al. 2018), frozen, RoI-pooled over the box. Here:

- **The tower** is the project's ViT (:class:`vlpeft_jax.models.vit.ViTModel`, no pooler) with a linear head on its
  last-layer patch tokens, trained for a short while on the *training* images to predict, for every patch, the
  KB category of the object covering it (colour + shape on the ``kbref`` KB; the "object/attribute
  supervision" of the VG detector) or background (label 0). The covering object of a patch is the box that
  contains the patch centre; where boxes overlap, the smaller box wins (an object drawn on top of a larger one
  is usually the smaller one), ties to the lower box index (:func:`patch_labels`). Training is AdamW
  (weight decay 0.01, as spec B12) on the mean patch cross-entropy, deterministic from ``TowerSettings.seed``
  (parameter init and batch order). The tower is then frozen.
- **RoI pooling on the patch grid** (:func:`box_patch_weights`): a box's feature is the overlap-area-weighted
  mean of the tower's last-layer (post-LayerNorm) patch features over the patches it covers, the box clipped to
  the image. ``concat_pixels=True`` appends the box's pixels average-pooled to ``roi_grid x roi_grid`` RGB cells
  (:func:`vlpeft_jax.tasks.refexp.roi_features`, the ``data.regions="pixels"`` feature).

Each candidate's feature depends on its own box only (and on the image), so the features are
permutation-equivariant over the candidates, as the encoder is (spec B16).

:func:`tower_region_features` trains a tower once per process for a data set and settings (the runner builds
the task twice: training, then evaluation) and returns every split's features.

Example (the pooling weights of a box over the middle of a 16x16 image of 8x8 patches; see
:func:`tower_region_features` for the features of a data set):
    >>> box_patch_weights(np.array([[4, 4, 12, 12]]), (16, 16), 8).tolist()
    [[0.25, 0.25, 0.25, 0.25]]
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlpeft_jax.data import refexp as rx
from vlpeft_jax.errors import ConfigError, InputError
from vlpeft_jax.models.vit import ViTConfig, ViTModel
from vlpeft_jax.tasks.base import check_numbers
from vlpeft_jax.tasks.refexp import roi_features

FORWARD_CHUNK = 128
"""Images per forward in :meth:`RegionTower.patch_outputs`; fewer images are padded to the next power of 2."""
_CACHE: dict[Any, tuple[Any, dict[str, list[np.ndarray]], dict[str, Any], Any]] = {}  # see tower_region_features


@dataclasses.dataclass(frozen=True)
class TowerSettings:
    """Settings of :class:`RegionTower` (the image size comes from the data).

    Attributes:
        patch_size: the ViT's square patch side in pixels (must divide the image sides).
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: the ViT.
        steps, batch_size, learning_rate: AdamW training (weight decay 0.01) on patch classification;
            ``batch_size`` counts images. Measured on ``RefExpConfig(num_train=3000, num_val=500, num_test=500)``
            (1501 training images, 30 categories, 8x8 patches; 2 CPU cores shared with other jobs, load 6-7, so
            the times are upper bounds): 300 steps (12-18 s) reach a val patch accuracy of 0.80 (majority 0.71)
            but only 0.32 on object patches, i.e. little beyond colour; 1500 steps (60 s) reach 0.97 (0.93 on
            object patches), hence the default. ``patch_size=4`` is 5x slower per step and no better at 300 steps.
        seed: parameter init and batch order.
        concat_pixels: append each box's ``roi_grid x roi_grid`` RGB-pooled pixels to its tower feature.
        roi_grid: the pixel grid of ``concat_pixels``.

    Example:
        >>> TowerSettings(steps=10).steps
        10
        >>> TowerSettings(patch_size=0)
        Traceback (most recent call last):
        ...
        vlpeft_jax.errors.ConfigError: TowerSettings.patch_size=0 must be an integer >= 1
    """

    patch_size: int = 8
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 128
    steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 1e-3
    seed: int = 0
    concat_pixels: bool = False
    roi_grid: int = 4

    def __post_init__(self) -> None:
        check_numbers(self, {"patch_size": 1, "hidden_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1,
                             "intermediate_size": 1, "steps": 0, "batch_size": 1, "seed": 0, "roi_grid": 1})
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"TowerSettings.hidden_size={self.hidden_size} must be divisible by "
                              f"num_attention_heads={self.num_attention_heads}")
        if not isinstance(self.concat_pixels, bool):
            raise ConfigError(f"TowerSettings.concat_pixels={self.concat_pixels!r} must be True or False")


def _check_boxes(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, np.float64)
    if b.ndim != 2 or b.shape[1] != 4:
        raise InputError(f"boxes must be [n, 4] (x1, y1, x2, y2) pixels; got shape {tuple(b.shape)}")
    if not np.isfinite(b).all():
        raise InputError(f"boxes hold non-finite values: {b[~np.isfinite(b).all(1)].tolist()}")
    return b


def box_patch_weights(boxes: np.ndarray, image_hw: tuple[int, int], patch_size: int) -> np.ndarray:
    """RoI pooling weights on the patch grid: ``float32 [n, (H/p) * (W/p)]``, patches row-major (ViT order).

    Row ``i`` is the overlap area of box ``i`` (``x1, y1, x2, y2`` pixels, clipped to the image) with every
    ``p x p`` patch, divided by the clipped box area, so it sums to 1. A box that covers no pixel of the
    image (empty, inverted or outside) raises :class:`InputError`.

    Example (an 8x8 image, 4x4 patches; a box over the left half covers patches 0 and 2 equally):
        >>> box_patch_weights(np.array([[0, 0, 4, 8]]), (8, 8), 4).tolist()
        [[0.5, 0.0, 0.5, 0.0]]
    """
    b = _check_boxes(boxes)
    h, w = int(image_hw[0]), int(image_hw[1])
    if patch_size < 1 or h % patch_size or w % patch_size:
        raise InputError(f"image {h}x{w} is not a grid of {patch_size}x{patch_size} patches")
    x1, x2 = np.clip(b[:, 0], 0, w), np.clip(b[:, 2], 0, w)
    y1, y2 = np.clip(b[:, 1], 0, h), np.clip(b[:, 3], 0, h)
    area = (x2 - x1) * (y2 - y1)
    bad = np.flatnonzero(~((x2 > x1) & (y2 > y1)))
    if len(bad):
        i = int(bad[0])
        raise InputError(f"box {i} {b[i].tolist()} covers no pixel of the {h}x{w} image (need x1 < x2, y1 < y2 "
                         "and an overlap with the image)")
    edges_x = np.arange(0, w // patch_size) * patch_size
    edges_y = np.arange(0, h // patch_size) * patch_size
    ox = np.clip(np.minimum(x2[:, None], edges_x + patch_size) - np.maximum(x1[:, None], edges_x), 0, None)
    oy = np.clip(np.minimum(y2[:, None], edges_y + patch_size) - np.maximum(y1[:, None], edges_y), 0, None)
    overlap = oy[:, :, None] * ox[:, None, :]  # [n, rows, cols]
    return (overlap.reshape(len(b), -1) / area[:, None]).astype(np.float32)


def patch_labels(boxes: np.ndarray, box_labels: Sequence[int], image_hw: tuple[int, int],
                 patch_size: int) -> np.ndarray:
    """``int32 [(H/p) * (W/p)]``: per patch (row-major), the label of the box covering its centre, 0 = none.

    A box ``(x1, y1, x2, y2)`` covers the centre ``(cx, cy)`` when ``x1 <= cx < x2`` and ``y1 <= cy < y2``.
    Where several boxes cover it, the smallest box (by area) wins, ties to the lower box index.

    Example (an 8x8 image, 4x4 patches; a big box 1 everywhere and a small box 2 over the top-left centre):
        >>> patch_labels(np.array([[0, 0, 8, 8], [1, 1, 3, 3]]), [1, 2], (8, 8), 4).tolist()
        [2, 1, 1, 1]
    """
    b = _check_boxes(boxes)
    if len(box_labels) != len(b):
        raise InputError(f"{len(box_labels)} labels for {len(b)} boxes")
    h, w = int(image_hw[0]), int(image_hw[1])
    if patch_size < 1 or h % patch_size or w % patch_size:
        raise InputError(f"image {h}x{w} is not a grid of {patch_size}x{patch_size} patches")
    cx = np.arange(w // patch_size) * patch_size + patch_size / 2
    cy = np.arange(h // patch_size) * patch_size + patch_size / 2
    out = np.zeros((len(cy), len(cx)), np.int32)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    for i in sorted(range(len(b)), key=lambda j: (-area[j], -j)):  # paint big first: the smallest ends on top
        x1, y1, x2, y2 = b[i]
        inside = ((cy >= y1) & (cy < y2))[:, None] & ((cx >= x1) & (cx < x2))[None, :]
        out[inside] = int(box_labels[i])
    return out.reshape(-1)


class PatchClassifier(nn.Module):
    """The tower: a ViT (no pooler) and a linear head over its patch tokens. Returns ``(features, logits)``,
    ``features [b, P, d]`` the last-layer (post-LayerNorm) patch tokens (the class token dropped)."""

    config: ViTConfig
    num_labels: int

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        feats = ViTModel(self.config, name="vit")(pixel_values).last_hidden_state[:, 1:]
        return feats, nn.Dense(self.num_labels, name="head")(feats)


def normalise(images: np.ndarray) -> np.ndarray:
    """``uint8 [..., H, W, 3]`` -> float32 in [-0.5, 0.5] (the scaling of ``roi_features``).

    Example:
        >>> normalise(np.array([[[[0, 255, 51]]]], np.uint8)).tolist()
        [[[[-0.5, 0.5, -0.30000001192092896]]]]
    """
    return np.asarray(images, np.float32) / 255.0 - 0.5


@functools.lru_cache(maxsize=8)
def _functions(cfg: ViTConfig, num_labels: int, learning_rate: float) -> tuple[Any, Any, Any]:
    """Jitted (init, train step, forward) for a config; cached so equal settings share one compile."""
    model = PatchClassifier(cfg, num_labels)
    opt = optax.adamw(learning_rate, weight_decay=0.01)

    def loss_fn(params: Any, images: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        _, logits = model.apply({"params": params}, images)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits.argmax(-1) == labels).mean()

    @jax.jit
    def step(params: Any, opt_state: Any, images: jax.Array, labels: jax.Array) -> tuple[Any, Any, Any, Any]:
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, images, labels)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    h, w = cfg.image_size
    init = jax.jit(lambda key: model.init(key, jnp.zeros((1, h, w, cfg.num_channels)))["params"])
    forward = jax.jit(lambda params, images: model.apply({"params": params}, images))
    return init, step, forward


class RegionTower:
    """The frozen vision tower and its RoI pooling (see the module docstring).

    ``fit(examples)`` trains patch classification on the examples' images; ``features(examples)`` gives each
    example's candidate features ``float32 [n_i, feature_size]``; ``patch_outputs(images)`` the tower's patch
    features and logits; ``patch_accuracy(examples)`` the share of patches labelled right and the majority-class
    baseline.

    Example (a tiny untrained tower on the shapes world's 64x64 images):
        >>> from vlpeft_jax.data.refexp import RefExpConfig, build_refexp
        >>> data = build_refexp(RefExpConfig(num_train=2, num_val=0, num_test=0))
        >>> s = TowerSettings(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        ...                   concat_pixels=True)
        >>> t = RegionTower(s, data.fact_base.categories, (64, 64))
        >>> t.num_patches, t.feature_size, t.label_of[data.fact_base.categories[1]]
        (64, 56, 2)
    """

    def __init__(self, settings: TowerSettings, categories: Sequence[str], image_size: tuple[int, int]) -> None:
        if not isinstance(settings, TowerSettings):
            raise ConfigError(f"settings must be a TowerSettings, got {type(settings).__name__}")
        categories = tuple(categories)
        if not categories or len(set(categories)) != len(categories):
            raise ConfigError(f"categories must be non-empty and distinct; got {categories!r}")
        h, w = int(image_size[0]), int(image_size[1])
        p = settings.patch_size
        if h % p or w % p:
            raise ConfigError(f"TowerSettings.patch_size={p} does not divide the image size {h}x{w}")
        self.settings, self.categories, self.image_size = settings, categories, (h, w)
        self.label_of = {c: i + 1 for i, c in enumerate(categories)}
        """Category -> patch label (0 is background)."""
        self.config = ViTConfig(hidden_size=settings.hidden_size, num_hidden_layers=settings.num_hidden_layers,
                                num_attention_heads=settings.num_attention_heads,
                                intermediate_size=settings.intermediate_size, image_size=(h, w),
                                patch_size=(p, p), add_pooling_layer=False)
        init, self._step, self._forward = _functions(self.config, len(categories) + 1, float(settings.learning_rate))
        self.params = init(jax.random.key(settings.seed))

    @property
    def num_patches(self) -> int:
        return self.config.num_patches

    @property
    def feature_size(self) -> int:
        s = self.settings
        return s.hidden_size + (s.roi_grid * s.roi_grid * 3 if s.concat_pixels else 0)

    # ------------------------------------------------------------------------------------ inputs
    def _image(self, ex: rx.RefExample) -> np.ndarray:
        image = ex.pixels()
        if image.shape != (*self.image_size, 3):
            raise InputError(f"{ex.expr_id}: image of shape {image.shape}; the tower takes "
                             f"{self.image_size[0]}x{self.image_size[1]}x3")
        return image

    def labels(self, ex: rx.RefExample) -> np.ndarray:
        """:func:`patch_labels` of an example's image, its candidates labelled by category."""
        unknown = [c for c in ex.categories if c not in self.label_of]
        if unknown:
            raise InputError(f"{ex.expr_id}: category {unknown[0]!r} is not among the tower's "
                             f"{len(self.categories)} categories ({', '.join(self.categories[:6])}, ...)")
        return patch_labels(ex.boxes, [self.label_of[c] for c in ex.categories], self.image_size,
                            self.settings.patch_size)

    def _unique_images(self, examples: Sequence[rx.RefExample]) -> tuple[list[rx.RefExample], list[int]]:
        """One example per image id (first seen) and, per example, its image's row."""
        rows: dict[str, int] = {}
        first: list[rx.RefExample] = []
        index = []
        for ex in examples:
            if ex.image_id not in rows:
                rows[ex.image_id] = len(first)
                first.append(ex)
            index.append(rows[ex.image_id])
        return first, index

    # ---------------------------------------------------------------------------------- training
    def fit(self, examples: Sequence[rx.RefExample]) -> dict[str, Any]:
        """Trains patch classification on the (deduplicated) images of ``examples``; returns the log.

        Each step takes ``batch_size`` images (shuffled epochs). The log holds ``steps``, ``images``,
        ``seconds``, ``loss_first``/``loss_last`` (batch loss of the first/last step) and ``curve``: up to 20
        evenly spaced ``(step, batch loss, batch patch accuracy)``.
        """
        s = self.settings
        unique, _ = self._unique_images(examples)
        if not unique:
            raise InputError("the region tower needs at least one training example; none were given")
        images = normalise(np.stack([self._image(ex) for ex in unique]))
        labels = np.stack([self.labels(ex) for ex in unique])
        rng = np.random.default_rng((s.seed, 1))
        opt_state = optax.adamw(s.learning_rate, weight_decay=0.01).init(self.params)
        order: np.ndarray = np.zeros(0, np.int64)
        every = max(1, s.steps // 20)
        curve, losses = [], []
        start = time.perf_counter()
        for step in range(s.steps):
            while len(order) < s.batch_size:
                order = np.concatenate([order, rng.permutation(len(unique))])
            idx, order = order[:s.batch_size], order[s.batch_size:]
            self.params, opt_state, loss, acc = self._step(self.params, opt_state, jnp.asarray(images[idx]),
                                                           jnp.asarray(labels[idx]))
            if step % every == 0 or step == s.steps - 1:
                curve.append((step, float(loss), float(acc)))
            losses.append(loss)
        nan = float("nan")
        return {"steps": s.steps, "images": len(unique), "seconds": time.perf_counter() - start,
                "loss_first": float(losses[0]) if losses else nan, "loss_last": float(losses[-1]) if losses else nan,
                "curve": curve}

    # ---------------------------------------------------------------------------------- features
    def patch_outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(features float32 [b, P, d], logits float32 [b, P, labels])`` of ``uint8 [b, H, W, 3]`` images,
        ``FORWARD_CHUNK`` images per jitted forward."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (*self.image_size, 3):
            raise InputError(f"images of shape {images.shape}; the tower takes [b, {self.image_size[0]}, "
                             f"{self.image_size[1]}, 3]")
        size = min(FORWARD_CHUNK, 1 << max(0, len(images) - 1).bit_length())  # few distinct shapes: few compiles
        feats, logits = [], []
        for start in range(0, len(images), size):
            chunk = normalise(images[start:start + size])
            real = len(chunk)
            if real < size:
                chunk = np.concatenate([chunk, np.zeros((size - real, *chunk.shape[1:]), np.float32)])
            f, lg = self._forward(self.params, jnp.asarray(chunk))
            feats.append(np.asarray(f)[:real])
            logits.append(np.asarray(lg)[:real])
        if not feats:
            return (np.zeros((0, self.num_patches, self.settings.hidden_size), np.float32),
                    np.zeros((0, self.num_patches, len(self.categories) + 1), np.float32))
        return np.concatenate(feats), np.concatenate(logits)

    def features(self, examples: Sequence[rx.RefExample]) -> list[np.ndarray]:
        """Per example, ``float32 [n_i, feature_size]``: each candidate box's RoI-pooled tower feature
        (:func:`box_patch_weights` times the patch features), then, with ``concat_pixels``, its pooled pixels."""
        unique, index = self._unique_images(examples)
        pixels = {ex.image_id: self._image(ex) for ex in unique}
        feats, _ = self.patch_outputs(np.stack([pixels[ex.image_id] for ex in unique]) if unique
                                      else np.zeros((0, *self.image_size, 3), np.uint8))
        out = []
        for ex, row in zip(examples, index, strict=True):
            weights = box_patch_weights(ex.boxes, self.image_size, self.settings.patch_size)
            region = weights @ feats[row]
            if self.settings.concat_pixels:
                region = np.concatenate([region, roi_features(pixels[ex.image_id], ex.boxes, self.settings.roi_grid)],
                                        axis=1)
            out.append(region.astype(np.float32))
        return out

    def patch_accuracy(self, examples: Sequence[rx.RefExample]) -> dict[str, float]:
        """On the examples' (deduplicated) images: ``accuracy`` (patches whose argmax is their label),
        ``object_accuracy`` (the same over non-background patches), ``majority`` (the accuracy of always
        predicting the most frequent label) and ``patches``."""
        unique, _ = self._unique_images(examples)
        if not unique:
            raise InputError("patch_accuracy needs at least one example")
        labels = np.stack([self.labels(ex) for ex in unique]).ravel()
        _, logits = self.patch_outputs(np.stack([self._image(ex) for ex in unique]))
        pred = logits.argmax(-1).ravel()
        obj = labels > 0
        return {"accuracy": float((pred == labels).mean()),
                "object_accuracy": float((pred[obj] == labels[obj]).mean()) if obj.any() else float("nan"),
                "majority": float(np.bincount(labels).max() / len(labels)), "patches": int(len(labels))}


def tower_region_features(data: rx.RefExpData, settings: TowerSettings,
                          train_split: str = "train") -> tuple[dict[str, list[np.ndarray]], dict[str, Any]]:
    """Trains a :class:`RegionTower` on ``data[train_split]``, freezes it and returns ``(features, log)``:
    ``features[split][i]`` is ``float32 [n_i, feature_size]`` for ``data[split][i]``; the log is the fit log plus
    every non-empty split's ``patch_accuracy`` (``<split>_accuracy`` etc.) and ``feature_seconds``.

    Computed once per process and (settings, data config) — per data object when it has no config — since the
    runner builds the task twice (training, then evaluation).

    Example:
        >>> from vlpeft_jax.data.refexp import RefExpConfig, build_refexp
        >>> data = build_refexp(RefExpConfig(num_train=2, num_val=1, num_test=0))
        >>> s = TowerSettings(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        ...                   steps=1, batch_size=1)
        >>> feats, log = tower_region_features(data, s)
        >>> feats["val"][0].shape == (len(data["val"][0].boxes), 8), tower_region_features(data, s)[0] is feats
        (True, True)
    """
    key = (settings, train_split, repr(data.config) if data.config is not None else id(data))
    if key not in _CACHE:
        images = {ex.pixels().shape[:2] for ex in data[train_split][:1]}
        if not images:
            raise InputError(f"split {train_split!r} has no examples to train the region tower on")
        tower = RegionTower(settings, data.fact_base.categories, images.pop())
        log = tower.fit(data[train_split])
        for split, examples in data.splits.items():
            if examples:
                log.update({f"{split}_{k}": v for k, v in tower.patch_accuracy(examples).items()})
        start = time.perf_counter()
        feats = {split: tower.features(examples) for split, examples in data.splits.items()}
        log["feature_seconds"] = time.perf_counter() - start
        _CACHE[key] = (data, feats, log, tower)  # the data is held so that its id is not reused
    return _CACHE[key][1], _CACHE[key][2]


def trained_tower(data: rx.RefExpData, settings: TowerSettings, train_split: str = "train") -> RegionTower:
    """The frozen tower behind :func:`tower_region_features` (trained then, once per process), for the features of
    other boxes of the same images (e.g. a detector's, :func:`vlpeft_jax.data.refexp.detect`)."""
    tower_region_features(data, settings, train_split)
    return _CACHE[(settings, train_split, repr(data.config) if data.config is not None else id(data))][3]
