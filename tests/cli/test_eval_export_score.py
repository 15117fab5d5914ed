"""`run.py eval`, `export`, `score` and `bench`: bad inputs are one `error:` line (exit 2) before any work, and
nothing a refused or repeated command touches changes (issue 13).

The eval and export cases run against one finished smoke run per module (marked slow: training it, with the
shared pretrained base, takes longer than a unit test should).
"""

import argparse
import hashlib
import json
import os
from pathlib import Path

import ml_collections
import pytest

import run as cli
from vlpeft_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def locked(tmp_path, monkeypatch):
    """A directory without write permission (as root, which may write anyway, ``os.access`` says so too)."""
    d = tmp_path / "locked"
    d.mkdir()
    d.chmod(0o500)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        real = os.access

        def access(path, mode, *args, **kwargs):
            if mode & os.W_OK and Path(path).resolve() == d.resolve():
                return False
            return real(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)
    yield d
    d.chmod(0o700)


def md5s(root: Path) -> dict[str, str]:
    """``{relative path: md5}`` of every file under ``root`` (or of ``root`` itself if it is a file)."""
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root.parent)): hashlib.md5(p.read_bytes()).hexdigest() for p in paths}


def refused(argv, capsys, must_contain=()):
    """Runs the command line in this process; asserts exit 2 and one `error:` line; returns that line."""
    capsys.readouterr()
    status = cli.main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == 2, (status, captured.err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for text in must_contain:
        assert text in lines[0], lines[0]
    return lines[0], captured.out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, shapes_caches):
    d = tmp_path_factory.mktemp("cli_run") / "run"
    argv = ["train", "--config", str(ROOT / "configs/shapes_lora.py:smoke"), f"--config.run_dir={d}",
            f"--config.pretrain.cache_dir={shapes_caches['pretrain']}",
            f"--config.data.cache_dir={shapes_caches['data']}", "--config.eval.zero_shot=False"]
    assert cli.main(argv) == 0
    return d


# ------------------------------------------------------------------------------------------------- eval


@pytest.mark.slow
@pytest.mark.parametrize("options, message", [
    (["--max-examples", "-5"], "error: --max-examples -5: must be >= 1"),
    (["--max-examples", "0"], "error: --max-examples 0: must be >= 1"),
    (["--num-beams", "-3"], "error: --num-beams -3: must be >= 1"),
    (["--method", "beam", "--num-beams", "1"], "error: --num-beams 1: beam search needs >= 2 beams"),
    (["--num-beams", "3"], "error: --num-beams 3 needs --method beam"),
    (["--method", "beam", "--max-new-tokens", "0"], "error: --max-new-tokens 0: must be >= 1"),
], ids=["max-examples-negative", "max-examples-zero", "num-beams-negative", "beam-with-one-beam",
        "beams-without-beam-search", "max-new-tokens-zero"])
def test_eval_bad_numeric_option_is_one_line_and_touches_nothing(finished_run, capsys, options, message):
    before = md5s(finished_run)
    line, out = refused(["eval", "--run", str(finished_run), *options], capsys)
    assert line.startswith(message), line
    assert md5s(finished_run) == before
    assert "reusing" not in out  # refused before the model was loaded


@pytest.mark.slow
def test_eval_out_that_is_a_file_is_refused_before_decoding(finished_run, tmp_path, capsys):
    target = tmp_path / "metrics.json"
    target.write_text("my own file\n")
    before, run_before = md5s(target), md5s(finished_run)
    line, out = refused(["eval", "--run", str(finished_run), "--out", str(target)], capsys,
                        must_contain=(str(target), "is an existing file"))
    assert "reusing" not in out
    assert md5s(target) == before and md5s(finished_run) == run_before


@pytest.mark.slow
def test_eval_unwritable_out_is_refused_before_decoding(finished_run, locked, capsys):
    before = md5s(finished_run)
    _, out = refused(["eval", "--run", str(finished_run), "--out", str(locked / "eval")], capsys,
                     must_contain=(str(locked), "not writable"))
    assert "reusing" not in out and md5s(finished_run) == before


@pytest.mark.slow
def test_eval_non_empty_out_is_refused_unless_force(finished_run, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "captions.json").write_text("[]\n")
    before = md5s(out)
    refused(["eval", "--run", str(finished_run), "--out", str(out)], capsys,
            must_contain=(str(out), "not empty", "--force"))
    assert md5s(out) == before


