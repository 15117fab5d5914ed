"""CLIP vision and text towers (Radford et al. 2021) with Hugging Face parameter names.

Module trees (as in transformers' CLIP checkpoints; a list index ``layers.3`` is written ``layers_3``):

- :class:`CLIPVisionModel`: ``vision_model/{embeddings/{class_embedding, patch_embedding,
  position_embedding}, pre_layrnorm, encoder/layers_<i>/{layer_norm1, self_attn/{q_proj, k_proj, v_proj,
  out_proj}, layer_norm2, mlp/{fc1, fc2}}, post_layernorm}``; :class:`CLIPVisionModelWithProjection` adds
  ``visual_projection`` (no bias).
- :class:`CLIPTextModel`: ``text_model/{embeddings/{token_embedding, position_embedding}, encoder/...,
  final_layer_norm}``; :class:`CLIPTextModelWithProjection` adds ``text_projection`` (no bias).

The paths are those of the full ``CLIPModel`` checkpoint, so the towers of a full CLIP load as they are.

Vision: ``pixel_values`` ``[b, H, W, C]`` channels-last (NHWC), normalised; the size is fixed by the
config and a wrong size or channel count raises :class:`~vlpeft_jax.errors.InputError`. The patch
convolution is a ``layers.Linear`` on flattened patches (see :mod:`vlpeft_jax.models.vit`). The pooled
output is ``post_layernorm`` of the class token (then ``visual_projection`` if present); note that, as
in HF, ``last_hidden_state`` is *not* post-normed.

Text: causal self-attention with key padding from ``attention_mask``; ``last_hidden_state`` is after
``final_layer_norm``; the pooled output is the final hidden state at the end-of-text token, chosen
exactly as transformers does: if ``eos_token_id == 2`` (configs written before transformers PR #24773)
at ``argmax(input_ids)`` (the EOT token has the highest id in the original vocabulary), otherwise at the
first position where ``input_ids == eos_token_id``; then ``text_projection`` if present.

Hook points: ``embed`` (vision: path ``vision_model/embeddings`` on the embedding output before
``pre_layrnorm``, ``ids=None``; text: path ``text_model/embeddings/token_embedding`` on the token
embeddings before the position embeddings are added, which are then computed for the sequence the hook
returns; tokens a hook adds are taken to be prepended, so the pooled position shifts by their number),
``linear`` on every projection, ``attention`` per layer (``.../encoder/layers_<i>/self_attn``) and
``mlp`` per layer (``.../encoder/layers_<i>/mlp``).

Example:
    >>> import jax, jax.numpy as jnp
    >>> cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    ...                        image_size=(16, 16), patch_size=(8, 8), projection_dim=8)
    >>> model = CLIPVisionModelWithProjection(cfg)
    >>> x = jnp.zeros((2, 16, 16, 3))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> out = model.apply({"params": params}, x)
    >>> out.last_hidden_state.shape, out.pooled.shape
    ((2, 5, 32), (2, 8))
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
from vlpeft_jax.models.vit import (
    as_pair,
    check_patch_grid,
    check_pixel_values,
    embed_hook,
    identity_embed,
    patchify,
    split_heads,
)

Array = jax.Array

LEGACY_EOS_TOKEN_ID = 2  # configs written before transformers PR #24773 carry this wrong id
CLIP_DEFAULT_PROJECTION_DIM = 512  # transformers' CLIPConfig.projection_dim default


def _validate_common(c: CLIPVisionConfig | CLIPTextConfig, family: str) -> None:
    if c.hidden_size % c.num_attention_heads:
        raise ConfigError(f"{family} hidden_size ({c.hidden_size}) must be divisible by num_attention_heads "
                          f"({c.num_attention_heads})")
    if c.hidden_act not in layers.ACTIVATIONS:
        raise ConfigError(f"{family} hidden_act {c.hidden_act!r} is not supported; "
                          f"supported: {', '.join(sorted(layers.ACTIVATIONS))}")


def _tower_dict(config: Mapping[str, Any], key: str, model_type: str) -> dict[str, Any]:
    """The sub-config ``key`` (``vision_config``/``text_config``) of a full CLIP config, or a standalone one.

    A full ``CLIPModel`` config nests the towers; old ones also carry ``<key>_dict``, whose values win (as
    in transformers). The projection width of a full CLIP is the top-level ``projection_dim``.
    """
    top_type = config.get("model_type")
    if key in config or f"{key}_dict" in config or top_type == "clip":
        sub = dict(config.get(key) or {})
        sub.update(config.get(f"{key}_dict") or {})
        # CLIPModel sizes both projections by its own projection_dim (default 512), not the towers'
        sub["projection_dim"] = config.get("projection_dim") or CLIP_DEFAULT_PROJECTION_DIM
        return sub
    if top_type is not None and top_type != model_type:
        raise ConfigError(f"expected a CLIP config (model_type 'clip' with a {key!r}, or {model_type!r}); "
                          f"got model_type {top_type!r}")
    return dict(config)


def _getter(sub: Mapping[str, Any], defaults: Any):
    def get(name: str) -> Any:
        value = sub.get(name)
        return getattr(defaults, name) if value is None else value

    return get


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """CLIP vision tower (transformers' ``CLIPVisionConfig``; defaults of ``openai/clip-vit-base-patch32``).

    Attributes:
      hidden_size, intermediate_size, num_hidden_layers, num_attention_heads: sizes.
      projection_dim: width of ``visual_projection`` (for a full CLIP, the top-level ``projection_dim``).
      num_channels: image channels.
      image_size, patch_size: ``(height, width)``; the input size is fixed.
      hidden_act: ``quick_gelu`` for OpenAI CLIP (``gelu`` for some others).
      layer_norm_eps: LayerNorm epsilon.
      dtype: compute dtype (parameters stay float32).
      remat: rematerialisation of each encoder layer in the backward pass, one of
        :data:`~vlpeft_jax.models.layers.REMAT_POLICIES`.
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (32, 32)
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Any = jnp.float32
    remat: str = "none"

    def __post_init__(self) -> None:
        layers.check_remat(self.remat)
        object.__setattr__(self, "image_size", as_pair(self.image_size, "CLIP vision image_size"))
        object.__setattr__(self, "patch_size", as_pair(self.patch_size, "CLIP vision patch_size"))
        _validate_common(self, "CLIP vision")
        check_patch_grid(self.image_size, self.patch_size, "CLIP vision")

    @property
    def num_patches(self) -> int:
        return (self.image_size[0] // self.patch_size[0]) * (self.image_size[1] // self.patch_size[1])

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], *, dtype: Any = jnp.float32) -> CLIPVisionConfig:
        """Reads a full CLIP ``config.json`` dict (its ``vision_config``) or a standalone vision config.

        Example:
            >>> full = {"model_type": "clip", "projection_dim": 256, "vision_config": {"hidden_size": 96}}
            >>> CLIPVisionConfig.from_hf(full).projection_dim, CLIPVisionConfig.from_hf(full).hidden_size
            (256, 96)
        """
        sub = _tower_dict(config, "vision_config", "clip_vision_model")
        get = _getter(sub, cls())
        return cls(
            hidden_size=int(get("hidden_size")),
            intermediate_size=int(get("intermediate_size")),
            projection_dim=int(get("projection_dim")),
            num_hidden_layers=int(get("num_hidden_layers")),
            num_attention_heads=int(get("num_attention_heads")),
            num_channels=int(get("num_channels")),
            image_size=as_pair(get("image_size"), "CLIP vision image_size"),
            patch_size=as_pair(get("patch_size"), "CLIP vision patch_size"),
            hidden_act=str(get("hidden_act")),
            layer_norm_eps=float(get("layer_norm_eps")),
            dtype=dtype,
        )


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP text tower (transformers' ``CLIPTextConfig``; defaults of ``openai/clip-vit-base-patch32``).

    Attributes:
      vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads: sizes.
      projection_dim: width of ``text_projection`` (for a full CLIP, the top-level ``projection_dim``).
      max_position_embeddings: longest sequence (77 for OpenAI CLIP).
      hidden_act, layer_norm_eps: as in the vision tower.
      pad_token_id, bos_token_id: recorded for tokenisation; the model does not use them.
      eos_token_id: decides the pooled position (see the module docstring; 2 selects the legacy rule).
      dtype: compute dtype (parameters stay float32).
      remat: rematerialisation of each encoder layer in the backward pass, one of
        :data:`~vlpeft_jax.models.layers.REMAT_POLICIES`.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407
    dtype: Any = jnp.float32
    remat: str = "none"

    def __post_init__(self) -> None:
        layers.check_remat(self.remat)
        _validate_common(self, "CLIP text")
        if isinstance(self.eos_token_id, (list, tuple)):
            if len(self.eos_token_id) != 1:
                raise ConfigError(f"CLIP text eos_token_id must be one id (it picks the pooled position), got "
                                  f"{self.eos_token_id!r}")
            object.__setattr__(self, "eos_token_id", int(self.eos_token_id[0]))

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], *, dtype: Any = jnp.float32) -> CLIPTextConfig:
        """Reads a full CLIP ``config.json`` dict (its ``text_config``) or a standalone text config.

        Example:
            >>> CLIPTextConfig.from_hf({"model_type": "clip_text_model", "hidden_size": 64, "num_attention_heads": 4,
            ...                         "eos_token_id": 2}).eos_token_id
            2
        """
        sub = _tower_dict(config, "text_config", "clip_text_model")
        defaults = cls()
        get = _getter(sub, defaults)
        return cls(
            vocab_size=int(get("vocab_size")),
            hidden_size=int(get("hidden_size")),
            intermediate_size=int(get("intermediate_size")),
            projection_dim=int(get("projection_dim")),
            num_hidden_layers=int(get("num_hidden_layers")),
            num_attention_heads=int(get("num_attention_heads")),
            max_position_embeddings=int(get("max_position_embeddings")),
            hidden_act=str(get("hidden_act")),
            layer_norm_eps=float(get("layer_norm_eps")),
            pad_token_id=sub.get("pad_token_id", defaults.pad_token_id),
            bos_token_id=sub.get("bos_token_id", defaults.bos_token_id),
            eos_token_id=get("eos_token_id"),
            dtype=dtype,
        )


