"""Attention knockout: block attention edges from source to target positions in a window of layers and
measure how the probability of the predicted token changes (thesis, seed ``004_21d0d480fe4006f4.txt``,
ch. 7 §7.3.2, Eq. 7.7; method of Geva et al. 2023).

Edges are blocked through the ``attention`` hook point of the decoder's layers, so every decoder family here
(LLaMA/Qwen2 with grouped-query attention, GPT-2, OPT) and every VLM built on one (prefix VLMs such as LLaVA,
Q-Former VLMs) is analysed without model code of its own. The pattern is the side input ``knockout``
(``bool [layers, b, t, t]``): entry ``[l, i, q, k]`` blocks query position ``q`` from key position ``k`` in
layer ``l`` of row ``i``.

Conventions (the spec sheet ``specs/knockout.md`` §2-5 and its ambiguities A1-A8):

- **Direction** (A1): "S ↛ T" blocks the *target* positions T (queries) from attending to the *source*
  positions S (keys): ``blocked[q, k] = (q ∈ T) ∧ (k ∈ S)`` (:func:`block_pattern`), the stated intent of
  Eq. 7.7 and what the thesis' code does; Eq. 7.7 read literally (row s ∈ S) would block the other way.
- **Heads** (A7): every head of a blocked layer, every query head of a key/value group under GQA.
- **Mask value** (A6): blocked entries get :data:`~vlpeft_jax.models.layers.NEG_INF` with ``jnp.where`` (not
  added to the causal bias). A query whose every key is blocked (possible only when S covers all its
  visible keys) has no information flowing in: its attention output is **zero** (``fully_blocked="zero"``,
  the default), or the sweep refuses such a pattern before running (``"raise"``).
- **Windows** (§4, A2-A3): a window of ``k`` layers centred on each layer ℓ and clipped at both ends,
  ``[max(0, ℓ - ⌊k/2⌋), min(L, ℓ + ⌈k/2⌉))`` (:func:`layer_windows`); ``mode="forward"`` gives
  ``[ℓ, min(L, ℓ + k))`` (the module knockout's window, A4). Every centre ℓ = 0 … L-1 is one forward pass.
- **Metric** (§5, A8): ``p1`` is the probability of the clean model's greedy token at the last position,
  ``p2`` that of the same token id after knockout, ``p_c = (p2 - p1) / p1 × 100``
  (:func:`relative_change`). Knockout changes only this prefill pass.

One compiled function serves every window and pattern (:func:`make_sweep`): the window matrix and the
position sets are traced arrays, and the centres are swept with ``jax.lax.map``.

Example (a tiny random LLaMA; blocking nothing changes nothing):
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from vlpeft_jax.models.llama import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                   num_attention_heads=2, num_key_value_heads=1)
    >>> lm = LlamaForCausalLM(cfg)
    >>> ids = jnp.arange(1, 7)[None]
    >>> params = {"base": lm.init(jax.random.key(0), ids)["params"], "peft": {}}
    >>> sweep = make_sweep(Model(lm))
    >>> none = np.zeros((1, 6), bool)
    >>> res = sweep(params, {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}, none, none,
    ...             layer_windows(1, 2))
    >>> res["p_c"].shape, float(np.abs(res["p_c"]).max())
    ((2, 1), 0.0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlpeft_jax.errors import ConfigError, InputError
from vlpeft_jax.models import hooks, layers
from vlpeft_jax.peft import base as peft_base
from vlpeft_jax.tree import layer_index

Array = jax.Array

WINDOW_MODES = ("centered", "forward")
FULLY_BLOCKED = ("zero", "raise")


# ------------------------------------------------------------------------------------------ the model


@dataclasses.dataclass(frozen=True)
class Model:
    """A decoder-only LM or a VLM built on one, with the PEFT methods to keep active.

    ``params`` are ``{"base": ..., "peft": {name: ...}}`` (what runs save); ``inputs`` are the model's keyword
    arguments (``input_ids``, ``attention_mask``, and ``pixel_values`` for a VLM). Sequence positions in this
    module count the language model's sequence, visual tokens included (a prefix VLM's visual tokens come
    first).

    Attributes:
      module: the Flax module (``LlamaForCausalLM``, ``PrefixVLM``, ...).
      methods: ``(name, method)`` pairs, as the tasks hold them; their parameters are ``params["peft"][name]``.
    """

    module: Any
    methods: tuple[tuple[str, Any], ...] = ()

    def __call__(self, params: Mapping[str, Any], inputs: Mapping[str, Any],
                 side_inputs: Mapping[str, Any] | None = None, extra_hooks: Sequence[hooks.Hook] = (),
                 logits_to_keep: int = 0) -> Any:
        active = [(m, params["peft"][n]) for n, m in self.methods]
        with hooks.use_hooks(*extra_hooks):
            return peft_base.apply_with(self.module.apply, active, {"params": params["base"]},
                                        side_inputs=side_inputs, logits_to_keep=logits_to_keep, **dict(inputs))

    @property
    def language_model(self) -> Any:
        """The decoder (the module itself for a language model; ``language_model`` of a VLM)."""
        return getattr(self.module, "language_model", self.module)

    @property
    def num_layers(self) -> int:
        """``L``, the decoder's layers."""
        lm = self.language_model
        if getattr(lm, "is_encoder_decoder", False) or not hasattr(lm.config, "num_hidden_layers"):
            raise ConfigError(f"{type(lm).__name__}: the information-flow analysis needs a decoder-only language "
                              "model (LLaMA, Qwen2, GPT-2, OPT) or a VLM built on one")
        return int(lm.config.num_hidden_layers)

    @property
    def decoder_prefix(self) -> tuple[str, ...]:
        """Where the decoder's modules sit in the paths of hook points (``("language_model",)`` in a VLM)."""
        return ("language_model",) if hasattr(self.module, "language_model") else ()

    def in_decoder_layer(self, path: tuple[str, ...]) -> bool:
        """True for a module inside one of the decoder's layers (not the vision tower, the connector or a
        Q-Former, whose layers the analysis leaves alone)."""
        prefix = self.decoder_prefix
        return tuple(path[:len(prefix)]) == prefix and any(layer_index(p) is not None for p in path[len(prefix):])


