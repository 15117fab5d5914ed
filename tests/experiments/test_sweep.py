"""Sweeps: variants x seeds -> one table (mean ± std) and plot; every seed-003 variant is a valid config.

Reuse is keyed on the whole config (issue 13, case 4): a finished run is reused only when it was made with the
same config; any other earlier run is refused before anything runs or is written (the md5 of every file in the
sweep directory is compared before and after), and so is a ``--metric`` the task does not report.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import run as cli
from vlpeft_jax import tasks
from vlpeft_jax.cli import params as params_cli
from vlpeft_jax.cli.config import load_config_file
from vlpeft_jax.config import apply_overrides
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


def _tiny_module(tmp_path: Path) -> Path:
    """A sweep of two variants that differ only in evaluation (the prefix kept or removed at evaluation)."""
    module = tmp_path / "tiny_sweep.py"
    module.write_text(
        "from vlpeft_jax.cli.config import load_config_file\n"
        "SWEEPS = {'e': ['parallel,smoke', 'parallel,eval=remove,smoke']}\n"
        f"def get_config(variant):\n    return load_config_file({str(ROOT / 'configs/shapes_ptpeft.py')!r}, variant)\n")
    return module


def _md5s(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> md5)."""
    return {str(f.relative_to(root)): hashlib.md5(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file()}


def _refused(argv: list[str], capsys) -> str:
    """Runs the command line, which must refuse with exit 2 and one ``error:`` line; returns that line."""
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def _check_summary_against_runs(out: Path, seeds: list[int]) -> None:
    """``sweep.json``'s mean and std (population, ddof=0) and the table's cells, recomputed here from each
    run's own ``results.json``."""
    record = json.loads((out / "sweep.json").read_text())
    assert record["std"] == "population (ddof=0)" and record["seeds"] == seeds
    text = (out / "sweep.md").read_text()
    assert f"mean ± std over seeds {seeds} (population std, ddof=0)" in text
    checked = 0
    for variant, row in record["summary"].items():
        dirs = [out / f"{variant.replace(',', '_').replace('=', '')}-seed{seed}" for seed in seeds]
        assert [(r["seed"], Path(r["run_dir"])) for r in record["runs"][variant]] == list(zip(seeds, dirs, strict=True))
        assert row["seeds"] == len(seeds)
        per_seed = [json.loads((d / "results.json").read_text()) for d in dirs]
        assert row["trainable_pct"] == pytest.approx(np.mean([r["params"]["trainable_pct"] for r in per_seed]))
        cells = next(line for line in text.splitlines() if line.startswith(f"| {variant} |")).split(" | ")[1:-1]
        for group in ("target", "source"):
            reported = [m for m in tasks.task_class("captioning").report_metrics
                        if all(m in r["adapted"][group]["metrics"] for r in per_seed)]
            assert sorted(row[group]) == sorted(reported) and reported
            for metric, (mean, std) in row[group].items():
                vals = np.array([100 * r["adapted"][group]["metrics"][metric] for r in per_seed])
                assert mean == pytest.approx(vals.mean(), abs=1e-9)
                assert std == pytest.approx(np.sqrt(np.mean((vals - vals.mean()) ** 2)), abs=1e-9)  # ddof=0
                if len(vals) == 2:
                    assert std == pytest.approx(abs(vals[0] - vals[1]) / 2, abs=1e-9)
                checked += 1
        header = next(line for line in text.splitlines() if line.startswith("| variant |")).split(" | ")[1:-1]
        for col, cell in zip(header, cells, strict=True):
            group, metric = col.split(" ", 1)
            if metric not in row[group]:
                assert cell == "n/a"
                continue
            mean, std = row[group][metric]
            assert cell == (f"{mean:.1f} ± {std:.1f}" if len(seeds) > 1 else f"{mean:.1f}")
    assert checked > 0


@pytest.mark.slow
def test_sweep_two_seeds_table_plots_and_eval_only_reuse(tmp_path, shapes_caches, capsys):
    """One sweep, two variants that differ only in evaluation, two seeds: each seed trains once, the table gives
    mean ± std over seeds, both plots are written, and a rerun reuses the finished runs."""
    module = _tiny_module(tmp_path)
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
    # the numbers, not only their format: recomputed from each seed's results.json
    _check_summary_against_runs(out, [0, 1])
    assert json.loads((out / "sweep.json").read_text())["overrides"] == argv[9:]
    assert "`--config.eval.zero_shot=True`" in text
    for seed in (0, 1):
        first, second = out / f"parallel_smoke-seed{seed}", out / f"parallel_evalremove_smoke-seed{seed}"
        assert (first / "checkpoints").is_dir() and not (second / "checkpoints").exists()
        res = json.loads((second / "results.json").read_text())
        assert Path(res["trained_in"]) == first and res["adapted"]["target"]["metrics"]
        # the eval-only run evaluated the parameters trained in `first`: the same trainable parameters and the
        # same training record (final loss, steps), copied from that run, not a second training
        trained = json.loads((first / "results.json").read_text())
        assert "trained_in" not in trained
        assert res["params"] == trained["params"] and res["train"] == trained["train"]
        assert res["train"]["final_loss"] is not None and res["train"]["steps"] > 0
        # (what eval_replacement does to the outputs is tested with the prefix method, tests/test_prefix_prompt.py)
        keep = json.loads((first / "captions_adapted.json").read_text())
        removed = json.loads((second / "captions_adapted.json").read_text())
        assert len(keep) == len(removed) > 0
        # the same evaluation images in the same order; the captions are strings but need not differ (the smoke
        # model may decode the same words with and without its prefix)
        assert [r["image_id"] for r in keep] == [r["image_id"] for r in removed]
        assert all(isinstance(r["caption"], str) for r in keep + removed)
        for run_dir, variant in ((first, "parallel,smoke"), (second, "parallel,eval=remove,smoke")):
            rec = json.loads(run_dir.with_name(run_dir.name + ".sweep_run.json").read_text())
            assert rec["variant"] == variant and rec["seed"] == seed and rec["overrides"] == argv[9:]
            cfg = apply_overrides(load_config_file(module, variant), argv[9:])
            cfg.seed = seed
            assert rec["training_key"] == runner.training_key(cfg) == runner.training_key(
                apply_overrides(load_config_file(module, "parallel,smoke"), argv[9:] + [f"--config.seed={seed}"]))
    # a rerun reuses the finished runs instead of training again, and rewrites none of their files
    stamp = (out / "parallel_smoke-seed0" / "results.json").stat().st_mtime_ns
    runs_before = {k: v for k, v in _md5s(out).items() if not k.startswith("sweep")}
    assert cli.main(argv) == 0
    assert (out / "parallel_smoke-seed0" / "results.json").stat().st_mtime_ns == stamp
    assert {k: v for k, v in _md5s(out).items() if not k.startswith("sweep")} == runs_before
    _check_summary_against_runs(out, [0, 1])
    # an override that changes training is refused before anything runs, naming the run and the key; an unknown
    # --metric is refused before any run too, and the earlier sweep.png stays: no file changes
    before = _md5s(out)
    err = _refused(argv + ["--config.train.batch_size=4"], capsys)
    assert str(out / "parallel_smoke-seed0") in err and "train.batch_size: 8 -> 4" in err
    assert _md5s(out) == before
    err = _refused(argv + ["--metric", "FOO"], capsys)
    assert "--metric 'FOO' is not a report metric of the captioning task" in err and "CIDEr-D" in err
    assert _md5s(out) == before


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


class FakeRunner:
    """Stands in for runner.run / runner.evaluate_trained: writes a results.json whose scores depend on the seed,
    the evaluation variant and the batch size, and counts the calls (no model is built)."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    @staticmethod
    def _results(cfg, trained_in=None):
        shift = 0.1 * (cfg.peft.prefix.eval_replacement == "remove") + 0.01 * cfg.train.batch_size
        scores = {m: round(0.05 + 0.13 * cfg.seed ** 2 + shift + 0.02 * i, 6)
                  for i, m in enumerate(("BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"))}
        res = {"name": cfg.name, "run_dir": cfg.run_dir, "params": {"trainable": 10, "trainable_pct": 1.5 + cfg.seed},
               "train": {"final_loss": 1.0, "steps": 4},
               "adapted": {g: {"metrics": dict(scores)} for g in ("target", "source")}}
        if trained_in is not None:
            res["trained_in"] = str(trained_in)
        run_dir = Path(cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(cfg.to_json_best_effort(indent=2, sort_keys=True))
        (run_dir / "results.json").write_text(json.dumps(res))
        return res

    def run(self, cfg):
        self.calls.append(("run", cfg.run_dir))
        return self._results(cfg)

    def evaluate_trained(self, cfg, trained_dir):
        self.calls.append(("evaluate_trained", cfg.run_dir))
        return self._results(cfg, trained_dir)


@pytest.fixture
def fake_runner(monkeypatch):
    fake = FakeRunner()
    monkeypatch.setattr(runner, "run", fake.run)
    monkeypatch.setattr(runner, "evaluate_trained", fake.evaluate_trained)
    return fake


def test_sweep_reuse_is_keyed_on_the_config(tmp_path, fake_runner, capsys):
    """Issue 13, case 4: a finished run is reused only with the same config; an override that changes training
    (or evaluation) is refused naming the run directory and the key, and no file of the sweep changes."""
    module = _tiny_module(tmp_path)
    out = tmp_path / "sweep"
    argv = ["sweep", "--config", str(module), "--sweep", "e", "--seeds", "0,1", "--out", str(out),
            "--config.train.max_length=40"]
    assert cli.main(argv) == 0
    assert [c[0] for c in fake_runner.calls] == ["run", "run", "evaluate_trained", "evaluate_trained"]
    _check_summary_against_runs(out, [0, 1])
    record = json.loads((out / "sweep.json").read_text())
    assert record["overrides"] == ["--config.train.max_length=40"] and record["metric"] == "CIDEr-D"
    assert [r["reused"] for r in record["runs"]["parallel,smoke"]] == [False, False]
    assert "overrides: `--config.train.max_length=40`" in (out / "sweep.md").read_text()
    # the two seeds score 13 points (x100) apart: population std 6.5 (the sample std would be 9.19)
    assert record["summary"]["parallel,smoke"]["target"]["CIDEr-D"][1] == pytest.approx(6.5)
    rec = json.loads((out / "parallel_smoke-seed1.sweep_run.json").read_text())
    assert rec["overrides"] == ["--config.train.max_length=40"] and rec["seed"] == 1
    assert rec["config"]["train"]["batch_size"] == 8 and rec["config"]["seed"] == 1

    # the same command again: every run reused as it is, none trained or evaluated, no run file rewritten
    fake_runner.calls.clear()
    runs_before = {k: v for k, v in _md5s(out).items() if not k.startswith("sweep")}
    assert cli.main(argv) == 0
    assert fake_runner.calls == []
    assert {k: v for k, v in _md5s(out).items() if not k.startswith("sweep")} == runs_before
    assert [r["reused"] for r in json.loads((out / "sweep.json").read_text())["runs"]["parallel,smoke"]] == [True] * 2

    # overrides that change training or evaluation: refused before anything runs; every file keeps its md5
    before = _md5s(out)
    for override, shown in (("--config.train.batch_size=4", "train.batch_size: 8 -> 4"),
                            ("--config.stages.0.steps=2" if _list_overrides() else "--config.data.num_train=16",
                             "stages.0.steps: 4 -> 2" if _list_overrides() else "data.num_train: 32 -> 16"),
                            ("--config.eval.max_new_tokens=4", "eval.max_new_tokens: 8 -> 4")):
        err = _refused(argv + [override], capsys)
        assert f"run directory {out / 'parallel_smoke-seed0'} holds a run made with a different config" in err
        assert shown in err and "--config.train.max_length=40" in err  # what it was made with
        assert fake_runner.calls == [] and _md5s(out) == before
    # without the override the earlier runs were made with (train.max_length is 40 either way: same config)
    assert cli.main(argv[:-1]) == 0 and fake_runner.calls == []
    # a metric the task does not report: refused before any run; the earlier plots stay
    before = _md5s(out)
    err = _refused(argv + ["--metric", "FOO"], capsys)
    assert err == ("error: --metric 'FOO' is not a report metric of the captioning task (parallel,smoke); valid: "
                   "BLEU-4, METEOR, ROUGE-L, CIDEr-D")
    assert fake_runner.calls == [] and _md5s(out) == before
    # another seed joins the finished ones; those are reused
    assert cli.main(argv[:6] + ["0,1,2"] + argv[7:]) == 0
    assert sorted(c[1] for c in fake_runner.calls) == [str(out / "parallel_evalremove_smoke-seed2"),
                                                       str(out / "parallel_smoke-seed2")]
    _check_summary_against_runs(out, [0, 1, 2])
    # a run without its sweep record (an older sweep) is checked against its config.json: the same config, reused
    (out / "parallel_smoke-seed0.sweep_run.json").unlink()
    fake_runner.calls.clear()
    assert cli.main(argv) == 0 and fake_runner.calls == []
    assert json.loads((out / "parallel_smoke-seed0.sweep_run.json").read_text())["config"]["seed"] == 0
    # a finished run whose results.json is damaged: one line naming it, before any run, nothing rewritten
    (out / "parallel_smoke-seed1" / "results.json").write_text('{"adapted": ')
    before = _md5s(out)
    err = _refused(argv, capsys)
    assert f"results {out / 'parallel_smoke-seed1' / 'results.json'} is not valid JSON" in err
    assert fake_runner.calls == [] and _md5s(out) == before


def _list_overrides() -> bool:
    """Whether ``--config.stages.0.steps=...`` (a list index) can be overridden in this version."""
    cfg = load_config_file(ROOT / "configs/shapes_ptpeft.py", "parallel,smoke")
    try:
        return apply_overrides(cfg, ["--config.stages.0.steps=2"]).stages[0]["steps"] == 2
    except ConfigError:
        return False


def test_sweep_unknown_metric_fails_before_any_run(tmp_path, fake_runner, capsys):
    out = tmp_path / "sweep"
    err = _refused(["sweep", "--config", str(_tiny_module(tmp_path)), "--sweep", "e", "--out", str(out),
                    "--metric", "FOO"], capsys)
    assert "--metric 'FOO' is not a report metric" in err
    assert not out.exists() and fake_runner.calls == []


def test_sweep_refuses_run_directories_it_cannot_check(tmp_path, fake_runner, capsys):
    """A run directory with files but no record of its config, a run directory that is a file, an --out that is a
    file, repeated or negative seeds, a --config.seed or --config.run_dir that the sweep would silently replace:
    one line each, nothing run or written."""
    module = _tiny_module(tmp_path)
    out = tmp_path / "sweep"
    argv = ["sweep", "--config", str(module), "--sweep", "e", "--out", str(out)]
    (out / "parallel_smoke-seed0").mkdir(parents=True)
    (out / "parallel_smoke-seed0" / "results.json").write_text('{"adapted": {}}')
    before = _md5s(out)
    err = _refused(argv, capsys)
    assert f"run directory {out / 'parallel_smoke-seed0'} holds files but no record" in err
    assert _md5s(out) == before
    (out / "parallel_smoke-seed0" / "results.json").unlink()
    (out / "parallel_smoke-seed0").rmdir()
    (out / "parallel_smoke-seed0").write_text("not a directory")
    before = _md5s(out)
    assert "is an existing file" in _refused(argv, capsys) and _md5s(out) == before
    assert "is an existing file" in _refused(argv[:-1] + [str(out / "parallel_smoke-seed0")], capsys)
    assert "distinct non-negative" in _refused(argv + ["--seeds", "0,0"], capsys)
    assert "distinct non-negative" in _refused(argv + ["--seeds", "-1"], capsys)
    assert "use --seeds and --out" in _refused(argv + ["--config.seed=3"], capsys)
    assert "use --seeds and --out" in _refused(argv + [f"--config.run_dir={tmp_path / 'x'}"], capsys)
    assert fake_runner.calls == [] and _md5s(out) == before
