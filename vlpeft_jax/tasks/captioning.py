"""Image captioning on the shapes world: the caption LM loss, decoding, caption metrics, report rows.

The world (``config.data``, :mod:`vlpeft_jax.data.shapes`) has two caption styles: ``source`` (plain) and
``target`` (expressive). The run trains on ``config.train.domain`` captions, decodes the evaluation split
(``config.eval``: greedy or beam, KV cache) once, and scores the captions against each domain's references
(BLEU-4, METEOR, ROUGE-L, CIDEr-D, ...; :func:`vlpeft_jax.eval.captions.evaluate_captions`).

With an InstructBLIP-like model (``model.family="qformer_vlm"`` whose Q-Former reads text), every training,
selection and generation batch also carries the Q-Former's instruction text, ``qformer_input_ids`` /
``qformer_attention_mask`` (shapes tokenizer, ``<bos> text <eos>``, right-padded to
``model.qformer_max_length``, default 64), given to the model with the image (the prefill only; decoding steps
run the LM alone). ``model.qformer_text`` chooses that text (:func:`qformer_texts`):

- ``"task"`` (default): the task instruction, ``"A photo of"`` for captions and ``"Question: {q} Short
  answer:"`` for questions — standard InstructBLIP, what PETAL's baselines get (spec A29);
- ``"instructions"``: the world's three original instructions of the task (``caption_instructions`` /
  ``vqa_instructions``) joined with ``"\n"`` into one paragraph — PETAL's Q-Former input (seed 001 §3.3,
  Table 7; spec §3.2, A13, A14);
- ``"instructions+task"``: that paragraph, then the task line (spec A15's option).

The LM's own text is unchanged (no prompt for captions, the task instruction for questions).

Example (a full run through the runner: it builds the shapes world and a pretrained base, trains and
decodes, too long for the doctests; the end-to-end tests in tests/experiments run it):
    >>> from vlpeft_jax.config import load_config_file
    >>> cfg = load_config_file("configs/shapes_lora.py:smoke")  # doctest: +SKIP
    >>> from vlpeft_jax.experiments import runner  # doctest: +SKIP
    >>> runner.run(cfg)["adapted"]["target"]["metrics"]["CIDEr-D"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlpeft_jax.data import shapes
from vlpeft_jax.data.batching import CaptionBatches, EvalBatches, VQAExample, build_text_sequences
from vlpeft_jax.data.images import ImagePreprocessor
from vlpeft_jax.errors import ConfigError
from vlpeft_jax.eval import decode
from vlpeft_jax.eval.captions import evaluate_captions
from vlpeft_jax.tasks import base

DOMAINS = ("source", "target")
TRAIN_DOMAINS = (*DOMAINS, "styled")  # "styled": both styles, each asked for by its own Q-Former instruction
REPORT_METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")
SELECTION_KEYS = ("num_batches", "batch_size", "domain", "seed")
BATCH_KEYS = ("pixel_values", "input_ids", "attention_mask", "labels")
QFORMER_KEYS = ("qformer_input_ids", "qformer_attention_mask")
QFORMER_TEXTS = ("task", "instructions", "instructions+task")
TASK_MODEL_KEYS = ("qformer_text", "qformer_max_length")
"""Settings under ``config.model`` that the task reads (what text the model is fed), not the model builder:
:meth:`ShapesLMTask.model_config` removes them; a pretrain keeps its own (they do not change the parameters)."""
DEFAULT_QFORMER_MAX_LENGTH = 64


def qformer_text_mode(cfg: ml_collections.ConfigDict) -> str | None:
    """``model.qformer_text`` checked (:data:`QFORMER_TEXTS`); None when the model reads no Q-Former text (not a
    ``qformer_vlm``, or its Q-Former has ``qformer_text_input=False``)."""
    m = cfg.model
    mode = m.get("qformer_text", "task")
    if mode not in QFORMER_TEXTS:
        raise ConfigError(f"model.qformer_text={mode!r}; valid: {', '.join(QFORMER_TEXTS)}")
    if m.get("family") != "qformer_vlm":
        for key in TASK_MODEL_KEYS:
            if key in m:
                raise ConfigError(f"model.{key} is for model.family='qformer_vlm' (the Q-Former's instruction "
                                  f"text); model.family is {m.get('family')!r}")
        return None
    if not (m.get("qformer") or {}).get("qformer_text_input", True):
        return None
    return str(mode)


def qformer_text(mode: str, example: Any, instructions: Any = None) -> str:
    """The Q-Former text of one example under ``mode`` (:data:`QFORMER_TEXTS`).

    ``instructions``: a :class:`~vlpeft_jax.data.shapes.ShapesWorldConfig` (its ``caption_instructions`` and
    ``vqa_instructions``), or None for the defaults. A :class:`VQAExample`, or a caption example carrying a
    question's prompt (a VQA question mixed into caption batches, ``meta["qtype"]`` set), is a VQA item; any
    other caption example a captioning item.

    Example:
        >>> ex = VQAExample("1", "im", "what color is the circle?", ("red",))
        >>> qformer_text("task", ex)
        'Question: what color is the circle? Short answer:'
        >>> qformer_text("instructions+task", ex).splitlines()[0::3]
        ['What objects are in the picture?', 'Question: what color is the circle? Short answer:']
    """
    caption_instr = shapes.CAPTION_INSTRUCTIONS if instructions is None else instructions.caption_instructions
    vqa_instr = shapes.VQA_INSTRUCTIONS if instructions is None else instructions.vqa_instructions
    if isinstance(example, VQAExample):
        task, lines = shapes.VQA_TASK_TEMPLATE.format(question=example.question), vqa_instr
    elif getattr(example, "prompt", None):
        task = example.prompt
        lines = vqa_instr if "qtype" in (example.meta or {}) else caption_instr
    else:
        task, lines = shapes.CAPTION_TASK_PROMPT, caption_instr
    task = (getattr(example, "meta", None) or {}).get("qformer_task", task)  # train.domain="styled"
    if mode == "task":
        return task
    paragraph = "\n".join(lines)
    if mode == "instructions":
        return paragraph
    if mode == "instructions+task":
        return paragraph + "\n" + task
    raise ConfigError(f"model.qformer_text={mode!r}; valid: {', '.join(QFORMER_TEXTS)}")


def qformer_texts(cfg: ml_collections.ConfigDict, world: shapes.ShapesWorld | None,
                  examples: Iterable[Any]) -> list[str]:
    """The Q-Former text of every example under ``cfg.model.qformer_text`` (default ``"task"``; see the module
    docstring), with the instructions of ``world`` (None: the default instructions).

    Example:
        >>> cfg = ml_collections.ConfigDict({"model": {"family": "qformer_vlm", "qformer_text": "instructions"}})
        >>> ex = shapes.generate(shapes.ShapesWorldConfig(num_train=1, num_val=1, num_test=1, num_ood=1))
        >>> print(qformer_texts(cfg, ex, ex["train"].caption_examples("source"))[0])
        What objects are in the picture?
        What are the characteristics of the objects in the picture?
        What is the relationship between the objects in the picture?
    """
    mode = cfg.model.get("qformer_text", "task")
    if mode not in QFORMER_TEXTS:
        raise ConfigError(f"model.qformer_text={mode!r}; valid: {', '.join(QFORMER_TEXTS)}")
    instructions = world.config if world is not None else None
    return [qformer_text(mode, ex, instructions) for ex in examples]


@dataclasses.dataclass
class QFormerInputs:
    """The Q-Former text arrays of a list of examples, tokenised once; rows picked by example index (-1, a
    padding row: ``<bos> <eos>``)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray

    @classmethod
    def build(cls, texts: list[str], tokenizer: Any, max_length: int) -> QFormerInputs:
        try:
            a = build_text_sequences([*texts, ""], tokenizer, max_length)
        except Exception as e:  # InputError: a text longer than the configured length
            raise ConfigError(f"model.qformer_max_length={max_length} is too short for the Q-Former text: {e}; "
                              "raise it (and model.qformer.max_position_embeddings with it)") from None
        return cls(a["input_ids"], a["attention_mask"])

    def rows(self, example_index: np.ndarray) -> dict[str, np.ndarray]:
        idx = np.where(np.asarray(example_index) >= 0, example_index, len(self.input_ids) - 1)
        return {"qformer_input_ids": self.input_ids[idx], "qformer_attention_mask": self.attention_mask[idx]}