# -------------------------------------------------------------------------------------- windows, sets


def layer_window(center: int, k: int, num_layers: int, mode: str = "centered") -> list[int]:
    """The layers blocked for centre layer ``center``: ``k`` layers centred on it (clipped at both ends;
    for even ``k`` the extra layer comes after the centre) or, ``mode="forward"``, ``center … center+k-1``.

    Example (the spec's window arithmetic, L = 40, k = 9):
        >>> layer_window(0, 9, 40), layer_window(20, 9, 40)[0], layer_window(39, 9, 40)
        ([0, 1, 2, 3, 4], 16, [35, 36, 37, 38, 39])
    """
    if mode not in WINDOW_MODES:
        raise ConfigError(f"window mode {mode!r}; valid: {', '.join(WINDOW_MODES)}")
    if k < 1:
        raise ConfigError(f"window k={k}: must be >= 1 layer")
    if not 0 <= center < num_layers:
        raise ConfigError(f"centre layer {center} is outside the model's layers 0..{num_layers - 1}")
    lo, hi = (center - k // 2, center + (k + 1) // 2) if mode == "centered" else (center, center + k)
    return list(range(max(0, lo), min(num_layers, hi)))


def layer_windows(k: int, num_layers: int, mode: str = "centered", max_k: int | None = None) -> np.ndarray:
    """``bool [L, L]``: row ℓ marks the layers blocked for centre layer ℓ (:func:`layer_window`).

    ``max_k`` (default ``2L - 1``, which already covers every layer from every centre): a larger ``k`` is
    refused, since a window wider than the model says something other than the user meant.
    """
    limit = 2 * num_layers - 1 if max_k is None else max_k
    if k > limit:
        raise ConfigError(f"window k={k} is larger than this model allows ({limit}: with {num_layers} layers, "
                          f"k = {2 * num_layers - 1} already blocks every layer from every centre)")
    out = np.zeros((num_layers, num_layers), bool)
    for c in range(num_layers):
        out[c, layer_window(c, k, num_layers, mode)] = True
    return out


def block_pattern(source: Array, target: Array) -> Array:
    """``bool [b, t, t]``: query ``q`` may not attend to key ``k`` where ``target[q] & source[k]`` (A1).

    Example:
        >>> block_pattern(np.array([[1, 0, 0]], bool), np.array([[0, 0, 1]], bool)).astype(int)[0].tolist()
        [[0, 0, 0], [0, 0, 0], [1, 0, 0]]
    """
    return jnp.asarray(target)[:, :, None] & jnp.asarray(source)[:, None, :]


def fully_blocked_rows(source: np.ndarray, target: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """``bool [b, t]``: target queries that would have no visible key left (every real key at or before
    them is a source). ``attention_mask`` ``[b, t]`` marks the real positions of the LM sequence."""
    source, target, real = (np.asarray(a, bool) for a in (source, target, attention_mask))
    visible = np.cumsum(real & ~source, axis=1) > 0  # some real non-source key at or before q
    return target & real & ~visible


def relative_change(p1: Array, p2: Array) -> Array:
    """``(p2 - p1) / p1 × 100``, the relative change of the answer probability in percent (thesis §7.4).

    Example:
        >>> relative_change(np.array([0.5, 0.5, 0.5]), np.array([0.5, 0.0, 1.0])).tolist()
        [0.0, -100.0, 100.0]
    """
    return (p2 - p1) / p1 * 100.0


# ------------------------------------------------------------------------------------------ the hook


def knockout_hook(model: Model, fully_blocked: str = "zero") -> hooks.Hook:
    """The ``attention`` hook that blocks the edges of the side input ``knockout`` in the decoder's layers.

    ``knockout`` is ``bool [b, tq, tk]`` (every layer) or ``[L, b, tq, tk]`` (per layer). Runs only in a
    prefill (not in cached decoding steps). Keys a PEFT method puts before the sequence (prefix tuning's
    virtual tokens) are not positions of the sequence and are never blocked. ``fully_blocked="zero"``
    zeroes the attention output of a query that has no allowed key left (A6); with ``"raise"`` callers check
    patterns first (:func:`fully_blocked_rows`), and the hook computes only the mask.
    """
    if fully_blocked not in FULLY_BLOCKED:
        raise ConfigError(f"fully_blocked={fully_blocked!r}; valid: {', '.join(FULLY_BLOCKED)}")

    def fn(ctx: hooks.HookContext, nxt: Callable[..., Array], q: Array, k: Array, v: Array,
           bias: Array | None) -> Array:
        pattern = ctx.side_input("knockout")
        if pattern is None or ctx.decode:
            return nxt(q, k, v, bias)
        if pattern.ndim == 4:
            pattern = pattern[ctx.layer]
        extra = k.shape[1] - pattern.shape[-1]
        if extra > 0:  # keys a PEFT method put before the sequence (prefix tuning): never blocked
            pattern = jnp.pad(pattern, ((0, 0), (0, 0), (extra, 0)))
        blocked = pattern[:, None, :, :]  # every head
        if bias is None:
            bias = jnp.zeros((1, 1, q.shape[1], k.shape[1]), jnp.float32)
        new_bias = jnp.where(blocked, layers.NEG_INF, bias)
        out = nxt(q, k, v, new_bias)
        if fully_blocked == "raise":
            return out
        allowed_before = bias > layers.NEG_INF / 2
        emptied = ~jnp.any(allowed_before & ~blocked, axis=-1) & jnp.any(allowed_before, axis=-1)  # [b,1|h,tq]
        emptied = jnp.broadcast_to(emptied, (emptied.shape[0], emptied.shape[1], q.shape[1]))
        return jnp.where(jnp.swapaxes(emptied, 1, 2)[..., None], jnp.zeros_like(out), out)

    return hooks.Hook("attention", fn, where=model.in_decoder_layer)


# ------------------------------------------------------------------------------------------ the sweep


def last_position_probs(out: Any) -> Array:
    """Softmax over the vocabulary at the last position ``[b, V]`` (float32)."""
    return jax.nn.softmax(out.logits[:, -1].astype(jnp.float32), axis=-1)


def check_left_padded(attention_mask: Any) -> None:
    """The sweep reads the prediction at the sequence's last position: every row must end with a real token."""
    mask = np.asarray(attention_mask)
    bad = np.nonzero(mask[:, -1] == 0)[0]
    if bad.size:
        raise InputError(f"rows {bad.tolist()[:10]} end with padding; the analysis reads the prediction at the "
                         "last position, so pad on the left (EvalBatches does)")


def make_sweep(model: Model, fully_blocked: str = "zero",
               token_ids: bool = False) -> Callable[..., dict[str, Array]]:
    """A jitted ``sweep(params, inputs, source, target, windows[, token])`` -> ``p1 [b]``, ``token [b]``,
    ``p2 [C, b]``, ``p_c [C, b]``.

    ``source``/``target``: ``bool [b, t]`` position sets of the LM sequence; ``windows``: ``bool [C, L]``, the
    layers blocked for each of C windows (:func:`layer_windows`). ``token`` (with ``token_ids=True``):
    ``int [b]``, the token whose probability is read (default: the clean model's greedy token). Compiles
    once per shape; the windows and sets are traced, so every pair and window size reuses it.
    """
    hook = knockout_hook(model, fully_blocked)

    def sweep(params: Any, inputs: Mapping[str, Any], source: Array, target: Array, windows: Array,
              token: Array | None = None) -> dict[str, Array]:
        clean = last_position_probs(model(params, inputs, logits_to_keep=1))
        if token is None:
            token = jnp.argmax(clean, axis=-1)
        rows = jnp.arange(clean.shape[0])
        p1 = clean[rows, token]
        pattern = block_pattern(source, target)

        def one(window: Array) -> Array:
            side = {"knockout": window[:, None, None, None] & pattern[None]}
            return last_position_probs(model(params, inputs, side, [hook], logits_to_keep=1))[rows, token]

        p2 = jax.lax.map(one, jnp.asarray(windows, bool))
        return {"p1": p1, "token": token, "p2": p2, "p_c": relative_change(p1[None], p2)}

    jitted = jax.jit(sweep)

    def run(params: Any, inputs: Mapping[str, Any], source: Any, target: Any, windows: Any,
            token: Any = None) -> dict[str, Array]:
        source, target, windows = np.asarray(source, bool), np.asarray(target, bool), np.asarray(windows, bool)
        check_sets(source, target, inputs, model)
        if windows.ndim != 2 or windows.shape[1] != model.num_layers:
            raise InputError(f"windows have shape {windows.shape}; expected [centres, {model.num_layers}] "
                             "(layer_windows)")
        if fully_blocked == "raise":
            rows = fully_blocked_rows(source, target, sequence_mask(model, inputs))
            if rows.any():
                b, q = np.argwhere(rows)[0]
                raise InputError(f"row {b}, position {q}: every key it sees is in the source set, so the "
                                 "knockout leaves it nothing to attend to (fully_blocked='raise')")
        if token_ids and token is None:
            raise InputError("this sweep reads given token ids: pass token")
        if token is not None:
            check_token_ids(token, model)
        return jitted(params, inputs, source, target, windows, None if token is None else jnp.asarray(token))

    return run


def check_token_ids(token: Any, model: Model) -> None:
    """Token ids must lie in the vocabulary of the decoder's head (:class:`InputError` naming the bad id)."""
    vocab = int(model.language_model.config.vocab_size)
    ids = np.asarray(token).reshape(-1)
    bad = ids[(ids < 0) | (ids >= vocab)]
    if bad.size:
        raise InputError(f"token id {int(bad[0])} is outside the vocabulary (0..{vocab - 1})")


def sequence_mask(model: Model, inputs: Mapping[str, Any]) -> np.ndarray:
    """``bool [b, t]``: the real positions of the LM sequence (visual tokens a prefix VLM prepends included)."""
    mask = np.asarray(inputs.get("attention_mask", np.ones_like(np.asarray(inputs["input_ids"]))), bool)
    visual = num_prepended(model, inputs)
    return np.concatenate([np.ones((mask.shape[0], visual), bool), mask], axis=1) if visual else mask


def num_prepended(model: Model, inputs: Mapping[str, Any]) -> int:
    """Visual tokens a prefix VLM puts before the text (0 for a language model or placeholder layouts)."""
    m = model.module
    if inputs.get("pixel_values") is None or not hasattr(m, "num_image_tokens"):
        return 0
    if getattr(m, "image_token_id", None) is not None:
        return 0
    return int(m.num_image_tokens)


def check_sets(source: np.ndarray, target: np.ndarray, inputs: Mapping[str, Any], model: Model,
               allow_overlap: bool = True, names: tuple[str, str] = ("source", "target")) -> None:
    """Left padding, then the sets' shapes and padding (:class:`InputError` naming the set)."""
    real = sequence_mask(model, inputs)
    check_left_padded(inputs.get("attention_mask", real))
    for name, s in zip(names, (source, target), strict=True):
        if s.shape != real.shape:
            raise InputError(f"{name} set has shape {s.shape}; the sequence is {real.shape} (batch, positions "
                             "including visual tokens)")
        if (s & ~real).any():
            b, q = np.argwhere(s & ~real)[0]
            raise InputError(f"{name} set holds padding position {q} of row {b}")
    if not allow_overlap and (source & target).any():
        raise InputError("source and target sets overlap")
