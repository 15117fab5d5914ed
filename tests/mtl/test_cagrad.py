"""CAGrad (``vlpeft_jax.mtl.cagrad``) against SLSQP (the codebases' solver) and cvxpy, in float64.

Spec: ``../shared/specs/sparse_mtl.md`` §2.2 (objective ``wᵀAb + c̃·sqrt(wᵀAw + 1e-8)`` over the simplex,
``c̃ = c·sqrt(mean(A) + 1e-8) + 1e-8``, ``g = g0 + c̃/(‖g_w‖ + 1e-8)·g_w``, ``/(1 + c²)``, ``×T``) and §7 item 9.
"""

from __future__ import annotations

import cvxpy as cp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.mtl import registry
from vlpeft_jax.mtl.cagrad import METHOD, cagrad, cagrad_objective, projection_to_simplex_weighted, solve_weights

C = 0.4


def reference(g: np.ndarray, c: float = C, ftol: float = 1e-6, solver: str = "slsqp"):
    """The codebases' CAGrad in float64: SLSQP from 1/T (``ftol=1e-6`` is scipy's default) or cvxpy (SOCP).

    Returns (direction, w, objective function).
    """
    g = np.asarray(g, np.float64)
    T = g.shape[0]
    A = g @ g.T
    b = np.ones(T) / T
    c_tilde = c * np.sqrt(A.mean() + 1e-8) + 1e-8

    def objective(w):
        return w @ A @ b + c_tilde * np.sqrt(w @ A @ w + 1e-8)

    if solver == "slsqp":
        res = minimize(objective, b.copy(), method="SLSQP", bounds=[(0, 1)] * T,
                       constraints={"type": "eq", "fun": lambda w: 1 - w.sum()}, options={"ftol": ftol, "maxiter": 500})
        w = res.x
    else:  # sqrt(wᵀAw + 1e-8) = ‖(gᵀw, 1e-4)‖: a second-order cone program, solved to high accuracy
        s = np.sqrt(np.max(np.diag(A)))  # scale to O(1) for the conic solver
        var = cp.Variable(T)
        cone = cp.norm(cp.hstack([(g / s).T @ var, np.array([1e-4 / s])]))
        prob = cp.Problem(cp.Minimize((A / s**2 @ b) @ var + c_tilde / s * cone), [var >= 0, cp.sum(var) == 1])
        prob.solve(solver="CLARABEL", tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11)
        w = np.clip(var.value, 0, None)
        w = w / w.sum()
    gw = w @ g
    d = g.mean(0) + c_tilde / (np.linalg.norm(gw) + 1e-8) * gw
    return T * d / (1 + c * c), w, objective


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


_batched = jax.jit(jax.vmap(lambda g: cagrad(g).direction))
_batched_w = jax.jit(jax.vmap(lambda g: solve_weights(g @ g.T, C)))


def _problems(num_tasks: int, dim: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(n, num_tasks, dim))
    g[1::2] -= 0.7 * g[1::2].mean(1, keepdims=True)  # every other problem: strong conflict
    return (g * rng.lognormal(0.0, 0.5, size=(n, num_tasks, 1))).astype(np.float32)


# ---------------------------------------------------------------- against SLSQP (spec §7 item 9, last bullet)
@pytest.mark.parametrize("num_tasks", [2, 3, 10])
def test_matches_slsqp(num_tasks):
    gs = _problems(num_tasks, 12, 6, seed=num_tasks)  # P >= T: A is non-singular, so w is unique
    directions = np.asarray(_batched(jnp.asarray(gs)), np.float64)
    weights = np.asarray(_batched_w(jnp.asarray(gs)), np.float64)
    worst_d = worst_w = 0.0
    for g, d, w in zip(gs, directions, weights, strict=True):
        ref_d, ref_w, objective = reference(g, ftol=1e-12)
        worst_d, worst_w = max(worst_d, _rel(d, ref_d)), max(worst_w, float(np.abs(w - ref_w).max()))
        assert objective(w) <= objective(ref_w) + 1e-6 * abs(objective(ref_w))
        # the codebases' own call (default ftol) is looser; ours is at least as good
        _, default_w, _ = reference(g)
        assert objective(w) <= objective(default_w) + 1e-6 * abs(objective(default_w))
    print(f"T={num_tasks}: max rel. direction diff {worst_d:.1e}, max |w - w_slsqp| {worst_w:.1e}")
    assert worst_d < 1e-4 and worst_w < 1e-4


def test_singular_gram_matches_slsqp_directions():
    gs = _problems(10, 5, 4, seed=11)  # P < T: w is not unique, the direction and the optimum value are
    directions = np.asarray(_batched(jnp.asarray(gs)), np.float64)
    weights = np.asarray(_batched_w(jnp.asarray(gs)), np.float64)
    for g, d, w in zip(gs, directions, weights, strict=True):
        ref_d, ref_w, objective = reference(g, ftol=1e-12)
        assert _rel(d, ref_d) < 1e-4
        assert objective(w) <= objective(ref_w) + 1e-6 * abs(objective(ref_w))


