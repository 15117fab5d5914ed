"""BERT encoder and the BLIP-2 / InstructBLIP Querying Transformer (Q-Former).

The Q-Former is the trainable vision-language interface that PETAL tunes (seed
``001_e6226210b77e0466.txt`` §3.1, Fig. 2): a BERT whose layers also cross-attend, every
``cross_attention_frequency`` layers, from a set of learned query tokens to frozen image features. The
queries and (InstructBLIP) the instruction tokens share the self-attention; only the query positions
cross-attend, and queries and text each have their own feed-forward weights. It is initialised from
BERT-base with freshly initialised cross-attention (§3.1, following BLIP-2); see
:func:`vlpeft_jax.hf.bert.qformer_from_bert`.

Parameter paths mirror the Hugging Face modules (``BertModel``; ``Blip2QFormerModel`` or
``InstructBlipQFormerModel`` plus the parent's ``query_tokens``), so key maps are renames:

- BERT: ``embeddings/{word_embeddings, position_embeddings, token_type_embeddings, LayerNorm}``,
  ``encoder/layer_i/attention/self/{query, key, value}``, ``.../attention/output/{dense, LayerNorm}``,
  ``.../intermediate/dense``, ``.../output/{dense, LayerNorm}``, ``pooler/dense``.
- Q-Former: ``query_tokens`` ``[1, num_query, hidden]``; ``layernorm`` (BLIP-2) or
  ``embeddings/{word_embeddings, position_embeddings, layernorm}`` (InstructBLIP);
  ``encoder/layer_i/attention/attention/{query, key, value}`` (HF's Q-Former names the inner module
  ``attention``, BERT ``self``), ``.../crossattention/{attention, output}`` on cross-attention layers,
  ``.../intermediate_query``, ``.../output_query`` (query FFN) and ``.../intermediate``, ``.../output``
  (text FFN, InstructBLIP).

Hook points: every projection is a :class:`~vlpeft_jax.models.layers.Linear`; self- and cross-attention
cores call the ``attention`` hook at the inner attention module's path (cross-attention keys/values come
from the image features); each feed-forward block calls the ``mlp`` hook with the path of its
``intermediate`` (or ``intermediate_query``) module, covering ``dense -> act -> dense`` before the
residual LayerNorm; BERT's token embeddings call the ``embed`` hook (prompt tokens are prepended, and
token type ids are padded with zeros for them, as peft does); the Q-Former's instruction states (after its
embedding LayerNorm) call the ``embed`` hook at ``<qformer>/embeddings/instructions``;
:class:`BertModel`'s position ids (``0..t-1`` as Hugging Face numbers them, or the caller's
``position_ids``) go through the ``positions`` hook at the ``BertModel``'s own path before they index
``position_embeddings``. Attention-probability dropout is not applied (the attention core is the shared hook
default); hidden dropout is, when ``deterministic=False``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlpeft_jax.errors import ConfigError, InputError
from vlpeft_jax.models import hooks, layers
from vlpeft_jax.models.outputs import EncoderOutput

Array = jax.Array

@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture of a BERT encoder or a Q-Former.

    Attributes:
      vocab_size, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, hidden_act,
      max_position_embeddings, type_vocab_size, layer_norm_eps, hidden_dropout_prob, initializer_range,
      pad_token_id: as in Hugging Face ``BertConfig``.
      add_pooler: whether :class:`BertModel` has the tanh pooler (``pooler/dense``).
      cross_attention_frequency: Q-Former: layer ``i`` cross-attends to the image features when
        ``i % cross_attention_frequency == 0``; 0 or None for plain BERT.
      encoder_hidden_size: Q-Former: width of the image features the cross-attention reads.
      num_query_tokens: Q-Former: number of learned query tokens.
      separate_query_ffn: Q-Former: query positions use their own feed-forward weights
        (``intermediate_query``/``output_query``, as BLIP-2); False: they share the text FFN.
      qformer_text_input: Q-Former: True for InstructBLIP's Q-Former, which embeds instruction tokens itself
        (``embeddings/{word_embeddings, position_embeddings, layernorm}`` and a text FFN); False for
        BLIP-2's ``Blip2QFormerModel`` (``layernorm`` over the query tokens only).
      dtype: computation dtype (parameters stay float32).
      remat: rematerialisation of each layer in the backward pass, one of
        :data:`~vlpeft_jax.models.layers.REMAT_POLICIES`.

    Example:
        >>> cfg = BertConfig.from_hf({"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
        ...                           "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 99})
        >>> cfg.head_dim, cfg.is_qformer
        (8, False)
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int = 0
    add_pooler: bool = True
    cross_attention_frequency: int | None = None
    encoder_hidden_size: int | None = None
    num_query_tokens: int = 0
    separate_query_ffn: bool = True
    qformer_text_input: bool = False
    dtype: Any = jnp.float32
    remat: str = "none"

    def __post_init__(self) -> None:
        layers.check_remat(self.remat)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                              f"({self.num_attention_heads})")
        layers.activation(self.hidden_act)  # fails early on an unknown activation name
        if self.cross_attention_frequency is not None and self.cross_attention_frequency < 0:
            raise ConfigError(f"cross_attention_frequency must be >= 0, got {self.cross_attention_frequency}")
        if self.is_qformer:
            if not self.encoder_hidden_size or self.encoder_hidden_size <= 0:
                raise ConfigError("a Q-Former (cross_attention_frequency > 0) needs encoder_hidden_size, the width "
                                  f"of the image features; got {self.encoder_hidden_size!r}")
            if not self.separate_query_ffn and not self.qformer_text_input:
                raise ConfigError("separate_query_ffn=False shares the text FFN with the queries, which exists only "
                                  "with qformer_text_input=True")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def is_qformer(self) -> bool:
        """True when the layers cross-attend to image features."""
        return bool(self.cross_attention_frequency)

    @property
    def has_text_ffn(self) -> bool:
        """Whether layers have the text feed-forward block ``intermediate``/``output``."""
        return not self.is_qformer or self.qformer_text_input or not self.separate_query_ffn

    def has_cross_attention(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` has ``crossattention`` (HF: ``layer_idx % frequency == 0``)."""
        return self.is_qformer and layer_idx % int(self.cross_attention_frequency) == 0

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> BertConfig:
        """Builds the config from a Hugging Face ``config.json`` dict.

        Accepts ``model_type`` ``bert``, ``blip_2_qformer``, ``instructblip_qformer``, and the composite
        ``blip-2`` / ``instructblip`` configs (whose ``qformer_config`` and ``num_query_tokens`` are used).
        ``overrides`` replace fields afterwards (e.g. ``dtype``, ``num_query_tokens``).
        """
        model_type = hf.get("model_type", "bert")
        num_query_tokens = 0
        if model_type in ("blip-2", "blip_2", "instructblip"):
            num_query_tokens = int(hf.get("num_query_tokens", 0))
            sub = dict(hf.get("qformer_config") or {})
            sub.setdefault("model_type", "instructblip_qformer" if model_type == "instructblip" else "blip_2_qformer")
            vision = hf.get("vision_config") or {}
            if "encoder_hidden_size" not in sub and "hidden_size" in vision:
                sub["encoder_hidden_size"] = vision["hidden_size"]
            hf, model_type = sub, sub["model_type"]
        if model_type not in ("bert", "blip_2_qformer", "instructblip_qformer"):
            raise ConfigError(f"model_type {model_type!r} is not a BERT or Q-Former config; expected one of: bert, "
                              "blip_2_qformer, instructblip_qformer, blip-2, instructblip")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ConfigError(f"position_embedding_type {hf['position_embedding_type']!r} is not supported; "
                              "only 'absolute'")
        if model_type == "bert" and (hf.get("is_decoder") or hf.get("add_cross_attention")):
            raise ConfigError("BERT decoder configs (is_decoder / add_cross_attention) are not supported; "
                              "BertModel is the bidirectional encoder")
        names = {f.name for f in dataclasses.fields(cls)} - {"dtype", "add_pooler", "num_query_tokens",
                                                            "separate_query_ffn", "qformer_text_input"}
        kwargs: dict[str, Any] = {k: hf[k] for k in names if k in hf and hf[k] is not None}
        if model_type == "bert":
            kwargs.pop("cross_attention_frequency", None)
            kwargs.pop("encoder_hidden_size", None)
        else:
            kwargs["cross_attention_frequency"] = int(hf.get("cross_attention_frequency", 2))
            kwargs["qformer_text_input"] = model_type == "instructblip_qformer"
            kwargs["num_query_tokens"] = num_query_tokens
            kwargs["add_pooler"] = False
        kwargs.update(overrides)
        return cls(**kwargs)


