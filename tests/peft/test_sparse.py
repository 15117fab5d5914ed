"""Sparse neuron-wise tuning (issue 6): selection, NeuroAda's gather/scatter/merge paths, GPS masked
training, the thesis' parameter counts (Table 5.2) and memory (Table 5.1), and the bad-input errors."""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

from vlpeft_jax.cli.config import load_config_file
from vlpeft_jax.errors import ConfigError
from vlpeft_jax.models import layers, registry
from vlpeft_jax.peft import base as pb
from vlpeft_jax.peft import gps as gps_lib
from vlpeft_jax.peft import selection
from vlpeft_jax.peft.lora import LoRA
from vlpeft_jax.peft.neuroada import NeuroAda, choose_mode, projection_memory
from vlpeft_jax.peft.registry import build_methods
from vlpeft_jax.train import labels as labels_lib
from vlpeft_jax.train.losses import lm_loss
from vlpeft_jax.train.state import TrainState
from vlpeft_jax.train.step import make_train_step

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def llama():
    cfg = dict(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2)
    module, inputs = registry.build_model(cfg)
    boxed = jax.eval_shape(module.init, jax.random.key(0), **inputs)
    base = layers.unbox(jax.jit(module.init)(jax.random.key(0), **inputs))["params"]
    ids = jax.random.randint(jax.random.key(1), (2, 7), 0, 64)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}
    return module, base, batch, layers.logical_axes(boxed)["params"]


def _logits(module, base, batch, methods=()):
    return _jit_logits(module, tuple(m for m, _ in methods))(base, batch, [p for _, p in methods])


@functools.cache
def _jit_logits(module, methods):
    def f(base, batch, peft):
        return pb.apply_with(module.apply, list(zip(methods, peft, strict=True)), {"params": base},
                             batch["input_ids"], batch["attention_mask"]).logits

    return jax.jit(f)


def _random_values(p, key):
    def leaf(path, v):
        if path[-1].key != "values":
            return v
        salt = zlib.crc32(jax.tree_util.keystr(path).encode())
        return 0.1 * jax.random.normal(jax.random.fold_in(key, salt), v.shape)

    return jax.tree_util.tree_map_with_path(leaf, p)


# ---------------------------------------------------------------------------------------------- selection


@pytest.mark.parametrize("strategy", ["magnitude", "reverse", "random", "gradient"])
def test_selection_is_per_neuron_and_ranks_by_the_strategy(llama, strategy):
    module, base, batch, _ = llama
    k = 3
    scores = None
    if strategy == "gradient":
        loss = lambda p, b: lm_loss(module, [])({"base": p, "peft": {}}, b, None)[0]  # noqa: E731
        scores = selection.gradient_scores(loss, base, [batch, batch], TARGETS)
    chosen = selection.select(base, TARGETS, k=k, strategy=strategy, rng=jax.random.key(3), scores=scores)
    assert len(chosen) == 2 * 7
    for path, s in chosen.items():
        w = np.asarray(pb.get_path(base, path + ("kernel",)))
        d_in, d_out = w.shape
        idx = np.asarray(s.indices)
        assert idx.shape == (d_out, k) and s.rows is None
        assert all(len(set(row)) == k for row in idx.tolist())  # k distinct connections per neuron
        mask = np.asarray(selection.selection_mask(s))
        np.testing.assert_array_equal(mask.sum(0), np.full(d_out, k))  # every neuron gets exactly k
        if strategy == "random":
            continue
        ref = {"magnitude": np.abs(w), "reverse": -np.abs(w)}.get(strategy)
        if ref is None:
            ref = np.asarray(scores_of(scores, path))
        # the selected scores are the k largest of each column (numpy's sort as the reference)
        np.testing.assert_allclose(np.sort(np.take_along_axis(ref, idx.T, 0), 0), np.sort(ref, 0)[-k:], rtol=0)
    if strategy == "random":  # a different seed selects differently; the same seed identically
        again = selection.select(base, TARGETS, k=k, strategy=strategy, rng=jax.random.key(3))
        other = selection.select(base, TARGETS, k=k, strategy=strategy, rng=jax.random.key(4))
        p0 = next(iter(chosen))
        np.testing.assert_array_equal(chosen[p0].indices, again[p0].indices)
        assert not np.array_equal(chosen[p0].indices, other[p0].indices)


