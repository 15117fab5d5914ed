"""Trainable vs frozen as a pytree of labels (DESIGN invariant 3).

A *labels* pytree has the structure of the parameter tree and holds, for every leaf, either the name of
the optimizer group that trains it (e.g. ``"head"``, ``"lora"``) or :data:`FROZEN`. It is computed once
from *rules*: an ordered list of ``(regex, label)`` pairs matched (``re.fullmatch``, like
:func:`vlpeft_jax.models.hooks.path_matcher`) against each leaf's ``/``-joined path, e.g.
``base/model/layers_3/self_attn/q_proj/kernel``. The first matching rule wins; unmatched leaves get the
default label (frozen). A rule may name :data:`FROZEN` itself to carve an exception out of a later rule.

The labels split the parameters into a *trainable* and a *frozen* tree of the same structure, each holding
``None`` where the other holds the array. ``None`` is an empty pytree node in JAX, so ``jax.grad`` and
optax see only the trainable leaves: no gradient and no optimizer state exist for frozen ones
(DESIGN invariant 2).

Example:
    >>> import jax.numpy as jnp
    >>> params = {"base": {"layers_0": {"kernel": jnp.ones((2, 2))}, "head": {"kernel": jnp.ones((2, 3))}}}
    >>> labels = make_labels(params, head_rules(["(?:.*/)?head"]))
    >>> labels["base"]["head"]["kernel"], labels["base"]["layers_0"]["kernel"]
    ('head', 'frozen')
    >>> trainable, frozen = split(params, labels)
    >>> trainable["base"]["layers_0"]["kernel"] is None, frozen["base"]["head"]["kernel"] is None
    (True, True)
    >>> count_params(params, labels)
    {'frozen': 4, 'head': 6, 'total': 10, 'trainable': 6}
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.tree import layer_stacks, path_str

FROZEN = "frozen"

Rule = tuple[str, str]
"""``(regex over the "/"-joined leaf path, group label)``."""


def _compile_rules(rules: Iterable[Rule]) -> list[tuple[re.Pattern[str], str, str]]:
    compiled = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
            raise ConfigError(f"trainable rule #{i} must be a (pattern, label) pair, got {rule!r}")
        pattern, label = rule
        if not isinstance(label, str) or not label or "/" in label:
            raise ConfigError(f"trainable rule #{i} ({pattern!r}): label must be a non-empty string without '/', "
                              f"got {label!r}")
        try:
            compiled.append((re.compile(pattern), pattern, label))
        except (re.error, TypeError) as e:
            raise ConfigError(f"trainable rule #{i}: invalid regular expression {pattern!r}: {e}") from None
    return compiled


def _available(paths: Sequence[str], limit: int = 20) -> str:
    modules = list(dict.fromkeys(p.rsplit("/", 1)[0] if "/" in p else p for p in paths))
    shown = ", ".join(modules[:limit])
    more = f", ... ({len(modules)} modules, {len(paths)} leaves in total)" if len(modules) > limit else ""
    return shown + more


def _is_float(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is None or jax.numpy.issubdtype(dtype, jax.numpy.inexact)


def make_labels(params: Any, rules: Iterable[Rule], *, default: str = FROZEN, allow_unmatched: bool = False) -> Any:
    """The labels pytree of ``params``: the label of the first rule whose regex fully matches each leaf path.

    Args:
      params: parameter pytree (plain arrays or ``jax.ShapeDtypeStruct``; unboxed).
      rules: ordered ``(regex, label)`` pairs; first match wins.
      default: label of leaves no rule matches. Integer/bool leaves are always frozen (they cannot
        have gradients), whatever the rules say.
      allow_unmatched: if False, a rule that matches no leaf at all is a :class:`ConfigError` (it is almost
        always a typo in a path pattern).

    Raises:
      ConfigError: a malformed rule, or a rule that matches nothing (the message lists available paths).
    """
    compiled = _compile_rules(rules)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_str(p) for p, _ in flat]
    used = [False] * len(compiled)
    labels = []
    for path, (_, leaf) in zip(paths, flat, strict=True):
        label = default
        if not _is_float(leaf):  # integer leaves (e.g. NeuroAda's indices) are data, never trainable
            labels.append(FROZEN)
            continue
        for i, (regex, _, rule_label) in enumerate(compiled):
            if regex.fullmatch(path):
                label = rule_label
                used[i] = True
                break
        labels.append(label)
    if not allow_unmatched:
        for (regex, pattern, label), was_used in zip(compiled, used, strict=True):
            if not was_used and not any(regex.fullmatch(p) for p in paths):
                raise ConfigError(f"trainable rule {pattern!r} (label {label!r}) matches no parameter path; "
                                  f"available: {_available(paths)}")
    return jax.tree_util.tree_unflatten(treedef, labels)


def split(params: Any, labels: Any) -> tuple[Any, Any]:
    """Splits ``params`` into ``(trainable, frozen)`` trees of the same structure, ``None`` at the other's leaves."""
    trainable = jax.tree.map(lambda x, label: None if label == FROZEN else x, params, labels)
    frozen = jax.tree.map(lambda x, label: x if label == FROZEN else None, params, labels)
    return trainable, frozen


