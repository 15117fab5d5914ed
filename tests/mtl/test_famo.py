"""FAMO (spec sparse_mtl.md §2.7, §7 item 14): weights and the logit update against a torch port of the FAMO
codebase's update (written from the spec: softmax logits, D = L − min + 1e-8, c = Σ z/D, loss Σ (z/c) log D,
δ = log D(before) − log D(after), ∂w = J_softmaxᵀ δ, torch.optim.Adam(lr, weight_decay=γ))."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.mtl import registry
from vlpeft_jax.mtl.famo import METHOD, FamoState, famo, famo_after_step, init_state


def _torch_famo_run(losses_before, losses_after, gamma, w_lr):
    torch = pytest.importorskip("torch")
    T = losses_before.shape[1]
    w = torch.zeros(T, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w], lr=w_lr, weight_decay=gamma)
    weights, logits = [], []
    for before, after in zip(losses_before, losses_after, strict=True):
        L = torch.tensor(before, dtype=torch.float64, requires_grad=True)
        z = torch.softmax(w, -1)
        D = L + 1e-8
        c = (z / D).sum().detach()
        loss = (D.log() * z / c).sum()
        (dL,) = torch.autograd.grad(loss, L)  # what each task's gradient is multiplied by
        weights.append(dL.numpy().copy())
        delta = (torch.tensor(before, dtype=torch.float64) + 1e-8).log() - (
            torch.tensor(after, dtype=torch.float64) + 1e-8).log()
        (d,) = torch.autograd.grad(torch.softmax(w, -1), w, grad_outputs=delta)
        opt.zero_grad()
        w.grad = d
        opt.step()
        logits.append(w.detach().numpy().copy())
    return np.array(weights), np.array(logits)


def test_weights_and_logit_updates_match_torch_reference():
    rng = np.random.default_rng(0)
    T, steps, gamma, w_lr = 3, 8, 0.01, 0.025
    before = rng.uniform(0.5, 3.0, size=(steps, T)).astype(np.float32)
    after = (before * rng.uniform(0.6, 1.05, size=(steps, T))).astype(np.float32)  # the same batch after the step
    ref_w, ref_logits = _torch_famo_run(before.astype(np.float64), after.astype(np.float64), gamma, w_lr)
    G = jnp.asarray(rng.normal(size=(T, 4)).astype(np.float32))
    fn = jax.jit(lambda g, loss, s: famo(g, losses=loss, state=s, gamma=gamma, w_lr=w_lr))
    upd = jax.jit(lambda s, b, a: famo_after_step(s, b, a, gamma=gamma, w_lr=w_lr))
    state = init_state(T)
    max_w = max_logit = 0.0
    for k in range(steps):
        out = fn(G, jnp.asarray(before[k]), state)
        max_w = max(max_w, float(np.max(np.abs(np.asarray(out.weights) - ref_w[k]))))
        np.testing.assert_allclose(out.direction, np.asarray(out.weights) @ np.asarray(G), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(jnp.sum(out.weights)), 1.0, atol=1e-6)
        state = upd(out.state, jnp.asarray(before[k]), jnp.asarray(after[k]))
        max_logit = max(max_logit, float(np.max(np.abs(np.asarray(state.logits) - ref_logits[k]))))
    print(f"\nfamo vs torch: max |Δweights| {max_w:.1e}, max |Δlogits| {max_logit:.1e}")
    assert max_w < 1e-6 and max_logit < 1e-6
    assert not np.allclose(ref_logits[-1], 0.0)  # the logits moved


def test_weight_formula_by_hand():
    # z = softmax(w); weights = z / (c D) with c = Σ z / D
    state = FamoState(jnp.array([0.3, -0.2]), init_state(2).adam)
    losses = np.array([2.0, 0.5])
    z = np.exp([0.3, -0.2]) / np.exp([0.3, -0.2]).sum()
    c = (z / losses).sum()
    out = famo(jnp.eye(2), losses=jnp.asarray(losses), state=state)
    np.testing.assert_allclose(out.weights, z / (c * losses), rtol=1e-6)


def test_after_step_uses_the_post_step_losses():
    st = init_state(2)
    b = jnp.array([1.0, 1.0])
    same = famo_after_step(st, b, b)  # no progress: δ = 0, no change at w = 0
    np.testing.assert_allclose(same.logits, [0.0, 0.0])
    moved = famo_after_step(st, b, jnp.array([0.5, 1.0]))  # task 0 improved: its logit goes down
    assert float(moved.logits[0]) < 0 < float(moved.logits[1])


def test_registry_and_errors():
    G = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3)).astype(np.float32))
    L = jnp.array([1.0, 2.0])
    direct = famo(G, losses=L, state=init_state(2))
    via = registry.combine("famo", G, losses=L, return_all=True)
    np.testing.assert_allclose(via.direction, direct.direction, rtol=1e-6)
    with pytest.raises(ConfigError, match="losses"):
        registry.combine("famo", G)
    assert METHOD.uses_losses and METHOD.after_step is famo_after_step
    assert METHOD.defaults == {"gamma": 1e-3, "w_lr": 0.025, "min_losses": 0.0}
    assert METHOD.clip == {"famo_codebase": None, "nash_codebase": None}
