"""Tests of vlpeft_jax.data.refexp: the CK-Transformer data layer (spec ckt.md §5, §10 B11/B15, §11.1-4, §12).

The uniqueness checks use a reference solver written here from the raw fact list and the grid definitions of
the position words, independent of :func:`candidates_matching`.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from vlpeft_jax.data.batching import DataSkipWarning
from vlpeft_jax.data.refexp import (
    DISTRACTORS,
    PROPERTIES,
    Fact,
    FactBase,
    RefExpConfig,
    RefExpression,
    build_fact_base,
    build_refexp,
    candidates_matching,
    geometry,
    load_kbref,
    write_kbref,
)
from vlpeft_jax.data.shapes import COLORS, SHAPES, ShapesWorldConfig, generate
from vlpeft_jax.errors import ConfigError, InputError

SMALL = dict(num_train=120, num_val=30, num_test=30)


@pytest.fixture(scope="module")
def datasets():
    return {v: build_refexp(RefExpConfig(variant=v, **SMALL)) for v in ("kbref", "contextual", "conventional")}


# ---------------------------------------------------------------------------------- reference solver
def _ref_position(pos: str, row: int, col: int) -> bool:
    cells = {"left": {(r, 0) for r in range(3)}, "right": {(r, 2) for r in range(3)},
             "top": {(0, c) for c in range(3)}, "bottom": {(2, c) for c in range(3)}, "middle": {(1, 1)}}
    for corner in ("top left", "top right", "bottom left", "bottom right"):
        v, h = corner.split()
        cells[corner] = cells[v] & cells[h]
    return (row, col) in cells[pos]


def _ref_solve(struct: dict, objects: list[dict], facts: list[Fact], variant: str) -> list[int]:
    """Objects satisfying ``struct``, reading the facts list directly (categories per the variant)."""
    out = []
    for i, o in enumerate(objects):
        if any(struct[k] is not None and struct[k] != o[k] for k in ("color", "shape", "size")):
            continue
        if struct["position"] is not None and not _ref_position(struct["position"], o["row"], o["col"]):
            continue
        if struct["prop"] is not None:
            cat = o["shape"] if variant == "contextual" else f"{o['color']} {o['shape']}"
            if not any(f.category == cat and f.prop == struct["prop"] and f.condition in (None, o["color"])
                       for f in facts):
                continue
        out.append(i)
    return out


# --------------------------------------------------------------------------------------- determinism
def test_deterministic_from_seed(datasets):
    again = build_refexp(RefExpConfig(variant="kbref", **SMALL))
    first = datasets["kbref"]
    for split in ("train", "val", "test"):
        a, b = first[split], again[split]
        assert [(e.expr_id, e.expression, e.target, e.fact_id, e.categories) for e in a] == \
               [(e.expr_id, e.expression, e.target, e.fact_id, e.categories) for e in b]
        for x, y in zip(a, b, strict=True):
            assert np.array_equal(x.boxes, y.boxes) and np.array_equal(x.image, y.image)
    assert first.fact_base.to_json() == again.fact_base.to_json()
    other = build_refexp(RefExpConfig(variant="kbref", seed=1, **SMALL))
    assert [e.expression for e in other["train"]] != [e.expression for e in first["train"]]
    assert other.fact_base.to_json() != first.fact_base.to_json()


def test_split_sizes_ids_and_records(datasets):
    d = datasets["kbref"]
    assert {k: len(v) for k, v in d.splits.items()} == {"train": 120, "val": 30, "test": 30}
    ids = [e.expr_id for split in d.splits.values() for e in split]
    assert len(set(ids)) == len(ids)
    per_image: dict[str, int] = {}
    for e in d["train"]:
        per_image[e.image_id] = per_image.get(e.image_id, 0) + 1
    assert max(per_image.values()) <= 2
    world = d.world
    for e in d["train"][:40]:
        scene = world["train"].scenes[e.meta["scene_index"]]
        assert scene["image_id"] == e.image_id and e.expr_id == f"{e.image_id}_{e.target}"
        # candidates are all objects of the scene with their GT boxes (B11)
        assert 4 <= e.num_candidates <= 9 and e.num_candidates == len(scene["objects"])
        assert e.boxes.dtype == np.float32
        np.testing.assert_array_equal(e.boxes, np.array([o["bbox"] for o in scene["objects"]], np.float32))
        assert e.categories == tuple(f"{o['color']} {o['shape']}" for o in scene["objects"])
        assert e.image.shape == (64, 64, 3) and np.array_equal(e.image, world["train"].images[e.meta["scene_index"]])
    texts = list(d.texts())
    assert d["train"][0].expression in texts and d.fact_base.facts[0].text in texts


# ---------------------------------------------------------------- the KB-Ref rule and the solver
@pytest.mark.parametrize("variant", ["kbref", "contextual"])
def test_fact_requiring_expressions(datasets, variant):
    """Every expression: (a) the reference solver finds exactly the target, and so does candidates_matching;
    (b) the same expression with its property removed matches >= 2 candidates (so no visual qualifier set
    alone identifies the target: the fact is needed); (c) it never names both colour and shape; (d) the GT
    fact is a property fact of the target's category with the expression's property, and (contextual) a
    conditional one whose condition is the target's colour; (e) the text renders the structure."""
    d = datasets[variant]
    facts = list(d.fact_base.facts)
    for split in d.splits.values():
        for e in split:
            s, objs = e.meta["struct"], e.meta["objects"]
            assert s["prop"] is not None
            assert _ref_solve(s, objs, facts, variant) == [e.target]
            assert candidates_matching(RefExpression(**s), objs, d.fact_base) == [e.target]
            assert len(_ref_solve({**s, "prop": None}, objs, facts, variant)) >= 2
            assert s["color"] is None or s["shape"] is None
            fact = d.fact_base.by_id(e.fact_id)
            assert fact.category == e.categories[e.target] and fact.prop == s["prop"]
            assert fact.text in d.fact_base.texts() and fact.prop not in (None,)
            if variant == "contextual":
                assert fact.condition == objs[e.target]["color"]
                assert e.categories[e.target] == objs[e.target]["shape"]
            else:
                assert fact.condition is None
            assert e.expression.endswith(RefExpression(**s).text(prefix="").strip())
            assert PROPERTIES[s["prop"]][1] in e.expression


