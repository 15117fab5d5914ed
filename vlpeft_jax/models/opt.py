"""OPT language model (``OPTForCausalLM``, the LM of BLIP-2's OPT checkpoints) with HF names and a KV cache.

The module tree mirrors transformers' ``OPTForCausalLM``: ``model/decoder/{embed_tokens, embed_positions,
project_in, layers_<i>/{self_attn/{q_proj, k_proj, v_proj, out_proj}, self_attn_layer_norm, fc1, fc2,
final_layer_norm}, final_layer_norm, project_out}`` and ``lm_head`` (absent when tied to ``embed_tokens``,
as in every released OPT). ``project_in``/``project_out`` (bias-free) exist only when ``word_embed_proj_dim
!= hidden_size`` (OPT-350m); the decoder's ``final_layer_norm`` only for pre-LN models
(``do_layer_norm_before=True``; OPT-350m is post-LN and has none). ``embed_positions`` is OPT's learned
table with ``max_position_embeddings + 2`` rows: position ``p`` reads row ``p + 2``. As in transformers,
positions come from the attention mask, ``cumsum(mask) * mask - 1`` (``-1``, i.e. row 1, on padding),
continued from the tokens already in the KV cache.

Calling convention: see :mod:`vlpeft_jax.models.outputs`; ``inputs_embeds`` and ``embed_tokens`` are
``word_embed_proj_dim`` wide (before ``project_in``). Hook points: ``embed`` (``model/decoder/embed_tokens``,
on the token embeddings before ``project_in``), ``positions`` (``model/decoder``; the 0-based position ids,
before the offset of 2), ``attention`` per layer (``model/decoder/layers_<i>/self_attn``), ``mlp`` per
layer (``model/decoder/layers_<i>``: ``fc2(relu(fc1(x)))``, which sits directly in the layer in OPT),
``final_hidden`` (``model/decoder/final_layer_norm``, after the final norm and ``project_out``), ``lm_head``
(``lm_head``; the tied head is ``embed_tokens.attend``), and ``linear`` on every projection.

Example:
    >>> import jax, jax.numpy as jnp
    >>> cfg = OPTConfig(vocab_size=50, hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
    ...                 max_position_embeddings=16, word_embed_proj_dim=8, do_layer_norm_before=False)
    >>> model = OPTForCausalLM(cfg)
    >>> ids = jnp.array([[1, 2, 3]])
    >>> params = model.init(jax.random.key(0), ids)["params"]
    >>> sorted(params["model"]["decoder"])[:4]
    ['embed_positions', 'embed_tokens', 'layers_0', 'project_in']
    >>> model.apply({"params": params}, ids).logits.shape
    (1, 3, 50)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.models import hooks, layers
from vlpeft_jax.models.gpt2 import attention_layout, embed_with_hook
from vlpeft_jax.models.outputs import DecoderOutput

Array = jax.Array

POSITION_OFFSET = 2  # OPT's learned positions start at row 2 (a fairseq legacy)


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    """OPT architecture.

    Attributes:
      vocab_size, hidden_size, ffn_dim, num_hidden_layers, num_attention_heads: sizes.
      max_position_embeddings: positions (the table has 2 more rows).
      word_embed_proj_dim: width of the token embeddings and of the LM head's input (None: ``hidden_size``);
        when it differs, ``project_in``/``project_out`` map between it and ``hidden_size``.
      do_layer_norm_before: pre-LN (True, most OPTs) or post-LN (False, OPT-350m).
      remove_final_layer_norm: HF's ``_remove_final_layer_norm`` (old fine-tuned checkpoints without it).
      enable_bias: biases on the attention and feed-forward projections.
      activation_function: HF activation name (``relu``).
      layer_norm_eps: LayerNorm epsilon (transformers uses PyTorch's default 1e-5).
      tie_word_embeddings: the LM head is the token embedding (True for OPT).
      dtype: compute dtype (parameters stay float32).
      remat: rematerialisation of each decoder layer in the backward pass, one of
        :data:`~vlpeft_jax.models.layers.REMAT_POLICIES`.
    """

    vocab_size: int = 50272
    hidden_size: int = 768
    ffn_dim: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int | None = None
    do_layer_norm_before: bool = True
    remove_final_layer_norm: bool = False
    enable_bias: bool = True
    activation_function: str = "relu"
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    dtype: Any = jnp.float32
    remat: str = "none"

    def __post_init__(self) -> None:
        layers.check_remat(self.remat)
        if self.word_embed_proj_dim is None:
            object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"OPT hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                              f"({self.num_attention_heads})")
        if self.activation_function not in layers.ACTIVATIONS:
            raise ConfigError(f"OPT activation_function {self.activation_function!r} is not supported; "
                              f"supported: {', '.join(sorted(layers.ACTIVATIONS))}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def projects(self) -> bool:
        """Whether ``project_in``/``project_out`` exist (``word_embed_proj_dim != hidden_size``)."""
        return self.word_embed_proj_dim != self.hidden_size

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], *, dtype: Any = jnp.float32) -> OPTConfig:
        """Reads a Hugging Face OPT ``config.json`` dict (also the ``text_config`` of a BLIP-2 checkpoint).

        Example:
            >>> cfg = OPTConfig.from_hf({"model_type": "opt", "hidden_size": 64, "ffn_dim": 128,
            ...                          "num_hidden_layers": 2, "num_attention_heads": 4,
            ...                          "word_embed_proj_dim": 32, "do_layer_norm_before": False})
            >>> cfg.projects, cfg.has_final_layer_norm, cfg.head_dim
            (True, False, 16)
        """
        model_type = config.get("model_type", "opt")
        if model_type != "opt":
            raise ConfigError(f"OPTConfig.from_hf got model_type {model_type!r}; expected 'opt'")
        if not config.get("layer_norm_elementwise_affine", True):
            raise ConfigError("OPT with layer_norm_elementwise_affine=False (LayerNorms without weights) is not "
                              "supported; only the released OPTs' affine LayerNorms are")
        hidden = int(config.get("hidden_size", 768))
        return cls(
            vocab_size=int(config.get("vocab_size", 50272)),
            hidden_size=hidden,
            ffn_dim=int(config.get("ffn_dim", 3072)),
            num_hidden_layers=int(config.get("num_hidden_layers", 12)),
            num_attention_heads=int(config.get("num_attention_heads", 12)),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            word_embed_proj_dim=int(config.get("word_embed_proj_dim") or hidden),
            do_layer_norm_before=bool(config.get("do_layer_norm_before", True)),
            remove_final_layer_norm=bool(config.get("_remove_final_layer_norm", False)),
            enable_bias=bool(config.get("enable_bias", True)),
            activation_function=str(config.get("activation_function", "relu")),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
            dtype=dtype,
        )


def init_cache(config: OPTConfig, batch: int, max_len: int, dtype: Any = None) -> layers.KVCache:
    """An empty KV cache for ``batch`` sequences of up to ``max_len`` tokens (dtype: the compute dtype)."""
    return layers.KVCache.init(batch, max_len, config.num_hidden_layers, config.num_attention_heads,
                               config.head_dim, config.dtype if dtype is None else dtype)


def opt_positions(mask: Array, cache: layers.KVCache | None) -> Array:
    """OPT's 0-based position ids ``[b, t]``: ``cumsum(mask) * mask - 1`` over the whole sequence.

    Real tokens are numbered after the real tokens already in ``cache``; padding gets ``-1`` (row 1 of
    ``embed_positions`` after the offset), exactly as transformers' ``OPTDecoder`` computes them.

    Example:
        >>> opt_positions(jnp.array([[0, 1, 1], [1, 1, 1]]), None).tolist()
        [[-1, 0, 1], [0, 1, 2]]
    """
    m = mask.astype(jnp.int32)
    prev = 0 if cache is None else cache.mask.sum(-1).astype(jnp.int32)[:, None]
    return jnp.where(m == 1, prev + jnp.cumsum(m, axis=-1) - 1, -1)


class OPTAttention(nn.Module):
    """Causal multi-head self-attention (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``)."""

    config: OPTConfig

    def setup(self) -> None:
        c = self.config
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(self, name, layers.Linear(c.hidden_size, axes=("embed", "heads"), use_bias=c.enable_bias,
                                              dtype=c.dtype))
        self.out_proj = layers.Linear(c.hidden_size, axes=("heads", "embed"), use_bias=c.enable_bias, dtype=c.dtype)

    def __call__(self, x: Array, bias: Array, positions: Array, layer_cache: tuple[Array, Array] | None,
                 cache_index: Array | None, decode: bool) -> tuple[Array, tuple[Array, Array] | None]:
        c = self.config
        b, t, _ = x.shape
        heads, d = c.num_attention_heads, c.head_dim
        # transformers scales the projected queries by d**-0.5; attention_default divides the scores by sqrt(d).
        q, k, v = (p(x).reshape(b, t, heads, d) for p in (self.q_proj, self.k_proj, self.v_proj))
        new_cache = None
        if layer_cache is not None:
            new_cache = layers.cache_update_layer(*layer_cache, k, v, cache_index)
            k, v = layers.cache_view(*new_cache)
        out = hooks.call("attention", self.path, layers.attention_default, q, k, v, bias,
                         inputs=x, positions=positions, decode=decode, module=self)
        return self.out_proj(out.reshape(b, t, heads * d)), new_cache


class OPTDecoderLayer(nn.Module):
    """One OPT block, pre-LN or post-LN; its feed-forward ``fc2(act(fc1(x)))`` is the ``mlp`` hook point."""

    config: OPTConfig

    def setup(self) -> None:
        c = self.config
        self.self_attn = OPTAttention(c)
        self.self_attn_layer_norm = layers.LayerNorm(c.layer_norm_eps, dtype=c.dtype)
        self.fc1 = layers.Linear(c.ffn_dim, axes=("embed", "mlp"), use_bias=c.enable_bias, dtype=c.dtype)
        self.fc2 = layers.Linear(c.hidden_size, axes=("mlp", "embed"), use_bias=c.enable_bias, dtype=c.dtype)
        self.final_layer_norm = layers.LayerNorm(c.layer_norm_eps, dtype=c.dtype)

    def __call__(self, x: Array, bias: Array, positions: Array, layer_cache: tuple[Array, Array] | None,
                 cache_index: Array | None, decode: bool) -> tuple[Array, tuple[Array, Array] | None]:
        pre = self.config.do_layer_norm_before
        a, new_cache = self.self_attn(self.self_attn_layer_norm(x) if pre else x, bias, positions, layer_cache,
                                      cache_index, decode)
        x = x + a
        if not pre:
            x = self.self_attn_layer_norm(x)
        x = x + hooks.call("mlp", self.path, self._feed_forward, self.final_layer_norm(x) if pre else x,
                           module=self)
        if not pre:
            x = self.final_layer_norm(x)
        return x, new_cache

    def _feed_forward(self, x: Array) -> Array:
        return self.fc2(layers.activation(self.config.activation_function)(self.fc1(x)))


class OPTDecoder(nn.Module):
    """HF ``OPTDecoder``: embeddings, ``project_in``, ``layers_<i>``, ``final_layer_norm``, ``project_out``."""

    config: OPTConfig

    def setup(self) -> None:
        c = self.config
        self.embed_tokens = layers.Embed(c.vocab_size, c.word_embed_proj_dim, axes=("vocab", "embed"),
                                         dtype=c.dtype)
        self.embed_positions = layers.Embed(c.max_position_embeddings + POSITION_OFFSET, c.hidden_size,
                                            axes=("positions", "embed"), dtype=c.dtype)
        if c.projects:
            self.project_in = layers.Linear(c.hidden_size, axes=(None, "embed"), use_bias=False, dtype=c.dtype)
            self.project_out = layers.Linear(c.word_embed_proj_dim, axes=("embed", None), use_bias=False,
                                             dtype=c.dtype)
        # A list attribute names its members layers_0, layers_1, ... (HF's model.decoder.layers.0, ...).
        layer = layers.remat_layer(OPTDecoderLayer, c.remat, static_argnums=(6,))  # decode is static
        self.layers = [layer(c) for _ in range(c.num_hidden_layers)]
        if c.has_final_layer_norm:
            self.final_layer_norm = layers.LayerNorm(c.layer_norm_eps, dtype=c.dtype)

    def embed(self, input_ids: Array) -> Array:
        """Token embeddings (``word_embed_proj_dim`` wide; no ``project_in``, no positions, no hook)."""
        return self.embed_tokens(input_ids)

    def attend(self, h: Array) -> Array:
        """The tied LM head ``h @ embed_tokens.T``."""
        return self.embed_tokens.attend(h)

    def __call__(self, input_ids: Array | None, attention_mask: Array | None, inputs_embeds: Array | None,
                 position_ids: Array | None, cache: layers.KVCache | None,
                 decode: bool) -> tuple[tuple[Array, ...], Array, layers.KVCache | None]:
        """Returns (hidden states as HF returns them, the processed mask, the updated cache)."""
        c = self.config
        embeds, mask, position_ids = embed_with_hook(self.embed, self.embed_tokens.path, input_ids, attention_mask,
                                                     inputs_embeds, position_ids, decode, c.dtype)
        t = embeds.shape[1]
        if position_ids is None:
            position_ids = opt_positions(mask, cache)
        positions, bias, cache_mask = attention_layout(mask, position_ids, cache)
        positions = hooks.call("positions", self.path, lambda p: p, positions, decode=decode, module=self)
        if c.projects:
            embeds = self.project_in(embeds)
        x = embeds + self.embed_positions(positions + POSITION_OFFSET)
        hidden_states = [x]
        new_keys, new_values = [], []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
            x, new_layer_cache = layer(x, bias, positions, layer_cache, None if cache is None else cache.index,
                                       decode)
            if new_layer_cache is not None:
                new_keys.append(new_layer_cache[0])
                new_values.append(new_layer_cache[1])
            hidden_states.append(x)
        if c.has_final_layer_norm:
            x = self.final_layer_norm(x)
        if c.projects:
            x = self.project_out(x)
        hidden_states[-1] = x
        new_cache = None
        if cache is not None:
            new_cache = layers.KVCache(keys=tuple(new_keys), values=tuple(new_values), mask=cache_mask,
                                       index=cache.index + t)
        return tuple(hidden_states), mask, new_cache


class OPTModel(nn.Module):
    """HF ``OPTModel``: only the ``decoder`` (kept as a level so that paths read ``model/decoder/...``)."""

    config: OPTConfig

    def setup(self) -> None:
        self.decoder = OPTDecoder(self.config)

    def __call__(self, *args: Any) -> tuple[tuple[Array, ...], Array, layers.KVCache | None]:
        return self.decoder(*args)


class OPTForCausalLM(nn.Module):
    """OPT with its language-modelling head (HF ``OPTForCausalLM``); see the module docstring."""

    config: OPTConfig

    def setup(self) -> None:
        c = self.config
        self.model = OPTModel(c)
        if not c.tie_word_embeddings:
            self.lm_head = layers.Linear(c.vocab_size, axes=("embed", "vocab"), use_bias=False, dtype=c.dtype)

    def embed_tokens(self, input_ids: Array) -> Array:
        """Token embeddings ``[b, t, word_embed_proj_dim]``, what ``inputs_embeds`` replaces."""
        return self.model.decoder.embed(input_ids)

    @nn.nowrap
    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> layers.KVCache:
        """An empty KV cache for this model (see :func:`init_cache`); callable on the unbound module."""
        return init_cache(self.config, batch, max_len, dtype)

    def __call__(self, input_ids: Array | None = None, attention_mask: Array | None = None, *,
                 inputs_embeds: Array | None = None, position_ids: Array | None = None,
                 cache: layers.KVCache | None = None, decode: bool = False, logits_to_keep: int = 0
                 ) -> DecoderOutput:
        hidden_states, mask, new_cache = self.model(input_ids, attention_mask, inputs_embeds, position_ids, cache,
                                                    decode)
        h = hooks.call("final_hidden", (*self.path, "model", "decoder", "final_layer_norm"), lambda x: x,
                       hidden_states[-1], module=self)
        head = self.model.decoder.attend if self.config.tie_word_embeddings else self.lm_head
        logits = hooks.call("lm_head", (*self.path, "lm_head"), head, layers.keep_last(h, logits_to_keep), module=self)
        return DecoderOutput(logits=logits, hidden_states=hidden_states, attention_mask=mask, cache=new_cache)
