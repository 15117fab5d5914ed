"""CK-Transformer (CK-T): referring-expression comprehension with commonsense facts (thesis ch. 3, App. A).

Source: ``shared/seeds/004_21d0d480fe4006f4.txt`` ch. 3 (§3.3) and App. A.2-A.3; the spec sheet
``shared/specs/ckt.md`` §1-4 (with the ambiguities of §10 resolved as proposed there). The task is
classification over the ``n`` candidate regions of an image (spec §1):

- :class:`BiModalEncoder` is the single-stream UNITER-style encoder (spec §4.1). Regions get
  ``E_I = LN(fc(V) + fc(G) + M_I)`` (App. Eq. (1)), the text (expression *or* one fact, starting with
  [CLS]) gets ``E_T = LN(T + P + M_T)`` (App. Eq. (2)), the two are concatenated image first
  (App. Eq. (3)) and run through post-LN BERT layers with a padding mask. Its outputs are the vision
  output at each region, the language output at each token and the cross-modality output at the text's
  [CLS] (App. A.2). Regions have no position embedding beyond their geometry (spec B16), so the encoder is
  permutation-equivariant over candidates.
- :class:`CKTransformer` takes the expression-aware object feature ``f_i^e`` (the vision output at c_i of
  the (regions, expression) pass) and the K fact-aware features ``F_i^f`` (the vision output at c_i of the
  (regions, fact) passes; the same encoder, spec §4.1, B7, B8). Fact passes are deduplicated: one pass per
  unique (image, fact) for all ``P`` facts of the image, then gathered per candidate with ``fact_index``
  (spec §11.8). ``M`` fact-aware blocks fuse them (spec §4.2, reconstruction B6):
  ``y = LN(x + MHA(Q = x, K = V = F_i^f))``, ``x' = LN(y + FFN(y))``, starting from ``x = f_i^e``;
  the score is ``s_i = w^T f_i^t + b``. Padded facts (``fact_index == -1``, spec B5) are masked out of the
  attention keys. **A candidate with no fact at all** (every ``fact_index`` -1) skips the blocks:
  ``f_i^t = f_i^e`` (our definition; the thesis always has K facts).
- :func:`refexp_loss` is the cross-entropy over candidates (spec §4.3).
- :class:`FactRetriever` and :func:`cosine` / :func:`retriever_loss` are the similarity extractor of image-based
  fact search (spec §2, B1-B3): the cosine of the [CLS] outputs of (regions, expression) and (regions, fact),
  regressed onto 1 for the ground-truth fact and 0 for a random one. It is a separate encoder copy (B2).

Parameter layout. The encoder's text embeddings and layers use BERT's names (``embeddings/{word_embeddings,
position_embeddings, token_type_embeddings, LayerNorm}``, ``encoder/layer_i/...``), so they can be initialised
from a BERT checkpoint. As in UNITER, the modality vectors are rows of ``token_type_embeddings``: row 0 is
``M_T``, row 1 is ``M_I``. The image embedding is ``img_embeddings/{img_linear, pos_linear, LayerNorm}``
(fc(V), fc(G) and the LN of Eq. (1)). The classifier is ``fact_block_m/{attention, intermediate, output}``
(BERT module names, cross-attention keys/values from the facts) and ``score``.

Hook points: every projection is a :class:`~vlpeft_jax.models.layers.Linear` (``linear``), the encoder layers
and the fact-aware blocks call ``attention`` and ``mlp`` as BERT does, and the text word embeddings call
``embed`` and ``positions`` (the text embedding is :class:`~vlpeft_jax.models.bert.BertEmbeddings`); a prompt
prepended by an ``embed`` hook sits between the regions and [CLS], and the [CLS] output is read after it.

Example:
    >>> import jax, jax.numpy as jnp
    >>> cfg = CKTConfig(vocab_size=30, region_feature_size=6, hidden_size=16, num_hidden_layers=1,
    ...                 num_attention_heads=2, intermediate_size=32, num_blocks=1, block_heads=2,
    ...                 block_intermediate_size=32)
    >>> b, n, p, k = 2, 3, 4, 2
    >>> inputs = dict(regions=jnp.ones((b, n, 6)), geometry=jnp.ones((b, n, 7)), region_mask=jnp.ones((b, n)),
    ...               expr_ids=jnp.ones((b, 5), jnp.int32), expr_mask=jnp.ones((b, 5)),
    ...               fact_ids=jnp.ones((b, p, 4), jnp.int32), fact_mask=jnp.ones((b, p, 4)),
    ...               fact_index=jnp.zeros((b, n, k), jnp.int32))
    >>> model = CKTransformer(cfg)
    >>> params = jax.eval_shape(lambda: model.init(jax.random.key(0), **inputs))["params"]  # shapes only
    >>> jax.eval_shape(lambda p: model.apply({"params": p}, **inputs), params).shape
    (2, 3)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from vlpeft_jax.errors import ConfigError, InputError
from vlpeft_jax.models import hooks, layers
from vlpeft_jax.models.bert import BertAttention, BertConfig, BertEmbeddings, BertEncoder, BertIntermediate, BertOutput

Array = jax.Array

PAD_SCORE = -1e9
"""Score given to padded candidates: finite (no NaN when a row is all padding) and far below any real score."""

IMAGE_TYPE_ID = 1
"""Row of ``token_type_embeddings`` used as the image modality vector ``M_I`` (UNITER's ``img_type_ids``)."""


@dataclasses.dataclass(frozen=True)
class CKTConfig:
    """Sizes of the CK-Transformer (spec ``ckt.md`` §11.6 defaults: 4 layers, d = 128, 4 heads; M = 2).

    Attributes:
      vocab_size: word vocabulary (with [CLS]/[SEP]/[MASK]/[PAD]).
      region_feature_size: width ``f`` of the pooled region features ``V``.
      hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, max_position_embeddings,
      hidden_act, layer_norm_eps, initializer_range, pad_token_id: the encoder (BERT names).
      geometry_size: width of the geometry ``G`` (7: ``[x1, y1, x2, y2, w, h, w*h]`` normalised, spec B15).
      num_blocks: ``M``, the number of fact-aware classifier blocks (spec §4.2; 0 = the score reads ``f_i^e``).
      block_heads, block_intermediate_size: heads and FFN width of each block (spec B6).
      dropout: hidden dropout of the encoder and the blocks (applied when ``deterministic=False``).
      dtype: computation dtype (parameters stay float32).

    Example:
        >>> cfg = CKTConfig(vocab_size=40, region_feature_size=8)
        >>> cfg.bert_config().num_hidden_layers, cfg.block_config().num_attention_heads
        (4, 4)
    """

    vocab_size: int
    region_feature_size: int
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 64
    geometry_size: int = 7
    num_blocks: int = 2
    block_heads: int = 4
    block_intermediate_size: int = 512
    dropout: float = 0.0
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        positive = ("vocab_size", "region_feature_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "max_position_embeddings", "geometry_size", "block_heads",
                    "block_intermediate_size")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"CKTConfig.{name}={v!r} must be a positive integer")
        if not isinstance(self.num_blocks, int) or self.num_blocks < 0:
            raise ConfigError(f"CKTConfig.num_blocks={self.num_blocks!r} must be an integer >= 0 (M, spec §4.2)")
        for name, heads in (("num_attention_heads", self.num_attention_heads), ("block_heads", self.block_heads)):
            if self.hidden_size % heads:
                raise ConfigError(f"CKTConfig.hidden_size={self.hidden_size} must be a multiple of {name}={heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"CKTConfig.dropout={self.dropout!r} must be in [0, 1)")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"CKTConfig.pad_token_id={self.pad_token_id} must be in "
                              f"[0, vocab_size={self.vocab_size})")
        try:
            layers.activation(self.hidden_act)
        except ValueError as e:
            raise ConfigError(f"CKTConfig.hidden_act: {e}") from None

    def bert_config(self) -> BertConfig:
        """The encoder's :class:`BertConfig` (two token types: text and image modality; no pooler)."""
        return BertConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                          num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                          intermediate_size=self.intermediate_size, hidden_act=self.hidden_act,
                          max_position_embeddings=self.max_position_embeddings, type_vocab_size=2,
                          layer_norm_eps=self.layer_norm_eps, hidden_dropout_prob=self.dropout,
                          initializer_range=self.initializer_range, pad_token_id=self.pad_token_id,
                          add_pooler=False, dtype=self.dtype)

    def block_config(self) -> BertConfig:
        """The :class:`BertConfig` of one fact-aware block (width d, ``block_heads``, ``block_intermediate_size``)."""
        return dataclasses.replace(self.bert_config(), num_hidden_layers=1, num_attention_heads=self.block_heads,
                                   intermediate_size=self.block_intermediate_size)


