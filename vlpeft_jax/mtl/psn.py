"""PSN: the fixed sparse-training mask of the shared parameters (Parameter Selection per Neuron).

Sparse training (ST) trains only the entries of a binary mask ``M`` over the shared parameters and keeps the
rest at their initial values (thesis ``../shared/seeds/004_21d0d480fe4006f4.txt`` Def. 6.3.2, Eq. 6.8/6.9;
``../shared/specs/sparse_mtl.md`` §1.1). The mask is chosen **once, before training** (Sec. 6.3.4): for every
neuron of a weight kernel, the ``K`` incoming connections of largest ``|w|`` at initialisation (pretrained
weights, or the random init for MTAN) are trainable; ``K`` is capped at the fan-in, so a neuron with
``fan_in <= K`` is fully trainable (spec §1.2, which is what makes Swin-B reach 37.60% at K=300, Table 17).

Which leaves are ranked is decided by an ordered rule list over the ``/``-joined leaf path (spec §1.2, A2, the
GPS ``prune_by_percentile_gradient_perCell`` rules): ``(regex, action)`` with action ``"psn"`` (per-neuron
top-K, only for leaves of >= 2 dimensions; a lower-dimensional leaf falls through to the next rule),
``"train"`` (fully trainable) or ``"freeze"``; the first rule whose regex ``re.search``-es the path wins.
:data:`GPS_RULES` (pretrained transformers): biases train, norm parameters freeze, position embeddings / class
token / relative-position tables freeze, ``heads/`` train, kernels PSN, everything else freezes.
:data:`GPS_CNN_RULES` (MTAN, random init) trains BatchNorm scale/bias too. Task-specific leaves (``shared``
says which; default: everything under a ``heads/`` segment) are always fully trainable (Sec. 6.3.2: "sparse
training is used in the encoder, and full parameters training for the decoders").

Neurons in our Flax layout (spec §1.2): a Dense kernel ``[in, out]`` is ranked along axis 0, one neuron per
output column; a conv kernel ``[kh, kw, in, out]`` is read as ``[kh*kw*in, out]``; generally every axis but the
last is fan-in, which also covers an attention out-projection ``[heads, head_dim, out]``. Kernels whose fan-in
is not "all axes but the last" (a DenseGeneral q/k/v kernel ``[in, heads, head_dim]``) are named in
``fan_in_axes``. A PyTorch ``[out, in]`` weight transposed to ``[in, out]`` gives the transposed mask.

Ties: ``jax.lax.top_k`` returns equal values in index order, so among equal ``|w|`` the **lower fan-in index
wins** ("top" and "reverse"); "global" ranks with a stable sort, so the lower position in the concatenation of
the kernels (leaf flattening order, each kernel row-major in its own layout) wins (spec A20).

Variants (spec §1.5, Fig. 6.5c, Table 18), all with the same number of trainable weights:

- ``"top"``: PSN, the highest ``|w|`` per neuron;
- ``"reverse"``: the lowest ``|w|`` per neuron;
- ``"random"``: an exact-count uniform sample (without replacement) over all PSN-ruled weights, from ``key``;
- ``"global"``: the highest ``|w|`` over all PSN-ruled weights together.

Example:
    >>> import jax.numpy as jnp
    >>> params = {"enc": {"kernel": jnp.array([[0.1, -3.0], [2.0, 0.5], [-0.7, 0.2]]), "bias": jnp.zeros(2)},
    ...           "heads": {"t0": {"kernel": jnp.ones((2, 1))}}}
    >>> mask = psn_mask(params, 1)
    >>> mask["enc"]["kernel"].astype(int).tolist(), mask["enc"]["bias"].tolist()
    ([[0, 1], [1, 0], [0, 0]], [True, True])
    >>> count_trainable(params, 1), round(trainable_fraction(params, mask), 4)  # 2 picked + 2 biases + 2 head
    (6, 0.6)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlpeft_jax.errors import ConfigError, InputError
from vlpeft_jax.peft.selection import Selected, connection_scores, selection_mask, top_k_per_neuron

ACTIONS = ("psn", "train", "freeze")
VARIANTS = ("top", "reverse", "random", "global")

Rule = tuple[str, str]

HEADS = r"(^|/)heads/"
"""Paths under a ``heads/`` segment: the task-specific heads/decoders (our ``ClassifierHeads`` module name)."""

NORM = r"(^|/)(?i:[^/]*norm[^/]*|ln(_[^/]*|\d*)|bn(_[^/]*|\d*))/[^/]+$"
"""A parameter (``scale``, ``bias``, ...) of a normalisation module: a parent segment containing ``norm`` (any
case: ``layer_norm1``, ``layernorm_before``, ``LayerNorm``, ``post_layernorm``, ``pre_layrnorm``, ``norm1``,
``final_layer_norm``, ``BatchNorm_0``), or named ``ln``/``ln_*``/``ln<digit>`` or ``bn``/``bn_*``/``bn<digit>``."""

POSITION = (r"(^|/)(?i:pos|pos_embed[^/]*|absolute_pos_embed|position_embeddings?|cls_token|class_embedding"
            r"|rel_pos[^/]*|relative_position[^/]*)(/|$)")
"""Position embeddings, the class token and (relative-)position tables (ViT ``pos_embed``/``cls_token``, HF
``position_embeddings``, CLIP ``position_embedding``/``class_embedding``, SAM ``rel_pos_h``, Swin
``relative_position_bias_table``)."""

BIAS = r"(^|/)bias$"
KERNEL = r"(^|/)kernel$"

GPS_RULES: tuple[Rule, ...] = (
    (HEADS, "train"),
    (NORM, "freeze"),
    (POSITION, "freeze"),
    (BIAS, "train"),
    (KERNEL, "psn"),
    ("", "freeze"),
)
"""The GPS parameter-type rules for pretrained transformers (spec §1.2, A2): reproduce Table 17 (ViT, Swin)."""

GPS_CNN_RULES: tuple[Rule, ...] = (
    (HEADS, "train"),
    (NORM, "train"),
    (POSITION, "freeze"),
    (BIAS, "train"),
    (KERNEL, "psn"),
    ("", "freeze"),
)
"""As :data:`GPS_RULES` but BatchNorm scale/bias trainable: the CNN (MTAN) variant needed for Table 17's 62.19%."""

