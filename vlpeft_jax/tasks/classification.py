"""Image-level classification on the shapes world: one head per label task, single- and multi-label.

The shapes world labels every image for several tasks (:data:`vlpeft_jax.data.shapes.LABEL_CLASSES`):
single-label ones (``count``, ``dominant_color``, ``position``, ``largest_shape``: one class per image) and
multi-label ones (:data:`~vlpeft_jax.data.shapes.MULTI_HOT_LABELS`, ``shape_presence`` and
``color_presence``: a multi-hot vector). ``config.heads`` names the tasks to learn; the model is a
``vision_classifier`` (:mod:`vlpeft_jax.models.classifier`) with one head per task, which the task sizes
(:meth:`ClassificationTask.model_config` fills ``config.model.heads`` with ``{label: number of classes}``).

Loss: the **sum** over heads of each head's mean loss: softmax cross-entropy for a single-label head,
sigmoid binary cross-entropy (mean over its classes) for a multi-label head. With a sum each head's
gradient is what it would be trained alone (linear scalarisation with unit weights, the "Joint Train"
baseline that multi-task methods re-weight); each head's loss is logged as ``<head>/loss``.

Metrics on ``config.eval.split`` (the first ``eval.max_examples`` images; 0 = all), each in [0, 1]:

- ``accuracy`` (single-label heads): top-1 accuracy;
- ``mAP``: mean over classes of the average precision of that class's scores over the evaluation images
  (:func:`average_precision`, the step-wise definition ``Σ_n (R_n − R_{n−1}) P_n`` of
  ``sklearn.metrics.average_precision_score``, tied scores forming one threshold), over the classes with at
  least one positive image (a class never present has no AP). Multi-label heads score the sigmoids;
  single-label heads score one-vs-rest with the softmax, so every head has an mAP;
- ``chance accuracy`` / ``chance mAP``: what the label prior alone reaches on the same images: always
  predicting the training split's most frequent class, and constant scores (whose AP is the class's
  prevalence). A linear probe's heads start at random, so the run's "zero-shot" model is chance by
  construction; these columns are the honest reference instead.

Metrics that do not apply are absent (the report prints n/a): ``accuracy`` and ``chance accuracy`` for
multi-label heads. Evaluation results follow :mod:`vlpeft_jax.tasks.base` with one group per head
(``group_label`` ``head``); ``outputs`` maps each image id to ``{head: {"prediction", "scores"}}``
(a class name, or the list of class names whose sigmoid is >= 0.5) and are written as
``predictions_<model>.json``.

Training batches are every training image with all selected labels, in the epoch order of
:class:`~vlpeft_jax.data.batching.EpochSampler` (a function of seed and step only)::

    pixel_values float32 [b, H, W, 3]   labels {head: int32 [b] | int32 [b, k]}   example_index, valid

Groups depend on the config (``config.heads``); the class attribute :attr:`ClassificationTask.groups` is
the default set :data:`DEFAULT_HEADS`, and :meth:`ClassificationTask.groups_for` gives a config's.

Example (the metrics on tiny hand-made scores):
    >>> import numpy as np
    >>> average_precision(np.array([0.9, 0.8, 0.3, 0.1]), np.array([1, 0, 1, 0]))  # (1/2)·1 + (1/2)·(2/3)
    0.8333333333333333
    >>> mean_average_precision(np.array([[0.9, 0.2], [0.1, 0.7]]), np.array([[1, 0], [0, 0]]))  # class 1: no positive
    1.0
    >>> float(single_label_loss(np.zeros((2, 4), np.float32), np.array([0, 3])))  # log(4)
    1.3862943649291992
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vlpeft_jax.data import shapes
from vlpeft_jax.data.batching import EpochSampler
from vlpeft_jax.data.images import ImagePreprocessor
from vlpeft_jax.errors import ConfigError
from vlpeft_jax.peft import base as peft_base
from vlpeft_jax.tasks import base

DEFAULT_HEADS = ("count", "shape_presence")
REPORT_METRICS = ("accuracy", "mAP", "mIoU", "chance accuracy", "chance mAP")
SELECTION_KEYS = ("num_batches", "batch_size", "seed")
MODEL_FAMILY = "vision_classifier"


# ------------------------------------------------------------------------------------ losses and metrics


def is_multi_label(head: str) -> bool:
    """Whether the shapes-world label ``head`` is multi-hot (sigmoid loss) rather than one class (softmax)."""
    return head in shapes.MULTI_HOT_LABELS


def is_patch_label(head: str) -> bool:
    """Whether ``head`` is a patch-level (dense) label: one class per vision patch (softmax per patch)."""
    return head in shapes.PATCH_LABEL_CLASSES


def mean_iou(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Mean over classes of ``|pred ∩ true| / |pred ∪ true|``, over the classes present in the labels or the
    predictions (the confusion-matrix mIoU of segmentation benchmarks, with patches as pixels).

    Example:
        >>> mean_iou(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2]), 3)  # IoUs 1/2, 1/2, 1
        0.6666666666666666
    """
    p, t = np.asarray(predictions).ravel(), np.asarray(labels).ravel()
    confusion = np.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)
    inter = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - inter
    present = union > 0
    return float(np.mean(inter[present] / union[present]))


