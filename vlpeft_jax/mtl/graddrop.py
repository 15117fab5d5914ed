"""GradDrop (Chen et al., 2020, "Just Pick a Sign") applied per coordinate of the shared-weight gradients.

The original paper drops activation gradients at one layer; the thesis applies every GM method to the gradients
of the shared weights (App. D.4), which is the FAMO codebase's GradDrop (``../shared/specs/sparse_mtl.md`` §2.3).
Per coordinate ``p`` of ``θ_sha``::

    P_p    = 0.5 · (1 + Σ_t G[t,p] / (Σ_t |G[t,p]| + 1e-8))        # positive-sign purity
    U_p    ~ Uniform[0, 1)                                          # one draw per coordinate, from ``key``
    M[t,p] = 1[P_p > U_p]·1[G[t,p] > 0] + 1[P_p < U_p]·1[G[t,p] < 0]
    d      = Σ_t M[t,·] ⊙ G[t,·]                                    # the code's mean_t(...)·T

so ``E[d_p] = P_p·pos_p + (1 − P_p)·neg_p`` with ``pos_p = Σ_t G⁺[t,p]``, ``neg_p = Σ_t G⁻[t,p]``. Since
``P_p = pos_p/(pos_p − neg_p)`` (up to the ``1e-8``) this equals ``Σ_t G[t,p]``: each draw keeps one sign per
coordinate, and the mean is the plain sum. The codebase has no leak (``leak=0``); ``leak=ℓ`` keeps
``ℓ + (1 − ℓ)·M`` of every gradient, the paper's leak parameter applied to all tasks. The heads get their plain
``∇L_t`` (``weights = 1``, kind ``"direct"``); the FAMO codebase clips the shared gradient to norm 1.0 (§2.0, A6).

Example:
    >>> import jax, jax.numpy as jnp
    >>> g = jnp.array([[1.0, -2.0, 0.0], [3.0, -1.0, 0.0]])  # same signs per coordinate: nothing is dropped
    >>> graddrop(g, key=jax.random.PRNGKey(0)).direction.tolist()
    [4.0, -3.0, 0.0]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.mtl.base import Combined, GMMethod, check_grads


def sign_purity(grads: jax.Array) -> jax.Array:
    """``P`` ``[P]``: ``0.5·(1 + Σ_t G / (Σ_t |G| + 1e-8))`` per coordinate (1 all positive, 0 all negative).

    Example:
        >>> sign_purity(jnp.array([[1.0, -1.0, 1.0], [1.0, -1.0, -1.0]])).tolist()
        [1.0, 0.0, 0.5]
    """
    g = jnp.asarray(grads, jnp.float32)
    return 0.5 * (1.0 + jnp.sum(g, axis=0) / (jnp.sum(jnp.abs(g), axis=0) + 1e-8))


def graddrop_mask(grads: jax.Array, key: jax.Array) -> jax.Array:
    """The float ``[T, P]`` keep-mask ``M`` of spec §2.3 for one uniform draw per coordinate from ``key``.

    Example:
        >>> g = jnp.array([[1.0, 2.0], [1.0, -2.0]])
        >>> graddrop_mask(g, jax.random.PRNGKey(0))[:, 0].tolist()  # column 0 is all positive: kept
        [1.0, 1.0]
    """
    g = jnp.asarray(grads, jnp.float32)
    purity = sign_purity(g)
    u = jax.random.uniform(key, purity.shape, jnp.float32)
    keep_pos = (purity > u)[None, :] & (g > 0)
    keep_neg = (purity < u)[None, :] & (g < 0)
    return (keep_pos | keep_neg).astype(jnp.float32)


def graddrop(grads: jax.Array, *, losses: jax.Array | None = None, state: Any = None, key: jax.Array | None = None,
             leak: float = 0.0) -> Combined:
    """GradDrop's direction ``Σ_t (ℓ + (1 − ℓ)·M_t) ⊙ g_t`` for ``grads`` ``[T, P]`` (spec §2.3).

    Args:
      grads: ``[T, P]`` per-task gradients of the shared parameters.
      losses: unused.
      state: passed through unchanged (stateless).
      key: PRNG key of the per-coordinate uniform draw (None: ``PRNGKey(0)``); use a fresh key every step.
      leak: ``ℓ`` in ``[0, 1]``; 0 (the FAMO codebase) drops fully, 1 is the plain sum.

    Returns:
      :class:`Combined` with ``direction [P]``, ``weights = ones(T)`` and ``state``.

    Raises:
      ConfigError: ``leak`` outside ``[0, 1]``.

    Example:
        >>> import jax.numpy as jnp
        >>> g = jnp.array([[1.0, 2.0], [1.0, -2.0]])
        >>> graddrop(g, leak=1.0).direction.tolist()  # full leak: nothing dropped
        [2.0, 0.0]
    """
    if isinstance(leak, int | float) and not 0.0 <= float(leak) <= 1.0:
        raise ConfigError(f"graddrop: leak={leak!r} must lie in [0, 1] (0 = the FAMO codebase, no leak)")
    check_grads(grads)
    if key is None:
        key = jax.random.PRNGKey(0)
    g = jnp.asarray(grads, jnp.float32)
    mask = graddrop_mask(g, key)
    keep = leak + (1.0 - leak) * mask
    direction = jnp.sum(keep * g, axis=0)
    return Combined(direction, jnp.ones((g.shape[0],), jnp.float32), () if state is None else state)


METHOD = GMMethod(
    name="graddrop",
    fn=graddrop,
    defaults={"leak": 0.0},
    uses_key=True,
    clip={"famo_codebase": 1.0, "nash_codebase": None},
    kind="direct",
    reference="Chen et al. 2020 (GradDrop); FAMO codebase GradDrop on shared weights; spec sparse_mtl.md §2.3",
)
