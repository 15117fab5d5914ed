"""PETAL's score-based information bottleneck (vlpeft_jax/peft/petal_ib.py; seed 001 Eq. 5-9; spec petal.md §4,
§2.4 and §10 T13-T17): Eq. 5 pooling, the estimators against numpy ports of the authors' CLUBSample / MINE formulas,
MINE and the Gaussian decoder trained on data with known mutual information, stop-gradient placement and signs,
bag-of-words targets without pads, the batch-of-1 error and the estimator parameter count on abstract shapes.

References are written here from the formulas (numpy float64, PyTorch ``Linear`` layout ``x @ W.T + b``), never
taken from the code under test.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlpeft_jax.errors import ConfigError, InputError
from vlpeft_jax.peft import petal_ib as ib

B, N, Z_DIM, X_DIM, VOCAB = 6, 5, 8, 7, 11


def _randomised(params, seed=0):
    """The init has zero biases; add noise to every leaf so the parity checks exercise the biases too."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)])


@pytest.fixture(scope="module")
def setup():
    k = jax.random.split(jax.random.key(42), 5)
    params = _randomised(ib.init_estimators(k[0], Z_DIM, X_DIM, VOCAB))
    x = jax.random.normal(k[1], (B, X_DIM))
    z = jax.random.normal(k[2], (B, Z_DIM))
    y = jax.nn.softmax(2.0 * jax.random.normal(k[3], (B, VOCAB)), axis=-1)
    return params, x, z, y


# ---------------------------------------------------------------- numpy references (authors' formulas)

def _np(a):
    return np.asarray(a, np.float64)


def _linear(x, layer):
    w, b = _np(layer["kernel"]).T, _np(layer["bias"])  # PyTorch nn.Linear: weight [out, in]
    return x @ w.T + b


def _relu(a):
    return np.maximum(a, 0.0)


def _np_mu_logvar(zy, x):  # CLUBSample.get_mu_logvar
    mu = _linear(_relu(_linear(x, zy["mu1"])), zy["mu2"])
    logvar = np.tanh(_linear(_relu(_linear(x, zy["lv1"])), zy["lv2"]))
    return mu, logvar


def _np_loglikeli(zy, x, y):  # CLUBSample.loglikeli: sum over dim 1, mean over the batch
    mu, logvar = _np_mu_logvar(zy, _np(x))
    return (-((mu - _np(y)) ** 2) / (np.exp(logvar) + 1e-6) - logvar).sum(axis=1).mean(axis=0)


def _np_club_forward(zy, x, y, random_index):  # CLUBSample.forward
    mu, logvar = _np_mu_logvar(zy, _np(x))
    y = _np(y)
    positive = -((mu - y) ** 2) / (np.exp(logvar) + 1e-6)
    negative = -((mu - y[np.asarray(random_index)]) ** 2) / (np.exp(logvar) + 1e-6)
    return (positive.sum(axis=-1) - negative.sum(axis=-1)).mean() / 2.0


def _np_mine_forward(xz, x, y, random_index):  # MINE.forward (x first in the concatenation)
    x, y = _np(x), _np(y)

    def t_func(a):
        return _linear(_relu(_linear(a, xz["h"])), xz["out"])

    t0 = t_func(np.concatenate([x, y], axis=-1))
    t1 = t_func(np.concatenate([x, y[np.asarray(random_index)]], axis=-1)).reshape(-1)
    t1_max = t1.max()
    t1 = t1_max + np.log(np.exp(t1 - t1_max).sum()) - math.log(t1.shape[0])
    return t0.mean() - t1


# ---------------------------------------------------------------- T13 pooling (Eq. 5, A16)

