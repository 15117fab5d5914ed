"""What every PEFT method provides, and the tree utilities they share.

A method is a small frozen dataclass with pure functions (DESIGN §2, invariants 1-4):

- ``init(rng, base_params) -> peft_params``: its own pytree, whose paths mirror the base paths it adapts
  (e.g. ``{"model": {"layers_0": {"self_attn": {"q_proj": {"lora_a": .., "lora_b": ..}}}}}``).
- ``hooks(peft_params, *, rng=None, train=False) -> list[Hook]``: the hook functions that apply it in
  activation space (the base weights are never rewritten while training).
- ``merge(base_params, peft_params) -> base_params``: plain base parameters giving the same outputs,
  where the method allows it (raises :class:`ConfigError` otherwise).
- ``num_params(peft_params) -> int``.

:func:`apply_with` runs a model under several methods at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax

from vlpeft_jax.models import hooks

# The tree utilities live in vlpeft_jax.tree; re-exported here for the methods that use them as ``pb.<name>``.
from vlpeft_jax.tree import (  # noqa: F401
    adapted_where,
    copy_tree,
    count,
    get_path,
    lookup,
    match_targets,
    module_paths,
    set_path,
)

Params = dict[str, Any]


class PeftMethod(Protocol):
    name: str

    def init(self, rng: jax.Array, base_params: Params) -> Params: ...

    def hooks(self, peft_params: Params, *, rng: jax.Array | None = None, train: bool = False
              ) -> list[hooks.Hook]: ...

    def merge(self, base_params: Params, peft_params: Params) -> Params: ...


def apply_with(apply_fn: Callable[..., Any], methods: Sequence[tuple[PeftMethod, Params]], *args: Any,
               rng: jax.Array | None = None, train: bool = False, **kwargs: Any) -> Any:
    """Calls ``apply_fn(*args, **kwargs)`` with every ``(method, peft_params)`` active (first = innermost)."""
    active: list[hooks.Hook] = []
    for i, (method, p) in enumerate(methods):
        r = None if rng is None else jax.random.fold_in(rng, i)
        active.extend(method.hooks(p, rng=r, train=train))
    with hooks.use_hooks(active):
        return apply_fn(*args, **kwargs)
