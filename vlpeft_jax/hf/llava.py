"""LLaVA checkpoints (transformers' ``LlavaForConditionalGeneration``) -> a :class:`PrefixVLM` and back.

LLaVA (Liu et al. 2023, "Visual Instruction Tuning"; LLaVA-1.5: Liu et al. 2024, "Improved Baselines with
Visual Instruction Tuning") is a CLIP vision tower, a two-layer MLP projector (``linear_1`` -> activation ->
``linear_2``) and a decoder LM. Our :class:`~vlpeft_jax.models.vlm.PrefixVLM` already carries transformers'
module names (``vision_tower``, ``multi_modal_projector/linear_{1,2}``, ``language_model``), so the map
below is a rename of three explicit key maps: the CLIP tower's (:func:`~vlpeft_jax.hf.vision.clip_vision_key_maps`),
the projector's and the LM's (:func:`~vlpeft_jax.hf.decoders.llama_key_maps`).

What is read from ``config.json`` (transformers 5.24 ``LlavaConfig``), and how:

- ``vision_config``: a CLIP vision tower (``clip_vision_model``); other towers are refused with the list.
- ``text_config``: ``llama``, ``qwen2``, or ``mistral`` (run as LLaMA: it differs only by sliding-window
  attention, which our LLaMA does not do, so ``sliding_window`` must be null or at least
  ``max_position_embeddings``, where the window never binds).
- ``vision_feature_layer``: which ``hidden_states`` of the tower feed the projector, indexed as
  transformers does (0 = embedding output after ``pre_layrnorm``, -2 = output of the second-to-last layer,
  before ``post_layernorm``); a list concatenates the layers' features, as transformers does.
- ``vision_feature_select_strategy``: ``default`` drops the class token, ``full`` keeps it.
- ``projector_hidden_act``, ``multimodal_projector_bias``, ``image_token_index`` (alias ``image_token_id``).
- LLaVA-NeXT's "anyres" tiling (``model_type`` ``llava_next``..., or ``image_grid_pinpoints``) is out of
  scope and refused with a clear error.

The ``<image>`` token is expanded by the caller (as transformers' processor does) to
``module.num_image_tokens`` placeholders per image, ``(image_size / patch_size)^2`` (+1 for ``full``).

Key names: the key map uses transformers 5.24's in-memory names (``model.vision_tower.encoder.layers.0...``
-- its ``CLIPVisionModel`` has no ``vision_model`` level --, ``model.multi_modal_projector.*``,
``model.language_model.*``, ``lm_head.*``), which are also the module names peft adapters are keyed by.
On disk, ``save_pretrained`` writes the older layout (``vision_tower.*``, ``multi_modal_projector.*``,
``language_model.model.*``, ``language_model.lm_head.*``), and LLaVA-1.5 checkpoints have
``vision_tower.vision_model.*``: every one of these loads (:func:`normalize_keys`).

Example:
    >>> cfg = LlavaConfig.from_hf({"model_type": "llava", "image_token_index": 9,
    ...     "vision_config": {"model_type": "clip_vision_model", "hidden_size": 16, "intermediate_size": 32,
    ...                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
    ...     "text_config": {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "vocab_size": 10,
    ...                     "num_hidden_layers": 1, "num_attention_heads": 2}})
    >>> module = cfg.build()
    >>> module.num_image_tokens, module.image_token_id
    (4, 9)
    >>> [m.hf_key for m in llava_key_maps(cfg) if "projector" in m.hf_key][:2]
    ['model.multi_modal_projector.linear_1.weight', 'model.multi_modal_projector.linear_1.bias']
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlpeft_jax.errors import CheckpointError, ConfigError
from vlpeft_jax.hf import io
from vlpeft_jax.hf.decoders import llama_key_maps
from vlpeft_jax.hf.vision import clip_vision_key_maps, conv_to_patch_kernel, patch_kernel_to_conv
from vlpeft_jax.models import layers
from vlpeft_jax.models.clip import CLIPVisionConfig, CLIPVisionModel
from vlpeft_jax.models.llama import LlamaConfig, LlamaForCausalLM
from vlpeft_jax.models.vlm import ConnectorConfig, PrefixVLM

MODEL_TYPES = ("llava",)
VISION_MODEL_TYPES = ("clip_vision_model",)
TEXT_MODEL_TYPES = ("llama", "qwen2", "mistral")
# transformers' vision_feature_select_strategy -> our ConnectorConfig.feature
SELECT_STRATEGIES = {"default": "patches", "full": "all"}
ANYRES_MODEL_TYPES = ("llava_next", "llava_next_video", "llava_onevision")

# transformers' LlavaConfig defaults (a config.json may leave these out)
DEFAULT_IMAGE_TOKEN_INDEX = 32000
DEFAULT_VISION_CONFIG = {"model_type": "clip_vision_model", "intermediate_size": 4096, "hidden_size": 1024,
                         "patch_size": 14, "image_size": 336, "num_hidden_layers": 24, "num_attention_heads": 16,
                         "projection_dim": 768}

# names on disk -> transformers 5.24's in-memory names (the ones peft adapters use). save_pretrained still
# writes the first layout below, and LLaVA-1.5 checkpoints also carry CLIP's ``vision_model.`` level, which
# transformers 5.24's CLIPVisionModel drops.
LEGACY_PREFIXES = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                   ("vision_tower.vision_model.", "model.vision_tower."),
                   ("model.vision_tower.vision_model.", "model.vision_tower."),
                   ("vision_tower.", "model.vision_tower."),
                   ("multi_modal_projector.", "model.multi_modal_projector."))


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """A LLaVA architecture: CLIP tower, MLP projector, LLaMA-family LM (see the module docstring).

    Attributes:
      vision: the CLIP vision tower.
      text: the LM (Mistral runs as LLaMA).
      text_model_type: the LM's ``model_type`` as written (``llama``, ``qwen2``, ``mistral``).
      image_token_id: the ``<image>`` placeholder id (``image_token_index``).
      projector_hidden_act: activation between ``linear_1`` and ``linear_2``.
      multimodal_projector_bias: biases on the projector.
      vision_feature_layer: the tower's hidden state(s) fed to the projector (transformers' indexing).
      vision_feature_select_strategy: ``default`` (drop the class token) or ``full``.
    """

    vision: CLIPVisionConfig
    text: LlamaConfig
    text_model_type: str = "llama"
    image_token_id: int = DEFAULT_IMAGE_TOKEN_INDEX
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"

    def __post_init__(self) -> None:
        if self.vision_feature_select_strategy not in SELECT_STRATEGIES:
            raise ConfigError(f"vision_feature_select_strategy={self.vision_feature_select_strategy!r} is not "
                              f"supported; valid: {', '.join(SELECT_STRATEGIES)}")
        if self.projector_hidden_act not in layers.ACTIVATIONS:
            raise ConfigError(f"projector_hidden_act={self.projector_hidden_act!r} is not supported; supported: "
                              f"{', '.join(sorted(layers.ACTIVATIONS))}")
        feature_layers = self.vision_feature_layer
        if isinstance(feature_layers, (list, tuple)):
            feature_layers = tuple(int(i) for i in feature_layers)
            object.__setattr__(self, "vision_feature_layer", feature_layers)
            if not feature_layers:
                raise ConfigError("vision_feature_layer is an empty list; give a layer index or a non-empty list")
        n = self.vision.num_hidden_layers + 1  # hidden states: the embedding output and every layer's
        for i in (feature_layers,) if isinstance(feature_layers, int) else feature_layers:
            if not -n <= i < n:
                raise ConfigError(f"vision_feature_layer {i} is out of range: the vision tower has {n} hidden "
                                  f"states (indices {-n}..{n - 1})")

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], *, dtype: Any = jnp.float32) -> LlavaConfig:
        """Reads a LLaVA ``config.json`` dict; every unsupported feature raises :class:`ConfigError`."""
        model_type = config.get("model_type")
        if model_type in ANYRES_MODEL_TYPES or config.get("image_grid_pinpoints"):
            raise ConfigError(f"model_type {model_type!r} uses LLaVA-NeXT's 'anyres' image tiling "
                              "(image_grid_pinpoints), which is out of scope; supported: LLaVA-1.5-style "
                              "checkpoints (model_type 'llava', one fixed-size image per <image> token)")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type {model_type!r} is not a LLaVA checkpoint; supported: "
                              f"{', '.join(MODEL_TYPES)}")
        vision = dict(config.get("vision_config") or DEFAULT_VISION_CONFIG)
        vision_type = vision.get("model_type", "clip_vision_model")
        if vision_type not in VISION_MODEL_TYPES:
            raise ConfigError(f"vision_config.model_type={vision_type!r} is not supported for LLaVA; supported: "
                              f"{', '.join(VISION_MODEL_TYPES)}")
        text = dict(config.get("text_config") or {"model_type": "llama"})
        text_type = text.get("model_type", "llama")
        if text_type not in TEXT_MODEL_TYPES:
            raise ConfigError(f"text_config.model_type={text_type!r} is not supported for LLaVA; supported: "
                              f"{', '.join(TEXT_MODEL_TYPES)}")
        if text_type == "mistral":
            text = _mistral_as_llama(text)
        # transformers ties the head if either the top level or the text config says so
        text["tie_word_embeddings"] = bool(config.get("tie_word_embeddings")) or bool(text.get("tie_word_embeddings"))
        image_token = config.get("image_token_index", config.get("image_token_id"))
        return cls(
            vision=CLIPVisionConfig.from_hf(vision, dtype=dtype),
            text=LlamaConfig.from_hf(text, dtype=dtype),
            text_model_type=text_type,
            image_token_id=int(DEFAULT_IMAGE_TOKEN_INDEX if image_token is None else image_token),
            projector_hidden_act=str(config.get("projector_hidden_act", "gelu")),
            multimodal_projector_bias=bool(config.get("multimodal_projector_bias", True)),
            vision_feature_layer=_feature_layer(config.get("vision_feature_layer", -2)),
            vision_feature_select_strategy=str(config.get("vision_feature_select_strategy", "default")),
        )

    @classmethod
    def from_module(cls, module: PrefixVLM) -> LlavaConfig:
        """The config of a LLaVA-shaped :class:`PrefixVLM` (as :meth:`build` or :func:`load_llava` make it).

        ``text_model_type`` is the LM config's (``llama`` for a Mistral LM, which runs as LLaMA).
        """
        c = module.connector
        ok = (isinstance(module.vision_tower, CLIPVisionModel) and isinstance(module.language_model, LlamaForCausalLM)
              and c.kind == "mlp" and c.num_layers == 2 and c.feature in SELECT_STRATEGIES.values()
              and module.image_token_id is not None)
        if not ok:
            raise ConfigError("not a LLaVA-shaped PrefixVLM: LLaVA needs a CLIPVisionModel tower, a LLaMA-family LM, "
                              "a 2-layer 'mlp' connector on 'patches' or 'all' and an image_token_id")
        strategy = {v: k for k, v in SELECT_STRATEGIES.items()}[c.feature]
        return cls(vision=module.vision_tower.config, text=module.language_model.config,
                   text_model_type=module.language_model.config.model_type, image_token_id=module.image_token_id,
                   projector_hidden_act=c.activation, multimodal_projector_bias=c.bias,
                   vision_feature_layer=c.vision_layer, vision_feature_select_strategy=strategy)

    @property
    def connector(self) -> ConnectorConfig:
        """The projector as our Mapping Layer: ``linear_1`` -> activation -> ``linear_2``, LM-wide."""
        return ConnectorConfig(kind="mlp", num_layers=2, feature=SELECT_STRATEGIES[self.vision_feature_select_strategy],
                               vision_layer=self.vision_feature_layer, activation=self.projector_hidden_act,
                               bias=self.multimodal_projector_bias)

    def build(self) -> PrefixVLM:
        """The :class:`PrefixVLM` (CLIP tower, projector, LM; visual tokens over ``image_token_id``)."""
        return PrefixVLM(vision_tower=CLIPVisionModel(self.vision), language_model=LlamaForCausalLM(self.text),
                         connector=self.connector, lm_width=self.text.hidden_size, image_token_id=self.image_token_id)


def _feature_layer(value: Any) -> int | tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(int(i) for i in value)
    if isinstance(value, int):
        return value
    raise ConfigError(f"vision_feature_layer={value!r}; expected a layer index or a list of them")


def _mistral_as_llama(text: Mapping[str, Any]) -> dict[str, Any]:
    """A Mistral text config as a LLaMA one (same network without biases), if its sliding window never binds."""
    window = text.get("sliding_window", 4096)  # transformers' MistralConfig default
    max_positions = int(text.get("max_position_embeddings", 4096 * 32))
    if window is not None and int(window) < max_positions:
        raise ConfigError(f"text_config.sliding_window={window} is smaller than max_position_embeddings="
                          f"{max_positions}: sliding-window attention is not supported here; only Mistral configs "
                          "with sliding_window null (or >= max_position_embeddings) load")
    return {**text, "model_type": "llama", "attention_bias": False, "mlp_bias": False}


# --------------------------------------------------------------------------------------------------
# Key maps


def llava_key_maps(config: LlavaConfig) -> list[io.KeyMap]:
    """transformers 5 ``LlavaForConditionalGeneration`` keys -> our :class:`PrefixVLM` paths (see the example
    in the module docstring). ``lm_head`` is left out when the head is tied to the token embeddings."""
    maps = [dataclasses.replace(m, hf_key=f"model.vision_tower.{m.hf_key}", path=f"vision_tower/{m.path}")
            for m in clip_vision_key_maps(config.vision, hf_prefix="")]
    for i in (1, 2):
        maps += io.linear(f"model.multi_modal_projector.linear_{i}", f"multi_modal_projector/linear_{i}",
                          bias=config.multimodal_projector_bias)
    for m in llama_key_maps(config.text):
        hf_key = m.hf_key if m.hf_key.startswith("lm_head.") else "model.language_model." + m.hf_key[len("model."):]
        maps.append(dataclasses.replace(m, hf_key=hf_key, path=f"language_model/{m.path}"))
    return maps


def normalize_keys(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames the on-disk layouts (``language_model.model.*``, ``vision_tower[.vision_model].*``...) to the
    in-memory names of transformers 5.24 that :func:`llava_key_maps` uses.

    Example:
        >>> sorted(normalize_keys({"language_model.lm_head.weight": 0, "language_model.model.norm.weight": 1}))
        ['lm_head.weight', 'model.language_model.norm.weight']
    """
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        for old, new in LEGACY_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def check_projector(state: Mapping[str, np.ndarray], config: LlavaConfig, source: str) -> None:
    """Raises :class:`CheckpointError` naming every projector tensor the checkpoint lacks."""
    missing = [m.hf_key for m in llava_key_maps(config)
               if m.hf_key.startswith("model.multi_modal_projector.") and m.hf_key not in state]
    if missing:
        raise CheckpointError(f"{source}: the multi-modal projector's weights are missing: {', '.join(missing)} "
                              "(a LLaVA checkpoint holds model.multi_modal_projector.linear_1/linear_2, or "
                              "multi_modal_projector.* in the older layout)")


