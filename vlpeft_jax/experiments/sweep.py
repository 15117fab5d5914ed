"""Sweeps: several variants of a config (and seeds), one table and one bar plot.

A sweepable config module defines ``get_config(variant)`` and ``SWEEPS = {name: [variant, ...]}``.
``python run.py sweep --config configs/shapes_compare_003.py --sweep table --seeds 0,1,2`` runs every
variant for every seed, each in its own run directory ``<variant>-seed<N>`` under the sweep directory, then
writes ``sweep.md`` (mean ± std over seeds when there are several), ``sweep.json``, ``sweep.png`` (bars per
variant) and ``sweep_params.png`` (the first group's metric against trainable %, log scale). The table, the
JSON and both plots are written atomically (a temporary file renamed over the old one), so a killed sweep never
leaves a half-written table or plot over a good one.

**Which runs are reused.** Beside each run directory the sweep keeps a record, ``<run>.sweep_run.json``: the
variant, the seed, the ``--config.*`` overrides, :func:`runner.training_key` and the whole config the run was
made with (after the overrides and the seed). Before anything runs or is written, every run directory of the
sweep that already holds files is compared with the config it would now be run with, on every key except
``run_dir`` and ``eval.zero_shot`` (whether the shared base is also evaluated zero-shot, which the sweep decides
by the run's position; an existing run keeps its own setting):

- the same config: a finished run (``results.json``) is reused as it is, never rewritten; an unfinished one
  resumes from its checkpoints;
- a different config (a ``--config.*`` override that changes training, or evaluation): the sweep is refused
  with one line naming that run directory and the differing keys (``train.batch_size: 8 -> 4``); nothing is
  written, no other run starts, and the old numbers are not published. Rerun with the overrides it was made
  with (they are in its record and in ``sweep.json``) or give another ``--out``. (The sweep does not write the
  new runs into new directories beside the old ones: one sweep directory holds one set of settings, so its
  table can say what it was run with.)

All other keys count, the cache directories included (they are part of :func:`runner.training_key`). A run
directory holding files but neither a record nor a ``config.json`` (so what it was made with is unknown), a
damaged ``results.json``, repeated or negative seeds, and ``--config.seed`` / ``--config.run_dir`` (which the
sweep sets per run from ``--seeds`` and ``--out``) are refused the same way.

Within one sweep, a variant that trains exactly like an earlier one of the same seed, differing only in
evaluation settings (equal :func:`runner.training_key`), is evaluated on that run's parameters instead of being
trained again (its ``results.json`` says ``trained_in``).

``--metric`` (the plotted metric; default: the task's ``primary_metric``) must be one of the task's
``report_metrics``; anything else is refused before any run or file. ``sweep.json`` and ``sweep.md`` record the
overrides, the seeds, the config file and which std is shown.

**Mean ± std.** The table and ``sweep.json``'s ``summary`` give, per variant, group and metric, the mean and the
*population* standard deviation (``ddof=0``, numpy's default) of the score x100 over the seeds; for two seeds
it is half their difference.

Example:
    >>> summarize({"a": [{"adapted": {"target": {"metrics": {"CIDEr-D": 0.5}}}, "params": {"trainable_pct": 1.0}},
    ...                  {"adapted": {"target": {"metrics": {"CIDEr-D": 0.7}}}, "params": {"trainable_pct": 1.0}}]},
    ...           ["CIDEr-D"], ["target"])["a"]["target"]["CIDEr-D"]
    (60.0, 10.0)
    >>> config_differences({"train": {"batch_size": 8}, "eval": {"zero_shot": True}, "seed": 0},
    ...                    {"train": {"batch_size": 4}, "eval": {"zero_shot": False}, "seed": 0}, COMPARE_IGNORE)
    {'train.batch_size': (8, 4)}
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlpeft_jax import files
from vlpeft_jax.errors import ConfigError
from vlpeft_jax.experiments import multitask
from vlpeft_jax.experiments.runner import config_differences, json_config

DOMAINS = ("target", "source")
STD = "population (ddof=0)"  # which std the table and sweep.json give (numpy's default)
RECORD_SUFFIX = ".sweep_run.json"
COMPARE_IGNORE = ("run_dir", "eval.zero_shot")  # keys a reused run may differ in (see the module docstring)


def load_sweeps(config_file: str | Path) -> dict[str, list[str]]:
    """The ``SWEEPS`` mapping of a config module."""
    p = Path(config_file)
    if not p.is_file():
        raise ConfigError(f"config file {str(config_file)!r} not found")
    spec = importlib.util.spec_from_file_location(f"_vlpeft_sweep_{p.stem}", p)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sweeps = getattr(module, "SWEEPS", None)
    if not isinstance(sweeps, Mapping) or not sweeps:
        raise ConfigError(f"{p} defines no SWEEPS = {{name: [variants]}}; it cannot be swept")
    return {k: list(v) for k, v in sweeps.items()}


def summarize(results: Mapping[str, Sequence[Mapping[str, Any]]], metrics: Sequence[str],
              domains: Sequence[str] = DOMAINS) -> dict[str, Any]:
    """Per variant, domain and metric: (mean, population std) of score x100 over the seeds; plus params."""
    out: dict[str, Any] = {}
    for variant, runs in results.items():
        row: dict[str, Any] = {"seeds": len(runs)}
        for domain in domains:
            row[domain] = {}
            for m in metrics:
                vals = [100 * r["adapted"][domain]["metrics"][m] for r in runs
                        if domain in r["adapted"] and m in r["adapted"][domain]["metrics"]]
                if vals:
                    row[domain][m] = (float(np.mean(vals)), float(np.std(vals)))  # ddof=0, see STD
        row["trainable_pct"] = float(np.mean([r["params"]["trainable_pct"] for r in runs]))
        out[variant] = row
    return out


def _cell(v: tuple[float, float] | None, seeds: int, digits: int = 1) -> str:
    if v is None:
        return "n/a"
    return f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}" if seeds > 1 else f"{v[0]:.{digits}f}"


def table(summary: Mapping[str, Any], zero_shot: Mapping[str, Any] | None, metrics: Sequence[str],
          groups: Sequence[str] = DOMAINS) -> str:
    """Markdown: one row per variant (and zero-shot), columns group (domain) x metric, then trainable %."""
    cols = [f"{d} {m}" for d in groups for m in metrics]
    lines = ["| variant | " + " | ".join(cols) + " | trainable % |", "|" + "---|" * (len(cols) + 2)]
    if zero_shot:
        cells = [_cell((100 * zero_shot[d]["metrics"][m], 0.0), 1) if m in zero_shot[d]["metrics"] else "n/a"
                 for d in groups for m in metrics]
        lines.append("| zero-shot | " + " | ".join(cells) + " | 0.00 |")
    for variant, row in summary.items():
        cells = [_cell(row[d].get(m), row["seeds"]) for d in groups for m in metrics]
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {row['trainable_pct']:.2f} |")
    return "\n".join(lines)


def _save_figure(fig: Any, path: Path) -> None:
    """The figure as PNG bytes, written atomically (:func:`files.write_bytes`)."""
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format="png")
    files.write_bytes(path, buf.getvalue())


def plot(path: Path, summary: Mapping[str, Any], metric: str, groups: Sequence[str] = DOMAINS) -> None:
    """Bars of ``metric`` (mean ± std) per variant and group, written atomically to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 3.8))
    x = np.arange(len(names))
    width = 0.8 / len(groups)
    for j, domain in enumerate(groups):
        means = [summary[n][domain].get(metric, (np.nan, 0))[0] for n in names]
        stds = [summary[n][domain].get(metric, (0, 0))[1] for n in names]
        ax.bar(x + width * (j + 0.5) - 0.4, means, yerr=stds, width=width, label=str(domain))
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel(f"{metric} x100")
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def mtl_table(summary: Mapping[str, Any]) -> str:
    """Markdown of :func:`vlpeft_jax.experiments.multitask.sweep_summary`: one row per variant."""
    metric_cols = list(dict.fromkeys(k for row in summary.values() for k in row
                                     if k.endswith(" accuracy") or k.endswith(" mIoU")))
    cols = ["p% full (all)", "p% full (last half)", "p% masked (all)", "p% masked (last half)", *metric_cols,
            "Δm% ↓", "trainable %"]
    keys = ["p_full_all", "p_full_last_half", "p_masked_all", "p_masked_last_half", *metric_cols]
    lines = ["| variant | group | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for variant, row in summary.items():
        cells = [_cell(row.get(k), row["seeds"]) for k in keys]
        cells += [_cell(row["delta_m"], row["seeds"], 2), f"{row['trainable_pct']:.2f}"]
        lines.append(f"| {variant} | {row['group']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_conflicts(path: Path, summary: Mapping[str, Any]) -> None:
    """Bars of gradient-conflict incidence p% over all steps, of the full and of the masked gradients, per
    multi-task variant (as the thesis' Fig. 6.1), from :func:`vlpeft_jax.experiments.multitask.sweep_summary`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, row in summary.items() if row.get("p_full_all")]
    if not names:
        return
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names)), 3.8))
    x = np.arange(len(names))
    for j, (stream, label) in enumerate((("full", "full gradients"), ("masked", "under the PSN mask"))):
        vals = [summary[n].get(f"p_{stream}_all") or (np.nan, 0.0) for n in names]
        ax.bar(x + 0.4 * j - 0.2, [v[0] for v in vals], yerr=[v[1] for v in vals], width=0.4, label=label)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("conflict incidence p% (all steps)")
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def plot_vs_params(path: Path, summary: Mapping[str, Any], metric: str, domain: str = "target") -> None:
    """``metric`` on ``domain`` references (mean ± std) against each variant's trainable % (log x axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    points = [(name, max(row["trainable_pct"], 1e-6), *row[domain].get(metric, (np.nan, 0.0)))
              for name, row in summary.items()]
    finite = [m for _, _, m, _ in points if np.isfinite(m)]
    step = 0.045 * ((max(finite) - min(finite) if finite else 0.0) or 1.0)  # label height in data units
    labels: list[tuple[float, float]] = []  # (log10 x, y) of the labels placed so far
    for name, pct, mean, std in points:
        ax.errorbar([pct], [mean], yerr=[std], fmt="o", capsize=3)
        # a label that would overlap one already placed moves up until it is clear
        x, y = float(np.log10(pct)), float(mean) + 0.3 * step
        while any(abs(x - lx) < 0.15 and abs(y - ly) < step for lx, ly in labels):
            y += step
        labels.append((x, y))
        ax.annotate(name, (pct, mean), xytext=(pct * 1.05, y), fontsize=8,
                    arrowprops=dict(arrowstyle="-", lw=0.4, alpha=0.5) if y - mean > step else None)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of the base)")
    ax.set_ylabel(f"{domain} {metric} x100")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


