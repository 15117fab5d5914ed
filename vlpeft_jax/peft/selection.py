"""Per-neuron top-k selection of input connections, shared by GPS (mask) and NeuroAda (sparse deltas).

A *neuron* is one output unit of a projection. Our kernels are ``[in, out]`` (``[..., in, out]`` for
convolutions, read as ``[-1, out]``), so a neuron is a kernel *column*; the thesis writes
``W ∈ R^{d_out × d_in}`` with neurons as rows (seed ``004_21d0d480fe4006f4.txt`` §5.3.1). For every
targeted kernel and every involved neuron ``i`` we pick the ``k`` input indices with the highest score:

- ``magnitude``: ``|W|`` (NeuroAda default, Eq. 5.2);
- ``gradient``: ``|∇_W L|`` of the loss over a selection dataset (GPS, Eq. 4.1 and §4.3.1; the loss is the
  supervised contrastive loss of Eq. 4.2 when the data carry class labels, else the task loss);
- ``reverse``: lowest ``|W|``; ``random``: uniformly random (the ablation of Fig. 5.7).

``k`` is given per neuron, or derived from a trainable-parameter ``budget``; ``neuron_fraction < 1``
involves only a random subset of each kernel's neurons (Fig. 5.6). Everything here works on abstract
shapes (``jax.eval_shape``), so parameter counts of 7B-parameter models need no memory.

Example:
    >>> import jax.numpy as jnp
    >>> kernel = jnp.array([[0.1, -3.0], [2.0, 0.5], [-0.7, 0.2]])  # [in=3, out=2]
    >>> top_k_per_neuron(jnp.abs(kernel), 2).tolist()  # per output neuron, the 2 largest |w|
    [[1, 2], [0, 1]]
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlpeft_jax import tree
from vlpeft_jax.errors import ConfigError
from vlpeft_jax.peft import base as pb

STRATEGIES = ("magnitude", "gradient", "reverse", "random")


@dataclasses.dataclass(frozen=True)
class Selected:
    """The connections selected in one kernel.

    Attributes:
      indices: int32 ``[n, k]``: for each involved neuron, the input indices of its ``k`` connections.
      rows: int32 ``[n]``: the involved neurons (output indices), or None when all ``d_out`` are involved
        (then ``n = d_out`` and row ``i`` is neuron ``i``).
      shape: the kernel's shape.
    """

    indices: jax.Array
    rows: jax.Array | None
    shape: tuple[int, ...]


# ------------------------------------------------------------------------------------------ settings


def validate(name: str, *, k: int, budget: float, strategy: str, neuron_fraction: float) -> None:
    """Checks selection settings; raises :class:`ConfigError` naming ``<name>.<field>=<value>``."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"{name}.selection={strategy!r}; valid: {', '.join(STRATEGIES)}")
    if budget < 0:
        raise ConfigError(f"{name}.budget={budget}; must be 0 (use k), a fraction in (0, 1) of the targeted "
                          f"weights, or a number of trainable values >= 1")
    if not budget and (not isinstance(k, (int, np.integer)) or k < 1):
        raise ConfigError(f"{name}.k={k!r}; must be an integer >= 1 (connections per neuron)")
    if not 0.0 < neuron_fraction <= 1.0:
        raise ConfigError(f"{name}.neuron_fraction={neuron_fraction}; must be in (0, 1]")


def _fan(shape: Sequence[int]) -> tuple[int, int]:
    """``(d_in, d_out)`` of a kernel ``[..., in, out]`` read as ``[-1, out]``."""
    return int(np.prod(shape[:-1])), int(shape[-1])


def involved_neurons(d_out: int, neuron_fraction: float) -> int:
    """How many of ``d_out`` neurons take part (at least one)."""
    return max(1, int(round(neuron_fraction * d_out)))


