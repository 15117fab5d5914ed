"""The BLIP-2 / InstructBLIP vision encoder (EVA-CLIP style ViT) with Hugging Face parameter names.

BLIP-2 (Li et al. 2023, "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image Encoders and
Large Language Models", §3.1) and InstructBLIP (Dai et al. 2023) feed the Q-Former with the patch features
of a frozen ViT (EVA ViT-g/14 in the released checkpoints). transformers' ``Blip2VisionModel`` and
``InstructBlipVisionModel`` have the same layout, so one module serves both. Module tree (a list index
``layers.3`` is written ``layers_3``)::

    embeddings/{class_embedding [1, 1, d], patch_embedding/{kernel, bias}, position_embedding [1, n + 1, d]}
    encoder/layers_<i>/{layer_norm1, self_attn/{qkv, projection}, layer_norm2, mlp/{fc1, fc2}}
    post_layernorm

Inside :class:`~vlpeft_jax.models.vlm.QFormerVLM` the tower is the child ``vision_model``, so the paths read
``vision_model/encoder/layers_0/self_attn/qkv`` exactly like the transformers module names.

Numerics (read from transformers 5.24 ``models/blip_2/modeling_blip_2.py``):

- Pre-LN blocks ``x + self_attn(layer_norm1(x))``, ``x + mlp(layer_norm2(x))``; exact (erf) GELU; no LayerNorm
  before the first block (unlike CLIP's ``pre_layrnorm``).
- The query/key/value projection is one fused linear ``qkv`` ``d -> 3d`` whose output splits as
  ``[q | k | v]`` (each ``heads x head_dim``). Its bias is stored, as transformers stores it, as one ``3d``
  vector: BLIP-2's original ``q_bias`` and ``v_bias`` with zeros between them (the key has no bias in the
  original model). We keep it fused, so LoRA on ``qkv`` is LoRA on the same module as in peft.
- ``last_hidden_state`` is ``post_layernorm`` of the *whole* last layer output: this is what the Q-Former
  cross-attends to. ``hidden_states`` are the embedding output and every block's output (not post-normed),
  as transformers' ``output_hidden_states``. ``pooled`` is ``post_layernorm`` applied once more to the
  (already normed) class token, exactly as transformers computes ``pooler_output``.
- The patch convolution (stride = kernel = patch) is a :class:`~vlpeft_jax.models.layers.Linear` with bias on
  flattened NHWC patches (:func:`~vlpeft_jax.models.vit.patchify`); the fixed input size is checked, position
  embeddings are not interpolated.

Hook points, as in :mod:`vlpeft_jax.models.clip`: ``embed`` (path ``<tower>/embeddings``, ``ids=None``, on the
embedding output; a returned mask becomes a key-padding bias), ``linear`` on every projection (``qkv``,
``projection``, ``fc1``, ``fc2``, ``patch_embedding``), ``attention`` per layer (``.../layers_<i>/self_attn``)
and ``mlp`` per layer (``.../layers_<i>/mlp``).

Example:
    >>> import jax, jax.numpy as jnp
    >>> cfg = BlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
    ...                        image_size=16, patch_size=8)
    >>> model = BlipVisionModel(cfg)
    >>> x = jnp.zeros((2, 16, 16, 3))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> out = model.apply({"params": params}, x)
    >>> qkv = layers.unbox(params)["encoder"]["layers_0"]["self_attn"]["qkv"]
    >>> out.last_hidden_state.shape, len(out.hidden_states), qkv["kernel"].shape, qkv["bias"].shape
    ((2, 5, 32), 2, (32, 96), (96,))
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
from vlpeft_jax.models.outputs import EncoderOutput
from vlpeft_jax.models.vit import as_pair, check_patch_grid, check_pixel_values, embed_hook, patchify, split_heads

Array = jax.Array

VISION_MODEL_TYPES = ("blip_2_vision_model", "instructblip_vision_model")
COMPOSITE_MODEL_TYPES = ("blip-2", "instructblip")


@dataclasses.dataclass(frozen=True)
class BlipVisionConfig:
    """The vision tower of BLIP-2 / InstructBLIP (transformers' ``Blip2VisionConfig`` defaults: EVA ViT-g/14).

    Attributes:
      hidden_size, intermediate_size, num_hidden_layers, num_attention_heads: sizes.
      image_size, patch_size: ``(height, width)``; the input size is fixed.
      num_channels: image channels (the HF patch convolution always takes 3).
      hidden_act: HF activation name (``gelu``, the exact GELU).
      layer_norm_eps: LayerNorm epsilon.
      qkv_bias: whether the fused ``qkv`` projection has its (``3 * hidden_size``) bias.
      initializer_range: std of the fresh initialisation (transformers' default is 1e-10).
      dtype: compute dtype (parameters stay float32).
      remat: rematerialisation of each encoder layer in the backward pass, one of
        :data:`~vlpeft_jax.models.layers.REMAT_POLICIES`.
    """

    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (14, 14)
    num_channels: int = 3
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    initializer_range: float = 1e-10
    dtype: Any = jnp.float32
    remat: str = "none"

    def __post_init__(self) -> None:
        layers.check_remat(self.remat)
        object.__setattr__(self, "image_size", as_pair(self.image_size, "BLIP vision image_size"))
        object.__setattr__(self, "patch_size", as_pair(self.patch_size, "BLIP vision patch_size"))
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"BLIP vision hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                              f"({self.num_attention_heads})")
        if self.hidden_act not in layers.ACTIVATIONS:
            raise ConfigError(f"BLIP vision hidden_act {self.hidden_act!r} is not supported; "
                              f"supported: {', '.join(sorted(layers.ACTIVATIONS))}")
        check_patch_grid(self.image_size, self.patch_size, "BLIP vision")

    @property
    def num_patches(self) -> int:
        return (self.image_size[0] // self.patch_size[0]) * (self.image_size[1] // self.patch_size[1])

    @property
    def num_positions(self) -> int:
        """Tokens the tower outputs: the class token and one per patch."""
        return self.num_patches + 1

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], *, dtype: Any = jnp.float32) -> BlipVisionConfig:
        """Reads a ``blip_2_vision_model`` / ``instructblip_vision_model`` config dict, or the ``vision_config``
        of a full ``blip-2`` / ``instructblip`` one; missing keys take transformers' defaults.

        Example:
            >>> cfg = BlipVisionConfig.from_hf({"model_type": "instructblip", "vision_config": {
            ...     "hidden_size": 64, "num_attention_heads": 4, "image_size": 28, "patch_size": 14}})
            >>> cfg.hidden_size, cfg.num_positions, cfg.layer_norm_eps
            (64, 5, 1e-06)
        """
        model_type = config.get("model_type")
        if model_type in COMPOSITE_MODEL_TYPES:
            config = dict(config.get("vision_config") or {})
            model_type = config.get("model_type")
        if model_type is not None and model_type not in VISION_MODEL_TYPES:
            raise ConfigError(f"BlipVisionConfig.from_hf got model_type {model_type!r}; expected one of "
                              f"{', '.join(VISION_MODEL_TYPES + COMPOSITE_MODEL_TYPES)}")
        defaults = cls()

        def get(name: str) -> Any:
            value = config.get(name)
            return getattr(defaults, name) if value is None else value

        return cls(
            hidden_size=int(get("hidden_size")),
            intermediate_size=int(get("intermediate_size")),
            num_hidden_layers=int(get("num_hidden_layers")),
            num_attention_heads=int(get("num_attention_heads")),
            image_size=as_pair(get("image_size"), "BLIP vision image_size"),
            patch_size=as_pair(get("patch_size"), "BLIP vision patch_size"),
            num_channels=int(get("num_channels")),
            hidden_act=str(get("hidden_act")),
            layer_norm_eps=float(get("layer_norm_eps")),
            qkv_bias=bool(get("qkv_bias")),
            initializer_range=float(get("initializer_range")),
            dtype=dtype,
        )


class BlipAttention(nn.Module):
    """Bidirectional self-attention with the fused ``qkv`` projection and the output ``projection``."""

    config: BlipVisionConfig

    @nn.compact
    def __call__(self, x: Array, bias: Array | None) -> Array:
        c = self.config
        b, t, d = x.shape
        qkv = layers.Linear(3 * d, axes=("embed", "heads"), use_bias=c.qkv_bias, dtype=c.dtype, name="qkv")(x)
        q, k, v = (split_heads(part, c.num_attention_heads) for part in jnp.split(qkv, 3, axis=-1))
        out = hooks.call("attention", self.path, layers.attention_default, q, k, v, bias, inputs=x,
                         positions=None, decode=False, module=self)
        return layers.Linear(d, axes=("heads", "embed"), dtype=c.dtype, name="projection")(out.reshape(b, t, d))


class BlipMLP(nn.Module):
    """``fc2(act(fc1(x)))``; the whole block is the ``mlp`` hook point."""

    config: BlipVisionConfig

    def setup(self) -> None:
        c = self.config
        self.fc1 = layers.Linear(c.intermediate_size, axes=("embed", "mlp"), dtype=c.dtype)
        self.fc2 = layers.Linear(c.hidden_size, axes=("mlp", "embed"), dtype=c.dtype)

    def _feed_forward(self, x: Array) -> Array:
        return self.fc2(layers.activation(self.config.hidden_act)(self.fc1(x)))

    def __call__(self, x: Array) -> Array:
        return hooks.call("mlp", self.path, self._feed_forward, x, module=self)


class BlipEncoderLayer(nn.Module):
    """Pre-LN block: ``x + self_attn(layer_norm1(x))``, then ``x + mlp(layer_norm2(x))``."""

    config: BlipVisionConfig

    @nn.compact
    def __call__(self, x: Array, bias: Array | None) -> Array:
        c = self.config
        x = x + BlipAttention(c, name="self_attn")(layers.LayerNorm(c.layer_norm_eps, dtype=c.dtype,
                                                                    name="layer_norm1")(x), bias)
        return x + BlipMLP(c, name="mlp")(layers.LayerNorm(c.layer_norm_eps, dtype=c.dtype, name="layer_norm2")(x))


class BlipEncoder(nn.Module):
    """``layers_0 .. layers_{n-1}``; returns the input and every layer's output."""

    config: BlipVisionConfig

    @nn.compact
    def __call__(self, x: Array, bias: Array | None) -> tuple[Array, ...]:
        states = [x]
        layer = layers.remat_layer(BlipEncoderLayer, self.config.remat)
        for i in range(self.config.num_hidden_layers):
            x = layer(self.config, name=f"layers_{i}")(x, bias)
            states.append(x)
        return tuple(states)


class BlipVisionEmbeddings(nn.Module):
    """Class token + patch projection (with bias) + learned position embeddings (HF's parameter shapes)."""

    config: BlipVisionConfig

    @nn.compact
    def __call__(self, pixel_values: Array) -> Array:
        c = self.config
        d, n = c.hidden_size, c.num_positions
        init = nn.initializers.truncated_normal(c.initializer_range)
        class_embedding = layers._param(self, "class_embedding", init, (1, 1, d), (None, None, "embed"), jnp.float32)
        position_embedding = layers._param(self, "position_embedding", init, (1, n, d), (None, "positions", "embed"),
                                           jnp.float32)
        x = layers.Linear(d, axes=("channels", "embed"), dtype=c.dtype, name="patch_embedding")(
            patchify(pixel_values.astype(c.dtype), c.patch_size))
        x = jnp.concatenate([jnp.broadcast_to(class_embedding.astype(c.dtype), (x.shape[0], 1, d)), x], axis=1)
        return x + position_embedding.astype(c.dtype)


class BlipVisionModel(nn.Module):
    """transformers' ``Blip2VisionModel`` / ``InstructBlipVisionModel``: NHWC ``pixel_values`` -> ``EncoderOutput``.

    See the module docstring for what ``last_hidden_state``, ``hidden_states`` and ``pooled`` hold.
    """

    config: BlipVisionConfig

    @nn.compact
    def __call__(self, pixel_values: Array) -> EncoderOutput:
        c = self.config
        check_pixel_values(pixel_values, c.image_size, c.num_channels)
        x = BlipVisionEmbeddings(c, name="embeddings")(pixel_values)
        x, mask = embed_hook(self.path + ("embeddings",), x, module=self)
        hidden_states = BlipEncoder(c, name="encoder")(x, layers.padding_bias(mask))
        post_layernorm = layers.LayerNorm(c.layer_norm_eps, dtype=c.dtype, name="post_layernorm")
        last = post_layernorm(hidden_states[-1])
        return EncoderOutput(last_hidden_state=last, hidden_states=hidden_states, pooled=post_layernorm(last[:, 0]))
