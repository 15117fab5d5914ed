"""Hugging Face BLIP-2 and InstructBLIP checkpoints -> :class:`~vlpeft_jax.models.vlm.QFormerVLM`, and back.

A ``Blip2ForConditionalGeneration`` (``model_type`` ``blip-2``) or ``InstructBlipForConditionalGeneration``
(``instructblip``) directory holds four parts, each mapped by an explicit key map (HF tensor -> our path):

- vision tower: ``vision_model.*`` -> ``vision_model/*`` (:class:`~vlpeft_jax.models.blip_vision.BlipVisionModel`);
- Q-Former: ``qformer.*`` -> ``qformer/*``, and the top-level ``query_tokens`` -> ``qformer/query_tokens``;
- projection: ``language_projection.{weight, bias}`` -> ``language_projection/{kernel, bias}``;
- language model: ``language_model.<LM key>`` -> ``language_model/<LM path>``.

The language model is chosen by ``text_config.model_type`` and mapped with its own family's key map
(:func:`vlpeft_jax.hf.decoders.opt_key_maps` for ``opt``, :func:`~vlpeft_jax.hf.decoders.llama_key_maps` for
``llama`` / Vicuna, :func:`vlpeft_jax.hf.t5.t5_key_maps` for ``t5`` / Flan-T5) under the ``language_model.``
prefix. With Flan-T5 the composed module is an encoder-decoder (``is_encoder_decoder``): the visual tokens go to
the T5 encoder's input, ``decoder_input_ids`` to its decoder, and :func:`vlpeft_jax.eval.decode.generate` drives it
through :class:`~vlpeft_jax.eval.decode.ModuleApply` like any other model.

Because every entry is a rename (plus transposes and the patch convolution's reshape), our module paths read as
transformers' module names (``language_model/model/decoder/layers_0/self_attn/q_proj`` is
``language_model.model.decoder.layers.0.self_attn.q_proj``), which is what PEFT adapter export relies on.

The architecture is a :class:`Blip2Config` (the vision, Q-Former and LM configs, ``model_type``, the placeholder
id), read from ``config.json`` by :meth:`Blip2Config.from_hf` or recovered from a loaded module by
:meth:`Blip2Config.from_module`; the key maps (:func:`blip2_key_maps`, :func:`instructblip_key_maps`) and the
export (:func:`blip2_to_hf_state_dict`, :func:`instructblip_to_hf_state_dict`) take it.

Visual tokens are placed as transformers 5.24 places them: over the ``image_token_index`` placeholders of
``input_ids`` when the config has one (every checkpoint saved by a current processor; transformers 5.24 cannot
run without one), else prepended as transformers 4.x did (see :class:`~vlpeft_jax.models.vlm.QFormerVLM`).
Dtypes follow transformers' ``_keep_in_fp32_modules``: BLIP-2 keeps the whole Q-Former in float32, InstructBLIP
only its query tokens (parameters are always float32 here; ``dtype`` is the compute dtype of the other parts).

A directory without the Q-Former, ``query_tokens`` or ``language_projection`` tensors (e.g. a language model
saved alone) fails with :class:`~vlpeft_jax.errors.CheckpointError` naming the missing keys, before anything is
traced or compiled. Older checkpoints that store the vision attention bias as ``q_bias`` / ``v_bias`` are read
too (the fused bias is ``[q_bias, 0, v_bias]``).

Example (with a checkpoint directory ``DIR``)::

    model, params = load_blip2(DIR)
    out = model.apply({"params": params}, input_ids, attention_mask, pixel_values_nhwc)
    state_dict = blip2_to_hf_state_dict(params, Blip2Config.from_module(model))
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlpeft_jax.errors import CheckpointError, ConfigError
from vlpeft_jax.hf import io
from vlpeft_jax.hf.bert import qformer_key_map
from vlpeft_jax.hf.decoders import llama_key_maps, opt_key_maps
from vlpeft_jax.hf.io import KeyMap
from vlpeft_jax.hf.t5 import resolve_tied_head, t5_key_maps, with_shared_alias
from vlpeft_jax.hf.vision import conv_to_patch_kernel, patch_kernel_to_conv
from vlpeft_jax.models import layers
from vlpeft_jax.models.bert import BertConfig, QFormer
from vlpeft_jax.models.blip_vision import BlipVisionConfig, BlipVisionModel
from vlpeft_jax.models.llama import LlamaConfig, LlamaForCausalLM
from vlpeft_jax.models.opt import OPTConfig, OPTForCausalLM
from vlpeft_jax.models.t5 import T5Config, T5ForConditionalGeneration
from vlpeft_jax.models.vlm import QFormerVLM

Params = dict[str, Any]

MODEL_TYPES = ("blip-2", "instructblip")
LM_PREFIX = "language_model."


# --------------------------------------------------------------------------------------------------
# Language models by text_config.model_type


def _same_config(config: Any, state: Mapping[str, np.ndarray]) -> Any:
    return config


def _same_state(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return dict(state)


def _t5_config_from_weights(config: T5Config, state: Mapping[str, np.ndarray]) -> T5Config:
    return resolve_tied_head(config, state, hf_prefix=LM_PREFIX)


def _t5_state(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return with_shared_alias(state, hf_prefix=LM_PREFIX)


@dataclasses.dataclass(frozen=True)
class _LMFamily:
    config_class: type
    module: Callable[[Any], Any]
    key_maps: Callable[[Any], list[KeyMap]]
    width: Callable[[Any], int]  # what HF's language_projection outputs (text_config.hidden_size)
    prepare_state: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]] = _same_state
    config_from_weights: Callable[[Any, Mapping[str, np.ndarray]], Any] = _same_config  # e.g. T5's tied head


def _lm_families() -> dict[str, _LMFamily]:
    return {
        "opt": _LMFamily(OPTConfig, OPTForCausalLM, opt_key_maps, lambda c: c.hidden_size),
        "llama": _LMFamily(LlamaConfig, LlamaForCausalLM, llama_key_maps, lambda c: c.hidden_size),
        "t5": _LMFamily(T5Config, T5ForConditionalGeneration, t5_key_maps, lambda c: c.d_model, _t5_state,
                        _t5_config_from_weights),
    }


def _lm_family(model_type: str | None, source: str) -> _LMFamily:
    families = _lm_families()
    if model_type not in families:
        raise ConfigError(f"{source}: text_config.model_type {model_type!r} is not a supported BLIP-2 / InstructBLIP "
                          f"language model; supported: {', '.join(sorted(families))}")
    return families[model_type]


# --------------------------------------------------------------------------------------------------
# The architecture


@dataclasses.dataclass(frozen=True)
class Blip2Config:
    """A BLIP-2 / InstructBLIP architecture: vision tower, Q-Former (with its query tokens), language model.

    Attributes:
      vision: the vision tower.
      qformer: the Q-Former (``num_query_tokens`` included; ``qformer_text_input`` for InstructBLIP's layout).
      text: the language model's config (:class:`~vlpeft_jax.models.opt.OPTConfig`,
        :class:`~vlpeft_jax.models.llama.LlamaConfig` or :class:`~vlpeft_jax.models.t5.T5Config`).
      model_type: ``blip-2`` or ``instructblip`` (transformers' names).
      text_model_type: the LM's ``model_type`` (``opt``, ``llama``, ``t5``).
      image_token_id: the placeholder id (``image_token_index``), or None to prepend the visual tokens.

    Example:
        >>> cfg = Blip2Config.from_hf({"model_type": "blip-2", "num_query_tokens": 4, "image_token_index": 50,
        ...     "vision_config": {"hidden_size": 32, "num_attention_heads": 4, "image_size": 16, "patch_size": 8},
        ...     "qformer_config": {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 1},
        ...     "text_config": {"model_type": "opt", "hidden_size": 32, "num_attention_heads": 4}})
        >>> m = cfg.build()
        >>> m.num_query_tokens, m.image_token_id, m.is_encoder_decoder, type(m.language_model).__name__
        (4, 50, False, 'OPTForCausalLM')
    """

    vision: BlipVisionConfig
    qformer: BertConfig
    text: Any
    model_type: str = "blip-2"
    text_model_type: str = "opt"
    image_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type {self.model_type!r} is not a BLIP-2 / InstructBLIP checkpoint; expected "
                              f"one of {', '.join(MODEL_TYPES)}")
        family = _lm_family(self.text_model_type, "text_config")
        if not isinstance(self.text, family.config_class):
            raise ConfigError(f"text is a {type(self.text).__name__}, text_model_type {self.text_model_type!r} needs "
                              f"a {family.config_class.__name__}")
        want_text_input = self.model_type == "instructblip"
        if self.qformer.qformer_text_input != want_text_input:
            raise ConfigError(f"a {self.model_type} Q-Former has qformer_text_input={want_text_input}, got "
                              f"{self.qformer.qformer_text_input}")
        if self.qformer.num_query_tokens <= 0:
            raise ConfigError(f"num_query_tokens={self.qformer.num_query_tokens}; must be >= 1")
        if self.qformer.encoder_hidden_size != self.vision.hidden_size:
            raise ConfigError(f"the Q-Former's encoder_hidden_size ({self.qformer.encoder_hidden_size}) must equal the "
                              f"vision tower's hidden_size ({self.vision.hidden_size})")
        width = family.width(self.text)
        embed_width = getattr(self.text, "word_embed_proj_dim", None) or width
        if embed_width != width:
            raise ConfigError(f"text_config word_embed_proj_dim={embed_width} differs from hidden_size={width}; "
                              "BLIP-2's language_projection outputs hidden_size, which would not fit the LM's "
                              "input embeddings (transformers cannot run this configuration either)")

    @property
    def num_query_tokens(self) -> int:
        return self.qformer.num_query_tokens

    @property
    def lm_width(self) -> int:
        """What ``language_projection`` outputs: transformers' ``text_config.hidden_size``."""
        return _lm_family(self.text_model_type, "text_config").width(self.text)

    @property
    def is_encoder_decoder(self) -> bool:
        return self.text_model_type == "t5"

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], *, dtype: Any = jnp.float32,
                state: Mapping[str, np.ndarray] | None = None, source: str = "config.json") -> Blip2Config:
        """Reads a ``blip-2`` / ``instructblip`` ``config.json`` dict.

        Compute dtypes follow transformers' ``_keep_in_fp32_modules``: BLIP-2's Q-Former stays float32, the rest
        (and all of InstructBLIP but its query tokens, which are parameters and so float32 anyway) uses ``dtype``.
        ``state`` (the checkpoint's tensors, when known) settles what only the weights say: whether a T5 head is
        tied (transformers 5 writes ``tie_word_embeddings: true`` for Flan-T5's untied head too).
        """
        model_type = config.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"{source}: model_type {model_type!r} is not a BLIP-2 / InstructBLIP checkpoint; "
                              f"expected one of {', '.join(MODEL_TYPES)}")
        qformer_hf = config.get("qformer_config") or {}
        if model_type == "blip-2" and qformer_hf.get("use_qformer_text_input"):
            raise ConfigError(f"{source}: qformer_config.use_qformer_text_input=True belongs to BLIP-2's image-text "
                              "retrieval model; Blip2ForConditionalGeneration checkpoints have it False")
        text_hf = dict(config.get("text_config") or {})
        text_hf.setdefault("model_type", "opt")  # transformers' Blip2Config / InstructBlipConfig default
        family = _lm_family(text_hf["model_type"], source)
        text = family.config_class.from_hf(text_hf, dtype=dtype)
        if state is not None:
            text = family.config_from_weights(text, family.prepare_state(state))
        vision = BlipVisionConfig.from_hf(config, dtype=dtype)
        qformer = BertConfig.from_hf(config, dtype=jnp.float32 if model_type == "blip-2" else dtype)
        # transformers sets the Q-Former's encoder_hidden_size from the vision config (Blip2Config.__post_init__)
        qformer = dataclasses.replace(qformer, encoder_hidden_size=vision.hidden_size)
        image_token = config.get("image_token_index", config.get("image_token_id"))
        try:
            return cls(vision=vision, qformer=qformer, text=text, model_type=model_type,
                       text_model_type=text_hf["model_type"],
                       image_token_id=None if image_token is None else int(image_token))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_module(cls, model: QFormerVLM) -> Blip2Config:
        """The architecture of a :class:`QFormerVLM` built by :meth:`build` (e.g. by :func:`load_blip2`)."""
        text = model.language_model.config
        text_type = next((name for name, f in _lm_families().items() if isinstance(text, f.config_class)), None)
        if text_type is None:
            raise ConfigError(f"the language model's config is a {type(text).__name__}; BLIP-2 / InstructBLIP "
                              f"support {', '.join(sorted(_lm_families()))}")
        qformer = model.qformer.config
        return cls(vision=model.vision_model.config, qformer=qformer, text=text,
                   model_type="instructblip" if qformer.qformer_text_input else "blip-2", text_model_type=text_type,
                   image_token_id=model.image_token_id)

    def build(self) -> QFormerVLM:
        """The :class:`QFormerVLM` of this architecture (no parameters)."""
        family = _lm_family(self.text_model_type, "text_config")
        return QFormerVLM(vision_model=BlipVisionModel(self.vision), qformer=QFormer(self.qformer),
                          language_model=family.module(self.text), lm_width=self.lm_width,
                          num_query_tokens=self.num_query_tokens, image_token_id=self.image_token_id)


