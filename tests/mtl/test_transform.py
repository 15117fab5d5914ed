"""The gradient-manipulation optax transformation, sparse training through it, the multi-task train step and the
per-task gradients (spec ``../shared/specs/sparse_mtl.md`` §1.3, §2.8, §7 items 5-7 and 18)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlpeft_jax.errors import ConfigError, InputError
from vlpeft_jax.mtl import combine, gradients, psn, registry
from vlpeft_jax.mtl.step import make_mtl_train_step, mtl_state
from vlpeft_jax.mtl.transform import gradient_manipulation, sparse_chain
from vlpeft_jax.train.state import TrainState

T = 3
TABLE_METHODS = ("ls", "pcgrad", "cagrad", "graddrop", "mgda", "imtlg", "nashmtl", "famo")


def mlp_params(key):
    """A 2-layer shared trunk and one linear head per task (``heads/t<i>``)."""
    k = jax.random.split(key, 3 + T)
    return {"trunk": {"fc1": {"kernel": jax.random.normal(k[0], (6, 8)), "bias": jnp.zeros(8)},
                      "fc2": {"kernel": jax.random.normal(k[1], (8, 5)) * 0.5, "bias": jnp.zeros(5)},
                      "norm": {"scale": jnp.ones(5)}},
            "heads": {f"t{i}": {"kernel": jax.random.normal(k[3 + i], (5, 1)) * 0.5} for i in range(T)}}


def batch(key):
    """Regression targets that conflict by construction: task 1 wants the negative of task 0's map."""
    x = jax.random.normal(key, (16, 6))
    w = jnp.linspace(-1, 1, 6)
    return {"x": x, "y": jnp.stack([x @ w, -(x @ w), jnp.sin(x[:, 0])], axis=1)}


def task_losses(params, b, rng=None):
    h = jnp.tanh(b["x"] @ params["trunk"]["fc1"]["kernel"] + params["trunk"]["fc1"]["bias"])
    trunk = params["trunk"]
    h = jnp.tanh(h @ trunk["fc2"]["kernel"] + trunk["fc2"]["bias"]) * trunk["norm"]["scale"]
    preds = jnp.concatenate([h @ params["heads"][f"t{i}"]["kernel"] for i in range(T)], axis=1)
    return jnp.mean((preds - b["y"]) ** 2, axis=0), {}


def flat_shared(tree):
    return jnp.concatenate([x.reshape(x.shape[0], -1) for x in jax.tree.leaves(tree["trunk"])], axis=1)


@pytest.fixture(scope="module")
def setup():
    params = mlp_params(jax.random.PRNGKey(0))
    b = batch(jax.random.PRNGKey(1))
    losses, _, jac = gradients.per_task_grads(lambda p: task_losses(p, b), params)
    mask = psn.psn_mask(params, 2)
    return params, b, losses, jac, mask


# ----------------------------------------------------------------------------------- per-task gradients


def test_strategies_equal_separate_gradients(setup):
    params, b, _, jac, _ = setup
    for t in range(T):
        g = jax.grad(lambda p, t=t: task_losses(p, b)[0][t])(params)
        np.testing.assert_allclose(jac["trunk"]["fc1"]["kernel"][t], g["trunk"]["fc1"]["kernel"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(jac["heads"][f"t{t}"]["kernel"][t], g["heads"][f"t{t}"]["kernel"], atol=1e-6)
    for strategy in ("jacrev", "loop"):
        _, _, other = gradients.per_task_grads(lambda p: task_losses(p, b), params, strategy=strategy)
        jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6), jac, other)
    # a head only receives its own task's gradient
    assert float(jnp.abs(jac["heads"]["t0"]["kernel"][1:]).max()) == 0.0


def test_non_vector_losses_and_unknown_strategy_are_refused(setup):
    params, b, _, _, _ = setup
    with pytest.raises(InputError, match=r"\[T\] vector"):
        gradients.per_task_grads(lambda p: (task_losses(p, b)[0].sum(), {}), params)
    with pytest.raises(ConfigError, match="strategy"):
        gradients.per_task_grads(lambda p: task_losses(p, b), params, strategy="forward")


# ----------------------------------------------------------------------------------- the transformation


