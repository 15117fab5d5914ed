"""MGDA (Sener & Koltun, 2018, "Multi-Task Learning as Multi-Objective Optimization") on shared-weight gradients.

A JAX port, on the Gram matrix ``A = G Gᵀ``, of the min-norm solver the nash-mtl / FAMO codebases use
(``MinNormSolver.find_min_norm_element``, the projected-gradient variant, not ``_FW``), as described in
``../shared/specs/sparse_mtl.md`` §2.4:

1. best pair: for every ``i < j`` the closed-form two-point min-norm element (:func:`min_norm_element_from2`,
   with its ``0.999`` / ``0.001`` clamps); the pair of least cost (the first one on ties) starts the search, and
   for ``T = 2`` it is the answer;
2. up to 250 projected-gradient steps: ``new = next_point(sol, −A sol)``, an exact line search between ``sol``
   and ``new`` (:func:`min_norm_element_from2` on the quadratic forms), and a stop when the L1 change is below
   ``1e-5``, returning the **old** point (nash-mtl's copy never counts its iterations; the cap is LibMTL's).

The reference runs the solver in float64 on a float32 Gram matrix; here it runs in float32, with the line search's
differences ``v12 − v11``, ``v22 − v12``, ``v11 + v22 − 2 v12`` formed as ``solᵀA d``, ``newᵀA d``, ``dᵀA d``
(``d = new − sol``; the same numbers, without the cancellation). Against a float64 port
(``tests/mtl/test_mgda.py``) the points agree to ~1e-7 for ``T = 3``; for ``T = 10``, where the path crawls for
100-250 steps, rounding moves the stopping point by up to ~1e-4 (the reference's own distance from the exact
min-norm point is of that order), the min-norm value by < 5e-4 relative. (The reference starts its pair search at
``dmin = 1e8`` and fails when every pair costs more; here the cheapest pair is always taken.)

Scaling (nash-mtl/FAMO): ``weights = sol · T`` (they sum to ``T``; LibMTL keeps 1), the loss is
``Σ_t weights_t L_t``, so ``direction = Σ_t weights_t g_t`` and head ``t`` gets ``weights_t ∇L_t``. Options
``normalization`` ``"none"`` (the thesis), ``"l2"`` (nash-mtl's ``"norm"``), ``"loss"``, ``"loss+"`` divide
each ``g_t`` by ``1``, ``‖g_t‖``, ``L_t``, ``L_t‖g_t‖`` before the solve (nash-mtl ``gradient_normalizers``); the
direction always combines the unnormalised gradients. No gradient clipping in either codebase preset (§2.0).

Example:
    >>> import jax.numpy as jnp
    >>> g = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> out = mgda(g)
    >>> out.weights.tolist(), out.direction.tolist()
    ([1.0, 1.0], [1.0, 1.0])
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.mtl.base import Combined, GMMethod, check_grads, gram

_HI = jax.lax.Precision.HIGHEST
MAX_ITER = 250
STOP_CRIT = 1e-5
NORMALIZATIONS = ("none", "l2", "norm", "loss", "loss+")


def min_norm_element_from2(v11: jax.Array, v12: jax.Array, v22: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(γ, cost)`` minimising ``‖γ x_1 + (1 − γ) x_2‖²`` from ``<x1,x1>, <x1,x2>, <x2,x2>`` (with the clamps).

    ``v12 ≥ v11`` gives ``γ = 0.999`` (cost ``v11``); else ``v12 ≥ v22`` gives ``γ = 0.001`` (cost ``v22``); else
    ``γ = (v22 − v12) / (v11 + v22 − 2 v12)``, cost ``v22 + γ (v12 − v22)``.

    Example:
        >>> [float(x) for x in min_norm_element_from2(jnp.float32(1.0), jnp.float32(0.0), jnp.float32(1.0))]
        [0.5, 0.5]
    """
    denom = v11 + v22 - 2.0 * v12
    interior = v11 > v12
    interior &= v22 > v12
    gamma_in = (v22 - v12) / jnp.where(interior, denom, 1.0)
    gamma = jnp.where(v12 >= v11, 0.999, jnp.where(v12 >= v22, 0.001, gamma_in))
    cost = jnp.where(v12 >= v11, v11, jnp.where(v12 >= v22, v22, v22 + gamma_in * (v12 - v22)))
    return gamma.astype(jnp.float32), cost.astype(jnp.float32)