# --------------------------------------------------------------------------------------------------
# Building blocks (HF module names)


class BertSelfAttention(nn.Module):
    """HF ``BertSelfAttention`` / ``Blip2QFormerMultiHeadAttention``: ``query``/``key``/``value`` and the core.

    With ``kv_states`` it is cross-attention: keys and values are projected from them (width
    ``encoder_hidden_size``).
    """

    config: BertConfig

    @nn.compact
    def __call__(self, hidden: Array, bias: Array | None, kv_states: Array | None = None) -> Array:
        cfg = self.config
        b, t, _ = hidden.shape
        source = hidden if kv_states is None else kv_states.astype(cfg.dtype)

        def proj(name: str, x: Array) -> Array:
            y = layers.Linear(cfg.hidden_size, axes=("embed", "heads"), name=name, dtype=cfg.dtype,
                              kernel_init=nn.initializers.normal(cfg.initializer_range))(x)
            return y.reshape(*x.shape[:2], cfg.num_attention_heads, cfg.head_dim)

        q, k, v = proj("query", hidden), proj("key", source), proj("value", source)
        out = hooks.call("attention", self.path, layers.attention_default, q, k, v, bias,
                         inputs=hidden, positions=None, decode=False, module=self)
        return out.reshape(b, t, cfg.hidden_size)


