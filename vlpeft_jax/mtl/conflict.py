"""Gradient-conflict statistics (GC, p%) and the multi-task performance measure Δm%.

- **Conflict** (thesis ``../shared/seeds/004_21d0d480fe4006f4.txt`` Def. 6.3.1, Eq. 6.3-6.4;
  ``../shared/specs/sparse_mtl.md`` §3.1): tasks ``i != j`` conflict at a step iff ``g_i · g_j < 0`` for their
  gradients w.r.t. the shared parameters. A zero dot product (e.g. a zero gradient) is **not** a conflict.
  :func:`conflict_count` / :func:`conflict_stats` count the conflicting pairs from the Gram matrix (jittable),
  for the full gradients and, under sparse training, for the masked ones (spec A7: log both).
- **Incidence** p% (Sec. 6.4.1, spec §3.2): ``p = 1/(E·I) Σ_e Σ_i N_gc/N_all × 100``, every iteration weighted
  equally, over all epochs and over the last half (spec A8: epochs ⌊E/2⌋+1..E); per-epoch GC counts
  ``Σ_i N_gc`` for the Fig. 6.4-style curves. :func:`incidence` works on logged values (numpy).
- **Δm%** (Sec. 6.4.1 following Maninis et al. 2019, spec §3.3, A4): the relative difference to single-task
  learning (STL), ``(-1)^{δ_k} (M_b,k − M_s,k) / M_s,k × 100`` with ``δ_k = 1`` for higher-is-better metrics,
  **lower is better**. ``mode="flat"`` (default) averages over all metrics at once, as nash-mtl's ``delta_fn``
  does, which is what the thesis' tables report; ``mode="per_task"`` averages per task first, then over tasks,
  as the thesis' printed formula says (the two agree when every task has the same number of metrics).

Example:
    >>> import jax.numpy as jnp
    >>> g = jnp.array([[1.0, 0.0], [-1.0, 1.0], [0.0, 1.0]])  # pair (0,1) conflicts; (0,2) orthogonal
    >>> n, pairs = conflict_count(g @ g.T)
    >>> int(n), pairs
    (1, 3)
    >>> round(incidence([1, 0, 2, 3], pairs).p_all, 2)  # (1+0+2+3)/(4·3)
    50.0
    >>> delta_m({"a": {"acc": 90.0}}, {"a": {"acc": 100.0}}, {"a": {"acc": True}})  # 10% worse than STL
    10.0
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlpeft_jax.errors import ConfigError, InputError
from vlpeft_jax.mtl.base import check_grads, gram

# ------------------------------------------------------------------------------------------ per step (jittable)


def conflict_count(gram_matrix: jax.Array) -> tuple[jax.Array, int]:
    """``(n_gc, n_pairs)``: the task pairs ``i < j`` with a negative off-diagonal Gram entry (int32 scalar), and
    ``C(T, 2)`` (a Python int: the shape decides it). Zero entries are not conflicts. Jittable.

    Example:
        >>> import jax.numpy as jnp
        >>> n, pairs = conflict_count(jnp.array([[1.0, -0.5, 0.0], [-0.5, 1.0, 2.0], [0.0, 2.0, 1.0]]))
        >>> int(n), pairs
        (1, 3)
    """
    a = jnp.asarray(gram_matrix)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise InputError(f"conflict_count: the Gram matrix must be square [T, T]; got shape {tuple(a.shape)}")
    t = a.shape[0]
    upper = jnp.triu(jnp.ones((t, t), jnp.bool_), k=1)
    return jnp.sum(upper & (a < 0), dtype=jnp.int32), t * (t - 1) // 2


def conflict_stats(grads: jax.Array, mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """Conflicting task pairs of the stacked shared-parameter gradients ``grads [T, P]`` (one row per task).

    Returns a dict of int32 scalars: ``"gc/full"`` (pairs with ``g_i·g_j < 0``), ``"gc/masked"`` (the same for
    ``g_t ⊙ mask``, only when a flat ``[P]`` ``mask`` is given: the sparse-training view, spec A7) and
    ``"gc/pairs"`` (``C(T, 2)``). Measured on the gradients before any manipulation (spec §3.2). Jittable.

    Example:
        >>> import jax.numpy as jnp
        >>> g = jnp.array([[1.0, 1.0], [-1.0, 2.0]])  # full: 1; on coordinate 0 only: -1 < 0
        >>> s = conflict_stats(g, mask=jnp.array([True, False]))
        >>> {k: int(v) for k, v in s.items()}
        {'gc/full': 0, 'gc/masked': 1, 'gc/pairs': 1}
    """
    check_grads(grads)
    n_full, pairs = conflict_count(gram(grads))
    out = {"gc/full": n_full}
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.shape != (grads.shape[1],):
            raise InputError(f"conflict_stats: mask must be a flat [P] vector (P={grads.shape[1]}, the flattened "
                             f"shared parameters); got shape {tuple(mask.shape)}")
        out["gc/masked"] = conflict_count(gram(grads * mask.astype(grads.dtype)[None, :]))[0]
    out["gc/pairs"] = jnp.asarray(pairs, jnp.int32)
    return out


# ------------------------------------------------------------------------------------------ over a run (numpy)


@dataclasses.dataclass(frozen=True)
class Incidence:
    """Average GC incidence of a training run (spec §3.2).

    Attributes:
      p_all: p% over all logged steps (every iteration weighted equally).
      p_last: p% over the last part: epochs ``⌊E·(1−f)⌋+1..E`` when epochs are known (``f = 1/2``: spec A8's
        ⌊E/2⌋+1..E), else steps ``⌊S·(1−f)⌋+1..S``.
      last_from: the first unit (1-based epoch, or step without epochs) of the last part.
      per_epoch_counts: ``Σ N_gc`` per epoch (Fig. 6.4's y-axis), or None without epochs.
      per_epoch_p: p% per epoch, or None without epochs.
    """

    p_all: float
    p_last: float
    last_from: int
    per_epoch_counts: np.ndarray | None = None
    per_epoch_p: np.ndarray | None = None


def incidence(counts_per_step: Sequence[Any] | np.ndarray, pairs: int | Sequence[int] | np.ndarray,
              steps_per_epoch: int | Sequence[int] | None = None, last_fraction: float = 0.5) -> Incidence:
    """p% = mean over steps of ``N_gc / N_all × 100``, overall and over the last ``last_fraction`` of the run.

    Args:
      counts_per_step: ``N_gc`` of every logged training iteration, in order (``conflict_stats(...)["gc/full"]``).
      pairs: ``N_all = C(T, 2)``, one number or one per step.
      steps_per_epoch: iterations per epoch (one number: every epoch the same; a sequence: each epoch's count,
        summing to the number of steps). None: no epochs (the last part is then counted in steps).
      last_fraction: the fraction of the run in ``p_last`` (0.5: the thesis' "last 50% epochs").

    Raises:
      InputError: no steps, ``pairs < 1``, or steps not splitting into the given epochs.
      ConfigError: ``last_fraction`` outside (0, 1].

    Example:
        >>> r = incidence([0, 1, 1, 1, 0, 0], 1, steps_per_epoch=2)  # epochs: [0,1] [1,1] [0,0]; last: epochs 2-3
        >>> r.p_all, r.p_last, r.last_from, r.per_epoch_counts.tolist()
        (50.0, 50.0, 2, [1, 2, 0])
    """
    counts = np.asarray(jax.device_get(counts_per_step), np.float64).reshape(-1)
    n = counts.shape[0]
    if n == 0:
        raise InputError("incidence: no steps were logged (counts_per_step is empty)")
    if not 0.0 < float(last_fraction) <= 1.0:
        raise ConfigError(f"incidence last_fraction={last_fraction}; must be in (0, 1]")
    pairs_arr = np.broadcast_to(np.asarray(jax.device_get(pairs), np.float64), counts.shape) \
        if np.ndim(pairs) == 0 else np.asarray(jax.device_get(pairs), np.float64).reshape(-1)
    if pairs_arr.shape != counts.shape:
        raise InputError(f"incidence: pairs has {pairs_arr.shape[0]} entries for {n} steps; give one number or one "
                         f"per step")
    if np.any(pairs_arr < 1):
        raise InputError(f"incidence: pairs must be >= 1 (C(T,2) task pairs, T >= 2); got {pairs_arr.min():g}")
    if np.any(counts < 0) or np.any(counts > pairs_arr):
        raise InputError("incidence: every count must be in [0, pairs]")
    rate = counts / pairs_arr * 100.0
    if steps_per_epoch is None:
        start = math.floor(n * (1.0 - float(last_fraction)))
        return Incidence(float(rate.mean()), float(rate[start:].mean()), start + 1)
    if np.ndim(steps_per_epoch) == 0:
        spe = int(steps_per_epoch)
        if spe < 1 or n % spe:
            raise InputError(f"incidence: {n} steps do not split into epochs of steps_per_epoch={steps_per_epoch}; "
                             f"pass the per-epoch step counts as a sequence")
        sizes = np.full(n // spe, spe, np.int64)
    else:
        sizes = np.asarray(steps_per_epoch, np.int64).reshape(-1)
        if np.any(sizes < 1) or int(sizes.sum()) != n:
            raise InputError(f"incidence: steps_per_epoch {sizes.tolist()[:8]} (sum {int(sizes.sum())}) must be "
                             f"positive and sum to the {n} logged steps")
    epochs = len(sizes)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    first = math.floor(epochs * (1.0 - float(last_fraction)))  # 0-based first epoch of the last part
    per_counts = np.array([counts[bounds[e]:bounds[e + 1]].sum() for e in range(epochs)])
    per_p = np.array([rate[bounds[e]:bounds[e + 1]].mean() for e in range(epochs)])
    as_int = per_counts.astype(np.int64)
    return Incidence(float(rate.mean()), float(rate[bounds[first]:].mean()), first + 1,
                     as_int if np.array_equal(as_int, per_counts) else per_counts, per_p)


# ------------------------------------------------------------------------------------------ Δm%


def _flatten_results(results: Any, stl: Any, higher_is_better: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                               list[int]]:
    """(method values, STL values, directions, metrics per task) from matching dicts or flat sequences."""
    if isinstance(results, Mapping):
        for name, other in (("stl", stl), ("higher_is_better", higher_is_better)):
            if not isinstance(other, Mapping):
                raise ConfigError(f"delta_m: results is a {{task: {{metric: value}}}} dict, so {name} must be one too")
            if set(other) != set(results):
                raise ConfigError(f"delta_m: the tasks of {name} {sorted(other)} differ from those of results "
                                  f"{sorted(results)}")
        vals, base, hib, sizes = [], [], [], []
        for task, metrics in results.items():
            if not isinstance(metrics, Mapping) or not metrics:
                raise ConfigError(f"delta_m: results[{task!r}] must be a non-empty {{metric: value}} dict")
            for name, other in (("stl", stl[task]), ("higher_is_better", higher_is_better[task])):
                if not isinstance(other, Mapping) or set(other) != set(metrics):
                    got = sorted(other) if isinstance(other, Mapping) else other
                    raise ConfigError(f"delta_m: {name}[{task!r}] has metrics {got}; results[{task!r}] has "
                                      f"{sorted(metrics)}")
            for metric, value in metrics.items():
                vals.append(value)
                base.append(stl[task][metric])
                hib.append(higher_is_better[task][metric])
            sizes.append(len(metrics))
        return np.asarray(vals, np.float64), np.asarray(base, np.float64), np.asarray(hib), sizes
    vals = np.asarray(results, np.float64).reshape(-1)
    base = np.asarray(stl, np.float64).reshape(-1)
    hib = np.asarray(higher_is_better).reshape(-1)
    if not (vals.shape == base.shape == hib.shape) or not vals.size:
        raise ConfigError(f"delta_m: results ({vals.size}), stl ({base.size}) and higher_is_better ({hib.size}) "
                          f"must list the same non-zero number of metrics")
    return vals, base, hib, [vals.size]


def delta_m(results: Any, stl: Any, higher_is_better: Any, mode: str = "flat",
            task_sizes: Sequence[int] | None = None) -> float:
    """Δm% of a method against single-task learning (lower is better; negative = better than STL on average).

    Args:
      results: the method's metrics, ``{task: {metric: value}}`` or a flat sequence.
      stl: the STL metrics, the same structure.
      higher_is_better: per metric, True for ↑ metrics (accuracy, mIoU) and False for ↓ (errors), same structure.
      mode: ``"flat"`` (mean over all metrics, nash-mtl ``delta_fn``; what the thesis' numbers use) or
        ``"per_task"`` (mean per task, then over tasks: the thesis' printed formula; spec §3.3, A4).
      task_sizes: for flat sequences in ``"per_task"`` mode, the number of metrics of each task, in order.

    Raises:
      ConfigError: tasks/metrics/directions that do not line up, an unknown mode, a zero STL value, or
        ``"per_task"`` on flat sequences without ``task_sizes``.

    Example:
        >>> res = {"seg": {"miou": 40.0}, "depth": {"abs": 0.5, "rel": 0.2}}
        >>> stl = {"seg": {"miou": 50.0}, "depth": {"abs": 0.4, "rel": 0.25}}
        >>> hib = {"seg": {"miou": True}, "depth": {"abs": False, "rel": False}}
        >>> round(delta_m(res, stl, hib), 3), round(delta_m(res, stl, hib, "per_task"), 3)  # (20+25-20)/3; (20+2.5)/2
        (8.333, 11.25)
    """
    if mode not in ("flat", "per_task"):
        raise ConfigError(f"delta_m mode={mode!r}; valid: flat, per_task")
    vals, base, hib, sizes = _flatten_results(results, stl, higher_is_better)
    if not all(isinstance(h, (bool, np.bool_)) for h in hib.tolist()) and not np.isin(hib, (0, 1)).all():
        raise ConfigError(f"delta_m: higher_is_better must hold booleans; got {hib.tolist()[:6]}")
    if np.any(base == 0):
        raise ConfigError("delta_m: an STL value is 0, so the relative difference is undefined")
    sign = np.where(hib.astype(bool), -1.0, 1.0)
    terms = sign * (vals - base) / base * 100.0
    if mode == "flat":
        return float(terms.mean())
    if not isinstance(results, Mapping):
        if task_sizes is None:
            raise ConfigError("delta_m mode='per_task' with flat sequences needs task_sizes (metrics per task)")
        sizes = [int(s) for s in task_sizes]
        if any(s < 1 for s in sizes) or sum(sizes) != terms.size:
            raise ConfigError(f"delta_m: task_sizes {sizes} must be positive and sum to the {terms.size} metrics")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return float(np.mean([terms[bounds[i]:bounds[i + 1]].mean() for i in range(len(sizes))]))
