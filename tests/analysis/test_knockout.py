"""Attention knockout (``vlpeft_jax.analysis.knockout``; spec ``specs/knockout.md`` §2-5 and its test ideas §14)
on a tiny random LLaMA with grouped-query attention (4 query heads, 2 key/value heads), float32.

The reference for the sweep is transformers' PyTorch ``LlamaForCausalLM`` with the same weights, run layer by
layer with a per-layer additive attention mask (eager attention): the knockout's ``blocked[q, k] = q ∈ T ∧
k ∈ S`` (spec A1) written as ``finfo.min`` entries in the blocked layers only. Run with ``-s`` to see the
measured max abs differences.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tests.max_diffs import MaxDiffs
from vlpeft_jax.analysis import knockout as ko
from vlpeft_jax.analysis import modules
from vlpeft_jax.errors import ConfigError, InputError
from vlpeft_jax.hf import decoders
from vlpeft_jax.models import hooks
from vlpeft_jax.models.llama import LlamaConfig, LlamaForCausalLM

jax.config.update("jax_default_matmul_precision", "highest")

L, B, T, V = 4, 2, 10, 64
PAD = 3  # row 1 is left-padded by PAD positions
PARITY_TOL = 1e-5
CFG = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4,
           rms_norm_eps=1e-5)

MAX_DIFFS = MaxDiffs("attention knockout: max abs diff (fp32)")
report_max_diffs = MAX_DIFFS.fixture()
record = MAX_DIFFS.record

TRACES: Counter = Counter()


@dataclasses.dataclass(frozen=True)
class CountingModel(ko.Model):
    """A :class:`~vlpeft_jax.analysis.knockout.Model` that counts its calls, i.e. traces under ``jax.jit``."""

    def __call__(self, *args, **kwargs):
        TRACES[id(self)] += 1
        return super().__call__(*args, **kwargs)


def random_params(lm: LlamaForCausalLM, seed: int) -> dict:
    """Well-spread random weights (the default init gives near-uniform outputs): kernels ~ N(0, 1/fan_in),
    embeddings ~ N(0, 1), norm scales 1 + N(0, 0.2²), so that knockouts change probabilities visibly."""
    ids = jnp.ones((1, 4), jnp.int32)
    base = nn.meta.unbox(jax.eval_shape(lm.init, jax.random.key(seed), ids)["params"])  # shapes only
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        shape = leaf.shape
        if name == "scale":
            return jnp.asarray(1.0 + 0.2 * rng.standard_normal(shape), jnp.float32)
        if name == "embedding":
            return jnp.asarray(rng.standard_normal(shape), jnp.float32)
        return jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[0]), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, base)


def sets(*rows: list[int]) -> np.ndarray:
    """``bool [B, T]`` position sets from per-row index lists."""
    out = np.zeros((B, T), bool)
    for i, idx in enumerate(rows):
        out[i, list(idx)] = True
    return out


def softmax_np(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class Setup:
    """The model, params, a left-padded batch, the module's sweep and a jitted forward with the hook."""

    def __init__(self, kv_heads: int = 2, base: dict | None = None):
        self.cfg = LlamaConfig(**CFG, num_key_value_heads=kv_heads)
        self.lm = LlamaForCausalLM(self.cfg)
        self.params = {"base": base if base is not None else random_params(self.lm, 0), "peft": {}}
        self.model = CountingModel(self.lm)
        plain = ko.Model(self.lm)
        hook = ko.knockout_hook(plain)
        ids = np.array(jax.random.randint(jax.random.key(1), (B, T), 1, V))
        mask = np.ones((B, T), np.int32)
        mask[1, :PAD] = 0
        ids[1, :PAD] = 0
        self.ids, self.mask = ids, mask
        self.inputs = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}

        @jax.jit
        def forward(params, inputs, knockout):
            return plain(params, inputs, {"knockout": knockout}, [hook])

        self.forward = forward
        self.sweep = ko.make_sweep(self.model)

    def knocked(self, pattern: np.ndarray, layers_on) -> np.ndarray:
        """``bool [L, B, T, T]``: ``pattern [B, T, T]`` in the layers of ``layers_on`` (bool [L])."""
        return np.asarray(layers_on, bool)[:, None, None, None] & np.asarray(pattern, bool)[None]

    def last_probs(self, knockout: np.ndarray) -> np.ndarray:
        return np.asarray(jax.nn.softmax(self.forward(self.params, self.inputs, jnp.asarray(knockout)).logits[:, -1]))


