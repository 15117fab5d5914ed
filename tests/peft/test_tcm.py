"""KLAFT's topic control mechanism (vlpeft_jax/peft/tcm.py; seed 000 Eq. 3-6, 10; spec klaft.md §9 items 1-9, 17,
22, 23): exact identities against the frozen head, the efficient mixture against the naive one and a float64
reference, the EM gradient identity, TTM by hand (main and token-dropout pass), r_TCM of generated captions by
hand, PEFT training touches only TCM leaves, parameter counts on abstract shapes, decoding, and bad settings.

References are computed here independently (numpy float64 from the model's own hidden states and head), never
taken from the code under test.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.eval import decode, rtcm
from vlpeft_jax.eval.rtcm import caption_r_tcm, caption_topics
from vlpeft_jax.models import layers
from vlpeft_jax.models.registry import build_model
from vlpeft_jax.peft import base as pb
from vlpeft_jax.peft import registry
from vlpeft_jax.peft.base import extra_pass_records
from vlpeft_jax.peft.tcm import TCM, TTM_PASS
from vlpeft_jax.tasks.base import PeftApply
from vlpeft_jax.train import labels as labels_lib
from vlpeft_jax.train.losses import causal_lm_loss, shift_labels
from vlpeft_jax.train.state import TrainState
from vlpeft_jax.train.step import make_train_step

VOCAB, D = 13, 8
IDS = jnp.array([[1, 4, 2, 7, 5, 3], [6, 2, 9, 1, 8, 4]])
LABELS = jnp.array([[-100, 4, 2, 7, 5, 3], [-100, -100, 9, 1, 8, -100]])
TARGETS = shift_labels(LABELS)


@functools.cache
def tiny(family: str = "gpt2", tied: bool = True):
    cfg = {"family": family, "vocab_size": VOCAB, "hidden_size": D, "num_hidden_layers": 1,
           "num_attention_heads": 2, "tie_word_embeddings": tied}
    cfg.update({"max_position_embeddings": 16} if family == "gpt2" else {"intermediate_size": 16})
    model, inputs = build_model(cfg)
    params = layers.unbox(model.init(jax.random.key(0), **inputs))["params"]
    return model, params


def base_out(model, params, ids=IDS):
    return model.apply({"params": params}, ids)


def tcm_params(tcm: TCM, params, seed: int = 1, scale: float = 1.0):
    """TCM parameters with larger random values than the init, so that topics really differ."""
    p = tcm.init(jax.random.key(seed), params)
    keys = iter(jax.random.split(jax.random.key(seed + 100), 8))
    p["topic_logits"]["kernel"] = jax.random.normal(next(keys), p["topic_logits"]["kernel"].shape)
    p["topic_norm"]["bias"] = 0.3 * jax.random.normal(next(keys), p["topic_norm"]["bias"].shape)
    if "topic_vectors" in p:
        p["topic_vectors"] = p["topic_vectors"] + scale * jax.random.normal(next(keys), p["topic_vectors"].shape)
    else:
        p["topic_kernels"] = p["topic_kernels"] + 0.3 * jax.random.normal(next(keys), p["topic_kernels"].shape)
        p["topic_biases"] = jax.random.normal(next(keys), p["topic_biases"].shape)
    return p


def run(model, params, methods, ids=IDS, targets=TARGETS, **kw):
    side = {} if targets is None else {"target_ids": targets}
    return pb.apply_with(model.apply, methods, {"params": params}, ids, side_inputs=side, record=True, **kw)


def logsumexp64(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def reference(tcm: TCM, p, h, head, targets=None):
    """float64 numpy: log Σ_z π_z softmax(head(h̃_z)) [..., V] and the posterior argmax at ``targets``."""
    h = np.asarray(h, np.float64)
    ln = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + tcm.layer_norm_eps)
    ln = ln * np.asarray(p["topic_norm"]["scale"]) + np.asarray(p["topic_norm"]["bias"])
    prior_logits = ln @ np.asarray(p["topic_logits"]["kernel"], np.float64)
    log_prior = prior_logits - logsumexp64(prior_logits, -1)[..., None]
    states = [h]
    for z in range(tcm.num_topics - 1):
        if tcm.function == "addition":
            phi = np.broadcast_to(np.asarray(p["topic_vectors"][z], np.float64), h.shape)
        elif tcm.function == "multiplication":
            phi = h * np.asarray(p["topic_vectors"][z])
        else:
            phi = h @ np.asarray(p["topic_kernels"][z], np.float64) + np.asarray(p["topic_biases"][z])
        states.append((1 - tcm.omega) * h + tcm.omega * phi)
    logits = np.stack([np.asarray(head(s), np.float64) for s in states])  # [K, ..., V]
    logp = logits - logsumexp64(logits, -1)[..., None]
    joint = np.moveaxis(log_prior, -1, 0)[..., None] + logp
    y = logsumexp64(joint, 0)
    post = None
    if targets is not None:
        t = np.where(np.asarray(targets) < 0, 0, np.asarray(targets))
        own = np.take_along_axis(joint, np.broadcast_to(t[None, ..., None], (joint.shape[0], *t.shape, 1)), -1)[..., 0]
        post = np.where(np.asarray(targets) < 0, -1, own.argmax(0))
    return y, post, np.exp(log_prior), np.exp(logp)


def head_of(params, tied):
    if tied:
        return lambda x: np.asarray(x, np.float64) @ np.asarray(params["transformer"]["wte"]["embedding"], np.float64).T
    return lambda x: np.asarray(x, np.float64) @ np.asarray(params["lm_head"]["kernel"], np.float64)


# --------------------------------------------------------------------------------------------------
# §9.1-3: ω = 0, K = 1 and a prior forced to the residual give the frozen head


@pytest.mark.parametrize("settings", [{"omega": 0.0, "num_topics": 4}, {"omega": 0.2, "num_topics": 1}])
def test_omega_zero_and_single_topic_are_the_frozen_head(settings):
    model, params = tiny()
    base = base_out(model, params)
    tcm = TCM(ttm="clean", **settings)
    p = tcm_params(tcm, params)
    out, rec = run(model, params, [(tcm, p)])
    np.testing.assert_array_equal(out.logits, base.logits)  # exactly the head's output
    assert float(rec["loss/ttm"][0]) == 0.0

    def objective(q):
        o, r = run(model, params, [(tcm, q)])
        return causal_lm_loss(o.logits, LABELS)[0] + r.total("loss/ttm")

    grads = jax.grad(objective)(p)
    assert all(float(jnp.abs(g).max(initial=0.0)) == 0.0 for g in jax.tree.leaves(grads))
    if settings["num_topics"] == 1:
        np.testing.assert_array_equal(tcm.log_prior(p, base.hidden_states[-1]), 0.0)  # π ≡ 1
        np.testing.assert_array_equal(rec["topic/posterior"][0], np.where(TARGETS == -100, -1, 0))
    # the general mixture (not the shortcut) at ω = 0 is the head's log-softmax too, both paths
    h = base.hidden_states[-1]
    lsm = jax.nn.log_softmax(base.logits, -1)
    head = functools.partial(model.apply, {"params": params}, method=lambda m, x: m.transformer.attend(x))
    for naive in (False, True):
        y, _ = TCM(naive=naive, **settings).mixture(p, head, h)
        np.testing.assert_allclose(y, lsm, atol=1e-6)


def test_prior_forced_to_residual_is_the_frozen_head():
    model, params = tiny()
    base = base_out(model, params)
    tcm = TCM(num_topics=5, omega=0.5)
    p = tcm_params(tcm, params)
    p["topic_norm"] = {"scale": jnp.zeros(D), "bias": jnp.zeros(D).at[0].set(1.0)}  # LN(h) = e_0
    p["topic_logits"]["kernel"] = jnp.zeros((D, 5)).at[0, 0].set(1e4)  # prior logits (1e4, 0, ...): π_0 = 1
    out, rec = run(model, params, [(tcm, p)])
    np.testing.assert_allclose(out.logits, jax.nn.log_softmax(base.logits, -1), atol=1e-6)
    np.testing.assert_array_equal(rec["topic/prior"][0], 0)


# --------------------------------------------------------------------------------------------------
# §9.4-5: efficient = naive = float64 reference; tied/untied, GPT-2/LLaMA, head bias; extreme logits


@pytest.mark.parametrize("family,tied", [("gpt2", True), ("gpt2", False), ("llama", False), ("llama", True)])
def test_efficient_mixture_equals_naive_and_reference(family, tied):
    model, params = tiny(family, tied)
    base = base_out(model, params)
    eff, naive = TCM(num_topics=4, omega=0.3, ttm="clean"), TCM(num_topics=4, omega=0.3, ttm="clean", naive=True)
    p = tcm_params(eff, params)

    def objective(q, m):
        o, r = run(model, params, [(m, q)])
        return causal_lm_loss(o.logits, LABELS)[0] + r.total("loss/ttm"), (o.logits, r)

    (loss_e, (y_e, rec_e)), g_e = jax.value_and_grad(objective, has_aux=True)(p, eff)
    (loss_n, (y_n, rec_n)), g_n = jax.value_and_grad(objective, has_aux=True)(p, naive)
    np.testing.assert_allclose(y_e, y_n, atol=1e-5)
    np.testing.assert_allclose(loss_e, loss_n, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_e), jax.tree.leaves(g_n), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4)  # the custom VJP = autodiff of the naive path
    assert float(jnp.abs(g_e["topic_vectors"]).max()) > 1e-4
    np.testing.assert_array_equal(rec_e["topic/posterior"][0], rec_n["topic/posterior"][0])
    # independent float64 reference from the model's own hidden states and head
    h = base.hidden_states[-1]
    if family == "gpt2":
        head = head_of(params, tied)
    else:
        head = ((lambda x: np.asarray(x, np.float64) @ np.asarray(params["model"]["embed_tokens"]["embedding"]).T)
                if tied else (lambda x: np.asarray(x, np.float64) @ np.asarray(params["lm_head"]["kernel"])))
    y_ref, post_ref, _, _ = reference(eff, p, h, head, TARGETS)
    np.testing.assert_allclose(y_e, y_ref, atol=2e-5)
    np.testing.assert_array_equal(rec_e["topic/posterior"][0], post_ref)
    np.testing.assert_allclose(jnp.exp(y_e).sum(-1), 1.0, atol=1e-5)  # log-probabilities


def test_head_with_bias_and_extreme_logits():
    rng = np.random.default_rng(0)
    w, b = jnp.asarray(rng.normal(size=(D, 7)), jnp.float32), jnp.asarray(rng.normal(size=7), jnp.float32)
    h = jnp.asarray(rng.normal(size=(2, 3, D)), jnp.float32)
    targets = jnp.array([[0, 3, 6], [2, -100, 5]])
    for function in ("addition", "multiplication", "affine"):
        tcm = TCM(num_topics=4, omega=0.4, function=function)
        p = tcm_params(tcm, {"lm_head": {"kernel": w}})
        for scale in (1.0, 1e4 / 30):  # the second gives head logits of order ±1e4
            head = lambda x, s=scale: (x @ w + b) * s  # noqa: E731
            ref, post, _, _ = reference(tcm, p, h, lambda x, s=scale: (np.asarray(x, np.float64) @ np.asarray(
                w, np.float64) + np.asarray(b, np.float64)) * s, targets)
            for naive in (False, True):
                y, topic_logp = dataclass_replace(tcm, naive=naive).mixture(p, head, h)
                assert bool(jnp.isfinite(y).all())
                tol = 1e-5 if scale == 1.0 else 2e-3 * scale / 1e4 * 30  # float32 rounding of logits ~1e4
                np.testing.assert_allclose(y, ref, atol=tol, rtol=1e-6)
                np.testing.assert_array_equal(np.where(targets < 0, -1, jnp.argmax(topic_logp(targets), -1)), post)
                if scale == 1.0:  # the plain (linear-space) mixture on a small vocabulary
                    _, _, prior, comp = reference(tcm, p, h, lambda x: np.asarray(x, np.float64) @ np.asarray(
                        w, np.float64) + np.asarray(b, np.float64))
                    plain = np.log(np.einsum("...k,k...v->...v", prior, comp))
                    np.testing.assert_allclose(y, plain, atol=1e-5)


def test_custom_vjp_gradients_equal_autodiff_of_the_naive_path():
    """Gradients w.r.t. the hidden state, an affine head's weight and bias, and TCM's parameters (the hidden-state
    and head gradients matter when the backbone trains, as in KLAFT's full fine-tuning rows)."""
    rng = np.random.default_rng(2)
    w, b = jnp.asarray(rng.normal(size=(D, 7)), jnp.float32), jnp.asarray(rng.normal(size=7), jnp.float32)
    h = jnp.asarray(rng.normal(size=(2, 3, D)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(2, 3, 7)), jnp.float32)
    tcm = TCM(num_topics=5, omega=0.35)
    p = tcm_params(tcm, {"lm_head": {"kernel": w}})

    def f(h_, w_, b_, p_, naive):
        return jnp.sum(cot * dataclass_replace(tcm, naive=naive).mixture(p_, lambda x: x @ w_ + b_, h_)[0])

    eff = jax.grad(f, argnums=(0, 1, 2, 3))(h, w, b, p, False)
    ref = jax.grad(f, argnums=(0, 1, 2, 3))(h, w, b, p, True)
    for a, c in zip(jax.tree.leaves(eff), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, c, atol=2e-5, rtol=1e-4)


def dataclass_replace(tcm, **kw):
    import dataclasses

    return dataclasses.replace(tcm, **kw)


# --------------------------------------------------------------------------------------------------
# §9.6-8: EM gradient identity, ω = 1, variant identities


def test_em_gradient_identity():
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(D, 9)), jnp.float32)
    h = jnp.asarray(rng.normal(size=(2, 3, D)), jnp.float32)
    x = jnp.array([[1, 5, 8], [0, 2, 4]])
    tcm = TCM(num_topics=5, omega=0.6)
    p = tcm_params(tcm, {"lm_head": {"kernel": w}})
    head = lambda v: v @ w  # noqa: E731
    prior_logits = jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32)

    for naive in (False, True):
        m = dataclass_replace(tcm, naive=naive)

        def nll(a, m=m):  # summed NLL of the mixture with prior logits a
            y, _ = m.mixture(p, head, h, jax.nn.log_softmax(a, -1))
            return -jnp.take_along_axis(y, x[..., None], -1).sum()

        def ce(a, m=m):  # the task's unchanged cross-entropy on the returned "logits"
            y, _ = m.mixture(p, head, h, jax.nn.log_softmax(a, -1))
            return optax.softmax_cross_entropy_with_integer_labels(y, x).sum()

        # by hand: π_z - r_z, r_z ∝ π_z p_z(x)
        _, _, _, comp = reference(m, p, h, lambda v: np.asarray(v, np.float64) @ np.asarray(w, np.float64))
        pi = np.asarray(jax.nn.softmax(prior_logits, -1), np.float64)
        px = np.take_along_axis(comp, np.broadcast_to(np.asarray(x)[None, ..., None], (5, 2, 3, 1)), -1)[..., 0]
        r = pi * np.moveaxis(px, 0, -1)
        r /= r.sum(-1, keepdims=True)
        np.testing.assert_allclose(jax.grad(nll)(prior_logits), pi - r, atol=1e-5)
        np.testing.assert_allclose(jax.grad(ce)(prior_logits), pi - r, atol=1e-5)


