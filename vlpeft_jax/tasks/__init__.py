"""Tasks: one file per task (DESIGN §2.2), picked by name from ``config.task`` (default ``captioning``).

A task owns its batches, its loss, its evaluation and its report rows; see :mod:`vlpeft_jax.tasks.base` for
the protocol. Registered tasks:

- ``captioning`` (:mod:`~vlpeft_jax.tasks.captioning`): shapes-world captions, two reference styles;
- ``classification`` (:mod:`~vlpeft_jax.tasks.classification`): image-level heads, one per shapes-world label;
- ``vqa`` (:mod:`~vlpeft_jax.tasks.vqa`): open-ended VQA with the LM, VQA accuracy per question type;
- ``refexp`` (:mod:`~vlpeft_jax.tasks.refexp`): referring expressions that need commonsense facts
  (CK-Transformer), accuracy over candidate regions;

With a Hugging Face checkpoint (``config.model.hf_dir``: LLaVA, BLIP-2, InstructBLIP) and real data
(``config.data.kind``: coco, vqa, hf, tfds), ``captioning`` and ``vqa`` are the tasks of
:mod:`~vlpeft_jax.tasks.hf_vlm` (:data:`CHECKPOINT_TASKS`).

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
    "refexp": "vlpeft_jax.tasks.refexp:RefExpTask",
}

# the same tasks on a Hugging Face vision-language checkpoint (config.model.hf_dir) and real data
CHECKPOINT_TASKS: dict[str, str] = {
    "captioning": "vlpeft_jax.tasks.hf_vlm:HFCaptioningTask",
    "vqa": "vlpeft_jax.tasks.hf_vlm:HFVQATask",
}


def uses_checkpoint(cfg: ml_collections.ConfigDict | None) -> bool:
    """Whether ``cfg`` adapts a Hugging Face checkpoint (its ``model`` section has ``hf_dir``)."""
    model = cfg.get("model") if cfg is not None else None
    return model is not None and "hf_dir" in model


def task_class(name: str, cfg: ml_collections.ConfigDict | None = None) -> type:
    """The class registered as ``name`` (its ``groups``, ``report_metrics``, ... without loading data); with
    ``cfg``, the checkpoint variant when the config names a Hugging Face checkpoint."""
    registry = CHECKPOINT_TASKS if uses_checkpoint(cfg) else TASKS
    if name not in registry:
        what = "with model.hf_dir (a Hugging Face checkpoint)" if registry is CHECKPOINT_TASKS else ""
        raise ConfigError(f"task={name!r}{' ' + what if what else ''}; valid: {', '.join(sorted(registry))}")
    if registry is TASKS and cfg is not None and (cfg.get("data") or {}).get("kind", "shapes") in _REAL_KINDS:
        raise ConfigError(f"data.kind={cfg.data.kind!r} (real data) needs a real checkpoint's tokenizer and "
                          "processor: set model.hf_dir to a LLaVA, BLIP-2 or InstructBLIP folder "
                          "(configs/llava_lora.py, configs/instructblip_lora.py)")
    module, cls = registry[name].split(":")
    return getattr(importlib.import_module(module), cls)


_REAL_KINDS = ("coco", "vqa", "hf", "tfds")


def build(cfg: ml_collections.ConfigDict, **shared: Any) -> Any:
    """The task of ``cfg.task`` built from ``cfg`` (``shared``: data already loaded, e.g. ``world``,
    ``tokenizer``, passed on to tasks that take them)."""
    cls = task_class(cfg.get("task", "captioning"), cfg)
    return cls(cfg, **{k: v for k, v in shared.items() if v is not None})