MTAN_SHARED = r"^(?!.*pred)"
"""nash-mtl's ``SegNetMtan.shared_parameters``: every parameter whose name lacks ``pred`` (spec §2.0)."""


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """What the rules decide for one parameter leaf.

    Attributes:
      path: the ``/``-joined leaf path (Flax box attributes such as ``Partitioned.value`` left out).
      action: ``"psn"``, ``"train"`` or ``"freeze"`` (task-specific leaves are ``"train"``).
      shape: the leaf's shape.
      fan_in_axes: for ``"psn"``, the axes read as fan-in (the other axes index the neurons).
      shared: whether the leaf is shared (PSN applies) or task-specific.
    """

    path: str
    action: str
    shape: tuple[int, ...]
    fan_in_axes: tuple[int, ...] = ()
    shared: bool = True

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))

    @property
    def fan(self) -> tuple[int, int]:
        """``(fan_in, fan_out)`` of a ``"psn"`` leaf."""
        fan_in = int(math.prod(self.shape[a] for a in self.fan_in_axes))
        return fan_in, self.size // max(fan_in, 1)

    def trainable(self, k: int) -> int:
        """How many entries are trainable at per-neuron ``k``."""
        if self.action == "psn":
            fan_in, fan_out = self.fan
            return min(k, fan_in) * fan_out
        return self.size if self.action == "train" else 0


# ------------------------------------------------------------------------------------------ rules


def _check_rules(rules: Sequence[Rule]) -> list[tuple[re.Pattern, str]]:
    out = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ConfigError(f"psn rules[{i}]={rule!r}; each rule is a (regex, action) pair with action one of "
                              f"{', '.join(ACTIONS)}")
        pattern, action = rule
        if action not in ACTIONS:
            raise ConfigError(f"psn rules[{i}]: action {action!r} for pattern {pattern!r} is unknown; valid: "
                              f"{', '.join(ACTIONS)}")
        try:
            out.append((re.compile(pattern), action))
        except re.error as e:
            raise ConfigError(f"psn rules[{i}]: pattern {pattern!r} is not a valid regex ({e})") from None
    return out


