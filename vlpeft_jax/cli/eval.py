"""``run.py eval --run RUN_DIR [--split S] [--method greedy|beam] [--num-beams K] [--length-penalty P]
[--max-new-tokens T] [--max-examples N|all] [--out DIR] [--force]``.

Evaluates the run's final parameters (the PEFT methods of its stages active) with the run's task: writes the
predictions in the task's results format (captions: COCO results), the metrics JSON and a Markdown table.
Options not given keep the run's own ``eval`` settings.

- Every option is checked before any work: ``--max-examples`` is ``>= 1`` (or ``all``), ``--num-beams`` is
  ``>= 1`` and ``--method beam`` needs ``>= 2`` (without ``--num-beams`` it uses the run's ``eval.num_beams``
  when that is ``>= 2``, else 3); ``--num-beams > 1`` and ``--length-penalty`` need beam search;
  ``--max-new-tokens`` is ``>= 1``. A task that does not decode (classification) takes only ``--split`` and
  ``--max-examples``.
- Each evaluation has its own folder, named by its settings, inside the run directory:
  ``eval-<split>-greedy-t<max_new_tokens>-n<max_examples|all>`` or
  ``eval-<split>-beam<K>-lp<P>-t<max_new_tokens>-n<...>`` (``eval-<split>-n<...>`` for a task that does not
  decode), unless ``--out`` is given. ``metrics.json`` records every setting under ``"settings"`` (split,
  method, num_beams, length_penalty, max_new_tokens, max_examples, the run directory, the time).
- Nothing is rewritten: an output folder that already holds an evaluation with the same settings is reported
  ("already evaluated") and kept; one with different settings, or a non-empty ``--out`` folder, is refused
  unless ``--force``. The output folder is checked (not a file, writable) before the model is loaded, and
  every file is written atomically (temporary file, then rename), ``metrics.json`` last.
"""

from __future__ import annotations

import argparse
import datetime
import math
from pathlib import Path
from typing import Any

import ml_collections

from vlpeft_jax import files
from vlpeft_jax.config import max_examples_arg, read_run_config
from vlpeft_jax.errors import ConfigError, InputError

DECODING_KEYS = ("method", "num_beams", "length_penalty", "max_new_tokens")
DEFAULT_BEAMS = 3  # --method beam without --num-beams, when the run's eval.num_beams is < 2


def eval_settings(cfg: ml_collections.ConfigDict, args: argparse.Namespace) -> dict[str, Any]:
    """The evaluation settings: the run's ``eval`` section with the command-line options applied, validated.

    Raises :class:`ConfigError` naming the option and what is valid; nothing is clamped.
    """
    ev = cfg.eval
    decodes = "method" in ev
    given = {k: getattr(args, k) for k in DECODING_KEYS if getattr(args, k) is not None}
    if not decodes and given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ConfigError(f"{flags}: the run's task ({cfg.get('task', 'captioning')}) does not decode; only "
                          "--split and --max-examples apply")
    settings: dict[str, Any] = {"split": args.split if args.split is not None else ev.get("split", "val")}
    if not isinstance(settings["split"], str) or not settings["split"]:
        raise ConfigError(f"--split {settings['split']!r}: expected a split name (e.g. val, test, ood)")
    if decodes:
        method = given.get("method", ev.method)
        if args.num_beams is not None and args.num_beams < 1:
            raise ConfigError(f"--num-beams {args.num_beams}: must be >= 1 (>= 2 with --method beam)")
        if method == "beam":
            beams = args.num_beams if args.num_beams is not None else (
                ev.num_beams if ev.get("num_beams", 1) >= 2 else DEFAULT_BEAMS)
            if beams < 2:
                raise ConfigError(f"--num-beams {beams}: beam search needs >= 2 beams (or use --method greedy)")
        elif method == "greedy":
            if args.num_beams is not None and args.num_beams > 1:
                raise ConfigError(f"--num-beams {args.num_beams} needs --method beam (this evaluation is greedy)")
            if args.length_penalty is not None:
                raise ConfigError("--length-penalty applies to beam search only; add --method beam")
            beams = 1
        else:
            raise ConfigError(f"the run's eval.method={method!r}; valid: greedy, beam (set --method)")
        lp = float(args.length_penalty if args.length_penalty is not None else ev.get("length_penalty", 1.0))
        if not math.isfinite(lp):
            raise ConfigError(f"--length-penalty {lp}: must be a finite number")
        tokens = args.max_new_tokens if args.max_new_tokens is not None else ev.max_new_tokens
        if tokens < 1:
            raise ConfigError(f"--max-new-tokens {tokens}: must be >= 1")
        settings.update(method=method, num_beams=int(beams), length_penalty=lp if method == "beam" else None,
                        max_new_tokens=int(tokens))
    n = args.max_examples if args.max_examples is not None else int(ev.get("max_examples", 0) or 0)
    settings["max_examples"] = n or None  # None: every example of the split
    return settings


