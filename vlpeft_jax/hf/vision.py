"""Hugging Face vision (ViT, CLIP vision) and CLIP text checkpoints -> our Flax modules and parameters.

Every loader reads a local checkpoint directory (a hub id raises :class:`~vlpeft_jax.errors.OfflineError`),
builds the module from ``config.json`` and maps the tensors through explicit key maps
(:mod:`vlpeft_jax.hf.io`), checking every shape. It returns ``(module, params)`` with ``params`` a nested
dict of numpy float32 arrays, ready for ``module.apply({"params": params}, ...)``.

Accepted layouts:

- ViT: ``ViTModel`` checkpoints as ``save_pretrained`` writes them (``encoder.layer.N.attention.attention.
  query``...), with or without the ``vit.`` prefix of ``ViTFor*`` heads, and the in-memory names of
  transformers >= 5 (``layers.N.attention.q_proj``...) should a state dict have been saved directly. The
  pooler is loaded when the checkpoint has one.
- CLIP vision: ``CLIPVisionModel`` (keys with or without ``vision_model.``),
  ``CLIPVisionModelWithProjection``, and the vision half of a full ``CLIPModel``.
- CLIP text: ``CLIPTextModel`` (with or without ``text_model.``), ``CLIPTextModelWithProjection`` and the
  text half of a full ``CLIPModel``.

Example (with a checkpoint directory ``DIR``)::

    module, params = load_clip_vision(DIR, with_projection=True)
    image_embeds = module.apply({"params": params}, pixel_values_nhwc).pooled
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlpeft_jax.errors import CheckpointError, ConfigError
from vlpeft_jax.hf.io import (
    KeyMap,
    convert,
    embedding,
    linear,
    load_config,
    load_state_dict,
    norm,
    resolve_model_dir,
)
from vlpeft_jax.models import layers
from vlpeft_jax.models.clip import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)
from vlpeft_jax.models.vit import ViTConfig, ViTModel

# Normalisation defaults of transformers' image processors, used when a checkpoint has no
# preprocessor_config.json: ViTImageProcessor uses IMAGENET_STANDARD_MEAN/STD, CLIPImageProcessor
# OPENAI_CLIP_MEAN/STD (transformers.image_utils).
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MEAN_STD = {
    "vit": (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD),
    "clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "clip_vision_model": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
}


def conv_to_patch_kernel(weight: np.ndarray) -> np.ndarray:
    """PyTorch patch ``Conv2d`` weight ``[d, c, p, p]`` -> ``Linear`` kernel ``[p*p*c, d]``.

    Rows are ordered (row, column, channel) within a patch, as :func:`vlpeft_jax.models.vit.patchify`
    flattens NHWC patches.

    Example:
        >>> conv_to_patch_kernel(np.zeros((8, 3, 4, 4))).shape
        (48, 8)
    """
    d = weight.shape[0]
    return np.ascontiguousarray(weight.transpose(2, 3, 1, 0).reshape(-1, d))


def patch_kernel_to_conv(kernel: np.ndarray, patch_size: tuple[int, int], num_channels: int) -> np.ndarray:
    """The inverse of :func:`conv_to_patch_kernel`: ``[p*p*c, d]`` -> ``[d, c, p, p]``.

    Example:
        >>> w = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
        >>> bool((patch_kernel_to_conv(conv_to_patch_kernel(w), (4, 4), 3) == w).all())
        True
    """
    ph, pw = patch_size
    return np.ascontiguousarray(kernel.reshape(ph, pw, num_channels, -1).transpose(3, 2, 0, 1))


def _abstract_params(module: nn.Module, *example_inputs: jax.ShapeDtypeStruct) -> dict[str, Any]:
    variables = jax.eval_shape(lambda *xs: module.init(jax.random.key(0), *xs), *example_inputs)
    return layers.unbox(variables)["params"]


def _with_prefix(state: Mapping[str, np.ndarray], probe: str, prefix: str) -> str:
    """``prefix`` if the checkpoint stores ``prefix + probe``, "" if it stores ``probe`` bare."""
    if prefix + probe in state:
        return prefix
    if probe in state:
        return ""
    raise CheckpointError(f"tensor {prefix + probe!r} (or {probe!r}) is missing; found keys like "
                          f"{sorted(state)[:5]}")


# --------------------------------------------------------------------------------------------------
# ViT

# transformers >= 5 names (in memory) -> the names ViT checkpoints are saved under.
_VIT_V5_RENAMES = (
    (re.compile(r"^layers\.(\d+)\.attention\.([qkv])_proj\."), None),
    (re.compile(r"^layers\.(\d+)\.attention\.o_proj\."), r"encoder.layer.\1.attention.output.dense."),
    (re.compile(r"^layers\.(\d+)\.mlp\.fc1\."), r"encoder.layer.\1.intermediate.dense."),
    (re.compile(r"^layers\.(\d+)\.mlp\.fc2\."), r"encoder.layer.\1.output.dense."),
    (re.compile(r"^layers\.(\d+)\."), r"encoder.layer.\1."),
)
_QKV = {"q": "query", "k": "key", "v": "value"}


def _vit_saved_names(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Strips the ``vit.`` head prefix and renames transformers-5 in-memory names to the saved ones."""
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if key.startswith("vit."):
            key = key[len("vit."):]
        for pattern, repl in _VIT_V5_RENAMES:
            m = pattern.match(key)
            if not m:
                continue
            if repl is None:
                repl = rf"encoder.layer.\1.attention.attention.{_QKV[m.group(2)]}."
            key = pattern.sub(repl, key)
            break
        out[key] = value
    return out


