"""Logit lens (``vlpeft_jax.analysis.lens``; spec ``specs/knockout.md`` §6, Eq. 7.8, A12) and module knockout
with the top-k Jaccard (``vlpeft_jax.analysis.modules``; spec §7, Eq. (7), A4, A14, A15; test ideas §14.11-13)
on a tiny random LLaMA with tied embeddings and grouped-query attention, float32.

References are computed by hand from the parameters: the unembedding ``E`` (the tied embedding matrix), the
RMSNorm ``x / sqrt(mean(x²) + eps) · scale``, softmax, and top-k sets by sorting.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpeft_jax.analysis import lens, modules
from vlpeft_jax.analysis.knockout import Model, layer_windows
from vlpeft_jax.errors import ConfigError, InputError
from vlpeft_jax.models.llama import LlamaConfig, LlamaForCausalLM

jax.config.update("jax_default_matmul_precision", "highest")

L, B, T, V, D = 4, 2, 10, 64, 32
PAD = 3  # row 1 is left-padded by PAD positions
EPS = 1e-5
CFG = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=EPS, tie_word_embeddings=True)
POSITIONS = np.array([[2, 5, 9], [4, 7, 9]])  # int [B, P] for the lens
QUESTION = np.zeros((B, T), bool)  # the position set ℚ of the module knockout
QUESTION[0, [4, 6]] = True
QUESTION[1, [6, 7]] = True


def random_params(lm: LlamaForCausalLM, seed: int) -> dict:
    """Well-spread random weights: kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 0.5²) (also the tied head),
    norm scales 1 + N(0, 0.2²) (so a missed or misplaced final norm shows)."""
    shapes = nn.meta.unbox(jax.eval_shape(lm.init, jax.random.key(seed), jnp.ones((1, 4), jnp.int32))["params"])
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "scale":
            return jnp.asarray(1.0 + 0.2 * rng.standard_normal(shape), jnp.float32)
        if name == "embedding":
            return jnp.asarray(0.5 * rng.standard_normal(shape), jnp.float32)
        return jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[0]), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def softmax_np(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def rms_norm_np(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS) * np.asarray(scale, np.float64)


class Setup:
    def __init__(self):
        self.lm = LlamaForCausalLM(CFG)
        self.model = Model(self.lm)
        self.params = {"base": random_params(self.lm, 0), "peft": {}}
        base = self.params["base"]["model"]
        self.E = np.asarray(base["embed_tokens"]["embedding"], np.float64)  # [V, D], the tied head too
        self.final_scale = np.asarray(base["norm"]["scale"])
        ids = np.array(jax.random.randint(jax.random.key(3), (B, T), 1, V))
        mask = np.ones((B, T), np.int32)
        mask[1, :PAD] = 0
        ids[1, :PAD] = 0
        self.ids, self.mask = ids, mask
        self.real = mask.astype(bool)
        self.inputs = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
        module_hooks = modules.module_knockout_hooks(self.model)
        model = self.model

        @jax.jit
        def forward(params, inputs, zero_attention, zero_mlp):
            return model(params, inputs, {"zero_attention": zero_attention, "zero_mlp": zero_mlp}, module_hooks)

        self.forward = forward
        self.none = jnp.zeros((L, B, T), bool)
        self.clean = forward(self.params, self.inputs, self.none, self.none)

    def knocked(self, on, positions=QUESTION) -> jax.Array:
        """``bool [L, B, T]``: ``positions`` in the layers of ``on`` (bool [L])."""
        return jnp.asarray(np.asarray(on, bool)[:, None, None] & np.asarray(positions, bool)[None])


@pytest.fixture(scope="module")
def m() -> Setup:
    return Setup()


@pytest.fixture(scope="module")
def lens_raw(m) -> np.ndarray:
    return lens.logit_lens(m.model, m.params, m.inputs, POSITIONS)


def gathered(m: Setup, layer: int) -> np.ndarray:
    """Hidden state ``layer`` (HF convention) at ``POSITIONS``: ``[B, P, D]``."""
    h = np.asarray(m.clean.hidden_states[layer], np.float64)
    return np.take_along_axis(h, POSITIONS[..., None], axis=1)


# ------------------------------------------------------------------------------------------ logit lens


def test_logit_lens_layers_by_hand(m, lens_raw):
    """Spec §6 / §14.11: ``[b, L+1, P, V]``; index 0 is ``softmax(E · embedding)``; index ℓ the raw residual
    stream through ``E`` (no final norm, A12); index L the model's own output distribution."""
    assert lens_raw.shape == (B, L + 1, POSITIONS.shape[1], V)
    tokens = np.take_along_axis(m.ids, POSITIONS, axis=1)
    np.testing.assert_allclose(lens_raw[:, 0], softmax_np(m.E[tokens] @ m.E.T), atol=1e-6)
    for layer in range(1, L):
        np.testing.assert_allclose(lens_raw[:, layer], softmax_np(gathered(m, layer) @ m.E.T), atol=1e-6,
                                   err_msg=f"layer {layer}")
    out = softmax_np(np.take_along_axis(np.asarray(m.clean.logits), POSITIONS[..., None], axis=1))
    np.testing.assert_allclose(lens_raw[:, L], out, atol=1e-6)
    np.testing.assert_allclose(lens_raw.sum(-1), 1.0, atol=1e-5)