def folder_name(s: dict[str, Any]) -> str:
    """``eval-val-greedy-t40-n8``, ``eval-val-beam3-lp0.6-t40-nall``, ``eval-val-nall`` (no decoding)."""
    parts = ["eval", s["split"]]
    if "method" in s:
        parts.append("greedy" if s["method"] == "greedy" else f"beam{s['num_beams']}-lp{s['length_penalty']:g}")
        parts.append(f"t{s['max_new_tokens']}")
    parts.append(f"n{s['max_examples'] or 'all'}")
    return "-".join(parts)


def _existing_settings(out: Path) -> dict[str, Any] | None:
    try:
        previous = files.read_json(out / "metrics.json", what="metrics")
    except InputError:
        return None
    return previous.get("settings") if isinstance(previous, dict) else None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="run.py eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished run directory")
    parser.add_argument("--split", default=None, help="evaluation split (default: the run's eval.split)")
    parser.add_argument("--method", choices=("greedy", "beam"), default=None)
    parser.add_argument("--num-beams", type=int, default=None, help=">= 2 with --method beam")
    parser.add_argument("--length-penalty", type=float, default=None, help="beam search only")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--max-examples", default=None, help="an integer >= 1, or 'all'")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: RUN/eval-<settings>, see above)")
    parser.add_argument("--force", action="store_true",
                        help="evaluate again into an output folder that already holds files")
    args = parser.parse_args(argv)
    if args.max_examples is not None:
        args.max_examples = max_examples_arg(args.max_examples)
    cfg = read_run_config(args.run)
    settings = eval_settings(cfg, args)
    settings["run"] = str(args.run.resolve())

    out = args.out if args.out is not None else args.run / folder_name(settings)
    files.check_writable_dir(out, "--out" if args.out is not None else "the evaluation folder")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        previous = _existing_settings(out)
        if previous is not None:
            differ = sorted(k for k in set(previous) | set(settings) if k != "time"
                            and previous.get(k) != settings.get(k))
            if not differ:
                print(f"already evaluated with these settings: {out} (--force evaluates again)")
                if (out / "metrics.md").is_file():
                    print((out / "metrics.md").read_text().rstrip())
                return 0
            raise ConfigError(f"{out} holds an evaluation with different settings ({', '.join(differ)}); "
                              "choose another --out or pass --force to replace it")
        if args.out is not None:
            raise ConfigError(f"--out {out} is not empty; choose an empty or new directory, or pass --force to "
                              "write into it")

    for key in DECODING_KEYS:
        if key in settings:
            cfg.eval[key] = settings[key] if settings[key] is not None else cfg.eval.get(key)
    cfg.eval.split = settings["split"]
    cfg.eval.max_examples = settings["max_examples"] or 0
    from vlpeft_jax.experiments import runner

    setup, params = runner.load_final(args.run, cfg)
    task = setup.task
    res = task.evaluate(setup.module, params, setup.active())
    settings["time"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    name, rows = task.outputs_file(res["outputs"])
    names = list(task.report_metrics)
    lines = [f"| {task.group_label} | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for g in task.groups:
        sc = res[g]["metrics"]
        lines.append(f"| {g} | " + " | ".join(f"{100 * sc[m]:.1f}" if m in sc else "n/a" for m in names) + " |")
    table = "\n".join(lines)
    files.write_json(out / f"{name}.json", rows, indent=1)
    files.write_text(out / "metrics.md", table + "\n")
    # last: a folder whose metrics.json exists holds a complete evaluation with these settings
    files.write_json(out / "metrics.json", {"settings": settings, **{g: res[g] for g in task.groups}})
    print(table)
    print(f"wrote {out}")
    return 0
