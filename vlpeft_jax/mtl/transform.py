"""Gradient manipulation as an optax transformation over per-task gradients, with optional sparse training.

:func:`gradient_manipulation` is an ``optax.GradientTransformationExtraArgs`` whose *input* updates carry a
leading task axis on every leaf (``[T, ...]``, from :func:`vlpeft_jax.mtl.gradients.per_task_grads`) and
whose *output* is an ordinary gradient tree (the task axis gone), so it chains in front of any optimizer::

    tx = optax.chain(gradient_manipulation("pcgrad", num_tasks=3), optax.adam(1e-3))
    updates, state = tx.update(jacobian, state, params, losses=losses)

Per update (``../shared/specs/sparse_mtl.md`` §2.8, thesis ``004_21d0d480fe4006f4.txt`` Eq. 6.9):

1. the **shared** leaves (every leaf not matched by ``task_specific``, by default everything outside a
   ``heads/`` subtree) are flattened into ``G`` ``[T, P]``;
2. gradient-conflict counts (Def. 6.3.1: pairs with ``g_i·g_j < 0``) are taken on ``G`` and, with a sparse
   mask ``M``, on ``G ⊙ M``, before any manipulation (spec A7);
3. ``mask_mode="pre"`` (default; Fig. 6.2's projection reading, spec A1) hands the method ``G ⊙ M``,
   ``"post"`` (Eq. 6.9 read literally) hands it ``G`` and masks its output; ``"monitor"`` only counts the
   conflicts under ``M`` and trains densely (a dense run's conflict statistics under the mask it would use);
4. the method (:mod:`vlpeft_jax.mtl.registry`) gives the direction ``d`` ``[P]`` and per-task weights ``w``;
5. ``d`` is clipped to a global norm when the codebase preset says so (spec §2.0, A6: ``famo_codebase`` clips
   PCGrad, CAGrad, GradDrop and Nash-MTL to 1.0; ``nash_codebase`` only Nash-MTL), then multiplied by ``M``;
6. each task-specific leaf gets ``Σ_t w_t g_t`` (its own task's gradient times that task's weight).

The sparse mask only shapes the *gradient*; optimizer moments and weight decay are kept off the frozen
entries by wrapping the optimizer that follows in :func:`vlpeft_jax.peft.gps.masked` (see
:func:`sparse_chain`), so masked entries stay bit-identical to their initial values.

Example:
    >>> import jax.numpy as jnp, optax
    >>> params = {"tower": {"kernel": jnp.zeros(2)}, "heads": {"a": {"kernel": jnp.zeros(1)},
    ...                                                       "b": {"kernel": jnp.zeros(1)}}}
    >>> jac = {"tower": {"kernel": jnp.array([[1.0, 0.0], [-1.0, 1.0]])},
    ...        "heads": {"a": {"kernel": jnp.array([[2.0], [0.0]])}, "b": {"kernel": jnp.array([[0.0], [3.0]])}}}
    >>> tx = gradient_manipulation("pcgrad", num_tasks=2, clip=None)
    >>> grads, state = tx.update(jac, tx.init(params), params)
    >>> grads["tower"]["kernel"].tolist(), grads["heads"]["b"]["kernel"].tolist(), int(state.stats["gc/full"])
    ([0.5, 1.5], [3.0], 1)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from vlpeft_jax.errors import ConfigError, InputError
from vlpeft_jax.mtl import registry
from vlpeft_jax.mtl.base import PRESETS, GMMethod, gram
from vlpeft_jax.mtl.conflict import conflict_count
from vlpeft_jax.peft.gps import align_mask, masked
from vlpeft_jax.tree import path_str

TASK_SPECIFIC = r"(?:.*/)?heads/.*"
"""Default: leaves under a ``heads/`` subtree are task-specific (each task's own head); the rest is shared."""
MASK_MODES = ("pre", "post", "monitor")


class MTLState(NamedTuple):
    """State of :func:`gradient_manipulation`.

    Attributes:
      method: the GM method's own state.
      key: PRNG key, split every update (PCGrad's order, GradDrop's draws, RLW).
      mask: the sparse-training mask aligned to the parameters (None leaves: no mask there), or None.
      stats: the last update's statistics: ``gc/full``, ``gc/masked`` (conflicting task pairs),
        ``gc/pairs`` (``C(T, 2)``), ``weights`` ``[T]``, ``direction_norm`` (after clipping).
    """

    method: Any
    key: jax.Array
    mask: Any
    stats: dict[str, jax.Array]


def resolve_clip(method: GMMethod, clip: str | float | None) -> float | None:
    """The shared-gradient clip norm of ``clip``: a preset name (:data:`~vlpeft_jax.mtl.base.PRESETS`), a
    number, or None (no clipping)."""
    if clip is None or clip == "none":
        return None
    if isinstance(clip, str):
        if clip not in PRESETS:
            raise ConfigError(f"mtl.clip={clip!r}; valid: a number > 0, None, or a preset: {', '.join(PRESETS)}")
        return method.clip.get(clip)
    if not float(clip) > 0:
        raise ConfigError(f"mtl.clip={clip!r}; a clip norm must be > 0 (or None for no clipping)")
    return float(clip)


def _flat_leaves(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
    return [(path_str(p), x) for p, x in flat], treedef


def gradient_manipulation(method: str | GMMethod, *, num_tasks: int, options: Mapping[str, Any] | None = None,
                          clip: str | float | None = "famo_codebase", mask: Any = None, mask_mode: str = "pre",
                          task_specific: str = TASK_SPECIFIC, seed: int = 0
                          ) -> optax.GradientTransformationExtraArgs:
    """The optax transformation described in the module docstring.

    Args:
      method: a registered method name (or a :class:`GMMethod`).
      num_tasks: ``T``, the size of the leading axis of every input leaf.
      options: the method's options (checked against its defaults).
      clip: shared-direction clipping: a preset (``famo_codebase`` default, ``nash_codebase``, ``none``), a
        number, or None.
      mask: a sparse-training mask: a nested dict over (part of) the parameter tree with boolean arrays of the
        parameters' shapes (e.g. :func:`vlpeft_jax.mtl.psn.psn_mask`); leaves it does not reach are unmasked.
      mask_mode: ``pre``, ``post`` or ``monitor`` (module docstring).
      task_specific: regex (full match on the ``/``-joined path) of the task-specific leaves.
      seed: seed of the transformation's PRNG key.

    ``update(updates, state, params=None, *, losses=None)``: ``losses`` ``[T]`` are required by methods that
    read them (FAMO, DWA, UW).

    Raises:
      ConfigError: unknown method, option, preset or mask mode, or fewer tasks than the method needs.
    """
    gm = method if isinstance(method, GMMethod) else registry.get(method)
    gm.check_tasks(num_tasks)
    opts = gm.options(dict(options or {}))
    clip_norm = resolve_clip(gm, clip)
    if mask_mode not in MASK_MODES:
        raise ConfigError(f"mtl.mask_mode={mask_mode!r}; valid: {', '.join(MASK_MODES)}")
    specific = re.compile(task_specific)

    def init(params: Any) -> MTLState:
        stats = {"gc/full": jnp.int32(0), "gc/pairs": jnp.int32(num_tasks * (num_tasks - 1) // 2),
                 "weights": jnp.zeros((num_tasks,), jnp.float32), "direction_norm": jnp.float32(0.0)}
        if mask is not None:
            stats["gc/masked"] = jnp.int32(0)
        return MTLState(method=gm.initial_state(num_tasks, opts), key=jax.random.PRNGKey(seed),
                        mask=None if mask is None else align_mask(mask, params), stats=stats)

    def update(updates: Any, state: MTLState, params: Any = None, *, losses: jax.Array | None = None,
               **extra: Any) -> tuple[Any, MTLState]:
        del params, extra
        leaves, treedef = _flat_leaves(updates)
        masks = [None] * len(leaves) if state.mask is None else [m for _, m in _flat_leaves(state.mask)[0]]
        shared = [i for i, (path, x) in enumerate(leaves) if x is not None and not specific.fullmatch(path)]
        for path, x in leaves:
            if x is not None and (x.ndim < 1 or x.shape[0] != num_tasks):
                raise InputError(f"gradient_manipulation: leaf {path} has shape {tuple(x.shape)}; every input leaf "
                                 f"needs a leading task axis of size num_tasks={num_tasks}")
        if not shared:
            raise ConfigError(f"gradient_manipulation: no shared parameter is trainable (every trainable leaf matches "
                              f"task_specific={task_specific!r})")
        if gm.uses_losses and losses is None:
            raise ConfigError(f"method {gm.name!r} reads the task losses: call update(..., losses=[T])")
        sizes = [leaves[i][1][0].size for i in shared]
        grads = jnp.concatenate([leaves[i][1].reshape(num_tasks, -1).astype(jnp.float32) for i in shared], axis=1)
        stats = {"gc/full": conflict_count(gram(grads))[0], "gc/pairs": state.stats["gc/pairs"]}
        flat_mask = None
        if state.mask is not None:
            flat_mask = jnp.concatenate([
                jnp.ones((n,), jnp.float32) if masks[i] is None else masks[i].reshape(-1).astype(jnp.float32)
                for i, n in zip(shared, sizes, strict=True)])
            grads_masked = grads * flat_mask
            stats["gc/masked"] = conflict_count(gram(grads_masked))[0]
            if mask_mode == "pre":  # (monitor: counted only)
                grads = grads_masked
        key, sub = jax.random.split(state.key)
        out = gm.fn(grads, losses=None if losses is None else jnp.asarray(losses, jnp.float32), state=state.method,
                    key=sub, **opts)
        direction = out.direction
        if clip_norm is not None:
            norm = jnp.linalg.norm(direction)
            direction = direction * jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-12))
        if flat_mask is not None and mask_mode != "monitor":
            direction = direction * flat_mask
        stats["weights"] = jnp.asarray(out.weights, jnp.float32)
        stats["direction_norm"] = jnp.linalg.norm(direction)
        result: list[Any] = [None] * len(leaves)
        offsets = [0]
        for n in sizes:
            offsets.append(offsets[-1] + n)
        for j, i in enumerate(shared):
            x = leaves[i][1]
            result[i] = direction[offsets[j]:offsets[j + 1]].reshape(x.shape[1:]).astype(x.dtype)
        for i, (_, x) in enumerate(leaves):
            if x is not None and result[i] is None:  # task-specific: Σ_t w_t g_t
                result[i] = jnp.tensordot(out.weights.astype(x.dtype), x, axes=1)
        return jax.tree_util.tree_unflatten(treedef, result), MTLState(out.state, key, state.mask, stats)

    return optax.GradientTransformationExtraArgs(init, update)


def sparse_chain(manipulation: optax.GradientTransformationExtraArgs, inner: optax.GradientTransformation,
                 mask: Any = None) -> optax.GradientTransformationExtraArgs:
    """``manipulation`` followed by ``inner``; with a ``mask``, ``inner`` is wrapped in
    :func:`vlpeft_jax.peft.gps.masked` so that its moments and weight decay never touch masked-out entries.

    The chain's state is a tuple whose first element is the :class:`MTLState` (what
    :func:`vlpeft_jax.mtl.step.make_mtl_train_step` reads the statistics from)."""
    return optax.chain(manipulation, inner if mask is None else masked(inner, mask))


def after_step_fn(method: str | GMMethod, options: Mapping[str, Any] | None = None
                  ) -> Callable[[MTLState, jax.Array, jax.Array], MTLState] | None:
    """For methods that learn from the losses after the update on the same batch (FAMO): ``(state, losses
    before, losses after) -> state``; None for every other method."""
    gm = method if isinstance(method, GMMethod) else registry.get(method)
    if gm.after_step is None:
        return None
    opts = gm.options(dict(options or {}))

    def after(state: MTLState, before: jax.Array, after: jax.Array) -> MTLState:
        return state._replace(method=gm.after_step(state.method, before, after, **opts))

    return after
