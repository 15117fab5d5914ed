"""Loading experiment configs (``configs/X.py`` with ``get_config()``) and ``--config.key=value`` overrides.

Also the checks of the generic settings every command makes before any work (:func:`validate`) and reading
a run directory's ``config.json`` (:func:`read_run_config`).

Example:
    >>> from vlpeft_jax.config import apply_overrides
    >>> import ml_collections
    >>> c = ml_collections.ConfigDict({"optimizer": {"lr": 1e-3}, "steps": 10, "stages": [{"steps": 5}]})
    >>> c = apply_overrides(c, ["--config.optimizer.lr=3e-4", "--config.steps=20", "--config.stages.0.steps=7"])
    >>> c.optimizer.lr, c.steps, c.stages[0]["steps"]
    (0.0003, 20, 7)
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import sys
import traceback
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from vlpeft_jax.errors import ConfigError, VLPeftError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

PRECISIONS = ("float32", "bfloat16", "float16")
"""Values of ``config.precision``, the model's compute dtype (:mod:`vlpeft_jax.train.precision`)."""
OPTIONAL_SETTINGS: dict[str, Any] = {"precision": "float32", "model.remat": "none"}
"""Settings a config may leave out (at these defaults) and a ``--config.key=value`` override may still set:
``precision`` (the compute dtype, :mod:`vlpeft_jax.train.precision`) and ``model.remat`` (per-layer
rematerialisation, ``vlpeft_jax.models.layers.REMAT_POLICIES``)."""


def load_config_file(path: str | Path, arg: str | None = None) -> ml_collections.ConfigDict:
    """Imports ``path`` and returns ``get_config()`` (or ``get_config(arg)`` for ``file.py:arg``)."""
    s = str(path)
    if ":" in s and not Path(s).exists():
        s, arg = s.split(":", 1)
    p = Path(s)
    if not p.exists() and (CONFIG_DIR / p.name).exists():
        p = CONFIG_DIR / p.name
    if not p.is_file():
        available = sorted(f.name for f in CONFIG_DIR.glob("*.py")) if CONFIG_DIR.is_dir() else []
        raise ConfigError(f"config file {s!r} not found; configs available: {', '.join(available)}")
    spec = importlib.util.spec_from_file_location(f"_vlpeft_config_{p.stem}", p)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    # configs share helpers as ``from configs import common``: the folder holding ``configs/`` is importable
    # while the file runs
    root = str(p.resolve().parent.parent)
    added = root not in sys.path
    if added:
        sys.path.insert(0, root)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"config file {p} defines no get_config()")
        cfg = module.get_config(arg) if arg is not None else module.get_config()
        if not isinstance(cfg, ml_collections.ConfigDict):
            cfg = ml_collections.ConfigDict(cfg)
    except VLPeftError:
        raise
    except Exception as e:  # a bug in the config file is the user's: one line naming the file and the line
        raise ConfigError(f"config file {p}: {_describe(e, p)}") from e
    finally:
        if added:
            sys.path.remove(root)
    return cfg


def _describe(e: Exception, path: Path) -> str:
    """``e`` in a few words with the line of ``path`` it happened at (the innermost frame in that file)."""
    if isinstance(e, SyntaxError):  # also raised by a file it imports (``configs/common.py``): name that one
        text = (e.text or "").strip()
        other = e.filename and Path(e.filename).resolve() != path.resolve()
        return (f"{type(e).__name__}: {e.msg}, " + (f"{e.filename} " if other else "") + f"line {e.lineno}"
                + (f": {text}" if text else ""))
    line = None
    target = path.resolve()
    for frame in traceback.extract_tb(e.__traceback__):
        if frame.filename and Path(frame.filename).resolve() == target:
            line = frame.lineno
    where = f", line {line}" if line is not None else ""
    return f"{type(e).__name__}: {e}{where}".replace("\n", " ")


def _parse_value(text: str, current: Any, key: str) -> Any:
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ConfigError(f"--config.{key}={text!r}: not a valid {type(current).__name__} literal") from None
    if current is None:
        return value
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"--config.{key}={text!r}: expected True or False")
        return value
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(current)(value)
    if type(value) is not type(current):
        raise ConfigError(f"--config.{key}={text!r}: expected {type(current).__name__}, "
                          f"got a {type(value).__name__}")
    return value


