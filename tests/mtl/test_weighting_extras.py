"""UW, DWA, RLW and Aligned-MTL (spec sparse_mtl.md §2.9, §7 item 15), each against a port written here from the
spec's description (torch autograd + torch.optim.Adam for UW, numpy for DWA and Aligned-MTL)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpeft_jax.errors import ConfigError, InputError
from vlpeft_jax.mtl import aligned as aligned_mod
from vlpeft_jax.mtl import dwa as dwa_mod
from vlpeft_jax.mtl import registry
from vlpeft_jax.mtl import rlw as rlw_mod
from vlpeft_jax.mtl import uw as uw_mod

# ---------------------------------------------------------------------------------------------------- UW


def test_uw_gradient_formula():
    s = jnp.array([-0.7, 0.0, 1.3])
    L = jnp.array([2.0, 0.3, 5.0])
    np.testing.assert_allclose(jax.grad(uw_mod.uw_loss, argnums=1)(L, s), 0.5 * (1 - np.exp(-s) * L), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(uw_mod.uw_loss)(L, s), 0.5 * np.exp(-s), rtol=1e-6)  # the head weights


def test_uw_matches_torch_adam_on_log_variances():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    T, steps = 3, 6
    losses = rng.uniform(0.2, 4.0, size=(steps, T)).astype(np.float32)
    s_t = torch.zeros(T, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([s_t], lr=0.025)
    G = jnp.asarray(rng.normal(size=(T, 4)).astype(np.float32))
    fn = jax.jit(lambda g, loss, st: uw_mod.uw(g, losses=loss, state=st))
    state = uw_mod.init_state(T)
    for k in range(steps):
        out = fn(G, jnp.asarray(losses[k]), state)
        np.testing.assert_allclose(out.weights, 0.5 * np.exp(-s_t.detach().numpy()), rtol=1e-6)
        np.testing.assert_allclose(out.direction, np.asarray(out.weights) @ np.asarray(G), rtol=1e-5, atol=1e-6)
        loss = (0.5 * (torch.exp(-s_t) * torch.tensor(losses[k], dtype=torch.float64) + s_t)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        state = out.state
        np.testing.assert_allclose(state.log_vars, s_t.detach().numpy(), atol=1e-6)
    assert not np.allclose(s_t.detach().numpy(), 0.0)


# ---------------------------------------------------------------------------------------------------- DWA


class DWANumpy:
    """nash-mtl / FAMO DynamicWeightAverage as the spec describes it: a FIFO of 2W loss rows initialised to ones."""

    def __init__(self, T, window=25, temp=2.0):
        self.T, self.window, self.temp = T, window, temp
        self.costs = np.ones((2 * window, T))
        self.weights = np.ones(T)
        self.iterations = 0

    def step(self, losses):
        self.costs[:-1] = self.costs[1:]
        self.costs[-1] = losses
        if self.iterations > self.window:
            ws = self.costs[self.window:].mean(0) / self.costs[:self.window].mean(0)
            e = np.exp(ws / self.temp)
            self.weights = self.T * e / e.sum()
        self.iterations += 1
        return self.weights / self.T  # loss = mean(w · L): each task's gradient gets w_t / T


def test_dwa_matches_numpy_port_and_documented_constants():
    rng = np.random.default_rng(0)
    T, steps, W = 3, 60, 25
    ref = DWANumpy(T)
    G = jnp.asarray(rng.normal(size=(T, 4)).astype(np.float32))
    fn = jax.jit(lambda g, loss, st: dwa_mod.dwa(g, losses=loss, state=st))
    state = dwa_mod.init_state(T)
    decay = np.linspace(2.0, 0.5, steps)[:, None] * np.array([1.0, 0.5, 2.0])
    for k in range(steps):
        losses = (decay[k] * rng.uniform(0.9, 1.1, size=T)).astype(np.float32)
        want = ref.step(losses.astype(np.float64))
        out = fn(G, jnp.asarray(losses), state)
        state = out.state
        np.testing.assert_allclose(out.weights, want, rtol=1e-5)
        if k <= W:  # before enough history: w = 1, i.e. 1/T per task under the mean loss
            np.testing.assert_allclose(out.weights, np.full(T, 1 / T))
        else:
            np.testing.assert_allclose(float(jnp.sum(state.dwa_weights)), T, rtol=1e-6)
            assert not np.allclose(np.asarray(state.dwa_weights), 1.0)
        np.testing.assert_allclose(float(jnp.sum(out.weights)), 1.0, rtol=1e-6)
        np.testing.assert_allclose(out.direction, np.asarray(out.weights) @ np.asarray(G), rtol=1e-5, atol=1e-6)


def test_dwa_state_window_mismatch_and_missing_losses():
    G = jnp.eye(2)
    with pytest.raises(ConfigError, match="init_state"):
        dwa_mod.dwa(G, losses=jnp.ones(2), state=dwa_mod.init_state(2), iteration_window=5)
    out = dwa_mod.dwa(G, losses=jnp.ones(2), state=dwa_mod.init_state(2, iteration_window=5), iteration_window=5)
    assert out.state.costs.shape == (10, 2)
    with pytest.raises(InputError, match="losses"):
        dwa_mod.dwa(G)


# ---------------------------------------------------------------------------------------------------- RLW


def test_rlw_weights_are_softmax_of_a_normal_draw():
    G = jnp.asarray(np.random.default_rng(2).normal(size=(4, 3)).astype(np.float32))
    key = jax.random.PRNGKey(3)
    out = jax.jit(lambda g, k: rlw_mod.rlw(g, key=k))(G, key)
    eps = np.asarray(jax.random.normal(key, (4,), jnp.float32), np.float64)
    np.testing.assert_allclose(out.weights, np.exp(eps) / np.exp(eps).sum(), rtol=1e-5)
    np.testing.assert_allclose(float(jnp.sum(out.weights)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out.direction, np.asarray(out.weights) @ np.asarray(G), rtol=1e-5, atol=1e-6)
    other = rlw_mod.rlw(G, key=jax.random.PRNGKey(4))
    assert not np.allclose(np.asarray(other.weights), np.asarray(out.weights))
    many = jax.vmap(lambda k: rlw_mod.rlw(G, key=k).weights)(jax.random.split(key, 4000))
    np.testing.assert_allclose(np.asarray(many.mean(0)), np.full(4, 0.25), atol=0.01)  # symmetric draw
    with pytest.raises(InputError, match="key"):
        rlw_mod.rlw(G)


# ---------------------------------------------------------------------------------------------------- Aligned-MTL


def aligned_numpy(G):
    """LibMTL Aligned_MTL as the spec describes it (float64 eigh, descending, rank cut, B = sqrt(λ_min)VΛ^-½Vᵀ)."""
    M = np.asarray(G, np.float64) @ np.asarray(G, np.float64).T
    lam, V = np.linalg.eigh(M)
    tol = lam.max() * M.shape[0] * np.finfo(np.float32).eps
    rank = int((lam > tol).sum())
    order = np.argsort(-lam)
    lam, V = lam[order][:rank], V[:, order][:, :rank]
    B = np.sqrt(lam[-1]) * (V @ np.diag(1 / np.sqrt(lam)) @ V.T)
    return B.sum(0), B


@pytest.mark.parametrize("rank_deficient", [False, True])
def test_aligned_matches_numpy_port(rank_deficient):
    rng = np.random.default_rng(5)
    G = rng.normal(size=(4, 9)).astype(np.float32) * np.array([[1.0], [3.0], [0.5], [2.0]], np.float32)
    if rank_deficient:
        G[3] = G[0] + G[1]
    alpha, B = aligned_numpy(G)
    out = aligned_mod.aligned(jnp.asarray(G))
    np.testing.assert_allclose(aligned_mod.aligned_alpha(jnp.asarray(G @ G.T)), alpha, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out.direction, alpha @ G, rtol=2e-3, atol=1e-3)
    np.testing.assert_allclose(out.weights, np.ones(4))
    if not rank_deficient:  # aligned rows B G: orthogonal, equal norms sqrt(λ_min); d projects λ_min on each
        A = B @ G.astype(np.float64)
        lam_min = np.linalg.eigvalsh(G.astype(np.float64) @ G.T.astype(np.float64)).min()
        np.testing.assert_allclose(A @ A.T, lam_min * np.eye(4), atol=1e-6 * np.abs(A @ A.T).max())
        np.testing.assert_allclose(A @ np.asarray(out.direction, np.float64), np.full(4, lam_min), rtol=1e-3)


# ---------------------------------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", ["uw", "dwa", "rlw", "aligned"])
def test_registry_matches_direct_call(name):
    G = jnp.asarray(np.random.default_rng(6).normal(size=(3, 5)).astype(np.float32))
    L = jnp.array([1.0, 2.0, 0.5])
    key = jax.random.PRNGKey(0)
    module = {"uw": uw_mod, "dwa": dwa_mod, "rlw": rlw_mod, "aligned": aligned_mod}[name]
    method = module.METHOD
    direct = method.fn(G, losses=L, state=method.init_state(3), key=key, **method.defaults)
    via = registry.combine(name, G, losses=L, key=key, return_all=True)
    np.testing.assert_allclose(via.direction, direct.direction, rtol=1e-6)
    np.testing.assert_allclose(via.weights, direct.weights, rtol=1e-6)
    assert method.clip == {"famo_codebase": None, "nash_codebase": None}
    assert method.kind == ("direct" if name == "aligned" else "weighting")
