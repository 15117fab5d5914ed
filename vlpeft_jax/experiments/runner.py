"""The one generic runner: config -> task -> model -> methods (init, ``prepare``) -> stages -> train -> evaluate
-> report. Every task and every method goes through it; it never checks a method's name or type (DESIGN §2.1).

1. the task (``config.task``, :func:`vlpeft_jax.tasks.build`) loads its data and sizes the model;
2. the base model is read from the pretrain cache (``config.pretrain``: a run of this module whose stages,
   train and seed settings come from another config, with this run's model and data), or trained and cached,
   or initialised;
3. each PEFT method of ``config.peft`` is prepared (:meth:`~vlpeft_jax.peft.base.Method.prepare`: gradient
   selection reads ``config.selection`` batches of the task's training data);
4. the stages (``config.stages``) get the active methods' extra rules and optimizer wrappers, and train;
5. zero-shot (the base) and adapted models are evaluated by the task; ``report.md``, ``results.json``,
   ``scores.png`` and ``samples.png`` go to the run directory.

Parameters on disk use the checkpoint format (orbax, :func:`vlpeft_jax.train.checkpoint.save_tree`):
``final/peft`` (and ``final/base`` when training changed the base), the pretrain cache's ``params``.

Example (a tiny run, still too long for the doctests: it builds the shapes world and a pretrained base
before training; the end-to-end tests in tests/experiments run it):
    >>> import tempfile
    >>> from vlpeft_jax.config import load_config_file, validate
    >>> cfg = load_config_file("configs/shapes_lora.py:smoke")  # doctest: +SKIP
    >>> cfg.run_dir = tempfile.mkdtemp()  # doctest: +SKIP
    >>> results = run(cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from vlpeft_jax import files, tasks
from vlpeft_jax.config import load_config_file, validate
from vlpeft_jax.errors import CheckpointError, ConfigError
from vlpeft_jax.experiments import multitask
from vlpeft_jax.experiments.report import write_report
from vlpeft_jax.models import layers, registry
from vlpeft_jax.peft import base as peft_base
from vlpeft_jax.peft import selection
from vlpeft_jax.peft.registry import build_methods
from vlpeft_jax.train import checkpoint
from vlpeft_jax.train import labels as labels_lib
from vlpeft_jax.train import precision as precision_lib
from vlpeft_jax.train.loop import train
from vlpeft_jax.train.presets import check_stage_methods
from vlpeft_jax.train.stages import Stage

SELECTION_DEFAULTS = {"num_batches": 8}


# ------------------------------------------------------------------------------------------ run directory


def resolve_run_dir(cfg: ml_collections.ConfigDict) -> Path:
    """``cfg.run_dir`` if set, else ``runs/<name>-<timestamp>`` (nothing is created)."""
    return Path(cfg.run_dir) if cfg.get("run_dir") else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def json_config(cfg: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    """A config as JSON stores it (tuples become lists, other objects strings), for comparing and recording."""
    d = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> values; lists of mappings (the stages) are entered by index."""
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    if isinstance(d, list) and d and all(isinstance(x, Mapping) for x in d):
        out = {}
        for i, v in enumerate(d):
            out.update(_flat(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: d}


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any], ignore: Sequence[str] = ("run_dir",)
                       ) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old, new)}`` where two JSON configs differ (``<missing>`` for absent keys), except the
    dotted keys in ``ignore`` and everything under them.

    Example:
        >>> config_differences({"train": {"batch_size": 8}, "run_dir": "a"}, {"train": {"batch_size": 4}})
        {'train.batch_size': (8, 4)}
    """
    missing = "<missing>"
    a, b = _flat(old), _flat(new)

    def ignored(k: str) -> bool:
        return any(k == i or k.startswith(i + ".") for i in ignore)

    return {k: (a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
            if not ignored(k) and a.get(k, missing) != b.get(k, missing)}


def is_finished(run_dir: Path) -> bool:
    """A run directory whose results are written (``results.json`` is written last, atomically)."""
    return (run_dir / "results.json").is_file()


def check_run_dir(run_dir: Path, cfg: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """Checks ``run_dir`` before anything is written: a directory we can write, and, if it holds a run, the same
    config. Returns that run's results when it is finished (it is never rewritten), else None (new or resumable).

    Raises:
      ConfigError: ``run_dir`` is a file or not writable; or it holds a run with another config (the message
        names the differing keys); or a finished run whose only differences are evaluation settings (use
        ``run.py eval --run``, which writes a new evaluation beside it).
    """
    files.check_writable_dir(run_dir, "run_dir")
    stored_file = run_dir / "config.json"
    if not stored_file.exists():
        if (run_dir / "checkpoints").exists() or (run_dir / "final").exists():
            raise ConfigError(f"run_dir {run_dir} holds checkpoints or parameters but no config.json, so it cannot "
                              f"be checked against this config; use a new run_dir")
        return None
    stored = files.read_json(stored_file, what="run config",
                             hint="the run directory is damaged; use a new run_dir")
    diff = config_differences(stored, json_config(cfg))
    finished = is_finished(run_dir)
    if diff:
        shown = "; ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in list(diff.items())[:8])
        more = f" (and {len(diff) - 8} more)" if len(diff) > 8 else ""
        if finished and all(k.startswith("eval.") or k == "name" for k in diff):
            raise ConfigError(f"run_dir {run_dir} holds a finished run evaluated with other settings ({shown}); it "
                              f"is not rewritten: evaluate it with `run.py eval --run {run_dir}` (which writes a new "
                              f"evaluation beside it) or use a new run_dir")
        raise ConfigError(f"run_dir {run_dir} holds a run with a different config ({shown}{more}); nothing was "
                          f"changed; use a new run_dir or the same config")
    if finished:
        return files.read_json(run_dir / "results.json", what="results",
                               hint="the run's results are damaged; use a new run_dir")
    return None


def write_run_config(run_dir: Path, cfg: ml_collections.ConfigDict) -> None:
    """``config.json`` (once: a resumed run keeps the one it started with, which is equal)."""
    if not (run_dir / "config.json").exists():
        files.write_text(run_dir / "config.json", cfg.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def config_hash(*parts: Any) -> str:
    blob = json.dumps([p.to_dict() if isinstance(p, ml_collections.ConfigDict) else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def training_key(cfg: ml_collections.ConfigDict) -> str:
    """A hash of everything in ``cfg`` that affects training: not its name, run directory or ``eval``
    section, nor method settings named ``eval_*`` (they only change evaluation, e.g. the prefix's
    ``eval_replacement`` of seed 002 Table 5). Two configs with the same key train identical parameters."""
    d = cfg.to_dict()
    for k in ("name", "run_dir", "eval"):
        d.pop(k, None)
    d["peft"] = {n: {k: v for k, v in m.items() if not k.startswith("eval_")} for n, m in (d.get("peft") or {}).items()}
    return config_hash(d)


# -------------------------------------------------------------------------------------------- the model


def init_base(module: Any, inputs: Mapping[str, Any], seed: int) -> dict[str, Any]:
    return layers.unbox(jax.jit(module.init)(jax.random.key(seed), **inputs))["params"]


@dataclasses.dataclass
class Setup:
    """What a run is built from: the task, the model and its base parameters, the PEFT methods."""

    cfg: ml_collections.ConfigDict
    task: Any
    module: Any
    inputs: Mapping[str, Any]
    base: Any
    methods: dict[str, Any]

    def active(self, names: Sequence[str] | None = None) -> list[tuple[str, Any]]:
        """``(name, method)`` of the methods active in the stages (all stages' methods, in order)."""
        names = names if names is not None else active_names(self.cfg)
        return [(n, self.methods[n]) for n in names]


def active_names(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The method instances some stage activates, in order of first use (what evaluation applies)."""
    return tuple(dict.fromkeys(n for s in cfg.stages for n in s.get("methods", ())))


def build(cfg: ml_collections.ConfigDict) -> Setup:
    """Task, model, base parameters (from the pretrain cache, or initialised) and methods."""
    task = tasks.build(cfg)
    if hasattr(task, "load_model"):  # a Hugging Face checkpoint: its weights are the base
        check_no_pretrain(cfg)
        module, base = task.load_model()
        return Setup(cfg, task, module, {}, base, build_methods(cfg.get("peft")))
    module, inputs = registry.build_model(model_config(cfg, task))
    if cfg.get("pretrain") and cfg.pretrain.get("config"):
        base = pretrained_base(cfg, task, module, inputs)
    else:
        base = init_base(module, inputs, cfg.seed)
    return Setup(cfg, task, module, inputs, base, build_methods(cfg.get("peft")))


def model_config(cfg: ml_collections.ConfigDict, task: Any) -> dict[str, Any]:
    """The task's model config in the run's compute dtype (``config.precision``, see
    :mod:`vlpeft_jax.train.precision`; parameters stay float32)."""
    return precision_lib.with_compute_dtype(task.model_config(), cfg.get("precision"))


def remat_policies(model_cfg: Any) -> set[str]:
    """Every ``remat`` setting other than ``"none"`` in a model config and its nested tower/decoder configs."""
    if not isinstance(model_cfg, Mapping):
        return set()
    found = {str(model_cfg["remat"])} - {"none"} if "remat" in model_cfg else set()
    return found.union(*(remat_policies(v) for v in model_cfg.values()))


def check_remat(setup: Setup) -> None:
    """A method whose hooks cannot run inside rematerialised layers (``remat_safe`` False) with ``model.remat``
    set is refused before any work, naming both."""
    policies = remat_policies(setup.cfg.model.to_dict() if setup.cfg.get("model") else {})
    unsafe = [n for n, m in setup.methods.items() if getattr(m, "remat_safe", True) is False]
    if policies and unsafe:
        raise ConfigError(f"method(s) {', '.join(unsafe)} cannot run inside rematerialised layers (model.remat="
                          f"{', '.join(sorted(policies))}); set model.remat='none' (or MAM's mam_layers='all')")


def check_no_pretrain(cfg: ml_collections.ConfigDict) -> None:
    if cfg.get("pretrain") and cfg.pretrain.get("config"):
        raise ConfigError(f"pretrain.config={cfg.pretrain.config!r} with model.hf_dir: a checkpoint's weights are "
                          "the base; leave pretrain.config empty")


def abstract_base(module: Any, inputs: Mapping[str, Any], seed: int = 0) -> Any:
    """The base parameters' shapes (``ShapeDtypeStruct`` leaves; nothing allocated)."""
    return jax.eval_shape(lambda: init_base(module, inputs, seed))


# ---------------------------------------------------------------------------- methods and their stages


class SelectionScores:
    """``|∇W|`` of the base model's task loss over the selection data (``config.selection``), computed on
    first use for each set of targets and shared by every method asking for them.

    The selection data are ``num_batches`` batches from :meth:`Task.selection_batches` (captioning: training
    captions of ``selection.domain``, default the training domain), ordered by ``selection.seed`` (default the
    run's seed + 7, not the training order). The loss is the task loss with no method active: the thesis' GPS
    uses the supervised contrastive loss of Eq. 4.2 when examples carry class labels (seed 004 §4.3.1);
    captions do not, so :func:`vlpeft_jax.peft.selection.make_selection_loss`'s task-loss branch applies.
    """

    def __init__(self, setup: Setup) -> None:
        settings = {**SELECTION_DEFAULTS, **dict(setup.cfg.get("selection") or {})}
        self.seed = settings.pop("seed", setup.cfg.seed + 7)
        self.settings, self.setup = settings, setup
        self._cache: dict[tuple[str, ...], Any] = {}

    def __call__(self, targets: Sequence[str], who: str) -> Any:
        n = self.settings["num_batches"]
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"{who}.selection='gradient' needs a selection dataset: selection.num_batches="
                              f"{n!r}, must be an integer >= 1 (batches of training data)")
        key = tuple(targets)
        if key not in self._cache:
            s = self.setup
            task_loss = s.task.loss_fn(s.module, [], {})

            def loss(base: Any, batch: Mapping[str, Any]) -> jax.Array:
                return task_loss({"base": base, "peft": {}}, batch, jax.random.key(0))[0]

            data = s.task.selection_batches(self.settings, self.seed)
            print(f"{who}: gradient selection")
            self._cache[key] = selection.gradient_scores(loss, s.base, data, list(targets), name=who)
        return self._cache[key]


def prepare_methods(setup: Setup, rng: jax.Array, *, abstract: bool = False) -> dict[str, Any]:
    """Every method's parameters through its ``prepare`` capability (shapes only when ``abstract``)."""
    context = peft_base.PrepareContext(gradient_scores=None if abstract else SelectionScores(setup),
                                       abstract=abstract)
    out = {}
    for i, (name, method) in enumerate(setup.methods.items()):
        key = jax.random.fold_in(rng, i)
        if abstract:  # the base is an argument, so the method sees tracers (arrays or ShapeDtypeStructs given)
            out[name] = jax.eval_shape(lambda k, b, m=method: m.prepare(k, b, context), key, setup.base)
        else:
            out[name] = method.prepare(key, setup.base, context)
    return out


def stages_from_config(cfg: ml_collections.ConfigDict) -> list[Stage]:
    return [Stage.from_dict(s, f"stages[{i}]") for i, s in enumerate(cfg.stages)]


def plan_stages(setup: Setup, peft_params: Mapping[str, Any]) -> tuple[list[Stage], dict[str, Any]]:
    """The config's stages with each active method's ``stage_rules`` in front of the stage's own rules, and
    ``{stage name: tx -> tx}`` chaining the active methods' ``optimizer_wrapper`` s (identity by default)."""
    stages, wrappers = [], {}
    scaled = precision_lib.loss_scaling(setup.cfg.get("precision"))
    for stage in stages_from_config(setup.cfg):
        undefined = [n for n in stage.methods if n not in setup.methods]
        if undefined:
            raise ConfigError(f"stage {stage.name!r} activates method(s) {', '.join(map(repr, undefined))} not "
                              f"defined in config.peft (defined: {', '.join(setup.methods) or 'none'})")
        active = [(setup.methods[n], peft_params[n]) for n in stage.methods]
        extra = [rule for m, p in active for rule in m.stage_rules(p)]
        stages.append(dataclasses.replace(stage, trainable=(*extra, *stage.trainable)) if extra else stage)

        def wrap(tx: Any, active: list = active) -> Any:
            for m, p in active:
                tx = m.optimizer_wrapper(tx, p)
            # float16: the loss scale is the outermost transformation (the train step reads it there)
            return precision_lib.dynamic_loss_scale(tx) if scaled else tx

        wrappers[stage.name] = wrap
    return stages, wrappers


def parameter_counts(params: Any, setup: Setup, stages: Sequence[Stage]) -> dict[str, Any]:
    """Total base parameters, and the trainable parameters of each stage (and their % of the base).

    A method with ``stage_rules`` (GPS) trains only part of the leaves those rules label: its ``num_params``
    replaces their dense count; a method's ``auxiliary_keys`` (training-only estimators) are not counted. Works on
    arrays and on abstract shapes.
    """
    total = peft_base.count(params["base"])
    out: dict[str, Any] = {}
    for stage in stages:
        labels = labels_lib.make_labels(params, stage.trainable) if stage.trainable else None
        counts = labels_lib.count_params(params, labels) if stage.trainable else {"trainable": 0}
        trainable = counts["trainable"]
        for name in stage.methods:
            method, p = setup.methods[name], params["peft"][name]
            for key in method.auxiliary_keys() if labels is not None else ():  # training-only (PETAL's IB estimators)
                if key in p:
                    aux = labels_lib.count_params(p[key], labels["peft"][name][key])
                    trainable -= aux["trainable"]
            rules = method.stage_rules(p)
            if rules:
                dense = labels_lib.count_params(params, labels_lib.make_labels(params, rules))["trainable"]
                trainable += method.num_params(p) - dense
        out[stage.name] = {**counts, "trainable": trainable, "trainable_pct": 100.0 * trainable / total}
    return {"base_total": total, "peft_total": peft_base.count(params["peft"]), "stages": out}


# -------------------------------------------------------------------------------------------- pretrain


def pretrained_base(cfg: ml_collections.ConfigDict, task: Any, module: Any, inputs: Mapping[str, Any]) -> Any:
    """The base trained by ``cfg.pretrain.config``: from its cache, or trained now (a run of this module).

    The pretrain config contributes its task, stages, train and seed settings; the model and data are this
    run's, so the base always fits. The model settings that choose the text a model is fed rather than its
    parameters (:data:`~vlpeft_jax.tasks.captioning.TASK_MODEL_KEYS`, e.g. ``model.qformer_text``) stay the
    pretrain config's own: an adaptation feeding the Q-Former PETAL's instructions reuses the base pretrained on
    the task instruction, as its baselines do. The cache key hashes all of them (not the data cache location).

    ``pretrain.keep`` (a list of ``/``-joined module paths, e.g. ``["vision_tower"]``) pretrains the pretrain
    config's *own* model instead (its own heads, say) and takes only those subtrees from it; the rest of this
    run's base is freshly initialised (``seed``). That is how a classifier gets a tower pretrained on other
    labels: the subtrees must have the same shapes in both models.
    """
    from vlpeft_jax.tasks.captioning import TASK_MODEL_KEYS

    keep = [str(k) for k in (cfg.pretrain.get("keep") or [])]
    pcfg = load_config_file(cfg.pretrain.config)
    own = pcfg.model.to_dict() if pcfg.get("model") else {}
    if not keep:
        pcfg.model = ml_collections.ConfigDict(cfg.model.to_dict())
        for key in TASK_MODEL_KEYS:
            if key in own:
                pcfg.model[key] = own[key]
            elif key in pcfg.model:
                del pcfg.model[key]
    pcfg.data = ml_collections.ConfigDict(cfg.data.to_dict())
    data_key = {k: v for k, v in cfg.data.to_dict().items() if k != "cache_dir"}
    parts = [pcfg.model, data_key, pcfg.stages, pcfg.train, pcfg.seed]
    if pcfg.get("task", "captioning") != "captioning":  # (captioning bases keep the keys they had)
        parts.append(pcfg.task)
    if keep:
        parts.append(pcfg.to_dict().get("heads"))
    cache = Path(cfg.pretrain.cache_dir) / f"{pcfg.name}-{config_hash(*parts)}"
    # the pretrain config's own task (domain, batch size, lengths) over this run's data and tokenizer: built now when
    # its own model is needed (keep), else only if the base must be trained
    ptask = tasks.build(pcfg, **task.shared_data()) if keep else None
    # the pretrain config's own model (and compute dtype: its precision, not this run's)
    pmodule, pinputs = registry.build_model(precision_lib.with_compute_dtype(
        (ptask if keep else task).model_config(), pcfg.get("precision")))
    abstract = abstract_base(pmodule, pinputs, pcfg.seed)
    base = _read_cached_base(cache, abstract) if cache.exists() else None
    if base is not None:
        print(f"reusing the pretrained base from {cache}")
    else:
        files.check_writable_dir(cache.parent, "pretrain.cache_dir")
        print(f"pretraining the base ({pcfg.name}) into {cache}")
        ptask = ptask or tasks.build(pcfg, **task.shared_data())
        setup = Setup(pcfg, ptask, pmodule, pinputs, init_base(pmodule, pinputs, pcfg.seed), {})
        params, _ = train_stages(setup, cache / "run", {}, stages_from_config(pcfg), {})
        checkpoint.save_tree(cache / "params", params["base"])
        files.write_text(cache / "params.sha256", tree_digest(params["base"]) + "\n")  # written last: complete
        base = _read_cached_base(cache, abstract)
        if base is None:
            raise CheckpointError(f"the pretrained base just written to {cache} cannot be read back")
    return keep_subtrees(base, init_base(module, inputs, cfg.seed), keep, cfg.pretrain.config) if keep else base


def keep_subtrees(pretrained: Any, fresh: Any, keep: Sequence[str], source: str) -> Any:
    """``fresh`` with the subtrees ``keep`` (``/``-joined paths) replaced by ``pretrained``'s.

    Raises:
      ConfigError: a path missing from either tree, or a subtree whose shapes differ.
    """
    out = peft_base.copy_tree(fresh)
    for where in keep:
        path = tuple(p for p in where.split("/") if p)
        old, new = peft_base.lookup(fresh, path), peft_base.lookup(pretrained, path)
        if old is None or new is None:
            raise ConfigError(f"pretrain.keep: {where!r} is not a module of {'this model' if old is None else source}"
                              f"'s parameters; top-level modules: "
                              f"{', '.join(sorted((fresh if old is None else pretrained).keys()))}")
        shapes_old = jax.tree.map(lambda x: tuple(x.shape), old)
        shapes_new = jax.tree.map(lambda x: tuple(x.shape), new)
        if shapes_old != shapes_new:
            raise ConfigError(f"pretrain.keep: {where!r} has different shapes in {source}'s model and in this one")
        peft_base.set_path(out, path, new)
    return out


def tree_digest(tree: Any) -> str:
    """sha256 over a parameter tree's key paths, dtypes, shapes and bytes (the pretrain cache's checksum)."""
    h = hashlib.sha256()
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        a = np.ascontiguousarray(np.asarray(x))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _read_cached_base(cache: Path, abstract: Any) -> Any | None:
    """The cached base if it is complete and its checksum matches, else None (the base is then trained again:
    an interrupted pretraining resumes from ``cache/run``'s checkpoints). Damaged parameters are moved aside
    with one warning, never trusted."""
    digest_file = cache / "params.sha256"
    if not checkpoint.has_tree(cache / "params") and not digest_file.exists():
        return None  # not written yet
    problem = None
    if not digest_file.is_file():
        problem = "it is incomplete (no params.sha256: the run that wrote it was interrupted)"
    else:
        try:
            base = checkpoint.load_tree(cache / "params", abstract)
            if tree_digest(base) == digest_file.read_text().strip():
                return base
            problem = "its checksum does not match (the files were changed or damaged)"
        except Exception as e:  # noqa: BLE001 - any unreadable cache entry is rebuilt, never trusted
            problem = f"it cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
    dest = cache / "params.corrupt"
    n = 1
    while dest.exists():
        dest, n = cache / f"params.corrupt{n}", n + 1
    dest.mkdir(parents=True)
    for name in ("params", "params.sha256"):
        if (cache / name).exists():
            (cache / name).rename(dest / name)
    warnings.warn(f"the cached pretrained base in {cache} is not usable: {problem}; moved it to {dest} and "
                  f"training the base again", stacklevel=2)
    return None


# -------------------------------------------------------------------------------------------- train


def train_stages(setup: Setup, run_dir: Path, peft_params: Mapping[str, Any], stages: Sequence[Stage],
                 wrappers: Mapping[str, Any], mtl: Any = None) -> tuple[Any, Any]:
    """Runs ``stages`` on the task's training batches; returns (final params, TrainResult). With an
    :class:`~vlpeft_jax.experiments.multitask.MTLPlan` the stages train through its gradient manipulation."""
    cfg = setup.cfg
    batches = setup.task.train_batches(cfg.seed)
    weights = dict(cfg.get("loss_weights") or {})

    def data_factory(stage_index: int, start_step: int):
        offset = sum(s.steps for s in stages[:stage_index])
        for b in batches.iterate(offset + start_step, stages[stage_index].steps - start_step):
            yield {k: v for k, v in b.items() if k not in ("example_index", "valid")}

    def build_loss_fn(active: tuple[str, ...]):
        return setup.task.loss_fn(setup.module, setup.active(active), weights)

    step_factory = None
    if mtl is not None and precision_lib.loss_scaling(cfg.get("precision")):
        raise ConfigError("precision='float16' (dynamic loss scaling) is not supported with multi-task gradient "
                          "manipulation (config.mtl); use precision='bfloat16', which needs no loss scale")
    if mtl is not None:
        build_loss_fn, wrappers, step_factory = multitask.training_hooks(setup, mtl, wrappers)
    params = {"base": setup.base, "peft": dict(peft_params)}
    result = train(params, stages, data_factory, run_dir, build_loss_fn=build_loss_fn, seed=cfg.seed,
                   checkpoint_every=cfg.train.checkpoint_every, progress=cfg.train.progress,
                   optimizer_wrappers=wrappers, step_factory=step_factory)
    return result.params, result


def save_final(run_dir: Path, params: Any, base: Any) -> None:
    """Writes ``final/peft`` and, only if training changed it, ``final/base``."""
    final = run_dir / "final"
    checkpoint.save_tree(final / "peft", params["peft"])
    changed = any(not np.array_equal(np.asarray(a), np.asarray(b))
                  for a, b in zip(jax.tree_util.tree_leaves(params["base"]), jax.tree_util.tree_leaves(base),
                                  strict=True))
    if changed:
        checkpoint.save_tree(final / "base", params["base"])


def load_final(run_dir: Path, cfg: ml_collections.ConfigDict, task: Any = None) -> tuple[Setup, Any]:
    """``(setup, params)`` of a finished run directory (for ``run.py eval``, sweeps, export and generate);
    ``task``: the run's task when the caller built it (default: built from ``cfg``)."""
    from vlpeft_jax.data.tokenizer import WordTokenizer

    final = Path(run_dir) / "final"
    if not checkpoint.has_tree(final / "peft"):
        raise ConfigError(f"{run_dir} has no final parameters ({final / 'peft'}); did the run finish?")
    tokenizer = WordTokenizer.load(Path(run_dir) / "tokenizer") if (Path(run_dir) / "tokenizer").exists() else None
    task = task if task is not None else tasks.build(cfg, tokenizer=tokenizer)
    if hasattr(task, "load_model"):  # a Hugging Face checkpoint; final/base only if training changed it
        module, base = task.load_model()
        inputs: Mapping[str, Any] = {}
        if checkpoint.has_tree(final / "base"):
            base = checkpoint.load_tree(final / "base", jax.eval_shape(lambda: base))
    else:
        module, inputs = registry.build_model(model_config(cfg, task))
        base = None
    if base is not None:
        pass
    elif checkpoint.has_tree(final / "base"):
        base = checkpoint.load_tree(final / "base", abstract_base(module, inputs, cfg.seed))
    elif cfg.get("pretrain") and cfg.pretrain.get("config"):
        base = pretrained_base(cfg, task, module, inputs)
    else:
        raise ConfigError(f"{run_dir}: the base model was not saved and there is no pretrain config to rebuild it")
    setup = Setup(cfg, task, module, inputs, base, build_methods(cfg.get("peft")))
    # the saved indices are read back; only their shapes are needed, and those do not depend on the data
    peft_abstract = prepare_methods(setup, jax.random.key(0), abstract=True)
    peft = checkpoint.load_tree(final / "peft", peft_abstract)
    return setup, {"base": base, "peft": peft}


# ------------------------------------------------------------------------------------------------- run


def run(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The whole experiment; returns the results dict also written to ``results.json``.

    Everything is checked before the run directory is written: the output path, an earlier run there (a
    different config is refused naming the keys; a finished run is returned as it is, never rewritten; an
    unfinished one resumes from its checkpoints), the model, the methods and the stages.
    """
    t0 = time.time()
    validate(cfg, tasks=tasks.TASKS)
    run_dir = resolve_run_dir(cfg)
    finished = check_run_dir(run_dir, cfg)
    if finished is not None:
        print(f"run directory: {run_dir} already holds this run, finished; nothing to do (its results are in "
              f"{run_dir / 'results.json'})")
        return finished
    print(f"run directory: {run_dir}")
    setup = build(cfg)
    check_remat(setup)
    peft_params = prepare_methods(setup, jax.random.key(cfg.seed + 1))
    stages, wrappers = plan_stages(setup, peft_params)
    mtl = multitask.plan(setup)
    # before any compilation: a stage may only train methods that are active in it (issue 5, bad input)
    check_stage_methods(stages, setup.methods, {"base": setup.base, "peft": peft_params})
    write_run_config(run_dir, cfg)
    setup.task.save_assets(run_dir)
    results: dict[str, Any] = {"name": cfg.name, "task": setup.task.name, "run_dir": str(run_dir)}
    if cfg.eval.zero_shot:
        print("evaluating zero-shot (the base model)")
        results["zero_shot"] = setup.task.evaluate(setup.module, {"base": setup.base, "peft": {}}, [])
    params, train_result = train_stages(setup, run_dir, peft_params, stages, wrappers, mtl)
    save_final(run_dir, params, setup.base)
    counts = parameter_counts(params, setup, stages)
    results["params"] = {"base_total": counts["base_total"], **counts["stages"][stages[-1].name]}
    results["train"] = {"final_loss": train_result.history[-1]["loss"] if train_result.history else None,
                        "steps": sum(s.steps for s in stages)}
    if mtl is not None:
        results["mtl"] = multitask.summary(mtl, train_result.history)
        if mtl.mask_mode in ("pre", "post"):  # sparse training: the mask decides what trains (Table 17's count)
            trainable = int(round(mtl.trainable_fraction * counts["base_total"]))
            results["params"].update(trainable=trainable, trainable_pct=100.0 * mtl.trainable_fraction)
    print("evaluating the adapted model")
    results["adapted"] = setup.task.evaluate(setup.module, params, setup.active())
    results["wall_time_s"] = time.time() - t0
    write_report(run_dir, setup.task, cfg, results)
    print(f"run directory: {run_dir}")
    return results


def evaluate_trained(cfg: ml_collections.ConfigDict, trained_dir: Path) -> dict[str, Any]:
    """Like :func:`run`, but evaluates the final parameters of ``trained_dir`` (a finished run whose
    :func:`training_key` equals this config's) instead of training again; writes this run's report."""
    t0 = time.time()
    trained_dir = Path(trained_dir)
    run_dir = resolve_run_dir(cfg)
    finished = check_run_dir(run_dir, cfg)
    if finished is not None:
        print(f"run directory: {run_dir} already holds this evaluation, finished; nothing to do")
        return finished
    print(f"run directory: {run_dir} (evaluating the parameters trained in {trained_dir})")
    setup, params = load_final(trained_dir, cfg)
    write_run_config(run_dir, cfg)
    setup.task.save_assets(run_dir)
    previous = json.loads((trained_dir / "results.json").read_text())
    results: dict[str, Any] = {"name": cfg.name, "task": setup.task.name, "run_dir": str(run_dir),
                               "trained_in": str(trained_dir), "params": previous["params"],
                               "train": previous["train"]}
    results["adapted"] = setup.task.evaluate(setup.module, params, setup.active())
    results["wall_time_s"] = time.time() - t0
    write_report(run_dir, setup.task, cfg, results)
    return results
