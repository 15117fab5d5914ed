"""CK-Transformer model (spec ckt.md §3-4, §12 tests 1-10): equations by hand, invariances, padding, loss."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlpeft_jax.errors import ConfigError, InputError
from vlpeft_jax.models import hooks
from vlpeft_jax.models.bert import BertEncoder, BertModel
from vlpeft_jax.models.ckt import (
    PAD_SCORE,
    CKTConfig,
    CKTransformer,
    FactRetriever,
    cosine,
    refexp_loss,
    retriever_loss,
)

B, N, P, K, T, TF, F = 2, 4, 3, 2, 5, 4, 6
TOL = dict(rtol=1e-5, atol=1e-5)


def _cfg(**kw) -> CKTConfig:
    base = dict(vocab_size=30, region_feature_size=F, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=32, max_position_embeddings=16, num_blocks=2, block_heads=2,
                block_intermediate_size=32)
    return CKTConfig(**{**base, **kw})


def _batch(seed: int = 0, b: int = B, n: int = N, p: int = P, k: int = K) -> dict[str, jnp.ndarray]:
    rng = np.random.default_rng(seed)
    expr_mask = np.ones((b, T), np.int32)
    expr_mask[0, -2:] = 0
    fact_mask = np.ones((b, p, TF), np.int32)
    fact_mask[:, 0, -1] = 0
    ids = lambda *s: rng.integers(4, 30, s).astype(np.int32)
    expr_ids, fact_ids = ids(b, T), ids(b, p, TF)
    expr_ids[:, 0], fact_ids[:, :, 0] = 1, 1  # [CLS]
    return dict(regions=jnp.asarray(rng.normal(size=(b, n, F)), jnp.float32),
                geometry=jnp.asarray(rng.uniform(size=(b, n, 7)), jnp.float32),
                region_mask=jnp.ones((b, n), jnp.int32), expr_ids=jnp.asarray(expr_ids),
                expr_mask=jnp.asarray(expr_mask), fact_ids=jnp.asarray(fact_ids), fact_mask=jnp.asarray(fact_mask),
                fact_index=jnp.asarray(rng.integers(0, p, (b, n, k)), jnp.int32))


def _random_params(model: CKTransformer, batch: dict[str, jnp.ndarray], seed: int = 0) -> dict:
    """Random parameters of the model's shapes, drawn in numpy (no init compile); LayerNorm scales and biases are
    non-trivial so that the hand computations check them."""
    shapes = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), **batch))["params"])
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        return jnp.asarray(1.0 + 0.1 * noise if name == "scale" else (0.1 if name == "bias" else 0.2) * noise)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def setup():
    cfg = _cfg()
    model = CKTransformer(cfg)
    batch = _batch()

    params = _random_params(model, batch)
    # one compile per batch shape: scores and features together
    forward = jax.jit(lambda prm, bt: model.apply({"params": prm}, **bt, method="forward"))
    scores = lambda prm, bt: forward(prm, bt).scores
    feats = lambda prm, bt: (lambda o: (o.f_e, o.f_f, o.fact_valid))(forward(prm, bt))
    bimodal = jax.jit(lambda prm, *a: model.apply({"params": prm}, *a, method=lambda m, *x: m.bimodal(*x)))
    return cfg, model, params, batch, scores, feats, bimodal


def _ln(x, scale, bias, eps=1e-12):
    x = np.asarray(x, np.float64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * np.asarray(scale) + np.asarray(bias)


def test_shapes(setup):
    cfg, model, params, batch, scores, feats, bimodal = setup
    out = bimodal(params, batch["regions"], batch["geometry"], batch["region_mask"], batch["expr_ids"],
                  batch["expr_mask"])
    assert out.last_hidden_state.shape == (B, N + T, 16)
    assert out.vision.shape == (B, N, 16) and out.language.shape == (B, T, 16) and out.cls.shape == (B, 16)
    f_e, f_f, valid = feats(params, batch)
    assert f_e.shape == (B, N, 16) and f_f.shape == (B, N, K, 16) and valid.shape == (B, N, K)
    s = scores(params, batch)
    assert s.shape == (B, N) and np.isfinite(np.asarray(s)).all()


def test_embedding_equations_by_hand(setup):
    """App. Eq. (1)-(3): E_I = LN(fc(V) + fc(G) + M_I), E_T = LN(T + P + M_T), [E_I; E_T] into the layers."""
    cfg, model, params, batch, scores, feats, bimodal = setup
    pb = jax.tree_util.tree_map(np.asarray, params["bimodal"])
    ie, te = pb["img_embeddings"], pb["embeddings"]
    v, g = np.asarray(batch["regions"], np.float64), np.asarray(batch["geometry"], np.float64)
    types = te["token_type_embeddings"]["embedding"]
    fc_v = v @ ie["img_linear"]["kernel"] + ie["img_linear"]["bias"]
    fc_g = g @ ie["pos_linear"]["kernel"] + ie["pos_linear"]["bias"]
    e_i = _ln(fc_v + fc_g + types[1], ie["LayerNorm"]["scale"], ie["LayerNorm"]["bias"])
    ids = np.asarray(batch["expr_ids"])
    e_t = _ln(te["word_embeddings"]["embedding"][ids] + te["position_embeddings"]["embedding"][np.arange(T)]
              + types[0], te["LayerNorm"]["scale"], te["LayerNorm"]["bias"])
    out = bimodal(params, batch["regions"], batch["geometry"], batch["region_mask"], batch["expr_ids"],
                  batch["expr_mask"])
    np.testing.assert_allclose(out.image_embeddings, e_i, **TOL)
    np.testing.assert_allclose(out.text_embeddings, e_t, **TOL)
    # Eq. (3): image then text, with the key padding mask of regions and tokens
    mask = np.concatenate([np.ones((B, N)), np.asarray(batch["expr_mask"])], axis=1)
    bias = np.where(mask > 0, 0.0, -1e30)[:, None, None, :].astype(np.float32)
    last, _ = BertEncoder(cfg.bert_config()).apply({"params": params["bimodal"]["encoder"]},
                                                   jnp.asarray(np.concatenate([e_i, e_t], 1), jnp.float32),
                                                   jnp.asarray(bias))
    np.testing.assert_allclose(out.last_hidden_state, last, **TOL)
    np.testing.assert_allclose(out.cls, last[:, N], **TOL)
    np.testing.assert_allclose(out.vision, last[:, :N], **TOL)


def test_candidate_permutation_equivariance(setup):
    """Spec B16 / §12.3: permuting the candidates permutes the scores (no position embedding on regions)."""
    cfg, model, params, batch, scores, feats, bimodal = setup
    perm = np.array([2, 0, 3, 1])
    permuted = dict(batch, regions=batch["regions"][:, perm], geometry=batch["geometry"][:, perm],
                    region_mask=batch["region_mask"][:, perm], fact_index=batch["fact_index"][:, perm])
    s, s_perm = np.asarray(scores(params, batch)), np.asarray(scores(params, permuted))
    np.testing.assert_allclose(s_perm, s[:, perm], **TOL)
    assert np.abs(s - s[:, ::-1]).max() > 1e-4  # the candidates differ, so the check can fail


def test_fact_order_invariance(setup):
    """§12.4: permuting a candidate's K facts, or the order of the P unique facts, changes nothing."""
    cfg, model, params, batch, scores, feats, bimodal = setup
    s = np.asarray(scores(params, batch))
    swapped = dict(batch, fact_index=batch["fact_index"][:, :, ::-1])
    np.testing.assert_allclose(scores(params, swapped), s, **TOL)
    order = np.array([2, 0, 1])  # new fact q is old fact order[q]
    inverse = np.argsort(order)
    reordered = dict(batch, fact_ids=batch["fact_ids"][:, order], fact_mask=batch["fact_mask"][:, order],
                     fact_index=jnp.asarray(inverse[np.asarray(batch["fact_index"])], jnp.int32))
    np.testing.assert_allclose(scores(params, reordered), s, **TOL)
    # and the facts matter: pointing every candidate at another fact changes the scores
    other = dict(batch, fact_index=(batch["fact_index"] + 1) % P)
    assert np.abs(np.asarray(scores(params, other)) - s).max() > 1e-4


