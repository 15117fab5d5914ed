"""T5 / Flan-T5 encoder-decoder (``T5ForConditionalGeneration``) with HF names, a decoder KV cache and cached
cross-attention.

T5 (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer",
JMLR 21) is the LM of BLIP-2's and InstructBLIP's Flan-T5 checkpoints. The module tree mirrors transformers'
``T5ForConditionalGeneration``: ``shared`` (the one token table: HF's ``encoder.embed_tokens`` and
``decoder.embed_tokens`` are the same tensor), ``encoder/{block_<i>/layer_<j>/..., final_layer_norm}``,
``decoder/...`` and ``lm_head`` (only for an untied head). An encoder block is ``layer_0`` =
``{SelfAttention/{q, k, v, o}, layer_norm}`` and ``layer_1`` = ``{DenseReluDense, layer_norm}``; a decoder block
has ``layer_1`` = ``{EncDecAttention/{q, k, v, o}, layer_norm}`` (cross-attention) and the feed-forward in
``layer_2``. Only block 0's ``SelfAttention`` owns ``relative_attention_bias`` (``[num_buckets, num_heads]``);
the bias it gives is shared by every layer of its stack, as in T5.

Numerics (as transformers 5.24 ``modeling_t5``, read for the formulas):

- **RMS LayerNorm** (Zhang & Sennrich 2019): ``x / sqrt(mean(x^2) + eps) * scale``, no mean, no bias.
- **Relative position buckets** (Shaw et al. 2018 as bucketed by Mesh TensorFlow): the distance ``key - query``
  maps to ``num_buckets`` buckets, half exact and half logarithmic up to ``max_distance``; the encoder's buckets
  are bidirectional (half the buckets for each sign), the decoder's causal (only ``key <= query``). Positions
  are array indices: padding takes positions too, which leaves the real tokens' relative distances unchanged
  under left or right padding. :func:`relative_position_bucket` equals transformers' bucket function (tested).
- **No attention scaling**: T5 folds ``1/sqrt(d_kv)`` into its initialisation. The ``attention`` hook's default
  (:func:`~vlpeft_jax.models.layers.attention_default`) divides by ``sqrt(d_kv)``, so the queries it receives
  are multiplied by ``sqrt(d_kv)`` (as GPT-2 folds its scalings into the queries).
- **Feed-forward**: ``relu`` (T5 v1.0: ``wo(relu(wi x))``) or ``gated-<act>`` (v1.1/Flan-T5 ``gated-gelu``:
  ``wo(gelu_new(wi_0 x) * wi_1 x)``); any ``<act>`` or ``gated-<act>`` transformers parses with an activation of
  :data:`~vlpeft_jax.models.layers.ACTIVATIONS`. ``wo`` computes in float32 (transformers'
  ``_keep_in_fp32_modules = ["wo"]``), so with bfloat16 the residual stream becomes float32 there, as in torch.
- **Head**: the decoder's final hidden state is multiplied by ``d_model**-0.5`` when ``scale_decoder_outputs``
  (T5 v1.0's tied head; transformers 5 derives it from the checkpoint's ``tie_word_embeddings``), then projected
  by ``shared`` (tied) or ``lm_head`` (untied, Flan-T5).
- Dropout (``dropout_rate``) is applied, as transformers does, to the embeddings, every sub-layer output, the
  feed-forward's hidden activation and the final norm's output when ``deterministic=False`` (needs a
  ``"dropout"`` rng); attention-probability dropout is not implemented. The default is off.

Calling convention (see also :mod:`vlpeft_jax.models.outputs`): ``model(input_ids, attention_mask,
decoder_input_ids, decoder_attention_mask, *, inputs_embeds, cache, decode, logits_to_keep, deterministic)``
returns a :class:`Seq2SeqOutput` (a :class:`~vlpeft_jax.models.outputs.DecoderOutput`) whose ``logits`` are the
decoder's ``[b, t_dec, vocab]``. The encoder input is ``input_ids`` or ``inputs_embeds`` (a VLM puts its visual
tokens in front of :meth:`T5ForConditionalGeneration.embed_tokens`); ``decoder_input_ids=None`` means one
decoder start token per row (the generation prefill; for training pass :func:`shift_right` of the labels).

Cache (:class:`T5Cache`, from :meth:`T5ForConditionalGeneration.init_cache`): the decoder self-attention
:class:`~vlpeft_jax.models.layers.KVCache`, plus the cross-attention keys/values and the encoder padding mask,
which the call that runs the encoder writes (an empty cache has ``cross_keys=None``). A call with a filled cache
and no encoder input (``input_ids``/``inputs_embeds`` None) does not run the encoder: it feeds
``decoder_input_ids`` against the cached cross-attention. :mod:`vlpeft_jax.eval.decode` uses exactly this.

Hook points: ``linear`` on every projection (``q``, ``k``, ``v``, ``o``, ``wi``/``wi_0``/``wi_1``, ``wo``,
untied ``lm_head``), ``attention`` per self- and cross-attention module (``encoder/block_<i>/layer_0/
SelfAttention``, ``decoder/block_<i>/layer_1/EncDecAttention``; the bias holds the relative position bias and
the mask, ``[b, heads, tq, tk]``), ``mlp`` per feed-forward (``.../layer_<j>/DenseReluDense``, on the
normalised input), ``embed`` on the *encoder's* token embeddings only (path ``shared``; prompt tuning prepends
to the encoder input as peft does for seq2seq models), ``final_hidden`` (``decoder/final_layer_norm``, the
decoder's normalised output) and ``lm_head`` (``lm_head``, on the already-scaled hidden state, i.e. what
transformers' ``lm_head`` module receives). T5 has no position ids, so no ``positions`` hook point.

Example:
    >>> import jax, jax.numpy as jnp
    >>> cfg = T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
    ...                feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    >>> model = T5ForConditionalGeneration(cfg)
    >>> ids, dec = jnp.array([[5, 6, 7]]), jnp.array([[0, 5]])
    >>> params = model.init(jax.random.key(0), ids, None, dec)["params"]
    >>> sorted(params), sorted(params["decoder"]["block_0"])
    (['decoder', 'encoder', 'lm_head', 'shared'], ['layer_0', 'layer_1', 'layer_2'])
    >>> model.apply({"params": params}, ids, None, dec).logits.shape
    (1, 2, 40)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from vlpeft_jax.errors import ConfigError, InputError
from vlpeft_jax.models import hooks, layers
from vlpeft_jax.models.outputs import DecoderOutput

Array = jax.Array

MODEL_TYPES = ("t5", "mt5")


def parse_feed_forward_proj(value: str) -> tuple[str, bool]:
    """``feed_forward_proj`` -> (activation name, gated), as transformers' ``T5Config`` parses it.

    ``"<act>"`` or ``"gated-<act>"``; ``gated-gelu`` means ``gelu_new`` (the tanh approximation), a legacy of
    T5 v1.1 kept by transformers.

    Example:
        >>> parse_feed_forward_proj("gated-gelu"), parse_feed_forward_proj("relu")
        (('gelu_new', True), ('relu', False))
    """
    parts = str(value).split("-")
    valid = (f"'<act>' or 'gated-<act>' with <act> one of {', '.join(sorted(layers.ACTIVATIONS))} "
             "(T5 v1.0: 'relu'; v1.1/Flan-T5: 'gated-gelu')")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ConfigError(f"T5 feed_forward_proj {value!r} is not a feed-forward type; valid: {valid}")
    act = "gelu_new" if value == "gated-gelu" else parts[-1]
    if act not in layers.ACTIVATIONS:
        raise ConfigError(f"T5 feed_forward_proj {value!r}: unknown activation {act!r}; valid: {valid}")
    return act, len(parts) == 2


@dataclasses.dataclass(frozen=True)
class T5Config:
    """T5 architecture (transformers' ``T5Config`` field names).

    Attributes:
      vocab_size, d_model, d_kv (head width), d_ff, num_heads: sizes.
      num_layers: encoder blocks; num_decoder_layers: decoder blocks (None: ``num_layers``).
      relative_attention_num_buckets, relative_attention_max_distance: the relative position buckets.
      layer_norm_epsilon: RMS LayerNorm epsilon.
      feed_forward_proj: ``relu`` (v1.0), ``gated-gelu`` (v1.1, Flan-T5) or any ``<act>`` / ``gated-<act>``.
      dropout_rate: dropout on hidden states when called with ``deterministic=False``.
      tie_word_embeddings: the LM head is ``shared`` (no ``lm_head`` parameter).
      scale_decoder_outputs: multiply the decoder output by ``d_model**-0.5`` before the head (None: as
        ``tie_word_embeddings``, the T5 v1.0 convention).
      decoder_start_token_id, pad_token_id, eos_token_id: special ids (T5: 0, 0, 1).
      dtype: compute dtype (parameters stay float32).
      remat: rematerialisation of each block (encoder and decoder) in the backward pass, one of
        :data:`~vlpeft_jax.models.layers.REMAT_POLICIES`.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    dropout_rate: float = 0.0
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool | None = None
    decoder_start_token_id: int = 0
    pad_token_id: int = 0
    eos_token_id: int = 1
    dtype: Any = jnp.float32
    remat: str = "none"

    def __post_init__(self) -> None:
        layers.check_remat(self.remat)
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        if self.scale_decoder_outputs is None:
            object.__setattr__(self, "scale_decoder_outputs", bool(self.tie_word_embeddings))
        parse_feed_forward_proj(self.feed_forward_proj)
        if self.relative_attention_num_buckets < 4:
            raise ConfigError(f"T5 relative_attention_num_buckets={self.relative_attention_num_buckets}; must be >= 4")

    @property
    def dense_act_fn(self) -> str:
        """The feed-forward activation's HF name (``gated-gelu`` -> ``gelu_new``)."""
        return parse_feed_forward_proj(self.feed_forward_proj)[0]

    @property
    def is_gated_act(self) -> bool:
        return parse_feed_forward_proj(self.feed_forward_proj)[1]

    @property
    def inner_dim(self) -> int:
        """Width of the concatenated heads, ``num_heads * d_kv`` (need not equal ``d_model``)."""
        return self.num_heads * self.d_kv

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], *, dtype: Any = jnp.float32) -> T5Config:
        """Reads a Hugging Face T5 ``config.json`` dict (also the ``text_config`` of a BLIP-2/InstructBLIP
        checkpoint).

        ``scale_decoder_outputs`` is read where transformers 5 wrote it, else derived as transformers does from
        ``tie_word_embeddings`` (v1.0 configs: tied and scaled; v1.1/Flan configs say False: neither). Whether
        the head is really tied is a property of the weights (transformers 5 writes ``tie_word_embeddings: true``
        even for an untied head): :func:`vlpeft_jax.hf.t5.load_t5` settles it from the checkpoint.

        Example:
            >>> cfg = T5Config.from_hf({"model_type": "t5", "d_model": 64, "d_kv": 8, "d_ff": 128, "num_layers": 2,
            ...                         "num_heads": 8, "feed_forward_proj": "gated-gelu",
            ...                         "tie_word_embeddings": False})
            >>> cfg.dense_act_fn, cfg.is_gated_act, cfg.tie_word_embeddings, cfg.scale_decoder_outputs
            ('gelu_new', True, False, False)
        """
        model_type = config.get("model_type", "t5")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"T5Config.from_hf got model_type {model_type!r}; supported: {', '.join(MODEL_TYPES)}")
        tied = config.get("tie_word_embeddings", True) is not False
        scale = config.get("scale_decoder_outputs")
        eos = config.get("eos_token_id", 1)
        if isinstance(eos, list | tuple):
            eos = eos[0]
        pad = config.get("pad_token_id")
        pad = 0 if pad is None else int(pad)
        start = config.get("decoder_start_token_id")
        return cls(
            vocab_size=int(config.get("vocab_size", 32128)),
            d_model=int(config.get("d_model", 512)),
            d_kv=int(config.get("d_kv", 64)),
            d_ff=int(config.get("d_ff", 2048)),
            num_layers=int(config.get("num_layers", 6)),
            num_decoder_layers=config.get("num_decoder_layers"),
            num_heads=int(config.get("num_heads", 8)),
            relative_attention_num_buckets=int(config.get("relative_attention_num_buckets", 32)),
            relative_attention_max_distance=int(config.get("relative_attention_max_distance", 128)),
            layer_norm_epsilon=float(config.get("layer_norm_epsilon", 1e-6)),
            feed_forward_proj=str(config.get("feed_forward_proj", "relu")),
            dropout_rate=float(config.get("dropout_rate", 0.1)),
            tie_word_embeddings=tied,
            scale_decoder_outputs=tied if scale is None else bool(scale),
            decoder_start_token_id=pad if start is None else int(start),
            pad_token_id=pad,
            eos_token_id=1 if eos is None else int(eos),
            dtype=dtype,
        )

    def to_hf(self) -> dict[str, Any]:
        """A transformers ``config.json`` dict for ``T5ForConditionalGeneration`` (for exporting a checkpoint).

        Example:
            >>> T5Config(feed_forward_proj="gated-gelu", tie_word_embeddings=False).to_hf()["scale_decoder_outputs"]
            False
        """
        return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": self.vocab_size,
                "d_model": self.d_model, "d_kv": self.d_kv, "d_ff": self.d_ff, "num_layers": self.num_layers,
                "num_decoder_layers": self.num_decoder_layers, "num_heads": self.num_heads,
                "relative_attention_num_buckets": self.relative_attention_num_buckets,
                "relative_attention_max_distance": self.relative_attention_max_distance,
                "layer_norm_epsilon": self.layer_norm_epsilon, "feed_forward_proj": self.feed_forward_proj,
                "dropout_rate": self.dropout_rate, "tie_word_embeddings": self.tie_word_embeddings,
                "scale_decoder_outputs": self.scale_decoder_outputs, "is_encoder_decoder": True,
                "decoder_start_token_id": self.decoder_start_token_id, "pad_token_id": self.pad_token_id,
                "eos_token_id": self.eos_token_id, "torch_dtype": "float32"}