@pytest.fixture(scope="module")
def s() -> Setup:
    return Setup()


# ------------------------------------------------------------------------------------ the PyTorch reference


@pytest.fixture(scope="module")
def torch_lm(s):
    config = transformers.LlamaConfig(**CFG, num_key_value_heads=2, tie_word_embeddings=False,
                                      attention_bias=False, mlp_bias=False, rope_theta=10000.0)
    config._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(config).eval()
    exported = decoders.llama_to_hf_state_dict(s.params["base"], s.cfg)
    state = {k: torch.tensor(np.asarray(v)) for k, v in exported.items()}
    hf.load_state_dict(state, strict=True)
    return hf


def torch_last_probs(hf, ids: np.ndarray, mask: np.ndarray, blocked: np.ndarray) -> np.ndarray:
    """Softmax at the last position of transformers' model, its decoder layers called one by one, layer ``l``
    with the 4-D additive mask ``causal ∧ key-not-padding ∧ ¬blocked[l]`` (``blocked``: ``bool [L, b, t, t]``)."""
    b, t = ids.shape
    positions = torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0))
    causal = np.tril(np.ones((t, t), bool))[None] & mask[:, None, :].astype(bool)
    with torch.no_grad():
        h = hf.model.embed_tokens(torch.tensor(ids))
        rope = hf.model.rotary_emb(h, position_ids=positions)
        for layer, block in zip(hf.model.layers, blocked, strict=True):
            allowed = causal & ~block
            bias = torch.tensor(np.where(allowed, 0.0, np.finfo(np.float32).min)[:, None], dtype=torch.float32)
            h = layer(h, attention_mask=bias, position_embeddings=rope, position_ids=positions)
            h = h[0] if isinstance(h, tuple) else h
        logits = hf.lm_head(hf.model.norm(h))[:, -1]
    return torch.softmax(logits.double(), -1).numpy()


def test_torch_reference_runs_like_transformers(s, torch_lm):
    """The layer-by-layer reference without blocks is transformers' own forward (and ours)."""
    none = np.zeros((L, B, T, T), bool)
    ref = torch_last_probs(torch_lm, s.ids, s.mask, none)
    with torch.no_grad():
        full = torch_lm(input_ids=torch.tensor(s.ids), attention_mask=torch.tensor(s.mask),
                        position_ids=torch.tensor(np.maximum(np.cumsum(s.mask, 1) - 1, 0))).logits[:, -1]
    np.testing.assert_allclose(ref, softmax_np(full.numpy()), atol=1e-6)
    ours = s.last_probs(none)
    assert record("clean last-position probs vs torch", np.abs(ours - ref).max()) <= PARITY_TOL


PARITY_SETS = {
    # "Image ↛ Question"-like: an early span blocked from later spans (row 1 is left-padded by 3)
    "span->later": (sets([1, 2, 3], [4, 5]), sets([6, 9], [7, 8, 9])),
    # "Last ↛ Last" together with an earlier key, and source ∩ target ≠ ∅
    "last->last": (sets([0, 8, 9], [3, 9]), sets([8, 9], [9])),
}


