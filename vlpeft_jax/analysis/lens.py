"""Logit lens: next-token distributions read from every layer's residual stream (thesis, seed
``004_21d0d480fe4006f4.txt``, §7.7, Eq. 7.8: ``P_N^ℓ = softmax(E h_N^ℓ)``; nostalgebraist 2020).

:func:`logit_lens` returns ``L + 1`` distributions per chosen position: index 0 is the embedding output,
index ℓ the output of layer ℓ, index L the model's final state after its final norm (Hugging Face's
``output_hidden_states`` convention, which our decoders follow). The intermediate states are projected
**without** the final norm by default, as the thesis' code does (spec A12); ``final_norm=True`` applies the
decoder's final norm to them first (the usual logit lens). Either way the last entry equals the model's
output distribution.

The unembedding is the model's own LM head, reached through the ``final_hidden`` hook point in a second,
one-token call, so tied and untied heads and methods that hook the head are all handled. The final norm is
the decoder's own module (LLaMA/Qwen2 ``model.norm``, GPT-2 ``transformer.ln_f``, OPT
``model.decoder.final_layer_norm``).

Example (a tiny random LLaMA: the last layer of the lens is the model's output):
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from vlpeft_jax.analysis.knockout import Model
    >>> from vlpeft_jax.models.llama import LlamaConfig, LlamaForCausalLM
    >>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    >>> ids = jnp.arange(1, 6)[None]
    >>> params = {"base": lm.init(jax.random.key(0), ids)["params"], "peft": {}}
    >>> inputs = {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}
    >>> probs = logit_lens(Model(lm), params, inputs, np.array([[4]]))
    >>> probs.shape
    (1, 3, 1, 32)
    >>> out = jax.nn.softmax(lm.apply({"params": params["base"]}, ids).logits[0, 4])
    >>> bool(np.allclose(probs[0, -1, 0], out, atol=1e-6))
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlpeft_jax.analysis.knockout import Model
from vlpeft_jax.errors import ConfigError, InputError
from vlpeft_jax.models import hooks

Array = jax.Array

FINAL_NORMS = (("model", "norm"), ("transformer", "ln_f"), ("model", "decoder", "final_layer_norm"))
"""Where a decoder family keeps its final norm (attribute paths from the ``*ForCausalLM`` module)."""


def final_norm_module(lm: Any) -> Any:
    """The decoder's final norm submodule (bound ``lm``); :class:`ConfigError` for a family without one."""
    for path in FINAL_NORMS:
        obj = lm
        try:
            for name in path:
                obj = getattr(obj, name)
        except AttributeError:
            continue
        return obj
    raise ConfigError(f"{type(lm).__name__}: no final norm at any of "
                      f"{', '.join('.'.join(p) for p in FINAL_NORMS)}; the logit lens knows LLaMA, GPT-2 and OPT")


def gather_positions(h: Array, positions: Array) -> Array:
    """``h [b, t, d]`` at ``positions`` ``int [b, P]`` -> ``[b, P, d]``."""
    return jnp.take_along_axis(h, positions[..., None], axis=1)


def head_logits(model: Model, params: Mapping[str, Any], states: Array) -> Array:
    """The model's LM head on arbitrary states ``[b, n, d]`` -> logits ``[b, n, V]`` (through ``final_hidden``)."""
    b = states.shape[0]
    ids = jnp.zeros((b, 1), jnp.int32)
    swap = hooks.Hook("final_hidden", lambda ctx, nxt, h: states.astype(h.dtype))
    inputs = {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}
    return model(params, inputs, extra_hooks=[swap], logits_to_keep=0).logits


def apply_final_norm(model: Model, params: Mapping[str, Any], states: Array) -> Array:
    """The decoder's final norm on ``states [..., d]``."""
    prefix = model.decoder_prefix

    def norm(module: Any, x: Array) -> Array:
        lm = getattr(module, prefix[0]) if prefix else module
        return final_norm_module(lm)(x)

    return model.module.apply({"params": params["base"]}, states, method=norm)


def lens_states(model: Model, params: Mapping[str, Any], inputs: Mapping[str, Any], positions: Array,
                final_norm: bool = False) -> Array:
    """``[b, L+1, P, d]``: the residual stream at ``positions`` after each layer (0 = embeddings; L = the
    model's final, normed state); ``final_norm`` also norms the intermediate ones."""
    out = model(params, inputs, logits_to_keep=1)
    states = jnp.stack([gather_positions(h, positions) for h in out.hidden_states], axis=1)
    if final_norm:
        states = jnp.concatenate([apply_final_norm(model, params, states[:, :-1]), states[:, -1:]], axis=1)
    return states


def logit_lens(model: Model, params: Mapping[str, Any], inputs: Mapping[str, Any], positions: Any,
               final_norm: bool = False) -> np.ndarray:
    """Next-token probabilities ``[b, L+1, P, V]`` at ``positions`` (``int [b, P]`` of the LM sequence,
    visual tokens included) from every layer (Eq. 7.8); see the module docstring."""
    positions = np.asarray(positions)
    if positions.ndim != 2:
        raise InputError(f"positions have shape {positions.shape}; expected [batch, P] (int)")
    return np.asarray(_lens(model, final_norm)(params, dict(inputs), jnp.asarray(positions, jnp.int32)))


_CACHE: dict[tuple[int, bool], Any] = {}


def _lens(model: Model, final_norm: bool) -> Any:
    key = (id(model), final_norm)
    if key not in _CACHE or _CACHE[key][0] is not model:
        def fn(params: Any, inputs: Any, positions: Array) -> Array:
            states = lens_states(model, params, inputs, positions, final_norm)
            b, n, p, d = states.shape
            logits = head_logits(model, params, states.reshape(b, n * p, d))
            return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(b, n, p, -1)

        _CACHE[key] = (model, jax.jit(fn))
    return _CACHE[key][1]


def token_ranks(probs: np.ndarray, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Rank (0 = the most probable) of ``token_ids`` (``int [b]``) in ``probs [b, L+1, P, V]`` -> ``[b, L+1, P]``.

    Example:
        >>> token_ranks(np.array([[[[0.1, 0.6, 0.3]]]]), [2]).tolist()
        [[[1]]]
    """
    probs = np.asarray(probs)
    ids = _ids(token_ids, probs.shape[-1])
    chosen = np.take_along_axis(probs, ids, axis=-1)
    return (probs > chosen).sum(-1)


def token_probs(probs: np.ndarray, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Probability of ``token_ids`` (``int [b]``) per layer and position: ``[b, L+1, P]``."""
    ids = _ids(token_ids, np.shape(probs)[-1])
    return np.take_along_axis(np.asarray(probs), ids, axis=-1)[..., 0]


def _ids(token_ids: Sequence[int] | np.ndarray, vocab: int) -> np.ndarray:
    ids = np.asarray(token_ids).reshape(-1)
    bad = ids[(ids < 0) | (ids >= vocab)]
    if bad.size:
        raise InputError(f"token id {int(bad[0])} is outside the vocabulary (0..{vocab - 1})")
    return ids.reshape(-1, 1, 1, 1)