def scores_of(scores, path):
    return pb.get_path(scores, path + ("kernel",))


def test_gradient_scores_are_the_modulus_of_the_summed_gradient(llama):
    module, base, batch, _ = llama
    other = {k: jnp.roll(v, 1, axis=1) for k, v in batch.items()}
    loss = lambda p, b: lm_loss(module, [])({"base": p, "peft": {}}, b, None)[0]  # noqa: E731
    scores = selection.gradient_scores(loss, base, [batch, other], ("q_proj",))
    assert set(pb.module_paths(scores)) == {("model", f"layers_{i}", "self_attn", "q_proj") for i in range(2)}
    g = jax.jit(jax.grad(lambda p: loss(p, batch) + loss(p, other)))(base)  # Eq. 4.1 on the whole selection set
    path = ("model", "layers_1", "self_attn", "q_proj", "kernel")
    np.testing.assert_allclose(pb.get_path(scores, path), np.abs(pb.get_path(g, path)), rtol=1e-5, atol=1e-7)


def test_supervised_contrastive_loss_matches_eq_4_2():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(7, 5)).astype(np.float32)
    y = np.array([0, 1, 0, 2, 1, 0, 3])  # class 2 and 3 have no positive: those anchors are left out
    tau = 0.1
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    terms = []
    for i in range(7):
        pos = [p for p in range(7) if p != i and y[p] == y[i]]
        if not pos:
            continue
        denom = sum(np.exp(zn[i] @ zn[a] / tau) for a in range(7) if a != i)
        terms.append(-np.mean([np.log(np.exp(zn[i] @ zn[p] / tau) / denom) for p in pos]))
    got = selection.supervised_contrastive_loss(jnp.asarray(z), jnp.asarray(y), tau)
    np.testing.assert_allclose(got, np.mean(terms), rtol=1e-5)


def test_selection_loss_uses_contrastive_when_class_labels_exist():
    task = lambda p, b: jnp.sum(p["w"]) * 0 + 7.0  # noqa: E731
    feats = lambda p, b: b["x"] @ p["w"]  # noqa: E731
    loss = selection.make_selection_loss(task, feats)
    p = {"w": jnp.eye(2)}
    x = jnp.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = jnp.array([0, 0, 1, 1])
    assert float(loss(p, {"x": x})) == 7.0
    np.testing.assert_allclose(loss(p, {"x": x, "class_labels": labels}),
                               selection.supervised_contrastive_loss(x, labels))


def test_neuron_fraction_and_budget(llama):
    _, base, _, _ = llama
    chosen = selection.select(base, ("gate_proj",), k=2, neuron_fraction=0.25, rng=jax.random.key(0))
    for s in chosen.values():
        assert s.rows.shape == (12,) and s.indices.shape == (12, 2)  # 25% of 48 neurons
        mask = np.asarray(selection.selection_mask(s))
        sums = mask.sum(0)
        assert set(np.flatnonzero(sums).tolist()) == set(np.asarray(s.rows).tolist()) and set(sums) == {0, 2}
    # a budget (trainable values, or a fraction of the targeted weights) becomes one k for all targets
    shapes = [w.shape for _, w in selection.target_kernels(base, TARGETS)]
    neurons = sum(s[1] for s in shapes)
    assert selection.k_for_budget(5 * neurons + 3, shapes) == 5
    entries = sum(s[0] * s[1] for s in shapes)
    assert selection.k_for_budget(5 * neurons / entries, shapes) == 5
    ada = NeuroAda(targets=TARGETS, budget=float(5 * neurons))
    assert ada.num_params(ada.init(jax.random.key(0), base)) == 5 * neurons


# --------------------------------------------------------------------------------------------- NeuroAda


