"""Loading experiment configs (``configs/X.py`` with ``get_config()``) and ``--config.key=value`` overrides.

Example:
    >>> from vlpeft_jax.config import apply_overrides
    >>> import ml_collections
    >>> c = ml_collections.ConfigDict({"optimizer": {"lr": 1e-3}, "steps": 10})
    >>> c = apply_overrides(c, ["--config.optimizer.lr=3e-4", "--config.steps=20"])
    >>> c.optimizer.lr, c.steps
    (0.0003, 20)
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from vlpeft_jax.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


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
    finally:
        if added:
            sys.path.remove(root)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {p} defines no get_config()")
    cfg = module.get_config(arg) if arg is not None else module.get_config()
    if not isinstance(cfg, ml_collections.ConfigDict):
        cfg = ml_collections.ConfigDict(cfg)
    return cfg


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


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Applies ``--config.a.b=value`` strings; an unknown key names the valid keys at that level."""
    cfg = ml_collections.ConfigDict(cfg.to_dict()) if not isinstance(cfg, ml_collections.ConfigDict) else cfg
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise ConfigError(f"bad override {item!r}; expected --config.key=value")
        key, text = item[len("--config."):].split("=", 1)
        parts = key.split(".")
        node = cfg
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                where = ".".join(parts[:i]) or "<top level>"
                valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                raise ConfigError(f"unknown config key {key!r}: no {part!r} under {where}; "
                                  f"valid keys there: {', '.join(valid)}")
            if i < len(parts) - 1:
                node = node[part]
        current = node[parts[-1]]
        if isinstance(current, ml_collections.ConfigDict):
            raise ConfigError(f"--config.{key} is a group of settings; set one of: {', '.join(sorted(current))}")
        with node.unlocked():
            node[parts[-1]] = _parse_value(text, current, key)
    return cfg
