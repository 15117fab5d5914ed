"""``run.py sweep --config configs/X.py --sweep NAME [--seeds 0,1,2] [--out DIR] [--metric M] [--config.k=v ...]``.

Runs every variant of ``SWEEPS[NAME]`` in the config module for every seed and writes one Markdown
table (mean ± population std over seeds), ``sweep.json`` and the plots; finished runs in ``--out`` are reused
only when they were made with the same config (overrides included), anything else is refused before any run;
see :mod:`vlpeft_jax.experiments.sweep`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vlpeft_jax.config import CONFIG_DIR
from vlpeft_jax.errors import ConfigError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="run.py sweep", description=__doc__)
    parser.add_argument("--config", required=True, help="a config module that defines SWEEPS")
    parser.add_argument("--sweep", required=True, help="which entry of SWEEPS")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--out", type=Path, default=None, help="sweep directory (default runs/sweep-...)")
    parser.add_argument("--metric", default=None,
                        help="metric of the plots, one of the task's report metrics (default: its primary metric)")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        raise ConfigError(f"unknown arguments {bad}; overrides look like --config.key=value")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds={args.seeds!r}; expected comma-separated integers") from None
    config = Path(args.config)
    if not config.is_file() and (CONFIG_DIR / config.name).is_file():
        config = CONFIG_DIR / config.name
    from vlpeft_jax.experiments.sweep import run_sweep

    run_sweep(config, args.sweep, seeds or [0], args.out, overrides, args.metric)
    return 0
