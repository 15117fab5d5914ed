"""Multi-task runs: ``config.mtl`` turns a multi-head task into gradient-manipulation training.

A config with ``mtl.method`` set trains through :mod:`vlpeft_jax.mtl`: the task's per-head losses
(:meth:`~vlpeft_jax.tasks.classification.ClassificationTask.task_losses_fn`), their per-task gradients, the
method as an optax transformation in front of each stage's optimizer, and optionally sparse training with a
PSN mask chosen once from the base parameters before training (thesis ``004_21d0d480fe4006f4.txt`` ch. 6).

Settings (``config.mtl``; defaults in :data:`DEFAULTS`):

- ``method``: a method of :func:`vlpeft_jax.mtl.registry.names` (``ls`` is Joint Train); ``options``: its
  options (e.g. ``{"c": 0.4}`` for CAGrad);
- ``clip``: ``famo_codebase`` (default), ``nash_codebase``, ``none`` or a number (the shared direction's norm);
- ``strategy``: how per-task gradients are formed (``vjp``, ``jacrev``, ``loop``);
- ``sparse.k``: PSN connections per neuron (0: dense training); ``sparse.variant`` (``top``, ``reverse``,
  ``random``, ``global``); ``sparse.rules`` (``gps`` or ``gps_cnn``); ``sparse.mask_mode`` (``pre``/``post``);
  ``sparse.require_every_layer``; ``sparse.monitor_k``: for a *dense* run, count conflicts also under the PSN
  mask of this ``k`` (``mask_mode="monitor"``), so dense and sparse runs report the same two streams;
- ``seed``: the transformation's PRNG seed (PCGrad order, GradDrop, RLW; the random mask); default the run's.
- ``group``: a label the sweep summary groups runs by (e.g. ``pretrained`` / ``random`` towers), so Δm% compares
  each multi-task run with the single-task runs of its own group.

Results (``results["mtl"]``): method, settings, number of tasks, the trainable fraction under the mask
(Table 17's count: all parameters in the denominator), and the gradient-conflict incidence p% (spec §3.2)
over all steps and the last half, of the full gradients and (with a mask) of the masked ones.

Example:
    >>> import ml_collections
    >>> settings(ml_collections.ConfigDict({"mtl": {"method": "pcgrad", "sparse": {"k": 4}}}))["sparse"]["k"]
    4
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.mtl import conflict, psn, registry
from vlpeft_jax.mtl.step import make_mtl_train_step
from vlpeft_jax.mtl.transform import MASK_MODES, gradient_manipulation, resolve_clip, sparse_chain

SPARSE_DEFAULTS = {"k": 0, "variant": "top", "rules": "gps", "mask_mode": "pre", "require_every_layer": False,
                   "monitor_k": 0}
DEFAULTS = {"method": "", "options": {}, "clip": "famo_codebase", "strategy": "vjp", "seed": None, "group": "",
            "sparse": SPARSE_DEFAULTS}
RULES = {"gps": psn.GPS_RULES, "gps_cnn": psn.GPS_CNN_RULES}


def settings(cfg: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """``config.mtl`` with defaults, checked; None when the config trains no multi-task method."""
    given = cfg.get("mtl")
    if not given or not given.get("method"):
        return None
    given = given.to_dict() if isinstance(given, ml_collections.ConfigDict) else dict(given)
    unknown = [k for k in given if k not in DEFAULTS]
    if unknown:
        raise ConfigError(f"mtl: unknown key(s) {', '.join(map(repr, unknown))}; valid: {', '.join(DEFAULTS)}")
    sparse = dict(given.get("sparse") or {})
    unknown = [k for k in sparse if k not in SPARSE_DEFAULTS]
    if unknown:
        raise ConfigError(f"mtl.sparse: unknown key(s) {', '.join(map(repr, unknown))}; valid: "
                          f"{', '.join(SPARSE_DEFAULTS)}")
    out = {**DEFAULTS, **given, "sparse": {**SPARSE_DEFAULTS, **sparse}}
    method = registry.get(out["method"])
    out["method"] = method.name
    out["options"] = method.options(dict(out["options"] or {}), "mtl.options")
    resolve_clip(method, out["clip"])
    sp = out["sparse"]
    for key in ("k", "monitor_k"):
        if not isinstance(sp[key], int) or sp[key] < 0:
            raise ConfigError(f"mtl.sparse.{key}={sp[key]!r}: must be an integer >= 0 (0: off)")
    if sp["k"] and sp["monitor_k"]:
        raise ConfigError("mtl.sparse: set k (sparse training) or monitor_k (a dense run's conflict counts under a "
                          "mask), not both")
    if sp["rules"] not in RULES:
        raise ConfigError(f"mtl.sparse.rules={sp['rules']!r}; valid: {', '.join(RULES)}")
    if sp["variant"] not in psn.VARIANTS:
        raise ConfigError(f"mtl.sparse.variant={sp['variant']!r}; valid: {', '.join(psn.VARIANTS)}")
    if sp["mask_mode"] not in MASK_MODES[:2]:
        raise ConfigError(f"mtl.sparse.mask_mode={sp['mask_mode']!r}; valid: {', '.join(MASK_MODES[:2])}")
    if out["seed"] is None:
        out["seed"] = int(cfg.get("seed", 0))
    return out


@dataclasses.dataclass
class MTLPlan:
    """A run's multi-task settings with the mask built.

    Attributes:
      settings: from :func:`settings`.
      num_tasks: the task's number of heads.
      mask: ``{"base": psn mask}`` or None.
      mask_mode: ``pre``/``post`` (sparse training), ``monitor`` (dense, counted under the mask) or None.
      trainable_fraction: Table 17's trainable % under the mask (None without one).
    """

    settings: dict[str, Any]
    num_tasks: int
    mask: Any = None
    mask_mode: str | None = None
    trainable_fraction: float | None = None


def plan(setup: Any) -> MTLPlan | None:
    """The :class:`MTLPlan` of a built run (None without ``config.mtl.method``).

    Raises:
      ConfigError: bad settings, a task without per-task losses, too few tasks for the method, or a mask leaving a
        shared kernel without any trainable entry when ``sparse.require_every_layer`` is set.
    """
    s = settings(setup.cfg)
    if s is None:
        return None
    if not hasattr(setup.task, "task_losses_fn"):
        raise ConfigError(f"mtl.method={s['method']!r}: task {setup.task.name!r} has no per-task losses; multi-task "
                          f"training needs a task with several heads (task 'classification')")
    num_tasks = len(setup.task.groups)
    registry.get(s["method"]).check_tasks(num_tasks, f"mtl.method (config.heads has {num_tasks})")
    sp = s["sparse"]
    k = sp["k"] or sp["monitor_k"]
    if not k:
        return MTLPlan(s, num_tasks)
    key = jax.random.PRNGKey(s["seed"]) if sp["variant"] == "random" else None
    mask = psn.psn_mask(setup.base, k, rules=RULES[sp["rules"]], variant=sp["variant"], key=key,
                        require_every_layer=sp["require_every_layer"])
    fraction = psn.trainable_fraction(setup.base, mask)
    mode = sp["mask_mode"] if sp["k"] else "monitor"
    note = " (monitored only: dense training)" if mode == "monitor" else ""
    print(f"mtl: {s['method']} over {num_tasks} tasks; PSN mask (k={k}, {sp['variant']}) trains "
          f"{100 * fraction:.2f}% of the parameters{note}")
    return MTLPlan(s, num_tasks, {"base": mask}, mode, fraction)


def training_hooks(setup: Any, mtl: MTLPlan, wrappers: Mapping[str, Any]) -> tuple[Any, dict[str, Any], Any]:
    """``(build_loss_fn, optimizer wrappers, step factory)`` for :func:`vlpeft_jax.train.train`."""
    s = mtl.settings

    def build_loss_fn(active: tuple[str, ...]) -> Any:
        return setup.task.task_losses_fn(setup.module, setup.active(active), {})

    def wrap(tx: Any, inner_wrap: Any) -> Any:
        manipulation = gradient_manipulation(s["method"], num_tasks=mtl.num_tasks, options=s["options"],
                                             clip=s["clip"], mask=mtl.mask, mask_mode=mtl.mask_mode or "pre",
                                             seed=s["seed"])
        sparse_mask = mtl.mask if mtl.mask_mode in ("pre", "post") else None
        return sparse_chain(manipulation, inner_wrap(tx), sparse_mask)

    new_wrappers = {name: functools.partial(wrap, inner_wrap=w) for name, w in wrappers.items()}
    factory = functools.partial(make_mtl_train_step, method=s["method"], options=s["options"],
                                strategy=s["strategy"])
    return build_loss_fn, new_wrappers, factory


def summary(mtl: MTLPlan, history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``results["mtl"]``: the settings, the trainable fraction and the p% of the run (module docstring)."""
    out: dict[str, Any] = {"method": mtl.settings["method"], "options": mtl.settings["options"],
                           "clip": mtl.settings["clip"], "sparse": mtl.settings["sparse"],
                           "group": mtl.settings["group"], "num_tasks": mtl.num_tasks, "mask_mode": mtl.mask_mode,
                           "trainable_fraction": mtl.trainable_fraction}
    rows = [h for h in history if "mtl/gc_full" in h]
    if not rows:
        return out
    pairs = [h["mtl/gc_pairs"] for h in rows]
    for stream in ("full", "masked"):
        counts = [h.get(f"mtl/gc_{stream}") for h in rows]
        if any(c is None for c in counts):
            continue
        inc = conflict.incidence(counts, pairs)
        out[f"p_{stream}"] = {"all": inc.p_all, "last_half": inc.p_last}
    weights = np.array([[h[f"mtl/weight/{t}"] for t in range(mtl.num_tasks)] for h in rows])
    out["mean_weights"] = weights.mean(axis=0).round(6).tolist()
    return out


