"""Loading experiment configs (``configs/X.py`` with ``get_config()``) and ``--config.key=value`` overrides.

Example:
    >>> from vlpeft_jax.cli.config import apply_overrides
    >>> import ml_collections
    >>> c = ml_collections.ConfigDict({"optimizer": {"lr": 1e-3}, "steps": 10})
    >>> c = apply_overrides(c, ["--config.optimizer.lr=3e-4", "--config.steps=20"])
    >>> c.optimizer.lr, c.steps
    (0.0003, 20)
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from vlpeft_jax.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


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
    spec.loader.exec_module(module)
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


def split_config_args(argv: Sequence[str], default: str | None = None
                      ) -> tuple[ml_collections.ConfigDict | None, list[str]]:
    """Pulls ``--config FILE`` / ``--config=FILE`` and ``--config.k=v`` out of ``argv``.

    Returns the loaded, overridden config (or None if there was no ``--config`` and no default) and
    the remaining arguments.
    """
    rest: list[str] = []
    overrides: list[str] = []
    path = default
    i = 0
    argv = list(argv)
    while i < len(argv):
        a = argv[i]
        if a == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file, e.g. --config configs/shapes_lora.py")
            path = argv[i + 1]
            i += 2
            continue
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a.startswith("--config."):
            overrides.append(a)
        else:
            rest.append(a)
        i += 1
    if path is None:
        if overrides:
            raise ConfigError("--config.key=value overrides need a --config file")
        return None, rest
    return apply_overrides(load_config_file(path), overrides), rest