def _items(n: int) -> str:
    return f"{n} item" + ("" if n == 1 else "s")


def _keys(node: Any) -> list[str]:
    return sorted(str(k) for k in node.keys())


def _child(node: Any, part: str, key: str, parts: list[str], i: int) -> Any:
    """``node[part]`` for a dict-like or a list node (``part`` an index), or a ConfigError naming what is valid."""
    where = ".".join(parts[:i]) or "<top level>"
    if isinstance(node, (list, tuple)):
        n = len(node)
        if not n:
            raise ConfigError(f"config key {key!r}: {where} is an empty list; there is no item {part!r} to set")
        if not part.lstrip("-").isdigit():
            raise ConfigError(f"config key {key!r}: {where} is a list of {_items(n)}; expected an index "
                              f"0..{n - 1}, got {part!r}")
        index = int(part)
        if not 0 <= index < n:
            raise ConfigError(f"config key {key!r}: index {index} out of range; {where} has {_items(n)} "
                              f"(valid indices: 0..{n - 1})")
        return node[index]
    if isinstance(node, (ml_collections.ConfigDict, dict)):
        if part not in node:
            raise ConfigError(f"unknown config key {key!r}: no {part!r} under {where}; "
                              f"valid keys there: {', '.join(_keys(node))}")
        return node[part]
    raise ConfigError(f"unknown config key {key!r}: {where} is a single setting ({type(node).__name__}), "
                      "not a group; there is nothing under it")


