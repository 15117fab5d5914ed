"""Linear scalarisation: Joint Train (thesis Eq. 6.2) and fixed-weight sums of the task losses.

The loss is ``reduce_t(w_t L_t)`` with fixed ``w`` (all ones unless the ``weights`` option gives them) and
``reduce`` = mean (``reduction="mean"``, the thesis's Joint Train ``L = (1/T) Σ_t L_t``, Eq. 6.2 of
``../shared/seeds/004_21d0d480fe4006f4.txt`` ch. 6; spec ``../shared/specs/sparse_mtl.md`` §2.0, A5) or sum
(``reduction="sum"``, nash-mtl / FAMO ``ls`` and LibMTL ``EW``, §2.9). So the per-task weights are ``w / T`` or
``w``, ``direction = Σ_t weights_t g_t`` and head ``t`` gets ``weights_t ∇L_t``. Neither codebase clips (§2.0).

Example:
    >>> import jax.numpy as jnp
    >>> g = jnp.array([[1.0, 0.0], [-1.0, 1.0]])
    >>> linear(g).direction.tolist(), linear(g, reduction="sum").direction.tolist()
    ([0.0, 0.5], [0.0, 1.0])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.mtl.base import Combined, GMMethod, check_grads

_HI = jax.lax.Precision.HIGHEST
REDUCTIONS = ("mean", "sum")


def linear(grads: jax.Array, *, losses: jax.Array | None = None, state: Any = None, key: jax.Array | None = None,
           reduction: str = "mean", weights: Sequence[float] | None = None) -> Combined:
    """Fixed linear scalarisation of ``grads`` ``[T, P]``: ``direction = Σ_t weights_t g_t``.

    Args:
      grads: ``[T, P]`` per-task gradients of the shared parameters.
      losses: unused (checked for shape only).
      state: passed through unchanged (stateless).
      key: unused.
      reduction: ``"mean"`` (thesis Eq. 6.2: weights ``w / T``) or ``"sum"`` (nash-mtl ``ls``: weights ``w``).
      weights: fixed per-task loss weights ``w`` (length ``T``); None means all ones.

    Returns:
      :class:`Combined` with the direction, the weights ``w / T`` or ``w``, and ``state``.

    Raises:
      ConfigError: an unknown ``reduction`` or ``weights`` of the wrong length.

    Example:
        >>> import jax.numpy as jnp
        >>> g = jnp.array([[2.0, 0.0], [0.0, 4.0]])
        >>> out = linear(g, reduction="sum", weights=(0.5, 0.25))
        >>> out.weights.tolist(), out.direction.tolist()
        ([0.5, 0.25], [1.0, 1.0])
    """
    if reduction not in REDUCTIONS:
        raise ConfigError(f"ls: reduction={reduction!r} is not valid; valid: {', '.join(REDUCTIONS)}")
    check_grads(grads, losses)
    g = jnp.asarray(grads, jnp.float32)
    num_tasks = g.shape[0]
    if weights is None:
        w = jnp.ones((num_tasks,), jnp.float32)
    else:
        w = jnp.asarray(weights, jnp.float32)
        if w.shape != (num_tasks,):
            raise ConfigError(f"ls: weights={weights!r} has shape {w.shape}; it needs one entry per task "
                              f"(shape ({num_tasks},))")
    if reduction == "mean":
        w = w / num_tasks
    return Combined(jnp.dot(w, g, precision=_HI), w, () if state is None else state)


METHOD = GMMethod(
    name="ls",
    fn=linear,
    defaults={"reduction": "mean", "weights": None},
    min_tasks=1,
    clip={"famo_codebase": None, "nash_codebase": None},
    kind="weighting",
    reference="Joint Train, thesis Eq. 6.2 (mean); nash-mtl/FAMO LinearScalarization (sum), LibMTL EW; "
              "spec sparse_mtl.md §2.0 (A5), §2.9",
)
