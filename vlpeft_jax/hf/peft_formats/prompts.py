"""peft prompt-learning adapters: ``PREFIX_TUNING`` (:class:`~vlpeft_jax.peft.prefix.PrefixTuning`) and
``PROMPT_TUNING`` (:class:`~vlpeft_jax.peft.prompt.PromptTuning`).

Both save one ``prompt_embeddings`` tensor (no module keys): prefix tuning the prefix encoder's *output*
``[P, L * 2 * kvh * hd]`` (per token: layer, then key/value, then head, then head_dim), prompt tuning the
prompt ``[P, d]`` of the one token-embedding table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from vlpeft_jax.hf.peft_io import (
    AdapterShapeError,
    AdapterStateError,
    AdapterTargetError,
    BaseModelInfo,
    PeftFormat,
    UnsupportedAdapterError,
    check_shape,
)
from vlpeft_jax.peft import base as pb
from vlpeft_jax.peft.prefix import PrefixTuning, attention_sites, holders, natural_key
from vlpeft_jax.peft.prompt import PromptTuning, embed_sites

PREFIX_PEFT_TYPE = "PREFIX_TUNING"
PROMPT_PEFT_TYPE = "PROMPT_TUNING"


# --------------------------------------------------------------------------------------------------
# Prefix tuning


def prefix_to_peft_state(method: PrefixTuning, peft_params: pb.Params, info: BaseModelInfo | None = None,
                         prefix: Sequence[str] = ()) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """peft PREFIX_TUNING ``adapter_config.json`` fields and tensors.

    peft saves the prefix encoder's *output* as ``prompt_embeddings`` ``[P, L * 2 * kvh * hd]`` (per token:
    layer, then key/value, then head, then head_dim) and loads it in inference mode with or without
    ``prefix_projection``; so the encoder form is finalized first. ``prefix`` is the Hugging Face model's path
    in our tree (every prefixed layer must be under it); ``info`` is not needed (sizes come from the tensors).
    """
    prefix = tuple(prefix)
    prefixes = method.layer_prefixes(peft_params)
    outside = [p for p in prefixes if p[:len(prefix)] != prefix]
    if outside:
        raise UnsupportedAdapterError(
            f"{method.name} adapts {'/'.join(outside[0])}, outside the exported model {'/'.join(prefix)!r}; a peft "
            "adapter covers one Hugging Face model, so restrict the method's targets to it")
    if not prefixes:
        raise AdapterStateError(f"{method.name}: no prefixes to export")
    paths = sorted(prefixes, key=natural_key)
    shapes = {tuple(prefixes[p][0].shape) for p in paths}
    if len(shapes) != 1:
        raise AdapterShapeError(f"{method.name}: peft needs one prefix shape for every layer; got {sorted(shapes)}")
    n, kvh, hd = shapes.pop()
    flat = [np.stack([np.asarray(prefixes[p][0]), np.asarray(prefixes[p][1])], axis=1).reshape(n, 2 * kvh * hd)
            for p in paths]
    state = {"prompt_embeddings": np.concatenate(flat, axis=1).astype(np.float32)}
    token_dim = kvh * hd
    config = {
        "num_virtual_tokens": int(n), "token_dim": token_dim, "num_transformer_submodules": 1,
        "num_attention_heads": int(kvh), "num_layers": len(paths), "modules_to_save": None, "init_weights": None,
        "encoder_hidden_size": int(method.encoder_hidden_size or token_dim),
        "prefix_projection": bool(method.projection),
    }
    return config, state


def prefix_from_peft_state(config: Mapping[str, Any], state: Mapping[str, Any], base_params: pb.Params,
                           prefix: Sequence[str] = (), name: str = "prefix", info: BaseModelInfo | None = None
                           ) -> tuple[PrefixTuning, pb.Params]:
    """``(method, peft_params)`` (plain form) from a peft PREFIX_TUNING adapter config and tensors.

    The adapter's ``num_layers`` layers are the self-attention modules under ``prefix`` (the Hugging Face
    model's path in our tree), in layer order; the method targets exactly those.
    """
    prefix = tuple(prefix)
    if config.get("peft_type") != PREFIX_PEFT_TYPE:
        raise UnsupportedAdapterError(f"adapter peft_type={config.get('peft_type')!r}; expected "
                                      f"{PREFIX_PEFT_TYPE!r}")
    if int(config.get("num_transformer_submodules") or 1) != 1:
        raise UnsupportedAdapterError("prefix adapters of encoder-decoder models "
                                      "(num_transformer_submodules=2) are not supported")
    missing = [k for k in ("num_virtual_tokens", "num_attention_heads", "token_dim", "num_layers")
               if config.get(k) is None]
    if missing:
        raise AdapterStateError(f"{name}: the prefix adapter config lacks {', '.join(missing)}")
    if "prompt_embeddings" not in state:
        raise AdapterStateError(f"{name}: the prefix adapter has no 'prompt_embeddings' tensor "
                                f"(tensors: {sorted(state)})")
    n, kvh = int(config["num_virtual_tokens"]), int(config["num_attention_heads"])
    num_layers, hd = int(config["num_layers"]), int(config["token_dim"]) // int(config["num_attention_heads"])
    emb = np.asarray(state["prompt_embeddings"], np.float32)
    check_shape("prompt_embeddings", emb, (n, num_layers * 2 * kvh * hd))
    sites = [s for s in attention_sites(base_params, (), method=name) if s.path[:len(prefix)] == prefix]
    if len(sites) != num_layers:
        where = "/".join(prefix) or "the model root"
        raise AdapterShapeError(
            f"{name}: the prefix adapter has {num_layers} layers but {where} has {len(sites)} self-attention "
            f"modules ({', '.join(s.name for s in sites[:3])} ...)")
    method = PrefixTuning(num_virtual_tokens=n, num_kv_heads=kvh, targets=tuple(s.name for s in sites),
                          projection=bool(config.get("prefix_projection", False)),
                          encoder_hidden_size=config.get("encoder_hidden_size"), name=name)
    kv = emb.reshape(n, num_layers, 2, kvh, hd)
    params: pb.Params = {}
    for i, site in enumerate(sites):
        if site.kv_width != kvh * hd:
            raise AdapterShapeError(f"{name}: prefix heads {kvh}x{hd} do not fit {site.name} (key width "
                                    f"{site.kv_width})")
        pb.set_path(params, site.path, {"prefix_keys": jnp.asarray(kv[:, i, 0]),
                                        "prefix_values": jnp.asarray(kv[:, i, 1])})
    return method, params


# --------------------------------------------------------------------------------------------------
# Prompt tuning


def prompt_to_peft_state(method: PromptTuning, peft_params: pb.Params, info: BaseModelInfo | None = None,
                         prefix: Sequence[str] = ()) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """peft PROMPT_TUNING config fields and ``prompt_embeddings`` ``[P, d]``; ``prefix`` is the Hugging Face
    model's path in our tree, ``info`` (its ``config``, if any) fills in ``num_attention_heads`` / ``num_layers``
    (peft derives them otherwise)."""
    prefix = tuple(prefix)
    paths = holders(peft_params, "prompt_embeddings")
    if len(paths) != 1 or paths[0][:len(prefix)] != prefix:
        raise UnsupportedAdapterError(
            f"{method.name}: a peft prompt covers one token embedding of the exported model "
            f"{'/'.join(prefix)!r}; this method has prompts at {', '.join('/'.join(p) for p in paths) or 'none'}")
    emb = np.asarray(pb.get_path(peft_params, paths[0])["prompt_embeddings"], np.float32)
    text_init = method.init_from == "text" and bool(method.init_text and method.tokenizer)
    arch = getattr(info, "config", None)
    config = {
        "num_virtual_tokens": int(emb.shape[0]), "token_dim": int(emb.shape[1]), "num_transformer_submodules": 1,
        "num_attention_heads": getattr(arch, "num_attention_heads", None),
        "num_layers": getattr(arch, "num_hidden_layers", None), "modules_to_save": None,
        "prompt_tuning_init": "TEXT" if text_init else "SAMPLE_VOCAB" if method.init_from == "vocab" else "RANDOM",
        "prompt_tuning_init_text": method.init_text if text_init else None,
        "tokenizer_name_or_path": method.tokenizer if text_init else None, "tokenizer_kwargs": None,
    }
    return config, {"prompt_embeddings": emb}


def prompt_from_peft_state(config: Mapping[str, Any], state: Mapping[str, Any], base_params: pb.Params,
                           prefix: Sequence[str] = (), name: str = "prompt", info: BaseModelInfo | None = None
                           ) -> tuple[PromptTuning, pb.Params]:
    """``(method, peft_params)`` from a peft PROMPT_TUNING config and tensors; the prompt goes into the one
    token-embedding table under ``prefix`` (the Hugging Face model's path in our tree)."""
    prefix = tuple(prefix)
    if config.get("peft_type") != PROMPT_PEFT_TYPE:
        raise UnsupportedAdapterError(f"adapter peft_type={config.get('peft_type')!r}; expected "
                                      f"{PROMPT_PEFT_TYPE!r}")
    if int(config.get("num_transformer_submodules") or 1) != 1:
        raise UnsupportedAdapterError("prompt adapters of encoder-decoder models "
                                      "(num_transformer_submodules=2) are not supported")
    if "prompt_embeddings" not in state:
        raise AdapterStateError(f"{name}: the prompt adapter has no 'prompt_embeddings' tensor "
                                f"(tensors: {sorted(state)})")
    emb = np.asarray(state["prompt_embeddings"], np.float32)
    sites = [s for s in embed_sites(base_params, (), method=name) if s.path[:len(prefix)] == prefix]
    if len(sites) != 1:
        raise AdapterTargetError(f"{name}: a peft prompt needs exactly one token table under "
                                 f"{'/'.join(prefix) or 'the model root'!r}; found "
                                 f"{[s.name for s in sites]}")
    n = int(config.get("num_virtual_tokens") or emb.shape[0])
    check_shape("prompt_embeddings", emb, (n, sites[0].width))
    method = PromptTuning(num_virtual_tokens=n, targets=(sites[0].name,), name=name)
    params: pb.Params = {}
    pb.set_path(params, sites[0].path, {"prompt_embeddings": jnp.asarray(emb)})
    return method, params


PREFIX_FORMAT = PeftFormat(PREFIX_PEFT_TYPE, prefix_to_peft_state, prefix_from_peft_state)
PROMPT_FORMAT = PeftFormat(PROMPT_PEFT_TYPE, prompt_to_peft_state, prompt_from_peft_state)