@pytest.mark.parametrize("with_rows", [False, True])
def test_merged_linear_gradients_equal_autodiff(with_rows):
    """The scatter path's custom backward (no dense xᵀg for the values) against JAX's autodiff of the plain
    merged-weight formula, for every input: activations, kernel (when trained too), bias and values."""
    from vlpeft_jax.models.layers import linear_default
    from vlpeft_jax.peft.neuroada import merged_linear
    from vlpeft_jax.peft.selection import scatter_add

    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (2, 5, 12))
    kernel, bias = jax.random.normal(keys[1], (12, 8)), jax.random.normal(keys[2], (8,))
    rows = jnp.array([1, 4, 6], jnp.int32) if with_rows else None
    n = 3 if with_rows else 8
    values = jax.random.normal(keys[3], (n, 2))
    indices = jax.random.randint(keys[4], (n, 2), 0, 12).astype(jnp.int32)
    proj = jax.random.normal(keys[5], (2, 5, 8))

    def loss(fn):
        return lambda x, w, b, v: jnp.sum(fn(x, w, b, v) * proj)

    fast = jax.grad(loss(lambda x, w, b, v: merged_linear(x, w, b, v, indices, rows)), argnums=(0, 1, 2, 3))
    plain = jax.grad(loss(lambda x, w, b, v: linear_default(x, scatter_add(w, indices, v, rows), b)),
                     argnums=(0, 1, 2, 3))
    for got, want in zip(jax.jit(fast)(x, kernel, bias, values), plain(x, kernel, bias, values), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    # with the kernel frozen (gradients of x and the values only) the dense x^T g product is not computed:
    # plain autodiff pays it (2·tokens·d_in·d_out FLOPs); the custom backward pays instead a product and a sum
    # over the gathered activations (at most 4·tokens·n·k)
    def flops(fn):
        grad = jax.grad(loss(fn), argnums=(0, 3))
        cost = jax.jit(grad).lower(x, kernel, bias, values).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    dense_dw, own = 2 * 10 * 12 * 8, 4 * 10 * n * 2
    plain_flops = flops(lambda x, w, b, v: linear_default(x, scatter_add(w, indices, v, rows), b))
    fast_flops = flops(lambda x, w, b, v: merged_linear(x, w, b, v, indices, rows))
    assert plain_flops - fast_flops >= dense_dw - own, (fast_flops, plain_flops)


def test_gather_equals_scatter_equals_merged(llama):
    module, base, batch, _ = llama
    attn, mlp = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
    # all neurons of the attention projections, half of the MLP's (values/indices [n, k] plus rows)
    modes = {mode: [NeuroAda(targets=attn, k=3, mode=mode, name="attn"),
                    NeuroAda(targets=mlp, k=3, mode=mode, neuron_fraction=0.5, name="mlp")]
             for mode in ("gather", "scatter")}
    peft = [_random_values(m.init(jax.random.key(5 + i), base), jax.random.key(6 + i))
            for i, m in enumerate(modes["gather"])]
    merged = modes["gather"][1].merge(modes["gather"][0].merge(base, peft[0]), peft[1])
    y_merged = _logits(module, merged, batch)
    assert not np.allclose(y_merged, _logits(module, base, batch), atol=1e-3)  # the deltas do something
    proj = jax.random.normal(jax.random.key(7), y_merged.shape)
    emb = base["model"]["embed_tokens"]["embedding"]

    # outputs, and gradients w.r.t. the values and the token embedding (which flows through every input
    # gradient); the reference is the dense gradient of the merged kernels read at the selected entries
    def objective(methods):
        def f(values, embedding):
            b = pb.copy_tree(base)
            b["model"]["embed_tokens"]["embedding"] = embedding
            active = [(m, _with_values(p, v)) for m, p, v in zip(methods, peft, values, strict=True)]
            logits = pb.apply_with(module.apply, active, {"params": b}, batch["input_ids"],
                                   batch["attention_mask"]).logits
            return jnp.sum(logits * proj), logits

        return f

    values = [_values_only(p) for p in peft]
    got = {mode: jax.jit(jax.grad(objective(ms), argnums=(0, 1), has_aux=True))(values, emb)
           for mode, ms in modes.items()}

    def dense(kernels, embedding):
        b = pb.copy_tree(merged)
        for path, w in kernels.items():
            pb.set_path(b, path + ("kernel",), w)
        b["model"]["embed_tokens"]["embedding"] = embedding
        return jnp.sum(_logits(module, b, batch) * proj)

    paths = [(i, path) for i, p in enumerate(peft) for path in pb.module_paths(p, "values")]
    kernels = {path: pb.get_path(merged, path + ("kernel",)) for _, path in paths}
    g_kernels, g_emb = jax.jit(jax.grad(dense, argnums=(0, 1)))(kernels, emb)
    scale = float(np.abs(g_emb).max())  # float32 sums of O(10) terms: compare relative to the largest entry
    for mode, ((g_values, g_embedding), logits) in got.items():
        np.testing.assert_allclose(logits, y_merged, rtol=1e-5, atol=1e-5, err_msg=mode)
        np.testing.assert_allclose(g_embedding, g_emb, rtol=1e-4, atol=1e-5 * scale, err_msg=mode)
        for i, path in paths:
            q = pb.get_path(peft[i], path)
            g_w = np.asarray(g_kernels[path])
            rows = np.asarray(q.get("rows", np.arange(g_w.shape[1])))
            want = g_w[np.asarray(q["indices"]), rows[:, None]]
            np.testing.assert_allclose(pb.get_path(g_values[i], path)["values"], want, rtol=1e-4, atol=1e-6,
                                       err_msg=f"{mode} {path}")
    assert any("rows" in pb.get_path(peft[1], path) for path in pb.module_paths(peft[1], "values"))


def _values_only(p):
    return jax.tree_util.tree_map_with_path(lambda path, v: v if path[-1].key == "values" else None, p)


def _with_values(p, values):
    return jax.tree.map(lambda v, old: old if v is None else v, values, p, is_leaf=lambda x: x is None)


def test_merge_round_trip(llama):
    module, base, batch, _ = llama
    ada = NeuroAda(targets=TARGETS, k=2)
    p = _random_values(ada.init(jax.random.key(0), base), jax.random.key(1))
    merged = ada.merge(base, p)
    # invariant 1: the merged tree is a plain base tree of the same structure, shapes and dtypes
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), merged) == jax.tree.map(lambda a: (a.shape, a.dtype), base)
    for path in pb.module_paths(p, "values"):
        q = pb.get_path(p, path)
        w0, w1 = pb.get_path(base, path + ("kernel",)), pb.get_path(merged, path + ("kernel",))
        np.testing.assert_allclose(w1 - w0, ada.dense_delta(q, w0.shape), atol=1e-7)
        assert int(np.count_nonzero(np.asarray(w1 - w0))) == q["values"].size  # only the selected entries
    # subtracting the deltas gives the base back; zero deltas change nothing
    back = ada.merge(merged, jax.tree_util.tree_map_with_path(
        lambda path, v: -v if path[-1].key == "values" else v, p))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), back, base)
    zero = ada.init(jax.random.key(0), base)
    jax.tree.map(np.testing.assert_array_equal, ada.merge(base, zero), base)
    np.testing.assert_array_equal(_logits(module, base, batch, [(ada, zero)]), _logits(module, base, batch))


