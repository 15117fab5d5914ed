"""GPT-2 language model (``GPT2LMHeadModel``) with Hugging Face parameter names and a KV cache.

The module tree mirrors transformers' ``GPT2LMHeadModel``: ``transformer/{wte, wpe, h_<i>/{ln_1,
attn/{c_attn, c_proj}, ln_2, mlp/{c_fc, c_proj}}, ln_f}`` and, only when the embeddings are untied,
``lm_head``. GPT-2's ``Conv1D`` already stores weights ``[in, out]``, so its checkpoints load without a
transpose, and the fused ``c_attn`` (query, key and value side by side) is kept as one ``Linear``.

Calling convention: see :mod:`vlpeft_jax.models.outputs`. Hook points: ``embed`` (path
``transformer/wte``; the position embeddings are added after it, from the positions of the sequence the
hook returns, as peft's prompt tuning does), ``positions`` (``transformer``; the position ids that index
``wpe``, computed or given), ``attention`` per layer (``transformer/h_<i>/attn``),
``mlp`` per layer (``transformer/h_<i>/mlp``), ``final_hidden`` (``transformer/ln_f``, after the
final norm) and ``lm_head`` (``lm_head``; the tied head is ``wte.attend``).

Example:
    >>> import jax, jax.numpy as jnp
    >>> cfg = GPT2Config(vocab_size=50, max_position_embeddings=16, hidden_size=8, num_hidden_layers=1,
    ...                  num_attention_heads=2)
    >>> model = GPT2LMHeadModel(cfg)
    >>> ids = jnp.array([[1, 2, 3]])
    >>> params = model.init(jax.random.key(0), ids)["params"]
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

from vlpeft_jax.errors import ConfigError, InputError
from vlpeft_jax.models import hooks, layers
from vlpeft_jax.models.outputs import DecoderOutput

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """GPT-2 architecture.

    Attributes:
      vocab_size, max_position_embeddings (HF ``n_positions``), hidden_size (``n_embd``),
      num_hidden_layers (``n_layer``), num_attention_heads (``n_head``): sizes.
      intermediate_size: feed-forward width (HF ``n_inner``; None means ``4 * hidden_size``).
      activation_function: HF activation name (``gelu_new`` for GPT-2).
      layer_norm_epsilon: LayerNorm epsilon.
      scale_attn_weights: divide attention scores by ``sqrt(head_dim)`` (True for GPT-2).
      scale_attn_by_inverse_layer_idx: also divide layer ``i``'s scores by ``i + 1``.
      tie_word_embeddings: the LM head is the token embedding (True for GPT-2).
      dtype: compute dtype (parameters stay float32).
      remat: rematerialisation of each block ``h_<i>`` in the backward pass, one of
        :data:`~vlpeft_jax.models.layers.REMAT_POLICIES` (``"none"``, ``"full"``, ``"dots"``, ``"dots_no_batch"``).
    """

    vocab_size: int = 50257
    max_position_embeddings: int = 1024
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    dtype: Any = jnp.float32
    remat: str = "none"

    def __post_init__(self) -> None:
        layers.check_remat(self.remat)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"GPT-2 hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                              f"({self.num_attention_heads})")
        if self.activation_function not in layers.ACTIVATIONS:
            raise ConfigError(f"GPT-2 activation_function {self.activation_function!r} is not supported; "
                              f"supported: {', '.join(sorted(layers.ACTIVATIONS))}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mlp_width(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], *, dtype: Any = jnp.float32) -> GPT2Config:
        """Reads a Hugging Face GPT-2 ``config.json`` dict (old ``n_*`` or new ``*_size`` names).

        Example:
            >>> GPT2Config.from_hf({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4}).hidden_size
            64
        """
        model_type = config.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ConfigError(f"GPT2Config.from_hf got model_type {model_type!r}; expected 'gpt2'")
        if config.get("add_cross_attention", False):
            raise ConfigError("GPT-2 with add_cross_attention=True (encoder-decoder use) is not supported; "
                              "only the decoder-only GPT2LMHeadModel is")

        def get(*names: str, default: Any) -> Any:
            for n in names:
                if config.get(n) is not None:
                    return config[n]
            return default

        return cls(
            vocab_size=int(get("vocab_size", default=50257)),
            max_position_embeddings=int(get("n_positions", "max_position_embeddings", default=1024)),
            hidden_size=int(get("n_embd", "hidden_size", default=768)),
            num_hidden_layers=int(get("n_layer", "num_hidden_layers", default=12)),
            num_attention_heads=int(get("n_head", "num_attention_heads", default=12)),
            intermediate_size=get("n_inner", "intermediate_size", default=None),
            activation_function=str(get("activation_function", default="gelu_new")),
            layer_norm_epsilon=float(get("layer_norm_epsilon", default=1e-5)),
            scale_attn_weights=bool(get("scale_attn_weights", default=True)),
            scale_attn_by_inverse_layer_idx=bool(get("scale_attn_by_inverse_layer_idx", default=False)),
            tie_word_embeddings=bool(get("tie_word_embeddings", default=True)),
            dtype=dtype,
        )


def init_cache(config: GPT2Config, batch: int, max_len: int, dtype: Any = None) -> layers.KVCache:
    """An empty KV cache for ``batch`` sequences of up to ``max_len`` tokens (dtype: the compute dtype)."""
    return layers.KVCache.init(batch, max_len, config.num_hidden_layers, config.num_attention_heads,
                               config.head_dim, config.dtype if dtype is None else dtype)


class GPT2Attention(nn.Module):
    """Causal self-attention with the fused ``c_attn`` projection."""

    config: GPT2Config
    layer_idx: int

    def setup(self) -> None:
        c = self.config
        self.c_attn = layers.Linear(3 * c.hidden_size, axes=("embed", "heads"), dtype=c.dtype)
        self.c_proj = layers.Linear(c.hidden_size, axes=("heads", "embed"), dtype=c.dtype)

    def __call__(self, x: Array, bias: Array, positions: Array, layer_cache: tuple[Array, Array] | None,
                 cache_index: Array | None, decode: bool) -> tuple[Array, tuple[Array, Array] | None]:
        c = self.config
        b, t, _ = x.shape
        heads, d = c.num_attention_heads, c.head_dim
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
        q, k, v = (a.reshape(b, t, heads, d) for a in (q, k, v))
        # attention_default divides by sqrt(d); fold GPT-2's other scalings into the queries.
        scale = 1.0 if c.scale_attn_weights else d ** 0.5
        if c.scale_attn_by_inverse_layer_idx:
            scale /= self.layer_idx + 1.0
        if scale != 1.0:
            q = q * jnp.asarray(scale, q.dtype)
        new_cache = None
        if layer_cache is not None:
            new_cache = layers.cache_update_layer(*layer_cache, k, v, cache_index)
            k, v = layers.cache_view(*new_cache)
        out = hooks.call("attention", self.path, layers.attention_default, q, k, v, bias,
                         inputs=x, positions=positions, decode=decode, module=self)
        return self.c_proj(out.reshape(b, t, heads * d)), new_cache


class GPT2MLP(nn.Module):
    """``c_proj(act(c_fc(x)))``; the whole block is the ``mlp`` hook point."""

    config: GPT2Config

    def setup(self) -> None:
        c = self.config
        self.c_fc = layers.Linear(c.mlp_width, axes=("embed", "mlp"), dtype=c.dtype)
        self.c_proj = layers.Linear(c.hidden_size, axes=("mlp", "embed"), dtype=c.dtype)

    def __call__(self, x: Array) -> Array:
        return hooks.call("mlp", self.path, self._feed_forward, x, module=self)

    def _feed_forward(self, x: Array) -> Array:
        return self.c_proj(layers.activation(self.config.activation_function)(self.c_fc(x)))


class GPT2Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    config: GPT2Config
    layer_idx: int

    def setup(self) -> None:
        c = self.config
        self.ln_1 = layers.LayerNorm(c.layer_norm_epsilon, dtype=c.dtype)
        self.attn = GPT2Attention(c, self.layer_idx)
        self.ln_2 = layers.LayerNorm(c.layer_norm_epsilon, dtype=c.dtype)
        self.mlp = GPT2MLP(c)

    def __call__(self, x: Array, bias: Array, positions: Array, layer_cache: tuple[Array, Array] | None,
                 cache_index: Array | None, decode: bool) -> tuple[Array, tuple[Array, Array] | None]:
        a, new_cache = self.attn(self.ln_1(x), bias, positions, layer_cache, cache_index, decode)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, new_cache


class GPT2Model(nn.Module):
    """The GPT-2 trunk (HF ``GPT2Model``): embeddings, blocks ``h_<i>``, final norm ``ln_f``."""

    config: GPT2Config

    def setup(self) -> None:
        c = self.config
        self.wte = layers.Embed(c.vocab_size, c.hidden_size, axes=("vocab", "embed"), dtype=c.dtype)
        self.wpe = layers.Embed(c.max_position_embeddings, c.hidden_size, axes=("positions", "embed"),
                                dtype=c.dtype)
        # A list attribute names its members h_0, h_1, ... (HF's transformer.h.0, ...).
        block = layers.remat_layer(GPT2Block, c.remat, static_argnums=(6,))  # decode is static
        self.h = [block(c, i) for i in range(c.num_hidden_layers)]
        self.ln_f = layers.LayerNorm(c.layer_norm_epsilon, dtype=c.dtype)

    def embed(self, input_ids: Array) -> Array:
        """Token embeddings ``wte(input_ids)`` (no position embedding, no hook)."""
        return self.wte(input_ids)

    def attend(self, h: Array) -> Array:
        """The tied LM head ``h @ wte.T``."""
        return self.wte.attend(h)

    def __call__(self, input_ids: Array | None, attention_mask: Array | None, inputs_embeds: Array | None,
                 position_ids: Array | None, cache: layers.KVCache | None,
                 decode: bool) -> tuple[tuple[Array, ...], Array, layers.KVCache | None]:
        """Returns (hidden states as HF returns them, the processed mask, the updated cache)."""
        embeds, mask, position_ids = embed_with_hook(self.embed, self.wte.path, input_ids, attention_mask,
                                                     inputs_embeds, position_ids, decode, self.config.dtype)
        t = embeds.shape[1]
        positions, bias, cache_mask = attention_layout(mask, position_ids, cache)
        positions = hooks.call("positions", self.path, lambda p: p, positions, decode=decode, module=self)
        x = embeds + self.wpe(positions)
        hidden_states = [x]
        new_keys, new_values = [], []
        for i, block in enumerate(self.h):
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
            x, new_layer_cache = block(x, bias, positions, layer_cache, None if cache is None else cache.index,
                                       decode)
            if new_layer_cache is not None:
                new_keys.append(new_layer_cache[0])
                new_values.append(new_layer_cache[1])
            hidden_states.append(x)
        hidden_states[-1] = self.ln_f(x)
        new_cache = None
        if cache is not None:
            new_cache = layers.KVCache(keys=tuple(new_keys), values=tuple(new_values), mask=cache_mask,
                                       index=cache.index + t)
        return tuple(hidden_states), mask, new_cache


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with its language-modelling head (HF ``GPT2LMHeadModel``); see the module docstring."""

    config: GPT2Config

    def setup(self) -> None:
        c = self.config
        self.transformer = GPT2Model(c)
        if not c.tie_word_embeddings:
            self.lm_head = layers.Linear(c.vocab_size, axes=("embed", "vocab"), use_bias=False, dtype=c.dtype)

    def embed_tokens(self, input_ids: Array) -> Array:
        """Token embeddings ``[b, t, d]`` (what ``inputs_embeds`` replaces; position embeddings are added later)."""
        return self.transformer.embed(input_ids)

    @nn.nowrap
    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> layers.KVCache:
        """An empty KV cache for this model (see :func:`init_cache`); callable on the unbound module."""
        return init_cache(self.config, batch, max_len, dtype)

    def __call__(self, input_ids: Array | None = None, attention_mask: Array | None = None, *,
                 inputs_embeds: Array | None = None, position_ids: Array | None = None,
                 cache: layers.KVCache | None = None, decode: bool = False, logits_to_keep: int = 0
                 ) -> DecoderOutput:
        hidden_states, mask, new_cache = self.transformer(input_ids, attention_mask, inputs_embeds, position_ids,
                                                          cache, decode)
        h = hooks.call("final_hidden", (*self.path, "transformer", "ln_f"), lambda x: x, hidden_states[-1], module=self)
        head = self.transformer.attend if self.config.tie_word_embeddings else self.lm_head
        logits = hooks.call("lm_head", (*self.path, "lm_head"), head, layers.keep_last(h, logits_to_keep), module=self)
        return DecoderOutput(logits=logits, hidden_states=hidden_states, attention_mask=mask, cache=new_cache)


