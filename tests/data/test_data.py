"""Tests of vlpeft_jax.data: shapes world, tokenizer, batching, COCO/VQA/HF/TFDS loaders and bad input."""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from vlpeft_jax.data import batching, coco, hf_datasets, images, shapes, tfds, vqa
from vlpeft_jax.data.batching import (
    IGNORE_INDEX,
    CaptionBatches,
    CaptionExample,
    DataSkipWarning,
    EvalBatches,
    VQABatches,
)
from vlpeft_jax.data.images import ImagePreprocessor
from vlpeft_jax.data.shapes import ShapesWorld, ShapesWorldConfig, generate
from vlpeft_jax.data.tokenizer import WordTokenizer
from vlpeft_jax.errors import ConfigError, InputError, OfflineError

SMALL = ShapesWorldConfig(seed=3, num_train=60, num_val=12, num_test=12, num_ood=12)


@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return generate(SMALL)


@pytest.fixture(scope="module")
def tokenizer(world) -> WordTokenizer:
    return world.build_tokenizer()


# ------------------------------------------------------------------------------------------ shapes world
def test_same_seed_identical_different_seed_differs(world):
    again = generate(SMALL)
    for name in ("train", "val", "test", "ood"):
        np.testing.assert_array_equal(world[name].images, again[name].images)
        np.testing.assert_array_equal(world[name].segmentations, again[name].segmentations)
        assert world[name].scenes == again[name].scenes
    other = generate(ShapesWorldConfig(seed=4, num_train=60, num_val=12, num_test=12, num_ood=12))
    assert not np.array_equal(world.train.images, other.train.images)
    assert [s["captions_target"] for s in world.train.scenes] != [s["captions_target"] for s in other.train.scenes]


def test_split_does_not_depend_on_other_split_sizes(world):
    bigger = generate(ShapesWorldConfig(seed=3, num_train=90, num_val=12, num_test=12, num_ood=12))
    np.testing.assert_array_equal(world.val.images, bigger.val.images)
    assert world.test.scenes == bigger.test.scenes
    np.testing.assert_array_equal(world.train.images, bigger.train.images[:60])


def test_caption_domains_differ_in_style_and_match_the_scene(world):
    target_only = {"large", "small", "left", "right", "top", "bottom", "center", "middle", "above", "below",
                   "one", "two", "three", "four", "objects", "shapes", "object", "shape"}
    n_distinct = []
    for ex in world.train:
        assert len(ex.captions_source) == len(ex.captions_target) == SMALL.num_captions
        assert not set(ex.captions_source) & set(ex.captions_target)
        n_distinct.append(len(set(ex.captions_target)))
        for cap in ex.captions_source:
            words = set(re.findall(r"[a-z]+", cap))
            assert not words & target_only, cap
            for o in ex.objects:  # the plain style names every object's colour and shape
                assert f"{o.color} {o.shape}" in cap, (cap, o)
        for cap in ex.captions_target:
            words = set(re.findall(r"[a-z]+", cap))
            assert words & {"large", "small"}, cap
            assert words & {"left", "right", "top", "bottom", "center", "middle", "above", "below", "over",
                            "under"}, cap
            for o in ex.objects:
                assert f"{o.size} {o.color} {o.shape}" in cap, (cap, o)
            count = shapes._COUNT_WORDS[len(ex.objects)]
            assert count in words or "there is" in cap, cap  # counts, except in the location-first style
    assert np.mean(n_distinct) > 4.5  # references differ


def test_target_captions_state_true_positions_and_relations(world):
    all_locs = sorted({p for phrases in shapes._LOCATION_PHRASES for p in phrases}, key=len, reverse=True)
    rel_of = {p: r for r, phrases in shapes._RELATION_PHRASES.items() for p in phrases}
    obj = "((?:small|large) [a-z]+ [a-z]+)"
    rel_alt = "|".join(sorted(rel_of, key=len, reverse=True))
    relation_re = re.compile(rf"{obj}(?: is)?(?: (?:{'|'.join(all_locs)}))? ({rel_alt}) (?:an?|the) {obj}")
    checked_locs = checked_rels = 0
    for ex in list(world.train) + list(world.ood):
        phrases = [f"{o.size} {o.color} {o.shape}" for o in ex.objects]
        unique = {p: k for k, p in enumerate(phrases) if phrases.count(p) == 1}
        for cap in ex.captions_target:
            for phrase, k in unique.items():
                for m in re.finditer(re.escape(phrase) + r" (?:is )?(.*)", cap):
                    loc = next((loc for loc in all_locs if m.group(1).startswith(loc)), None)
                    if loc is not None:
                        assert loc in shapes._LOCATION_PHRASES[ex.objects[k].cell], (cap, phrase)
                        checked_locs += 1
                for loc in all_locs:
                    if re.search(rf"(?:^|and ){re.escape(loc)} (?:there is )?an? {re.escape(phrase)}", cap):
                        assert loc in shapes._LOCATION_PHRASES[ex.objects[k].cell], (cap, phrase)
                        checked_locs += 1
                        break
            for pa, rp, pb in relation_re.findall(cap):
                if pa in unique and pb in unique:
                    assert (unique[pa], rel_of[rp], unique[pb]) in ex.relations, (cap, pa, rp, pb)
                    checked_rels += 1
    print(f"checked {checked_locs} locations and {checked_rels} relations")
    assert checked_locs > 300 and checked_rels > 30