@pytest.mark.parametrize("name", sorted(PARITY_SETS))
def test_sweep_matches_transformers_with_per_layer_masks(s, torch_lm, name):
    """The most important check: p1 and p2 of every centre layer equal transformers' with the same
    blocked edges in the same layers (centred windows k = 1, 3 and a forward window k = 2)."""
    source, target = PARITY_SETS[name]
    pattern = np.asarray(ko.block_pattern(source, target))
    clean = torch_last_probs(torch_lm, s.ids, s.mask, np.zeros((L, B, T, T), bool))
    rows = np.arange(B)
    moved = 0.0
    for k, mode in ((1, "centered"), (3, "centered"), (2, "forward")):
        windows = ko.layer_windows(k, L, mode)
        res = {key: np.asarray(v) for key, v in s.sweep(s.params, s.inputs, source, target, windows).items()}
        token = res["token"]
        np.testing.assert_array_equal(token, clean.argmax(-1))
        assert record("p1 vs torch", np.abs(res["p1"] - clean[rows, token]).max()) <= PARITY_TOL
        for c in range(L):
            ref = torch_last_probs(torch_lm, s.ids, s.mask, s.knocked(pattern, windows[c]))[rows, token]
            assert record("p2 vs torch (every centre)", np.abs(res["p2"][c] - ref).max()) <= PARITY_TOL
            moved = max(moved, np.abs(ref - clean[rows, token]).max())
    assert moved > 100 * PARITY_TOL, "the knockout must change the answer probability for the test to mean anything"
    record(f"[info] largest |p2 - p1| of the torch reference ({name})", moved)


# ------------------------------------------------------------------------------------------- invariants


def test_blocking_nothing_changes_nothing(s):
    """Spec §14.1: an empty source or target, or all-False windows: p2 == p1 and p_c == 0 exactly."""
    some = sets([1, 2], [4, 5])
    last = sets([9], [9])
    empty = np.zeros((B, T), bool)
    for source, target, windows in ((empty, last, ko.layer_windows(3, L)), (some, empty, ko.layer_windows(3, L)),
                                    (some, last, np.zeros((L, L), bool))):
        res = s.sweep(s.params, s.inputs, source, target, windows)
        np.testing.assert_array_equal(np.asarray(res["p2"]), np.broadcast_to(res["p1"], (L, B)))
        np.testing.assert_array_equal(np.asarray(res["p_c"]), 0.0)
    # the same (source, target) with real windows does change p2
    res = s.sweep(s.params, s.inputs, some, last, ko.layer_windows(3, L))
    assert np.abs(np.asarray(res["p_c"])).max() > 1.0


def test_blocking_non_causal_edges_is_a_no_op(s):
    """Spec §14.2: sources all after every target ("Question ↛ Image") block only edges that causality
    already blocks."""
    source, target = sets([5, 6, 7, 8, 9], [6, 9]), sets([2, 3], [4])
    res = s.sweep(s.params, s.inputs, source, target, ko.layer_windows(2 * L - 1, L))
    np.testing.assert_array_equal(np.asarray(res["p_c"]), 0.0)
    everywhere = s.knocked(ko.block_pattern(source, target), np.ones(L, bool))
    out = s.forward(s.params, s.inputs, jnp.asarray(everywhere))
    clean = s.forward(s.params, s.inputs, jnp.zeros_like(everywhere))
    for h, h0 in zip(out.hidden_states, clean.hidden_states, strict=True):
        np.testing.assert_array_equal(np.asarray(h), np.asarray(h0))


def test_causality_states_before_the_first_target_are_bit_identical(s):
    """Spec §14.3: positions before min(T) are untouched in every layer (and later targets do change)."""
    source, target = sets([0, 1, 2], [3, 4]), sets([5, 8], [6, 9])
    first = [5, 6]
    knocked = s.knocked(ko.block_pattern(source, target), [False, True, True, False])
    out = s.forward(s.params, s.inputs, jnp.asarray(knocked))
    clean = s.forward(s.params, s.inputs, jnp.zeros_like(knocked))
    for layer, (h, h0) in enumerate(zip(out.hidden_states, clean.hidden_states, strict=True)):
        h, h0 = np.asarray(h), np.asarray(h0)
        for row, q in enumerate(first):
            real = slice(PAD if row == 1 else 0, q)  # padding rows attend uniformly to every key: not compared
            np.testing.assert_array_equal(h[row, real], h0[row, real], err_msg=f"layer {layer} row {row}")
            if layer >= 2:  # after the first blocked layer (1) the target itself has moved
                assert np.abs(h[row, q] - h0[row, q]).max() > 1e-3