@flax.struct.dataclass
class BiModalOutput:
    """What :class:`BiModalEncoder` returns.

    Attributes:
      vision: ``[b, n, d]`` the final-layer output at each region (spec B7).
      language: ``[b, t', d]`` the output at each text position (``t' > t`` if an ``embed`` hook added tokens).
      cls: ``[b, d]`` the cross-modality output, at the text's [CLS] (App. A.2).
      last_hidden_state: ``[b, n + t', d]`` the whole sequence, image then text (App. Eq. (3)).
      image_embeddings: ``[b, n, d]`` ``E_I`` (App. Eq. (1)); text_embeddings: ``[b, t', d]`` ``E_T`` (Eq. (2)).
    """

    vision: Array
    language: Array
    cls: Array
    last_hidden_state: Array
    image_embeddings: Array
    text_embeddings: Array


@flax.struct.dataclass
class CKTOutput:
    """What :meth:`CKTransformer.forward` returns.

    Attributes:
      scores: ``[b, n]`` (padded candidates: :data:`PAD_SCORE`).
      f_e: ``[b, n, d]`` expression-aware object features; f_f: ``[b, n, K, d]`` fact-aware features ``F_i^f``;
      fact_valid: ``[b, n, K]`` (``fact_index >= 0``); f_t: ``[b, n, d]`` the fused features ``f_i^t``.
    """

    scores: Array
    f_e: Array
    f_f: Array
    fact_valid: Array
    f_t: Array