def test_training_updates_values_only_and_keeps_indices_frozen(llama):
    module, base, batch, _ = llama
    ada = NeuroAda(targets=TARGETS, k=2, mode="gather")
    p = ada.init(jax.random.key(0), base)
    params = {"base": base, "peft": {"neuroada": p}}
    labels = labels_lib.make_labels(params, ada.trainable_rules())
    trainable, frozen = labels_lib.split(params, labels)
    leaves = jax.tree_util.tree_leaves_with_path(trainable)
    assert leaves and all(path[-1].key == "values" for path, _ in leaves)  # no integer leaf is trainable
    tx = optax.adamw(1e-2)
    state = TrainState.create(params, labels, tx, jax.random.PRNGKey(0))
    # optimizer state only (d_out, k) per projection (Eq. 5.6): 2 moments of every values array
    state_sizes = sorted(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim == 2)
    assert state_sizes == sorted(2 * [v.size for v in jax.tree.leaves(trainable)])
    step = jax.jit(make_train_step(lm_loss(module, [("neuroada", ada)]), tx))
    losses = []
    for _ in range(4):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    out = state.params
    jax.tree.map(np.testing.assert_array_equal, out["base"], base)
    for path in pb.module_paths(p, "values"):
        np.testing.assert_array_equal(pb.get_path(out["peft"]["neuroada"], path)["indices"],
                                      pb.get_path(p, path)["indices"])
        assert float(jnp.abs(pb.get_path(out["peft"]["neuroada"], path)["values"]).min()) > 0