def test_duplicate_facts(setup):
    """§12.5: K copies of one fact == that fact alone (here: with the other slot padded, a no-op by the test below)."""
    cfg, model, params, batch, scores, feats, bimodal = setup
    first = batch["fact_index"][:, :, :1]
    dup = dict(batch, fact_index=jnp.concatenate([first, first], axis=2))
    alone = dict(batch, fact_index=jnp.concatenate([first, -jnp.ones_like(first)], axis=2))
    np.testing.assert_allclose(scores(params, dup), scores(params, alone), **TOL)
    assert np.abs(np.asarray(scores(params, alone)) - np.asarray(scores(params, batch))).max() > 1e-4


def test_padding_is_a_no_op(setup):
    """§12.6 and padded candidates: one batch with an extra padded candidate (random features), an extra
    padded fact slot (fact_index -1), an extra unused unique fact and other ids under the fact padding mask
    scores the real candidates exactly as the plain batch."""
    cfg, model, params, batch, scores, feats, bimodal = setup
    rng = np.random.default_rng(3)
    pad = lambda x, extra, axis=1: jnp.concatenate([x, jnp.asarray(extra, x.dtype)], axis=axis)
    fact_index = pad(batch["fact_index"], -np.ones((B, N, 1)), axis=2)
    fact_index = pad(fact_index, rng.integers(0, P, (B, 1, K + 1)))
    padded = dict(regions=pad(batch["regions"], rng.normal(size=(B, 1, F)) * 5),
                  geometry=pad(batch["geometry"], rng.uniform(size=(B, 1, 7))),
                  region_mask=pad(batch["region_mask"], np.zeros((B, 1))),
                  expr_ids=batch["expr_ids"].at[0, -1].set(9), expr_mask=batch["expr_mask"],
                  fact_ids=pad(batch["fact_ids"].at[:, 0, -1].set(7), rng.integers(4, 30, (B, 1, TF))),
                  fact_mask=pad(batch["fact_mask"], np.ones((B, 1, TF))), fact_index=fact_index)
    s_pad = np.asarray(scores(params, padded))
    np.testing.assert_allclose(s_pad[:, :N], scores(params, batch), **TOL)
    assert (s_pad[:, N] == PAD_SCORE).all()


