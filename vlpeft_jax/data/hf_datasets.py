"""Hugging Face ``datasets`` from local files (imagefolder, JSON/JSONL, parquet, CSV) as caption/VQA records.

``datasets`` is imported only when one of these functions runs. Nothing is downloaded: the path must be a
local folder or file (a hub id fails with :class:`~vlpeft_jax.errors.OfflineError`).

* A folder is read with the ``imagefolder`` builder — images plus a ``metadata.jsonl``/``metadata.csv``
  with ``file_name`` and caption (``text``/``caption``/``captions``) or question/answers columns.
* A ``.json``/``.jsonl``/``.parquet``/``.csv`` file (or a list of them) is read with the matching builder; its
  image column holds file paths (relative to ``image_root``, default the data file's folder), encoded
  bytes (``{"bytes", "path"}`` as ``datasets.Image`` stores them) or arrays.

Images are decoded by us (``datasets.Image(decode=False)``), so grayscale/RGBA are converted and a corrupt
file is reported by name like in every other loader (``on_error="raise"|"skip"``).

Example:
    >>> import json, tempfile, pathlib
    >>> from PIL import Image
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> Image.new("RGBA", (8, 8)).save(d / "a.png")
    >>> _ = (d / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a square"}) + "\\n")
    >>> ds = load_hf_captions(d, cache_dir=d / "cache")
    >>> ds[0].captions, ds[0].image.shape
    (('a square',), (8, 8, 3))
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlpeft_jax.data.batching import CaptionExample, LoadedDataset, SkipReport, VQAExample
from vlpeft_jax.data.images import IMAGE_MODES, ImagePreprocessor, decode_image, resolve_image
from vlpeft_jax.errors import ConfigError, InputError, OfflineError

_BUILDER_BY_SUFFIX = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
CAPTION_COLUMNS = ("captions", "caption", "text", "sentences", "raw")
IMAGE_COLUMNS = ("image", "img", "image_path", "file_name", "filepath", "path")


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as e:
        raise ConfigError("loading Hugging Face datasets needs the `datasets` package: pip install datasets "
                          f"(or pip install 'vlpeft_jax[data]'); import failed: {e}") from None
    return datasets


def load_hf_dataset(path: str | os.PathLike | Sequence[str | os.PathLike], split: str = "train",
                    builder: str | None = None, cache_dir: str | os.PathLike | None = None) -> Any:
    """A ``datasets.Dataset`` from a local folder (imagefolder) or data file(s); ``builder`` overrides the guess.

    Example:
        >>> import tempfile, pathlib, json
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "d.jsonl"
        >>> _ = f.write_text(json.dumps({"question": "q?", "answers": ["a"]}) + "\\n")
        >>> load_hf_dataset(f, cache_dir=f.parent / "cache").num_rows
        1
    """
    datasets = _import_datasets()
    paths = [Path(p) for p in ([path] if isinstance(path, (str, os.PathLike)) else path)]
    if not paths:
        raise InputError("no data path given")
    for p in paths:
        if not p.exists():
            s = str(p)
            if re.fullmatch(r"[A-Za-z0-9_.\-]+/[A-Za-z0-9_.\-]+", s) and not s.startswith((".", "/")):
                raise OfflineError(f"{s!r} is not a local path. It looks like a Hugging Face hub dataset id, but "
                                   "this machine has no network access: download it elsewhere (e.g. "
                                   f"`huggingface-cli download --repo-type dataset {s} --local-dir DIR`) and pass "
                                   "the local folder or data files instead.")
            raise InputError(f"dataset path not found: {p}")
    kwargs: dict[str, Any] = {"split": split}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    if len(paths) == 1 and paths[0].is_dir():
        name = builder or "imagefolder"
        kwargs["data_dir"] = str(paths[0])
    else:
        suffixes = {p.suffix.lower() for p in paths}
        guessed = {_BUILDER_BY_SUFFIX.get(s) for s in suffixes}
        if builder is None and (len(guessed) != 1 or None in guessed):
            raise InputError(f"cannot tell the format of {[str(p) for p in paths]} from the suffix; pass builder= "
                             f"one of {sorted(set(_BUILDER_BY_SUFFIX.values()))}")
        name = builder or guessed.pop()
        kwargs["data_files"] = [str(p) for p in paths]
    dataset_errors = (ValueError, FileNotFoundError, KeyError,
                      getattr(datasets.exceptions, "DatasetsError", ValueError))
    try:
        return datasets.load_dataset(name, **kwargs)
    except dataset_errors as e:
        raise InputError(f"datasets could not load {[str(p) for p in paths]} with builder {name!r} "
                         f"split {split!r}: {e}") from None


def _undecoded(ds: Any, column: str) -> Any:
    """The dataset with ``column`` left as {bytes, path} if it is a ``datasets.Image`` feature."""
    datasets = _import_datasets()
    feature = ds.features.get(column)
    if isinstance(feature, datasets.Image) and feature.decode:
        return ds.cast_column(column, datasets.Image(decode=False))
    return ds


def _pick_column(ds: Any, given: str | None, candidates: Sequence[str], what: str) -> str:
    names = list(ds.column_names)
    if given is not None:
        if given not in names:
            raise InputError(f"{what} column {given!r} not in the dataset; columns: {names}")
        return given
    for c in candidates:
        if c in names:
            return c
    raise InputError(f"no {what} column found (looked for {list(candidates)}); columns: {names}; pass it explicitly")


def _row_image(value: Any, image_root: Path | None, report: SkipReport, what: str, images: str,
               image_size: int | tuple[int, int] | ImagePreprocessor | None) -> tuple[bool, Any, str | None]:
    """(ok, uint8 image or None, path or None) of an image cell: path string, {bytes, path}, PIL or array."""
    if value is None:
        report.problem("missing image", f"{what}: the image cell is empty")
        return False, None, None
    if isinstance(value, dict):
        if value.get("bytes") is None and value.get("path"):
            value = value["path"]
        elif value.get("bytes") is not None:
            label = value.get("path") or what
            try:
                img = decode_image(value["bytes"], name=str(label))
            except InputError as e:
                report.problem("unreadable image", f"{what}: {e}")
                return False, None, None
            return True, _fit(img, image_size), value.get("path")
        else:
            report.problem("missing image", f"{what}: the image cell has neither bytes nor a path")
            return False, None, None
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_absolute() and image_root is not None:
            path = image_root / path
        ok, img = resolve_image(path, report, what, images, image_size)
        return ok, img, str(path)
    try:
        img = decode_image(np.asarray(value) if isinstance(value, list) else value, name=what)
    except InputError as e:
        report.problem("unreadable image", f"{what}: {e}")
        return False, None, None
    return True, _fit(img, image_size), None


def _fit(image: np.ndarray, image_size: int | tuple[int, int] | ImagePreprocessor | None) -> np.ndarray:
    if image_size is None:
        return image
    pre = image_size if isinstance(image_size, ImagePreprocessor) else ImagePreprocessor(size=image_size)
    return pre.to_uint8(image)


def _texts(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):  # e.g. {"raw": [...]} or {"text": [...]} from nested features
        for key in ("raw", "text", "caption", "answer"):
            if key in value:
                return _texts(value[key])
        return []
    return [v.get("raw", v.get("text", v.get("answer"))) if isinstance(v, dict) else v for v in value]


def _default_root(path: Any) -> Path | None:
    first = path if isinstance(path, (str, os.PathLike)) else next(iter(path), None)
    if first is None:
        return None
    p = Path(first)
    return p if p.is_dir() else p.parent


def hf_caption_examples(ds: Any, image_column: str | None = None, caption_column: str | None = None,
                        id_column: str | None = None, image_root: str | os.PathLike | None = None,
                        on_error: str = "raise", images: str = "eager",
                        image_size: int | tuple[int, int] | ImagePreprocessor | None = None,
                        source: str = "Hugging Face dataset") -> LoadedDataset:
    """Caption records from a loaded ``datasets.Dataset`` (columns picked automatically when not given)."""
    if images not in IMAGE_MODES:
        raise InputError(f"images must be one of {IMAGE_MODES}; got {images!r}")
    report = SkipReport(source, on_error)
    image_col = _pick_column(ds, image_column, IMAGE_COLUMNS, "image")
    caption_col = _pick_column(ds, caption_column, CAPTION_COLUMNS, "caption")
    ds = _undecoded(ds, image_col)
    root = Path(image_root) if image_root is not None else None
    examples = []
    for n, row in enumerate(ds):
        image_id = str(row[id_column]) if id_column else None
        what = f"row {n}" + (f" (id {image_id})" if image_id else "")
        caps = []
        for k, c in enumerate(_texts(row[caption_col])):
            if isinstance(c, str) and c.strip():
                caps.append(c.strip())
            else:
                report.problem("empty caption", f"{what}: caption {k} is empty or not a string ({c!r})")
        if not caps:
            report.problem("image without captions", f"{what} has no non-empty caption")
            continue
        ok, image, path = _row_image(row[image_col], root, report, what, images, image_size)
        if not ok:
            continue
        if image_id is None:
            image_id = Path(path).name if path else str(n)
        examples.append(CaptionExample(image_id, tuple(caps), image=image, image_path=path,
                                       meta={"row": n, "source": source}))
    report.finish(len(examples))
    return LoadedDataset(examples, report)


def hf_vqa_examples(ds: Any, image_column: str | None = None, question_column: str = "question",
                    answers_column: str | None = None, id_column: str | None = None,
                    image_root: str | os.PathLike | None = None, require_answers: bool = True,
                    on_error: str = "raise", images: str = "eager",
                    image_size: int | tuple[int, int] | ImagePreprocessor | None = None,
                    source: str = "Hugging Face dataset") -> LoadedDataset:
    """VQA records from a loaded ``datasets.Dataset``; answers from a list column or a single-answer column."""
    if images not in IMAGE_MODES:
        raise InputError(f"images must be one of {IMAGE_MODES}; got {images!r}")
    report = SkipReport(source, on_error)
    image_col = _pick_column(ds, image_column, IMAGE_COLUMNS, "image")
    question_col = _pick_column(ds, question_column, (), "question")
    answers_col = _pick_column(ds, answers_column, ("answers", "answer", "direct_answers"), "answers")
    ds = _undecoded(ds, image_col)
    root = Path(image_root) if image_root is not None else None
    examples = []
    for n, row in enumerate(ds):
        qid = str(row[id_column]) if id_column else str(row.get("question_id", n))
        what = f"row {n} (question {qid})"
        question = row[question_col]
        if not isinstance(question, str) or not question.strip():
            report.problem("empty question", f"{what}: the question is empty or not a string")
            continue
        answers = tuple(a.strip() for a in _texts(row[answers_col]) if isinstance(a, str) and a.strip())
        if not answers and require_answers:
            report.problem("question without answers", f"{what} has no (non-empty) answers")
            continue
        ok, image, path = _row_image(row[image_col], root, report, what, images, image_size)
        if not ok:
            continue
        image_id = str(row.get("image_id", Path(path).name if path else n))
        examples.append(VQAExample(qid, image_id, question.strip(), answers, image=image, image_path=path,
                                   meta={"row": n, "source": source}))
    report.finish(len(examples))
    return LoadedDataset(examples, report)


def load_hf_captions(path: str | os.PathLike | Sequence[str | os.PathLike], split: str = "train",
                     builder: str | None = None, cache_dir: str | os.PathLike | None = None,
                     image_root: str | os.PathLike | None = None, **kwargs: Any) -> LoadedDataset:
    """:func:`load_hf_dataset` then :func:`hf_caption_examples` (``image_root`` defaults to the data's folder)."""
    ds = load_hf_dataset(path, split, builder, cache_dir)
    root = image_root if image_root is not None else _default_root(path)
    return hf_caption_examples(ds, image_root=root, source=f"Hugging Face dataset {path} [{split}]", **kwargs)


def load_hf_vqa(path: str | os.PathLike | Sequence[str | os.PathLike], split: str = "train",
                builder: str | None = None, cache_dir: str | os.PathLike | None = None,
                image_root: str | os.PathLike | None = None, **kwargs: Any) -> LoadedDataset:
    """:func:`load_hf_dataset` then :func:`hf_vqa_examples` (``image_root`` defaults to the data's folder)."""
    ds = load_hf_dataset(path, split, builder, cache_dir)
    root = image_root if image_root is not None else _default_root(path)
    return hf_vqa_examples(ds, image_root=root, source=f"Hugging Face dataset {path} [{split}]", **kwargs)
