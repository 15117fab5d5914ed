"""Gradient-manipulation methods by name, and :func:`combine` over a stacked ``[T, P]`` matrix.

Each method lives in its own module of :mod:`vlpeft_jax.mtl` and exports ``METHOD``
(a :class:`~vlpeft_jax.mtl.base.GMMethod`); modules load on first use.

Example:
    >>> import jax.numpy as jnp
    >>> g = jnp.array([[1.0, 0.0], [-1.0, 1.0]])
    >>> combine("pcgrad", g).tolist()  # each projected off the other's conflicting direction, then summed
    [0.5, 1.5]
    >>> combine("ls", g).tolist()  # Joint Train: the mean (thesis Eq. 6.2)
    [0.0, 0.5]
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.mtl.base import Combined, GMMethod, check_grads

MODULES = {
    "ls": "linear", "pcgrad": "pcgrad", "cagrad": "cagrad", "graddrop": "graddrop", "mgda": "mgda",
    "imtlg": "imtl", "nashmtl": "nash", "famo": "famo", "uw": "uw", "dwa": "dwa", "rlw": "rlw",
    "aligned": "aligned",
}
"""Registry name -> module of :mod:`vlpeft_jax.mtl` holding ``METHOD``."""

ALIASES = {"joint": "ls", "jt": "ls", "imtl": "imtlg", "imtl_g": "imtlg", "nash": "nashmtl", "nash_mtl": "nashmtl",
           "aligned_mtl": "aligned"}


def names() -> tuple[str, ...]:
    """Every registered method name."""
    return tuple(MODULES)


def get(name: str, where: str = "mtl.method") -> GMMethod:
    """The :class:`GMMethod` called ``name`` (or an alias: ``joint``, ``nash``, ``imtl``, ...).

    Raises:
      ConfigError: an unknown name (the message lists the valid ones).
    """
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in MODULES:
        raise ConfigError(f"{where}={name!r}: unknown gradient-manipulation method; valid: {', '.join(MODULES)}")
    module = importlib.import_module(f"vlpeft_jax.mtl.{MODULES[key]}")
    return module.METHOD


def combine(name: str, grads: jax.Array, *, losses: jax.Array | None = None, state: Any = None,
            key: jax.Array | None = None, return_all: bool = False, **options: Any) -> jax.Array | Combined:
    """The combined ``[P]`` direction of method ``name`` for stacked task gradients ``grads`` ``[T, P]``.

    Args:
      name: a registered method (:func:`names`).
      grads: ``[T, P]``, one flattened task gradient per row.
      losses: ``[T]`` task losses (methods that read them: FAMO, DWA, UW).
      state: the method's state; None starts from ``GMMethod.init_state(T)``.
      key: PRNG key for random methods (PCGrad's task order, GradDrop, RLW); None uses ``PRNGKey(0)``.
      return_all: return the whole :class:`Combined` (direction, per-task weights, new state).
      **options: the method's options (e.g. ``c=0.4`` for CAGrad); unknown ones are a :class:`ConfigError`.

    Raises:
      ConfigError: unknown method or option, or fewer tasks than the method needs.
      InputError: ``grads`` not ``[T, P]`` or ``losses`` not ``[T]``.
    """
    method = get(name, "method")
    grads = jnp.asarray(grads)
    check_grads(grads, losses)
    method.check_tasks(grads.shape[0], "combine")
    opts = method.options(options, "combine")
    if method.uses_losses and losses is None:
        raise ConfigError(f"combine: method {method.name!r} reads the task losses; pass losses=[T]")
    if state is None:
        state = method.initial_state(grads.shape[0], opts)
    if key is None:
        key = jax.random.PRNGKey(0)
    out = method.fn(grads, losses=None if losses is None else jnp.asarray(losses, jnp.float32), state=state,
                    key=key, **opts)
    return out if return_all else out.direction


def method_options(name: str, options: Mapping[str, Any], where: str = "mtl.options") -> dict[str, Any]:
    """The method's defaults updated with ``options`` (checked)."""
    return get(name).options(options, where)