@dataclasses.dataclass
class WithQFormerText:
    """Training batches (``CaptionBatches`` / ``VQABatches``) with each row's Q-Former text arrays."""

    batches: Any
    qformer: QFormerInputs

    def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        for b in self.batches.iterate(start_step, num_steps):
            yield {**b, **self.qformer.rows(b["example_index"])}


def load_world(cfg: ml_collections.ConfigDict) -> shapes.ShapesWorld:
    """The shapes world of ``config.data`` (generated, or read from ``data.cache_dir``)."""
    data = cfg.data.to_dict()
    if data.pop("kind", "shapes") != "shapes":
        raise ConfigError(f"data.kind={cfg.data.kind!r}: the shapes-world tasks read data.kind='shapes'; real data "
                          "(coco, vqa, hf, tfds) goes with a Hugging Face checkpoint in model.hf_dir")
    cache = data.pop("cache_dir", None)
    fields = {f.name for f in dataclasses.fields(shapes.ShapesWorldConfig)}
    base.check_settings("data", data, {"kind", "cache_dir", *fields})
    return shapes.load_or_generate(shapes.ShapesWorldConfig(**data), cache)


def preprocessor(cfg: ml_collections.ConfigDict) -> ImagePreprocessor:
    return ImagePreprocessor(size=cfg.model.vision.image_size, resample="bilinear")