def projection_to_simplex(y: jax.Array) -> jax.Array:
    """Euclidean projection of ``y`` ``[n]`` onto the probability simplex (the solver's sort-based rule).

    Example:
        >>> projection_to_simplex(jnp.array([2.0, 0.0, 0.0])).tolist()
        [1.0, 0.0, 0.0]
    """
    n = y.shape[0]
    s = jnp.sort(y)[::-1]
    tmax = (jnp.cumsum(s) - 1.0) / jnp.arange(1, n + 1, dtype=y.dtype)
    hits = tmax[:-1] > s[1:]
    first = jnp.argmax(hits)
    t = jnp.where(jnp.any(hits), tmax[first], (jnp.sum(y) - 1.0) / n)
    return jnp.maximum(y - t, 0.0)


def next_point(cur: jax.Array, grad: jax.Array) -> jax.Array:
    """The solver's ``_next_point``: a step along ``grad`` projected onto the zero-sum plane, then the simplex.

    The step ``t`` is the smallest ratio ``−cur_i / pg_i`` (``pg_i < 0``) or ``(1 − cur_i) / pg_i`` (``pg_i > 0``)
    above ``1e-7``; it starts at 1 only when no ``pg_i < 0`` ratio qualifies (the reference's order of ``min``).

    Example:
        >>> next_point(jnp.array([0.5, 0.5, 0.0]), jnp.array([-1.0, 0.0, 1.0])).tolist()
        [0.0, 0.5, 0.5]
    """
    n = cur.shape[0]
    pg = grad - jnp.sum(grad) / n
    neg, pos = pg < 0, pg > 0
    safe = jnp.where(pg != 0, pg, 1.0)
    tm1 = jnp.where(neg, -cur / safe, 0.0)
    tm2 = jnp.where(pos, (1.0 - cur) / safe, 0.0)
    ok1 = neg & (tm1 > 1e-7)
    ok2 = pos & (tm2 > 1e-7)
    t = jnp.where(jnp.any(ok1), jnp.min(jnp.where(ok1, tm1, jnp.inf)), 1.0)
    t = jnp.where(jnp.any(ok2), jnp.minimum(t, jnp.min(jnp.where(ok2, tm2, jnp.inf))), t)
    return projection_to_simplex(pg * t + cur)


