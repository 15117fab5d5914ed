"""``run.py [train] [--config configs/X.py] [--config.key=value ...]``: run one experiment end to end.

With no ``--config`` it runs the main job, ``configs/shapes_lora.py``. Any task (``config.task``) goes through
the one runner, :mod:`vlpeft_jax.experiments.runner`.
"""

from __future__ import annotations

import argparse

from vlpeft_jax.cli.config import split_config_args

DEFAULT_CONFIG = "configs/shapes_lora.py"


def main(argv: list[str]) -> int:
    cfg, rest = split_config_args(argv, default=DEFAULT_CONFIG)
    parser = argparse.ArgumentParser(prog="run.py train", description=__doc__)
    parser.parse_args(rest)
    from vlpeft_jax.experiments import runner

    runner.run(cfg)
    return 0