def _gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _block_by_hand(prm, x, facts, valid, heads):
    """Spec §4.2 / B6: y = LN(x + MHA(Q = x, K = V = facts)), out = LN(y + FFN(y)), for one query vector."""
    att, d = prm["attention"], x.shape[-1]
    dh = d // heads
    lin = lambda m, z: z @ np.asarray(m["kernel"], np.float64) + np.asarray(m["bias"], np.float64)
    q, k, v = lin(att["self"]["query"], x), lin(att["self"]["key"], facts), lin(att["self"]["value"], facts)
    ctx = []
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        logits = k[:, sl] @ q[sl] / math.sqrt(dh)
        logits = np.where(valid, logits, -np.inf)
        w = np.exp(logits - logits.max())
        ctx.append((w / w.sum()) @ v[:, sl])
    o = att["output"]
    y = _ln(x + lin(o["dense"], np.concatenate(ctx)), o["LayerNorm"]["scale"], o["LayerNorm"]["bias"])
    ffn = lin(prm["output"]["dense"], _gelu(lin(prm["intermediate"]["dense"], y)))
    return _ln(y + ffn, prm["output"]["LayerNorm"]["scale"], prm["output"]["LayerNorm"]["bias"])


def test_fact_aware_blocks_and_score_by_hand(setup):
    """The M = 2 blocks and the linear score (spec §4.2) by hand in numpy, with one padded fact slot."""
    cfg, model, params, batch, scores, feats, bimodal = setup
    fi = np.asarray(batch["fact_index"]).copy()
    fi[1, 2, 1] = -1
    bt = dict(batch, fact_index=jnp.asarray(fi))
    f_e, f_f, valid = (np.asarray(x, np.float64) for x in feats(params, bt))
    s = np.asarray(scores(params, bt))
    w, bias = np.asarray(params["score"]["kernel"], np.float64)[:, 0], float(params["score"]["bias"][0])
    for b, i in [(0, 0), (1, 2), (1, 3)]:
        x = f_e[b, i]
        for m in range(cfg.num_blocks):
            x = _block_by_hand(params[f"fact_block_{m}"], x, f_f[b, i], valid[b, i] > 0, cfg.block_heads)
        np.testing.assert_allclose(s[b, i], x @ w + bias, rtol=1e-4, atol=1e-4)


