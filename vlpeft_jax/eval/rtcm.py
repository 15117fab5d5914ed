"""KLAFT's r_TCM: how often the topic control mechanism picks a non-residual topic (seed 000, Eq. 10).

``r_TCM = 1/|X_t| * sum_i 1/|x_i| * sum_j 1[z_ij != 0]`` over the test captions ``X_t``, where ``z_ij`` is
the topic chosen for token j of caption i (Eq. 3; topic 0 is the "residual" topic that leaves the LM's
hidden state unchanged). It is the mean, over captions, of the fraction of a caption's tokens that use a
non-residual topic; in [0, 1] (Table 2 reports 0.14-0.36).

Example:
    >>> import numpy as np
    >>> r_tcm(np.array([[0, 2, 1, 9], [3, 0, 0, 0]]), lengths=np.array([3, 2]))
    0.5833333333333333
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlpeft_jax.errors import ConfigError, InputError
from vlpeft_jax.peft.base import apply_with

IGNORE = -100  # no target (the LM labels' ignore index)


def r_tcm_per_caption(
    topic_ids: np.ndarray | Sequence[Sequence[int]],
    lengths: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Fraction of non-residual topic tokens of each caption: ``[num_captions]``.

    Args:
      topic_ids: ``[n, t]`` topic id per token (0 = residual), padded; or a list of per-caption sequences.
      lengths: ``[n]`` number of real tokens per caption (the first ``lengths[i]`` positions count).
      mask: ``[n, t]`` 1 for real tokens (instead of ``lengths``). With neither, every position counts.

    Raises:
      InputError: empty captions (a zero length), negative topic ids, or inconsistent shapes.

    Example:
        >>> r_tcm_per_caption([[0, 1], [2, 2, 0, 0]]).tolist()
        [0.5, 0.5]
    """
    if not isinstance(topic_ids, np.ndarray) and len(topic_ids) and not np.isscalar(topic_ids[0]):
        seqs = [np.asarray(s) for s in topic_ids]
        if lengths is not None or mask is not None:
            raise InputError("give lengths/mask only with a padded [n, t] topic_ids array")
        lengths = np.array([len(s) for s in seqs])
        width = int(lengths.max(initial=0))
        topic_ids = np.stack([np.pad(s, (0, width - len(s))) for s in seqs]) if seqs else np.zeros((0, 0), int)
    topic_ids = np.asarray(topic_ids)
    if topic_ids.ndim != 2:
        raise InputError(f"topic_ids must be [num_captions, num_tokens], got shape {topic_ids.shape}")
    n, t = topic_ids.shape
    if mask is None:
        lengths = np.full(n, t) if lengths is None else np.asarray(lengths)
        if lengths.shape != (n,) or np.any(lengths > t):
            raise InputError(f"lengths must be [num_captions] = [{n}] with values <= {t}, got {lengths!r}")
        mask = np.arange(t)[None, :] < lengths[:, None]
    else:
        mask = np.asarray(mask).astype(bool)
        if mask.shape != topic_ids.shape:
            raise InputError(f"mask shape {mask.shape} differs from topic_ids shape {topic_ids.shape}")
    counts = mask.sum(axis=1)
    if np.any(counts == 0):
        raise InputError(f"captions with no tokens at indices {np.nonzero(counts == 0)[0].tolist()[:10]}")
    if np.any(topic_ids[mask] < 0):
        raise InputError("topic ids must be >= 0 (0 = residual topic)")
    return ((topic_ids != 0) & mask).sum(axis=1) / counts


