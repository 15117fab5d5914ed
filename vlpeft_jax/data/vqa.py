"""VQA-format datasets from local files: VQAv2/OK-VQA (questions + annotations), A-OKVQA, GQA, plain lists.

* **VQAv2 / OK-VQA**: a questions file ``{"data_subtype": "val2014", "questions": [{"question_id",
  "image_id", "question"}]}`` and an annotations file ``{"annotations": [{"question_id", "image_id",
  "answers": [{"answer"}]}]}`` (:func:`load_vqav2`). Images are named ``COCO_{subtype}_{image_id:012d}.jpg``
  unless ``image_template`` says otherwise.
* **A-OKVQA**: a list of ``{"question_id", "image_id", "question", "direct_answers"}`` (COCO 2017 images
  ``{image_id:012d}.jpg``); **GQA**: ``{question_id: {"imageId", "question", "answer"}}`` (``{imageId}.jpg``);
  **plain lists**: ``[{"question", "answers" | "answer", "image" | "image_id", "question_id"?}]``
  (:func:`load_vqa_json`, which detects the layout).

All return :class:`~vlpeft_jax.data.batching.VQAExample` records in a
:class:`~vlpeft_jax.data.batching.LoadedDataset`; questions on the same image share one decoded array.
Bad input — missing/undecodable image, a question without answers, an annotation for an unknown question
or a different image, a question with no annotation, a malformed entry — raises
:class:`~vlpeft_jax.errors.InputError` naming the file and id (``on_error="raise"``) or is skipped, counted
and reported (``on_error="skip"``).

Example:
    >>> import json, tempfile, pathlib
    >>> from PIL import Image
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> Image.new("L", (8, 8)).save(d / "7.jpg")  # grayscale: converted to RGB
    >>> _ = (d / "q.json").write_text(json.dumps([{"image": "7.jpg", "question": "Is it dark?",
    ...                                           "answers": ["yes"] * 10}]))
    >>> ds = load_vqa_json(d / "q.json", d)
    >>> ds[0].answer, ds[0].image.shape
    ('yes', (8, 8, 3))
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vlpeft_jax.data.batching import LoadedDataset, SkipReport, VQAExample, read_json
from vlpeft_jax.data.images import ImagePreprocessor, resolve_image
from vlpeft_jax.errors import InputError

VQA_SCHEMAS = ("auto", "aokvqa", "gqa", "list")


class _Builder:
    """Collects VQA examples, loading each image once and reporting problems."""

    def __init__(self, report: SkipReport, image_dir: Path, images: str,
                 image_size: int | tuple[int, int] | ImagePreprocessor | None, require_answers: bool,
                 max_questions: int | None):
        self.report, self.image_dir, self.images, self.image_size = report, image_dir, images, image_size
        self.require_answers, self.max_questions = require_answers, max_questions
        self.examples: list[VQAExample] = []
        self._image_cache: dict[str, tuple[bool, Any]] = {}

    @property
    def full(self) -> bool:
        return self.max_questions is not None and len(self.examples) >= self.max_questions

    def answers(self, raw: Any, what: str) -> tuple[str, ...] | None:
        """Answer strings from a list of strings or of {"answer": ...}; None when there are none."""
        if raw is None:
            raw = []
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list):
            self.report.problem("malformed entry", f"{what}: answers must be a list; got {type(raw).__name__}")
            return None
        out = []
        for a in raw:
            text = a.get("answer") if isinstance(a, dict) else a
            if isinstance(text, str) and text.strip():
                out.append(text.strip())
        if not out and self.require_answers:
            self.report.problem("question without answers", f"{what} has no (non-empty) answers")
            return None
        return tuple(out)

    def add(self, question_id: Any, image_id: Any, question: Any, answers: tuple[str, ...], file: str,
            meta: dict[str, Any]) -> None:
        what = f"question {question_id} (image {image_id})"
        if not isinstance(question, str) or not question.strip():
            self.report.problem("empty question", f"{what}: the question is empty or not a string")
            return
        path = self.image_dir / file
        key = str(path)
        if key not in self._image_cache:
            self._image_cache[key] = resolve_image(path, self.report, what, self.images, self.image_size)
        elif not self._image_cache[key][0]:
            # The image already failed for an earlier question; count this question too (never drop silently).
            self.report.problem("missing image file" if not path.is_file() else "unreadable image",
                                f"{what}: image {path} could not be loaded (see above)")
        ok, image = self._image_cache[key]
        if not ok:
            return
        self.examples.append(VQAExample(str(question_id), str(image_id), question.strip(), answers, image=image,
                                        image_path=key, meta=meta))


def load_vqav2(questions_path: str | os.PathLike, annotations_path: str | os.PathLike | None,
               image_dir: str | os.PathLike, image_template: str | None = None, on_error: str = "raise",
               images: str = "eager", image_size: int | tuple[int, int] | ImagePreprocessor | None = None,
               max_questions: int | None = None) -> LoadedDataset:
    """VQAv2 or OK-VQA questions (+ annotations) and their COCO image folder.

    Args:
        questions_path: ``v2_OpenEnded_mscoco_val2014_questions.json`` (or OK-VQA's
            ``OpenEnded_mscoco_val2014_questions.json``).
        annotations_path: the matching annotations file, or None for test questions without answers.
        image_dir: folder holding the images.
        image_template: file name from ``{image_id}`` and ``{subtype}`` (the questions' ``data_subtype``);
            default ``"COCO_{subtype}_{image_id:012d}.jpg"`` when a subtype is given, else
            ``"{image_id:012d}.jpg"``.
        on_error, images, image_size: as :func:`vlpeft_jax.data.coco.load_karpathy`.
        max_questions: keep at most this many questions.
    """
    qpath = Path(questions_path)
    qdata = read_json(qpath)
    report = SkipReport(f"VQA {qpath}", on_error)
    if not isinstance(qdata, dict) or not isinstance(qdata.get("questions"), list):
        raise InputError(f"{qpath}: expected a VQA questions file with a 'questions' list")
    subtype = qdata.get("data_subtype")
    template = image_template or ("COCO_{subtype}_{image_id:012d}.jpg" if subtype else "{image_id:012d}.jpg")
    annotations: dict[Any, dict[str, Any]] | None = None
    if annotations_path is not None:
        apath = Path(annotations_path)
        adata = read_json(apath)
        if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
            raise InputError(f"{apath}: expected a VQA annotations file with an 'annotations' list")
        annotations = {}
        question_ids = {q.get("question_id") for q in qdata["questions"] if isinstance(q, dict)}
        for n, ann in enumerate(adata["annotations"]):
            if not isinstance(ann, dict) or "question_id" not in ann:
                report.problem("malformed entry", f"{apath}: annotations[{n}] has no 'question_id'")
                continue
            if ann["question_id"] not in question_ids:
                report.problem("id mismatch", f"{apath}: annotation for question_id {ann['question_id']!r}, "
                                              f"which is not in {qpath.name}")
                continue
            annotations[ann["question_id"]] = ann
    builder = _Builder(report, Path(image_dir), images, image_size, annotations is not None, max_questions)
    for n, q in enumerate(qdata["questions"]):
        if builder.full:
            break
        if not isinstance(q, dict) or not {"question_id", "image_id", "question"} <= set(q):
            report.problem("malformed entry", f"questions[{n}] needs 'question_id', 'image_id' and 'question'")
            continue
        qid, image_id = q["question_id"], q["image_id"]
        answers: tuple[str, ...] | None = ()
        meta: dict[str, Any] = {"source": str(qpath)}
        if annotations is not None:
            ann = annotations.get(qid)
            if ann is None:
                report.problem("id mismatch", f"question {qid} has no annotation in {annotations_path}")
                continue
            if "image_id" in ann and ann["image_id"] != image_id:
                report.problem("id mismatch", f"question {qid}: the question is about image {image_id} but its "
                                              f"annotation names image {ann['image_id']}")
                continue
            answers = builder.answers(ann.get("answers"), f"question {qid} (image {image_id})")
            if answers is None:
                continue
            meta.update({k: ann[k] for k in ("answer_type", "question_type", "multiple_choice_answer") if k in ann})
        try:
            file = template.format(image_id=image_id, subtype=subtype)
        except (KeyError, ValueError) as e:
            raise InputError(f"image_template {template!r} cannot name image {image_id!r}: {e}") from None
        builder.add(qid, image_id, q["question"], answers, file, meta)
    report.finish(len(builder.examples))
    return LoadedDataset(builder.examples, report)


def _detect_schema(data: Any, path: Path) -> str:
    if isinstance(data, dict):
        if "questions" in data:
            raise InputError(f"{path} is a VQAv2/OK-VQA questions file: use load_vqav2(questions, annotations, ...)")
        first = next(iter(data.values()), None)
        if isinstance(first, dict) and "imageId" in first:
            return "gqa"
        raise InputError(f"{path}: cannot tell the VQA layout (a dict whose entries lack 'imageId'); "
                         f"pass schema= one of {VQA_SCHEMAS[1:]}")
    if isinstance(data, list):
        first = next((x for x in data if isinstance(x, dict)), {})
        return "aokvqa" if "direct_answers" in first or "choices" in first else "list"
    raise InputError(f"{path}: expected a JSON list or object of questions")


def load_vqa_json(path: str | os.PathLike, image_dir: str | os.PathLike, schema: str = "auto",
                  image_template: str | None = None, require_answers: bool = True, on_error: str = "raise",
                  images: str = "eager", image_size: int | tuple[int, int] | ImagePreprocessor | None = None,
                  max_questions: int | None = None) -> LoadedDataset:
    """A-OKVQA, GQA or plain-list VQA files (``schema="auto"`` detects which).

    Args:
        path: the JSON file.
        image_dir: folder the image names are relative to.
        schema: ``"aokvqa"``, ``"gqa"``, ``"list"`` or ``"auto"``.
        image_template: file name from ``{image_id}`` (defaults: A-OKVQA ``"{image_id:012d}.jpg"``, GQA and
            lists ``"{image_id}.jpg"``); lists with an ``"image"`` field use that instead.
        require_answers: False for test files without answers (else such questions are bad input).
        on_error, images, image_size, max_questions: as :func:`load_vqav2`.
    """
    p = Path(path)
    data = read_json(p)
    if schema not in VQA_SCHEMAS:
        raise InputError(f"unknown VQA schema {schema!r}; valid: {', '.join(VQA_SCHEMAS)}")
    schema = _detect_schema(data, p) if schema == "auto" else schema
    report = SkipReport(f"VQA ({schema}) {p}", on_error)
    builder = _Builder(report, Path(image_dir), images, image_size, require_answers, max_questions)
    entries: Iterable[tuple[Any, Any]]
    if schema == "gqa":
        if not isinstance(data, dict):
            raise InputError(f"{p}: a GQA file is an object {{question_id: {{...}}}}")
        entries = data.items()
        template = image_template or "{image_id}.jpg"
    else:
        if not isinstance(data, list):
            raise InputError(f"{p}: an {schema} file is a JSON list of questions")
        entries = enumerate(data)
        template = image_template or ("{image_id:012d}.jpg" if schema == "aokvqa" else "{image_id}.jpg")
    for key, q in entries:
        if builder.full:
            break
        if not isinstance(q, dict):
            report.problem("malformed entry", f"entry {key!r} is not an object")
            continue
        if schema == "gqa":
            qid, image_id, raw_answers = key, q.get("imageId"), q.get("answer")
        elif schema == "aokvqa":
            qid, image_id, raw_answers = q.get("question_id", key), q.get("image_id"), q.get("direct_answers")
        else:
            qid = q.get("question_id", q.get("id", key))
            image_id = q.get("image_id", q.get("image"))
            raw_answers = q.get("answers", q.get("answer"))
        what = f"question {qid} (image {image_id})"
        if image_id is None:
            report.problem("malformed entry", f"{what}: no image id / image field")
            continue
        answers = builder.answers(raw_answers, what)
        if answers is None:
            continue
        if schema == "list" and "image" in q:
            file = str(q["image"])
        else:
            try:
                file = template.format(image_id=image_id)
            except (KeyError, ValueError) as e:
                raise InputError(f"image_template {template!r} cannot name image {image_id!r}: {e}") from None
        meta = {"source": str(p), "schema": schema}
        if schema == "aokvqa" and "choices" in q:
            meta.update(choices=tuple(q["choices"]), correct_choice_idx=q.get("correct_choice_idx"))
        builder.add(qid, image_id, q.get("question"), answers, file, meta)
    report.finish(len(builder.examples))
    return LoadedDataset(builder.examples, report)
