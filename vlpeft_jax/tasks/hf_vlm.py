"""Captioning and VQA with a Hugging Face vision-language checkpoint (LLaVA, BLIP-2, InstructBLIP) on real data.

A config selects these tasks by naming a checkpoint directory in ``config.model.hf_dir`` (``task`` stays
``captioning`` or ``vqa``). Everything model-specific comes from that directory, none from code branches:
the weights (:func:`vlpeft_jax.hf.load_pretrained`), the tokenizer, the image preprocessing, the image
tokens and the prompt format (:class:`~vlpeft_jax.data.processors.VLMProcessor`). The data come from
``config.data`` (``kind = coco | vqa | hf | tfds``, :mod:`vlpeft_jax.data.sources`).

Config sections read here:

- ``model``: ``hf_dir`` (required), ``dtype`` (compute dtype, default ``float32``).
- ``prompt``: ``format`` (a preset of :data:`vlpeft_jax.data.prompts.PROMPT_FORMATS` or a dict; empty: the
  checkpoint's default — LLaVA's chat template when it has one, else ``llava-1.5``; ``blip2-vqa``;
  ``instructblip``), ``caption`` (the captioning instruction put in the format's ``{prompt}``; BLIP-2's
  captioning format ``blip2-caption`` has none). VQA puts the question in ``{prompt}``/``{question}``.
- ``train``: ``batch_size``, ``max_length`` (text tokens of prompt + target, *not* counting the image tokens,
  which are added), ``max_target_length`` (encoder-decoder LMs: target tokens, default ``max_length``).
- ``eval``: ``split``, ``max_examples``, ``batch_size``, ``method``, ``num_beams``, ``length_penalty``,
  ``max_new_tokens``, ``metrics`` (captioning).

The loss is the language model's next-token cross-entropy on the target tokens (decoder-only LMs: labels
shifted inside :func:`~vlpeft_jax.train.losses.causal_lm_loss`; encoder-decoder LMs: the decoder's logits
against ``labels`` as they are, :func:`~vlpeft_jax.train.losses.seq2seq_lm_loss`), plus the methods' recorded
loss terms. Captions are scored against the evaluation split's references (group = the split); VQA answers
with the VQA accuracy overall and per answer type (VQAv2's ``yes/no``, ``number``, ``other``).

Example (the end-to-end tests in tests/experiments/test_hf_vlm_runs.py run it on tiny checkpoints):
    >>> from vlpeft_jax.config import load_config_file
    >>> cfg = load_config_file("configs/llava_lora.py")  # doctest: +SKIP
    >>> cfg.model.hf_dir, cfg.data.root = "llava-1.5-7b-hf", "coco"  # doctest: +SKIP
    >>> from vlpeft_jax.experiments import runner  # doctest: +SKIP
    >>> runner.run(cfg)["adapted"]["val"]["metrics"]["CIDEr-D"]  # doctest: +SKIP
"""

from __future__ import annotations

import abc
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlpeft_jax.data import sources
from vlpeft_jax.data.batching import EpochSampler, example_image
from vlpeft_jax.data.processors import VLMProcessor
from vlpeft_jax.errors import ConfigError
from vlpeft_jax.eval import decode
from vlpeft_jax.eval.captions import evaluate_captions
from vlpeft_jax.tasks import base
from vlpeft_jax.tasks.vqa import score_answers

MODEL_KEYS = ("hf_dir", "dtype")
PROMPT_KEYS = ("format", "caption")
DTYPES = ("float32", "bfloat16", "float16")
CAPTION_METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")
VQA_METRICS = ("VQA accuracy", "exact match")
VQA_ANSWER_TYPES = ("yes/no", "number", "other")
SELECTION_KEYS = ("num_batches", "batch_size", "seed")
NOT_MODEL_INPUTS = ("labels", "side_inputs", "example_index")