def test_shared_direction_and_head_weights_follow_the_method(setup):
    params, _, losses, jac, _ = setup
    g = flat_shared(jac)
    for name in ("pcgrad", "mgda", "imtlg"):
        tx = gradient_manipulation(name, num_tasks=T, clip=None)
        out, state = tx.update(jac, tx.init(params), params, losses=losses)
        # the transformation's own key for this step: split once from PRNGKey(0)
        _, sub = jax.random.split(jax.random.PRNGKey(0))
        expect = combine(name, g, losses=losses, key=sub, return_all=True)
        np.testing.assert_allclose(flat_shared(jax.tree.map(lambda x: x[None], out))[0], expect.direction,
                                   rtol=1e-5, atol=1e-6)
        for t in range(T):  # head t gets w_t · its own gradient
            np.testing.assert_allclose(out["heads"][f"t{t}"]["kernel"],
                                       expect.weights[t] * jac["heads"][f"t{t}"]["kernel"][t], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(state.stats["weights"], expect.weights, rtol=1e-6)


def test_conflict_counts_match_brute_force(setup):
    params, _, losses, jac, mask = setup
    g = np.asarray(flat_shared(jac))
    m = np.concatenate([np.asarray(x).reshape(-1) for x in jax.tree.leaves(mask["trunk"])]).astype(np.float32)
    tx = gradient_manipulation("ls", num_tasks=T, mask=mask)
    _, state = tx.update(jac, tx.init(params), params, losses=losses)

    def count(x):
        return sum(float(x[i] @ x[j]) < 0 for i, j in itertools.combinations(range(T), 2))

    assert int(state.stats["gc/full"]) == count(g) and int(state.stats["gc/masked"]) == count(g * m)
    assert int(state.stats["gc/pairs"]) == 3


@pytest.mark.parametrize("name", TABLE_METHODS)
def test_pre_mode_output_is_zero_off_the_mask(setup, name):
    params, _, losses, jac, mask = setup
    tx = gradient_manipulation(name, num_tasks=T, mask=mask, mask_mode="pre")
    out, _ = tx.update(jac, tx.init(params), params, losses=losses)
    for path in (("fc1", "kernel"), ("fc2", "kernel"), ("norm", "scale")):
        off = ~np.asarray(mask["trunk"][path[0]][path[1]])
        assert np.all(np.asarray(out["trunk"][path[0]][path[1]])[off] == 0.0), (name, path)


def test_pre_and_post_differ_as_specified(setup):
    """pre: the method sees M⊙G; post: it sees G and its output is masked (spec A1)."""
    params, _, losses, jac, mask = setup
    g = flat_shared(jac)
    m = jnp.concatenate([x.reshape(-1) for x in jax.tree.leaves(mask["trunk"])]).astype(jnp.float32)
    _, sub = jax.random.split(jax.random.PRNGKey(0))
    for mode, expect in (("pre", combine("mgda", g * m, key=sub)), ("post", combine("mgda", g, key=sub) * m)):
        tx = gradient_manipulation("mgda", num_tasks=T, mask=mask, mask_mode=mode, clip=None)
        out, _ = tx.update(jac, tx.init(params), params)
        np.testing.assert_allclose(flat_shared(jax.tree.map(lambda x: x[None], out))[0], expect, rtol=1e-5, atol=1e-6)


def test_monitor_mode_counts_but_trains_densely(setup):
    params, _, losses, jac, mask = setup
    dense = gradient_manipulation("ls", num_tasks=T)
    monitor = gradient_manipulation("ls", num_tasks=T, mask=mask, mask_mode="monitor")
    a, _ = dense.update(jac, dense.init(params), params)
    b, state = monitor.update(jac, monitor.init(params), params)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert "gc/masked" in state.stats


def test_clip_presets(setup):
    params, _, losses, jac, _ = setup
    big = jax.tree.map(lambda x: 100.0 * x, jac)
    for name, preset, clipped in (("pcgrad", "famo_codebase", True), ("ls", "famo_codebase", False),
                                  ("pcgrad", "nash_codebase", False), ("nashmtl", "nash_codebase", True),
                                  ("pcgrad", 0.5, True)):
        tx = gradient_manipulation(name, num_tasks=T, clip=preset)
        _, state = tx.update(big, tx.init(params), params, losses=losses)
        norm = float(state.stats["direction_norm"])
        bound = 0.5 if preset == 0.5 else 1.0
        assert (norm <= bound + 1e-5) if clipped else (norm > bound), (name, preset, norm)


def test_bad_settings_are_refused(setup):
    params, _, _, jac, _ = setup
    with pytest.raises(ConfigError, match="at least 2 tasks"):
        gradient_manipulation("pcgrad", num_tasks=1)
    with pytest.raises(ConfigError, match="unknown gradient-manipulation method"):
        gradient_manipulation("pcgrd", num_tasks=T)
    with pytest.raises(ConfigError, match="unknown option"):
        gradient_manipulation("cagrad", num_tasks=T, options={"alpha": 0.5})
    with pytest.raises(ConfigError, match="mask_mode"):
        gradient_manipulation("ls", num_tasks=T, mask_mode="later")
    with pytest.raises(ConfigError, match="preset"):
        gradient_manipulation("ls", num_tasks=T, clip="torch_codebase")
    tx = gradient_manipulation("famo", num_tasks=T)
    with pytest.raises(ConfigError, match="reads the task losses"):
        tx.update(jac, tx.init(params), params)
    tx = gradient_manipulation("ls", num_tasks=4)
    with pytest.raises(InputError, match="leading task axis"):
        tx.update(jac, tx.init(params), params)
    assert "pcgrad" in registry.names()


# ----------------------------------------------------------------------------------- training


def train(params, b, name, mask, optimizer, steps, mode="pre"):
    manipulation = gradient_manipulation(name, num_tasks=T, mask=mask, mask_mode=mode)
    tx = sparse_chain(manipulation, optimizer, mask)
    labels = jax.tree.map(lambda _: "all", params)
    state = TrainState.create(params, labels, tx, jax.random.PRNGKey(0))
    step = jax.jit(make_mtl_train_step(task_losses, tx, method=name))
    history = []
    for _ in range(steps):
        state, metrics = step(state, b)
        history.append(metrics)
    return state, history


@pytest.mark.parametrize("name", TABLE_METHODS)
def test_sparse_training_keeps_masked_entries_bit_identical(setup, name):
    """Spec §7 items 5 and 18: under AdamW with weight decay, masked-out entries never move, selected ones and the
    heads do, for every method; the logged conflict counts are in range."""
    params, b, _, _, mask = setup
    state, history = train(params, b, name, mask, optax.adamw(1e-2, weight_decay=0.1), steps=12)
    for path in (("trunk", "fc1", "kernel"), ("trunk", "fc2", "kernel"), ("trunk", "norm", "scale")):
        before, after = params, state.params
        for p in path:
            before, after = before[p], after[p]
        m = np.asarray(mask[path[0]][path[1]][path[2]])
        assert np.array_equal(np.asarray(after)[~m], np.asarray(before)[~m]), (name, path)
        if path[-1] == "kernel":
            assert not np.allclose(np.asarray(after)[m], np.asarray(before)[m]), (name, path)
    assert not np.allclose(state.params["heads"]["t2"]["kernel"], params["heads"]["t2"]["kernel"])
    for h in history:
        assert 0 <= int(h["mtl/gc_full"]) <= 3 and 0 <= int(h["mtl/gc_masked"]) <= 3 and bool(h["finite"])
    assert np.isfinite(float(history[-1]["loss"]))


def test_joint_train_with_sparse_training_is_eq_6_8(setup):
    """Eq. 6.8 under SGD: θ ← θ − lr · M ⊙ (1/T) Σ_t g_t for the shared weights; heads get (1/T) g_t."""
    params, b, _, jac, mask = setup
    state, _ = train(params, b, "ls", mask, optax.sgd(0.1), steps=1)
    mean = jax.tree.map(lambda g: g.mean(0), jac)
    expect = jax.tree.map(lambda p, g, m: p - 0.1 * g * m, params["trunk"], mean["trunk"], mask["trunk"])
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6), state.params["trunk"], expect)
    np.testing.assert_allclose(state.params["heads"]["t1"]["kernel"],
                               params["heads"]["t1"]["kernel"] - 0.1 * jac["heads"]["t1"]["kernel"][1] / T,
                               rtol=1e-5, atol=1e-7)


def test_famo_learns_its_task_logits_after_the_step(setup):
    params, b, _, _, _ = setup
    state, history = train(params, b, "famo", None, optax.adam(1e-2), steps=3)
    logits = jax.tree.leaves(mtl_state(state.opt_state).method)
    assert any(float(jnp.abs(x).max()) > 0 for x in logits if jnp.issubdtype(x.dtype, jnp.floating))
    w = np.array([[float(h[f"mtl/weight/{t}"]) for t in range(T)] for h in history])
    assert not np.allclose(w[0], w[-1])  # the weights move with the logits


def test_accumulation_is_refused():
    with pytest.raises(ConfigError, match="accumulation"):
        make_mtl_train_step(task_losses, optax.sgd(0.1), method="ls", accumulation_steps=2)