# --------------------------------------------------------------------------------------------------
# Shared encoder


class CLIPAttention(nn.Module):
    """Multi-head self-attention; the core is the ``attention`` hook point."""

    config: CLIPVisionConfig | CLIPTextConfig

    @nn.compact
    def __call__(self, x: Array, bias: Array | None, positions: Array | None) -> Array:
        c = self.config
        proj = lambda name: layers.Linear(c.hidden_size, axes=("embed", "heads"), dtype=c.dtype, name=name)(x)
        q = split_heads(proj("q_proj"), c.num_attention_heads)
        k = split_heads(proj("k_proj"), c.num_attention_heads)
        v = split_heads(proj("v_proj"), c.num_attention_heads)
        out = hooks.call("attention", self.path, layers.attention_default, q, k, v, bias, inputs=x,
                         positions=positions, decode=False, module=self)
        return layers.Linear(c.hidden_size, axes=("heads", "embed"), dtype=c.dtype,
                             name="out_proj")(out.reshape(*out.shape[:2], -1))


class CLIPMLP(nn.Module):
    """``fc2(act(fc1(x)))``; the whole block is the ``mlp`` hook point."""

    config: CLIPVisionConfig | CLIPTextConfig

    def setup(self) -> None:
        c = self.config
        self.fc1 = layers.Linear(c.intermediate_size, axes=("embed", "mlp"), dtype=c.dtype)
        self.fc2 = layers.Linear(c.hidden_size, axes=("mlp", "embed"), dtype=c.dtype)

    def _feed_forward(self, x: Array) -> Array:
        return self.fc2(layers.activation(self.config.hidden_act)(self.fc1(x)))

    def __call__(self, x: Array) -> Array:
        return hooks.call("mlp", self.path, self._feed_forward, x, module=self)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: ``x + self_attn(layer_norm1(x))``, then ``x + mlp(layer_norm2(x))``."""

    config: CLIPVisionConfig | CLIPTextConfig

    @nn.compact
    def __call__(self, x: Array, bias: Array | None, positions: Array | None) -> Array:
        c = self.config
        h = layers.LayerNorm(c.layer_norm_eps, dtype=c.dtype, name="layer_norm1")(x)
        x = x + CLIPAttention(c, name="self_attn")(h, bias, positions)
        h = layers.LayerNorm(c.layer_norm_eps, dtype=c.dtype, name="layer_norm2")(x)
        return x + CLIPMLP(c, name="mlp")(h)


class CLIPEncoder(nn.Module):
    """The layer stack; returns the input and every layer's output."""

    config: CLIPVisionConfig | CLIPTextConfig

    @nn.compact
    def __call__(self, x: Array, bias: Array | None, positions: Array | None = None) -> tuple[Array, ...]:
        hidden_states = [x]
        layer = layers.remat_layer(CLIPEncoderLayer, self.config.remat)
        for i in range(self.config.num_hidden_layers):
            x = layer(self.config, name=f"layers_{i}")(x, bias, positions)
            hidden_states.append(x)
        return tuple(hidden_states)


