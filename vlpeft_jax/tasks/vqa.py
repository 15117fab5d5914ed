"""Open-ended VQA with the LM: the answer is generated after PETAL's task instruction, scored by VQA accuracy.

Every question becomes ``<bos> Question: {question} Short answer: {answer} <eos>`` with the image as prefix:
the task-specific VQA instruction of PETAL (seed ``001_e6226210b77e0466.txt``, Appendix C, Table 7:
"Question: {Question} Short answer:"; :data:`~vlpeft_jax.data.batching.VQA_PROMPT_TEMPLATE`). The target is
the most frequent human answer; the loss covers only the answer tokens and the closing ``<eos>`` (``<bos>``
and the instruction are labelled -100). Evaluation decodes an answer after ``<bos> Question: {q} Short
answer:`` (``config.eval``: greedy by default, KV cache, :func:`vlpeft_jax.eval.decode.generate`) and scores
it with the official VQA accuracy (:func:`vlpeft_jax.eval.vqa.vqa_accuracy`: ``min(1, #humans/3)`` averaged
over the 10 leave-one-out subsets; a question with a single reference answer, as in GQA, scores the exact
match of the normalised answers instead) and the exact match with the most frequent answer (normalised).

Results are grouped ``all`` plus one group per question type, so the report shows a per-type breakdown;
each group also carries its question ``count`` (the groups' accuracies, weighted by their counts, average to
``all``). Data (``config.data.kind``):

- ``"shapes"`` (default): the shapes world's questions (:meth:`~vlpeft_jax.data.shapes.ShapesSplit.vqa_examples`),
  grouped by the world's question types (:data:`~vlpeft_jax.data.shapes.QUESTION_TYPES`); the tokenizer is the
  world's. ``config.train.question_types`` (empty = all) limits the training questions to some types;
  ``config.train.captions`` (``source``/``target``, default none) shuffles the world's captions of that
  domain (``<bos> caption <eos>``, as the captioning task) into the training questions.
- ``"vqa_files"``: VQA-format files on disk through :mod:`vlpeft_jax.data.vqa`; ``config.data.splits`` maps a
  split name to ``{questions, annotations?, images, image_template?, schema?}`` (``annotations`` given: VQAv2 /
  OK-VQA via :func:`~vlpeft_jax.data.vqa.load_vqav2`; absent: A-OKVQA, GQA or a plain list via
  :func:`~vlpeft_jax.data.vqa.load_vqa_json`); ``train`` and ``config.eval.split`` must be there. Groups are
  VQAv2's answer types (``yes/no``, ``number``, ``other``, from the annotations' ``answer_type``; files
  without it fill only ``all``). The tokenizer (``data.tokenizer``): ``""`` trains a
  :class:`~vlpeft_jax.data.tokenizer.WordTokenizer` on the training split's questions and answers (plus the
  instruction's words; the evaluation answers stay unseen, their unknown words are ``<unk>``); ``"shapes"``
  is the shapes world's tokenizer (to adapt a shapes-pretrained base on files in the world's words); any
  other value is a directory holding a saved WordTokenizer (e.g. ``<run>/tokenizer`` of an earlier run).
  ``data.on_error`` (``raise``/``skip``) and ``data.max_questions`` (0 = all) go to the loaders.

``outputs_file`` writes the VQA results format ``[{"question_id", "answer"}]`` (digit-only ids as ints, as
the official evaluation expects).

Example (scoring known answers; 10 human answers, the official ``min(1, n/3)``):
    >>> from vlpeft_jax.data.batching import VQAExample
    >>> exs = [VQAExample("1", "im", "what color?", ("red",) * 10, meta={"qtype": "color"}),
    ...        VQAExample("2", "im", "how many?", ("2",) * 8 + ("3",) * 2, meta={"qtype": "count"})]
    >>> res = score_answers(exs, {"1": "red", "2": "three"}, ("all", "color", "count"))
    >>> round(res["all"]["metrics"]["VQA accuracy"], 3), res["count"]["count"]
    (0.8, 1)
    >>> VQATask.groups
    ('all', 'color', 'shape', 'count', 'position', 'relation', 'existence')
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from vlpeft_jax.data import shapes
from vlpeft_jax.data.batching import (
    VQA_PROMPT_TEMPLATE,
    CaptionBatches,
    CaptionExample,
    VQABatches,
    VQAExample,
    example_image,
    vqa_prompt,
)
from vlpeft_jax.data.tokenizer import WordTokenizer
from vlpeft_jax.data.vqa import VQA_SCHEMAS, load_vqa_json, load_vqav2
from vlpeft_jax.errors import ConfigError
from vlpeft_jax.eval.vqa import normalize_answer, vqa_accuracy
from vlpeft_jax.tasks import base
from vlpeft_jax.tasks.captioning import DOMAINS as CAPTION_DOMAINS
from vlpeft_jax.tasks.captioning import ShapesLMTask, preprocessor

DATA_KINDS = ("shapes", "vqa_files")
REPORT_METRICS = ("VQA accuracy", "exact match")
VQAV2_ANSWER_TYPES = ("yes/no", "number", "other")
SELECTION_KEYS = ("num_batches", "batch_size", "question_types", "seed")
FILE_DATA_KEYS = ("kind", "splits", "tokenizer", "min_word_frequency", "on_error", "max_questions")
FILE_SPLIT_KEYS = ("questions", "annotations", "images", "image_template", "schema")


# ------------------------------------------------------------------------------------------------ scoring


def answer_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy with >= 2 human answers; with one reference, exact match of normalised answers."""
    if len(answers) >= 2:
        return vqa_accuracy(prediction, answers)
    return float(normalize_answer(prediction) == normalize_answer(answers[0]))


