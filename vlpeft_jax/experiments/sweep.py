"""Sweeps: several variants of a config (and seeds), one table and one bar plot.

A sweepable config module defines ``get_config(variant)`` and ``SWEEPS = {name: [variant, ...]}``.
``python run.py sweep --config configs/shapes_compare_003.py --sweep table --seeds 0,1,2`` runs every
variant for every seed (each in its own run directory under the sweep directory, so a killed sweep
resumes: finished runs are skipped, a half-finished one resumes from its checkpoints; a variant that trains
exactly like an earlier one of the same seed, differing only in evaluation settings, is evaluated on that
run's parameters instead of being trained again, see :func:`runner.training_key`), then writes
``sweep.md`` (mean ± std over seeds when there are several), ``sweep.json``, ``sweep.png`` (bars per
variant) and ``sweep_params.png`` (target-domain metric against trainable %, log scale).

Example:
    >>> summarize({"a": [{"adapted": {"target": {"metrics": {"CIDEr-D": 0.5}}}, "params": {"trainable_pct": 1.0}},
    ...                  {"adapted": {"target": {"metrics": {"CIDEr-D": 0.7}}}, "params": {"trainable_pct": 1.0}}]},
    ...           ["CIDEr-D"], ["target"])["a"]["target"]["CIDEr-D"]
    (60.0, 10.0)
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlpeft_jax.errors import ConfigError

DOMAINS = ("target", "source")


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
    """Per variant, domain and metric: (mean, std) of score x100 over the seeds; plus zero-shot and params."""
    out: dict[str, Any] = {}
    for variant, runs in results.items():
        row: dict[str, Any] = {"seeds": len(runs)}
        for domain in domains:
            row[domain] = {}
            for m in metrics:
                vals = [100 * r["adapted"][domain]["metrics"][m] for r in runs
                        if m in r["adapted"][domain]["metrics"]]
                if vals:
                    row[domain][m] = (float(np.mean(vals)), float(np.std(vals)))
        row["trainable_pct"] = float(np.mean([r["params"]["trainable_pct"] for r in runs]))
        out[variant] = row
    return out


def _cell(v: tuple[float, float] | None, seeds: int) -> str:
    if v is None:
        return "n/a"
    return f"{v[0]:.1f} ± {v[1]:.1f}" if seeds > 1 else f"{v[0]:.1f}"


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


def plot(path: Path, summary: Mapping[str, Any], metric: str, groups: Sequence[str] = DOMAINS) -> None:
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
    fig.savefig(path, dpi=100)
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
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_sweep(config_file: str | Path, sweep: str, seeds: Sequence[int], out_dir: str | Path | None = None,
              overrides: Sequence[str] = (), metric: str = "CIDEr-D") -> dict[str, Any]:
    """Runs every variant x seed of ``SWEEPS[sweep]`` and writes the table and plot; returns the summary."""
    from vlpeft_jax import tasks
    from vlpeft_jax.config import apply_overrides, load_config_file
    from vlpeft_jax.experiments import runner

    sweeps = load_sweeps(config_file)
    if sweep not in sweeps:
        raise ConfigError(f"sweep {sweep!r} is not in {config_file}; available: {', '.join(sweeps)}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(out_dir) if out_dir else Path("runs") / f"sweep-{Path(config_file).stem}-{sweep}-{stamp}"
    base.mkdir(parents=True, exist_ok=True)
    print(f"sweep directory: {base}")
    results: dict[str, list[dict[str, Any]]] = {}
    zero_shot = None
    metrics: list[str] = []
    groups: list[str] = list(DOMAINS)
    trained: dict[str, Path] = {}  # training key -> finished run directory
    for variant in sweeps[sweep]:
        for seed in seeds:
            cfg = apply_overrides(load_config_file(config_file, variant), list(overrides))
            cfg.seed = int(seed)
            safe = variant.replace(",", "_").replace("=", "")
            cfg.run_dir = str(base / f"{safe}-seed{seed}")
            if zero_shot is not None or results:  # the base is shared: evaluate it zero-shot only once
                cfg.eval.zero_shot = False
            done = Path(cfg.run_dir) / "results.json"
            key = runner.training_key(cfg)
            if done.is_file():
                print(f"[{variant} seed {seed}] finished earlier; reusing {done}")
                res = json.loads(done.read_text())
            elif key in trained:
                print(f"[{variant} seed {seed}] trains like {trained[key]}; evaluating its parameters")
                res = runner.evaluate_trained(cfg, trained[key])
            else:
                print(f"[{variant} seed {seed}] running")
                res = runner.run(cfg)
            trained.setdefault(key, Path(res.get("trained_in") or cfg.run_dir))
            results.setdefault(variant, []).append(res)
            task = tasks.task_class(cfg.get("task", "captioning"))
            metrics, groups = list(task.report_metrics), list(task.groups_for(cfg))
            zero_shot = zero_shot or res.get("zero_shot")
    summary = summarize(results, metrics, groups)
    text = table(summary, zero_shot, metrics, groups)
    seeds_note = f"mean ± std over seeds {list(seeds)}" if len(seeds) > 1 else f"seed {seeds[0]}"
    (base / "sweep.md").write_text(f"# {Path(config_file).stem}: {sweep}\n\nScores x100, {seeds_note}.\n\n{text}\n")
    (base / "sweep.json").write_text(json.dumps({"summary": summary, "zero_shot": zero_shot}, indent=2))
    plot(base / "sweep.png", summary, metric, groups)
    plot_vs_params(base / "sweep_params.png", summary, metric, groups[0])
    print(text)
    print(f"sweep directory: {base}")
    return summary
