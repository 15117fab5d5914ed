"""GPS: gradient-based parameter selection and masked fine-tuning of the base weights in place.

Seed ``004_21d0d480fe4006f4.txt``, chapter 4. For every neuron of every targeted kernel the top-``k``
input connections by ``|∇W|`` over a selection dataset are chosen (§4.3.1; the loss is the supervised
contrastive loss of Eq. 4.2 when the data have class labels, see
:func:`vlpeft_jax.peft.selection.make_selection_loss`). Training then updates those entries of the base
weights only: a boolean mask ``M_j`` per kernel (Eq. 4.5) zeroes the dense gradient before the optimizer
(Eq. 4.6) and the update after it (so decoupled weight decay and momentum never move an unselected
weight).

**This is the deliberately memory-heavy reference** (DESIGN invariant 2's one exception; thesis Fig. 5.2):
the full gradient of every targeted kernel is formed, the optimizer state is dense (AdamW: two float32
moments per weight, Eq. 5.5), and the masks take one byte per weight (``bool``; the 1 bit of Table 5.1 is
a lower bound). :class:`~vlpeft_jax.peft.neuroada.NeuroAda` trains the same kind of per-neuron selection
with ``[d_out, k]`` state only; ``python run.py bench sparse`` measures the two side by side.

How a run uses it: GPS is a method (``config.peft.<name>.method = "gps"``) whose parameters are the selected
input indices per neuron (``[n, k]`` int32, as NeuroAda's; never trained). Through the method capabilities
(:mod:`vlpeft_jax.peft.base`) a stage that activates it trains the targeted base kernels
(:meth:`GPS.stage_rules`), its optimizer is wrapped with :func:`masked` (:meth:`GPS.optimizer_wrapper`; the
dense masks are built from the indices when the optimizer state is created and live in it, so they are
sharded and checkpointed like the moments), and the stage counts ``n * k`` trainable entries per kernel.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> params = {"fc": {"kernel": jnp.array([[1.0, -2.0], [3.0, 0.5]]), "bias": jnp.zeros(2)}}
    >>> gps = GPS(targets=("fc",), k=1, selection="magnitude")
    >>> masks = gps.masks(jax.random.key(0), params)
    >>> masks["fc"]["kernel"].tolist()
    [[False, True], [True, False]]
    >>> tx = masked(optax.sgd(0.5), masks)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, _ = tx.update(grads, state, params)
    >>> updates["fc"]["kernel"].tolist(), updates["fc"]["bias"].tolist()
    ([[0.0, -0.5], [-0.5, 0.0]], [-0.5, -0.5])
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from vlpeft_jax import tree
from vlpeft_jax.errors import ConfigError
from vlpeft_jax.peft import base as pb
from vlpeft_jax.peft import selection as sel
from vlpeft_jax.peft.neuroada import DEFAULT_TARGETS


class MaskedState(NamedTuple):
    """State of :func:`masked`: the boolean masks (``None`` at unmasked leaves) and the inner state."""

    mask: Any
    inner: optax.OptState


def align_mask(mask: Mapping[str, Any], params: Any) -> Any:
    """``mask`` laid out like ``params``: its array where ``mask`` has one at the same path, else None.

    ``params`` may hold ``None`` leaves (a train state's trainable tree); ``mask`` is a nested dict over (part of)
    the full parameter tree, so one mask serves every stage's split."""

    def leaf(path: Any, p: Any) -> Any:
        if p is None:
            return None
        names = [tree.key_name(k) for k in path]
        node: Any = mask
        for n in names:
            if not isinstance(node, Mapping) or n not in node:
                return None
            node = node[n]
        if isinstance(node, Mapping):
            return None
        if tuple(node.shape) != tuple(p.shape):
            raise ConfigError(f"GPS mask at {'/'.join(names)} has shape {tuple(node.shape)}, the parameter "
                              f"{tuple(p.shape)}")
        return jnp.asarray(node, jnp.bool_)

    return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=lambda x: x is None)