class ShapesLMTask:
    """What the shapes-world LM tasks (captioning, VQA) share: the world, its tokenizer, the model config,
    the LM loss over ``BATCH_KEYS`` batches with the image as prefix."""

    def __init__(self, cfg: ml_collections.ConfigDict, world: shapes.ShapesWorld | None = None,
                 tokenizer: Any = None) -> None:
        self.cfg = cfg
        self._world = world
        self.tokenizer = tokenizer if tokenizer is not None else self.world.build_tokenizer()
        self.preprocessor = preprocessor(cfg)
        self.qformer_text = qformer_text_mode(cfg)  # None: the model reads no Q-Former text
        self.qformer_max_length = int(cfg.model.get("qformer_max_length", DEFAULT_QFORMER_MAX_LENGTH))
        if self.qformer_text is not None:
            positions = (cfg.model.get("qformer") or {}).get("max_position_embeddings", 512)
            if not 1 <= self.qformer_max_length <= positions:
                raise ConfigError(f"model.qformer_max_length={self.qformer_max_length}; must be in 1.."
                                  f"{positions} (model.qformer.max_position_embeddings)")

    @property
    def world(self) -> shapes.ShapesWorld:
        """The shapes world, loaded on first use (reading a run back for export needs only the tokenizer)."""
        if self._world is None:
            self._world = load_world(self.cfg)
        return self._world

    def shared_data(self) -> dict[str, Any]:
        return {"world": self.world, "tokenizer": self.tokenizer}

    def model_config(self) -> dict[str, Any]:
        m = self.cfg.model.to_dict()
        for key in TASK_MODEL_KEYS:
            m.pop(key, None)
        m["decoder"]["vocab_size"] = self.tokenizer.vocab_size
        if m.get("family") == "qformer_vlm" and m.get("qformer") is not None:
            m["qformer"]["vocab_size"] = self.tokenizer.vocab_size  # the Q-Former reads the same words
        return m

    def instructions(self) -> Any:
        """Where the Q-Former's original instructions come from: the world's config (None: the defaults)."""
        return self.world.config

    def qformer_inputs(self, examples: list[Any]) -> QFormerInputs | None:
        """The Q-Former text arrays of ``examples`` (None when the model reads no Q-Former text)."""
        if self.qformer_text is None:
            return None
        texts = [qformer_text(self.qformer_text, ex, self.instructions()) for ex in examples]
        return QFormerInputs.build(texts, self.tokenizer, self.qformer_max_length)

    def with_qformer_text(self, batches: Any) -> Any:
        """``batches`` (with ``examples`` and ``example_index``) plus the Q-Former text of each row, if any."""
        q = self.qformer_inputs(list(batches.examples))
        return batches if q is None else WithQFormerText(batches, q)

    def model_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """The model-input and label arrays of a training batch, on device (selection data)."""
        return {k: jnp.asarray(batch[k]) for k in (*BATCH_KEYS, *QFORMER_KEYS) if k in batch}

    def save_assets(self, run_dir: Path) -> None:
        self.tokenizer.save(Path(run_dir) / "tokenizer")

    def loss_fn(self, module: Any, methods: base.Methods, loss_weights: Mapping[str, float]) -> base.LossFn:
        """Mean next-token cross-entropy on the target tokens, plus the methods' recorded loss terms."""

        def loss_fn(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", *QFORMER_KEYS)
                      if k in batch}
            return base.lm_loss(module, methods, params, inputs, batch["labels"], rng, loss_weights,
                                side_inputs=batch.get("side_inputs"))

        return loss_fn

    def generate(self, module: Any, params: Any, methods: base.Methods, examples: list[Any],
                 prompts: Any = None, max_prompt_length: int = 2, topics: list[np.ndarray] | None = None
                 ) -> list[str]:
        """Greedy/beam outputs (``config.eval``) for ``examples``, in order. ``topics``: a list that receives,
        when a method records topics (KLAFT's TCM), each output's posterior-argmax topic per emitted token
        (EOS excluded), for r_TCM."""
        from vlpeft_jax.eval import rtcm

        track = topics is not None and any(getattr(m, "records_topics", False) for _, m in methods)
        from vlpeft_jax.peft.mam import DecodeStateApply

        ev = self.cfg.eval
        step = DecodeStateApply(module, tuple(methods))  # PeftApply that also carries a MAM top block's cache
        batches = EvalBatches(examples, self.tokenizer, self.preprocessor, batch_size=ev.batch_size,
                              max_prompt_length=max_prompt_length, prompt=prompts)
        eos, pad = self.tokenizer.token_to_id("<eos>"), self.tokenizer.token_to_id("<pad>")
        qformer = self.qformer_inputs(list(examples))
        out: list[str] = [""] * len(examples)
        for b in batches:
            inputs = {"input_ids": jnp.asarray(b["input_ids"]), "pixel_values": jnp.asarray(b["pixel_values"])}
            if qformer is not None:  # read at the prefill with the image; the decoding steps run the LM alone
                inputs.update({k: jnp.asarray(v) for k, v in qformer.rows(b["example_index"]).items()})
            gen = decode.generate(step, params, inputs, jnp.asarray(b["attention_mask"]),
                                  max_new_tokens=ev.max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                                  method=ev.method, num_beams=ev.num_beams, length_penalty=ev.length_penalty)
            seqs = np.asarray(gen.sequences)
            z = rtcm.caption_topics(module, params, methods, inputs, jnp.asarray(b["attention_mask"]),
                                    gen.sequences, gen.lengths, eos) if track else None
            for row, idx in enumerate(b["example_index"]):
                if idx >= 0:
                    out[idx] = self.tokenizer.decode(seqs[row].tolist(), skip_special_tokens=True).strip()
                    if z is not None:
                        topics.append(z["posterior"][row][z["mask"][row]])
        return out


