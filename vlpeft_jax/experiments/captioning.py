"""The captioning experiment: pretrain (or reuse) a prefix VLM, adapt it with PEFT stages, evaluate, report.

This is what ``python run.py`` runs on its default config (``configs/shapes_lora.py``):

1. the shapes world (``vlpeft_jax.data.shapes``) is generated or read from its cache;
2. the base VLM pretrained on the *source* captions (``config.pretrain``, itself a run of this module
   with no base) is read from its cache, or trained and cached;
3. the run's stages (e.g. LoRA on the decoder) adapt the base to the *target* captions;
4. zero-shot (the base) and adapted models are decoded on both domains' evaluation split and scored;
5. a Markdown table, ``results.json`` and a bar plot are written to the run directory.

Example (a tiny run, a few seconds):
    >>> import tempfile
    >>> from vlpeft_jax.cli.config import load_config_file
    >>> cfg = load_config_file("configs/shapes_lora.py:smoke")  # doctest: +SKIP
    >>> cfg.run_dir = tempfile.mkdtemp()  # doctest: +SKIP
    >>> results = run(cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
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
from vlpeft_jax.models import layers, registry
from vlpeft_jax.peft import base as peft_base
from vlpeft_jax.peft.registry import build_methods
from vlpeft_jax.peft.selection import for_shapes
from vlpeft_jax.train import labels as labels_lib
from vlpeft_jax.train.loop import train
from vlpeft_jax.train.losses import causal_lm_loss
from vlpeft_jax.train.presets import check_stage_methods
from vlpeft_jax.train.stages import Stage

DOMAINS = ("source", "target")


# ------------------------------------------------------------------------------------------ run directory


def make_run_dir(cfg: ml_collections.ConfigDict) -> Path:
    """``cfg.run_dir`` if set, else ``runs/<name>-<timestamp>``; created, with ``config.json`` written."""
    run_dir = Path(cfg.run_dir) if cfg.get("run_dir") else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.to_json_best_effort(indent=2, sort_keys=True))
    return run_dir


def config_hash(*parts: Any) -> str:
    blob = json.dumps([p.to_dict() if isinstance(p, ml_collections.ConfigDict) else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------------ task


@dataclasses.dataclass(frozen=True)
class PeftApply:
    """A decoding step function: the model under the given PEFT methods (params ``{"base", "peft"}``)."""

    module: Any
    methods: tuple[tuple[str, Any], ...] = ()

    def __call__(self, params: Any, inputs: Any, attention_mask: jax.Array, cache: Any, decode: bool) -> Any:
        inner = decode_module_apply(self.module)
        active = [(m, params["peft"][n]) for n, m in self.methods]
        return peft_base.apply_with(inner, active, params["base"], inputs, attention_mask, cache, decode)

    def init_cache(self, batch: int, max_len: int) -> Any:
        return decode_module_apply(self.module).init_cache(batch, max_len)


def decode_module_apply(module: Any) -> decode.ModuleApply:
    """``decode.ModuleApply(module)``; a function since ``PeftApply.__call__``'s ``decode`` flag shadows the module."""
    return decode.ModuleApply(module)


