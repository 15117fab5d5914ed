"""MGDA (``vlpeft_jax.mtl.mgda``) against a float64 numpy port of the min-norm solver and brute force.

Spec: ``../shared/specs/sparse_mtl.md`` §2.4 (nash-mtl / FAMO ``MinNormSolver.find_min_norm_element``, weights
``sol·T``) and §7 item 10. The numpy port below is written from the algorithm described there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.mtl import registry
from vlpeft_jax.mtl.mgda import METHOD, find_min_norm_element, mgda, min_norm_element_from2


# ---------------------------------------------------------------- float64 numpy port of the reference solver
def _from2(v11: float, v12: float, v22: float) -> tuple[float, float]:
    if v12 >= v11:
        return 0.999, v11
    if v12 >= v22:
        return 0.001, v22
    gamma = (v22 - v12) / (v11 + v22 - 2.0 * v12)
    return gamma, v22 + gamma * (v12 - v22)


def _to_simplex(y: np.ndarray) -> np.ndarray:
    s = np.sort(y)[::-1]
    shift = (y.sum() - 1.0) / len(y)
    total = 0.0
    for i in range(len(y) - 1):
        total += s[i]
        cand = (total - 1.0) / (i + 1)
        if cand > s[i + 1]:
            shift = cand
            break
    return np.maximum(y - shift, 0.0)


def _next(cur: np.ndarray, grad: np.ndarray) -> np.ndarray:
    pg = grad - grad.sum() / len(cur)
    r1 = -cur[pg < 0] / pg[pg < 0]
    r2 = (1.0 - cur[pg > 0]) / pg[pg > 0]
    t = 1.0
    if np.any(r1 > 1e-7):
        t = r1[r1 > 1e-7].min()
    if np.any(r2 > 1e-7):
        t = min(t, r2[r2 > 1e-7].min())
    return _to_simplex(pg * t + cur)


def numpy_min_norm(A: np.ndarray, max_iter: int = 250, stop: float = 1e-5) -> np.ndarray:
    n = A.shape[0]
    best, pair = np.inf, None
    for i in range(n):
        for j in range(i + 1, n):
            gamma, cost = _from2(A[i, i], A[i, j], A[j, j])
            if cost < best:
                best, pair = cost, (i, j, gamma)
    sol = np.zeros(n)
    sol[pair[0]], sol[pair[1]] = pair[2], 1.0 - pair[2]
    if n < 3:
        return sol
    for _ in range(max_iter):
        new = _next(sol, -A @ sol)
        nc, _ = _from2(sol @ A @ sol, sol @ A @ new, new @ A @ new)
        cand = nc * sol + (1.0 - nc) * new
        if np.abs(cand - sol).sum() < stop:
            return sol
        sol = cand
    return sol


def _gram32(g: np.ndarray) -> np.ndarray:
    """The float32 Gram matrix both solvers start from (the reference also solves on float32 dot products)."""
    g = jnp.asarray(g, jnp.float32)
    return np.asarray(jnp.dot(g, g.T, precision=jax.lax.Precision.HIGHEST), np.float64)


_jit_mgda = jax.jit(lambda g: mgda(g))


# ---------------------------------------------------------------- spec §7 item 10
def test_two_orthogonal_tasks_meet_in_the_middle():
    out = mgda(jnp.array([[1.0, 0.0], [0.0, 1.0]]))
    np.testing.assert_allclose(out.weights, [1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(out.direction, [1.0, 1.0], rtol=1e-6)


def test_two_tasks_closed_form_random():
    rng = np.random.default_rng(0)
    for _ in range(10):
        g = rng.normal(size=(2, 7))
        g[1] -= 0.5 * g[0]
        v11, v12, v22 = g[0] @ g[0], g[0] @ g[1], g[1] @ g[1]
        gamma = np.clip((v22 - v12) / (v11 + v22 - 2 * v12), 0.001, 0.999)  # the clamps of the interior branch
        if v12 >= v11:
            gamma = 0.999
        elif v12 >= v22:
            gamma = 0.001
        out = mgda(jnp.asarray(g, jnp.float32))
        np.testing.assert_allclose(out.weights, 2 * np.array([gamma, 1 - gamma]), atol=2e-6)
        np.testing.assert_allclose(out.direction, 2 * (gamma * g[0] + (1 - gamma) * g[1]), rtol=1e-5, atol=1e-5)


def test_collinear_edge_case_clamps_at_0999():
    out = mgda(jnp.array([[1.0, 0.0], [2.0, 0.0]]))  # v12 = 2 >= v11 = 1: gamma = 0.999 on the first task
    np.testing.assert_allclose(out.weights, [2 * 0.999, 2 * 0.001], rtol=1e-6, atol=1e-7)
    gamma, cost = min_norm_element_from2(jnp.float32(4.0), jnp.float32(2.0), jnp.float32(1.0))
    assert float(gamma) == pytest.approx(0.001) and float(cost) == 1.0  # the other branch: v12 >= v22


@pytest.mark.parametrize("num_tasks", [3, 10])
def test_matches_numpy_port(num_tasks):
    """Same float32 Gram matrix in; the port iterates in float64, the JAX solver in float32.

    The projected-gradient path is sensitive to rounding once it crawls (T=10 often needs 100-250 steps), so for
    T=10 the two stop at points up to ~1e-4 apart, both at the reference's own accuracy (its stop rule); where
    the reference stops early (few steps) they agree to 1e-5. T=3 agrees to 1e-5 throughout.
    """
    rng = np.random.default_rng(num_tasks)
    diffs = []
    for trial in range(8):
        g = rng.normal(size=(num_tasks, 16)) * rng.lognormal(0.0, 0.5, size=(num_tasks, 1))
        if trial % 2:
            g = g - 0.7 * g.mean(0)  # more conflict: interior solutions
        A = _gram32(g)
        ref = numpy_min_norm(A)
        sol, _ = find_min_norm_element(jnp.asarray(A, jnp.float32))
        sol = np.asarray(sol, np.float64)
        out = _jit_mgda(jnp.asarray(g, jnp.float32))
        np.testing.assert_allclose(np.asarray(out.weights), num_tasks * sol, atol=num_tasks * 1e-6)
        diffs.append(float(np.abs(sol - ref).max()))
        # the min-norm value reached: the same to 1e-6 (T=3) / 5e-4 (T=10) relative
        np.testing.assert_allclose(sol @ A @ sol, ref @ A @ ref, rtol=1e-6 if num_tasks == 3 else 5e-4)
    print(f"T={num_tasks}: |sol - numpy port|_max per problem = {[f'{d:.1e}' for d in diffs]}")
    if num_tasks == 3:
        assert max(diffs) < 1e-5
    else:
        assert max(diffs) < 5e-4
        assert sum(d < 1e-5 for d in diffs) >= 2  # the quickly converging problems match tightly


def test_kkt_and_brute_force_t3():
    rng = np.random.default_rng(3)
    simplex = np.array([(i, j, 400 - i - j) for i in range(401) for j in range(401 - i)], np.float64) / 400
    for _ in range(6):
        g = rng.normal(size=(3, 5))
        g = g - 0.6 * g.mean(0)
        A = _gram32(g)
        out = mgda(jnp.asarray(g, jnp.float32))
        alpha = np.asarray(out.weights, np.float64) / 3
        assert alpha.sum() == pytest.approx(1.0, abs=1e-6)
        assert np.all(alpha >= 0)
        value = alpha @ A @ alpha
        scale = np.abs(A).max()
        # KKT of min_{α∈Δ} αᵀAα: (Aα)_i >= αᵀAα for all i, equality on the support (stop criterion 1e-5)
        grad = A @ alpha
        assert np.all(grad >= value - 2e-4 * scale)
        support = alpha > 1e-3
        np.testing.assert_allclose(grad[support], value, atol=2e-4 * scale)
        # brute force: a dense grid over the simplex and SLSQP
        grid = np.min(np.einsum("ni,ij,nj->n", simplex, A, simplex))
        res = minimize(lambda a, A=A: a @ A @ a, np.ones(3) / 3, method="SLSQP", bounds=[(0, 1)] * 3,
                       constraints={"type": "eq", "fun": lambda a: 1 - a.sum()}, options={"ftol": 1e-14})
        assert value <= grid + 1e-6 * scale
        assert value <= res.fun + 1e-5 * scale
        np.testing.assert_allclose(out.direction, alpha @ g * 3, rtol=1e-4, atol=1e-5)


def test_weights_sum_to_t_and_direction_is_weighted_sum():
    g = np.random.default_rng(5).normal(size=(4, 9)).astype(np.float32)
    out = mgda(jnp.asarray(g))
    assert float(jnp.sum(out.weights)) == pytest.approx(4.0, abs=1e-5)
    np.testing.assert_allclose(out.direction, np.asarray(out.weights) @ g, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- normalization options
def test_normalizations():
    rng = np.random.default_rng(6)
    g = rng.normal(size=(3, 6)).astype(np.float32)
    losses = np.array([0.5, 2.0, 1.5], np.float32)
    scaled = g * np.array([[10.0], [1.0], [1.0]], np.float32)
    # l2: the solve sees unit gradients, so rescaling one task's gradient changes nothing in the weights
    np.testing.assert_allclose(mgda(jnp.asarray(g), normalization="l2").weights,
                               mgda(jnp.asarray(scaled), normalization="l2").weights, atol=1e-5)
    # norm is nash-mtl's name for l2
    np.testing.assert_allclose(mgda(jnp.asarray(g), normalization="norm").weights,
                               mgda(jnp.asarray(g), normalization="l2").weights)
    # loss / loss+: the same as solving on g_t / L_t (resp. g_t / (L_t ||g_t||)) with the port
    for name, div in [("loss", losses), ("loss+", losses * np.linalg.norm(g.astype(np.float64), axis=1))]:
        ref = numpy_min_norm(_gram32(g) / np.outer(div, div))
        out = mgda(jnp.asarray(g), losses=jnp.asarray(losses), normalization=name)
        np.testing.assert_allclose(out.weights, 3 * ref, atol=1e-4)
        np.testing.assert_allclose(out.direction, 3 * ref @ g, rtol=1e-3, atol=1e-4)  # unnormalised g
    with pytest.raises(ConfigError, match="losses"):
        mgda(jnp.asarray(g), normalization="loss")
    with pytest.raises(ConfigError, match="normalization"):
        mgda(jnp.asarray(g), normalization="max")


# ---------------------------------------------------------------- jit, registry, errors
def test_jit_registry_and_errors():
    g = jnp.asarray(np.random.default_rng(7).normal(size=(3, 8)), jnp.float32)
    direct = mgda(g)
    np.testing.assert_allclose(_jit_mgda(g).direction, direct.direction, rtol=1e-6, atol=1e-7)
    via = registry.combine("mgda", g, return_all=True)
    np.testing.assert_array_equal(via.direction, direct.direction)
    np.testing.assert_array_equal(via.weights, direct.weights)
    assert registry.get("mgda") is METHOD and METHOD.kind == "weighting"
    assert METHOD.clip == {"famo_codebase": None, "nash_codebase": None}
    with pytest.raises(ConfigError, match="unknown option"):
        registry.combine("mgda", g, c=0.4)
    with pytest.raises(ConfigError):
        registry.combine("mgda", g[:1])  # one task


def test_vmap_over_problems():
    rng = np.random.default_rng(8)
    gs = rng.normal(size=(4, 5, 6)).astype(np.float32)
    batched = jax.jit(jax.vmap(lambda g: mgda(g).weights))(jnp.asarray(gs))
    for g, w in zip(gs, batched, strict=True):
        # batching reorders float32 rounding, and a crawling projected-gradient path amplifies it (see above)
        single = np.asarray(mgda(jnp.asarray(g)).weights, np.float64) / 5
        w = np.asarray(w, np.float64) / 5
        A = _gram32(g)
        np.testing.assert_allclose(w, single, atol=1e-3)
        np.testing.assert_allclose(w @ A @ w, single @ A @ single, rtol=1e-4)


def test_zero_gradients_do_not_nan():
    out = mgda(jnp.zeros((3, 4)))
    assert np.all(np.isfinite(out.weights)) and np.all(np.asarray(out.direction) == 0)
