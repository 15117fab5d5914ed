"""``run.py analyze knockout|lens|modules`` on a smoke VQA run of the shapes world and on a Hugging Face
checkpoint folder with prompts: the named position sets, the files written, consistency between the analyses,
parity of the checkpoint path with transformers, and one clear error per bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from vlpeft_jax.cli import analyze as cli_analyze
from vlpeft_jax.cli.config import apply_overrides, load_config_file
from vlpeft_jax.errors import ConfigError, InputError
from vlpeft_jax.experiments import analyze, runner


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, shapes_caches):
    cfg = load_config_file("configs/shapes_knockout.py", "smoke")
    cfg = apply_overrides(cfg, [f"--config.pretrain.cache_dir={shapes_caches['pretrain']}",
                                f"--config.data.cache_dir={shapes_caches['data']}"])
    cfg.run_dir = str(tmp_path_factory.mktemp("analyze") / "vqa")
    runner.run(cfg)
    return cfg.run_dir


@pytest.fixture(scope="module")
def source(run_dir):
    return analyze.run_source(Path(run_dir), "val", 8, 8, seed=0)


def _main(*args):
    return cli_analyze.main([str(a) for a in args])


def test_named_sets_on_the_run(run_dir, source):
    """The question set holds the question's tokens, the object patches and the others split the image, the random
    control matches the object set's size, the last position is the prompt's final token."""
    from vlpeft_jax.config import read_run_config
    from vlpeft_jax.data.batching import text_codec

    batch = source.batches[0]
    setup, _ = runner.load_final(Path(run_dir), read_run_config(run_dir))
    codec = text_codec(setup.task.tokenizer)
    n_v = setup.module.num_image_tokens
    ids = np.concatenate([np.full((8, n_v), -1), batch.inputs["input_ids"]], axis=1)
    for row, ex in enumerate(setup.task.examples("val")[:8]):
        assert ids[row][batch.sets["question"][row]].tolist() == codec.encode(ex.question)
        assert ids[row][batch.sets["last"][row]].tolist() == codec.encode(":")
    sets = batch.sets
    assert (sets["image_objects"] | sets["image_other"] == sets["image"]).all()
    assert not (sets["image_objects"] & sets["image_other"]).any()
    assert (sets["image_random"].sum(1) == np.minimum(sets["image_objects"].sum(1), sets["image_other"].sum(1))).all()
    assert not (sets["image_random"] & sets["image_objects"]).any()
    assert not (sets["question"] & (sets["template"] | sets["last"] | sets["image"])).any()
    assert sets["image"][:, :n_v].all() and not sets["image"][:, n_v:].any()


def test_blocking_the_image_everywhere_equals_the_model_without_it(source):
    """Image ↛ text in every layer of the VLM gives the text-only language model's prediction (the spec's test 4;
    RoPE makes the shifted positions irrelevant), and the image positions' states do not change."""
    from vlpeft_jax.analysis import knockout as ko

    batch, model = source.batches[0], source.model
    res = ko.make_sweep(model)(source.params, batch.inputs, batch.sets["image"], batch.sets["text"],
                               np.ones((1, model.num_layers), bool))
    text_only = {"input_ids": batch.inputs["input_ids"], "attention_mask": batch.inputs["attention_mask"]}
    logits = np.asarray(model(source.params, text_only, logits_to_keep=1).logits[:, -1], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = probs[np.arange(len(probs)), np.asarray(res["token"])]
    np.testing.assert_allclose(np.asarray(res["p2"][0]), expected, atol=2e-6)
    assert np.abs(np.asarray(res["p2"][0]) - np.asarray(res["p1"])).max() > 1e-3  # the image mattered


def test_knockout_lens_and_modules_end_to_end(run_dir, tmp_path):
    out = tmp_path / "ko"
    assert _main("knockout", "--run", run_dir, "--max-examples", 8, "--batch-size", 8, "--all-samples",
                 "--out", out) == 0
    res = json.loads((out / "knockout.json").read_text())
    assert (out / "knockout.png").stat().st_size > 1000 and (out / "knockout.md").read_text().count("|") > 20
    L = res["num_layers"]
    p1_by_id = {}
    for pair in res["pairs"].values():
        assert pair["groups"]["all"]["n"] == len(pair["samples"])
        assert sum(pair["groups"][g]["n"] for g in res["groups"][1:]) == pair["groups"]["all"]["n"]
        for s in pair["samples"]:
            p1, p2, pc = s["p1"], np.array(s["p2"]), np.array(s["p_c"])
            np.testing.assert_allclose(pc, (p2 - p1) / p1 * 100, rtol=1e-4, atol=1e-3)
            p1_by_id[s["id"]] = (s["token"], p1)
        if pair["target"] == "question":
            # with k = 1, blocking in the last layer cannot reach the last position's output
            np.testing.assert_allclose([s["p_c"][L - 1] for s in pair["samples"]], 0.0, atol=1e-3)
    assert set(res["pairs"]) == {f"{s}->{t}" for s, t in analyze.THESIS_PAIRS}

    lens_out = tmp_path / "lens"
    assert _main("lens", "--run", run_dir, "--max-examples", 8, "--batch-size", 8, "--all-samples",
                 "--out", lens_out) == 0
    lens = json.loads((lens_out / "lens.json").read_text())
    assert lens["layers"] == list(range(L + 1)) and lens["capitalized_note"]
    for s in lens["samples"]:  # the lens' last layer is the model's output, measured by the knockout path
        token, p1 = p1_by_id[s["id"]]
        if s["token"] == token:
            assert s["prob"][-1] == pytest.approx(p1, rel=1e-4)
        assert (s["rank"][-1] == 0) == (s["top"][-1] == s["token"])

    mod_out = tmp_path / "mod"
    assert _main("modules", "--run", run_dir, "--max-examples", 8, "--batch-size", 8, "--all-samples",
                 "--top-k", 5, "--out", mod_out) == 0
    mods = json.loads((mod_out / "modules.json").read_text())
    for branch in ("attention", "mlp"):
        jac = np.array([s["jaccard"] for s in mods["branches"][branch]["samples"]])
        assert jac.shape[1] == L and ((jac >= 0) & (jac <= 1)).all()
        assert (jac < 1).any()  # zeroing a branch at the question changes some top-5 token


def test_json_output_and_explicit_sets(run_dir, tmp_path, capsys):
    assert _main("knockout", "--run", run_dir, "--source", "0:3", "--target=-2:", "--max-examples", 8,
                 "--batch-size", 8, "--all-samples", "--json", "--out", tmp_path / "j") == 0
    res = json.loads(capsys.readouterr().out)
    (name, pair), = res["pairs"].items()
    assert name == "0:3->-2:" and len(pair["samples"]) == 8
    assert {"p1", "p2", "p_c", "token", "group", "id"} <= set(pair["samples"][0])


@pytest.mark.parametrize("args, error, match", [
    (["knockout", "--source", "bogus", "--target", "question"], ConfigError, "position set 'bogus'"),
    (["knockout", "--source", "0:999", "--target", "last"], InputError, "falls outside"),
    (["knockout", "--window", "99"], ConfigError, "larger than this model allows"),
    (["knockout", "--window", "0"], ConfigError, "must be >= 1"),
    (["knockout", "--source", "image"], ConfigError, "both --source and --target"),
    (["modules", "--target", "image_objects", "--top-k", "999"], ConfigError, "vocabulary size"),
    (["lens", "--token", "99999"], InputError, "outside the vocabulary"),
])
def test_bad_inputs_are_one_error_each(run_dir, tmp_path, args, error, match):
    with pytest.raises(error, match=match):
        _main(*args, "--run", run_dir, "--max-examples", 4, "--batch-size", 4, "--out", tmp_path / "x")


def test_run_without_final_parameters_and_bad_sources(run_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken, ignore=shutil.ignore_patterns("final"))
    with pytest.raises(ConfigError, match="no final parameters"):
        _main("lens", "--run", broken)
    with pytest.raises(ConfigError, match="either --run"):
        _main("lens")
    with pytest.raises(ConfigError, match="--prompts"):
        _main("lens", "--model", tmp_path)
    with pytest.raises(ConfigError, match="valid analyses"):
        _main("bogus")


def test_checkpoint_folder_with_prompts_matches_transformers(tmp_path):
    """A text-only LLaMA checkpoint: p1 of the knockout equals transformers' probability of its greedy token."""
    torch = pytest.importorskip("torch")
    import transformers as tf

    from tests.data.vlm_dirs import _text_config, word_tokenizer

    tok = word_tokenizer(image_token=False)
    torch.manual_seed(0)
    lm = tf.LlamaForCausalLM(_text_config("llama", len(tok), tok)).eval()
    lm.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    words = [w for w in tok.get_vocab() if not w.startswith("<")][:6]
    prompts = [" ".join(words[:4]), " ".join(words[2:5])]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    assert _main("knockout", "--model", tmp_path / "ckpt", "--prompts", tmp_path / "p.txt", "--source", "0:2",
                 "--target", "-1", "--batch-size", 2, "--out", tmp_path / "out") == 0
    res = json.loads((tmp_path / "out" / "knockout.json").read_text())
    samples = res["pairs"]["0:2->-1"]["samples"]
    for prompt, s in zip(prompts, samples, strict=True):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            probs = torch.softmax(lm(ids).logits[0, -1], -1)
        assert s["token"] == int(probs.argmax())
        assert s["p1"] == pytest.approx(float(probs.max()), abs=1e-5)
