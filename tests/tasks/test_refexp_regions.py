"""Tests of vlpeft_jax.tasks.refexp_regions: RoI pooling weights, patch labels, the tower's training and features."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from vlpeft_jax.data.refexp import RefExample, RefExpConfig, build_refexp
from vlpeft_jax.errors import ConfigError, InputError
from vlpeft_jax.tasks import refexp_regions as rr
from vlpeft_jax.tasks.refexp import roi_features

TINY = dict(patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            batch_size=8, learning_rate=3e-3)


def pixel_weights(box: list[float], hw: tuple[int, int], p: int) -> np.ndarray:
    """Reference pooling weights for an integer box: pixels of the (clipped) box counted per patch."""
    h, w = hw
    mask = np.zeros((h, w))
    x1, y1, x2, y2 = (int(v) for v in box)
    mask[max(0, y1):max(0, min(h, y2)), max(0, x1):max(0, min(w, x2))] = 1
    per_patch = mask.reshape(h // p, p, w // p, p).sum((1, 3)).ravel()
    return per_patch / per_patch.sum()


@pytest.fixture(scope="module")
def data():
    return build_refexp(RefExpConfig(num_train=24, num_val=6, num_test=0))


@pytest.fixture(scope="module")
def trained(data):
    tower = rr.RegionTower(rr.TowerSettings(**TINY, steps=120), data.fact_base.categories, (64, 64))
    log = tower.fit(data["train"])
    return tower, log


# ------------------------------------------------------------------------------------------ pooling weights

def test_weights_by_hand():
    boxes = np.array([[2, 2, 6, 6],      # the centre: a quarter of each patch
                      [1, 0, 4, 3],      # inside patch 0
                      [3, 0, 6, 4],      # 1 column of patch 0 (area 4), 2 of patch 1 (area 8)
                      [0.5, 0, 4.5, 4],  # fractional: 3.5 x 4 in patch 0, 0.5 x 4 in patch 1
                      [-4, 4, 4, 12]])   # clipped at the border to [0, 4, 4, 8]: patch 2
    w = rr.box_patch_weights(boxes, (8, 8), 4)
    want = [[0.25] * 4, [1, 0, 0, 0], [1 / 3, 2 / 3, 0, 0], [0.875, 0.125, 0, 0], [0, 0, 1, 0]]
    np.testing.assert_allclose(w, want, rtol=1e-6, atol=1e-7)
    assert w.dtype == np.float32


def test_weights_match_pixel_counts_and_sum_to_one():
    rng = np.random.default_rng(0)
    hw, p = (16, 24), 4
    boxes = []
    while len(boxes) < 40:
        x1, x2 = sorted(rng.integers(-5, 30, 2))
        y1, y2 = sorted(rng.integers(-5, 22, 2))
        if min(x2, hw[1]) > max(x1, 0) and min(y2, hw[0]) > max(y1, 0):
            boxes.append([x1, y1, x2, y2])
    w = rr.box_patch_weights(np.array(boxes), hw, p)
    assert w.shape == (40, (16 // 4) * (24 // 4))
    np.testing.assert_allclose(w.sum(1), 1, rtol=1e-6)
    np.testing.assert_allclose(w, np.stack([pixel_weights(b, hw, p) for b in boxes]), atol=1e-6)


@pytest.mark.parametrize("box", [[4, 4, 4, 8], [5, 1, 2, 6], [8, 0, 12, 4], [0, -3, 4, 0], [0, 0, np.nan, 3]])
def test_weights_reject_boxes_covering_no_pixel(box):
    with pytest.raises(InputError, match="box 0|non-finite"):
        rr.box_patch_weights(np.array([box], np.float32), (8, 8), 4)


def test_weights_reject_bad_shapes():
    with pytest.raises(InputError, match=r"\[n, 4\]"):
        rr.box_patch_weights(np.zeros((2, 3)), (8, 8), 4)
    with pytest.raises(InputError, match="not a grid"):
        rr.box_patch_weights(np.array([[0, 0, 2, 2]]), (8, 8), 3)


# -------------------------------------------------------------------------------------------- patch labels

def test_patch_labels_by_hand():
    # a 16x16 image, 4x4 patches, centres at 2, 6, 10, 14 on each axis
    boxes = np.array([[0, 0, 16, 8],     # label 5: the top two patch rows
                      [4, 0, 12, 4],     # label 7: smaller, wins over box 0 at centres (6, 2) and (10, 2)
                      [12, 12, 15, 16],  # label 9: covers centre (14, 14) only
                      [6, 10, 7, 16]])   # label 3: centres (6, 10) and (6, 14) lie on its left/top edges: covered
    got = rr.patch_labels(boxes, [5, 7, 9, 3], (16, 16), 4).reshape(4, 4)
    want = [[5, 7, 7, 5],
            [5, 5, 5, 5],
            [0, 3, 0, 0],
            [0, 3, 0, 9]]
    assert got.tolist() == want


def test_patch_labels_tie_goes_to_lower_index():
    got = rr.patch_labels(np.array([[0, 0, 4, 4], [0, 0, 4, 4]]), [1, 2], (4, 4), 4)
    assert got.tolist() == [1]


def test_tower_labels_from_categories(data):
    cats = data.fact_base.categories
    tower = rr.RegionTower(rr.TowerSettings(**TINY), cats, (64, 64))  # the fixture's config: no new compile
    boxes = np.array([[0, 0, 8, 8], [56, 56, 64, 64], [20, 0, 28, 6]], np.float32)
    ex = RefExample("e0", "i0", np.zeros((64, 64, 3), np.uint8), "the thing", boxes, (cats[3], cats[0], cats[7]), 0)
    want = np.zeros(64, int)
    want[0], want[63] = 4, 1  # label = 1 + the category's index; patch centres at 4, 12, ..., 60
    want[2] = 8  # patch (0, 2): centre (20, 4) inside box 2; patch (0, 3)'s centre (28, 4) is not (x2 = 28)
    assert tower.labels(ex).tolist() == want.tolist()
    bad = dataclasses.replace(ex, categories=(cats[0], cats[1], "golden unicorn"))
    with pytest.raises(InputError, match="'golden unicorn'"):
        tower.labels(bad)
    with pytest.raises(InputError, match="'golden unicorn'"):
        tower.fit([bad])


# ------------------------------------------------------------------------------------------------ features

def test_features_are_weighted_means_of_patch_features(trained, data):
    tower, _ = trained
    examples = data["val"]
    feats = tower.features(examples)
    images = np.stack([ex.pixels() for ex in examples])
    patch, logits = tower.patch_outputs(images)
    assert patch.shape == (len(examples), 64, 16) and logits.shape == (len(examples), 64, 31)
    for i, ex in enumerate(examples):
        ref = np.stack([pixel_weights(b, (64, 64), 8) for b in ex.boxes]) @ patch[i].astype(np.float64)
        assert feats[i].shape == (len(ex.boxes), tower.feature_size) == (len(ex.boxes), 16)
        np.testing.assert_allclose(feats[i], ref, rtol=1e-4, atol=1e-5)


def test_concat_pixels_appends_roi_pixels(trained, data):
    tower, _ = trained
    s = dataclasses.replace(tower.settings, concat_pixels=True, roi_grid=2)
    both = rr.RegionTower(s, data.fact_base.categories, (64, 64))
    both.params = tower.params
    ex = data["val"][0]
    got = both.features([ex])[0]
    assert got.shape == (len(ex.boxes), 16 + 12) == (len(ex.boxes), both.feature_size)
    np.testing.assert_allclose(got[:, :16], tower.features([ex])[0], atol=1e-6)
    np.testing.assert_array_equal(got[:, 16:], roi_features(ex.pixels(), ex.boxes, 2))


def test_features_permutation_equivariant(trained, data):
    tower, _ = trained
    ex = data["val"][1]
    perm = np.random.default_rng(3).permutation(len(ex.boxes))
    shuffled = dataclasses.replace(ex, boxes=ex.boxes[perm], categories=tuple(ex.categories[j] for j in perm))
    a, b = tower.features([ex, shuffled])
    np.testing.assert_allclose(b, a[perm], atol=1e-6)


def test_wrong_image_size_is_rejected(trained, data):
    tower, _ = trained
    ex = dataclasses.replace(data["val"][0], image=np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(InputError, match="64x64x3"):
        tower.features([ex])


# ------------------------------------------------------------------------------------------------ training

def test_training_beats_the_majority_baseline(trained, data):
    tower, log = trained
    train = tower.patch_accuracy(data["train"])
    labels = np.concatenate([tower.labels(ex) for ex in {ex.image_id: ex for ex in data["train"]}.values()])
    assert train["majority"] == pytest.approx(np.bincount(labels).max() / len(labels))
    assert train["accuracy"] > train["majority"] + 0.05, train
    assert train["object_accuracy"] > 0.3, train
    assert log["loss_last"] < 0.5 * log["loss_first"], log
    assert log["images"] == len({ex.image_id for ex in data["train"]})
    assert log["curve"][0][0] == 0 and log["curve"][-1][0] == 119


def test_training_is_deterministic_from_the_seed(data):
    def run(seed: int) -> list[np.ndarray]:
        t = rr.RegionTower(rr.TowerSettings(**TINY, steps=3, seed=seed), data.fact_base.categories, (64, 64))
        t.fit(data["train"])
        return jax.tree_util.tree_leaves(t.params)

    a, b, c = run(0), run(0), run(1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_cached_per_settings_and_data(data):
    s = rr.TowerSettings(**TINY, steps=2)
    feats, log = rr.tower_region_features(data, s)
    assert rr.tower_region_features(data, s)[0] is feats
    assert set(feats) == set(data.splits) and [f.shape[0] for f in feats["val"]] == [len(e.boxes) for e in data["val"]]
    assert {"train_accuracy", "val_accuracy", "feature_seconds"} <= set(log)
    other, _ = rr.tower_region_features(data, dataclasses.replace(s, seed=1))
    assert other is not feats and not np.allclose(other["val"][0], feats["val"][0])


# ------------------------------------------------------------------------------------------------- settings

@pytest.mark.parametrize("field,value", [("patch_size", 0), ("steps", -1), ("batch_size", 0), ("hidden_size", 2.5),
                                         ("learning_rate", 0.0), ("concat_pixels", 1), ("roi_grid", 0)])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"TowerSettings.{field}="):
        rr.TowerSettings(**{field: value})


def test_bad_tower_arguments():
    with pytest.raises(ConfigError, match="does not divide"):
        rr.RegionTower(rr.TowerSettings(patch_size=5), ("a",), (64, 64))
    with pytest.raises(ConfigError, match="distinct"):
        rr.RegionTower(rr.TowerSettings(), ("a", "a"), (64, 64))
    with pytest.raises(ConfigError, match="TowerSettings"):
        rr.RegionTower({"steps": 1}, ("a",), (64, 64))
