"""peft ``ADAPTION_PROMPT`` adapters (:class:`~vlpeft_jax.peft.llama_adapter.LlamaAdapter`).

peft saves ``base_model.model.model.layers.<i>.self_attn.adaption_prompt`` ``[1, adapter_len, d]`` and
``...adaption_gate`` ``[1]`` for the top ``adapter_layers`` ``self_attn`` modules (``target_modules:
"self_attn"``). Exported and imported for LLaMA only: peft has no Qwen2 adaption prompt, its GPT-2 one differs
from ours (see :mod:`vlpeft_jax.peft.llama_adapter`), and with an ``o_proj`` bias its output differs by that
bias; those are refused with a message. A ``tanh_gate`` adapter is exported with ``tanh(g)`` as peft's gate
(the same outputs); imported adapters use the gate as is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlpeft_jax.hf.peft_io import (
    PEFT_PREFIX,
    AdapterShapeError,
    AdapterStateError,
    AdapterTargetError,
    BaseModelInfo,
    PeftFormat,
    UnsupportedAdapterError,
    adapted_modules,
    check_shape,
    group_module_state,
    module_path,
)
from vlpeft_jax.models.llama import LlamaConfig
from vlpeft_jax.peft import base as pb
from vlpeft_jax.peft.llama_adapter import LlamaAdapter, attention_modules
from vlpeft_jax.tree import layer_index

PEFT_TYPE = "ADAPTION_PROMPT"


def _check_peft_compatible(o_proj_bias: bool, name: str) -> None:
    if o_proj_bias:
        raise UnsupportedAdapterError(
            f"{name}: the model has an o_proj bias; peft's AdaptionPrompt projects the prompt attention with o_proj "
            "(bias included) and adds it to the attention output, so the bias counts twice there and once here")


def llama_adapter_to_peft_state(method: LlamaAdapter, peft_params: pb.Params, info: BaseModelInfo | None = None,
                                prefix: Sequence[str] = ()) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """peft ADAPTION_PROMPT config fields and tensors.

    ``info`` (a :class:`~vlpeft_jax.hf.peft_io.BaseModelInfo` with the model's config) is needed: peft adapts
    the top ``adapter_layers`` of all the model's ``self_attn`` modules, so the adapted layers must be exactly
    those. ``prefix`` is the Hugging Face model's path in our tree (``("language_model",)`` in a VLM).
    """
    name = method.name
    model_type = getattr(info, "model_type", None)
    arch = getattr(info, "config", None)
    if model_type != "llama":
        why = ("peft's GPT-2 adaption prompt adds the prompt attention after c_proj without projecting it, ours "
               "projects it through c_proj like the paper" if model_type == "gpt2" else
               "peft's AdaptionPrompt supports llama, mistral and gpt2 only")
        raise UnsupportedAdapterError(f"{name}: LLaMA-Adapter exports to peft ADAPTION_PROMPT for "
                                      f"LLaMA models, not for model type {model_type!r}: {why}")
    if not isinstance(arch, LlamaConfig):
        raise UnsupportedAdapterError(
            f"{name}: the export needs the model's config (peft adapts the top adapter_layers of all its "
            "layers); pass the Hugging Face checkpoint directory or our LlamaConfig, not only the model type")
    _check_peft_compatible(arch.o_proj_bias, name)
    if arch.num_attention_heads * arch.head_dim != arch.hidden_size:
        raise UnsupportedAdapterError(
            f"{name}: num_attention_heads x head_dim ({arch.num_attention_heads} x {arch.head_dim}) != "
            f"hidden_size ({arch.hidden_size}); peft's AdaptionPrompt derives the key/value heads from "
            "hidden_size and would split the prompt keys wrongly")
    prefix = tuple(prefix)
    adapted = adapted_modules(peft_params, "adaption_prompt", prefix, name)
    if not adapted:
        raise AdapterStateError(f"{name}: no adaption prompts to export")
    layers_at = {}
    for path, rel in adapted:
        if len(rel) != 3 or rel[0] != "model" or rel[2] != "self_attn" or layer_index(rel[1]) is None:
            raise UnsupportedAdapterError(f"{name}: {'/'.join(path)} is not a decoder layer's "
                                          "self_attn; peft adapts model.layers.<i>.self_attn only")
        layers_at[layer_index(rel[1])] = (path, rel)
    n, total = len(layers_at), arch.num_hidden_layers
    if sorted(layers_at) != list(range(total - n, total)):
        raise UnsupportedAdapterError(
            f"{name} adapts layers {sorted(layers_at)}; peft's adapter_layers={n} means the top {n} of "
            f"{total} layers ({list(range(total - n, total))})")
    state: dict[str, np.ndarray] = {}
    lengths = set()
    for path, rel in layers_at.values():
        node = pb.get_path(peft_params, path)
        prompt = np.asarray(jax.device_get(node["adaption_prompt"]), np.float32)
        gate = np.asarray(jax.device_get(node["adaption_gate"]), np.float32)
        if method.tanh_gate:  # peft multiplies by the gate itself: tanh(g) gives the same outputs
            gate = np.tanh(gate)
        lengths.add(prompt.shape[1])
        state[info.peft_key(rel, "adaption_prompt")] = prompt
        state[info.peft_key(rel, "adaption_gate")] = gate.reshape(1)
    if len(lengths) != 1:
        raise AdapterShapeError(f"{name}: peft needs one adapter_len for every layer; got {sorted(lengths)}")
    return {"adapter_len": int(lengths.pop()), "adapter_layers": n, "target_modules": "self_attn"}, state


def llama_adapter_from_peft_state(config: Mapping[str, Any], state: Mapping[str, Any], base_params: pb.Params,
                                  prefix: Sequence[str] = (), name: str = "llama_adapter",
                                  info: BaseModelInfo | None = None) -> tuple[LlamaAdapter, pb.Params]:
    """``(method, peft_params)`` from a peft ADAPTION_PROMPT config and tensors.

    The method targets exactly the adapted attention modules (full paths under ``prefix``), with peft's gate
    used as is (``tanh_gate=False``).
    """
    prefix = tuple(prefix)
    if config.get("peft_type") != PEFT_TYPE:
        raise UnsupportedAdapterError(f"adapter peft_type={config.get('peft_type')!r}; expected {PEFT_TYPE!r}")
    groups = group_module_state(state, ("adaption_prompt", "adaption_gate"), name)
    if not groups:
        raise AdapterStateError(f"{name}: the adapter holds no adaption_prompt tensors")
    if config.get("adapter_layers") is not None and int(config["adapter_layers"]) != len(groups):
        raise AdapterStateError(f"{name}: adapter_layers={config['adapter_layers']} but the adapter holds "
                                f"tensors for {len(groups)} modules")
    candidates = attention_modules(base_params)
    params: pb.Params = {}
    for module, found in groups.items():
        for part in ("adaption_prompt", "adaption_gate"):
            if part not in found:
                raise AdapterStateError(f"{name}: {PEFT_PREFIX}{module}.{part} is missing")
        (key_p, prompt), (key_g, gate) = found["adaption_prompt"], found["adaption_gate"]
        path = prefix + (info.module_path(module) if info else module_path(module))
        if path not in candidates:
            shown = ", ".join("/".join(p) for p in list(candidates)[:8])
            raise AdapterTargetError(f"tensor {key_p!r} adapts {'/'.join(path)}, which is not an attention "
                                     f"module of the base model; its attention modules: {shown}")
        attn = pb.get_path(base_params, path)
        if "c_attn" in attn:
            raise UnsupportedAdapterError(
                f"{name}: {'/'.join(path)} is GPT-2 attention; peft's GPT-2 adaption prompt adds the prompt "
                "attention after c_proj without projecting it, which this LLaMA-Adapter does not reproduce")
        _check_peft_compatible("bias" in attn.get("o_proj", {}), name)
        length = int(config.get("adapter_len") or np.shape(prompt)[1])
        check_shape(key_p, prompt, (1, length, candidates[path]))
        check_shape(key_g, gate, (1,))
        pb.set_path(params, path, {"adaption_prompt": jnp.asarray(prompt, jnp.float32),
                                   "adaption_gate": jnp.asarray(gate, jnp.float32)})
    paths = sorted(pb.module_paths(params, "adaption_prompt"))
    method = LlamaAdapter(targets=tuple("/".join(p) for p in paths), adapter_len=length, adapter_layers=None,
                          name=name)
    return method, params


LLAMA_ADAPTER_FORMAT = PeftFormat(PEFT_TYPE, llama_adapter_to_peft_state, llama_adapter_from_peft_state)