def test_omega_one_addition_is_the_head_of_g():
    model, params = tiny()
    tcm = TCM(num_topics=4, omega=1.0)
    p = tcm_params(tcm, params)
    head = functools.partial(model.apply, {"params": params}, method=lambda m, x: m.transformer.attend(x))
    h1 = base_out(model, params).hidden_states[-1]
    h2 = base_out(model, params, IDS[:, ::-1]).hidden_states[-1]
    for z in (1, 2, 3):
        p["topic_norm"] = {"scale": jnp.zeros(D), "bias": jnp.zeros(D).at[0].set(1.0)}
        p["topic_logits"]["kernel"] = jnp.zeros((D, 4)).at[0, z].set(1e4)  # π_z = 1
        expected = jax.nn.log_softmax(head(p["topic_vectors"][z - 1]), -1)
        for h in (h1, h2):  # independent of h
            y, _ = tcm.mixture(p, head, h)
            np.testing.assert_allclose(y, jnp.broadcast_to(expected, y.shape), atol=1e-5)


@pytest.mark.parametrize("function", ["multiplication", "affine"])
def test_variant_identities(function):
    model, params = tiny()
    tcm = TCM(num_topics=4, omega=0.7, function=function)
    p = tcm_params(tcm, params)
    if function == "multiplication":
        p["topic_vectors"] = jnp.ones_like(p["topic_vectors"])  # g_z = 1
    else:
        p["topic_kernels"] = jnp.broadcast_to(jnp.eye(D), p["topic_kernels"].shape)  # W_z = I, b_z = 0
        p["topic_biases"] = jnp.zeros_like(p["topic_biases"])
    base = base_out(model, params)
    h = base.hidden_states[-1]
    np.testing.assert_allclose(tcm.shifted(p, h), jnp.broadcast_to(h, (3, *h.shape)), atol=1e-6)  # h̃_z = h
    out, rec = run(model, params, [(tcm, p)])
    np.testing.assert_allclose(out.logits, jax.nn.log_softmax(base.logits, -1), atol=1e-5)
    np.testing.assert_allclose(tcm.ttm_distance(p, h, jnp.full(h.shape[:2], 2)), 0.0, atol=1e-10)