def test_fact_requiring_split_is_not_trivial(datasets):
    # Both cases occur: the property alone suffices, and qualifiers are needed on top of it.
    qualifiers = [RefExpression(**e.meta["struct"]).num_qualifiers for e in datasets["kbref"]["train"]]
    assert 0 in qualifiers and max(qualifiers) >= 1


def test_conventional_expressions_are_unique_and_visual(datasets):
    d = datasets["conventional"]
    facts = list(d.fact_base.facts)
    for split in d.splits.values():
        for e in split:
            s = e.meta["struct"]
            assert s["prop"] is None and e.fact_id is None
            assert _ref_solve(s, e.meta["objects"], facts, "conventional") == [e.target]
            assert s["shape"] == e.meta["objects"][e.target]["shape"]  # the head noun names the object
            assert not any(w in e.expression for _, w in PROPERTIES.values())
    assert len(d.fact_base.categories) == 30  # the kbref fact base travels with it (Table 3.3 "Intro Facts")


def test_solver_by_hand():
    kb = FactBase([Fact("x0", "cross", "a red cross marks a hospital", "hospital", "red"),
                   Fact("x1", "cross", "a green cross marks a pharmacy", "pharmacy", "green"),
                   Fact("x2", "cross", "a cross is sacred", "sacred"),
                   Fact("c0", "circle", "a circle is sacred", "sacred"),
                   Fact("c1", "circle", "a circle was drawn by hand", None)], ("shape",))
    objs = [dict(shape="cross", color="red", size="small", row=0, col=0),
            dict(shape="cross", color="green", size="large", row=1, col=1),
            dict(shape="circle", color="red", size="large", row=2, col=2),
            dict(shape="cross", color="blue", size="small", row=0, col=2)]
    assert candidates_matching(RefExpression(prop="hospital"), objs, kb) == [0]
    assert candidates_matching(RefExpression(prop="pharmacy"), objs, kb) == [1]
    assert candidates_matching(RefExpression(prop="sacred"), objs, kb) == [0, 1, 2, 3]
    assert candidates_matching(RefExpression(prop="sacred", position="middle"), objs, kb) == [1]
    assert candidates_matching(RefExpression(prop="sacred", size="small", position="top right"), objs, kb) == [3]
    assert candidates_matching(RefExpression(color="red"), objs) == [0, 2]
    assert candidates_matching(RefExpression(position="top"), objs) == [0, 3]
    assert candidates_matching(RefExpression(position="bottom left"), objs) == []
    assert RefExpression(prop="sacred", color="red", position="top").text() == "the red thing that is sacred at the top"
    with pytest.raises(InputError, match="needs a fact_base"):
        candidates_matching(RefExpression(prop="sacred"), objs)
    with pytest.raises(InputError, match="'square' is not in the fact base"):
        candidates_matching(RefExpression(prop="sacred"), [dict(objs[0], shape="square")], kb)
    with pytest.raises(InputError, match="unknown property"):
        RefExpression(prop="flies")


