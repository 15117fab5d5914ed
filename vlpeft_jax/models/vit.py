"""Vision Transformer (``ViTModel``) with Hugging Face parameter names, plus the image-input helpers
shared with the CLIP vision tower.

The module tree mirrors the names under which transformers stores ViT checkpoints (``save_pretrained``
writes these names; recent transformers renames them only in memory): ``embeddings/{cls_token,
position_embeddings, patch_embeddings/projection}``, ``encoder/layer_<i>/{layernorm_before,
attention/{attention/{query, key, value}, output/dense}, layernorm_after, intermediate/dense,
output/dense}``, ``layernorm`` and, optionally, ``pooler/dense``. Pre-LN blocks, final LayerNorm, tanh
pooler on the class token (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

Images are channels-last: ``pixel_values`` is ``[batch, height, width, channels]`` (NHWC) float, already
normalised with the checkpoint's mean/std (:func:`vlpeft_jax.hf.vision.image_mean_std`). The image size
is fixed by the config (no position-embedding interpolation); a wrong size or channel count raises
:class:`~vlpeft_jax.errors.InputError` naming both shapes.

The patch embedding (a stride-``p`` convolution in PyTorch) is implemented as "cut into patches, then
``layers.Linear``" with kernel ``[p*p*c, d]`` (patch pixels flattened in (row, column, channel) order),
so the ``linear`` hook (LoRA etc.) applies to it like to any projection.

Hook points: ``embed`` (path ``embeddings``; called with ``ids=None`` on the embedding output after
the class token and position embeddings; a returned mask becomes a key-padding bias), ``linear`` on every
projection, ``attention`` per layer (``encoder/layer_<i>/attention/attention``) and ``mlp`` per layer
(path ``encoder/layer_<i>``, the layer itself, since the feed-forward of ViT is split over its
``intermediate`` and ``output`` children; the hook sees the ``layernorm_after`` output and returns the
feed-forward output before the residual).

Example:
    >>> import jax, jax.numpy as jnp
    >>> cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
    ...                 image_size=(16, 16), patch_size=(8, 8))
    >>> model = ViTModel(cfg)
    >>> x = jnp.zeros((2, 16, 16, 3))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> out = model.apply({"params": params}, x)
    >>> out.last_hidden_state.shape, len(out.hidden_states), out.pooled.shape
    ((2, 5, 32), 2, (2, 32))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlpeft_jax.errors import ConfigError, InputError
from vlpeft_jax.models import hooks, layers
from vlpeft_jax.models.outputs import EncoderOutput

Array = jax.Array


def as_pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    """``224`` or ``[224, 224]`` (HF allows both for image and patch sizes) -> ``(224, 224)``."""
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise ConfigError(f"{name} must be an int or a pair of ints, got {value!r}")


def check_patch_grid(image_size: tuple[int, int], patch_size: tuple[int, int], family: str) -> None:
    """Raises ConfigError unless the image is an exact grid of patches."""
    if image_size[0] % patch_size[0] or image_size[1] % patch_size[1]:
        raise ConfigError(f"{family} image_size {image_size} is not a multiple of patch_size {patch_size}")


def check_pixel_values(pixel_values: Array, image_size: tuple[int, int], num_channels: int) -> None:
    """Raises InputError unless ``pixel_values`` is ``[b, H, W, C]`` with the config's H, W and C."""
    h, w = image_size
    want = f"{h}x{w}x{num_channels}"
    shape = tuple(pixel_values.shape)
    if len(shape) != 4:
        raise InputError(f"expected pixel_values of shape [batch, {h}, {w}, {num_channels}] (NHWC, channels "
                         f"last), got shape {shape}")
    if shape[1:] != (h, w, num_channels):
        got = "x".join(str(s) for s in shape[1:])
        hint = ""
        if shape[1] == num_channels and shape[2:] == (h, w):
            hint = "; this looks channels-first (NCHW): pass pixel_values.transpose(0, 2, 3, 1)"
        raise InputError(f"expected images of {want} (height x width x channels, NHWC), got {got}{hint}")


