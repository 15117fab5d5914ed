"""Image captioning on the shapes world: the caption LM loss, decoding, caption metrics, report rows.

The world (``config.data``, :mod:`vlpeft_jax.data.shapes`) has two caption styles: ``source`` (plain) and
``target`` (expressive). The run trains on ``config.train.domain`` captions, decodes the evaluation split
(``config.eval``: greedy or beam, KV cache) once, and scores the captions against each domain's references
(BLEU-4, METEOR, ROUGE-L, CIDEr-D, ...; :func:`vlpeft_jax.eval.captions.evaluate_captions`).

Example (a full run through the runner: it builds the shapes world and a pretrained base, trains and
decodes, too long for the doctests; the end-to-end tests in tests/experiments run it):
    >>> from vlpeft_jax.config import load_config_file
    >>> cfg = load_config_file("configs/shapes_lora.py:smoke")  # doctest: +SKIP
    >>> from vlpeft_jax.experiments import runner  # doctest: +SKIP
    >>> runner.run(cfg)["adapted"]["target"]["metrics"]["CIDEr-D"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlpeft_jax.data import shapes
from vlpeft_jax.data.batching import CaptionBatches, EvalBatches
from vlpeft_jax.data.images import ImagePreprocessor
from vlpeft_jax.errors import ConfigError
from vlpeft_jax.eval import decode
from vlpeft_jax.eval.captions import evaluate_captions
from vlpeft_jax.tasks import base

DOMAINS = ("source", "target")
REPORT_METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")
SELECTION_KEYS = ("num_batches", "batch_size", "domain", "seed")
BATCH_KEYS = ("pixel_values", "input_ids", "attention_mask", "labels")


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
        m["decoder"]["vocab_size"] = self.tokenizer.vocab_size
        return m

    def save_assets(self, run_dir: Path) -> None:
        self.tokenizer.save(Path(run_dir) / "tokenizer")

    def loss_fn(self, module: Any, methods: base.Methods, loss_weights: Mapping[str, float]) -> base.LossFn:
        """Mean next-token cross-entropy on the target tokens, plus the methods' recorded loss terms."""

        def loss_fn(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
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
        out: list[str] = [""] * len(examples)
        for b in batches:
            inputs = {"input_ids": jnp.asarray(b["input_ids"]), "pixel_values": jnp.asarray(b["pixel_values"])}
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

    def _batches(self, domain: str, batch_size: int, seed: int, fraction: float = 1.0) -> CaptionBatches:
        if domain not in DOMAINS:
            raise ConfigError(f"caption domain {domain!r}; valid: {', '.join(DOMAINS)}")
        examples = training_subset(self.world["train"].caption_examples(domain), fraction, batch_size)
        return CaptionBatches(examples, self.tokenizer, self.preprocessor, batch_size=batch_size,
                              max_length=self.cfg.train.max_length, seed=seed)

    def selection_batches(self, settings: Mapping[str, Any], seed: int) -> Iterable[dict[str, Any]]:
        """``num_batches`` batches of training-split captions in ``domain`` (default the training domain)."""
        base.check_settings("selection", settings, SELECTION_KEYS)
        domain = settings.get("domain") or self.cfg.train.domain
        batch_size = settings.get("batch_size") or self.cfg.train.batch_size
        batches = self._batches(domain, batch_size, seed)
        print(f"selection data: {settings['num_batches']} batches of {domain} captions")
        return ({k: jnp.asarray(b[k]) for k in BATCH_KEYS} for b in batches.iterate(0, settings["num_batches"]))

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
