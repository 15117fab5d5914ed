"""PETAL (vlpeft_jax/peft/petal.py; seed 001 Eq. 2-9, App. E; spec petal.md §10 T1-T12 and the bad inputs):
identity at init on a tiny InstructBLIP-shaped model (OPT LM), the full core with a super-diagonal core equals
Eq. 2's CP form, merging, gradients, per-token modality routing, Γ, the gate, the ablation trees, App. E's
count on the real shapes (abstract, nothing allocated), the IB terms in a training pass, and bad settings.

References are computed here (dense weights built by hand from the factors, numpy), never taken from the code
under test.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.max_diffs import MaxDiffs
from vlpeft_jax.errors import ConfigError, InputError
from vlpeft_jax.models import hooks, layers
from vlpeft_jax.models.bert import BertConfig, QFormer
from vlpeft_jax.models.blip_vision import BlipVisionConfig, BlipVisionModel
from vlpeft_jax.models.opt import OPTConfig, OPTForCausalLM
from vlpeft_jax.models.vlm import QFormerVLM
from vlpeft_jax.peft import base as pb
from vlpeft_jax.peft import registry
from vlpeft_jax.peft.petal import MODALITIES, PETAL

MAX_DIFFS = MaxDiffs("PETAL max abs diff")
report_max_diffs = MAX_DIFFS.fixture()
record = MAX_DIFFS.record

H, HV, NQ, VOCAB_Q, VOCAB = 16, 12, 3, 30, 20
SELF_Q = ("qformer", "encoder", "layer_0", "attention", "attention", "query")
CROSS_K = ("qformer", "encoder", "layer_0", "crossattention", "attention", "key")
CROSS_Q = ("qformer", "encoder", "layer_0", "crossattention", "attention", "query")


@functools.cache
def tiny():
    """A tiny InstructBLIP-shaped model: BLIP vision -> Q-Former (2 layers, cross-attention in both) -> OPT."""
    vlm = QFormerVLM(
        BlipVisionModel(BlipVisionConfig(hidden_size=HV, intermediate_size=24, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=16, patch_size=8)),
        QFormer(BertConfig(vocab_size=VOCAB_Q, hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, cross_attention_frequency=1, encoder_hidden_size=HV,
                           num_query_tokens=NQ, qformer_text_input=True)),
        OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=H, ffn_dim=32, num_hidden_layers=1,
                                 num_attention_heads=2)),
        lm_width=H, num_query_tokens=NQ)
    inputs = batch()
    params = layers.unbox(vlm.init(jax.random.key(0), inputs["input_ids"], inputs["attention_mask"],
                                   inputs["pixel_values"], qformer_input_ids=inputs["qformer_input_ids"],
                                   qformer_attention_mask=inputs["qformer_attention_mask"]))["params"]
    return vlm, params


def batch(b: int = 2, pad: int = 0):
    rng = np.random.default_rng(0)
    q_ids = rng.integers(1, VOCAB_Q, (b, 5 + pad))
    q_mask = np.ones((b, 5 + pad), np.int32)
    q_mask[1, 3:] = 0  # the second instruction is shorter
    if pad:
        q_mask[:, 5:] = 0
    return {"input_ids": jnp.asarray(rng.integers(1, VOCAB, (b, 4))), "attention_mask": jnp.ones((b, 4), jnp.int32),
            "pixel_values": jnp.asarray(rng.normal(size=(b, 16, 16, 3)), jnp.float32),
            "qformer_input_ids": jnp.asarray(q_ids), "qformer_attention_mask": jnp.asarray(q_mask)}


def run(petal=None, p=None, inputs=None, train=False, side=None, rng=None, record_=False):
    vlm, params = tiny()
    inputs = inputs or batch()
    methods = [] if petal is None else [(petal, p)]
    return pb.apply_with(vlm.apply, methods, {"params": params}, inputs["input_ids"], inputs["attention_mask"],
                         inputs["pixel_values"], qformer_input_ids=inputs["qformer_input_ids"],
                         qformer_attention_mask=inputs["qformer_attention_mask"], train=train, side_inputs=side,
                         rng=rng, record=record_)


def small(**kw) -> PETAL:
    settings = dict(rank=4, num_experts=3, expert_width=4, gate_width=4, ib_weight=0.0)
    settings.update(kw)
    return PETAL(**settings)


def randomise(p, seed=1, scale=0.3):
    """Every leaf of the PETAL params perturbed (V, B and v leave zero, so the model really changes)."""
    leaves, tree = jax.tree_util.tree_flatten(p)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree_util.tree_unflatten(tree, noisy)


# ------------------------------------------------------------------------------------------ T1 / T2 identity


@pytest.mark.parametrize("settings", [dict(), dict(core="cp"), dict(expert="film"), dict(gate=False),
                                      dict(per_modality=False, gamma=False)])
def test_identity_at_init(settings):
    """T1+T2: V = 0, Γ = 1, B = 0 (FiLM γ≈1, β≈0), v = 0: PETAL's logits equal the frozen model's."""
    vlm, params = tiny()
    petal = small(**settings)
    p = petal.init(jax.random.key(3), params)
    frozen = run().logits
    adapted = run(petal, p).logits
    # FiLM starts at γ = 1 + N(0, 2e-4²), β = N(0, 2e-4²) (symmetry breaking), not exactly the identity
    tol = 1e-4 if settings.get("expert") == "film" else 1e-6
    assert record(f"identity at init {settings}", jnp.max(jnp.abs(adapted - frozen))) < tol
    changed = run(petal, randomise(p)).logits
    assert float(jnp.max(jnp.abs(changed - frozen))) > 1e-3  # the check can fail: trained params do change it


# ------------------------------------------------------------------------------------------ T3 / T4 / T9 / T10 hook


def dense_linear(x, k, b):
    return x @ k if b is None else x @ k + b


def through_hook(petal, p, path, x, kernel, bias):
    with hooks.use_hooks(petal.hooks(p)):
        return hooks.call("linear", path, dense_linear, x, kernel, bias)


def reference(p, path, x, kernel, bias, core="full", nq=NQ):
    """Eq. 2 / App. E by hand: per-token dense weight Γ W0 + U C^m V, with C built from the factors in numpy."""
    f = p["dma"]["groups"]["img" if path == CROSS_K else "txt"]
    mod = pb.get_path(p, path)
    u, v = np.asarray(f["U"], np.float64), np.asarray(f["V"], np.float64)
    out = []
    for t in range(x.shape[1]):
        m = 1 if (path == SELF_Q and t >= nq) else 0
        vec = np.asarray(p["dma"]["lambda"][m], np.float64) * np.asarray(mod["mode"], np.float64)
        c = np.diag(vec) if core == "cp" else np.einsum("abc,c->ab", np.asarray(f["P"], np.float64), vec)
        w = float(mod["gamma"]) * np.asarray(kernel, np.float64) + u @ c @ v
        out.append(np.asarray(x[:, t], np.float64) @ w + np.asarray(bias, np.float64))
    return np.stack(out, 1)


@pytest.mark.parametrize("core", ["full", "cp"])
@pytest.mark.parametrize("path", [SELF_Q, CROSS_K, CROSS_Q])
def test_dma_matches_dense_reference(core, path):
    """T3: activation-space DMA == the per-token merged weight Γ W0 + U C_n^{m(t)} V (mixed query+text input)."""
    vlm, params = tiny()
    petal = small(core=core, num_query_tokens=NQ, aim="none")
    p = randomise(petal.init(jax.random.key(2), params))
    kernel = pb.get_path(params, path + ("kernel",))
    bias = pb.get_path(params, path + ("bias",))
    t = 9 if path != CROSS_Q else NQ
    x = jax.random.normal(jax.random.key(5), (2, t, kernel.shape[0]))
    got = through_hook(petal, p, path, x, kernel, bias)
    want = reference(p, path, np.asarray(x), kernel, bias, core)
    assert record(f"DMA vs dense reference {core} {path[-3]}/{path[-1]}", np.max(np.abs(np.asarray(got) - want))) < 1e-4


def test_full_core_superdiagonal_equals_cp():
    """T4: core="full" with P[a,b,c] = δ_abc is exactly Eq. 2's CP form (same U, V, p, λ, Γ)."""
    vlm, params = tiny()
    full, cp = small(aim="none"), small(aim="none", core="cp")
    p = randomise(full.init(jax.random.key(4), params))
    r = full.rank
    for g in p["dma"]["groups"].values():
        g["P"] = jnp.zeros((r, r, r)).at[jnp.arange(r), jnp.arange(r), jnp.arange(r)].set(1.0)
    p_cp = jax.tree_util.tree_map(lambda x: x, p)
    for g in p_cp["dma"]["groups"].values():
        del g["P"]
    diff = jnp.max(jnp.abs(run(full, p).logits - run(cp, p_cp).logits))
    assert record("full core with super-diagonal P vs cp", diff) <= 1e-6