def _shared_fn(shared: str | Callable[[str], bool] | None) -> Callable[[str], bool]:
    if shared is None:
        rx = re.compile(HEADS)
        return lambda path: rx.search(path) is None
    if isinstance(shared, str):
        try:
            rx = re.compile(shared)
        except re.error as e:
            raise ConfigError(f"psn shared={shared!r} is not a valid regex ({e})") from None
        return lambda path: rx.search(path) is not None
    if callable(shared):
        return lambda path: bool(shared(path))
    raise ConfigError(f"psn shared={shared!r}; give a regex (matching paths are shared) or a predicate "
                      f"path -> bool")


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in (x.shape if hasattr(x, "shape") else np.shape(x)))


def _leaf_path(key_path: Sequence[Any]) -> str:
    """``/``-joined dict keys / sequence indices of a key path; attribute keys (Flax ``Partitioned.value``) skipped."""
    parts = []
    for k in key_path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
    return "/".join(parts)


def _flatten(params: Any) -> tuple[list[tuple[str, Any]], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    return [(_leaf_path(p), leaf) for p, leaf in flat], treedef


def _fan_in_axes(path: str, ndim: int, overrides: Sequence[tuple[re.Pattern, tuple[int, ...]]]) -> tuple[int, ...]:
    for rx, axes in overrides:
        if rx.search(path):
            norm = tuple(sorted({a % ndim for a in axes}))
            if not norm or len(norm) == ndim or any(not -ndim <= a < ndim for a in axes):
                raise ConfigError(f"psn fan_in_axes={tuple(axes)} for {path} (a {ndim}-D kernel): give at least one "
                                  f"and not all of the axes 0..{ndim - 1}")
            return norm
    return tuple(range(ndim - 1))


def leaf_plans(params: Any, *, rules: Sequence[Rule] = GPS_RULES, shared: str | Callable[[str], bool] | None = None,
               fan_in_axes: Sequence[tuple[str, Sequence[int]]] = ()) -> list[LeafPlan]:
    """The action of every leaf of ``params`` (arrays or ``jax.ShapeDtypeStruct`` s), in flattening order.

    Args:
      params: the parameter tree (nested dicts; Flax ``Partitioned`` boxes are looked through).
      rules: ordered ``(regex, action)`` pairs; the first whose regex ``re.search``-es the path decides.
        A ``"psn"`` rule applies only to leaves of >= 2 dimensions. A leaf no rule matches is frozen.
      shared: a regex (``re.search``: matching leaves are shared) or a predicate ``path -> bool``; task-specific
        leaves are always ``"train"``. Default: leaves under a ``heads/`` segment are task-specific.
      fan_in_axes: ``(regex, axes)`` overrides of a kernel's fan-in axes (default: all but the last axis),
        e.g. ``[(r"attention/(query|key|value)/kernel$", (0,))]`` for ``[in, heads, head_dim]`` kernels.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> p = {"ln_1": {"scale": jax.ShapeDtypeStruct((4,), jnp.float32)},
        ...      "fc": {"kernel": jax.ShapeDtypeStruct((4, 8), jnp.float32)}}
        >>> [(x.path, x.action) for x in leaf_plans(p)]
        [('fc/kernel', 'psn'), ('ln_1/scale', 'freeze')]
    """
    compiled = _check_rules(rules)
    is_shared = _shared_fn(shared)
    overrides = []
    for pattern, axes in fan_in_axes:
        try:
            overrides.append((re.compile(pattern), tuple(int(a) for a in axes)))
        except re.error as e:
            raise ConfigError(f"psn fan_in_axes pattern {pattern!r} is not a valid regex ({e})") from None
    plans = []
    for path, leaf in _flatten(params)[0]:
        shape = _shape(leaf)
        if not is_shared(path):
            plans.append(LeafPlan(path, "train", shape, shared=False))
            continue
        action = "freeze"
        for rx, act in compiled:
            if rx.search(path) and not (act == "psn" and len(shape) < 2):
                action = act
                break
        axes = _fan_in_axes(path, len(shape), overrides) if action == "psn" else ()
        plans.append(LeafPlan(path, action, shape, axes))
    return plans


# ------------------------------------------------------------------------------------------ counting


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"psn k={k!r}; must be an integer >= 1 (trainable connections per neuron)")
    return int(k)


