"""PEFT methods by name, built from the ``peft`` section of a config.

``config.peft`` maps a method *instance name* to its settings, with ``method`` naming the class
(defaulting to the instance name), e.g. ``{"lora": {"targets": ["q_proj", "v_proj"], "rank": 8}}``.
Stages name the instances that are active (``stage.methods``) and train them with rules on
``peft/<instance>/...`` paths.

Example:
    >>> methods = build_methods({"lora": {"targets": ["q_proj"], "rank": 4, "alpha": 8.0}})
    >>> methods["lora"].rank
    4
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.peft.lora import LoRA

METHODS: dict[str, type] = {"lora": LoRA}


def build_method(name: str, settings: Mapping[str, Any]) -> Any:
    """One method instance from its settings (``method`` key selects the class)."""
    settings = dict(settings)
    kind = settings.pop("method", name)
    if kind not in METHODS:
        raise ConfigError(f"peft.{name}.method={kind!r}; valid: {', '.join(sorted(METHODS))}")
    cls = METHODS[kind]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise ConfigError(f"peft.{name}: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    for k, v in list(settings.items()):
        if isinstance(v, list):
            settings[k] = tuple(v)
        elif isinstance(v, Mapping):
            settings[k] = dict(v)
    settings.setdefault("name", name)
    return cls(**settings)


def build_methods(peft_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """All method instances of a config's ``peft`` section, by instance name."""
    return {name: build_method(name, s) for name, s in dict(peft_config or {}).items()}