def test_knocking_out_a_prefix_equals_dropping_it(s):
    """Spec §14.4 in text form: blocking the first n positions (the "image") from every later query in every
    layer equals running the later tokens alone with their original position ids (the prefix positions still
    attend among themselves, which nothing later reads)."""
    n = 4
    ids = s.ids.copy()
    ids[1, :PAD] = np.arange(1, PAD + 1)  # no padding here: the padded row's slots get real tokens
    inputs = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones((B, T), jnp.int32)}
    source, target = sets(range(n), range(n)), sets(range(n, T), range(n, T))
    everywhere = s.knocked(ko.block_pattern(source, target), np.ones(L, bool))
    out = s.forward(s.params, inputs, jnp.asarray(everywhere))
    alone = s.lm.apply({"params": s.params["base"]}, jnp.asarray(ids[:, n:]), jnp.ones((B, T - n), jnp.int32),
                       position_ids=jnp.broadcast_to(jnp.arange(n, T), (B, T - n)))
    diff = np.abs(np.asarray(out.logits[:, n:]) - np.asarray(alone.logits)).max()
    assert record("prefix knockout vs later tokens alone (logits)", diff) <= 1e-5
    # the clean run does read the prefix, so the check has teeth
    clean = s.forward(s.params, inputs, jnp.zeros_like(everywhere))
    assert np.abs(np.asarray(clean.logits[:, n:]) - np.asarray(alone.logits)).max() > 1e-2
    # the sweep with every layer blocked from every centre reads the same distribution
    res = s.sweep(s.params, inputs, source, target, ko.layer_windows(2 * L - 1, L))
    ref = softmax_np(np.asarray(alone.logits[:, -1]))[np.arange(B), np.asarray(res["token"])]
    assert record("prefix knockout vs later tokens alone (p2)", np.abs(np.asarray(res["p2"]) - ref).max()) <= 1e-5


def test_fully_blocked_row_zero_equals_module_knockout_and_raise_refuses(s):
    """Spec §14.6 / A6: target {t}, source = every real position <= t: with ``fully_blocked="zero"`` the
    attention output at t is zero in the blocked layers, i.e. module knockout of a_t in those layers (LLaMA's
    o_proj has no bias); ``"raise"`` refuses the pattern."""
    assert not s.cfg.o_proj_bias
    t = T - 1
    source, target = sets(range(t + 1), range(PAD, t + 1)), sets([t], [t])
    on = np.array([False, True, True, False])
    out = s.forward(s.params, s.inputs, jnp.asarray(s.knocked(ko.block_pattern(source, target), on)))
    zero_att = jnp.asarray(on[:, None, None] & target[None])
    plain = ko.Model(s.lm)
    ref = jax.jit(lambda p, i, z: plain(p, i, {"zero_attention": z}, modules.module_knockout_hooks(plain)))(
        s.params, s.inputs, zero_att)
    diff = np.abs(np.asarray(out.logits) - np.asarray(ref.logits)).max()
    assert record("fully blocked row (zero) vs module knockout (logits)", diff) <= 1e-5
    clean = s.forward(s.params, s.inputs, jnp.zeros((L, B, T, T), bool))
    assert np.abs(np.asarray(clean.logits[:, t]) - np.asarray(ref.logits[:, t])).max() > 1e-2
    # the sweep's p2 for windows [1, 2] (forward k = 2 at centre 1) is the module-knocked-out probability
    res = s.sweep(s.params, s.inputs, source, target, ko.layer_windows(2, L, "forward"))
    token = np.asarray(res["token"])
    p_ref = softmax_np(np.asarray(ref.logits[:, -1]))[np.arange(B), token]
    assert record("fully blocked row (zero): sweep p2 vs module knockout", np.abs(res["p2"][1] - p_ref).max()) <= 1e-5
    np.testing.assert_array_equal(ko.fully_blocked_rows(source, target, s.mask), target)
    with pytest.raises(InputError, match="nothing to attend"):
        ko.make_sweep(s.model, fully_blocked="raise")(s.params, s.inputs, source, target, ko.layer_windows(1, L))