# ------------------------------------------------------------------------------- run records and reuse


def _short(v: Any, n: int = 48) -> str:
    s = repr(v)
    return s if len(s) <= n else s[:n - 3] + "..."


@dataclasses.dataclass
class PlannedRun:
    """One variant x seed of a sweep: its config (overrides and seed applied) and what is in its directory."""

    variant: str
    seed: int
    cfg: Any
    run_dir: Path
    record_path: Path
    key: str = ""
    finished: bool = False  # the run directory holds this run's results.json (reused as it is)
    has_record: bool = False
    results: dict[str, Any] | None = None  # a finished run's results.json


def _stored_config(p: PlannedRun) -> tuple[dict[str, Any] | None, list[str] | None]:
    """The config (and overrides, when recorded) that ``p.run_dir``'s files were made with, or (None, None)."""
    for path, what in ((p.record_path, "sweep record"), (p.run_dir / "config.json", "run config")):
        if not path.is_file():
            continue
        try:
            stored = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{what} {path} cannot be read ({type(e).__name__}); the sweep cannot tell what "
                              f"{p.run_dir} was run with: move it away or use another --out") from None
        if what == "sweep record":
            p.has_record = True
            return stored.get("config"), stored.get("overrides")
        return stored, None
    return None, None


def check_planned_run(p: PlannedRun) -> None:
    """Compares ``p.run_dir``'s earlier run (if any) with ``p.cfg``; sets ``p.finished``; writes nothing.

    Raises:
      ConfigError: the directory holds files made with another config (the message names the differing keys),
        or files whose config is unknown; or it is not a directory.
    """
    if p.run_dir.exists() and not p.run_dir.is_dir():
        raise ConfigError(f"run directory {p.run_dir} is an existing file; the sweep needs it for "
                          f"{p.variant} seed {p.seed}: move it away or use another --out")
    holds_files = p.run_dir.is_dir() and any(p.run_dir.iterdir())
    if not holds_files:
        return  # a new run (a record of a run that never wrote anything is replaced)
    stored, overrides = _stored_config(p)
    if stored is None:
        raise ConfigError(f"run directory {p.run_dir} holds files but no record of the config they were made with, "
                          f"so the sweep will not reuse or overwrite them: move it away or use another --out")
    zero_shot = (stored.get("eval") or {}).get("zero_shot")
    if isinstance(zero_shot, bool):  # an existing run keeps its own zero-shot setting (not a difference)
        with p.cfg.unlocked():
            p.cfg.eval.zero_shot = zero_shot
    diff = config_differences(stored, json_config(p.cfg), COMPARE_IGNORE)
    if diff:
        shown = "; ".join(f"{k}: {_short(o)} -> {_short(n)}" for k, (o, n) in list(diff.items())[:6])
        more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
        was = (f"the overrides it was made with: {' '.join(overrides) or 'none'}" if overrides is not None
               else f"the config in {p.run_dir / 'config.json'}")
        raise ConfigError(f"run directory {p.run_dir} holds a run made with a different config ({shown}{more}); the "
                          f"sweep neither overwrites it nor publishes its numbers: rerun with {was}, or use another "
                          f"--out")
    p.finished = (p.run_dir / "results.json").is_file()
    if p.finished:
        p.results = files.read_json(p.run_dir / "results.json", what="results",
                                    hint="that run is damaged: move its directory away or use another --out")


