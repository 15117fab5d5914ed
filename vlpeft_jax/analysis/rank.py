"""Effective rank of last-layer representations (seed ``002_77ee72ace92f5c60.txt`` §2.3, Eq. 1-5, Table 1).

For every sample (one image or one sentence) the last layer's output matrix ``F`` ``[N, D]`` (one row per token
or patch, Eq. 1) is decomposed, ``F = U Σ Vᵀ`` (Eq. 2); its singular values, sorted in descending order, are
normalised to sum to one (Eq. 3), averaged over the ``K`` samples (Eq. 4) and accumulated (Eq. 5). The *effective
rank* of Table 1 is "the remaining rank ratio at which the accumulated singular values equal 0.9": here the
smallest ``k`` with ``y_k >= 0.9``, divided by the number of singular values ``M`` (a step function of ``k``; the
paper does not say whether it interpolates, and with ``M`` in the hundreds the difference is below 1 %).

Samples of different lengths are padded: padded rows are zeroed, which adds only zero singular values, so the
normalised non-zero values are those of the sample's own matrix; every sample's vector has ``M = min(N, D)``
entries (zeros at the end), which is what averaging Eq. 4 over samples needs.

Example:
    >>> import jax.numpy as jnp
    >>> f = jnp.array([[[3.0, 0.0], [0.0, 1.0]]])  # one sample with singular values 3 and 1
    >>> normalized_singular_values(f).tolist()
    [[0.75, 0.25]]
    >>> curve = accumulated_curve(normalized_singular_values(f))
    >>> curve.tolist(), effective_rank_ratio(curve)  # 0.75 < 0.9 <= 1.0: both values are needed
    ([0.75, 1.0], 1.0)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlpeft_jax.errors import InputError


def normalized_singular_values(features: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Eq. 2-3 per sample: ``[K, M]`` singular values of each ``features[k]`` ``[N, D]``, descending, summing to 1.

    Args:
      features: ``[K, N, D]`` last-layer outputs (or ``[N, D]`` for one sample).
      mask: ``[K, N]`` (or ``[N]``) true for the rows that belong to the sample; padded rows are zeroed.

    Raises:
      InputError: wrong ranks or shapes, or a sample whose matrix is all zeros (its normalisation is undefined).
    """
    f = jnp.asarray(features, jnp.float32)
    if f.ndim == 2:
        f = f[None]
        mask = None if mask is None else jnp.asarray(mask)[None]
    if f.ndim != 3:
        raise InputError(f"features must be [K, N, D] (or [N, D]); got shape {tuple(f.shape)}")
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        if mask.shape != f.shape[:2]:
            raise InputError(f"mask must be [K, N] = {tuple(f.shape[:2])}; got {tuple(mask.shape)}")
        f = jnp.where(mask[..., None], f, 0.0)
    s = jnp.linalg.svd(f, compute_uv=False)  # descending per sample
    total = s.sum(-1, keepdims=True)
    if bool(jnp.any(total <= 0)):
        raise InputError("a sample's feature matrix is all zeros (no row selected?); its singular values cannot be "
                         "normalised")
    return s / total


def accumulated_curve(normalized: jax.Array) -> jax.Array:
    """Eq. 4-5: the average over samples of the normalised singular values, accumulated: ``y`` ``[M]``.

    Accepts ``[K, M]`` (averaged over ``K``) or an already averaged ``[M]``."""
    s = jnp.asarray(normalized, jnp.float32)
    if s.ndim == 2:
        s = s.mean(axis=0)
    if s.ndim != 1:
        raise InputError(f"expected [K, M] or [M] normalised singular values; got shape {tuple(s.shape)}")
    return jnp.cumsum(s)


def effective_rank_ratio(curve: jax.Array, threshold: float = 0.9) -> float:
    """Table 1's effective rank: ``k / M`` for the smallest ``k`` (1-based) with ``curve[k-1] >= threshold``.

    Raises:
      InputError: a threshold outside (0, 1].
    """
    if not 0.0 < threshold <= 1.0:
        raise InputError(f"threshold={threshold}: must be in (0, 1]")
    y = np.asarray(jax.device_get(curve), np.float64)
    k = int(np.argmax(y >= threshold - 1e-6)) + 1 if np.any(y >= threshold - 1e-6) else len(y)
    return k / len(y)


def rank_summary(features: jax.Array, mask: jax.Array | None = None, threshold: float = 0.9) -> dict[str, Any]:
    """``{"curve": y as a list, "effective_rank": ratio, "num_samples": K, "num_values": M}`` of Eq. 1-5.

    Example:
        >>> import jax
        >>> r = rank_summary(jax.random.normal(jax.random.key(0), (4, 16, 8)))
        >>> r["num_samples"], r["num_values"], 0.5 < r["effective_rank"] <= 1.0
        (4, 8, True)
    """
    s = normalized_singular_values(features, mask)
    y = accumulated_curve(s)
    return {"curve": [float(v) for v in np.asarray(y)], "effective_rank": effective_rank_ratio(y, threshold),
            "num_samples": int(s.shape[0]), "num_values": int(s.shape[1])}


def plot_curves(path: str | Path, curves: Mapping[str, Sequence[float]], threshold: float = 0.9,
                title: str = "") -> None:
    """Accumulated normalised singular values per model (as seed 002 Fig. 4), against the rank ratio, with the
    threshold line; the legend gives each model's effective rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.0))
    for name, y in curves.items():
        y = np.asarray(y, np.float64)
        x = np.arange(1, len(y) + 1) / len(y)
        ax.plot(x, y, label=f"{name} ({100 * effective_rank_ratio(y, threshold):.1f} %)")
    ax.axhline(threshold, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("rank ratio (k / M)")
    ax.set_ylabel("accumulated normalised singular values")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
