"""The main job end to end on a seconds-long variant, and the command line's error handling."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import run as cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, shapes_caches):
    d = tmp_path_factory.mktemp("smoke")
    argv = ["train", "--config", str(ROOT / "configs/shapes_lora.py:smoke"), f"--config.run_dir={d / 'run'}",
            f"--config.pretrain.cache_dir={shapes_caches['pretrain']}",
            f"--config.data.cache_dir={shapes_caches['data']}"]
    assert cli.main(argv) == 0
    return d, shapes_caches


@pytest.mark.slow
def test_main_job_smoke_writes_report_and_reuses_base(smoke_run, capsys):
    run = smoke_run[0] / "run"
    for name in ("config.json", "report.md", "results.json", "scores.png", "metrics.jsonl", "final/peft",
                 "captions_adapted.json", "tokenizer/tokenizer.json"):
        assert (run / name).exists(), name
    results = json.loads((run / "results.json").read_text())
    for key in ("zero_shot", "adapted"):
        for domain in ("source", "target"):
            assert set(results[key][domain]["metrics"]) >= {"BLEU-4", "ROUGE-L", "CIDEr-D"}
    assert 0 < results["params"]["trainable_pct"] < 100
    assert "| zero-shot | target |" in (run / "report.md").read_text()
    # the pretrained base is cached: exactly one cached base, reused by `run.py eval`
    assert len(list(smoke_run[1]["pretrain"].glob("shapes_pretrain-*/params"))) == 1
    assert cli.main(["eval", "--run", str(run), "--max-examples", "4"]) == 0
    out = run / "eval-val-greedy-t8-n4"
    captions = json.loads((out / "captions.json").read_text())
    assert len(captions) == 4 and all(isinstance(c["caption"], str) for c in captions)
    assert "reusing the pretrained base" in capsys.readouterr().out


def _run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_cli_user_errors_are_one_line():
    bad_key = _run_cli("params", "--config", "configs/shapes_lora.py", "--config.optimizer.lr=1")
    assert bad_key.returncode == 2
    assert bad_key.stderr.strip().startswith("error: unknown config key 'optimizer.lr'")
    assert "Traceback" not in bad_key.stderr
    bad_value = _run_cli("params", "--config", "configs/shapes_lora.py", "--config.seed=abc")
    assert bad_value.returncode == 2 and "not a valid int" in bad_value.stderr
    missing = _run_cli("train", "--config", "configs/nope.py")
    assert missing.returncode == 2 and "not found; configs available" in missing.stderr
    unknown = _run_cli("frobnicate")
    assert unknown.returncode == 2 and "unknown subcommand" in unknown.stderr