def count_trainable(params: Any, k: int, *, rules: Sequence[Rule] = GPS_RULES,
                    shared: str | Callable[[str], bool] | None = None,
                    fan_in_axes: Sequence[tuple[str, Sequence[int]]] = ()) -> int:
    """Trainable entries of the PSN mask at per-neuron ``k``, from shapes only (``ShapeDtypeStruct`` leaves work).

    ``Σ_psn min(k, fan_in)·fan_out + Σ_train size`` (spec §1.4); the same for every variant.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> p = {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 4, 2), jnp.float32),
        ...               "bias": jax.ShapeDtypeStruct((2,), jnp.float32)}}
        >>> count_trainable(p, 10), count_trainable(p, 100)  # fan-in 36: 10*2+2, then capped: 36*2+2
        (22, 74)
    """
    k = _check_k(k)
    return sum(p.trainable(k) for p in leaf_plans(params, rules=rules, shared=shared, fan_in_axes=fan_in_axes))


def count_params(params: Any) -> int:
    """All entries of ``params`` (arrays or ``ShapeDtypeStruct`` s): Table 17's denominator.

    Example:
        >>> import jax.numpy as jnp
        >>> count_params({"a": jnp.ones((2, 3)), "b": {"c": jnp.ones(4)}})
        10
    """
    return sum(math.prod(_shape(x)) for _, x in _flatten(params)[0])


def trainable_fraction(params: Any, mask: Any) -> float:
    """Trainable entries of ``mask`` over **all** entries of ``params`` (heads, norms, embeddings included),
    as Table 17 counts (spec §1.4). ``mask`` leaves may be bool/0-1 arrays or Python bools (a whole leaf).

    Example:
        >>> import jax.numpy as jnp
        >>> trainable_fraction({"a": jnp.ones((2, 2)), "b": jnp.ones(4)}, {"a": jnp.eye(2, dtype=bool), "b": False})
        0.25
    """
    leaves = _flatten(params)[0]
    masks = _flatten(mask)[0]
    if [p for p, _ in leaves] != [p for p, _ in masks]:
        raise InputError(f"trainable_fraction: the mask's leaves {[p for p, _ in masks][:6]} do not match the "
                         f"parameters' {[p for p, _ in leaves][:6]}")
    total = count_params(params)
    on = 0
    for (_, leaf), (_, m) in zip(leaves, masks, strict=True):
        m = np.asarray(jax.device_get(m))
        size = math.prod(_shape(leaf))
        on += int(np.count_nonzero(m)) if m.ndim else size * bool(m)
    return on / max(total, 1)


def k_for_fraction(params: Any, target: float, *, rules: Sequence[Rule] = GPS_RULES,
                   shared: str | Callable[[str], bool] | None = None,
                   fan_in_axes: Sequence[tuple[str, Sequence[int]]] = (), how: str = "closest") -> int:
    """The per-neuron ``K`` giving a trainable fraction (Table 17 style) of ``target`` (spec A3).

    The fraction is a non-decreasing step function of ``K`` (flat once ``K`` exceeds the largest fan-in).

    Args:
      target: the wanted fraction in (0, 1] of all parameters.
      how: ``"closest"`` (default): the ``K`` whose fraction is nearest ``target`` (the smaller ``K`` on a tie),
        which recovers the K of a rounded published percentage (Table 17's 29.38% -> K=300, whose exact
        fraction is 29.377%); ``"reach"``: the smallest ``K`` whose fraction is ``>= target``.

    Raises:
      ConfigError: ``target`` outside (0, 1], an unknown ``how``, no PSN-ruled kernel, or (``"reach"``) a target
        above the fraction with every kernel fully trainable.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> p = {"fc": {"kernel": jax.ShapeDtypeStruct((10, 4), jnp.float32)}}
        >>> k_for_fraction(p, 0.3), k_for_fraction(p, 0.33), k_for_fraction(p, 0.33, how="reach")
        (3, 3, 4)
    """
    if how not in ("closest", "reach"):
        raise ConfigError(f"k_for_fraction how={how!r}; valid: closest, reach")
    if not 0.0 < float(target) <= 1.0:
        raise ConfigError(f"k_for_fraction target={target}; must be a fraction in (0, 1]")
    plans = leaf_plans(params, rules=rules, shared=shared, fan_in_axes=fan_in_axes)
    fans = np.array([p.fan for p in plans if p.action == "psn"], np.int64).reshape(-1, 2)
    if not len(fans):
        raise ConfigError("k_for_fraction: no leaf is ruled 'psn', so K changes nothing")
    fixed = sum(p.size for p in plans if p.action == "train")
    total = sum(p.size for p in plans)
    ks = np.arange(1, int(fans[:, 0].max()) + 1, dtype=np.int64)
    counts = fixed + (np.minimum(ks[:, None], fans[None, :, 0]) * fans[None, :, 1]).sum(axis=1)
    fractions = counts / total
    if how == "reach":
        hit = np.nonzero(fractions >= float(target) - 1e-12)[0]
        if not len(hit):
            raise ConfigError(f"k_for_fraction target={target}: the most trainable mask (K={int(ks[-1])}, every "
                              f"neuron fully trainable) reaches only {fractions[-1]:.6f}")
        return int(ks[hit[0]])
    return int(ks[int(np.argmin(np.abs(fractions - float(target))))])


