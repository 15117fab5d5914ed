"""``attention_default`` through ``jax.nn.dot_product_attention``: parity with an einsum reference written here,
with ``attention_weights_and_output`` and with PyTorch's ``scaled_dot_product_attention``; gradients; masks; bf16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vlpeft_jax.models import layers

B, TQ, TK, H, KVH, D = 2, 5, 7, 4, 2, 8


def reference(q, k, v, bias):
    """softmax(q k^T / sqrt(d) + bias) v in float64 numpy, grouped-query by repeating the key/value heads."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if bias is not None:
        s = s + np.asarray(bias, np.float64)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p = p / p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def torch_sdpa(q, k, v, bias):
    tq, tk, tv = (torch.tensor(np.asarray(a, np.float32)).transpose(1, 2) for a in (q, k, v))
    mask = None if bias is None else torch.tensor(np.asarray(jnp.broadcast_to(bias, (B, H, TQ, TK)), np.float32))
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2).numpy()


@pytest.fixture(scope="module")
def inputs():
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (B, TQ, H, D))
    k = jax.random.normal(kk, (B, TK, KVH, D))
    v = jax.random.normal(kv, (B, TK, KVH, D))
    mask = jnp.array([[1] * TK, [0, 0, 1, 1, 1, 1, 1]])  # no query of the causal bias is left without keys
    return q, k, v, mask


def biases(mask):
    """Causal + padding over a longer key axis (queries are the last TQ of TK), per-head, none, and one whose
    first batch row has every key of its first query blocked (a fully masked row)."""
    causal = layers.causal_padding_bias(mask, TQ, TK)  # [b, 1, tq, tk]
    per_head = jnp.where(jnp.arange(H)[None, :, None, None] % 2 == 0, causal, 0.0)
    blocked = causal.at[0, :, 0, :].set(layers.NEG_INF)
    return {"causal_padding": causal, "per_head": per_head, "none": None, "fully_masked": blocked,
            "padding_only": layers.padding_bias(mask)}


attention = jax.jit(layers.attention_default)


@pytest.mark.parametrize("name", ["causal_padding", "per_head", "none", "fully_masked", "padding_only"])
def test_float32_parity(inputs, name):
    q, k, v, mask = inputs
    bias = biases(mask)[name]
    out = np.asarray(attention(q, k, v, bias))
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, reference(q, k, v, bias), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, layers.attention_weights_and_output(q, k, v, bias)[1], rtol=1e-5, atol=1e-5)
    if name != "fully_masked":  # PyTorch's -inf convention differs; ours is finite (NEG_INF), see below
        np.testing.assert_allclose(out, torch_sdpa(q, k, v, bias), rtol=1e-5, atol=1e-5)


