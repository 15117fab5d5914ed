"""``run.py eval --run RUN_DIR [--split val|test|ood] [--method greedy|beam] [--num-beams N] [--out DIR]``.

Decodes the evaluation split with the run's final parameters (the PEFT methods of its stages active),
writes the generated captions in COCO results format per domain, the metrics JSON and a Markdown table.
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
    if cfg.eval.method == "beam" and cfg.eval.num_beams < 2:
        cfg.eval.num_beams = 3
    from vlpeft_jax.experiments import captioning

    module, params, tokenizer, methods = captioning.load_final(args.run, cfg)
    world = captioning.load_world(cfg)
    active = tuple(dict.fromkeys(n for s in cfg.stages for n in s.get("methods", ())))
    res = captioning.evaluate(module, params, [(n, methods[n]) for n in active], tokenizer, world, cfg)
    out = args.out or args.run / f"eval-{cfg.eval.split}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "captions.json").write_text(json.dumps(
        [{"image_id": i, "caption": c} for i, c in res["captions"].items()], indent=1))
    metrics = {d: res[d] for d in captioning.DOMAINS}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    names = list(cfg.eval.metrics)
    lines = ["| domain | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for d in captioning.DOMAINS:
        sc = res[d]["metrics"]
        lines.append(f"| {d} | " + " | ".join(f"{100 * sc[m]:.1f}" if m in sc else "n/a" for m in names) + " |")
    table = "\n".join(lines)
    (out / "metrics.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out}")
    return 0
