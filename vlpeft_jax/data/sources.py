"""Real datasets picked by a config: ``data.kind = coco | vqa | hf | tfds`` and one settings dict per split.

The loaders exist beside this module (:mod:`~vlpeft_jax.data.coco`, :mod:`~vlpeft_jax.data.vqa`,
:mod:`~vlpeft_jax.data.hf_datasets`, :mod:`~vlpeft_jax.data.tfds`); this module checks a ``data`` config
section at once (unknown keys, missing files, a kind that does not fit the task) and calls the right loader
for a split. The section::

    data = {
        "kind": "coco",            # coco (captions) | vqa (questions) | hf | tfds (either task)
        "root": "~/data/coco",     # relative paths of the splits resolve against it (optional)
        "on_error": "skip",        # a bad image/caption/question: "raise" at once, or "skip" and count it
        "images": "lazy",          # "lazy": check files now, decode per batch; "eager": decode at load time
        "max_examples": 0,         # keep at most this many examples per split (0 = all)
        "splits": {"train": {...}, "val": {...}},
    }

Split settings by kind (paths relative to ``root``):

- ``coco``: ``annotations`` (a COCO ``captions_*.json``) or ``karpathy`` (``dataset_coco.json``, with
  ``split`` naming the Karpathy split(s), default the split's own name), and ``images`` (the image folder;
  for Karpathy files the root that ``filepath/filename`` are relative to).
- ``vqa``: ``questions`` (VQAv2/OK-VQA questions, or an A-OKVQA/GQA/list file), ``annotations`` (VQAv2/OK-VQA
  answers; omit for the other formats), ``images``, ``image_template``, ``schema``.
- ``hf``: ``path`` (a local data file or folder), ``split`` (the dataset's split name, default ``train``),
  ``builder``, column names (``image_column``, ``caption_column``, ``question_column``, ``answers_column``,
  ``id_column``) and ``image_root``.
- ``tfds``: ``name`` or ``builder_dir``, ``data_dir``, ``split``, feature keys (``image_key``,
  ``caption_key``, ``question_key``, ``answers_key``, ``id_key``).

Example:
    >>> import json, tempfile, pathlib
    >>> from PIL import Image
    >>> d = pathlib.Path(tempfile.mkdtemp()); (d / "img").mkdir()
    >>> Image.new("RGB", (8, 8)).save(d / "img" / "a.jpg")
    >>> _ = (d / "caps.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
    ...                                              "annotations": [{"image_id": 1, "caption": "A cat."}]}))
    >>> data = {"kind": "coco", "root": str(d), "splits": {"train": {"annotations": "caps.json", "images": "img"}}}
    >>> check_data(data, "captioning", ["train"])
    >>> ds = load_split(data, "train", "captioning")
    >>> ds[0].captions
    ('A cat.',)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from vlpeft_jax.data.batching import ON_ERROR_CHOICES, LoadedDataset
from vlpeft_jax.data.images import IMAGE_MODES, ImagePreprocessor
from vlpeft_jax.errors import ConfigError

KINDS = ("coco", "vqa", "hf", "tfds")
TASK_KINDS = {"captioning": ("coco", "hf", "tfds"), "vqa": ("vqa", "hf", "tfds")}
DATA_KEYS = ("kind", "root", "splits", "on_error", "images", "max_examples")
SPLIT_KEYS = {
    "coco": ("annotations", "karpathy", "split", "images"),
    "vqa": ("questions", "annotations", "images", "image_template", "schema"),
    "hf": ("path", "split", "builder", "image_column", "caption_column", "question_column", "answers_column",
           "id_column", "image_root"),
    "tfds": ("name", "builder_dir", "data_dir", "split", "image_key", "caption_key", "question_key",
             "answers_key", "id_key"),
}
# (key, is a folder) of the paths each kind's split settings hold
_PATHS = {
    "coco": (("annotations", False), ("karpathy", False), ("images", True)),
    "vqa": (("questions", False), ("annotations", False), ("images", True)),
    "hf": (("path", None), ("image_root", True)),
    "tfds": (("builder_dir", True), ("data_dir", True)),
}
_REQUIRED = {"coco": ("images",), "vqa": ("questions", "images"), "hf": ("path",), "tfds": ()}


def _unknown(where: str, given: Iterable[str], valid: Iterable[str]) -> None:
    bad = sorted(set(given) - set(valid))
    if bad:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(bad)}; valid: {', '.join(sorted(valid))}")


def resolve(data: Mapping[str, Any], value: str | os.PathLike) -> Path:
    """A split path: absolute as given, else relative to ``data.root`` (or the working directory)."""
    p = Path(value).expanduser()
    root = data.get("root")
    return p if p.is_absolute() or not root else Path(root).expanduser() / p


def check_data(data: Mapping[str, Any], task: str, needed: Iterable[str]) -> None:
    """Raises :class:`ConfigError` for anything wrong in a real-data ``data`` section (before loading).

    Args:
      data: the ``config.data`` mapping.
      task: ``captioning`` or ``vqa``.
      needed: the split names the run reads (training and evaluation).
    """
    _unknown("data", data, DATA_KEYS)
    kind = data.get("kind")
    if task not in TASK_KINDS:
        raise ConfigError(f"task {task!r} has no real-data loaders; tasks with them: {', '.join(TASK_KINDS)}")
    if kind not in TASK_KINDS[task]:
        raise ConfigError(f"data.kind={kind!r} does not fit task {task!r}; valid for it: "
                          f"{', '.join(TASK_KINDS[task])}")
    if data.get("on_error", "raise") not in ON_ERROR_CHOICES:
        raise ConfigError(f"data.on_error={data['on_error']!r}; valid: {', '.join(ON_ERROR_CHOICES)}")
    if data.get("images", "lazy") not in IMAGE_MODES:
        raise ConfigError(f"data.images={data['images']!r}; valid: {', '.join(IMAGE_MODES)}")
    root = data.get("root")
    if root and not Path(root).expanduser().is_dir():
        raise ConfigError(f"data.root={root!r}: no such folder")
    splits = data.get("splits") or {}
    if not isinstance(splits, Mapping):
        raise ConfigError(f"data.splits must map split names to settings; got {splits!r}")
    for name in needed:
        if name not in splits:
            raise ConfigError(f"data.splits has no {name!r} split (the run reads {', '.join(needed)}); given: "
                              f"{', '.join(splits) or 'none'}. Each split is a dict of "
                              f"{', '.join(SPLIT_KEYS[kind])}")
    for name, s in splits.items():
        where = f"data.splits.{name}"
        if not isinstance(s, Mapping):
            raise ConfigError(f"{where} must be a dict of {', '.join(SPLIT_KEYS[kind])}; got {s!r}")
        _unknown(where, s, SPLIT_KEYS[kind])
        for key in _REQUIRED[kind]:
            if not s.get(key):
                raise ConfigError(f"{where}.{key} is required for data.kind={kind!r}")
        if kind == "coco" and bool(s.get("annotations")) == bool(s.get("karpathy")):
            raise ConfigError(f"{where}: give exactly one of 'annotations' (a COCO captions_*.json) and "
                              "'karpathy' (a Karpathy-split dataset_coco.json)")
        if kind == "tfds" and not (s.get("name") or s.get("builder_dir")):
            raise ConfigError(f"{where}: give 'name' (a prepared TFDS dataset) or 'builder_dir'")
        for key, is_dir in _PATHS[kind]:
            if not s.get(key):
                continue
            p = resolve(data, s[key])
            ok = p.exists() if is_dir is None else (p.is_dir() if is_dir else p.is_file())
            if not ok:
                what = "path" if is_dir is None else ("folder" if is_dir else "file")
                raise ConfigError(f"{where}.{key}={s[key]!r}: no such {what} ({p})")


def load_split(data: Mapping[str, Any], split: str, task: str,
               image_size: int | tuple[int, int] | ImagePreprocessor | None = None) -> LoadedDataset:
    """The examples of ``data.splits[split]`` (caption or VQA records, as ``task`` needs)."""
    check_data(data, task, [split])
    kind, s = data["kind"], dict(data["splits"][split])
    common = {"on_error": data.get("on_error", "raise"), "image_size": image_size}
    limit = int(data.get("max_examples") or 0) or None
    images = data.get("images", "lazy")
    if kind == "coco":
        from vlpeft_jax.data import coco

        if s.get("annotations"):
            return coco.load_coco_captions(resolve(data, s["annotations"]), resolve(data, s["images"]), images=images,
                                           max_images=limit, **common)
        ds = coco.load_karpathy(resolve(data, s["karpathy"]), resolve(data, s["images"]), s.get("split") or split,
                                images=images, **common)
        return ds if limit is None else LoadedDataset(list(ds)[:limit], ds.report)
    if kind == "vqa":
        from vlpeft_jax.data import vqa

        extra = dict(image_template=s.get("image_template") or None, images=images, max_questions=limit, **common)
        if s.get("annotations"):
            return vqa.load_vqav2(resolve(data, s["questions"]), resolve(data, s["annotations"]),
                                 resolve(data, s["images"]), **extra)
        return vqa.load_vqa_json(resolve(data, s["questions"]), resolve(data, s["images"]),
                                 schema=s.get("schema", "auto"), **extra)
    if kind == "hf":
        from vlpeft_jax.data import hf_datasets

        path = resolve(data, s.pop("path"))
        hf_split = s.pop("split", None) or "train"
        builder = s.pop("builder", None)
        if s.get("image_root"):
            s["image_root"] = resolve(data, s["image_root"])
        if task == "captioning":
            for key in ("question_column", "answers_column"):
                s.pop(key, None)
            ds = hf_datasets.load_hf_captions(path, hf_split, builder, images=images, **s, **common)
        else:
            s.pop("caption_column", None)
            ds = hf_datasets.load_hf_vqa(path, hf_split, builder, images=images, **s, **common)
        return ds if limit is None else LoadedDataset(list(ds)[:limit], ds.report)
    from vlpeft_jax.data import tfds

    for key in ("builder_dir", "data_dir"):
        if s.get(key):
            s[key] = resolve(data, s[key])
    s.setdefault("split", split)
    if task == "captioning":
        for key in ("question_key", "answers_key"):
            s.pop(key, None)
        return tfds.load_tfds_captions(max_examples=limit, **s, **common)
    s.pop("caption_key", None)
    return tfds.load_tfds_vqa(max_examples=limit, **s, **common)