def k_for_budget(budget: float, shapes: Sequence[Sequence[int]], neuron_fraction: float = 1.0,
                 name: str = "selection") -> int:
    """The per-neuron ``k`` a trainable-parameter ``budget`` allows over kernels of ``shapes``.

    ``budget`` in (0, 1) is a fraction of the targeted kernels' entries; ``budget >= 1`` is a number of
    trainable values. ``k = floor(budget values / involved neurons)``.

    Example:
        >>> k_for_budget(0.25, [(8, 4), (8, 4)]), k_for_budget(16, [(8, 4), (8, 4)])
        (2, 2)
    """
    entries = sum(_fan(s)[0] * _fan(s)[1] for s in shapes)
    values = budget * entries if budget < 1 else budget
    neurons = sum(involved_neurons(_fan(s)[1], neuron_fraction) for s in shapes)
    k = int(math.floor(values / neurons + 1e-9))
    if k < 1:
        raise ConfigError(f"{name}.budget={budget} gives k={values / neurons:.3g} < 1 connection per neuron "
                          f"({values:.0f} values for {neurons} neurons); the smallest budget here is {neurons} "
                          f"values ({neurons / entries:.3g} of the targeted weights)")
    return k


# ------------------------------------------------------------------------------------------ targets


def target_kernels(params: Mapping[str, Any], targets: str | Sequence[str], *, name: str = "selection",
                   leaf_name: str = "kernel") -> list[tuple[tuple[str, ...], Any]]:
    """``(module path, kernel)`` of every module matched by ``targets`` (see :func:`base.match_targets`).

    A pattern naming an existing module that holds no weight (e.g. a norm, or a block such as
    ``self_attn`` rather than its projections) gets a message saying so.
    """
    patterns = [targets] if isinstance(targets, str) else list(targets)
    for pat in patterns:
        try:
            pb.match_targets(params, [pat], leaf_name=leaf_name, method=name)
        except ConfigError:
            weightless = [p for p in tree.all_module_paths(params)
                          if "/".join(p) == pat or "/".join(p).endswith("/" + pat)]
            if weightless:
                where = "/".join(weightless[0])
                raise ConfigError(f"{name}: target {pat!r} names module {where!r}, which has no weight "
                                  f"({leaf_name!r} of >= 2 dimensions); target its projections instead, e.g. "
                                  f"{', '.join(_kernel_children(params, weightless[0])) or 'a linear layer'}"
                                  ) from None
            raise
    paths = pb.match_targets(params, patterns, leaf_name=leaf_name, method=name)
    return [(p, pb.get_path(params, p + (leaf_name,))) for p in paths]


def _kernel_children(params: Mapping[str, Any], path: tuple[str, ...]) -> list[str]:
    node = pb.get_path(params, path)
    return [n for n, v in node.items() if isinstance(v, Mapping) and "kernel" in v][:4]


# ------------------------------------------------------------------------------------------ scores


def top_k_per_neuron(scores: jax.Array, k: int) -> jax.Array:
    """int32 ``[d_out, k]``: per output neuron (column of ``scores [d_in, d_out]``), the top-``k`` inputs."""
    return jax.lax.top_k(jnp.swapaxes(scores, -1, -2), k)[1].astype(jnp.int32)


def connection_scores(kernel: jax.Array, strategy: str, *, rng: jax.Array | None = None,
                      gradient: jax.Array | None = None) -> jax.Array:
    """``[d_in, d_out]`` float32 scores; the selected connections are the per-column top-k."""
    d_in, d_out = _fan(kernel.shape)
    w = jnp.reshape(kernel, (d_in, d_out)).astype(jnp.float32)
    if strategy == "magnitude":
        return jnp.abs(w)
    if strategy == "reverse":
        return -jnp.abs(w)
    if strategy == "random":
        if rng is None:
            raise ConfigError("random selection needs an rng")
        return jax.random.uniform(rng, (d_in, d_out))
    if strategy == "gradient":
        if gradient is None:
            raise ConfigError("gradient selection needs gradient scores from a selection dataset")
        return jnp.reshape(jnp.abs(gradient), (d_in, d_out)).astype(jnp.float32)
    raise ConfigError(f"selection={strategy!r}; valid: {', '.join(STRATEGIES)}")


