"""COCO-format caption datasets from local files: Karpathy-split JSON (COCO, Flickr8k/30k) and COCO annotations.

Two layouts are understood:

* **Karpathy split** (``dataset_coco.json``, ``dataset_flickr30k.json``): ``{"images": [{"filename",
  "filepath"?, "split", "sentences": [{"raw", "tokens"}], "imgid", "cocoid"?}]}``; the image file is
  ``image_root / filepath / filename`` (Flickr30k has no ``filepath``).
* **COCO annotations** (``captions_train2017.json``): ``{"images": [{"id", "file_name"}], "annotations":
  [{"image_id", "caption"}]}`` plus an image folder.

Both return :class:`~vlpeft_jax.data.batching.CaptionExample` records in a
:class:`~vlpeft_jax.data.batching.LoadedDataset`. Bad input — a missing or undecodable image file, an empty
caption, an image without captions, an annotation whose ``image_id`` names no image, a malformed entry —
raises :class:`~vlpeft_jax.errors.InputError` naming the file and id (``on_error="raise"``, the default)
or is skipped, counted by reason and reported in a warning and in ``result.report.summary()``
(``on_error="skip"``). Grayscale and RGBA images are converted to RGB.

Images are decoded at load time (``images="eager"``, resized to ``image_size`` when given, so a corrupt
file is found before training) or only checked cheaply and decoded per batch (``images="lazy"``).

Example:
    >>> import json, tempfile, pathlib
    >>> from PIL import Image
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> Image.new("RGB", (8, 8)).save(d / "a.jpg")
    >>> _ = (d / "k.json").write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "test",
    ...     "imgid": 0, "sentences": [{"raw": "A cat."}]}]}))
    >>> ds = load_karpathy(d / "k.json", d, split="test")
    >>> ds[0].captions, ds[0].image.shape
    (('A cat.',), (8, 8, 3))
"""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlpeft_jax.data.batching import CaptionExample, LoadedDataset, SkipReport, read_json
from vlpeft_jax.data.images import ImagePreprocessor, resolve_image
from vlpeft_jax.errors import InputError

KARPATHY_SPLITS = ("train", "restval", "val", "test")


def _clean_captions(raw: Sequence[Any], report: SkipReport, what: str) -> tuple[str, ...]:
    kept = []
    for k, c in enumerate(raw):
        if not isinstance(c, str) or not c.strip():
            report.problem("empty caption", f"{what}: caption {k} is empty or not a string ({c!r})")
            continue
        kept.append(c.strip())
    return tuple(kept)


def load_karpathy(json_path: str | os.PathLike, image_root: str | os.PathLike, split: str | Sequence[str] | None,
                  on_error: str = "raise", images: str = "eager",
                  image_size: int | tuple[int, int] | ImagePreprocessor | None = None,
                  max_images: int | None = None) -> LoadedDataset:
    """Caption examples of one or more Karpathy splits (``"train"``, ``"restval"``, ``"val"``, ``"test"``).

    Args:
        json_path: ``dataset_coco.json`` / ``dataset_flickr30k.json`` (or any file of that layout).
        image_root: the folder that ``filepath/filename`` is relative to.
        split: a split name, a list of them (e.g. ``["train", "restval"]``), or None for all images.
        on_error: ``"raise"`` or ``"skip"`` (see the module docstring).
        images: ``"eager"`` decodes now; ``"lazy"`` checks the file and decodes per batch.
        image_size: resize at load time (an int, (height, width) or an :class:`ImagePreprocessor`).
        max_images: keep at most this many images (after the split filter), for quick runs.
    """
    path = Path(json_path)
    data = read_json(path)
    report = SkipReport(f"Karpathy captions {path}", on_error)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise InputError(f"{path}: expected a Karpathy-split JSON object with an 'images' list")
    wanted = None if split is None else ({split} if isinstance(split, str) else set(split))
    if wanted is not None and not wanted <= set(KARPATHY_SPLITS):
        raise InputError(f"unknown Karpathy split(s) {sorted(wanted - set(KARPATHY_SPLITS))}; "
                         f"valid: {', '.join(KARPATHY_SPLITS)}")
    root = Path(image_root)
    examples = []
    for n, entry in enumerate(data["images"]):
        if max_images is not None and len(examples) >= max_images:
            break
        if not isinstance(entry, dict) or "filename" not in entry:
            report.problem("malformed entry", f"images[{n}] has no 'filename'")
            continue
        if wanted is not None and entry.get("split") not in wanted:
            continue
        image_id = str(entry.get("cocoid", entry.get("imgid", entry["filename"])))
        what = f"image {image_id} ({entry['filename']})"
        sentences = entry.get("sentences")
        if not isinstance(sentences, list):
            report.problem("image without captions", f"{what} has no 'sentences' list")
            continue
        raw = []
        for k, s in enumerate(sentences):
            if isinstance(s, dict) and "imgid" in s and "imgid" in entry and s["imgid"] != entry["imgid"]:
                report.problem("id mismatch", f"{what}: sentence {k} belongs to imgid {s['imgid']}, "
                                              f"not {entry['imgid']}")
                continue
            text = s.get("raw") if isinstance(s, dict) else s
            if text is None and isinstance(s, dict) and isinstance(s.get("tokens"), list):
                text = " ".join(s["tokens"])
            raw.append(text)
        captions = _clean_captions(raw, report, what)
        if not captions:
            report.problem("image without captions", f"{what} has no non-empty caption")
            continue
        file = root / entry.get("filepath", "") / entry["filename"]
        ok, image = resolve_image(file, report, what, images, image_size)
        if not ok:
            continue
        examples.append(CaptionExample(image_id, captions, image=image, image_path=str(file),
                                       meta={"split": entry.get("split"), "source": str(path)}))
    report.finish(len(examples))
    return LoadedDataset(examples, report)


