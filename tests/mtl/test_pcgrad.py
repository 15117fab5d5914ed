"""PCGrad (``vlpeft_jax.mtl.pcgrad``) against hand-derived cases and a float64 numpy port.

Spec: ``../shared/specs/sparse_mtl.md`` §2.1 (nash-mtl / FAMO ``_project_conflicting``: a random order of all tasks
per task, ``j == i`` included, projection against the original ``g_j``, sum) and §7 item 8.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.mtl import registry
from vlpeft_jax.mtl.pcgrad import METHOD, pcgrad, project_conflicting, task_orders


def numpy_pcgrad(g: np.ndarray, orders, include_self: bool = True) -> np.ndarray:
    """Float64 port of the codebases' loop, with an explicit visiting order per task; returns the ``pc`` rows."""
    g = np.asarray(g, np.float64)
    pc = g.copy()
    for i in range(len(g)):
        for j in orders[i]:
            if j == i and not include_self:
                continue
            dot = pc[i] @ g[j]
            if dot < 0:
                pc[i] = pc[i] - dot / (g[j] @ g[j]) * g[j]
    return pc


def _fixed(num_tasks: int):
    return [list(range(num_tasks))] * num_tasks


# ---------------------------------------------------------------- spec §7 item 8
def test_orthogonal_and_agreeing_gradients_are_summed():
    ortho = jnp.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    np.testing.assert_allclose(pcgrad(ortho).direction, [1.0, 2.0, 0.0])
    agree = jnp.array([[1.0, 1.0], [2.0, 0.5]])
    np.testing.assert_allclose(pcgrad(agree).direction, [3.0, 1.5])
    same = jnp.array([[0.3, -1.2, 2.0], [0.3, -1.2, 2.0]])
    np.testing.assert_allclose(pcgrad(same).direction, 2 * np.array([0.3, -1.2, 2.0]), rtol=1e-6)


def test_textbook_pair():
    g = jnp.array([[1.0, 0.0], [-1.0, 1.0]])
    pc = project_conflicting(g, task_orders(2, None, shuffle=False))
    np.testing.assert_allclose(pc, [[0.5, 0.5], [0.0, 1.0]], atol=1e-7)
    for seed in range(3):  # two tasks: the order does not matter
        np.testing.assert_allclose(pcgrad(g, key=jax.random.PRNGKey(seed)).direction, [0.5, 1.5], atol=1e-7)


def test_no_conflict_left_after_projection():
    rng = np.random.default_rng(0)
    for _ in range(5):
        g = rng.normal(size=(2, 20)).astype(np.float32)
        pc = np.asarray(project_conflicting(jnp.asarray(g), task_orders(2, jax.random.PRNGKey(1))), np.float64)
        scale = np.linalg.norm(g, axis=1).max() ** 2
        assert pc[0] @ g[1] >= -1e-6 * scale and pc[1] @ g[0] >= -1e-6 * scale
    # T > 2: only the last task of each order is guaranteed free of conflict
    g = rng.normal(size=(4, 12)).astype(np.float32)
    orders = np.asarray(task_orders(4, jax.random.PRNGKey(2)))
    pc = np.asarray(project_conflicting(jnp.asarray(g), orders), np.float64)
    for i in range(4):
        assert pc[i] @ g[orders[i][-1]] >= -1e-5


@pytest.mark.parametrize("include_self", [True, False])
def test_fixed_order_t3_matches_numpy_port(include_self):
    rng = np.random.default_rng(3)
    for _ in range(4):
        g = rng.normal(size=(3, 8)).astype(np.float32)
        g[2] = -0.8 * g[0] + 0.3 * g[2]  # a strong conflict
        ref = numpy_pcgrad(g, _fixed(3), include_self)
        out = pcgrad(jnp.asarray(g), shuffle=False, include_self=include_self)
        np.testing.assert_allclose(out.direction, ref.sum(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out.weights, np.ones(3))


def test_random_orders_match_numpy_port_and_are_permutations():
    rng = np.random.default_rng(4)
    g = rng.normal(size=(5, 16)).astype(np.float32)
    g -= 0.6 * g.mean(0)
    key = jax.random.PRNGKey(7)
    orders = np.asarray(task_orders(5, key))
    for row in orders:
        assert sorted(row.tolist()) == list(range(5))
    ref = numpy_pcgrad(g, orders)
    out = pcgrad(jnp.asarray(g), key=key)
    np.testing.assert_allclose(out.direction, ref.sum(0), rtol=1e-5, atol=1e-5)
    # the order matters for T > 2, and the key decides it
    other = [numpy_pcgrad(g, np.asarray(task_orders(5, jax.random.PRNGKey(s)))).sum(0) for s in range(6)]
    assert max(np.abs(o - ref.sum(0)).max() for o in other) > 1e-3
    np.testing.assert_array_equal(pcgrad(jnp.asarray(g), key=key).direction, out.direction)


def test_self_projection_when_pc_turns_against_its_own_gradient():
    # task 2, order (0, 1, 2): (1,-3) -> against (0,3): (1,0) -> against (-2,2): (0.5,0.5); then
    # <(0.5,0.5), (1,-3)> = -1 < 0, so with j == i (the codebases) it is projected once more: (0.6, 0.2)
    g = np.array([[0.0, 3.0], [-2.0, 2.0], [1.0, -3.0]], np.float32)
    orders = jnp.array([[1, 2, 0], [0, 2, 1], [0, 1, 2]])
    with_self = np.asarray(project_conflicting(jnp.asarray(g), orders, True))
    without = np.asarray(project_conflicting(jnp.asarray(g), orders, False))
    np.testing.assert_allclose(with_self[2], [0.6, 0.2], atol=1e-6)
    np.testing.assert_allclose(without[2], [0.5, 0.5], atol=1e-6)
    for include_self, out in ((True, with_self), (False, without)):
        np.testing.assert_allclose(out, numpy_pcgrad(g, np.asarray(orders), include_self), atol=1e-6)


def test_mean_reduction_and_zero_gradient():
    g = jnp.array([[1.0, 0.0], [-1.0, 1.0], [0.0, 0.0]])  # a zero task never projects and never divides by 0
    out = pcgrad(g, shuffle=False, reduction="mean")
    assert np.all(np.isfinite(out.direction))
    np.testing.assert_allclose(out.direction, np.array([0.5, 1.5]) / 3, rtol=1e-6)


# ---------------------------------------------------------------- jit, registry, errors
def test_jit_registry_and_errors():
    g = jnp.asarray(np.random.default_rng(8).normal(size=(4, 10)), jnp.float32)
    key = jax.random.PRNGKey(3)
    direct = pcgrad(g, key=key)
    jitted = jax.jit(lambda g, k: pcgrad(g, key=k))(g, key)
    np.testing.assert_allclose(jitted.direction, direct.direction, rtol=1e-6, atol=1e-6)
    via = registry.combine("pcgrad", g, key=key, return_all=True)
    np.testing.assert_array_equal(via.direction, direct.direction)
    np.testing.assert_array_equal(via.weights, np.ones(4))
    assert registry.get("pcgrad") is METHOD and METHOD.kind == "direct" and METHOD.uses_key
    assert METHOD.clip == {"famo_codebase": 1.0, "nash_codebase": None}
    with pytest.raises(ConfigError, match="unknown option"):
        registry.combine("pcgrad", g, c=0.4)
    with pytest.raises(ConfigError, match="reduction"):
        registry.combine("pcgrad", g, reduction="max")