def test_modality_routing():
    """T9: λ^txt changes self-attention outputs only at instruction positions; cross-attention never sees it."""
    vlm, params = tiny()
    petal = small(num_query_tokens=NQ, aim="none")
    p = randomise(petal.init(jax.random.key(6), params))
    q = jax.tree_util.tree_map(lambda x: x, p)
    q["dma"]["lambda"] = p["dma"]["lambda"].at[MODALITIES.index("txt")].add(1.0)
    for path, t in ((SELF_Q, 8), (CROSS_K, 6), (CROSS_Q, NQ)):
        kernel, bias = pb.get_path(params, path + ("kernel",)), pb.get_path(params, path + ("bias",))
        x = jax.random.normal(jax.random.key(7), (2, t, kernel.shape[0]))
        d = np.abs(np.asarray(through_hook(petal, q, path, x, kernel, bias)
                              - through_hook(petal, p, path, x, kernel, bias)))
        if path == SELF_Q:
            assert d[:, :NQ].max() == 0.0 and d[:, NQ:].min(axis=-1).max() > 0  # queries untouched, text changed
        else:
            assert d.max() == 0.0
    # with no text, every self-attention token is ``vis``
    kernel, bias = pb.get_path(params, SELF_Q + ("kernel",)), pb.get_path(params, SELF_Q + ("bias",))
    x = jax.random.normal(jax.random.key(8), (2, NQ, H))
    assert float(jnp.max(jnp.abs(through_hook(petal, q, SELF_Q, x, kernel, bias)
                                 - through_hook(petal, p, SELF_Q, x, kernel, bias)))) == 0.0