def test_train_loop_checkpoints_and_restores_the_integer_indices(llama, tmp_path):
    from vlpeft_jax.train.loop import train

    module, base, batch, _ = llama
    ada = NeuroAda(targets=("q_proj", "down_proj"), k=2)
    params = {"base": base, "peft": {"neuroada": ada.init(jax.random.key(0), base)}}
    stage = {"name": "neuroada", "steps": 2, "trainable": ada.trainable_rules(), "methods": ["neuroada"],
             "optimizer": {"learning_rate": 1e-2}}

    def run():
        return train(params, [stage], lambda i, start: (batch for _ in range(start, 2)), tmp_path,
                     loss_fn=lm_loss(module, [("neuroada", ada)]), progress=False, verbose=False,
                     tensorboard=False, async_checkpoints=False)

    first = run()
    assert first.state.trainable["peft"]["neuroada"]["model"]["layers_0"]["self_attn"]["q_proj"]["indices"] is None
    again = run()  # resumes from the final checkpoint: nothing left to train, the restored state comes back
    assert again.resumed_from == 2
    jax.tree.map(np.testing.assert_array_equal, again.params["peft"], first.params["peft"])
    idx = again.params["peft"]["neuroada"]["model"]["layers_1"]["mlp"]["down_proj"]["indices"]
    assert idx.dtype == jnp.int32


def test_init_on_abstract_and_traced_params(llama):
    _, base, _, _ = llama
    ada = NeuroAda(targets=TARGETS, k=2)
    concrete = ada.init(jax.random.key(0), base)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), base)
    traced = jax.eval_shape(lambda b: ada.init(jax.random.key(0), b), abstract)  # traced base leaves
    closed = jax.eval_shape(lambda: ada.init(jax.random.key(0), abstract))  # ShapeDtypeStruct leaves
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), concrete)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), traced) == shapes
    assert jax.tree.map(lambda a: (a.shape, a.dtype), closed) == shapes


def test_logical_specs_follow_the_output_axis(llama):
    _, base, _, base_specs = llama
    ada = NeuroAda(targets=("q_proj", "down_proj"), k=1)
    specs = ada.logical_specs(ada.init(jax.random.key(0), base), base_specs)
    q = specs["model"]["layers_0"]["self_attn"]["q_proj"]
    down = specs["model"]["layers_1"]["mlp"]["down_proj"]
    assert base_specs["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"] == PartitionSpec("embed", "heads")
    assert q == {"values": PartitionSpec("heads", None), "indices": PartitionSpec("heads", None)}
    assert down["values"] == PartitionSpec("embed", None)


def test_auto_mode_rule():
    # the smaller temporary: gathered activations (tokens·d_out·k) vs the merged weight (d_in·d_out)
    assert choose_mode(1024, 4, 256) == "gather" and choose_mode(1024, 5, 256) == "scatter"
    assert choose_mode(4096, 1, 4096) == "gather" and choose_mode(4096, 20, 4096) == "scatter"
    assert NeuroAda(targets=("q_proj",)).mode == "auto"


# -------------------------------------------------------------------------------------------------- GPS


