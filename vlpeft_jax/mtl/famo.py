"""FAMO (Liu et al., 2023a, "FAMO: Fast Adaptive Multitask Optimization"), as the FAMO codebase runs it.

``../shared/specs/sparse_mtl.md`` §2.7 (thesis App. D.6, Tables 27–29). State: task logits ``w`` ``[T]``
(init 0) with their own ``torch.optim.Adam(lr=w_lr, weight_decay=gamma)`` (L2 added to the gradient, not
decoupled: :mod:`vlpeft_jax.mtl._adam`); ``w_lr = 0.025``, ``gamma = 1e-3`` (NYUv2/CelebA; 0.01 for CityScapes),
``min_losses = 0``. Each step, from this step's losses ``L`` (before the update)::

    z = softmax(w);   D_t = L_t − min_losses_t + 1e-8;   c = Σ_t z_t / D_t   (stop-gradient)
    loss = Σ_t (z_t / c) log D_t   ⇒   weights_t = z_t / (c D_t)  (they sum to 1),  direction = Σ_t weights_t g_t

After the model's optimizer step the losses are recomputed on the **same batch** (``L_new``) and
:func:`famo_after_step` updates the logits: ``δ_t = log D_t(L) − log D_t(L_new)``, ``∂w = J_softmax(w)ᵀ δ``, one
Adam step. Clipping is a no-op in both presets (the FAMO base class clips before ``backward``, §2.0).

Example:
    >>> import jax.numpy as jnp
    >>> g = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> out = famo(g, losses=jnp.array([1.0, 3.0]), state=init_state(2))
    >>> [round(w, 4) for w in out.weights.tolist()]  # z = (½, ½): weights ∝ 1/L
    [0.75, 0.25]
    >>> st = famo_after_step(out.state, jnp.array([1.0, 3.0]), jnp.array([0.5, 3.0]))
    >>> [round(w, 4) for w in st.logits.tolist()]  # the first task improved more: its logit drops
    [-0.025, 0.025]
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from vlpeft_jax.errors import InputError
from vlpeft_jax.mtl._adam import AdamState, adam_init, adam_step
from vlpeft_jax.mtl.base import Combined, GMMethod, check_grads

_HI = jax.lax.Precision.HIGHEST
EPS = 1e-8


class FamoState(NamedTuple):
    """FAMO's task logits ``w`` ``[T]`` and their Adam state."""

    logits: jax.Array
    adam: AdamState


def init_state(num_tasks: int) -> FamoState:
    """Logits 0 (uniform ``z``) and a fresh Adam state.

    Example:
        >>> init_state(2).logits.tolist()
        [0.0, 0.0]
    """
    return FamoState(jnp.zeros((num_tasks,), jnp.float32), adam_init(num_tasks))


def _log_d(losses: jax.Array, min_losses: Any) -> jax.Array:
    return jnp.log(jnp.asarray(losses, jnp.float32) - jnp.asarray(min_losses, jnp.float32) + EPS)


def famo(grads: jax.Array, *, losses: jax.Array | None = None, state: FamoState | None = None,
         key: jax.Array | None = None, gamma: float = 1e-3, w_lr: float = 0.025, min_losses: Any = 0.0) -> Combined:
    """FAMO's weights ``z_t / (c D_t)`` and direction for ``grads`` ``[T, P]`` and this step's ``losses`` ``[T]``.

    Args:
      grads: ``[T, P]`` per-task gradients of the shared parameters.
      losses: ``[T]`` this step's task losses (required).
      state: :class:`FamoState`; None starts from :func:`init_state`. Returned unchanged: the logits learn in
        :func:`famo_after_step`.
      key: unused.
      gamma, w_lr: the logits' Adam weight decay and learning rate (used by :func:`famo_after_step`).
      min_losses: scalar or ``[T]`` lower bounds of the losses (0 in the reference).

    Returns:
      :class:`Combined` with ``direction [P]``, ``weights [T]`` (sum 1) and the state.

    Raises:
      InputError: ``losses`` missing.

    Example:
        >>> import jax.numpy as jnp
        >>> out = famo(jnp.eye(3), losses=jnp.array([1.0, 2.0, 4.0]))
        >>> round(float(out.weights.sum()), 6)
        1.0
    """
    if losses is None:
        raise InputError("famo: the task losses are required (losses=[T])")
    check_grads(grads, losses)
    g = jnp.asarray(grads, jnp.float32)
    st = init_state(g.shape[0]) if not state else state
    z = jax.nn.softmax(st.logits)
    d = jnp.exp(_log_d(losses, min_losses))
    c = jax.lax.stop_gradient(jnp.sum(z / d))
    weights = z / (c * d)
    return Combined(jnp.dot(weights, g, precision=_HI), weights, st)


def famo_after_step(state: FamoState, losses_before: jax.Array, losses_after: jax.Array, *, gamma: float = 1e-3,
                    w_lr: float = 0.025, min_losses: Any = 0.0) -> FamoState:
    """The logit update from the losses before and after the model's step on the same batch (spec §2.7, 3–5).

    ``δ = log D(before) − log D(after)``, ``∂w = J_softmax(w)ᵀ δ = z ⊙ (δ − z·δ)``, one Adam step
    (``lr = w_lr``, L2 ``weight_decay = gamma``).

    Example:
        >>> import jax.numpy as jnp
        >>> st = famo_after_step(init_state(2), jnp.array([2.0, 2.0]), jnp.array([1.0, 1.0]))
        >>> st.logits.tolist(), int(st.adam.count)  # equal progress: zero gradient, no decay at w = 0
        ([0.0, 0.0], 1)
    """
    delta = _log_d(losses_before, min_losses) - _log_d(losses_after, min_losses)
    z = jax.nn.softmax(state.logits)
    grad_w = z * (delta - jnp.dot(z, delta, precision=_HI))
    logits, adam = adam_step(state.logits, grad_w, state.adam, lr=w_lr, weight_decay=gamma)
    return FamoState(logits, adam)


METHOD = GMMethod(
    name="famo",
    fn=famo,
    defaults={"gamma": 1e-3, "w_lr": 0.025, "min_losses": 0.0},
    init_state=init_state,
    uses_losses=True,
    after_step=famo_after_step,
    clip={"famo_codebase": None, "nash_codebase": None},
    kind="weighting",
    reference="Liu et al. 2023a (FAMO); Cranial-XIX/FAMO FAMO weight method (Adam lr 0.025, weight_decay γ); "
              "spec sparse_mtl.md §2.7",
)
