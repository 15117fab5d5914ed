"""TensorFlow Datasets from a prepared ``data_dir`` (or a builder directory) as caption/VQA records.

``tensorflow_datasets`` is imported only when these functions run; when it is missing they raise
:class:`~vlpeft_jax.errors.ConfigError` saying what to install. Nothing is downloaded: the dataset must
already be prepared (``tfds build`` / ``download_and_prepare`` elsewhere, then copied here). Datasets stored
as ``array_record`` are read with ``as_data_source`` (no TensorFlow needed); ``tfrecord`` ones with
``as_dataset`` (needs ``tensorflow``).

Feature keys are paths: ``"captions/text"`` reads ``example["captions"]["text"]``; a key that is itself a
flat name with a slash (``"image/id"`` in ``coco_captions``) is found first. Strings arrive as bytes and are
decoded as UTF-8. Bad examples follow ``on_error`` like every other loader.

Example (needs tensorflow-datasets and a prepared ``coco_captions`` in ``data_dir``)::

    ds = load_tfds_captions("coco_captions", data_dir="~/tensorflow_datasets", split="val",
                            caption_key="captions/text", id_key="image/id", image_size=224)
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from vlpeft_jax.data.batching import CaptionExample, LoadedDataset, SkipReport, VQAExample
from vlpeft_jax.data.images import ImagePreprocessor, decode_image
from vlpeft_jax.errors import ConfigError, InputError

INSTALL_HINT = ("pip install tensorflow-datasets (plus tensorflow for tfrecord datasets), "
                "or pip install 'vlpeft_jax[data]'")


def tfds_available() -> bool:
    """Whether ``tensorflow_datasets`` can be imported (without importing it).

    Example:
        >>> isinstance(tfds_available(), bool)
        True
    """
    return importlib.util.find_spec("tensorflow_datasets") is not None


def _import_tfds() -> Any:
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ConfigError(f"loading TFDS datasets needs the `tensorflow-datasets` package, which is not installed "
                          f"({e}): {INSTALL_HINT}") from None
    return tfds


def iterate_tfds(name: str | None = None, data_dir: str | os.PathLike | None = None, split: str = "train",
                 builder_dir: str | os.PathLike | None = None) -> Iterator[dict[str, Any]]:
    """Numpy examples of a prepared TFDS dataset: by ``name`` in ``data_dir``, or from ``builder_dir``.

    ``builder_dir`` is a prepared version folder (``data_dir/name/config/version``) and needs no builder code.
    """
    tfds = _import_tfds()
    if builder_dir is not None:
        d = Path(builder_dir).expanduser()
        if not (d / "dataset_info.json").is_file():
            raise InputError(f"{d} is not a prepared TFDS dataset folder (no dataset_info.json)")
        builder = tfds.builder_from_directory(str(d))
        label = str(d)
    else:
        if name is None:
            raise InputError("give a TFDS dataset name (with data_dir) or builder_dir")
        if data_dir is not None and not Path(data_dir).expanduser().is_dir():
            raise InputError(f"TFDS data_dir not found: {data_dir}")
        try:
            builder = tfds.builder(name, data_dir=None if data_dir is None else str(Path(data_dir).expanduser()))
        except Exception as e:  # tfds raises its own DatasetNotFoundError and friends
            raise InputError(f"TFDS has no dataset {name!r}: {type(e).__name__}: {e}") from None
        label = f"{name} in {data_dir or 'the default data_dir'}"
        if not builder.data_path.exists() or not builder.info.splits:
            raise InputError(f"TFDS dataset {label} is not prepared (looked in {builder.data_path}); prepare it "
                             "where there is network access (`tfds build NAME --data_dir DIR`) and copy DIR here")
    if split not in builder.info.splits and "[" not in split and "+" not in split:
        raise InputError(f"TFDS dataset {label} has no split {split!r}; splits: {list(builder.info.splits)}")
    file_format = getattr(builder.info, "file_format", None)
    file_format = str(getattr(file_format, "value", file_format) or "").lower()  # an enum in recent tfds
    if "array_record" in file_format:
        source = builder.as_data_source(split=split)
        for i in range(len(source)):
            yield source[i]
        return
    try:
        ds = builder.as_dataset(split=split, shuffle_files=False)
    except ImportError as e:
        raise ConfigError(f"reading the tfrecord dataset {label} needs tensorflow ({e}): "
                          "pip install tensorflow") from None
    yield from tfds.as_numpy(ds)


def _get(example: Any, key: str) -> Any:
    if isinstance(example, dict) and key in example:
        return example[key]
    head, _, rest = key.partition("/")
    if rest and isinstance(example, dict):
        # Try progressively longer flat prefixes ("image/id" in coco_captions is one key).
        parts = key.split("/")
        for cut in range(1, len(parts)):
            prefix = "/".join(parts[:cut])
            if prefix in example:
                return _get(example[prefix], "/".join(parts[cut:]))
    raise KeyError(key)


def _strings(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (bytes, str, np.bytes_, np.str_)):
        value = [value]
    out = []
    for v in np.asarray(value, dtype=object).reshape(-1):
        out.append(v.decode("utf-8", errors="replace") if isinstance(v, (bytes, np.bytes_)) else v)
    return out


def _image(example: Any, key: str, report: SkipReport, what: str,
           image_size: int | tuple[int, int] | ImagePreprocessor | None) -> tuple[bool, Any]:
    try:
        raw = _get(example, key)
    except KeyError:
        report.problem("missing image", f"{what}: no image feature {key!r}; keys: {list(example)}")
        return False, None
    try:
        data = bytes(raw) if isinstance(raw, (bytes, np.bytes_)) else raw
        img = decode_image(data, name=what)
        if image_size is not None:
            pre = image_size if isinstance(image_size, ImagePreprocessor) else ImagePreprocessor(size=image_size)
            img = pre.to_uint8(img)
        return True, img
    except InputError as e:
        report.problem("unreadable image", f"{what}: {e}")
        return False, None


def load_tfds_captions(name: str | None = None, data_dir: str | os.PathLike | None = None, split: str = "train",
                       builder_dir: str | os.PathLike | None = None, image_key: str = "image",
                       caption_key: str = "captions/text", id_key: str | None = "image/id",
                       on_error: str = "raise", image_size: int | tuple[int, int] | ImagePreprocessor | None = None,
                       max_examples: int | None = None) -> LoadedDataset:
    """Caption records from a prepared TFDS dataset (defaults fit ``coco_captions``)."""
    report = SkipReport(f"TFDS {name or builder_dir} [{split}]", on_error)
    examples = []
    for n, ex in enumerate(iterate_tfds(name, data_dir, split, builder_dir)):
        if max_examples is not None and len(examples) >= max_examples:
            break
        image_id = str(_strings(_get(ex, id_key))[0]) if id_key and _has(ex, id_key) else str(n)
        what = f"example {n} (id {image_id})"
        try:
            raw = _strings(_get(ex, caption_key))
        except KeyError:
            raise InputError(f"TFDS example has no caption feature {caption_key!r}; keys: {list(ex)}") from None
        caps = []
        for k, c in enumerate(raw):
            if isinstance(c, str) and c.strip():
                caps.append(c.strip())
            else:
                report.problem("empty caption", f"{what}: caption {k} is empty")
        if not caps:
            report.problem("image without captions", f"{what} has no non-empty caption")
            continue
        ok, img = _image(ex, image_key, report, what, image_size)
        if ok:
            examples.append(CaptionExample(image_id, tuple(caps), image=img, meta={"source": report.source}))
    report.finish(len(examples))
    return LoadedDataset(examples, report)


def load_tfds_vqa(name: str | None = None, data_dir: str | os.PathLike | None = None, split: str = "train",
                  builder_dir: str | os.PathLike | None = None, image_key: str = "image",
                  question_key: str = "question", answers_key: str = "answers", id_key: str | None = "question_id",
                  image_id_key: str | None = "image_id", require_answers: bool = True, on_error: str = "raise",
                  image_size: int | tuple[int, int] | ImagePreprocessor | None = None,
                  max_examples: int | None = None) -> LoadedDataset:
    """VQA records from a prepared TFDS dataset; feature keys are paths (see the module docstring)."""
    report = SkipReport(f"TFDS {name or builder_dir} [{split}]", on_error)
    examples = []
    for n, ex in enumerate(iterate_tfds(name, data_dir, split, builder_dir)):
        if max_examples is not None and len(examples) >= max_examples:
            break
        qid = str(_strings(_get(ex, id_key))[0]) if id_key and _has(ex, id_key) else str(n)
        image_id = str(_strings(_get(ex, image_id_key))[0]) if image_id_key and _has(ex, image_id_key) else qid
        what = f"example {n} (question {qid})"
        question = _strings(_get(ex, question_key))[0] if _has(ex, question_key) else None
        if not isinstance(question, str) or not question.strip():
            report.problem("empty question", f"{what}: no question text under {question_key!r}")
            continue
        answers = tuple(a.strip() for a in (_strings(_get(ex, answers_key)) if _has(ex, answers_key) else [])
                        if isinstance(a, str) and a.strip())
        if not answers and require_answers:
            report.problem("question without answers", f"{what} has no answers under {answers_key!r}")
            continue
        ok, img = _image(ex, image_key, report, what, image_size)
        if ok:
            examples.append(VQAExample(qid, image_id, question.strip(), answers, image=img,
                                       meta={"source": report.source}))
    report.finish(len(examples))
    return LoadedDataset(examples, report)


def _has(example: Any, key: str) -> bool:
    try:
        _get(example, key)
    except KeyError:
        return False
    return True