def test_logit_lens_with_final_norm_by_hand(m, lens_raw):
    """``final_norm=True``: the final RMSNorm (its own scale) before ``E`` for the intermediate states; the
    last entry is unchanged (already normed)."""
    normed = lens.logit_lens(m.model, m.params, m.inputs, POSITIONS, final_norm=True)
    assert normed.shape == lens_raw.shape
    for layer in range(L):
        want = softmax_np(rms_norm_np(gathered(m, layer), m.final_scale) @ m.E.T)
        np.testing.assert_allclose(normed[:, layer], want, atol=1e-6, err_msg=f"layer {layer}")
        assert np.abs(normed[:, layer] - lens_raw[:, layer]).max() > 1e-3  # the norm matters here
    np.testing.assert_allclose(normed[:, L], lens_raw[:, L], atol=1e-6)


def test_token_ranks_and_probs_by_hand(lens_raw):
    token_ids = np.array([3, 40])
    ranks, probs = lens.token_ranks(lens_raw, token_ids), lens.token_probs(lens_raw, token_ids)
    assert ranks.shape == probs.shape == lens_raw.shape[:3]
    for b in range(B):
        for layer in range(L + 1):
            for p in range(POSITIONS.shape[1]):
                dist = lens_raw[b, layer, p]
                assert probs[b, layer, p] == dist[token_ids[b]]
                order = list(np.argsort(-dist, kind="stable"))
                assert ranks[b, layer, p] == order.index(token_ids[b])
    # the greedy token of the model's output has rank 0
    greedy = lens_raw[:, L, -1].argmax(-1)
    np.testing.assert_array_equal(lens.token_ranks(lens_raw, greedy)[:, L, -1], 0)


def test_lens_bad_inputs(m):
    with pytest.raises(InputError, match="positions have shape"):
        lens.logit_lens(m.model, m.params, m.inputs, np.array([9, 9]))
    with pytest.raises(ConfigError, match="no final norm"):
        lens.final_norm_module(object())


# ----------------------------------------------------------------------------------------- module knockout


@pytest.mark.parametrize("branch", modules.BRANCHES)
def test_module_knockout_leaves_earlier_positions_unchanged(m, branch):
    """Spec §14.12: zeroing a branch at ℚ in a window leaves every (real) position before min(ℚ) bit-identical
    in every layer, and moves ℚ itself from the window's first layer on."""
    on = np.array([False, True, True, False])
    zero_att, zero_mlp = (m.knocked(on), m.none) if branch == "attention" else (m.none, m.knocked(on))
    out = m.forward(m.params, m.inputs, zero_att, zero_mlp)
    for layer, (h, h0) in enumerate(zip(out.hidden_states, m.clean.hidden_states, strict=True)):
        h, h0 = np.asarray(h), np.asarray(h0)
        for b in range(B):
            first = np.nonzero(QUESTION[b])[0].min()
            earlier = m.real[b] & (np.arange(T) < first)  # padding rows attend to every key: not compared
            np.testing.assert_array_equal(h[b, earlier], h0[b, earlier], err_msg=f"layer {layer}")
            if layer >= 2:  # hidden_states[2] is the output of layer 1, the window's first layer
                assert np.abs(h[b, first] - h0[b, first]).max() > 1e-3


