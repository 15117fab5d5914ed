"""Multi-task runs through the experiment runner (``configs/shapes_mtl.py``): patch-level labels and heads,
sparse training end to end, the sweep's multi-task summary, bad multi-task settings."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlpeft_jax import tasks
from vlpeft_jax.cli.config import apply_overrides, load_config_file
from vlpeft_jax.data import shapes
from vlpeft_jax.errors import ConfigError
from vlpeft_jax.experiments import multitask, runner, sweep
from vlpeft_jax.models import layers
from vlpeft_jax.models.classifier import VisionClassifier
from vlpeft_jax.models.vit import ViTConfig, ViTModel
from vlpeft_jax.mtl import conflict, psn


def _config(variant, root, caches):
    cfg = load_config_file("configs/shapes_mtl.py", f"{variant},smoke")
    cfg = apply_overrides(cfg, [f"--config.pretrain.cache_dir={caches['pretrain']}",
                                f"--config.data.cache_dir={caches['data']}"])
    cfg.run_dir = str(root / variant.replace(",", "_"))
    return cfg


# ------------------------------------------------------------------------------------ labels and heads


def test_patch_labels_by_hand():
    """A 16x16 image, patches of 8: object 0 (a square) fills patch 0; object 1 (a circle) covers 1/4 of patch 3
    and 1/16 of patch 2 (below the 10% threshold)."""
    seg = np.zeros((1, 16, 16), np.int8)
    seg[0, 0:8, 0:8] = 1
    seg[0, 12:16, 12:16] = 2
    seg[0, 8:10, 0:2] = 2
    scenes = [{"objects": [{"shape": "square", "color": "red"}, {"shape": "circle", "color": "blue"}]}]
    split = shapes.ShapesSplit("train", np.zeros((1, 16, 16, 3), np.uint8), seg, scenes, shapes.ShapesWorldConfig())
    classes = shapes.PATCH_LABEL_CLASSES
    assert split.patch_labels("patch_shape", 8).tolist() == [[classes["patch_shape"].index("square"), 0, 0,
                                                              classes["patch_shape"].index("circle")]]
    assert split.patch_labels("patch_color", 8).tolist() == [[classes["patch_color"].index("red"), 0, 0,
                                                              classes["patch_color"].index("blue")]]
    square = classes["patch_shape"].index("square")
    assert split.patch_labels("patch_shape", 8, min_fraction=0.5).tolist() == [[square, 0, 0, 0]]


def test_patch_heads_read_every_patch_token():
    tower = ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                               image_size=16, patch_size=8, add_pooling_layer=False))
    model = VisionClassifier(tower, num_classes=(("count", 4), ("patch_shape", 6)), patch_heads=("patch_shape",))
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    params = layers.unbox(model.init(jax.random.key(0), x))["params"]
    out = model.apply({"params": params}, x)
    assert out.logits["count"].shape == (2, 4) and out.logits["patch_shape"].shape == (2, 4, 6)
    head = params["heads"]["patch_shape"]
    np.testing.assert_allclose(out.logits["patch_shape"], out.tokens[:, 1:] @ head["kernel"] + head["bias"],
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="patch_heads"):
        VisionClassifier(tower, num_classes=(("count", 4),), patch_heads=("patch_shape",))


def test_config_budgets_are_the_thesis_fractions():
    """K_PRETRAINED / K_RANDOM give about 30% / 60% of all parameters trainable (thesis Sec. 6.4.4, Table 17)."""
    from configs import shapes_mtl

    cfg = load_config_file("configs/shapes_mtl.py", "ls")
    task = tasks.build(cfg)
    from vlpeft_jax.models import registry

    module, inputs = registry.build_model(task.model_config())
    abstract = runner.abstract_base(module, inputs)
    total = psn.count_params(abstract)
    assert abs(psn.count_trainable(abstract, shapes_mtl.K_PRETRAINED) / total - 0.30) < 0.01
    assert abs(psn.count_trainable(abstract, shapes_mtl.K_RANDOM) / total - 0.60) < 0.01


# ------------------------------------------------------------------------------------ the sweep summary


def test_sweep_summary_delta_m_by_hand():
    def result(metrics, p=None):
        r = {"adapted": {h: {"metrics": m} for h, m in metrics.items()}, "params": {"trainable_pct": 100.0}}
        if p is not None:
            r["mtl"] = {"p_full": {"all": p, "last_half": p + 1}}
        return r

    results = {"stl_a": [result({"a": {"accuracy": 0.5}})],
               "stl_b": [result({"b": {"accuracy": 0.8, "mIoU": 0.4}})],
               "ls": [result({"a": {"accuracy": 0.6}, "b": {"accuracy": 0.8, "mIoU": 0.3}}, 40.0),
                      result({"a": {"accuracy": 0.5}, "b": {"accuracy": 0.6, "mIoU": 0.4}}, 20.0)]}
    summary = multitask.sweep_summary(results, {k: "g" for k in results})
    # STL: a 0.5, b (0.8, 0.4); per seed, flat over (a acc, b acc, b mIoU), lower is better:
    d0, d1 = (-20.0 + 0.0 + 25.0) / 3, (0.0 + 25.0 + 0.0) / 3
    assert summary["ls"]["delta_m"][0] == pytest.approx((d0 + d1) / 2)
    assert summary["ls"]["delta_m"][1] == pytest.approx(abs(d0 - d1) / 2)
    assert summary["ls"]["p_full_all"] == pytest.approx((30.0, 10.0))
    assert summary["stl_a"]["single_task"] and summary["stl_a"]["delta_m"] is None
    assert summary["ls"]["b mIoU"] == pytest.approx((35.0, 5.0))
    # a group without single-task runs gets no Δm
    assert multitask.sweep_summary(results, {"stl_a": "g", "stl_b": "g", "ls": "other"})["ls"]["delta_m"] is None
    assert "Δm%" in sweep.mtl_table(summary)


# ------------------------------------------------------------------------------------ bad settings


def test_bad_multitask_settings_are_one_error_each():
    def cfg(**mtl):
        return ml_collections.ConfigDict({"seed": 0, "mtl": mtl})

    with pytest.raises(ConfigError, match="unknown key"):
        multitask.settings(cfg(method="ls", lr=1.0))
    with pytest.raises(ConfigError, match="unknown gradient-manipulation method"):
        multitask.settings(cfg(method="gradnorm"))
    with pytest.raises(ConfigError, match="unknown option"):
        multitask.settings(cfg(method="cagrad", options={"c": 0.4, "calpha": 0.5}))
    with pytest.raises(ConfigError, match="variant"):
        multitask.settings(cfg(method="ls", sparse={"k": 2, "variant": "bottom"}))
    with pytest.raises(ConfigError, match="not both"):
        multitask.settings(cfg(method="ls", sparse={"k": 2, "monitor_k": 2}))
    with pytest.raises(ConfigError, match="mask_mode"):
        multitask.settings(cfg(method="ls", sparse={"k": 2, "mask_mode": "monitor"}))
    assert multitask.settings(cfg(method="")) is None
    # a pretrain.keep path that is no module of the model
    fresh = {"vision_tower": {"w": jnp.zeros(2)}, "heads": {}}
    with pytest.raises(ConfigError, match="pretrain.keep"):
        runner.keep_subtrees(fresh, fresh, ["vision"], "configs/x.py")
    with pytest.raises(ConfigError, match="different shapes"):
        runner.keep_subtrees({"vision_tower": {"w": jnp.zeros(3)}}, fresh, ["vision_tower"], "configs/x.py")


# ------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shapes_caches):
    """PCGrad with sparse training on the pretrained smoke tower, through the masked dense path and through the
    sparse deltas; each run's config, results and logged training rows."""
    root = tmp_path_factory.mktemp("mtl_runs")
    out = {}
    for variant in ("pcgrad,st", "pcgrad,st,deltas"):
        cfg = _config(variant, root, shapes_caches)
        results = runner.run(cfg)
        rows = [json.loads(x) for x in open(root / variant.replace(",", "_") / "metrics.jsonl")]
        out[variant] = (cfg, results, [r for r in rows if "loss" in r])
    return out