def relative_position_bucket(relative_position: Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
    """T5's bucket of each relative position ``key - query`` (int array), in ``[0, num_buckets)``.

    Bidirectional: half the buckets for positive distances. Of the rest, half are exact distances
    ``0 .. max_exact - 1``; larger ones share ``log``-spaced buckets up to ``max_distance`` (float32
    arithmetic in transformers' order, so the boundaries agree). Causal: only ``key <= query`` counts.

    Example:
        >>> rel = jnp.array([-200, -9, -1, 0, 1, 9, 200])
        >>> relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128).tolist()
        [15, 8, 1, 0, 17, 24, 31]
        >>> relative_position_bucket(rel, bidirectional=False, num_buckets=32, max_distance=128).tolist()
        [31, 9, 1, 0, 0, 0, 0]
    """
    rel = relative_position.astype(jnp.int32)
    if bidirectional:
        num_buckets //= 2
        offset = (rel > 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(rel)
    else:
        offset = jnp.zeros_like(rel)
        n = -jnp.minimum(rel, 0)
    max_exact = num_buckets // 2
    ratio = (jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / jnp.float32(max_exact))
             / jnp.float32(math.log(max_distance / max_exact)))
    large = max_exact + (ratio * jnp.float32(num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return offset + jnp.where(n < max_exact, n, large)


def shift_right(labels: Array, decoder_start_token_id: int, pad_token_id: int) -> Array:
    """Decoder inputs for teacher forcing: the start token, then ``labels[:, :-1]`` (``-100`` -> ``pad``).

    Example:
        >>> shift_right(jnp.array([[5, 6, 1, -100]]), 0, 0).tolist()
        [[0, 5, 6, 1]]
    """
    labels = jnp.asarray(labels)
    start = jnp.full(labels.shape[:-1] + (1,), decoder_start_token_id, labels.dtype)
    shifted = jnp.concatenate([start, labels[..., :-1]], axis=-1)
    return jnp.where(shifted == -100, jnp.asarray(pad_token_id, labels.dtype), shifted)


@flax.struct.dataclass
class T5Cache:
    """Decoding state of a T5 (a pytree; every leaf but the write index has a leading batch axis).

    Attributes:
      self_attention: the decoder self-attention keys/values per decoder layer (head-major, see ``layers.KVCache``).
      cross_keys, cross_values: per decoder layer, the cross-attention keys/values of the encoder output
        ``[b, t_enc, heads, d_kv]``; None until the encoder has run.
      encoder_mask: ``[b, t_enc]`` the encoder's padding mask (after the ``embed`` hook); None until then.
    """

    self_attention: layers.KVCache
    cross_keys: tuple[Array, ...] | None = None
    cross_values: tuple[Array, ...] | None = None
    encoder_mask: Array | None = None


def init_cache(config: T5Config, batch: int, max_len: int, dtype: Any = None) -> T5Cache:
    """An empty cache for ``batch`` rows and up to ``max_len`` decoder tokens (cross-attention filled later)."""
    return T5Cache(self_attention=layers.KVCache.init(batch, max_len, config.num_decoder_layers, config.num_heads,
                                                      config.d_kv, config.dtype if dtype is None else dtype))


class T5Attention(nn.Module):
    """Self- or cross-attention without score scaling; ``has_relative_attention_bias`` only in block 0's
    self-attention (HF ``T5Attention``)."""

    config: T5Config
    is_decoder: bool = False
    has_relative_attention_bias: bool = False

    def setup(self) -> None:
        c = self.config
        for name in ("q", "k", "v"):
            setattr(self, name, layers.Linear(c.inner_dim, axes=("embed", "heads"), use_bias=False, dtype=c.dtype))
        self.o = layers.Linear(c.d_model, axes=("heads", "embed"), use_bias=False, dtype=c.dtype)
        if self.has_relative_attention_bias:
            self.relative_attention_bias = layers.Embed(c.relative_attention_num_buckets, c.num_heads,
                                                        axes=(None, None), dtype=c.dtype)

    def compute_bias(self, query_positions: Array, key_length: int) -> Array:
        """Relative position bias ``[1, heads, tq, tk]`` for queries at ``query_positions`` ``[tq]``."""
        c = self.config
        rel = jnp.arange(key_length)[None, :] - query_positions[:, None]
        buckets = relative_position_bucket(rel, bidirectional=not self.is_decoder,
                                           num_buckets=c.relative_attention_num_buckets,
                                           max_distance=c.relative_attention_max_distance)
        return jnp.transpose(self.relative_attention_bias(buckets), (2, 0, 1))[None]

    def __call__(self, x: Array, mask_bias: Array | None, position_bias: Array | None, query_positions: Array, *,
                 kv_input: Array | None = None, kv: tuple[Array, Array] | None = None,
                 layer_cache: tuple[Array, Array] | None = None, cache_index: Array | None = None,
                 decode: bool = False) -> tuple[Array, Array | None, tuple[Array, Array] | None]:
        """Returns (output, the position bias used, the keys/values to cache).

        Self-attention: keys/values from ``x`` (written into ``layer_cache`` at ``cache_index`` if given).
        Cross-attention: from ``kv_input`` (the encoder output), or the cached ``kv``.
        """
        c = self.config
        b, t, _ = x.shape
        heads, d = c.num_heads, c.d_kv
        # T5 does not scale the scores; attention_default divides them by sqrt(d): undo it on the queries.
        q = self.q(x).reshape(b, t, heads, d) * jnp.asarray(math.sqrt(d), x.dtype)
        if kv is not None:
            k, v = kv
        else:
            src = x if kv_input is None else kv_input
            k, v = (p(src).reshape(b, src.shape[1], heads, d) for p in (self.k, self.v))
        new_kv = (k, v) if kv_input is not None or kv is not None else None
        if layer_cache is not None:
            new_kv = layers.cache_update_layer(*layer_cache, k, v, cache_index)
            k, v = layers.cache_view(*new_kv)
        if position_bias is None and self.has_relative_attention_bias:
            position_bias = self.compute_bias(query_positions, k.shape[1])
        bias = mask_bias
        if position_bias is not None:
            bias = position_bias if bias is None else bias + position_bias
        out = hooks.call("attention", self.path, layers.attention_default, q, k, v, bias, inputs=x,
                         positions=jnp.broadcast_to(query_positions, (b, t)), decode=decode, module=self)
        return self.o(out.reshape(b, t, heads * d)), position_bias, new_kv


class T5DenseActDense(nn.Module):
    """``wo(act(wi x))`` (T5 v1.0, ``relu``)."""

    config: T5Config

    def setup(self) -> None:
        c = self.config
        self.wi = layers.Linear(c.d_ff, axes=("embed", "mlp"), use_bias=False, dtype=c.dtype)
        # float32 like transformers' _keep_in_fp32_modules = ["wo"] (Flan-T5 overflows in half precision)
        self.wo = layers.Linear(c.d_model, axes=("mlp", "embed"), use_bias=False, dtype=jnp.float32)
        self.dropout = nn.Dropout(c.dropout_rate)

    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        h = layers.activation(self.config.dense_act_fn)(self.wi(x))
        return self.wo(self.dropout(h, deterministic=deterministic))


class T5DenseGatedActDense(nn.Module):
    """``wo(act(wi_0 x) * wi_1 x)`` (T5 v1.1 / Flan-T5, ``gated-gelu``)."""

    config: T5Config

    def setup(self) -> None:
        c = self.config
        self.wi_0 = layers.Linear(c.d_ff, axes=("embed", "mlp"), use_bias=False, dtype=c.dtype)
        self.wi_1 = layers.Linear(c.d_ff, axes=("embed", "mlp"), use_bias=False, dtype=c.dtype)
        self.wo = layers.Linear(c.d_model, axes=("mlp", "embed"), use_bias=False, dtype=jnp.float32)
        self.dropout = nn.Dropout(c.dropout_rate)

    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        h = layers.activation(self.config.dense_act_fn)(self.wi_0(x)) * self.wi_1(x)
        return self.wo(self.dropout(h, deterministic=deterministic))


class T5LayerFF(nn.Module):
    """``x + DenseReluDense(layer_norm(x))``; ``DenseReluDense`` is the ``mlp`` hook point."""

    config: T5Config

    def setup(self) -> None:
        c = self.config
        self.DenseReluDense = T5DenseGatedActDense(c) if c.is_gated_act else T5DenseActDense(c)
        self.layer_norm = layers.RMSNorm(c.layer_norm_epsilon, dtype=c.dtype)
        self.dropout = nn.Dropout(c.dropout_rate)

    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        ff = self.DenseReluDense
        y = hooks.call("mlp", ff.path, lambda h: ff(h, deterministic), self.layer_norm(x), module=self)
        return x + self.dropout(y, deterministic=deterministic)


class T5LayerSelfAttention(nn.Module):
    """``x + SelfAttention(layer_norm(x))``."""

    config: T5Config
    is_decoder: bool = False
    has_relative_attention_bias: bool = False

    def setup(self) -> None:
        c = self.config
        self.SelfAttention = T5Attention(c, self.is_decoder, self.has_relative_attention_bias)
        self.layer_norm = layers.RMSNorm(c.layer_norm_epsilon, dtype=c.dtype)
        self.dropout = nn.Dropout(c.dropout_rate)

    def __call__(self, x: Array, mask_bias: Array | None, position_bias: Array | None, query_positions: Array,
                 layer_cache: tuple[Array, Array] | None, cache_index: Array | None, decode: bool,
                 deterministic: bool) -> tuple[Array, Array | None, tuple[Array, Array] | None]:
        a, position_bias, new_kv = self.SelfAttention(self.layer_norm(x), mask_bias, position_bias, query_positions,
                                                      layer_cache=layer_cache, cache_index=cache_index, decode=decode)
        return x + self.dropout(a, deterministic=deterministic), position_bias, new_kv


class T5LayerCrossAttention(nn.Module):
    """``x + EncDecAttention(layer_norm(x), encoder output)`` (no position bias)."""

    config: T5Config

    def setup(self) -> None:
        c = self.config
        self.EncDecAttention = T5Attention(c, is_decoder=True, has_relative_attention_bias=False)
        self.layer_norm = layers.RMSNorm(c.layer_norm_epsilon, dtype=c.dtype)
        self.dropout = nn.Dropout(c.dropout_rate)

    def __call__(self, x: Array, encoder_states: Array | None, kv: tuple[Array, Array] | None,
                 mask_bias: Array | None, query_positions: Array, decode: bool,
                 deterministic: bool) -> tuple[Array, tuple[Array, Array]]:
        a, _, new_kv = self.EncDecAttention(self.layer_norm(x), mask_bias, None, query_positions,
                                            kv_input=encoder_states, kv=kv, decode=decode)
        return x + self.dropout(a, deterministic=deterministic), new_kv


class T5Block(nn.Module):
    """One block: ``layer_0`` self-attention, (decoder) ``layer_1`` cross-attention, then the feed-forward."""

    config: T5Config
    is_decoder: bool = False
    has_relative_attention_bias: bool = False

    def setup(self) -> None:
        c = self.config
        sublayers: list[nn.Module] = [T5LayerSelfAttention(c, self.is_decoder, self.has_relative_attention_bias)]
        if self.is_decoder:
            sublayers.append(T5LayerCrossAttention(c))
        sublayers.append(T5LayerFF(c))
        # A list attribute names its members layer_0, layer_1, ... (HF's block.<i>.layer.<j>).
        self.layer = sublayers

    def __call__(self, x: Array, mask_bias: Array | None, position_bias: Array | None, query_positions: Array,
                 layer_cache: tuple[Array, Array] | None, cache_index: Array | None, encoder_states: Array | None,
                 encoder_bias: Array | None, cross_kv: tuple[Array, Array] | None, decode: bool, deterministic: bool
                 ) -> tuple[Array, Array | None, tuple[Array, Array] | None, tuple[Array, Array] | None]:
        """Returns (output, the position bias for the next blocks, new self-attention K/V, cross K/V or None)."""
        x, position_bias, kv = self.layer[0](x, mask_bias, position_bias, query_positions, layer_cache, cache_index,
                                             decode, deterministic)
        ckv = None
        if self.is_decoder:
            x, ckv = self.layer[1](x, encoder_states, cross_kv, encoder_bias, query_positions, decode, deterministic)
        return self.layer[-1](x, deterministic), position_bias, kv, ckv


class T5Stack(nn.Module):
    """The encoder or the decoder (HF ``T5Stack`` without its alias of ``shared``): ``block_<i>``,
    ``final_layer_norm``."""

    config: T5Config
    is_decoder: bool = False

    def setup(self) -> None:
        c = self.config
        n = c.num_decoder_layers if self.is_decoder else c.num_layers
        # A list attribute names its members block_0, block_1, ... (HF's encoder.block.<i>).
        block = layers.remat_layer(T5Block, c.remat, static_argnums=(10, 11))  # decode, deterministic are static
        self.block = [block(c, self.is_decoder, i == 0) for i in range(n)]
        self.final_layer_norm = layers.RMSNorm(c.layer_norm_epsilon, dtype=c.dtype)
        self.dropout = nn.Dropout(c.dropout_rate)

    def __call__(self, x: Array, mask_bias: Array | None, query_positions: Array, *,
                 encoder_states: Array | None = None, encoder_bias: Array | None = None,
                 cross_kv: tuple[tuple[Array, Array], ...] | None = None, cache: layers.KVCache | None = None,
                 decode: bool = False, deterministic: bool = True
                 ) -> tuple[tuple[Array, ...], tuple[tuple[Array, Array], ...], tuple[tuple[Array, Array], ...]]:
        """Returns (hidden states as HF returns them, new self-attention K/V per layer, cross K/V per layer)."""
        x = self.dropout(x, deterministic=deterministic)
        hidden_states = [x]
        self_kv, new_cross = [], []
        position_bias = None
        for i, block in enumerate(self.block):
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
            x, position_bias, kv, ckv = block(x, mask_bias, position_bias, query_positions, layer_cache,
                                              None if cache is None else cache.index, encoder_states, encoder_bias,
                                              None if cross_kv is None else cross_kv[i], decode, deterministic)
            self_kv.append(kv)
            if self.is_decoder:
                new_cross.append(ckv)
            hidden_states.append(x)
        hidden_states[-1] = self.dropout(self.final_layer_norm(x), deterministic=deterministic)
        return tuple(hidden_states), tuple(self_kv), tuple(new_cross)


@flax.struct.dataclass
class Seq2SeqOutput(DecoderOutput):
    """:class:`~vlpeft_jax.models.outputs.DecoderOutput` of the decoder, plus the encoder's side.

    Attributes:
      encoder_hidden_states: the encoder's embedding output and block outputs (the last after its final norm),
        or None when the encoder did not run (a cached decoding step).
      encoder_attention_mask: ``[b, t_enc]`` the encoder mask actually used (after the ``embed`` hook).
    """

    encoder_hidden_states: tuple[Array, ...] | None = None
    encoder_attention_mask: Array | None = None


class T5ForConditionalGeneration(nn.Module):
    """T5 with its LM head (HF ``T5ForConditionalGeneration``); see the module docstring."""

    config: T5Config
    is_encoder_decoder: ClassVar[bool] = True

    def setup(self) -> None:
        c = self.config
        self.shared = layers.Embed(c.vocab_size, c.d_model, axes=("vocab", "embed"), dtype=c.dtype)
        self.encoder = T5Stack(c, is_decoder=False)
        self.decoder = T5Stack(c, is_decoder=True)
        if not c.tie_word_embeddings:
            self.lm_head = layers.Linear(c.vocab_size, axes=("embed", "vocab"), use_bias=False, dtype=c.dtype)

    def embed_tokens(self, input_ids: Array) -> Array:
        """Token embeddings ``[b, t, d_model]`` (``shared``, no hook), what ``inputs_embeds`` replaces."""
        return self.shared(input_ids)

    @nn.nowrap
    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> T5Cache:
        """An empty decoding cache (see :func:`init_cache`); callable on the unbound module."""
        return init_cache(self.config, batch, max_len, dtype)

    def encode(self, input_ids: Array | None = None, attention_mask: Array | None = None, *,
               inputs_embeds: Array | None = None, deterministic: bool = True) -> tuple[tuple[Array, ...], Array]:
        """Runs the encoder: (its hidden states, the last after the final norm; the mask after the ``embed`` hook)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("T5 encoder: pass exactly one of input_ids [b, t] and inputs_embeds [b, t, d_model]")
        if inputs_embeds is not None:
            if inputs_embeds.ndim != 3:
                raise InputError(f"inputs_embeds must be [batch, length, d_model], got shape {inputs_embeds.shape}")
            embeds = inputs_embeds.astype(self.config.dtype)
        else:
            if input_ids.ndim != 2:
                raise InputError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
            embeds = self.shared(input_ids)
        b, t = embeds.shape[:2]
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        elif tuple(attention_mask.shape) != (b, t):
            raise InputError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {(b, t)} like the "
                             "encoder inputs")
        embeds, mask = hooks.call("embed", self.shared.path, lambda ids, e, m: (e, m), input_ids, embeds,
                                  attention_mask, decode=False, module=self.shared)
        hidden, _, _ = self.encoder(embeds, layers.padding_bias(mask), jnp.arange(embeds.shape[1]),
                                    deterministic=deterministic)
        return hidden, mask

    def __call__(self, input_ids: Array | None = None, attention_mask: Array | None = None,
                 decoder_input_ids: Array | None = None, decoder_attention_mask: Array | None = None, *,
                 inputs_embeds: Array | None = None, cache: T5Cache | None = None, decode: bool = False,
                 logits_to_keep: int = 0, deterministic: bool = True) -> Seq2SeqOutput:
        c = self.config
        run_encoder = input_ids is not None or inputs_embeds is not None
        encoder_hidden, encoder_mask, cross_kv = None, None, None
        if run_encoder:
            encoder_hidden, encoder_mask = self.encode(input_ids, attention_mask, inputs_embeds=inputs_embeds,
                                                       deterministic=deterministic)
            b = encoder_mask.shape[0]
        elif cache is not None and cache.cross_keys is not None:
            encoder_mask = cache.encoder_mask
            cross_kv = tuple(zip(cache.cross_keys, cache.cross_values, strict=True))
            b = encoder_mask.shape[0]
        else:
            raise InputError("T5: give the encoder input (input_ids or inputs_embeds), or a cache the encoder has "
                             "already filled (a decoding step)")
        if decoder_input_ids is None:
            decoder_input_ids = jnp.full((b, 1), c.decoder_start_token_id, jnp.int32)
        if decoder_input_ids.ndim != 2 or decoder_input_ids.shape[0] != b:
            raise InputError(f"decoder_input_ids must be [batch={b}, length], got shape {decoder_input_ids.shape}")
        t = decoder_input_ids.shape[1]
        if decoder_attention_mask is not None and tuple(decoder_attention_mask.shape) != (b, t):
            raise InputError(f"decoder_attention_mask has shape {tuple(decoder_attention_mask.shape)}; expected "
                             f"{(b, t)} like decoder_input_ids")
        dec_mask = jnp.ones((b, t), jnp.int32) if decoder_attention_mask is None else decoder_attention_mask

        self_cache = None if cache is None else cache.self_attention
        if self_cache is None:
            query_positions = jnp.arange(t)
            self_bias = layers.causal_padding_bias(dec_mask, t)
        else:
            if t > self_cache.max_len:
                raise InputError(f"{t} decoder tokens do not fit in a cache of max_len {self_cache.max_len}")
            query_positions = self_cache.index + jnp.arange(t)
            valid = layers.cache_write_mask(self_cache, dec_mask, t)
            self_bias = layers.cached_causal_bias(valid, self_cache.index, t)
        hidden, self_kv, new_cross = self.decoder(
            self.shared(decoder_input_ids), self_bias, query_positions,
            encoder_states=None if encoder_hidden is None else encoder_hidden[-1],
            encoder_bias=layers.padding_bias(encoder_mask), cross_kv=cross_kv, cache=self_cache, decode=decode,
            deterministic=deterministic)

        new_cache = None
        if cache is not None:
            new_self = layers.KVCache(keys=tuple(k for k, _ in self_kv), values=tuple(v for _, v in self_kv),
                                      mask=valid, index=self_cache.index + t)
            new_cache = T5Cache(self_attention=new_self, cross_keys=tuple(k for k, _ in new_cross),
                                cross_values=tuple(v for _, v in new_cross), encoder_mask=encoder_mask)

        h = hooks.call("final_hidden", (*self.path, "decoder", "final_layer_norm"), lambda x: x, hidden[-1],
                       module=self)
        h = layers.keep_last(h, logits_to_keep)
        if c.scale_decoder_outputs:
            h = h * jnp.asarray(c.d_model ** -0.5, h.dtype)
        head = self.shared.attend if c.tie_word_embeddings else self.lm_head
        logits = hooks.call("lm_head", (*self.path, "lm_head"), head, h, module=self)
        return Seq2SeqOutput(logits=logits, hidden_states=hidden, attention_mask=dec_mask, cache=new_cache,
                             encoder_hidden_states=encoder_hidden, encoder_attention_mask=encoder_mask)