def _apply_mask(tree: Any, mask: Any) -> Any:
    return jax.tree.map(lambda u, m: u if (u is None or m is None) else jnp.where(m, u, jnp.zeros_like(u)),
                        tree, mask, is_leaf=lambda x: x is None)


def masked(inner: optax.GradientTransformation, mask: Mapping[str, Any] | Callable[[Any], Mapping[str, Any]]
           ) -> optax.GradientTransformation:
    """Wraps ``inner`` so that only the ``True`` entries of ``mask`` are ever updated (Eq. 4.6).

    Args:
      inner: any optax transformation (e.g. a stage optimizer, clipping included: the global norm is
        then taken over the selected entries only).
      mask: a nested dict mirroring (part of) the parameter tree, with boolean arrays of the parameters'
        shapes; leaves it does not reach are updated normally. ``None`` leaves (frozen parameters in
        the train state's trainable tree) are left alone. Or a function ``params -> mask`` called by
        ``init`` (masks built from the parameters' shapes).

    The gradient is masked before ``inner`` (so its moments stay zero on unselected entries) and the
    update after it (so weight decay cannot move them either). The masks are stored in the state.
    """

    def init(params: Any) -> MaskedState:
        mask_tree = mask(params) if callable(mask) else mask
        return MaskedState(mask=align_mask(mask_tree, params), inner=inner.init(params))

    def update(updates: Any, state: MaskedState, params: Any = None) -> tuple[Any, MaskedState]:
        grads = _apply_mask(updates, state.mask)
        out, inner_state = inner.update(grads, state.inner, params)
        return _apply_mask(out, state.mask), MaskedState(mask=state.mask, inner=inner_state)

    return optax.GradientTransformation(init, update)


