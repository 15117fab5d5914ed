"""``run.py [train] [--config configs/X.py] [--config.key=value ...]``: run one experiment end to end.

With no ``--config`` it runs the main job, ``configs/shapes_lora.py``.
"""

from __future__ import annotations

import argparse

from vlpeft_jax.cli.config import split_config_args

DEFAULT_CONFIG = "configs/shapes_lora.py"


def main(argv: list[str]) -> int:
    cfg, rest = split_config_args(argv, default=DEFAULT_CONFIG)
    parser = argparse.ArgumentParser(prog="run.py train", description=__doc__)
    parser.parse_args(rest)
    from vlpeft_jax.experiments import captioning

    captioning.run(cfg)
    return 0
