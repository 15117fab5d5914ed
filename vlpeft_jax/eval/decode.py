"""Jitted greedy and beam-search decoding with a KV cache, for decoders and vision-language models.

Decoding is generic over a *step function* ``apply_fn(params, inputs, attention_mask, cache, decode)``
returning an object with ``.logits`` ``[b, t, vocab]`` and ``.cache`` (a :class:`DecoderOutput`):

- the **prefill** call gets the prompt as given to :func:`generate` (token ids ``[b, t]``, embeddings
  ``[b, t, d]``, or a dict of keyword arguments such as ``{"input_ids": ..., "pixel_values": ...}`` for a
  VLM) with its left-padded ``attention_mask`` and ``decode=False``;
- every later call gets one new token per row, ids ``[b', 1]`` with a mask of ones and ``decode=True``.

:class:`ModuleApply` builds such a function from any module following the calling convention of
:mod:`vlpeft_jax.models.outputs` (GPT-2, LLaMA, OPT, ``PrefixVLM``, ``QFormerVLM``), encoder-decoders included.

**Encoder-decoders** (a module with a true ``is_encoder_decoder`` attribute: T5, or a VLM whose language model
is one). :func:`generate` is unchanged; the convention lives in the module and in :class:`ModuleApply`:

- the prefill passes the prompt as the *encoder* input (``input_ids``/``inputs_embeds``/the dict, with the
  ``attention_mask``) and no ``decoder_input_ids``: the module runs the encoder once, starts the decoder from
  its ``decoder_start_token_id`` (so the prefill's logits are ``[b, 1, vocab]`` and the cache is sized
  ``1 + max_new_tokens``) and fills the cache's cross-attention keys/values and encoder mask (a dict prompt
  may also carry ``decoder_input_ids``, a decoder prefix);
- every step calls ``module.apply(variables, decoder_input_ids=tokens [b', 1], cache=cache, decode=True)``:
  no encoder input, so the encoder is not run again; the mask passed to the step function is ignored (the
  decoder has no padding and the encoder mask is in the cache).

A VLM wrapping an encoder-decoder LM accepts ``decoder_input_ids`` and, when it is called without an encoder
input, passes the step through to its language model. The cache (``T5Cache``) is a pytree whose leaves all
have the batch axis first (except the write index), so beam search's row repeat and gather need nothing
special.

The prompt is processed once; then a ``lax.while_loop`` runs single-token steps against the cache until every
sequence has finished or ``max_new_tokens`` tokens were produced. The whole of :func:`generate` is one ``jax.jit``,
compiled once per step function, input shapes, ``method``, ``num_beams``, ``max_new_tokens`` and number of
EOS ids; the EOS and pad ids, ``length_penalty`` and ``early_stopping`` are traced values (changing them
does not recompile).

Beam search reproduces transformers' ``GenerationMixin._beam_search`` (transformers 5.23,
``generation/utils.py``) step for step: the top ``max(2, 1 + n_eos) * num_beams`` continuations over all
beams; the best ``num_beams`` of them that did not stop keep running; those among the top ``num_beams``
that end in EOS (or reach ``max_new_tokens``) become finished hypotheses scored
``sum_logprob / generated_len ** length_penalty``, where ``generated_len`` counts the new tokens
including the EOS (not the prompt); ``early_stopping`` is ``True`` (stop a row once it has ``num_beams``
finished hypotheses), ``False`` (stop when the best running beam, length-normalised at the current
length, cannot beat the worst finished one) or ``"never"`` (as False, but with ``length_penalty > 0``
the best running beam is normalised at the maximum length). The returned score is transformers'
``sequences_scores``.

Hooks (:mod:`vlpeft_jax.models.hooks`) are read while tracing: activate them *inside* ``apply_fn``
(e.g. a step function that enters ``use_hooks``), not around :func:`generate`, or a compiled
:func:`generate` would be reused with the hooks it was first traced with.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from vlpeft_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(vocab_size=32, max_position_embeddings=32, hidden_size=8,
    ...                                    num_hidden_layers=1, num_attention_heads=2))
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 2), jnp.int32))["params"]
    >>> step = ModuleApply(model)
    >>> ids = jnp.array([[0, 5, 6], [7, 8, 9]]); mask = jnp.array([[0, 1, 1], [1, 1, 1]])
    >>> out = generate(step, params, ids, mask, max_new_tokens=4, eos_token_id=3, pad_token_id=1)
    >>> out.sequences.shape, out.scores.shape
    ((2, 4), (2,))
    >>> generate(step, params, ids, mask, max_new_tokens=4, eos_token_id=3, pad_token_id=1,
    ...          method="beam", num_beams=2).sequences.shape
    (2, 4)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from vlpeft_jax.errors import ConfigError, InputError

Array = jax.Array

METHODS = ("greedy", "beam")
_BLOCKED = -1.0e9  # transformers' score for candidates that must not be selected (finite, as there)


class StepFn(Protocol):
    """``apply_fn(params, inputs, attention_mask, cache, decode) -> output with .logits and .cache``."""

    def __call__(self, params: Any, inputs: Any, attention_mask: Array, cache: Any, decode: bool) -> Any: ...


@flax.struct.dataclass
class GenerateOutput:
    """What :func:`generate` returns.

    Attributes:
      sequences: ``[b, max_new_tokens]`` int32, the generated tokens only (not the prompt), EOS included,
        ``pad_token_id`` after it.
      scores: ``[b]`` float32, ``sum of the generated tokens' log-probabilities / length ** length_penalty``
        (beam search: transformers' ``sequences_scores``; greedy: the same formula on the greedy path).
      lengths: ``[b]`` int32, generated tokens up to and including the first EOS.
      logits: greedy with ``output_logits=True``: ``[b, max_new_tokens, vocab]`` float32, the logits each
        token was chosen from (zeros after a row finished or the loop stopped); else None.
    """

    sequences: Array
    scores: Array
    lengths: Array
    logits: Array | None = None


@dataclasses.dataclass(frozen=True)
class ModuleApply:
    """The step function of a module following :mod:`vlpeft_jax.models.outputs` (decoder or VLM).

    Prefill inputs: token ids ``[b, t]`` (int), embeddings ``[b, t, d]`` (float, passed as
    ``inputs_embeds``), or a dict of keyword arguments for the module (e.g. ``input_ids`` and
    ``pixel_values`` for a VLM). Decode steps pass ids positionally; a VLM then runs its language model.
    For an encoder-decoder (``module.is_encoder_decoder``) the prefill inputs are the encoder's and decode
    steps pass ``decoder_input_ids=`` (see the module docstring).
    It is hashable (a frozen dataclass of a module), so :func:`generate` compiles once per module.

    Attributes:
      module: the Flax module; its ``apply`` receives ``{"params": params}``.
    """

    module: nn.Module

    def __call__(self, params: Any, inputs: Any, attention_mask: Array, cache: Any, decode: bool) -> Any:
        variables = {"params": params}
        if decode and getattr(self.module, "is_encoder_decoder", False):
            # the encoder ran at the prefill (its output is in the cache): only the decoder steps
            return self.module.apply(variables, decoder_input_ids=inputs, cache=cache, decode=True)
        if isinstance(inputs, dict):
            return self.module.apply(variables, attention_mask=attention_mask, cache=cache, decode=decode, **inputs)
        if jnp.issubdtype(inputs.dtype, jnp.integer):
            return self.module.apply(variables, inputs, attention_mask, cache=cache, decode=decode)
        return self.module.apply(variables, None, attention_mask, inputs_embeds=inputs, cache=cache, decode=decode)

    def init_cache(self, batch: int, max_len: int) -> Any:
        """An empty cache from the module's (or, for a VLM, its ``language_model``'s) ``init_cache``."""
        for owner in (self.module, getattr(self.module, "language_model", None)):
            if owner is not None and hasattr(owner, "init_cache"):
                return owner.init_cache(batch, max_len)
        raise ConfigError(f"{type(self.module).__name__} has no init_cache (nor a language_model with one); "
                          "pass cache_init_fn=(batch, max_len) -> cache to generate()")


def generate(apply_fn: StepFn, params: Any, inputs: Any, attention_mask: Array, *,
             max_new_tokens: int, eos_token_id: int | Sequence[int] | None, pad_token_id: int,
             method: str = "greedy", num_beams: int = 1, length_penalty: float = 1.0,
             early_stopping: bool | str = False, cache_init_fn: Callable[[int, int], Any] | None = None,
             output_logits: bool = False) -> GenerateOutput:
    """Generates up to ``max_new_tokens`` tokens per prompt with a KV cache (greedy or beam search).

    Args:
      apply_fn: the step function (see the module docstring), e.g. ``ModuleApply(model)``. It is a static
        argument of the compiled function: create it once, not per call.
      params: the parameters ``apply_fn`` takes (any pytree).
      inputs: the prompt for the prefill: ids ``[b, t]``, embeddings ``[b, t, d]`` or a dict of keyword
        arguments (``ModuleApply``); left-padded.
      attention_mask: ``[b, t]``, 1 for prompt tokens, 0 for left padding.
      max_new_tokens: tokens to generate at most.
      eos_token_id: end-of-sequence id(s); None never stops early.
      pad_token_id: written after a sequence's EOS.
      method: ``"greedy"`` or ``"beam"``.
      num_beams: beams per prompt (beam search).
      length_penalty: exponent of the generated length dividing the summed log-probabilities.
      early_stopping: ``True``, ``False`` or ``"never"``, as transformers (see the module docstring).
      cache_init_fn: ``(batch, max_len) -> empty cache``; default ``apply_fn.init_cache``. ``max_len`` is
        the length the prefill really processes (visual or prompt tokens added by the model or its hooks
        included, found by shape inference) plus ``max_new_tokens``.
      output_logits: greedy only: also return each step's logits.

    Returns:
      A :class:`GenerateOutput`.
    """
    if method not in METHODS:
        raise ConfigError(f"decoding method {method!r}; valid: {', '.join(METHODS)}")
    if not (isinstance(early_stopping, bool) or early_stopping == "never"):
        raise ConfigError(f"early_stopping={early_stopping!r}; valid: True, False, 'never'")
    if int(max_new_tokens) < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens}; must be >= 1")
    if int(num_beams) < 1:
        raise ConfigError(f"num_beams={num_beams}; must be >= 1")
    if output_logits and method != "greedy":
        raise ConfigError("output_logits is only available for method='greedy'")
    if getattr(attention_mask, "ndim", None) != 2:
        raise InputError(f"attention_mask must be [batch, prompt_length], got shape "
                         f"{getattr(attention_mask, 'shape', None)}")
    if cache_init_fn is None:
        cache_init_fn = getattr(apply_fn, "init_cache", None)
        if cache_init_fn is None:
            raise ConfigError(f"{type(apply_fn).__name__} has no init_cache; pass cache_init_fn=(batch, max_len) "
                              "-> cache to generate()")
    if eos_token_id is None:
        eos: tuple[int, ...] = ()
    elif isinstance(eos_token_id, int):
        eos = (int(eos_token_id),)
    else:
        eos = tuple(int(e) for e in eos_token_id)
    # transformers keeps max(2, 1 + n_eos) * num_beams candidates per step, so that num_beams can run on
    # although up to n_eos * num_beams of them end in EOS.
    beams_to_keep = max(2, 1 + len(eos)) * int(num_beams) if method == "beam" else 0
    shape = _Shape(method=method, max_new_tokens=int(max_new_tokens), num_beams=int(num_beams),
                   beams_to_keep=beams_to_keep, output_logits=bool(output_logits))
    # Token ids, the length penalty and the stopping rule are traced values: changing them does not
    # recompile. "No EOS" is an id no token has.
    s = _Settings(eos=jnp.asarray(eos or (-1,), jnp.int32), pad=jnp.asarray(pad_token_id, jnp.int32),
                  length_penalty=jnp.asarray(length_penalty, jnp.float32),
                  early_stopping=jnp.asarray(_EARLY_STOPPING_CODES[early_stopping], jnp.int32))
    return _generate_jit(apply_fn, cache_init_fn, shape, s, params, inputs, jnp.asarray(attention_mask))


_EARLY_STOPPING_CODES = {False: 0, True: 1, "never": 2}


@dataclasses.dataclass(frozen=True)
class _Shape:
    """The settings that change the compiled program (static)."""

    method: str
    max_new_tokens: int
    num_beams: int
    beams_to_keep: int
    output_logits: bool


@flax.struct.dataclass
class _Settings:
    """The settings that are traced values (one compilation serves all their values)."""

    eos: Array  # [max(1, number of EOS ids)] int32
    pad: Array
    length_penalty: Array
    early_stopping: Array  # 0: False, 1: True, 2: "never"


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _generate_jit(apply_fn: StepFn, cache_init_fn: Callable[[int, int], Any], shape: _Shape, s: _Settings,
                  params: Any, inputs: Any, attention_mask: Array) -> GenerateOutput:
    batch = attention_mask.shape[0]
    # The prefill may process more positions than the prompt has (visual tokens, prompt-tuning hooks):
    # size the cache from the abstract prefill output.
    prefill_len = jax.eval_shape(lambda: apply_fn(params, inputs, attention_mask, None, False)).logits.shape[1]
    out = apply_fn(params, inputs, attention_mask, cache_init_fn(batch, prefill_len + shape.max_new_tokens), False)
    if shape.method == "greedy":
        return _greedy(apply_fn, params, out.logits[:, -1], out.cache, shape, s)
    # Every beam of a prompt starts from the same prefill: compute it once per prompt, then repeat rows.
    logits = jnp.repeat(out.logits[:, -1], shape.num_beams, axis=0)
    cache = _map_batch(lambda x: jnp.repeat(x, shape.num_beams, axis=0), out.cache)
    return _beam_search(apply_fn, params, logits, cache, batch, shape, s)


def _map_batch(fn: Callable[[Array], Array], cache: Any) -> Any:
    """Applies ``fn`` to every cache leaf with a leading batch axis (scalars such as the write index stay)."""
    return jax.tree.map(lambda x: fn(x) if x.ndim > 0 else x, cache)


def _is_eos(tokens: Array, eos: Array) -> Array:
    return jnp.any(tokens[..., None] == eos, axis=-1)


def _lengths(sequences: Array, eos: Array) -> Array:
    """Tokens up to and including the first EOS (all of them if there is none)."""
    hit = _is_eos(sequences, eos)
    return jnp.where(hit.any(-1), jnp.argmax(hit, -1) + 1, sequences.shape[-1]).astype(jnp.int32)


def _step(apply_fn: StepFn, params: Any, tokens: Array, cache: Any) -> tuple[Array, Any]:
    out = apply_fn(params, tokens[:, None], jnp.ones((tokens.shape[0], 1), jnp.int32), cache, True)
    return out.logits[:, -1], out.cache


# --------------------------------------------------------------------------------------------------
# Greedy


def _greedy(apply_fn: StepFn, params: Any, logits: Array, cache: Any, shape: _Shape,
            s: _Settings) -> GenerateOutput:
    b, vocab = logits.shape
    n = shape.max_new_tokens

    def pick(state: dict[str, Any], logits: Array, step: Array) -> dict[str, Any]:
        logits = logits.astype(jnp.float32)
        running = ~state["finished"]
        # transformers takes the argmax of the raw logits; after EOS a row emits padding.
        token = jnp.where(running, jnp.argmax(logits, -1), s.pad).astype(jnp.int32)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), token[:, None], -1)[:, 0]
        state = dict(state, sequences=state["sequences"].at[:, step].set(token),
                     logprob=state["logprob"] + jnp.where(running, logp, 0.0),
                     finished=state["finished"] | _is_eos(token, s.eos), step=step + 1)
        if shape.output_logits:
            state["logits"] = state["logits"].at[:, step].set(jnp.where(running[:, None], logits, 0.0))
        return state

    state = {"sequences": jnp.full((b, n), s.pad, jnp.int32), "logprob": jnp.zeros((b,), jnp.float32),
             "finished": jnp.zeros((b,), bool), "step": jnp.zeros((), jnp.int32), "cache": cache}
    if shape.output_logits:
        state["logits"] = jnp.zeros((b, n, vocab), jnp.float32)
    state = pick(state, logits, state["step"])

    def cond(state: dict[str, Any]) -> Array:
        return (state["step"] < n) & ~jnp.all(state["finished"])

    def body(state: dict[str, Any]) -> dict[str, Any]:
        step = state["step"]
        logits, cache = _step(apply_fn, params, state["sequences"][:, step - 1], state["cache"])
        return pick(dict(state, cache=cache), logits, step)

    state = jax.lax.while_loop(cond, body, state)
    lengths = _lengths(state["sequences"], s.eos)
    scores = state["logprob"] / lengths.astype(jnp.float32) ** s.length_penalty
    return GenerateOutput(sequences=state["sequences"], scores=scores, lengths=lengths,
                          logits=state.get("logits"))


# --------------------------------------------------------------------------------------------------
# Beam search (transformers 5.23 GenerationMixin._beam_search, batched, static shapes)


def _gather(x: Array, idx: Array) -> Array:
    """``x[b, idx[b, j], ...]`` for ``x`` ``[b, beams, ...]`` and ``idx`` ``[b, j]``."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _beam_search(apply_fn: StepFn, params: Any, logits: Array, cache: Any, batch: int, shape: _Shape,
                 s: _Settings) -> GenerateOutput:
    k, n, lp = shape.num_beams, shape.max_new_tokens, s.length_penalty
    keep = shape.beams_to_keep
    in_top_k = jnp.arange(keep) < k  # only the best k candidates may become finished hypotheses
    vocab = logits.shape[-1]
    if keep > k * vocab:
        raise ConfigError(f"beam search keeps {keep} candidates per prompt but num_beams * vocab = {k * vocab}")

    def select(state: dict[str, Any], logits: Array, step: Array) -> dict[str, Any]:
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1).reshape(batch, k, vocab)
        logp = (logp + state["running_scores"][:, :, None]).reshape(batch, k * vocab)
        top_logp, top_idx = jax.lax.top_k(logp, keep)
        top_beam, top_token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
        top_seqs = _gather(state["running_seqs"], top_beam)
        top_seqs = jax.lax.dynamic_update_slice(top_seqs, top_token[:, :, None], (0, 0, step))
        # A candidate stops on EOS, or when it reaches the maximum length.
        stops = _is_eos(top_token, s.eos) | (step + 1 >= n)

        # Running beams: the best k candidates that did not stop.
        run_logp = top_logp + stops.astype(jnp.float32) * _BLOCKED
        next_idx = jax.lax.top_k(run_logp, k)[1]
        running_seqs = _gather(top_seqs, next_idx)
        running_scores = _gather(run_logp, next_idx)
        origin = _gather(top_beam, next_idx)

        # Finished hypotheses: merge the stopped candidates among the top k into the k best so far.
        just_finished = stops & in_top_k[None, :]
        gen_len = (step + 1).astype(jnp.float32)
        fin_logp = top_logp / gen_len ** lp
        row_full = jnp.all(state["finished"], -1, keepdims=True) & (s.early_stopping == 1)
        fin_logp = fin_logp + row_full.astype(jnp.float32) * _BLOCKED
        fin_logp = fin_logp + (~state["improvable"]).astype(jnp.float32) * _BLOCKED
        fin_logp = fin_logp + (~just_finished).astype(jnp.float32) * _BLOCKED
        merged_seqs = jnp.concatenate([state["seqs"], top_seqs], axis=1)
        merged_scores = jnp.concatenate([state["scores"], fin_logp], axis=1)
        merged_finished = jnp.concatenate([state["finished"], just_finished], axis=1)
        best = jax.lax.top_k(merged_scores, k)[1]
        seqs, scores, finished = _gather(merged_seqs, best), _gather(merged_scores, best), _gather(merged_finished,
                                                                                                    best)

        # Move each running beam's cache rows to where its sequence came from.
        rows = (jnp.arange(batch)[:, None] * k + origin).reshape(-1)
        cache = _map_batch(lambda x: jnp.take(x, rows, axis=0), state["cache"])

        # Can a running beam still beat the worst finished hypothesis? (transformers' heuristic)
        best_len = jnp.where((s.early_stopping == 2) & (lp > 0.0), jnp.float32(n), gen_len)
        best_running = running_scores[:, :1] / best_len ** lp
        worst_finished = jnp.where(finished, jnp.min(scores, -1, keepdims=True), _BLOCKED)
        improvable = state["improvable"] & jnp.any(best_running > worst_finished, -1, keepdims=True)

        go_on = jnp.any(improvable) & ~jnp.all(stops) & ~(jnp.all(finished) & (s.early_stopping == 1))
        return dict(running_seqs=running_seqs, running_scores=running_scores, seqs=seqs, scores=scores,
                    finished=finished, improvable=improvable, cache=cache, step=step + 1, go_on=go_on)

    running_scores = jnp.where(jnp.arange(k) == 0, 0.0, _BLOCKED)  # first step: only beam 0's continuations
    state = dict(running_seqs=jnp.full((batch, k, n), s.pad, jnp.int32),
                 running_scores=jnp.broadcast_to(running_scores, (batch, k)).astype(jnp.float32),
                 seqs=jnp.full((batch, k, n), s.pad, jnp.int32), scores=jnp.full((batch, k), _BLOCKED, jnp.float32),
                 finished=jnp.zeros((batch, k), bool), improvable=jnp.ones((batch, 1), bool), cache=cache,
                 step=jnp.zeros((), jnp.int32), go_on=jnp.ones((), bool))
    state = select(state, logits, state["step"])

    def cond(state: dict[str, Any]) -> Array:
        return state["go_on"] & (state["step"] < n)

    def body(state: dict[str, Any]) -> dict[str, Any]:
        step = state["step"]
        tokens = state["running_seqs"][:, :, step - 1].reshape(-1)
        logits, cache = _step(apply_fn, params, tokens, state["cache"])
        return select(dict(state, cache=cache), logits, step)

    state = jax.lax.while_loop(cond, body, state)
    sequences = state["seqs"][:, 0]
    return GenerateOutput(sequences=sequences, scores=state["scores"][:, 0], lengths=_lengths(sequences, s.eos))