@pytest.mark.parametrize("naive", [False, True])
def test_hard_decoding_emits_from_the_prior_argmax_topic(naive):
    model, params = tiny()
    tcm = TCM(num_topics=4, omega=0.5, decoding="hard", naive=naive)
    p = tcm_params(tcm, params)
    base = base_out(model, params)
    _, _, prior, comp = reference(tcm, p, base.hidden_states[-1], head_of(params, True))
    z = prior.argmax(-1)
    assert len(np.unique(z)) > 1  # several topics are chosen at these positions
    expected = np.log(np.take_along_axis(np.moveaxis(comp, 0, -2), z[..., None, None], -2)[..., 0, :])
    out = pb.apply_with(model.apply, [(tcm, p)], {"params": params}, IDS)  # not training: hard
    np.testing.assert_allclose(out.logits, expected, atol=1e-5)
    trained = pb.apply_with(model.apply, [(tcm, p)], {"params": params}, IDS, train=True)  # training: marginal
    np.testing.assert_allclose(trained.logits, reference(tcm, p, base.hidden_states[-1], head_of(params, True))[0],
                               atol=2e-5)


def test_topic_vectors_from_hidden():
    from vlpeft_jax.peft.tcm import topic_vectors_from_hidden

    model, params = tiny()
    tcm = TCM(num_topics=5)
    p = tcm.init(jax.random.key(0), params)
    h = np.asarray(base_out(model, params).hidden_states[-1])
    mask = np.asarray(LABELS) != -100
    new = topic_vectors_from_hidden(tcm, p, h, mask, seed=3)
    pool = h[mask]
    for g in np.asarray(new["topic_vectors"]):  # every topic vector is the state of a selected position
        assert np.abs(pool - g).sum(-1).min() == 0.0
    assert new["topic_logits"] is p["topic_logits"] and new["topic_vectors"].shape == p["topic_vectors"].shape
    with pytest.raises(ConfigError, match="addition"):
        topic_vectors_from_hidden(TCM(function="affine"), p, h)


