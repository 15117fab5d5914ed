"""The train state: a plain pytree of arrays (no functions), so it can be jitted, sharded and checkpointed.

The optimizer transformation is not part of the state; it is rebuilt from the stage config (stages are
data), which keeps checkpoints free of code.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> params = {"w": jnp.ones(2), "b": jnp.zeros(2)}
    >>> labels = {"w": "main", "b": "frozen"}
    >>> tx = optax.sgd(0.1)
    >>> state = TrainState.create(params, labels, tx, jax.random.PRNGKey(0))
    >>> int(state.step), state.trainable["b"] is None, sorted(state.params)
    (0, True, ['b', 'w'])
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from vlpeft_jax.train import labels as labels_lib


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training.

    Attributes:
      step: global number of optimizer updates done (int32 scalar), counted across stages.
      trainable: trainable leaves of the parameter tree (``None`` at frozen leaves).
      frozen: frozen leaves (``None`` at trainable ones).
      opt_state: the stage optimizer's state, over the trainable leaves only.
      rng: base PRNG key (raw ``uint32[2]``); step ``s`` uses ``fold_in(rng, s)``, so the random stream
        depends only on the seed and the step, not on where a run was resumed.
    """

    step: jax.Array
    trainable: Any
    frozen: Any
    opt_state: Any
    rng: jax.Array

    @property
    def params(self) -> Any:
        """The full parameter tree (trainable and frozen merged)."""
        return labels_lib.merge(self.trainable, self.frozen)

    @classmethod
    def create(cls, params: Any, labels: Any, tx: optax.GradientTransformation, rng: jax.Array,
               step: int | jax.Array = 0) -> TrainState:
        """Splits ``params`` by ``labels`` and initialises ``tx`` over the trainable part."""
        trainable, frozen = labels_lib.split(params, labels)
        return cls(step=jnp.asarray(step, jnp.int32), trainable=trainable, frozen=frozen,
                   opt_state=tx.init(trainable), rng=jnp.asarray(rng))


def abstract_state(params: Any, labels: Any, tx: optax.GradientTransformation) -> TrainState:
    """Shapes and dtypes of the state :meth:`TrainState.create` would build, without allocating it."""
    return jax.eval_shape(lambda p: TrainState.create(p, labels, tx, jax.random.PRNGKey(0)), params)


def state_leaf_paths(state: Any) -> list[str]:
    """Readable key paths of every array leaf of ``state`` (in flattening order): a checkpoint's layout."""
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