def build_qformer_vlm(hf_config: Mapping[str, Any], *, dtype: Any = jnp.float32, source: str = "config.json",
                      state: Mapping[str, np.ndarray] | None = None) -> QFormerVLM:
    """The :class:`QFormerVLM` a ``blip-2`` / ``instructblip`` ``config.json`` dict describes (no parameters):
    ``Blip2Config.from_hf(...).build()``."""
    return Blip2Config.from_hf(hf_config, dtype=dtype, state=state, source=source).build()


# --------------------------------------------------------------------------------------------------
# Key maps


def blip_vision_key_maps(config: BlipVisionConfig, hf_prefix: str = "vision_model.",
                         path: str = "vision_model") -> list[KeyMap]:
    """HF ``Blip2VisionModel`` / ``InstructBlipVisionModel`` keys -> our :class:`BlipVisionModel` paths.

    ``hf_prefix``/``path`` locate the tower (``""`` and ``""`` for a standalone vision checkpoint).

    Example:
        >>> maps = blip_vision_key_maps(BlipVisionConfig(num_hidden_layers=1))
        >>> [(m.hf_key, m.path) for m in maps if "qkv" in m.hf_key][1]
        ('vision_model.encoder.layers.0.self_attn.qkv.bias', 'vision_model/encoder/layers_0/self_attn/qkv/bias')
    """
    p, o = hf_prefix, f"{path}/" if path else ""
    maps = [KeyMap(f"{p}embeddings.class_embedding", f"{o}embeddings/class_embedding"),
            KeyMap(f"{p}embeddings.position_embedding", f"{o}embeddings/position_embedding"),
            KeyMap(f"{p}embeddings.patch_embedding.weight", f"{o}embeddings/patch_embedding/kernel",
                   conv_to_patch_kernel),
            KeyMap(f"{p}embeddings.patch_embedding.bias", f"{o}embeddings/patch_embedding/bias")]
    for i in range(config.num_hidden_layers):
        hf, ours = f"{p}encoder.layers.{i}", f"{o}encoder/layers_{i}"
        maps += io.linear(f"{hf}.self_attn.qkv", f"{ours}/self_attn/qkv", bias=config.qkv_bias)
        maps += io.linear(f"{hf}.self_attn.projection", f"{ours}/self_attn/projection")
        maps += io.norm(f"{hf}.layer_norm1", f"{ours}/layer_norm1")
        maps += io.linear(f"{hf}.mlp.fc1", f"{ours}/mlp/fc1")
        maps += io.linear(f"{hf}.mlp.fc2", f"{ours}/mlp/fc2")
        maps += io.norm(f"{hf}.layer_norm2", f"{ours}/layer_norm2")
    maps += io.norm(f"{p}post_layernorm", f"{o}post_layernorm")
    return maps