# --------------------------------------------------------------------------------------------------
# Vision tower


class CLIPVisionEmbeddings(nn.Module):
    """Class embedding + bias-free patch projection + learned position embeddings."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values: Array) -> Array:
        c = self.config
        d = c.hidden_size
        class_embedding = layers._param(self, "class_embedding", nn.initializers.normal(d**-0.5), (d,),
                                        ("embed",), jnp.float32)
        patches = patchify(pixel_values.astype(c.dtype), c.patch_size)
        x = layers.Linear(d, axes=("channels", "embed"), use_bias=False, dtype=c.dtype,
                          name="patch_embedding")(patches)
        x = jnp.concatenate([jnp.broadcast_to(class_embedding.astype(c.dtype), (x.shape[0], 1, d)), x], axis=1)
        position_embedding = layers.Embed(c.num_patches + 1, d, axes=("positions", "embed"), dtype=c.dtype,
                                          name="position_embedding")
        return x + position_embedding(jnp.arange(c.num_patches + 1))[None]


class CLIPVisionTransformer(nn.Module):
    """HF ``CLIPVisionTransformer`` (the ``vision_model`` child); pooled = ``post_layernorm(class token)``."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values: Array) -> EncoderOutput:
        c = self.config
        check_pixel_values(pixel_values, c.image_size, c.num_channels)
        x = CLIPVisionEmbeddings(c, name="embeddings")(pixel_values)
        x, mask = embed_hook(self.path + ("embeddings",), x, module=self)
        x = layers.LayerNorm(c.layer_norm_eps, dtype=c.dtype, name="pre_layrnorm")(x)
        hidden_states = CLIPEncoder(c, name="encoder")(x, layers.padding_bias(mask))
        last = hidden_states[-1]
        pooled = layers.LayerNorm(c.layer_norm_eps, dtype=c.dtype, name="post_layernorm")(last[:, 0])
        return EncoderOutput(last_hidden_state=last, hidden_states=hidden_states, pooled=pooled)