@dataclasses.dataclass(frozen=True)
class GPS(pb.Method):
    """GPS settings (selection as :mod:`vlpeft_jax.peft.selection`; ``gradient`` is the method's own).

    Attributes:
      targets: module name patterns whose kernels are selected from (any kernel of >= 2 dimensions;
        convolutions are read as ``[-1, out]``).
      k: connections per neuron (the thesis uses top-1 for most tasks, §4.4.2).
      budget: instead of ``k``: trainable entries (``>= 1``) or a fraction (``< 1``) of the targeted weights.
      selection: ``gradient`` (GPS), or ``magnitude``, ``reverse``, ``random`` for ablations (Table 4.6).
      neuron_fraction: fraction of each kernel's neurons that get connections.
    """

    targets: tuple[str, ...] = DEFAULT_TARGETS
    k: int = 1
    budget: float = 0.0
    selection: str = "gradient"
    neuron_fraction: float = 1.0
    name: str = "gps"

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", (self.targets,) if isinstance(self.targets, str) else tuple(self.targets))
        sel.validate(self.name, k=self.k, budget=self.budget, strategy=self.selection,
                     neuron_fraction=self.neuron_fraction)

    def masks(self, rng: jax.Array, base_params: pb.Params, scores: Mapping[str, Any] | None = None) -> pb.Params:
        """``{<module path>: {"kernel": bool mask}}`` for every targeted kernel (Eq. 4.5).

        ``scores`` come from :func:`vlpeft_jax.peft.selection.gradient_scores` (required for ``gradient``).
        """
        out: pb.Params = {}
        for path, s in self._select(rng, base_params, scores).items():
            pb.set_path(out, path, {"kernel": sel.selection_mask(s)})
        return out

    # ------------------------------------------------------------ the method protocol (pb.Method)

    def _select(self, rng: jax.Array, base_params: pb.Params, scores: Mapping[str, Any] | None
                ) -> dict[tuple[str, ...], sel.Selected]:
        return sel.select(base_params, self.targets, k=self.k, budget=self.budget, strategy=self.selection,
                          neuron_fraction=self.neuron_fraction, rng=rng, scores=scores, name=self.name)

    def init(self, rng: jax.Array, base_params: pb.Params, scores: Mapping[str, Any] | None = None) -> pb.Params:
        """The selected input indices ``{<module path>: {"indices": [n, k], "rows": [n]?}}`` (as NeuroAda's).

        ``gradient`` selection needs ``scores`` (:meth:`prepare` computes them from the run's data).
        """
        out: pb.Params = {}
        for path, s in self._select(rng, base_params, scores).items():
            pb.set_path(out, path, {"indices": s.indices} | ({} if s.rows is None else {"rows": s.rows}))
        return out

    def prepare(self, rng: jax.Array, base_params: pb.Params, context: pb.PrepareContext) -> pb.Params:
        """:meth:`init`, with the gradient scores of the run's selection data for ``selection='gradient'``."""
        scores = context.scores(base_params, self.targets, self.name) if self.selection == "gradient" else None
        return self.init(rng, base_params, scores=scores)

    def hooks(self, peft_params: pb.Params, *, rng: jax.Array | None = None, train: bool = False) -> list:
        """None: GPS changes the base weights themselves, not the forward pass."""
        return []

    def merge(self, base_params: pb.Params, peft_params: pb.Params) -> pb.Params:
        """The base unchanged: the trained entries are already in it."""
        return base_params

    def stage_rules(self, peft_params: pb.Params) -> list[tuple[str, str]]:
        """Train the selected kernels of the base (their unselected entries are held by the optimizer masks)."""
        return self.trainable_rules(pb.module_paths(peft_params, "indices"))

    def optimizer_wrapper(self, tx: optax.GradientTransformation, peft_params: pb.Params
                          ) -> optax.GradientTransformation:
        """``tx`` restricted to the selected entries; the masks are built from the indices at ``tx.init``."""
        paths = pb.module_paths(peft_params, "indices")

        def build(params: Any) -> pb.Params:
            masks: pb.Params = {}
            for path in paths:
                p = pb.get_path(peft_params, path)
                shape = tuple(pb.get_path(params, ("base", *path, "kernel")).shape)
                chosen = sel.Selected(indices=p["indices"], rows=p.get("rows"), shape=shape)
                pb.set_path(masks, ("base", *path, "kernel"), sel.selection_mask(chosen))
            return masks

        return masked(tx, build)

    # ------------------------------------------------------------------------ masks (the reference form)

    def trainable_rules(self, masks: pb.Params | list[tuple[str, ...]], root: str = "base") -> list[tuple[str, str]]:
        """Stage rules training exactly the masked kernels (under ``root`` of the parameter tree)."""
        paths = masks if isinstance(masks, list) else pb.module_paths(masks, "kernel")
        if not paths:
            raise ConfigError(f"{self.name}: no masks to train")
        prefix = f"{re.escape(root)}/" if root else ""
        return [(prefix + re.escape("/".join(p)) + "/kernel", self.name) for p in paths]

    def optimizer(self, inner: optax.GradientTransformation, masks: pb.Params, root: str = "base"
                  ) -> optax.GradientTransformation:
        """``inner`` restricted to the selected entries; ``masks`` as from :meth:`masks`, placed under ``root``."""
        return masked(inner, {root: masks} if root else masks)

    def num_selected(self, base_params: pb.Params) -> int:
        """Selected entries over ``base_params`` (arrays or abstract shapes; no selection is run)."""
        return sel.count_selected(base_params, self.targets, k=self.k, budget=self.budget,
                                  neuron_fraction=self.neuron_fraction, name=self.name)

    def num_params(self, peft_params: pb.Params) -> int:
        """Selected (trainable) entries: of the indices (:meth:`init`; works on abstract shapes) or the masks."""
        paths = pb.module_paths(peft_params, "indices")
        if paths:
            return sum(pb.count(pb.get_path(peft_params, path)["indices"]) for path in paths)
        return int(sum(int(jnp.sum(m)) for m in jax.tree.leaves(peft_params)))
