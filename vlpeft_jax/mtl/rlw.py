"""Random loss weighting (RLW; Lin et al., 2022), as nash-mtl / FAMO run it.

``../shared/specs/sparse_mtl.md`` §2.9 (a library extra): ``w = softmax(ε)``, ``ε ~ N(0, I_T)`` drawn afresh each
step (here from ``key``), loss ``Σ_t w_t L_t``; so ``weights = w`` (sum 1) and ``direction = Σ_t w_t g_t``.
Neither preset clips (§2.0).

Example:
    >>> import jax, jax.numpy as jnp
    >>> out = rlw(jnp.eye(3), key=jax.random.PRNGKey(0))
    >>> round(float(out.weights.sum()), 6), bool(jnp.allclose(out.direction, out.weights))
    (1.0, True)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from vlpeft_jax.errors import InputError
from vlpeft_jax.mtl.base import Combined, GMMethod, check_grads

_HI = jax.lax.Precision.HIGHEST


def rlw(grads: jax.Array, *, losses: jax.Array | None = None, state: Any = None,
        key: jax.Array | None = None) -> Combined:
    """RLW's random weights ``softmax(ε)`` and direction ``Σ_t w_t g_t`` for ``grads`` ``[T, P]``.

    Args:
      grads: ``[T, P]`` per-task gradients of the shared parameters.
      losses: unused (checked for shape only).
      state: passed through unchanged (stateless).
      key: PRNG key for ``ε`` (required).

    Raises:
      InputError: ``key`` missing.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> rlw(jnp.eye(2), key=jax.random.PRNGKey(1)).weights.shape
        (2,)
    """
    if key is None:
        raise InputError("rlw: a PRNG key is required (key=jax.random.PRNGKey(...))")
    check_grads(grads, losses)
    g = jnp.asarray(grads, jnp.float32)
    weights = jax.nn.softmax(jax.random.normal(key, (g.shape[0],), jnp.float32))
    return Combined(jnp.dot(weights, g, precision=_HI), weights, () if state is None else state)


METHOD = GMMethod(
    name="rlw",
    fn=rlw,
    defaults={},
    uses_key=True,
    clip={"famo_codebase": None, "nash_codebase": None},
    kind="weighting",
    reference="Lin et al. 2022 (RLW); nash-mtl/FAMO RLW (softmax of a standard normal draw per step); "
              "spec sparse_mtl.md §2.9",
)