def select(params: Mapping[str, Any], targets: str | Sequence[str], *, k: int = 1, budget: float = 0.0,
           strategy: str = "magnitude", neuron_fraction: float = 1.0, rng: jax.Array | None = None,
           scores: Mapping[str, Any] | None = None, name: str = "selection",
           max_ndim: int | None = None) -> dict[tuple[str, ...], Selected]:
    """Top-k input connections per neuron of every targeted kernel.

    Args:
      params: base parameters: arrays, tracers (inside ``jax.eval_shape``), or ``ShapeDtypeStruct`` leaves
        (then only the shapes of the result are meaningful: the indices are zero placeholders).
      targets: module name patterns, as LoRA's.
      k: connections per involved neuron (ignored when ``budget`` is set).
      budget: trainable values (``>= 1``) or fraction of the targeted kernels' entries (``< 1``); 0: use k.
      strategy: one of :data:`STRATEGIES`.
      neuron_fraction: the fraction of each kernel's neurons involved (a random subset when < 1).
      rng: for ``random`` selection and the neuron subset.
      scores: for ``gradient``: a tree mirroring ``params`` with ``|∇W|`` at ``<path>/kernel`` (from
        :func:`gradient_scores`).
      name: the setting prefix used in error messages (``neuroada``, ``gps``).
      max_ndim: reject kernels with more dimensions (NeuroAda applies only through the ``linear`` hook).

    Raises:
      ConfigError: a target matching no weight, ``k`` larger than a kernel's input width, a budget giving
        ``k < 1``, or gradient selection without scores.
    """
    validate(name, k=k, budget=budget, strategy=strategy, neuron_fraction=neuron_fraction)
    if strategy == "gradient" and scores is None:
        raise ConfigError(f"{name}.selection='gradient' needs a selection dataset: compute scores with "
                          f"vlpeft_jax.peft.selection.gradient_scores(loss_fn, params, batches, targets) and pass "
                          f"them as scores=...")
    needs_rng = strategy == "random" or neuron_fraction < 1.0
    if needs_rng and rng is None:
        raise ConfigError(f"{name}: selection={strategy!r} with neuron_fraction={neuron_fraction} needs an rng")
    kernels = target_kernels(params, targets, name=name)
    if max_ndim is not None:
        bad = [("/".join(p), w.shape) for p, w in kernels if len(w.shape) > max_ndim]
        if bad:
            raise ConfigError(f"{name}: {bad[0][0]} has a {len(bad[0][1])}-D kernel {tuple(bad[0][1])}; this method "
                              f"applies to linear layers ([in, out] kernels) only")
    if budget:
        k = k_for_budget(budget, [w.shape for _, w in kernels], neuron_fraction, name)
    out: dict[tuple[str, ...], Selected] = {}
    for path, kernel in kernels:
        d_in, d_out = _fan(kernel.shape)
        if k > d_in:
            raise ConfigError(f"{name}.k={k} is larger than the input width of {'/'.join(path)} "
                              f"(kernel {tuple(kernel.shape)}: at most {d_in} connections per neuron)")
        key = None if rng is None else jax.random.fold_in(rng, zlib.crc32("/".join(path).encode()))
        n = involved_neurons(d_out, neuron_fraction)
        rows = None
        if n < d_out:
            rows = jnp.sort(jax.random.permutation(jax.random.fold_in(key, 1), d_out)[:n]).astype(jnp.int32)
        if isinstance(kernel, jax.ShapeDtypeStruct):
            # shapes only (e.g. `run.py params` closes over ShapeDtypeStruct leaves): nothing to rank, and
            # materialising the kernel could need gigabytes; the indices are placeholders of the right shape
            out[path] = Selected(indices=jnp.zeros((n, k), jnp.int32), rows=rows, shape=tuple(kernel.shape))
            continue
        grad = None
        if strategy == "gradient":
            grad = pb.lookup(scores, path)
            if grad is None or "kernel" not in grad:
                raise ConfigError(f"{name}: the gradient scores have no entry for {'/'.join(path)}; compute them "
                                  f"with the same targets")
            grad = grad["kernel"]
        s = connection_scores(kernel, strategy, rng=None if key is None else jax.random.fold_in(key, 0),
                              gradient=grad)
        if rows is not None:
            s = jnp.take(s, rows, axis=1)
        out[path] = Selected(indices=top_k_per_neuron(s, k), rows=rows, shape=tuple(kernel.shape))
    return out