def caption_loss(module: Any, methods: Sequence[tuple[str, Any]]) -> Any:
    """The caption LM loss under the active methods: mean next-token cross-entropy on target tokens."""

    def loss_fn(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
        active = [(m, params["peft"][n]) for n, m in methods]
        t = batch["input_ids"].shape[1]  # the head runs on the text positions only (visual tokens come first)
        out = peft_base.apply_with(module.apply, active, {"params": params["base"]}, batch["input_ids"],
                                   batch["attention_mask"], batch["pixel_values"], rng=rng, train=True,
                                   logits_to_keep=t)
        return causal_lm_loss(out.logits, batch["labels"])

    return loss_fn


# ------------------------------------------------------------------------------------------- pieces


def load_world(cfg: ml_collections.ConfigDict) -> shapes.ShapesWorld:
    data = cfg.data.to_dict()
    if data.pop("kind", "shapes") != "shapes":
        raise ConfigError("data.kind: only 'shapes' is wired into this experiment; real data loaders are in "
                          "vlpeft_jax.data (coco, vqa, hf_datasets, tfds)")
    cache = data.pop("cache_dir", None)
    fields = {f.name for f in dataclasses.fields(shapes.ShapesWorldConfig)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"data: unknown setting(s) {', '.join(unknown)}; valid: kind, cache_dir, "
                          f"{', '.join(sorted(fields))}")
    return shapes.load_or_generate(shapes.ShapesWorldConfig(**data), cache)


def model_config(cfg: ml_collections.ConfigDict, vocab_size: int) -> dict[str, Any]:
    m = cfg.model.to_dict()
    m["decoder"]["vocab_size"] = vocab_size
    return m


def preprocessor(cfg: ml_collections.ConfigDict) -> ImagePreprocessor:
    return ImagePreprocessor(size=cfg.model.vision.image_size, resample="bilinear")


def init_base(module: Any, inputs: Mapping[str, Any], seed: int) -> dict[str, Any]:
    return layers.unbox(jax.jit(module.init)(jax.random.key(seed), **inputs))["params"]


def stages_from_config(cfg: ml_collections.ConfigDict, prefix: str = "stages") -> list[Stage]:
    return [Stage.from_dict(s, f"{prefix}[{i}]") for i, s in enumerate(cfg.stages)]


def train_run(cfg: ml_collections.ConfigDict, run_dir: Path, module: Any, base_params: Any, tokenizer: Any,
              world: shapes.ShapesWorld, methods: dict[str, Any], peft_params: dict[str, Any],
              domain: str, stages: Sequence[Stage] | None = None,
              optimizer_wrappers: Mapping[str, Any] | None = None) -> tuple[Any, Any]:
    """Runs the stages (default: the config's) on ``domain`` captions; returns (final params, TrainResult)."""
    stages = list(stages) if stages is not None else stages_from_config(cfg)
    pre = preprocessor(cfg)
    examples = world["train"].caption_examples(domain)
    batches = CaptionBatches(examples, tokenizer, pre, batch_size=cfg.train.batch_size,
                             max_length=cfg.train.max_length, seed=cfg.seed)

    def data_factory(stage_index: int, start_step: int):
        offset = sum(s.steps for s in stages[:stage_index])
        for b in batches.iterate(offset + start_step, stages[stage_index].steps - start_step):
            yield {k: b[k] for k in ("pixel_values", "input_ids", "attention_mask", "labels")}

    def build_loss_fn(active: tuple[str, ...]):
        missing = [n for n in active if n not in methods]
        if missing:
            raise ConfigError(f"stage methods {missing} are not defined in config.peft "
                              f"(defined: {', '.join(methods) or 'none'})")
        return caption_loss(module, [(n, methods[n]) for n in active])

    params = {"base": base_params, "peft": peft_params}
    result = train(params, stages, data_factory, run_dir, build_loss_fn=build_loss_fn, seed=cfg.seed,
                   checkpoint_every=cfg.train.checkpoint_every, progress=cfg.train.progress,
                   optimizer_wrappers=optimizer_wrappers)
    return result.params, result


def generate_captions(module: Any, params: Any, methods: Sequence[tuple[str, Any]], tokenizer: Any,
                      examples: Sequence[Any], cfg: ml_collections.ConfigDict) -> dict[str, str]:
    """Greedy/beam captions for ``examples`` (by image id)."""
    step = PeftApply(module, tuple(methods))
    ev = cfg.eval
    batches = EvalBatches(examples, tokenizer, preprocessor(cfg), batch_size=ev.batch_size, max_prompt_length=2)
    eos, pad = tokenizer.token_to_id("<eos>"), tokenizer.token_to_id("<pad>")
    out: dict[str, str] = {}
    for b in batches:
        inputs = {"input_ids": jnp.asarray(b["input_ids"]), "pixel_values": jnp.asarray(b["pixel_values"])}
        gen = decode.generate(step, params, inputs, jnp.asarray(b["attention_mask"]),
                              max_new_tokens=ev.max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                              method=ev.method, num_beams=ev.num_beams, length_penalty=ev.length_penalty)
        seqs = np.asarray(gen.sequences)
        for row, idx in enumerate(b["example_index"]):
            if idx >= 0:
                text = tokenizer.decode(seqs[row].tolist(), skip_special_tokens=True).strip()
                out[examples[idx].image_id] = text or "<empty>"
    return out


def evaluate(module: Any, params: Any, methods: Sequence[tuple[str, Any]], tokenizer: Any,
             world: shapes.ShapesWorld, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Scores on each domain's references of the evaluation split; returns metrics and samples."""
    split = world[cfg.eval.split]
    n = cfg.eval.max_examples or len(split.scenes)
    results: dict[str, Any] = {}
    examples = split.caption_examples("source")[:n]
    captions = generate_captions(module, params, methods, tokenizer, examples, cfg)
    for domain in DOMAINS:
        refs = {ex.image_id: list(ex.captions) for ex in split.caption_examples(domain)[:n]}
        ev = evaluate_captions(refs, captions, metrics=list(cfg.eval.metrics))
        results[domain] = {"metrics": ev.scores, "unavailable": ev.unavailable}
    results["samples"] = [{"image_id": k, "caption": v} for k, v in list(captions.items())[:8]]
    results["captions"] = captions
    return results


# ---------------------------------------------------------------------------------- sparse selection

GPS_GROUP = "gps"
SELECTION_KEYS = ("num_batches", "batch_size", "domain", "seed")
GPS_KEYS = ("targets", "k", "budget", "selection", "neuron_fraction", "stages")


class SelectionScores:
    """``|∇W|`` of the base model's caption loss over a selection dataset, computed on first use.

    The selection dataset is ``config.selection.num_batches`` batches (of ``batch_size``, default the
    training batch size) of the *training split's* captions in ``domain`` (default the training domain),
    in an order seeded by ``seed`` (default the run's seed + 7, not the training order). The loss is the
    task loss: the thesis' GPS uses the supervised contrastive loss of Eq. 4.2 when examples carry class
    labels (seed 004 §4.3.1); captions do not, so ``selection.make_selection_loss``'s task-loss branch
    applies.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, module: Any, base: Any, tokenizer: Any,
                 world: shapes.ShapesWorld) -> None:
        settings = dict(cfg.get("selection") or {})
        unknown = sorted(set(settings) - set(SELECTION_KEYS))
        if unknown:
            raise ConfigError(f"selection: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(SELECTION_KEYS)}")
        self.num_batches = settings.get("num_batches", 8)
        self.batch_size = settings.get("batch_size") or cfg.train.batch_size
        self.domain = settings.get("domain") or cfg.train.domain
        self.seed = settings.get("seed", cfg.seed + 7)
        self.cfg, self.module, self.base, self.tokenizer, self.world = cfg, module, base, tokenizer, world
        self._cache: dict[tuple[str, ...], Any] = {}

    def __call__(self, targets: Sequence[str], who: str) -> Any:
        """The scores of the kernels ``targets`` matches; ``who`` names the method in errors."""
        from vlpeft_jax.peft import selection

        if not isinstance(self.num_batches, int) or self.num_batches < 1:
            raise ConfigError(f"{who}.selection='gradient' needs a selection dataset: selection.num_batches="
                              f"{self.num_batches!r}, must be an integer >= 1 (batches of training captions)")
        if self.domain not in DOMAINS:
            raise ConfigError(f"selection.domain={self.domain!r}; valid: {', '.join(DOMAINS)}")
        key = tuple(targets)
        if key not in self._cache:
            examples = self.world["train"].caption_examples(self.domain)
            batches = CaptionBatches(examples, self.tokenizer, preprocessor(self.cfg), batch_size=self.batch_size,
                                     max_length=self.cfg.train.max_length, seed=self.seed)
            task = caption_loss(self.module, [])

            def loss(base: Any, batch: Mapping[str, Any]) -> jax.Array:
                return task({"base": base, "peft": {}}, batch, jax.random.key(0))[0]

            data = ({k: jnp.asarray(b[k]) for k in ("pixel_values", "input_ids", "attention_mask", "labels")}
                    for b in batches.iterate(0, self.num_batches))
            print(f"{who}: gradient selection over {self.num_batches} batches of {self.domain} captions")
            self._cache[key] = selection.gradient_scores(loss, self.base, data, list(targets), name=who)
        return self._cache[key]


def build_gps(cfg: ml_collections.ConfigDict) -> tuple[Any, tuple[str, ...]] | None:
    """``(GPS, stage names)`` from ``config.gps``, or None when the config has no GPS section."""
    from vlpeft_jax.peft.gps import GPS

    settings = dict(cfg.get("gps") or {})
    if not settings:
        return None
    unknown = sorted(set(settings) - set(GPS_KEYS))
    if unknown:
        raise ConfigError(f"gps: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(GPS_KEYS)}")
    stages = settings.pop("stages", None)
    names = [s["name"] for s in cfg.stages]
    if not stages or any(s not in names for s in stages):
        raise ConfigError(f"gps.stages={stages!r}: name the stage(s) that train the GPS selection; stages: "
                          f"{', '.join(names)}")
    return GPS(name="gps", **settings), tuple(stages)


def gps_stages(cfg: ml_collections.ConfigDict, gps: tuple[Any, tuple[str, ...]] | None, base: Any,
               scores: SelectionScores, rng: jax.Array) -> tuple[list[Stage], dict[str, Any], dict[str, int]]:
    """The run's stages with GPS applied: ``(stages, optimizer wrappers, selected entries per stage)``.

    Each GPS stage trains the selected kernels (rules with group ``gps`` put before the stage's own) and
    its optimizer is wrapped by the masks (seed 004 Eq. 4.5-4.6; :mod:`vlpeft_jax.peft.gps`).
    """
    stages = stages_from_config(cfg)
    if gps is None:
        return stages, {}, {}
    method, names = gps
    extra = {"scores": scores(method.targets, "gps")} if method.selection == "gradient" else {}
    masks = method.masks(rng, base, **extra)
    rules = method.trainable_rules(masks)
    count = method.num_params(masks)
    print(f"gps: {count:,} selected entries ({method.selection}) in {len(rules)} kernels, trained in stage(s) "
          f"{', '.join(names)} through masked updates")
    out = [dataclasses.replace(s, trainable=(*rules, *s.trainable)) if s.name in names else s for s in stages]
    wrappers = {n: (lambda tx: method.optimizer(tx, masks)) for n in names}
    return out, wrappers, {n: count for n in names}


# -------------------------------------------------------------------------------------------- pretrain


def pretrained_base(cfg: ml_collections.ConfigDict, world: shapes.ShapesWorld, tokenizer: Any,
                    module: Any, inputs: Mapping[str, Any]) -> Any:
    """The base VLM trained on source captions by ``cfg.pretrain``: from its cache, or trained now.

    The pretrain config contributes its stages, train and seed settings; the model and data are this
    run's, so the base always fits. The cache key hashes all of them (not the data cache location).
    """
    from vlpeft_jax.cli.config import load_config_file

    pcfg = load_config_file(cfg.pretrain.config)
    # The base must fit this run: its model and data are this run's; the pretrain config gives the stages.
    pcfg.model = ml_collections.ConfigDict(cfg.model.to_dict())
    pcfg.data = ml_collections.ConfigDict(cfg.data.to_dict())
    data_key = {k: v for k, v in cfg.data.to_dict().items() if k != "cache_dir"}
    key = config_hash(pcfg.model, data_key, pcfg.stages, pcfg.train, pcfg.seed)
    cache = Path(cfg.pretrain.cache_dir) / f"{pcfg.name}-{key}"
    params_file = cache / "params.npz"
    abstract = jax.eval_shape(lambda: init_base(module, inputs, pcfg.seed))
    if params_file.is_file():
        print(f"reusing the pretrained base from {cache}")
        return load_params(params_file, abstract)
    print(f"pretraining the base ({pcfg.name}) into {cache}")
    base = init_base(module, inputs, pcfg.seed)
    params, _ = train_run(pcfg, cache / "run", module, base, tokenizer, world, {}, {}, domain=pcfg.train.domain)
    save_params(params_file, params["base"])
    return load_params(params_file, abstract)


def save_params(path: Path, params: Any) -> None:
    flat = {"/".join(str(getattr(k, "key", k)) for k in kp): np.asarray(v)
            for kp, v in jax.tree_util.tree_leaves_with_path(params)}
    tmp = path.with_suffix(".tmp.npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(tmp, **flat)
    tmp.replace(path)  # atomic: a half-written file never looks like a finished base


def load_params(path: Path, abstract: Any) -> Any:
    data = np.load(path)

    def leaf(kp: Any, a: Any) -> Any:
        name = "/".join(str(getattr(k, "key", k)) for k in kp)
        if name not in data or data[name].shape != a.shape:
            raise ConfigError(f"{path} does not match the model ({name}); delete it to pretrain again")
        return jnp.asarray(data[name], a.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


# ------------------------------------------------------------------------------------------------- run


def run(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The whole experiment; returns the results dict also written to ``results.json``."""
    t0 = time.time()
    run_dir = make_run_dir(cfg)
    print(f"run directory: {run_dir}")
    world = load_world(cfg)
    tokenizer = world.build_tokenizer()
    tokenizer.save(run_dir / "tokenizer")
    module, inputs = registry.build_model(model_config(cfg, tokenizer.vocab_size))
    if cfg.get("pretrain") and cfg.pretrain.get("config"):
        base = pretrained_base(cfg, world, tokenizer, module, inputs)
    else:
        base = init_base(module, inputs, cfg.seed)
    methods = build_methods(cfg.get("peft"))
    gps = build_gps(cfg)
    rng = jax.random.key(cfg.seed + 1)
    scores = SelectionScores(cfg, module, base, tokenizer, world)
    peft_params = {}
    for i, (n, m) in enumerate(methods.items()):
        extra = {"scores": scores(m.targets, n)} if getattr(m, "selection", None) == "gradient" else {}
        peft_params[n] = m.init(jax.random.fold_in(rng, i), base, **extra)
    stages, wrappers, gps_count = gps_stages(cfg, gps, base, scores, jax.random.fold_in(rng, len(methods)))
    # before any compilation: a stage may only train methods that are active in it (issue 5, bad input)
    check_stage_methods(stages, methods, {"base": base, "peft": peft_params})
    results: dict[str, Any] = {"name": cfg.name, "run_dir": str(run_dir)}
    active = tuple(dict.fromkeys(n for s in cfg.stages for n in s.get("methods", ())))
    if cfg.eval.zero_shot:
        print("evaluating zero-shot (the base model)")
        results["zero_shot"] = evaluate(module, {"base": base, "peft": {}}, [], tokenizer, world, cfg)
    params, train_result = train_run(cfg, run_dir, module, base, tokenizer, world, methods, peft_params,
                                      domain=cfg.train.domain, stages=stages, optimizer_wrappers=wrappers)
    save_final(run_dir, params, base)
    counts = parameter_counts(params, cfg, stages, gps_count)
    results["params"] = counts
    results["train"] = {"final_loss": train_result.history[-1]["loss"] if train_result.history else None,
                        "steps": sum(s.steps for s in stages)}
    print("evaluating the adapted model")
    results["adapted"] = evaluate(module, params, [(n, methods[n]) for n in active], tokenizer, world, cfg)
    results["wall_time_s"] = time.time() - t0
    write_report(run_dir, cfg, results)
    print(f"run directory: {run_dir}")
    return results


def training_key(cfg: ml_collections.ConfigDict) -> str:
    """A hash of everything in ``cfg`` that affects training: not its name, run directory or ``eval``
    section, nor method settings named ``eval_*`` (they only change evaluation, e.g. the prefix's
    ``eval_replacement`` of seed 002 Table 5). Two configs with the same key train identical parameters."""
    d = cfg.to_dict()
    for k in ("name", "run_dir", "eval"):
        d.pop(k, None)
    d["peft"] = {n: {k: v for k, v in m.items() if not k.startswith("eval_")} for n, m in (d.get("peft") or {}).items()}
    return config_hash(d)


def evaluate_trained(cfg: ml_collections.ConfigDict, trained_dir: Path) -> dict[str, Any]:
    """Like :func:`run`, but evaluates the final parameters of ``trained_dir`` (a finished run whose
    :func:`training_key` equals this config's) instead of training again; writes this run's report."""
    t0 = time.time()
    trained_dir = Path(trained_dir)
    run_dir = make_run_dir(cfg)
    print(f"run directory: {run_dir} (evaluating the parameters trained in {trained_dir})")
    module, params, tokenizer, methods = load_final(trained_dir, cfg)
    tokenizer.save(run_dir / "tokenizer")
    world = load_world(cfg)
    previous = json.loads((trained_dir / "results.json").read_text())
    results: dict[str, Any] = {"name": cfg.name, "run_dir": str(run_dir), "trained_in": str(trained_dir),
                               "params": previous["params"], "train": previous["train"]}
    active = tuple(dict.fromkeys(n for s in cfg.stages for n in s.get("methods", ())))
    results["adapted"] = evaluate(module, params, [(n, methods[n]) for n in active], tokenizer, world, cfg)
    results["wall_time_s"] = time.time() - t0
    write_report(run_dir, cfg, results)
    return results


def save_final(run_dir: Path, params: Any, base: Any) -> None:
    """Writes ``final/peft.npz`` and, only if training changed it, ``final/base.npz``."""
    final = run_dir / "final"
    save_params(final / "peft.npz", params["peft"])
    changed = any(not np.array_equal(np.asarray(a), np.asarray(b))
                  for a, b in zip(jax.tree_util.tree_leaves(params["base"]), jax.tree_util.tree_leaves(base),
                                  strict=True))
    if changed:
        save_params(final / "base.npz", params["base"])


def load_final(run_dir: Path, cfg: ml_collections.ConfigDict) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(module, params, tokenizer, methods) of a finished run directory, for ``run.py eval``."""
    from vlpeft_jax.data.tokenizer import WordTokenizer

    final = run_dir / "final"
    if not (final / "peft.npz").is_file():
        raise ConfigError(f"{run_dir} has no final parameters ({final / 'peft.npz'}); did the run finish?")
    tokenizer = WordTokenizer.load(run_dir / "tokenizer")
    module, inputs = registry.build_model(model_config(cfg, tokenizer.vocab_size))
    abstract = jax.eval_shape(lambda: init_base(module, inputs, cfg.seed))
    if (final / "base.npz").is_file():
        base = load_params(final / "base.npz", abstract)
    elif cfg.get("pretrain") and cfg.pretrain.get("config"):
        world = load_world(cfg)
        base = pretrained_base(cfg, world, tokenizer, module, inputs)
    else:
        raise ConfigError(f"{run_dir}: the base model was not saved and there is no pretrain config to rebuild it")
    methods = build_methods(cfg.get("peft"))
    # the saved indices are read back; only their shapes are needed, and those do not depend on the scores
    peft_abstract = {n: jax.eval_shape(for_shapes(m).init, jax.random.key(0), base) for n, m in methods.items()}
    peft = load_params(final / "peft.npz", peft_abstract) if methods else {}
    return module, {"base": base, "peft": peft}, tokenizer, methods


def parameter_counts(params: Any, cfg: ml_collections.ConfigDict, stages: Sequence[Stage] | None = None,
                     gps_count: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Total base parameters, and trainable parameters of the last stage (and their % of the base).

    A GPS stage trains only the selected entries of its kernels: ``gps_count`` maps such a stage to
    the number of those entries, which replaces the (dense) count of the kernels its rules label.
    """
    last = (list(stages) if stages is not None else stages_from_config(cfg))[-1]
    labels = labels_lib.make_labels(params, last.trainable)
    trainable = labels_lib.count_params(params, labels)["trainable"]
    if gps_count and last.name in gps_count:
        gps_rules = [r for r in last.trainable if r[1] == GPS_GROUP]
        dense = labels_lib.count_params(params, labels_lib.make_labels(params, gps_rules))["trainable"]
        trainable = trainable - dense + gps_count[last.name]
    total = peft_base.count(params["base"])
    return {"base_total": total, "trainable": trainable, "trainable_pct": 100.0 * trainable / total}


REPORT_METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")


def results_table(results: Mapping[str, Any], cfg: ml_collections.ConfigDict) -> str:
    metrics = [m for m in REPORT_METRICS if m in cfg.eval.metrics]
    head = "| model | domain | " + " | ".join(metrics) + " | trainable % |"
    lines = [head, "|" + "---|" * (len(metrics) + 3)]
    rows = [("zero-shot", results.get("zero_shot"), 0.0), (cfg.name, results.get("adapted"),
                                                          results["params"]["trainable_pct"])]
    for name, res, pct in rows:
        if not res:
            continue
        for domain in ("target", "source"):
            sc = res[domain]["metrics"]
            cells = [f"{100 * sc[m]:.1f}" if m in sc else "n/a" for m in metrics]
            lines.append(f"| {name} | {domain} | " + " | ".join(cells) + f" | {pct:.2f} |")
    return "\n".join(lines)


def write_report(run_dir: Path, cfg: ml_collections.ConfigDict, results: dict[str, Any]) -> None:
    table = results_table(results, cfg)
    unavailable = {k: v for r in (results.get("adapted") or {}, ) for d in DOMAINS
                   for k, v in r.get(d, {}).get("unavailable", {}).items()}
    text = [f"# {cfg.name}", "", "Scores x100 on the evaluation split "
            f"({cfg.eval.split}); target = expressive references, source = plain references.", "", table, ""]
    for k, v in unavailable.items():
        text.append(f"- {k} unavailable: {v}")
    text += ["", f"Trainable parameters: {results['params']['trainable']:,} of "
             f"{results['params']['base_total']:,} base ({results['params']['trainable_pct']:.2f}%).",
             f"Wall time: {results['wall_time_s']:.0f} s.", "", "Sample captions (adapted):", ""]
    text += [f"- `{s['image_id']}`: {s['caption']}" for s in results["adapted"]["samples"]]
    (run_dir / "report.md").write_text("\n".join(text) + "\n")
    slim = {k: v for k, v in results.items()}
    for key in ("zero_shot", "adapted"):
        if key in slim:
            slim[key] = {k: v for k, v in slim[key].items() if k != "captions"}
            (run_dir / f"captions_{key}.json").write_text(json.dumps(
                [{"image_id": i, "caption": c} for i, c in results[key]["captions"].items()], indent=1))
    (run_dir / "results.json").write_text(json.dumps(slim, indent=2, default=float))
    plot(run_dir, results, cfg)
    print(table)


def plot(run_dir: Path, results: Mapping[str, Any], cfg: ml_collections.ConfigDict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in REPORT_METRICS if m in results["adapted"]["target"]["metrics"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    for ax, domain in zip(axes, ("target", "source"), strict=True):
        x = np.arange(len(metrics))
        for j, (name, key) in enumerate((("zero-shot", "zero_shot"), (cfg.name, "adapted"))):
            if key in results:
                vals = [100 * results[key][domain]["metrics"][m] for m in metrics]
                ax.bar(x + 0.4 * j - 0.2, vals, width=0.4, label=name)
        ax.set_xticks(x, metrics)
        ax.set_title(f"{domain} references")
    axes[0].set_ylabel("score x100")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(run_dir / "scores.png", dpi=100)
    plt.close(fig)


def shrink_for_smoke(c: ml_collections.ConfigDict) -> None:
    """Shrinks a shapes config in place to a seconds-long run (tests, ``configs/X.py:smoke``)."""
    c.data.update(num_train=32, num_val=8, num_test=8, num_ood=8)
    c.model.vision.update(hidden_size=32, num_hidden_layers=1, intermediate_size=64)
    c.model.decoder.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    for s in c.stages:
        s["steps"] = 4
        s["optimizer"]["warmup_steps"] = 0
    c.train.batch_size = 8
    c.train.progress = False
    c.eval.update(max_examples=8, batch_size=8, max_new_tokens=8)