# ------------------------------------------------------------------------------------- sweep summary


def _heads(result: Mapping[str, Any]) -> list[str]:
    return [h for h, v in result["adapted"].items() if isinstance(v, Mapping) and "metrics" in v]


def delta_m_metrics(result: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """The metrics Δm% compares (all higher-is-better): each head's ``accuracy``, and ``mIoU`` where a head has
    one (patch heads)."""
    out: dict[str, dict[str, float]] = {}
    for head in _heads(result):
        m = result["adapted"][head]["metrics"]
        out[head] = {k: float(m[k]) for k in ("accuracy", "mIoU") if k in m}
    return out


def _mean_std(values: Sequence[float]) -> tuple[float, float] | None:
    vals = [v for v in values if v is not None and np.isfinite(v)]
    return (float(np.mean(vals)), float(np.std(vals))) if vals else None


def sweep_summary(results: Mapping[str, Sequence[Mapping[str, Any]]], groups: Mapping[str, str]
                  ) -> dict[str, Any]:
    """Per variant: p% (full / masked, all steps / last half), each head's Δm metrics, Δm% against the single-task
    runs of its group, trainable % — each (mean, population std) over seeds.

    Args:
      results: ``{variant: [results.json of each seed]}``.
      groups: ``{variant: config.mtl.group}``; single-task variants (one head, no ``mtl`` results) are the
        references of their group: their per-head metrics averaged over seeds.

    Δm% (thesis Sec. 6.4.1; :func:`vlpeft_jax.mtl.conflict.delta_m`, ``mode="flat"``) is taken per seed, then
    averaged; a multi-task run whose group lacks a single-task run of one of its heads gets no Δm.
    """
    stl: dict[tuple[str, str], list[dict[str, float]]] = {}
    for variant, runs in results.items():
        if any("mtl" in r for r in runs):
            continue
        for r in runs:
            for head, metrics in delta_m_metrics(r).items():
                stl.setdefault((groups.get(variant, ""), head), []).append(metrics)
    reference = {key: {m: float(np.mean([x[m] for x in rows])) for m in rows[0]} for key, rows in stl.items()}
    out: dict[str, Any] = {}
    for variant, runs in results.items():
        group = groups.get(variant, "")
        row: dict[str, Any] = {"group": group, "seeds": len(runs), "single_task": not any("mtl" in r for r in runs)}
        for stream in ("full", "masked"):
            for part in ("all", "last_half"):
                row[f"p_{stream}_{part}"] = _mean_std([r.get("mtl", {}).get(f"p_{stream}", {}).get(part)
                                                       for r in runs])
        per_seed = [delta_m_metrics(r) for r in runs]
        for head in per_seed[0]:
            for m in per_seed[0][head]:
                row[f"{head} {m}"] = _mean_std([100 * s[head][m] for s in per_seed if head in s])
        deltas = []
        if not row["single_task"] and all((group, h) in reference for h in per_seed[0]):
            for s in per_seed:
                res = {h: s[h] for h in s}
                ref = {h: {m: reference[(group, h)][m] for m in s[h]} for h in s}
                deltas.append(conflict.delta_m(res, ref, {h: {m: True for m in s[h]} for h in s}))
        row["delta_m"] = _mean_std(deltas)
        row["trainable_pct"] = float(np.mean([r["params"]["trainable_pct"] for r in runs]))
        out[variant] = row
    return out
