"""Sweeps: variants x seeds -> one table (mean ± std) and plot; every seed-003 variant is a valid config."""

import json
from pathlib import Path

import pytest

import run as cli
from vlpeft_jax.cli import params as params_cli
from vlpeft_jax.cli.config import load_config_file
from vlpeft_jax.errors import ConfigError
from vlpeft_jax.experiments import runner, sweep

ROOT = Path(__file__).resolve().parents[2]
COMPARE = ROOT / "configs/shapes_compare_003.py"


@pytest.mark.parametrize("variant", sweep.load_sweeps(COMPARE)["table"])
def test_compare_003_variants_are_valid(variant, tmp_path):
    cfg = load_config_file(COMPARE, variant + ",smoke")
    cfg.data.cache_dir = str(tmp_path)
    counts = params_cli.count(cfg)  # builds the model and methods abstractly, checks every stage rule
    stage = next(iter(counts["stages"].values()))
    assert 0 < stage["trainable"] <= counts["base_total"] + counts["peft_total"]


@pytest.mark.slow
def test_sweep_two_seeds_table_plots_and_eval_only_reuse(tmp_path, shapes_caches):
    """One sweep, two variants that differ only in evaluation, two seeds: each seed trains once, the table gives
    mean ± std over seeds, both plots are written, and a rerun reuses the finished runs."""
    module = tmp_path / "tiny_sweep.py"
    module.write_text(
        "from vlpeft_jax.cli.config import load_config_file\n"
        "SWEEPS = {'e': ['parallel,smoke', 'parallel,eval=remove,smoke']}\n"
        f"def get_config(variant):\n    return load_config_file({str(ROOT / 'configs/shapes_ptpeft.py')!r}, variant)\n")
    out = tmp_path / "sweep"
    argv = ["sweep", "--config", str(module), "--sweep", "e", "--seeds", "0,1", "--out", str(out),
            f"--config.pretrain.cache_dir={shapes_caches['pretrain']}",
            f"--config.data.cache_dir={shapes_caches['data']}", "--config.eval.zero_shot=True"]
    assert cli.main(argv) == 0
    text = (out / "sweep.md").read_text()
    assert "mean ± std over seeds [0, 1]" in text and "| zero-shot |" in text
    assert "| parallel,eval=remove,smoke |" in text and " ± " in text
    summary = json.loads((out / "sweep.json").read_text())["summary"]
    assert summary["parallel,smoke"]["seeds"] == summary["parallel,eval=remove,smoke"]["seeds"] == 2
    assert (out / "sweep.png").stat().st_size > 0 and (out / "sweep_params.png").stat().st_size > 0
    for seed in (0, 1):
        first, second = out / f"parallel_smoke-seed{seed}", out / f"parallel_evalremove_smoke-seed{seed}"
        assert (first / "checkpoints").is_dir() and not (second / "checkpoints").exists()
        res = json.loads((second / "results.json").read_text())
        assert Path(res["trained_in"]) == first and res["adapted"]["target"]["metrics"]
        # (what eval_replacement does to the outputs is tested with the prefix method, tests/test_prefix_prompt.py)
        keep = json.loads((first / "captions_adapted.json").read_text())
        removed = json.loads((second / "captions_adapted.json").read_text())
        assert len(keep) == len(removed) > 0
    # a rerun reuses the finished runs instead of training again
    stamp = (out / "parallel_smoke-seed0" / "results.json").stat().st_mtime_ns
    assert cli.main(argv) == 0
    assert (out / "parallel_smoke-seed0" / "results.json").stat().st_mtime_ns == stamp


def test_training_key_ignores_evaluation_settings():
    ptpeft = ROOT / "configs/shapes_ptpeft.py"
    keep, remove = (load_config_file(ptpeft, v) for v in ("parallel,smoke", "parallel,eval=remove,smoke"))
    assert keep.peft.prefix.eval_replacement != remove.peft.prefix.eval_replacement
    assert runner.training_key(keep) == runner.training_key(remove)
    remove.seed = 1
    assert runner.training_key(keep) != runner.training_key(remove)
    other = load_config_file(ptpeft, "full,smoke")
    assert runner.training_key(keep) != runner.training_key(other)


def test_sweep_errors(tmp_path):
    with pytest.raises(ConfigError, match="defines no SWEEPS"):
        sweep.load_sweeps(ROOT / "configs/shapes_lora.py")
    with pytest.raises(ConfigError, match="available: table"):
        sweep.run_sweep(COMPARE, "nope", [0], tmp_path)


def test_compare_003_learning_rate_option():
    cfg = load_config_file(COMPARE, "prompt,lr=0.03,smoke")
    assert cfg.stages[0]["optimizer"]["learning_rate"] == 0.03
    assert load_config_file(COMPARE, "full,smoke").stages[0]["optimizer"]["learning_rate"] == 5e-4
    for bad in ("prompt,rate=1", "prompt,lr=fast", "prompt,lr=0"):
        with pytest.raises(ConfigError, match="bad option.*lr=X"):
            load_config_file(COMPARE, bad)
    with pytest.raises(ConfigError, match="unknown variant"):
        load_config_file(COMPARE, "lorra")
