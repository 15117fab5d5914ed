"""PSN sparse-training masks (vlpeft_jax.mtl.psn): spec ../shared/specs/sparse_mtl.md §1.2-1.5 and §7 items 1-4.

Expected masks come from hand-worked kernels and a numpy reference (stable argsort per neuron, written here);
Table 17's percentages are the thesis' published numbers (App. D.4), counted on shape-only trees of the
published architectures built below (no weights).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpeft_jax.errors import ConfigError, InputError
from vlpeft_jax.mtl import psn


def S(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def ref_top_k_rows(w_rows: np.ndarray, k: int, lowest: bool = False) -> np.ndarray:
    """numpy reference: per row (a PyTorch neuron, weight [out, in]), the k largest (smallest) |w|, lower index
    first on ties."""
    key = np.abs(w_rows) if lowest else -np.abs(w_rows)
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    out = np.zeros(w_rows.shape, bool)
    np.put_along_axis(out, order, True, axis=1)
    return out


# ------------------------------------------------------------------------------------------ §7 item 1


W53 = np.array([[0.5, -2.0, 0.1],
                [-1.5, 0.3, 0.2],
                [0.9, 1.0, -0.4],
                [0.0, -0.1, 3.0],
                [2.5, 0.7, -0.3]], np.float32)


def test_dense_known_kernel_selects_k_largest_per_column():
    mask = psn.psn_mask({"fc": {"kernel": jnp.asarray(W53)}}, 2)["fc"]["kernel"]
    # by hand: column 0 |w| = .5 1.5 .9 0 2.5 -> rows 4, 1; column 1: 2 .3 1 .1 .7 -> rows 0, 2;
    # column 2: .1 .2 .4 3 .3 -> rows 3, 2
    expected = np.array([[0, 1, 0], [1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 0, 0]], bool)
    np.testing.assert_array_equal(np.asarray(mask), expected)
    assert mask.dtype == jnp.bool_


@pytest.mark.parametrize("k", [1, 3, 4, 5, 7, 300])
def test_count_is_min_k_fan_in_times_fan_out(k):
    p = {"fc": {"kernel": jnp.asarray(W53)}}
    mask = psn.psn_mask(p, k)["fc"]["kernel"]
    assert int(mask.sum()) == min(k, 5) * 3 == psn.count_trainable(p, k)
    np.testing.assert_array_equal(np.asarray(mask.sum(0)), [min(k, 5)] * 3)  # every neuron gets min(k, fan_in)
    if k >= 5:
        assert bool(mask.all())
    np.testing.assert_array_equal(np.asarray(mask), ref_top_k_rows(W53.T, k).T)


def test_conv_kernel_reads_as_kh_kw_in_by_out():
    w = np.random.default_rng(0).normal(size=(3, 3, 4, 2)).astype(np.float32)
    for k in (1, 5, 36, 40):
        mask = np.asarray(psn.psn_mask({"conv": {"kernel": jnp.asarray(w)}}, k)["conv"]["kernel"])
        assert mask.shape == (3, 3, 4, 2)
        expected = ref_top_k_rows(w.reshape(36, 2).T, k).T.reshape(3, 3, 4, 2)
        np.testing.assert_array_equal(mask, expected)
        assert mask.sum() == min(k, 36) * 2


def test_dense_general_fan_in_axes():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(4, 2, 3)).astype(np.float32)  # [in, heads, head_dim]: fan-in axis 0, 6 neurons
    o = rng.normal(size=(2, 3, 4)).astype(np.float32)  # out-proj [heads, head_dim, out]: fan-in axes (0, 1)
    p = {"attn": {"query": {"kernel": jnp.asarray(q)}, "out": {"kernel": jnp.asarray(o)}}}
    axes = [(r"query/kernel$", (0,))]
    mask = psn.psn_mask(p, 2, fan_in_axes=axes)["attn"]
    np.testing.assert_array_equal(np.asarray(mask["query"]["kernel"]),
                                  ref_top_k_rows(q.reshape(4, 6).T, 2).T.reshape(4, 2, 3))
    np.testing.assert_array_equal(np.asarray(mask["out"]["kernel"]),
                                  ref_top_k_rows(o.reshape(6, 4).T, 2).T.reshape(2, 3, 4))
    assert psn.count_trainable(p, 2, fan_in_axes=axes) == 2 * 6 + 2 * 4
    # without the override the q kernel would be read as [in*heads, head_dim]
    assert psn.count_trainable(p, 2) == 2 * 3 + 2 * 4
    with pytest.raises(ConfigError, match="fan_in_axes"):
        psn.count_trainable(p, 2, fan_in_axes=[(r"query/kernel$", (0, 1, 2))])


# ------------------------------------------------------------------------------------------ §7 item 2


def test_layout_invariance_against_pytorch_layouts():
    rng = np.random.default_rng(2)
    w_torch = rng.normal(size=(7, 5)).astype(np.float32)  # Linear weight [out, in]
    for k in (1, 2, 4):
        flax = np.asarray(psn.psn_mask({"fc": {"kernel": jnp.asarray(w_torch.T)}}, k)["fc"]["kernel"])
        np.testing.assert_array_equal(flax.T, ref_top_k_rows(w_torch, k))
    c_torch = rng.normal(size=(6, 4, 3, 3)).astype(np.float32)  # Conv2d weight [out, in, kh, kw]
    ref = ref_top_k_rows(c_torch.reshape(6, 36), 10).reshape(6, 4, 3, 3)
    flax = np.asarray(psn.psn_mask({"c": {"kernel": jnp.asarray(c_torch.transpose(2, 3, 1, 0))}}, 10)["c"]["kernel"])
    np.testing.assert_array_equal(flax.transpose(3, 2, 0, 1), ref)


def test_ties_lower_index_wins():
    w = jnp.array([[1.0, 0.5], [1.0, 0.5], [1.0, 0.5], [-1.0, 0.5]])
    top = np.asarray(psn.psn_mask({"fc": {"kernel": w}}, 2)["fc"]["kernel"])
    np.testing.assert_array_equal(top, [[1, 1], [1, 1], [0, 0], [0, 0]])
    rev = np.asarray(psn.psn_mask({"fc": {"kernel": w}}, 1, variant="reverse")["fc"]["kernel"])
    np.testing.assert_array_equal(rev, [[1, 1], [0, 0], [0, 0], [0, 0]])
    glob = np.asarray(psn.psn_mask({"fc": {"kernel": w}}, 1, variant="global")["fc"]["kernel"])
    np.testing.assert_array_equal(glob, [[1, 0], [1, 0], [0, 0], [0, 0]])  # row-major positions 0 and 2


# ------------------------------------------------------------------------------------------ §7 item 3


def _two_kernel_tree(seed=3):
    rng = np.random.default_rng(seed)
    return {
        "enc": {"a": {"kernel": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32), "bias": jnp.zeros(4)},
                "b": {"kernel": jnp.asarray(3.0 * rng.normal(size=(2, 2, 3, 5)), jnp.float32)},
                "norm": {"scale": jnp.ones(5), "bias": jnp.zeros(5)}},
        "heads": {"t0": {"kernel": jnp.asarray(rng.normal(size=(5, 2)), jnp.float32), "bias": jnp.zeros(2)}},
    }


def _check_fixed_leaves(mask):
    assert bool(mask["enc"]["a"]["bias"].all()) and bool(mask["heads"]["t0"]["kernel"].all())
    assert bool(mask["heads"]["t0"]["bias"].all())
    assert not bool(mask["enc"]["norm"]["scale"].any()) and not bool(mask["enc"]["norm"]["bias"].any())


def test_reverse_selects_smallest_per_neuron():
    p = _two_kernel_tree()
    mask = psn.psn_mask(p, 3, variant="reverse")
    _check_fixed_leaves(mask)
    a = np.asarray(p["enc"]["a"]["kernel"])
    np.testing.assert_array_equal(np.asarray(mask["enc"]["a"]["kernel"]), ref_top_k_rows(a.T, 3, lowest=True).T)
    b = np.asarray(p["enc"]["b"]["kernel"]).reshape(12, 5)
    np.testing.assert_array_equal(np.asarray(mask["enc"]["b"]["kernel"]).reshape(12, 5),
                                  ref_top_k_rows(b.T, 3, lowest=True).T)
    assert psn.mask_counts(mask) == psn.mask_counts(psn.psn_mask(p, 3))  # same counts as PSN, leaf by leaf


def test_global_selects_overall_top_n_with_psn_count():
    p = _two_kernel_tree()
    k = 2
    n = 2 * 4 + 2 * 5  # Σ min(k, fan_in)·fan_out over the two kernels
    mask = psn.psn_mask(p, k, variant="global")
    _check_fixed_leaves(mask)
    flat = np.concatenate([np.abs(np.asarray(p["enc"]["a"]["kernel"])).ravel(),
                           np.abs(np.asarray(p["enc"]["b"]["kernel"])).ravel()])
    ref = np.zeros(flat.shape, bool)
    ref[np.argsort(-flat, kind="stable")[:n]] = True
    got = np.concatenate([np.asarray(mask["enc"][m]["kernel"]).ravel() for m in ("a", "b")])
    np.testing.assert_array_equal(got, ref)
    # the x3-scaled kernel takes most of the global budget, unlike per-neuron PSN
    assert int(mask["enc"]["b"]["kernel"].sum()) > 2 * 5
    assert psn.count_trainable(p, k) == sum(psn.mask_counts(mask).values())


def test_random_same_count_deterministic_and_uniform():
    p = _two_kernel_tree()
    k = 2
    m1 = psn.psn_mask(p, k, variant="random", key=jax.random.key(7))
    m2 = psn.psn_mask(p, k, variant="random", key=jax.random.key(7))
    m3 = psn.psn_mask(p, k, variant="random", key=jax.random.key(8))
    _check_fixed_leaves(m1)
    for leaf1, leaf2 in zip(jax.tree.leaves(m1), jax.tree.leaves(m2), strict=True):
        np.testing.assert_array_equal(np.asarray(leaf1), np.asarray(leaf2))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(m1), jax.tree.leaves(m3), strict=True))
    assert sum(psn.mask_counts(m1).values()) == psn.count_trainable(p, k)
    # uniform over all 24 + 60 maskable weights: kernel a expects 18·24/84 picks
    picks_a = [int(psn.psn_mask(p, k, variant="random", key=jax.random.key(s))["enc"]["a"]["kernel"].sum())
               for s in range(60)]
    assert abs(np.mean(picks_a) - 18 * 24 / 84) < 0.6


# ------------------------------------------------------------------------------------------ rules


def test_rules_on_a_real_vit_with_heads():
    from vlpeft_jax.models.vit import ViTConfig, ViTModel

    cfg = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                    image_size=(8, 8), patch_size=(4, 4))
    shapes = jax.eval_shape(lambda: ViTModel(cfg).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"])
    rng = np.random.default_rng(4)
    vit = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)  # values don't matter
    params = {"vision_tower": vit, "heads": {"count": {"kernel": jnp.ones((16, 3)), "bias": jnp.zeros(3)}}}
    mask = psn.psn_mask(params, 4)
    assert jax.tree.structure(mask) == jax.tree.structure(params)  # Flax Partitioned boxes kept
    plans = {x.path: x.action for x in psn.leaf_plans(params)}
    assert plans["vision_tower/embeddings/cls_token"] == "freeze"
    assert plans["vision_tower/embeddings/position_embeddings"] == "freeze"
    assert plans["vision_tower/encoder/layer_0/layernorm_before/bias"] == "freeze"
    assert plans["vision_tower/layernorm/scale"] == "freeze"
    assert plans["vision_tower/encoder/layer_0/attention/attention/query/bias"] == "train"
    assert plans["vision_tower/encoder/layer_0/attention/attention/query/kernel"] == "psn"
    assert plans["vision_tower/embeddings/patch_embeddings/projection/kernel"] == "psn"
    assert plans["heads/count/kernel"] == "train"
    q = mask["vision_tower"]["encoder"]["layer_0"]["attention"]["attention"]["query"]["kernel"]
    q = getattr(q, "value", q)
    np.testing.assert_array_equal(np.asarray(q.sum(0)), [4] * 16)
    frac = psn.trainable_fraction(params, mask)
    assert frac == pytest.approx(psn.count_trainable(params, 4) / psn.count_params(params), abs=0)


def test_cnn_rules_train_batchnorm_and_shared_predicate():
    p = {"enc": {"conv": {"kernel": S(3, 3, 8, 4), "bias": S(4)}, "bn": {"scale": S(4), "bias": S(4)}},
         "pred_task1": {"kernel": S(1, 1, 4, 13), "bias": S(13)}}
    gps = {x.path: x.action for x in psn.leaf_plans(p)}
    cnn = {x.path: x.action for x in psn.leaf_plans(p, rules=psn.GPS_CNN_RULES, shared=psn.MTAN_SHARED)}
    assert gps["enc/bn/scale"] == "freeze" and cnn["enc/bn/scale"] == "train"
    assert gps["pred_task1/kernel"] == "psn" and cnn["pred_task1/kernel"] == "train"
    assert psn.count_trainable(p, 2, rules=psn.GPS_CNN_RULES, shared=lambda path: "pred" not in path) == \
        2 * 4 + 4 + 8 + 4 * 13 + 13
    custom = [(r"conv/kernel$", "freeze"), (r"", "train")]
    assert psn.count_trainable(p, 2, rules=custom) == psn.count_params(p) - 3 * 3 * 8 * 4


def test_jit_gives_the_same_mask():
    p = _two_kernel_tree()
    eager = psn.psn_mask(p, 2)
    jitted = jax.jit(lambda q: psn.psn_mask(q, 2))(p)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_errors():
    p = _two_kernel_tree()
    for bad_k in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="k="):
            psn.psn_mask(p, bad_k)
    with pytest.raises(ConfigError, match="variant='bogus'"):
        psn.psn_mask(p, 1, variant="bogus")
    with pytest.raises(ConfigError, match="key"):
        psn.psn_mask(p, 1, variant="random")
    with pytest.raises(ConfigError, match="'sparse'"):
        psn.psn_mask(p, 1, rules=[(r"kernel$", "sparse")])
    with pytest.raises(ConfigError, match="regex"):
        psn.count_trainable(p, 1, rules=[(r"(", "psn")])
    with pytest.raises(InputError, match="ShapeDtypeStruct"):
        psn.psn_mask({"fc": {"kernel": S(4, 4)}}, 1)
    # global selection can starve a small-magnitude kernel: named in the error
    starved = {"big": {"kernel": 100.0 * jnp.ones((4, 4))}, "small": {"kernel": 0.01 * jnp.ones((4, 4))}}
    assert not bool(psn.psn_mask(starved, 1, variant="global")["small"]["kernel"].any())
    with pytest.raises(ConfigError, match="small/kernel"):
        psn.psn_mask(starved, 1, variant="global", require_every_layer=True)
    psn.psn_mask(starved, 1, require_every_layer=True)  # per-neuron PSN always keeps every kernel
    with pytest.raises(InputError, match="do not match"):
        psn.trainable_fraction(p, {"enc": True})


# ------------------------------------------------------------------------------------------ §7 item 4: Table 17


def dense(i, o, bias=True):
    return {"kernel": S(i, o), "bias": S(o)} if bias else {"kernel": S(i, o)}


def norm(c):
    return {"scale": S(c), "bias": S(c)}


def vit_b16(head_classes):
    """ViT-B/16 at 224px: patch conv 16x16x3 -> 768, cls token, 197 position embeddings, 12 blocks."""
    d, mlp = 768, 3072
    layers = {f"layer_{i}": {
        "layernorm_before": norm(d),
        "attention": {"attention": {"query": dense(d, d), "key": dense(d, d), "value": dense(d, d)},
                      "output": {"dense": dense(d, d)}},
        "layernorm_after": norm(d),
        "intermediate": {"dense": dense(d, mlp)},
        "output": {"dense": dense(mlp, d)},
    } for i in range(12)}
    tower = {"embeddings": {"cls_token": S(1, 1, d), "position_embeddings": S(1, 197, d),
                            "patch_embeddings": {"projection": {"kernel": S(16, 16, 3, d), "bias": S(d)}}},
             "encoder": layers, "layernorm": norm(d)}
    return {"vision_tower": tower, "heads": {f"task_{t}": dense(d, n) for t, n in enumerate(head_classes)}}


def swin(c=128, depths=(2, 2, 18, 2), heads=(4, 8, 16, 32), window=7, n_tasks=10):
    """Swin (patch 4, window 7): relative-position tables per block, patch merging 4C -> 2C without bias."""
    tree = {"patch_embed": {"proj": {"kernel": S(4, 4, 3, c), "bias": S(c)}, "norm": norm(c)}}
    for s, (depth, h) in enumerate(zip(depths, heads, strict=True)):
        dim = c * 2 ** s
        stage = {f"blocks_{b}": {
            "norm1": norm(dim),
            "attn": {"relative_position_bias_table": S((2 * window - 1) ** 2, h),
                     "qkv": dense(dim, 3 * dim), "proj": dense(dim, dim)},
            "norm2": norm(dim),
            "mlp": {"fc1": dense(dim, 4 * dim), "fc2": dense(4 * dim, dim)},
        } for b in range(depth)}
        if s < len(depths) - 1:
            stage["downsample"] = {"norm": norm(4 * dim), "reduction": dense(4 * dim, 2 * dim, bias=False)}
        tree[f"layers_{s}"] = stage
    final = c * 2 ** (len(depths) - 1)
    tree["norm"] = norm(final)
    return {"backbone": tree, "heads": {f"attr_{t}": dense(final, 1) for t in range(n_tasks)}}


def conv(i, o, k=3):
    return {"kernel": S(k, k, i, o), "bias": S(o)}


def conv_layer(i, o):
    """SegNet conv_layer: 3x3 conv (bias) + BatchNorm."""
    return {"conv": conv(i, o), "bn": norm(o)}


def att_layer(i, m, o):
    """MTAN attention: 1x1 conv + BN + 1x1 conv + BN."""
    return {"conv_0": conv(i, m, 1), "bn_0": norm(m), "conv_1": conv(m, o, 1), "bn_1": norm(o)}


def segnet_mtan(out_channels=(13, 1, 3)):
    """nash-mtl's SegNetMtan (spec App. "Table 17 check"): filters 64-128-256-512-512, a task attention network
    per task, and a pred_task head (3x3 conv 64 -> 64, 1x1 conv 64 -> out) per task."""
    f = [64, 128, 256, 512, 512]
    enc, dec = {"b0": conv_layer(3, f[0])}, {"b0": conv_layer(f[0], f[0])}
    cenc, cdec = {"b0": conv_layer(f[0], f[0])}, {"b0": conv_layer(f[0], f[0])}
    for i in range(4):
        enc[f"b{i + 1}"] = conv_layer(f[i], f[i + 1])
        dec[f"b{i + 1}"] = conv_layer(f[i + 1], f[i])
        if i == 0:
            cenc["b1"], cdec["b1"] = conv_layer(f[1], f[1]), conv_layer(f[0], f[0])
        else:
            cenc[f"b{i + 1}"] = {"0": conv_layer(f[i + 1], f[i + 1]), "1": conv_layer(f[i + 1], f[i + 1])}
            cdec[f"b{i + 1}"] = {"0": conv_layer(f[i], f[i]), "1": conv_layer(f[i], f[i])}
    enc_att, dec_att = {}, {}
    for t in range(len(out_channels)):
        enc_att[f"task_{t}"] = {"a0": att_layer(f[0], f[0], f[0])}
        dec_att[f"task_{t}"] = {"a0": att_layer(2 * f[0], f[0], f[0])}
        for i in range(4):
            enc_att[f"task_{t}"][f"a{i + 1}"] = att_layer(2 * f[i + 1], f[i + 1], f[i + 1])
            dec_att[f"task_{t}"][f"a{i + 1}"] = att_layer(f[i + 1] + f[i], f[i], f[i])
    enc_b, dec_b = {"b0": conv_layer(f[0], f[1])}, {"b0": conv_layer(f[0], f[0])}
    for i in range(4):
        if i < 3:
            enc_b[f"b{i + 1}"], dec_b[f"b{i + 1}"] = conv_layer(f[i + 1], f[i + 2]), conv_layer(f[i + 1], f[i])
        else:
            enc_b[f"b{i + 1}"], dec_b[f"b{i + 1}"] = conv_layer(f[i + 1], f[i + 1]), conv_layer(f[i + 1], f[i + 1])
    preds = {f"pred_task{t + 1}": {"0": conv(f[0], f[0]), "1": conv(f[0], o, 1)} for t, o in enumerate(out_channels)}
    return {"segnet": {"encoder_block": enc, "decoder_block": dec, "conv_block_enc": cenc, "conv_block_dec": cdec,
                       "encoder_att": enc_att, "decoder_att": dec_att, "encoder_block_att": enc_b,
                       "decoder_block_att": dec_b, **preds}}


def percent(tree, k, **kw):
    return 100.0 * psn.count_trainable(tree, k, **kw) / psn.count_params(tree)


MTAN = {"rules": psn.GPS_CNN_RULES, "shared": psn.MTAN_SHARED}


@pytest.mark.parametrize("tree, k, kw, published", [
    (lambda: vit_b16((8, 6)), 300, {}, 29.38),          # ViT Clevr, all methods
    (lambda: vit_b16((18, 9)), 200, {}, 19.63),         # ViT SmallNORB, PCGrad
    (swin, 300, {}, 37.60),                             # Swin-B CelebA
    (swin, 400, {}, 49.58),                             # GradDrop
    (swin, 800, {}, 72.85),                             # CAGrad
    (segnet_mtan, 2000, MTAN, 62.19),                   # MTAN NYUv2
    (lambda: segnet_mtan((7, 1)), 3000, MTAN, 76.02),   # MTAN CityScapes
    (lambda: segnet_mtan((7, 1)), 3500, MTAN, 83.48),   # MTAN CityScapes NashMTL
])
def test_table17_trainable_percentages(tree, k, kw, published):
    assert percent(tree(), k, **kw) == pytest.approx(published, abs=0.01)


def test_table17_model_sizes_and_k_for_fraction():
    assert psn.count_params(vit_b16(())) == 85_798_656  # ViT-B/16 without heads (timm: 85.80M)
    assert psn.count_params(swin(n_tasks=0)) == 86_743_224  # Swin-B without head (timm: 86.74M + 1.03M head)
    assert round(psn.count_params(segnet_mtan()) / 1e6, 1) == 44.2  # spec: SegNetMtan 44.2M
    vit, sw, mtan = vit_b16((8, 6)), swin(), segnet_mtan()
    assert psn.k_for_fraction(vit, 0.2938) == 300
    assert psn.k_for_fraction(vit, 0.2938, how="reach") == 301  # 29.377% < 29.38%
    assert [psn.k_for_fraction(sw, f) for f in (0.3760, 0.4958, 0.7285)] == [300, 400, 800]
    assert psn.k_for_fraction(mtan, 0.6219, **MTAN) == 2000
    k = psn.k_for_fraction(sw, 0.5, how="reach")
    assert percent(sw, k) >= 50.0 > percent(sw, k - 1)
    with pytest.raises(ConfigError, match="reaches only"):
        psn.k_for_fraction(vit, 0.999, how="reach")  # norms and position embeddings stay frozen
    with pytest.raises(ConfigError, match="target"):
        psn.k_for_fraction(vit, 0.0)