def mlp_np(params: dict, layer: int, x: np.ndarray) -> np.ndarray:
    """LLaMA's feed-forward branch by hand: ``down(silu(gate(n)) · up(n))``, ``n`` the post-attention norm."""
    p = params["base"]["model"][f"layers_{layer}"]
    n = rms_norm_np(x, p["post_attention_layernorm"]["scale"])
    kernel = {name: np.asarray(p["mlp"][name]["kernel"], np.float64) for name in ("gate_proj", "up_proj", "down_proj")}
    gate = n @ kernel["gate_proj"]
    return (gate / (1 + np.exp(-gate)) * (n @ kernel["up_proj"])) @ kernel["down_proj"]


def test_each_branch_is_zeroed_alone(m):
    """``zero_attention`` removes exactly ``a_i^ℓ`` (the o_proj output) and ``zero_mlp`` exactly ``f_i^ℓ``
    (Eq. 7.1; spec §7): in the knocked layer the residual update at ℚ is the MLP alone (by hand), resp. the
    clean state is ``h + a + MLP(h + a)`` with ``a`` the update the MLP knockout leaves."""
    layer = 2
    on = np.arange(L) == layer
    h = np.asarray(m.clean.hidden_states[layer], np.float64)[QUESTION]  # [|ℚ|, D], input of layer 2
    no_attention = m.forward(m.params, m.inputs, m.knocked(on), m.none)
    update = np.asarray(no_attention.hidden_states[layer + 1], np.float64)[QUESTION] - h
    np.testing.assert_allclose(update, mlp_np(m.params, layer, h), atol=1e-5)
    no_mlp = m.forward(m.params, m.inputs, m.none, m.knocked(on))
    a = np.asarray(no_mlp.hidden_states[layer + 1], np.float64)[QUESTION] - h
    assert np.abs(a).max() > 1e-2
    clean = np.asarray(m.clean.hidden_states[layer + 1], np.float64)[QUESTION]
    np.testing.assert_allclose(clean, h + a + mlp_np(m.params, layer, h + a), atol=1e-5)


def test_zeroing_both_branches_everywhere_leaves_the_embedding(m):
    """Spec §14.12: with attention and MLP zeroed at position p in every layer, p's residual stream stays its
    token embedding (bit for bit), and its final state is the final norm of it (by hand)."""
    p = np.zeros((B, T), bool)
    p[0, 5] = p[1, 8] = True
    everywhere = m.knocked(np.ones(L, bool), p)
    out = m.forward(m.params, m.inputs, everywhere, everywhere)
    states = np.stack([np.asarray(h)[p] for h in out.hidden_states], axis=1)  # [B, L+1, D]
    embedding = m.E[m.ids[p]]  # [B, D]
    for layer in range(L):
        np.testing.assert_array_equal(states[:, layer], embedding.astype(np.float32), err_msg=f"layer {layer}")
    np.testing.assert_allclose(states[:, L], rms_norm_np(embedding, m.final_scale), atol=1e-5)
    clean = np.asarray(m.clean.hidden_states[L - 1])[p]
    assert np.abs(clean - embedding).max() > 1e-2  # the layers do move the clean state


@pytest.fixture(scope="module", params=modules.BRANCHES)
def module_sweep(request, m):
    branch = request.param
    windows = layer_windows(2, L, "forward")
    res = modules.make_module_sweep(m.model, branch, k=10)(m.params, m.inputs, QUESTION, windows)
    return branch, windows, {k: np.asarray(v) for k, v in res.items()}


def assert_topk(ids: np.ndarray, logits: np.ndarray, real: np.ndarray) -> None:
    """``ids [B, T, k]`` are the top-k of ``logits [B, T, V]`` at the real positions (by value: ties allowed)."""
    k = ids.shape[-1]
    got = np.take_along_axis(logits, ids, axis=-1)
    want = -np.sort(-logits, axis=-1)[..., :k]
    np.testing.assert_array_equal(got[real], want[real])
    assert all(len(set(row)) == k for row in ids.reshape(-1, k))


def test_module_sweep_matches_explicit_knockout_and_jaccard(m, module_sweep):
    """The sweep's top-10 ids equal those of explicit knocked-out forwards (forward window, A4), and its
    Jaccard from ids (``jaccard_of_topk``) equals ``topk_jaccard`` on the logits (Eq. (7), A14)."""
    branch, windows, res = module_sweep
    assert res["clean"].shape == (B, T, 10) and res["knocked"].shape == (L, B, T, 10)
    assert_topk(res["clean"], np.asarray(m.clean.logits), m.real)
    jaccards = []
    for c in range(L):
        z = m.knocked(windows[c])
        out = m.forward(m.params, m.inputs, *((z, m.none) if branch == "attention" else (m.none, z)))
        logits = np.asarray(out.logits)
        assert_topk(res["knocked"][c], logits, m.real)
        j = modules.jaccard_of_topk(res["clean"], res["knocked"][c], QUESTION)
        np.testing.assert_allclose(j, modules.topk_jaccard(np.asarray(m.clean.logits), logits, QUESTION, k=10))
        jaccards.append(j)
    jaccards = np.array(jaccards)
    assert ((jaccards >= 0) & (jaccards <= 1)).all() and jaccards.min() < 1  # the knockout changes something


