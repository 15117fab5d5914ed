"""Aligned-MTL (Senushkin et al., 2023, "Independent Component Alignment for Multi-Task Learning"), LibMTL form.

``../shared/specs/sparse_mtl.md`` §2.9 (a library extra, not in the nash-mtl / FAMO codebases). With the Gram
matrix ``M = G Gᵀ = V Λ Vᵀ`` (``eigh``; LibMTL calls the removed ``torch.symeig``), eigenvalues not above
``λ_max · T · eps_float32`` are dropped (the rank cut), and with ``λ_min`` the smallest kept one::

    B = sqrt(λ_min) · V Λ^{-1/2} Vᵀ   (kept eigenpairs only),   α = B 1,   direction = Σ_t α_t g_t

For full rank, the aligned gradients ``B G`` are orthogonal with equal norms ``sqrt(λ_min)`` (``B M B = λ_min I``),
and the direction ``1ᵀ B G`` has the same projection ``λ_min`` on each of them.

Heads: LibMTL computes the task gradients with ``loss_t.backward()`` one task at a time and zeroes only the
shared parameters' gradients in between, so the task-specific parameters keep their plain ``∇L_t``; this method
is therefore ``kind="direct"`` with ``weights = 1`` (α is not what the heads receive; :func:`aligned_alpha`
gives it). Neither preset clips (§2.0).

Example:
    >>> import jax.numpy as jnp
    >>> out = aligned(jnp.array([[2.0, 0.0], [0.0, 1.0]]))  # λ = (4, 1): α = (½, 1)
    >>> out.direction.tolist(), out.weights.tolist()
    ([1.0, 1.0], [1.0, 1.0])
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from vlpeft_jax.mtl.base import Combined, GMMethod, check_grads, gram

_HI = jax.lax.Precision.HIGHEST


def aligned_alpha(M: jax.Array) -> jax.Array:
    """Aligned-MTL's ``α = B 1`` ``[T]`` from the Gram matrix ``M`` ``[T, T]`` (rank-cut as in LibMTL).

    Example:
        >>> import jax.numpy as jnp
        >>> [round(a, 5) for a in aligned_alpha(jnp.array([[4.0, 0.0], [0.0, 1.0]])).tolist()]
        [0.5, 1.0]
    """
    M = jnp.asarray(M, jnp.float32)
    lam, V = jnp.linalg.eigh(M)
    tol = jnp.max(lam) * M.shape[-1] * jnp.finfo(jnp.float32).eps
    keep = lam > tol
    lam_min = jnp.min(jnp.where(keep, lam, jnp.inf))
    inv_sqrt = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, lam, 1.0)), 0.0)
    B = jnp.sqrt(lam_min) * jnp.dot(V * inv_sqrt[None, :], V.T, precision=_HI)
    alpha = jnp.sum(B, axis=0)
    return jnp.where(jnp.any(keep), alpha, jnp.zeros_like(alpha))  # all-zero gradients: no direction


def aligned(grads: jax.Array, *, losses: jax.Array | None = None, state: Any = None,
            key: jax.Array | None = None) -> Combined:
    """Aligned-MTL's direction ``Σ_t α_t g_t`` for ``grads`` ``[T, P]``; the heads keep weight 1 (LibMTL).

    Args:
      grads: ``[T, P]`` per-task gradients of the shared parameters.
      losses: unused (checked for shape only).
      state: passed through unchanged (stateless).
      key: unused.

    Returns:
      :class:`Combined` with ``direction [P]``, ``weights = 1`` and ``state``.

    Example:
        >>> import jax.numpy as jnp
        >>> g = jnp.array([[1.0, 0.0], [1.0, 1.0]])
        >>> d = aligned(g).direction
        >>> bool(jnp.all(d @ g.T > 0))
        True
    """
    check_grads(grads, losses)
    g = jnp.asarray(grads, jnp.float32)
    alpha = aligned_alpha(gram(g))
    return Combined(jnp.dot(alpha, g, precision=_HI), jnp.ones((g.shape[0],), jnp.float32),
                    () if state is None else state)


METHOD = GMMethod(
    name="aligned",
    fn=aligned,
    defaults={},
    clip={"famo_codebase": None, "nash_codebase": None},
    kind="direct",
    reference="Senushkin et al. 2023 (Aligned-MTL); LibMTL Aligned_MTL (eigh of GGᵀ, rank cut λ_max·T·eps, "
              "B = sqrt(λ_min) V Λ^-1/2 Vᵀ, α = B·1); spec sparse_mtl.md §2.9",
)