# --------------------------------------------------------------------------------------------------
# Input handling shared by the decoder families (llama.py uses these too).


def embed_with_hook(embed: Any, path: tuple[str, ...], input_ids: Array | None, attention_mask: Array | None,
                    inputs_embeds: Array | None, position_ids: Array | None, decode: bool,
                    dtype: Any) -> tuple[Array, Array, Array | None]:
    """Token embeddings, mask and position ids after the ``embed`` hook (which may add tokens, e.g. prompts).

    Exactly one of ``input_ids`` (embedded with ``embed``) and ``inputs_embeds`` (cast to the compute
    ``dtype``) is given. A missing
    mask becomes all ones, so that a hook can extend it. Explicit ``position_ids`` are returned only if
    the hook kept the length: when it added tokens they no longer describe the sequence and are dropped
    (positions then come from the extended mask), as peft ignores them for prompt learning.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise InputError("pass exactly one of input_ids [b, t] and inputs_embeds [b, t, d]")
    if inputs_embeds is not None:
        if inputs_embeds.ndim != 3:
            raise InputError(f"inputs_embeds must be [batch, length, width], got shape {inputs_embeds.shape}")
        embeds = inputs_embeds.astype(dtype)
    else:
        if input_ids.ndim != 2:
            raise InputError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        embeds = embed(input_ids)
    b, t = embeds.shape[:2]
    for name, a in (("attention_mask", attention_mask), ("position_ids", position_ids)):
        if a is not None and tuple(a.shape) != (b, t):
            raise InputError(f"{name} has shape {tuple(a.shape)}; expected {(b, t)} like the inputs")
    if attention_mask is None:
        attention_mask = jnp.ones((b, t), jnp.int32)
    embeds, mask = hooks.call("embed", path, lambda ids, e, m: (e, m), input_ids, embeds, attention_mask,
                              decode=decode, module=embed if isinstance(embed, nn.Module) else None)
    return embeds, mask, (position_ids if embeds.shape[1] == t else None)


def attention_layout(mask: Array, position_ids: Array | None,
                     cache: layers.KVCache | None) -> tuple[Array, Array, Array | None]:
    """Positions ``[b, t]``, the additive attention bias and (with a cache) the cache's new validity mask.

    ``mask`` is the mask after the ``embed`` hook. Unless ``position_ids`` are given, positions follow HF
    ``generate``: ``cumsum(mask) - 1`` (0 on left padding), continued from the tokens already in the cache.
    """
    b, t = mask.shape
    if cache is None:
        positions = layers.positions_from_mask(mask, b, t) if position_ids is None else position_ids
        return positions, layers.causal_padding_bias(mask, t), None
    if t > cache.max_len:
        raise InputError(f"{t} tokens do not fit in a KV cache of max_len {cache.max_len}")
    positions = layers.cache_positions(cache, mask, b, t) if position_ids is None else position_ids
    valid = layers.cache_write_mask(cache, mask, t)
    return positions, layers.cached_causal_bias(valid, cache.index, t), valid
