"""Hugging Face ``peft`` adapters out and in: ``adapter_config.json`` + ``adapter_model.safetensors``.

:func:`export_peft` writes a method's parameters as ``PeftModel.save_pretrained`` would, so that
``PeftModel.from_pretrained(hf_model, out_dir)`` in PyTorch gives the same outputs; :func:`import_peft`
reads such a directory (written by peft or by us) into a method and its parameters.

Key names. Our parameter paths mirror the Hugging Face module names with a list index ``h.0`` written
``h_0`` (the naming convention of the backbones), so a peft key is a rename::

    params["transformer"]["h_0"]["attn"]["c_attn"]["lora_a"]   [in, r]
      <-> base_model.model.transformer.h.0.attn.c_attn.lora_A.weight   (r, in)

Where our tree does not mirror the Hugging Face names, the family's key map gives them
(:attr:`BaseModelInfo.module_names`, built by :func:`key_map_module_names`): a LLaVA's
``params["language_model"]["model"]["layers_0"]["self_attn"]["q_proj"]`` is transformers 5's
``base_model.model.model.language_model.layers.0.self_attn.q_proj``, its CLIP tower's
``vision_tower/vision_model/encoder/layers_0/...`` is ``model.vision_tower.encoder.layers.0...``.

LoRA's ``lora_B.weight`` is ``(out, r)`` (our ``lora_b`` transposed), DoRA's magnitude is
``lora_magnitude_vector`` ``(out,)`` (no ``.weight``: peft 0.21's saved name), IA3's vector is ``ia3_l``,
``(out, 1)`` or ``(1, in)`` for feed-forward modules. GPT-2's ``Conv1D`` layers get ``fan_in_fan_out=true``
(it changes only how peft reads the *base* weight; adapter tensors have the same layout for every layer type).

Formats, keyed by method name. The method classes (:mod:`vlpeft_jax.peft`) know nothing of peft's format;
each method family's conversion is a module of :mod:`vlpeft_jax.hf.peft_formats` that exposes a
:class:`PeftFormat` per method: its ``peft_type`` (peft's ``PeftType`` value, e.g. ``"IA3"``) and

- ``to_state(method, peft_params, info, prefix) -> (config_fields, state)``: its ``adapter_config.json``
  fields (this module adds ``peft_type``, ``task_type``, ``base_model_name_or_path``...) and its tensors by
  peft key (:meth:`BaseModelInfo.peft_key` builds module keys);
- ``from_state(config, state, base_params, prefix, name) -> (method, peft_params)``.

:data:`PEFT_FORMATS` maps a method's registered name (:data:`vlpeft_jax.peft.registry.METHODS`; an instance's
class, or its nearest registered base class, gives the name) to its format, and :data:`PEFT_TYPE_METHODS` says
which registered method imports which ``peft_type``. A new method adds its export with a module there and
one entry in each. ``prefix`` is the path of the Hugging Face model inside our tree: ``("language_model",)``
for the decoder of a VLM, whose adapters are then written with the LM's own keys
(``base_model.model.model.layers.0...``), loadable onto the LM alone.

Example (a LoRA on a tiny GPT-2 checkpoint directory ``hf_dir``)::

    model, base = load_gpt2(hf_dir)
    lora = LoRA(targets=("c_attn",), rank=4, alpha=8)
    export_peft(lora, lora.init(jax.random.key(0), base), hf_dir, "adapter/")
    method, params = import_peft("adapter/", base)   # LoRA(targets=('transformer/h_0/attn/c_attn', ...))
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlpeft_jax.errors import CheckpointError
from vlpeft_jax.hf import io
from vlpeft_jax.peft import base as pb
from vlpeft_jax.peft import registry

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"

# peft_type -> the registered method (vlpeft_jax.peft.registry) whose format imports it. LORA with
# use_dora=true goes to "dora".
PEFT_TYPE_METHODS: dict[str, str] = {
    "LORA": "lora",
    "IA3": "ia3",
    "PREFIX_TUNING": "prefix",
    "PROMPT_TUNING": "prompt",
    "ADAPTION_PROMPT": "llama_adapter",
}

# peft's task type per base model family (it picks the PeftModel subclass peft wraps the model in).
TASK_TYPES: dict[str, str] = {"gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "qwen2": "CAUSAL_LM", "opt": "CAUSAL_LM",
                              "bert": "FEATURE_EXTRACTION", "llava": "CAUSAL_LM", "blip-2": "CAUSAL_LM",
                              "instructblip": "CAUSAL_LM"}

# registered method name -> "module:FORMAT", its PeftFormat (imported on first use, as the methods are).
PEFT_FORMATS: dict[str, str] = {
    "lora": "vlpeft_jax.hf.peft_formats.lora:LORA_FORMAT",  # LoRA and rsLoRA (use_rslora)
    "dora": "vlpeft_jax.hf.peft_formats.lora:DORA_FORMAT",
    "ia3": "vlpeft_jax.hf.peft_formats.ia3:IA3_FORMAT",
    "prefix": "vlpeft_jax.hf.peft_formats.prompts:PREFIX_FORMAT",
    "prompt": "vlpeft_jax.hf.peft_formats.prompts:PROMPT_FORMAT",
    "llama_adapter": "vlpeft_jax.hf.peft_formats.llama_adapter:LLAMA_ADAPTER_FORMAT",
}


class AdapterError(CheckpointError):
    """A peft adapter directory cannot be exported or imported."""


class UnsupportedAdapterError(AdapterError):
    """The adapter type, a config feature or the method has no peft counterpart here."""


class AdapterShapeError(AdapterError):
    """An adapter tensor's shape does not fit the base model's layer."""


class AdapterTargetError(AdapterError):
    """An adapter tensor names a module that the base model does not have."""


class AdapterStateError(AdapterError):
    """Files, config fields or tensors are missing or malformed."""


# --------------------------------------------------------------------------------------------------
# Names


def hf_module_name(path: Sequence[str]) -> str:
    """Our module path -> the Hugging Face module name (``("model", "layers_0", "mlp")`` -> ``model.layers.0.mlp``).

    Example:
        >>> hf_module_name(("transformer", "h_11", "attn", "c_attn"))
        'transformer.h.11.attn.c_attn'
    """
    parts = []
    for name in path:
        m = re.fullmatch(r"(.+)_(\d+)", name)
        parts.extend([m.group(1), m.group(2)] if m else [name])
    return ".".join(parts)


def module_path(hf_name: str) -> tuple[str, ...]:
    """The Hugging Face module name -> our path (a list index joins its list's name with ``_``).

    Example:
        >>> module_path("encoder.layer.3.attention.self.query")
        ('encoder', 'layer_3', 'attention', 'self', 'query')
    """
    out: list[str] = []
    for part in hf_name.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


# Our architecture config class ("module:QualName") -> (the peft model type, or None to read the config's own
# ``model_type``; "module:function" returning the family's Hugging Face key map). The key map names every
# tensor's Hugging Face module, so adapters are keyed by the Hugging Face model's module names whatever our tree
# looks like: a new family (a VLM's ``*_key_maps``) plugs in with one entry here, one in HF_CONFIG_READERS and
# one in TASK_TYPES.
KEY_MAP_SOURCES: dict[str, tuple[str | None, str]] = {
    "vlpeft_jax.models.gpt2:GPT2Config": ("gpt2", "vlpeft_jax.hf.decoders:gpt2_key_maps"),
    "vlpeft_jax.models.llama:LlamaConfig": (None, "vlpeft_jax.hf.decoders:llama_key_maps"),
    "vlpeft_jax.models.opt:OPTConfig": ("opt", "vlpeft_jax.hf.decoders:opt_key_maps"),
    "vlpeft_jax.models.bert:BertConfig": ("bert", "vlpeft_jax.hf.bert:bert_key_map"),
    "vlpeft_jax.hf.llava:LlavaConfig": ("llava", "vlpeft_jax.hf.llava:llava_key_maps"),
    "vlpeft_jax.hf.blip2:Blip2Config": (None, "vlpeft_jax.hf.blip2:qformer_vlm_key_maps"),
}

# ``model_type`` of a config.json -> "module:callable" reading that dict into our architecture config.
HF_CONFIG_READERS: dict[str, str] = {
    "gpt2": "vlpeft_jax.models.gpt2:GPT2Config.from_hf",
    "llama": "vlpeft_jax.models.llama:LlamaConfig.from_hf",
    "qwen2": "vlpeft_jax.models.llama:LlamaConfig.from_hf",
    "opt": "vlpeft_jax.models.opt:OPTConfig.from_hf",
    "bert": "vlpeft_jax.models.bert:BertConfig.from_hf",
    "llava": "vlpeft_jax.hf.llava:LlavaConfig.from_hf",
    "blip-2": "vlpeft_jax.hf.blip2:Blip2Config.from_hf",
    "instructblip": "vlpeft_jax.hf.blip2:Blip2Config.from_hf",
}


# model types whose module names our tree does not mirror: only their key map (a config) names them
KEY_MAP_NAMED_TYPES = ("llava",)


def _resolve(spec: str) -> Any:
    """``"package.module:Name.attr"`` -> the object (imported on first use)."""
    module, attr = spec.split(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def key_map_module_names(key_maps: Sequence[io.KeyMap]) -> dict[tuple[str, ...], str]:
    """Our module path -> Hugging Face module name, from a family's key map.

    Each tensor gives its module (``language_model/model/layers_0/self_attn/q_proj`` ->
    ``model.language_model.layers.0.self_attn.q_proj``), and so do its enclosing modules as long as the
    trailing names agree (``.../self_attn`` -> ``...self_attn``, ``.../layers_0`` -> ``...layers.0``); a path
    the maps name two ways is left out (callers then fall back to :func:`hf_module_name`).

    Example:
        >>> names = key_map_module_names(io.linear("model.language_model.layers.0.mlp.up_proj",
        ...                                        "language_model/model/layers_0/mlp/up_proj"))
        >>> names[("language_model", "model", "layers_0", "mlp")]
        'model.language_model.layers.0.mlp'
        >>> ("language_model",) in names
        False
    """
    out: dict[tuple[str, ...], str] = {}
    clashes: set[tuple[str, ...]] = set()

    def add(path: tuple[str, ...], name: str) -> None:
        if out.setdefault(path, name) != name:
            clashes.add(path)

    for m in key_maps:
        path = tuple(m.path.split("/")[:-1])
        hf = m.hf_key.split(".")[:-1]
        add(path, ".".join(hf))
        while path:  # enclosing modules, while our trailing name is theirs
            tokens = hf_module_name(path[-1:]).split(".")
            if len(hf) <= len(tokens) or hf[-len(tokens):] != tokens:
                break
            path, hf = path[:-1], hf[:-len(tokens)]
            if path:
                add(path, ".".join(hf))
    for path in clashes:
        del out[path]
    return out


@dataclasses.dataclass(frozen=True)
class BaseModelInfo:
    """What an export needs to know about the Hugging Face model the adapter is for.

    Attributes:
      model_type: ``gpt2``, ``llama``, ``qwen2``, ``opt``, ``bert``, ``llava``.
      task_type: peft's task type (``CAUSAL_LM`` for decoders and LLaVA, ``FEATURE_EXTRACTION`` for BERT).
      base_model_name_or_path: written to the config (where peft finds the base model); may be None.
      config: our architecture config (``GPT2Config``, ``LlamaConfig``, ``OPTConfig``, ``BertConfig``,
        ``LlavaConfig``), for methods that need sizes (prompt and prefix tuning), or None.
      linear_modules: every linear layer of the model (our paths); lets ``target_modules`` use short names
        (``c_attn``) where they select exactly the adapted layers. Empty: full module names are written.
      conv1d_modules: the layers stored ``[in, out]`` in PyTorch (GPT-2's ``Conv1D``).
      module_names: ``(our path, Hugging Face module name)`` pairs from the family's key map
        (:func:`key_map_module_names`); paths not listed (or all, if empty) are renamed by
        :func:`hf_module_name`, which suffices where our tree mirrors the Hugging Face one.
    """

    model_type: str
    task_type: str | None = "CAUSAL_LM"
    base_model_name_or_path: str | None = None
    config: Any = None
    linear_modules: tuple[tuple[str, ...], ...] = ()
    conv1d_modules: frozenset[tuple[str, ...]] = frozenset()
    module_names: tuple[tuple[tuple[str, ...], str], ...] = ()

    @classmethod
    def from_key_maps(cls, model_type: str, key_maps: Sequence[io.KeyMap], *, config: Any = None,
                      name_or_path: str | None = None, task_type: str | None = None) -> BaseModelInfo:
        """From a family's Hugging Face key map: its linear layers (kernels stored transposed, or as they are
        for ``Conv1D``; a kernel with any other transform, e.g. a patch convolution, is not a ``Linear``) and
        the Hugging Face name of every module. ``task_type`` defaults to :data:`TASK_TYPES`'s."""
        kernels = [m for m in key_maps if m.path.endswith("/kernel") and m.transform in (io.identity, io.transpose)]
        linear = tuple(tuple(m.path.split("/")[:-1]) for m in kernels)
        conv1d = frozenset(tuple(m.path.split("/")[:-1]) for m in kernels if m.transform is io.identity)
        names = tuple(key_map_module_names(key_maps).items())
        return cls(model_type=model_type, task_type=task_type or TASK_TYPES.get(model_type),
                   base_model_name_or_path=name_or_path, config=config, linear_modules=linear, conv1d_modules=conv1d,
                   module_names=names)

    @classmethod
    def from_config(cls, config: Any, *, name_or_path: str | None = None) -> BaseModelInfo:
        """From our architecture config, through the family's Hugging Face key map (:data:`KEY_MAP_SOURCES`)."""
        for klass in type(config).__mro__:
            source = KEY_MAP_SOURCES.get(f"{klass.__module__}:{klass.__qualname__}")
            if source is not None:
                model_type, maps_fn = source
                model_type = model_type or config.model_type
                return cls.from_key_maps(model_type, _resolve(maps_fn)(config), config=config,
                                         name_or_path=name_or_path)
        known = ", ".join(spec.split(":")[1] for spec in KEY_MAP_SOURCES)
        raise UnsupportedAdapterError(f"peft export knows the models of these configs: {known}; got a "
                                      f"{type(config).__name__}")

    @classmethod
    def from_hf_dir(cls, model_dir: str | os.PathLike) -> BaseModelInfo:
        """From a local Hugging Face checkpoint directory (its ``config.json``); the path is recorded."""
        hf = io.load_config(model_dir)
        model_type = hf.get("model_type")
        if model_type not in HF_CONFIG_READERS:
            raise UnsupportedAdapterError(f"{model_dir}: model_type {model_type!r} is not supported for peft export; "
                                          f"supported: {', '.join(HF_CONFIG_READERS)}")
        return cls.from_config(_resolve(HF_CONFIG_READERS[model_type])(hf), name_or_path=str(model_dir))

    @classmethod
    def from_model_type(cls, model_type: str, *, name_or_path: str | None = None) -> BaseModelInfo:
        """Only the family is known: full module names are written; GPT-2's projections are ``Conv1D``."""
        if model_type not in TASK_TYPES:
            raise UnsupportedAdapterError(f"model type {model_type!r} is not supported for peft export; "
                                          f"supported: {', '.join(TASK_TYPES)}")
        if model_type in KEY_MAP_NAMED_TYPES:
            raise UnsupportedAdapterError(f"model type {model_type!r}: its Hugging Face module names come from its key "
                                          "map; pass the checkpoint directory or our architecture config instead")
        return cls(model_type=model_type, task_type=TASK_TYPES[model_type], base_model_name_or_path=name_or_path)

    @functools.cached_property
    def _names(self) -> dict[tuple[str, ...], str]:
        return dict(self.module_names)

    @functools.cached_property
    def _paths(self) -> dict[str, tuple[str, ...]]:
        return {name: path for path, name in self.module_names}

    def module_name(self, path: Sequence[str]) -> str:
        """The Hugging Face module name of our module ``path`` (relative to the Hugging Face model).

        From :attr:`module_names` (the longest listed ancestor, the rest renamed by :func:`hf_module_name`),
        else :func:`hf_module_name`.
        """
        path = tuple(path)
        for k in range(len(path), 0, -1):
            name = self._names.get(path[:k])
            if name is not None:
                return ".".join(filter(None, (name, hf_module_name(path[k:]) if path[k:] else "")))
        return hf_module_name(path)

    def module_path(self, name: str) -> tuple[str, ...]:
        """Our module path of a Hugging Face module name, the inverse of :meth:`module_name`.

        Names the key map does not know (e.g. transformers 4's ``language_model.model.layers.0...`` of a
        LLaVA, which is our own layout) are renamed by :func:`module_path`.
        """
        parts = name.split(".")
        for k in range(len(parts), 0, -1):
            path = self._paths.get(".".join(parts[:k]))
            if path is not None:
                return path + (module_path(".".join(parts[k:])) if parts[k:] else ())
        return module_path(name)

    def is_conv1d(self, path: Sequence[str]) -> bool:
        if self.linear_modules:
            return tuple(path) in self.conv1d_modules
        return self.model_type == "gpt2" and tuple(path)[-1] != "lm_head"  # GPT-2: every projection but the head

    def fan_in_fan_out(self, paths: Sequence[Sequence[str]]) -> bool:
        """peft's ``fan_in_fan_out``: true when the adapted layers are ``Conv1D``."""
        return any(self.is_conv1d(p) for p in paths)

    def peft_key(self, path: Sequence[str], suffix: str) -> str:
        """``base_model.model.<HF module name>.<suffix>`` for a module path relative to the HF model."""
        return f"{PEFT_PREFIX}{self.module_name(path)}.{suffix}"

    def target_modules(self, paths: Sequence[Sequence[str]], within: Sequence[Sequence[str]] | None = None
                       ) -> list[str]:
        """peft ``target_modules`` selecting exactly ``paths``: the shortest name suffixes that do so.

        peft matches a module name ``n`` against a target ``t`` by ``n == t or n.endswith("." + t)``; a suffix
        is used only if every linear layer of the model that it matches is among ``within`` (default: ``paths``).
        Without ``linear_modules``, full names are written.
        """
        names = {self.module_name(p) for p in paths}
        allowed = names if within is None else {self.module_name(p) for p in within}
        if not self.linear_modules:
            return sorted(names)
        candidates = names | {self.module_name(p) for p in self.linear_modules}
        chosen = set()
        for name in names:
            parts = name.split(".")
            for k in range(1, len(parts) + 1):
                suffix = ".".join(parts[-k:])
                if all(c in allowed for c in candidates if c == suffix or c.endswith("." + suffix)):
                    chosen.add(suffix)
                    break
        return sorted(chosen)


def base_model_info(base: BaseModelInfo | str | os.PathLike | Any) -> BaseModelInfo:
    """A :class:`BaseModelInfo` from itself, a Hugging Face checkpoint directory, a model type or our config."""
    if isinstance(base, BaseModelInfo):
        return base
    if isinstance(base, (str, os.PathLike)):
        if Path(base).is_dir():
            return BaseModelInfo.from_hf_dir(base)
        return BaseModelInfo.from_model_type(str(base))
    return BaseModelInfo.from_config(base)


# --------------------------------------------------------------------------------------------------
# Helpers for the formats (vlpeft_jax.hf.peft_formats)


def adapted_modules(peft_params: Mapping[str, Any], marker: str, prefix: Sequence[str], method: str
                    ) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """``(path, path relative to the HF model)`` of every module holding ``marker`` in ``peft_params``.

    Raises :class:`UnsupportedAdapterError` for a module outside ``prefix`` (a peft adapter covers one model).
    """
    prefix = tuple(prefix)
    out = []
    for path in pb.module_paths(peft_params, marker):
        if path[:len(prefix)] != prefix:
            raise UnsupportedAdapterError(
                f"{method} adapts {'/'.join(path)}, outside the exported model {'/'.join(prefix)!r}; a peft adapter "
                "covers one Hugging Face model, so restrict the method's targets to it")
        out.append((path, path[len(prefix):]))
    return out


def group_module_state(state: Mapping[str, np.ndarray], suffixes: Sequence[str], method: str
                       ) -> dict[str, dict[str, tuple[str, np.ndarray]]]:
    """peft tensors by HF module name: ``{module: {suffix: (key, array)}}``; unknown keys raise."""
    out: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    for key, value in state.items():
        if not key.startswith(PEFT_PREFIX):
            raise AdapterStateError(f"{method}: tensor {key!r} does not start with {PEFT_PREFIX!r}, as peft's "
                                    "saved module tensors do")
        rest = key[len(PEFT_PREFIX):]
        suffix = next((s for s in suffixes if rest.endswith("." + s)), None)
        if suffix is None:
            raise UnsupportedAdapterError(f"{method}: tensor {key!r} is not supported here; expected names "
                                          f"ending in {', '.join(suffixes)}")
        out.setdefault(rest[:-len(suffix) - 1], {})[suffix] = (key, np.asarray(value))
    return out


def find_kernel(base_params: Mapping[str, Any], path: Sequence[str], key: str) -> Any:
    """The kernel of the linear layer at ``path`` (an array or shape struct); :class:`AdapterTargetError` if absent."""
    node = pb.lookup(base_params, path)
    if not isinstance(node, Mapping) or "kernel" not in node or isinstance(node["kernel"], Mapping):
        linear = ["/".join(p) for p in pb.module_paths(base_params, "kernel")]
        shown = ", ".join(linear[:10]) + (" ..." if len(linear) > 10 else "")
        raise AdapterTargetError(f"tensor {key!r} adapts {'/'.join(path)}, which is not a linear layer of the base "
                                 f"model; its linear layers: {shown}")
    return node["kernel"]


def check_shape(key: str, value: np.ndarray, want: Sequence[int]) -> None:
    if tuple(np.shape(value)) != tuple(want):
        raise AdapterShapeError(f"tensor {key!r} has shape {tuple(np.shape(value))}; the base model's layer needs "
                                f"{tuple(want)}")


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's ``rank_pattern``/``alpha_pattern`` lookup (``get_pattern_key``): first key matching a name suffix."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


# --------------------------------------------------------------------------------------------------
# Formats by method name


@dataclasses.dataclass(frozen=True)
class PeftFormat:
    """How one method converts to and from peft's format (see the module docstring).

    Attributes:
      peft_type: peft's ``PeftType`` value written to ``adapter_config.json``.
      to_state: ``(method, peft_params, info, prefix) -> (config_fields, tensors)``.
      from_state: ``(config, tensors, base_params, prefix, name, info) -> (method, peft_params)``; ``info`` (a
        :class:`BaseModelInfo` or None) maps Hugging Face module names to our paths (:meth:`BaseModelInfo.module_path`).
    """

    peft_type: str
    to_state: Callable[[Any, Mapping[str, Any], BaseModelInfo, tuple[str, ...]],
                       tuple[dict[str, Any], dict[str, np.ndarray]]]
    from_state: Callable[..., tuple[Any, dict[str, Any]]]


def method_kind(method: Any) -> str | None:
    """The registered name of a method instance: its class's, or its nearest registered base class's.

    Example:
        >>> from vlpeft_jax.peft.dora import DoRA
        >>> method_kind(DoRA()), method_kind(object())
        ('dora', None)
    """
    by_class = {spec: kind for kind, spec in registry.METHODS.items()}
    for cls in type(method).__mro__:
        kind = by_class.get(f"{cls.__module__}:{cls.__qualname__}")
        if kind is not None:
            return kind
    return None


def peft_format(kind: str | None) -> PeftFormat | None:
    """The :class:`PeftFormat` of a registered method name, or None if the method has no peft counterpart."""
    if kind not in PEFT_FORMATS:
        return None
    module, attr = PEFT_FORMATS[kind].split(":")
    return getattr(importlib.import_module(module), attr)


# --------------------------------------------------------------------------------------------------
# Export and import


def peft_state(method: Any, peft_params: Mapping[str, Any], base: BaseModelInfo | str | os.PathLike | Any,
               *, prefix: Sequence[str] = ()) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(adapter_config, tensors)`` of a method, as :func:`export_peft` writes them."""
    info = base_model_info(base)
    method_name = getattr(method, "name", type(method).__name__)
    fmt = peft_format(method_kind(method))
    if fmt is None:
        raise UnsupportedAdapterError(f"{method_name}: {type(method).__name__} has no peft export; exportable "
                                      f"methods: {', '.join(PEFT_FORMATS)} (lora includes rsLoRA)")
    fields, state = fmt.to_state(method, peft_params, info, tuple(prefix))
    if not state:
        raise AdapterStateError(f"{method_name}: nothing to export under {'/'.join(prefix) or 'the model root'}")
    config = {"peft_type": fmt.peft_type, "task_type": info.task_type,
              "base_model_name_or_path": info.base_model_name_or_path, "revision": None, "inference_mode": True,
              "auto_mapping": None, **fields}
    return config, state


def write_peft_dir(config: Mapping[str, Any], state: Mapping[str, np.ndarray], out_dir: str | os.PathLike) -> Path:
    """Writes ``adapter_config.json`` and ``adapter_model.safetensors`` (float32) into ``out_dir``.

    Each file is written atomically (a temporary file in ``out_dir``, then renamed over the target): a killed
    export leaves every file whole, old or new, never half-written.
    """
    from safetensors.numpy import save

    from vlpeft_jax import files

    out = Path(out_dir)
    files.write_bytes(out / WEIGHTS_FILE, save({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()},
                                               metadata={"format": "pt"}))
    files.write_text(out / CONFIG_FILE, json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    return out


def export_peft(method: Any, peft_params: Mapping[str, Any], base_model_type_or_info: Any, out_dir: str | os.PathLike,
                *, prefix: Sequence[str] = ()) -> Path:
    """Writes ``adapter_config.json`` and ``adapter_model.safetensors`` as ``PeftModel.save_pretrained`` does.

    Args:
      method: an instance of a method with a peft format (:data:`PEFT_FORMATS`: LoRA, rsLoRA, DoRA, IA3,
        prefix tuning, prompt tuning, LLaMA-Adapter).
      peft_params: its parameters (paths mirroring the base model's).
      base_model_type_or_info: a :class:`BaseModelInfo`, a local Hugging Face checkpoint directory (recorded
        as ``base_model_name_or_path``), one of our architecture configs, or a model type (``gpt2``...).
      out_dir: created if needed.
      prefix: path of the Hugging Face model inside our tree (e.g. ``("language_model",)`` in a VLM).

    Returns:
      ``out_dir``. Then in PyTorch: ``PeftModel.from_pretrained(hf_model, out_dir)``.
    """
    config, state = peft_state(method, peft_params, base_model_type_or_info, prefix=prefix)
    return write_peft_dir(config, state, out_dir)


def read_peft_dir(adapter_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(adapter_config, tensors)`` of a peft adapter directory (safetensors, or ``adapter_model.bin``)."""
    d = Path(adapter_dir)
    if not (d / CONFIG_FILE).is_file():
        raise AdapterStateError(f"{d} is not a peft adapter directory (no {CONFIG_FILE})")
    try:
        config = json.loads((d / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise AdapterStateError(f"{d / CONFIG_FILE} is not valid JSON: {e}") from None
    if (d / WEIGHTS_FILE).is_file():
        state = io._read_safetensors(d / WEIGHTS_FILE)
    elif (d / BIN_FILE).is_file():
        state = io._read_torch_bin(d / BIN_FILE)
    else:
        raise AdapterStateError(f"{d} has no adapter weights ({WEIGHTS_FILE} or {BIN_FILE})")
    return config, state


def method_for(config: Mapping[str, Any]) -> str:
    """The registered method name that imports a peft config (``LORA`` + ``use_dora`` -> ``dora``)."""
    peft_type = config.get("peft_type")
    if peft_type not in PEFT_TYPE_METHODS:
        raise UnsupportedAdapterError(f"peft_type {peft_type!r} is not supported; supported: "
                                      f"{', '.join(PEFT_TYPE_METHODS)}")
    if peft_type == "LORA" and config.get("use_dora"):
        return "dora"
    return PEFT_TYPE_METHODS[peft_type]


def import_peft_state(config: Mapping[str, Any], state: Mapping[str, np.ndarray], base_params: Mapping[str, Any],
                      *, prefix: Sequence[str] = (), name: str | None = None, base: Any = None
                      ) -> tuple[Any, dict[str, Any]]:
    """``(method, peft_params)`` from a peft config and its tensors (see :func:`import_peft`)."""
    kind = method_for(config)
    name = name or kind
    fmt = peft_format(kind)
    if fmt is None:
        raise UnsupportedAdapterError(f"peft_type {config.get('peft_type')!r} maps to method {kind!r}, which has no "
                                      "peft import (no entry in PEFT_FORMATS) in this version")
    info = None if base is None else base_model_info(base)
    return fmt.from_state(config, state, base_params, tuple(prefix), name=name, info=info)


def import_peft(adapter_dir: str | os.PathLike, base_params: Mapping[str, Any], *, prefix: Sequence[str] = (),
                name: str | None = None, base: Any = None) -> tuple[Any, dict[str, Any]]:
    """Reads a peft adapter directory into ``(method, peft_params)`` for ``base_params``.

    Args:
      adapter_dir: holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``).
      base_params: our parameters of the model (arrays or ``jax.ShapeDtypeStruct``: only shapes are read).
      prefix: where the Hugging Face model sits in ``base_params`` (e.g. ``("language_model",)``).
      name: the method instance name (default: the method kind, e.g. ``lora``).
      base: what :func:`export_peft` takes as the base model (a :class:`BaseModelInfo`, a Hugging Face
        checkpoint directory, our config or a model type): its key map turns the adapter's module names into
        our paths. Needed where our tree does not mirror the Hugging Face model's names (a LLaVA:
        ``model.language_model.layers.0...`` is our ``language_model/model/layers_0...``); without it the
        names are renamed as they are (``h.0`` -> ``h_0``).

    The method targets exactly the adapted modules (full paths), so ``method.init`` on ``base_params`` gives
    parameters of the same structure. Use them with :func:`vlpeft_jax.peft.base.apply_with`.

    Raises:
      UnsupportedAdapterError: unknown ``peft_type`` or an unsupported config feature.
      AdapterTargetError: a tensor adapts a module the base model does not have.
      AdapterShapeError: a tensor does not fit its layer.
    """
    config, state = read_peft_dir(adapter_dir)
    return import_peft_state(config, state, base_params, prefix=prefix, name=name, base=base)