def vit_key_maps(config: ViTConfig) -> list[KeyMap]:
    """Key map of ``ViTModel``: HF tensor names -> our parameter paths."""
    maps = [
        KeyMap("embeddings.cls_token", "embeddings/cls_token"),
        KeyMap("embeddings.position_embeddings", "embeddings/position_embeddings"),
        KeyMap("embeddings.patch_embeddings.projection.weight", "embeddings/patch_embeddings/projection/kernel",
               conv_to_patch_kernel),
        KeyMap("embeddings.patch_embeddings.projection.bias", "embeddings/patch_embeddings/projection/bias"),
    ]
    for i in range(config.num_hidden_layers):
        hf, ours = f"encoder.layer.{i}", f"encoder/layer_{i}"
        for name in ("query", "key", "value"):
            maps += linear(f"{hf}.attention.attention.{name}", f"{ours}/attention/attention/{name}",
                           bias=config.qkv_bias)
        maps += linear(f"{hf}.attention.output.dense", f"{ours}/attention/output/dense")
        maps += linear(f"{hf}.intermediate.dense", f"{ours}/intermediate/dense")
        maps += linear(f"{hf}.output.dense", f"{ours}/output/dense")
        maps += norm(f"{hf}.layernorm_before", f"{ours}/layernorm_before")
        maps += norm(f"{hf}.layernorm_after", f"{ours}/layernorm_after")
    maps += norm("layernorm", "layernorm")
    if config.add_pooling_layer:
        maps += linear("pooler.dense", "pooler/dense")
    return maps


def load_vit(model_dir: str | os.PathLike, *, dtype: Any = jnp.float32) -> tuple[ViTModel, dict[str, Any]]:
    """Loads a Hugging Face ViT checkpoint directory as ``(ViTModel, params)``.

    The pooler is part of the model exactly when the checkpoint holds ``pooler.dense.weight``.
    """
    d = resolve_model_dir(model_dir)
    hf_config = load_config(d)
    state = _vit_saved_names(load_state_dict(d))
    config = ViTConfig.from_hf(hf_config, add_pooling_layer="pooler.dense.weight" in state, dtype=dtype)
    module = ViTModel(config)
    h, w = config.image_size
    abstract = _abstract_params(module, jax.ShapeDtypeStruct((1, h, w, config.num_channels), jnp.float32))
    return module, convert(state, vit_key_maps(config), abstract, source=str(d))


# --------------------------------------------------------------------------------------------------
# CLIP