def question_group(example: VQAExample) -> str | None:
    """The group of a question: the shapes world's question type, else the VQAv2 answer type (or None)."""
    return example.meta.get("qtype", example.meta.get("answer_type"))


def score_answers(examples: Sequence[VQAExample], predictions: Mapping[str, str],
                  groups: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{group: {"metrics", "unavailable", "count"}}`` for ``"all"`` and every other group of ``groups``
    (a question belongs to the group :func:`question_group` names). A group without questions reports its
    metrics as unavailable."""
    acc = {ex.question_id: answer_accuracy(predictions[ex.question_id], ex.answers) for ex in examples}
    exact = {ex.question_id: float(normalize_answer(predictions[ex.question_id]) == normalize_answer(ex.answer))
             for ex in examples}
    out: dict[str, dict[str, Any]] = {}
    for group in groups:
        ids = [ex.question_id for ex in examples if group == "all" or question_group(ex) == group]
        if not ids:
            why = f"no evaluated question of type {group!r}"
            out[group] = {"metrics": {}, "unavailable": {m: why for m in REPORT_METRICS}, "count": 0}
            continue
        out[group] = {"metrics": {"VQA accuracy": float(np.mean([acc[i] for i in ids])),
                                  "exact match": float(np.mean([exact[i] for i in ids]))},
                      "unavailable": {}, "count": len(ids)}
    return out


# ------------------------------------------------------------------------------------------- file data


class VQAFiles:
    """The ``vqa_files`` data settings, checked at once; each split loaded on first use."""

    def __init__(self, cfg: ml_collections.ConfigDict) -> None:
        data = cfg.data.to_dict()
        base.check_settings("data", data, FILE_DATA_KEYS)
        splits = data.get("splits") or {}
        if not isinstance(splits, Mapping):
            raise ConfigError(f"data.splits must map split names to file settings; got {splits!r}")
        for needed, why in (("train", "the training split"), (cfg.eval.split, "config.eval.split")):
            if needed not in splits:
                raise ConfigError(f"data.splits has no {needed!r} ({why}); given: {', '.join(splits) or 'none'}. "
                                  f"Each split is {{{', '.join(FILE_SPLIT_KEYS)}}}")
        for name, s in splits.items():
            where = f"data.splits.{name}"
            if not isinstance(s, Mapping):
                raise ConfigError(f"{where} must be a dict of {', '.join(FILE_SPLIT_KEYS)}; got {s!r}")
            base.check_settings(where, s, FILE_SPLIT_KEYS)
            for key in ("questions", "images"):
                if not s.get(key):
                    raise ConfigError(f"{where}.{key} is required (the questions file and the image folder)")
            for key, is_dir in (("questions", False), ("annotations", False), ("images", True)):
                p = s.get(key)
                if p and not (Path(p).is_dir() if is_dir else Path(p).is_file()):
                    raise ConfigError(f"{where}.{key}={p!r}: no such {'folder' if is_dir else 'file'}")
            if s.get("schema", "auto") not in VQA_SCHEMAS:
                raise ConfigError(f"{where}.schema={s['schema']!r}; valid: {', '.join(VQA_SCHEMAS)}")
            if s.get("annotations") and s.get("schema", "auto") != "auto":
                raise ConfigError(f"{where}: schema applies to files without annotations (A-OKVQA, GQA, lists); "
                                  "with annotations the files are VQAv2/OK-VQA")
        if data.get("on_error", "raise") not in ("raise", "skip"):
            raise ConfigError(f"data.on_error={data['on_error']!r}; valid: raise, skip")
        self.splits, self.data = splits, data
        self.preprocessor = preprocessor(cfg)
        self._loaded: dict[str, list[VQAExample]] = {}

    def examples(self, split: str) -> list[VQAExample]:
        if split not in self.splits:
            raise ConfigError(f"split {split!r} is not in data.splits ({', '.join(self.splits)})")
        if split not in self._loaded:
            s = self.splits[split]
            common = dict(image_template=s.get("image_template") or None, on_error=self.data.get("on_error", "raise"),
                          image_size=self.preprocessor, max_questions=self.data.get("max_questions") or None)
            if s.get("annotations"):
                ds = load_vqav2(s["questions"], s["annotations"], s["images"], **common)
            else:
                ds = load_vqa_json(s["questions"], s["images"], schema=s.get("schema", "auto"), **common)
            if not len(ds):
                raise ConfigError(f"data.splits.{split}: no usable questions in {s['questions']} "
                                  f"({ds.report.summary()})")
            print(f"VQA data: {ds.report.summary()}")
            self._loaded[split] = list(ds)
        return self._loaded[split]

    def tokenizer(self) -> WordTokenizer:
        """``data.tokenizer``: see the module docstring."""
        name = self.data.get("tokenizer") or ""
        if name == "shapes":
            return shapes.shapes_tokenizer()
        if name:
            if not (Path(name) / "tokenizer.json").is_file():
                raise ConfigError(f"data.tokenizer={name!r}: not 'shapes', '' (train one on the questions and "
                                  "answers) or a folder with a saved WordTokenizer (tokenizer.json)")
            return WordTokenizer.load(name)
        train = self.examples("train")
        texts = [ex.question for ex in train] + [a for ex in train for a in ex.answers]
        return WordTokenizer.train(texts, extra_words=[VQA_PROMPT_TEMPLATE.format(question="")],
                                   min_frequency=int(self.data.get("min_word_frequency") or 1))


# ------------------------------------------------------------------------------------------------- task


class VQATask(ShapesLMTask):
    """Open-ended VQA (see the module docstring)."""

    name = "vqa"
    groups: tuple[str, ...] = ("all", *shapes.QUESTION_TYPES)
    group_label = "questions"
    group_note = "all = every evaluated question; the other rows: questions of one type of the shapes world."
    report_metrics = REPORT_METRICS
    primary_metric = "VQA accuracy"

    def __init__(self, cfg: ml_collections.ConfigDict, world: shapes.ShapesWorld | None = None,
                 tokenizer: Any = None) -> None:
        self.kind = cfg.data.get("kind", "shapes")
        if self.kind not in DATA_KINDS:
            raise ConfigError(f"data.kind={self.kind!r} for the vqa task; valid: {', '.join(DATA_KINDS)}")
        self.files: VQAFiles | None = None
        if self.kind == "vqa_files":
            self.files = VQAFiles(cfg)
            self.groups = ("all", *VQAV2_ANSWER_TYPES)
            self.group_label = "answer type"
            self.group_note = "all = every evaluated question; the other rows: VQAv2 answer types."
            if tokenizer is None:
                tokenizer = self.files.tokenizer()
        self._examples: dict[str, list[VQAExample]] = {}
        super().__init__(cfg, world=world, tokenizer=tokenizer)
        # None: every training question (also those of files without answer types)
        where = f"config {cfg.get('name', '')!r}: train"  # (this may be a pretrain config)
        self.train_types = self.question_types(cfg.train.get("question_types") or (), f"{where}.question_types") or None
        self.train_captions = cfg.train.get("captions") or ""
        if self.train_captions and (self.files is not None or self.train_captions not in CAPTION_DOMAINS):
            raise ConfigError(f"{where}.captions={self.train_captions!r}: mixes the shapes world's captions of a "
                              f"domain ({', '.join(CAPTION_DOMAINS)}) into training; only with data.kind='shapes'")

    # ---------------------------------------------------------------------------------------- data

    def question_types(self, given: Iterable[str], where: str) -> tuple[str, ...]:
        """``given`` checked against this task's groups (ConfigError naming ``where`` otherwise)."""
        given = tuple(given)
        bad = [t for t in given if t not in self.groups[1:]]
        if bad:
            raise ConfigError(f"{where}: unknown question type(s) {', '.join(map(repr, bad))}; valid: "
                              f"{', '.join(self.groups[1:])}")
        return given

    def shared_data(self) -> dict[str, Any]:
        if self.files is not None:  # files are read again by the pretrain task; the tokenizer is shared
            return {"tokenizer": self.tokenizer}
        return super().shared_data()

    def examples(self, split: str) -> list[VQAExample]:
        """Every question of ``split``, in dataset order."""
        if split not in self._examples:
            self._examples[split] = (self.files.examples(split) if self.files is not None
                                     else self.world[split].vqa_examples())
        return self._examples[split]

    def eval_examples(self) -> list[VQAExample]:
        """The evaluated questions: the first ``config.eval.max_examples`` (0 = all) of the evaluation split."""
        examples = self.examples(self.cfg.eval.split)
        return examples[:base.eval_count(self.cfg, len(examples))]

    def instructions(self) -> Any:
        return None if self.files is not None else super().instructions()

    def _batches(self, types: Sequence[str] | None, batch_size: int, seed: int, captions: str = "") -> base.Batches:
        examples = [ex for ex in self.examples("train") if types is None or question_group(ex) in types]
        if not examples:
            raise ConfigError(f"no training questions of type(s) {', '.join(types or ())} in the training split")
        if not captions:
            return self.with_qformer_text(VQABatches(examples, self.tokenizer, self.preprocessor,
                                                     batch_size=batch_size, max_length=self.cfg.train.max_length,
                                                     seed=seed))
        # questions as one-reference "captions" after their instruction, shuffled with the image captions
        mixed = [CaptionExample(ex.image_id, (ex.answer,), image=ex.image, image_path=ex.image_path,
                                prompt=VQA_PROMPT_TEMPLATE.format(question=ex.question), meta=dict(ex.meta))
                 for ex in examples]
        mixed += self.world["train"].caption_examples(captions)
        return self.with_qformer_text(CaptionBatches(mixed, self.tokenizer, self.preprocessor, batch_size=batch_size,
                                                     max_length=self.cfg.train.max_length, seed=seed))

    def train_batches(self, seed: int) -> base.Batches:
        """Training questions of ``config.train.question_types`` (all types when empty), mixed with the
        world's captions of ``config.train.captions`` when set."""
        return self._batches(self.train_types, self.cfg.train.batch_size, seed, self.train_captions)

    def selection_batches(self, settings: Mapping[str, Any], seed: int) -> Iterable[dict[str, Any]]:
        """``num_batches`` batches of training questions of ``question_types`` (default the training types)."""
        base.check_settings("selection", settings, SELECTION_KEYS)
        types = self.question_types(settings.get("question_types") or (), "selection.question_types")
        types = types or self.train_types
        batch_size = settings.get("batch_size") or self.cfg.train.batch_size
        batches = self._batches(types, batch_size, seed)
        print(f"selection data: {settings['num_batches']} batches of {', '.join(types or ('all',))} questions")
        return (self.model_batch(b) for b in batches.iterate(0, settings["num_batches"]))

    # ---------------------------------------------------------------------------------- evaluation

    def answer(self, module: Any, params: Any, methods: base.Methods, examples: list[VQAExample]) -> list[str]:
        """Generated answers for ``examples`` (after ``<bos> Question: {q} Short answer:``), in order."""
        prompts = [VQA_PROMPT_TEMPLATE.format(question=ex.question) for ex in examples]
        longest = max(len(ids) for ids in self.tokenizer.encode_batch(prompts, add_special_tokens=False))
        return self.generate(module, params, methods, examples, prompts=vqa_prompt(),
                             max_prompt_length=longest + 1)

    def evaluate(self, module: Any, params: Any, methods: base.Methods) -> dict[str, Any]:
        """Answers to the evaluated questions, scored overall and per question type."""
        examples = self.eval_examples()
        answers = dict(zip((ex.question_id for ex in examples), self.answer(module, params, methods, examples),
                           strict=True))
        results: dict[str, Any] = score_answers(examples, answers, self.groups)
        results["samples"] = [{"id": ex.question_id, "output": f"Q: {ex.question} A: {answers[ex.question_id]}",
                               "answer": answers[ex.question_id], "reference": ex.answer}
                              for ex in self._sample_examples(8)]
        results["outputs"] = answers
        return results

    def outputs_file(self, outputs: Mapping[str, str]) -> tuple[str, list[dict[str, Any]]]:
        """``answers_<model>.json`` in the VQA results format."""
        return "answers", [{"question_id": int(q) if str(q).isdigit() else q, "answer": a}
                           for q, a in outputs.items()]

    def _sample_examples(self, n: int) -> list[VQAExample]:
        """Up to ``n`` evaluated questions on distinct images, a new question type each while one is left."""
        examples = self.eval_examples()
        picked: list[VQAExample] = []
        images: set[str] = set()
        types: set[Any] = set()
        for fresh_type in (True, False):
            for ex in examples:
                if len(picked) == n:
                    return picked
                if ex.image_id in images or (fresh_type and question_group(ex) in types):
                    continue
                picked.append(ex)
                images.add(ex.image_id)
                types.add(question_group(ex))
        return picked

    def samples(self, results: Mapping[str, Mapping[str, Any]], n: int) -> list[base.Sample]:
        """The image, the question, each model's answer and the reference answer (with its type)."""
        out = []
        for ex in self._sample_examples(n):
            lines = [f"Q: {ex.question}"]
            lines += [f"{label}: {r['outputs'].get(ex.question_id, '')}" for label, r in results.items()]
            kind = question_group(ex)
            lines.append(f"reference: {ex.answer}" + (f" ({kind})" if kind else ""))
            out.append(base.Sample(image=example_image(ex, self.preprocessor), lines=lines))
        return out