# --------------------------------------------------------------------------------------------------
# §9.9: TTM, in the main pass and in the token-dropout pass


@pytest.mark.parametrize("function", ["addition", "multiplication", "affine"])
def test_ttm_identity_and_no_gradient_through_the_topic_choice(function):
    model, params = tiny()
    tcm = TCM(num_topics=4, omega=0.3, function=function, ttm="clean")
    p = tcm_params(tcm, params)
    h = np.asarray(base_out(model, params).hidden_states[-1], np.float64)
    z = np.array([[0, 1, 2, 3, 0, 1], [3, 2, 1, 0, 0, 2]])
    dist = np.asarray(tcm.ttm_distance(p, jnp.asarray(h, jnp.float32), jnp.asarray(z)))
    for i, j in np.ndindex(z.shape):
        if z[i, j] == 0:
            assert dist[i, j] == 0.0
            continue
        k = z[i, j] - 1
        if function == "addition":
            phi = np.asarray(p["topic_vectors"][k], np.float64)
        elif function == "multiplication":
            phi = h[i, j] * np.asarray(p["topic_vectors"][k])
        else:
            phi = h[i, j] @ np.asarray(p["topic_kernels"][k], np.float64) + np.asarray(p["topic_biases"][k])
        h_tilde = (1 - tcm.omega) * h[i, j] + tcm.omega * phi
        np.testing.assert_allclose(dist[i, j], np.sum((h[i, j] - h_tilde) ** 2), rtol=1e-5)
        np.testing.assert_allclose(dist[i, j], tcm.omega ** 2 * np.sum((h[i, j] - phi) ** 2), rtol=1e-5)

    # the recorded loss: mean over target positions of ω²||h - φ_{z*}||², z* the posterior argmax (no gradient)
    def ttm(q):
        return run(model, params, [(tcm, q)])[1].total("loss/ttm")

    value, grads = jax.value_and_grad(ttm)(p)
    _, rec = run(model, params, [(tcm, p)])
    post = np.asarray(rec["topic/posterior"][0])
    valid = post >= 0
    expected = np.asarray(tcm.ttm_distance(p, jnp.asarray(h, jnp.float32), jnp.asarray(np.maximum(post, 0))))
    np.testing.assert_allclose(value, expected[valid].mean(), rtol=1e-5)
    for leaf in jax.tree.leaves((grads["topic_logits"], grads["topic_norm"])):
        assert float(jnp.abs(leaf).max()) == 0.0  # z* is a stop-gradient argmax: nothing reaches the prior
    if function == "addition":  # ∂/∂g_k = mean over positions with z* = k of 2ω²(g_k - h)
        g = np.asarray(p["topic_vectors"], np.float64)
        by_hand = np.zeros_like(g)
        for i, j in zip(*np.nonzero(valid & (post > 0)), strict=True):
            by_hand[post[i, j] - 1] += 2 * tcm.omega ** 2 * (g[post[i, j] - 1] - h[i, j])
        np.testing.assert_allclose(grads["topic_vectors"], by_hand / valid.sum(), atol=1e-6)


