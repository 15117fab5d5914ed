#!/usr/bin/env python
"""vlpeft_jax command line: ``python run.py [SUBCOMMAND] [--config configs/X.py] [--config.key=value ...]``.

With no subcommand it runs the main job (``train`` on the default config). Each subcommand lives in
``vlpeft_jax/cli/<name>.py`` as ``main(argv) -> int``. User errors (:class:`vlpeft_jax.VLPeftError`)
print one line and exit with status 2.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "train": "train, evaluate and report one experiment (the default)",
    "sweep": "run every variant (x seeds) of a config's SWEEPS entry; one table and plot",
    "eval": "decode and score a run directory or checkpoint",
    "score": "score a COCO-format results file against caption annotations",
    "export": "export adapters (e.g. to Hugging Face PEFT format)",
    "generate": "caption or answer about images with a checkpoint folder or a run directory",
    "params": "print total/trainable parameter counts (abstract shapes, no memory)",
    "plan": "per-device memory of a train step on a (simulated) mesh; does it fit (abstract shapes)",
    "bench": "benchmarks: decode, metrics, train, sparse, mtl",
    "analyze": "attention knockout, logit lens, module knockout, effective rank of a trained model",
}


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        for name, text in SUBCOMMANDS.items():
            print(f"  {name:8s} {text}")
        return 0
    name = "train"
    if argv and not argv[0].startswith("-"):
        name, argv = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"error: unknown subcommand {name!r}; valid: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    from vlpeft_jax.errors import VLPeftError

    try:
        module = importlib.import_module(f"vlpeft_jax.cli.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"vlpeft_jax.cli.{name}":
            print(f"error: subcommand {name!r} is not available in this version", file=sys.stderr)
            return 2
        raise
    try:
        return int(module.main(argv) or 0)
    except VLPeftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