class BertSelfOutput(nn.Module):
    """HF ``BertSelfOutput``: ``LayerNorm(dropout(dense(x)) + residual)``."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, residual: Array, deterministic: bool = True) -> Array:
        cfg = self.config
        y = layers.Linear(cfg.hidden_size, axes=("heads", "embed"), name="dense", dtype=cfg.dtype,
                          kernel_init=nn.initializers.normal(cfg.initializer_range))(x)
        y = nn.Dropout(cfg.hidden_dropout_prob)(y, deterministic=deterministic)
        return layers.LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, name="LayerNorm")(y + residual)


class BertAttention(nn.Module):
    """HF ``BertAttention`` / ``Blip2QFormerAttention``: attention core module plus ``output``.

    Attributes:
      inner_name: name of the core module, ``"self"`` (BERT) or ``"attention"`` (Q-Former).
    """

    config: BertConfig
    inner_name: str = "self"

    @nn.compact
    def __call__(self, hidden: Array, bias: Array | None, kv_states: Array | None = None,
                 deterministic: bool = True) -> Array:
        ctx = BertSelfAttention(self.config, name=self.inner_name)(hidden, bias, kv_states)
        return BertSelfOutput(self.config, name="output")(ctx, hidden, deterministic)


class BertIntermediate(nn.Module):
    """HF ``BertIntermediate``: ``act(dense(x))``."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        y = layers.Linear(cfg.intermediate_size, axes=("embed", "mlp"), name="dense", dtype=cfg.dtype,
                          kernel_init=nn.initializers.normal(cfg.initializer_range))(x)
        return layers.activation(cfg.hidden_act)(y)


class BertOutput(nn.Module):
    """HF ``BertOutput``: ``dense`` (:meth:`project`) then ``LayerNorm(dropout(y) + residual)``."""

    config: BertConfig

    def setup(self) -> None:
        cfg = self.config
        self.dense = layers.Linear(cfg.hidden_size, axes=("mlp", "embed"), dtype=cfg.dtype,
                                   kernel_init=nn.initializers.normal(cfg.initializer_range))
        self.LayerNorm = layers.LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def project(self, h: Array) -> Array:
        return self.dense(h)

    def __call__(self, y: Array, residual: Array, deterministic: bool = True) -> Array:
        return self.LayerNorm(self.dropout(y, deterministic=deterministic) + residual)