TARGET_STYLE_INSTRUCTION = "where are the shapes in the image?"
"""The Q-Former task instruction of the target-style captions in ``train.domain="styled"`` (a base that follows
two caption instructions: :data:`~vlpeft_jax.data.shapes.CAPTION_TASK_PROMPT` for plain captions, this for the
expressive ones; words of the world's vocabulary, none of PETAL's Table 7 instructions)."""


def train_examples(split: shapes.ShapesSplit, domain: str) -> list[Any]:
    """The caption examples of ``split`` in ``domain`` (:data:`TRAIN_DOMAINS`). ``styled`` gives every image twice,
    once with its source references and once with its target references, the latter asking for them with
    :data:`TARGET_STYLE_INSTRUCTION` as the Q-Former's task text (``meta["qformer_task"]``): an instruction-following
    base (PETAL's, ``configs/shapes_qformer_pretrain.py:generalist``) that knows both styles.

    Example:
        >>> world = shapes.generate(shapes.ShapesWorldConfig(num_train=2, num_val=1, num_test=1, num_ood=1))
        >>> styled = train_examples(world["train"], "styled")
        >>> len(styled), styled[-1].meta["qformer_task"] == TARGET_STYLE_INSTRUCTION
        (4, True)
    """
    if domain != "styled":
        return split.caption_examples(domain)
    target = [dataclasses.replace(t, meta={**t.meta, "qformer_task": TARGET_STYLE_INSTRUCTION})
              for t in split.caption_examples("target")]
    return split.caption_examples("source") + target


def r_tcm_of(topics: list[np.ndarray]) -> float:
    """r_TCM (seed 000 Eq. 10): the mean over captions with at least one token of the fraction of tokens whose
    topic is not the residual one (0)."""
    from vlpeft_jax.eval.rtcm import r_tcm

    kept = [z for z in topics if len(z)]
    width = max(len(z) for z in kept)
    ids = np.zeros((len(kept), width), np.int64)
    for i, z in enumerate(kept):
        ids[i, :len(z)] = z
    return float(r_tcm(ids, lengths=np.array([len(z) for z in kept])))


def training_subset(examples: list[Any], fraction: float, batch_size: int) -> list[Any]:
    """``config.train.data_fraction`` of the training images (KLAFT's 0.1 % / 1 % / 100 % regimes, seed 000
    Table 2 S1-S3): a fixed subset (the world's first images: the world is already a random draw, so the
    subset does not depend on the run's seed and every seed of a fraction trains on the same images), at least
    one batch.

    Example:
        >>> len(training_subset(list(range(100)), 0.1, 4)), len(training_subset(list(range(100)), 0.01, 4))
        (10, 4)
    """
    if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ConfigError(f"train.data_fraction={fraction!r}; must be in (0, 1]")
    n = max(batch_size, round(len(examples) * fraction))
    return examples[:n]


