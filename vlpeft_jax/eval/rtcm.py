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

from collections.abc import Sequence

import numpy as np

from vlpeft_jax.errors import InputError


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
