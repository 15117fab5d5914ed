"""peft ``LORA`` adapters: LoRA and rsLoRA (:class:`~vlpeft_jax.peft.lora.LoRA`) and DoRA
(:class:`~vlpeft_jax.peft.dora.DoRA`).

Tensors per adapted module: ``lora_A.weight`` ``(r, in)`` (our ``lora_a`` transposed), ``lora_B.weight``
``(out, r)`` (our ``lora_b`` transposed) and, for DoRA (``use_dora=true``), ``lora_magnitude_vector``
``(out,)`` (no ``.weight``: peft 0.21's saved name). Ranks come from the tensors on import (``rank_pattern`` is
implied); a module's ``alpha_pattern`` value is folded into its ``lora_b``.

Example (a LoRA on a tiny GPT-2 model, see :func:`vlpeft_jax.hf.peft_io.peft_state`)::

    config, state = lora_to_peft_state(lora, peft_params, BaseModelInfo.from_config(gpt2_config))
    lora, peft_params, _ = lora_from_peft_state(config, state, base_params)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlpeft_jax.hf.peft_io import (
    PEFT_PREFIX,
    AdapterShapeError,
    AdapterStateError,
    BaseModelInfo,
    PeftFormat,
    UnsupportedAdapterError,
    adapted_modules,
    check_shape,
    find_kernel,
    group_module_state,
    module_path,
    pattern_value,
)
from vlpeft_jax.peft import base as pb
from vlpeft_jax.peft.dora import DoRA
from vlpeft_jax.peft.lora import LoRA

# LoRA config fields whose non-empty values change what the adapter holds or does beyond A, B (and the
# DoRA magnitude): importing them would silently drop part of the adapter.
UNSUPPORTED_LORA_FIELDS = ("modules_to_save", "lora_bias", "layer_replication", "trainable_token_indices",
                           "target_parameters", "use_qalora", "alora_invocation_tokens", "megatron_config",
                           "use_bdlora", "arrow_config")
# init_lora_weights values that also rewrite the base weights (the adapter needs that modified base).
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


# --------------------------------------------------------------------------------------------------
# LoRA / rsLoRA


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
        "rank_pattern": {re.escape(info.module_name(p)): r for p, r in ranks.items() if r != lora.rank},
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
                         prefix: Sequence[str] = (), *, extra_suffixes: Sequence[str] = (), name: str = "lora",
                         info: BaseModelInfo | None = None
                         ) -> tuple[LoRA, dict[str, Any], dict[tuple[str, ...], dict[str, tuple[str, np.ndarray]]]]:
    """A peft LoRA/rsLoRA adapter -> ``(LoRA, peft_params, extras)``.

    ``extras`` maps each module path to its tensors named by ``extra_suffixes`` (DoRA's magnitude), so that
    variants build on this. Ranks come from the tensors (``rank_pattern`` is implied); a module's
    ``alpha_pattern`` value is folded into its ``lora_b`` (``B · α_i/α``), which gives identical outputs.
    ``info`` maps the Hugging Face module names to our paths (:meth:`BaseModelInfo.module_path`; default: a
    rename, for trees that mirror the Hugging Face model).
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
        path = prefix + (info.module_path(module) if info else module_path(module))
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


def _lora_method_from_peft_state(config: Mapping[str, Any], state: Mapping[str, np.ndarray],
                                 base_params: Mapping[str, Any], prefix: Sequence[str] = (), name: str = "lora",
                                 info: BaseModelInfo | None = None) -> tuple[LoRA, dict[str, Any]]:
    lora, params, _ = lora_from_peft_state(config, state, base_params, prefix, name=name, info=info)
    return lora, params


# --------------------------------------------------------------------------------------------------
# DoRA: LoRA's fields and tensors, plus use_dora and the magnitude


def dora_to_peft_state(dora: DoRA, peft_params: pb.Params, info: BaseModelInfo, prefix: Sequence[str] = ()
                       ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """peft's ``adapter_config.json`` fields and tensors: LoRA's plus ``lora_magnitude_vector`` [out]."""
    config, state = lora_to_peft_state(dora.lora, peft_params, info, prefix)
    for path, rel in adapted_modules(peft_params, "magnitude", prefix, dora.name):
        m = np.asarray(jax.device_get(pb.get_path(peft_params, path)["magnitude"]), np.float32)
        state[info.peft_key(rel, "lora_magnitude_vector")] = m
    config["use_dora"] = True
    return config, state


def dora_from_peft_state(config: Mapping[str, Any], state: Mapping[str, np.ndarray], base_params: pb.Params,
                         prefix: Sequence[str] = (), name: str = "dora", info: BaseModelInfo | None = None
                         ) -> tuple[DoRA, pb.Params]:
    """The method and parameters of a peft LoRA adapter saved with ``use_dora=True``."""
    lora, params, extras = lora_from_peft_state(config, state, base_params, prefix,
                                                extra_suffixes=("lora_magnitude_vector",), name=name, info=info)
    for path, found in extras.items():
        key, m = found.get("lora_magnitude_vector", (None, None))
        kernel = pb.get_path(base_params, path + ("kernel",))
        if m is None:
            raise AdapterStateError(f"{name}: the adapter has use_dora=true but no "
                                    f"lora_magnitude_vector for module {'/'.join(path)}")
        check_shape(key, m, (kernel.shape[-1],))
        pb.get_path(params, path)["magnitude"] = jnp.asarray(m, jnp.float32)
    fields = {f.name: getattr(lora, f.name) for f in dataclasses.fields(LoRA)}
    return DoRA(**fields), params


LORA_FORMAT = PeftFormat("LORA", lora_to_peft_state, _lora_method_from_peft_state)
# peft stores DoRA as LoRA with use_dora=True (PEFT_TYPE_METHODS sends those to "dora")
DORA_FORMAT = PeftFormat("LORA", dora_to_peft_state, dora_from_peft_state)