def test_ttm_dropout_pass_by_hand():
    """With ttm_dropout ~ 1 every target position is dropped: the pass must equal a forward whose token
    embeddings are zeroed at exactly those positions, scored by hand."""
    model, params = tiny()
    tcm = TCM(num_topics=4, omega=0.5, ttm="dropout", ttm_dropout=1 - 1e-7)
    p = tcm_params(tcm, params)
    assert tcm.extra_passes() == (TTM_PASS,) and TCM(ttm="clean").extra_passes() == ()
    # the main pass records topics but no TTM
    _, main = run(model, params, [(tcm, p)])
    assert "loss/ttm" not in main and "topic/posterior" in main
    rec = extra_pass_records(model.apply, [(tcm, p)], {"params": params}, IDS, rng=jax.random.key(3),
                             side_inputs={"target_ids": TARGETS})
    assert sorted(rec) == ["loss/ttm"]
    dropped = np.asarray(TARGETS) != -100
    embeds = params["transformer"]["wte"]["embedding"][IDS] * ~dropped[..., None]
    out = model.apply({"params": params}, None, inputs_embeds=embeds)
    h = np.asarray(out.hidden_states[-1], np.float64)
    _, post, _, _ = reference(tcm, p, h, head_of(params, True), TARGETS)
    g = np.asarray(p["topic_vectors"], np.float64)
    dist = [tcm.omega ** 2 * np.sum((h[i, j] - g[post[i, j] - 1]) ** 2) if post[i, j] > 0 else 0.0
            for i, j in zip(*np.nonzero(dropped), strict=True)]
    np.testing.assert_allclose(rec["loss/ttm"][0], np.mean(dist), rtol=1e-5)
    assert float(rec["loss/ttm"][0]) > 0
    with pytest.raises(Exception, match="target_ids"):
        extra_pass_records(model.apply, [(tcm, p)], {"params": params}, IDS, rng=jax.random.key(3))