def count_selected(params: Mapping[str, Any], targets: str | Sequence[str], *, k: int = 1, budget: float = 0.0,
                   neuron_fraction: float = 1.0, name: str = "selection") -> int:
    """How many connections :func:`select` picks over ``params`` (arrays or ``ShapeDtypeStruct`` s):
    ``k`` (or the budget's ``k``) times the involved neurons of every targeted kernel.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> p = {"a": {"kernel": jax.ShapeDtypeStruct((8, 4), jnp.float32)}}
        >>> count_selected(p, "a", k=3), count_selected(p, "a", k=1, neuron_fraction=0.5)
        (12, 2)
    """
    kernels = target_kernels(params, targets, name=name)
    if budget:
        k = k_for_budget(budget, [w.shape for _, w in kernels], neuron_fraction, name)
    return int(k) * sum(involved_neurons(_fan(w.shape)[1], neuron_fraction) for _, w in kernels)


# --------------------------------------------------------------------------- dense views (GPS, tests)


def selection_mask(sel: Selected) -> jax.Array:
    """The boolean ``[kernel shape]`` mask of the selected connections (Eq. 4.5: ``M_j``)."""
    d_in, d_out = _fan(sel.shape)
    rows = jnp.arange(d_out, dtype=jnp.int32) if sel.rows is None else sel.rows
    mask = jnp.zeros((d_in, d_out), jnp.bool_).at[sel.indices, rows[:, None]].set(True)
    return mask.reshape(sel.shape)


def scatter_add(kernel: jax.Array, indices: jax.Array, values: jax.Array, rows: jax.Array | None = None
                ) -> jax.Array:
    """``kernel`` with ``values[i, j]`` added at ``(indices[i, j], rows[i])`` (the thesis' App. C.6 phase 3).

    Example:
        >>> import jax.numpy as jnp
        >>> scatter_add(jnp.zeros((3, 2)), jnp.array([[2], [0]]), jnp.array([[1.0], [5.0]])).tolist()
        [[0.0, 5.0], [0.0, 0.0], [1.0, 0.0]]
    """
    d_in, d_out = _fan(kernel.shape)
    cols = (jnp.arange(d_out, dtype=jnp.int32) if rows is None else rows)[:, None]
    flat = jnp.reshape(kernel, (d_in, d_out))
    return flat.at[indices, cols].add(values.astype(kernel.dtype)).reshape(kernel.shape)


# --------------------------------------------------------------------------- gradient selection (GPS)


def supervised_contrastive_loss(features: jax.Array, labels: jax.Array, temperature: float = 0.07,
                                valid: jax.Array | None = None) -> jax.Array:
    """Supervised contrastive loss (Khosla et al. 2020; the thesis' Eq. 4.2), averaged over anchors.

    ``z`` are the L2-normalised ``features [n, d]``; for anchor ``i`` the positives ``P(i)`` are the other
    samples of its class and ``A(i)`` all other samples:
    ``L_i = -1/|P(i)| Σ_{p∈P(i)} log(exp(z_i·z_p/τ) / Σ_{a∈A(i)} exp(z_i·z_a/τ))``. Anchors without a
    positive are left out (their term is undefined). The mean rather than the sum over anchors only
    rescales gradients, which leaves the per-neuron ranking unchanged.

    Example:
        >>> import jax.numpy as jnp
        >>> z = jnp.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
        >>> bool(supervised_contrastive_loss(z, jnp.array([0, 0, 1, 1])) <
        ...      supervised_contrastive_loss(z, jnp.array([0, 1, 0, 1])))
        True
    """
    z = features.astype(jnp.float32)
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    n = z.shape[0]
    ok = jnp.ones((n,), bool) if valid is None else valid.astype(bool)
    logits = z @ z.T / temperature
    others = ~jnp.eye(n, dtype=bool) & ok[None, :] & ok[:, None]
    logits = jnp.where(others, logits, -jnp.inf)
    log_prob = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    positive = others & (labels[:, None] == labels[None, :])
    n_pos = positive.sum(-1)
    per_anchor = -jnp.where(positive, log_prob, 0.0).sum(-1) / jnp.maximum(n_pos, 1)
    has = n_pos > 0
    return jnp.where(has, per_anchor, 0.0).sum() / jnp.maximum(has.sum(), 1)