def r_tcm(
    topic_ids: np.ndarray | Sequence[Sequence[int]],
    lengths: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> float:
    """r_TCM of seed 000 Eq. 10: the mean over captions of :func:`r_tcm_per_caption`."""
    per_caption = r_tcm_per_caption(topic_ids, lengths=lengths, mask=mask)
    return float(np.mean(per_caption)) if len(per_caption) else float("nan")


def topics_from_probs(topic_probs: np.ndarray) -> np.ndarray:
    """Topic indicator per token from TCM's ``P(z_t | x)`` ``[..., num_topics]``: the most probable topic.

    Example:
        >>> topics_from_probs(np.array([[[0.7, 0.3], [0.2, 0.8]]])).tolist()
        [[0, 1]]
    """
    return np.argmax(np.asarray(topic_probs), axis=-1)


# ------------------------------------------------------------------------- topics of generated captions


def caption_topics(module: Any, params: Mapping[str, Any], methods: Sequence[tuple[str, Any]], prompt: Any,
                   prompt_mask: jax.Array, sequences: jax.Array, lengths: jax.Array,
                   eos_token_id: int | Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Prior- and posterior-argmax topic of every generated token, by one teacher-forced forward (A14).

    Args:
      module: the decoder or VLM (its ``apply`` takes ``(ids, mask)`` or the keyword arguments of ``prompt``,
        and ``logits_to_keep``); encoder-decoders are not supported.
      params: ``{"base": ..., "peft": {name: ...}}``.
      methods: ``(name, method)`` pairs as the tasks keep them; one of them a :class:`TCM`.
      prompt: the prompt ids ``[b, t_p]`` (left-padded) or a dict of keyword arguments holding ``input_ids``
        (e.g. with ``pixel_values``), as given to :func:`vlpeft_jax.eval.decode.generate`.
      prompt_mask: ``[b, t_p]``.
      sequences, lengths: :class:`~vlpeft_jax.eval.decode.GenerateOutput` ``sequences`` ``[b, n]`` and
        ``lengths`` ``[b]`` (EOS included).
      eos_token_id: EOS id(s), not counted as caption tokens.

    Returns:
      ``{"prior": [b, n], "posterior": [b, n], "mask": [b, n]}`` (numpy); ``mask`` marks the caption tokens
      (before ``lengths``, not EOS).
    """
    if getattr(module, "is_encoder_decoder", False):
        raise ConfigError("caption_topics: encoder-decoder models are not supported (decoder LMs and VLMs only)")
    from vlpeft_jax.peft.tcm import TCM

    if not any(isinstance(m, TCM) for _, m in methods):
        raise ConfigError("caption_topics: no TCM method is active, so there are no topics to read")
    kwargs = dict(prompt) if isinstance(prompt, Mapping) else {"input_ids": prompt}
    ids = jnp.concatenate([jnp.asarray(kwargs.pop("input_ids")), jnp.asarray(sequences, jnp.int32)], axis=1)
    n = sequences.shape[1]
    caption = jnp.arange(n)[None] < jnp.asarray(lengths)[:, None]
    eos = () if eos_token_id is None else (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
    counted = caption & ~jnp.isin(jnp.asarray(sequences), jnp.asarray(eos or (-1,), jnp.int32))
    mask = jnp.concatenate([jnp.asarray(prompt_mask), caption.astype(jnp.asarray(prompt_mask).dtype)], axis=1)
    prior, posterior = _topics_jit(module, tuple(methods))(params, ids, mask, counted, kwargs)
    return {"prior": np.asarray(prior), "posterior": np.asarray(posterior), "mask": np.asarray(counted)}


@functools.lru_cache(maxsize=16)
def _topics_jit(module: Any, methods: tuple[tuple[str, Any], ...]) -> Callable[..., Any]:
    def topics(params: Any, ids: jax.Array, mask: jax.Array, counted: jax.Array, kwargs: dict[str, Any]) -> Any:
        n = counted.shape[1]
        t = ids.shape[1]
        # position t - n - 1 + j predicts generated token j
        targets = jnp.full(ids.shape, IGNORE, jnp.int32).at[:, t - n - 1:t - 1].set(
            jnp.where(counted, ids[:, t - n:], IGNORE))
        active = [(m, params["peft"][name]) for name, m in methods]
        _, records = apply_with(module.apply, active, {"params": params["base"]}, ids, mask, **kwargs,
                                   side_inputs={"target_ids": targets}, record=True, logits_to_keep=t)
        prior, posterior = records["topic/prior"][0], records["topic/posterior"][0]
        return prior[:, t - n - 1:t - 1], posterior[:, t - n - 1:t - 1]

    return jax.jit(topics)


def caption_r_tcm(module: Any, params: Mapping[str, Any], methods: Sequence[tuple[str, Any]], prompt: Any,
                  prompt_mask: jax.Array, sequences: jax.Array, lengths: jax.Array,
                  eos_token_id: int | Sequence[int] | None = None) -> dict[str, float]:
    """r_TCM (Eq. 10) of generated captions: ``{"r_tcm": posterior-argmax version (A14), "r_tcm_prior": ...,
    "captions": number counted}``; captions with no token (an immediate EOS) are left out. Arguments as
    :func:`caption_topics`.

    Example (after ``gen = decode.generate(step, params, ids, mask, ...)``):
        >>> caption_r_tcm(model, params, methods, ids, mask, gen.sequences, gen.lengths, eos)  # doctest: +SKIP
        {'r_tcm': 0.21, 'r_tcm_prior': 0.18, 'captions': 64}
    """
    topics = caption_topics(module, params, methods, prompt, prompt_mask, sequences, lengths, eos_token_id)
    keep = topics["mask"].any(axis=1)
    if not keep.any():
        return {"r_tcm": float("nan"), "r_tcm_prior": float("nan"), "captions": 0}
    m = topics["mask"][keep]
    return {"r_tcm": r_tcm(np.where(m, topics["posterior"][keep], 0), mask=m),
            "r_tcm_prior": r_tcm(np.where(m, topics["prior"][keep], 0), mask=m),
            "captions": int(keep.sum())}