def min_norm_2d(A: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The best pair's point on the simplex ``[T]`` and its cost (``_min_norm_2d``; first pair on ties).

    Example:
        >>> sol, cost = min_norm_2d(jnp.array([[1.0, 2.0], [2.0, 4.0]]))
        >>> [round(float(x), 4) for x in sol], float(cost)
        ([0.999, 0.001], 1.0)
    """
    n = A.shape[0]
    ii, jj = jnp.triu_indices(n, k=1)
    gammas, costs = min_norm_element_from2(A[ii, ii], A[ii, jj], A[jj, jj])
    best = jnp.argmin(costs)
    sol = jnp.zeros((n,), jnp.float32).at[ii[best]].set(gammas[best]).at[jj[best]].add(1.0 - gammas[best])
    return sol, costs[best]


@functools.partial(jax.jit, static_argnames=("max_iter", "stop_crit"))
def find_min_norm_element(A: jax.Array, max_iter: int = MAX_ITER,
                          stop_crit: float = STOP_CRIT) -> tuple[jax.Array, jax.Array]:
    """``(sol [T], cost)``: the min-norm point ``sol`` of the convex hull of the gradients with Gram matrix ``A``.

    The projected-gradient ``find_min_norm_element`` of the reference (spec §2.4). ``cost`` is the line search's
    ``‖Σ sol_t g_t‖²`` estimate the reference returns (the pair cost for ``T = 2``).

    Example:
        >>> A = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
        >>> sol, cost = find_min_norm_element(A)
        >>> [round(float(x), 3) for x in sol]
        [0.333, 0.333, 0.333]
    """
    A = jnp.asarray(A, jnp.float32)
    sol, cost = min_norm_2d(A)
    if A.shape[0] < 3:
        return sol, cost

    def body(carry: tuple) -> tuple:
        it, sol, cost, _ = carry
        new = next_point(sol, -jnp.dot(A, sol, precision=_HI))
        # the line search min_norm_element_from2(v11, v12, v22) of sol vs new, with the differences formed
        # before rounding: v12 − v11 = solᵀA d, v22 − v12 = newᵀA d, v11 + v22 − 2 v12 = dᵀA d (d = new − sol).
        # Near convergence v11 ≈ v12 ≈ v22 and the reference's float64 differences would be noise in float32.
        d = new - sol
        Ad = jnp.dot(A, d, precision=_HI)
        s_d, n_d, d_d = jnp.dot(sol, Ad, precision=_HI), jnp.dot(new, Ad, precision=_HI), jnp.dot(d, Ad, precision=_HI)
        interior = (s_d < 0) & (n_d > 0)
        gamma_in = n_d / jnp.where(interior, d_d, 1.0)
        nc = jnp.where(s_d >= 0, 0.999, jnp.where(n_d <= 0, 0.001, gamma_in))
        v11 = jnp.dot(sol, jnp.dot(A, sol, precision=_HI), precision=_HI)
        v22 = jnp.dot(new, jnp.dot(A, new, precision=_HI), precision=_HI)
        nd = jnp.where(s_d >= 0, v11, jnp.where(n_d <= 0, v22, v22 - gamma_in * n_d))
        new_sol = nc * sol + (1.0 - nc) * new
        done = jnp.sum(jnp.abs(new_sol - sol)) < stop_crit
        return it + 1, jnp.where(done, sol, new_sol), nd, done

    def cond(carry: tuple) -> jax.Array:
        it, _, _, done = carry
        return (it < max_iter) & ~done

    _, sol, cost, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), sol, cost, jnp.bool_(False)))
    return sol, cost


def mgda(grads: jax.Array, *, losses: jax.Array | None = None, state: Any = None, key: jax.Array | None = None,
         normalization: str = "none") -> Combined:
    """MGDA's weights ``T·sol`` and direction ``Σ_t T·sol_t g_t`` for ``grads`` ``[T, P]`` (spec §2.4).

    Args:
      grads: ``[T, P]`` per-task gradients of the shared parameters.
      losses: ``[T]`` task losses; needed by ``normalization="loss"`` / ``"loss+"`` only.
      state: passed through unchanged (stateless).
      key: unused.
      normalization: ``"none"`` (the thesis), ``"l2"`` (= ``"norm"``), ``"loss"`` or ``"loss+"``.

    Returns:
      :class:`Combined` with ``direction [P]``, ``weights [T]`` (sum ``T``) and ``state``.

    Raises:
      ConfigError: an unknown ``normalization``, or a loss-based one without ``losses``.

    Example:
        >>> import jax.numpy as jnp
        >>> g = jnp.array([[1.0, 0.0], [2.0, 0.0]])  # the clamp: γ = 0.999 on the first task
        >>> [round(w, 3) for w in mgda(g).weights.tolist()]
        [1.998, 0.002]
    """
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"mgda: normalization={normalization!r} is not valid; valid: {', '.join(NORMALIZATIONS)}")
    check_grads(grads, losses)
    g = jnp.asarray(grads, jnp.float32)
    num_tasks = g.shape[0]
    A = gram(g)
    if normalization != "none":
        if normalization in ("loss", "loss+") and losses is None:
            raise ConfigError(f"mgda: normalization={normalization!r} divides by the task losses; pass losses=[T]")
        norms = jnp.sqrt(jnp.diagonal(A))
        loss = None if losses is None else jnp.asarray(losses, jnp.float32)
        scale = {"l2": lambda: norms, "norm": lambda: norms, "loss": lambda: loss,
                 "loss+": lambda: loss * norms}[normalization]()
        A = A / (scale[:, None] * scale[None, :])
    sol, _ = find_min_norm_element(A)
    weights = sol * num_tasks
    direction = jnp.dot(weights, g, precision=_HI)
    return Combined(direction, weights, () if state is None else state)


METHOD = GMMethod(
    name="mgda",
    fn=mgda,
    defaults={"normalization": "none"},
    clip={"famo_codebase": None, "nash_codebase": None},
    kind="weighting",
    reference="Sener & Koltun 2018 (MGDA); nash-mtl/FAMO MGDA + MinNormSolver.find_min_norm_element; "
              "spec sparse_mtl.md §2.4",
)
