"""The hook-point mechanism itself (model-level hook tests live beside each model family)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpeft_jax.models import hooks, layers


class TwoLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = layers.Linear(4, name="fc_in")(x)
        return layers.Linear(3, name="fc_out")(jax.nn.relu(x))


@pytest.fixture(scope="module")
def model_and_params():
    m = TwoLayer()
    x = jax.random.normal(jax.random.key(0), (2, 5))
    params = layers.unbox(m.init(jax.random.key(1), x))
    return m, params, x


def test_no_hooks_is_plain_dense(model_and_params):
    m, params, x = model_and_params
    p = params["params"]
    h = jax.nn.relu(x @ p["fc_in"]["kernel"] + p["fc_in"]["bias"])
    want = h @ p["fc_out"]["kernel"] + p["fc_out"]["bias"]
    np.testing.assert_allclose(m.apply(params, x), want, rtol=1e-6, atol=1e-6)


def test_hook_sees_paths_and_can_restrict(model_and_params):
    m, params, x = model_and_params
    seen = []

    def record(ctx, nxt, x, w, b):
        seen.append(ctx.path)
        return nxt(x, w, b)

    zero_out = hooks.Hook("linear", lambda ctx, nxt, x, w, b: jnp.zeros_like(nxt(x, w, b)),
                          where=hooks.path_matcher("fc_out"))
    with hooks.use_hooks(hooks.Hook("linear", record)):
        m.apply(params, x)
    assert seen == [("fc_in",), ("fc_out",)]
    with hooks.use_hooks(zero_out):
        y = m.apply(params, x)
    np.testing.assert_array_equal(y, np.zeros((2, 3)))
    # outside the block the model is unchanged
    assert np.abs(np.asarray(m.apply(params, x))).sum() > 0


def test_composition_order_and_nesting():
    order = []

    def tag(name):
        def fn(ctx, nxt, x, w, b):
            order.append(name + "<")
            y = nxt(x, w, b)
            order.append(name + ">")
            return y + 1.0

        return hooks.Hook("linear", fn)

    with hooks.use_hooks(tag("a")):
        with hooks.use_hooks(tag("b")):
            y = hooks.call("linear", ("p",), layers.linear_default, jnp.ones((1, 2)), jnp.ones((2, 2)), None)
    # b was registered later, so it wraps a: b runs first and last
    assert order == ["b<", "a<", "a>", "b>"]
    np.testing.assert_allclose(y, [[4.0, 4.0]])
    assert hooks.active_hooks() == ()


def test_hooks_work_under_jit_with_traced_closure(model_and_params):
    m, params, x = model_and_params

    @jax.jit
    def f(scale):
        h = hooks.Hook("linear", lambda ctx, nxt, x, w, b: scale * nxt(x, w, b), where=hooks.path_matcher("fc_out"))
        with hooks.use_hooks(h):
            return m.apply(params, x)

    np.testing.assert_allclose(f(2.0), 2 * m.apply(params, x), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda s: f(s).sum())(1.0), m.apply(params, x).sum(), rtol=1e-5)


def test_layer_index_and_bad_kind():
    ctx = hooks.HookContext("linear", ("model", "layers_12", "self_attn", "q_proj"))
    assert ctx.layer == 12 and ctx.name == "model/layers_12/self_attn/q_proj"
    assert hooks.HookContext("linear", ("transformer", "h_3", "attn")).layer == 3
    assert hooks.HookContext("linear", ("lm_head",)).layer is None
    with pytest.raises(ValueError, match="unknown hook kind"):
        hooks.Hook("lora", lambda *a: None)