class BertLayer(nn.Module):
    """One post-LN layer: self-attention, (Q-Former) cross-attention of the queries, feed-forward.

    With ``query_length > 0`` the first ``query_length`` positions are the query tokens: they alone
    cross-attend (if this layer has cross-attention) and go through the query FFN; the remaining (text)
    positions go through the text FFN, as HF ``Blip2QFormerLayer`` / ``InstructBlipQFormerLayer``.
    """

    config: BertConfig
    layer_idx: int = 0

    def _ffn(self, x: Array, suffix: str, deterministic: bool) -> Array:
        cfg = self.config
        intermediate = BertIntermediate(cfg, name=f"intermediate{suffix}")
        output = BertOutput(cfg, name=f"output{suffix}")
        y = hooks.call("mlp", (*self.path, f"intermediate{suffix}"), lambda h: output.project(intermediate(h)), x,
                       module=self)
        return output(y, x, deterministic)

    @nn.compact
    def __call__(self, hidden: Array, bias: Array | None, encoder_states: Array | None = None,
                 cross_bias: Array | None = None, query_length: int = 0, deterministic: bool = True) -> Array:
        cfg = self.config
        inner = "attention" if cfg.is_qformer else "self"
        attn = BertAttention(cfg, inner_name=inner, name="attention")(hidden, bias, deterministic=deterministic)
        if query_length <= 0:
            return self._ffn(attn, "", deterministic)
        queries = attn[:, :query_length]
        if cfg.has_cross_attention(self.layer_idx):
            if encoder_states is None:
                raise InputError(f"layer {self.layer_idx} cross-attends: encoder_hidden_states must be given")
            queries = BertAttention(cfg, inner_name=inner, name="crossattention")(
                queries, cross_bias, kv_states=encoder_states, deterministic=deterministic)
        out = self._ffn(queries, "_query" if cfg.separate_query_ffn else "", deterministic)
        if attn.shape[1] > query_length:
            out = jnp.concatenate([out, self._ffn(attn[:, query_length:], "", deterministic)], axis=1)
        return out


class BertEncoder(nn.Module):
    """HF ``BertEncoder``: ``layer_0 .. layer_{n-1}``; returns the last state and every layer's output."""

    config: BertConfig

    @nn.compact
    def __call__(self, hidden: Array, bias: Array | None, encoder_states: Array | None = None,
                 cross_bias: Array | None = None, query_length: int = 0,
                 deterministic: bool = True) -> tuple[Array, tuple[Array, ...]]:
        states = []
        layer = layers.remat_layer(BertLayer, self.config.remat, static_argnums=(5, 6))  # query_length, deterministic
        for i in range(self.config.num_hidden_layers):
            hidden = layer(self.config, layer_idx=i, name=f"layer_{i}")(
                hidden, bias, encoder_states, cross_bias, query_length, deterministic)
            states.append(hidden)
        return hidden, tuple(states)


def _embed(cfg: BertConfig, num: int, axes: tuple[str | None, str | None], name: str) -> layers.Embed:
    return layers.Embed(num, cfg.hidden_size, axes=axes, name=name, dtype=cfg.dtype,
                        embedding_init=nn.initializers.normal(cfg.initializer_range))


class BertEmbeddings(nn.Module):
    """HF ``BertEmbeddings``: word + token type + position embeddings, ``LayerNorm``, dropout.

    The ``embed`` hook runs on the word embeddings; if it prepends ``p`` tokens, token type ids get ``p``
    leading zeros and positions run over the extended sequence (as HF with peft prompt tuning).
    """

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None, token_type_ids: Array | None,
                 position_ids: Array | None, deterministic: bool = True) -> tuple[Array, Array | None]:
        cfg = self.config
        word = _embed(cfg, cfg.vocab_size, ("vocab", "embed"), "word_embeddings")
        embeds, attention_mask = hooks.call("embed", word.path, lambda i, e, m: (e, m), input_ids, word(input_ids),
                                            attention_mask, module=self)
        b, t = embeds.shape[:2]
        added = t - input_ids.shape[1]
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, t), jnp.int32)
        elif added:
            token_type_ids = jnp.concatenate([jnp.zeros((b, added), token_type_ids.dtype), token_type_ids], axis=1)
        if position_ids is None or added:
            position_ids = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
        # the positions hook's path is the BertModel's (the parent of these embeddings and of the encoder)
        position_ids = hooks.call("positions", self.path[:-1], lambda p: p, position_ids, module=self)
        x = (embeds
             + _embed(cfg, cfg.type_vocab_size, (None, "embed"), "token_type_embeddings")(token_type_ids)
             + _embed(cfg, cfg.max_position_embeddings, ("positions", "embed"), "position_embeddings")(position_ids))
        x = layers.LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, name="LayerNorm")(x)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic), attention_mask