def merge(trainable: Any, frozen: Any) -> Any:
    """Inverse of :func:`split`: the full parameter tree."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None)


def group_labels(labels: Any) -> Any:
    """The labels tree restricted to trainable leaves (``None`` at frozen ones): optax.partition's labels."""
    return jax.tree.map(lambda label: None if label == FROZEN else label, labels)


def groups(labels: Any) -> list[str]:
    """Sorted names of the trainable groups present in ``labels``."""
    return sorted({label for label in jax.tree.leaves(labels) if label != FROZEN})


def count_params(params: Any, labels: Any) -> dict[str, int]:
    """Parameter counts per label, plus ``"total"`` and ``"trainable"``; works on abstract shapes too."""
    counts: dict[str, int] = {}
    for x, label in zip(jax.tree.leaves(params), jax.tree.leaves(labels), strict=True):
        counts[label] = counts.get(label, 0) + int(np.prod(x.shape, dtype=np.int64))
    total = sum(counts.values())
    trainable = total - counts.get(FROZEN, 0)
    return {**dict(sorted(counts.items())), "total": total, "trainable": trainable}


# --------------------------------------------------------------------------------------------------
# Preset rules


def full_finetuning_rules(label: str = "full", root: str | None = "base") -> list[Rule]:
    """Every leaf under ``root`` (the base model by default; None: every leaf) trains."""
    return [(".*" if root is None else re.escape(root) + "/.*", label)]


def head_rules(patterns: Sequence[str] = (r"(?:.*/)?lm_head",), label: str = "head") -> list[Rule]:
    """Head tuning: the modules whose paths fully match ``patterns`` (default: any ``lm_head``) train.

    Each pattern names a module (or a leaf); all leaves below it are included.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    return [(f"(?:{p})(?:/.*)?", label) for p in patterns]


def linear_probe_rules(head: str, label: str = "probe") -> list[Rule]:
    """Linear probing: only the module named ``head`` (a path suffix such as ``classifier``) trains."""
    return [(r"(?:.*/)?" + re.escape(head.strip("/")) + "/.*", label)]


def last_k_layers_rules(params: Any, k: int, *, label: str = "last_layers", stack: str | None = None) -> list[Rule]:
    """Last-k-layers tuning: the ``k`` highest-indexed layers of one layer stack train.

    Args:
      params: the parameter tree (or its abstract shapes) whose layers are counted.
      k: number of layers, ``1 <= k <= number of layers``.
      stack: regex fully matching the stack's container path (e.g. ``"base/model"``); required when the
        model has several stacks (e.g. a vision tower and a decoder).

    Example:
        >>> import numpy as np
        >>> p = {"model": {f"layers_{i}": {"w": np.ones(1)} for i in range(3)}}
        >>> last_k_layers_rules(p, 2)
        [('model/layers_1/.*', 'last_layers'), ('model/layers_2/.*', 'last_layers')]
    """
    stacks = layer_stacks(params)
    if stack is not None:
        try:
            chosen = {c: v for c, v in stacks.items() if re.fullmatch(stack, c)}
        except re.error as e:
            raise ConfigError(f"last-k-layers stack: invalid regular expression {stack!r}: {e}") from None
    else:
        chosen = stacks
    if not chosen:
        raise ConfigError(f"last-k-layers: no layer stack matches {stack!r}; stacks found: {sorted(stacks) or 'none'}")
    if len(chosen) > 1:
        raise ConfigError(f"last-k-layers: several layer stacks {sorted(chosen)}; name one with stack=<regex>")
    container, layers = next(iter(chosen.items()))
    if not isinstance(k, int) or not 1 <= k <= len(layers):
        raise ConfigError(f"last-k-layers: k must be an integer in [1, {len(layers)}] for stack {container!r}, "
                          f"got {k!r}")
    prefix = re.escape(container) + "/" if container else ""
    return [(prefix + re.escape(seg) + "/.*", label) for _, seg in sorted(layers.items())[-k:]]