def checkpoint_dir(cfg: ml_collections.ConfigDict) -> Path:
    """``config.model.hf_dir`` checked: a folder holding a LLaVA, BLIP-2 or InstructBLIP ``config.json``."""
    from vlpeft_jax.hf import VLM_MODEL_TYPES
    from vlpeft_jax.hf.io import load_config

    model = cfg.model.to_dict()
    base.check_settings("model", model, MODEL_KEYS)
    given = model.get("hf_dir") or ""
    if not given:
        raise ConfigError("model.hf_dir is empty: give the Hugging Face checkpoint folder, e.g. "
                          "--config.model.hf_dir=/models/llava-1.5-7b-hf")
    d = Path(given).expanduser()
    if not (d / "config.json").is_file():
        raise ConfigError(f"model.hf_dir={given!r}: no config.json there (a local checkpoint folder is needed; "
                          "nothing is downloaded)")
    model_type = load_config(d).get("model_type")
    if model_type not in VLM_MODEL_TYPES and model_type not in ("llava_next", "llava_next_video", "llava_onevision"):
        raise ConfigError(f"model.hf_dir={given!r} holds a {model_type!r} checkpoint; the captioning and VQA tasks "
                          f"need a vision-language one: {', '.join(VLM_MODEL_TYPES)}")
    if model.get("dtype", "float32") not in DTYPES:
        raise ConfigError(f"model.dtype={model['dtype']!r}; valid: {', '.join(DTYPES)}")
    return d


def compute_dtype(cfg: ml_collections.ConfigDict) -> str:
    """The checkpoint's compute dtype: ``config.precision`` when set to a low precision, else ``model.dtype``
    (parameters are float32 either way; :func:`vlpeft_jax.train.precision.compute_dtype`)."""
    from vlpeft_jax.train.precision import compute_dtype as resolve

    return resolve(cfg.get("precision"), cfg.model.get("dtype"))


def stop_token_ids(model_dir: Path, tokenizer: Any) -> list[int]:
    """The ids that end generation: ``generation_config.json``'s ``eos_token_id`` (an id or a list) when the
    checkpoint has one, else the tokenizer's EOS."""
    f = model_dir / "generation_config.json"
    if f.is_file():
        eos = json.loads(f.read_text()).get("eos_token_id")
        if eos is not None:
            return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    return [int(tokenizer.eos_token_id)]


class _Batches:
    """Training batches of ``(image, prompt text, target)`` items in a fixed order (:class:`base.Batches`)."""

    def __init__(self, task: HFVLMTask, examples: Sequence[Any], batch_size: int, seed: int) -> None:
        self.task, self.examples = task, examples
        self.sampler = EpochSampler(len(examples), batch_size, seed=seed)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        t = self.task
        items = [t.training_item(self.examples[i], step) for i in self.sampler.indices(step)]
        images, texts, targets = zip(*items, strict=True)
        return t.processor.training_batch(list(images), list(texts), list(targets), max_length=t.max_length,
                                          max_target_length=t.max_target_length)

    def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            yield self.batch(step)
            step += 1