# ------------------------------------------------------------------------------------------ fact base
def test_fact_base_structure():
    kb = build_fact_base("kbref", 3, facts_per_category=4, distractors_per_category=2)
    assert kb.categories == tuple(f"{c} {s}" for s in SHAPES for c in COLORS) and len(kb) == 30 * 6
    for cat in kb.categories:
        facts = kb.of_category(cat)
        props = [f.prop for f in facts if f.prop is not None]
        assert len(props) == 4 and len(set(props)) == 4 and set(props) <= set(PROPERTIES)
        for f in facts:
            assert f.text.split(" ", 1)[1].startswith(cat + " ") and f.condition is None
            verb = f.text.split(cat + " ", 1)[1]
            assert verb == (PROPERTIES[f.prop][0] if f.prop else verb) and (f.prop or verb in DISTRACTORS)
    ctx = build_fact_base("contextual", 3, facts_per_category=2, distractors_per_category=1, context_group_size=2)
    assert ctx.categories == SHAPES
    for shape in SHAPES:
        facts = ctx.of_category(shape)
        cond = [f for f in facts if f.condition is not None]
        assert sorted(f.condition for f in cond) == sorted(COLORS)  # one conditional fact per colour
        by_prop: dict[str, list[str]] = {}
        for f in cond:
            by_prop.setdefault(f.prop, []).append(f.condition)
            assert f.text == f"a {f.condition} {shape} {PROPERTIES[f.prop][0]}"
        assert sorted(len(v) for v in by_prop.values()) == [2, 2, 2]  # colours share a property in pairs
        uncond = {f.prop for f in facts if f.condition is None and f.prop}
        assert len(uncond) == 2 and not uncond & set(by_prop)
        # a fact applies only when its condition matches the object's colour
        red = {f.fact_id for f in ctx.applicable({"shape": shape, "color": "red"})}
        assert red == {f.fact_id for f in facts if f.condition in (None, "red")}


def test_fact_base_errors_and_json():
    kb = build_fact_base("contextual", 0)
    back = FactBase.from_json(json.dumps(kb.to_json()))
    assert back.facts == kb.facts and back.category_fields == ("shape",)
    with pytest.raises(InputError, match="'red circle' is not in the fact base"):
        kb.of_category("red circle")
    with pytest.raises(InputError, match="fact id 'nope'"):
        kb.by_id("nope")
    with pytest.raises(InputError, match="duplicate fact id"):
        FactBase([Fact("a", "x", "t"), Fact("a", "y", "u")])
    with pytest.raises(InputError, match="'facts' list"):
        FactBase.from_json({"facts": 3})
    with pytest.raises(ConfigError, match="variant"):
        build_fact_base("refcoco")


def test_config_validation_and_small_world():
    with pytest.raises(ConfigError, match="variant"):
        RefExpConfig(variant="other")
    with pytest.raises(ConfigError, match="min_objects"):
        RefExpConfig(min_objects=1)
    with pytest.raises(ConfigError, match="facts_per_category"):
        RefExpConfig(variant="contextual", facts_per_category=17)
    with pytest.raises(ConfigError, match="distractors_per_category"):
        RefExpConfig(distractors_per_category=len(DISTRACTORS) + 1)
    with pytest.raises(ConfigError, match="num_val"):
        RefExpConfig(num_val=-1)
    world = generate(ShapesWorldConfig(num_train=3, num_val=1, num_test=1, num_ood=0, min_objects=4,
                                       max_objects=9, num_questions=0, num_captions=1, num_held_out_pairs=0))
    with pytest.raises(ConfigError, match="only .* of 50 expressions"):
        build_refexp(RefExpConfig(num_train=50, num_val=0, num_test=0), world=world)
    d = build_refexp(RefExpConfig(num_train=2, num_val=1, num_test=1), world=world)
    assert d["train"][0].image_id.startswith("train_") and d.world is world