def clip_encoder_key_maps(hf_prefix: str, path: str, num_layers: int) -> list[KeyMap]:
    """Key map of a CLIP encoder stack (``<hf_prefix>.layers.N...`` -> ``<path>/layers_N/...``)."""
    maps: list[KeyMap] = []
    for i in range(num_layers):
        hf, ours = f"{hf_prefix}.layers.{i}", f"{path}/layers_{i}"
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            maps += linear(f"{hf}.self_attn.{name}", f"{ours}/self_attn/{name}")
        maps += linear(f"{hf}.mlp.fc1", f"{ours}/mlp/fc1")
        maps += linear(f"{hf}.mlp.fc2", f"{ours}/mlp/fc2")
        maps += norm(f"{hf}.layer_norm1", f"{ours}/layer_norm1")
        maps += norm(f"{hf}.layer_norm2", f"{ours}/layer_norm2")
    return maps


def clip_vision_key_maps(config: CLIPVisionConfig, hf_prefix: str = "vision_model.",
                         with_projection: bool = False) -> list[KeyMap]:
    """Key map of ``CLIPVisionModel[WithProjection]``; ``hf_prefix`` is ``"vision_model."`` or ``""``."""
    p = hf_prefix
    maps = [
        KeyMap(f"{p}embeddings.class_embedding", "vision_model/embeddings/class_embedding"),
        KeyMap(f"{p}embeddings.patch_embedding.weight", "vision_model/embeddings/patch_embedding/kernel",
               conv_to_patch_kernel),
        embedding(f"{p}embeddings.position_embedding.weight", "vision_model/embeddings/position_embedding"),
        *norm(f"{p}pre_layrnorm", "vision_model/pre_layrnorm"),
        *clip_encoder_key_maps(f"{p}encoder", "vision_model/encoder", config.num_hidden_layers),
        *norm(f"{p}post_layernorm", "vision_model/post_layernorm"),
    ]
    if with_projection:
        maps += linear("visual_projection", "visual_projection", bias=False)
    return maps


def clip_text_key_maps(config: CLIPTextConfig, hf_prefix: str = "text_model.",
                       with_projection: bool = False) -> list[KeyMap]:
    """Key map of ``CLIPTextModel[WithProjection]``; ``hf_prefix`` is ``"text_model."`` or ``""``."""
    p = hf_prefix
    maps = [
        embedding(f"{p}embeddings.token_embedding.weight", "text_model/embeddings/token_embedding"),
        embedding(f"{p}embeddings.position_embedding.weight", "text_model/embeddings/position_embedding"),
        *clip_encoder_key_maps(f"{p}encoder", "text_model/encoder", config.num_hidden_layers),
        *norm(f"{p}final_layer_norm", "text_model/final_layer_norm"),
    ]
    if with_projection:
        maps += linear("text_projection", "text_projection", bias=False)
    return maps


def load_clip_vision(
    model_dir: str | os.PathLike, with_projection: bool = False, *, dtype: Any = jnp.float32
) -> tuple[CLIPVisionModel | CLIPVisionModelWithProjection, dict[str, Any]]:
    """Loads the CLIP vision tower of a ``CLIPVisionModel[WithProjection]`` or full ``CLIPModel`` checkpoint.

    ``with_projection=True`` also loads ``visual_projection`` (``pooled`` is then HF's ``image_embeds``).
    """
    d = resolve_model_dir(model_dir)
    config = CLIPVisionConfig.from_hf(load_config(d), dtype=dtype)
    state = load_state_dict(d)
    prefix = _with_prefix(state, "embeddings.class_embedding", "vision_model.")
    module = CLIPVisionModelWithProjection(config) if with_projection else CLIPVisionModel(config)
    h, w = config.image_size
    abstract = _abstract_params(module, jax.ShapeDtypeStruct((1, h, w, config.num_channels), jnp.float32))
    return module, convert(state, clip_vision_key_maps(config, prefix, with_projection), abstract, source=str(d))