class CLIPVisionModel(nn.Module):
    """transformers' ``CLIPVisionModel``: ``pixel_values`` ``[b, H, W, C]`` (NHWC) -> :class:`EncoderOutput`.

    ``hidden_states[0]`` is the embedding output after ``pre_layrnorm`` and ``last_hidden_state`` the last
    layer's output (not normed), as in HF; ``pooled`` is HF's ``pooler_output``.
    """

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values: Array) -> EncoderOutput:
        return CLIPVisionTransformer(self.config, name="vision_model")(pixel_values)


class CLIPVisionModelWithProjection(nn.Module):
    """transformers' ``CLIPVisionModelWithProjection``; ``pooled`` is HF's ``image_embeds``."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values: Array) -> EncoderOutput:
        c = self.config
        out = CLIPVisionTransformer(c, name="vision_model")(pixel_values)
        embeds = layers.Linear(c.projection_dim, axes=("embed", None), use_bias=False, dtype=c.dtype,
                               name="visual_projection")(out.pooled)
        return out.replace(pooled=embeds)


# --------------------------------------------------------------------------------------------------
# Text tower


def eos_positions(input_ids: Array, eos_token_id: int) -> Array:
    """Index ``[b]`` of the pooled (end-of-text) token, by transformers' rule.

    ``eos_token_id == 2`` marks a config from before transformers PR #24773: the position of the largest
    id. Otherwise: the first position holding ``eos_token_id`` (0 if there is none, as ``argmax`` gives).

    Example:
        >>> eos_positions(jnp.array([[5, 9, 7, 9]]), 9).tolist(), eos_positions(jnp.array([[5, 9, 7, 9]]), 2).tolist()
        ([1], [1])
    """
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextEmbeddings(nn.Module):
    """Token embeddings (the ``embed`` hook point) plus learned absolute position embeddings."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None,
                 position_ids: Array | None) -> tuple[Array, Array | None]:
        c = self.config
        token_embedding = layers.Embed(c.vocab_size, c.hidden_size, axes=("vocab", "embed"), dtype=c.dtype,
                                       name="token_embedding")
        embeds, mask = hooks.call("embed", self.path + ("token_embedding",), identity_embed, input_ids,
                                  token_embedding(input_ids), attention_mask, module=self)
        b, t = embeds.shape[:2]
        if t > c.max_position_embeddings:
            raise InputError(f"CLIP text sequence length {t} exceeds max_position_embeddings "
                             f"{c.max_position_embeddings}")
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
        elif position_ids.shape[-1] != t:
            raise InputError(f"position_ids cover {position_ids.shape[-1]} tokens but the embedded sequence has {t} "
                             "(an embed hook changed its length); leave position_ids=None")
        position_embedding = layers.Embed(c.max_position_embeddings, c.hidden_size, axes=("positions", "embed"),
                                          dtype=c.dtype, name="position_embedding")
        return embeds + position_embedding(position_ids), mask