def test_grouped_query_heads_equal_repeated_key_value_heads(s):
    """Spec §14.7 / A7: a GQA model (2 KV heads for 4 query heads) under a knockout equals the plain
    multi-head model whose K/V heads are the GQA heads repeated (every query head of a group is blocked), and
    a bias tiled to ``[b, h, tq, tk]`` gives the same result as ``[b, 1, tq, tk]``."""
    hd = s.cfg.head_dim
    group = s.cfg.num_attention_heads // s.cfg.num_key_value_heads
    base = jax.tree.map(lambda a: a, s.params["base"])
    for i in range(L):
        attn = dict(base["model"][f"layers_{i}"]["self_attn"])
        for name in ("k_proj", "v_proj"):
            kernel = np.asarray(attn[name]["kernel"]).reshape(CFG["hidden_size"], -1, hd)
            attn[name] = {"kernel": jnp.asarray(np.repeat(kernel, group, axis=1).reshape(CFG["hidden_size"], -1))}
        base["model"][f"layers_{i}"] = {**base["model"][f"layers_{i}"], "self_attn": attn}
    mha = Setup(kv_heads=s.cfg.num_attention_heads, base=base)
    t = T - 1
    for source, target in (PARITY_SETS["span->later"], (sets(range(t + 1), range(PAD, t + 1)), sets([t], [t]))):
        knocked = jnp.asarray(s.knocked(ko.block_pattern(source, target), [True, False, True, True]))
        a = np.asarray(s.forward(s.params, s.inputs, knocked).logits)
        b = np.asarray(mha.forward(mha.params, mha.inputs, knocked).logits)
        assert record("GQA vs repeated-KV multi-head (logits)", np.abs(a - b).max()) <= 1e-5

    def tile(ctx, nxt, q, k, v, bias):
        return nxt(q, k, v, jnp.broadcast_to(bias, (bias.shape[0], q.shape[2], *bias.shape[2:])))

    plain = ko.Model(s.lm)
    tiled = jax.jit(lambda p, i, kn: plain(p, i, {"knockout": kn}, [ko.knockout_hook(plain),
                                                                    hooks.Hook("attention", tile)]).logits)
    for source, target in (PARITY_SETS["last->last"], (sets(range(t + 1), range(PAD, t + 1)), sets([t], [t]))):
        knocked = jnp.asarray(s.knocked(ko.block_pattern(source, target), [True, True, False, True]))
        a = np.asarray(s.forward(s.params, s.inputs, knocked).logits)
        b = np.asarray(tiled(s.params, s.inputs, knocked))
        assert record("bias [b,1,t,t] vs tiled [b,h,t,t]", np.abs(a - b).max()) <= 1e-6


def test_sweep_equals_loop_over_explicit_masks_and_compiles_once(s):
    """Spec §14.9 / §14.16: ``lax.map`` over windows equals a Python loop over explicit ``[L, b, t, t]`` masks;
    new windows, window sizes and position sets of the same shapes reuse the compiled sweep."""
    source, target = PARITY_SETS["span->later"]
    s.sweep(s.params, s.inputs, source, target, ko.layer_windows(1, L))
    traced = TRACES[id(s.model)]
    assert traced >= 2  # the clean pass and the lax.map body
    rng = np.random.default_rng(0)
    cases = [(source, target, ko.layer_windows(3, L)),
             (source, target, rng.random((L, L)) < 0.5),  # any window matrix, not only contiguous ones
             (*PARITY_SETS["last->last"], ko.layer_windows(2, L, "forward")),
             (sets([0, 1], [4]), sets([9], [9]), ko.layer_windows(2 * L - 1, L))]
    rows = np.arange(B)
    for source, target, windows in cases:
        res = s.sweep(s.params, s.inputs, source, target, windows)
        pattern = np.asarray(ko.block_pattern(source, target))
        clean = s.last_probs(np.zeros((L, B, T, T), bool))
        token = clean.argmax(-1)
        np.testing.assert_array_equal(np.asarray(res["token"]), token)
        for c in range(L):
            loop = s.last_probs(s.knocked(pattern, windows[c]))[rows, token]
            assert record("lax.map sweep vs loop over explicit masks", np.abs(res["p2"][c] - loop).max()) <= 1e-6
    assert TRACES[id(s.model)] == traced, "the sweep was traced again for a new window/pattern of the same shape"


