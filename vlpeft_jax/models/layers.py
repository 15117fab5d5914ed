"""Building blocks shared by every backbone: layers with hook points, attention, KV cache.

Every parameter is declared with logical axis names (``nn.with_logical_partitioning``) so that sharding
is declared, not hand-written (DESIGN invariant 7). Logical axis names used across the models:

``embed`` (model width), ``mlp`` (feed-forward width), ``heads`` (query heads x head_dim, flattened),
``kv`` (key/value heads x head_dim, flattened), ``vocab``, ``positions``, ``channels`` (image
channels x patch pixels), ``norm`` (norm scales), ``queries`` (learned query tokens).

Parameter trees follow the names the Hugging Face converters produce (DESIGN invariant 1): a linear
layer is ``{"kernel": [in, out], "bias": [out]}``, an embedding ``{"embedding": [n, d]}``, a norm
``{"scale": [d], "bias": [d]}``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.models import hooks

Array = jax.Array
Dtype = Any

NEG_INF = -1e30  # additive mask value; finite so that fully masked rows give a uniform softmax, not NaN


def _param(module: nn.Module, name: str, init: Callable, shape: Sequence[int], axes: Sequence[str | None],
           dtype: Dtype) -> Array:
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def linear_default(x: Array, kernel: Array, bias: Array | None) -> Array:
    """``x @ kernel + bias`` in the input's dtype; the default behind the ``linear`` hook."""
    y = jnp.einsum("...i,io->...o", x, kernel.astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(x.dtype)
    return y


def keep_last(h: Array, n: int) -> Array:
    """The last ``n`` positions of ``h`` ``[b, t, ...]`` (all of them for ``n == 0``).

    The decoders' ``logits_to_keep`` (Hugging Face's name and meaning): the LM head runs only on the
    positions a loss reads, e.g. the text after a VLM's visual tokens, not on every position.

    Example:
        >>> keep_last(jnp.zeros((2, 5, 3)), 2).shape
        (2, 2, 3)
    """
    if n < 0:
        raise ValueError(f"logits_to_keep={n}; must be >= 0 (0 keeps every position)")
    return h[:, -n:] if n else h


class Linear(nn.Module):
    """A dense layer whose application is the ``linear`` hook point.

    Attributes:
      features: output width.
      axes: logical names of the kernel's (input, output) axes.
      use_bias: whether there is a bias.
    """

    features: int
    axes: tuple[str | None, str | None] = ("embed", "mlp")
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.normal(0.02)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = _param(self, "kernel", self.kernel_init, (x.shape[-1], self.features), self.axes,
                        self.param_dtype)
        bias = (_param(self, "bias", nn.initializers.zeros, (self.features,), (self.axes[1],), self.param_dtype)
                if self.use_bias else None)
        return hooks.call("linear", self.path, linear_default, x.astype(self.dtype), kernel, bias, module=self)


class Embed(nn.Module):
    """Token (or position) embedding table ``{"embedding": [num, features]}``."""

    num_embeddings: int
    features: int
    axes: tuple[str | None, str | None] = ("vocab", "embed")
    embedding_init: Callable = nn.initializers.normal(0.02)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.embedding = _param(self, "embedding", self.embedding_init,
                                (self.num_embeddings, self.features), self.axes, self.param_dtype)

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, h: Array) -> Array:
        """Tied output projection ``h @ embedding.T``."""
        return jnp.einsum("...d,vd->...v", h, self.embedding.astype(h.dtype))