# ------------------------------------------------------------------------------------------ geometry
def test_geometry_by_hand():
    g = geometry(np.array([[0, 0, 64, 48], [8, 4, 24, 12]], np.float32), 64, 48)
    assert g.dtype == np.float32 and g.shape == (2, 7)
    np.testing.assert_allclose(g[0], [0, 0, 1, 1, 1, 1, 1])
    w, h = 16 / 64, 8 / 48
    np.testing.assert_allclose(g[1], [8 / 64, 4 / 48, 24 / 64, 12 / 48, w, h, w * h], rtol=1e-6)
    assert geometry(np.zeros((0, 4)), 10, 10).shape == (0, 7)
    with pytest.raises(InputError, match=r"\[n, 4\]"):
        geometry(np.zeros((3, 5)), 10, 10)
    with pytest.raises(InputError, match="width and height"):
        geometry(np.zeros((1, 4)), 0, 10)
    with pytest.raises(InputError, match="x2 >= x1"):
        geometry([[5, 0, 1, 1]], 10, 10)


def test_example_box_geometry(datasets):
    e = datasets["kbref"]["train"][0]
    b = e.boxes.astype(np.float64) / 64.0
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    np.testing.assert_allclose(e.box_geometry(), np.stack([b[:, 0], b[:, 1], b[:, 2], b[:, 3], w, h, w * h], 1),
                               rtol=1e-6)
    assert (e.box_geometry() >= 0).all() and (e.box_geometry() <= 1).all()


# ---------------------------------------------------------------------------------------- KB-Ref loader
def _write(root, **files):
    for name, obj in files.items():
        (root / name).write_text(json.dumps(obj))


def _kbref_files():
    return {
        "expression.json": {"10_1": ["something you can eat", "an apple is edible"],
                            "10_2": ["the thing for tea", "a cup holds tea"],
                            "20_5": ["the thing that tells time", "a clock tells time"]},
        "candidate.json": {"10": ["1", "2", "3"], "20": ["5", "6"]},
        "objects.json": {"10": {"1": ["apple", "apple", 2, 3, 10, 20], "2": ["cup", "mug", 20, 0, 5, 5],
                                "3": ["apple", "apple", 0, 0, 1, 1]},
                         "20": {"5": {"category": "clock", "bbox": [1, 1, 4, 4]},
                                "6": {"name": "cup", "bbox": [0, 0, 2, 2]}}},
        "Wikipedia.json": {"apple": ["an apple is red", "an apple is edible"], "cup": ["a cup holds tea"]},
        "ConceptNet.json": {"clock": ["a clock tells time"], "cup": ["a cup is fragile"]},
        "image.json": {"10": [100, 50], "20": [30, 30]},
        "train.json": ["10"], "test.json": ["20"],
    }


def test_load_kbref(tmp_path):
    _write(tmp_path, **_kbref_files())
    data = load_kbref(tmp_path)
    assert [e.expr_id for e in data] == ["10_1", "10_2", "20_5"] and data.report.skipped == 0
    e = data[0]
    assert e.categories == ("apple", "cup", "apple") and e.target == 0 and e.image is None
    np.testing.assert_array_equal(e.boxes, np.array([[2, 3, 12, 23], [20, 0, 25, 5], [0, 0, 1, 1]], np.float32))
    assert e.image_path == str(tmp_path / "images" / "10.jpg") and (e.meta["width"], e.meta["height"]) == (100, 50)
    assert data.fact_base.by_id(e.fact_id).text == "an apple is edible"
    assert data[1].target == 1 and data.fact_base.by_id(data[1].fact_id).category == "cup"
    assert data[2].categories == ("clock", "cup") and data[2].boxes.tolist() == [[1, 1, 5, 5], [0, 0, 2, 2]]
    # facts of one category are gathered from every KB file
    assert [f.text for f in data.fact_base.of_category("cup")] == ["a cup holds tea", "a cup is fragile"]
    assert [e.expr_id for e in load_kbref(tmp_path, "train")] == ["10_1", "10_2"]
    assert [e.expr_id for e in load_kbref(tmp_path, "test")] == ["20_5"]
    # a GT fact missing from the KB: no id, the text kept
    files = _kbref_files()
    files["expression.json"]["10_3"] = ["the small apple", "apples grow on trees"]
    _write(tmp_path, **files)
    e = load_kbref(tmp_path)[-1]
    assert e.fact_id is None and e.meta["fact_text"] == "apples grow on trees" and e.target == 2


