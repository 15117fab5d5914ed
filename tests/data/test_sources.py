"""Real datasets from a config section (vlpeft_jax/data/sources.py): every kind reaches its loader with the
split's paths resolved against data.root, and bad settings are refused before anything is read."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vlpeft_jax.data import coco, sources, vqa
from vlpeft_jax.errors import ConfigError


def image(path, value=0, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)


@pytest.fixture
def root(tmp_path):
    image(tmp_path / "img" / "a.jpg", 10)
    image(tmp_path / "img" / "b.jpg", 200)
    (tmp_path / "caps.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "annotations": [{"image_id": 1, "caption": "A cat."}, {"image_id": 2, "caption": "A dog."},
                        {"image_id": 2, "caption": "Two dogs."}]}))
    (tmp_path / "karpathy.json").write_text(json.dumps({"images": [
        {"filename": "a.jpg", "filepath": "img", "split": "train", "imgid": 0, "sentences": [{"raw": "A cat."}]},
        {"filename": "b.jpg", "filepath": "img", "split": "val", "imgid": 1, "sentences": [{"raw": "A dog."}]}]}))
    (tmp_path / "q.json").write_text(json.dumps({"data_subtype": "val2014", "questions": [
        {"question_id": 7, "image_id": 1, "question": "What is it?"}]}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": [
        {"question_id": 7, "image_id": 1, "answer_type": "other", "answers": [{"answer": "cat"}] * 10}]}))
    image(tmp_path / "vqaimg" / "COCO_val2014_000000000001.jpg", 30)
    return tmp_path


def test_coco_annotations_and_karpathy_equal_the_loaders(root):
    data = {"kind": "coco", "root": str(root), "images": "eager",
            "splits": {"train": {"annotations": "caps.json", "images": "img"},
                       "val": {"karpathy": "karpathy.json", "images": "."}}}
    sources.check_data(data, "captioning", ["train", "val"])
    got = sources.load_split(data, "train", "captioning")
    want = coco.load_coco_captions(root / "caps.json", root / "img")
    assert [(e.image_id, e.captions) for e in got] == [(e.image_id, e.captions) for e in want]
    assert got[1].captions == ("A dog.", "Two dogs.")
    np.testing.assert_array_equal(got[0].image, want[0].image)
    val = sources.load_split(data, "val", "captioning")  # the Karpathy split named like the config's split
    assert [e.captions for e in val] == [("A dog.",)]
    lazy = sources.load_split({**data, "images": "lazy", "max_examples": 1}, "train", "captioning")
    assert len(lazy) == 1 and lazy[0].image is None and lazy[0].image_path.endswith("a.jpg")


def test_vqa_and_absolute_paths(root):
    data = {"kind": "vqa", "splits": {"val": {"questions": str(root / "q.json"), "annotations": str(root / "a.json"),
                                              "images": str(root / "vqaimg")}}}
    got = sources.load_split(data, "val", "vqa")
    want = vqa.load_vqav2(root / "q.json", root / "a.json", root / "vqaimg", images="lazy")
    assert [(e.question_id, e.question, e.answers, e.meta.get("answer_type")) for e in got] == \
        [(e.question_id, e.question, e.answers, e.meta.get("answer_type")) for e in want]
    assert got[0].answer == "cat"


def test_hf_kind_reads_a_data_file_for_either_task(root, monkeypatch):
    pytest.importorskip("datasets", reason="the `datasets` package (test extra) is not installed")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = [{"image": "img/a.jpg", "caption": "A cat.", "question": "What?", "answers": ["cat", "cat"]},
            {"image": "img/b.jpg", "caption": "A dog.", "question": "Who?", "answers": ["dog"]}]
    (root / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = {"kind": "hf", "root": str(root), "splits": {"train": {"path": "rows.jsonl", "image_root": "."}}}
    caps = sources.load_split(data, "train", "captioning")
    assert [e.captions for e in caps] == [("A cat.",), ("A dog.",)]
    qs = sources.load_split(data, "train", "vqa")
    assert [(e.question, e.answer) for e in qs] == [("What?", "cat"), ("Who?", "dog")]


@pytest.mark.parametrize("change,task,match", [
    ({"kind": "vqa"}, "captioning", "does not fit task 'captioning'"),
    ({"kind": "shapes"}, "vqa", "data.kind='shapes' does not fit"),
    ({"colour": 1}, "captioning", "unknown setting.*colour"),
    ({"on_error": "ignore"}, "captioning", "data.on_error"),
    ({"images": "never"}, "captioning", "data.images"),
    ({"root": "no/such/folder"}, "captioning", "data.root"),
    ({"splits": {"train": {"annotations": "caps.json", "images": "img"}}}, "captioning", "no 'val' split"),
    ({"splits": {"train": {"annotations": "nope.json", "images": "img"}, "val": {}}}, "captioning",
     r"annotations='nope.json': no such file"),
    ({"splits": {"train": {"annotations": "caps.json", "karpathy": "karpathy.json", "images": "img"}, "val": {}}},
     "captioning", "exactly one of 'annotations'"),
    ({"splits": {"train": {"annotations": "caps.json", "images": "caps.json"}, "val": {}}}, "captioning",
     "no such folder"),
    ({"splits": {"train": {"annotations": "caps.json", "images": "img", "questions": "q.json"}, "val": {}}},
     "captioning", "unknown setting.*questions"),
])
def test_bad_settings_are_refused_before_reading(root, change, task, match):
    data = {"kind": "coco" if task == "captioning" else "vqa", "root": str(root),
            "splits": {"train": {"annotations": "caps.json", "images": "img"},
                       "val": {"annotations": "caps.json", "images": "img"}}}
    data.update(change)
    with pytest.raises(ConfigError, match=match):
        sources.check_data(data, task, ["train", "val"])
