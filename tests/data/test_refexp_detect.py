"""The simulated detector of the detected-box setting (Table 3.2 analogue; spec §11.9, B9-B10)."""

import numpy as np
import pytest

from vlpeft_jax.data import refexp as rx
from vlpeft_jax.errors import ConfigError, InputError


def _iou_loop(a, b):
    out = np.zeros((len(a), len(b)))
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            w = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            h = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - w * h
            out[i, j] = w * h / union if union > 0 else 0.0
    return out


@pytest.fixture(scope="module")
def data():
    return rx.build_refexp(rx.RefExpConfig(num_train=8, num_val=200, num_test=8))


def test_box_iou_by_hand():
    a = np.array([[0, 0, 4, 4], [2, 2, 6, 6], [0, 0, 1, 1]], np.float64)
    b = np.array([[0, 0, 4, 4], [4, 4, 8, 8], [1, 1, 3, 3], [0, 0, 0, 0]], np.float64)
    np.testing.assert_allclose(rx.box_iou(a, b), _iou_loop(a, b))
    assert rx.box_iou(a, b)[0, 0] == 1.0 and rx.box_iou(a, b)[1, 0] == pytest.approx(4 / 28)
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 20, (7, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 10, (7, 2))], 1)
    np.testing.assert_allclose(rx.box_iou(boxes, boxes[::-1]), _iou_loop(boxes, boxes[::-1]))


def test_without_noise_the_detections_are_the_ground_truth(data):
    noise = rx.DetectionNoise(max_boxes=20, jitter=0.0, flip=0.0, spurious=0)
    for ex in data["val"][:20]:
        d = rx.detect(ex, noise, data.fact_base.categories)
        assert sorted(map(tuple, d.boxes.tolist())) == sorted(map(tuple, np.asarray(ex.boxes).tolist()))
        gt = {tuple(b): c for b, c in zip(np.asarray(ex.boxes).tolist(), ex.categories, strict=True)}
        assert all(gt[tuple(b)] == c for b, c in zip(d.boxes.tolist(), d.categories, strict=True))
        assert d.boxes[d.target].tolist() == np.asarray(ex.boxes)[ex.target].tolist()
        assert d.meta["target_detected"] and d.meta["category_correct"]
        assert (d.expr_id, d.expression, d.fact_id) == (ex.expr_id, ex.expression, ex.fact_id)


def test_flips_spurious_boxes_and_the_box_budget(data):
    cats = data.fact_base.categories
    flipped = [rx.detect(ex, rx.DetectionNoise(jitter=0.0, flip=1.0, spurious=0, max_boxes=20), cats)
               for ex in data["val"][:30]]
    assert all(d.meta["target_detected"] and not d.meta["category_correct"] for d in flipped)
    for ex, d in zip(data["val"][:30], flipped, strict=True):
        # every detection keeps its box but none its category
        gt = {tuple(b): c for b, c in zip(np.asarray(ex.boxes).tolist(), ex.categories, strict=True)}
        assert all(gt[tuple(b)] != c and c in cats for b, c in zip(d.boxes.tolist(), d.categories, strict=True))
    many = rx.DetectionNoise(jitter=0.0, flip=0.0, spurious=6, max_boxes=20)
    few = rx.DetectionNoise(jitter=0.0, flip=0.0, spurious=6, max_boxes=3)
    found = {}
    for name, noise in (("many", many), ("few", few)):
        dets = [rx.detect(ex, noise, cats) for ex in data["val"]]
        assert all(len(d.boxes) == min(noise.max_boxes, len(ex.boxes) + 6)
                   for d, ex in zip(dets, data["val"], strict=True))
        found[name] = np.mean([d.meta["target_detected"] for d in dets])
        for d in dets:  # target -1 exactly when no detection overlaps the target box by IoU >= 0.5
            iou = rx.box_iou(d.boxes, [d.meta["gt_box"]])[:, 0]
            assert (d.target >= 0) == (iou.max() >= 0.5) and (d.target < 0 or iou[d.target] == iou.max())
            x = d.boxes
            assert (x[:, 0] >= 0).all() and (x[:, 2] <= 64).all() and (x[:, 2] > x[:, 0]).all()
    assert found["many"] == 1.0 and found["few"] < 0.8  # a 3-box budget loses targets, as m10 vs m100 does


def test_noise_statistics_and_determinism(data):
    cats = data.fact_base.categories
    noise = rx.DetectionNoise(jitter=0.1, flip=0.3, spurious=0, max_boxes=20)
    dets = [rx.detect(ex, noise, cats) for ex in data["val"]]
    detected = [d for d in dets if d.meta["target_detected"]]
    assert len(detected) > 0.9 * len(dets)  # a 10 % edge jitter keeps most boxes at IoU >= 0.5
    kept = np.mean([d.meta["category_correct"] for d in detected])
    assert abs(kept - 0.7) < 4 * np.sqrt(0.21 / len(detected))  # P(category kept) = 1 - flip
    again = [rx.detect(ex, noise, cats) for ex in data["val"]]
    assert all(np.array_equal(a.boxes, b.boxes) and a.categories == b.categories for a, b in zip(dets, again,
                                                                                              strict=True))
    by_image = {}
    for ex, d in zip(data["val"], dets, strict=True):  # the expressions of one image see the same detections
        prev = by_image.setdefault(ex.image_id, d)
        assert np.array_equal(prev.boxes, d.boxes) and prev.categories == d.categories
    other = [rx.detect(ex, rx.DetectionNoise(jitter=0.1, flip=0.3, spurious=0, max_boxes=20, seed=1), cats)
             for ex in data["val"][:10]]
    assert any(not np.array_equal(a.boxes, b.boxes) for a, b in zip(dets, other, strict=False))


def test_bad_detector_settings(data):
    with pytest.raises(ConfigError, match="eval.detect: unknown key.*boxes.*valid: max_boxes"):
        rx.DetectionNoise.from_config({"boxes": 3})
    for key, value in (("max_boxes", 0), ("flip", 1.5), ("jitter", -0.1), ("spurious", -1)):
        with pytest.raises(ConfigError, match=f"eval.detect.{key}="):
            rx.DetectionNoise(**{key: value})
    with pytest.raises(InputError, match="not among the detector's categories"):
        rx.detect(data["val"][0], rx.DetectionNoise(), ["purple hexagon"])