@pytest.mark.parametrize("breakage, match, reason", [
    (lambda f: f["objects.json"]["10"]["2"].__setitem__(slice(2, 6), []), "no valid box", "candidate without a box"),
    (lambda f: f["objects.json"]["10"].__setitem__("3", ["banana", "banana", 0, 0, 1, 1]),
     "category 'banana'", "unknown category"),
    (lambda f: f["candidate.json"].__setitem__("10", []), "has no candidates", "no candidates"),
    (lambda f: f["expression.json"].__setitem__("30_1", ["x", "y"]), "has no candidates", "no candidates"),
    (lambda f: f["candidate.json"].__setitem__("10", ["2", "3"]), "not among", "target not a candidate"),
])
def test_load_kbref_errors(tmp_path, breakage, match, reason):
    files = _kbref_files()
    breakage(files)
    _write(tmp_path, **files)
    with pytest.raises(InputError, match=match):
        load_kbref(tmp_path)
    with pytest.warns(DataSkipWarning, match=reason):
        data = load_kbref(tmp_path, on_error="skip")
    assert data.report.counts[reason] >= 1 and data.report.skipped + len(data) >= 3
    assert all(e.expr_id != "30_1" for e in data)


@pytest.mark.parametrize("variant", ["kbref", "contextual"])
def test_write_then_load_kbref(datasets, tmp_path, variant):
    d = datasets[variant]
    for split in ("train", "test"):
        write_kbref(d[split], d.fact_base, tmp_path, split)
    for split in ("train", "test"):
        back = load_kbref(tmp_path, split, kb_files=("ShapesKB.json",))
        assert len(back) == len(d[split]) and back.report.skipped == 0
        for a, b in zip(d[split], back, strict=True):
            assert (b.image_id, b.expression, b.categories, b.target) == (a.image_id, a.expression, a.categories,
                                                                          a.target)
            np.testing.assert_array_equal(a.boxes, b.boxes)
            assert back.fact_base.by_id(b.fact_id).text == d.fact_base.by_id(a.fact_id).text
            np.testing.assert_allclose(a.box_geometry(), b.box_geometry())
    # KB-Ref facts carry no condition: the contextual base comes back as its sentences only
    assert len(back.fact_base) == len(d.fact_base)
    assert all(f.condition is None and f.prop is None for f in back.fact_base.facts)
    assert sorted(back.fact_base.texts()) == sorted(d.fact_base.texts())


def test_load_kbref_missing_files(tmp_path):
    with pytest.raises(InputError, match="not a directory"):
        load_kbref(tmp_path / "absent")
    _write(tmp_path, **{k: v for k, v in _kbref_files().items() if k not in ("Wikipedia.json", "ConceptNet.json")})
    with pytest.raises(InputError, match="no knowledge-base file"):
        load_kbref(tmp_path)
    _write(tmp_path, **_kbref_files())
    with pytest.raises(InputError, match="split file"):
        load_kbref(tmp_path, "val")
    with pytest.raises(InputError, match="on_error"):
        load_kbref(tmp_path, on_error="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_kbref(tmp_path, on_error="skip")) == 3  # nothing skipped, no warning
    (tmp_path / "image.json").unlink()
    with pytest.raises(InputError, match="no image and no meta width/height"):
        load_kbref(tmp_path)[0].box_geometry()


def test_pixels_of_generated_and_loaded_examples(tmp_path):
    """Generated examples hold their image; loaded ones decode ``image_path``; neither is an error."""
    import dataclasses as dc

    from PIL import Image

    from vlpeft_jax.data.refexp import RefExpConfig, build_refexp

    ex = build_refexp(RefExpConfig(num_train=2, num_val=1, num_test=1)).splits["train"][0]
    np.testing.assert_array_equal(ex.pixels(), ex.image)
    path = tmp_path / "im.png"
    Image.fromarray(ex.image).save(path)
    np.testing.assert_array_equal(dc.replace(ex, image=None, image_path=str(path)).pixels(), ex.image)
    with pytest.raises(InputError, match="neither an image nor an image_path"):
        dc.replace(ex, image=None, image_path=None).pixels()
