"""A minimal Adam for the small learned vectors of FAMO (logits) and UW (log-variances).

``torch.optim.Adam`` semantics (what the FAMO and nash-mtl codebases use, ``../shared/specs/sparse_mtl.md``
§2.7, §2.9): ``weight_decay`` is an L2 term **added to the gradient** before the moments (not AdamW's decoupled
decay), betas ``(0.9, 0.999)``, ``eps = 1e-8`` added to ``sqrt(v̂)``, bias-corrected moments::

    g ← g + γ·x;  m ← β1 m + (1 − β1) g;  v ← β2 v + (1 − β2) g²
    x ← x − lr · (m / (1 − β1^k)) / (sqrt(v / (1 − β2^k)) + eps)

Example:
    >>> import jax.numpy as jnp
    >>> x, st = adam_step(jnp.zeros(2), jnp.array([1.0, -2.0]), adam_init(2), lr=0.1)
    >>> [round(v, 4) for v in x.tolist()], int(st.count)
    ([-0.1, 0.1], 1)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class AdamState(NamedTuple):
    """Adam's step count and first/second moments of a ``[T]`` vector."""

    count: jax.Array
    mu: jax.Array
    nu: jax.Array


def adam_init(num: int) -> AdamState:
    """Zero moments for a ``[num]`` vector.

    Example:
        >>> adam_init(3).mu.shape
        (3,)
    """
    return AdamState(jnp.zeros((), jnp.int32), jnp.zeros((num,), jnp.float32), jnp.zeros((num,), jnp.float32))


def adam_step(x: jax.Array, grad: jax.Array, state: AdamState, *, lr: float, weight_decay: float = 0.0,
              b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> tuple[jax.Array, AdamState]:
    """One ``torch.optim.Adam(lr, betas=(b1, b2), eps, weight_decay)`` step on ``x``; returns ``(x, state)``.

    Example:
        >>> x, st = adam_step(jnp.ones(1), jnp.zeros(1), adam_init(1), lr=0.1, weight_decay=0.5)
        >>> round(float(x[0]), 4)  # the L2 term is the whole gradient here: a full normalised step
        0.9
    """
    x = jnp.asarray(x, jnp.float32)
    g = jnp.asarray(grad, jnp.float32) + weight_decay * x
    count = state.count + 1
    mu = b1 * state.mu + (1.0 - b1) * g
    nu = b2 * state.nu + (1.0 - b2) * g * g
    k = count.astype(jnp.float32)
    m_hat = mu / (1.0 - b1 ** k)
    v_hat = nu / (1.0 - b2 ** k)
    return x - lr * m_hat / (jnp.sqrt(v_hat) + eps), AdamState(count, mu, nu)