def load_clip_text(model_dir: str | os.PathLike, with_projection: bool = False, *,
                   dtype: Any = jnp.float32) -> tuple[CLIPTextModel | CLIPTextModelWithProjection, dict[str, Any]]:
    """Loads the CLIP text tower of a ``CLIPTextModel[WithProjection]`` or full ``CLIPModel`` checkpoint.

    ``with_projection=True`` also loads ``text_projection`` (``pooled`` is then HF's ``text_embeds``).
    """
    d = resolve_model_dir(model_dir)
    config = CLIPTextConfig.from_hf(load_config(d), dtype=dtype)
    state = load_state_dict(d)
    prefix = _with_prefix(state, "embeddings.token_embedding.weight", "text_model.")
    module = CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)
    abstract = _abstract_params(module, jax.ShapeDtypeStruct((1, 1), jnp.int32))
    return module, convert(state, clip_text_key_maps(config, prefix, with_projection), abstract, source=str(d))


VISION_LOADERS: dict[str, Callable[..., tuple[nn.Module, dict[str, Any]]]] = {
    "vit": load_vit,
    "clip_vision_model": load_clip_vision,
    "clip": load_clip_vision,
}


def load_vision_tower(model_dir: str | os.PathLike, **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Picks the loader of :data:`VISION_LOADERS` by the checkpoint's ``model_type`` and calls it."""
    model_type = load_config(model_dir).get("model_type")
    if model_type not in VISION_LOADERS:
        raise ConfigError(f"{model_dir}: vision model_type {model_type!r} is not supported; "
                          f"supported: {', '.join(VISION_LOADERS)}")
    return VISION_LOADERS[model_type](model_dir, **kwargs)


# --------------------------------------------------------------------------------------------------
# Image normalisation


def _size_pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int):
        return value, value
    if isinstance(value, Mapping):
        if "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
        if "shortest_edge" in value:
            return int(value["shortest_edge"]), int(value["shortest_edge"])
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    return None


def image_mean_std(model_dir: str | os.PathLike) -> tuple[tuple[float, ...], tuple[float, ...], tuple[int, int]]:
    """``(mean, std, (height, width))`` with which to normalise images for a vision checkpoint.

    Read from ``preprocessor_config.json`` (``image_mean``, ``image_std``, and ``crop_size`` when the
    processor centre-crops, else ``size``). Without that file, the defaults of the family's transformers
    image processor are used: ViT ``mean = std = (0.5, 0.5, 0.5)``, CLIP ``mean = (0.48145466,
    0.4578275, 0.40821073)``, ``std = (0.26862954, 0.26130258, 0.27577711)``, and the size is the config's
    ``image_size``. Normalise as ``(pixels / 255 - mean) / std`` (``do_rescale`` with 1/255).

    Example:
        >>> import json, pathlib, tempfile
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "config.json").write_text(json.dumps({"model_type": "vit", "image_size": 384}))
        >>> image_mean_std(d)
        ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), (384, 384))
    """
    d = resolve_model_dir(model_dir)
    hf_config = load_config(d)
    model_type = hf_config.get("model_type")
    if model_type not in DEFAULT_MEAN_STD:
        raise ConfigError(f"{d}: no image normalisation known for model_type {model_type!r}; "
                          f"known: {', '.join(DEFAULT_MEAN_STD)}")
    mean, std = DEFAULT_MEAN_STD[model_type]
    if model_type == "vit":
        size: tuple[int, int] | None = ViTConfig.from_hf(hf_config).image_size
    else:
        size = CLIPVisionConfig.from_hf(hf_config).image_size
    f = d / "preprocessor_config.json"
    if f.is_file():
        with open(f) as fh:
            proc = json.load(fh)
        mean = tuple(float(v) for v in proc.get("image_mean") or mean)
        std = tuple(float(v) for v in proc.get("image_std") or std)
        if proc.get("do_center_crop") and proc.get("crop_size") is not None:
            size = _size_pair(proc["crop_size"]) or size
        elif proc.get("size") is not None:
            size = _size_pair(proc["size"]) or size
    return mean, std, size