def test_candidate_without_facts_keeps_expression_feature(setup):
    """Our definition: a candidate whose fact_index row is all -1 skips the blocks, so s_i = w^T f_i^e + b."""
    cfg, model, params, batch, scores, feats, bimodal = setup
    fi = np.asarray(batch["fact_index"]).copy()
    fi[0, 1] = -1
    nofact = dict(batch, fact_index=jnp.asarray(fi))
    f_e = np.asarray(feats(params, batch)[0])
    w, bias = np.asarray(params["score"]["kernel"])[:, 0], np.asarray(params["score"]["bias"])[0]
    s = np.asarray(scores(params, nofact))
    np.testing.assert_allclose(s[0, 1], f_e[0, 1] @ w + bias, **TOL)
    # the other candidates are scored as before, and with facts the score differs
    s_ref = np.asarray(scores(params, batch))
    keep = np.ones((B, N), bool)
    keep[0, 1] = False
    np.testing.assert_allclose(s[keep], s_ref[keep], **TOL)
    assert abs(s_ref[0, 1] - s[0, 1]) > 1e-4


def test_dedup_gather_equals_naive_passes(setup):
    """§11.8 / §12.7: one pass per unique (image, fact) + gather == one pass per (candidate, fact)."""
    cfg, model, params, batch, scores, feats, bimodal = setup
    f_e, f_f, valid = (np.asarray(x) for x in feats(params, batch))
    fi = np.asarray(batch["fact_index"])
    bs, cs, ks = np.meshgrid(np.arange(B), np.arange(N), np.arange(K), indexing="ij")
    bs, cs, ks = bs.ravel(), cs.ravel(), ks.ravel()
    facts = fi[bs, cs, ks]
    out = bimodal(params, batch["regions"][bs], batch["geometry"][bs], batch["region_mask"][bs],
                  batch["fact_ids"][bs, facts], batch["fact_mask"][bs, facts])
    naive = np.asarray(out.vision)[np.arange(len(bs)), cs].reshape(B, N, K, -1)
    np.testing.assert_allclose(f_f, naive, **TOL)
    assert valid.all()
    expr = bimodal(params, batch["regions"], batch["geometry"], batch["region_mask"], batch["expr_ids"],
                   batch["expr_mask"])
    np.testing.assert_allclose(f_e, expr.vision, **TOL)


