"""Paths and nested-dict utilities shared by every package (layer 0: imports only :mod:`vlpeft_jax.errors`).

Parameter trees are nested dicts whose paths mirror Hugging Face module names (``layers.3`` -> ``layers_3``,
DESIGN invariant 4). Two spellings of a path are used:

- a tuple of names, ``("model", "layers_3", "self_attn", "q_proj")``: module paths, as hook contexts and
  PEFT parameter trees use them (:func:`module_paths`, :func:`get_path`, :func:`set_path`, :func:`lookup`);
- the ``/``-joined string, ``"model/layers_3/self_attn/q_proj/kernel"``: what target patterns and trainable
  rules match (:func:`path_str`, :func:`leaf_paths`, :func:`match_targets`).

A transformer layer is a path segment like ``layers_3``, ``layer_3``, ``h_3`` or ``blocks_3``
(:data:`LAYER_PATTERN`, :func:`layer_index`, :func:`layer_stacks`).

Example:
    >>> import numpy as np
    >>> params = {"model": {"layers_0": {"q_proj": {"kernel": np.ones((2, 2))}, "norm": {"scale": np.ones(2)}}}}
    >>> module_paths(params)
    [('model', 'layers_0', 'q_proj')]
    >>> match_targets(params, "q_proj"), leaf_paths(params)
    ([('model', 'layers_0', 'q_proj')], ['model/layers_0/norm/scale', 'model/layers_0/q_proj/kernel'])
    >>> new = copy_tree(params)
    >>> set_path(new, ("model", "layers_0", "q_proj", "kernel"), np.zeros((2, 2)))
    >>> float(get_path(params, ("model", "layers_0", "q_proj", "kernel")).sum()), count(new)
    (4.0, 6)
    >>> lookup(params, ("model", "layers_1")) is None, layer_index("layers_0"), layer_index("q_proj")
    (True, 0, None)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from vlpeft_jax.errors import ConfigError

Tree = dict[str, Any]

LAYER_PATTERN = re.compile(r"^(?:layers?|h|blocks?)_(\d+)$")
"""A transformer layer's path segment (``layers_<i>``, ``layer_<i>``, ``h_<i>``, ``blocks_<i>``); group 1 is ``i``."""


def layer_index(name: str) -> int | None:
    """The layer index of path segment ``name`` (``"layers_3"`` -> 3, ``"h_0"`` -> 0), or None if not a layer.

    Example:
        >>> layer_index("layers_3"), layer_index("h_0"), layer_index("self_attn"), layer_index("layers_3_x")
        (3, 0, None, None)
    """
    m = LAYER_PATTERN.match(name)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------------------- string paths


def key_name(key: Any) -> str:
    """The name of one key of a JAX key path (dict key, attribute name or sequence index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(key_path: Sequence[Any]) -> str:
    """A JAX key path as the ``/``-joined string that rules match, e.g. ``"base/head/kernel"``.

    Example:
        >>> flat, _ = jax.tree_util.tree_flatten_with_path({"base": {"head": {"kernel": 1}}})
        >>> path_str(flat[0][0])
        'base/head/kernel'
    """
    return "/".join(key_name(k) for k in key_path)


def leaf_paths(tree: Any) -> list[str]:
    """The ``/``-joined paths of all leaves of ``tree``, in flattening order.

    Example:
        >>> leaf_paths({"b": {"kernel": 1, "bias": 2}, "a": 3})
        ['a', 'b/bias', 'b/kernel']
    """
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def layer_stacks(params: Any) -> dict[str, dict[int, str]]:
    """Transformer layer stacks found in the parameter paths: ``{container path: {index: segment}}``.

    A layer is the outermost path segment matching :data:`LAYER_PATTERN` (Hugging Face list indices
    written with an underscore).

    Example:
        >>> import numpy as np
        >>> p = {"model": {"layers_0": {"w": np.ones(1)}, "layers_1": {"w": np.ones(1)}}}
        >>> layer_stacks(p)
        {'model': {0: 'layers_0', 1: 'layers_1'}}
    """
    stacks: dict[str, dict[int, str]] = {}
    for path in leaf_paths(params):
        segments = path.split("/")
        for i, seg in enumerate(segments):
            index = layer_index(seg)
            if index is not None:
                stacks.setdefault("/".join(segments[:i]), {})[index] = seg
                break
    return {k: dict(sorted(v.items())) for k, v in stacks.items()}


# ---------------------------------------------------------------------------------- module paths (tuples)


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


def all_module_paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths of every sub-dict (module), whatever it holds."""
    out = []
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.append(prefix + (k,))
            out.extend(all_module_paths(v, prefix + (k,)))
    return out


def match_targets(params: Mapping[str, Any], patterns: str | Sequence[str], *, leaf_name: str = "kernel",
                  method: str = "method", min_ndim: int = 2) -> list[tuple[str, ...]]:
    """Module paths whose ``/``-joined name matches any pattern (full match, or a suffix of whole names).

    A pattern without regex meta-characters (e.g. ``q_proj``) matches modules whose last names equal it,
    as peft's ``target_modules`` does; anything else is a regular expression over the full path.
    Raises :class:`ConfigError` naming the available paths when a pattern matches nothing.

    Example:
        >>> import numpy as np
        >>> p = {"a": {"q_proj": {"kernel": np.ones((2, 2))}, "v_proj": {"kernel": np.ones((2, 2))}}}
        >>> match_targets(p, ["q_proj", r".*/v_\\w+"])
        [('a', 'q_proj'), ('a', 'v_proj')]
        >>> try:
        ...     match_targets(p, "k_proj", method="lora")
        ... except ConfigError as e:
        ...     print(e)
        lora: target pattern 'k_proj' matches no module with a 'kernel'; available: a/q_proj, a/v_proj
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
    """The node at ``path`` (raises ``KeyError`` if absent; see :func:`lookup` for a lenient variant)."""
    node: Any = tree
    for k in path:
        node = node[k]
    return node


def set_path(tree: Tree, path: Sequence[str], value: Any) -> None:
    """Sets the node at ``path`` in place, creating intermediate dicts."""
    node = tree
    for k in path[:-1]:
        node = node.setdefault(k, {})
    node[path[-1]] = value


def copy_tree(tree: Mapping[str, Any]) -> Tree:
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
