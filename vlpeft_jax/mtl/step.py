"""The multi-task train step: per-task gradients, gradient manipulation, the optimizer, statistics.

:func:`make_mtl_train_step` is the multi-task counterpart of :func:`vlpeft_jax.train.step.make_train_step`
with the same signature of the result ``(state, batch) -> (state, metrics)``, so the train loop, checkpoints
and resumption work unchanged. Its task function returns the *vector* of task losses
(``(params, batch, rng) -> (losses [T], metrics)``); ``tx`` must be :func:`vlpeft_jax.mtl.transform.sparse_chain`
(or any ``optax.chain`` whose first element is :func:`~vlpeft_jax.mtl.transform.gradient_manipulation`).

One step: the Jacobian of the losses over the trainable leaves (:func:`~vlpeft_jax.mtl.gradients.per_task_grads`,
one forward pass), ``tx.update(jacobian, opt_state, trainable, losses=losses)``, the update applied; for FAMO a
second forward pass on the same batch gives the losses after the update, from which its task logits learn
(``../shared/specs/sparse_mtl.md`` §2.7). Metrics: the task function's, ``loss`` (the sum of the task losses),
``grad_norm`` (the norm of all per-task gradients, the finiteness check), and from the manipulation
``mtl/gc_full``, ``mtl/gc_masked`` (conflicting task pairs this step, before manipulation), ``mtl/gc_pairs``,
``mtl/direction_norm`` and ``mtl/weight/<t>``.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from vlpeft_jax.mtl.transform import gradient_manipulation, sparse_chain
    >>> from vlpeft_jax.train.state import TrainState
    >>> def task_losses(params, batch, rng):  # two tasks pulling w towards 1 and -1
    ...     return jnp.stack([(params["w"] - 1.0) ** 2, (params["w"] + 1.0) ** 2]).sum(-1), {}
    >>> params = {"w": jnp.array([0.5])}
    >>> tx = sparse_chain(gradient_manipulation("ls", num_tasks=2), optax.sgd(0.1))
    >>> state = TrainState.create(params, {"w": "main"}, tx, jax.random.PRNGKey(0))
    >>> state, metrics = jax.jit(make_mtl_train_step(task_losses, tx, method="ls"))(state, {})
    >>> round(float(state.params["w"][0]), 4), int(metrics["mtl/gc_full"])  # mean gradient 0.5·(-1 + 3) = 1
    (0.4, 1)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.mtl.gradients import per_task_grads
from vlpeft_jax.mtl.transform import MTLState, after_step_fn
from vlpeft_jax.train import labels as labels_lib
from vlpeft_jax.train.state import TrainState

TaskLossesFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict[str, Any]]]


def mtl_state(opt_state: Any) -> MTLState:
    """The :class:`MTLState` at the front of a chained optimizer state."""
    if isinstance(opt_state, tuple) and opt_state and isinstance(opt_state[0], MTLState):
        return opt_state[0]
    raise ConfigError("multi-task training needs an optimizer chain starting with gradient_manipulation "
                      "(see vlpeft_jax.mtl.transform.sparse_chain)")


def make_mtl_train_step(task_losses_fn: TaskLossesFn, tx: optax.GradientTransformationExtraArgs, *,
                        method: str, options: Mapping[str, Any] | None = None, strategy: str = "vjp",
                        accumulation_steps: int = 1) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    """The (un-jitted) multi-task train step (module docstring).

    Args:
      task_losses_fn: ``(params, batch, rng) -> (losses [T], metrics)`` over the full parameter tree.
      tx: the chained optimizer (first element: the gradient manipulation).
      method, options: the GM method and its options (FAMO's after-step update reads them).
      strategy: how the per-task gradients are formed (``vjp``, ``jacrev``, ``loop``).
      accumulation_steps: must be 1 (per-task gradients of micro-batches are not accumulated here).

    Raises:
      ConfigError: ``accumulation_steps > 1``.
    """
    if accumulation_steps != 1:
        raise ConfigError(f"optimizer.accumulation_steps={accumulation_steps}: multi-task training combines the "
                          f"task gradients of one batch; use a smaller batch instead of accumulation")
    after = after_step_fn(method, options)

    def train_step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)

        def losses_of(trainable: Any) -> tuple[jax.Array, dict]:
            return task_losses_fn(labels_lib.merge(trainable, state.frozen), batch, rng)

        losses, metrics, jac = per_task_grads(losses_of, state.trainable, strategy=strategy)
        grad_norm = optax.tree.norm(jac)
        updates, opt_state = tx.update(jac, state.opt_state, state.trainable, losses=losses)
        trainable = optax.apply_updates(state.trainable, updates)
        if after is not None:
            new_losses, _ = task_losses_fn(labels_lib.merge(trainable, state.frozen), batch, rng)
            opt_state = (after(mtl_state(opt_state), losses, new_losses), *opt_state[1:])
        stats = mtl_state(opt_state).stats
        out = {**metrics, "loss": losses.sum(), "grad_norm": grad_norm,
               **{f"mtl/{k.replace('/', '_')}": v for k, v in stats.items() if k != "weights"},
               **{f"mtl/weight/{t}": stats["weights"][t] for t in range(stats["weights"].shape[0])}}
        finite = jnp.isfinite(out["loss"]) & jnp.isfinite(grad_norm)
        new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        return new_state, {**out, "finite": finite}

    return train_step