class BertPooler(nn.Module):
    """HF ``BertPooler``: ``tanh(dense(h[:, 0]))``."""

    config: BertConfig

    @nn.compact
    def __call__(self, hidden: Array) -> Array:
        cfg = self.config
        y = layers.Linear(cfg.hidden_size, axes=("embed", None), name="dense", dtype=cfg.dtype,
                          kernel_init=nn.initializers.normal(cfg.initializer_range))(hidden[:, 0])
        return jnp.tanh(y)


def _check_ids(name: str, ids: Array | None, attention_mask: Array | None) -> None:
    if ids is None:
        return
    if ids.ndim != 2:
        raise InputError(f"{name} must be [batch, length], got shape {tuple(ids.shape)}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(ids.shape):
        raise InputError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {tuple(ids.shape)} "
                         f"like {name}")


# --------------------------------------------------------------------------------------------------
# Models


class BertModel(nn.Module):
    """HF ``BertModel`` (bidirectional, post-LN), returning :class:`EncoderOutput`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        ...                  intermediate_size=32, max_position_embeddings=16)
        >>> model = BertModel(cfg)
        >>> ids = jnp.array([[1, 5, 7, 0]]); mask = jnp.array([[1, 1, 1, 0]])
        >>> params = model.init(jax.random.key(0), ids, mask)["params"]
        >>> out = model.apply({"params": params}, ids, mask)
        >>> out.last_hidden_state.shape, len(out.hidden_states), out.pooled.shape
        ((1, 4, 16), 3, (1, 16))
    """

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None, token_type_ids: Array | None = None,
                 position_ids: Array | None = None, deterministic: bool = True) -> EncoderOutput:
        cfg = self.config
        if cfg.is_qformer:
            raise ConfigError("BertModel is plain BERT; use QFormer for a config with cross_attention_frequency")
        _check_ids("input_ids", input_ids, attention_mask)
        x, attention_mask = BertEmbeddings(cfg, name="embeddings")(input_ids, attention_mask, token_type_ids,
                                                                   position_ids, deterministic)
        last, states = BertEncoder(cfg, name="encoder")(x, layers.padding_bias(attention_mask),
                                                        deterministic=deterministic)
        pooled = BertPooler(cfg, name="pooler")(last) if cfg.add_pooler else None
        return EncoderOutput(last_hidden_state=last, hidden_states=(x, *states), pooled=pooled)


INSTRUCTIONS_HOOK = "instructions"
"""Last path segment of the Q-Former's ``embed`` hook point on its instruction states
(``<qformer path>/embeddings/instructions``): ``fn(ctx, next, input_ids, states, mask) -> (states, mask)`` with
``states`` ``[b, t, hidden]`` after the embedding LayerNorm and dropout, ``mask`` ``[b, t]`` or None (all real)."""