def single_label_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of ``logits`` ``[b, k]`` against class ids ``labels`` ``[b]`` (also
    ``[b, n, k]`` against ``[b, n]``: patch heads, the mean over images and patches)."""
    return optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits, jnp.float32), labels).mean()


def multi_label_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over images and classes of the sigmoid binary cross-entropy of ``logits`` ``[b, k]`` against
    multi-hot ``targets`` ``[b, k]``."""
    logits = jnp.asarray(logits, jnp.float32)
    return optax.sigmoid_binary_cross_entropy(logits, jnp.asarray(targets, jnp.float32)).mean()


def head_loss(head: str, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The loss of one head by its label kind."""
    return multi_label_loss(logits, labels) if is_multi_label(head) else single_label_loss(logits, labels)


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Average precision of one class: ``Σ_n (R_n − R_{n−1}) P_n`` over the distinct score thresholds, highest
    first (images with equal scores are one threshold), as ``sklearn.metrics.average_precision_score``.

    Raises:
      ValueError: ``positives`` has no positive (the AP is undefined).
    """
    scores = np.asarray(scores, np.float64).ravel()
    positives = np.asarray(positives).ravel() > 0
    if not positives.any():
        raise ValueError("average precision needs at least one positive")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], positives[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # the last image of each threshold
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Mean of :func:`average_precision` over the classes (columns of ``[n, k]`` arrays) with at least one
    positive; NaN when no class has one."""
    aps = [average_precision(scores[:, c], positives[:, c]) for c in range(scores.shape[1]) if positives[:, c].any()]
    return float(np.mean(aps)) if aps else float("nan")


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return (np.asarray(labels)[:, None] == np.arange(num_classes)[None]).astype(np.int32)


def head_metrics(head: str, scores: np.ndarray, labels: np.ndarray, train_labels: np.ndarray
                 ) -> tuple[dict[str, float], dict[str, str]]:
    """``(metrics, unavailable)`` of one head (see the module docstring) from its evaluation ``scores``
    (probabilities ``[n, k]``), true ``labels`` and the training split's labels (for the chance columns)."""
    k = scores.shape[-1]
    metrics: dict[str, float] = {}
    if is_patch_label(head):  # every patch is one sample of a single-label problem
        scores, labels, train_labels = scores.reshape(-1, k), np.ravel(labels), np.ravel(train_labels)
        metrics["mIoU"] = mean_iou(scores.argmax(-1), labels, k)
    if is_multi_label(head):
        positives = np.asarray(labels)
    else:
        positives = one_hot(labels, k)
        metrics["accuracy"] = float(np.mean(scores.argmax(-1) == labels))
        majority = int(np.bincount(train_labels, minlength=k).argmax())
        metrics["chance accuracy"] = float(np.mean(labels == majority))
    present = positives.any(axis=0)
    if not present.any():
        return metrics, {"mAP": f"no evaluation image has a positive class for head {head!r}"}
    metrics["mAP"] = mean_average_precision(scores, positives)
    metrics["chance mAP"] = float(positives[:, present].mean(axis=0).mean())  # constant scores: AP = prevalence
    return metrics, {}


# ------------------------------------------------------------------------------------------------ data


def world_config(cfg: ml_collections.ConfigDict) -> tuple[shapes.ShapesWorldConfig, str | None]:
    """The shapes world of ``config.data`` (not generated) and its cache directory."""
    data = cfg.data.to_dict()
    if data.pop("kind", "shapes") != "shapes":
        raise ConfigError("data.kind: classification reads the shapes world's labels; only 'shapes' is wired in")
    cache = data.pop("cache_dir", None)
    fields = {f.name for f in dataclasses.fields(shapes.ShapesWorldConfig)}
    base.check_settings("data", data, fields)
    return shapes.ShapesWorldConfig(**data), cache


class ClassificationBatches:
    """Fixed-size batches of images and their labels, by (seed, step) (see the module docstring).

    Args:
      images: uint8 ``[N, H, W, 3]`` already at the tower's size.
      labels: ``{head: [N] class ids | [N, k] multi-hot}``.
      preprocessor: normalises the images.
      batch_size, seed, shuffle, drop_remainder: as :class:`~vlpeft_jax.data.batching.EpochSampler`.

    Example:
        >>> b = ClassificationBatches(np.zeros((5, 4, 4, 3), np.uint8), {"count": np.arange(5)},
        ...                           ImagePreprocessor(size=4), batch_size=2, seed=0)
        >>> x = b.batch(0)
        >>> x["pixel_values"].shape, x["labels"]["count"].tolist() == x["example_index"].tolist()
        ((2, 4, 4, 3), True)
    """

    def __init__(self, images: np.ndarray, labels: Mapping[str, np.ndarray], preprocessor: ImagePreprocessor,
                 batch_size: int, seed: int = 0, shuffle: bool = True, drop_remainder: bool = True):
        self.images, self.labels, self.preprocessor = images, dict(labels), preprocessor
        self.sampler = EpochSampler(len(images), batch_size, seed, shuffle, drop_remainder)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def batch(self, step: int) -> dict[str, Any]:
        """The batch of global ``step``; padding rows (``valid`` False) hold zeros."""
        idx = self.sampler.indices(step)
        valid = idx >= 0
        safe = np.where(valid, idx, 0)
        pixels = self.preprocessor.normalize(self.images[safe])
        pixels[~valid] = 0.0
        labels = {}
        for head, y in self.labels.items():
            rows = np.asarray(y[safe], np.int32)
            rows[~valid] = 0
            labels[head] = rows
        return {"pixel_values": pixels, "labels": labels, "example_index": np.where(valid, idx, -1).astype(np.int32),
                "valid": valid}

    def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[dict[str, Any]]:
        """Batches from ``start_step`` on (across epochs); forever when ``num_steps`` is None."""
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            yield self.batch(step)
            step += 1


# ------------------------------------------------------------------------------------------------ task


class ClassificationTask:
    """Classification heads on the shapes world's label tasks (see the module docstring)."""

    name = "classification"
    groups: tuple[str, ...] = DEFAULT_HEADS  # the default heads; an instance has its config's (groups_for)
    group_label = "head"
    group_note = ("one row per head (label task); single-label heads report accuracy, all heads mAP; chance = "
                  "the training split's label prior.")
    report_metrics = REPORT_METRICS
    primary_metric = "mAP"  # the one metric every head has

    def __init__(self, cfg: ml_collections.ConfigDict, world: shapes.ShapesWorld | None = None,
                 tokenizer: Any = None) -> None:
        del tokenizer  # shared data of LM tasks over the same world; classification needs none
        self.cfg = cfg
        self._world = world
        self.world_config, self._cache_dir = (world.config, None) if world is not None else world_config(cfg)
        self.groups = self.groups_for(cfg)
        classes = {**self.world_config.label_classes(), **shapes.PATCH_LABEL_CLASSES}
        self.classes = {h: classes[h] for h in self.groups}
        kinds = ", ".join(f"{h} ({'patch' if is_patch_label(h) else 'multi' if is_multi_label(h) else 'single'}-"
                          f"label, {len(c)} classes)" for h, c in self.classes.items())
        self.group_note = f"heads: {kinds}; " + type(self).group_note
        split = cfg.eval.get("split", "val")
        if split not in shapes.SPLITS:
            raise ConfigError(f"eval.split={split!r}; valid: {', '.join(shapes.SPLITS)}")
        size = self._tower_config().get("image_size", 224)
        self.preprocessor = ImagePreprocessor(size=tuple(size) if isinstance(size, (list, tuple)) else size,
                                              resample="bilinear")
        self._pixels: dict[str, np.ndarray] = {}

    @classmethod
    def groups_for(cls, cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
        """The heads of ``cfg`` (``config.heads``, default :data:`DEFAULT_HEADS`), checked: known labels, no
        repeats."""
        heads = tuple(cfg.get("heads") or DEFAULT_HEADS)
        unknown = [h for h in heads if h not in shapes.LABEL_CLASSES and h not in shapes.PATCH_LABEL_CLASSES]
        if unknown:
            raise ConfigError(f"heads: unknown label(s) {', '.join(map(repr, unknown))}; valid: "
                              f"{', '.join([*shapes.LABEL_CLASSES, *shapes.PATCH_LABEL_CLASSES])}")
        if len(set(heads)) != len(heads):
            raise ConfigError(f"heads={list(heads)} names a label twice")
        return heads

    # ------------------------------------------------------------------------------- data and model

    @property
    def world(self) -> shapes.ShapesWorld:
        """The shapes world, generated or read from ``data.cache_dir`` on first use."""
        if self._world is None:
            self._world = shapes.load_or_generate(self.world_config, self._cache_dir)
        return self._world

    def shared_data(self) -> dict[str, Any]:
        return {"world": self.world}

    def _tower_config(self) -> Mapping[str, Any]:
        m = self.cfg.model
        if m.get("family") != MODEL_FAMILY:
            raise ConfigError(f"task 'classification' needs model.family={MODEL_FAMILY!r} (a vision tower or a VLM's "
                              f"visual tokens with one head per label); got {m.get('family')!r}")
        tower = m.get("vision") or (m.get("vlm") or {}).get("vision")
        if not tower:
            raise ConfigError("model.vision (or model.vlm.vision): the classifier's vision tower is missing")
        return tower

    def model_config(self) -> dict[str, Any]:
        """``config.model`` with ``heads = {label: number of classes}`` for ``config.heads`` on this world.

        ``config.heads`` decides: a ``model.heads`` written in the config (a hint for tools that size the model
        without building the task) is replaced, with a note when it says otherwise (e.g. after
        ``--config.heads=...``)."""
        m = self.cfg.model.to_dict()
        heads = {h: len(c) for h, c in self.classes.items()}
        given = dict(m.get("heads") or {})
        if given and given != heads:
            print(f"note: model.heads={given} replaced by {heads} (config.heads={list(self.groups)})")
        m["heads"] = heads
        patch = [h for h in self.groups if is_patch_label(h)]
        if patch:
            m["patch_heads"] = patch
        else:
            m.pop("patch_heads", None)
        return m

    def save_assets(self, run_dir: Path) -> None:
        """``heads.json``: each head's kind and class names (what reading the predictions back needs)."""
        info = {h: {"kind": "patch" if is_patch_label(h) else "multi_label" if is_multi_label(h) else "single_label",
                    "classes": list(c)}
                for h, c in self.classes.items()}
        (Path(run_dir) / "heads.json").write_text(json.dumps(info, indent=1))

    def pixels(self, split: str) -> np.ndarray:
        """uint8 images of ``split`` at the tower's size (resized once if the world's differ)."""
        if split not in self._pixels:
            images = self.world[split].images
            if images.shape[1:3] != self.preprocessor.height_width:
                images = np.stack([self.preprocessor.to_uint8(im) for im in images])
            self._pixels[split] = images
        return self._pixels[split]

    def labels(self, split: str) -> dict[str, np.ndarray]:
        """Every head's labels on ``split``: ``[N]`` classes, ``[N, k]`` multi-hot, or ``[N, patches]`` patch
        classes at the tower's patch size."""
        data = self.world[split]
        return {h: data.patch_labels(h, self.patch_size) if is_patch_label(h) else data.labels(h) for h in self.groups}

    @property
    def patch_size(self) -> int:
        """The tower's patch size in pixels of the world's images (patch labels are at this grain)."""
        tower = self._tower_config()
        size = tower.get("image_size", 224)
        size = size[0] if isinstance(size, (list, tuple)) else size
        patch = tower.get("patch_size", 16)
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        scale = self.world_config.image_size / size
        if scale * patch != int(scale * patch) or self.world_config.image_size % int(scale * patch):
            raise ConfigError(f"patch labels: the tower's patches ({patch} px of {size}) do not tile the world's "
                              f"{self.world_config.image_size}-px images")
        return int(scale * patch)

    def _batches(self, batch_size: int, seed: int) -> ClassificationBatches:
        return ClassificationBatches(self.pixels("train"), self.labels("train"), self.preprocessor, batch_size, seed)

    def train_batches(self, seed: int) -> base.Batches:
        return self._batches(self.cfg.train.batch_size, seed)

    def selection_batches(self, settings: Mapping[str, Any], seed: int) -> Iterable[dict[str, Any]]:
        """``num_batches`` batches of training images with their labels (order from ``seed``)."""
        base.check_settings("selection", settings, SELECTION_KEYS)
        batches = self._batches(settings.get("batch_size") or self.cfg.train.batch_size, seed)
        print(f"selection data: {settings['num_batches']} batches of labelled training images")
        return ({"pixel_values": jnp.asarray(b["pixel_values"]), "labels": jax.tree.map(jnp.asarray, b["labels"])}
                for b in batches.iterate(0, settings["num_batches"]))

    # ------------------------------------------------------------------------------- loss and evaluation

    def _head_losses(self, module: Any, methods: base.Methods, params: Any, batch: Mapping[str, Any],
                     rng: jax.Array) -> tuple[jax.Array, dict, Any]:
        """``(losses [T] in head order, metrics, records)`` of one training forward pass."""
        out, records = peft_base.apply_with(
            module.apply, base.active_methods(methods, params), {"params": params["base"]},
            batch["pixel_values"], rng=rng, train=True, side_inputs=batch.get("side_inputs"), record=True)
        losses, metrics = [], {}
        for head in self.groups:
            logits, labels = out.logits[head], batch["labels"][head]
            loss = head_loss(head, logits, labels)
            losses.append(loss)
            metrics[f"{head}/loss"] = loss
            if not is_multi_label(head):
                metrics[f"{head}/accuracy"] = jnp.mean(logits.argmax(-1) == labels)
        return jnp.stack(losses), metrics, records

    def loss_fn(self, module: Any, methods: base.Methods, loss_weights: Mapping[str, float]) -> base.LossFn:
        """The sum of the heads' losses, plus the methods' recorded loss terms; logs ``<head>/loss`` (and
        ``<head>/accuracy`` for single-label and patch heads)."""

        def loss_fn(params: Any, batch: Mapping[str, Any], rng: jax.Array) -> tuple[jax.Array, dict]:
            losses, metrics, records = self._head_losses(module, methods, params, batch, rng)
            return base.add_loss_terms(losses.sum(), metrics, records, loss_weights)

        return loss_fn

    def task_losses_fn(self, module: Any, methods: base.Methods, loss_weights: Mapping[str, float]
                       ) -> Callable[[Any, Mapping[str, Any], jax.Array], tuple[jax.Array, dict]]:
        """``(params, batch, rng) -> (losses [T], metrics)``: one loss per head, in :attr:`groups` order, for
        multi-task training (:mod:`vlpeft_jax.mtl`), which combines the heads' gradients itself.

        Raises:
          ConfigError (when traced): a method records loss terms of its own; they belong to no task, so a
          gradient-manipulation method could not place them.
        """
        del loss_weights

        def task_losses(params: Any, batch: Mapping[str, Any], rng: jax.Array) -> tuple[jax.Array, dict]:
            losses, metrics, records = self._head_losses(module, methods, params, batch, rng)
            if records.loss_terms():
                raise ConfigError(f"multi-task training: the methods record loss terms "
                                  f"{sorted(records.loss_terms())} that belong to no task; use them without mtl")
            return losses, metrics

        return task_losses

    def predict(self, module: Any, params: Any, methods: base.Methods, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Probabilities ``{head: [n, k]}`` (softmax or sigmoid by label kind) for uint8 ``pixels`` ``[n, H, W, 3]``,
        in fixed-size batches of ``config.eval.batch_size`` (one compilation)."""

        @jax.jit
        def probabilities(p: Any, x: jax.Array) -> dict[str, jax.Array]:
            out = peft_base.apply_with(module.apply, base.active_methods(methods, p), {"params": p["base"]}, x)
            return {h: jax.nn.sigmoid(out.logits[h]) if is_multi_label(h) else jax.nn.softmax(out.logits[h])
                    for h in self.groups}

        batches = ClassificationBatches(pixels, {}, self.preprocessor, self.cfg.eval.batch_size, shuffle=False,
                                        drop_remainder=False)
        parts: dict[str, list[np.ndarray]] = {h: [] for h in self.groups}
        for b in batches.iterate(0, batches.steps_per_epoch):
            probs = jax.device_get(probabilities(params, jnp.asarray(b["pixel_values"])))
            for h in self.groups:
                parts[h].append(np.asarray(probs[h])[b["valid"]])
        return {h: np.concatenate(v) for h, v in parts.items()}

    def evaluate(self, module: Any, params: Any, methods: base.Methods) -> dict[str, Any]:
        """Each head's predictions on the evaluation split and their metrics (module docstring)."""
        split = self.world[self.cfg.eval.split]
        n = base.eval_count(self.cfg, len(split))
        probs = self.predict(module, params, methods, self.pixels(self.cfg.eval.split)[:n])
        truth = {h: y[:n] for h, y in self.labels(self.cfg.eval.split).items()}
        train = self.labels("train")
        results: dict[str, Any] = {}
        for h in self.groups:
            metrics, unavailable = head_metrics(h, probs[h], truth[h], train[h])
            results[h] = {"metrics": metrics, "unavailable": unavailable}
        ids = [s["image_id"] for s in split.scenes[:n]]
        outputs = {i: {h: {"prediction": self.describe(h, probs[h][r], scores=True),
                           "scores": np.round(probs[h][r].astype(np.float64), 4).tolist()} for h in self.groups}
                   for r, i in enumerate(ids)}
        results["samples"] = [{"id": i, "output": self.summary({h: o["prediction"] for h, o in outputs[i].items()})}
                              for i in ids[:8]]
        results["outputs"] = outputs
        return results

    # ---------------------------------------------------------------------------------------- report

    def describe(self, head: str, value: np.ndarray | int, scores: bool = False) -> str | list[str]:
        """A head's prediction (``scores=True``: from probabilities) or true label as class name(s)."""
        names = self.classes[head]
        v = np.asarray(value)
        if is_patch_label(head):  # the classes of the non-background patches, "-" for background
            ids = v.argmax(-1) if scores else v
            return ["-" if int(i) == 0 else names[int(i)] for i in np.ravel(ids)]
        if is_multi_label(head):
            hot = v >= 0.5 if scores else v > 0
            return [names[c] for c in np.nonzero(hot)[0]]
        return names[int(v.argmax()) if scores else int(v)]

    @staticmethod
    def summary(by_head: Mapping[str, str | list[str]]) -> str:
        """``"count=2; shape_presence=circle+square"`` (``none`` for an empty multi-label prediction)."""
        text = {h: "+".join(v) or "none" if isinstance(v, list) else v for h, v in by_head.items()}
        return "; ".join(f"{h}={v}" for h, v in text.items())

    def outputs_file(self, outputs: Mapping[str, Any]) -> tuple[str, list[dict[str, Any]]]:
        """``predictions_<model>.json``: per image, each head's prediction and class probabilities."""
        return "predictions", [{"image_id": i, "predictions": {h: o["prediction"] for h, o in heads.items()},
                                "scores": {h: o["scores"] for h, o in heads.items()}} for i, heads in outputs.items()]

    def samples(self, results: Mapping[str, Mapping[str, Any]], n: int) -> list[base.Sample]:
        """The first ``n`` evaluation images with each model's predictions and the true labels."""
        split = self.world[self.cfg.eval.split]
        truth = self.labels(self.cfg.eval.split)
        out = []
        for r in range(min(n, len(split))):
            image_id = split.scenes[r]["image_id"]
            lines = [f"{label}: " + self.summary({h: o["prediction"] for h, o in res["outputs"][image_id].items()})
                     for label, res in results.items() if image_id in res["outputs"]]
            true = self.summary({h: self.describe(h, truth[h][r]) for h in self.groups})
            out.append(base.Sample(image=split.images[r], lines=[*lines, f"true: {true}"]))
        return out