def test_prefix_vlm_text_positions_and_dropout_pass():
    """On the prefix VLM (visual tokens first, the head on the text positions only): the mixture and the TTM
    pass by hand, with the dropout zeroing only text tokens that have a target (the image stays clean)."""
    vision = dict(family="vit", image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
                  num_attention_heads=2, intermediate_size=32, add_pooling_layer=False)
    decoder = dict(family="llama", vocab_size=VOCAB, hidden_size=D, intermediate_size=16, num_hidden_layers=1,
                   num_attention_heads=2, tie_word_embeddings=True)
    model, inputs = build_model(dict(family="prefix_vlm", vision=vision, decoder=decoder,
                                     connector=dict(kind="mlp", num_layers=2, feature="patches")))
    params = layers.unbox(model.init(jax.random.key(0), **inputs))["params"]
    pixels = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    tcm = TCM(num_topics=3, omega=0.5, ttm_dropout=1 - 1e-7)
    p = tcm_params(tcm, params)
    t = IDS.shape[1]
    table = np.asarray(params["language_model"]["model"]["embed_tokens"]["embedding"], np.float64)
    head = lambda x: np.asarray(x, np.float64) @ table.T  # noqa: E731

    def text_states(keep):
        vis = model.apply({"params": params}, pixels, method=lambda m, px: m.encode_image(px))
        text = model.apply({"params": params}, IDS, method=lambda m, i: m.language_model.embed_tokens(i))
        embeds = jnp.concatenate([vis, text * keep[..., None]], 1)
        out = model.apply({"params": params}, embeds,
                          method=lambda m, e: m.language_model(None, None, inputs_embeds=e, logits_to_keep=t))
        return np.asarray(out.hidden_states[-1][:, -t:], np.float64)

    out, rec = pb.apply_with(model.apply, [(tcm, p)], {"params": params}, IDS, None, pixels, logits_to_keep=t,
                             side_inputs={"target_ids": TARGETS}, record=True)
    y_ref, post_ref, _, _ = reference(tcm, p, text_states(jnp.ones(IDS.shape)), head, TARGETS)
    np.testing.assert_allclose(out.logits, y_ref, atol=2e-5)
    np.testing.assert_array_equal(rec["topic/posterior"][0], post_ref)
    extra = extra_pass_records(model.apply, [(tcm, p)], {"params": params}, IDS, None, pixels, logits_to_keep=t,
                               rng=jax.random.key(5), side_inputs={"target_ids": TARGETS})
    dropped = np.asarray(TARGETS) != -100
    h = text_states(jnp.asarray(~dropped, jnp.float32))
    _, post, _, _ = reference(tcm, p, h, head, TARGETS)
    g = np.asarray(p["topic_vectors"], np.float64)
    dist = [tcm.omega ** 2 * np.sum((h[i, j] - g[post[i, j] - 1]) ** 2) if post[i, j] > 0 else 0.0
            for i, j in zip(*np.nonzero(dropped), strict=True)]
    np.testing.assert_allclose(extra["loss/ttm"][0], np.mean(dist), rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# §9.17: r_TCM by hand; decoding with TCM


def test_r_tcm_by_hand():
    assert rtcm.r_tcm([[0, 3, 0, 1], [0, 0]]) == 0.25
    assert rtcm.r_tcm([[0, 0, 0]]) == 0.0 and rtcm.r_tcm([[2, 1], [5]]) == 1.0


def test_decoding_and_caption_r_tcm():
    model, params = tiny()
    prompt, mask = jnp.array([[0, 3, 5], [2, 7, 1]]), jnp.array([[0, 1, 1], [1, 1, 1]])
    eos = 4
    plain = decode.generate(PeftApply(model, ()), {"base": params, "peft": {}}, prompt, mask, max_new_tokens=5,
                            eos_token_id=eos, pad_token_id=0)
    # ω = 0: the same tokens as without TCM
    off = TCM(num_topics=3, omega=0.0)
    off_params = {"base": params, "peft": {"tcm": tcm_params(off, params)}}
    gen0 = decode.generate(PeftApply(model, (("tcm", off),)), off_params, prompt, mask, max_new_tokens=5,
                           eos_token_id=eos, pad_token_id=0)
    np.testing.assert_array_equal(gen0.sequences, plain.sequences)

    tcm = TCM(num_topics=3, omega=0.6)
    p = tcm_params(tcm, params, scale=3.0)
    full = {"base": params, "peft": {"tcm": p}}
    gen = decode.generate(PeftApply(model, (("tcm", tcm),)), full, prompt, mask, max_new_tokens=5, eos_token_id=eos,
                          pad_token_id=0)
    seq, lengths = np.asarray(gen.sequences), np.asarray(gen.lengths)
    # greedy with the KV cache picks the argmax of the teacher-forced mixture at every step
    ids = jnp.concatenate([prompt, gen.sequences], 1)
    valid = np.arange(5)[None] < lengths[:, None]
    full_mask = jnp.concatenate([mask, jnp.asarray(valid, mask.dtype)], 1)
    out = pb.apply_with(model.apply, [(tcm, p)], {"params": params}, ids, full_mask)
    picks = np.asarray(out.logits[:, 2:7].argmax(-1))
    np.testing.assert_array_equal(np.where(valid, picks, 0), np.where(valid, seq, 0))

    # topics of the generated tokens by hand: posterior argmax from the hidden states of the same forward
    h = np.asarray(model.apply({"params": params}, ids, full_mask).hidden_states[-1], np.float64)
    _, post, prior, _ = reference(tcm, p, h[:, 2:7], head_of(params, True), jnp.asarray(seq))
    counted = valid & (seq != eos)
    topics = caption_topics(model, full, (("tcm", tcm),), prompt, mask, gen.sequences, gen.lengths, eos)
    np.testing.assert_array_equal(topics["mask"], counted)
    np.testing.assert_array_equal(np.where(counted, topics["posterior"], 0), np.where(counted, post, 0))
    np.testing.assert_array_equal(np.where(counted, topics["prior"], 0), np.where(counted, prior.argmax(-1), 0))
    rows = counted.any(1)
    by_hand = np.mean([np.mean(post[i][counted[i]] != 0) for i in np.nonzero(rows)[0]])
    r = caption_r_tcm(model, full, (("tcm", tcm),), prompt, mask, gen.sequences, gen.lengths, eos)
    assert r["captions"] == rows.sum() and r["r_tcm"] == pytest.approx(by_hand)


# --------------------------------------------------------------------------------------------------
# §9.22-23: PEFT training touches only TCM leaves; parameter counts on abstract shapes


def test_only_tcm_leaves_train_and_frozen_leaves_have_no_optimizer_state():
    model, params = tiny()
    tcm = TCM(num_topics=4, omega=0.2)  # ttm="dropout": the loss runs the extra pass
    full = {"base": params, "peft": {"tcm": tcm.init(jax.random.key(1), params)}}

    def loss_fn(prm, batch, rng):
        active = [(tcm, prm["peft"]["tcm"])]
        side = {"target_ids": shift_labels(batch["labels"])}
        out, rec = pb.apply_with(model.apply, active, {"params": prm["base"]}, batch["input_ids"], rng=rng, train=True,
                                 side_inputs=side, record=True)
        extra = extra_pass_records(model.apply, active, {"params": prm["base"]}, batch["input_ids"], rng=rng,
                                   side_inputs=side)
        loss = causal_lm_loss(out.logits, batch["labels"])[0]
        return loss + 0.1 * extra.total("loss/ttm"), {"ttm": extra.total("loss/ttm")}

    lab = labels_lib.make_labels(full, [("peft/tcm/.*", "tcm")])
    tx = optax.adam(1e-2)
    state = TrainState.create(full, lab, tx, jax.random.PRNGKey(0))
    state, metrics = jax.jit(make_train_step(loss_fn, tx))(state, {"input_ids": IDS, "labels": LABELS})
    assert np.isfinite(float(metrics["loss"]))
    before = dict(jax.tree_util.tree_leaves_with_path(full))
    after = dict(jax.tree_util.tree_leaves_with_path(state.params))
    for path, leaf in before.items():
        changed = not np.array_equal(leaf, after[path])
        assert changed == (jax.tree_util.keystr(path).startswith("['peft']")), jax.tree_util.keystr(path)
    moments = [x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(moments) == 2 * tcm.num_params(full["peft"]["tcm"])  # Adam's mu and nu, TCM leaves only


@pytest.mark.parametrize("family,k,function,expected", [
    ("gpt2", 10, "addition", 16_128),
    ("gpt2", 10, "affine", 5_324_544),
    ("llama", 10, "addition", 86_016),
    ("llama", 10, "affine", 151_080_960),
])
def test_parameter_counts_on_abstract_shapes(family, k, function, expected):
    # GPT-2 small (d 768) and LLaMA-7B (d 4096) are the config defaults; nothing is allocated (jax.eval_shape)
    model, inputs = build_model({"family": family})
    base = layers.unbox(jax.eval_shape(model.init, jax.random.key(0), **inputs))["params"]
    assert pb.count(base) == {"gpt2": 124_439_808, "llama": 6_738_415_616}[family]
    tcm = registry.build_method("tcm", {"num_topics": k, "function": function})
    shapes = jax.eval_shape(tcm.init, jax.random.key(0), base)
    assert tcm.num_params(shapes) == expected


# --------------------------------------------------------------------------------------------------
# bad settings


def test_bad_settings_fail_before_compilation():
    for settings, match in [({"num_topics": 0}, "num_topics"), ({"num_topics": 2.5}, "num_topics"),
                            ({"omega": 1.5}, "omega"), ({"omega": -0.1}, "omega"),
                            ({"function": "gate"}, "function.*addition, multiplication, affine"),
                            ({"ttm": "soft"}, "ttm"), ({"ttm_dropout": 0.0}, "ttm_dropout"),
                            ({"decoding": "sample"}, "decoding.*marginal, hard")]:
        with pytest.raises(ConfigError, match=match):
            registry.build_method("tcm", settings)
    with pytest.raises(ConfigError, match="no LM head"):  # an encoder (BERT-like tree): no lm_head hook point
        TCM().init(jax.random.key(0), {"bert": {"embeddings": {"word_embeddings": {"embedding": jnp.zeros((5, 4))}}}})
    t5_like = {"shared": {"embedding": jnp.zeros((5, 4))}, "encoder": {"block_0": {"w": jnp.zeros(4)}}}
    with pytest.raises(ConfigError, match="ttm='dropout'.*encoder-decoder"):
        TCM().init(jax.random.key(0), t5_like)
    assert TCM(ttm="clean").num_params(TCM(ttm="clean").init(jax.random.key(0), t5_like)) == 4 * 10 + 8 + 9 * 4
    model, params = tiny()
    with pytest.raises(ConfigError, match="cannot be merged"):
        TCM().merge(params, TCM().init(jax.random.key(0), params))
