"""The referring-expression task of CK-Transformer (``configs/shapes_ckt.py``): encoded inputs against the data
they come from, the fact search modes, bad settings, and a smoke run through the runner."""

import json

import numpy as np
import pytest

from vlpeft_jax.config import load_config_file
from vlpeft_jax.errors import ConfigError
from vlpeft_jax.tasks.refexp import RefExpTask, bow_cosine, roi_features


@pytest.fixture(scope="module")
def tasks():
    out = {}
    for v in ("w2v", "nf", "oracle", "ckt"):
        out[v] = RefExpTask(load_config_file("configs/shapes_ckt.py", f"{v},smoke"))
    return out


def test_encoded_inputs_follow_the_examples(tasks):
    task = tasks["w2v"]
    arrays = task.encode("train")
    kb = task.data.fact_base
    for i, ex in enumerate(task.data.splits["train"]):
        n = len(ex.boxes)
        assert arrays["region_mask"][i].sum() == n and arrays["target"][i] == ex.target
        assert task.tokenizer.decode(arrays["expr_ids"][i][arrays["expr_mask"][i]]) == ex.expression.lower()
        facts = [task.tokenizer.decode(arrays["fact_ids"][i, j][arrays["fact_mask"][i, j]])
                 for j in range(arrays["fact_ids"].shape[1])]
        for c in range(n):
            chosen = [facts[j] for j in arrays["fact_index"][i, c] if j >= 0]
            of_category = {f.text.lower() for f in kb.of_category(ex.categories[c])}
            assert chosen and set(chosen) <= of_category  # the candidate's own category only
            # ranked by the bag-of-words cosine with the expression, best first
            scores = [bow_cosine(ex.expression, t) for t in chosen]
            assert scores == sorted(scores, reverse=True)
            assert len(chosen) == min(task.top_k, len(of_category))
        assert not arrays["region_mask"][i, n:].any() and (arrays["fact_index"][i, n:] == -1).all()


def test_fact_modes(tasks):
    nf = tasks["nf"].encode("train")
    # one mask "fact" per image, the first slot of every candidate (K copies of it would attend the same)
    real = nf["fact_index"][nf["region_mask"]]
    assert nf["fact_ids"].shape[1] == 1 and (real[:, 0] == 0).all() and (real[:, 1:] == -1).all()
    unk = tasks["nf"].tokenizer.token_to_id("<unk>")
    assert nf["fact_ids"][0, 0][nf["fact_mask"][0, 0]].tolist()[1] == unk  # <bos> [mask] <eos>
    oracle = tasks["oracle"]
    arrays = oracle.encode("train")
    kb = oracle.data.fact_base
    for i, ex in enumerate(oracle.data.splits["train"]):
        if ex.fact_id is not None:
            first = arrays["fact_index"][i, ex.target, 0]
            ids = arrays["fact_ids"][i, first][arrays["fact_mask"][i, first]]
            assert oracle.tokenizer.decode(ids) == kb.by_id(ex.fact_id).text.lower()
    # recall@K by hand: the ground-truth fact among the target's top-K
    task = tasks["w2v"]
    hits = [ex.fact_id in [f for f in task.top_facts(ex)[ex.target]] for ex in task.data.splits["val"]]
    task.encode("val")
    assert task._recall["val"] == pytest.approx(np.mean(hits))
    firsts = [task.top_facts(ex)[ex.target][0] == ex.fact_id for ex in task.data.splits["val"]]
    assert task._recall1["val"] == pytest.approx(np.mean(firsts))
    oracle.encode("val")
    assert oracle._recall1["val"] == 1.0  # the ground-truth fact is put first