def _dense(cfg: CKTConfig, features: int, axes: tuple[str | None, str | None], name: str) -> layers.Linear:
    return layers.Linear(features, axes=axes, name=name, dtype=cfg.dtype,
                         kernel_init=nn.initializers.normal(cfg.initializer_range))


class ImageEmbeddings(nn.Module):
    """``E_I = LN(fc(V) + fc(G) + M_I)`` (App. Eq. (1)); ``M_I`` is passed in (a ``token_type_embeddings`` row).

    Example:
        >>> cfg = CKTConfig(vocab_size=30, region_feature_size=6, hidden_size=16, num_attention_heads=2)
        >>> emb, args = ImageEmbeddings(cfg), (jnp.ones((2, 3, 6)), jnp.ones((2, 3, 7)), jnp.zeros(16))
        >>> jax.eval_shape(lambda: emb.init_with_output(jax.random.key(0), *args)[0]).shape
        (2, 3, 16)
    """

    config: CKTConfig

    @nn.compact
    def __call__(self, regions: Array, geometry: Array, modality: Array, deterministic: bool = True) -> Array:
        cfg = self.config
        x = (_dense(cfg, cfg.hidden_size, (None, "embed"), "img_linear")(regions.astype(cfg.dtype))
             + _dense(cfg, cfg.hidden_size, (None, "embed"), "pos_linear")(geometry.astype(cfg.dtype))
             + modality.astype(cfg.dtype))
        x = layers.LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, name="LayerNorm")(x)
        return nn.Dropout(cfg.dropout)(x, deterministic=deterministic)


def _check(name: str, x: Array, ndim: int, shape: dict[int, int], what: str) -> None:
    if x.ndim != ndim or any(x.shape[i] != s for i, s in shape.items()):
        raise InputError(f"{name} must be {what}, got shape {tuple(x.shape)}")


class BiModalEncoder(nn.Module):
    """The single-stream bi-modal encoder (UNITER-style; spec §3, §4.1; App. Eq. (1)-(3)).

    Call with ``regions [b, n, f]``, ``geometry [b, n, 7]``, ``region_mask [b, n]`` (1 = real region),
    ``text_ids [b, t]`` (starting with [CLS]) and ``text_mask [b, t]`` (1 = real token; None = all real).
    Returns :class:`BiModalOutput`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> cfg = CKTConfig(vocab_size=30, region_feature_size=6, hidden_size=16, num_hidden_layers=1,
        ...                 num_attention_heads=2, intermediate_size=32)
        >>> enc = BiModalEncoder(cfg)
        >>> args = (jnp.ones((2, 3, 6)), jnp.ones((2, 3, 7)), jnp.ones((2, 3)), jnp.ones((2, 5), jnp.int32))
        >>> params = jax.eval_shape(lambda: enc.init(jax.random.key(0), *args))["params"]  # shapes only
        >>> out = jax.eval_shape(lambda p: enc.apply({"params": p}, *args), params)
        >>> out.vision.shape, out.language.shape, out.cls.shape, out.last_hidden_state.shape
        ((2, 3, 16), (2, 5, 16), (2, 16), (2, 8, 16))
    """

    config: CKTConfig

    @nn.compact
    def __call__(self, regions: Array, geometry: Array, region_mask: Array | None, text_ids: Array,
                 text_mask: Array | None = None, deterministic: bool = True) -> BiModalOutput:
        cfg = self.config
        _check("regions", regions, 3, {2: cfg.region_feature_size}, f"[batch, n, {cfg.region_feature_size}]")
        b, n = regions.shape[:2]
        _check("geometry", geometry, 3, {0: b, 1: n, 2: cfg.geometry_size}, f"[{b}, {n}, {cfg.geometry_size}]")
        if region_mask is not None:
            _check("region_mask", region_mask, 2, {0: b, 1: n}, f"[{b}, {n}] like regions")
        _check("text_ids", text_ids, 2, {0: b}, f"[{b}, length]")
        t = text_ids.shape[1]
        if t > cfg.max_position_embeddings:
            raise InputError(f"text length {t} exceeds max_position_embeddings={cfg.max_position_embeddings}")
        if text_mask is not None:
            _check("text_mask", text_mask, 2, {0: b, 1: t}, f"[{b}, {t}] like text_ids")

        bert = cfg.bert_config()
        text_embeddings = BertEmbeddings(bert, name="embeddings")
        # E_T = LN(T + P + M_T) (App. Eq. (2)); M_T = token_type row 0; the embed/positions hooks run inside
        e_text, text_mask = text_embeddings(text_ids, text_mask, None, None, deterministic)
        added = e_text.shape[1] - t  # tokens an ``embed`` hook prepended before [CLS]
        type_table = nn.meta.unbox(text_embeddings.variables["params"]["token_type_embeddings"]["embedding"])
        e_image = ImageEmbeddings(cfg, name="img_embeddings")(regions, geometry, type_table[IMAGE_TYPE_ID],
                                                              deterministic)
        x = jnp.concatenate([e_image, e_text.astype(e_image.dtype)], axis=1)  # App. Eq. (3): image then text
        if region_mask is None and text_mask is None:
            bias = None
        else:
            rm = jnp.ones((b, n), jnp.int32) if region_mask is None else region_mask.astype(jnp.int32)
            tm = (jnp.ones(e_text.shape[:2], jnp.int32) if text_mask is None else text_mask.astype(jnp.int32))
            bias = layers.padding_bias(jnp.concatenate([rm, tm], axis=1))
        last, _ = BertEncoder(bert, name="encoder")(x, bias, deterministic=deterministic)
        return BiModalOutput(vision=last[:, :n], language=last[:, n:], cls=last[:, n + added],
                             last_hidden_state=last, image_embeddings=e_image, text_embeddings=e_text)