class CLIPTextTransformer(nn.Module):
    """HF ``CLIPTextTransformer`` (the ``text_model`` child); pooled = final hidden at the EOS token."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 position_ids: Array | None = None) -> EncoderOutput:
        c = self.config
        if input_ids.ndim != 2:
            raise InputError(f"expected input_ids of shape [batch, length], got shape {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise InputError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                             f"{tuple(input_ids.shape)}; they must match")
        t = input_ids.shape[1]
        x, mask = CLIPTextEmbeddings(c, name="embeddings")(input_ids, attention_mask, position_ids)
        t_new = x.shape[1]
        positions = jnp.broadcast_to(jnp.arange(t_new)[None], x.shape[:2]) if position_ids is None else position_ids
        bias = layers.causal_padding_bias(mask, t_new)
        hidden_states = CLIPEncoder(c, name="encoder")(x, bias, positions)
        last = layers.LayerNorm(c.layer_norm_eps, dtype=c.dtype, name="final_layer_norm")(hidden_states[-1])
        index = eos_positions(input_ids, c.eos_token_id) + (t_new - t)
        pooled = jnp.take_along_axis(last, index[:, None, None], axis=1)[:, 0]
        return EncoderOutput(last_hidden_state=last, hidden_states=hidden_states, pooled=pooled)


class CLIPTextModel(nn.Module):
    """transformers' ``CLIPTextModel``: ``input_ids`` ``[b, t]`` (+ ``attention_mask``) -> :class:`EncoderOutput`.

    ``hidden_states`` are the embedding output and every layer's output (the last one before
    ``final_layer_norm``), ``last_hidden_state`` is after it, ``pooled`` is HF's ``pooler_output``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> cfg = CLIPTextConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                      num_attention_heads=2, max_position_embeddings=8, eos_token_id=19)
        >>> ids, mask = jnp.array([[3, 4, 19, 0]]), jnp.array([[1, 1, 1, 0]])
        >>> model = CLIPTextModel(cfg)
        >>> params = model.init(jax.random.key(0), ids, mask)["params"]
        >>> model.apply({"params": params}, ids, mask).pooled.shape
        (1, 16)
    """

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 position_ids: Array | None = None) -> EncoderOutput:
        return CLIPTextTransformer(self.config, name="text_model")(input_ids, attention_mask, position_ids)


class CLIPTextModelWithProjection(nn.Module):
    """transformers' ``CLIPTextModelWithProjection``; ``pooled`` is HF's ``text_embeds``."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 position_ids: Array | None = None) -> EncoderOutput:
        c = self.config
        out = CLIPTextTransformer(c, name="text_model")(input_ids, attention_mask, position_ids)
        embeds = layers.Linear(c.projection_dim, axes=("embed", None), use_bias=False, dtype=c.dtype,
                               name="text_projection")(out.pooled)
        return out.replace(pooled=embeds)