def test_badly_scaled_tasks_match_cvxpy():
    rng = np.random.default_rng(12)
    g = rng.normal(size=(2, 5, 12)) * np.array([1e-2, 1.0, 3.0, 30.0, 1e2])[None, :, None]  # norms over 4 decades
    g = g.astype(np.float32)
    directions = np.asarray(jax.jit(jax.vmap(lambda g: cagrad(g).direction))(jnp.asarray(g)), np.float64)
    for gi, d in zip(g, directions, strict=True):
        ref_d, _, _ = reference(gi, solver="cvxpy")
        assert _rel(d, ref_d) < 1e-4


# ---------------------------------------------------------------- spec §7 item 9, closed forms and properties
def test_c_zero_is_the_sum():
    g = _problems(3, 6, 1, seed=13)[0]
    np.testing.assert_allclose(cagrad(jnp.asarray(g), c=0.0).direction, g.sum(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rescale,factor", [(1, (1 + C) / (1 + C * C)), (2, 1.0), (0, 1 + C)])
def test_equal_gradients(rescale, factor):
    g = np.tile(np.array([[0.5, -1.0, 2.0]], np.float32), (3, 1))
    out = cagrad(jnp.asarray(g), rescale=rescale)
    np.testing.assert_allclose(out.direction, 3 * g[0] * factor, rtol=1e-5)
    np.testing.assert_array_equal(out.weights, np.ones(3))


def test_ball_constraint_and_worst_task_improvement():
    gs = _problems(4, 7, 6, seed=14)
    for g in gs:
        g64 = g.astype(np.float64)
        d = np.asarray(cagrad(jnp.asarray(g), rescale=0).direction, np.float64) / 4  # g before the rescale
        g0 = g64.mean(0)
        assert np.linalg.norm(d - g0) <= C * np.linalg.norm(g0) + 1e-6 * np.linalg.norm(g64)
        # the point of CAGrad: the worst task's first-order decrease is at least the one of g0
        assert np.min(g64 @ d) >= np.min(g64 @ g0) - 1e-5 * np.abs(g64 @ g0).max()
        # optimality over the ball: no point of the ball along random directions does better
        rng = np.random.default_rng(0)
        u = rng.normal(size=(200, g.shape[1]))
        u = g0 + C * np.linalg.norm(g0) * u / np.linalg.norm(u, axis=1, keepdims=True)
        assert np.min(g64 @ d) >= np.max(np.min(u @ g64.T, axis=1)) - 1e-5 * np.abs(g64 @ g0).max()


def test_objective_and_weighted_projection_helpers():
    A = np.array([[2.0, -1.0], [-1.0, 3.0]])
    w = np.array([0.3, 0.7])
    expected = w @ A @ np.ones(2) / 2 + (C * np.sqrt(A.mean() + 1e-8) + 1e-8) * np.sqrt(w @ A @ w + 1e-8)
    assert float(cagrad_objective(jnp.asarray(w, jnp.float32), jnp.asarray(A, jnp.float32), C)) == pytest.approx(
        expected, rel=1e-6)
    # weighted projection: compare with SLSQP on Σ d_i (x_i - y_i)²
    rng = np.random.default_rng(15)
    for _ in range(5):
        y, d = rng.normal(size=4), rng.uniform(0.1, 5.0, size=4)
        res = minimize(lambda x, d=d, y=y: np.sum(d * (x - y) ** 2), np.ones(4) / 4, method="SLSQP",
                       bounds=[(0, None)] * 4, constraints={"type": "eq", "fun": lambda x: 1 - x.sum()},
                       options={"ftol": 1e-14})
        ours = projection_to_simplex_weighted(jnp.asarray(y, jnp.float32), jnp.asarray(d, jnp.float32))
        np.testing.assert_allclose(ours, res.x, atol=1e-5)


# ---------------------------------------------------------------- jit, registry, errors
def test_jit_registry_and_errors():
    g = jnp.asarray(_problems(3, 8, 1, seed=16)[0])
    direct = cagrad(g)
    np.testing.assert_allclose(jax.jit(lambda g: cagrad(g).direction)(g), direct.direction, rtol=1e-5, atol=1e-6)
    via = registry.combine("cagrad", g, return_all=True)
    np.testing.assert_array_equal(via.direction, direct.direction)
    np.testing.assert_array_equal(via.weights, np.ones(3))
    assert registry.get("cagrad") is METHOD and METHOD.kind == "direct" and METHOD.defaults["c"] == 0.4
    assert METHOD.clip == {"famo_codebase": 1.0, "nash_codebase": None}
    with pytest.raises(ConfigError, match="unknown option"):
        registry.combine("cagrad", g, alpha=0.5)
    with pytest.raises(ConfigError, match="rescale"):
        registry.combine("cagrad", g, rescale=3)
    with pytest.raises(ConfigError, match="c="):
        cagrad(g, c=-0.1)