def test_window_arithmetic():
    """Spec §4 and §14.8 (A2, A4)."""
    assert ko.layer_window(0, 9, 40) == [0, 1, 2, 3, 4]
    assert ko.layer_window(20, 9, 40) == list(range(16, 25))
    assert ko.layer_window(39, 9, 40) == list(range(35, 40))
    assert ko.layer_window(7, 1, 40) == [7]
    assert ko.layer_window(5, 4, 40) == [3, 4, 5, 6]  # even k: the extra layer after the centre
    assert ko.layer_window(5, 3, 8, "forward") == [5, 6, 7]
    assert ko.layer_window(6, 3, 8, "forward") == [6, 7]  # clipped at L - 1
    w = ko.layer_windows(3, 5)
    assert w.shape == (5, 5) and w.dtype == bool
    np.testing.assert_array_equal(w.astype(int), [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0],
                                                  [0, 0, 1, 1, 1], [0, 0, 0, 1, 1]])
    np.testing.assert_array_equal(ko.layer_windows(1, 5), np.eye(5, dtype=bool))
    np.testing.assert_array_equal(ko.layer_windows(9, 5), np.ones((5, 5), bool))  # k = 2L - 1: every layer
    assert not ko.layer_windows(8, 5)[0, 4]  # k = 2L - 2 misses the far end from the first centre
    np.testing.assert_array_equal(ko.layer_windows(2, 4, "forward").astype(int),
                                  [[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 1]])
    with pytest.raises(ConfigError, match="k=10"):
        ko.layer_windows(10, 5)
    with pytest.raises(ConfigError, match="k=0"):
        ko.layer_window(0, 0, 5)
    with pytest.raises(ConfigError, match="k=0"):
        ko.layer_windows(0, 5)
    for centre in (-1, 5):
        with pytest.raises(ConfigError, match="centre layer"):
            ko.layer_window(centre, 3, 5)
    with pytest.raises(ConfigError, match="centered"):
        ko.layer_window(0, 3, 5, "backward")


def test_constant_curve_when_every_centre_blocks_every_layer(s):
    """Spec §14.8: with k = 2L - 1 every centre blocks the same layers, so p_c is constant in the centre."""
    source, target = PARITY_SETS["span->later"]
    res = s.sweep(s.params, s.inputs, source, target, ko.layer_windows(2 * L - 1, L))
    p_c = np.asarray(res["p_c"])
    np.testing.assert_array_equal(p_c, np.broadcast_to(p_c[0], p_c.shape))
    assert np.abs(p_c).max() > 1.0


def test_relative_change_and_block_pattern_direction():
    """Spec §5 / §14.10 (p_c formula) and A1 (query in the target, key in the source)."""
    p1 = np.array([[0.2, 0.5]])
    p2 = np.array([[0.2, 0.5], [0.0, 0.0], [0.4, 1.0], [0.1, 0.125]])
    np.testing.assert_allclose(ko.relative_change(p1, p2), [[0, 0], [-100, -100], [100, 100], [-50, -75]])
    source = np.array([[True, True, False, False, False], [False, False, False, True, False]])
    target = np.array([[False, False, False, True, True], [False, False, False, False, True]])
    got = np.asarray(ko.block_pattern(source, target))
    want = np.zeros((2, 5, 5), bool)
    for b in range(2):
        for q in range(5):
            for k in range(5):
                want[b, q, k] = target[b, q] and source[b, k]
    np.testing.assert_array_equal(got, want)
    assert got[0, 4, 0] and not got[0, 0, 4]  # row = query ∈ T, column = key ∈ S