class FactAwareBlock(nn.Module):
    """One fact-aware classifier block (spec §4.2, B6): post-LN cross-attention to the facts, then an FFN.

    ``x [m, 1, d]`` (queries), ``facts [m, K, d]`` (keys and values), ``fact_mask [m, K]`` (1 = real fact):
    ``y = LN(x + MHA(Q = x, K = V = facts))``, returns ``LN(y + FFN(y))``.

    Example:
        >>> cfg = CKTConfig(vocab_size=30, region_feature_size=6, hidden_size=16, num_attention_heads=2,
        ...                 block_heads=2, block_intermediate_size=32)
        >>> blk, args = FactAwareBlock(cfg), (jnp.ones((5, 1, 16)), jnp.ones((5, 3, 16)), jnp.ones((5, 3)))
        >>> jax.eval_shape(lambda: blk.init_with_output(jax.random.key(0), *args)[0]).shape
        (5, 1, 16)
    """

    config: CKTConfig

    @nn.compact
    def __call__(self, x: Array, facts: Array, fact_mask: Array, deterministic: bool = True) -> Array:
        cfg = self.config.block_config()
        y = BertAttention(cfg, name="attention")(x, layers.padding_bias(fact_mask), kv_states=facts,
                                                 deterministic=deterministic)
        intermediate = BertIntermediate(cfg, name="intermediate")
        output = BertOutput(cfg, name="output")
        h = hooks.call("mlp", (*self.path, "intermediate"), lambda z: output.project(intermediate(z)), y,
                       module=self)
        return output(h, y, deterministic)


def gather_fact_features(per_fact: Array, fact_index: Array) -> Array:
    """``F[b, i, k] = per_fact[b, fact_index[b, i, k], i]``: each candidate's K fact-aware features.

    Args:
      per_fact: ``[b, P, n, d]`` the vision output at every candidate of the (regions, fact p) pass.
      fact_index: ``[b, n, K]`` int indices into the ``P`` facts; -1 (padding) gathers fact 0 (masked later).

    Returns:
      ``[b, n, K, d]``.

    Example:
        >>> per_fact = jnp.arange(2 * 3).reshape(1, 2, 3, 1) * 1.0   # value 3 * p + i
        >>> gather_fact_features(per_fact, jnp.array([[[1, 0], [0, -1], [1, 1]]]))[0, :, :, 0].tolist()
        [[3.0, 0.0], [1.0, 1.0], [5.0, 5.0]]
    """
    idx = jnp.clip(fact_index, 0, per_fact.shape[1] - 1)
    by_candidate = jnp.swapaxes(per_fact, 1, 2)  # [b, n, P, d]
    return jnp.take_along_axis(by_candidate, idx[..., None], axis=2)


