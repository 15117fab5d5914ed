"""The contract every gradient-manipulation (GM) method of :mod:`vlpeft_jax.mtl` follows.

A GM method turns the stacked per-task gradients of the *shared* parameters, ``grads`` ``[T, P]`` (row
``t`` = ``∇_{θ_sha} L_t`` flattened), into one update direction ``[P]`` and a weight per task that the
task-specific parameters (heads) receive: head ``t`` gets ``weights[t] · ∇L_t``. Weighting methods (linear
scalarisation, MGDA, IMTL-G, Nash-MTL, FAMO, UW, DWA, RLW) return the weights they put on the losses; the
"direct" methods (PCGrad, CAGrad, GradDrop) give the heads their plain gradients (``weights = 1``), as the
nash-mtl / FAMO codebases do (``../shared/specs/sparse_mtl.md`` §2.0).

Each method is one module exporting a plain function and a :class:`GMMethod` record::

    def pcgrad(grads, *, losses=None, state=None, key=None, include_self=True) -> Combined

- ``grads``: float ``[T, P]``; ``losses``: float ``[T]`` (this step's task losses, before the update);
- ``state``: the method's state (from ``GMMethod.init_state(T)``; ``()`` for stateless methods);
- ``key``: a PRNG key (methods without randomness ignore it);
- keyword options with defaults (CAGrad's ``c``, ...); :func:`vlpeft_jax.mtl.combine` checks their names.

The result's scaling follows the reference codebases (PCGrad sums the projected gradients, CAGrad and MGDA
multiply by ``T`` "to match the sum loss", IMTL-G's weights sum to 1, ...), each module's docstring says which.
Everything is jittable: no Python control flow on values, fixed iteration counts or ``lax.while_loop``.

Example:
    >>> import jax.numpy as jnp
    >>> g = jnp.array([[1.0, 0.0], [-1.0, 1.0]])
    >>> gram(g).tolist()
    [[1.0, -1.0], [-1.0, 2.0]]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from vlpeft_jax.errors import ConfigError, InputError


class Combined(NamedTuple):
    """A GM method's result.

    Attributes:
      direction: ``[P]`` the shared parameters' update direction (a gradient: the optimizer descends it).
      weights: ``[T]`` the factor of each task's own gradient for its task-specific parameters.
      state: the method's new state (same structure as the state it was given).
    """

    direction: jax.Array
    weights: jax.Array
    state: Any = ()


@dataclasses.dataclass(frozen=True)
class GMMethod:
    """A registered GM method.

    Attributes:
      name: the registry name (``pcgrad``, ``cagrad``, ...).
      fn: the plain function ``fn(grads [T, P], *, losses, state, key, **options) -> Combined``.
      defaults: every option ``fn`` takes, with its default value.
      init_state: ``num_tasks -> state`` (``()`` for stateless methods).
      min_tasks: the fewest tasks the method is defined for.
      uses_key / uses_losses: whether ``fn`` reads ``key`` / ``losses`` (the transform passes them always).
      after_step: methods that learn from the losses *after* the update on the same batch (FAMO):
        ``(state, losses_before [T], losses_after [T], **options) -> state``; the MTL train step calls it
        with a second forward pass. None for all others.
      clip: the shared-gradient global-norm clip of each codebase preset, ``{"famo_codebase": 1.0 | None,
        "nash_codebase": ...}`` (``../shared/specs/sparse_mtl.md`` §2.0, ambiguity A6).
      kind: ``"weighting"`` (heads get ``w_t ∇L_t``) or ``"direct"`` (heads get ``∇L_t``).
      state_options: the options ``init_state`` also takes (e.g. DWA's ``iteration_window`` sizes its buffer).
      reference: where the conventions come from (paper + codebase), for docs and reports.
    """

    name: str
    fn: Callable[..., Combined]
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    init_state: Callable[[int], Any] = lambda num_tasks: ()
    min_tasks: int = 2
    uses_key: bool = False
    uses_losses: bool = False
    after_step: Callable[..., Any] | None = None
    clip: Mapping[str, float | None] = dataclasses.field(default_factory=dict)
    kind: str = "weighting"
    reference: str = ""
    state_options: tuple[str, ...] = ()

    def initial_state(self, num_tasks: int, options: Mapping[str, Any]) -> Any:
        """``init_state(num_tasks)`` with the checked ``options`` it takes (:attr:`state_options`)."""
        return self.init_state(num_tasks, **{k: options[k] for k in self.state_options if k in options})

    def options(self, given: Mapping[str, Any], where: str = "mtl") -> dict[str, Any]:
        """``defaults`` updated with ``given``; an unknown option is a :class:`ConfigError` naming the valid ones."""
        unknown = [k for k in given if k not in self.defaults]
        if unknown:
            valid = ", ".join(self.defaults) or "none"
            raise ConfigError(f"{where}: unknown option(s) {', '.join(map(repr, unknown))} for method "
                              f"{self.name!r}; valid options: {valid}")
        return {**self.defaults, **given}

    def check_tasks(self, num_tasks: int, where: str = "mtl") -> None:
        """Raises :class:`ConfigError` when the method needs more tasks than ``num_tasks``."""
        if num_tasks < self.min_tasks:
            raise ConfigError(f"{where}: method {self.name!r} needs at least {self.min_tasks} tasks; got "
                              f"{num_tasks}")


PRESETS = ("famo_codebase", "nash_codebase", "none")


def gram(grads: jax.Array) -> jax.Array:
    """``G Gᵀ`` ``[T, T]`` of the stacked task gradients (float32 accumulation)."""
    g = jnp.asarray(grads, jnp.float32)
    return jnp.dot(g, g.T, precision=jax.lax.Precision.HIGHEST)


def check_grads(grads: jax.Array, losses: jax.Array | None = None) -> None:
    """Raises :class:`InputError` unless ``grads`` is ``[T, P]`` (and ``losses``, if given, ``[T]``)."""
    if getattr(grads, "ndim", None) != 2:
        raise InputError(f"grads must be a [T, P] array of stacked task gradients; got shape "
                         f"{tuple(getattr(grads, 'shape', ()))}")
    if losses is not None and tuple(jnp.shape(losses)) != (grads.shape[0],):
        raise InputError(f"losses must be a [T] vector (one scalar loss per task, T={grads.shape[0]}); got shape "
                         f"{tuple(jnp.shape(losses))}")