def _run_name(variant: str, seed: int) -> str:
    return f"{variant.replace(',', '_').replace('=', '')}-seed{seed}"


def plan_sweep(config_file: str | Path, sweep: str, seeds: Sequence[int], base: Path,
               overrides: Sequence[str] = ()) -> list[PlannedRun]:
    """Every variant x seed of ``SWEEPS[sweep]`` with its config, checked against its run directory; writes
    nothing. Only the first run evaluates the shared base zero-shot (if the config asks for it)."""
    from vlpeft_jax.config import apply_overrides, load_config_file
    from vlpeft_jax.experiments import runner

    sweeps = load_sweeps(config_file)
    if sweep not in sweeps:
        raise ConfigError(f"sweep {sweep!r} is not in {config_file}; available: {', '.join(sweeps)}")
    dirs: dict[str, str] = {}
    planned = []
    for variant in sweeps[sweep]:
        for seed in seeds:
            name = _run_name(variant, seed)
            if dirs.setdefault(name, variant) != variant:
                raise ConfigError(f"variants {dirs[name]!r} and {variant!r} of sweep {sweep!r} would share the run "
                                  f"directory {name}; rename one")
            cfg = apply_overrides(load_config_file(config_file, variant), list(overrides))
            with cfg.unlocked():
                cfg.seed = int(seed)
                cfg.run_dir = str(base / name)
                if planned:  # the base is shared: evaluate it zero-shot only once
                    cfg.eval.zero_shot = False
            planned.append(PlannedRun(variant, int(seed), cfg, base / name, base / f"{name}{RECORD_SUFFIX}"))
    for p in planned:
        check_planned_run(p)
        p.key = runner.training_key(p.cfg)
    return planned