def _stack_texts(regions: Array, geometry: Array, region_mask: Array | None, expr_ids: Array, expr_mask: Array | None,
                 fact_ids: Array, fact_mask: Array | None, pad_token_id: int) -> tuple[Array, ...]:
    """The inputs of one encoder call over ``b`` expression rows then ``b * P`` (image, fact) rows.

    Texts are right-padded to a common length with mask 0, which leaves every output at a real position (and
    at [CLS]) unchanged; regions, geometry and region mask are repeated for the fact rows.
    """
    b, p, tf = fact_ids.shape
    t = expr_ids.shape[1]
    length = max(t, tf)
    e_mask = jnp.ones((b, t), jnp.int32) if expr_mask is None else expr_mask.astype(jnp.int32)
    f_mask = (jnp.ones((b * p, tf), jnp.int32) if fact_mask is None
              else fact_mask.reshape(b * p, tf).astype(jnp.int32))
    pad_to = lambda x, value: jnp.pad(x, ((0, 0), (0, length - x.shape[1])), constant_values=value)
    ids = jnp.concatenate([pad_to(expr_ids.astype(jnp.int32), pad_token_id),
                           pad_to(fact_ids.reshape(b * p, tf).astype(jnp.int32), pad_token_id)])
    mask = jnp.concatenate([pad_to(e_mask, 0), pad_to(f_mask, 0)])
    both = lambda a: None if a is None else jnp.concatenate(
        [a, jnp.repeat(a[:, None], p, axis=1).reshape(b * p, *a.shape[1:])])
    return both(regions), both(geometry), both(region_mask), ids, mask


class CKTransformer(nn.Module):
    """CK-Transformer: scores ``[b, n]`` for the candidates (spec §4; thesis §3.3.2, Fig. 3.1).

    Args (of ``__call__``):
      regions ``[b, n, f]``, geometry ``[b, n, 7]``, region_mask ``[b, n]`` (1 = real candidate);
      expr_ids / expr_mask ``[b, T]``: the expression, starting with [CLS];
      fact_ids / fact_mask ``[b, P, Tf]``: the ``P`` unique facts of each image (CK-T-nf: one [MASK] token);
      fact_index ``[b, n, K]`` int: per candidate, indices of its top-K facts into the ``P``; -1 = padding.
        Values must be in ``[-1, P)`` (not checked inside jit).
      deterministic: False applies dropout (needs a ``dropout`` rng).

    Returns ``scores [b, n]``; padded candidates get :data:`PAD_SCORE`. :meth:`forward` also returns the
    features (:class:`CKTOutput`).

    One encoder pass for the expression and one per unique (image, fact) (``b * P`` rows), all with the same
    weights (spec §4.1) and run as one encoder call of ``b * (1 + P)`` rows (texts right-padded to a common
    length); the fact-aware features are gathered from them (spec §11.8). A candidate whose
    ``fact_index`` row is all -1 skips the fact-aware blocks (``f_i^t = f_i^e``). With ``P == 0`` or
    ``K == 0`` no fact pass runs and every candidate is scored from ``f_i^e``.
    """

    config: CKTConfig

    def setup(self) -> None:
        cfg = self.config
        self.bimodal = BiModalEncoder(cfg)
        self.fact_blocks = [FactAwareBlock(cfg, name=f"fact_block_{m}") for m in range(cfg.num_blocks)]
        self.score = _dense(cfg, 1, ("embed", None), "score")

    def features(self, regions: Array, geometry: Array, region_mask: Array, expr_ids: Array, expr_mask: Array | None,
                 fact_ids: Array, fact_mask: Array | None, fact_index: Array,
                 deterministic: bool = True) -> tuple[Array, Array, Array]:
        """``(f^e [b, n, d], F^f [b, n, K, d], fact_valid [b, n, K])`` (spec §4.1, §11.8)."""
        _check("regions", regions, 3, {}, "[batch, n, features]")
        b, n = regions.shape[:2]
        _check("expr_ids", expr_ids, 2, {0: b}, f"[{b}, T]")
        _check("fact_ids", fact_ids, 3, {0: b}, f"[{b}, P, Tf]")
        p, tf = fact_ids.shape[1:]
        if fact_mask is not None:
            _check("fact_mask", fact_mask, 3, {0: b, 1: p, 2: tf}, f"[{b}, {p}, {tf}] like fact_ids")
        _check("fact_index", fact_index, 3, {0: b, 1: n}, f"[{b}, {n}, K] (indices into the {p} facts)")
        if not jnp.issubdtype(fact_index.dtype, jnp.integer):
            raise InputError(f"fact_index must be integer, got dtype {fact_index.dtype}")
        k = fact_index.shape[2]
        if p == 0 or k == 0:
            f_e = self.bimodal(regions, geometry, region_mask, expr_ids, expr_mask, deterministic).vision
            return f_e, jnp.zeros((b, n, k, f_e.shape[-1]), f_e.dtype), jnp.zeros((b, n, k), bool)
        # one encoder call over b expression rows and b * p fact rows (shared weights, spec §4.1)
        stacked = _stack_texts(regions, geometry, region_mask, expr_ids, expr_mask, fact_ids, fact_mask,
                               self.config.pad_token_id)
        vision = self.bimodal(*stacked, deterministic).vision
        f_e, per_fact = vision[:b], vision[b:].reshape(b, p, n, -1)
        return f_e, gather_fact_features(per_fact, fact_index), fact_index >= 0

    def fuse(self, f_e: Array, f_f: Array, fact_valid: Array, deterministic: bool = True) -> Array:
        """The fact-aware classifier (spec §4.2): ``f^t [b, n, d]`` from ``f^e``, ``F^f`` and the fact mask."""
        b, n, d = f_e.shape
        k = f_f.shape[2]
        x = f_e.reshape(b * n, 1, d)
        if k == 0 or not self.fact_blocks:
            return f_e
        facts, valid = f_f.reshape(b * n, k, d), fact_valid.reshape(b * n, k)
        has_fact = valid.any(axis=1)[:, None, None]
        for block in self.fact_blocks:
            x = jnp.where(has_fact, block(x, facts, valid, deterministic), x)
        return x.reshape(b, n, d)

    def forward(self, regions: Array, geometry: Array, region_mask: Array, expr_ids: Array, expr_mask: Array | None,
                fact_ids: Array, fact_mask: Array | None, fact_index: Array, deterministic: bool = True) -> CKTOutput:
        """The scores and the intermediate features (:class:`CKTOutput`); ``__call__`` returns its ``scores``."""
        f_e, f_f, valid = self.features(regions, geometry, region_mask, expr_ids, expr_mask, fact_ids, fact_mask,
                                        fact_index, deterministic)
        f_t = self.fuse(f_e, f_f, valid, deterministic)
        scores = self.score(f_t)[..., 0].astype(jnp.float32)
        if region_mask is not None:
            scores = jnp.where(region_mask.astype(bool), scores, PAD_SCORE)
        return CKTOutput(scores=scores, f_e=f_e, f_f=f_f, fact_valid=valid, f_t=f_t)

    def __call__(self, regions: Array, geometry: Array, region_mask: Array, expr_ids: Array, expr_mask: Array | None,
                 fact_ids: Array, fact_mask: Array | None, fact_index: Array, deterministic: bool = True) -> Array:
        return self.forward(regions, geometry, region_mask, expr_ids, expr_mask, fact_ids, fact_mask, fact_index,
                            deterministic).scores