def test_query_count_read_from_the_qformer_config():
    """Without num_query_tokens the hook reads the Q-Former's own config (whole-model outputs agree)."""
    vlm, params = tiny()
    explicit, implicit = small(num_query_tokens=NQ), small()
    p = randomise(explicit.init(jax.random.key(9), params))
    assert float(jnp.max(jnp.abs(run(explicit, p).logits - run(implicit, p).logits))) == 0.0
    with pytest.raises(ConfigError, match="query tokens"):
        small(num_query_tokens=NQ + 1).init(jax.random.key(0), params)


def test_gamma():
    """T10: Γ = 0 leaves b0 + ΔW x; Γ = 2 doubles x W0; gamma=False has no Γ leaf (V4)."""
    vlm, params = tiny()
    petal = small(num_query_tokens=NQ, aim="none")
    p = randomise(petal.init(jax.random.key(10), params))
    kernel, bias = pb.get_path(params, CROSS_Q + ("kernel",)), pb.get_path(params, CROSS_Q + ("bias",))
    x = jax.random.normal(jax.random.key(11), (2, NQ, H))
    for gamma in (0.0, 2.0):
        pb.get_path(p, CROSS_Q)["gamma"] = jnp.asarray(gamma)
        want = gamma * np.asarray(x @ kernel) + np.asarray(bias) + np.asarray(x @ petal.delta(p, CROSS_Q, "vis"))
        got = np.asarray(through_hook(petal, p, CROSS_Q, x, kernel, bias))
        assert np.max(np.abs(got - want)) < 1e-5
    v4 = small(gamma=False).init(jax.random.key(0), params)
    assert not any("gamma" in "/".join(map(str, k)) for k, _ in jax.tree_util.tree_leaves_with_path(v4))


