"""Mixed precision (issue 20): compute dtype from ``config.precision``, float32 master weights, dynamic loss
scaling for float16, and the loss curve of bfloat16 / float16 training against float32."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlpeft_jax.config import apply_overrides, load_config_file, validate
from vlpeft_jax.errors import ConfigError
from vlpeft_jax.models import registry
from vlpeft_jax.models.layers import unbox
from vlpeft_jax.peft.registry import method_class
from vlpeft_jax.train import labels as labels_lib
from vlpeft_jax.train import losses, precision, presets
from vlpeft_jax.train.state import TrainState
from vlpeft_jax.train.step import jit_train_step, make_train_step

GPT2 = {"family": "gpt2", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "max_position_embeddings": 32}


# ----------------------------------------------------------------------------------------- config


def test_with_compute_dtype_sets_every_nested_model():
    vlm = {"family": "prefix_vlm", "vision": {"family": "vit", "hidden_size": 8}, "decoder": dict(GPT2),
           "connector": {"kind": "linear"}}
    out = precision.with_compute_dtype(vlm, "bfloat16")
    assert out["vision"]["dtype"] == out["decoder"]["dtype"] == "bfloat16"
    assert "dtype" not in out["connector"] and "dtype" not in vlm["decoder"]  # a copy; the input is untouched
    q = {"family": "qformer_vlm", "vision": {"family": "vit"}, "qformer": {"hidden_size": 8}, "decoder": dict(GPT2)}
    assert precision.with_compute_dtype(q, "float16")["qformer"]["dtype"] == "float16"
    assert precision.with_compute_dtype(GPT2, "float32") == GPT2
    assert precision.with_compute_dtype(GPT2, None) == GPT2


def test_with_compute_dtype_errors_name_the_problem():
    with pytest.raises(ConfigError, match=r"precision='int8'; valid: float32, bfloat16, float16"):
        precision.with_compute_dtype(GPT2, "int8")
    with pytest.raises(ConfigError, match=r"model.decoder.dtype='float16'"):
        precision.with_compute_dtype({"family": "prefix_vlm", "decoder": {**GPT2, "dtype": "float16"}}, "bfloat16")
    with pytest.raises(ConfigError, match=r"\(family 'mystery'\) has no compute dtype"):
        precision.with_compute_dtype({"family": "mystery"}, "bfloat16")


def test_precision_override_is_accepted_on_any_config_and_validated(tmp_path):
    cfg = load_config_file("configs/shapes_lora.py", "smoke")
    assert "precision" not in cfg  # configs leave it out; it defaults to float32
    assert apply_overrides(cfg, ["--config.precision=bfloat16"]).precision == "bfloat16"
    assert "remat" not in cfg.model and apply_overrides(cfg, ["--config.model.remat=full"]).model.remat == "full"
    with pytest.raises(ConfigError, match=r"precision='fp8'; valid: float32, bfloat16, float16"):
        validate(apply_overrides(cfg, ["--config.precision=fp8"]))


# ----------------------------------------------------------------------------------------- loss scale


def test_dynamic_loss_scale_skips_overflows_halves_and_grows():
    inner = optax.adam(0.1)
    tx = precision.dynamic_loss_scale(inner, initial_scale=16.0, growth_interval=3, factor=2.0, min_scale=2.0)
    params = {"w": jnp.ones(3)}
    st = tx.init(params)
    ref = inner.init(params)
    grads = {"w": jnp.array([0.5, -1.0, 2.0])}
    bad = {"w": jnp.array([0.5, jnp.nan, 2.0])}
    # an overflow: no update, the inner state untouched, the scale halved, the skip counted
    up, st = tx.update(bad, st, params)
    assert np.all(np.asarray(up["w"]) == 0) and float(st.scale) == 8.0 and int(st.skipped) == 1
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), st.inner, ref))
    # finite steps: exactly the inner transformation's updates; the scale doubles after 3 in a row
    for i in range(3):
        up, st = tx.update(grads, st, params)
        want, ref = inner.update(grads, ref, params)
        np.testing.assert_array_equal(np.asarray(up["w"]), np.asarray(want["w"]))
        assert float(st.scale) == (16.0 if i == 2 else 8.0)
    # never below min_scale
    for _ in range(5):
        _, st = tx.update(bad, st, params)
    assert float(st.scale) == 2.0 and int(st.skipped) == 6
    with pytest.raises(ConfigError, match="factor > 1"):
        precision.dynamic_loss_scale(inner, factor=1.0)


# ----------------------------------------------------------------------------------------- training


def _setup(dtype: str, scaled: bool, initial_scale: float = 2.0 ** 15):
    module, _ = registry.build_model({**GPT2, "dtype": dtype})
    base = unbox(registry.build_model(GPT2)[0].init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    lora = method_class("lora")(targets=("c_attn",), rank=4, alpha=8, name="lora")
    params = {"base": base, "peft": {"lora": lora.init(jax.random.key(1), base)}}
    lab = labels_lib.make_labels(params, (*presets.method("lora"), *presets.full_finetuning()))
    tx = optax.adam(1e-2)
    if scaled:
        tx = precision.dynamic_loss_scale(tx, initial_scale=initial_scale, growth_interval=1000)
    state = TrainState.create(params, lab, tx, jax.random.PRNGKey(0))
    step = jit_train_step(make_train_step(losses.lm_loss(module, [("lora", lora)]), tx))
    return state, step


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    # a learnable pattern: every sequence counts up from a random start
    starts = rng.integers(0, 48, size=(20, 8, 1))
    ids = (starts + np.arange(16)[None, None]) % 64
    return [{"input_ids": jnp.asarray(b, jnp.int32), "attention_mask": jnp.ones((8, 16), jnp.int32)} for b in ids]


def _curve(dtype, scaled, batches, initial_scale=2.0 ** 15):
    state, step = _setup(dtype, scaled, initial_scale)
    out = []
    for b in batches:
        state, m = step(state, b)
        out.append(m)
    return state, out


@pytest.fixture(scope="module")
def fp32(batches):
    return _curve("float32", False, batches)


@pytest.mark.parametrize("dtype,scaled,tol", [("bfloat16", False, 0.01), ("float16", True, 0.005)])
def test_loss_curve_matches_float32_within_tolerance(fp32, batches, dtype, scaled, tol):
    """The stated tolerance: every step's loss within ``tol`` (relative) of float32's, over 20 Adam steps in which
    the float32 loss falls by more than 25 %; bfloat16 keeps 8 mantissa bits (relative rounding 2**-9), float16
    keeps 11 (2**-12)."""
    _, ref = fp32
    state, got = _curve(dtype, scaled, batches)
    # the parameters, the moments and the loss scale stay float32 (master weights); every step was finite
    for leaf in jax.tree_util.tree_leaves((state.trainable, state.frozen, state.opt_state)):
        assert not jnp.issubdtype(leaf.dtype, jnp.floating) or leaf.dtype == jnp.float32
    assert all(bool(m["finite"]) for m in got)
    a = np.array([float(m["loss"]) for m in ref])
    b = np.array([float(m["loss"]) for m in got])
    assert a[-1] < 0.75 * a[0]  # the run learns, so the curves compare training, not a constant
    np.testing.assert_allclose(b, a, rtol=tol)
    assert not np.allclose(b, a, rtol=1e-6)  # and the low precision really ran (not float32 again)


def test_float16_overflow_steps_are_skipped_until_the_scale_fits(batches):
    """Scale 2**28: the float16 backward overflows; each such step changes nothing but halves the scale, and the
    run then trains like float32 (the first finite step sees the same parameters float32's first step saw)."""
    state0, _ = _setup("float16", True, 2.0 ** 28)
    initial = jax.tree.map(np.asarray, state0.trainable)
    state, metrics = _curve("float16", True, batches, 2.0 ** 28)
    overflow = [bool(m["overflow"]) for m in metrics]
    n = overflow.index(False)
    # the logits' cotangent alone is scale / 120 tokens, above float16's 65504 for scales over ~2**23
    assert n >= 5
    assert all(bool(m["finite"]) for m in metrics)  # an overflow is not a divergence
    # every overflow halves the scale, a finite step keeps it (growth only after 1000 finite steps)
    scales = [float(m["loss_scale"]) for m in metrics] + [float(state.opt_state.scale)]
    for i, o in enumerate(overflow):
        assert scales[i + 1] == (scales[i] / 2 if o else scales[i])
    assert scales[0] == 2.0 ** 28 and int(state.opt_state.skipped) == sum(overflow)
    # the skipped steps left the parameters alone: a fresh run started at the first fitting scale gives the
    # same loss on that step's batch
    state_ref, step_ref = _setup("float16", True, float(scales[n]))
    _, m_ref = step_ref(state_ref, batches[n])
    np.testing.assert_allclose(float(metrics[n]["loss"]), float(m_ref["loss"]), rtol=1e-6)
    assert jax.tree.all(jax.tree.map(lambda a, b: a.shape == b.shape, initial,
                                     jax.tree.map(np.asarray, state.trainable)))


def test_runner_builds_the_model_in_the_compute_dtype(shapes_caches):
    from pathlib import Path

    from vlpeft_jax.experiments import runner

    cfg = load_config_file(Path(__file__).resolve().parents[2] / "configs/shapes_lora.py", "smoke")
    cfg.pretrain.cache_dir = str(shapes_caches["pretrain"])
    cfg.data.cache_dir = str(shapes_caches["data"])
    cfg = apply_overrides(cfg, ["--config.precision=float16"])
    setup = runner.build(cfg)
    assert setup.module.language_model.config.dtype == setup.module.vision_tower.config.dtype == jnp.float16
    assert {x.dtype for x in jax.tree_util.tree_leaves(setup.base)} == {jnp.dtype("float32")}
    peft = runner.prepare_methods(setup, jax.random.key(1))
    _, wrappers = runner.plan_stages(setup, peft)
    tx = next(iter(wrappers.values()))(optax.sgd(1.0))
    assert isinstance(tx.init({"w": jnp.zeros(1)}), precision.LossScaleState)