class CaptioningTask(ShapesLMTask):
    """Captioning (see the module docstring)."""

    name = "captioning"
    groups = ("target", "source")
    group_label = "domain"
    group_note = "target = expressive references, source = plain references."
    report_metrics = REPORT_METRICS
    primary_metric = "CIDEr-D"

    def __init__(self, cfg: ml_collections.ConfigDict, world: shapes.ShapesWorld | None = None,
                 tokenizer: Any = None) -> None:
        super().__init__(cfg, world, tokenizer)
        self.report_metrics = self.metrics_for(cfg)

    @classmethod
    def groups_for(cls, cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
        return cls.groups

    @classmethod
    def metrics_for(cls, cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
        """The report's metrics: with a method that records topics (KLAFT's TCM), r_TCM beside the caption
        metrics."""
        from vlpeft_jax.peft.registry import build_methods

        methods = build_methods(cfg.get("peft"))
        return cls.report_metrics + (("r_TCM",) if any(m.records_topics for m in methods.values()) else ())

    def outputs_file(self, outputs: Mapping[str, str]) -> tuple[str, list[dict[str, str]]]:
        """``captions_<model>.json`` in COCO results format."""
        return "captions", [{"image_id": i, "caption": c} for i, c in outputs.items()]

    def train_batches(self, seed: int) -> base.Batches:
        return base.WithImageIds(self._batches(self.cfg.train.domain, self.cfg.train.batch_size, seed,
                                               self.cfg.train.get("data_fraction", 1.0)))

    def _batches(self, domain: str, batch_size: int, seed: int, fraction: float = 1.0) -> base.Batches:
        if domain not in TRAIN_DOMAINS:
            raise ConfigError(f"caption domain {domain!r}; valid: {', '.join(TRAIN_DOMAINS)}")
        examples = training_subset(train_examples(self.world["train"], domain), fraction, batch_size)
        return self.with_qformer_text(CaptionBatches(examples, self.tokenizer, self.preprocessor,
                                                     batch_size=batch_size, max_length=self.cfg.train.max_length,
                                                     seed=seed))

    def selection_batches(self, settings: Mapping[str, Any], seed: int) -> Iterable[dict[str, Any]]:
        """``num_batches`` batches of training-split captions in ``domain`` (default the training domain)."""
        base.check_settings("selection", settings, SELECTION_KEYS)
        domain = settings.get("domain") or self.cfg.train.domain
        batch_size = settings.get("batch_size") or self.cfg.train.batch_size
        batches = self._batches(domain, batch_size, seed)
        print(f"selection data: {settings['num_batches']} batches of {domain} captions")
        return (self.model_batch(b) for b in batches.iterate(0, settings["num_batches"]))

    def evaluate(self, module: Any, params: Any, methods: base.Methods) -> dict[str, Any]:
        """Captions of the evaluation split, scored against each domain's references."""
        split = self.world[self.cfg.eval.split]
        n = base.eval_count(self.cfg, len(split.scenes))
        examples = split.caption_examples("source")[:n]
        topics: list[np.ndarray] = []
        texts = self.generate(module, params, methods, examples, topics=topics)
        captions = {ex.image_id: text or "<empty>" for ex, text in zip(examples, texts, strict=True)}
        results: dict[str, Any] = {}
        for domain in DOMAINS:
            refs = {ex.image_id: list(ex.captions) for ex in split.caption_examples(domain)[:n]}
            ev = evaluate_captions(refs, captions, metrics=list(self.cfg.eval.metrics))
            results[domain] = {"metrics": ev.scores, "unavailable": ev.unavailable}
            if any(len(z) for z in topics):  # KLAFT's r_TCM (seed 000 Eq. 10) of the generated captions
                results[domain]["metrics"]["r_TCM"] = r_tcm_of(topics)
        results["samples"] = [{"id": k, "output": v} for k, v in list(captions.items())[:8]]
        results["outputs"] = captions
        return results

    def samples(self, results: Mapping[str, Mapping[str, Any]], n: int) -> list[base.Sample]:
        split = self.world[self.cfg.eval.split]
        out = []
        for i, ex in enumerate(split.caption_examples("target")[:n]):
            lines = [f"{label}: {r['outputs'].get(ex.image_id, '')}" for label, r in results.items()]
            out.append(base.Sample(image=split.images[i], lines=[*lines, f"reference: {ex.captions[0]}"]))
        return out