def test_merge():
    """T3: merge_dma folds DMA into the kernels: exact for single-modality inputs; mixed λ is a clear error."""
    vlm, params = tiny()
    petal = small(aim="none")
    p = randomise(petal.init(jax.random.key(12), params))
    with pytest.raises(ConfigError, match="different λ"):
        petal.merge(params, p)
    merged = petal.merge_dma(params, p, modality="vis")
    inputs = batch()
    no_text = dict(inputs, qformer_input_ids=None, qformer_attention_mask=None)
    vlm_apply = lambda ps: vlm.apply({"params": ps}, inputs["input_ids"], inputs["attention_mask"],
                                     inputs["pixel_values"]).logits
    adapted = pb.apply_with(vlm.apply, [(petal, p)], {"params": params}, no_text["input_ids"],
                            no_text["attention_mask"], no_text["pixel_values"]).logits
    assert record("merged (vis) vs activation-space, no text", jnp.max(jnp.abs(vlm_apply(merged) - adapted))) < 1e-4
    shared = small(aim="none", per_modality=False)
    q = {k: v for k, v in p.items()}
    q["dma"] = {"groups": p["dma"]["groups"]}
    merged = shared.merge(params, q)
    full = run(shared, q).logits
    plain = vlm.apply({"params": merged}, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                      qformer_input_ids=inputs["qformer_input_ids"],
                      qformer_attention_mask=inputs["qformer_attention_mask"]).logits
    assert record("merged (λ ≡ 1) vs activation-space, with text", jnp.max(jnp.abs(plain - full))) < 1e-4
    with pytest.raises(ConfigError, match="AIM"):
        small().merge(params, small().init(jax.random.key(0), params))


# ------------------------------------------------------------------------------------------ T8 gradients


def test_gradients_at_init():
    """T8: at init the grads of U, P, p, λ are exactly 0 (V = 0), those of V and Γ are not; the frozen model
    gets no gradient (only PETAL's tree is differentiated)."""
    vlm, params = tiny()
    petal = small(aim="none")
    p = petal.init(jax.random.key(13), params)

    def loss(p):
        return jnp.mean(run(petal, p).logits ** 2)

    g = jax.grad(loss)(p)
    for name, f in g["dma"]["groups"].items():
        assert float(jnp.max(jnp.abs(f["U"]))) == 0.0 and float(jnp.max(jnp.abs(f["P"]))) == 0.0, name
        assert float(jnp.max(jnp.abs(f["V"]))) > 0.0, name
    assert float(jnp.max(jnp.abs(g["dma"]["lambda"]))) == 0.0
    modes = [pb.get_path(g, path) for path in pb.module_paths(g, "mode")]
    assert len(modes) == 12  # 2 layers × (self q,k,v + cross q,k,v)
    assert all(float(jnp.max(jnp.abs(m["mode"]))) == 0.0 for m in modes)
    assert any(float(jnp.abs(m["gamma"])) > 0.0 for m in modes)


# ------------------------------------------------------------------------------------------ T11 gate / AIM


def test_gate():
    """T11: rows sum to 1; v = 0 gives 1/K; padding does not change g; K=1 gives y_1; examples are independent."""
    vlm, params = tiny()
    petal = small()
    p = randomise(petal.init(jax.random.key(14), params))
    x = jax.random.normal(jax.random.key(15), (3, 5, H))
    mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    mixed, g = petal.mix_instructions(p, x, mask)
    assert np.allclose(np.asarray(g).sum(-1), 1.0, atol=1e-6) and float(jnp.std(g)) > 1e-3
    init = petal.init(jax.random.key(14), params)
    _, g0 = petal.mix_instructions(init, x, mask)
    assert np.allclose(np.asarray(g0), 1.0 / 3.0, atol=1e-7)
    padded_x = jnp.concatenate([x, jax.random.normal(jax.random.key(16), (3, 4, H))], 1)
    _, g_pad = petal.mix_instructions(p, padded_x, jnp.concatenate([mask, jnp.zeros((3, 4), int)], 1))
    assert float(jnp.max(jnp.abs(g_pad - g))) < 1e-6
    one, g1 = petal.mix_instructions(p, x[1:2], mask[1:2])
    assert float(jnp.max(jnp.abs(one - mixed[1:2]))) < 1e-6 and float(jnp.max(jnp.abs(g1 - g[1:2]))) < 1e-6
    k1 = small(num_experts=1)
    p1 = randomise(k1.init(jax.random.key(17), params))
    e = p1["aim"]["experts"]
    y1 = x + jax.nn.gelu(x @ e["A"][0], approximate=False) @ e["B"][0]
    got, _ = k1.mix_instructions(p1, x, mask)
    assert float(jnp.max(jnp.abs(got - y1))) < 1e-5


