"""``run.py eval --run RUN_DIR [--split val|test|ood] [--method greedy|beam] [--num-beams N] [--out DIR]``.

Evaluates the run's final parameters (the PEFT methods of its stages active) with the run's task: writes the
predictions in the task's results format (captions: COCO results), the metrics JSON and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import ml_collections

from vlpeft_jax.errors import ConfigError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="run.py eval", description=__doc__)
    parser.add_argument("--run", type=Path, required=True, help="a finished run directory")
    parser.add_argument("--split", default=None, help="evaluation split (default: the run's eval.split)")
    parser.add_argument("--method", choices=("greedy", "beam"), default=None)
    parser.add_argument("--num-beams", type=int, default=None)
    parser.add_argument("--max-examples", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: RUN/eval-<split>)")
    args = parser.parse_args(argv)
    cfg_file = args.run / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{args.run} is not a run directory (no config.json)")
    cfg = ml_collections.ConfigDict(json.loads(cfg_file.read_text()))
    for key, value in (("split", args.split), ("method", args.method), ("num_beams", args.num_beams),
                       ("max_examples", args.max_examples)):
        if value is not None:
            cfg.eval[key] = value
    if cfg.eval.get("method") == "beam" and cfg.eval.get("num_beams", 1) < 2:
        cfg.eval.num_beams = 3
    from vlpeft_jax.experiments import runner

    setup, params = runner.load_final(args.run, cfg)
    task = setup.task
    res = task.evaluate(setup.module, params, setup.active())
    out = args.out or args.run / f"eval-{cfg.eval.split}"
    out.mkdir(parents=True, exist_ok=True)
    name, rows = task.outputs_file(res["outputs"])
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    metrics = {g: res[g] for g in task.groups}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    names = list(task.report_metrics)
    lines = [f"| {task.group_label} | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for g in task.groups:
        sc = res[g]["metrics"]
        lines.append(f"| {g} | " + " | ".join(f"{100 * sc[m]:.1f}" if m in sc else "n/a" for m in names) + " |")
    table = "\n".join(lines)
    (out / "metrics.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out}")
    return 0