def test_sweep_reads_given_token_ids(s):
    """``token``: p1/p2 are read at the given ids instead of the greedy token."""
    sweep = ko.make_sweep(ko.Model(s.lm), token_ids=True)
    source, target = PARITY_SETS["span->later"]
    with pytest.raises(InputError, match="token"):
        sweep(s.params, s.inputs, source, target, ko.layer_windows(1, L))
    token = np.array([5, 17])
    res = sweep(s.params, s.inputs, source, target, ko.layer_windows(1, L), token)
    clean = s.last_probs(np.zeros((L, B, T, T), bool))
    np.testing.assert_array_equal(np.asarray(res["token"]), token)
    np.testing.assert_allclose(np.asarray(res["p1"]), clean[np.arange(B), token], atol=1e-6)


def test_bad_inputs_and_configs_are_named(s):
    """Spec §14 / the error rules: InputError for bad sets and batches, ConfigError for bad options."""
    source, target = PARITY_SETS["span->later"]
    w = ko.layer_windows(1, L)
    with pytest.raises(InputError, match="source set has shape"):
        s.sweep(s.params, s.inputs, source[:, :-1], target, w)
    with pytest.raises(InputError, match="target set has shape"):
        s.sweep(s.params, s.inputs, source, target[:1], w)
    with pytest.raises(InputError, match="padding position 1 of row 1"):
        s.sweep(s.params, s.inputs, sets([1], [1, 5]), target, w)
    with pytest.raises(InputError, match="target set holds padding"):
        s.sweep(s.params, s.inputs, source, sets([9], [0]), w)
    right = {"input_ids": s.inputs["input_ids"], "attention_mask": jnp.asarray(s.mask[:, ::-1].copy())}
    with pytest.raises(InputError, match=r"rows \[1\] end with padding"):
        s.sweep(s.params, right, sets([1], [1]), sets([2], [2]), w)
    with pytest.raises(InputError, match="windows have shape"):
        s.sweep(s.params, s.inputs, source, target, np.ones((L, L + 1), bool))
    with pytest.raises(ConfigError, match="fully_blocked='nan'"):
        ko.make_sweep(s.model, fully_blocked="nan")
    with pytest.raises(ConfigError, match="fully_blocked"):
        ko.knockout_hook(s.model, fully_blocked="uniform")
    with pytest.raises(ConfigError, match="window mode 'backward'"):
        ko.layer_windows(3, L, "backward")


def test_sweep_runs_with_prefix_tuning_active(s):
    """A Model with a method that adds attention keys before the sequence (prefix tuning): blocking nothing
    changes nothing, p1 is the prefix-tuned model's probability, and the virtual keys are never blocked (a
    query blocked from every sequence key still reads them, so it is not zeroed as fully blocked)."""
    from vlpeft_jax.peft.prefix import PrefixTuning

    method = PrefixTuning(num_virtual_tokens=3, num_kv_heads=2, projection=False)
    params = {"base": s.params["base"], "peft": {"prefix": method.init(jax.random.key(2), s.params["base"])}}
    model = ko.Model(s.lm, (("prefix", method),))
    empty = np.zeros((B, T), bool)
    res = ko.make_sweep(model)(params, s.inputs, empty, sets([9], [9]), ko.layer_windows(1, L))
    np.testing.assert_array_equal(np.asarray(res["p_c"]), 0.0)
    clean = softmax_np(np.asarray(model(params, s.inputs).logits[:, -1]))
    np.testing.assert_allclose(np.asarray(res["p1"]), clean[np.arange(B), np.asarray(res["token"])], atol=1e-6)
    # the last query blocked from every sequence key in every layer still reads the prefix: not zeroed
    from vlpeft_jax.analysis.modules import module_knockout_hooks

    real = np.asarray(s.inputs["attention_mask"], bool)
    every = np.ones((1, L), bool)
    blocked = ko.make_sweep(model)(params, s.inputs, real, sets([9], [9]), every)
    zero = np.zeros((L, B, T), bool)
    zero[:, :, 9] = True
    zeroed = model(params, s.inputs, {"zero_attention": jnp.asarray(zero)}, module_knockout_hooks(model)).logits
    p_zeroed = softmax_np(np.asarray(zeroed[:, -1]))[np.arange(B), np.asarray(blocked["token"])]
    assert np.abs(np.asarray(blocked["p2"][0]) - p_zeroed).max() > 1e-4
    assert np.abs(np.asarray(blocked["p_c"])).max() > 1e-3
