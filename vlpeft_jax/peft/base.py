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

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.models import hooks

Params = dict[str, Any]


class PeftMethod(Protocol):
    name: str

    def init(self, rng: jax.Array, base_params: Params) -> Params: ...

    def hooks(self, peft_params: Params, *, rng: jax.Array | None = None, train: bool = False
              ) -> list[hooks.Hook]: ...

    def merge(self, base_params: Params, peft_params: Params) -> Params: ...


def module_paths(params: Mapping[str, Any], leaf_name: str = "kernel", prefix: tuple[str, ...] = ()
                 ) -> list[tuple[str, ...]]:
    """Paths of every sub-dict holding ``leaf_name`` (e.g. every linear layer: it holds a ``kernel``)."""
    out = []
    for k, v in params.items():
        if isinstance(v, Mapping):
            if leaf_name in v and not isinstance(v[leaf_name], Mapping):
                out.append(prefix + (k,))
            out.extend(module_paths(v, leaf_name, prefix + (k,)))
    return out


def match_targets(params: Mapping[str, Any], patterns: str | Sequence[str], *, leaf_name: str = "kernel",
                  method: str = "method", min_ndim: int = 2) -> list[tuple[str, ...]]:
    """Module paths whose ``/``-joined name matches any pattern (full match, or a suffix of whole names).

    A pattern without regex meta-characters (e.g. ``q_proj``) matches modules whose last names equal it,
    as peft's ``target_modules`` does; anything else is a regular expression over the full path.
    Raises :class:`ConfigError` naming the available paths when a pattern matches nothing.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    candidates = [p for p in module_paths(params, leaf_name)
                  if np.ndim(get_path(params, p + (leaf_name,))) >= min_ndim]
    names = ["/".join(p) for p in candidates]
    chosen: list[tuple[str, ...]] = []
    for pat in patterns:
        if re.fullmatch(r"[A-Za-z0-9_/]+", pat):
            hits = [p for p, n in zip(candidates, names, strict=True) if n == pat or n.endswith("/" + pat)]
        else:
            rx = re.compile(pat)
            hits = [p for p, n in zip(candidates, names, strict=True) if rx.fullmatch(n)]
        if not hits:
            shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
            raise ConfigError(f"{method}: target pattern {pat!r} matches no module with a {leaf_name!r}; "
                              f"available: {shown}")
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


def get_path(tree: Mapping[str, Any], path: Iterable[str]) -> Any:
    node: Any = tree
    for k in path:
        node = node[k]
    return node


def set_path(tree: Params, path: Sequence[str], value: Any) -> None:
    node = tree
    for k in path[:-1]:
        node = node.setdefault(k, {})
    node[path[-1]] = value


def copy_tree(tree: Mapping[str, Any]) -> Params:
    """A structural copy of nested dicts (leaves shared): safe to ``set_path`` into."""
    return {k: copy_tree(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def lookup(peft_params: Mapping[str, Any], path: Sequence[str]) -> Mapping[str, Any] | None:
    """The method's parameters for module ``path``, or None if the module is not adapted."""
    node: Any = peft_params
    for k in path:
        if not isinstance(node, Mapping) or k not in node:
            return None
        node = node[k]
    return node


def adapted_where(peft_params: Mapping[str, Any], marker: str) -> Callable[[tuple[str, ...]], bool]:
    """A hook ``where`` predicate: True for modules whose parameters in ``peft_params`` hold ``marker``."""

    def where(path: tuple[str, ...]) -> bool:
        node = lookup(peft_params, path)
        return isinstance(node, Mapping) and marker in node

    return where


def count(tree: Any) -> int:
    """Number of scalars in a pytree."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(tree)))


def apply_with(apply_fn: Callable[..., Any], methods: Sequence[tuple[PeftMethod, Params]], *args: Any,
               rng: jax.Array | None = None, train: bool = False, **kwargs: Any) -> Any:
    """Calls ``apply_fn(*args, **kwargs)`` with every ``(method, peft_params)`` active (first = innermost)."""
    active: list[hooks.Hook] = []
    for i, (method, p) in enumerate(methods):
        r = None if rng is None else jax.random.fold_in(rng, i)
        active.extend(method.hooks(p, rng=r, train=train))
    with hooks.use_hooks(active):
        return apply_fn(*args, **kwargs)
