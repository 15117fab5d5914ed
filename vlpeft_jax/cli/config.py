"""``--config FILE[:variant]`` and ``--config.key=value`` arguments of the subcommands.

Loading, overriding and checking configs is :mod:`vlpeft_jax.config`; this module pulls the arguments out of a
command line and checks the result (:func:`vlpeft_jax.config.validate`, with the registered tasks) before any
work.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections

from vlpeft_jax import tasks
from vlpeft_jax.config import apply_overrides, load_config_file, validate
from vlpeft_jax.errors import ConfigError


def split_config_args(argv: Sequence[str], default: str | None = None
                      ) -> tuple[ml_collections.ConfigDict | None, list[str]]:
    """Pulls ``--config FILE`` / ``--config=FILE`` and ``--config.k=v`` out of ``argv``.

    Returns the loaded, overridden and validated config (or None if there was no ``--config`` and no default)
    and the remaining arguments.

    Raises:
      ConfigError: for a missing or broken config file, a bad override or an invalid setting.
    """
    rest: list[str] = []
    overrides: list[str] = []
    path = default
    i = 0
    argv = list(argv)
    while i < len(argv):
        a = argv[i]
        if a == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file, e.g. --config configs/shapes_lora.py")
            path = argv[i + 1]
            i += 2
            continue
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a.startswith("--config."):
            overrides.append(a)
        else:
            rest.append(a)
        i += 1
    if path is None:
        if overrides:
            raise ConfigError("--config.key=value overrides need a --config file")
        return None, rest
    cfg = apply_overrides(load_config_file(path), overrides)
    validate(cfg, tasks=tasks.TASKS)
    return cfg, rest
