"""IMTL-G (spec sparse_mtl.md §2.5, §7 item 11): equal projections, Σα = 1, and a numpy port of the nash-mtl
formula ``α_{2:T} = g_1 Uᵀ (D Uᵀ)^{-1}``, ``α_1 = 1 − Σ α_{2:T}``, written from the spec."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpeft_jax.mtl import registry
from vlpeft_jax.mtl.imtl import METHOD, imtlg


def imtlg_numpy(G):
    """The reference formula on the gradients themselves (float64); the 1e-8 I fallback when D Uᵀ is singular."""
    G = np.asarray(G, np.float64)
    U = G / np.linalg.norm(G, axis=1, keepdims=True)
    D = G[0] - G[1:]
    Ud = U[0] - U[1:]
    M = D @ Ud.T
    try:
        inv = np.linalg.inv(M)
    except np.linalg.LinAlgError:
        inv = np.linalg.inv(M + 1e-8 * np.eye(len(M)))
    rest = (G[0] @ Ud.T) @ inv
    return np.concatenate([[1 - rest.sum()], rest])


def _projections(G, alpha):
    G = np.asarray(G, np.float64)
    d = np.asarray(alpha, np.float64) @ G
    return G @ d / np.linalg.norm(G, axis=1)


@pytest.mark.parametrize("T", [2, 3, 5])
def test_matches_numpy_port_and_equal_projections(T):
    rng = np.random.default_rng(T)
    G = (rng.normal(size=(T, 11)) * rng.uniform(0.2, 5.0, size=(T, 1))).astype(np.float32)
    out = imtlg(jnp.asarray(G))
    ref = imtlg_numpy(G)
    np.testing.assert_allclose(out.weights, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(jnp.sum(out.weights)), 1.0, atol=1e-5)
    proj = _projections(G, out.weights)
    np.testing.assert_allclose(proj, np.full(T, proj.mean()), rtol=1e-4)
    np.testing.assert_allclose(out.direction, np.asarray(out.weights) @ G, rtol=1e-5, atol=1e-5)


def test_orthogonal_equal_norm_gives_uniform_and_scaling_keeps_the_property():
    T = 4
    G = 3.0 * np.eye(T, 6, dtype=np.float32)
    np.testing.assert_allclose(imtlg(jnp.asarray(G)).weights, np.full(T, 1 / T), rtol=1e-5)
    rng = np.random.default_rng(7)
    G = rng.normal(size=(3, 9)).astype(np.float32)
    G[1] *= 10.0
    out = imtlg(jnp.asarray(G))
    proj = _projections(G, out.weights)
    np.testing.assert_allclose(proj, np.full(3, proj.mean()), rtol=1e-4)
    np.testing.assert_allclose(out.weights, imtlg_numpy(G), rtol=1e-4, atol=1e-5)


def test_singular_parallel_gradients_use_the_fallback():
    # g_2 = 2 g_1: u_1 = u_2, so D Uᵀ = 0 and the reference falls back to (0 + 1e-8 I)^{-1}: α = (1, 0)
    G = np.array([[1.0, 2.0, -1.0], [2.0, 4.0, -2.0]], np.float32)
    out = imtlg(jnp.asarray(G))
    np.testing.assert_allclose(out.weights, imtlg_numpy(G), atol=1e-6)
    assert np.all(np.isfinite(np.asarray(out.direction)))


def test_jit_and_registry_match_direct_call():
    G = jnp.asarray(np.random.default_rng(3).normal(size=(3, 5)).astype(np.float32))
    direct = imtlg(G)
    np.testing.assert_allclose(jax.jit(imtlg)(G).weights, direct.weights, rtol=1e-5)
    via = registry.combine("imtl", G, return_all=True)
    np.testing.assert_allclose(via.direction, direct.direction, rtol=1e-6)
    assert METHOD.name == "imtlg" and METHOD.kind == "weighting"
    assert METHOD.clip == {"famo_codebase": None, "nash_codebase": None}
