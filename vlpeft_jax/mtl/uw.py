"""Uncertainty weighting (Kendall et al., 2018), in the nash-mtl / FAMO form.

``../shared/specs/sparse_mtl.md`` §2.9 (not used in the thesis's ch. 6; a library extra). The loss is
``Σ_t ½ (e^{−s_t} L_t + s_t)`` with learned log-variances ``s`` (init 0), trained by Adam at ``lr = 0.025`` (the
codebases put ``s`` in the model's ``torch.optim.Adam`` as a parameter group with that learning rate, no weight
decay). Hence ``weights_t = ½ e^{−s_t}`` and ``direction = Σ_t weights_t g_t``; and
``∂loss/∂s_t = ½ (1 − e^{−s_t} L_t)``.

When ``s`` moves: the weights of a step use ``s`` *before* the step, and ``s`` takes its Adam step inside the
function from this step's losses (the reference updates ``s`` in the same ``optimizer.step()`` as the model, from
the same backward pass); the returned state holds the updated ``s``. Neither preset clips (§2.0).

Example:
    >>> import jax.numpy as jnp
    >>> out = uw(jnp.eye(2), losses=jnp.array([3.0, 0.5]))
    >>> out.weights.tolist(), [round(s, 4) for s in out.state.log_vars.tolist()]
    ([0.5, 0.5], [0.025, -0.025])
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from vlpeft_jax.errors import InputError
from vlpeft_jax.mtl._adam import AdamState, adam_init, adam_step
from vlpeft_jax.mtl.base import Combined, GMMethod, check_grads

_HI = jax.lax.Precision.HIGHEST


class UWState(NamedTuple):
    """The log-variances ``s`` ``[T]`` and their Adam state."""

    log_vars: jax.Array
    adam: AdamState


def init_state(num_tasks: int) -> UWState:
    """``s = 0`` and a fresh Adam state.

    Example:
        >>> init_state(2).log_vars.tolist()
        [0.0, 0.0]
    """
    return UWState(jnp.zeros((num_tasks,), jnp.float32), adam_init(num_tasks))


def uw_loss(losses: jax.Array, log_vars: jax.Array) -> jax.Array:
    """The scalarised loss ``Σ_t ½ (e^{−s_t} L_t + s_t)``.

    Example:
        >>> import jax.numpy as jnp
        >>> float(uw_loss(jnp.array([2.0, 4.0]), jnp.zeros(2)))
        3.0
    """
    return jnp.sum(0.5 * (jnp.exp(-log_vars) * losses + log_vars))


def uw(grads: jax.Array, *, losses: jax.Array | None = None, state: UWState | None = None,
       key: jax.Array | None = None, lr: float = 0.025) -> Combined:
    """UW's weights ``½ e^{−s}`` and direction for ``grads`` ``[T, P]``; ``s`` takes one Adam step.

    Args:
      grads: ``[T, P]`` per-task gradients of the shared parameters.
      losses: ``[T]`` this step's task losses (required).
      state: :class:`UWState`; None starts from :func:`init_state`.
      key: unused.
      lr: Adam's learning rate for ``s`` (nash-mtl/FAMO ``method_params_lr``, 0.025).

    Returns:
      :class:`Combined` with ``direction [P]``, ``weights [T]`` (from ``s`` before the step) and the state with
      the updated ``s``.

    Raises:
      InputError: ``losses`` missing.

    Example:
        >>> import jax.numpy as jnp
        >>> out = uw(jnp.array([[2.0, 0.0], [0.0, 2.0]]), losses=jnp.array([1.0, 1.0]))
        >>> out.direction.tolist(), out.state.log_vars.tolist()  # ∂/∂s = ½(1 − L) = 0: s stays
        ([1.0, 1.0], [0.0, 0.0])
    """
    if losses is None:
        raise InputError("uw: the task losses are required (losses=[T])")
    check_grads(grads, losses)
    g = jnp.asarray(grads, jnp.float32)
    st = init_state(g.shape[0]) if not state else state
    s = st.log_vars
    weights = 0.5 * jnp.exp(-s)
    grad_s = 0.5 * (1.0 - jnp.exp(-s) * jnp.asarray(losses, jnp.float32))
    s_new, adam = adam_step(s, grad_s, st.adam, lr=lr)
    return Combined(jnp.dot(weights, g, precision=_HI), weights, UWState(s_new, adam))


METHOD = GMMethod(
    name="uw",
    fn=uw,
    defaults={"lr": 0.025},
    init_state=init_state,
    uses_losses=True,
    clip={"famo_codebase": None, "nash_codebase": None},
    kind="weighting",
    reference="Kendall et al. 2018 (uncertainty weighting); nash-mtl/FAMO Uncertainty (½(e^{-s}L + s), s init 0, "
              "Adam lr 0.025); spec sparse_mtl.md §2.9",
)
