"""Tasks: one file per task (DESIGN §2.2), picked by name from ``config.task`` (default ``captioning``).

A task owns its batches, its loss, its evaluation and its report rows; see :mod:`vlpeft_jax.tasks.base` for
the protocol. Registered tasks:

- ``captioning`` (:mod:`~vlpeft_jax.tasks.captioning`): shapes-world captions, two reference styles;
- ``classification`` (:mod:`~vlpeft_jax.tasks.classification`): image-level heads, one per shapes-world label;
- ``vqa`` (:mod:`~vlpeft_jax.tasks.vqa`): open-ended VQA with the LM, VQA accuracy per question type;

Example:
    >>> sorted(TASKS)[:1]
    ['captioning']
"""

from __future__ import annotations

import importlib
from typing import Any

import ml_collections

from vlpeft_jax.errors import ConfigError

# task name -> "module:Class"; imported on first use
TASKS: dict[str, str] = {
    "captioning": "vlpeft_jax.tasks.captioning:CaptioningTask",
    "classification": "vlpeft_jax.tasks.classification:ClassificationTask",
    "vqa": "vlpeft_jax.tasks.vqa:VQATask",
}


def task_class(name: str) -> type:
    """The class registered as ``name`` (its ``groups``, ``report_metrics``, ... without loading data)."""
    if name not in TASKS:
        raise ConfigError(f"task={name!r}; valid: {', '.join(sorted(TASKS))}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build(cfg: ml_collections.ConfigDict, **shared: Any) -> Any:
    """The task of ``cfg.task`` built from ``cfg`` (``shared``: data already loaded, e.g. ``world``,
    ``tokenizer``, passed on to tasks that take them)."""
    cls = task_class(cfg.get("task", "captioning"))
    return cls(cfg, **{k: v for k, v in shared.items() if v is not None})
