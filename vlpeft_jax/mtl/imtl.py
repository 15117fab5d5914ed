"""IMTL-G (Liu et al., 2021c, "Towards Impartial Multi-task Learning") on shared-weight gradients.

The gradient part of IMTL only, as the nash-mtl / FAMO ``IMTLG`` class runs it (``../shared/specs/sparse_mtl.md``
§2.5; no IMTL-L loss scaling, unlike LibMTL's hybrid ``IMTL``). With ``u_t = g_t / ‖g_t‖``,
``D = [g_1 − g_t]_{t=2..T}`` and ``U = [u_1 − u_t]_{t=2..T}`` (both ``(T−1) × P``)::

    α_{2:T} = g_1 Uᵀ (D Uᵀ)^{-1},   α_1 = 1 − Σ_{t≥2} α_t

so ``g = Σ_t α_t g_t`` has equal projections ``g·u_t`` on every unit task gradient and ``Σ α = 1`` (α may be
negative). Every inner product is read off the Gram matrix ``A = G Gᵀ`` (``g_i·u_j = A_ij / ‖g_j‖``), so the
solve is ``(T−1) × (T−1)``. The reference inverts ``D Uᵀ`` and falls back to ``(D Uᵀ + 1e-8 I)^{-1}`` when the
inverse fails; here the fallback is picked with ``jnp.where`` when ``D Uᵀ`` is numerically singular (its
condition number is not below ``1 / eps_float32``, or not finite) — spec A17. A zero gradient gets ``u_t = 0``
(the reference would produce NaN). The loss is ``Σ_t α_t L_t``: ``weights = α`` (sum 1),
``direction = Σ_t α_t g_t``; neither codebase preset clips (§2.0).

Example:
    >>> import jax.numpy as jnp
    >>> g = jnp.array([[1.0, 0.0], [0.0, 3.0]])
    >>> out = imtlg(g)  # α ∝ 1/‖g_t‖ for orthogonal gradients, so both projections are equal
    >>> [round(a, 4) for a in out.weights.tolist()], [round(d, 4) for d in out.direction.tolist()]
    ([0.75, 0.25], [0.75, 0.75])
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from vlpeft_jax.mtl.base import Combined, GMMethod, check_grads, gram

_HI = jax.lax.Precision.HIGHEST
SINGULAR_JITTER = 1e-8
"""The reference's fallback: ``(D Uᵀ + 1e-8 I)^{-1}``."""


def imtlg_alpha(A: jax.Array) -> jax.Array:
    """IMTL-G's ``α`` ``[T]`` (``Σ α = 1``) from the Gram matrix ``A = G Gᵀ`` ``[T, T]`` (spec §2.5).

    Example:
        >>> import jax.numpy as jnp
        >>> [round(a, 6) for a in imtlg_alpha(jnp.eye(3)).tolist()]
        [0.333333, 0.333333, 0.333333]
    """
    A = jnp.asarray(A, jnp.float32)
    num_tasks = A.shape[0]
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(A), 0.0))
    inv_norm = jnp.where(norms > 0, 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0)
    B = A * inv_norm[None, :]  # B[i, j] = g_i · u_j
    first = B[0, 0] - B[0, 1:]  # g_1 Uᵀ                                  [T-1]
    M = B[0, 0] - B[0, 1:][None, :] - B[1:, 0][:, None] + B[1:, 1:]  # (D Uᵀ)[s, t] = (g_1 − g_s)·(u_1 − u_t)
    sv = jnp.linalg.svd(M, compute_uv=False)
    cond = sv[0] / sv[-1]
    singular = ~(cond < 1.0 / jnp.finfo(jnp.float32).eps)  # also True for inf / NaN
    M = jnp.where(singular, M + SINGULAR_JITTER * jnp.eye(num_tasks - 1, dtype=M.dtype), M)
    rest = jnp.linalg.solve(M.T, first)  # first @ M^{-1}
    return jnp.concatenate([1.0 - jnp.sum(rest, keepdims=True), rest])


def imtlg(grads: jax.Array, *, losses: jax.Array | None = None, state: Any = None,
          key: jax.Array | None = None) -> Combined:
    """IMTL-G's weights ``α`` (sum 1) and direction ``Σ_t α_t g_t`` for ``grads`` ``[T, P]`` (spec §2.5).

    Args:
      grads: ``[T, P]`` per-task gradients of the shared parameters (``T ≥ 2``).
      losses: unused (checked for shape only).
      state: passed through unchanged (stateless).
      key: unused.

    Returns:
      :class:`Combined` with ``direction [P]``, ``weights = α [T]`` and ``state``.

    Example:
        >>> import jax.numpy as jnp
        >>> g = jnp.array([[1.0, 1.0], [1.0, -1.0], [0.0, 2.0]])
        >>> round(float(imtlg(g).weights.sum()), 5)
        1.0
    """
    check_grads(grads, losses)
    g = jnp.asarray(grads, jnp.float32)
    alpha = imtlg_alpha(gram(g))
    return Combined(jnp.dot(alpha, g, precision=_HI), alpha, () if state is None else state)


METHOD = GMMethod(
    name="imtlg",
    fn=imtlg,
    defaults={},
    clip={"famo_codebase": None, "nash_codebase": None},
    kind="weighting",
    reference="Liu et al. 2021c (IMTL), gradient part only; nash-mtl/FAMO IMTLG; spec sparse_mtl.md §2.5, A17",
)