def test_learned_fact_search_uses_the_retrievers_ranking(tasks):
    """``ckt`` (image-based search): each candidate's facts are the trained retriever's top-K of its category,
    and a retriever trained again with the same settings ranks the same way (deterministic)."""
    from vlpeft_jax.tasks.refexp_retrieval import Retriever

    task = tasks["ckt"]
    arrays = task.encode("val")
    again = Retriever(task.retriever_settings, task.data.fact_base, task.tokenizer, task.grid)
    again.fit(task.data.splits["train"])
    kb = task.data.fact_base
    for i, (ex, ranked) in enumerate(zip(task.data.splits["val"], again.rank_many(task.data.splits["val"]),
                                         strict=True)):
        texts = [task.tokenizer.decode(arrays["fact_ids"][i, j][arrays["fact_mask"][i, j]])
                 for j in range(arrays["fact_ids"].shape[1])]
        for c in range(len(ex.boxes)):
            chosen = [texts[j] for j in arrays["fact_index"][i, c] if j >= 0]
            assert chosen == [kb.by_id(f).text.lower() for f in ranked[c][:task.top_k]]
            assert set(ranked[c]) == {f.fact_id for f in kb.of_category(ex.categories[c])}


def test_roi_features_by_hand():
    image = np.zeros((8, 8, 3), np.uint8)
    image[:4, :4] = (255, 0, 0)
    image[4:, 4:] = (0, 0, 255)
    f = roi_features(image, np.array([[0, 0, 8, 8], [4, 4, 8, 8]], np.float32), 2)
    want0 = np.array([[1, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 1]], np.float32) - 0.5
    np.testing.assert_allclose(f[0], want0.ravel(), atol=1e-6)
    np.testing.assert_allclose(f[1], np.tile([-0.5, -0.5, 0.5], 4), atol=1e-6)


@pytest.fixture(scope="module")
def detected():
    """Smoke tasks evaluated on the simulated detector's boxes (``det=4``: at most 4 of the 4-9 objects + 3
    spurious boxes, so some targets are lost)."""
    return {v: RefExpTask(load_config_file("configs/shapes_ckt.py", f"{v},smoke,det=4")) for v in ("w2v", "ckt")}


def test_detected_candidates_are_encoded_from_the_detector(detected, tasks):
    from vlpeft_jax.data import refexp as rx

    task = detected["w2v"]
    assert RefExpTask.metrics_for(task.cfg)[-2:] == ("target detected", "category correct")
    assert RefExpTask.metrics_for(tasks["w2v"].cfg) == ("accuracy", "fact recall@K", "fact recall@1")
    # training keeps the ground-truth boxes; the evaluation split gets the detections
    np.testing.assert_array_equal(task.encode("train")["regions"], tasks["w2v"].encode("train")["regions"])
    arrays = task.encode("val")
    kb = task.data.fact_base
    noise = rx.DetectionNoise.from_config(dict(task.cfg.eval.detect))
    hits = found = kept = 0
    for i, ex in enumerate(task.data.splits["val"]):
        d = rx.detect(ex, noise, kb.categories)
        n = len(d.boxes)
        assert n <= 4 and arrays["region_mask"][i].sum() == n
        np.testing.assert_allclose(arrays["regions"][i, :n], roi_features(ex.pixels(), d.boxes, task.grid))
        np.testing.assert_allclose(arrays["boxes"][i, :n], d.boxes)
        np.testing.assert_allclose(arrays["gt_box"][i], np.asarray(ex.boxes)[ex.target])
        facts = [task.tokenizer.decode(arrays["fact_ids"][i, j][arrays["fact_mask"][i, j]])
                 for j in range(arrays["fact_ids"].shape[1])]
        for c in range(n):  # facts are searched under the detector's (possibly wrong) category
            chosen = {facts[j] for j in arrays["fact_index"][i, c] if j >= 0}
            assert chosen <= {f.text.lower() for f in kb.of_category(d.categories[c])}
        found += d.target >= 0
        kept += d.target >= 0 and d.categories[d.target] == ex.categories[ex.target]
        hits += d.target >= 0 and ex.fact_id in task.top_facts(d)[d.target]
    assert task._detection_counts["val"]["target detected"] == pytest.approx(found / len(task.data.splits["val"]))
    assert task._detection_counts["val"]["category correct"] == pytest.approx(kept / found)
    with_fact = sum(ex.fact_id is not None for ex in task.data.splits["val"])
    assert task._recall["val"] == pytest.approx(hits / with_fact)


