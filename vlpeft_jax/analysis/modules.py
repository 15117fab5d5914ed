"""Module knockout: zero the attention (MHAT) or feed-forward (MLP) output at chosen positions and layers,
and the top-k Jaccard of the positions' final-layer "semantics" (thesis, seed ``004_21d0d480fe4006f4.txt``,
App. E.4, Eq. (7); App. E.7 applies the same Jaccard after an attention knockout).

- The attention branch ``a_i^ℓ`` (Eq. 7.1) is zeroed at the output of the attention's output projection,
  **after** its bias (LLaMA/OPT ``self_attn/o_proj``/``out_proj``, GPT-2 ``attn/c_proj``), through the
  ``linear`` hook point; the MLP branch ``f_i^ℓ`` through the ``mlp`` hook point (the whole feed-forward).
  Side inputs ``zero_attention`` / ``zero_mlp``: ``bool [L, b, t]``, the (layer, row, position) entries to
  zero.
- The window is the thesis' forward one, ``{ℓ, …, min(ℓ + k - 1, L - 1)}`` (spec A4;
  :func:`~vlpeft_jax.analysis.knockout.layer_windows` with ``mode="forward"``).
- Jaccard (Eq. 7): for each position i of the chosen set, the top-``k`` tokens of ``softmax(E h_i^L)`` (the
  final, normed state through the LM head, A15); the sets are ``(position, token)`` pairs, so each holds
  exactly ``k·|ℚ|`` elements (A14); ``dedupe=True`` compares the sets of tokens instead.

Example (Jaccard by hand: top-2 of two positions, one token of four differs):
    >>> a = np.array([[[0.5, 0.4, 0.1], [0.1, 0.5, 0.4]]])
    >>> b = np.array([[[0.5, 0.4, 0.1], [0.5, 0.1, 0.4]]])
    >>> float(topk_jaccard(a, b, np.ones((1, 2), bool), k=2)[0])  # 3 shared of 5 distinct pairs
    0.6
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlpeft_jax.analysis.knockout import Model, check_sets
from vlpeft_jax.errors import ConfigError, InputError
from vlpeft_jax.models import hooks

Array = jax.Array

BRANCHES = ("attention", "mlp")
ATTENTION_OUTPUTS = ("o_proj", "out_proj", "c_proj")
"""Names of the attention output projection in the decoder families (LLaMA/Qwen2, OPT, GPT-2)."""
ATTENTION_MODULES = ("self_attn", "attn")

hooks.register_side_input("zero_attention", "bool [layers, b, t]: attention-branch outputs to zero per layer and "
                                            "position (module knockout)")
hooks.register_side_input("zero_mlp", "bool [layers, b, t]: feed-forward outputs to zero per layer and position "
                                      "(module knockout)")


def _zeroing(name: str) -> Callable[..., Array]:
    def fn(ctx: hooks.HookContext, nxt: Callable[..., Array], *args: Array) -> Array:
        y = nxt(*args)
        mask = ctx.side_input(name)
        if mask is None or ctx.decode:
            return y
        keep = ~mask[ctx.layer]
        return jnp.where(keep[..., None], y, jnp.zeros_like(y))
    return fn


def module_knockout_hooks(model: Model) -> list[hooks.Hook]:
    """The ``linear`` hook on the decoder's attention output projections and the ``mlp`` hook on its
    feed-forward blocks that zero the entries of the side inputs ``zero_attention`` / ``zero_mlp``."""
    def attention_output(path: tuple[str, ...]) -> bool:
        return (model.in_decoder_layer(path) and len(path) >= 2 and path[-1] in ATTENTION_OUTPUTS
                and path[-2] in ATTENTION_MODULES)

    return [hooks.Hook("linear", _zeroing("zero_attention"), where=attention_output),
            hooks.Hook("mlp", _zeroing("zero_mlp"), where=model.in_decoder_layer)]


def topk_jaccard(probs_a: Any, probs_b: Any, positions: Any, k: int = 10, dedupe: bool = False) -> np.ndarray:
    """Eq. (7) per row: ``|W_a ∩ W_b| / |W_a ∪ W_b|`` of the top-``k`` tokens at ``positions``.

    ``probs_*``: ``[b, t, V]`` (probabilities or logits, only the order matters); ``positions``: ``bool
    [b, t]``. Rows with no position give NaN.
    """
    a, b = np.asarray(probs_a), np.asarray(probs_b)
    if a.shape != b.shape:
        raise InputError(f"shapes {a.shape} and {b.shape} differ")
    if not 1 <= k <= a.shape[-1]:
        raise ConfigError(f"top-k k={k}: must be between 1 and the vocabulary size {a.shape[-1]}")
    top = [np.argsort(-x, axis=-1, kind="stable")[..., :k] for x in (a, b)]
    return jaccard_of_topk(*top, positions, dedupe)


def jaccard_of_topk(top_a: Any, top_b: Any, positions: Any, dedupe: bool = False) -> np.ndarray:
    """:func:`topk_jaccard` from top-k token ids ``[b, t, k]`` (what :func:`make_module_sweep` returns)."""
    top_a, top_b, pos = np.asarray(top_a), np.asarray(top_b), np.asarray(positions, bool)
    if top_a.shape != top_b.shape or pos.shape != top_a.shape[:2]:
        raise InputError(f"top-k ids {top_a.shape}, {top_b.shape} and positions {pos.shape} do not match "
                         "([b, t, k], [b, t])")
    out = np.full(top_a.shape[0], np.nan)
    for row in range(top_a.shape[0]):
        idx = np.nonzero(pos[row])[0]
        if not idx.size:
            continue
        if dedupe:
            sa, sb = set(top_a[row, idx].ravel().tolist()), set(top_b[row, idx].ravel().tolist())
        else:
            sa = {(int(i), int(w)) for i in idx for w in top_a[row, i]}
            sb = {(int(i), int(w)) for i in idx for w in top_b[row, i]}
        out[row] = len(sa & sb) / len(sa | sb)
    return out


def make_module_sweep(model: Model, branch: str, k: int = 10) -> Callable[..., dict[str, Array]]:
    """A jitted ``sweep(params, inputs, positions, windows)`` -> ``clean [b, t, k]`` and ``knocked
    [C, b, t, k]``: the top-``k`` token ids of the final-layer next-token distribution at every position of
    the LM sequence, without and with the ``branch`` (``attention`` or ``mlp``) zeroed at ``positions``
    (``bool [b, t]``) in each window's layers (``windows``: ``bool [C, L]``). Feed them to
    :func:`jaccard_of_topk`."""
    if branch not in BRANCHES:
        raise ConfigError(f"module knockout branch {branch!r}; valid: {', '.join(BRANCHES)}")
    vocab = int(model.language_model.config.vocab_size)
    if not 1 <= k <= vocab:
        raise ConfigError(f"top-k k={k}: must be between 1 and the vocabulary size {vocab}")
    side_name = "zero_attention" if branch == "attention" else "zero_mlp"
    module_hooks = module_knockout_hooks(model)

    def top(out: Any) -> Array:
        return jax.lax.top_k(out.logits.astype(jnp.float32), k)[1]

    def sweep(params: Any, inputs: Mapping[str, Any], positions: Array, windows: Array) -> dict[str, Array]:
        clean = top(model(params, inputs))

        def one(window: Array) -> Array:
            side = {side_name: window[:, None, None] & positions[None]}
            return top(model(params, inputs, side, module_hooks))

        return {"clean": clean, "knocked": jax.lax.map(one, windows)}

    jitted = jax.jit(sweep)

    def run(params: Any, inputs: Mapping[str, Any], positions: Any, windows: Any) -> dict[str, Array]:
        windows = np.asarray(windows, bool)
        if windows.ndim != 2 or windows.shape[1] != model.num_layers:
            raise InputError(f"windows have shape {windows.shape}; expected [centres, {model.num_layers}]")
        positions = np.asarray(positions, bool)
        check_sets(positions, positions, inputs, model, names=("zeroed positions",) * 2)
        return jitted(params, inputs, jnp.asarray(positions), jnp.asarray(windows))

    return run
