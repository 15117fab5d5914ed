"""The classification task and the vision_classifier model: losses, accuracy/mAP against references, batches,
parameter paths, bad input, ``run.py params`` and a linear probe through the runner."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpeft_jax import tasks
from vlpeft_jax.config import load_config_file
from vlpeft_jax.data import shapes
from vlpeft_jax.errors import ConfigError
from vlpeft_jax.models import layers, registry
from vlpeft_jax.tasks import classification as cls_task
from vlpeft_jax.tasks.classification import (
    ClassificationTask,
    average_precision,
    head_metrics,
    mean_average_precision,
    multi_label_loss,
    single_label_loss,
)
from vlpeft_jax.tree import leaf_paths

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs/shapes_classify.py")
TINY_VIT = dict(family="vit", image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=32, add_pooling_layer=False)


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def hand_ap(scores, positives):
    """AP as the mean over positives of the precision at the last image scoring at least as high (ties count
    as one threshold): the textbook definition, written independently of the implementation."""
    scores, positives = np.asarray(scores, np.float64), np.asarray(positives) > 0
    precisions = []
    for s in scores[positives]:
        above = scores >= s
        precisions.append(positives[above].sum() / above.sum())
    return float(np.mean(precisions))


def abstract_params(module, inputs):
    return jax.eval_shape(lambda: layers.unbox(module.init(jax.random.key(0), **inputs))["params"])


@pytest.fixture(scope="module")
def tiny_world():
    return shapes.generate(shapes.ShapesWorldConfig(num_train=24, num_val=10, num_test=2, num_ood=2, image_size=32))


def tiny_config(**overrides):
    cfg = load_config_file(CONFIG + ":smoke")
    cfg.model.vision.update(image_size=16, patch_size=8, hidden_size=16, num_attention_heads=2)
    cfg.eval.update(batch_size=4, max_examples=0)
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def task(tiny_world):
    return ClassificationTask(tiny_config(), world=tiny_world)


# ------------------------------------------------------------------------------------------- losses


def test_single_label_loss_is_mean_softmax_cross_entropy():
    logits = np.array([[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 0.3, -3.0], [5.0, 5.0, -5.0, 1.0]], np.float32)
    labels = np.array([0, 3, 1])
    want = -np_log_softmax(logits)[np.arange(3), labels].mean()
    np.testing.assert_allclose(float(single_label_loss(logits, labels)), want, rtol=1e-6)


def test_multi_label_loss_is_mean_sigmoid_binary_cross_entropy():
    logits = np.array([[2.0, -1.0, 0.5], [0.1, -8.0, 3.0]], np.float32)
    targets = np.array([[1, 0, 0], [1, 1, 0]])
    p = np_sigmoid(logits)
    want = -(targets * np.log(p) + (1 - targets) * np.log(1 - p)).mean()
    np.testing.assert_allclose(float(multi_label_loss(logits, targets)), want, rtol=1e-6)


def test_task_loss_is_the_sum_of_the_head_losses(task):
    module, _ = registry.build_model(task.model_config())
    batch = jax.tree.map(jnp.asarray, {k: v for k, v in task.train_batches(seed=3).batch(1).items()
                                       if k in ("pixel_values", "labels")})
    base = layers.unbox(module.init(jax.random.key(0), batch["pixel_values"]))["params"]
    # heads at a scale where the losses differ clearly from their values at zero logits
    base["heads"] = jax.tree.map(lambda x: x * 50.0, base["heads"])
    loss, metrics = task.loss_fn(module, [], {})({"base": base, "peft": {}}, batch, jax.random.key(1))
    logits = module.apply({"params": base}, batch["pixel_values"]).logits
    y_count, y_shapes = np.asarray(batch["labels"]["count"]), np.asarray(batch["labels"]["shape_presence"])
    ce = -np_log_softmax(logits["count"])[np.arange(len(y_count)), y_count].mean()
    p = np_sigmoid(logits["shape_presence"])
    bce = -(y_shapes * np.log(p) + (1 - y_shapes) * np.log(1 - p)).mean()
    np.testing.assert_allclose(float(metrics["count/loss"]), ce, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["shape_presence/loss"]), bce, rtol=1e-5)
    np.testing.assert_allclose(float(loss), ce + bce, rtol=1e-5)
    acc = np.mean(np.asarray(logits["count"]).argmax(-1) == y_count)
    assert float(metrics["count/accuracy"]) == pytest.approx(acc)
    assert "shape_presence/accuracy" not in metrics


# ------------------------------------------------------------------------------------------- metrics


def test_average_precision_by_hand():
    # ranks: + - + - : P@1 = 1, P@3 = 2/3
    assert average_precision([0.9, 0.8, 0.3, 0.1], [1, 0, 1, 0]) == pytest.approx((1 + 2 / 3) / 2)
    # a tie between a positive and a negative at the top is one threshold: precision 1/2 there
    assert average_precision([0.9, 0.9, 0.2], [1, 0, 1]) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert average_precision([0.5, 0.5, 0.5, 0.5], [1, 0, 0, 0]) == pytest.approx(0.25)  # constant scores: prevalence
    with pytest.raises(ValueError):
        average_precision([0.1, 0.2], [0, 0])


@pytest.mark.parametrize("seed", range(6))
def test_average_precision_against_hand_definition_and_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 40))
    scores = np.round(rng.random(n), 1)  # rounding makes ties
    positives = rng.random(n) < 0.4
    positives[int(rng.integers(n))] = True
    ap = average_precision(scores, positives)
    assert ap == pytest.approx(hand_ap(scores, positives), abs=1e-12)
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    assert ap == pytest.approx(sklearn_metrics.average_precision_score(positives, scores), abs=1e-12)


def test_mean_average_precision_skips_classes_without_positives():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random((30, 5)), 2)
    positives = (rng.random((30, 5)) < 0.3).astype(int)
    positives[:, 2] = 0  # class 2 never present: no AP
    want = np.mean([hand_ap(scores[:, c], positives[:, c]) for c in (0, 1, 3, 4)])
    assert mean_average_precision(scores, positives) == pytest.approx(want, abs=1e-12)
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    present = positives.any(0)
    ref = sklearn_metrics.average_precision_score(positives[:, present], scores[:, present], average="macro")
    assert mean_average_precision(scores, positives) == pytest.approx(ref, abs=1e-12)
    assert np.isnan(mean_average_precision(scores, np.zeros_like(positives)))


def test_head_metrics_single_label():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3], [0.4, 0.35, 0.25]])
    labels = np.array([0, 2, 0, 1])
    train = np.array([1, 1, 0, 2, 1])  # majority class 1
    metrics, unavailable = head_metrics("count", probs, labels, train)
    assert unavailable == {}
    assert metrics["accuracy"] == pytest.approx(0.5)  # rows 0 and 1
    assert metrics["chance accuracy"] == pytest.approx(0.25)  # one image is of class 1
    onehot = np.eye(3)[labels]
    assert metrics["mAP"] == pytest.approx(np.mean([hand_ap(probs[:, c], onehot[:, c]) for c in range(3)]))
    assert metrics["chance mAP"] == pytest.approx(np.mean([2 / 4, 1 / 4, 1 / 4]))


def test_head_metrics_multi_label():
    probs = np.array([[0.9, 0.1, 0.4], [0.2, 0.8, 0.6], [0.7, 0.3, 0.1]])
    labels = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]])  # class 2 never present
    metrics, unavailable = head_metrics("shape_presence", probs, labels, labels)
    assert set(metrics) == {"mAP", "chance mAP"} and unavailable == {}
    assert metrics["mAP"] == pytest.approx(np.mean([1.0, hand_ap(probs[:, 1], labels[:, 1])]))
    assert metrics["chance mAP"] == pytest.approx(np.mean([2 / 3, 2 / 3]))
    _, unavailable = head_metrics("shape_presence", probs, np.zeros_like(labels), labels)
    assert "mAP" in unavailable


# ------------------------------------------------------------------------------------------- batches


def test_batches_are_a_function_of_seed_and_step(task, tiny_world):
    a, b = task.train_batches(seed=5), task.train_batches(seed=5)
    for step in (0, 3, 7):  # 7: a later epoch
        x, y = a.batch(step), b.batch(step)
        assert np.array_equal(x["example_index"], y["example_index"])
        assert np.array_equal(x["pixel_values"], y["pixel_values"])
    other = task.train_batches(seed=6).batch(0)
    assert not np.array_equal(other["example_index"], a.batch(0)["example_index"])
    x = a.batch(2)
    for head in task.groups:
        assert np.array_equal(x["labels"][head], tiny_world.train.labels(head)[x["example_index"]])
    assert x["labels"]["shape_presence"].shape == (x["example_index"].size, len(shapes.SHAPES))
    assert x["pixel_values"].shape[1:] == (16, 16, 3)  # resized from the world's 32 to the tower's 16


def test_selection_batches(task):
    batches = list(task.selection_batches({"num_batches": 2, "batch_size": 4}, seed=0))
    assert len(batches) == 2 and batches[0]["pixel_values"].shape == (4, 16, 16, 3)
    assert set(batches[0]["labels"]) == set(task.groups)
    with pytest.raises(ConfigError, match="domain"):
        task.selection_batches({"num_batches": 1, "domain": "target"}, seed=0)


def test_evaluate_shapes_outputs_and_samples(task):
    module, inputs = registry.build_model(task.model_config())
    base = layers.unbox(module.init(jax.random.key(0), **inputs))["params"]
    res = task.evaluate(module, {"base": base, "peft": {}}, [])
    assert set(res) == {"count", "shape_presence", "samples", "outputs"}
    assert set(res["count"]["metrics"]) == {"accuracy", "mAP", "chance accuracy", "chance mAP"}
    assert set(res["shape_presence"]["metrics"]) == {"mAP", "chance mAP"}
    assert all(0.0 <= v <= 1.0 for h in task.groups for v in res[h]["metrics"].values())
    assert len(res["outputs"]) == 10  # every val image (eval batches of 4: one padded batch)
    first = res["outputs"]["val_000000"]
    assert first["count"]["prediction"] in shapes.LABEL_CLASSES["count"]
    assert len(first["shape_presence"]["scores"]) == len(shapes.SHAPES)
    stem, rows = task.outputs_file(res["outputs"])
    assert stem == "predictions" and rows[0]["image_id"] == "val_000000"
    json.dumps(rows)
    samples = task.samples({"adapted": res}, 3)
    assert len(samples) == 3 and samples[0].lines[0].startswith("adapted: count=")
    assert samples[0].lines[-1].startswith("true: count=")


# ------------------------------------------------------------------------------------------- model


def test_classifier_paths_are_the_towers_and_the_vlms():
    heads = {"count": 4, "shape_presence": 5}
    m, inputs = registry.build_model(dict(family="vision_classifier", vision=TINY_VIT, heads=heads))
    params = abstract_params(m, inputs)
    tower, tin = registry.build_model(TINY_VIT)
    tower_params = abstract_params(tower, tin)
    assert leaf_paths(params["vision_tower"]) == leaf_paths(tower_params)
    assert sorted(leaf_paths(params["heads"])) == ["count/bias", "count/kernel", "shape_presence/bias",
                                                   "shape_presence/kernel"]
    assert sorted(params) == ["heads", "vision_tower"]

    vlm = dict(family="prefix_vlm", vision=TINY_VIT, connector=dict(kind="mlp", num_layers=2, feature="patches"),
               decoder=dict(family="llama", vocab_size=20, hidden_size=24, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1))
    m, inputs = registry.build_model(dict(family="vision_classifier", vlm=vlm, heads=heads, pool="mean"))
    params = abstract_params(m, inputs)
    full, fin = registry.build_model(vlm)
    vlm_params = abstract_params(full, fin)
    for sub in ("vision_tower", "multi_modal_projector"):
        assert jax.tree.map(lambda x: x.shape, params[sub]) == jax.tree.map(lambda x: x.shape, vlm_params[sub])
    out = jax.eval_shape(lambda: m.apply({"params": m.init(jax.random.key(0), **inputs)["params"]}, **inputs))
    assert out.logits["count"].shape == (1, 4) and out.features.shape == (1, 24)


@pytest.mark.parametrize("model, match", [
    (dict(family="vision_classifier", vision=TINY_VIT, heads={"count": 4}, pool="max"), "pool"),
    (dict(family="vision_classifier", vision=TINY_VIT, heads={}), "at least one head"),
    (dict(family="vision_classifier", vision=TINY_VIT, heads={"count": 0}), "number of classes"),
    (dict(family="vision_classifier", heads={"count": 4}), "exactly one of"),
    (dict(family="vision_classifier", vision=TINY_VIT, heads={"count": 4}, dropout=0.1), "no setting"),
])
def test_bad_model_configs(model, match):
    with pytest.raises(ConfigError, match=match):
        registry.build_model(model)


def test_bad_task_configs(tiny_world):
    with pytest.raises(ConfigError, match="unknown label.*'colour'.*valid: count"):
        ClassificationTask(tiny_config(heads=["count", "colour"]), world=tiny_world)
    with pytest.raises(ConfigError, match="twice"):
        ClassificationTask(tiny_config(heads=["count", "count"]), world=tiny_world)
    cfg = tiny_config()
    cfg.model.family = "prefix_vlm"
    with pytest.raises(ConfigError, match="vision_classifier"):
        ClassificationTask(cfg, world=tiny_world)
    with pytest.raises(ConfigError, match="unknown variant 'bogus'"):
        load_config_file(CONFIG + ":bogus")


def test_groups_follow_the_config(tiny_world):
    assert tasks.task_class("classification").groups == cls_task.DEFAULT_HEADS
    cfg = tiny_config(heads=["color_presence", "position"])
    task = tasks.build(cfg, world=tiny_world)
    assert task.groups == ("color_presence", "position") == ClassificationTask.groups_for(cfg)
    # model.heads in the config (the smoke config's are count/shape_presence) is replaced by the task's
    assert task.model_config()["heads"] == {"color_presence": len(shapes.COLORS), "position": 9}


# ------------------------------------------------------------------------------------------- CLI and runner


def test_params_cli_counts_exactly_the_heads(capsys):
    from vlpeft_jax.cli import params

    assert params.main(["--config", CONFIG, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    cfg = load_config_file(CONFIG)
    width = cfg.model.vision.hidden_size
    classes = shapes.ShapesWorldConfig().label_classes()
    heads = sum(width * len(classes[h]) + len(classes[h]) for h in cfg.heads)
    tower, inputs = registry.build_model(cfg.model.vision.to_dict())
    tower_total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(tower, inputs)))
    assert out["stages"]["probe"]["trainable"] == heads
    assert out["base_total"] == tower_total + heads


@pytest.mark.slow
def test_linear_probe_trains_only_the_heads(shapes_caches, tmp_path):
    from vlpeft_jax.experiments import runner

    cfg = load_config_file(CONFIG + ":smoke")
    cfg.data.cache_dir = str(shapes_caches["data"])
    cfg.run_dir = str(tmp_path / "run")
    results = runner.run(cfg)
    assert results["task"] == "classification" and "zero_shot" not in results
    assert results["params"]["trainable"] == sum(32 * n + n for n in (4, 5))  # smoke width 32: kernel + bias
    for head in ("count", "shape_presence"):
        assert "mAP" in results["adapted"][head]["metrics"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| model | head | accuracy | mAP |" in report and "| shapes_classify | shape_presence | n/a |" in report
    assert (tmp_path / "run" / "predictions_adapted.json").is_file()

    initial = runner.build(cfg).base  # the same seed: the base the run started from
    _, params = runner.load_final(tmp_path / "run", cfg)
    before = dict(zip(leaf_paths(initial), jax.tree.leaves(initial), strict=True))
    after = dict(zip(leaf_paths(params["base"]), jax.tree.leaves(params["base"]), strict=True))
    assert before.keys() == after.keys()
    changed = sorted(p for p in before if not np.array_equal(np.asarray(before[p]), np.asarray(after[p])))
    assert changed == ["heads/count/bias", "heads/count/kernel", "heads/shape_presence/bias",
                       "heads/shape_presence/kernel"]
