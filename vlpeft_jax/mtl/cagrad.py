"""CAGrad (Liu et al., 2021, "Conflict-Averse Gradient Descent for Multi-task Learning") on shared gradients.

Conventions of the nash-mtl / FAMO codebases (``../shared/specs/sparse_mtl.md`` §2.2; the thesis uses
``c = 0.4``, §2.0). With ``A = G Gᵀ``, ``b = 1/T·1``, ``‖g0‖ = sqrt(mean(A) + 1e-8)`` and
``c̃ = c·‖g0‖ + 1e-8``, the weights solve, over the simplex,

    min_w  F(w) = wᵀ A b + c̃ · sqrt(wᵀ A w + 1e-8)

(the codebases call ``scipy.optimize.minimize`` = SLSQP from ``1/T·1``). Then::

    g_w = Σ_t w_t g_t ;  λ = c̃ / (‖g_w‖ + 1e-8) ;  g = g0 + λ g_w
    g  /= 1 + c²   (rescale=1, the default) | 1 + c (rescale=2) | 1 (rescale=0)
    direction = T · g                      ("to match the sum loss"; LibMTL does not multiply by T)

``g0 + λ g_w`` (before the rescale) is the dual solution of ``max_d min_i <g_i, d>`` s.t.
``‖d − g0‖ ≤ c‖g0‖``. The heads get their plain ``∇L_t`` (``weights = 1``, kind ``"direct"``); the FAMO
codebase clips the shared gradient to norm 1.0 (§2.0, A6).

The simplex problem is solved in JAX (float32, jittable, :func:`solve_weights`): ``iters`` steps of accelerated
projected gradient (FISTA with backtracking and adaptive restart) on ``F / max_t A_tt``, in the metric ``diag(A)``
so that tasks whose gradient norms differ by orders of magnitude converge as fast as equal ones. ``F`` is convex
(a linear term plus ``c̃‖Gᵀw‖``); since ``c < 1`` its minimiser is generically away from the kink ``Gᵀw = 0``.
``tests/mtl/test_cagrad.py`` compares it with SLSQP (the codebases' solver) and cvxpy in float64: the directions
agree to ~1e-6 relative on random problems; with gradient norms spread over four decades SLSQP itself stops
~1e-3 away from the optimum, while this solver stays within ~1e-5 of cvxpy.

Example:
    >>> import jax.numpy as jnp
    >>> g = jnp.array([[1.0, 0.0], [1.0, 0.0]])  # equal gradients: T·g0·(1 + c)/(1 + c²)
    >>> [round(x, 4) for x in cagrad(g, c=0.5).direction.tolist()]
    [2.4, 0.0]
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.mtl.base import Combined, GMMethod, check_grads, gram

_HI = jax.lax.Precision.HIGHEST
RESCALES = (0, 1, 2)


def cagrad_objective(w: jax.Array, A: jax.Array, c: float | jax.Array) -> jax.Array:
    """The codebases' ``objfn``: ``wᵀ A b + c̃·sqrt(wᵀ A w + 1e-8)`` with ``b = 1/T``, ``c̃ = c·‖g0‖ + 1e-8``.

    Example:
        >>> A = jnp.eye(2)
        >>> round(float(cagrad_objective(jnp.array([0.5, 0.5]), A, 0.0)), 4)  # c = 0: wᵀ A b = ½·½ + ½·½
        0.5
    """
    A = jnp.asarray(A, jnp.float32)
    num_tasks = A.shape[0]
    c_tilde = c * jnp.sqrt(jnp.mean(A) + 1e-8) + 1e-8
    Ab = jnp.sum(A, axis=1) / num_tasks
    return jnp.dot(w, Ab, precision=_HI) + c_tilde * jnp.sqrt(jnp.dot(w, jnp.dot(A, w, precision=_HI),
                                                                         precision=_HI) + 1e-8)


def projection_to_simplex_weighted(y: jax.Array, d: jax.Array) -> jax.Array:
    """``argmin_x Σ_i d_i (x_i − y_i)²`` over the probability simplex (``d > 0``): ``x_i = max(y_i − τ/d_i, 0)``.

    ``τ`` comes from the breakpoints ``d_i y_i`` sorted in decreasing order: with the ``k`` largest active,
    ``τ_k = (Σ_k y_i − 1) / Σ_k 1/d_i``, and the answer is the largest ``k`` with ``τ_k < d_(k) y_(k)``.

    The result is divided by its sum (exactly feasible in float32).

    Example:
        >>> projection_to_simplex_weighted(jnp.array([2.0, 0.0, 0.0]), jnp.ones(3)).tolist()
        [1.0, 0.0, 0.0]
        >>> [round(v, 4) for v in projection_to_simplex_weighted(jnp.zeros(2), jnp.array([1.0, 3.0])).tolist()]
        [0.75, 0.25]
    """
    bp = d * y
    order = jnp.argsort(-bp)
    inv = (1.0 / d)[order]
    tau = (jnp.cumsum(y[order]) - 1.0) / jnp.cumsum(inv)
    valid = tau < bp[order]
    k = jnp.max(jnp.where(valid, jnp.arange(y.shape[0]), 0))
    x = jnp.maximum(y - tau[k] / d, 0.0)
    # renormalise: in float32 the sum is off by ~1e-7·T, and F is positively homogeneous, so the solver would
    # otherwise prefer iterates whose rounding shrank the sum
    total = jnp.sum(x)
    return jnp.where(total > 0, x / total, x)


@functools.partial(jax.jit, static_argnames=("iters",))
def solve_weights(A: jax.Array, c: float | jax.Array, iters: int = 400) -> jax.Array:
    """The simplex minimiser ``w`` ``[T]`` of :func:`cagrad_objective`.

    FISTA with backtracking (a gradient-based test) and adaptive restart in the metric ``diag(A)``
    (Jacobi-preconditioned projected gradient, :func:`projection_to_simplex_weighted`), so tasks whose gradient
    norms differ by orders of magnitude converge as fast as equal ones. Only gradients are evaluated: near the
    optimum float32 values of ``F`` no longer resolve the differences, its gradient still does. The last iterate
    is returned.

    Example:
        >>> A = jnp.array([[1.0, -0.5], [-0.5, 1.0]])  # symmetric: w = (½, ½)
        >>> [round(float(x), 4) for x in solve_weights(A, 0.4)]
        [0.5, 0.5]
    """
    A = jnp.asarray(A, jnp.float32)
    num_tasks = A.shape[0]
    c_tilde = c * jnp.sqrt(jnp.mean(A) + 1e-8) + 1e-8
    scale = jnp.max(jnp.diagonal(A))
    scale = jnp.where(scale > 0, scale, 1.0)
    As = A / scale
    lin = jnp.sum(As, axis=1) / num_tasks
    cs = c_tilde / jnp.sqrt(scale)
    eps = 1e-8 / scale
    metric = jnp.maximum(jnp.diagonal(As), 1e-6)

    def grad(w: jax.Array) -> jax.Array:
        Aw = jnp.dot(As, w, precision=_HI)
        return lin + cs * Aw / jnp.sqrt(jnp.dot(w, Aw, precision=_HI) + eps)

    def step(k: int, carry: tuple) -> tuple:
        x, y, t, L = carry
        gy = grad(y)

        def trial(L: jax.Array) -> tuple[jax.Array, jax.Array]:
            # F convex: <∇F(x⁺) − ∇F(y), d> ≤ L/2 ‖d‖²_D implies the descent lemma F(x⁺) ≤ F(y) + <∇F(y), d> +
            # L/2 ‖d‖²_D (D = metric), and gradients stay accurate in float32 where values of F do not
            xn = projection_to_simplex_weighted(y - gy / (L * metric), metric)
            d = xn - y
            ok = jnp.dot(grad(xn) - gy, d, precision=_HI) <= 0.5 * L * jnp.dot(d * metric, d, precision=_HI)
            return xn, ok

        def bt_cond(state: tuple) -> jax.Array:
            n, _, _, ok = state
            return (~ok) & (n < 30)

        def bt_body(state: tuple) -> tuple:
            n, L, _, _ = state
            L = 2.0 * L
            return (n + 1, L, *trial(L))

        _, L, xn, _ = jax.lax.while_loop(bt_cond, bt_body, (jnp.int32(0), L, *trial(L)))
        # adaptive restart (O'Donoghue & Candès): drop the momentum when it points uphill
        restart = jnp.dot((y - xn) * metric, xn - x) > 0
        t_next = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
        y_next = jnp.where(restart, xn, xn + ((t - 1.0) / t_next) * (xn - x))
        t_next = jnp.where(restart, 1.0, t_next)
        return xn, y_next, t_next, 0.9 * L

    w0 = jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32)
    x, *_ = jax.lax.fori_loop(0, iters, step, (w0, w0, jnp.float32(1.0), jnp.float32(1.0)))
    return x


def cagrad(grads: jax.Array, *, losses: jax.Array | None = None, state: Any = None, key: jax.Array | None = None,
           c: float = 0.4, rescale: int = 1, iters: int = 400) -> Combined:
    """CAGrad's direction ``T·(g0 + λ g_w)/(1 + c²)`` for ``grads`` ``[T, P]`` (spec §2.2).

    Args:
      grads: ``[T, P]`` per-task gradients of the shared parameters.
      losses: unused.
      state: passed through unchanged (stateless).
      key: unused.
      c: the conflict-aversion radius (0.4 in the thesis; 0 gives ``T·g0``).
      rescale: 1 divides by ``1 + c²`` (default), 2 by ``1 + c``, 0 not at all (official CAGrad's options).
      iters: FISTA iterations of the simplex solver.

    Returns:
      :class:`Combined` with ``direction [P]``, ``weights = ones(T)`` and ``state``.

    Raises:
      ConfigError: ``rescale`` not 0, 1 or 2; ``c`` negative; ``iters`` < 1.

    Example:
        >>> import jax.numpy as jnp
        >>> g = jnp.array([[1.0, 0.0], [0.0, 1.0]])
        >>> [round(x, 4) for x in cagrad(g, c=0.0).direction.tolist()]  # c = 0: T·g0, the plain sum
        [1.0, 1.0]
    """
    if rescale not in RESCALES:
        raise ConfigError(f"cagrad: rescale={rescale!r} is not valid; valid: 0, 1 (÷(1+c²), default), 2 (÷(1+c))")
    if isinstance(c, int | float) and c < 0:
        raise ConfigError(f"cagrad: c={c!r} must be >= 0 (the thesis uses 0.4)")
    if not isinstance(iters, int) or iters < 1:
        raise ConfigError(f"cagrad: iters={iters!r} must be a positive int")
    check_grads(grads)
    g = jnp.asarray(grads, jnp.float32)
    num_tasks = g.shape[0]
    A = gram(g)
    w = solve_weights(A, c, iters)
    c_tilde = c * jnp.sqrt(jnp.mean(A) + 1e-8) + 1e-8
    gw = jnp.dot(w, g, precision=_HI)
    lam = c_tilde / (jnp.linalg.norm(gw) + 1e-8)
    d = jnp.mean(g, axis=0) + lam * gw
    if rescale == 1:
        d = d / (1.0 + c * c)
    elif rescale == 2:
        d = d / (1.0 + c)
    return Combined(num_tasks * d, jnp.ones((num_tasks,), jnp.float32), () if state is None else state)


METHOD = GMMethod(
    name="cagrad",
    fn=cagrad,
    defaults={"c": 0.4, "rescale": 1, "iters": 400},
    clip={"famo_codebase": 1.0, "nash_codebase": None},
    kind="direct",
    reference="Liu et al. 2021 (CAGrad); nash-mtl/FAMO CAGrad.cagrad (SLSQP) + overwrite_grad (×T); "
              "spec sparse_mtl.md §2.2",
)