def load_coco_captions(annotations_path: str | os.PathLike, image_dir: str | os.PathLike,
                       on_error: str = "raise", images: str = "eager",
                       image_size: int | tuple[int, int] | ImagePreprocessor | None = None,
                       max_images: int | None = None) -> LoadedDataset:
    """Caption examples from a COCO ``captions_*.json`` (``images`` + ``annotations``) and its image folder.

    An annotation whose ``image_id`` is not in ``images`` is an id mismatch; an image with no (non-empty)
    caption is reported too. Examples follow the order of ``images``. Other arguments as
    :func:`load_karpathy`.
    """
    path = Path(annotations_path)
    data = read_json(path)
    report = SkipReport(f"COCO captions {path}", on_error)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise InputError(f"{path}: expected a COCO JSON object with 'images' and 'annotations' lists")
    files: dict[Any, str] = {}
    for n, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            report.problem("malformed entry", f"images[{n}] needs 'id' and 'file_name'; got {im!r}")
            continue
        files[im["id"]] = im["file_name"]
    captions: dict[Any, list[Any]] = collections.defaultdict(list)
    for n, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann:
            report.problem("malformed entry", f"annotations[{n}] has no 'image_id'")
            continue
        if ann["image_id"] not in files:
            report.problem("id mismatch", f"annotation {ann.get('id', n)} refers to image_id {ann['image_id']!r}, "
                                          "which is not in 'images'")
            continue
        captions[ann["image_id"]].append(ann.get("caption"))
    root = Path(image_dir)
    examples = []
    for image_id, file_name in files.items():
        if max_images is not None and len(examples) >= max_images:
            break
        what = f"image {image_id} ({file_name})"
        caps = _clean_captions(captions.get(image_id, []), report, what)
        if not caps:
            report.problem("image without captions", f"{what} has no non-empty caption")
            continue
        file = root / file_name
        ok, image = resolve_image(file, report, what, images, image_size)
        if not ok:
            continue
        examples.append(CaptionExample(str(image_id), caps, image=image, image_path=str(file),
                                       meta={"source": str(path)}))
    report.finish(len(examples))
    return LoadedDataset(examples, report)


def load_flickr30k(json_path: str | os.PathLike, image_root: str | os.PathLike, split: str | Sequence[str] | None,
                   **kwargs: Any) -> LoadedDataset:
    """Flickr30k/Flickr8k in Karpathy's layout (``dataset_flickr30k.json``): :func:`load_karpathy`."""
    return load_karpathy(json_path, image_root, split, **kwargs)
