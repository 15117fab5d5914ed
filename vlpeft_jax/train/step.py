"""Jitted train and eval steps (DESIGN invariants 2 and 6).

A *task* is a pure loss function ``loss_fn(params, batch, rng) -> (loss, metrics)`` over the full
parameter tree (``{"base": ..., "peft": ...}``). The train step differentiates only with respect to the
trainable leaves: the frozen ones are closed over as constants and merged back inside the
differentiated function, so no gradient of a frozen weight is ever formed.

Gradient accumulation scans over ``accumulation_steps`` micro-batches inside the step and applies one
update with the mean gradient. Micro-batch ``i`` holds examples ``i, i + n, i + 2n, ...`` of the batch
(a strided split keeps each device's shard of a data-sharded batch local). With a per-example mean loss
this equals one step on the whole batch.

Under a dynamic loss scale (:func:`vlpeft_jax.train.precision.dynamic_loss_scale` as the outermost optimizer
transformation, for float16 compute) the step differentiates ``scale * loss`` and divides the gradients by the
scale; ``loss`` stays unscaled. A step whose scaled gradients overflow is then skipped by the optimizer (the
metrics say ``overflow``) and is not a divergence; only a non-finite loss is.

A step whose loss or gradient norm is not finite is not applied (the returned state equals the input
state) and reports ``finite = False``; the loop stops on it.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from vlpeft_jax.train.state import TrainState
    >>> def loss_fn(params, batch, rng):
    ...     return jnp.mean((batch["x"] * params["w"] - batch["y"]) ** 2), {}
    >>> params = {"w": jnp.zeros(())}
    >>> tx = optax.sgd(0.1)
    >>> state = TrainState.create(params, {"w": "main"}, tx, jax.random.PRNGKey(0))
    >>> step = jit_train_step(make_train_step(loss_fn, tx))
    >>> state, metrics = step(state, {"x": jnp.ones(4), "y": jnp.ones(4)})
    >>> float(metrics["loss"]), bool(metrics["finite"]), round(float(state.params["w"]), 6)
    (1.0, True, 0.2)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from vlpeft_jax.errors import InputError
from vlpeft_jax.train import labels as labels_lib
from vlpeft_jax.train.precision import loss_scale_of
from vlpeft_jax.train.state import TrainState

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict[str, Any]]]
TrainStep = Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]

EVAL_RNG_SALT = 0x7FFFFFFF  # eval steps use fold_in(rng, salt): a stream no train step uses


def _micro_batches(batch: Any, n: int) -> Any:
    def split(x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[0] % n:
            raise InputError(f"gradient accumulation over {n} micro-batches needs every batch array's leading "
                             f"dimension divisible by {n}; got shape {tuple(x.shape)}")
        return jnp.moveaxis(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 1, 0)

    return jax.tree.map(split, batch)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, accumulation_steps: int = 1) -> TrainStep:
    """The (un-jitted) train step ``(state, batch) -> (state, metrics)``.

    ``metrics`` holds the loss function's metrics (means over micro-batches) plus ``loss``,
    ``grad_norm`` (global norm before clipping) and ``finite``.
    """

    def grads_of(trainable: Any, frozen: Any, batch: Any, rng: jax.Array, scale: jax.Array | None
                 ) -> tuple[jax.Array, dict, Any]:
        def objective(t: Any) -> tuple[jax.Array, tuple[jax.Array, dict]]:
            loss, metrics = loss_fn(labels_lib.merge(t, frozen), batch, rng)
            return (loss if scale is None else loss * scale), (loss, metrics)

        (_, (loss, metrics)), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
        if scale is not None:  # float16 loss scaling: the gradients of the scaled loss, unscaled in float32
            grads = jax.tree.map(lambda g: (g.astype(jnp.float32) / scale).astype(g.dtype), grads)
        return loss, metrics, grads

    def train_step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        scale = loss_scale_of(state.opt_state)
        if accumulation_steps == 1:
            loss, metrics, grads = grads_of(state.trainable, state.frozen, batch, rng, scale)
        else:
            def body(grad_sum: Any, xs: tuple[jax.Array, Any]) -> tuple[Any, tuple[jax.Array, dict]]:
                i, micro = xs
                loss, metrics, grads = grads_of(state.trainable, state.frozen, micro, jax.random.fold_in(rng, i),
                                                scale)
                return jax.tree.map(jnp.add, grad_sum, grads), (loss, metrics)

            zeros = jax.tree.map(jnp.zeros_like, state.trainable)
            xs = (jnp.arange(accumulation_steps), _micro_batches(batch, accumulation_steps))
            grad_sum, (losses, metrics) = jax.lax.scan(body, zeros, xs)
            grads = jax.tree.map(lambda g: g / accumulation_steps, grad_sum)
            loss = jnp.mean(losses)
            metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        extra = {}
        if scale is None:
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        else:  # an overflowing gradient is expected now and then: the loss scale skips that update itself
            finite = jnp.isfinite(loss)
            extra = {"loss_scale": scale, "overflow": ~jnp.isfinite(grad_norm)}
        new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
        # a diverged step is not applied, so the state the loop holds (and may checkpoint) stays good
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        return new_state, {**metrics, **extra, "loss": loss, "grad_norm": grad_norm, "finite": finite}

    return train_step


def jit_train_step(train_step: TrainStep, *, state_sharding: Any = None, batch_sharding: Any = None) -> TrainStep:
    """``jax.jit`` of a train step with the state donated, optionally with explicit shardings.

    Args:
      train_step: from :func:`make_train_step`.
      state_sharding: a :class:`TrainState` of ``NamedSharding`` (see :mod:`vlpeft_jax.train.sharding`);
        used for the input and the output state, so the state stays where it is.
      batch_sharding: a pytree of shardings for the batch (or a single sharding for all leaves); give
        both shardings or neither.
    """
    if state_sharding is None and batch_sharding is None:
        return jax.jit(train_step, donate_argnums=0)
    if state_sharding is None or batch_sharding is None:
        raise ValueError("jit_train_step: give both state_sharding and batch_sharding, or neither")
    return jax.jit(train_step, donate_argnums=0, in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, None))


def make_eval_step(loss_fn: LossFn, *, state_sharding: Any = None, batch_sharding: Any = None
                   ) -> Callable[[TrainState, Any], dict[str, jax.Array]]:
    """A jitted ``(state, batch) -> metrics`` (``loss`` and the loss function's metrics); nothing donated.

    The rng passed to ``loss_fn`` is fixed per state, so evaluation is deterministic.
    """

    def eval_step(state: TrainState, batch: Any) -> dict[str, jax.Array]:
        loss, metrics = loss_fn(state.params, batch, jax.random.fold_in(state.rng, EVAL_RNG_SALT))
        return {**metrics, "loss": loss}

    if state_sharding is None and batch_sharding is None:
        return jax.jit(eval_step)
    if state_sharding is None or batch_sharding is None:
        raise ValueError("make_eval_step: give both state_sharding and batch_sharding, or neither")
    return jax.jit(eval_step, in_shardings=(state_sharding, batch_sharding))
