"""The VQA task: prompt/label layout, official VQA accuracy per question type, VQA-format files, end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlpeft_jax import tasks
from vlpeft_jax.config import load_config_file
from vlpeft_jax.data import shapes
from vlpeft_jax.data.batching import IGNORE_INDEX, VQA_PROMPT_TEMPLATE
from vlpeft_jax.errors import ConfigError
from vlpeft_jax.eval.vqa import normalize_answer, vqa_accuracy
from vlpeft_jax.tasks.vqa import VQATask

ROOT = Path(__file__).resolve().parents[2]


def smoke_config(shapes_caches, **eval_settings):
    cfg = load_config_file(str(ROOT / "configs/shapes_vqa.py:smoke"))
    cfg.data.cache_dir = str(shapes_caches["data"])
    cfg.pretrain.cache_dir = str(shapes_caches["pretrain"])
    cfg.eval.update(eval_settings)
    return cfg


@pytest.fixture(scope="module")
def task(shapes_caches):
    return tasks.build(smoke_config(shapes_caches, max_examples=0))


def known_predictions(examples):
    """Right, normalisable, minority (partial credit), wrong and empty answers, cycling over the questions."""
    preds = {}
    for i, ex in enumerate(examples):
        minority = min(set(ex.answers), key=ex.answers.count)
        preds[ex.question_id] = [ex.answer, f"The {ex.answer.upper()}.", minority, "zebra", ""][i % 5]
    return preds


# ------------------------------------------------------------------------------------------- layout


def test_prompt_is_petal_table_7_and_loss_is_on_the_answer_only(task):
    # seed 001, Appendix C, Table 7: task-specific VQA instruction "Question: {Question} Short answer:"
    assert VQA_PROMPT_TEMPLATE == "Question: {question} Short answer:"
    tok = task.tokenizer
    batches = task.train_batches(seed=0)
    batch = batches.batch(0)
    examples = batches.examples
    assert set(batch) >= {"pixel_values", "input_ids", "attention_mask", "labels"}
    for row, idx in enumerate(batch["example_index"]):
        ex = examples[idx]
        prompt = tok.encode(f"Question: {ex.question} Short answer:", add_special_tokens=False)
        answer = tok.encode(ex.answer, add_special_tokens=False)
        head = 1 + len(prompt)
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        assert ids[0] == tok.bos_id and ids[1:head].tolist() == prompt
        assert ids[head:head + len(answer) + 1].tolist() == answer + [tok.eos_id]
        assert (labels[:head] == IGNORE_INDEX).all()  # <bos> and the instruction carry no loss
        assert labels[head:head + len(answer) + 1].tolist() == answer + [tok.eos_id]
        assert (labels[head + len(answer) + 1:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].sum() == head + len(answer) + 1


def test_training_questions_are_limited_to_the_configured_types(task):
    assert set(task.cfg.train.question_types) == {"count", "position", "relation"}
    examples = task.train_batches(seed=0).examples
    assert {ex.meta["qtype"] for ex in examples} == {"count", "position", "relation"}
    every = task.examples("train")
    assert len(examples) == sum(ex.meta["qtype"] in ("count", "position", "relation") for ex in every)
    sel = list(task.selection_batches({"num_batches": 2, "question_types": ["color"]}, seed=3))
    assert len(sel) == 2 and sel[0]["input_ids"].shape[0] == task.cfg.train.batch_size


# ------------------------------------------------------------------------------------------ scoring


def test_evaluation_matches_the_official_accuracy_per_type(task, monkeypatch):
    examples = task.eval_examples()
    preds = known_predictions(examples)
    monkeypatch.setattr(task, "answer", lambda module, params, methods, exs: [preds[e.question_id] for e in exs])
    res = task.evaluate(None, None, [])
    assert res["outputs"] == preds
    official = {ex.question_id: vqa_accuracy(preds[ex.question_id], ex.answers) for ex in examples}
    exact = {ex.question_id: normalize_answer(preds[ex.question_id]) == ex.answer for ex in examples}
    assert res["all"]["metrics"]["VQA accuracy"] == pytest.approx(np.mean(list(official.values())), abs=1e-12)
    assert res["all"]["metrics"]["exact match"] == pytest.approx(np.mean(list(exact.values())), abs=1e-12)
    assert 0.2 < res["all"]["metrics"]["VQA accuracy"] < 0.8  # partial credits and misses both present
    assert task.groups == VQATask.groups == ("all", *shapes.QUESTION_TYPES)
    for qtype in shapes.QUESTION_TYPES:
        ids = [ex.question_id for ex in examples if ex.meta["qtype"] == qtype]
        assert res[qtype]["count"] == len(ids)
        if ids:
            assert res[qtype]["metrics"]["VQA accuracy"] == pytest.approx(np.mean([official[i] for i in ids]))
        else:
            assert res[qtype]["metrics"] == {} and "VQA accuracy" in res[qtype]["unavailable"]


def test_per_type_breakdown_sums_to_the_overall(task, monkeypatch):
    examples = task.eval_examples()
    preds = known_predictions(examples)
    monkeypatch.setattr(task, "answer", lambda module, params, methods, exs: [preds[e.question_id] for e in exs])
    res = task.evaluate(None, None, [])
    types = [g for g in task.groups if g != "all" and res[g]["count"]]
    assert len(types) >= 4
    assert sum(res[g]["count"] for g in task.groups[1:]) == res["all"]["count"] == len(examples)
    for metric in task.report_metrics:
        weighted = sum(res[g]["count"] * res[g]["metrics"][metric] for g in types) / res["all"]["count"]
        assert weighted == pytest.approx(res["all"]["metrics"][metric], abs=1e-12)


def test_partial_credit_example():
    from vlpeft_jax.data.batching import VQAExample
    from vlpeft_jax.tasks.vqa import score_answers

    exs = [VQAExample("1", "a", "how many?", ("2",) * 8 + ("3",) * 2, meta={"qtype": "count"}),
           VQAExample("2", "a", "what is it?", ("circle",), meta={"qtype": "shape"})]  # one reference: exact match
    res = score_answers(exs, {"1": "Three", "2": "a circle"}, ("all", "count", "shape"))
    assert res["count"]["metrics"]["VQA accuracy"] == pytest.approx(0.6)  # (8 * 2/3 + 2 * 1/3) / 10
    assert res["shape"]["metrics"]["VQA accuracy"] == 1.0
    assert res["all"]["metrics"]["exact match"] == 0.5


def test_outputs_and_samples(task):
    name, rows = task.outputs_file({"7": "yes", "val_000001_q2": "red"})
    assert name == "answers" and rows == [{"question_id": 7, "answer": "yes"},
                                          {"question_id": "val_000001_q2", "answer": "red"}]
    ex = task.eval_examples()
    res = {"zero-shot": {"outputs": {e.question_id: "no" for e in ex}},
           "adapted": {"outputs": {e.question_id: "yes" for e in ex}}}
    samples = task.samples(res, 4)
    assert len(samples) == 4 and samples[0].image.shape == (64, 64, 3)
    assert samples[0].lines[0].startswith("Q: ") and samples[0].lines[1:3] == ["zero-shot: no", "adapted: yes"]
    assert samples[0].lines[3].startswith("reference: ")
    assert len({s.lines[0] for s in samples}) == 4


# --------------------------------------------------------------------------------------- bad config


@pytest.mark.parametrize("change, match", [
    (lambda c: c.data.update(kind="coco"), "data.kind='coco'"),
    (lambda c: c.train.update(question_types=["colour"]), "train.question_types: unknown question type"),
])
def test_bad_settings_are_config_errors(shapes_caches, change, match):
    cfg = smoke_config(shapes_caches)
    change(cfg)
    with pytest.raises(ConfigError, match=match):
        tasks.build(cfg)


def test_config_variants():
    with pytest.raises(ConfigError, match="unknown variant 'bogus'"):
        load_config_file(str(ROOT / "configs/shapes_vqa.py:bogus"))
    cfg = load_config_file(str(ROOT / "configs/shapes_vqa.py:all_types,smoke"))
    assert list(cfg.train.question_types) == list(shapes.QUESTION_TYPES)
    pre = load_config_file(str(ROOT / "configs/shapes_vqa_pretrain.py"))
    base = set(pre.train.question_types)  # source-style: what the source captions say; the rest is adapted
    assert base == {"color", "shape", "existence"}
    assert set(load_config_file(str(ROOT / "configs/shapes_vqa.py")).train.question_types) == \
        set(shapes.QUESTION_TYPES) - base


def test_captions_mixed_into_training(shapes_caches):
    cfg = smoke_config(shapes_caches)
    cfg.train.captions = "source"
    t = tasks.build(cfg)
    batches = t.train_batches(seed=0)
    world = t.world["train"]
    n_questions = sum(ex.meta["qtype"] in cfg.train.question_types for ex in t.examples("train"))
    assert len(batches.items) == n_questions + sum(len(s["captions_source"]) for s in world.scenes)
    tok = t.tokenizer
    for b in batches.iterate(0, 4):
        for ids, labels in zip(b["input_ids"], b["labels"], strict=True):
            text = tok.decode(ids)
            target = tok.decode(labels[labels != IGNORE_INDEX])
            assert text.endswith(target) and (text.startswith("question:") or text == target)
    cfg.train.captions = "styled"
    with pytest.raises(ConfigError, match="train.captions='styled'"):
        tasks.build(cfg)


# -------------------------------------------------------------------------------------- VQA files


def write_vqa_files(d: Path):
    """A VQAv2-format train split (questions + annotations with answer types) and a plain-list val split."""
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(d / f"{i}.png")
    qs = [("is it a cat?", "yes", "yes/no"), ("how many dogs?", "2", "number"), ("what color is the car?", "red",
                                                                                 "other")]
    questions = {"data_subtype": "train", "questions": [
        {"question_id": 100 + k, "image_id": k % 3, "question": q} for k, (q, _, _) in enumerate(qs * 2)]}
    annotations = {"annotations": [
        {"question_id": 100 + k, "image_id": k % 3, "answer_type": t, "answers": [{"answer": a}] * 10}
        for k, (_, a, t) in enumerate(qs * 2)]}
    (d / "q.json").write_text(json.dumps(questions))
    (d / "a.json").write_text(json.dumps(annotations))
    val = [{"question_id": 7, "image": "3.png", "question": "what color is the bus?", "answers": ["blue"] * 10},
           {"question_id": 8, "image": "3.png", "question": "is it big?", "answers": ["no"] * 7 + ["yes"] * 3}]
    (d / "val.json").write_text(json.dumps(val))
    return {"train": {"questions": str(d / "q.json"), "annotations": str(d / "a.json"), "images": str(d),
                      "image_template": "{image_id}.png"},
            "val": {"questions": str(d / "val.json"), "images": str(d)}}


def files_config(shapes_caches, splits):
    cfg = smoke_config(shapes_caches, max_examples=0)
    cfg.data = {"kind": "vqa_files", "splits": splits, "tokenizer": ""}
    cfg.train.question_types = []
    cfg.train.batch_size = 4
    return cfg


def test_vqa_format_files(shapes_caches, tmp_path, monkeypatch):
    task = tasks.build(files_config(shapes_caches, write_vqa_files(tmp_path)))
    assert task.groups == ("all", "yes/no", "number", "other")
    tok = task.tokenizer
    # trained on the training questions and answers (and the instruction), not on the evaluation answers
    assert tok.unknown_words("Question: how many dogs? Short answer: 2 red yes") == []
    assert tok.unknown_words("blue") == ["blue"]
    b = task.train_batches(seed=0).batch(0)
    assert b["pixel_values"].shape == (4, 64, 64, 3)
    labelled = [tok.decode(row[row != IGNORE_INDEX]) for row in b["labels"]]
    assert set(labelled) <= {"yes", "2", "red"}
    ex = task.eval_examples()
    assert [e.question_id for e in ex] == ["7", "8"]
    monkeypatch.setattr(task, "answer", lambda module, params, methods, exs: ["Blue", "no"])
    res = task.evaluate(None, None, [])
    assert res["all"]["metrics"]["VQA accuracy"] == pytest.approx((1.0 + vqa_accuracy("no", ex[1].answers)) / 2)
    assert res["all"]["count"] == 2 and res["number"]["count"] == 0  # plain lists carry no answer type
    assert task.outputs_file(res["outputs"])[1] == [{"question_id": 7, "answer": "Blue"},
                                                   {"question_id": 8, "answer": "no"}]
    # the train split's answer types group the questions when it is evaluated
    task.cfg.eval.split = "train"
    monkeypatch.setattr(task, "answer", lambda module, params, methods, exs: ["yes", "3", "red"] * 2)
    res = task.evaluate(None, None, [])
    assert [res[g]["count"] for g in task.groups] == [6, 2, 2, 2]
    assert res["number"]["metrics"]["VQA accuracy"] == 0.0 and res["other"]["metrics"]["VQA accuracy"] == 1.0


def test_vqa_files_settings_errors(shapes_caches, tmp_path):
    splits = write_vqa_files(tmp_path)
    bad = [({"train": splits["train"]}, "data.splits has no 'val'"),
           ({**splits, "val": {**splits["val"], "answers": "x"}}, "data.splits.val: unknown setting"),
           ({**splits, "val": {**splits["val"], "questions": str(tmp_path / "nope.json")}}, "no such file"),
           ({**splits, "val": {"questions": splits["val"]["questions"]}}, "data.splits.val.images is required")]
    for s, match in bad:
        with pytest.raises(ConfigError, match=match):
            tasks.build(files_config(shapes_caches, s))
    cfg = files_config(shapes_caches, splits)
    cfg.data.tokenizer = str(tmp_path / "no_tokenizer")
    with pytest.raises(ConfigError, match="data.tokenizer"):
        tasks.build(cfg)
    cfg.data.tokenizer = "shapes"
    assert tasks.build(cfg).tokenizer.vocab_size == shapes.shapes_tokenizer().vocab_size


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_smoke_run_through_the_runner(shapes_caches, tmp_path):
    from vlpeft_jax.experiments import runner

    cfg = smoke_config(shapes_caches, max_examples=12)
    cfg.run_dir = str(tmp_path / "run")
    results = runner.run(cfg)
    run = Path(cfg.run_dir)
    assert results["task"] == "vqa"
    for key in ("zero_shot", "adapted"):
        assert set(results[key]) >= set(VQATask.groups)
        assert results[key]["all"]["count"] == 12
        assert 0.0 <= results[key]["all"]["metrics"]["VQA accuracy"] <= 1.0
        rows = json.loads((run / f"answers_{key}.json").read_text())
        assert len(rows) == 12 and set(rows[0]) == {"question_id", "answer"}
    report = (run / "report.md").read_text()
    for group in VQATask.groups:
        assert f"| zero-shot | {group} |" in report and f"| shapes_vqa | {group} |" in report
    assert "VQA accuracy" in report and (run / "samples.png").is_file()
    from vlpeft_jax.train import checkpoint

    bases = list(Path(shapes_caches["pretrain"]).glob("shapes_vqa_pretrain-*"))
    assert len(bases) == 1 and checkpoint.has_tree(bases[0] / "params")


@pytest.mark.slow
def test_files_run_through_the_runner_with_a_pretrained_base(shapes_caches, tmp_path):
    from vlpeft_jax.experiments import runner

    cfg = files_config(shapes_caches, write_vqa_files(tmp_path))
    # the shapes pretrain config's question types do not exist in these files: a clear error, before training
    cfg.pretrain.cache_dir = str(tmp_path / "pretrained")
    cfg.run_dir = str(tmp_path / "bad_run")
    with pytest.raises(ConfigError, match="'shapes_vqa_pretrain': train.question_types: unknown question type"):
        runner.run(cfg)
    # a pretrain config for files: every question (the pretrain task reads these files with this run's tokenizer)
    pretrain = tmp_path / "files_pretrain.py"
    pretrain.write_text(
        "from vlpeft_jax.config import load_config_file\n\n\n"
        "def get_config():\n"
        f"    c = load_config_file({str(ROOT / 'configs/shapes_vqa_pretrain.py:smoke')!r})\n"
        "    c.train.question_types = []\n"
        "    c.train.batch_size = 4\n"
        "    return c\n")
    cfg.pretrain.config = str(pretrain)
    cfg.run_dir = str(tmp_path / "run")
    results = runner.run(cfg)
    assert [results["adapted"][g]["count"] for g in ("all", "yes/no", "number", "other")] == [2, 0, 0, 0]
    assert json.loads((tmp_path / "run" / "answers_adapted.json").read_text())[0]["question_id"] == 7
    assert "| shapes_vqa | yes/no | n/a | n/a |" in (tmp_path / "run" / "report.md").read_text()
    assert list((tmp_path / "pretrained").glob("shapes_vqa_pretrain-*"))