def _task_metrics(planned: Sequence[PlannedRun], metric: str | None) -> tuple[str, list[str], list[str]]:
    """The plotted metric (checked), the report metrics and the result groups of the sweep's task(s)."""
    from vlpeft_jax import tasks

    metrics: list[str] = []
    groups: list[str] = []
    for p in planned:
        task = tasks.task_class(p.cfg.get("task", "captioning"), p.cfg)
        report_metrics = task.metrics_for(p.cfg) if hasattr(task, "metrics_for") else task.report_metrics
        if metric is not None and metric not in report_metrics:
            raise ConfigError(f"--metric {metric!r} is not a report metric of the {p.cfg.get('task', 'captioning')} "
                              f"task ({p.variant}); valid: {', '.join(report_metrics)}")
        metric = metric or task.primary_metric
        metrics += [m for m in report_metrics if m not in metrics]  # every variant's (r_TCM only with TCM)
        own = task.groups_for(p.cfg) if hasattr(task, "groups_for") else task.groups
        groups += [g for g in own if g not in groups]  # every variant's (single-task runs have one head)
    assert metric is not None
    return metric, metrics, groups


def run_sweep(config_file: str | Path, sweep: str, seeds: Sequence[int], out_dir: str | Path | None = None,
              overrides: Sequence[str] = (), metric: str | None = None) -> dict[str, Any]:
    """Runs every variant x seed of ``SWEEPS[sweep]`` and writes the table and plots; returns the summary.

    Everything (the configs with ``overrides``, ``metric``, the sweep directory and every earlier run in it) is
    checked before the first run starts or the first file is written; see the module docstring.
    """
    from vlpeft_jax.experiments import runner

    overrides = list(overrides)
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"seeds {seeds}: expected distinct non-negative integers, e.g. 0,1,2")
    for o in overrides:
        if o.split("=", 1)[0] in ("--config.seed", "--config.run_dir"):
            raise ConfigError(f"{o}: a sweep sets the seed and run directory of each run itself; use --seeds and "
                              f"--out")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(out_dir) if out_dir else Path("runs") / f"sweep-{Path(config_file).stem}-{sweep}-{stamp}"
    files.check_writable_dir(base, "--out")
    planned = plan_sweep(config_file, sweep, seeds, base, overrides)
    metric, metrics, groups = _task_metrics(planned, metric)
    base.mkdir(parents=True, exist_ok=True)
    print(f"sweep directory: {base}")
    results: dict[str, list[dict[str, Any]]] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    zero_shot = None
    trained: dict[str, Path] = {}  # training key -> finished run directory
    for p in planned:
        if not p.has_record:
            record = {"variant": p.variant, "seed": p.seed, "overrides": overrides, "training_key": p.key,
                      "config": json_config(p.cfg)}
            files.write_text(p.record_path, json.dumps(record, indent=2, sort_keys=True) + "\n")
        tag = f"[{p.variant} seed {p.seed}]"
        if p.finished:
            print(f"{tag} finished earlier with the same config; reusing {p.run_dir / 'results.json'}")
            assert p.results is not None
            res = p.results
        elif p.key in trained:
            print(f"{tag} trains like {trained[p.key]}; evaluating its parameters")
            res = runner.evaluate_trained(p.cfg, trained[p.key])
        else:
            print(f"{tag} running")
            res = runner.run(p.cfg)
        trained.setdefault(p.key, Path(res.get("trained_in") or p.run_dir))
        results.setdefault(p.variant, []).append(res)
        runs.setdefault(p.variant, []).append({"seed": p.seed, "run_dir": str(p.run_dir), "training_key": p.key,
                                               "trained_in": res.get("trained_in"), "reused": p.finished})
        zero_shot = zero_shot or res.get("zero_shot")
    summary = summarize(results, metrics, groups)
    text = table(summary, zero_shot, metrics, groups)
    seeds_note = f"mean ± std over seeds {seeds} (population std, ddof=0)" if len(seeds) > 1 else f"seed {seeds[0]}"
    shown = " ".join(f"`{o}`" for o in overrides) if overrides else "none"
    files.write_text(base / "sweep.md", f"# {Path(config_file).stem}: {sweep}\n\nScores x100, {seeds_note}.\n\n"
                                        f"Config: `{config_file}`; overrides: {shown}.\n\n{text}\n")
    files.write_text(base / "sweep.json", json.dumps(
        {"config": str(config_file), "sweep": sweep, "seeds": seeds, "overrides": overrides, "metric": metric,
         "std": STD, "summary": summary, "zero_shot": zero_shot, "runs": runs}, indent=2, default=float) + "\n")
    plot(base / "sweep.png", summary, metric, groups)
    plot_vs_params(base / "sweep_params.png", summary, metric, groups[0])
    if any("mtl" in r for runs_ in results.values() for r in runs_):
        mtl = multitask.sweep_summary(results, {p.variant: (p.cfg.get("mtl") or {}).get("group", "") for p in planned})
        mtl_text = mtl_table(mtl)
        files.write_text(base / "mtl.md", f"# {Path(config_file).stem}: {sweep} (multi-task)\n\n{seeds_note}; p% = "
                                          f"gradient-conflict incidence (% of task pairs with g_i·g_j < 0 per step); "
                                          f"scores x100; Δm% against the single-task runs of the same group (flat "
                                          f"mean over metrics, lower is better).\n\n{mtl_text}\n")
        files.write_text(base / "mtl.json", json.dumps(mtl, indent=2, default=float) + "\n")
        plot_conflicts(base / "mtl_conflicts.png", mtl)
        text += "\n\n" + mtl_text
    print(text)
    print(f"sweep directory: {base}")
    return summary