@pytest.mark.slow
def test_eval_greedy_and_beam_get_their_own_folders_and_record_their_settings(finished_run, capsys):
    assert cli.main(["eval", "--run", str(finished_run), "--max-examples", "2"]) == 0
    greedy = finished_run / "eval-val-greedy-t8-n2"
    settings = json.loads((greedy / "metrics.json").read_text())["settings"]
    assert settings["method"] == "greedy" and settings["num_beams"] == 1 and settings["max_examples"] == 2
    assert settings["max_new_tokens"] == 8 and settings["split"] == "val" and settings["time"]
    assert settings["run"] == str(finished_run.resolve())
    assert len(json.loads((greedy / "captions.json").read_text())) == 2
    assert not list(greedy.glob("*.tmp")) and not list(greedy.glob(".*"))

    # the same evaluation again: reported, not redone, nothing rewritten
    before = md5s(finished_run)
    capsys.readouterr()
    assert cli.main(["eval", "--run", str(finished_run), "--max-examples", "2"]) == 0
    assert "already evaluated" in capsys.readouterr().out
    assert md5s(finished_run) == before

    assert cli.main(["eval", "--run", str(finished_run), "--max-examples", "2", "--method", "beam",
                     "--num-beams", "2", "--length-penalty", "0.5"]) == 0
    beam = finished_run / "eval-val-beam2-lp0.5-t8-n2"
    settings = json.loads((beam / "metrics.json").read_text())["settings"]
    assert (settings["method"], settings["num_beams"], settings["length_penalty"]) == ("beam", 2, 0.5)
    assert {k: v for k, v in md5s(finished_run).items() if k in before} == before  # greedy's folder untouched

    # an --out folder holding a different evaluation is refused, naming what differs
    line, _ = refused(["eval", "--run", str(finished_run), "--max-examples", "2", "--out", str(beam)], capsys)
    assert "different settings" in line and "method" in line and "--force" in line


def test_eval_settings_of_a_task_without_decoding():
    from vlpeft_jax.cli import eval as cli_eval

    cfg = ml_collections.ConfigDict({"task": "classification",
                                     "eval": {"split": "val", "max_examples": 0, "batch_size": 8}})
    parser_args = dict(split=None, method=None, num_beams=None, length_penalty=None, max_new_tokens=None,
                       max_examples=None)
    settings = cli_eval.eval_settings(cfg, argparse.Namespace(**parser_args))
    assert settings == {"split": "val", "max_examples": None}
    assert cli_eval.folder_name(settings) == "eval-val-nall"
    with pytest.raises(ConfigError, match="does not decode"):
        cli_eval.eval_settings(cfg, argparse.Namespace(**{**parser_args, "method": "beam"}))


# ----------------------------------------------------------------------------------------------- export


@pytest.mark.slow
def test_export_refuses_a_non_empty_out_unless_force(finished_run, tmp_path, capsys):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "adapter_config.json").write_text('{"mine": true}\n')
    (out / "adapter_model.safetensors").write_bytes(b"my weights")
    before = md5s(out)
    refused(["export", "--run", str(finished_run), "--out", str(out)], capsys,
            must_contain=(f"--out {out} is not empty", "--force"))
    assert md5s(out) == before
    assert cli.main(["export", "--run", str(finished_run), "--out", str(out), "--force"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.slow
def test_export_out_that_is_a_file_is_refused(finished_run, tmp_path, capsys):
    target = tmp_path / "adapter.safetensors"
    target.write_bytes(b"not a directory")
    before = md5s(target)
    refused(["export", "--run", str(finished_run), "--out", str(target)], capsys,
            must_contain=(str(target), "is an existing file"))
    refused(["export", "--run", str(finished_run), "--out", str(target / "sub")], capsys,
            must_contain=("cannot be created",))
    assert md5s(target) == before


@pytest.mark.slow
def test_export_unwritable_out_is_refused(finished_run, locked, capsys):
    refused(["export", "--run", str(finished_run), "--out", str(locked / "a")], capsys,
            must_contain=(str(locked), "not writable"))
    assert not (locked / "a").exists()


def test_write_peft_dir_is_atomic(tmp_path, monkeypatch):
    import numpy as np

    from vlpeft_jax import files
    from vlpeft_jax.hf import peft_io

    out = tmp_path / "adapter"
    peft_io.write_peft_dir({"peft_type": "LORA", "r": 1}, {"w": np.ones((2, 2), np.float32)}, out)
    before = md5s(out)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        peft_io.write_peft_dir({"peft_type": "LORA", "r": 2}, {"w": np.zeros((3, 3), np.float32)}, out)
    assert md5s(out) == before  # the old adapter is whole, and no temporary file is left behind
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


# ------------------------------------------------------------------------------------------------ score


def _coco(tmp_path, results):
    refs = {"images": [{"id": 1}, {"id": 2}],
            "annotations": [{"id": 1, "image_id": 1, "caption": "a red circle"},
                            {"id": 2, "image_id": 2, "caption": "a blue square"}]}
    ann, res = tmp_path / "refs.json", tmp_path / "results.json"
    ann.write_text(json.dumps(refs))
    res.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in results.items()]))
    return ann, res


