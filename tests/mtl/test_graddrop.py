"""GradDrop on shared weights (``vlpeft_jax.mtl.graddrop``), FAMO-codebase form.

Spec: ``../shared/specs/sparse_mtl.md`` §2.3 and §7 item 13: ``P = ½(1 + ΣG/(Σ|G| + 1e-8))``, one uniform draw per
coordinate, keep the positive parts where ``P > U`` and the negative parts where ``P < U``, sum over tasks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.mtl import registry
from vlpeft_jax.mtl.graddrop import METHOD, graddrop, sign_purity


def numpy_graddrop(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Float64 port of the FAMO formula for given uniforms ``u`` ``[P]`` (the code's mean_t(...)·T = sum)."""
    g = np.asarray(g, np.float64)
    purity = 0.5 * (1.0 + g.sum(0) / (np.abs(g).sum(0) + 1e-8))
    mask = (purity > u)[None] * (g > 0) + (purity < u)[None] * (g < 0)
    return (g * mask).mean(0) * len(g)


def _pos_neg(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.clip(g, 0, None).sum(0), np.clip(g, None, 0).sum(0)


_batched = jax.jit(jax.vmap(lambda g, k: graddrop(g, key=k).direction, in_axes=(None, 0)))


# ---------------------------------------------------------------- spec §7 item 13
def test_agreeing_signs_are_kept_and_zeros_give_zero():
    g = jnp.array([[1.0, -2.0, 0.0, 0.5], [3.0, -1.0, 0.0, 0.0], [0.5, -0.5, 0.0, 2.0]])
    keys = jax.random.split(jax.random.PRNGKey(0), 64)
    out = np.asarray(_batched(g, keys))
    np.testing.assert_allclose(out, np.tile([4.5, -3.5, 0.0, 2.5], (64, 1)), rtol=1e-6)
    np.testing.assert_allclose(sign_purity(g), [1.0, 0.0, 0.5, 1.0], atol=1e-6)


def test_mixed_signs_pick_one_side_according_to_u():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(3, 200)).astype(np.float32)
    key = jax.random.PRNGKey(5)
    u = np.asarray(jax.random.uniform(key, (200,), jnp.float32), np.float64)  # the draw graddrop makes from key
    out = np.asarray(graddrop(jnp.asarray(g), key=key).direction, np.float64)
    pos, neg = _pos_neg(g.astype(np.float64))
    purity = np.asarray(sign_purity(jnp.asarray(g)), np.float64)
    np.testing.assert_allclose(out, np.where(purity > u, pos, neg), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, numpy_graddrop(g, u), rtol=1e-5, atol=1e-6)
    mixed = (pos > 0) & (neg < 0)
    assert mixed.sum() > 100 and 0 < np.mean(out[mixed] > 0) < 1  # both sides occur


def test_monte_carlo_expectation():
    rng = np.random.default_rng(1)
    g = rng.normal(size=(4, 6)).astype(np.float32)
    n = 20000
    samples = np.asarray(_batched(jnp.asarray(g), jax.random.split(jax.random.PRNGKey(2), n)), np.float64)
    pos, neg = _pos_neg(g.astype(np.float64))
    purity = 0.5 * (1 + g.astype(np.float64).sum(0) / (np.abs(g).sum(0) + 1e-8))
    expected = purity * pos + (1 - purity) * neg
    stderr = np.sqrt(purity * (1 - purity)) * (pos - neg) / np.sqrt(n)
    assert np.all(np.abs(samples.mean(0) - expected) <= 5 * stderr + 1e-6)
    # P = pos/(pos - neg), so E[d] = (pos² - neg²)/(pos - neg) = pos + neg: unbiased for the plain sum, while
    # every single draw keeps one sign per coordinate
    np.testing.assert_allclose(expected, g.astype(np.float64).sum(0), atol=1e-6)
    on_one_side = np.isclose(samples, pos[None], atol=1e-5) | np.isclose(samples, neg[None], atol=1e-5)
    assert np.all(on_one_side)


def test_leak():
    g = jnp.array([[1.0, 2.0], [1.0, -3.0]])
    key = jax.random.PRNGKey(0)
    np.testing.assert_allclose(graddrop(g, key=key, leak=1.0).direction, [2.0, -1.0])
    half = graddrop(g, key=key, leak=0.5).direction
    none = graddrop(g, key=key).direction
    np.testing.assert_allclose(half, 0.5 * np.array([2.0, -1.0]) + 0.5 * np.asarray(none), rtol=1e-6)
    with pytest.raises(ConfigError, match="leak"):
        graddrop(g, leak=1.5)


# ---------------------------------------------------------------- jit, registry, errors
def test_jit_registry_and_errors():
    g = jnp.asarray(np.random.default_rng(3).normal(size=(3, 50)), jnp.float32)
    key = jax.random.PRNGKey(4)
    direct = graddrop(g, key=key)
    np.testing.assert_array_equal(jax.jit(lambda g, k: graddrop(g, key=k).direction)(g, key), direct.direction)
    via = registry.combine("graddrop", g, key=key, return_all=True)
    np.testing.assert_array_equal(via.direction, direct.direction)
    np.testing.assert_array_equal(via.weights, np.ones(3))
    assert registry.get("graddrop") is METHOD and METHOD.kind == "direct" and METHOD.uses_key
    assert METHOD.clip == {"famo_codebase": 1.0, "nash_codebase": None}
    with pytest.raises(ConfigError, match="unknown option"):
        registry.combine("graddrop", g, p=0.5)
    # a fresh key gives a fresh mask
    other = graddrop(g, key=jax.random.PRNGKey(5)).direction
    assert np.abs(np.asarray(other) - np.asarray(direct.direction)).max() > 0