def _prefixed(maps: list[KeyMap], hf_prefix: str, path: str) -> list[KeyMap]:
    return [dataclasses.replace(m, hf_key=hf_prefix + m.hf_key, path=f"{path}/{m.path}") for m in maps]


def qformer_vlm_key_maps(config: Blip2Config) -> list[KeyMap]:
    """HF keys -> our paths for either layout (the Q-Former's part follows ``config.qformer``)."""
    maps = blip_vision_key_maps(config.vision)
    maps.append(KeyMap("query_tokens", "qformer/query_tokens"))
    maps += _prefixed([m for m in qformer_key_map(config.qformer) if m.hf_key != "query_tokens"], "qformer.",
                      "qformer")
    maps += io.linear("language_projection", "language_projection")
    lm_maps = _lm_family(config.text_model_type, "text_config").key_maps(config.text)
    maps += _prefixed(lm_maps, LM_PREFIX, "language_model")
    return maps


def blip2_key_maps(config: Blip2Config) -> list[KeyMap]:
    """``Blip2ForConditionalGeneration`` keys -> our :class:`QFormerVLM` paths.

    Example:
        >>> cfg = Blip2Config.from_hf({"model_type": "blip-2", "num_query_tokens": 2,
        ...     "vision_config": {"hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1},
        ...     "qformer_config": {"hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1},
        ...     "text_config": {"model_type": "opt", "hidden_size": 8, "num_attention_heads": 2,
        ...                     "num_hidden_layers": 1}})
        >>> {m.hf_key: m.path for m in blip2_key_maps(cfg)}["language_model.model.decoder.layers.0.fc1.weight"]
        'language_model/model/decoder/layers_0/fc1/kernel'
    """
    if config.model_type != "blip-2":
        raise ConfigError(f"blip2_key_maps got a {config.model_type!r} config; use instructblip_key_maps")
    return qformer_vlm_key_maps(config)


