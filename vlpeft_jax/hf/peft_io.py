"""Hugging Face ``peft`` adapters out and in: ``adapter_config.json`` + ``adapter_model.safetensors``.

:func:`export_peft` writes a method's parameters as ``PeftModel.save_pretrained`` would, so that
``PeftModel.from_pretrained(hf_model, out_dir)`` in PyTorch gives the same outputs; :func:`import_peft`
reads such a directory (written by peft or by us) into a method and its parameters.

Key names. Our parameter paths mirror the Hugging Face module names with a list index ``h.0`` written
``h_0`` (the naming convention of the backbones), so a peft key is a rename::

    params["transformer"]["h_0"]["attn"]["c_attn"]["lora_a"]   [in, r]
      <-> base_model.model.transformer.h.0.attn.c_attn.lora_A.weight   (r, in)

LoRA's ``lora_B.weight`` is ``(out, r)`` (our ``lora_b`` transposed), DoRA's magnitude is
``lora_magnitude_vector`` ``(out,)`` (no ``.weight``: peft 0.21's saved name), IA3's vector is ``ia3_l``,
``(out, 1)`` or ``(1, in)`` for feed-forward modules. GPT-2's ``Conv1D`` layers get ``fan_in_fan_out=true``
(it changes only how peft reads the *base* weight; adapter tensors have the same layout for every layer type).

Methods plug in (so that new methods add their export without editing this file): a method class has a
``peft_type`` class attribute (peft's ``PeftType`` value, e.g. ``"IA3"``) and implements

- ``to_peft_state(peft_params, info, prefix) -> (config_fields, state)``: its ``adapter_config.json``
  fields (this module adds ``peft_type``, ``task_type``, ``base_model_name_or_path``...) and its tensors by
  peft key (:meth:`BaseModelInfo.peft_key` builds module keys);
- classmethod ``from_peft_state(config, state, base_params, prefix, name) -> (method, peft_params)``.

:data:`PEFT_TYPE_METHODS` says which registered method imports which ``peft_type``; LoRA's (and rsLoRA's)
plug-in is :func:`lora_to_peft_state` / :func:`lora_from_peft_state` here; DoRA (``peft_type`` LORA with
``use_dora``) and IA3 implement theirs in their own files. ``prefix`` is the path of the Hugging Face model
inside our tree: ``("language_model",)`` for the decoder of a VLM, whose adapters are then written with the
LM's own keys (``base_model.model.model.layers.0...``), loadable onto the LM alone.

Example (a LoRA on a tiny GPT-2 checkpoint directory ``hf_dir``)::

    model, base = load_gpt2(hf_dir)
    lora = LoRA(targets=("c_attn",), rank=4, alpha=8)
    export_peft(lora, lora.init(jax.random.key(0), base), hf_dir, "adapter/")
    method, params = import_peft("adapter/", base)   # LoRA(targets=('transformer/h_0/attn/c_attn', ...))
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlpeft_jax.errors import CheckpointError
from vlpeft_jax.hf import io
from vlpeft_jax.peft import base as pb
from vlpeft_jax.peft.lora import LoRA

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"

# peft_type -> the registered method (vlpeft_jax.peft.registry) whose class imports it. LORA with
# use_dora=true goes to "dora".
PEFT_TYPE_METHODS: dict[str, str] = {
    "LORA": "lora",
    "IA3": "ia3",
    "PREFIX_TUNING": "prefix",
    "PROMPT_TUNING": "prompt",
    "ADAPTION_PROMPT": "llama_adapter",
}

# peft's task type per base model family (it picks the PeftModel subclass peft wraps the model in).
TASK_TYPES: dict[str, str] = {"gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "qwen2": "CAUSAL_LM",
                              "bert": "FEATURE_EXTRACTION"}

# LoRA config fields whose non-empty values change what the adapter holds or does beyond A, B (and the
# DoRA magnitude): importing them would silently drop part of the adapter.
UNSUPPORTED_LORA_FIELDS = ("modules_to_save", "lora_bias", "layer_replication", "trainable_token_indices",
                           "target_parameters", "use_qalora", "alora_invocation_tokens", "megatron_config",
                           "use_bdlora", "arrow_config")
# init_lora_weights values that also rewrite the base weights (the adapter needs that modified base).
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


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


@dataclasses.dataclass(frozen=True)
class BaseModelInfo:
    """What an export needs to know about the Hugging Face model the adapter is for.

    Attributes:
      model_type: ``gpt2``, ``llama``, ``qwen2``, ``bert``.
      task_type: peft's task type (``CAUSAL_LM`` for decoders, ``FEATURE_EXTRACTION`` for BERT).
      base_model_name_or_path: written to the config (where peft finds the base model); may be None.
      config: our architecture config (``GPT2Config``, ``LlamaConfig``, ``BertConfig``), for methods that
        need sizes (prompt and prefix tuning), or None.
      linear_modules: every linear layer of the model (our paths); lets ``target_modules`` use short names
        (``c_attn``) where they select exactly the adapted layers. Empty: full module names are written.
      conv1d_modules: the layers stored ``[in, out]`` in PyTorch (GPT-2's ``Conv1D``).
    """

    model_type: str
    task_type: str | None = "CAUSAL_LM"
    base_model_name_or_path: str | None = None
    config: Any = None
    linear_modules: tuple[tuple[str, ...], ...] = ()
    conv1d_modules: frozenset[tuple[str, ...]] = frozenset()

    @classmethod
    def from_config(cls, config: Any, *, name_or_path: str | None = None) -> BaseModelInfo:
        """From our architecture config, through the family's Hugging Face key map."""
        from vlpeft_jax.hf import bert as hf_bert
        from vlpeft_jax.hf import decoders
        from vlpeft_jax.models.bert import BertConfig
        from vlpeft_jax.models.gpt2 import GPT2Config
        from vlpeft_jax.models.llama import LlamaConfig

        if isinstance(config, GPT2Config):
            model_type, maps = "gpt2", decoders.gpt2_key_maps(config)
        elif isinstance(config, LlamaConfig):
            model_type, maps = config.model_type, decoders.llama_key_maps(config)
        elif isinstance(config, BertConfig):
            model_type, maps = "bert", hf_bert.bert_key_map(config)
        else:
            raise UnsupportedAdapterError(f"peft export knows GPT-2, LLaMA/Qwen2 and BERT models; got a "
                                          f"{type(config).__name__}")
        kernels = [m for m in maps if m.path.endswith("/kernel")]
        linear = tuple(tuple(m.path.split("/")[:-1]) for m in kernels)
        conv1d = frozenset(tuple(m.path.split("/")[:-1]) for m in kernels if m.transform is io.identity)
        return cls(model_type=model_type, task_type=TASK_TYPES[model_type], base_model_name_or_path=name_or_path,
                   config=config, linear_modules=linear, conv1d_modules=conv1d)

    @classmethod
    def from_hf_dir(cls, model_dir: str | os.PathLike) -> BaseModelInfo:
        """From a local Hugging Face checkpoint directory (its ``config.json``); the path is recorded."""
        from vlpeft_jax.models.bert import BertConfig
        from vlpeft_jax.models.gpt2 import GPT2Config
        from vlpeft_jax.models.llama import LlamaConfig

        hf = io.load_config(model_dir)
        model_type = hf.get("model_type")
        builders: dict[str, Callable[[Mapping[str, Any]], Any]] = {
            "gpt2": GPT2Config.from_hf, "llama": LlamaConfig.from_hf, "qwen2": LlamaConfig.from_hf,
            "bert": BertConfig.from_hf}
        if model_type not in builders:
            raise UnsupportedAdapterError(f"{model_dir}: model_type {model_type!r} is not supported for peft export; "
                                          f"supported: {', '.join(builders)}")
        return cls.from_config(builders[model_type](hf), name_or_path=str(model_dir))

    @classmethod
    def from_model_type(cls, model_type: str, *, name_or_path: str | None = None) -> BaseModelInfo:
        """Only the family is known: full module names are written; GPT-2's projections are ``Conv1D``."""
        if model_type not in TASK_TYPES:
            raise UnsupportedAdapterError(f"model type {model_type!r} is not supported for peft export; "
                                          f"supported: {', '.join(TASK_TYPES)}")
        return cls(model_type=model_type, task_type=TASK_TYPES[model_type], base_model_name_or_path=name_or_path)

    def is_conv1d(self, path: Sequence[str]) -> bool:
        if self.linear_modules:
            return tuple(path) in self.conv1d_modules
        return self.model_type == "gpt2" and tuple(path)[-1] != "lm_head"  # GPT-2: every projection but the head

    def fan_in_fan_out(self, paths: Sequence[Sequence[str]]) -> bool:
        """peft's ``fan_in_fan_out``: true when the adapted layers are ``Conv1D``."""
        return any(self.is_conv1d(p) for p in paths)

    def peft_key(self, path: Sequence[str], suffix: str) -> str:
        """``base_model.model.<HF module name>.<suffix>`` for a module path relative to the HF model."""
        return f"{PEFT_PREFIX}{hf_module_name(path)}.{suffix}"

    def target_modules(self, paths: Sequence[Sequence[str]], within: Sequence[Sequence[str]] | None = None
                       ) -> list[str]:
        """peft ``target_modules`` selecting exactly ``paths``: the shortest name suffixes that do so.

        peft matches a module name ``n`` against a target ``t`` by ``n == t or n.endswith("." + t)``; a suffix
        is used only if every linear layer of the model that it matches is among ``within`` (default: ``paths``).
        Without ``linear_modules``, full names are written.
        """
        names = {hf_module_name(p) for p in paths}
        allowed = names if within is None else {hf_module_name(p) for p in within}
        if not self.linear_modules:
            return sorted(names)
        candidates = names | {hf_module_name(p) for p in self.linear_modules}
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
# Helpers for method plug-ins


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


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


# --------------------------------------------------------------------------------------------------
# LoRA / rsLoRA plug-in


def lora_to_peft_state(lora: LoRA, peft_params: Mapping[str, Any], info: BaseModelInfo,
                       prefix: Sequence[str] = ()) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A LoRA's (or rsLoRA's) peft config fields and ``lora_A.weight`` ``(r, in)`` / ``lora_B.weight`` ``(out, r)``."""
    state: dict[str, np.ndarray] = {}
    ranks: dict[tuple[str, ...], int] = {}
    for path, rel in adapted_modules(peft_params, "lora_a", prefix, lora.name):
        p = pb.get_path(peft_params, path)
        a = np.asarray(jax.device_get(p["lora_a"]), np.float32)
        b = np.asarray(jax.device_get(p["lora_b"]), np.float32)
        if a.ndim != 2 or b.ndim != 2:
            raise AdapterShapeError(f"{lora.name}: {'/'.join(path)} has lora_a {a.shape} and lora_b {b.shape}; "
                                    "peft stores 2-D factors only")
        state[info.peft_key(rel, "lora_A.weight")] = np.ascontiguousarray(a.T)
        state[info.peft_key(rel, "lora_B.weight")] = np.ascontiguousarray(b.T)
        ranks[rel] = a.shape[1]
    paths = list(ranks)
    config = {
        "r": int(lora.rank), "lora_alpha": _number(lora.alpha), "lora_dropout": float(lora.dropout),
        "use_rslora": bool(lora.use_rslora), "use_dora": False,
        "target_modules": info.target_modules(paths), "fan_in_fan_out": info.fan_in_fan_out(paths),
        "bias": "none", "init_lora_weights": True if lora.init_weights == "kaiming" else "gaussian",
        # Per-module ranks as exact module names (peft matches ``(.*\.)?(key)$``).
        "rank_pattern": {re.escape(hf_module_name(p)): r for p, r in ranks.items() if r != lora.rank},
        "alpha_pattern": {}, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "lora_bias": False, "exclude_modules": None,
    }
    return config, state


def _check_lora_config(config: Mapping[str, Any], name: str) -> None:
    if config.get("bias", "none") != "none":
        raise UnsupportedAdapterError(f"{name}: bias={config['bias']!r} (trained biases) is not supported; only "
                                      "bias='none' adapters import")
    for field in UNSUPPORTED_LORA_FIELDS:
        if config.get(field):
            raise UnsupportedAdapterError(f"{name}: {field}={config[field]!r} is not supported")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise UnsupportedAdapterError(
            f"{name}: init_lora_weights={init!r} also rewrites the base weights; convert the adapter to a plain LoRA "
            "with peft first (save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    if float(config.get("lora_alpha", 8)) == 0 and config.get("alpha_pattern"):
        raise UnsupportedAdapterError(f"{name}: lora_alpha=0 with an alpha_pattern cannot be represented")


def lora_from_peft_state(config: Mapping[str, Any], state: Mapping[str, np.ndarray], base_params: Mapping[str, Any],
                         prefix: Sequence[str] = (), *, extra_suffixes: Sequence[str] = (), name: str = "lora"
                         ) -> tuple[LoRA, dict[str, Any], dict[tuple[str, ...], dict[str, tuple[str, np.ndarray]]]]:
    """A peft LoRA/rsLoRA adapter -> ``(LoRA, peft_params, extras)``.

    ``extras`` maps each module path to its tensors named by ``extra_suffixes`` (DoRA's magnitude), so that
    variants build on this. Ranks come from the tensors (``rank_pattern`` is implied); a module's
    ``alpha_pattern`` value is folded into its ``lora_b`` (``B · α_i/α``), which gives identical outputs.
    """
    _check_lora_config(config, name)
    prefix = tuple(prefix)
    alpha = float(config.get("lora_alpha", 8))
    rank = int(config.get("r", 8))
    params: dict[str, Any] = {}
    ranks: dict[tuple[str, ...], int] = {}
    extras: dict[tuple[str, ...], dict[str, tuple[str, np.ndarray]]] = {}
    groups = group_module_state(state, ("lora_A.weight", "lora_B.weight", *extra_suffixes), name)
    if not groups:
        raise AdapterStateError(f"{name}: the adapter holds no LoRA tensors")
    for module, found in groups.items():
        path = prefix + module_path(module)
        for part in ("lora_A.weight", "lora_B.weight"):
            if part not in found:
                raise AdapterStateError(f"{name}: {PEFT_PREFIX}{module}.{part} is missing (module {module})")
        (key_a, a), (key_b, b) = found["lora_A.weight"], found["lora_B.weight"]
        kernel = find_kernel(base_params, path, key_a)
        d_in, d_out = kernel.shape[-2], kernel.shape[-1]
        if a.ndim != 2:
            raise AdapterShapeError(f"tensor {key_a!r} has shape {a.shape}; the base model's layer needs (r, {d_in})")
        r = a.shape[0]
        check_shape(key_a, a, (r, d_in))
        check_shape(key_b, b, (d_out, r))
        alpha_i = float(pattern_value(config.get("alpha_pattern") or {}, module, alpha))
        b = b.T * np.float32(alpha_i / alpha) if alpha_i != alpha else b.T
        pb.set_path(params, path, {"lora_a": jnp.asarray(a.T, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32)})
        ranks[path] = r
        extras[path] = {s: found[s] for s in extra_suffixes if s in found}
    init = config.get("init_lora_weights", True)
    lora = LoRA(targets=tuple("/".join(p) for p in ranks), rank=rank, alpha=alpha,
                dropout=float(config.get("lora_dropout", 0.0)), use_rslora=bool(config.get("use_rslora", False)),
                rank_pattern=tuple(("/".join(p), r) for p, r in ranks.items() if r != rank),
                init_weights="gaussian" if init == "gaussian" else "kaiming", name=name)
    return lora, params, extras


# --------------------------------------------------------------------------------------------------
# Export and import


def peft_state(method: Any, peft_params: Mapping[str, Any], base: BaseModelInfo | str | os.PathLike | Any,
               *, prefix: Sequence[str] = ()) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(adapter_config, tensors)`` of a method, as :func:`export_peft` writes them."""
    info = base_model_info(base)
    method_name = getattr(method, "name", type(method).__name__)
    to_state = getattr(method, "to_peft_state", None)
    if to_state is None and isinstance(method, LoRA):
        def to_state(p: Any, i: BaseModelInfo, pre: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
            return lora_to_peft_state(method, p, i, pre)
    if to_state is None:
        raise UnsupportedAdapterError(f"{method_name}: {type(method).__name__} has no peft export; exportable: "
                                      "LoRA, rsLoRA, DoRA, IA3 and methods that define to_peft_state")
    fields, state = to_state(peft_params, info, tuple(prefix))
    if not state:
        raise AdapterStateError(f"{method_name}: nothing to export under {'/'.join(prefix) or 'the model root'}")
    config = {"peft_type": getattr(method, "peft_type", "LORA"), "task_type": info.task_type,
              "base_model_name_or_path": info.base_model_name_or_path, "revision": None, "inference_mode": True,
              "auto_mapping": None, **fields}
    return config, state


def write_peft_dir(config: Mapping[str, Any], state: Mapping[str, np.ndarray], out_dir: str | os.PathLike) -> Path:
    """Writes ``adapter_config.json`` and ``adapter_model.safetensors`` (float32) into ``out_dir``."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}, str(out / WEIGHTS_FILE),
              metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    return out


def export_peft(method: Any, peft_params: Mapping[str, Any], base_model_type_or_info: Any, out_dir: str | os.PathLike,
                *, prefix: Sequence[str] = ()) -> Path:
    """Writes ``adapter_config.json`` and ``adapter_model.safetensors`` as ``PeftModel.save_pretrained`` does.

    Args:
      method: a LoRA, DoRA or IA3 instance (or any method with ``to_peft_state``).
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
                      *, prefix: Sequence[str] = (), name: str | None = None) -> tuple[Any, dict[str, Any]]:
    """``(method, peft_params)`` from a peft config and its tensors (see :func:`import_peft`)."""
    from vlpeft_jax.peft import registry

    kind = method_for(config)
    name = name or kind
    cls = registry.method_class(kind)
    if cls is LoRA:
        lora, params, _ = lora_from_peft_state(config, state, base_params, prefix, name=name)
        return lora, params
    from_state = getattr(cls, "from_peft_state", None)
    if from_state is None:
        raise UnsupportedAdapterError(f"peft_type {config.get('peft_type')!r} maps to method {kind!r}, which has no "
                                      "peft import (from_peft_state) in this version")
    return from_state(config, state, base_params, tuple(prefix), name=name)


def import_peft(adapter_dir: str | os.PathLike, base_params: Mapping[str, Any], *, prefix: Sequence[str] = (),
                name: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Reads a peft adapter directory into ``(method, peft_params)`` for ``base_params``.

    Args:
      adapter_dir: holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``).
      base_params: our parameters of the model (arrays or ``jax.ShapeDtypeStruct``: only shapes are read).
      prefix: where the Hugging Face model sits in ``base_params`` (e.g. ``("language_model",)``).
      name: the method instance name (default: the method kind, e.g. ``lora``).

    The method targets exactly the adapted modules (full paths), so ``method.init`` on ``base_params`` gives
    parameters of the same structure. Use them with :func:`vlpeft_jax.peft.base.apply_with`.

    Raises:
      UnsupportedAdapterError: unknown ``peft_type`` or an unsupported config feature.
      AdapterTargetError: a tensor adapts a module the base model does not have.
      AdapterShapeError: a tensor does not fit its layer.
    """
    config, state = read_peft_dir(adapter_dir)
    return import_peft_state(config, state, base_params, prefix=prefix, name=name)