def make_selection_loss(task_loss: Callable[[Any, Any], jax.Array] | None = None,
                        features_fn: Callable[[Any, Any], jax.Array] | None = None, *,
                        label_key: str = "class_labels", temperature: float = 0.07
                        ) -> Callable[[Any, Any], jax.Array]:
    """The loss GPS differentiates for selection (§4.3.1): SCL (Eq. 4.2) on ``features_fn(params, batch)``
    when the batch holds ``label_key`` (and ``features_fn`` is given), else ``task_loss(params, batch)``.

    The choice is made per batch structure at trace time, so a head-free contrastive selection needs no
    randomly initialised classifier.
    """
    if task_loss is None and features_fn is None:
        raise ConfigError("make_selection_loss needs a task_loss or a features_fn")

    def loss(params: Any, batch: Mapping[str, Any]) -> jax.Array:
        if features_fn is not None and label_key in batch:
            return supervised_contrastive_loss(features_fn(params, batch), jnp.asarray(batch[label_key]), temperature)
        if task_loss is None:
            raise ConfigError(f"selection batch has no {label_key!r} for the contrastive loss and no task loss "
                              f"was given")
        return task_loss(params, batch)

    return loss


def gradient_scores(loss_fn: Callable[[Any, Any], jax.Array], params: Mapping[str, Any], batches: Iterable[Any],
                    targets: str | Sequence[str], *, name: str = "selection") -> dict[str, Any]:
    """``|∇_W L_D|`` for every targeted kernel: the gradient of the loss summed over the selection batches
    (Eq. 4.1), then its modulus. Only the targeted kernels are differentiated.

    Args:
      loss_fn: ``(params, batch) -> scalar`` over the full base ``params``.
      params: base parameters.
      batches: the selection dataset (an iterable of batches; must not be empty).
      targets: module name patterns (the same as the method's).

    Returns:
      A tree mirroring ``params`` with float32 ``kernel`` scores at the targeted modules only.

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"fc": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}}
        >>> loss = lambda p, b: jnp.sum((b["x"] @ p["fc"]["kernel"]) * b["y"])
        >>> s = gradient_scores(loss, params, [{"x": jnp.array([[1.0, -2.0]]), "y": jnp.array([[1.0, 3.0]])}], "fc")
        >>> s["fc"]["kernel"].tolist()
        [[1.0, 3.0], [2.0, 6.0]]
    """
    paths = [p for p, _ in target_kernels(params, targets, name=name)]
    chosen = {p: pb.get_path(params, p + ("kernel",)) for p in paths}

    def with_kernels(rest: Any, kernels: dict) -> Any:
        full = pb.copy_tree(rest)
        for p, w in kernels.items():
            pb.set_path(full, p + ("kernel",), w)
        return full

    @jax.jit  # params are an argument, not a closed-over constant baked into the program
    def grads(kernels: dict, rest: Any, batch: Any) -> dict:
        return jax.grad(lambda ks: loss_fn(with_kernels(rest, ks), batch))(kernels)

    total = None
    for batch in batches:
        g = grads(chosen, params, batch)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    if total is None:
        raise ConfigError(f"{name}: gradient selection needs a selection dataset, but no batch was given")
    out: dict[str, Any] = {}
    for p, g in total.items():
        pb.set_path(out, p, {"kernel": jnp.abs(g).astype(jnp.float32)})
    return out
