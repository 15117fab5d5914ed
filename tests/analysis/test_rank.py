"""Effective rank (seed 002 §2.3, Eq. 1-5, Table 1) on matrices with known singular values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpeft_jax.analysis import rank
from vlpeft_jax.errors import InputError


def with_singular_values(key, n, d, values):
    """An ``[n, d]`` matrix ``U diag(values) Vᵀ`` with random orthonormal ``U``, ``V``."""
    k1, k2 = jax.random.split(key)
    u, _ = jnp.linalg.qr(jax.random.normal(k1, (n, n)))
    v, _ = jnp.linalg.qr(jax.random.normal(k2, (d, d)))
    m = len(values)
    return (u[:, :m] * jnp.asarray(values)) @ v[:, :m].T


def test_known_singular_values_are_recovered_and_normalised():
    values = [4.0, 3.0, 2.0, 1.0]
    f = with_singular_values(jax.random.key(0), 6, 5, values)  # M = 5; rank 4
    s = rank.normalized_singular_values(f)
    np.testing.assert_allclose(s[0], np.array([4, 3, 2, 1, 0]) / 10.0, atol=1e-5)


def test_average_accumulation_and_ratio_by_hand():
    a = with_singular_values(jax.random.key(1), 4, 4, [1.0, 1.0, 1.0, 1.0])  # flat: 0.25 each
    b = with_singular_values(jax.random.key(2), 4, 4, [7.0, 1.0, 1.0, 1.0])  # 0.7, 0.1, 0.1, 0.1
    s = rank.normalized_singular_values(jnp.stack([a, b]))
    y = rank.accumulated_curve(s)
    np.testing.assert_allclose(y, [0.475, 0.65, 0.825, 1.0], atol=1e-5)  # mean (0.475, 0.175, 0.175, 0.175)
    assert rank.effective_rank_ratio(y) == 1.0
    assert rank.effective_rank_ratio(y, threshold=0.6) == 0.5
    assert rank.effective_rank_ratio(rank.accumulated_curve(s[1:])) == 0.75  # 0.7, 0.8, 0.9
    # a narrower representation has the smaller effective rank
    assert rank.effective_rank_ratio(rank.accumulated_curve(s[1:])) <= rank.effective_rank_ratio(
        rank.accumulated_curve(s[:1]))


def test_padded_rows_do_not_change_a_sample():
    f = jax.random.normal(jax.random.key(3), (5, 8))
    padded = jnp.concatenate([f, 100.0 * jnp.ones((3, 8))])[None]
    mask = jnp.array([[True] * 5 + [False] * 3])
    np.testing.assert_allclose(rank.normalized_singular_values(padded, mask)[0, :5],
                               rank.normalized_singular_values(f)[0], atol=1e-6)


def test_summary_plot_and_bad_input(tmp_path):
    r = rank.rank_summary(jax.random.normal(jax.random.key(4), (3, 10, 6)))
    assert r["num_values"] == 6 and len(r["curve"]) == 6 and r["curve"][-1] == pytest.approx(1.0)
    rank.plot_curves(tmp_path / "curves.png", {"a": r["curve"]})
    assert (tmp_path / "curves.png").stat().st_size > 0
    with pytest.raises(InputError, match="all zeros"):
        rank.normalized_singular_values(jnp.zeros((1, 3, 3)))
    with pytest.raises(InputError, match=r"\[K, N, D\]"):
        rank.normalized_singular_values(jnp.zeros((3,)))
    with pytest.raises(InputError, match="mask"):
        rank.normalized_singular_values(jnp.ones((2, 3, 3)), jnp.ones((2, 4), bool))
    with pytest.raises(InputError, match="threshold"):
        rank.effective_rank_ratio(jnp.ones(3), threshold=1.5)