def _set(node: Any, part: str, value: Any) -> Any:
    """Sets ``node[part] = value`` and returns the node (a new one for a tuple, which cannot change)."""
    if isinstance(node, tuple):
        items = list(node)
        items[int(part)] = value
        return type(node)(items)
    if isinstance(node, list):
        node[int(part)] = value
    elif isinstance(node, ml_collections.ConfigDict):
        with node.unlocked():
            node[part] = value
    else:
        node[part] = value
    return node


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Applies ``--config.a.b=value`` strings; an unknown key names the valid keys at that level.

    Lists are entered by index and the dicts inside them by key (``--config.stages.0.optimizer.learning_rate=
    1e-3``); a new value must have the type of the value it replaces (an int where a float is expected is
    taken as that float).

    Raises:
      ConfigError: for a malformed override, an unknown key or an index out of range (naming the valid keys
        or indices there), a group of settings set as a whole, or a value of the wrong type.
    """
    cfg = ml_collections.ConfigDict(cfg.to_dict()) if not isinstance(cfg, ml_collections.ConfigDict) else cfg
    for item in overrides:
        key = item[len("--config."):].split("=", 1)[0] if item.startswith("--config.") else ""
        if key in OPTIONAL_SETTINGS:  # a setting every config has, at its default
            *parents, last = key.split(".")
            node = cfg
            for part in parents:
                node = node.get(part) if isinstance(node, (ml_collections.ConfigDict, dict)) else None
            if isinstance(node, (ml_collections.ConfigDict, dict)) and last not in node:
                node[last] = OPTIONAL_SETTINGS[key]
        if not item.startswith("--config.") or "=" not in item:
            raise ConfigError(f"bad override {item!r}; expected --config.key=value")
        key, text = item[len("--config."):].split("=", 1)
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"bad override {item!r}: empty key part in {key!r}")
        path = [cfg]
        for i, part in enumerate(parts):
            path.append(_child(path[-1], part, key, parts, i))
        current = path[-1]
        if isinstance(current, (ml_collections.ConfigDict, dict)):
            raise ConfigError(f"--config.{key} is a group of settings; set one of: {', '.join(_keys(current))}")
        value = _parse_value(text, current, key)
        # set the leaf, then put back every tuple on the way that had to be rebuilt
        for node, part in zip(reversed(path[:-1]), reversed(parts), strict=True):
            new = _set(node, part, value)
            if new is node:
                break
            value = new
    return cfg


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate(cfg: ml_collections.ConfigDict, tasks: Collection[str] | None = None) -> None:
    """Checks the generic settings of a config before any work; settings a config lacks are not checked.

    ``seed`` and ``data.seed`` non-negative ints below 2**32; ``train.batch_size``, ``train.max_length``,
    ``eval.batch_size``, ``eval.max_new_tokens`` and every stage's ``steps`` positive ints;
    ``train.checkpoint_every`` and ``eval.max_examples`` ints >= 0 (0: all); ``eval.num_beams`` an int >= 1;
    a stage ``optimizer.learning_rate`` a finite number >= 0; ``precision`` one of :data:`PRECISIONS`; ``task`` one
    of ``tasks`` (when given).

    Example:
        >>> import ml_collections
        >>> validate(ml_collections.ConfigDict({"seed": -1}))
        Traceback (most recent call last):
        ...
        vlpeft_jax.errors.ConfigError: seed=-1: must be an integer in 0..4294967295

    Raises:
      ConfigError: naming the key, the value and what is valid.
    """
    def get(path: str) -> tuple[bool, Any]:
        node: Any = cfg
        for part in path.split("."):
            if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
                return False, None
            node = node[part]
        return True, node

    def check_int(key: str, value: Any, low: int, high: int | None = None, note: str = "") -> None:
        if not _is_int(value) or value < low or (high is not None and value > high):
            valid = f"in {low}..{high}" if high is not None else f">= {low}"
            raise ConfigError(f"{key}={value!r}: must be an integer {valid}{note}")

    for key, low, high, note in (("seed", 0, 2**32 - 1, ""), ("data.seed", 0, 2**32 - 1, ""),
                                 ("train.batch_size", 1, None, ""), ("train.max_length", 1, None, ""),
                                 ("train.checkpoint_every", 0, None, " (0: no checkpoints)"),
                                 ("eval.batch_size", 1, None, ""), ("eval.max_new_tokens", 1, None, ""),
                                 ("eval.max_examples", 0, None, " (0: all)"), ("eval.num_beams", 1, None, "")):
        found, value = get(key)
        if found:
            check_int(key, value, low, high, note)
    found, precision = get("precision")
    if found and precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r}; valid: {', '.join(PRECISIONS)}")
    found, task = get("task")
    if found and tasks is not None and task not in tasks:
        raise ConfigError(f"task={task!r}: unknown task; valid: {', '.join(sorted(tasks))}")
    found, stages = get("stages")
    if not found:
        return
    if not isinstance(stages, (list, tuple)):
        raise ConfigError(f"stages: must be a list of stages (dicts), got a {type(stages).__name__}")
    for i, stage in enumerate(stages):
        if not isinstance(stage, (ml_collections.ConfigDict, dict)):
            raise ConfigError(f"stages.{i}: must be a dict of stage settings, got a {type(stage).__name__}")
        if "steps" in stage:
            check_int(f"stages.{i}.steps", stage["steps"], 1)
        opt = stage.get("optimizer")
        if isinstance(opt, (ml_collections.ConfigDict, dict)) and "learning_rate" in opt:
            lr = opt["learning_rate"]
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
                raise ConfigError(f"stages.{i}.optimizer.learning_rate={lr!r}: must be a finite number >= 0")


def read_run_config(run_dir: str | Path) -> ml_collections.ConfigDict:
    """The config a run was trained with (``run_dir/config.json``).

    Raises:
      ConfigError: if ``run_dir`` is not a directory holding a readable ``config.json`` (naming the file, what
        is wrong with it and what to do).
    """
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a run directory (not a directory)")
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read ({e}); the run directory is damaged") from None
    except json.JSONDecodeError as e:
        what = (f"not valid JSON ({e.msg}: line {e.lineno} column {e.colno})" if path.read_bytes().strip()
                else "empty")
        raise ConfigError(f"{path} is {what}; the file is truncated or damaged: train the run again into a new "
                          "directory (or restore the file)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of settings, got a {type(data).__name__}; the file "
                          "is damaged: train the run again into a new directory (or restore the file)")
    return ml_collections.ConfigDict(data)


def max_examples_arg(text: str) -> int:
    """A ``--max-examples`` value: ``all`` -> 0 (the tasks' "every example"), else an integer >= 1.

    Example:
        >>> max_examples_arg("all"), max_examples_arg("8")
        (0, 8)
    """
    if text == "all":
        return 0
    try:
        n = int(text)
    except ValueError:
        raise ConfigError(f"--max-examples {text!r}: expected an integer >= 1 or 'all'") from None
    if n < 1:
        raise ConfigError(f"--max-examples {n}: must be >= 1 (or 'all' for every example)")
    return n