def test_jaccard_by_hand():
    """Spec §7 Eq. (7) and §14.13: identical 1, disjoint 0, symmetric; the sets are (position, token) pairs
    with exactly k·|ℚ| elements (A14), unlike ``dedupe=True`` (the set of tokens)."""
    rng = np.random.default_rng(0)
    vocab, k = 30, 10
    a = rng.random((2, 5, vocab))
    pos = np.array([[True, False, True, True, False], [False, True, False, False, False]])
    np.testing.assert_array_equal(modules.topk_jaccard(a, a, pos, k=k), 1.0)
    disjoint = -a  # the top-10 of -a are the bottom-10 of a
    np.testing.assert_array_equal(modules.topk_jaccard(a, disjoint, pos, k=k), 0.0)
    b = rng.random((2, 5, vocab))
    np.testing.assert_array_equal(modules.topk_jaccard(a, b, pos, k=k), modules.topk_jaccard(b, a, pos, k=k))
    # every position ranks the tokens alike; in b one position swaps its 10th token for the 11th
    same = np.broadcast_to(np.arange(vocab, 0, -1, dtype=float), (1, 4, vocab)).copy()
    swapped = same.copy()
    swapped[0, 2, [9, 10]] = swapped[0, 2, [10, 9]]
    q = np.ones((1, 4), bool)
    n = k * 4  # |W_a| = |W_b| = k·|ℚ| pairs; they share n - 1
    np.testing.assert_allclose(modules.topk_jaccard(same, swapped, q, k=k), [(n - 1) / (n + 1)])
    np.testing.assert_allclose(modules.topk_jaccard(same, swapped, q, k=k, dedupe=True), [k / (k + 1)])
    # a row with no position gives NaN; top-k ids give the same as the probabilities
    empty = modules.topk_jaccard(a, b, np.zeros((2, 5), bool), k=k)
    assert np.isnan(empty).all()
    top_a, top_b = (np.argsort(-x, axis=-1)[..., :k] for x in (a, b))
    np.testing.assert_allclose(modules.jaccard_of_topk(top_a, top_b, pos), modules.topk_jaccard(a, b, pos, k=k))
    # by hand: row 1 has one position; its two top-3 sets share |A ∩ B| tokens out of |A ∪ B|
    sa, sb = set(top_a[1, 1, :3].tolist()), set(top_b[1, 1, :3].tolist())
    np.testing.assert_allclose(modules.topk_jaccard(a, b, pos, k=3)[1], len(sa & sb) / len(sa | sb))


def test_module_knockout_bad_inputs(m):
    with pytest.raises(ConfigError, match="branch 'heads'"):
        modules.make_module_sweep(m.model, "heads")
    sweep = modules.make_module_sweep(m.model, "mlp", k=10)
    with pytest.raises(InputError, match="windows have shape"):
        sweep(m.params, m.inputs, QUESTION, np.ones((L, L - 1), bool))
    right = {"input_ids": m.inputs["input_ids"], "attention_mask": jnp.asarray(m.mask[:, ::-1].copy())}
    with pytest.raises(InputError, match="end with padding"):
        sweep(m.params, right, QUESTION, layer_windows(1, L, "forward"))
    a = np.zeros((1, 3, 5))
    with pytest.raises(ConfigError, match="k=0"):
        modules.topk_jaccard(a, a, np.ones((1, 3), bool), k=0)
    with pytest.raises(ConfigError, match="k=6"):
        modules.topk_jaccard(a, a, np.ones((1, 3), bool), k=6)
    with pytest.raises(InputError, match="differ"):
        modules.topk_jaccard(a, a[:, :2], np.ones((1, 3), bool))
    with pytest.raises(InputError, match="do not match"):
        modules.jaccard_of_topk(np.zeros((1, 3, 2), int), np.zeros((1, 3, 2), int), np.ones((1, 4), bool))
