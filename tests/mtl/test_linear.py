"""Linear scalarisation ``ls`` (Joint Train, thesis Eq. 6.2; nash-mtl ``ls``): spec sparse_mtl.md §2.0 (A5), §2.9."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.mtl import registry
from vlpeft_jax.mtl.linear import METHOD, linear


def _grads(T=3, P=6, seed=0):
    return np.random.default_rng(seed).normal(size=(T, P)).astype(np.float32)


def test_mean_is_joint_train_eq_6_2():
    g = _grads()
    out = linear(jnp.asarray(g))
    np.testing.assert_allclose(out.weights, np.full(3, 1 / 3), rtol=1e-6)
    np.testing.assert_allclose(out.direction, g.mean(0), rtol=1e-5, atol=1e-6)


def test_sum_is_nash_ls_and_fixed_weights():
    g = _grads()
    out = linear(jnp.asarray(g), reduction="sum")
    np.testing.assert_allclose(out.weights, np.ones(3))
    np.testing.assert_allclose(out.direction, g.sum(0), rtol=1e-5, atol=1e-6)
    w = (0.5, 2.0, 1.0)
    out = linear(jnp.asarray(g), weights=w, reduction="sum")
    np.testing.assert_allclose(out.direction, np.asarray(w) @ g, rtol=1e-5, atol=1e-6)
    out = linear(jnp.asarray(g), weights=w)  # mean of w_t L_t
    np.testing.assert_allclose(out.weights, np.asarray(w) / 3, rtol=1e-6)


def test_single_task_and_errors():
    g = _grads(T=1)
    np.testing.assert_allclose(registry.combine("ls", g), g[0], rtol=1e-6)
    assert METHOD.min_tasks == 1 and METHOD.kind == "weighting"
    assert METHOD.clip == {"famo_codebase": None, "nash_codebase": None}
    with pytest.raises(ConfigError, match="reduction"):
        linear(jnp.asarray(_grads()), reduction="max")
    with pytest.raises(ConfigError, match="one entry per task"):
        linear(jnp.asarray(_grads()), weights=(1.0, 2.0))


def test_jit_and_registry_match_direct_call():
    g = jnp.asarray(_grads())
    direct = linear(g, reduction="sum")
    jitted = jax.jit(lambda x: linear(x, reduction="sum"))(g)
    np.testing.assert_allclose(jitted.direction, direct.direction, rtol=1e-6)
    via = registry.combine("joint", g, reduction="sum", return_all=True)
    np.testing.assert_allclose(via.direction, direct.direction, rtol=1e-6)
    np.testing.assert_allclose(via.weights, direct.weights, rtol=1e-6)