def test_gps_changes_only_selected_entries(llama):
    module, base, batch, _ = llama
    loss = lambda p, b: lm_loss(module, [])({"base": p, "peft": {}}, b, None)[0]  # noqa: E731
    scores = selection.gradient_scores(loss, base, [batch], TARGETS)
    gps = gps_lib.GPS(targets=TARGETS, k=2)
    masks = gps.masks(jax.random.key(0), base, scores=scores)
    assert gps.num_params(masks) == 2 * sum(np.shape(m)[1] for m in jax.tree.leaves(masks))
    params = {"base": base, "peft": {}}
    labels = labels_lib.make_labels(params, gps.trainable_rules(masks))
    # weight decay would move every entry of a trained kernel if the updates were not masked too
    tx = gps.optimizer(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1)), masks)
    state = TrainState.create(params, labels, tx, jax.random.PRNGKey(0))
    # the dense reference: optimizer moments of the full kernels (Eq. 5.5) and one bool per weight
    moments = [x for x in jax.tree.leaves(state.opt_state.inner) if x.ndim == 2]
    assert sum(x.size for x in moments) == 2 * sum(m.size for m in jax.tree.leaves(masks))
    step = jax.jit(make_train_step(lm_loss(module, []), tx))
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    new = state.params["base"]
    for path, m in ((p, pb.get_path(masks, p + ("kernel",))) for p in pb.module_paths(masks)):
        changed = np.asarray(pb.get_path(new, path + ("kernel",)) != pb.get_path(base, path + ("kernel",)))
        assert not np.any(changed & ~np.asarray(m))  # nothing outside the mask moved
        assert np.all(changed[np.asarray(m)])  # every selected entry did
    untargeted = [(pth, a, b) for (pth, a), b in zip(jax.tree_util.tree_leaves_with_path(new),
                                                      jax.tree.leaves(base), strict=True)
                  if "proj" not in jax.tree_util.keystr(pth)]
    assert untargeted and all(np.array_equal(a, b) for _, a, b in untargeted)


# ------------------------------------------------------------------------------------------ thesis checks


def test_table_5_2_parameter_counts_via_params_cli():
    from vlpeft_jax.cli.params import count

    want = {"top1": "0.020", "top20": "0.404"}
    for variant, k in (("top1", 1), ("top20", 20)):
        out = count(load_config_file("configs/llama7b_neuroada.py", variant))
        stage = out["stages"]["neuroada"]
        neurons = 32 * (4 * 4096 + 2 * 11008 + 4096)  # q, k, v, o, gate, up, down outputs per layer
        assert out["base_total"] == 6_738_415_616  # LLaMA-7B
        assert stage["trainable"] == k * neurons
        assert f"{stage['trainable_pct']:.3f}" == want[variant]


def test_table_5_1_memory_per_projection():
    # (d_model, Mask [MB], NeuroAda [MB], saving ratio) as printed in Table 5.1
    table = [(4096, "2.00", "0.016", 125), (5120, "3.13", "0.020", 156)]
    for d, mask_mb, ada_mb, ratio in table:
        m = projection_memory(d, d, k=1)
        assert f"{m['mask_mb'] + 1e-12:.2f}" == mask_mb and f"{m['neuroada_mb']:.3f}" == ada_mb
        assert int(float(mask_mb) / float(ada_mb)) == ratio  # the table divides its rounded MB values
        assert m["ratio"] == d / 32  # unrounded: d²/8 bytes vs 4d bytes
        assert m["adamw_masked_bytes"] == 2 * d * d * 4 and m["adamw_neuroada_bytes"] == 2 * d * 4  # Eq. 5.5-5.6
        assert m["adamw_masked_bytes"] // m["adamw_neuroada_bytes"] == d  # "a 5120x reduction" for d_in = 5120


def test_shapes_sparse_config_variants():
    for variant in ("top1", "top20", "random", "coverage50", "lora_r2"):
        cfg = load_config_file("configs/shapes_sparse.py", variant + ",smoke")
        methods = build_methods(cfg.peft)
        assert set(methods) == {cfg.stages[0]["methods"][0]}
    assert build_methods(load_config_file("configs/shapes_sparse.py", "coverage25").peft)["neuroada"].budget > 0
    with pytest.raises(ConfigError, match="unknown variant"):
        load_config_file("configs/shapes_sparse.py", "top3")