# ------------------------------------------------------------------------------------------ masks


def _to_2d(w: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, tuple[int, ...]]:
    """``w`` transposed to (fan-in axes, other axes) and reshaped ``[fan_in, fan_out]``; also the permutation."""
    perm = axes + tuple(a for a in range(w.ndim) if a not in axes)
    fan_in = int(math.prod(w.shape[a] for a in axes))
    return jnp.transpose(w, perm).reshape(fan_in, -1), perm


def _from_2d(m: jax.Array, shape: tuple[int, ...], perm: tuple[int, ...]) -> jax.Array:
    return jnp.transpose(m.reshape(tuple(shape[a] for a in perm)), np.argsort(perm))


@functools.partial(jax.jit, static_argnames=("axes", "k", "strategy"))
def _per_neuron(w: jax.Array, axes: tuple[int, ...], k: int, strategy: str) -> jax.Array:
    """The per-neuron top-``k`` mask of kernel ``w`` whose fan-in ``axes`` are given (one program per shape)."""
    w2, perm = _to_2d(w, axes)
    fan_in, fan_out = w2.shape
    if k >= fan_in:
        return jnp.ones(w.shape, jnp.bool_)
    scores = connection_scores(w2, strategy)  # |w| ("magnitude") or -|w| ("reverse"), float32
    sel = Selected(indices=top_k_per_neuron(scores, k), rows=None, shape=(fan_in, fan_out))
    return _from_2d(selection_mask(sel), w.shape, perm)


