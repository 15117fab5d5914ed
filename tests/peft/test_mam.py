"""KLAFT's MAM (seed 000 Eq. 2) and the MRM / ITM losses (Eq. 7-8): spec klaft.md §9 items 10-16, 18, 19.

The model is a tiny prefix VLM (ViT 16x16 with 8x8 patches -> 4 visual tokens, MLP Mapping Layer, 2-layer LLaMA
with grouped-query attention), the KLAFT setting. "Random" MAM parameters (init + noise) are used wherever an
identity block would make a check vacuous.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.eval import decode
from vlpeft_jax.models import layers
from vlpeft_jax.models.registry import build_model
from vlpeft_jax.models.vlm import select_vision_features
from vlpeft_jax.peft import base as pb
from vlpeft_jax.peft import klaft_losses as kl
from vlpeft_jax.peft import registry
from vlpeft_jax.peft.mam import (
    IMAGE_CLS,
    MAM,
    TEXT,
    TEXT_CLS,
    VISUAL,
    DecodeStateApply,
    gate_values,
    mam_attention,
    mask_tables,
)

I_PF = 4  # visual tokens of the tiny VLM
VOCAB = 32


def vlm_config(**connector):
    return dict(family="prefix_vlm",
                vision=dict(family="vit", image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=32, add_pooling_layer=False),
                connector=dict(kind="mlp", num_layers=2, feature="patches", **connector),
                decoder=dict(family="llama", vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             tie_word_embeddings=True))


@pytest.fixture(scope="module")
def vlm():
    module, inputs = build_model(vlm_config())
    params = layers.unbox(module.init(jax.random.key(0), **inputs))["params"]
    pixels = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    return module, params, pixels


def noisy(tree, seed=3, scale=0.5):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)])


def method(placement, **kw):
    kw.setdefault("itm", placement == "top")
    kw.setdefault("max_length", 24)
    return MAM(mam_layers=placement, num_visual=I_PF, num_heads=2, **kw)


def run(vlm, m, p, ids, mask, **kw):
    module, params, pixels = vlm
    return pb.apply_with(module.apply, [(m, p)], {"params": params}, ids, mask, pixels, **kw)


# ------------------------------------------------------------------------------- the attention itself (10, 11)


def _qkv(b=2, t=6, h=4, kvh=2, d=8):
    k = jax.random.split(jax.random.key(7), 3)
    return (jax.random.normal(k[0], (b, t, h, d)), jax.random.normal(k[1], (b, t, kvh, d)),
            jax.random.normal(k[2], (b, t, kvh, d)))


def _layout(b=2, t=6, nv=3):
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    kind = jnp.where(pos < nv, VISUAL, TEXT)
    return kind, pos


def test_gate_below_mu_is_exactly_m_s_and_gate_one_is_m_c():
    # jitted: one compilation each instead of one per operation (the file's time budget)
    mam_attention_ = jax.jit(mam_attention)
    gate_values_ = jax.jit(gate_values, static_argnums=5)
    attention = jax.jit(lambda q, k, v, m: layers.attention_default(q, k, v, layers.mask_to_bias(m)[:, None]))
    q, k, v = _qkv()
    kind, pos = _layout()
    m_c, m_s = mask_tables(kind, pos, kind, pos, jnp.ones(pos.shape, bool))
    ref_s, ref_c = attention(q, k, v, m_s), attention(q, k, v, m_c)
    assert float(jnp.abs(ref_s - ref_c).max()) > 1e-2  # the two masks really differ here
    x = jax.random.normal(jax.random.key(8), (2, 6, 5))
    w = jax.random.normal(jax.random.key(9), (5, 8))
    for mu, c_b in ((1.0, 0.0), (0.0, -1e4), (0.3, -1e4)):  # μ ≥ 1, or C_b -> -inf: every gate entry below μ
        gate = gate_values_(x, w, jnp.full((8, 8), c_b), pos, pos, mu)
        assert float(jnp.abs(gate).max()) == 0.0
        np.testing.assert_allclose(mam_attention_(q, k, v, m_c, m_s, gate), ref_s, atol=1e-6)
    gate = gate_values_(x, w, jnp.full((8, 8), 1e4), pos, pos, 0.0)  # C_b -> +inf: B_c ≡ 1
    assert float(jnp.abs(gate - 1.0).max()) == 0.0
    np.testing.assert_allclose(mam_attention_(q, k, v, m_c, m_s, gate), ref_c, atol=1e-6)


def test_gate_is_sparse_and_entries_below_mu_get_zero_gradient():
    mu = 0.4
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    x = jax.random.normal(jax.random.key(10), (2, 6, 5))
    w = jax.random.normal(jax.random.key(11), (5, 8))
    c_b = jax.random.normal(jax.random.key(12), (8, 8))
    gate = np.asarray(gate_values(x, w, c_b, pos, pos, mu))
    assert np.all((gate == 0) | ((gate > mu) & (gate < 1)))
    assert 0 < np.mean(gate == 0) < 1  # both kinds of entry occur
    grad = np.asarray(jax.grad(lambda c: gate_values(x, w, c, pos, pos, mu)[0].sum())(c_b))[:6, :6]
    a = np.asarray(jnp.einsum("qd,dk->qk", x[0], w[:, :6])) + np.asarray(c_b)[:6, :6]
    s = 1 / (1 + np.exp(-a))
    np.testing.assert_allclose(grad, np.where(s > mu, s * (1 - s), 0.0), atol=1e-6)  # σ'(A)·1[σ(A) > μ]
    assert np.all(grad[s <= mu] == 0.0)


# ------------------------------------------------------------------------------------------ mask tables (12)


def test_mask_tables_r3_by_hand():
    kind, pos = _layout(b=1, t=7, nv=3)  # I_pf = 3 visual, |x| = 4 text
    m_c, m_s = (np.asarray(m[0]).astype(int) for m in mask_tables(kind, pos, kind, pos, jnp.ones((1, 7), bool)))
    expected_s = np.array([[1, 1, 1, 0, 0, 0, 0]] * 3 + [[0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0],
                                                          [0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1]])
    expected_c = np.array([[1] * 7] * 3 + [[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0],
                                           [1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(m_s, expected_s)
    np.testing.assert_array_equal(m_c, expected_c)


def _spec_cell(pattern, which, qk, qp, kk, kp):
    """One cell of spec §2.2's table (and A2's R1/R2), written from the prose."""
    q_vis, k_vis = qk in (VISUAL, IMAGE_CLS), kk in (VISUAL, IMAGE_CLS)
    causal = kp <= qp
    same = k_vis if q_vis else (not k_vis and causal)
    if qk in (IMAGE_CLS, TEXT_CLS) or which == "s" and pattern in ("r3", "r1"):
        return same
    if pattern == "conventional" or (which == "s" and pattern == "r2"):
        return k_vis if q_vis else (k_vis or causal)
    if pattern == "r1":
        return (not k_vis) if q_vis else k_vis
    return True if q_vis else (k_vis or causal)


@pytest.mark.parametrize("pattern", ["r3", "r1", "r2", "conventional"])
def test_mask_tables_with_cls_and_padding_cell_by_cell(pattern):
    # slots: 3 visual, 4 text (the last one padding), image-[CLS] (pos 3), text-[CLS] (after the last real text)
    kind = jnp.array([[VISUAL] * 3 + [TEXT] * 4 + [IMAGE_CLS, TEXT_CLS]])
    pos = jnp.array([[0, 1, 2, 4, 5, 6, 6, 3, 7]])
    valid = jnp.array([[True] * 6 + [False, True, True]])
    tables = [np.asarray(m[0]) for m in mask_tables(kind, pos, kind, pos, valid, pattern)]
    k, p, ok = np.asarray(kind[0]), np.asarray(pos[0]), np.asarray(valid[0])
    for m, which in zip(tables, "cs", strict=True):
        for i in range(9):
            for j in range(9):
                own = p[i] == p[j] and k[i] == k[j]  # the query's own key (found by position and type in a cache)
                want = (_spec_cell(pattern, which, k[i], p[i], k[j], p[j]) or own) and ok[j]
                assert m[i, j] == want, (pattern, which, i, j)
        assert m[ok].any(-1).all()  # no all-masked row


# --------------------------------------------------------------------------------- through the model (13-16)


@pytest.mark.parametrize("placement", ["top", "all"])
def test_identity_at_initialisation(vlm, placement):
    module, params, pixels = vlm
    m = method(placement, mrm=True)
    p = m.init(jax.random.key(2), params)
    ids, mask = jnp.array([[1, 5, 6, 7], [1, 9, 10, 0]]), jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]])
    base = module.apply({"params": params}, ids, mask, pixels).logits
    for train in (False, True):
        out, _ = run(vlm, m, p, ids, mask, rng=jax.random.key(4), train=train, record=True)
        assert float(jnp.abs(out.logits - base).max()) == 0.0  # (the "separate" MRM pass is another call)


@pytest.mark.parametrize("placement", ["top", "all"])
def test_no_future_token_leakage_with_training_masks(vlm, placement):
    m = method(placement)
    p = noisy(m.init(jax.random.key(2), vlm[1]))
    ids = jnp.array([[1, 5, 6, 7, 8, 9], [1, 9, 10, 11, 12, 13]])
    later = ids.at[:, 3:].set(jnp.array([20, 21, 22]))
    mask = jnp.ones_like(ids)
    a, _ = run(vlm, m, p, ids, mask, train=True, record=True)
    b, _ = run(vlm, m, p, later, mask, train=True, record=True)
    t0 = I_PF + 3  # text positions up to the last unchanged token (visual rows may see text under M_c)
    np.testing.assert_allclose(a.logits[:, I_PF:t0], b.logits[:, I_PF:t0], atol=1e-6)
    assert float(jnp.abs(a.logits[:, t0:] - b.logits[:, t0:]).max()) > 1e-3  # the change does reach later ones


def test_visual_rows_independent_of_text_under_m_s_only(vlm):
    ids, mask = jnp.array([[1, 5, 6, 7]] * 2), jnp.ones((2, 4), jnp.int32)
    other = ids.at[:, 1:].set(jnp.array([20, 21, 22]))
    for mu, changes in ((1.0, False), (0.0, True)):  # μ = 1: B_c ≡ 0 (M_s only); μ = 0: the M_c part is on
        m = method("top", mu=mu, itm=False)
        p = noisy(m.init(jax.random.key(2), vlm[1]))
        a = run(vlm, m, p, ids, mask).logits[:, :I_PF]
        b = run(vlm, m, p, other, mask).logits[:, :I_PF]
        diff = float(jnp.abs(a - b).max())
        assert (diff > 1e-4) if changes else (diff == 0.0), (mu, diff)


def test_cached_decoding_equals_full_forward_all_layers(vlm):
    """``mam_layers="all"`` with the model's own KV cache: prefill, then one token per step (the top block's
    cached decoding goes through ``decode.generate`` in the next test)."""
    module, params, pixels = vlm
    m = method("all")
    p = noisy(m.init(jax.random.key(2), params))
    assert m.init_decode_state(p, 2, 8) is None
    prompt, pmask = jnp.array([[0, 1], [1, 5]]), jnp.array([[0, 1], [1, 1]])  # row 0 left-padded
    steps = jnp.array([[6, 7], [8, 9], [10, 11]])  # forced next tokens, one per row and step
    full_ids = jnp.concatenate([prompt, steps.T], axis=1)
    full_mask = jnp.concatenate([pmask, jnp.ones((2, 3), jnp.int32)], axis=1)
    full = run(vlm, m, p, full_ids, full_mask).logits[:, I_PF:]
    out = run(vlm, m, p, prompt, pmask, cache=module.language_model.init_cache(2, I_PF + 2 + 3))
    got = [out.logits[:, -1]]
    for s in range(3):
        out = pb.apply_with(module.apply, [(m, p)], {"params": params}, steps[s][:, None], jnp.ones((2, 1), jnp.int32),
                            None, cache=out.cache, decode=True)
        got.append(out.logits[:, -1])
    err = float(jnp.abs(jnp.stack(got, axis=1) - full[:, 1:]).max())
    print(f"all layers: cached vs full max abs logit diff {err:.2e}")
    assert err <= 1e-5


def test_generate_with_the_top_block_cache_equals_the_full_forward(vlm):
    """The wiring: greedy decoding through :class:`DecodeStateApply` (the block's cache beside the model's)."""
    module, params, pixels = vlm
    m = method("top")
    p = noisy(m.init(jax.random.key(2), params))
    prompt, pmask = jnp.array([[0, 1], [1, 5]]), jnp.array([[0, 1], [1, 1]])
    gen = decode.generate(DecodeStateApply(module, (("mam", m),)), {"base": params, "peft": {"mam": p}},
                          {"input_ids": prompt, "pixel_values": pixels}, pmask, max_new_tokens=3, eos_token_id=None,
                          pad_token_id=0, output_logits=True)
    ids = jnp.concatenate([prompt, gen.sequences], 1)
    full = run(vlm, m, p, ids, jnp.concatenate([pmask, jnp.ones((2, 3), jnp.int32)], 1)).logits[:, I_PF + 1:-1]
    err = float(jnp.abs(gen.logits - full).max())
    print(f"generate (top block cache) vs full forward: max abs logit diff {err:.2e}")
    assert err <= 1e-5
    np.testing.assert_array_equal(gen.sequences, jnp.argmax(full, -1))
    # beam search reorders the block's cache rows with the model's: each returned beam's score is its log-probability
    # under the full forward
    beam = decode.generate(DecodeStateApply(module, (("mam", m),)), {"base": params, "peft": {"mam": p}},
                           {"input_ids": prompt, "pixel_values": pixels}, pmask, max_new_tokens=3, eos_token_id=None,
                           pad_token_id=0, method="beam", num_beams=3)
    ids = jnp.concatenate([prompt, beam.sequences], 1)
    full = run(vlm, m, p, ids, jnp.concatenate([pmask, jnp.ones((2, 3), jnp.int32)], 1)).logits[:, I_PF + 1:-1]
    logp = jnp.take_along_axis(jax.nn.log_softmax(full, -1), beam.sequences[..., None], -1)[..., 0].mean(-1)
    np.testing.assert_allclose(beam.scores, logp, atol=1e-5)
    # a cached call without the block's cache is refused (while tracing)
    cache = module.language_model.init_cache(2, 8)
    with pytest.raises(ConfigError, match="mam_cache"):
        jax.eval_shape(lambda: run(vlm, m, p, prompt, pmask, cache=cache))


# ------------------------------------------------------------------------------------------- ITM and MRM (18, 19)


def test_triplet_loss_by_hand():
    a, x = jnp.array([0.0, 0.0]), jnp.array([1.0, 0.0])
    assert float(kl.triplet_hinge(a, x, jnp.array([3.0, 0.0]))) == 0.0
    assert abs(float(kl.triplet_hinge(a, x, jnp.array([1.5, 0.0]))) - 0.5) < 1e-6
    # in-batch: rows 0 and 1 show the same image; only (0,2), (1,2), (2,0), (2,1) are triplets
    v_a = jnp.zeros((3, 2))
    v_x = jnp.array([[1.0, 0.0], [1.2, 0.0], [1.5, 0.0]])
    # hinges: (0,2) 1-1.5+1=0.5  (1,2) 1.2-1.5+1=0.7  (2,0) 1.5-1+1=1.5  (2,1) 1.5-1.2+1=1.3
    got = float(kl.itm_loss(v_a, v_x, jnp.array([7, 7, 8])))
    assert abs(got - (0.5 + 0.7 + 1.5 + 1.3) / 4) < 1e-6
    # without ids (0,1) and (1,0) count too: 1-1.2+1=0.8 and 1.2-1+1=1.2
    assert abs(float(kl.itm_loss(v_a, v_x)) - (0.5 + 0.7 + 1.5 + 1.3 + 0.8 + 1.2) / 6) < 1e-6
    assert float(kl.itm_loss(v_a, v_x, jnp.array([1, 1, 1]))) == 0.0  # no negative at all


def test_itm_recorded_in_training_only_with_same_image_rows_excluded(vlm):
    m = method("top")
    p = noisy(m.init(jax.random.key(2), vlm[1]))
    ids, mask = jnp.array([[1, 5, 6], [1, 9, 10]]), jnp.array([[1, 1, 1], [1, 1, 0]])
    trained, rec = run(vlm, m, p, ids, mask, train=True, record=True, side_inputs={"image_ids": jnp.array([0, 1])})
    assert float(rec.total("loss/itm")) > 0.0
    _, rec = run(vlm, m, p, ids, mask, train=True, record=True, side_inputs={"image_ids": jnp.array([3, 3])})
    assert float(rec.total("loss/itm")) == 0.0
    evaluated, rec = run(vlm, m, p, ids, mask, train=False, record=True)
    assert "loss/itm" not in rec
    # the text-[CLS] (training only) comes after every text token: the text rows are the same without it
    np.testing.assert_allclose(trained.logits[:, I_PF:], evaluated.logits[:, I_PF:], atol=1e-6)


def test_region_mask_fraction_and_mrm_loss_by_hand():
    n, rate = 16, 0.15
    masks = np.asarray(kl.draw_region_mask(jax.random.key(5), 4000, n, rate))
    expected = rate + (1 - rate) ** n / n  # at least one region per image
    assert abs(masks.mean() - expected) < 0.005
    assert masks.any(-1).all()
    target = jax.random.normal(jax.random.key(6), (2, 5, 3))
    m = jnp.array([[True, False, True, False, False], [False, False, False, False, True]])
    assert float(kl.mrm_loss(target, target, m)) == 0.0  # perfect prediction
    pred = target.at[0, 1].add(100.0).at[1, 0].add(-50.0)  # errors only at unmasked regions
    assert float(kl.mrm_loss(pred, target, m)) == 0.0
    pred = target.at[0, 0, 0].add(2.0).at[1, 4, 1].add(1.0)  # squared errors 4 and 1 over 3 masked regions
    assert abs(float(kl.mrm_loss(pred, target, m)) - 5.0 / 3) < 1e-6


@pytest.mark.parametrize("mrm_pass", ["separate", "same"])
def test_mrm_through_the_model(vlm, mrm_pass):
    m = method("top", mrm=True, mrm_pass=mrm_pass)
    assert m.extra_passes() == (("mrm",) if mrm_pass == "separate" else ())
    p = m.init(jax.random.key(2), vlm[1])
    ids, mask = jnp.array([[1, 5, 6], [1, 9, 10]]), jnp.ones((2, 3), jnp.int32)
    main, rec = run(vlm, m, p, ids, mask, rng=jax.random.key(4), train=True, record=True)
    side = {"pass_name": "mrm"} if mrm_pass == "separate" else None
    if mrm_pass == "separate":  # the main pass sees clean images and records no MRM
        assert "loss/mrm" not in rec
        masked, rec = run(vlm, m, p, ids, mask, rng=jax.random.key(4), train=True, record=True, side_inputs=side)
    else:
        masked = main
    mask_regions = np.asarray(rec["mrm/mask"][0])
    assert mask_regions.shape == (2, I_PF) and mask_regions.any(-1).all()
    module, params, pixels = vlm
    # by hand: targets = the vision features entering the Mapping Layer (pre-MaL), predictions = f_θ (a GELU MLP)
    # of the block output at the visual positions (= the final hidden state: the block is the identity at init),
    # squared error summed over the features, averaged over the masked regions only
    feats = np.asarray(module.apply({"params": params}, pixels,
                                    method=lambda mdl, px: select_vision_features(mdl.vision_tower(px), "patches", -1)))
    head = jax.tree_util.tree_map(np.asarray, p["mrm_head"])
    h = np.asarray(masked.hidden_states[-1][:, :I_PF])
    pred = np.asarray(jax.nn.gelu(h @ head["fc1"]["kernel"] + head["fc1"]["bias"], approximate=False))
    pred = pred @ head["fc2"]["kernel"] + head["fc2"]["bias"]
    want = ((pred - feats) ** 2).sum(-1)[mask_regions].mean()
    got = float(rec.total("loss/mrm"))
    assert want > 0 and abs(got - want) <= 1e-5 * want, (got, want)
    clean = module.apply({"params": params}, ids, mask, pixels).logits
    assert float(jnp.abs(masked.logits - clean).max()) > 0  # the masked pass did see masked regions


def test_mrm_refused_with_a_single_visual_token(vlm):
    with pytest.raises(ConfigError, match="single visual token"):
        MAM(num_visual=1, mrm=True)
    # a model whose Mapping Layer reads one region (ClipCap: class token -> 4 visual tokens); refused while
    # tracing (shapes only here), before anything is compiled
    cfg = vlm_config()
    cfg["connector"] = dict(kind="mlp", feature="cls", num_prefix=I_PF)
    module, inputs = build_model(cfg)
    params = layers.unbox(jax.eval_shape(module.init, jax.random.key(0), **inputs))["params"]
    m = method("top", mrm=True, mrm_pass="same")
    p = m.init(jax.random.key(2), params)
    with pytest.raises(ConfigError, match="1 visual token"):
        jax.eval_shape(lambda base: pb.apply_with(module.apply, [(m, p)], {"params": base}, jnp.array([[1, 5]]),
                                                  jnp.ones((1, 2), jnp.int32), vlm[2][:1], rng=jax.random.key(4),
                                                  train=True, record=True), params)


def test_independent_inference_drops_the_gate_only_at_inference(vlm):
    ids, mask = jnp.array([[1, 5, 6, 7]] * 2), jnp.ones((2, 4), jnp.int32)
    m = method("top")
    p = noisy(m.init(jax.random.key(2), vlm[1]))
    independent = method("top", mam_inference="independent")
    gate_off = method("top", mu=1.0)  # B_c ≡ 0
    np.testing.assert_array_equal(run(vlm, independent, p, ids, mask).logits, run(vlm, gate_off, p, ids, mask).logits)
    train = [run(vlm, x, p, ids, mask, train=True, record=True)[0].logits for x in (independent, m)]
    np.testing.assert_array_equal(*train)


def test_parameter_counts_at_gpt2_small_width():
    """Spec §8 at d = 768: attention 2,362,368 + ReLU FFN 4,722,432 + 2 LN 3,072; gate d·N + N²; [CLS] d;
    f_θ d² + d + d·d_pf + d_pf (abstract shapes only)."""
    d, n, d_pf = 768, 50, 2048
    base = {"multi_modal_projector": {"linear_1": {"kernel": jax.ShapeDtypeStruct((d_pf, d), jnp.float32)}}}
    f_theta = d * d + d + d * d_pf + d_pf
    for settings, extra in ((dict(), 0), (dict(itm=True), d), (dict(itm=True, mrm=True), d + f_theta)):
        m = MAM(num_visual=16, width=d, num_heads=12, max_length=n, **settings)
        shapes = jax.eval_shape(lambda m=m: m.init(jax.random.key(0), base))
        assert m.num_params(shapes) == 7_087_872 + d * n + n * n + extra


# ------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("settings, match", [
    (dict(mu=-0.1), "mu=-0.1"), (dict(mu=1.5), "mu=1.5"), (dict(mam_masks="r4"), "mam_masks='r4'"),
    (dict(mam_layers="middle"), "mam_layers='middle'"), (dict(mam_layers="all", itm=True), "itm=True"),
    (dict(mam_inference="off"), "mam_inference"), (dict(num_visual=None), "num_visual"),
    (dict(max_length=4), "max_length=4"),
])
def test_bad_settings_are_refused(settings, match):
    kw = dict(num_visual=I_PF) | settings
    with pytest.raises(ConfigError, match=match):
        MAM(**kw)


def test_registry_and_too_long_sequences(vlm):
    m = registry.build_method("mam", {"num_visual": I_PF, "max_length": 6, "num_heads": 2, "targets": ["a"]})
    assert isinstance(m, MAM) and m.targets == ("a",)
    m = method("top", max_length=I_PF + 2)
    p = m.init(jax.random.key(2), vlm[1])
    with pytest.raises(ConfigError, match="max_length"):
        jax.eval_shape(lambda: run(vlm, m, p, jnp.array([[1, 5, 6, 7]] * 2), jnp.ones((2, 4), jnp.int32)))
