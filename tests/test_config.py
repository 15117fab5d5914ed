"""Config files, ``--config.key=value`` overrides and the checks of settings before any work (issue 13):
a broken config file, a bad value, an unknown variant or a damaged run ``config.json`` is one ``error:`` line
and exit status 2, never a traceback; stage settings can be overridden by index."""

import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from vlpeft_jax import tasks
from vlpeft_jax.cli.config import split_config_args
from vlpeft_jax.config import apply_overrides, load_config_file, read_run_config, validate
from vlpeft_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.py") if p.name not in ("__init__.py", "common.py"))
LORA_SMOKE = str(ROOT / "configs/shapes_lora.py:smoke")


def _one_error_line(*args: str) -> str:
    """Runs ``python run.py ARGS`` from the repository root; asserts exit 2 and a single ``error:`` line."""
    r = subprocess.run([sys.executable, "run.py", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr and not r.stdout.strip(), (r.stdout, r.stderr)
    return lines[0]


# --- a config file that does not import or whose get_config fails ---------------------------------------------

def test_config_file_with_a_syntax_error_is_one_line(tmp_path):
    f = tmp_path / "broken.py"
    f.write_text("import ml_collections\n\n\ndef get_config(:\n    return ml_collections.ConfigDict()\n")
    line = _one_error_line("params", "--config", str(f))
    assert line.startswith(f"error: config file {f}: SyntaxError") and "line 4" in line


def test_config_file_raising_names_the_file_and_line(tmp_path):
    f = tmp_path / "raises.py"
    f.write_text("import ml_collections\n\n\ndef get_config():\n    c = ml_collections.ConfigDict()\n"
                 "    c.x = {}['missing']\n    return c\n")
    with pytest.raises(ConfigError, match=r"config file .*raises\.py: KeyError: 'missing', line 6$"):
        load_config_file(f)
    g = tmp_path / "no_arg.py"
    g.write_text("def get_config():\n    return {'a': 1}\n")
    with pytest.raises(ConfigError, match=r"no_arg\.py: TypeError: get_config\(\) takes 0 positional"):
        load_config_file(f"{g}:variant")


def test_config_errors_of_the_config_itself_pass_unchanged(tmp_path):
    f = tmp_path / "own.py"
    f.write_text("from vlpeft_jax.errors import ConfigError\n\n\n"
                 "def get_config():\n    raise ConfigError('own.py: nothing here')\n")
    with pytest.raises(ConfigError, match=r"^own\.py: nothing here$"):
        load_config_file(f)


# --- overrides of stage settings ------------------------------------------------------------------------------

def test_stage_overrides_change_the_stage():
    cfg, rest = split_config_args(["--config", LORA_SMOKE, "--config.stages.0.steps=3", "--json",
                                   "--config.stages.0.optimizer.learning_rate=1e-3",
                                   "--config.stages.0.optimizer.warmup_steps=2"])
    assert rest == ["--json"]
    stage = cfg.stages[0]
    assert stage["steps"] == 3 and stage["optimizer"]["warmup_steps"] == 2
    assert stage["optimizer"]["learning_rate"] == 1e-3 and isinstance(stage["optimizer"]["learning_rate"], float)
    # an int where a float is expected is that float; the rest of the stage is untouched
    cfg = apply_overrides(load_config_file(LORA_SMOKE), ["--config.stages.0.optimizer.learning_rate=1"])
    assert cfg.stages[0]["optimizer"]["learning_rate"] == 1.0
    assert isinstance(cfg.stages[0]["optimizer"]["learning_rate"], float)
    assert cfg.stages[0]["methods"] == ["lora"]


def test_stage_overrides_in_every_stage_and_nested_lists():
    cfg = load_config_file(ROOT / "configs/shapes_ptpeft.py:lora,smoke")
    assert len(cfg.stages) == 2
    cfg = apply_overrides(cfg, ["--config.stages.1.steps=5", "--config.stages.1.trainable.0.1=lora_b",
                                "--config.stages.0.methods=['prefix']"])
    assert [s["steps"] for s in cfg.stages] == [4, 5]
    assert cfg.stages[1]["trainable"][0][1] == "lora_b"
    c = ml_collections.ConfigDict({"t": (1, (2.0, 3.0))})  # tuples are rebuilt
    assert apply_overrides(c, ["--config.t.1.0=5"]).t == (1, (5.0, 3.0))


def test_stage_override_out_of_range_names_the_valid_indices():
    line = _one_error_line("params", "--config", LORA_SMOKE, "--config.stages.1.steps=20")
    assert line == ("error: config key 'stages.1.steps': index 1 out of range; stages has 1 item "
                    "(valid indices: 0..0)")
    with pytest.raises(ConfigError, match=r"index -1 out of range; stages has 1 item \(valid indices: 0\.\.0\)"):
        apply_overrides(load_config_file(LORA_SMOKE), ["--config.stages.-1.steps=3"])
    with pytest.raises(ConfigError, match=r"stages is a list of 1 item; expected an index 0\.\.0, got 'lora'"):
        apply_overrides(load_config_file(LORA_SMOKE), ["--config.stages.lora.steps=3"])


def test_stage_override_unknown_key_names_the_valid_keys():
    with pytest.raises(ConfigError, match=r"no 'stepz' under stages\.0; valid keys there: methods, name, "
                                          r"optimizer, steps, trainable$"):
        apply_overrides(load_config_file(LORA_SMOKE), ["--config.stages.0.stepz=20"])
    with pytest.raises(ConfigError, match=r"no 'lr' under stages\.0\.optimizer; valid keys there: clip_norm, "
                                          r"learning_rate, name, schedule, warmup_steps, weight_decay$"):
        apply_overrides(load_config_file(LORA_SMOKE), ["--config.stages.0.optimizer.lr=1e-3"])
    with pytest.raises(ConfigError, match=r"stages\.0\.steps is a single setting \(int\), not a group"):
        apply_overrides(load_config_file(LORA_SMOKE), ["--config.stages.0.steps.x=1"])
    with pytest.raises(ConfigError, match=r"stages\.0\.optimizer is a group of settings; set one of: clip_norm"):
        apply_overrides(load_config_file(LORA_SMOKE), ["--config.stages.0.optimizer=1"])


@pytest.mark.parametrize("override, message", [
    ("--config.stages.0.steps=2.5", "expected int, got a float"),
    ("--config.stages.0.steps=True", "expected int, got a bool"),
    ("--config.stages.0.optimizer.learning_rate=fast", "not a valid float literal"),
    ("--config.stages.0.methods=3", "expected list, got a int"),
])
def test_stage_overrides_are_type_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(load_config_file(LORA_SMOKE), [override])


# --- values checked before any work ---------------------------------------------------------------------------

def test_negative_seed_is_one_line_before_the_model_is_built(tmp_path):
    line = _one_error_line("params", "--config", LORA_SMOKE, "--config.seed=-1")
    assert line == "error: seed=-1: must be an integer in 0..4294967295"
    # train: refused before the run directory, the data or the model exist (it failed in numpy after them)
    run = tmp_path / "run"
    line = _one_error_line("train", "--config", LORA_SMOKE, "--config.seed=-1", f"--config.run_dir={run}",
                           f"--config.data.cache_dir={tmp_path / 'data'}",
                           f"--config.pretrain.cache_dir={tmp_path / 'pretrained'}")
    assert line == "error: seed=-1: must be an integer in 0..4294967295"
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize("override, message", [
    ("seed=-1", "seed=-1: must be an integer in 0..4294967295"),
    ("seed=4294967296", "seed=4294967296: must be an integer in 0..4294967295"),
    ("data.seed=-3", "data.seed=-3: must be an integer in 0..4294967295"),
    ("train.batch_size=0", "train.batch_size=0: must be an integer >= 1"),
    ("train.max_length=-1", "train.max_length=-1: must be an integer >= 1"),
    ("stages.0.steps=0", "stages.0.steps=0: must be an integer >= 1"),
    ("stages.0.optimizer.learning_rate=-0.1", "stages.0.optimizer.learning_rate=-0.1: must be a finite number >= 0"),
    ("stages.0.optimizer.learning_rate=float('nan')", "not a valid float literal"),
    ("eval.max_examples=-5", r"eval.max_examples=-5: must be an integer >= 0 \(0: all\)"),
    ("eval.num_beams=0", "eval.num_beams=0: must be an integer >= 1"),
    ("eval.num_beams=-3", "eval.num_beams=-3: must be an integer >= 1"),
    ("task=captionin", "task='captionin': unknown task; valid: captioning, classification, refexp, vqa"),
])
def test_bad_values_are_refused_naming_key_value_and_range(override, message):
    with pytest.raises(ConfigError, match=message):
        split_config_args(["--config", LORA_SMOKE, f"--config.{override}"])


def test_validate_checks_values_not_only_overrides():
    with pytest.raises(ConfigError, match=r"^seed='1': must be an integer in 0\.\.4294967295$"):
        validate(ml_collections.ConfigDict({"seed": "1"}))
    with pytest.raises(ConfigError, match=r"^seed=True: must be an integer"):
        validate(ml_collections.ConfigDict({"seed": True}))
    with pytest.raises(ConfigError, match=r"^stages\.1\.steps=2\.0: must be an integer >= 1$"):
        validate(ml_collections.ConfigDict({"stages": [{"steps": 1}, {"steps": 2.0}]}))
    with pytest.raises(ConfigError, match=r"^stages: must be a list of stages"):
        validate(ml_collections.ConfigDict({"stages": {"steps": 1}}))
    with pytest.raises(ConfigError, match=r"^task='x': unknown task; valid: a, b$"):
        validate(ml_collections.ConfigDict({"task": "x"}), tasks=("b", "a"))
    validate(ml_collections.ConfigDict({"task": "x"}))  # no registry given: any task
    validate(ml_collections.ConfigDict({"name": "nothing to check"}))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_validates(name):
    validate(load_config_file(ROOT / "configs" / name), tasks=tasks.TASKS)


# --- unknown variants -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_rejects_an_unknown_variant(name):
    with pytest.raises(ConfigError, match=r"'smokey'.*valid"):
        load_config_file(ROOT / "configs" / f"{name}:smokey")


@pytest.mark.parametrize("name", ["shapes_lora.py", "shapes_pretrain.py"])
def test_typo_of_smoke_is_one_line(name):
    line = _one_error_line("params", "--config", f"configs/{name}:smokey")
    assert line == (f"error: configs/{name}:smokey: unknown variant or option 'smokey'; valid: options smoke")


def test_variant_options_are_checked():
    with pytest.raises(ConfigError, match=r"bad option 'smoke'; valid: top1, top20"):
        load_config_file(ROOT / "configs/llama7b_neuroada.py:top1,smoke")
    assert load_config_file(ROOT / "configs/llama7b_neuroada.py:top20").peft.neuroada.k == 20
    assert load_config_file(ROOT / "configs/llama7b_neuroada.py").peft.neuroada.k == 1
    assert load_config_file(ROOT / "configs/shapes_lora.py:smoke").stages[0]["steps"] == 4


# --- a run directory's config.json ----------------------------------------------------------------------------

def test_read_run_config(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"seed": 0, "stages": [{"steps": 4}]}')
    assert read_run_config(run).stages[0]["steps"] == 4
    (run / "config.json").write_text('{"seed": 0, "stages": [{"ste')
    with pytest.raises(ConfigError, match=r"config\.json is not valid JSON \(.*: line 1 column \d+\); the file "
                                          r"is truncated or damaged: train the run again into a new directory"):
        read_run_config(run)
    (run / "config.json").write_text("")
    with pytest.raises(ConfigError, match=r"config\.json is empty; the file is truncated or damaged"):
        read_run_config(run)
    (run / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"config\.json: expected a JSON object of settings, got a list"):
        read_run_config(run)
    with pytest.raises(ConfigError, match=r"is not a run directory \(no config\.json\)"):
        read_run_config(tmp_path)
    with pytest.raises(ConfigError, match=r"is not a run directory \(not a directory\)"):
        read_run_config(run / "config.json")