def test_params_cli_counts_gps_and_gradient_selection_abstractly(tmp_path):
    from vlpeft_jax.cli import params as params_cli

    counts = {}
    for variant in ("gps", "gradient", "magnitude", "gps_top1", "top1"):
        cfg = load_config_file("configs/shapes_sparse.py", variant + ",smoke")
        cfg.data.cache_dir = str(tmp_path)
        counts[variant] = next(iter(params_cli.count(cfg)["stages"].values()))["trainable"]
    # k connections per neuron of every projection, whichever way they are trained or selected
    assert counts["gps"] == counts["gradient"] == counts["magnitude"] == 4 * counts["top1"]
    assert counts["gps_top1"] == counts["top1"] > 0


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_inputs(llama):
    module, base, batch, _ = llama
    with pytest.raises(ConfigError, match=r"neuroada.k=33 is larger than the input width of .*q_proj.*at most 32"):
        NeuroAda(targets=("q_proj",), k=33).init(jax.random.key(0), base)
    with pytest.raises(ConfigError, match=r"neuroada.budget=10.0 gives k=.* < 1"):
        NeuroAda(targets=TARGETS, budget=10.0).init(jax.random.key(0), base)
    with pytest.raises(ConfigError, match=r"'self_attn'.*has no weight.*q_proj"):
        NeuroAda(targets=("self_attn",)).init(jax.random.key(0), base)
    with pytest.raises(ConfigError, match="input_layernorm.*has no weight"):
        gps_lib.GPS(targets=("input_layernorm",), selection="magnitude").masks(jax.random.key(0), base)
    with pytest.raises(ConfigError, match="needs a selection dataset"):
        NeuroAda(targets=TARGETS, selection="gradient").init(jax.random.key(0), base)
    with pytest.raises(ConfigError, match="needs a selection dataset"):
        gps_lib.GPS(targets=TARGETS).masks(jax.random.key(0), base)
    with pytest.raises(ConfigError, match="needs a selection dataset, but no batch"):
        selection.gradient_scores(lambda p, b: 0.0, base, [], TARGETS)
    with pytest.raises(ConfigError, match="neuroada.mode='dense'"):
        NeuroAda(mode="dense")
    with pytest.raises(ConfigError, match="neuroada.k=0"):
        NeuroAda(k=0)
    with pytest.raises(ConfigError, match="neuron_fraction=0"):
        NeuroAda(neuron_fraction=0.0)
    with pytest.raises(ConfigError, match="selection='top'"):
        gps_lib.GPS(selection="top")
    conv = {"conv": {"kernel": jnp.ones((3, 3, 4, 8))}}
    with pytest.raises(ConfigError, match="4-D kernel"):
        NeuroAda(targets=("conv",)).init(jax.random.key(0), conv)
    # GPS reads a convolution kernel as [-1, out]: every output channel gets k of its 36 inputs
    m = gps_lib.GPS(targets=("conv",), k=2, selection="random").masks(jax.random.key(0), conv)["conv"]["kernel"]
    np.testing.assert_array_equal(np.asarray(m).reshape(-1, 8).sum(0), np.full(8, 2))


def test_lora_and_neuroada_stack(llama):
    # NeuroAda composes with other linear hooks (e.g. LoRA on the same projection)
    module, base, batch, _ = llama
    ada = NeuroAda(targets=("q_proj",), k=1)
    lora = LoRA(targets=("q_proj",), rank=2)
    pa = _random_values(ada.init(jax.random.key(0), base), jax.random.key(1))
    pl = jax.tree.map(lambda x: x + 0.1, lora.init(jax.random.key(2), base))
    y = _logits(module, base, batch, [(ada, pa), (lora, pl)])
    np.testing.assert_allclose(y, _logits(module, lora.merge(ada.merge(base, pa), pl), batch), rtol=1e-5, atol=1e-5)
