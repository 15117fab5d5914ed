"""Dynamic weight average (DWA; Liu et al., 2019), in the nash-mtl / FAMO iteration-window form.

``../shared/specs/sparse_mtl.md`` §2.9 (a library extra). The codebases keep the last ``2W`` task losses
(``W = iteration_window = 25``) in a FIFO buffer **initialised with ones**, push this step's losses first, and,
once more than ``W`` steps have run before this one (from the ``W + 2``-th call on), set::

    ws = mean(last W rows) / mean(previous W rows);   w = T · softmax(ws / τ),   τ = temp = 2

(otherwise ``w`` keeps its previous value, 1 initially). The loss is the **mean** ``(1/T) Σ_t w_t L_t``, so the
weight each task's gradient gets — ``weights`` here, what the heads receive — is ``w / T``: ``1/T`` each before
enough history, summing to 1 after. The raw DWA ``w`` (sum ``T``) is ``state.dwa_weights``.
``direction = Σ_t (w_t / T) g_t``. Neither preset clips (§2.0). (LibMTL's epoch-based DWA sums ``w L`` instead.)

The buffer size depends on ``iteration_window``: a state for another window than the default needs
``init_state(T, iteration_window=W)`` (:func:`vlpeft_jax.mtl.combine` and the transformation pass the option).

Example:
    >>> import jax.numpy as jnp
    >>> out = dwa(jnp.eye(2), losses=jnp.array([1.0, 2.0]))
    >>> out.weights.tolist(), int(out.state.step)  # no history yet: w = 1, mean loss
    ([0.5, 0.5], 1)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from vlpeft_jax.errors import ConfigError, InputError
from vlpeft_jax.mtl.base import Combined, GMMethod, check_grads

_HI = jax.lax.Precision.HIGHEST
ITERATION_WINDOW = 25


class DWAState(NamedTuple):
    """The loss buffer ``[2W, T]`` (oldest first), the current DWA weights ``w`` ``[T]`` and the step count."""

    costs: jax.Array
    dwa_weights: jax.Array
    step: jax.Array


def init_state(num_tasks: int, iteration_window: int = ITERATION_WINDOW) -> DWAState:
    """A buffer of ones ``[2W, T]`` (as the reference's ``np.ones``), ``w = 1``, step 0.

    Example:
        >>> init_state(3, iteration_window=4).costs.shape
        (8, 3)
    """
    return DWAState(jnp.ones((2 * iteration_window, num_tasks), jnp.float32), jnp.ones((num_tasks,), jnp.float32),
                    jnp.zeros((), jnp.int32))


def dwa(grads: jax.Array, *, losses: jax.Array | None = None, state: DWAState | None = None,
        key: jax.Array | None = None, iteration_window: int = ITERATION_WINDOW, temp: float = 2.0) -> Combined:
    """DWA's per-task weights ``w / T`` and direction for ``grads`` ``[T, P]`` and this step's ``losses``.

    Args:
      grads: ``[T, P]`` per-task gradients of the shared parameters.
      losses: ``[T]`` this step's task losses (required).
      state: :class:`DWAState` (buffer of ``2 · iteration_window`` rows); None starts from :func:`init_state`.
      key: unused.
      iteration_window: ``W``, the length of each averaging window (25).
      temp: the softmax temperature ``τ`` (2).

    Returns:
      :class:`Combined` with ``direction [P]``, ``weights = w / T`` and the new state.

    Raises:
      InputError: ``losses`` missing.
      ConfigError: ``iteration_window < 1``, or a state whose buffer was made for another window.

    Example:
        >>> import jax.numpy as jnp
        >>> st = init_state(2, iteration_window=1)
        >>> for loss in ([1.0, 1.0], [1.0, 1.0], [1.0, 2.0]):
        ...     out = dwa(jnp.eye(2), losses=jnp.array(loss), state=st, iteration_window=1)
        ...     st = out.state
        >>> [round(w, 4) for w in st.dwa_weights.tolist()]  # ws = (1, 2): 2·softmax(ws / 2)
        [0.7551, 1.2449]
    """
    if losses is None:
        raise InputError("dwa: the task losses are required (losses=[T])")
    if int(iteration_window) < 1:
        raise ConfigError(f"dwa: iteration_window={iteration_window!r} must be a positive integer")
    check_grads(grads, losses)
    g = jnp.asarray(grads, jnp.float32)
    num_tasks = g.shape[0]
    st = init_state(num_tasks, iteration_window) if not state else state
    if st.costs.shape != (2 * iteration_window, num_tasks):
        raise ConfigError(f"dwa: the state's loss buffer has shape {tuple(st.costs.shape)} but "
                          f"iteration_window={iteration_window} with T={num_tasks} needs "
                          f"({2 * iteration_window}, {num_tasks}); make it with "
                          f"vlpeft_jax.mtl.dwa.init_state(T, iteration_window={iteration_window})")
    costs = jnp.concatenate([st.costs[1:], jnp.asarray(losses, jnp.float32)[None, :]], axis=0)
    ws = jnp.mean(costs[iteration_window:], axis=0) / jnp.mean(costs[:iteration_window], axis=0)
    fresh = num_tasks * jax.nn.softmax(ws / temp)
    w = jnp.where(st.step > iteration_window, fresh, st.dwa_weights)
    weights = w / num_tasks
    return Combined(jnp.dot(weights, g, precision=_HI), weights, DWAState(costs, w, st.step + 1))


METHOD = GMMethod(
    name="dwa",
    fn=dwa,
    defaults={"iteration_window": ITERATION_WINDOW, "temp": 2.0},
    init_state=init_state,
    state_options=("iteration_window",),
    uses_losses=True,
    clip={"famo_codebase": None, "nash_codebase": None},
    kind="weighting",
    reference="Liu et al. 2019 (DWA); nash-mtl/FAMO DynamicWeightAverage (iteration windows of 25, τ=2, "
              "mean loss); spec sparse_mtl.md §2.9",
)
