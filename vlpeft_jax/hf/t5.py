"""Hugging Face T5 / Flan-T5 checkpoints (``T5ForConditionalGeneration``): in and back out.

The key map is explicit (:func:`t5_key_maps`): HF tensor name -> our parameter path, with the transpose a
PyTorch ``nn.Linear`` weight needs. ``shared.weight`` is the one token table; the aliases
``encoder.embed_tokens.weight`` / ``decoder.embed_tokens.weight`` that older checkpoints also store are the same
tensor and are ignored (used only when ``shared.weight`` itself is absent), as is the unused
``decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight`` of some early checkpoints.

Tied or untied head: transformers 5 writes ``tie_word_embeddings: true`` into every T5 config and ties the head
unless the checkpoint holds an ``lm_head.weight`` different from ``shared.weight`` (Flan-T5 and T5 v1.1 do), so
:func:`resolve_tied_head` decides from the weights, the same way. ``t5_key_maps`` takes prefixes so that a
composed checkpoint (BLIP-2 / InstructBLIP: ``language_model.*``) maps its LM with the same table.

Example (tiny random checkpoint written by transformers)::

    model, params = load_t5("path/to/flan-t5-dir")
    logits = model.apply({"params": params}, input_ids, attention_mask, decoder_input_ids).logits
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlpeft_jax.errors import CheckpointError
from vlpeft_jax.hf import io
from vlpeft_jax.models import layers
from vlpeft_jax.models.t5 import T5Config, T5ForConditionalGeneration


def t5_key_maps(config: T5Config, *, hf_prefix: str = "", path_prefix: str = "") -> list[io.KeyMap]:
    """HF ``T5ForConditionalGeneration`` keys -> our paths (``lm_head`` only for an untied head).

    ``hf_prefix`` (e.g. ``"language_model."``) is put before every HF key, ``path_prefix`` (e.g.
    ``"language_model/"``) before every path of ours.

    Example:
        >>> maps = t5_key_maps(T5Config(num_layers=1, feed_forward_proj="gated-gelu"))
        >>> [m.path for m in maps if m.hf_key.startswith("encoder.block.0.layer.1.")]
        ['encoder/block_0/layer_1/DenseReluDense/wi_0/kernel', 'encoder/block_0/layer_1/DenseReluDense/wi_1/kernel', \
'encoder/block_0/layer_1/DenseReluDense/wo/kernel', 'encoder/block_0/layer_1/layer_norm/scale']
    """
    def lin(hf: str, ours: str) -> list[io.KeyMap]:
        return io.linear(hf_prefix + hf, path_prefix + ours, bias=False)

    def nrm(hf: str, ours: str) -> list[io.KeyMap]:
        return io.norm(hf_prefix + hf, path_prefix + ours, bias=False)

    ff = ("wi_0", "wi_1", "wo") if config.is_gated_act else ("wi", "wo")
    maps = [io.embedding(f"{hf_prefix}shared.weight", f"{path_prefix}shared")]
    for stack, n in (("encoder", config.num_layers), ("decoder", config.num_decoder_layers)):
        for i in range(n):
            hf, ours = f"{stack}.block.{i}.layer", f"{stack}/block_{i}/layer"
            for name in ("q", "k", "v", "o"):
                maps += lin(f"{hf}.0.SelfAttention.{name}", f"{ours}_0/SelfAttention/{name}")
            if i == 0:
                maps.append(io.embedding(f"{hf_prefix}{hf}.0.SelfAttention.relative_attention_bias.weight",
                                         f"{path_prefix}{ours}_0/SelfAttention/relative_attention_bias"))
            maps += nrm(f"{hf}.0.layer_norm", f"{ours}_0/layer_norm")
            j = 1
            if stack == "decoder":
                for name in ("q", "k", "v", "o"):
                    maps += lin(f"{hf}.1.EncDecAttention.{name}", f"{ours}_1/EncDecAttention/{name}")
                maps += nrm(f"{hf}.1.layer_norm", f"{ours}_1/layer_norm")
                j = 2
            for name in ff:
                maps += lin(f"{hf}.{j}.DenseReluDense.{name}", f"{ours}_{j}/DenseReluDense/{name}")
            maps += nrm(f"{hf}.{j}.layer_norm", f"{ours}_{j}/layer_norm")
        maps += nrm(f"{stack}.final_layer_norm", f"{stack}/final_layer_norm")
    if not config.tie_word_embeddings:
        maps += lin("lm_head", "lm_head")
    return maps


def resolve_tied_head(config: T5Config, state: Mapping[str, np.ndarray], *, hf_prefix: str = "") -> T5Config:
    """``config`` with ``tie_word_embeddings`` as the weights say (transformers 5's rule): tied unless the state
    holds an ``lm_head.weight`` that differs from ``shared.weight``. The output scaling is left as configured.

    Example:
        >>> w = np.ones((4, 2), np.float32)
        >>> resolve_tied_head(T5Config(), {"shared.weight": w, "lm_head.weight": 2 * w}).tie_word_embeddings
        False
    """
    head = state.get(f"{hf_prefix}lm_head.weight")
    shared = state.get(f"{hf_prefix}shared.weight")
    tied = head is None or (shared is not None and np.array_equal(head, shared))
    return dataclasses.replace(config, tie_word_embeddings=tied, scale_decoder_outputs=config.scale_decoder_outputs)


def with_shared_alias(state: Mapping[str, np.ndarray], *, hf_prefix: str = "") -> dict[str, np.ndarray]:
    """The state with ``shared.weight`` filled from ``encoder.embed_tokens.weight`` if only the alias was saved."""
    state = dict(state)
    key = f"{hf_prefix}shared.weight"
    if key not in state:
        for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            if hf_prefix + alias in state:
                state[key] = state[hf_prefix + alias]
                break
    return state


def abstract_params(module: T5ForConditionalGeneration) -> dict[str, Any]:
    """The module's unboxed parameter tree as ``ShapeDtypeStruct`` leaves (no memory used)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return layers.unbox(jax.eval_shape(module.init, jax.random.key(0), ids, None, ids))["params"]


def load_t5(model_dir: str | os.PathLike, *, dtype: Any = jnp.float32) -> tuple[T5ForConditionalGeneration, dict]:
    """Builds a :class:`T5ForConditionalGeneration` from a local Hugging Face T5 / Flan-T5 checkpoint directory.

    Returns the module (compute ``dtype``; the head tied or not as the weights say) and its parameters as host
    (numpy, float32) arrays. A hub id fails with an offline message; an unknown ``feed_forward_proj`` raises
    :class:`~vlpeft_jax.errors.ConfigError` before any weight is read.
    """
    config = T5Config.from_hf(io.load_config(model_dir), dtype=dtype)
    state = with_shared_alias(io.load_state_dict(model_dir))
    if "shared.weight" not in state:
        raise CheckpointError(f"{model_dir}: no token table: neither 'shared.weight' nor "
                              "'encoder.embed_tokens.weight' is in the checkpoint (is it a T5?)")
    config = resolve_tied_head(config, state)
    model = T5ForConditionalGeneration(config)
    params = io.convert(state, t5_key_maps(config), abstract_params(model), source=str(model_dir))
    return model, params


def t5_to_hf_state_dict(params: Mapping[str, Any], config: T5Config) -> dict[str, np.ndarray]:
    """Our T5 parameters -> the tensors transformers saves for ``T5ForConditionalGeneration`` (float32).

    ``shared.weight`` once (no ``encoder/decoder.embed_tokens`` aliases), ``lm_head.weight`` only for an untied
    head, as ``save_pretrained`` writes them.

    Example:
        >>> cfg = T5Config(vocab_size=10, d_model=4, d_kv=2, d_ff=8, num_layers=1, num_heads=2)
        >>> zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_params(T5ForConditionalGeneration(cfg)))
        >>> t5_to_hf_state_dict(zeros, cfg)["decoder.block.0.layer.1.EncDecAttention.q.weight"].shape
        (4, 4)
    """
    return io.export_state(params, t5_key_maps(config), what="T5")