def patchify(pixel_values: Array, patch_size: tuple[int, int]) -> Array:
    """``[b, H, W, c]`` -> ``[b, (H/p)*(W/p), p*p*c]``: patches in row-major grid order, each flattened
    as (row, column, channel), the order :func:`vlpeft_jax.hf.vision.conv_to_patch_kernel` expects."""
    b, h, w, c = pixel_values.shape
    ph, pw = patch_size
    x = pixel_values.reshape(b, h // ph, ph, w // pw, pw, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // ph) * (w // pw), ph * pw * c)


def identity_embed(ids: Array | None, embeds: Array, mask: Array | None) -> tuple[Array, Array | None]:
    """The ``embed`` hook's default: embeddings and mask unchanged."""
    return embeds, mask


def embed_hook(path: tuple[str, ...], embeds: Array, module: Any = None) -> tuple[Array, Array | None]:
    """Runs the ``embed`` hook on image token embeddings (``ids=None``, no mask); returns (embeds, mask)."""
    return hooks.call("embed", path, identity_embed, None, embeds, None, module=module)


def split_heads(x: Array, num_heads: int) -> Array:
    """``[b, t, h*d]`` -> ``[b, t, h, d]``."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """ViT architecture (transformers' ``ViTConfig``).

    Attributes:
      hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: sizes.
      hidden_act: HF activation name (``gelu``, the exact erf GELU, for ViT).
      layer_norm_eps: LayerNorm epsilon (1e-12 in HF ViT).
      image_size, patch_size: ``(height, width)``; the input size is fixed.
      num_channels: image channels.
      qkv_bias: whether query/key/value have biases.
      add_pooling_layer: whether the model has ``pooler/dense`` (tanh on the class token).
      pooler_output_size: pooler width (None: ``hidden_size``).
      pooler_act: pooler activation.
      dtype: compute dtype (parameters stay float32).
      remat: rematerialisation of each layer in the backward pass, one of
        :data:`~vlpeft_jax.models.layers.REMAT_POLICIES`.
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (16, 16)
    num_channels: int = 3
    qkv_bias: bool = True
    add_pooling_layer: bool = True
    pooler_output_size: int | None = None
    pooler_act: str = "tanh"
    dtype: Any = jnp.float32
    remat: str = "none"

    def __post_init__(self) -> None:
        layers.check_remat(self.remat)
        object.__setattr__(self, "image_size", as_pair(self.image_size, "ViT image_size"))
        object.__setattr__(self, "patch_size", as_pair(self.patch_size, "ViT patch_size"))
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"ViT hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                              f"({self.num_attention_heads})")
        for key in ("hidden_act", "pooler_act"):
            if getattr(self, key) not in layers.ACTIVATIONS:
                raise ConfigError(f"ViT {key} {getattr(self, key)!r} is not supported; "
                                  f"supported: {', '.join(sorted(layers.ACTIVATIONS))}")
        check_patch_grid(self.image_size, self.patch_size, "ViT")

    @property
    def num_patches(self) -> int:
        return (self.image_size[0] // self.patch_size[0]) * (self.image_size[1] // self.patch_size[1])

    @property
    def pooler_width(self) -> int:
        return self.pooler_output_size or self.hidden_size

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], *, add_pooling_layer: bool = True,
                dtype: Any = jnp.float32) -> ViTConfig:
        """Reads a Hugging Face ViT ``config.json`` dict (missing keys take transformers' defaults).

        Example:
            >>> ViTConfig.from_hf({"model_type": "vit", "hidden_size": 64, "num_attention_heads": 4}).image_size
            (224, 224)
        """
        model_type = config.get("model_type", "vit")
        if model_type != "vit":
            raise ConfigError(f"ViTConfig.from_hf got model_type {model_type!r}; expected 'vit'")
        defaults = cls()

        def get(name: str) -> Any:
            value = config.get(name)
            return getattr(defaults, name) if value is None else value

        return cls(
            hidden_size=int(get("hidden_size")),
            num_hidden_layers=int(get("num_hidden_layers")),
            num_attention_heads=int(get("num_attention_heads")),
            intermediate_size=int(get("intermediate_size")),
            hidden_act=str(get("hidden_act")),
            layer_norm_eps=float(get("layer_norm_eps")),
            image_size=as_pair(get("image_size"), "ViT image_size"),
            patch_size=as_pair(get("patch_size"), "ViT patch_size"),
            num_channels=int(get("num_channels")),
            qkv_bias=bool(get("qkv_bias")),
            add_pooling_layer=add_pooling_layer,
            pooler_output_size=config.get("pooler_output_size"),
            pooler_act=str(get("pooler_act")),
            dtype=dtype,
        )


class ViTEmbeddings(nn.Module):
    """Class token + patch embeddings + learned position embeddings."""

    config: ViTConfig

    @nn.compact
    def __call__(self, pixel_values: Array) -> Array:
        c = self.config
        d = c.hidden_size
        cls_token = layers._param(self, "cls_token", nn.initializers.normal(0.02), (1, 1, d), (None, None, "embed"),
                                  jnp.float32)
        position_embeddings = layers._param(self, "position_embeddings", nn.initializers.normal(0.02),
                                            (1, c.num_patches + 1, d), (None, "positions", "embed"), jnp.float32)
        patches = patchify(pixel_values.astype(c.dtype), c.patch_size)
        x = ViTPatchEmbeddings(c, name="patch_embeddings")(patches)
        b = x.shape[0]
        x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(c.dtype), (b, 1, d)), x], axis=1)
        return x + position_embeddings.astype(c.dtype)