def test_fully_masked_row_is_uniform(inputs):
    q, k, v, mask = inputs
    out = attention(q, k, v, biases(mask)["fully_masked"])
    uniform = jnp.repeat(v[0].mean(0), H // KVH, axis=0)  # every key weighted 1/TK, heads grouped
    np.testing.assert_allclose(out[0, 0], uniform, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["causal_padding", "fully_masked"])
def test_gradients_match(inputs, name):
    """Gradients of q, k, v equal the explicit einsum path's; and PyTorch's where no row is fully masked (its
    CPU kernel treats such a row differently from the plain softmax formula: not our convention)."""
    q, k, v, mask = inputs
    bias = biases(mask)[name]
    w = jax.random.normal(jax.random.key(3), (B, TQ, H, D))

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, bias) * w)

    ours = jax.jit(jax.grad(loss(layers.attention_default), argnums=(0, 1, 2)))(q, k, v)
    einsum = jax.grad(loss(lambda *a: layers.attention_weights_and_output(*a)[1]), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, einsum, strict=True):
        assert not np.isnan(np.asarray(a)).any()
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    if name == "fully_masked":
        return
    tq, tk, tv = (torch.tensor(np.asarray(a)).requires_grad_() for a in (q, k, v))
    bias_t = torch.tensor(np.asarray(jnp.broadcast_to(bias, (B, H, TQ, TK))))
    out_t = torch.nn.functional.scaled_dot_product_attention(tq.transpose(1, 2), tk.transpose(1, 2),
                                                             tv.transpose(1, 2), attn_mask=bias_t, enable_gqa=True)
    (out_t.transpose(1, 2) * torch.tensor(np.asarray(w))).sum().backward()
    for a, t in zip(ours, (tq, tk, tv), strict=True):
        np.testing.assert_allclose(a, t.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_bfloat16_within_tolerance(inputs):
    """bf16 inputs: the result is within bf16 rounding (2^-8 relative, a few ulps) of the exact attention of the
    same bf16-rounded inputs, and no worse than the explicit einsum path."""
    q, k, v, mask = inputs
    bias = biases(mask)["causal_padding"]
    qb, kb, vb = (a.astype(jnp.bfloat16) for a in (q, k, v))
    out = attention(qb, kb, vb, bias)
    assert out.dtype == jnp.bfloat16
    exact = reference(qb.astype(jnp.float32), kb.astype(jnp.float32), vb.astype(jnp.float32), bias)
    scale = np.abs(exact).max()
    err = np.abs(np.asarray(out, np.float32) - exact).max() / scale
    einsum_err = np.abs(np.asarray(layers.attention_weights_and_output(qb, kb, vb, bias)[1], np.float32)
                        - exact).max() / scale
    assert err < 2e-2, err
    assert err <= 2 * einsum_err + 4e-3, (err, einsum_err)


def test_float16_runs_on_cpu_within_tolerance(inputs):
    """float16 inputs (XLA:CPU has no float16 x float16 -> float32 product; both paths take the scores in float32
    there): float16 out, within float16 rounding (2^-11 relative, a few ulps) of the exact attention."""
    q, k, v, mask = inputs
    bias = biases(mask)["causal_padding"]
    qh, kh, vh = (a.astype(jnp.float16) for a in (q, k, v))
    exact = reference(qh.astype(jnp.float32), kh.astype(jnp.float32), vh.astype(jnp.float32), bias)
    for out in (attention(qh, kh, vh, bias), layers.attention_weights_and_output(qh, kh, vh, bias)[1]):
        assert out.dtype == jnp.float16
        assert np.abs(np.asarray(out, np.float32) - exact).max() / np.abs(exact).max() < 4e-3


def test_bfloat16_scores_and_softmax_in_float32():
    """Scores 256, 256.25, 256.5 are one value in bf16 (spacing 2 at 256): a bf16 softmax would be uniform.
    The kernel accumulates the scores in float32, so the probabilities are softmax([0, .25, .5])."""
    q = jnp.zeros((1, 1, 1, 4), jnp.bfloat16).at[0, 0, 0, :2].set(jnp.array([32.0, 1.0], jnp.bfloat16))
    k = jnp.zeros((1, 3, 1, 4), jnp.bfloat16).at[0, :, 0, 0].set(16.0).at[0, :, 0, 1].set(
        jnp.array([0.0, 0.5, 1.0], jnp.bfloat16))
    v = jnp.eye(3, 4, dtype=jnp.bfloat16)[None, :, None, :]  # out[j] = probability of key j
    probs = np.asarray(attention(q, k, v, None), np.float32)[0, 0, 0, :3]
    expected = np.exp([0.0, 0.25, 0.5]) / np.exp([0.0, 0.25, 0.5]).sum()
    np.testing.assert_allclose(probs, expected, rtol=8e-3)  # the probabilities are rounded to bf16 for p @ v
    np.testing.assert_allclose(layers.attention_weights_and_output(q, k, v, None)[0][0, 0, 0], expected, rtol=1e-5)


def test_implementation_choice():
    bf = jnp.zeros((1, 4, 2, 64), jnp.bfloat16)
    assert layers.attention_implementation(bf, bf, backend="cpu") == "xla"
    assert layers.attention_implementation(bf, bf, backend="tpu") == "xla"
    assert layers.attention_implementation(bf, bf, backend="gpu") == "cudnn"
    assert layers.attention_implementation(bf.astype(jnp.float16), bf.astype(jnp.float16), backend="gpu") == "cudnn"
    assert layers.attention_implementation(bf.astype(jnp.float32), bf.astype(jnp.float32), backend="gpu") == "xla"
    assert layers.attention_implementation(bf[:, :1], bf, backend="gpu") == "xla"  # a decoding step: tq = 1
    odd_head = jnp.zeros((1, 4, 2, 12), jnp.bfloat16)
    assert layers.attention_implementation(odd_head, odd_head, backend="gpu") == "xla"
    assert layers.attention_implementation(bf, bf) == ("cudnn" if jax.default_backend() == "gpu" else "xla")