def psn_mask(params: Any, k: int, *, rules: Sequence[Rule] = GPS_RULES, variant: str = "top",
             key: jax.Array | None = None, shared: str | Callable[[str], bool] | None = None,
             fan_in_axes: Sequence[tuple[str, Sequence[int]]] = (), require_every_layer: bool = False) -> Any:
    """The boolean sparse-training mask (same tree structure as ``params``; True = trainable).

    Args:
      params: the parameters at initialisation (nested dicts of arrays, Flax ``Partitioned`` boxes allowed).
        Shape-only trees (``ShapeDtypeStruct`` leaves) cannot be ranked: count them with
        :func:`count_trainable` / :func:`k_for_fraction`.
      k: trainable connections per neuron (capped at each kernel's fan-in).
      rules: ordered ``(regex, action)`` rules (:data:`GPS_RULES`, :data:`GPS_CNN_RULES`, or your own).
      variant: ``"top"`` (PSN), ``"reverse"``, ``"random"`` or ``"global"`` (module docstring).
      key: PRNG key, required by ``"random"`` (the mask is a deterministic function of it).
      shared: which leaves are shared (see :func:`leaf_plans`); task-specific leaves are all True.
      fan_in_axes: fan-in axis overrides (see :func:`leaf_plans`).
      require_every_layer: raise when a PSN-ruled shared kernel ends up with no trainable entry (possible for
        ``"random"``/``"global"``); needs concrete (not traced) parameters.

    Raises:
      ConfigError: ``k < 1``, an unknown variant or rule action, ``"random"`` without ``key``, or (with
        ``require_every_layer``) a kernel left without any trainable entry (the message names its path).
      InputError: ``ShapeDtypeStruct`` leaves.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> p = {"fc": {"kernel": jnp.array([[1.0, -4.0], [-3.0, 2.0], [2.0, 0.5]])}}
        >>> psn_mask(p, 1)["fc"]["kernel"].astype(int).tolist()  # per column, the largest |w|
        [[0, 1], [1, 0], [0, 0]]
        >>> psn_mask(p, 1, variant="reverse")["fc"]["kernel"].astype(int).tolist()
        [[1, 0], [0, 0], [0, 1]]
        >>> psn_mask(p, 1, variant="global")["fc"]["kernel"].astype(int).tolist()  # the 2 largest overall
        [[0, 1], [1, 0], [0, 0]]
        >>> int(psn_mask(p, 1, variant="random", key=jax.random.key(0))["fc"]["kernel"].sum())
        2
    """
    k = _check_k(k)
    if variant not in VARIANTS:
        raise ConfigError(f"psn variant={variant!r}; valid: {', '.join(VARIANTS)}")
    if variant == "random" and key is None:
        raise ConfigError("psn variant='random' needs a PRNG key (key=jax.random.key(seed))")
    leaves, treedef = _flatten(params)
    shape_only = [p for p, x in leaves if isinstance(x, jax.ShapeDtypeStruct)]
    if shape_only:
        raise InputError(f"psn_mask: leaf {shape_only[0]} is a ShapeDtypeStruct (shapes only), so there are no "
                         f"weights to rank; use count_trainable / k_for_fraction for shape-only trees")
    plans = leaf_plans(params, rules=rules, shared=shared, fan_in_axes=fan_in_axes)
    masks: list[Any] = [None] * len(plans)
    psn_ids = []
    for i, (plan, (_, w)) in enumerate(zip(plans, leaves, strict=True)):
        if plan.action == "psn":
            psn_ids.append(i)
            if variant in ("top", "reverse"):
                strategy = "magnitude" if variant == "top" else "reverse"
                masks[i] = _per_neuron(jnp.asarray(w), plan.fan_in_axes, k, strategy)
        else:
            masks[i] = jnp.full(plan.shape, plan.action == "train", jnp.bool_)
    if variant in ("random", "global") and psn_ids:
        n_pick = sum(plans[i].trainable(k) for i in psn_ids)
        sizes = [plans[i].size for i in psn_ids]
        total = sum(sizes)
        if variant == "random":
            picked = jax.random.permutation(key, total)[:n_pick]
        else:  # stable: on equal |w| the earlier position wins
            scores = jnp.concatenate([jnp.abs(jnp.asarray(leaves[i][1], jnp.float32)).ravel() for i in psn_ids])
            picked = jnp.argsort(-scores, stable=True)[:n_pick]
        flat = jnp.zeros((total,), jnp.bool_).at[picked].set(True)
        offsets = np.cumsum([0] + sizes)
        for j, i in enumerate(psn_ids):
            masks[i] = flat[offsets[j]:offsets[j + 1]].reshape(plans[i].shape)
    if require_every_layer:
        for i in psn_ids:
            if isinstance(masks[i], jax.core.Tracer):
                raise ConfigError("psn require_every_layer=True needs concrete parameters (not inside jit)")
            if not bool(jnp.any(masks[i])):
                raise ConfigError(f"psn: shared weight {plans[i].path} {plans[i].shape} has no trainable entry with "
                                  f"variant={variant!r}, k={k}; use a larger k, variant='top', or "
                                  f"require_every_layer=False")
    return jax.tree_util.tree_unflatten(treedef, masks)


def mask_counts(mask: Any) -> dict[str, int]:
    """Trainable entries per leaf path of a mask (e.g. the per-block distribution of Fig. 13).

    Example:
        >>> import jax.numpy as jnp
        >>> mask_counts({"a": {"kernel": jnp.eye(3, dtype=bool)}, "b": jnp.zeros(2, bool)})
        {'a/kernel': 3, 'b': 0}
    """
    return {p: int(np.count_nonzero(np.asarray(jax.device_get(m)))) for p, m in _flatten(mask)[0]}