def test_score_caption_over_the_length_cap_is_one_line(tmp_path, capsys):
    ann, res = _coco(tmp_path, {1: "a red circle", 2: "word " * 1500})
    out = tmp_path / "metrics.json"
    line, printed = refused(["score", "--refs", str(ann), "--results", str(res), "--out", str(out),
                             "--tokenizer", "python", "--metrics", "BLEU-4,ROUGE-L"], capsys,
                            must_contain=("image id(s) 2 (1500 words)", "cap of 1000 words", "--max-caption-words"))
    assert "scored" not in printed and not out.exists()
    # a higher cap scores it
    assert cli.main(["score", "--refs", str(ann), "--results", str(res), "--out", str(out), "--tokenizer",
                     "python", "--metrics", "BLEU-4,ROUGE-L", "--max-caption-words", "2000"]) == 0
    assert json.loads(out.read_text())["num_images"] == 2
    refused(["score", "--refs", str(ann), "--results", str(res), "--max-caption-words", "0"], capsys,
            must_contain=("--max-caption-words 0: must be >= 1",))


def test_score_out_that_is_a_directory_is_refused_before_any_metric(tmp_path, capsys):
    ann, res = _coco(tmp_path, {1: "a red circle", 2: "a square"})
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    line, printed = refused(["score", "--refs", str(ann), "--results", str(res), "--out", str(out_dir),
                             "--tokenizer", "python", "--metrics", "BLEU-4"], capsys,
                            must_contain=(str(out_dir), "is a directory"))
    assert "scored" not in printed and not any(out_dir.iterdir())
    before = md5s(ann)
    refused(["score", "--refs", str(ann), "--results", str(res), "--out", str(ann / "metrics.json"),
             "--tokenizer", "python", "--metrics", "BLEU-4"], capsys, must_contain=("cannot be created",))
    assert md5s(ann) == before


def test_score_unwritable_out_is_refused_before_any_metric(tmp_path, locked, capsys):
    ann, res = _coco(tmp_path, {1: "a red circle", 2: "a square"})
    _, printed = refused(["score", "--refs", str(ann), "--results", str(res), "--out", str(locked / "m.json"),
                          "--tokenizer", "python"], capsys, must_contain=(str(locked), "not writable"))
    assert "scored" not in printed and not (locked / "m.json").exists()


# ------------------------------------------------------------------------------------------------ bench

TINY_BENCH = ["--layers", "1", "--vocab", "16", "--batch", "1", "--seq", "4", "--repeats", "1", "--warmup", "0",
              "--memory-steps", "0", "--methods", "bitfit", "--isolate", "none", "--no-torch"]


def test_bench_train_heads_not_dividing_width_is_one_line(capsys):
    refused(["bench", "train", *TINY_BENCH, "--width", "30", "--heads", "4"], capsys,
            must_contain=("--width=30 is not divisible by --heads=4", "--heads=3"))
    refused(["bench", "train", *TINY_BENCH, "--width", "8", "--heads", "2", "--seq", "0"], capsys,
            must_contain=("--seq=0; must be >= 1",))


def test_bench_train_checkpoint_turns_transformers_rejections_into_config_errors(tmp_path):
    from vlpeft_jax.benchmarks import train as bench_train

    shapes = {"layers": 1, "width": 30, "heads": 4, "vocab": 16, "batch": 1, "seq": 4}
    with pytest.raises(ConfigError, match="transformers rejects the GPT-2 shapes .*--width=30 --heads=4"):
        bench_train.write_checkpoint(tmp_path / "gpt2", shapes)


def test_bench_out_that_is_a_directory_is_refused_before_running(tmp_path, capsys):
    line, printed = refused(["bench", "train", "--out", str(tmp_path), *TINY_BENCH, "--width", "8", "--heads", "2"],
                            capsys, must_contain=(str(tmp_path), "is a directory"))
    assert "bench train:" not in printed  # nothing was measured