class QFormerEmbeddings(nn.Module):
    """HF ``InstructBlipQFormerEmbeddings``: ``layernorm([queries; word + position embeddings of text])``."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: Array | None, query_embeds: Array, deterministic: bool = True) -> Array:
        cfg = self.config
        word = _embed(cfg, cfg.vocab_size, ("vocab", "embed"), "word_embeddings")
        position = _embed(cfg, cfg.max_position_embeddings, ("positions", "embed"), "position_embeddings")
        x = query_embeds
        if input_ids is not None:
            text = word(input_ids) + position(jnp.arange(input_ids.shape[1])[None])
            x = jnp.concatenate([query_embeds.astype(text.dtype), text], axis=1)
        x = layers.LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, name="layernorm")(x)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class QFormer(nn.Module):
    """BLIP-2 / InstructBLIP Querying Transformer with its learned ``query_tokens``.

    Call with image features ``encoder_hidden_states`` ``[b, n, encoder_hidden_size]`` and, for an
    InstructBLIP Q-Former (``config.qformer_text_input``), instruction ``input_ids`` ``[b, t]`` with their
    ``attention_mask`` ``[b, t]`` (the queries are always attended). ``query_embeds`` ``[b, q, hidden]``
    replaces the learned query tokens (HF passes them in from the parent model). Returns
    :class:`EncoderOutput` with ``last_hidden_state`` ``[b, q (+ t), hidden]``, ``hidden_states`` (the
    normalised embeddings and every layer's output) and ``pooled`` = the first query's final state (HF's
    ``pooler_output``).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        ...                  intermediate_size=32, cross_attention_frequency=2, encoder_hidden_size=12,
        ...                  num_query_tokens=4, qformer_text_input=True)
        >>> model = QFormer(cfg)
        >>> image = jnp.ones((1, 9, 12)); ids = jnp.array([[3, 4, 5]])
        >>> params = model.init(jax.random.key(0), image, ids)["params"]
        >>> model.apply({"params": params}, image, ids).last_hidden_state.shape
        (1, 7, 16)
        >>> "crossattention" in params["encoder"]["layer_0"], "crossattention" in params["encoder"]["layer_1"]
        (True, False)
    """

    config: BertConfig

    @nn.compact
    def __call__(self, encoder_hidden_states: Array, input_ids: Array | None = None,
                 attention_mask: Array | None = None, encoder_attention_mask: Array | None = None,
                 query_embeds: Array | None = None, deterministic: bool = True) -> EncoderOutput:
        cfg = self.config
        if not cfg.is_qformer or cfg.num_query_tokens <= 0:
            raise ConfigError("QFormer needs cross_attention_frequency > 0 and num_query_tokens > 0; got "
                              f"{cfg.cross_attention_frequency!r} and {cfg.num_query_tokens!r}")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != cfg.encoder_hidden_size:
            raise InputError(f"encoder_hidden_states must be [batch, n, {cfg.encoder_hidden_size}], got shape "
                             f"{tuple(encoder_hidden_states.shape)}")
        if input_ids is not None and not cfg.qformer_text_input:
            raise InputError("this Q-Former (BLIP-2 layout) takes no input_ids; instruction tokens need "
                             "qformer_text_input=True (InstructBLIP)")
        if attention_mask is not None and input_ids is None:
            raise InputError("attention_mask covers the instruction tokens; it was given without input_ids")
        _check_ids("input_ids", input_ids, attention_mask)
        b = encoder_hidden_states.shape[0]
        query_tokens = layers._param(self, "query_tokens", nn.initializers.normal(cfg.initializer_range),
                                     (1, cfg.num_query_tokens, cfg.hidden_size), (None, "queries", "embed"),
                                     jnp.float32)
        if query_embeds is None:
            query_embeds = jnp.broadcast_to(query_tokens, (b, *query_tokens.shape[1:]))
        query_length = query_embeds.shape[1]
        if cfg.qformer_text_input:
            x = QFormerEmbeddings(cfg, name="embeddings")(input_ids, query_embeds, deterministic)
            if input_ids is not None:
                # the instruction states after the embedding LayerNorm go through the ``embed`` hook at
                # <qformer>/embeddings/instructions (PETAL's instruction experts, seed 001 Eq. 3-4); a hook may
                # replace them and their mask with another length (PETAL's random-instruction ablation)
                text, attention_mask = hooks.call(
                    "embed", (*self.path, "embeddings", INSTRUCTIONS_HOOK), lambda i, e, m: (e, m), input_ids,
                    x[:, query_length:], attention_mask, module=self)
                x = jnp.concatenate([x[:, :query_length], text.astype(x.dtype)], axis=1)
        else:
            x = layers.LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, name="layernorm")(query_embeds)
            x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
        bias = None
        if input_ids is not None and attention_mask is not None:  # the mask the instruction hook returned
            full = jnp.concatenate([jnp.ones((b, query_length), attention_mask.dtype), attention_mask], axis=1)
            bias = layers.padding_bias(full)
        last, states = BertEncoder(cfg, name="encoder")(
            x, bias, encoder_hidden_states, layers.padding_bias(encoder_attention_mask), query_length,
            deterministic)
        return EncoderOutput(last_hidden_state=last, hidden_states=(x, *states), pooled=last[:, 0])
