"""LLaMA-family language model (LLaMA 1-3, Qwen2) with Hugging Face parameter names and a KV cache.

The module tree mirrors transformers' ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``: ``model/{embed_tokens,
layers_<i>/{input_layernorm, self_attn/{q,k,v,o}_proj, post_attention_layernorm,
mlp/{gate,up,down}_proj}, norm}`` and ``lm_head`` (absent when the embeddings are tied). Grouped-query
attention (``num_key_value_heads < num_attention_heads``), an explicit ``head_dim``, rotary position
embeddings with ``rope_theta`` and the ``linear`` and ``llama3`` frequency scalings are supported.
Qwen2 is the same network with biases on the query/key/value projections.

Calling convention: see :mod:`vlpeft_jax.models.outputs`. Hook points: ``embed``
(``model/embed_tokens``), ``positions`` (``model``; the position ids the rotary embeddings use, computed or
given), ``attention`` per layer (``model/layers_<i>/self_attn``; queries and keys arrive already rotated),
``mlp`` per layer (``model/layers_<i>/mlp``), ``final_hidden`` (``model/norm``, after the final norm) and
``lm_head`` (``lm_head``; the tied head is ``embed_tokens.attend``).

Example:
    >>> import jax, jax.numpy as jnp
    >>> cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> model = LlamaForCausalLM(cfg)
    >>> ids = jnp.array([[1, 2, 3]])
    >>> params = model.init(jax.random.key(0), ids)["params"]
    >>> model.apply({"params": params}, ids).logits.shape
    (1, 3, 50)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.models import hooks, layers
from vlpeft_jax.models.gpt2 import attention_layout, embed_with_hook
from vlpeft_jax.models.outputs import DecoderOutput

Array = jax.Array

MODEL_TYPES = ("llama", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """LLaMA-family architecture (``model_type`` ``llama`` or ``qwen2``).

    Attributes:
      vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads: sizes.
      num_key_value_heads: key/value heads for grouped-query attention (None: one per query head).
      head_dim: width of one head (None: ``hidden_size // num_attention_heads``).
      hidden_act: HF activation name of the gated feed-forward (``silu``).
      rms_norm_eps: RMSNorm epsilon.
      rope_theta: rotary base wavelength.
      rope_type: ``default``, ``linear`` (frequencies divided by ``rope_factor``) or ``llama3``
        (Llama 3.1's band-wise scaling with ``rope_factor``, ``rope_low_freq_factor``,
        ``rope_high_freq_factor``, ``rope_original_max_position_embeddings``).
      attention_bias: bias on the q/k/v projections (LLaMA's ``attention_bias``; always on for Qwen2).
      o_proj_bias: bias on the output projection (LLaMA: ``attention_bias``; Qwen2: never).
      mlp_bias: bias on the feed-forward projections.
      tie_word_embeddings: the LM head is the token embedding.
      model_type: ``llama`` or ``qwen2`` (for export and messages).
      dtype: compute dtype (parameters stay float32).
      remat: rematerialisation of each decoder layer in the backward pass, one of
        :data:`~vlpeft_jax.models.layers.REMAT_POLICIES`.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    attention_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    model_type: str = "llama"
    dtype: Any = jnp.float32
    remat: str = "none"

    def __post_init__(self) -> None:
        layers.check_remat(self.remat)
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                                  f"({self.num_attention_heads}); set head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope type {self.rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        if self.hidden_act not in layers.ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported; "
                              f"supported: {', '.join(sorted(layers.ACTIVATIONS))}")
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type {self.model_type!r} is not a LLaMA-family type; "
                              f"supported: {', '.join(MODEL_TYPES)}")

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], *, dtype: Any = jnp.float32) -> LlamaConfig:
        """Reads a Hugging Face ``config.json`` dict of a ``llama`` or ``qwen2`` model.

        Both RoPE formats are understood: transformers 5's ``rope_parameters`` and the older
        ``rope_theta`` + ``rope_scaling``. Unsupported RoPE scalings and Qwen2 sliding-window attention
        raise :class:`~vlpeft_jax.errors.ConfigError`.

        Example:
            >>> cfg = LlamaConfig.from_hf({"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
            ...                            "num_hidden_layers": 2, "num_attention_heads": 4,
            ...                            "num_key_value_heads": 2, "vocab_size": 100})
            >>> cfg.attention_bias, cfg.o_proj_bias, cfg.head_dim
            (True, False, 16)
        """
        model_type = config.get("model_type", "llama")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type {model_type!r} is not a LLaMA-family type; supported: "
                              f"{', '.join(MODEL_TYPES)}")
        if model_type == "qwen2":
            sliding = config.get("use_sliding_window", False) or "sliding_attention" in (config.get("layer_types")
                                                                                          or ())
            if sliding:
                raise ConfigError("qwen2 config has use_sliding_window=True (sliding-window attention), which is "
                                  "not supported; only full attention (use_sliding_window=False) is")
            qkv_bias, o_bias, mlp_bias = True, False, False
        else:
            qkv_bias = o_bias = bool(config.get("attention_bias", False))
            mlp_bias = bool(config.get("mlp_bias", False))
        rope = _rope_from_hf(config)
        heads = int(config.get("num_attention_heads", 32))
        return cls(
            vocab_size=int(config.get("vocab_size", 32000)),
            hidden_size=int(config.get("hidden_size", 4096)),
            intermediate_size=int(config.get("intermediate_size", 11008)),
            num_hidden_layers=int(config.get("num_hidden_layers", 32)),
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=config.get("head_dim") or None,
            hidden_act=str(config.get("hidden_act", "silu")),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            attention_bias=qkv_bias,
            o_proj_bias=o_bias,
            mlp_bias=mlp_bias,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            model_type=model_type,
            dtype=dtype,
            **rope,
        )