def test_vqa_items_have_ten_answers_and_correct_majority(world):
    qtypes = set()
    for ex in world.train:
        assert len(ex.vqa) == SMALL.num_questions
        for item in ex.vqa:
            qtypes.add(item.qtype)
            assert len(item.answers) == 10
            counts = {a: item.answers.count(a) for a in item.answers}
            assert max(counts, key=counts.get) == item.answer and counts[item.answer] >= 7
            if item.qtype == "color":
                assert ex.objects[item.object_ids[0]].color == item.answer
            if item.qtype == "shape":
                assert ex.objects[item.object_ids[0]].shape == item.answer
            if item.qtype == "position":
                assert ex.objects[item.object_ids[0]].position == item.answer
            if item.qtype == "count" and item.question.startswith(("how many objects", "how many shapes")):
                assert item.answer == str(len(ex.objects))
            if item.qtype == "relation":
                i, j = item.object_ids
                true_rels = {r for (a, r, b) in ex.relations if (a, b) == (i, j)}
                said = next(r for r, phrases in shapes._RELATION_PHRASES.items()
                            if any(f" {p} the " in item.question for p in phrases))
                assert (said in true_rels) == (item.answer == "yes"), (item.question, item.answer, true_rels)
    assert qtypes == set(shapes.QUESTION_TYPES)
    vqa_examples = world.train.vqa_examples()
    assert len(vqa_examples) == SMALL.num_train * SMALL.num_questions
    first = world.train[0].vqa[0]
    assert (vqa_examples[0].question, vqa_examples[0].answers, vqa_examples[0].answer) == (
        first.question, first.answers, first.answer)
    assert vqa_examples[0].meta["object_ids"] == first.object_ids


def test_patch_masks_known_placement():
    # Square of radius 5 -> half side 4.1 around (12, 20): pixel centres 7.9..16.1 in x and 15.9..24.1 in y,
    # i.e. columns 8..15 and rows 16..23: exactly patch (row 2, col 1) of 8x8 patches.
    img, seg = shapes.render_scene([{"shape": "square", "center": (12, 20), "radius": 5, "color": "blue"}], 32)
    expected = np.zeros((32, 32), np.int8)
    expected[16:24, 8:16] = 1
    np.testing.assert_array_equal(seg, expected)
    want = np.zeros((4, 4), bool)
    want[2, 1] = True
    np.testing.assert_array_equal(shapes.patch_masks(seg, 1, 8)[0], want)
    assert tuple(img[20, 12]) == shapes.COLOR_RGB["blue"] and tuple(img[0, 0]) == shapes.BACKGROUND_RGB
    # Shifted by 4 px the square straddles 4 patches; with 4x4 patches it covers exactly 2x2 patches... and
    # a min_fraction keeps only patches mostly covered.
    _, seg2 = shapes.render_scene([{"shape": "square", "center": (16, 16), "radius": 5, "color": "red"}], 32)
    m8 = shapes.patch_masks(seg2, 1, 8)[0]
    assert m8.sum() == 4 and m8[1:3, 1:3].all()
    m4 = shapes.patch_masks(seg2, 1, 4)[0]
    assert m4.sum() == 4 and m4[3:5, 3:5].all()
    assert shapes.patch_masks(seg2, 1, 8, min_fraction=0.5)[0].sum() == 0


