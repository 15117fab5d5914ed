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
import importlib
from collections.abc import Mapping
from typing import Any

from vlpeft_jax.errors import ConfigError

# method name -> "module:Class"; imported on first use so that one method's import never breaks another.
METHODS: dict[str, str] = {
    "lora": "vlpeft_jax.peft.lora:LoRA",
    "dora": "vlpeft_jax.peft.dora:DoRA",
    "ia3": "vlpeft_jax.peft.ia3:IA3",
    "prefix": "vlpeft_jax.peft.prefix:PrefixTuning",
    "prompt": "vlpeft_jax.peft.prompt:PromptTuning",
    "deep_prompt": "vlpeft_jax.peft.prompt:DeepPromptTuning",
    "adapter": "vlpeft_jax.peft.adapters:BottleneckAdapter",
    "llama_adapter": "vlpeft_jax.peft.llama_adapter:LlamaAdapter",
    "bitfit": "vlpeft_jax.peft.bitfit:BitFit",
    "neuroada": "vlpeft_jax.peft.neuroada:NeuroAda",
    "gps": "vlpeft_jax.peft.gps:GPS",
    "mam": "vlpeft_jax.peft.mam:MAM",
    "tcm": "vlpeft_jax.peft.tcm:TCM",
    "petal": "vlpeft_jax.peft.petal:PETAL",
}


def method_class(kind: str) -> type:
    """The class registered as ``kind``."""
    if kind not in METHODS:
        raise ConfigError(f"unknown PEFT method {kind!r}; valid: {', '.join(sorted(METHODS))}")
    module, cls = METHODS[kind].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ModuleNotFoundError, AttributeError):
        raise ConfigError(f"PEFT method {kind!r} is not available in this version ({METHODS[kind]})") from None


def build_method(name: str, settings: Mapping[str, Any]) -> Any:
    """One method instance from its settings (``method`` key selects the class)."""
    settings = dict(settings)
    kind = settings.pop("method", name)
    if kind not in METHODS:
        raise ConfigError(f"peft.{name}.method={kind!r}; valid: {', '.join(sorted(METHODS))}")
    cls = method_class(kind)
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
