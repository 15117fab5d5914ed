"""``run.py bench NAME [--out FILE.json] [options]``: benchmarks that print ratios measured side by side.

Each benchmark is a function ``run(argv: list[str]) -> dict`` in its own module of :mod:`vlpeft_jax.benchmarks`;
it prints its table and returns the results, which are written as JSON to ``--out`` when given (checked
before the benchmark runs: not a directory, its folder writable; written atomically).
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

from vlpeft_jax import files
from vlpeft_jax.errors import ConfigError

BENCHMARKS = {
    "decode": "vlpeft_jax.benchmarks.decode",
    "klaft": "vlpeft_jax.benchmarks.klaft",
    "metrics": "vlpeft_jax.benchmarks.metrics",
    "train": "vlpeft_jax.benchmarks.train",
    "sparse": "vlpeft_jax.benchmarks.sparse",
    "mtl": "vlpeft_jax.benchmarks.mtl",
    "remat": "vlpeft_jax.benchmarks.remat",
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="run.py bench", description=__doc__)
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args, rest = parser.parse_known_args(argv)
    if args.out is not None:
        from vlpeft_jax.cli.score import check_output_file

        check_output_file(args.out, "--out", example=f"{args.name}.json")
    try:
        module = importlib.import_module(BENCHMARKS[args.name])
    except ModuleNotFoundError as e:
        if e.name == BENCHMARKS[args.name]:
            raise ConfigError(f"benchmark {args.name!r} is not available in this version") from None
        raise
    results = module.run(rest)
    if args.out is not None:
        files.write_text(args.out, json.dumps(results, indent=2, sort_keys=True))
        print(f"wrote {args.out}")
    return 0