class LayerNorm(nn.Module):
    """LayerNorm with ``scale``/``bias`` parameters (statistics in float32)."""

    epsilon: float = 1e-5
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        scale = _param(self, "scale", nn.initializers.ones, (d,), ("norm",), self.param_dtype)
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale
        if self.use_bias:
            y = y + _param(self, "bias", nn.initializers.zeros, (d,), ("norm",), self.param_dtype)
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """RMSNorm (LLaMA) with a ``scale`` parameter; computed in float32 like transformers."""

    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("norm",), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.epsilon)
        return (scale * y.astype(self.dtype)).astype(self.dtype)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[Array], Array]:
    """The activation function called ``name`` in Hugging Face configs."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(sorted(ACTIVATIONS))}") from None


# --------------------------------------------------------------------------------------------------
# Attention


def attention_implementation(q: Array, k: Array, bias: Array | None = None, backend: str | None = None) -> str:
    """The ``implementation`` :func:`attention_default` passes to ``jax.nn.dot_product_attention``.

    ``"cudnn"`` (the fused flash-attention kernel) only on a GPU backend when the inputs qualify: q/k/v in
    float16 or bfloat16 (one dtype), head dim a multiple of 8 and at most 128, and both sequence lengths even
    (cuDNN's rule for a bias in training). Everything else -- CPU, TPU, float32, a decoding step with one
    query -- gets ``"xla"``, the reference lowering (TPU compiles it to its fused attention itself).

    Args:
      q: ``[b, tq, h, d]``; k: ``[b, tk, kvh, d]``; bias: as :func:`attention_default` (not inspected today,
        kept so that a rule on it can be added); backend: ``jax.default_backend()`` when None.

    Example:
        >>> q = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
        >>> attention_implementation(q, q, backend="cpu"), attention_implementation(q, q, backend="gpu")
        ('xla', 'cudnn')
        >>> attention_implementation(q.astype(jnp.float32), q.astype(jnp.float32), backend="gpu")
        'xla'
    """
    backend = jax.default_backend() if backend is None else backend
    if backend not in ("gpu", "cuda"):
        return "xla"
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype:
        return "xla"
    d, tq, tk = q.shape[-1], q.shape[1], k.shape[1]
    if d % 8 or d > 128 or tq % 2 or tk % 2:
        return "xla"
    return "cudnn"


def _cpu_float16(q: Array) -> bool:
    """float16 attention on XLA:CPU, whose dot has no float16 inputs with a float32 result (float16 there is
    computed in float32: the same float32 scores and softmax, float16 in and out)."""
    return q.dtype == jnp.float16 and jax.default_backend() == "cpu"


def attention_default(q: Array, k: Array, v: Array, bias: Array | None) -> Array:
    """``softmax(q k^T / sqrt(d) + bias) v`` with grouped-query support; the ``attention`` hook default.

    With the implementation :func:`attention_implementation` picks: ``"cudnn"`` (GPU, half-precision inputs that
    qualify) runs ``jax.nn.dot_product_attention``'s fused kernel; ``"xla"`` (CPU, TPU, float32) runs the same
    maths as that function's XLA lowering, laid out head-major so that XLA does not copy the probability tensors
    (:func:`attention_weights_and_output`, whose probabilities XLA drops here).
    Precision: the scores ``q k^T`` are accumulated and kept in float32 (for bfloat16/float16 inputs the XLA
    lowering asks for a float32 result), the bias is added and the softmax taken in float32; the
    probabilities are cast to ``v``'s dtype for the product with ``v``. A row whose keys are all blocked
    (bias ``NEG_INF`` everywhere) gets a uniform softmax, never NaN. Hooks that need the probabilities
    themselves use :func:`attention_weights_and_output` (same maths, explicit einsums).

    Args:
      q: ``[b, tq, h, d]``; k, v: ``[b, tk, kvh, d]`` with ``h % kvh == 0``.
      bias: additive, broadcastable to ``[b, h, tq, tk]`` (0 = attend, ``NEG_INF`` = blocked), or None.

    Returns:
      ``[b, tq, h, d]`` in ``q``'s dtype.

    Example:
        >>> q = jnp.ones((1, 3, 2, 4))
        >>> v = jnp.arange(24.0).reshape(1, 3, 2, 4)
        >>> out = attention_default(q, q, v, causal_padding_bias(None, 3))
        >>> out[0, 0].tolist() == v[0, 0].tolist()  # the first query sees only the first key
        True
    """
    h, kvh = q.shape[2], k.shape[2]
    if h % kvh:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({kvh})")
    impl = attention_implementation(q, k, bias)
    if impl == "xla":
        return attention_weights_and_output(q, k, v, bias)[1]
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    if bias is not None:
        bias = jnp.asarray(bias)
        bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
        # the kernel wants the bias in q's dtype with full [tq, tk] axes
        lowest = float(jnp.finfo(q.dtype).min) / 2
        bias = jnp.maximum(bias, lowest).astype(q.dtype)
        bias = jnp.broadcast_to(bias, bias.shape[:2] + (q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, bias, implementation=impl)


def attention_weights_and_output(q: Array, k: Array, v: Array, bias: Array | None) -> tuple[Array, Array]:
    """Like :func:`attention_default` but also returning the probabilities ``[b, h, tq, tk]`` (float32); the
    ``"xla"`` path of :func:`attention_default` too.

    The maths of ``jax.nn.dot_product_attention``'s reference lowering with the heads moved in front of the
    sequence axes first: both products are plain batched ``[b, kv_heads]`` matrix products whose score /
    probability tensors ``[b, kv_heads, g*tq, tk]`` are read as they are written. The library's lowering groups
    the query heads as a 5-D ``[b, t, kvh, g, d]`` tensor, after which XLA:CPU copied and transposed every layer's
    probability tensor in the forward and backward passes (505 MiB of copies per LoRA train step at the bench
    shapes, 301 MiB this way; the step is 5 % faster). Scores are accumulated in float32 (float16 on XLA:CPU, whose
    dot has no float16 x float16 -> float32 form, is computed in float32), the bias is added and the softmax taken
    in float32; the probabilities are cast to ``v``'s dtype for the product with ``v``.

    Example:
        >>> q = jnp.ones((1, 2, 2, 4))
        >>> probs, out = attention_weights_and_output(q, q, q, None)
        >>> probs.shape, probs[0, 0, 0].tolist()
        ((1, 2, 2, 2), [0.5, 0.5])
    """
    b, tq, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    if h % kvh:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({kvh})")
    if _cpu_float16(q):
        probs, out = attention_weights_and_output(q.astype(jnp.float32), k, v.astype(jnp.float32), bias)
        return probs, out.astype(q.dtype)
    g = h // kvh
    qh = jnp.transpose(q.reshape(b, tq, kvh, g, d), (0, 2, 3, 1, 4)).reshape(b, kvh, g * tq, d)
    kh, vh = jnp.swapaxes(k.astype(q.dtype), 1, 2), jnp.swapaxes(v, 1, 2)
    scores = jnp.einsum("bkqd,bksd->bkqs", qh, kh, preferred_element_type=jnp.float32)
    scores = scores.astype(jnp.float32).reshape(b, h, tq, tk) / jnp.sqrt(jnp.float32(d))
    if bias is not None:
        scores = scores + jnp.asarray(bias).astype(jnp.float32)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkqs,bksd->bkqd", probs.astype(v.dtype).reshape(b, kvh, g * tq, tk), vh)
    return probs, jnp.transpose(out.reshape(b, kvh, g, tq, d), (0, 3, 1, 2, 4)).reshape(b, tq, h, d).astype(q.dtype)


# --------------------------------------------------------------------------------------------------
# Rematerialisation

REMAT_POLICIES: dict[str, str] = {
    "none": "no rematerialisation: the backward pass reads every activation the forward pass kept",
    "full": "save nothing inside a layer; the backward pass recomputes the whole layer from its input",
    "dots": "save the results of matrix products (jax.checkpoint_policies.dots_saveable), recompute the rest",
    "dots_no_batch": "save matrix products without batch dimensions, i.e. the projections but not the attention "
                     "scores (jax.checkpoint_policies.dots_with_no_batch_dims_saveable)",
}
"""The values of the model configs' ``remat`` field and what each keeps for the backward pass."""


def check_remat(name: str) -> str:
    """``name`` if it is one of :data:`REMAT_POLICIES`; else a :class:`~vlpeft_jax.errors.ConfigError`.

    Example:
        >>> check_remat("dots")
        'dots'
    """
    if name not in REMAT_POLICIES:
        raise ConfigError(f"remat={name!r}; valid: {', '.join(REMAT_POLICIES)}")
    return name


def remat_policy(name: str) -> Callable[..., bool] | None:
    """The ``jax.checkpoint`` policy for a ``remat`` name (None = save nothing, also for ``"none"``).

    Example:
        >>> remat_policy("dots") is jax.checkpoint_policies.dots_saveable
        True
    """
    check_remat(name)
    return {"dots": jax.checkpoint_policies.dots_saveable,
            "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}.get(name)


def remat_layer(cls: type[nn.Module], remat: str, static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
    """``cls`` wrapped in Flax ``nn.remat`` (lifted ``jax.checkpoint``) with the policy named ``remat``.

    ``remat="none"`` returns ``cls`` unchanged. The wrapped class keeps the module names and so the parameter
    tree; mutable collections (hooks' ``ctx.record``) are lifted through it. ``static_argnums`` counts
    ``self`` as 0 and must name every Python-valued argument (flags such as ``decode``); the layer must be
    called with positional arguments only.

    Hooks run inside the checkpointed layer: a hook may read side inputs and closed-over (PEFT) parameters and
    may ``ctx.record``, but must not carry a value computed inside a layer out through Python state to a later
    hook (a leaked tracer): MAM with ``mam_layers="top"`` does this (its attention hook stashes the key layout
    for its ``final_hidden`` hook) and fails under remat with ``UnexpectedTracerError``.

    Example:
        >>> class Layer(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x, double):
        ...         y = nn.Dense(2, name="proj")(x)
        ...         return 2 * y if double else y
        >>> Remat = remat_layer(Layer, "full", static_argnums=(2,))
        >>> x = jnp.ones((1, 3))
        >>> p = Layer().init(jax.random.key(0), x, True)
        >>> bool(jnp.allclose(Remat().apply(p, x, True), Layer().apply(p, x, True)))
        True
    """
    if check_remat(remat) == "none":
        return cls
    return nn.remat(cls, policy=remat_policy(remat), static_argnums=static_argnums)


def mask_to_bias(mask: Array) -> Array:
    """Boolean "may attend" mask -> additive bias (0 or ``NEG_INF``) in float32."""
    return jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)


def causal_padding_bias(attention_mask: Array | None, tq: int, tk: int | None = None) -> Array:
    """Additive bias ``[b|1, 1, tq, tk]`` for causal self-attention with key padding.

    ``attention_mask`` is ``[b, tk]`` with 1 for real tokens (None: all real). Queries are the last
    ``tq`` of ``tk`` positions.
    """
    tk = tq if tk is None else tk
    qpos = jnp.arange(tq)[:, None] + (tk - tq)
    allowed = (jnp.arange(tk)[None, :] <= qpos)[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].astype(bool)
    return mask_to_bias(allowed)


def padding_bias(attention_mask: Array | None) -> Array | None:
    """Additive bias ``[b, 1, 1, tk]`` for bidirectional attention with key padding."""
    if attention_mask is None:
        return None
    return mask_to_bias(attention_mask[:, None, None, :].astype(bool))


@flax.struct.dataclass
class KVCache:
    """Explicit key/value cache for incremental decoding (a pytree, no Flax mutable collection).

    Attributes:
      keys, values: one array per layer, stored head-major ``[b, kv_heads, max_len, head_dim]``: the layout the
        attention products read, so a decoding step reads the cache in place instead of transposing all of it
        (:func:`cache_view` gives the ``[b, max_len, kv_heads, head_dim]`` view attention hooks see).
      mask: ``[b, max_len]`` bool, True where a real token has been written.
      index: scalar int32, the next position to write (same for the whole batch: prompts are
        left-padded, padding is masked out by ``mask``).
    """

    keys: tuple[Array, ...]
    values: tuple[Array, ...]
    mask: Array
    index: Array

    @classmethod
    def init(cls, batch: int, max_len: int, num_layers: int, kv_heads: int, head_dim: int,
             dtype: Dtype = jnp.float32) -> KVCache:
        z = jnp.zeros((batch, kv_heads, max_len, head_dim), dtype)
        return cls(keys=(z,) * num_layers, values=(z,) * num_layers,
                   mask=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]


def cache_write_mask(cache: KVCache, attention_mask: Array | None, t: int) -> Array:
    """The cache's validity mask after writing ``t`` tokens (``attention_mask`` ``[b, t]``) at ``index``."""
    b = cache.mask.shape[0]
    new = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    return jax.lax.dynamic_update_slice(cache.mask, new, (0, cache.index))


def cached_causal_bias(valid: Array, index: Array, t: int) -> Array:
    """Bias ``[b, 1, t, max_len]``: query i (absolute ``index + i``) sees valid keys at positions ≤ it."""
    max_len = valid.shape[1]
    qpos = index + jnp.arange(t)[:, None]
    allowed = (jnp.arange(max_len)[None, :] <= qpos)[None, None] & valid[:, None, None, :]
    return mask_to_bias(allowed)


def cache_update_layer(cache_k: Array, cache_v: Array, k: Array, v: Array, index: Array) -> tuple[Array, Array]:
    """Writes new keys/values ``[b, t, kvh, d]`` at ``index`` into a layer's head-major cache ``[b, kvh, max_len,
    d]`` (in place when the cache is donated or carried by a loop); returns the updated layer cache (storage
    layout; :func:`cache_view` for attention)."""
    ck = jax.lax.dynamic_update_slice(cache_k, jnp.swapaxes(k, 1, 2).astype(cache_k.dtype), (0, 0, index, 0))
    cv = jax.lax.dynamic_update_slice(cache_v, jnp.swapaxes(v, 1, 2).astype(cache_v.dtype), (0, 0, index, 0))
    return ck, cv


def cache_view(cache_k: Array, cache_v: Array) -> tuple[Array, Array]:
    """A layer cache as attention's keys/values ``[b, max_len, kvh, d]`` (a logical transpose that XLA folds into
    the attention products, which read the head-major storage directly).

    Example:
        >>> c = KVCache.init(batch=2, max_len=5, num_layers=1, kv_heads=3, head_dim=4)
        >>> ck, cv = cache_update_layer(c.keys[0], c.values[0], jnp.ones((2, 1, 3, 4)), jnp.ones((2, 1, 3, 4)), 2)
        >>> k, _ = cache_view(ck, cv)
        >>> k.shape, k[0, :, 0, 0].tolist()
        ((2, 5, 3, 4), [0.0, 0.0, 1.0, 0.0, 0.0])
    """
    return jnp.swapaxes(cache_k, 1, 2), jnp.swapaxes(cache_v, 1, 2)


def positions_from_mask(attention_mask: Array | None, batch: int, t: int, offset: Array | int = 0) -> Array:
    """Position ids ``[b, t]``: ``cumsum(mask) - 1`` (left padding gets position 0), as HF generate."""
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(t)[None] + offset, (batch, t))
    pos = jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1
    return jnp.maximum(pos, 0)


def unbox(tree: Any) -> Any:
    """Removes ``nn.Partitioned`` boxes: plain arrays, as the converters produce."""
    return nn.meta.unbox(tree)


def logical_axes(abstract_variables: Any) -> Any:
    """The logical ``PartitionSpec`` of every parameter, from a boxed (e.g. ``jax.eval_shape``) init."""
    return nn.get_partition_spec(abstract_variables)


def cache_positions(cache: KVCache, attention_mask: Array | None, batch: int, t: int) -> Array:
    """Position ids ``[b, t]`` of ``t`` new tokens written into ``cache`` (left-padding aware)."""
    prev = cache.mask.sum(-1).astype(jnp.int32)[:, None]
    if attention_mask is None:
        return prev + jnp.arange(t)[None]
    return prev + jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)