def refexp_loss(scores: Array, target: Array, region_mask: Array | None = None,
                example_mask: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """Cross-entropy over the candidates' scores (spec §4.3) and accuracy (argmax == target).

    ``L = logsumexp_j s_j - s_target`` over real candidates (``region_mask``; padded ones get no mass),
    averaged over the examples with ``example_mask`` 1 (default: all).

    Args:
      scores: ``[b, n]``; target: ``[b]`` int index of the target candidate; region_mask: ``[b, n]``;
      example_mask: ``[b]`` (0 for padding rows of the last batch).

    Returns:
      ``(loss, {"loss", "accuracy"})``.

    Example:
        >>> s = jnp.array([[0.0, 1.0, 5.0]]); m = jnp.array([[1, 1, 0]])
        >>> loss, met = refexp_loss(s, jnp.array([1]), m)
        >>> round(float(loss), 4), float(met["accuracy"])
        (0.3133, 1.0)
    """
    if scores.ndim != 2 or target.shape != scores.shape[:1]:
        raise InputError(f"scores must be [batch, n] and target [batch]; got {tuple(scores.shape)} and "
                         f"{tuple(target.shape)}")
    s = scores.astype(jnp.float32)
    if region_mask is not None:
        if region_mask.shape != scores.shape:
            raise InputError(f"region_mask has shape {tuple(region_mask.shape)}; expected {tuple(scores.shape)}")
        s = jnp.where(region_mask.astype(bool), s, PAD_SCORE)
    target = target.astype(jnp.int32)
    per = jax.nn.logsumexp(s, axis=-1) - jnp.take_along_axis(s, target[:, None], axis=-1)[:, 0]
    correct = (jnp.argmax(s, axis=-1) == target).astype(jnp.float32)
    w = jnp.ones_like(per) if example_mask is None else example_mask.astype(jnp.float32)
    denom = jnp.maximum(w.sum(), 1.0)
    loss = (per * w).sum() / denom
    return loss, {"loss": loss, "accuracy": (correct * w).sum() / denom}


def cosine(u: Array, v: Array, eps: float = 1e-8) -> Array:
    """Cosine similarity over the last axis, in ``[-1, 1]`` (spec §2.2).

    Example:
        >>> float(cosine(jnp.array([1.0, 0.0]), jnp.array([-2.0, 0.0])))
        -1.0
    """
    num = jnp.sum(u * v, axis=-1)
    den = jnp.maximum(jnp.linalg.norm(u, axis=-1) * jnp.linalg.norm(v, axis=-1), eps)
    return jnp.clip(num / den, -1.0, 1.0)


def retriever_loss(cos: Array, target: Array, mask: Array | None = None) -> Array:
    """The similarity extractor's loss (spec B1): mean ``(cos - y)^2``, ``y`` = 1 (GT fact) or 0 (random fact).

    Example:
        >>> float(retriever_loss(jnp.array([1.0, 0.5]), jnp.array([1.0, 0.0])))
        0.125
    """
    err = jnp.square(cos.astype(jnp.float32) - target.astype(jnp.float32))
    if mask is None:
        return err.mean()
    w = mask.astype(jnp.float32)
    return (err * w).sum() / jnp.maximum(w.sum(), 1.0)


class FactRetriever(nn.Module):
    """The similarity extractor of image-based fact search (spec §2, B2-B3): a bi-modal encoder of its own.

    ``__call__(regions, geometry, region_mask, expr_ids, expr_mask, fact_ids, fact_mask)`` returns the cosine
    between the [CLS] outputs of (all regions, expression) and (all regions, fact): ``[b, P]`` for ``fact_ids
    [b, P, Tf]`` or ``[b]`` for ``[b, Tf]``. :meth:`encode_pair` returns one pair's [CLS] output ``[b, d]``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> cfg = CKTConfig(vocab_size=30, region_feature_size=6, hidden_size=16, num_hidden_layers=1,
        ...                 num_attention_heads=2, intermediate_size=32)
        >>> r = FactRetriever(cfg)
        >>> args = (jnp.ones((2, 3, 6)), jnp.ones((2, 3, 7)), jnp.ones((2, 3)), jnp.ones((2, 4), jnp.int32),
        ...         None, jnp.ones((2, 5, 3), jnp.int32), None)
        >>> params = jax.eval_shape(lambda: r.init(jax.random.key(0), *args))["params"]  # shapes only
        >>> jax.eval_shape(lambda p: r.apply({"params": p}, *args), params).shape
        (2, 5)
    """

    config: CKTConfig

    def setup(self) -> None:
        self.bimodal = BiModalEncoder(self.config)

    def encode_pair(self, regions: Array, geometry: Array, region_mask: Array | None, text_ids: Array,
                    text_mask: Array | None = None, deterministic: bool = True) -> Array:
        """The cross-modality ([CLS]) output ``[b, d]`` of (regions, text) (App. A.2)."""
        return self.bimodal(regions, geometry, region_mask, text_ids, text_mask, deterministic).cls

    def __call__(self, regions: Array, geometry: Array, region_mask: Array | None, expr_ids: Array,
                 expr_mask: Array | None, fact_ids: Array, fact_mask: Array | None = None,
                 deterministic: bool = True) -> Array:
        _check("regions", regions, 3, {}, "[batch, n, features]")
        b = regions.shape[0]
        single = fact_ids.ndim == 2
        if single:
            fact_ids = fact_ids[:, None]
            fact_mask = None if fact_mask is None else fact_mask[:, None]
        _check("fact_ids", fact_ids, 3, {0: b}, f"[{b}, P, Tf] or [{b}, Tf]")
        if fact_mask is not None:
            _check("fact_mask", fact_mask, 3, {i: fact_ids.shape[i] for i in range(3)}, "shaped like fact_ids")
        _check("expr_ids", expr_ids, 2, {0: b}, f"[{b}, T]")
        p = fact_ids.shape[1]
        if p == 0:
            return jnp.zeros((b, 0), jnp.float32)
        # (regions, expression) and every (regions, fact) in one encoder call (texts padded to one length)
        stacked = _stack_texts(regions, geometry, region_mask, expr_ids, expr_mask, fact_ids, fact_mask,
                               self.config.pad_token_id)
        u = self.encode_pair(*stacked, deterministic)
        u_e, u_f = u[:b], u[b:].reshape(b, p, -1)
        cos = cosine(u_e[:, None].astype(jnp.float32), u_f.astype(jnp.float32))
        return cos[:, 0] if single else cos


# --------------------------------------------------------------------------------------------------
# Pretraining heads (UNITER's MLM and ITM; spec §11.6, thesis App. A.5); used by tasks.refexp_pretrain


@flax.struct.dataclass
class PretrainOutput:
    """What :class:`BiModalPretrainer` returns.

    Attributes:
      mlm_logits: ``[b, m, vocab]`` word logits at the ``m`` gathered text positions (``mlm_positions``).
      itm_logits: ``[b, 2]`` image-text matching logits (class 1 = the caption belongs to the image).
    """

    mlm_logits: Array
    itm_logits: Array


class BiModalPretrainer(nn.Module):
    """The bi-modal encoder with UNITER's pretraining heads, masked language modelling (MLM) and image-text
    matching (ITM) (spec §11.6 "pretrain it briefly with MLM + ITM"; thesis App. A.5, CK-T's encoder is UNITER).

    ``__call__(regions, geometry, region_mask, text_ids, text_mask, mlm_positions)`` runs :class:`BiModalEncoder`
    once and returns :class:`PretrainOutput`:

    - MLM head (BERT's ``BertLMPredictionHead``): ``LN(act(dense(h)))`` at the language outputs gathered at
      ``mlm_positions [b, m]`` (indices into the text, 0 = [CLS]), then the product with the encoder's word
      embeddings (tied weights) plus a per-word bias.
    - ITM head (UNITER's ``itm_output`` on its pooler): ``linear_2(tanh(dense(cls)))`` on the [CLS] output.

    Parameters: ``bimodal`` (the encoder, the same tree as :class:`CKTransformer`'s ``bimodal``),
    ``mlm_transform``, ``mlm_norm``, ``mlm_bias``, ``itm_pooler``, ``itm_classifier``. No ``embed`` hook is
    expected here (positions index the text as given).

    Example:
        >>> cfg = CKTConfig(vocab_size=30, region_feature_size=6, hidden_size=16, num_hidden_layers=1,
        ...                 num_attention_heads=2, intermediate_size=32)
        >>> args = (jnp.ones((2, 3, 6)), jnp.ones((2, 3, 7)), jnp.ones((2, 3)), jnp.ones((2, 5), jnp.int32),
        ...         jnp.ones((2, 5)), jnp.zeros((2, 4), jnp.int32))
        >>> out = jax.eval_shape(lambda: BiModalPretrainer(cfg).init_with_output(jax.random.key(0), *args)[0])
        >>> out.mlm_logits.shape, out.itm_logits.shape
        ((2, 4, 30), (2, 2))
    """

    config: CKTConfig

    def setup(self) -> None:
        cfg = self.config
        self.bimodal = BiModalEncoder(cfg)
        self.mlm_transform = _dense(cfg, cfg.hidden_size, ("embed", "mlp"), "mlm_transform")
        self.mlm_norm = layers.LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, name="mlm_norm")
        self.mlm_bias = self.param("mlm_bias", nn.initializers.zeros, (cfg.vocab_size,), jnp.float32)
        self.itm_pooler = _dense(cfg, cfg.hidden_size, ("embed", "mlp"), "itm_pooler")
        self.itm_classifier = _dense(cfg, 2, ("embed", None), "itm_classifier")

    def __call__(self, regions: Array, geometry: Array, region_mask: Array | None, text_ids: Array,
                 text_mask: Array | None, mlm_positions: Array, deterministic: bool = True) -> PretrainOutput:
        cfg = self.config
        _check("mlm_positions", mlm_positions, 2, {0: text_ids.shape[0]}, f"[{text_ids.shape[0]}, m]")
        out = self.bimodal(regions, geometry, region_mask, text_ids, text_mask, deterministic)
        h = jnp.take_along_axis(out.language, mlm_positions.astype(jnp.int32)[..., None], axis=1)  # [b, m, d]
        h = self.mlm_norm(layers.activation(cfg.hidden_act)(self.mlm_transform(h)))
        table = nn.meta.unbox(self.bimodal.variables["params"]["embeddings"]["word_embeddings"]["embedding"])
        mlm = jnp.einsum("bmd,vd->bmv", h.astype(jnp.float32), table.astype(jnp.float32)) + self.mlm_bias
        itm = self.itm_classifier(jnp.tanh(self.itm_pooler(out.cls))).astype(jnp.float32)
        return PretrainOutput(mlm_logits=mlm, itm_logits=itm)

    def heads(self, h: Array) -> Array:
        """Runs only the heads' layers on features ``h [b, d]``: ``init(..., method=BiModalPretrainer.heads)``
        initialises the heads without the encoder (whose parameters come from elsewhere).

        Example:
            >>> cfg = CKTConfig(vocab_size=30, region_feature_size=6, hidden_size=16, num_attention_heads=2)
            >>> p = BiModalPretrainer(cfg).init(jax.random.key(0), jnp.zeros((1, 16)), method="heads")["params"]
            >>> sorted(p)
            ['itm_classifier', 'itm_pooler', 'mlm_bias', 'mlm_norm', 'mlm_transform']
        """
        x = self.mlm_norm(layers.activation(self.config.hidden_act)(self.mlm_transform(h)))
        return x.sum() + self.mlm_bias.sum() + self.itm_classifier(jnp.tanh(self.itm_pooler(h))).sum()