def test_code_experts_follow_the_released_form():
    """expert="code": 0.6·x + 0.4·mean_k (x A_k + a_k) B_k + b_k (numpy reference of the released experts)."""
    vlm, params = tiny()
    petal = small(expert="code", num_experts=2)
    p = randomise(petal.init(jax.random.key(18), params))
    assert "gate" not in p["aim"]
    x = np.asarray(jax.random.normal(jax.random.key(19), (2, 4, H)), np.float64)
    e = {k: np.asarray(v, np.float64) for k, v in p["aim"]["experts"].items()}
    outs = [(x @ e["A"][k] + e["a_bias"][k]) @ e["B"][k] + e["b_bias"][k] for k in range(2)]
    want = 0.6 * x + 0.4 * np.mean(outs, axis=0)
    got, _ = petal.mix_instructions(p, jnp.asarray(x, jnp.float32), None)
    assert np.max(np.abs(np.asarray(got) - want)) < 1e-5


def test_random_instruction_replaces_the_text():
    """A28: aim="random" feeds a learnable L×H matrix instead of the instructions (their ids no longer matter)."""
    vlm, params = tiny()
    petal = small(aim="random", random_instruction_length=6)
    p = randomise(petal.init(jax.random.key(20), params))
    assert p["aim"]["instruction"].shape == (6, H) and "experts" not in p["aim"]
    a = run(petal, p).logits
    other = dict(batch(), qformer_input_ids=batch()["qformer_input_ids"][:, ::-1] % 7 + 1)
    assert float(jnp.max(jnp.abs(run(petal, p, other).logits - a))) == 0.0
    assert float(jnp.max(jnp.abs(run().logits - a))) > 1e-4


# ------------------------------------------------------------------------------------------ T12 trees, counts


def test_ablation_trees():
    """T12: V1 no experts/gate; V3 only DMA; V2/V3 no estimators; random: an L×H matrix and no AIM."""
    vlm, params = tiny()
    full = small(ib_weight=0.05).init(jax.random.key(0), params)
    assert {"dma", "aim", "sib"} <= set(full)
    v1 = small(aim="none", ib_weight=0.05).init(jax.random.key(0), params)
    assert "aim" not in v1 and "sib" in v1
    v2 = small(ib_weight=0.0).init(jax.random.key(0), params)
    assert "sib" not in v2 and "aim" in v2
    v3 = small(aim="none", ib_weight=0.0).init(jax.random.key(0), params)
    assert set(v3) == {"dma", "qformer"}


def real_shapes_base():
    """Abstract Q-Former params of InstructBLIP's real shapes (H_t=768, H_v=1408, 12 layers, cross every 2nd)."""
    cfg = BertConfig(vocab_size=30523, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, cross_attention_frequency=2, encoder_hidden_size=1408,
                     num_query_tokens=32, qformer_text_input=True, max_position_embeddings=512)
    q = QFormer(cfg)
    shapes = jax.eval_shape(lambda: layers.unbox(q.init(jax.random.key(0), jnp.zeros((1, 257, 1408)),
                                                        jnp.zeros((1, 4), jnp.int32))))
    return {"qformer": shapes["params"]}