def _rope_from_hf(config: Mapping[str, Any]) -> dict[str, Any]:
    params = config.get("rope_parameters")
    if not params:  # configs written before transformers 5: rope_theta + rope_scaling
        params = config.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"rope_parameters/rope_scaling must be a dict, got {params!r}")
    rope_type = params.get("rope_type", params.get("type")) or "default"
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"rope_scaling type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)} "
                          "(or no rope_scaling)")
    partial = params.get("partial_rotary_factor", 1.0)
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"partial_rotary_factor {partial!r} is not supported for LLaMA-family models; only 1.0")
    theta = params.get("rope_theta") or config.get("rope_theta") or 10000.0
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        out["rope_factor"] = float(_require(params, "factor", rope_type))
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = float(_require(params, "low_freq_factor", rope_type))
        out["rope_high_freq_factor"] = float(_require(params, "high_freq_factor", rope_type))
        out["rope_original_max_position_embeddings"] = int(
            _require(params, "original_max_position_embeddings", rope_type))
    return out


def _require(params: Mapping[str, Any], key: str, rope_type: str) -> Any:
    if params.get(key) is None:
        raise ConfigError(f"rope_scaling of type {rope_type!r} needs {key!r}; got keys {sorted(params)}")
    return params[key]


def rope_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """Rotary inverse frequencies ``[head_dim // 2]`` (float32), computed as transformers does.

    ``default``: ``1 / theta^(2i/d)``; ``linear``: divided by ``factor``; ``llama3``: low frequencies
    divided by ``factor``, high ones kept, the band between interpolated (``_compute_llama3_parameters``).
    """
    d = config.head_dim
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** (np.arange(0, d, 2).astype(np.float32) / np.float32(d))))
    inv_freq = inv_freq.astype(np.float32)
    if config.rope_type == "linear":
        return (inv_freq / np.float32(config.rope_factor)).astype(np.float32)
    if config.rope_type == "llama3":
        factor, low, high = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
        old_len = config.rope_original_max_position_embeddings
        low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
    """Rotates ``x`` ``[b, t, heads, d]`` by ``positions`` ``[b, t]`` (HF's rotate-half layout)."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype: Any = None) -> layers.KVCache:
    """An empty KV cache (``num_key_value_heads`` per layer); dtype defaults to the compute dtype."""
    return layers.KVCache.init(batch, max_len, config.num_hidden_layers, config.num_key_value_heads,
                               config.head_dim, config.dtype if dtype is None else dtype)


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with rotary embeddings."""

    config: LlamaConfig

    def setup(self) -> None:
        c = self.config
        self.q_proj = layers.Linear(c.num_attention_heads * c.head_dim, axes=("embed", "heads"),
                                    use_bias=c.attention_bias, dtype=c.dtype)
        self.k_proj = layers.Linear(c.num_key_value_heads * c.head_dim, axes=("embed", "kv"),
                                    use_bias=c.attention_bias, dtype=c.dtype)
        self.v_proj = layers.Linear(c.num_key_value_heads * c.head_dim, axes=("embed", "kv"),
                                    use_bias=c.attention_bias, dtype=c.dtype)
        self.o_proj = layers.Linear(c.hidden_size, axes=("heads", "embed"), use_bias=c.o_proj_bias, dtype=c.dtype)

    def __call__(self, x: Array, bias: Array, positions: Array, layer_cache: tuple[Array, Array] | None,
                 cache_index: Array | None, decode: bool) -> tuple[Array, tuple[Array, Array] | None]:
        c = self.config
        b, t, _ = x.shape
        inv_freq = rope_inverse_frequencies(c)
        q = apply_rope(self.q_proj(x).reshape(b, t, c.num_attention_heads, c.head_dim), positions, inv_freq)
        k = apply_rope(self.k_proj(x).reshape(b, t, c.num_key_value_heads, c.head_dim), positions, inv_freq)
        v = self.v_proj(x).reshape(b, t, c.num_key_value_heads, c.head_dim)
        new_cache = None
        if layer_cache is not None:
            new_cache = layers.cache_update_layer(*layer_cache, k, v, cache_index)
            k, v = layers.cache_view(*new_cache)
        out = hooks.call("attention", self.path, layers.attention_default, q, k, v, bias,
                         inputs=x, positions=positions, decode=decode, module=self)
        return self.o_proj(out.reshape(b, t, c.num_attention_heads * c.head_dim)), new_cache