# --------------------------------------------------------------------------------------------------
# Loading and export


def abstract_params(module: PrefixVLM) -> dict[str, Any]:
    """The module's unboxed parameter tree as ``ShapeDtypeStruct`` leaves (no memory used, nothing compiled)."""
    vc = module.vision_tower.config
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    pixels = jax.ShapeDtypeStruct((1, *vc.image_size, vc.num_channels), jnp.float32)
    variables = jax.eval_shape(lambda i, p: module.init(jax.random.key(0), i, None, p), ids, pixels)
    return layers.unbox(variables)["params"]


def load_llava(model_dir: str | os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = None,
               sharding: Any = None) -> tuple[PrefixVLM, dict[str, Any]]:
    """Builds a :class:`PrefixVLM` from a local LLaVA checkpoint directory (``model_type`` ``llava``).

    Returns the module (compute ``dtype``; ``module.image_token_id`` and ``module.num_image_tokens`` say
    how to expand ``<image>``) and its parameters. The tensors are read one at a time
    (:func:`~vlpeft_jax.hf.io.lazy_state_dict`), so host memory holds the parameters plus one tensor;
    ``param_dtype`` (None: float32; ``"stored"``: the checkpoint's; or a dtype) and ``sharding`` (None: host
    numpy; a sharding or a tree of them: each device reads only its slice) as in :func:`vlpeft_jax.hf.io.convert`.
    Unsupported configs raise :class:`ConfigError`, missing tensors :class:`CheckpointError` (the projector's all
    named), before any tensor is read.
    """
    d = io.resolve_model_dir(model_dir)
    config = LlavaConfig.from_hf(io.load_config(d), dtype=dtype)
    state = normalize_keys(io.lazy_state_dict(d))
    check_projector(state, config, str(d))
    module = config.build()
    params = io.convert(state, llava_key_maps(config), abstract_params(module), source=str(d),
                        param_dtype=param_dtype, sharding=sharding)
    return module, params


def llava_to_hf_state_dict(params: Mapping[str, Any], config: LlavaConfig) -> dict[str, np.ndarray]:
    """Our LLaVA parameters -> a transformers 5 ``LlavaForConditionalGeneration`` state dict (float32)."""
    patch = functools.partial(patch_kernel_to_conv, patch_size=config.vision.patch_size,
                              num_channels=config.vision.num_channels)
    return io.export_state(params, llava_key_maps(config), {conv_to_patch_kernel: patch}, what="LLaVA")
