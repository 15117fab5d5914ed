"""Hugging Face checkpoints of the decoder language models (GPT-2, LLaMA, Qwen2, OPT): in and back out.

Each family has an explicit key map (HF tensor name -> our parameter path, with the transpose a PyTorch
``nn.Linear`` weight needs; GPT-2's ``Conv1D`` needs none), a loader that reads ``config.json`` and the
weights of a local checkpoint directory, and the inverse ``to_hf_state_dict`` used to export merged
weights. Checkpoints saved from the base classes (``GPT2Model``, ``LlamaModel``: keys without the
``transformer.`` / ``model.`` prefix, e.g. the original ``gpt2`` release; ``OPTModel``: ``decoder.*``) load
as well.

Example (tiny random checkpoint written by transformers)::

    model, params = load_llama("path/to/qwen2-dir")
    logits = model.apply({"params": params}, input_ids, attention_mask).logits
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlpeft_jax.errors import CheckpointError
from vlpeft_jax.hf import io
from vlpeft_jax.models import layers
from vlpeft_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel
from vlpeft_jax.models.llama import LlamaConfig, LlamaForCausalLM
from vlpeft_jax.models.opt import OPTConfig, OPTForCausalLM

# --------------------------------------------------------------------------------------------------
# Key maps


def gpt2_key_maps(config: GPT2Config) -> list[io.KeyMap]:
    """HF ``GPT2LMHeadModel`` keys -> our paths (``Conv1D`` weights are already ``[in, out]``).

    Example:
        >>> maps = gpt2_key_maps(GPT2Config(num_hidden_layers=1))
        >>> maps[0].hf_key, maps[0].path
        ('transformer.wte.weight', 'transformer/wte/embedding')
    """
    maps = [io.embedding("transformer.wte.weight", "transformer/wte"),
            io.embedding("transformer.wpe.weight", "transformer/wpe")]
    for i in range(config.num_hidden_layers):
        hf, ours = f"transformer.h.{i}", f"transformer/h_{i}"
        maps += io.norm(f"{hf}.ln_1", f"{ours}/ln_1")
        maps += io.linear(f"{hf}.attn.c_attn", f"{ours}/attn/c_attn", transposed=False)
        maps += io.linear(f"{hf}.attn.c_proj", f"{ours}/attn/c_proj", transposed=False)
        maps += io.norm(f"{hf}.ln_2", f"{ours}/ln_2")
        maps += io.linear(f"{hf}.mlp.c_fc", f"{ours}/mlp/c_fc", transposed=False)
        maps += io.linear(f"{hf}.mlp.c_proj", f"{ours}/mlp/c_proj", transposed=False)
    maps += io.norm("transformer.ln_f", "transformer/ln_f")
    if not config.tie_word_embeddings:
        maps += io.linear("lm_head", "lm_head", bias=False)
    return maps


def llama_key_maps(config: LlamaConfig) -> list[io.KeyMap]:
    """HF ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` keys -> our paths.

    Example:
        >>> maps = llama_key_maps(LlamaConfig(num_hidden_layers=1, tie_word_embeddings=True))
        >>> [m.path for m in maps if m.hf_key.startswith("model.layers.0.self_attn.q")]
        ['model/layers_0/self_attn/q_proj/kernel']
    """
    maps = [io.embedding("model.embed_tokens.weight", "model/embed_tokens")]
    for i in range(config.num_hidden_layers):
        hf, ours = f"model.layers.{i}", f"model/layers_{i}"
        maps += io.norm(f"{hf}.input_layernorm", f"{ours}/input_layernorm", bias=False)
        for name in ("q_proj", "k_proj", "v_proj"):
            maps += io.linear(f"{hf}.self_attn.{name}", f"{ours}/self_attn/{name}", bias=config.attention_bias)
        maps += io.linear(f"{hf}.self_attn.o_proj", f"{ours}/self_attn/o_proj", bias=config.o_proj_bias)
        maps += io.norm(f"{hf}.post_attention_layernorm", f"{ours}/post_attention_layernorm", bias=False)
        for name in ("gate_proj", "up_proj", "down_proj"):
            maps += io.linear(f"{hf}.mlp.{name}", f"{ours}/mlp/{name}", bias=config.mlp_bias)
    maps += io.norm("model.norm", "model/norm", bias=False)
    if not config.tie_word_embeddings:
        maps += io.linear("lm_head", "lm_head", bias=False)
    return maps


def opt_key_maps(config: OPTConfig) -> list[io.KeyMap]:
    """HF ``OPTForCausalLM`` keys -> our paths (``project_in``/``project_out`` and the decoder's
    ``final_layer_norm`` only where the architecture has them; ``lm_head`` only when untied).

    Example:
        >>> maps = opt_key_maps(OPTConfig(num_hidden_layers=1, word_embed_proj_dim=32))
        >>> [m.path for m in maps if "project" in m.hf_key]
        ['model/decoder/project_in/kernel', 'model/decoder/project_out/kernel']
    """
    d = "model.decoder"
    maps = [io.embedding(f"{d}.embed_tokens.weight", "model/decoder/embed_tokens"),
            io.embedding(f"{d}.embed_positions.weight", "model/decoder/embed_positions")]
    if config.projects:
        maps += io.linear(f"{d}.project_in", "model/decoder/project_in", bias=False)
        maps += io.linear(f"{d}.project_out", "model/decoder/project_out", bias=False)
    for i in range(config.num_hidden_layers):
        hf, ours = f"{d}.layers.{i}", f"model/decoder/layers_{i}"
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            maps += io.linear(f"{hf}.self_attn.{name}", f"{ours}/self_attn/{name}", bias=config.enable_bias)
        maps += io.norm(f"{hf}.self_attn_layer_norm", f"{ours}/self_attn_layer_norm")
        maps += io.linear(f"{hf}.fc1", f"{ours}/fc1", bias=config.enable_bias)
        maps += io.linear(f"{hf}.fc2", f"{ours}/fc2", bias=config.enable_bias)
        maps += io.norm(f"{hf}.final_layer_norm", f"{ours}/final_layer_norm")
    if config.has_final_layer_norm:
        maps += io.norm(f"{d}.final_layer_norm", "model/decoder/final_layer_norm")
    if not config.tie_word_embeddings:
        maps += io.linear("lm_head", "lm_head", bias=False)
    return maps


# --------------------------------------------------------------------------------------------------
# Loaders


def abstract_params(module: Any) -> dict[str, Any]:
    """The module's unboxed parameter tree as ``ShapeDtypeStruct`` leaves (no memory used)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    variables = jax.eval_shape(module.init, jax.random.key(0), ids)
    return layers.unbox(variables)["params"]


def load_gpt2(model_dir: str | os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = None,
              sharding: Any = None) -> tuple[GPT2LMHeadModel, dict]:
    """Builds a :class:`GPT2LMHeadModel` from a local Hugging Face GPT-2 checkpoint directory.

    Returns the module (compute ``dtype``) and its parameters. The weights are read lazily, one tensor at a
    time (:func:`~vlpeft_jax.hf.io.lazy_state_dict`), so host memory holds the parameters plus one tensor.
    ``param_dtype``: ``None`` gives float32 (the model's parameter dtype, as before), ``"stored"`` keeps the
    checkpoint's dtype, or a dtype such as ``jnp.bfloat16``. ``sharding``: ``None`` returns host numpy arrays;
    a ``jax.sharding.Sharding``, a tree of them shaped like the parameters, or a callable from the abstract
    parameters to either, places each tensor straight onto its devices, every process reading only the slices
    it holds (see :func:`~vlpeft_jax.hf.io.convert`). A hub id fails with an offline message.
    """
    config = GPT2Config.from_hf(io.load_config(model_dir), dtype=dtype)
    model = GPT2LMHeadModel(config)
    state = _with_prefix(io.lazy_state_dict(model_dir), "transformer.", "wte.weight")
    params = io.convert(state, gpt2_key_maps(config), abstract_params(model), source=str(model_dir),
                        param_dtype=param_dtype, sharding=sharding)
    return model, params


def load_llama(model_dir: str | os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = None,
               sharding: Any = None) -> tuple[LlamaForCausalLM, dict]:
    """Builds a :class:`LlamaForCausalLM` from a local ``llama`` or ``qwen2`` checkpoint directory.

    Returns the module and its parameters (host numpy float32 by default; ``param_dtype`` and ``sharding`` as in
    :func:`load_gpt2`).
    """
    config = LlamaConfig.from_hf(io.load_config(model_dir), dtype=dtype)
    model = LlamaForCausalLM(config)
    state = _with_prefix(io.lazy_state_dict(model_dir), "model.", "embed_tokens.weight")
    params = io.convert(state, llama_key_maps(config), abstract_params(model), source=str(model_dir),
                        param_dtype=param_dtype, sharding=sharding)
    return model, params


def load_opt(model_dir: str | os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = None,
             sharding: Any = None) -> tuple[OPTForCausalLM, dict]:
    """Builds an :class:`OPTForCausalLM` from a local Hugging Face OPT checkpoint directory.

    Returns the module and its parameters (host numpy float32 by default; ``param_dtype`` and ``sharding`` as in
    :func:`load_gpt2`).
    """
    config = OPTConfig.from_hf(io.load_config(model_dir), dtype=dtype)
    model = OPTForCausalLM(config)
    state = _with_prefix(io.lazy_state_dict(model_dir), "model.", "decoder.embed_tokens.weight")
    params = io.convert(state, opt_key_maps(config), abstract_params(model), source=str(model_dir),
                        param_dtype=param_dtype, sharding=sharding)
    return model, params


def _with_prefix(state: io.LazyStateDict, prefix: str, probe: str) -> io.LazyStateDict:
    """Adds the trunk prefix to the keys of a checkpoint saved from the base class (no ``lm_head``); nothing is
    read."""
    if prefix + probe in state or probe not in state:
        return state
    return state.rename(lambda k: k if k.startswith("lm_head.") else prefix + k)


def load_decoder(model_dir: str | os.PathLike, *, dtype: Any = jnp.float32, **kwargs: Any) -> tuple[Any, dict]:
    """Loads any supported decoder LM, dispatching on ``model_type`` in its ``config.json`` (``kwargs``:
    ``param_dtype``, ``sharding``, as in :func:`load_gpt2`)."""
    model_type = io.load_config(model_dir).get("model_type")
    if model_type not in DECODER_LOADERS:
        raise CheckpointError(f"{model_dir}: model_type {model_type!r} is not a supported decoder; supported: "
                              f"{', '.join(sorted(DECODER_LOADERS))}")
    return DECODER_LOADERS[model_type](model_dir, dtype=dtype, **kwargs)


DECODER_LOADERS: dict[str, Callable[..., tuple[Any, dict]]] = {
    "gpt2": load_gpt2,
    "llama": load_llama,
    "qwen2": load_llama,
    "opt": load_opt,
}


# --------------------------------------------------------------------------------------------------
# Export


def gpt2_to_hf_state_dict(params: Mapping[str, Any], config: GPT2Config) -> dict[str, np.ndarray]:
    """Our GPT-2 parameters -> a HF ``GPT2LMHeadModel`` state dict (float32; no ``lm_head`` when tied)."""
    return io.export_state(params, gpt2_key_maps(config))


def llama_to_hf_state_dict(params: Mapping[str, Any], config: LlamaConfig) -> dict[str, np.ndarray]:
    """Our LLaMA/Qwen2 parameters -> a HF ``LlamaForCausalLM``/``Qwen2ForCausalLM`` state dict."""
    return io.export_state(params, llama_key_maps(config))


def opt_to_hf_state_dict(params: Mapping[str, Any], config: OPTConfig) -> dict[str, np.ndarray]:
    """Our OPT parameters -> a HF ``OPTForCausalLM`` state dict (no ``lm_head.weight`` when tied)."""
    return io.export_state(params, opt_key_maps(config))


def to_hf_state_dict(params: Mapping[str, Any], config: GPT2Config | LlamaConfig | OPTConfig
                     ) -> dict[str, np.ndarray]:
    """The inverse of the loaders: HF tensor name -> float32 numpy array, ready for ``safetensors``.

    Example:
        >>> cfg = GPT2Config(vocab_size=10, max_position_embeddings=4, hidden_size=4, num_hidden_layers=1,
        ...                  num_attention_heads=1)
        >>> params = abstract_params(GPT2LMHeadModel(cfg))
        >>> zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), params)
        >>> to_hf_state_dict(zeros, cfg)["transformer.h.0.attn.c_attn.weight"].shape
        (4, 12)
    """
    if isinstance(config, GPT2Config):
        return gpt2_to_hf_state_dict(params, config)
    if isinstance(config, LlamaConfig):
        return llama_to_hf_state_dict(params, config)
    if isinstance(config, OPTConfig):
        return opt_to_hf_state_dict(params, config)
    raise TypeError(f"to_hf_state_dict takes a GPT2Config, LlamaConfig or OPTConfig, got {type(config).__name__}")