def test_t13_equal_queries_pool_to_that_query():
    v = jax.random.normal(jax.random.key(0), (2, 1, 16))
    h = jnp.tile(v, (1, 9, 1))
    for mode in ib.POOL_MODES:
        z, alpha = ib.score_pool(h, mode)
        np.testing.assert_allclose(z, v[:, 0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(alpha, np.full((2, 9), 1 / 9), rtol=1e-5)


def test_t13_score_pool_matches_the_gram_formula_and_sums_to_one():
    h = jax.random.normal(jax.random.key(1), (3, N, 16))
    z, alpha = ib.score_pool(h, "score")
    hn = _np(h)
    s = np.einsum("bid,bjd->bij", hn, hn).mean(axis=-1) / math.sqrt(16)  # (1/n) Σ_j h_i·h_j / sqrt(d)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    np.testing.assert_allclose(alpha, a, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(z, np.einsum("bi,bid->bd", a, hn), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(alpha).sum(-1), 1.0, rtol=1e-6)
    assert (np.asarray(alpha) > 0).all()


def test_t13_permuting_queries_permutes_alpha_and_keeps_z():
    h = jax.random.normal(jax.random.key(2), (2, N, 12))
    perm = np.array([3, 0, 4, 2, 1])
    for mode in ib.POOL_MODES:
        z, alpha = ib.score_pool(h, mode)
        z_p, alpha_p = ib.score_pool(h[:, perm], mode)
        np.testing.assert_allclose(z_p, z, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(alpha_p, np.asarray(alpha)[:, perm], rtol=1e-5, atol=1e-7)


def test_t13_mean_mode_is_the_plain_mean_and_score_differs():
    h = jax.random.normal(jax.random.key(3), (2, N, 12))
    z_mean, alpha_mean = ib.score_pool(h, "mean")
    np.testing.assert_allclose(z_mean, _np(h).mean(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(alpha_mean, np.full((2, N), 1 / N), rtol=1e-6)
    z_score, _ = ib.score_pool(h, "score")
    assert float(jnp.max(jnp.abs(z_score - z_mean))) > 1e-2


def test_t13_unknown_mode_names_the_valid_ones():
    with pytest.raises(ConfigError, match="'score', 'mean'"):
        ib.score_pool(jnp.ones((1, 2, 3)), "attention")


# ---------------------------------------------------------------- T14 formula parity with the authors' code

def test_t14_gaussian_bound_is_half_the_loglikelihood(setup):
    params, _, z, y = setup
    ours = ib.zy_bound(params["zy"], z, y, "gaussian")
    np.testing.assert_allclose(ours, 0.5 * _np_loglikeli(params["zy"], z, y), rtol=1e-5)
    mu, logvar = ib.gaussian_decoder(params["zy"], z)
    np_mu, np_logvar = _np_mu_logvar(params["zy"], _np(z))
    np.testing.assert_allclose(mu, np_mu, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logvar, np_logvar, rtol=1e-5, atol=1e-6)


def test_t14_club_sample_matches_the_authors_forward(setup):
    params, _, z, y = setup
    perm = np.array([2, 0, 5, 1, 4, 3])
    ours = ib.zy_bound(params["zy"], z, y, "club_sample", perm=jnp.asarray(perm))
    np.testing.assert_allclose(ours, _np_club_forward(params["zy"], z, y, perm), rtol=1e-5)
    # the rng path draws π = jax.random.permutation(rng, B) (documented)
    key = jax.random.key(7)
    drawn = np.asarray(jax.random.permutation(key, B))
    np.testing.assert_allclose(ib.zy_bound(params["zy"], z, y, "club_sample", rng=key),
                               _np_club_forward(params["zy"], z, y, drawn), rtol=1e-5)


def test_t14_mine_dv_matches_the_authors_forward(setup):
    params, x, z, _ = setup
    sigma = np.array([0, 0, 3, 1, 5, 3])  # with replacement, as torch.randint
    ours = ib.mine_dv(params["xz"], x, z, sigma=jnp.asarray(sigma))
    np.testing.assert_allclose(ours, _np_mine_forward(params["xz"], x, z, sigma), rtol=1e-5, atol=1e-6)
    key = jax.random.key(8)
    drawn = np.asarray(jax.random.randint(key, (B,), 0, B))
    np.testing.assert_allclose(ib.mine_dv(params["xz"], x, z, key), _np_mine_forward(params["xz"], x, z, drawn),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("zy_estimator", ib.ZY_ESTIMATORS)
def test_t14_ib_terms_combine_the_two_bounds(setup, zy_estimator):
    params, x, z, y = setup
    rng, eta = jax.random.key(9), 0.25
    k_zy, k_xz = jax.random.split(rng)  # documented: k_zy draws π, k_xz draws σ
    sigma = np.asarray(jax.random.randint(k_xz, (B,), 0, B))
    if zy_estimator == "gaussian":
        i_zy = 0.5 * _np_loglikeli(params["zy"], z, y)
    else:
        i_zy = _np_club_forward(params["zy"], z, y, np.asarray(jax.random.permutation(k_zy, B)))
    i_xz = _np_mine_forward(params["xz"], x, z, sigma)
    t = ib.ib_terms(params, x, z, y, rng, eta=eta, zy_estimator=zy_estimator)
    np.testing.assert_allclose(t["i_zy"], i_zy, rtol=1e-5)
    np.testing.assert_allclose(t["i_xz"], i_xz, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(t["model"], -(i_zy - eta * i_xz), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(t["critic"], -i_xz, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- T15 the estimators learn known quantities

def _correlated(key, batch, d, rho):
    kx, ke = jax.random.split(key)
    x = jax.random.normal(kx, (batch, d))
    return x, rho * x + math.sqrt(1 - rho**2) * jax.random.normal(ke, (batch, d))


def _train_mine(d, rho, steps=400, batch=256):
    params = ib.init_estimators(jax.random.key(0), d, d, 2)["xz"]
    opt = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state, key):
        k_data, k_sigma = jax.random.split(key)
        x, z = _correlated(k_data, batch, d, rho)
        grads = jax.grad(lambda p: -ib.mine_dv(p, x, z, k_sigma))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = opt.init(params)
    for key in jax.random.split(jax.random.key(1), steps):
        params, opt_state = step(params, opt_state, key)

    @jax.jit
    def held_out(key):
        k_data, k_sigma = jax.random.split(key)
        x, z = _correlated(k_data, 4096, d, rho)
        return ib.mine_dv(params, x, z, k_sigma)

    return float(np.mean([held_out(k) for k in jax.random.split(jax.random.key(99), 4)]))


def test_t15_mine_approaches_the_true_mi_from_below():
    d, rho = 2, 0.8
    true_mi = -0.5 * d * math.log(1 - rho**2)
    estimate = _train_mine(d, rho)
    assert 0.65 * true_mi < estimate < true_mi + 0.05, (estimate, true_mi)


def test_t15_mine_on_independent_pairs_is_about_zero():
    estimate = _train_mine(2, 0.0)
    assert abs(estimate) < 0.1, estimate


def test_t15_gaussian_bound_rises_to_its_optimum():
    dz, dy, noise_var, batch = 3, 6, 0.5, 256
    a = jax.random.normal(jax.random.key(5), (dz, dy))

    def sample(key, n):
        kz, ke = jax.random.split(key)
        z = jax.random.normal(kz, (n, dz))
        return z, z @ a + math.sqrt(noise_var) * jax.random.normal(ke, (n, dy))

    params = ib.init_estimators(jax.random.key(0), dz, 2, dy)["zy"]
    opt = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state, key):
        z, y = sample(key, batch)
        grads = jax.grad(lambda p: -ib.zy_bound(p, z, y))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    held_out = jax.jit(lambda p: ib.zy_bound(p, *sample(jax.random.key(99), 8192)))
    opt_state = opt.init(params)
    trace = [float(held_out(params))]
    for i, key in enumerate(jax.random.split(jax.random.key(1), 400)):
        params, opt_state = step(params, opt_state, key)
        if i % 100 == 99:
            trace.append(float(held_out(params)))
    # with the true conditional N(Az, σ²) the bound is ½ Σ_d (-1 - log σ²); no decoder can beat it
    optimum = 0.5 * dy * (-1.0 - math.log(noise_var))
    assert trace[0] < trace[1] < trace[-1], trace
    assert optimum - 0.15 < trace[-1] < optimum + 0.05, (trace, optimum)


# ---------------------------------------------------------------- T16 signs and stop-gradients

def _nonzero(tree):
    return any(bool(jnp.any(leaf != 0)) for leaf in jax.tree.leaves(tree))


def _all_zero(tree):
    return all(bool(jnp.all(leaf == 0)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("zy_estimator", ib.ZY_ESTIMATORS)
def test_t16_stop_gradient_placement(setup, zy_estimator):
    params, x, z, y = setup
    rng = jax.random.key(3)

    def term(name):
        return lambda p, x, z: ib.ib_terms(p, x, z, y, rng, zy_estimator=zy_estimator)[name]

    g_p, g_x, g_z = jax.grad(term("model"), argnums=(0, 1, 2))(params, x, z)
    assert _all_zero(g_p["xz"])  # the model's term never trains the critic φ
    assert _nonzero(g_p["zy"]) and _nonzero(g_x) and _nonzero(g_z)
    g_p, g_x, g_z = jax.grad(term("critic"), argnums=(0, 1, 2))(params, x, z)
    assert _all_zero(g_p["zy"]) and _all_zero(g_x) and _all_zero(g_z)  # the critic trains φ only
    assert _nonzero(g_p["xz"])


def test_t16_model_gradient_is_minus_izy_plus_eta_ixz(setup):
    params, x, z, y = setup
    rng, eta = jax.random.key(4), 0.3
    sigma = jax.random.randint(jax.random.split(rng)[1], (B,), 0, B)
    g_model = jax.grad(lambda z: ib.ib_terms(params, x, z, y, rng, eta=eta)["model"])(z)
    g_zy = jax.grad(lambda z: ib.zy_bound(params["zy"], z, y))(z)
    g_xz = jax.grad(lambda z: ib.mine_dv(params["xz"], x, z, sigma=sigma))(z)
    np.testing.assert_allclose(g_model, -g_zy + eta * g_xz, rtol=1e-4, atol=1e-6)


def test_t16_raising_izy_lowers_and_raising_ixz_raises_the_model_loss(setup):
    params, x, z, y = setup
    rng, eta, step = jax.random.key(5), 0.1, 1e-2

    def terms(p):
        return ib.ib_terms(p, x, z, y, rng, eta=eta)

    base = terms(params)
    # a small step of θ up the gradient of Î_ZY
    g_zy = jax.grad(lambda q: ib.zy_bound(q, z, y))(params["zy"])
    up_zy = terms({**params, "zy": jax.tree.map(lambda p, g: p + step * g, params["zy"], g_zy)})
    d_izy = float(up_zy["i_zy"] - base["i_zy"])
    assert d_izy > 0
    assert float(up_zy["model"] - base["model"]) < 0
    np.testing.assert_allclose(up_zy["model"] - base["model"], -d_izy, rtol=1e-3)
    assert float(up_zy["critic"]) == float(base["critic"])
    # a small step of φ up the gradient of Î_XZ (same σ as ib_terms draws)
    sigma = jax.random.randint(jax.random.split(rng)[1], (B,), 0, B)
    g_xz = jax.grad(lambda q: ib.mine_dv(q, x, z, sigma=sigma))(params["xz"])
    up_xz = terms({**params, "xz": jax.tree.map(lambda p, g: p + step * g, params["xz"], g_xz)})
    d_ixz = float(up_xz["i_xz"] - base["i_xz"])
    assert d_ixz > 0
    assert float(up_xz["model"] - base["model"]) > 0
    np.testing.assert_allclose(up_xz["model"] - base["model"], eta * d_ixz, rtol=1e-3)
    assert float(up_xz["critic"] - base["critic"]) < 0


# ---------------------------------------------------------------- T17 targets without pads; batch of one

def _np_bow(ids, vocab, pad_id=None):
    out = np.zeros((len(ids), vocab))
    for r, row in enumerate(ids):
        kept = [t for t in row if 0 <= t < vocab and t != pad_id]
        for t in kept:
            out[r, t] += 1.0 / len(kept)
    return out


def test_t17_bag_of_words_ignores_pads_and_minus_100():
    ids = np.array([[5, 3, 3, 9, -100, -100], [1, 1, 1, 1, 1, 2], [-100] * 6])
    ybar = ib.bag_of_words(jnp.asarray(ids), 10)
    np.testing.assert_allclose(ybar, _np_bow(ids, 10), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ybar).sum(-1), [1.0, 1.0, 0.0], rtol=1e-6)
    longer = np.concatenate([ids, np.full((3, 7), -100)], axis=1)
    np.testing.assert_array_equal(ib.bag_of_words(jnp.asarray(longer), 10), ybar)
    # a pad id (T5's 0) and ids outside the vocabulary are ignored as well
    padded = np.concatenate([ids, np.zeros((3, 4), int), np.full((3, 1), 10)], axis=1)
    np.testing.assert_array_equal(ib.bag_of_words(jnp.asarray(padded), 10, pad_id=0), ybar)
    assert not np.array_equal(ib.bag_of_words(jnp.asarray(padded), 10), ybar)  # without pad_id, 0 counts


def test_t17_batch_of_one_raises_a_clear_error():
    params = ib.init_estimators(jax.random.key(0), Z_DIM, X_DIM, VOCAB)
    x, z, y = jnp.ones((1, X_DIM)), jnp.ones((1, Z_DIM)), jnp.full((1, VOCAB), 1 / VOCAB)
    with pytest.raises(InputError, match="at least 2"):
        ib.mine_dv(params["xz"], x, z, jax.random.key(1))
    with pytest.raises(InputError, match="at least 2"):
        jax.jit(lambda p, x, z: ib.ib_terms(p, x, z, y, jax.random.key(1)))(params, x, z)


def test_bad_arguments_raise(setup):
    params, x, z, y = setup
    with pytest.raises(ConfigError, match="'gaussian', 'club_sample'"):
        ib.zy_bound(params["zy"], z, y, "club")
    with pytest.raises(ConfigError, match="rng"):
        ib.zy_bound(params["zy"], z, y, "club_sample")
    with pytest.raises(InputError, match="y_bow"):
        ib.ib_terms(params, x, z, y[:, :-1], jax.random.key(0))


# ---------------------------------------------------------------- parameter count (spec §2.4), init

def _count(z_dim, x_dim, vocab, zy_hidden=32, xz_hidden=64):
    shapes = jax.eval_shape(lambda k: ib.init_estimators(k, z_dim, x_dim, vocab, zy_hidden, xz_hidden),
                            jax.random.key(0))
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))


def test_estimator_count_matches_the_tree_and_the_spec():
    assert _count(Z_DIM, X_DIM, VOCAB, 5, 9) == ib.estimator_count(Z_DIM, X_DIM, VOCAB, 5, 9)
    # spec §2.4, T5 vocabulary (V_y = 32,100): decoder 2,167,816 + MINE critic 139,393
    decoder = 2 * (768 * 32 + 32 + 32 * 32100 + 32100)
    critic = (1408 + 768) * 64 + 64 + 65
    assert (decoder, critic) == (2_167_816, 139_393)
    assert _count(768, 1408, 32100) == ib.estimator_count(768, 1408, 32100) == decoder + critic


def test_init_is_xavier_normal_with_zero_biases():
    params = ib.init_estimators(jax.random.key(0), 512, 8, 512)
    assert all(bool(jnp.all(leaf == 0)) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
               if path[-1].key == "bias")
    w = np.asarray(params["zy"]["mu1"]["kernel"])  # [512, 32]
    std = math.sqrt(2.0 / (512 + 32))
    assert abs(w.std() / std - 1) < 0.03
    assert np.abs(w).max() > 3 * std  # an untruncated normal, as PyTorch's xavier_normal_