def test_patch_masks_match_a_brute_force_count(world):
    for ex in list(world.train)[:10]:
        p = 8
        masks = ex.patch_masks(p)
        gh = ex.image.shape[0] // p
        for k, o in enumerate(ex.objects):
            brute = np.zeros((gh, gh), bool)
            for y in range(ex.image.shape[0]):
                for x in range(ex.image.shape[1]):
                    if ex.segmentation[y, x] == k + 1:
                        brute[y // p, x // p] = True
            np.testing.assert_array_equal(masks[k], brute)
            x0, y0, x1, y1 = o.bbox
            ys, xs = np.nonzero(ex.segmentation == k + 1)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            # the object lies in its grid cell, whose name its location phrases use
            cell = ex.image.shape[0] / 3
            assert (int((y0 + y1) / 2 // cell), int((x0 + x1) / 2 // cell)) == (o.row, o.col)
            for phrase in shapes._LOCATION_PHRASES[o.cell]:
                assert set(o.position.split()) <= set(phrase.replace("middle", "center").split())
            # the object's pixels carry its colour (up to the pixel noise)
            assert np.abs(ex.image[ys, xs].astype(int) - np.array(o.rgb)).mean() < 6
        for qi, item in enumerate(ex.vqa):
            if item.object_ids:
                np.testing.assert_array_equal(ex.question_patch_mask(qi), masks[list(item.object_ids)].any(0))


def test_held_out_pairs_absent_from_train_and_present_in_ood(world):
    held = set(world.held_out_pairs)
    assert len(held) == SMALL.num_held_out_pairs
    for name in ("train", "val", "test"):
        for s in world[name].scenes:
            assert not {(o["shape"], o["color"]) for o in s["objects"]} & held
            text = " ".join(s["captions_source"] + s["captions_target"] + [q["question"] for q in s["vqa"]])
            for shape, color in held:
                assert f"{color} {shape}" not in text
    for s in world.ood.scenes:
        assert {(o["shape"], o["color"]) for o in s["objects"]} & held
    explicit = ShapesWorldConfig(num_train=20, num_val=0, num_test=0, num_ood=5,
                                 held_out_pairs=(("circle", "red"),))
    w = generate(explicit)
    assert all(("circle", "red") not in {(o.shape, o.color) for o in ex.objects} for ex in w.train)
    with pytest.raises(ConfigError, match="held_out_pairs"):
        ShapesWorldConfig(held_out_pairs=(("hexagon", "red"),))


def test_labels_instructions_and_objects(world):
    for ex in world.train:
        n = len(ex.objects)
        assert 1 <= n <= 4 and ex.labels["count"] == n - 1
        assert ex.labels["color_presence"].tolist() == [int(any(o.color == c for o in ex.objects))
                                                        for c in shapes.COLORS]
        areas = {c: sum(o.area for o in ex.objects if o.color == c) for c in shapes.COLORS}
        assert areas[shapes.COLORS[ex.labels["dominant_color"]]] == max(areas.values())
        assert len({o.cell for o in ex.objects}) == n  # distinct cells
        assert ex.instructions["caption"] == shapes.CAPTION_INSTRUCTIONS
        assert len(ex.instructions["vqa"]) == 3
    assert world.train.labels("count").shape == (SMALL.num_train,)
    assert SMALL.label_classes()["count"] == ("1", "2", "3", "4")
    assert world.train.labels("shape_presence").shape == (SMALL.num_train, len(shapes.SHAPES))


def test_save_load_and_cache(world, tmp_path):
    world.save(tmp_path / "w")
    back = ShapesWorld.load(tmp_path / "w")
    assert back.config == world.config
    np.testing.assert_array_equal(back.ood.images, world.ood.images)
    assert back.train[5].vqa == world.train[5].vqa and back.train[5].objects == world.train[5].objects
    cfg = ShapesWorldConfig(seed=9, num_train=5, num_val=1, num_test=1, num_ood=1)
    a = shapes.load_or_generate(cfg, tmp_path / "cache")
    (cached,) = list((tmp_path / "cache").iterdir())
    b = shapes.load_or_generate(cfg, tmp_path / "cache")
    np.testing.assert_array_equal(a.train.images, b.train.images)
    (cached / "train.npz").write_bytes(b"damaged")
    c = shapes.load_or_generate(cfg, tmp_path / "cache")  # damaged cache: regenerated, not trusted
    np.testing.assert_array_equal(a.train.images, c.train.images)
    with pytest.raises(InputError, match="world.json"):
        ShapesWorld.load(tmp_path / "nothing")


def test_bad_config_values():
    with pytest.raises(ConfigError, match="image_size"):
        ShapesWorldConfig(image_size=8)
    with pytest.raises(ConfigError, match="patch_size"):
        ShapesWorldConfig(patch_size=7)
    with pytest.raises(ConfigError, match="shapes"):
        ShapesWorldConfig(shapes=("circle", "blob"))


# --------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip_and_coverage(world, tokenizer):
    texts = list(world.texts())
    assert all(not tokenizer.unknown_words(t) for t in texts)
    for t in texts[:400]:
        ids = tokenizer.encode(t)
        assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
        assert tokenizer.decode(ids) == t.lower()
    # The vocabulary comes from the templates alone: another seed's world is covered and gets the same ids.
    other = generate(ShapesWorldConfig(seed=11, num_train=30, num_val=0, num_test=0, num_ood=10))
    assert all(not tokenizer.unknown_words(t) for t in other.texts())
    assert other.build_tokenizer().get_vocab() == tokenizer.get_vocab()
    # ... while words outside the world are unknown and texts-trained vocabularies rank by frequency
    counted = WordTokenizer.train(["b b a", "c b"])
    assert [counted.id_to_token(i) for i in range(5, 8)] == ["b", "a", "c"]
    assert [tokenizer.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>", "<unk>", "<image>")] == [0, 1, 2, 3, 4]
    assert tokenizer.encode("a zebra", add_special_tokens=False)[1] == tokenizer.unk_id


def test_tokenizer_loads_in_transformers(tokenizer, world, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer.save(tmp_path / "tok")
    for cls in (AutoTokenizer, PreTrainedTokenizerFast):
        hf = cls.from_pretrained(str(tmp_path / "tok"))
        assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (
            tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id)
        assert hf.convert_tokens_to_ids("<image>") == tokenizer.image_id
        assert len(hf) == tokenizer.vocab_size
        for text in [world.train[0].captions_target[0], "Question: what color is the circle? Short answer:"]:
            ids = hf(text)["input_ids"]
            assert ids == tokenizer.encode(text)
            assert hf.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids)
        assert hf("<image> a red circle")["input_ids"][1] == tokenizer.image_id
    reloaded = WordTokenizer.load(tmp_path / "tok")
    assert reloaded.get_vocab() == tokenizer.get_vocab()


# ---------------------------------------------------------------------------------------------- batching
def test_caption_batches_shapes_padding_labels(world, tokenizer):
    examples = world.train.caption_examples("target")
    pre = ImagePreprocessor(size=32, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    batches = CaptionBatches(examples, tokenizer, pre, batch_size=8, max_length=48, seed=1)
    b = batches.batch(3)
    assert b["pixel_values"].shape == (8, 32, 32, 3) and b["pixel_values"].dtype == np.float32
    for key in ("input_ids", "attention_mask", "labels"):
        assert b[key].shape == (8, 48) and b[key].dtype == np.int32
    assert b["valid"].all() and batches.truncated == 0
    for row in range(8):
        ids, mask, labels = b["input_ids"][row], b["attention_mask"][row], b["labels"][row]
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # right padding
        assert ids[0] == tokenizer.bos_id and ids[n - 1] == tokenizer.eos_id
        assert (ids[n:] == tokenizer.pad_id).all()
        assert labels[0] == IGNORE_INDEX and (labels[n:] == IGNORE_INDEX).all()
        np.testing.assert_array_equal(labels[1:n], ids[1:n])
        ex = examples[b["example_index"][row]]
        assert tokenizer.decode(ids) in {c.lower() for c in ex.captions}
    # pixel values: resize then (x/255 - mean)/std, computed here with PIL directly
    ex = examples[b["example_index"][0]]
    resized = np.asarray(Image.fromarray(ex.image).resize((32, 32), Image.Resampling.BICUBIC), np.float32)
    want = (resized / 255.0 - np.array([0.4, 0.5, 0.6])) / np.array([0.2, 0.25, 0.3])
    np.testing.assert_allclose(b["pixel_values"][0], want, atol=1e-5)


def test_batches_deterministic_resumable_and_cover_an_epoch(world, tokenizer):
    examples = world.val.caption_examples("source")
    make = lambda seed: CaptionBatches(examples, tokenizer, ImagePreprocessor(size=64), batch_size=7,
                                       max_length=32, seed=seed, drop_remainder=False)
    a, b, c = make(0), make(0), make(1)
    seq = list(a.iterate(0, 2 * len(a)))
    resumed = list(b.iterate(len(a) + 1, len(a) - 1))  # a run restarted mid-way sees the same batches
    for x, y in zip(seq[len(a) + 1:], resumed, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert not np.array_equal(seq[0]["example_index"], c.batch(0)["example_index"])
    # every (image, caption) pair exactly once per epoch; padding rows are invalid and carry no labels
    pairs = []
    for batch in seq[:len(a)]:
        for row in np.flatnonzero(batch["valid"]):
            pairs.append((int(batch["example_index"][row]), tokenizer.decode(batch["input_ids"][row])))
        pad = ~batch["valid"]
        assert (batch["labels"][pad] == IGNORE_INDEX).all() and (batch["attention_mask"][pad].sum(1) == 1).all()
        assert (batch["pixel_values"][pad] == 0).all()
    want = sorted((i, c.lower()) for i, ex in enumerate(examples) for c in ex.captions)
    assert sorted(pairs) == want
    assert len(pairs) == len(examples) * 5 and a.steps_per_epoch == -(-len(want) // 7)
    dropped = CaptionBatches(examples, tokenizer, ImagePreprocessor(size=64), batch_size=7, max_length=32)
    assert dropped.steps_per_epoch == len(want) // 7 and dropped.batch(0)["valid"].all()


def test_sampled_reference_per_image(world, tokenizer):
    examples = world.val.caption_examples("target")
    batches = CaptionBatches(examples, tokenizer, ImagePreprocessor(size=64), batch_size=4, max_length=64,
                             pairs="sample")
    assert batches.steps_per_epoch == len(examples) // 4
    seen = set()
    for step in range(6 * batches.steps_per_epoch):
        b = batches.batch(step)
        for row in range(4):
            ex = examples[b["example_index"][row]]
            text = tokenizer.decode(b["input_ids"][row])
            assert text in {c.lower() for c in ex.captions}
            seen.add((ex.image_id, text))
    assert len(seen) > 2 * len(examples)  # different references of the same image across epochs
    np.testing.assert_array_equal(batches.batch(5)["input_ids"], batches.batch(5)["input_ids"])


def test_prompt_before_caption_is_not_a_target(world, tokenizer):
    examples = world.train.caption_examples("target", prompt=shapes.CAPTION_TASK_PROMPT)
    b = CaptionBatches(examples, tokenizer, ImagePreprocessor(size=64), batch_size=2, max_length=48).batch(0)
    prompt_ids = tokenizer.encode(shapes.CAPTION_TASK_PROMPT, add_special_tokens=False)
    for row in range(2):
        ids, labels = b["input_ids"][row], b["labels"][row]
        assert ids[1:1 + len(prompt_ids)].tolist() == prompt_ids
        assert (labels[:1 + len(prompt_ids)] == IGNORE_INDEX).all()
        caption = tokenizer.decode(labels[labels != IGNORE_INDEX])
        assert caption in {c.lower() for c in examples[b["example_index"][row]].captions}
    # truncation keeps the prompt and cuts the caption (counted)
    short = CaptionBatches(examples, tokenizer, ImagePreprocessor(size=64), batch_size=2, max_length=8)
    sb = short.batch(0)
    assert short.truncated == 2 and sb["attention_mask"].all()
    with pytest.raises(InputError, match="max_length"):
        CaptionBatches(examples, tokenizer, ImagePreprocessor(size=64), batch_size=2, max_length=3).batch(0)


def test_vqa_and_eval_batches(world, tokenizer):
    vqa_examples = world.val.vqa_examples()
    b = VQABatches(vqa_examples, tokenizer, ImagePreprocessor(size=64), batch_size=4, max_length=24).batch(0)
    for row in range(4):
        ex = vqa_examples[b["example_index"][row]]
        target = tokenizer.decode(b["labels"][row][b["labels"][row] != IGNORE_INDEX])
        assert target == ex.answer
        assert tokenizer.decode(b["input_ids"][row]) == f"question: {ex.question} short answer: {ex.answer}"
    examples = world.test.caption_examples("source")
    ev = list(EvalBatches(examples, tokenizer, ImagePreprocessor(size=64), batch_size=5, max_prompt_length=6,
                          prompt=shapes.CAPTION_TASK_PROMPT))
    assert len(ev) == 3 and ev[-1]["valid"].tolist() == [True, True, False, False, False]
    assert [int(i) for e in ev for i in e["example_index"] if i >= 0] == list(range(len(examples)))
    row = ev[0]["input_ids"][0]
    prompt = tokenizer.encode(shapes.CAPTION_TASK_PROMPT, add_special_tokens=False)
    assert row[-len(prompt) - 1:].tolist() == [tokenizer.bos_id, *prompt]  # left padded, ends with the prompt
    assert (row[:-len(prompt) - 1] == tokenizer.pad_id).all()
    assert ev[0]["attention_mask"][0].tolist() == [0] * (6 - len(prompt) - 1) + [1] * (len(prompt) + 1)
    np.testing.assert_array_equal(ev[0]["pixel_values"][0], ImagePreprocessor(size=64)(examples[0].image))
    ev_vqa = EvalBatches(vqa_examples, tokenizer, ImagePreprocessor(size=64), 2, 16)  # default VQA prompt
    first = ev_vqa.batch(0)
    assert tokenizer.decode(first["input_ids"][0]) == f"question: {vqa_examples[0].question} short answer:"
    assert ev_vqa.examples_of(first) == vqa_examples[:2]
    custom = EvalBatches(vqa_examples, tokenizer, ImagePreprocessor(size=64), 2, 16,
                         prompt=batching.vqa_prompt("{question}")).batch(0)
    assert tokenizer.decode(custom["input_ids"][0]) == vqa_examples[0].question


def test_batching_with_a_transformers_tokenizer(tokenizer, world, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save(tmp_path / "tok")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    examples = world.train.caption_examples("source")
    ours = CaptionBatches(examples, tokenizer, ImagePreprocessor(size=64), 4, 32).batch(0)
    theirs = CaptionBatches(examples, hf, ImagePreprocessor(size=64), 4, 32).batch(0)
    for key in ("input_ids", "attention_mask", "labels"):
        np.testing.assert_array_equal(ours[key], theirs[key])


# ----------------------------------------------------------------------------------------------- images
def _write_images(d):
    """RGB, grayscale, RGBA, palette images, a corrupt file and a truncated PNG."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(d / "rgb.png")
    Image.fromarray(np.full((16, 16), 77, np.uint8), mode="L").save(d / "gray.png")
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:8, :, 3] = 255  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba, mode="RGBA").save(d / "rgba.png")
    Image.new("P", (10, 10), 3).save(d / "palette.png")
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(d / "photo.jpg")
    (d / "corrupt.jpg").write_bytes(b"this is not an image at all")
    full = (d / "rgb.png").read_bytes()
    (d / "truncated.png").write_bytes(full[: len(full) // 2])


def test_image_conversion(tmp_path):
    _write_images(tmp_path)
    gray = images.decode_image(tmp_path / "gray.png")
    assert gray.shape == (16, 16, 3) and (gray == 77).all()
    rgba = images.decode_image(tmp_path / "rgba.png")
    assert rgba.shape == (16, 16, 3)
    assert tuple(rgba[0, 0]) == (200, 0, 0) and tuple(rgba[15, 0]) == (255, 255, 255)  # alpha over white
    assert images.decode_image(tmp_path / "palette.png").shape == (10, 10, 3)
    for bad in ("corrupt.jpg", "truncated.png", "missing.png"):
        with pytest.raises(InputError, match=bad):
            images.decode_image(tmp_path / bad)
    pre = ImagePreprocessor(size=(8, 12))
    assert pre(tmp_path / "gray.png").shape == (8, 12, 3)
    assert images.array_to_rgb_uint8(np.ones((4, 4, 1), np.float32)).max() == 255
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "resample": 3,
        "image_mean": list(images.CLIP_MEAN), "image_std": list(images.CLIP_STD)}))
    clip = ImagePreprocessor.from_pretrained(tmp_path)
    assert clip.height_width == (224, 224) and clip.crop == "center" and clip.resample == "bicubic"
    assert clip(tmp_path / "rgb.png").shape == (224, 224, 3)


# ---------------------------------------------------------------------------------------------- loaders
def _karpathy(tmp_path, extra=()):
    _write_images(tmp_path / "imgs" / "val2014")
    entries = [
        {"filepath": "val2014", "filename": "rgb.png", "split": "train", "imgid": 0, "cocoid": 10,
         "sentences": [{"raw": "A noisy picture.", "imgid": 0}, {"tokens": ["random", "pixels"], "imgid": 0}]},
        {"filepath": "val2014", "filename": "gray.png", "split": "test", "imgid": 1, "cocoid": 11,
         "sentences": [{"raw": "A gray square.", "imgid": 1}]},
        {"filepath": "val2014", "filename": "rgba.png", "split": "restval", "imgid": 2, "cocoid": 12,
         "sentences": [{"raw": "Half red.", "imgid": 2}]},
        *extra,
    ]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return path


def test_karpathy_loader(tmp_path):
    path = _karpathy(tmp_path)
    train = coco.load_karpathy(path, tmp_path / "imgs", split=["train", "restval"])
    assert [e.image_id for e in train] == ["10", "12"]
    assert train[0].captions == ("A noisy picture.", "random pixels")
    assert train[1].image.shape == (16, 16, 3)  # RGBA converted
    test = coco.load_karpathy(path, tmp_path / "imgs", split="test", image_size=8)
    assert len(test) == 1 and test[0].image.shape == (8, 8, 3) and test.report.skipped == 0
    lazy = coco.load_karpathy(path, tmp_path / "imgs", split=None, images="lazy")
    assert len(lazy) == 3 and lazy[0].image is None and lazy[0].image_path.endswith("rgb.png")
    # lazily loaded examples batch like eager ones
    tok = WordTokenizer.train(c for e in lazy for c in e.captions)
    b = CaptionBatches(list(lazy), tok, ImagePreprocessor(size=16), batch_size=2, max_length=8).batch(0)
    assert b["pixel_values"].shape == (2, 16, 16, 3)
    flickr = tmp_path / "dataset_flickr30k.json"
    flickr.write_text(json.dumps({"images": [{"filename": "photo.jpg", "split": "val", "imgid": 5,
                                              "sentences": [{"raw": "Noise."}]}]}))
    f = coco.load_flickr30k(flickr, tmp_path / "imgs" / "val2014", split="val")
    assert f[0].image_id == "5" and f[0].image.shape == (12, 12, 3)
    with pytest.raises(InputError, match="unknown Karpathy split"):
        coco.load_karpathy(path, tmp_path / "imgs", split="dev")


BAD_KARPATHY = [
    ({"filepath": "val2014", "filename": "missing.png", "split": "train", "imgid": 3,
      "sentences": [{"raw": "Gone."}]}, "missing image file", "missing.png"),
    ({"filepath": "val2014", "filename": "corrupt.jpg", "split": "train", "imgid": 4,
      "sentences": [{"raw": "Broken."}]}, "unreadable image", "corrupt.jpg"),
    ({"filepath": "val2014", "filename": "truncated.png", "split": "train", "imgid": 5,
      "sentences": [{"raw": "Cut."}]}, "unreadable image", "truncated.png"),
    ({"filepath": "val2014", "filename": "palette.png", "split": "train", "imgid": 6,
      "sentences": [{"raw": "  "}]}, "empty caption", "caption 0"),
    ({"filepath": "val2014", "filename": "palette.png", "split": "train", "imgid": 7,
      "sentences": [{"raw": "Wrong owner.", "imgid": 99}]}, "id mismatch", "imgid 99"),
]


@pytest.mark.parametrize("entry,reason,named", BAD_KARPATHY, ids=[r for _, r, _ in BAD_KARPATHY])
def test_karpathy_bad_input_raises_or_is_counted(tmp_path, entry, reason, named):
    path = _karpathy(tmp_path, extra=[entry])
    with pytest.raises(InputError, match=re.escape(named)) as err:
        coco.load_karpathy(path, tmp_path / "imgs", split=None)
    assert str(path) in str(err.value) and reason in str(err.value)
    with pytest.warns(DataSkipWarning, match=reason):
        ds = coco.load_karpathy(path, tmp_path / "imgs", split=None, on_error="skip")
    assert len(ds) == 3 and ds.report.counts[reason] == 1
    summary = ds.report.summary()
    assert "loaded 3" in summary and reason in summary and named in summary


def test_coco_annotations_loader_and_bad_ids(tmp_path):
    _write_images(tmp_path / "imgs")
    data = {"images": [{"id": 1, "file_name": "rgb.png"}, {"id": 2, "file_name": "gray.png"},
                       {"id": 3, "file_name": "rgba.png"}],
            "annotations": [{"id": 10, "image_id": 1, "caption": "Noise."},
                            {"id": 11, "image_id": 2, "caption": "Gray."},
                            {"id": 12, "image_id": 1, "caption": "Still noise."}]}
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="image 3 .*no non-empty caption"):
        coco.load_coco_captions(path, tmp_path / "imgs")
    data["annotations"].append({"id": 13, "image_id": 3, "caption": "Red top."})
    path.write_text(json.dumps(data))
    ds = coco.load_coco_captions(path, tmp_path / "imgs")
    assert [(e.image_id, e.captions) for e in ds] == [("1", ("Noise.", "Still noise.")), ("2", ("Gray.",)),
                                                      ("3", ("Red top.",))]
    data["annotations"].append({"id": 14, "image_id": 404, "caption": "Nobody."})
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="image_id 404"):
        coco.load_coco_captions(path, tmp_path / "imgs")
    with pytest.warns(DataSkipWarning):
        ds = coco.load_coco_captions(path, tmp_path / "imgs", on_error="skip")
    assert len(ds) == 3 and ds.report.counts == {"id mismatch": 1}
    path.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        coco.load_coco_captions(path, tmp_path / "imgs")
    with pytest.raises(InputError, match="annotation file not found"):
        coco.load_coco_captions(tmp_path / "nope.json", tmp_path / "imgs")


def _vqav2_files(tmp_path):
    d = tmp_path / "val2014"
    d.mkdir(parents=True)
    for image_id, mode in ((1, "RGB"), (2, "L"), (3, "RGBA")):
        Image.new(mode, (10, 10)).save(d / f"COCO_val2014_{image_id:012d}.jpg" if mode != "RGBA"
                                       else d / f"COCO_val2014_{image_id:012d}.png")
    questions = {"data_subtype": "val2014", "questions": [
        {"question_id": 11, "image_id": 1, "question": "What is it?"},
        {"question_id": 12, "image_id": 1, "question": "Is it dark?"},
        {"question_id": 21, "image_id": 2, "question": "How gray?"}]}
    annotations = {"annotations": [
        {"question_id": 11, "image_id": 1, "answers": [{"answer": "nothing"}] * 8 + [{"answer": "black"}] * 2,
         "answer_type": "other"},
        {"question_id": 12, "image_id": 1, "answers": [{"answer": "yes"}] * 10},
        {"question_id": 21, "image_id": 2, "answers": [{"answer": "very"}] * 10}]}
    return d, questions, annotations


def test_vqav2_loader_and_bad_input(tmp_path):
    d, questions, annotations = _vqav2_files(tmp_path)
    qf, af = tmp_path / "q.json", tmp_path / "a.json"
    qf.write_text(json.dumps(questions))
    af.write_text(json.dumps(annotations))
    ds = vqa.load_vqav2(qf, af, d)
    assert [(e.question_id, e.answer, len(e.answers)) for e in ds] == [("11", "nothing", 10), ("12", "yes", 10),
                                                                      ("21", "very", 10)]
    assert ds[0].image is ds[1].image  # one decoded array per image
    assert ds[2].image.shape == (10, 10, 3) and ds[0].meta["answer_type"] == "other"
    assert len(vqa.load_vqav2(qf, None, d)) == 3  # test questions without answers are allowed
    # question without answers; annotation on another image; annotation for an unknown question
    annotations["annotations"][1]["answers"] = []
    annotations["annotations"][2]["image_id"] = 1
    annotations["annotations"].append({"question_id": 99, "image_id": 1, "answers": [{"answer": "x"}]})
    af.write_text(json.dumps(annotations))
    with pytest.raises(InputError, match="question_id 99"):
        vqa.load_vqav2(qf, af, d)
    with pytest.warns(DataSkipWarning, match="skipped 3"):
        ds = vqa.load_vqav2(qf, af, d, on_error="skip")
    assert [e.question_id for e in ds] == ["11"]
    assert ds.report.counts == {"id mismatch": 2, "question without answers": 1}
    questions["questions"].append({"question_id": 31, "image_id": 3, "question": "Where?"})  # .png, not .jpg
    qf.write_text(json.dumps(questions))
    annotations["annotations"] = annotations["annotations"][:1] + [
        {"question_id": q, "image_id": i, "answers": [{"answer": "a"}]} for q, i in ((12, 1), (21, 2), (31, 3))]
    af.write_text(json.dumps(annotations))
    with pytest.raises(InputError, match="COCO_val2014_000000000003.jpg"):
        vqa.load_vqav2(qf, af, d)


def test_vqa_json_schemas(tmp_path):
    _write_images(tmp_path / "imgs")
    Image.new("RGB", (6, 6)).save(tmp_path / "imgs" / "000000000042.jpg")
    Image.new("RGB", (6, 6)).save(tmp_path / "imgs" / "n123.jpg")
    aok = [{"question_id": "abc", "image_id": 42, "question": "What?", "choices": ["a", "b"],
            "correct_choice_idx": 0, "direct_answers": ["a"] * 9 + ["b"]}]
    (tmp_path / "aok.json").write_text(json.dumps(aok))
    ds = vqa.load_vqa_json(tmp_path / "aok.json", tmp_path / "imgs")
    assert ds[0].answer == "a" and ds[0].meta["schema"] == "aokvqa" and ds[0].meta["choices"] == ("a", "b")
    gqa = {"q1": {"imageId": "n123", "question": "Is it dark?", "answer": "yes"}}
    (tmp_path / "gqa.json").write_text(json.dumps(gqa))
    ds = vqa.load_vqa_json(tmp_path / "gqa.json", tmp_path / "imgs")
    assert (ds[0].question_id, ds[0].image_id, ds[0].answers) == ("q1", "n123", ("yes",))
    plain = [{"image": "gray.png", "question": "Gray?", "answers": ["yes", "yes"]},
             {"image": "corrupt.jpg", "question": "Ok?", "answer": "no"},
             {"image": "rgb.png", "question": "Noise?", "answers": []}]
    (tmp_path / "plain.json").write_text(json.dumps(plain))
    with pytest.raises(InputError, match="corrupt.jpg"):
        vqa.load_vqa_json(tmp_path / "plain.json", tmp_path / "imgs")
    with pytest.warns(DataSkipWarning):
        ds = vqa.load_vqa_json(tmp_path / "plain.json", tmp_path / "imgs", on_error="skip")
    assert len(ds) == 1 and ds.report.counts == {"unreadable image": 1, "question without answers": 1}


def _optional_package(module: str, distribution: str):
    """Imports an optional data package: a skip on a developer's machine without it, a failure in CI.

    Both are in the ``test`` extra (pyproject.toml), so CI (``CI=true``, which runs ``pip install -e
    '.[test]'``) always has them; there a missing one means the loader tests silently stopped running.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true but the `{distribution}` package cannot be imported ({e}); it is in the test "
                        "extra: pip install -e '.[test]'")
        pytest.skip(f"the `{distribution}` package is not installed (pip install -e '.[test]')")


def test_hf_datasets_imagefolder_json_and_vqa(tmp_path, monkeypatch):
    _optional_package("datasets", "datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "folder"
    _write_images(folder)
    for bad in ("corrupt.jpg", "truncated.png"):
        (folder / bad).unlink()  # imagefolder lists files itself; bad images are tested with a JSON file
    rows = [{"file_name": "rgb.png", "text": "noise"}, {"file_name": "gray.png", "text": "gray"},
            {"file_name": "rgba.png", "text": "half red"}, {"file_name": "palette.png", "text": "flat"},
            {"file_name": "photo.jpg", "text": "a photo"}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = hf_datasets.load_hf_captions(folder, cache_dir=tmp_path / "cache")
    assert sorted(e.captions[0] for e in ds) == sorted(r["text"] for r in rows)
    assert all(e.image.shape[-1] == 3 for e in ds) and {e.image_id for e in ds} == {r["file_name"] for r in rows}
    gray = next(e for e in ds if e.captions == ("gray",))
    np.testing.assert_array_equal(gray.image, images.decode_image(folder / "gray.png"))

    _write_images(tmp_path / "imgs")
    lines = [{"image": "rgb.png", "caption": ["noise", "static"]}, {"image": "corrupt.jpg", "caption": ["x"]},
             {"image": "gray.png", "caption": [""]}, {"image": "missing.png", "caption": ["y"]}]
    jf = tmp_path / "imgs" / "caps.jsonl"
    jf.write_text("\n".join(json.dumps(r) for r in lines))
    with pytest.raises(InputError, match="corrupt.jpg"):
        hf_datasets.load_hf_captions(jf, cache_dir=tmp_path / "cache")
    with pytest.warns(DataSkipWarning, match="skipped 4"):
        ds = hf_datasets.load_hf_captions(jf, cache_dir=tmp_path / "cache", on_error="skip")
    assert [e.captions for e in ds] == [("noise", "static")]
    assert ds.report.counts == {"unreadable image": 1, "empty caption": 1, "image without captions": 1,
                                "missing image file": 1}

    import datasets

    table = datasets.Dataset.from_dict({
        "image": [{"bytes": (tmp_path / "imgs" / "rgba.png").read_bytes(), "path": "rgba.png"}],
        "question": ["What color?"], "answers": [["red"] * 10]}).cast_column("image", datasets.Image())
    table.to_parquet(str(tmp_path / "vqa.parquet"))
    v = hf_datasets.load_hf_vqa(tmp_path / "vqa.parquet", cache_dir=tmp_path / "cache")
    assert v[0].answer == "red" and v[0].image.shape == (16, 16, 3) and tuple(v[0].image[15, 0]) == (255, 255, 255)
    (tmp_path / "broken.jsonl").write_text('{"question": "q?"')
    with pytest.raises(InputError, match="broken.jsonl"):
        hf_datasets.load_hf_vqa(tmp_path / "broken.jsonl", cache_dir=tmp_path / "cache")
    with pytest.raises(OfflineError, match="hub dataset id"):
        hf_datasets.load_hf_dataset("someone/coco-captions")
    with pytest.raises(InputError, match="caption column"):
        hf_datasets.hf_caption_examples(table, caption_column="text")


def test_tfds_missing_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed
    with pytest.raises(ConfigError, match="pip install tensorflow-datasets"):
        tfds.load_tfds_captions("coco_captions", data_dir="/nonexistent")
    with pytest.raises(ConfigError, match="tensorflow-datasets"):
        tfds.load_tfds_vqa(builder_dir="/nonexistent")


def test_tfds_prepared_builder_dir(tmp_path):
    tfds_mod = _optional_package("tensorflow_datasets", "tensorflow-datasets")
    captions = [["a dark square", "black"], ["noise"]]
    pictures = [np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 128, np.uint8)]

    class Tiny(tfds_mod.core.GeneratorBasedBuilder):
        VERSION = tfds_mod.core.Version("1.0.0")

        def _info(self):
            return self.dataset_info_from_configs(features=tfds_mod.features.FeaturesDict({
                # a uint8 tensor, not features.Image: encoding images would need TensorFlow
                "image": tfds_mod.features.Tensor(shape=(8, 8, 3), dtype=np.uint8),
                "image/id": np.int64,
                "captions": tfds_mod.features.Sequence({"text": tfds_mod.features.Text()})}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, (img, caps) in enumerate(zip(pictures, captions, strict=True)):
                yield i, {"image": img, "image/id": i, "captions": {"text": caps}}

    builder = Tiny(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    ds = tfds.load_tfds_captions(builder_dir=builder.data_dir, split="train")
    got = sorted((e.image_id, e.captions, int(e.image.mean())) for e in ds)
    assert got == [("0", ("a dark square", "black"), 0), ("1", ("noise",), 128)]
    by_name = tfds.load_tfds_captions("tiny", data_dir=tmp_path, split="train", image_size=4)
    assert len(by_name) == 2 and by_name[0].image.shape == (4, 4, 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not prepared"):
        tfds.load_tfds_captions("tiny", data_dir=tmp_path / "empty")
    with pytest.raises(InputError, match="no split 'validation'"):
        tfds.load_tfds_captions(builder_dir=builder.data_dir, split="validation")


def test_skip_report_and_on_error_validation():
    r = batching.SkipReport("src", on_error="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r.finish(3)  # nothing skipped: no warning
    with pytest.raises(InputError, match="on_error"):
        batching.SkipReport("src", on_error="ignore")
    with pytest.raises(InputError, match="no full batch"):
        CaptionBatches([CaptionExample("a", ("x",), image=np.zeros((2, 2, 3), np.uint8))],
                       WordTokenizer.train(["x"]), ImagePreprocessor(size=2), batch_size=2)


def test_world_generation_does_not_depend_on_the_hash_seed():
    # the ood split once drew held-out pairs from a set, whose order changes with PYTHONHASHSEED
    import os
    import subprocess
    import sys

    code = ("from vlpeft_jax.data import shapes; import hashlib, json; "
            "w = shapes.generate(shapes.ShapesWorldConfig(num_train=4, num_val=2, num_test=2, num_ood=16)); "
            "print(hashlib.sha256(json.dumps(w['ood'].scenes, sort_keys=True, default=str).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("0", "1", "2")}
    assert len(digests) == 1, digests