class ViTPatchEmbeddings(nn.Module):
    """The patch projection (HF ``Conv2d`` with kernel = stride = patch size) as a ``Linear`` on patches."""

    config: ViTConfig

    @nn.compact
    def __call__(self, patches: Array) -> Array:
        return layers.Linear(self.config.hidden_size, axes=("channels", "embed"), dtype=self.config.dtype,
                             name="projection")(patches)


class ViTSelfAttention(nn.Module):
    """Query/key/value projections and the attention core (the ``attention`` hook point)."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x: Array, bias: Array | None) -> Array:
        c = self.config
        proj = lambda name: layers.Linear(c.hidden_size, axes=("embed", "heads"), use_bias=c.qkv_bias,
                                          dtype=c.dtype, name=name)(x)
        q = split_heads(proj("query"), c.num_attention_heads)
        k = split_heads(proj("key"), c.num_attention_heads)
        v = split_heads(proj("value"), c.num_attention_heads)
        out = hooks.call("attention", self.path, layers.attention_default, q, k, v, bias, inputs=x, positions=None,
                         decode=False, module=self)
        return out.reshape(*out.shape[:2], -1)


class ViTSelfOutput(nn.Module):
    config: ViTConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return layers.Linear(self.config.hidden_size, axes=("heads", "embed"), dtype=self.config.dtype,
                             name="dense")(x)


class ViTAttention(nn.Module):
    config: ViTConfig

    @nn.compact
    def __call__(self, x: Array, bias: Array | None) -> Array:
        h = ViTSelfAttention(self.config, name="attention")(x, bias)
        return ViTSelfOutput(self.config, name="output")(h)


class ViTIntermediate(nn.Module):
    config: ViTConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = layers.Linear(self.config.intermediate_size, axes=("embed", "mlp"), dtype=self.config.dtype,
                          name="dense")(x)
        return layers.activation(self.config.hidden_act)(h)


class ViTOutput(nn.Module):
    config: ViTConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return layers.Linear(self.config.hidden_size, axes=("mlp", "embed"), dtype=self.config.dtype,
                             name="dense")(x)


class ViTLayer(nn.Module):
    """Pre-LN block: ``x + attn(LN(x))``, then ``x + ffn(LN(x))``."""

    config: ViTConfig

    def setup(self) -> None:
        c = self.config
        self.layernorm_before = layers.LayerNorm(c.layer_norm_eps, dtype=c.dtype)
        self.attention = ViTAttention(c)
        self.layernorm_after = layers.LayerNorm(c.layer_norm_eps, dtype=c.dtype)
        self.intermediate = ViTIntermediate(c)
        self.output = ViTOutput(c)

    def _feed_forward(self, x: Array) -> Array:
        return self.output(self.intermediate(x))

    def __call__(self, x: Array, bias: Array | None) -> Array:
        x = x + self.attention(self.layernorm_before(x), bias)
        return x + hooks.call("mlp", self.path, self._feed_forward, self.layernorm_after(x), module=self)


class ViTEncoder(nn.Module):
    config: ViTConfig

    @nn.compact
    def __call__(self, x: Array, bias: Array | None) -> tuple[Array, ...]:
        hidden_states = [x]
        layer = layers.remat_layer(ViTLayer, self.config.remat)
        for i in range(self.config.num_hidden_layers):
            x = layer(self.config, name=f"layer_{i}")(x, bias)
            hidden_states.append(x)
        return tuple(hidden_states)


class ViTPooler(nn.Module):
    config: ViTConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = layers.Linear(self.config.pooler_width, axes=("embed", None), dtype=self.config.dtype,
                          name="dense")(x[:, 0])
        return layers.activation(self.config.pooler_act)(h)


class ViTModel(nn.Module):
    """transformers' ``ViTModel``: ``pixel_values`` ``[b, H, W, C]`` (NHWC) -> :class:`EncoderOutput`.

    ``last_hidden_state`` is after the final ``layernorm``; ``hidden_states`` holds the embedding output and
    every layer's output (before the final norm), as HF's ``output_hidden_states``; ``pooled`` is the pooler
    output (tanh(dense(class token))) or None without a pooling layer.
    """

    config: ViTConfig

    @nn.compact
    def __call__(self, pixel_values: Array) -> EncoderOutput:
        c = self.config
        check_pixel_values(pixel_values, c.image_size, c.num_channels)
        x = ViTEmbeddings(c, name="embeddings")(pixel_values)
        x, mask = embed_hook(self.path + ("embeddings",), x, module=self)
        hidden_states = ViTEncoder(c, name="encoder")(x, layers.padding_bias(mask))
        last = layers.LayerNorm(c.layer_norm_eps, dtype=c.dtype, name="layernorm")(hidden_states[-1])
        pooled = ViTPooler(c, name="pooler")(last) if c.add_pooling_layer else None
        return EncoderOutput(last_hidden_state=last, hidden_states=hidden_states, pooled=pooled)