class HFVLMTask(abc.ABC):
    """What captioning and VQA on a checkpoint share (see the module docstring)."""

    name = ""
    groups: tuple[str, ...] = ()

    def __init__(self, cfg: ml_collections.ConfigDict, *, check_data: bool = True, **_: Any) -> None:
        self.cfg = cfg
        self.model_dir = checkpoint_dir(cfg)
        prompt = (cfg.get("prompt") or ml_collections.ConfigDict()).to_dict()
        base.check_settings("prompt", prompt, PROMPT_KEYS)
        self.caption_prompt = prompt.get("caption") or None
        if check_data:  # (not when a finished run is only read back to generate)
            sources.check_data(cfg.data.to_dict(), self.name, dict.fromkeys(["train", cfg.eval.split]))
        self.processor = VLMProcessor.from_pretrained(self.model_dir, prompt_format=prompt.get("format") or None)
        self.preprocessor = self.processor.image_preprocessor
        self.tokenizer = self.processor.tokenizer
        self.stop_ids = stop_token_ids(self.model_dir, self.tokenizer)
        text = int(cfg.train.max_length)
        self.max_length = text + self.processor.num_image_tokens
        self.max_target_length = int(cfg.train.get("max_target_length") or text)
        self._examples: dict[str, list[Any]] = {}

    # ---------------------------------------------------------------------------- model and data
    def load_model(self) -> tuple[Any, Any]:
        """``(module, params)`` of the checkpoint (its own key map; nothing is downloaded)."""
        from vlpeft_jax.hf import load_pretrained
        from vlpeft_jax.models.registry import DTYPES as JNP_DTYPES

        print(f"loading {self.model_dir}")
        return load_pretrained(self.model_dir, dtype=JNP_DTYPES[compute_dtype(self.cfg)])

    def abstract_model(self) -> tuple[Any, Any]:
        """``(module, parameter shapes)`` from the checkpoint's config alone (``run.py params``)."""
        from vlpeft_jax.hf import abstract_pretrained
        from vlpeft_jax.models.registry import DTYPES as JNP_DTYPES

        return abstract_pretrained(self.model_dir, dtype=JNP_DTYPES[compute_dtype(self.cfg)])

    def examples(self, split: str) -> list[Any]:
        """The examples of ``data.splits[split]`` (loaded once; images decoded per batch with ``images=lazy``)."""
        if split not in self._examples:
            ds = sources.load_split(self.cfg.data.to_dict(), split, self.name)
            if not len(ds):
                raise ConfigError(f"data.splits.{split}: no usable examples ({ds.report.summary()})")
            print(f"{split} data: {ds.report.summary()}")
            self._examples[split] = list(ds)
        return self._examples[split]

    def eval_examples(self) -> list[Any]:
        examples = self.examples(self.cfg.eval.split)
        return examples[:base.eval_count(self.cfg, len(examples))]

    @staticmethod
    def image_of(example: Any) -> Any:
        return example.image if example.image is not None else example.image_path

    def shared_data(self) -> dict[str, Any]:
        return {}

    def save_assets(self, run_dir: Any) -> None:
        """``checkpoint.json``: the checkpoint folder the run adapts (it holds the tokenizer and processor; the
        run refers to it rather than copying it) and the prompt format and image tokens the run used."""
        from vlpeft_jax.files import write_json
        from vlpeft_jax.hf.io import load_config

        p = self.processor
        write_json(Path(run_dir) / "checkpoint.json", {
            "hf_dir": str(self.model_dir.resolve()), "model_type": load_config(self.model_dir).get("model_type"),
            "prompt_format": p.prompt_format.to_config(), "image_token": p.image_token,
            "num_image_tokens": p.num_image_tokens, "encoder_decoder": p.encoder_decoder})

    def model_config(self) -> dict[str, Any]:
        return {"hf_dir": str(self.model_dir)}

    # ---------------------------------------------------------------------------------- training
    @abc.abstractmethod
    def prompt_text(self, example: Any) -> str | None:
        """The user text of an example (the caption instruction, the question)."""

    @abc.abstractmethod
    def target(self, example: Any, step: int) -> str:
        """The training target of an example at a step."""

    def training_item(self, example: Any, step: int) -> tuple[Any, str | None, str]:
        return self.image_of(example), self.prompt_text(example), self.target(example, step)

    def train_batches(self, seed: int) -> base.Batches:
        return _Batches(self, self.examples("train"), int(self.cfg.train.batch_size), seed)

    def selection_batches(self, settings: Mapping[str, Any], seed: int) -> Iterable[dict[str, Any]]:
        """``num_batches`` training batches (``batch_size``, default the training batch size)."""
        base.check_settings("selection", settings, SELECTION_KEYS)
        batches = _Batches(self, self.examples("train"), int(settings.get("batch_size") or self.cfg.train.batch_size),
                           seed)
        print(f"selection data: {settings['num_batches']} training batches")
        return (model_batch(b) for b in batches.iterate(0, settings["num_batches"]))

    def loss_fn(self, module: Any, methods: base.Methods, loss_weights: Mapping[str, float]) -> base.LossFn:
        """Cross-entropy on the target tokens (see the module docstring), plus the methods' loss terms."""
        encoder_decoder = bool(getattr(module, "is_encoder_decoder", False))

        def loss_fn(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
            inputs = {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}
            return base.lm_loss(module, methods, params, inputs, batch["labels"], rng, loss_weights,
                                encoder_decoder=encoder_decoder, side_inputs=batch.get("side_inputs"))

        return loss_fn

    # -------------------------------------------------------------------------------- generation
    def generate(self, module: Any, params: Any, methods: base.Methods, images: Sequence[Any],
                 texts: Sequence[str | None]) -> list[dict[str, Any]]:
        """``{"text", "token_ids"}`` per prompt (``config.eval`` decoding; the new tokens only)."""
        return generate_texts(self.processor, module, params, methods, images, texts, self.cfg.eval.to_dict(),
                              self.stop_ids)

    def outputs_of(self, module: Any, params: Any, methods: base.Methods, examples: Sequence[Any],
                   topics: list[np.ndarray] | None = None) -> list[str]:
        out = generate_texts(self.processor, module, params, methods, [self.image_of(e) for e in examples],
                             [self.prompt_text(e) for e in examples], self.cfg.eval.to_dict(), self.stop_ids, topics)
        return [o["text"] for o in out]


def task_for_inference(cfg: ml_collections.ConfigDict) -> HFVLMTask:
    """The task of a run's config without checking its data (``run.py generate`` on a run directory)."""
    from vlpeft_jax import tasks

    return tasks.task_class(cfg.get("task", "captioning"), cfg)(cfg, check_data=False)


def model_batch(batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in batch.items()}


def generate_texts(processor: VLMProcessor, module: Any, params: Any, methods: base.Methods, images: Sequence[Any],
                   texts: Sequence[str | None], settings: Mapping[str, Any], stop_ids: Sequence[int],
                   topics: list[np.ndarray] | None = None) -> list[dict[str, Any]]:
    """Decodes every prompt (with its image or images) in batches of ``settings["batch_size"]``.

    Every batch is padded to the same rows and prompt length (the longest prompt; InstructBLIP's Q-Former text
    to the longest Q-Former text), so decoding compiles once. transformers pads each batch to its own longest
    row instead; where the Q-Former's positions see that padding, outputs of a batch of prompts of different
    lengths can differ from transformers' on the same batch (equal for prompts of one length, e.g.
    ``run.py generate``).
    ``settings``: ``batch_size``, ``method``, ``num_beams``, ``length_penalty``, ``max_new_tokens``.
    Returns ``[{"text": ..., "token_ids": [...]}]`` (new tokens only, up to the first stop token). ``topics``: a
    list that receives, when a method records topics (KLAFT's TCM) on a decoder-only LM, each output's
    posterior-argmax topic per emitted token (stop tokens excluded), for r_TCM.
    """
    from vlpeft_jax.eval import rtcm

    track = (topics is not None and not getattr(module, "is_encoder_decoder", False)
             and any(getattr(m, "records_topics", False) for _, m in methods))
    if len(images) != len(texts):
        raise ConfigError(f"got {len(images)} images for {len(texts)} prompts")
    if not texts:
        return []
    tok = processor.tokenizer
    # every check (image-token counts, prompt lengths) runs here, before anything is compiled
    length = max(processor.prompt_length(t, len(im) if isinstance(im, (list, tuple)) else 1, i)
                 for i, (t, im) in enumerate(zip(texts, images, strict=True)))
    counts = [len(im) if isinstance(im, (list, tuple)) else 1 for im in images]
    qformer = max(processor.qformer_length(t, n) for t, n in zip(texts, counts, strict=True)) or None
    bs = min(int(settings.get("batch_size", 8)), len(texts))
    step = base.PeftApply(module, tuple(methods))
    pad = processor.pad_token_id
    out: list[dict[str, Any]] = []
    for start in range(0, len(texts), bs):
        rows = list(range(start, min(start + bs, len(texts))))
        rows += [rows[-1]] * (bs - len(rows))  # a short last batch repeats its last row (one compilation)
        x = processor.generation_inputs([images[i] for i in rows], [texts[i] for i in rows], max_length=length,
                                        qformer_max_length=qformer)
        mask = jnp.asarray(x.pop("attention_mask"))
        gen = decode.generate(step, params, model_batch(x), mask, max_new_tokens=int(settings["max_new_tokens"]),
                              eos_token_id=list(stop_ids), pad_token_id=pad, method=settings.get("method", "greedy"),
                              num_beams=int(settings.get("num_beams", 1)),
                              length_penalty=float(settings.get("length_penalty", 1.0)))
        seqs, lengths = np.asarray(gen.sequences), np.asarray(gen.lengths)
        z = rtcm.caption_topics(module, params, methods, model_batch(x), mask, gen.sequences, gen.lengths,
                                list(stop_ids)) if track else None
        for r in range(min(bs, len(texts) - start)):
            if z is not None:
                topics.append(z["posterior"][r][z["mask"][r]])
            ids = [int(t) for t in seqs[r, :lengths[r]]]
            while ids and ids[-1] in stop_ids:
                ids.pop()
            out.append({"text": tok.decode(ids, skip_special_tokens=True).strip(), "token_ids": ids})
    return out


class HFCaptioningTask(HFVLMTask):
    """Captioning on a checkpoint (module docstring): trains on every reference caption in turn."""

    name = "captioning"
    group_label = "split"
    group_note = "captions of the evaluation split, scored against its reference captions."
    report_metrics = CAPTION_METRICS
    primary_metric = "CIDEr-D"

    def __init__(self, cfg: ml_collections.ConfigDict, **shared: Any) -> None:
        super().__init__(cfg, **shared)
        self.groups = self.groups_for(cfg)
        self.report_metrics = self.metrics_for(cfg)

    @classmethod
    def groups_for(cls, cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
        return (str(cfg.eval.split),)

    @classmethod
    def metrics_for(cls, cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
        """The caption metrics, and r_TCM with a method that records topics (KLAFT's TCM)."""
        from vlpeft_jax.peft.registry import build_methods

        methods = build_methods(cfg.get("peft"))
        return cls.report_metrics + (("r_TCM",) if any(m.records_topics for m in methods.values()) else ())

    def prompt_text(self, example: Any) -> str | None:
        return self.caption_prompt

    def target(self, example: Any, step: int) -> str:
        caps = example.captions
        return caps[step % len(caps)]

    def evaluate(self, module: Any, params: Any, methods: base.Methods) -> dict[str, Any]:
        from vlpeft_jax.tasks.captioning import r_tcm_of

        examples = self.eval_examples()
        topics: list[np.ndarray] = []
        texts = self.outputs_of(module, params, methods, examples, topics)
        captions = {ex.image_id: text or "<empty>" for ex, text in zip(examples, texts, strict=True)}
        refs = {ex.image_id: list(ex.captions) for ex in examples}
        metrics = list(self.cfg.eval.get("metrics") or CAPTION_METRICS)
        ev = evaluate_captions(refs, captions, metrics=metrics)
        scores = dict(ev.scores)
        if any(len(z) for z in topics):  # KLAFT's r_TCM (seed 000 Eq. 10) of the generated captions
            scores["r_TCM"] = r_tcm_of(topics)
        split = self.groups[0]
        return {split: {"metrics": scores, "unavailable": ev.unavailable},
                "samples": [{"id": k, "output": v} for k, v in list(captions.items())[:8]], "outputs": captions}

    def outputs_file(self, outputs: Mapping[str, str]) -> tuple[str, list[dict[str, Any]]]:
        """``captions_<model>.json`` in COCO results format."""
        return "captions", [{"image_id": int(i) if str(i).isdigit() else i, "caption": c} for i, c in outputs.items()]

    def samples(self, results: Mapping[str, Mapping[str, Any]], n: int) -> list[base.Sample]:
        out = []
        for ex in self.eval_examples()[:n]:
            lines = [f"{label}: {r['outputs'].get(ex.image_id, '')}" for label, r in results.items()]
            out.append(base.Sample(image=example_image(ex, self.preprocessor), lines=[*lines,
                                                                                      f"reference: {ex.captions[0]}"]))
        return out


class HFVQATask(HFVLMTask):
    """Open-ended VQA on a checkpoint (module docstring): trains on each question's most frequent answer."""

    name = "vqa"
    group_label = "questions"
    group_note = "all questions, and those of each VQAv2 answer type."
    report_metrics = VQA_METRICS
    primary_metric = "VQA accuracy"

    def __init__(self, cfg: ml_collections.ConfigDict, **shared: Any) -> None:
        super().__init__(cfg, **shared)
        self.groups = self.groups_for(cfg)

    @classmethod
    def groups_for(cls, cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
        split = (cfg.data.get("splits") or {}).get(cfg.eval.split) or {}
        typed = cfg.data.get("kind") == "vqa" and bool(split.get("annotations"))
        return ("all", *VQA_ANSWER_TYPES) if typed else ("all",)

    def prompt_text(self, example: Any) -> str | None:
        return example.question

    def target(self, example: Any, step: int) -> str:
        return example.answer

    def evaluate(self, module: Any, params: Any, methods: base.Methods) -> dict[str, Any]:
        examples = self.eval_examples()
        answers = dict(zip((ex.question_id for ex in examples), self.outputs_of(module, params, methods, examples),
                           strict=True))
        results: dict[str, Any] = score_answers(examples, answers, self.groups)
        results["samples"] = [{"id": ex.question_id, "output": f"Q: {ex.question} A: {answers[ex.question_id]}",
                               "answer": answers[ex.question_id], "reference": ex.answer} for ex in examples[:8]]
        results["outputs"] = answers
        return results

    def outputs_file(self, outputs: Mapping[str, str]) -> tuple[str, list[dict[str, Any]]]:
        """``answers_<model>.json`` in the VQA results format."""
        return "answers", [{"question_id": int(q) if str(q).isdigit() else q, "answer": a} for q, a in outputs.items()]

    def samples(self, results: Mapping[str, Mapping[str, Any]], n: int) -> list[base.Sample]:
        out = []
        for ex in self.eval_examples()[:n]:
            lines = [f"Q: {ex.question}", *(f"{label}: {r['outputs'].get(ex.question_id, '')}"
                                            for label, r in results.items()), f"reference: {ex.answer}"]
            out.append(base.Sample(image=example_image(ex, self.preprocessor), lines=lines))
        return out