def instructblip_key_maps(config: Blip2Config) -> list[KeyMap]:
    """``InstructBlipForConditionalGeneration`` keys -> our paths (the Q-Former embeds the instruction:
    ``qformer.embeddings.{word_embeddings, position_embeddings, layernorm}`` and text FFNs)."""
    if config.model_type != "instructblip":
        raise ConfigError(f"instructblip_key_maps got a {config.model_type!r} config; use blip2_key_maps")
    return qformer_vlm_key_maps(config)


# --------------------------------------------------------------------------------------------------
# Loading


def _normalise_state(state: Mapping[str, np.ndarray], hf_config: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Fuses older checkpoints' ``self_attn.q_bias`` / ``v_bias`` into the ``qkv.bias`` transformers stores; lets
    the LM family fill its aliases (T5's ``shared.weight`` from ``encoder.embed_tokens.weight``)."""
    text_type = (hf_config.get("text_config") or {}).get("model_type", "opt")
    family = _lm_families().get(text_type)
    out = family.prepare_state(state) if family is not None else dict(state)
    for key in [k for k in state if k.endswith(".self_attn.q_bias")]:
        base = key[: -len("q_bias")]
        if f"{base}qkv.bias" in out or f"{base}v_bias" not in out:
            continue
        q, v = out.pop(key), out.pop(f"{base}v_bias")
        out[f"{base}qkv.bias"] = np.concatenate([q, np.zeros_like(q), v])
    return out


def _check_present(state: Mapping[str, np.ndarray], maps: list[KeyMap], source: str) -> None:
    missing = [m.hf_key for m in maps if not m.optional and m.hf_key not in state]
    if not missing:
        return
    parts = {"query_tokens": [], "qformer.": [], "language_projection.": [], "vision_model.": [],
             "language_model.": []}
    for k in missing:
        parts[next(p for p in parts if k.startswith(p))].append(k)
    summary = "; ".join(f"{len(keys)} under {p.rstrip('.')!r} (e.g. {', '.join(keys[:3])})"
                        for p, keys in parts.items() if keys)
    raise CheckpointError(f"{source} is not a complete BLIP-2 / InstructBLIP checkpoint: {len(missing)} tensors "
                          f"are missing: {summary}")


def _dummy_inputs(model: QFormerVLM) -> tuple[tuple[Any, ...], dict[str, Any]]:
    vision = model.vision_model.config
    h, w = vision.image_size
    ids = jax.ShapeDtypeStruct((1, model.num_query_tokens + 1), jnp.int32)
    pixels = jax.ShapeDtypeStruct((1, h, w, vision.num_channels), jnp.float32)
    kwargs = {}
    if model.qformer.config.qformer_text_input:
        kwargs["qformer_input_ids"] = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    return (ids, None, pixels), kwargs


def abstract_params(model: QFormerVLM) -> Params:
    """The model's unboxed parameter tree as ``ShapeDtypeStruct`` leaves (traced abstractly, no memory)."""
    args, kwargs = _dummy_inputs(model)
    ids, mask, pixels = args
    variables = jax.eval_shape(lambda i, p, kw: model.init(jax.random.key(0), i, mask, p, **kw), ids, pixels, kwargs)
    return layers.unbox(variables)["params"]


def _load(model_dir: str | os.PathLike, model_type: str, dtype: Any) -> tuple[QFormerVLM, Params]:
    d = io.resolve_model_dir(model_dir)
    hf_config = io.load_config(d)
    if hf_config.get("model_type") != model_type:
        loader = {"blip-2": "load_blip2", "instructblip": "load_instructblip"}.get(hf_config.get("model_type"))
        hint = f" (use {loader})" if loader else ""
        raise CheckpointError(f"{d}/config.json has model_type {hf_config.get('model_type')!r}; expected "
                              f"{model_type!r}{hint}")
    source = f"{d}/config.json"
    Blip2Config.from_hf(hf_config, dtype=dtype, source=source)  # configuration errors before reading any weight
    state = _normalise_state(io.load_state_dict(d), hf_config)
    config = Blip2Config.from_hf(hf_config, dtype=dtype, state=state, source=source)
    maps = qformer_vlm_key_maps(config)
    _check_present(state, maps, str(d))
    model = config.build()
    return model, io.convert(state, maps, abstract_params(model), source=str(d))


def load_blip2(model_dir: str | os.PathLike, *, dtype: Any = jnp.float32) -> tuple[QFormerVLM, Params]:
    """Loads a local ``Blip2ForConditionalGeneration`` checkpoint directory (OPT, LLaMA or Flan-T5 LM).

    Returns the :class:`QFormerVLM` (compute ``dtype``) and its parameters as host (numpy, float32) arrays;
    ``Blip2Config.from_module(model)`` gives the architecture the key maps and the export take.
    """
    return _load(model_dir, "blip-2", dtype)


def load_instructblip(model_dir: str | os.PathLike, *, dtype: Any = jnp.float32) -> tuple[QFormerVLM, Params]:
    """Loads a local ``InstructBlipForConditionalGeneration`` checkpoint directory (Vicuna/LLaMA, Flan-T5 or OPT LM).

    Call the model with the instruction both in ``input_ids`` (LM vocabulary) and in ``qformer_input_ids`` /
    ``qformer_attention_mask`` (the Q-Former's BERT vocabulary), as ``InstructBlipProcessor`` produces them.
    """
    return _load(model_dir, "instructblip", dtype)


# --------------------------------------------------------------------------------------------------
# Export


def qformer_vlm_to_hf_state_dict(params: Mapping[str, Any], config: Blip2Config) -> dict[str, np.ndarray]:
    """Our parameters -> the state dict transformers saves for the architecture (float32 numpy; a tied head
    left out, as ``save_pretrained`` writes it)."""
    patch = functools.partial(patch_kernel_to_conv, patch_size=config.vision.patch_size,
                              num_channels=config.vision.num_channels)
    return io.export_state(params, qformer_vlm_key_maps(config), {conv_to_patch_kernel: patch}, what="BLIP-2")


def blip2_to_hf_state_dict(params: Mapping[str, Any], config: Blip2Config) -> dict[str, np.ndarray]:
    """Our parameters -> a ``Blip2ForConditionalGeneration`` state dict (float32 numpy; tied heads left out)."""
    if config.model_type != "blip-2":
        raise ConfigError(f"blip2_to_hf_state_dict got a {config.model_type!r} config; use "
                          "instructblip_to_hf_state_dict")
    return qformer_vlm_to_hf_state_dict(params, config)


def instructblip_to_hf_state_dict(params: Mapping[str, Any], config: Blip2Config) -> dict[str, np.ndarray]:
    """Our parameters -> an ``InstructBlipForConditionalGeneration`` state dict (float32 numpy)."""
    if config.model_type != "instructblip":
        raise ConfigError(f"instructblip_to_hf_state_dict got a {config.model_type!r} config; use "
                          "blip2_to_hf_state_dict")
    return qformer_vlm_to_hf_state_dict(params, config)
