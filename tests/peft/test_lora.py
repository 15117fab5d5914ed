"""LoRA in activation space vs its merged weights, and its bad-input errors (parity with peft: issue 5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.models.test_hooks import TwoLayer
from vlpeft_jax.errors import ConfigError
from vlpeft_jax.models import layers
from vlpeft_jax.peft import base as pb
from vlpeft_jax.peft.lora import LoRA


@pytest.fixture(scope="module")
def setup():
    m = TwoLayer()
    x = jax.random.normal(jax.random.key(0), (3, 5))
    params = layers.unbox(m.init(jax.random.key(1), x))["params"]
    return m, params, x


def _randomise_b(p, key):
    return jax.tree_util.tree_map_with_path(
        lambda path, v: jax.random.normal(key, v.shape) if path[-1].key == "lora_b" else v, p)


@pytest.mark.parametrize("rslora", [False, True])
def test_activation_space_equals_merged_and_manual(setup, rslora):
    m, params, x = setup
    lora = LoRA(targets=("fc_in", "fc_out"), rank=2, alpha=3.0, use_rslora=rslora)
    p = _randomise_b(lora.init(jax.random.key(2), params), jax.random.key(3))
    y = pb.apply_with(m.apply, [(lora, p)], {"params": params}, x)
    merged = lora.merge(params, p)
    np.testing.assert_allclose(y, m.apply({"params": merged}, x), rtol=1e-5, atol=1e-5)
    s = 3.0 / (np.sqrt(2) if rslora else 2)
    a, b = p["fc_in"]["lora_a"], p["fc_in"]["lora_b"]
    h = jax.nn.relu(x @ (params["fc_in"]["kernel"] + s * a @ b) + params["fc_in"]["bias"])
    a2, b2 = p["fc_out"]["lora_a"], p["fc_out"]["lora_b"]
    want = h @ (params["fc_out"]["kernel"] + s * a2 @ b2) + params["fc_out"]["bias"]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_zero_init_is_identity_and_grads_flow_only_to_lora(setup):
    m, params, x = setup
    lora = LoRA(targets=("fc_out",), rank=2)
    p = lora.init(jax.random.key(2), params)
    y = pb.apply_with(m.apply, [(lora, p)], {"params": params}, x)
    np.testing.assert_allclose(y, m.apply({"params": params}, x))
    g = jax.grad(lambda q: pb.apply_with(m.apply, [(lora, q)], {"params": params}, x).sum())(p)
    assert float(jnp.abs(g["fc_out"]["lora_b"]).sum()) > 0  # B gets gradient at init
    assert set(p) == {"fc_out"} and lora.num_params(p) == 4 * 2 + 2 * 3  # kernel fc_out is 4x3: A 4x2, B 2x3


def test_dropout_only_in_training(setup):
    m, params, x = setup
    lora = LoRA(targets=("fc_in",), rank=2, dropout=0.5)
    p = _randomise_b(lora.init(jax.random.key(2), params), jax.random.key(3))
    ev = pb.apply_with(m.apply, [(lora, p)], {"params": params}, x)
    tr = pb.apply_with(m.apply, [(lora, p)], {"params": params}, x, rng=jax.random.key(4), train=True)
    np.testing.assert_allclose(ev, m.apply({"params": lora.merge(params, p)}, x), rtol=1e-5, atol=1e-5)
    assert not np.allclose(ev, tr)


def test_bad_inputs(setup):
    _, params, _ = setup
    with pytest.raises(ConfigError, match="rank=0"):
        LoRA(rank=0)
    with pytest.raises(ConfigError, match="larger than fc_out allows"):
        LoRA(targets=("fc_out",), rank=4).init(jax.random.key(0), params)
    with pytest.raises(ConfigError, match="matches no module.*available: fc_in, fc_out"):
        LoRA(targets=("q_proj",)).init(jax.random.key(0), params)


def test_logical_specs_follow_the_kernel_axes():
    """On a 2-layer LLaMA's logical axes: A shards like the kernel's input axis, B like its output axis."""
    from jax.sharding import PartitionSpec

    from vlpeft_jax.models import registry

    module, inputs = registry.build_model(dict(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    boxed = jax.eval_shape(module.init, jax.random.key(0), **inputs)
    base_specs = layers.logical_axes(boxed)["params"]
    base = layers.unbox(boxed)["params"]
    lora = LoRA(targets=("q_proj", "down_proj"), rank=4)
    specs = lora.logical_specs(jax.eval_shape(lambda: lora.init(jax.random.key(0), base)), base_specs)
    q, down = specs["model"]["layers_0"]["self_attn"]["q_proj"], specs["model"]["layers_1"]["mlp"]["down_proj"]
    assert base_specs["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"] == PartitionSpec("embed", "heads")
    assert q == {"lora_a": PartitionSpec("embed", None), "lora_b": PartitionSpec(None, "heads")}
    assert down == {"lora_a": PartitionSpec("mlp", None), "lora_b": PartitionSpec(None, "embed")}
    assert len(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))) == 2 * 2 * 2