def test_detected_choices_are_scored_by_iou(detected, monkeypatch):
    from vlpeft_jax.data import refexp as rx

    task = detected["w2v"]
    arrays = task.encode("val")
    examples = task.examples("val")
    for rule in ("first", "best", "worst"):
        iou = [rx.box_iou(ex.boxes, [ex.meta["gt_box"]])[:, 0] for ex in examples]
        pred = np.array([0 if rule == "first" else int(v.argmax() if rule == "best" else v.argmin()) for v in iou])
        monkeypatch.setattr(task, "predict", lambda *a, pred=pred: pred)
        res = task.evaluate(None, None, {})
        want = [v[p] >= 0.5 for v, p in zip(iou, pred, strict=True)]
        assert res["correct"] == want and res["all"]["metrics"]["accuracy"] == pytest.approx(np.mean(want))
        if rule == "best":  # the best box is right exactly when the target was detected
            assert want == [ex.target >= 0 for ex in examples]
    assert arrays["target"].min() >= -1


def test_detected_candidates_use_the_learned_search(detected):
    task = detected["ckt"]
    arrays = task.encode("val")
    ranked = task._retriever.rank_many(task.examples("val"))
    kb = task.data.fact_base
    for i, ex in enumerate(task.examples("val")):
        texts = [task.tokenizer.decode(arrays["fact_ids"][i, j][arrays["fact_mask"][i, j]])
                 for j in range(arrays["fact_ids"].shape[1])]
        for c in range(len(ex.boxes)):
            chosen = [texts[j] for j in arrays["fact_index"][i, c] if j >= 0]
            assert chosen == [kb.by_id(f).text.lower() for f in ranked[i][c][:task.top_k]]
            assert set(ranked[i][c]) == {f.fact_id for f in kb.of_category(ex.categories[c])}


def test_tower_region_features_are_the_frozen_towers():
    """``regions=tower``: the encoded regions are the frozen tower's RoI-pooled features, on the ground-truth
    boxes and on a detector's boxes alike, and the model is built for their width."""
    from vlpeft_jax.data import refexp as rx
    from vlpeft_jax.tasks.refexp_regions import tower_region_features, trained_tower

    task = RefExpTask(load_config_file("configs/shapes_ckt.py", "w2v,smoke,regions=tower+pixels,det=4"))
    s = task.tower_settings
    assert s.concat_pixels and task.model_config()["region_feature_size"] == s.hidden_size + 48
    train = task.encode("train")
    feats, _ = tower_region_features(task.data, s)
    for i, ex in enumerate(task.data.splits["train"]):
        np.testing.assert_array_equal(train["regions"][i, :len(ex.boxes)], feats["train"][i])
        # the appended part is the pixel feature of the same box
        np.testing.assert_allclose(feats["train"][i][:, s.hidden_size:], roi_features(ex.pixels(), ex.boxes, 4))
    val = task.encode("val")
    tower = trained_tower(task.data, s)
    noise = rx.DetectionNoise.from_config(dict(task.cfg.eval.detect))
    for i, ex in enumerate(task.data.splits["val"]):
        d = rx.detect(ex, noise, task.data.fact_base.categories)
        np.testing.assert_allclose(val["regions"][i, :len(d.boxes)], tower.features([d])[0], atol=1e-6)
    cfg = load_config_file("configs/shapes_ckt.py", "w2v,smoke")
    cfg.data.tower = {"steps": 3}
    with pytest.raises(ConfigError, match="data.tower is set but data.regions='pixels'"):
        RefExpTask(cfg)


@pytest.mark.parametrize("override, match", [
    ({"facts": "word2vec"}, "data.facts='word2vec'"),
    ({"top_k": 0}, "must be >= 1"),
    ({"top_k": 50}, "exceeds the facts any category has"),
    ({"regions": "rcnn"}, "data.regions='rcnn'"),
    ({"colour": 1}, "unknown key"),
    ({"facts": "bow", "retriever": {"steps": 3}}, "trains no retriever"),
    ({"detect": {"max_boxes": 0}}, "eval.detect.max_boxes=0"),
    ({"detect": {"boxes": 3}}, "eval.detect: unknown key"),
    ({"detect": {"max_boxes": 3}, "split": "train"}, "eval.detect replaces the candidates"),
])
def test_bad_settings_are_one_error_each(override, match):
    cfg = load_config_file("configs/shapes_ckt.py", "ckt,smoke")
    for key in ("detect", "split"):
        if key in override:
            cfg.eval[key] = override.pop(key)
    cfg.data.update(override)
    with pytest.raises(ConfigError, match=match):
        RefExpTask(cfg)


