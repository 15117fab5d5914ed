"""PCGrad (Yu et al., 2020, "Gradient Surgery for Multi-Task Learning") on the shared-parameter gradients.

Conventions of the nash-mtl / FAMO codebases (``../shared/specs/sparse_mtl.md`` §2.1 and ambiguity A15):

- every task ``i`` visits a fresh random permutation of **all** ``T`` tasks, ``j == i`` included (the paper's
  Alg. 1 skips ``j == i``; ``include_self=False`` does that);
- the running projection ``pc_i`` is tested and projected against the **original** ``g_j``:
  ``if <pc_i, g_j> < 0: pc_i -= <pc_i, g_j> / ||g_j||² · g_j`` (no ``+1e-8`` in the denominator, unlike LibMTL;
  a zero ``g_j`` never projects because its dot product is 0, and its norm is guarded so nothing divides by 0);
- the direction is ``Σ_i pc_i`` (``reduction="sum"``, the codebases' default) or the mean;
- the heads get their plain ``∇L_t`` (``weights = 1``, kind ``"direct"``); the FAMO codebase clips the shared
  gradient to norm 1.0 afterwards (§2.0, A6), recorded in ``METHOD.clip``.

The permutations come from ``key`` (one ``jax.random.split`` per task), so they cannot reproduce Python's
``random.shuffle`` bit for bit; ``shuffle=False`` uses the fixed order ``0..T-1`` for every task (tests).

Example:
    >>> import jax, jax.numpy as jnp
    >>> g = jnp.array([[1.0, 0.0], [-1.0, 1.0]])
    >>> pcgrad(g, key=jax.random.PRNGKey(0)).direction.tolist()  # pc_1 = (.5, .5), pc_2 = (0, 1)
    [0.5, 1.5]
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.mtl.base import Combined, GMMethod, check_grads

_HI = jax.lax.Precision.HIGHEST
REDUCTIONS = ("sum", "mean")


def task_orders(num_tasks: int, key: jax.Array | None, shuffle: bool = True) -> jax.Array:
    """``[T, T]`` int: row ``i`` is the order in which task ``i`` visits the tasks ``j``.

    A random permutation per row from ``jax.random.split(key, T)`` when ``shuffle``, else ``0..T-1`` in each row.

    Example:
        >>> task_orders(3, None, shuffle=False).tolist()
        [[0, 1, 2], [0, 1, 2], [0, 1, 2]]
    """
    if not shuffle:
        return jnp.tile(jnp.arange(num_tasks), (num_tasks, 1))
    if key is None:
        key = jax.random.PRNGKey(0)
    keys = jax.random.split(key, num_tasks)
    return jax.vmap(lambda k: jax.random.permutation(k, num_tasks))(keys)


@functools.partial(jax.jit, static_argnames=("include_self",))
def project_conflicting(grads: jax.Array, orders: jax.Array, include_self: bool = True) -> jax.Array:
    """The projected gradients ``pc`` ``[T, P]``: row ``i`` is ``g_i`` projected in the order ``orders[i]``.

    Each ``pc_i`` depends only on the original gradients, so the rows are computed independently (``vmap`` over
    ``i``, ``lax.scan`` over the ``T`` tasks of its order).

    Example:
        >>> g = jnp.array([[1.0, 0.0], [-1.0, 1.0]])
        >>> project_conflicting(g, task_orders(2, None, shuffle=False)).tolist()
        [[0.5, 0.5], [0.0, 1.0]]
    """
    g = jnp.asarray(grads, jnp.float32)
    sq = jnp.sum(g * g, axis=1)
    safe_sq = jnp.where(sq > 0, sq, 1.0)
    num_tasks = g.shape[0]

    def one_task(i: jax.Array, order: jax.Array) -> jax.Array:
        def step(pc: jax.Array, j: jax.Array) -> tuple[jax.Array, None]:
            gj = g[j]
            dot = jnp.dot(pc, gj, precision=_HI)
            hit = (dot < 0) & (sq[j] > 0)
            if not include_self:
                hit = hit & (j != i)
            pc = jnp.where(hit, pc - (dot / safe_sq[j]) * gj, pc)
            return pc, None

        pc, _ = jax.lax.scan(step, g[i], order)
        return pc

    return jax.vmap(one_task)(jnp.arange(num_tasks), jnp.asarray(orders))


def pcgrad(grads: jax.Array, *, losses: jax.Array | None = None, state: Any = None, key: jax.Array | None = None,
           include_self: bool = True, reduction: str = "sum", shuffle: bool = True) -> Combined:
    """PCGrad's direction for stacked task gradients ``grads`` ``[T, P]`` (spec §2.1).

    Args:
      grads: ``[T, P]`` per-task gradients of the shared parameters.
      losses: unused.
      state: passed through unchanged (PCGrad is stateless).
      key: PRNG key for the per-task permutations (None: ``PRNGKey(0)``).
      include_self: visit ``j == i`` too (codebases); False follows the paper's Alg. 1.
      reduction: ``"sum"`` (nash-mtl/FAMO default) or ``"mean"`` of the projected gradients.
      shuffle: random order per task; False uses ``0..T-1``.

    Returns:
      :class:`Combined` with ``direction [P]``, ``weights = ones(T)`` and ``state``.

    Raises:
      ConfigError: ``reduction`` not in ``("sum", "mean")``.

    Example:
        >>> import jax.numpy as jnp
        >>> g = jnp.array([[1.0, 0.0], [0.0, 2.0]])  # orthogonal: nothing is projected
        >>> pcgrad(g, shuffle=False, reduction="mean").direction.tolist()
        [0.5, 1.0]
    """
    if reduction not in REDUCTIONS:
        raise ConfigError(f"pcgrad: reduction={reduction!r} is not valid; valid: {', '.join(REDUCTIONS)}")
    check_grads(grads)
    num_tasks = grads.shape[0]
    pc = project_conflicting(grads, task_orders(num_tasks, key, bool(shuffle)), bool(include_self))
    direction = jnp.sum(pc, axis=0)
    if reduction == "mean":
        direction = direction / num_tasks
    return Combined(direction, jnp.ones((num_tasks,), jnp.float32), () if state is None else state)


METHOD = GMMethod(
    name="pcgrad",
    fn=pcgrad,
    defaults={"include_self": True, "reduction": "sum", "shuffle": True},
    uses_key=True,
    clip={"famo_codebase": 1.0, "nash_codebase": None},
    kind="direct",
    reference="Yu et al. 2020 (PCGrad); nash-mtl/FAMO PCGrad._project_conflicting; spec sparse_mtl.md §2.1, A15",
)