def test_app_e_count_on_real_shapes():
    """T6: App. E's subset (Eq. 10 + K·2·H_t·M) is 1,056,768; the default total and the CP form's DMA as the
    sheet's arithmetic (§2.4); nothing is allocated."""
    base = real_shapes_base()
    h_v, h_t, r, m, k, n = 1408, 768, 64, 64, 3, 54
    default = PETAL(ib_weight=0.0)
    p = jax.eval_shape(lambda: default.init(jax.random.key(0), base))
    parts = default.param_breakdown(p)
    assert parts["App. E subset (U, V, P + expert matrices)"] == (h_v + 2 * r * r + 3 * h_t) * r + k * 2 * h_t * m
    assert parts["App. E subset (U, V, P + expert matrices)"] == 1_056_768
    assert parts["DMA factors U, V, P"] == 761_856 and parts["experts"] == 294_912
    gate = 2 * h_t * m + m + m  # W_x, W_y, bias and v (the sheet's 98,368 counts one d_g vector)
    assert default.num_params(p) == 1_056_768 + n * r + 2 * r + n + gate
    cp = PETAL(core="cp", aim="none", ib_weight=0.0)
    p_cp = jax.eval_shape(lambda: cp.init(jax.random.key(0), base))
    assert cp.num_params(p_cp) == 768 * 64 + 1408 * 64 + 2 * 64 * 768 + 3_456 + 128 + 54 == 241_206


def test_registry_builds_petal():
    m = registry.build_methods({"petal": {"rank": 8, "num_experts": 2}})["petal"]
    assert isinstance(m, PETAL) and m.rank == 8


# ------------------------------------------------------------------------------------------ SIB in a pass


def test_ib_terms_are_recorded_in_training():
    """With ib_weight > 0 a training pass records loss/ib and loss/ib_critic; the critic term's gradient reaches
    only the MINE critic, the model term's reaches DMA/AIM and the Gaussian decoder but not the critic."""
    vlm, params = tiny()
    petal = small(ib_weight=0.05)
    p = randomise(petal.init(jax.random.key(21), params), scale=0.1)
    assert p["sib"]["zy"]["mu2"]["kernel"].shape[-1] == VOCAB  # the LM's vocabulary
    targets = jnp.array([[3, 4, 5, -100], [6, 7, -100, -100]])

    def terms(p):
        _, rec = run(petal, p, train=True, side={"target_ids": targets}, rng=jax.random.key(0), record_=True)
        return rec.loss_terms()

    t = terms(p)
    assert set(t) == {"ib", "ib_critic"} and all(np.isfinite(float(v)) for v in t.values())
    g_model = jax.grad(lambda p: terms(p)["ib"])(p)
    g_critic = jax.grad(lambda p: terms(p)["ib_critic"])(p)
    norm = lambda tree: float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree_util.tree_leaves(tree)))
    assert norm(g_model["sib"]["xz"]) == 0.0 and norm(g_model["sib"]["zy"]) > 0 and norm(g_model["dma"]) > 0
    assert norm(g_critic["sib"]["xz"]) > 0
    assert norm({k: v for k, v in g_critic.items() if k != "sib"}) == 0.0 and norm(g_critic["sib"]["zy"]) == 0.0
    _, rec = run(petal, p, train=False, record_=True)
    assert "loss/ib" not in rec  # training only


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("settings, match", [
    (dict(rank=0), "rank"), (dict(num_experts=0), "num_experts"), (dict(core="tucker"), "core"),
    (dict(expert="moe"), "expert"), (dict(ib_weight=-1.0), "ib_weight"), (dict(aim="all"), "aim"),
    (dict(dma=False, aim="none", ib_weight=0.0), "nothing to train")])
def test_bad_settings(settings, match):
    with pytest.raises(ConfigError, match=match):
        small(**settings)


def test_bad_inputs():
    vlm, params = tiny()
    with pytest.raises(ConfigError, match="not a Q-Former attention projection"):
        small(targets=(r"language_model/.*/q_proj",)).init(jax.random.key(0), params)
    with pytest.raises(ConfigError, match="not a Q-Former attention projection"):
        small(targets=(r"qformer/.*/output/dense",)).init(jax.random.key(0), params)
    petal = small()
    p = petal.init(jax.random.key(0), params)
    inputs = batch()
    with pytest.raises(InputError, match="qformer_input_ids"):
        pb.apply_with(vlm.apply, [(petal, p)], {"params": params}, inputs["input_ids"], inputs["attention_mask"],
                      inputs["pixel_values"])
    ib = small(ib_weight=0.05)
    p = ib.init(jax.random.key(0), params)
    one = {k: v[:1] for k, v in inputs.items()}
    with pytest.raises(InputError, match="at least 2"):
        run(ib, p, one, train=True, side={"target_ids": jnp.array([[3, 4, -100, -100]])}, rng=jax.random.key(0))
