"""The method protocol's optional capabilities (DESIGN §2.1): the output channel and side inputs with a toy
method on a real decoder, through the train step the runner uses; prepare/stage rules/optimizer wrappers
through the runner's stage planning."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlpeft_jax.models import hooks, layers, registry
from vlpeft_jax.peft import base as pb
from vlpeft_jax.tasks.base import add_loss_terms
from vlpeft_jax.train import labels as labels_lib
from vlpeft_jax.train.state import TrainState
from vlpeft_jax.train.step import jit_train_step, make_train_step

WEIGHT = 0.25
hooks.register_side_input("toy", "float32 [b]: the toy method's per-example factor (these tests only)")


@dataclasses.dataclass(frozen=True)
class ToyMethod(pb.Method):
    """Adds ``scale * toy[b]`` to every q_proj output and records ``loss/toy = scale² · mean(toy)`` per layer."""

    name: str = "toy"

    def init(self, rng, base_params):
        paths = pb.match_targets(base_params, "q_proj", method=self.name)
        out = {}
        for p in paths:
            pb.set_path(out, p, {"scale": jnp.full((), 0.5, jnp.float32)})
        return out

    def hooks(self, peft_params, *, rng=None, train=False):
        def fn(ctx, nxt, x, w, b):
            scale = pb.lookup(peft_params, ctx.path)["scale"]
            side = ctx.side_input("toy")
            ctx.record("loss/toy", scale ** 2 * jnp.mean(side))
            return nxt(x, w, b) + scale * side[:, None, None]

        return [hooks.Hook("linear", fn, where=pb.adapted_where(peft_params, "scale"))]

    def merge(self, base_params, peft_params):
        return base_params


@pytest.fixture(scope="module")
def setup():
    module, inputs = registry.build_model(dict(family="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    base = layers.unbox(module.init(jax.random.key(0), **inputs))["params"]
    method = ToyMethod()
    return module, base, method, method.init(None, base)


def _batch(value):
    ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % 31 + 1
    return {"input_ids": ids, "side_inputs": {"toy": jnp.array([value, 2 * value], jnp.float32)}}


def test_recorded_term_reaches_the_loss_and_only_the_methods_gradient(setup):
    module, base, method, peft = setup
    traces = []

    def loss_fn(params, batch, rng):
        traces.append(1)
        out, records = pb.apply_with(module.apply, [(method, params["peft"]["toy"])], {"params": params["base"]},
                                     batch["input_ids"], side_inputs=batch["side_inputs"], record=True)
        task = jnp.mean(out.logits.astype(jnp.float32) ** 2)
        return add_loss_terms(task, {}, records, {"toy": WEIGHT})

    params = jax.tree.map(jnp.array, {"base": base, "peft": {"toy": peft}})  # copies: the train step donates
    batch = _batch(1.5)
    loss, metrics = loss_fn(params, batch, None)
    # one record per decoder layer: the term is their sum, added with its weight
    n_layers = 2
    term = n_layers * 0.5 ** 2 * float(jnp.mean(batch["side_inputs"]["toy"]))
    np.testing.assert_allclose(float(metrics["loss/toy"]), term, rtol=1e-6)
    np.testing.assert_allclose(float(loss), float(metrics["task_loss"]) + WEIGHT * term, rtol=1e-6)

    # the side input is read as a traced value: a different batch value changes the output
    out_a = pb.apply_with(module.apply, [(method, peft)], {"params": base}, batch["input_ids"],
                          side_inputs={"toy": jnp.array([0.0, 0.0])})
    out_b = pb.apply_with(module.apply, [(method, peft)], {"params": base}, batch["input_ids"],
                          side_inputs={"toy": jnp.array([1.0, 1.0])})
    assert not np.allclose(out_a.logits, out_b.logits)

    # the train step: only the method's parameters are trainable; the term's gradient reaches them
    rules = [("peft/toy/.*", "toy")]
    labels = labels_lib.make_labels(params, rules)
    tx = optax.sgd(0.1)
    state = TrainState.create(params, labels, tx, jax.random.key(0))
    step = jit_train_step(make_train_step(loss_fn, tx))
    state, _ = step(state, _batch(0.1))  # (the first output state may differ in weak types: one retrace)
    traces.clear()
    for value in (1.5, -0.5, 3.0):
        before = jax.tree.map(np.asarray, state.trainable)
        state, m = step(state, _batch(value))
        assert "loss/toy" in m and bool(m["finite"])
    assert not traces  # no retrace per batch: side inputs and records are traced values, not constants
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), before["peft"],
                         state.trainable["peft"])
    assert all(jax.tree.leaves(moved))
    np.testing.assert_array_equal(
        np.concatenate([np.ravel(x) for x in jax.tree.leaves(state.params["base"])]),
        np.concatenate([np.ravel(x) for x in jax.tree.leaves(base)]))

    # the gradient of the term alone w.r.t. one scale: d/ds (w · s² · mean(toy)) = 2 w s mean(toy)
    def term_only(p):
        _, records = pb.apply_with(module.apply, [(method, p)], {"params": base}, batch["input_ids"],
                                   side_inputs=batch["side_inputs"], record=True)
        return WEIGHT * records.total("loss/toy")

    g = jax.grad(term_only)(peft)
    for leaf in jax.tree.leaves(g):
        np.testing.assert_allclose(float(leaf), 2 * WEIGHT * 0.5 * float(jnp.mean(batch["side_inputs"]["toy"])),
                                   rtol=1e-6)


def test_side_inputs_are_checked_and_records_need_a_module():
    with pytest.raises(ValueError, match="unknown side input"):
        with hooks.use_hooks([], side_inputs={"nope": 1}):
            pass

    def fn(ctx, nxt, x, w, b):
        ctx.record("loss/x", jnp.sum(x))
        return nxt(x, w, b)

    with hooks.use_hooks(hooks.Hook("linear", fn)):
        with pytest.raises(ValueError, match="passes no module"):
            hooks.call("linear", ("p",), lambda x, w, b: x @ w, jnp.ones((1, 2)), jnp.ones((2, 2)), None)


def test_default_capabilities_do_nothing():
    from vlpeft_jax.peft.lora import LoRA

    lora = LoRA(targets=("q_proj",), rank=2)
    tx = optax.sgd(1.0)
    assert lora.stage_rules({}) == [] and lora.optimizer_wrapper(tx, {}) is tx
    base = {"q_proj": {"kernel": jnp.ones((4, 4))}}
    a = lora.prepare(jax.random.key(0), base, pb.PrepareContext())
    b = lora.init(jax.random.key(0), base)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.all(x == y)), a, b))