def test_loss_by_hand():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(3, 5)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    target = np.array([4, 2, 0])
    s[1, 3] = 50.0  # a padded candidate with a huge score must get no mass
    loss, metrics = refexp_loss(jnp.asarray(s), jnp.asarray(target), jnp.asarray(mask))
    per = []
    correct = []
    for i in range(3):
        real = s[i, mask[i] > 0].astype(np.float64)
        per.append(np.log(np.exp(real).sum()) - s[i, target[i]])
        correct.append(np.argmax(real) == target[i])
    assert float(loss) == pytest.approx(np.mean(per), rel=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx(np.mean(correct))
    # example_mask drops rows
    loss2, m2 = refexp_loss(jnp.asarray(s), jnp.asarray(target), jnp.asarray(mask), jnp.array([1, 0, 1]))
    assert float(loss2) == pytest.approx((per[0] + per[2]) / 2, rel=1e-5)
    with pytest.raises(InputError, match="target"):
        refexp_loss(jnp.asarray(s), jnp.asarray(target[:2]), jnp.asarray(mask))


def test_retriever_cosine_and_loss(setup):
    cfg, model, params, batch, scores, feats, bimodal = setup
    retriever = FactRetriever(cfg)
    args = (batch["regions"], batch["geometry"], batch["region_mask"], batch["expr_ids"], batch["expr_mask"],
            batch["fact_ids"], batch["fact_mask"])
    rparams = {"bimodal": params["bimodal"]}  # the retriever is a bi-modal encoder of its own (B2)

    # one retriever call over the P facts plus the expression itself as an extra "fact" (padded to length T)
    facts = jnp.concatenate([jnp.pad(batch["fact_ids"], ((0, 0), (0, 0), (0, T - TF))), batch["expr_ids"][:, None]], 1)
    fmask = jnp.concatenate([jnp.pad(batch["fact_mask"], ((0, 0), (0, 0), (0, T - TF))), batch["expr_mask"][:, None]],
                            1)
    all_cos = jax.jit(lambda prm: retriever.apply({"params": prm}, *args[:5], facts, fmask))(rparams)
    cos, same = np.asarray(all_cos[:, :P], np.float64), np.asarray(all_cos[:, P], np.float64)
    assert cos.shape == (B, P) and (np.abs(cos) <= 1.0).all()
    # by hand from the encoder's [CLS] outputs of the two pairs, run separately
    u_e = np.asarray(bimodal(params, *args[:5]).cls, np.float64)
    u_f = np.asarray(bimodal(params, *args[:3], batch["fact_ids"][:, 1], batch["fact_mask"][:, 1]).cls, np.float64)
    by_hand = (u_e * u_f).sum(-1) / np.linalg.norm(u_e, axis=-1) / np.linalg.norm(u_f, axis=-1)
    np.testing.assert_allclose(cos[:, 1], by_hand, **TOL)
    # a fact identical to the expression has cosine 1; a single fact [b, Tf] gives [b]
    np.testing.assert_allclose(same, np.ones(B), atol=1e-5)
    x = jax.random.normal(jax.random.key(3), (64, 8))
    c = cosine(x, x[::-1] * 3.0)
    assert (np.abs(np.asarray(c)) <= 1.0).all()
    assert float(retriever_loss(jnp.array([0.5, -0.5, 1.0]), jnp.array([1, 0, 1]))) == pytest.approx(
        (0.25 + 0.25 + 0.0) / 3)
    assert float(retriever_loss(jnp.array([0.5, -0.5]), jnp.array([1, 0]), jnp.array([1, 0]))) == pytest.approx(0.25)


def test_encoder_params_match_a_bert_checkpoint(setup):
    """The encoder's text embeddings and layers have BertModel's names and shapes (initialisable from BERT)."""
    cfg, model, params, batch, scores, feats, bimodal = setup
    ids = jnp.ones((1, 4), jnp.int32)
    bert = jax.eval_shape(lambda: BertModel(cfg.bert_config()).init(jax.random.key(0), ids)["params"])
    shapes = lambda tree: jax.tree_util.tree_map(lambda x: tuple(x.shape), nn.meta.unbox(tree))
    assert set(bert) == {"embeddings", "encoder"}  # no pooler
    for name in ("embeddings", "encoder"):
        assert shapes(bert[name]) == shapes(params["bimodal"][name])
    assert set(params["bimodal"]) == {"embeddings", "encoder", "img_embeddings"}


def test_hook_points_reach_encoder_and_blocks(setup):
    """PEFT hooks see the encoder layers and the fact-aware blocks (traced only, no compile)."""
    cfg, model, params, batch, scores, feats, bimodal = setup
    seen: dict[str, set[str]] = {"linear": set(), "attention": set(), "mlp": set(), "embed": set()}

    def spy(kind):
        def fn(ctx, nxt, *a):
            seen[kind].add(ctx.name)
            return nxt(*a)
        return hooks.Hook(kind, fn)

    with hooks.use_hooks(*(spy(k) for k in seen)):
        jax.eval_shape(lambda prm: model.apply({"params": prm}, **batch), params)
    assert "bimodal/encoder/layer_0/attention/self" in seen["attention"]
    assert "fact_block_1/attention/self" in seen["attention"]
    assert "fact_block_0/intermediate" in seen["mlp"]
    assert {"bimodal/img_embeddings/img_linear", "score", "fact_block_0/attention/self/key"} <= seen["linear"]
    assert seen["embed"] == {"bimodal/embeddings/word_embeddings"}


def test_prompt_from_embed_hook_moves_cls(setup):
    """An ``embed`` hook that prepends a token: [CLS] is read after it."""
    cfg, model, params, batch, scores, feats, bimodal = setup

    def prepend(ctx, nxt, ids, embeds, mask):
        embeds, mask = nxt(ids, embeds, mask)
        prompt = jnp.full((embeds.shape[0], 1, embeds.shape[2]), 0.3, embeds.dtype)
        mask = None if mask is None else jnp.concatenate([jnp.ones_like(mask[:, :1]), mask], 1)
        return jnp.concatenate([prompt, embeds], 1), mask

    args = (batch["regions"], batch["geometry"], batch["region_mask"], batch["expr_ids"], batch["expr_mask"])
    with hooks.use_hooks(hooks.Hook("embed", prepend)):
        out = jax.jit(lambda prm: model.apply({"params": prm}, *args, method=lambda m, *x: m.bimodal(*x)))(params)
    assert out.language.shape == (B, T + 1, 16)
    np.testing.assert_allclose(out.cls, out.last_hidden_state[:, N + 1], **TOL)


def test_bad_config_and_input(setup):
    cfg, model, params, batch, scores, feats, bimodal = setup
    with pytest.raises(ConfigError, match="block_heads"):
        _cfg(block_heads=3)
    with pytest.raises(ConfigError, match="num_blocks"):
        _cfg(num_blocks=-1)
    with pytest.raises(ConfigError, match="dropout"):
        _cfg(dropout=1.5)
    with pytest.raises(ConfigError, match="region_feature_size"):
        _cfg(region_feature_size=0)
    with pytest.raises(InputError, match="regions"):
        jax.eval_shape(lambda prm: model.apply({"params": prm}, **dict(batch, regions=batch["regions"][..., :3])),
                       params)
    with pytest.raises(InputError, match="fact_index"):
        jax.eval_shape(lambda prm: model.apply({"params": prm}, **dict(batch, fact_index=batch["fact_index"][:, :2])),
                       params)
    with pytest.raises(InputError, match="max_position_embeddings"):
        long = jnp.ones((B, 20), jnp.int32)
        jax.eval_shape(lambda prm: model.apply({"params": prm}, **dict(batch, expr_ids=long, expr_mask=long)),
                       params)


def test_overfits_eight_scenes(setup):
    """§12.11: a tiny CK-T memorises 8 random scenes (100% train accuracy) within 200 Adam steps."""
    cfg, model, params, _, scores, feats, bimodal = setup
    batch = _batch(seed=7, b=8, n=5, p=3, k=2)
    mask = np.ones((8, 5), np.int32)
    mask[:3, 4] = 0  # some scenes have 4 candidates
    batch["region_mask"] = jnp.asarray(mask)
    target = jnp.asarray(np.random.default_rng(1).integers(0, 4, 8), jnp.int32)
    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(prm, st):
        def loss_fn(q):
            return refexp_loss(model.apply({"params": q}, **batch), target, batch["region_mask"])

        (loss, met), grads = jax.value_and_grad(loss_fn, has_aux=True)(prm)
        updates, st = opt.update(grads, st, prm)
        return optax.apply_updates(prm, updates), st, met

    history = []
    for _ in range(200):
        params, state, met = step(params, state)
        history.append(float(met["accuracy"]))
        if history[-1] == 1.0 and len(history) > 5:
            break
    assert history[-1] == 1.0, history[-10:]
    assert history[0] < 1.0