@pytest.mark.slow
def test_smoke_run_through_the_runner(tmp_path):
    from vlpeft_jax.experiments import runner

    cfg = load_config_file("configs/shapes_ckt.py", "ckt,smoke,regions=tower")
    cfg.run_dir = str(tmp_path / "run")
    results = runner.run(cfg)
    acc = results["adapted"]["all"]["metrics"]["accuracy"]
    assert 0.0 <= acc <= 1.0
    predictions = json.loads((tmp_path / "run" / "results.json").read_text())
    assert predictions["task"] == "refexp"
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("accuracy" in r for r in rows if "loss" in r)
    # the same parameters evaluated on detected boxes (the sweep's eval-only path of Table 3.2's analogue)
    det = load_config_file("configs/shapes_ckt.py", "ckt,smoke,regions=tower,det=3")
    det.run_dir = str(tmp_path / "det")
    assert runner.training_key(det) == runner.training_key(cfg)
    metrics = runner.evaluate_trained(det, tmp_path / "run")["adapted"]["all"]["metrics"]
    assert set(metrics) == {"accuracy", "fact recall@K", "fact recall@1", "target detected", "category correct"}
    assert metrics["accuracy"] <= metrics["target detected"] < 1.0
    assert "| target detected |" in (tmp_path / "det" / "report.md").read_text()
    # the two networks trained inside the task are on record
    res = json.loads((tmp_path / "run" / "results.json").read_text())["adapted"]
    assert res["region_tower"]["steps"] == 4 and res["retriever"]


@pytest.mark.slow
def test_lora_on_the_encoder_through_the_runner(tmp_path):
    """``peft=lora``: the encoder's weights stay as initialised, its LoRA factors and the heads train."""
    import jax

    from vlpeft_jax.experiments import runner

    cfg = load_config_file("configs/shapes_ckt.py", "w2v,smoke,peft=lora")
    cfg.run_dir = str(tmp_path / "run")
    results = runner.run(cfg)
    initial = runner.build(cfg).base
    _, final = runner.load_final(tmp_path / "run", cfg)
    enc0, enc1 = initial["bimodal"]["encoder"], final["base"]["bimodal"]["encoder"]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(enc0), jax.tree.leaves(enc1), strict=True))
    assert not np.array_equal(initial["score"]["kernel"], final["base"]["score"]["kernel"])
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(final["peft"]["lora"])]
    assert any("encoder" in k and "query" in k and "lora_b" in k for k in paths)
    assert all("encoder" in k for k in paths)  # only the encoder's projections carry LoRA
    assert 0 < results["params"]["trainable"] < results["params"]["total"]


def test_compare_runs_pairs_the_expressions(tmp_path, capsys):
    from vlpeft_jax.tasks.refexp import compare_runs

    a = [True] * 10 + [False] * 2 + [True] * 5   # b = 10 (only a right), c = 2 (only b right), 5 both right
    b = [False] * 10 + [True] * 2 + [True] * 5
    for name, correct in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"adapted": {"correct": correct}}))
    out = compare_runs(tmp_path / "a", tmp_path / "b")
    assert (out["b"], out["c"], out["n"]) == (10, 2, 17)
    assert out["p"] == pytest.approx(2 * 79 / 4096)  # exact two-sided binomial: 2 * P(X <= 2), X ~ Bin(12, 1/2)
    import run as cli

    capsys.readouterr()
    assert cli.main(["analyze", "mcnemar", str(tmp_path / "a"), str(tmp_path / "b"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(out)
    assert cli.main(["analyze", "mcnemar", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "only A right 10, only B right 2" in capsys.readouterr().out
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "results.json").write_text(json.dumps({"adapted": {"correct": a[:5]}}))
    with pytest.raises(ConfigError, match="McNemar's test pairs"):
        compare_runs(tmp_path / "a", tmp_path / "c")
