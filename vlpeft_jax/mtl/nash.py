"""Nash-MTL (Navon et al., 2022, "Multi-Task Learning as a Bargaining Game") on shared-weight gradients.

The bargaining weights are the positive solution of ``α_i · (G Gᵀ α)_i = 1`` for every task
(``../shared/specs/sparse_mtl.md`` §2.6). What the reference computes, precisely: nash-mtl (and LibMTL's
identical port) normalises ``G̃ = GGᵀ / nf`` with ``nf = ‖GGᵀ‖_F`` and runs up to 20 CCCP steps with cvxpy+ECOS
on ``min_α Σ_i (G̃α)_i + φ(α)/nf`` subject to ``−log(α_i·nf) − log((G̃α)_i) ≤ 0``, ``α ≥ 0``, where ``φ(α) =
Σ log α_i + Σ log (G̃α)_i`` is linearised at the previous iterate. Since ``nf·G̃ = GGᵀ``, the constraints are
``α_i (GGᵀα)_i ≥ 1`` on the **raw** Gram matrix, so the normalisation changes only the objective's
conditioning, not the scale of α (``α ∝ 1 / ‖g‖``). When every constraint is active (the usual case: one CCCP
step lands there and the next detects no change), the reference's α is exactly the root of::

    α ⊙ (G Gᵀ α) = 1            equivalently   α̂ ⊙ (G̃ α̂) = 1  with  α = α̂ / sqrt(nf)

which is also the unique minimiser of the convex ``½ α̂ᵀG̃α̂ − Σ log α̂_i``. That is what this module solves:
damped Newton for self-concordant functions in the scaled form ``(I + diag(α̂) G̃ diag(α̂)) y = α̂ ⊙ G̃α̂ − 1``,
``α̂ ← α̂ ⊙ (1 − y / (1 + λ))`` with ``λ² = Fᵀy`` (which keeps ``α̂ > 0``), full steps once ``λ < 1/4``, from the
previous step's α (kept in ``state``, initially ones, as the reference's warm start) rescaled to the optimal
multiple along its ray, until ``max|α̂ ⊙ G̃α̂ − 1| < tol`` or ``max_iter`` steps (``lax.while_loop``).

Two differences from the reference, both documented by ``tests/mtl/test_nash.py``:

- the reference's CCCP can stop at another KKT point of its problem, where a task's constraint is slack
  (``α_i (GGᵀα)_i > 1``): on one of nine random Gram matrices (T=5) it converged to ``α_1`` ≈ 1.7× the root
  above, with a *higher* value of its own objective; this module always returns the root;
- the reference's first stop test ``‖G̃α − 1/(α + 1e-10)‖ < 1e-3`` mixes the normalised Gram matrix with the
  raw-scale α, so it can only fire when ``nf ≈ 1``; its iterations end by the ``‖Δα‖ < 1e-6`` test or after 20.

When no positive root exists (``0`` is a non-negative combination of the gradients, e.g. ``g_2 = −g_1``: the
reference's problem is infeasible and it keeps its previous α) or the iteration has not converged to
``1e-3`` (the reference's tolerance), the previous α is kept. The loss is ``Σ_t α_t L_t``: ``weights = α``,
``direction = Σ_t α_t g_t``. Both codebase presets then clip the shared gradient's global norm to 1.0 (the
caller's job, ``METHOD.clip``; spec §2.0, A6).

Example:
    >>> import jax.numpy as jnp
    >>> g = jnp.array([[1.0, 0.0], [0.0, 2.0]])  # orthogonal: α_t = 1 / ‖g_t‖
    >>> out = nashmtl(g)
    >>> [round(a, 4) for a in out.weights.tolist()], [round(d, 4) for d in out.direction.tolist()]
    ([1.0, 0.5], [1.0, 1.0])
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from vlpeft_jax.mtl.base import Combined, GMMethod, check_grads, gram

_HI = jax.lax.Precision.HIGHEST
ACCEPT_TOL = 1e-3
"""A solve whose ``max|α̂ ⊙ G̃α̂ − 1|`` is not below this keeps the previous α (the reference's tolerance)."""


class NashState(NamedTuple):
    """The previous step's weights ``α`` ``[T]`` (the warm start; ones initially, as in the reference)."""

    alpha: jax.Array


def init_state(num_tasks: int) -> NashState:
    """``α = 1`` (the reference's ``prvs_alpha``).

    Example:
        >>> init_state(3).alpha.tolist()
        [1.0, 1.0, 1.0]
    """
    return NashState(jnp.ones((num_tasks,), jnp.float32))


@functools.partial(jax.jit, static_argnames=("max_iter", "tol"))
def solve_nash(A: jax.Array, alpha0: jax.Array, *, max_iter: int = 100,
               tol: float = 1e-6) -> tuple[jax.Array, jax.Array]:
    """``(α, residual)``: the root of ``α ⊙ (A α) = 1``, ``α > 0``, for a Gram matrix ``A`` ``[T, T]``.

    Solved in the Frobenius-normalised scale (``α̂ = α·sqrt(nf)``) by damped Newton from ``alpha0``; ``residual``
    is ``max_t |α̂_t (G̃α̂)_t − 1|`` (not finite or large when no positive root exists). Jitted (``max_iter`` and
    ``tol`` static), so eager calls compile once per ``T``.

    Example:
        >>> import jax.numpy as jnp
        >>> alpha, res = solve_nash(jnp.array([[4.0, 0.0], [0.0, 1.0]]), jnp.ones(2))
        >>> [round(a, 5) for a in alpha.tolist()], bool(res < 1e-5)
        ([0.5, 1.0], True)
    """
    A = jnp.asarray(A, jnp.float32)
    num_tasks = A.shape[0]
    nf = jnp.sqrt(jnp.sum(A * A))
    nf = jnp.where(nf > 0, nf, 1.0)
    Gt = A / nf
    root = jnp.sqrt(nf)
    a = jnp.asarray(alpha0, jnp.float32) * root
    a = jnp.where(jnp.all(jnp.isfinite(a) & (a > 0)), a, jnp.ones_like(a))
    q = jnp.dot(a, jnp.dot(Gt, a, precision=_HI), precision=_HI)
    a = a * jnp.where(q > 0, jnp.sqrt(num_tasks / jnp.where(q > 0, q, 1.0)), 1.0)  # best multiple on the ray
    eye = jnp.eye(num_tasks, dtype=jnp.float32)

    def residual(a: jax.Array) -> jax.Array:
        return a * jnp.dot(Gt, a, precision=_HI) - 1.0

    def body(carry: tuple) -> tuple:
        it, a, F = carry
        S = a[:, None] * Gt * a[None, :] + eye
        y = jnp.linalg.solve(S, F)
        lam = jnp.sqrt(jnp.maximum(jnp.dot(F, y, precision=_HI), 0.0))
        step = jnp.where(lam < 0.25, 1.0, 1.0 / (1.0 + lam))
        a = a * (1.0 - step * y)
        return it + 1, a, residual(a)

    def cond(carry: tuple) -> jax.Array:
        it, _, F = carry
        err = jnp.max(jnp.abs(F))
        return (it < max_iter) & ~(err < tol)  # stops on NaN too

    _, a, F = jax.lax.while_loop(cond, body, (jnp.int32(0), a, residual(a)))
    return a / root, jnp.max(jnp.abs(F))


def nashmtl(grads: jax.Array, *, losses: jax.Array | None = None, state: NashState | None = None,
            key: jax.Array | None = None, max_iter: int = 100, tol: float = 1e-6) -> Combined:
    """Nash-MTL's weights ``α`` (``α ⊙ GGᵀα = 1``) and direction ``Σ_t α_t g_t`` for ``grads`` ``[T, P]``.

    Args:
      grads: ``[T, P]`` per-task gradients of the shared parameters.
      losses: unused (checked for shape only).
      state: :class:`NashState` with the previous α (the warm start); None starts from ones.
      key: unused.
      max_iter: Newton iterations at most.
      tol: stop when ``max|α̂ ⊙ G̃α̂ − 1|`` is below this.

    Returns:
      :class:`Combined` with ``direction [P]`` (before the preset's 1.0 clip), ``weights = α`` and the new state
      (the new α, or the previous one when the solve failed, see the module docstring).

    Example:
        >>> import jax.numpy as jnp
        >>> g = jnp.array([[1.0, 1.0], [1.0, -0.5]])
        >>> out = nashmtl(g)
        >>> a = out.weights
        >>> [round(v, 4) for v in (a * (gram(g) @ a)).tolist()]
        [1.0, 1.0]
    """
    check_grads(grads, losses)
    g = jnp.asarray(grads, jnp.float32)
    prev = init_state(g.shape[0]).alpha if not state else jnp.asarray(state.alpha, jnp.float32)
    alpha, res = solve_nash(gram(g), prev, max_iter=max_iter, tol=tol)
    ok = jnp.all(jnp.isfinite(alpha)) & (res < ACCEPT_TOL)
    alpha = jnp.where(ok, alpha, prev)
    return Combined(jnp.dot(alpha, g, precision=_HI), alpha, NashState(alpha))


METHOD = GMMethod(
    name="nashmtl",
    fn=nashmtl,
    defaults={"max_iter": 100, "tol": 1e-6},
    init_state=init_state,
    clip={"famo_codebase": 1.0, "nash_codebase": 1.0},
    kind="weighting",
    reference="Navon et al. 2022 (Nash-MTL); nash-mtl NashMTL (cvxpy+ECOS CCCP, Frobenius-normalised Gram, "
              "warm start, clip 1.0), LibMTL Nash_MTL; spec sparse_mtl.md §2.6, A18",
)
