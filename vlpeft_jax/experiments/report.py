"""What a run leaves for people to read: ``report.md`` (the task's table, the trainable count, sample outputs),
``results.json``, each evaluation's predictions in the task's results format, ``scores.png`` (zero-shot vs
adapted per metric and result group) and ``samples.png`` (evaluation images with each model's output and a
reference below them). Every file is written atomically; ``results.json`` last, so its presence marks a run
finished (:func:`vlpeft_jax.experiments.runner.is_finished`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from vlpeft_jax import files

RESULT_LABELS = (("zero-shot", "zero_shot"), ("adapted", "adapted"))


def results_table(results: Mapping[str, Any], task: Any, name: str) -> str:
    """Markdown: a row per model (zero-shot, this run) and result group, the task's report metrics x100."""
    metrics = list(task.report_metrics)
    lines = [f"| model | {task.group_label} | " + " | ".join(metrics) + " | trainable % |",
             "|" + "---|" * (len(metrics) + 3)]
    rows = [("zero-shot", results.get("zero_shot"), 0.0),
            (name, results.get("adapted"), results["params"]["trainable_pct"])]
    for label, res, pct in rows:
        if not res:
            continue
        for group in task.groups:
            sc = res[group]["metrics"]
            cells = [f"{100 * sc[m]:.1f}" if m in sc else "n/a" for m in metrics]
            lines.append(f"| {label} | {group} | " + " | ".join(cells) + f" | {pct:.2f} |")
    return "\n".join(lines)


def write_report(run_dir: Path, task: Any, cfg: ml_collections.ConfigDict, results: dict[str, Any]) -> None:
    """``report.md``, ``results.json``, the outputs of each evaluation, ``scores.png`` and ``samples.png``."""
    table = results_table(results, task, cfg.name)
    adapted = results.get("adapted") or {}
    unavailable = {k: v for g in task.groups for k, v in adapted.get(g, {}).get("unavailable", {}).items()}
    text = [f"# {cfg.name}", "", f"Task: {task.name}. Scores x100 on the evaluation split ({cfg.eval.split}); "
            f"{task.group_note}", "", table, ""]
    text += [f"- {k} unavailable: {v}" for k, v in unavailable.items()]
    text += ["", f"Trainable parameters: {results['params']['trainable']:,} of "
             f"{results['params']['base_total']:,} base ({results['params']['trainable_pct']:.2f}%).",
             f"Wall time: {results['wall_time_s']:.0f} s.", "", "![samples](samples.png)", "",
             "Sample outputs (adapted):", ""]
    text += [f"- `{s['id']}`: {s['output']}" for s in adapted.get("samples", [])]
    files.write_text(run_dir / "report.md", "\n".join(text) + "\n")
    slim = dict(results)
    for key in ("zero_shot", "adapted"):
        if key in slim:
            slim[key] = {k: v for k, v in slim[key].items() if k != "outputs"}
            name, rows = task.outputs_file(results[key]["outputs"])
            files.write_json(run_dir / f"{name}_{key}.json", rows, indent=1)
    files.write_json(run_dir / "results.json", slim)  # last: its presence marks the run finished
    plot_scores(run_dir / "scores.png", results, task, cfg.name)
    evaluated = {label: results[key] for label, key in RESULT_LABELS if key in results}
    plot_samples(run_dir / "samples.png", task.samples(evaluated, 6))
    print(table)


def plot_scores(path: Path, results: Mapping[str, Any], task: Any, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = task.groups
    metrics = [m for m in task.report_metrics if any(m in results["adapted"][g]["metrics"] for g in groups)]
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.5), sharey=True, squeeze=False)
    for ax, group in zip(axes[0], groups, strict=True):
        x = np.arange(len(metrics))
        for j, (label, key) in enumerate((("zero-shot", "zero_shot"), (name, "adapted"))):
            if key in results:
                vals = [100 * results[key][group]["metrics"].get(m, np.nan) for m in metrics]
                ax.bar(x + 0.4 * j - 0.2, vals, width=0.4, label=label)
        ax.set_xticks(x, metrics, rotation=20 if len(metrics) > 5 else 0)
        ax.set_title(f"{group}")
    axes[0][0].set_ylabel("score x100")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_samples(path: Path, samples: Sequence[Any]) -> None:
    """A grid of evaluation images, each with its lines below it (outputs per model and a reference)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not samples:
        return
    cols = min(3, len(samples))
    rows = (len(samples) + cols - 1) // cols
    texts = ["\n".join(textwrap.fill(line, 46) for line in s.lines) for s in samples]
    text_lines = [max((t.count("\n") + 1 for t in texts[r * cols:(r + 1) * cols]), default=1) for r in range(rows)]
    heights = [h for r in range(rows) for h in (2.8, 0.16 * text_lines[r] + 0.3)]
    fig, axes = plt.subplots(2 * rows, cols, figsize=(4.4 * cols, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights, "hspace": 0.05, "wspace": 0.08})
    for ax in axes.flat:
        ax.axis("off")
    for k, (s, text) in enumerate(zip(samples, texts, strict=True)):
        r, c = divmod(k, cols)
        axes[2 * r][c].imshow(s.image)
        axes[2 * r + 1][c].text(0.0, 1.0, text, fontsize=7, va="top", ha="left", family="monospace",
                                transform=axes[2 * r + 1][c].transAxes)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