class LlamaMLP(nn.Module):
    """Gated feed-forward ``down_proj(act(gate_proj(x)) * up_proj(x))``; the ``mlp`` hook point."""

    config: LlamaConfig

    def setup(self) -> None:
        c = self.config
        self.gate_proj = layers.Linear(c.intermediate_size, axes=("embed", "mlp"), use_bias=c.mlp_bias, dtype=c.dtype)
        self.up_proj = layers.Linear(c.intermediate_size, axes=("embed", "mlp"), use_bias=c.mlp_bias, dtype=c.dtype)
        self.down_proj = layers.Linear(c.hidden_size, axes=("mlp", "embed"), use_bias=c.mlp_bias, dtype=c.dtype)

    def __call__(self, x: Array) -> Array:
        return hooks.call("mlp", self.path, self._feed_forward, x, module=self)

    def _feed_forward(self, x: Array) -> Array:
        act = layers.activation(self.config.hidden_act)
        return self.down_proj(act(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: ``x + self_attn(input_layernorm(x))``, then ``x + mlp(post_attention_layernorm(x))``."""

    config: LlamaConfig

    def setup(self) -> None:
        c = self.config
        self.input_layernorm = layers.RMSNorm(c.rms_norm_eps, dtype=c.dtype)
        self.self_attn = LlamaAttention(c)
        self.post_attention_layernorm = layers.RMSNorm(c.rms_norm_eps, dtype=c.dtype)
        self.mlp = LlamaMLP(c)

    def __call__(self, x: Array, bias: Array, positions: Array, layer_cache: tuple[Array, Array] | None,
                 cache_index: Array | None, decode: bool) -> tuple[Array, tuple[Array, Array] | None]:
        a, new_cache = self.self_attn(self.input_layernorm(x), bias, positions, layer_cache, cache_index, decode)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, new_cache


class LlamaModel(nn.Module):
    """The trunk (HF ``LlamaModel``): ``embed_tokens``, ``layers_<i>``, final ``norm``."""

    config: LlamaConfig

    def setup(self) -> None:
        c = self.config
        self.embed_tokens = layers.Embed(c.vocab_size, c.hidden_size, axes=("vocab", "embed"), dtype=c.dtype)
        # A list attribute names its members layers_0, layers_1, ... (HF's model.layers.0, ...).
        layer = layers.remat_layer(LlamaDecoderLayer, c.remat, static_argnums=(6,))  # decode is static
        self.layers = [layer(c) for _ in range(c.num_hidden_layers)]
        self.norm = layers.RMSNorm(c.rms_norm_eps, dtype=c.dtype)

    def embed(self, input_ids: Array) -> Array:
        """Token embeddings (no hook)."""
        return self.embed_tokens(input_ids)

    def attend(self, h: Array) -> Array:
        """The tied LM head ``h @ embed_tokens.T``."""
        return self.embed_tokens.attend(h)

    def __call__(self, input_ids: Array | None, attention_mask: Array | None, inputs_embeds: Array | None,
                 position_ids: Array | None, cache: layers.KVCache | None,
                 decode: bool) -> tuple[tuple[Array, ...], Array, layers.KVCache | None]:
        """Returns (hidden states as HF returns them, the processed mask, the updated cache)."""
        x, mask, position_ids = embed_with_hook(self.embed, self.embed_tokens.path, input_ids, attention_mask,
                                                inputs_embeds, position_ids, decode, self.config.dtype)
        t = x.shape[1]
        positions, bias, cache_mask = attention_layout(mask, position_ids, cache)
        positions = hooks.call("positions", self.path, lambda p: p, positions, decode=decode, module=self)
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
        hidden_states[-1] = self.norm(x)
        new_cache = None
        if cache is not None:
            new_cache = layers.KVCache(keys=tuple(new_keys), values=tuple(new_values), mask=cache_mask,
                                       index=cache.index + t)
        return tuple(hidden_states), mask, new_cache


class LlamaForCausalLM(nn.Module):
    """LLaMA/Qwen2 with its language-modelling head (HF ``LlamaForCausalLM``); see the module docstring."""

    config: LlamaConfig

    def setup(self) -> None:
        c = self.config
        self.model = LlamaModel(c)
        if not c.tie_word_embeddings:
            self.lm_head = layers.Linear(c.vocab_size, axes=("embed", "vocab"), use_bias=False, dtype=c.dtype)

    def embed_tokens(self, input_ids: Array) -> Array:
        """Token embeddings ``[b, t, d]``, what ``inputs_embeds`` replaces (VLMs splice visual tokens in)."""
        return self.model.embed(input_ids)

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
        h = hooks.call("final_hidden", (*self.path, "model", "norm"), lambda x: x, hidden_states[-1], module=self)
        head = self.model.attend if self.config.tie_word_embeddings else self.lm_head
        logits = hooks.call("lm_head", (*self.path, "lm_head"), head, layers.keep_last(h, logits_to_keep), module=self)
        return DecoderOutput(logits=logits, hidden_states=hidden_states, attention_mask=mask, cache=new_cache)