@pytest.mark.slow
def test_sparse_multitask_run_end_to_end(runs):
    """The run reports p% of both gradient streams and the mask's trainable %, the masked-out entries of the tower
    are the pretrained ones, the tower and heads trained."""
    cfg, results, rows = runs["pcgrad,st"]
    mtl = results["mtl"]
    for stream in ("p_full", "p_masked"):
        assert 0.0 <= mtl[stream]["all"] <= 100.0 and 0.0 <= mtl[stream]["last_half"] <= 100.0
    assert mtl["num_tasks"] == 4 and mtl["mask_mode"] == "pre"
    assert results["params"]["trainable_pct"] == pytest.approx(100 * mtl["trainable_fraction"])
    assert results["params"]["trainable_pct"] < 100.0
    assert "mIoU" in results["adapted"]["patch_shape"]["metrics"]
    _, params = runner.load_final(cfg.run_dir, cfg)
    initial = runner.build(cfg).base  # the pretrained tower and the heads' initialisation
    mask = psn.psn_mask(initial, cfg.mtl.sparse.k)
    changed = 0
    for path, before in jax.tree_util.tree_leaves_with_path(initial["vision_tower"]):
        after = params["base"]["vision_tower"]
        m = mask["vision_tower"]
        for k in path:
            after, m = after[k.key], m[k.key]
        assert np.array_equal(np.asarray(after)[~np.asarray(m)], np.asarray(before)[~np.asarray(m)]), path
        changed += int(not np.array_equal(np.asarray(after), np.asarray(before)))
    assert changed > 0
    assert not np.allclose(params["base"]["heads"]["count"]["kernel"], initial["heads"]["count"]["kernel"])
    inc = conflict.incidence([r["mtl/gc_full"] for r in rows], 6)
    assert inc.p_all == pytest.approx(mtl["p_full"]["all"])


@pytest.mark.slow
def test_sparse_deltas_path_trains_like_the_masked_dense_path(runs):
    """``deltas`` trains the PSN entries as NeuroAda's sparse deltas (no dense gradient of a frozen weight). Under Adam
    without weight decay that is the same optimisation as the masked dense path in ``pre`` mode: the same losses step
    by step, and the conflicts over the trained entries are the dense run's masked stream."""
    _, dense, dense_rows = runs["pcgrad,st"]
    _, sparse, sparse_rows = runs["pcgrad,st,deltas"]
    np.testing.assert_allclose([r["loss"] for r in sparse_rows], [r["loss"] for r in dense_rows], rtol=2e-5)
    assert [r["mtl/gc_full"] for r in sparse_rows] == [r["mtl/gc_masked"] for r in dense_rows]
    assert sparse["params"]["trainable_pct"] == pytest.approx(dense["params"]["trainable_pct"], rel=1e-6)


def test_a_method_needing_two_tasks_is_refused_before_training(tmp_path, shapes_caches):
    bad = _config("pcgrad", tmp_path, shapes_caches)
    bad.heads = ["count"]
    bad.model.heads = {"count": 4}
    del bad.model["patch_heads"]
    with pytest.raises(ConfigError, match="at least 2 tasks"):
        runner.run(bad)
    assert not (tmp_path / "pcgrad" / "checkpoints").exists()
