"""Per-task gradients from one forward pass: the Jacobian of the vector of task losses.

Every gradient-manipulation method needs ``g_t = ∇_θ L_t`` for each task ``t`` separately, on the same
mini-batch (thesis ``004_21d0d480fe4006f4.txt`` Eq. 6.5-6.7; ``../shared/specs/sparse_mtl.md`` §2.0). With a
function ``losses_fn(params) -> [T]`` the forward pass runs once and the backward pass once per task; three
ways to do it, all giving the same numbers (``run.py bench mtl`` times them):

- ``vjp``: ``jax.vjp`` once, then the pullback ``vmap``-ed over the ``T`` one-hot cotangents (one batched
  backward program; the default);
- ``jacrev``: ``jax.jacrev`` (JAX's own reverse-mode Jacobian; the same idea behind one call);
- ``loop``: the pullback called ``T`` times one after another (PyTorch's ``backward(retain_graph=True)`` per
  task: lowest peak memory, no batching).

The result is a pytree like ``params`` whose every leaf has a leading task axis ``[T, ...]``: the input of
:func:`vlpeft_jax.mtl.transform.gradient_manipulation`. A task-specific leaf (a head) only receives its own
task's gradient; the other rows are zero.

Example:
    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> def losses_fn(p):  # two tasks: 3·w0 and w0·w1
    ...     return jnp.stack([3.0 * p["w"][0], p["w"][0] * p["w"][1]]), {}
    >>> losses, aux, jac = per_task_grads(losses_fn, params)
    >>> losses.tolist(), jac["w"].tolist()
    ([3.0, 2.0], [[3.0, 0.0], [2.0, 1.0]])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from vlpeft_jax.errors import ConfigError, InputError

STRATEGIES = ("vjp", "jacrev", "loop")


def check_losses(losses: jax.Array) -> int:
    """The number of tasks of a task-loss vector; raises :class:`InputError` unless it is ``[T]``."""
    shape = tuple(jnp.shape(losses))
    if len(shape) != 1 or shape[0] < 1:
        raise InputError(f"multi-task training needs the task losses as a [T] vector (one scalar loss per task); "
                         f"got shape {shape}")
    return shape[0]


def per_task_grads(losses_fn: Callable[[Any], tuple[jax.Array, Any]], params: Any, *, strategy: str = "vjp"
                   ) -> tuple[jax.Array, Any, Any]:
    """``(losses [T], aux, jacobian)`` of ``losses_fn(params) -> (losses [T], aux)``.

    Args:
      losses_fn: the task losses of ``params`` (and any auxiliary output, e.g. metrics).
      params: a pytree (``None`` leaves are allowed and stay ``None``).
      strategy: ``vjp``, ``jacrev`` or ``loop`` (module docstring).

    Returns:
      The losses, ``aux``, and the per-task gradients: ``params``' structure with ``[T, *leaf.shape]`` leaves.

    Raises:
      ConfigError: an unknown strategy.
      InputError: the losses are not a ``[T]`` vector.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"mtl.strategy={strategy!r}; valid: {', '.join(STRATEGIES)}")
    if strategy == "jacrev":
        def both(p: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
            losses, aux = losses_fn(p)
            check_losses(losses)
            return losses, (losses, aux)

        jac, (losses, aux) = jax.jacrev(both, has_aux=True)(params)
        return losses, aux, jac
    losses, pullback, aux = jax.vjp(losses_fn, params, has_aux=True)
    num_tasks = check_losses(losses)
    eye = jnp.eye(num_tasks, dtype=losses.dtype)
    if strategy == "vjp":
        (jac,) = jax.vmap(pullback)(eye)
        return losses, aux, jac
    rows = [pullback(eye[t])[0] for t in range(num_tasks)]
    jac = jax.tree.map(lambda *r: jnp.stack(r), *rows)
    return losses, aux, jac
