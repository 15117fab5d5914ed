"""What every PEFT method provides: the method protocol, its optional capabilities, and :func:`apply_with`.

A method is a small frozen dataclass with pure functions (DESIGN §2 and §2.1, invariants 1-4):

- ``init(rng, base_params) -> peft_params``: its own pytree, whose paths mirror the base paths it adapts
  (e.g. ``{"model": {"layers_0": {"self_attn": {"q_proj": {"lora_a": .., "lora_b": ..}}}}}``).
- ``hooks(peft_params, *, rng=None, train=False) -> list[Hook]``: the hook functions that apply it in
  activation space (the base weights are never rewritten while training).
- ``merge(base_params, peft_params) -> base_params``: plain base parameters giving the same outputs,
  where the method allows it (raises :class:`ConfigError` otherwise).
- ``num_params(peft_params) -> int``.

Optional capabilities, each with a do-nothing default in :class:`Method` (which every registered method
subclasses), so a runner never checks a method's name or type:

- ``prepare(rng, base_params, context) -> peft_params``: data-dependent initialisation; ``context`` is a
  :class:`PrepareContext` (gradient scores over the task's selection data). Default: ``init``.
- ``stage_rules(peft_params) -> rules``: trainable rules put in front of the rules of every stage where the
  method is active (GPS trains selected *base* entries); their leaves then count as ``num_params``.
- ``optimizer_wrapper(tx, peft_params) -> tx``: how the method changes the updates of the stages where it is
  active (GPS's masks). Default: ``tx`` unchanged.
- ``auxiliary_keys() -> keys``: top-level keys of training-only parameters that are not part of the adapter
  (PETAL's information-bottleneck estimators), left out of the trainable counts. Default: none.
- the output channel: a hook records named values with ``ctx.record(name, value)`` (Flax ``sow`` into the
  ``records`` collection); ``apply_with(..., record=True)`` returns them (:class:`Records`).
- side inputs: per-batch values (``apply_with(..., side_inputs={...})``) that hooks read with
  ``ctx.side_input(name)``; the names, dtypes and shapes are listed in :data:`vlpeft_jax.models.hooks.SIDE_INPUTS`.

Example (a method that records a loss term and reads a side input):
    >>> import dataclasses, jax, jax.numpy as jnp
    >>> from vlpeft_jax.models.layers import Linear
    >>> @dataclasses.dataclass(frozen=True)
    ... class Scale(Method):
    ...     name: str = "scale"
    ...     def init(self, rng, base_params):
    ...         return {"s": jnp.ones(())}
    ...     def hooks(self, p, *, rng=None, train=False):
    ...         def fn(ctx, nxt, x, w, b):
    ...             y = nxt(x, w, b) * p["s"] * ctx.side_input("toy")[:, None]
    ...             ctx.record("loss/size", jnp.mean(y ** 2))
    ...             return y
    ...         return [hooks.Hook("linear", fn)]
    ...     def merge(self, base_params, p):
    ...         return base_params
    >>> hooks.register_side_input("toy", "float32 [b]: a per-example factor (this example only)")
    >>> layer = Linear(2, name="proj")
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> m = Scale()
    >>> out, records = apply_with(layer.apply, [(m, m.init(None, None))], variables, jnp.ones((1, 3)),
    ...                           side_inputs={"toy": jnp.array([2.0])}, record=True)
    >>> sorted(records), records.total("loss/size").shape
    (['loss/size'], ())
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import optax

from vlpeft_jax.errors import ConfigError
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


Rule = tuple[str, str]


class PeftMethod(Protocol):
    """The required part of a method (see the module docstring); :class:`Method` adds the optional one."""

    name: str

    def init(self, rng: jax.Array, base_params: Params) -> Params: ...

    def hooks(self, peft_params: Params, *, rng: jax.Array | None = None, train: bool = False
              ) -> list[hooks.Hook]: ...

    def merge(self, base_params: Params, peft_params: Params) -> Params: ...


@dataclasses.dataclass(frozen=True)
class PrepareContext:
    """What a run offers a method's :meth:`Method.prepare`.

    Attributes:
      gradient_scores: ``(targets, who) -> {module path: |∇W| scores}`` of the base model's task loss over
        the run's selection data (:func:`vlpeft_jax.peft.selection.gradient_scores`), computed on first use;
        ``who`` names the method in errors. None where the caller has no data (then asking is an error).
      abstract: True when only shapes are wanted (``run.py params``, reading a saved run back: the base
        params are ``ShapeDtypeStruct`` s, for which selection returns placeholders of the right shapes and
        reads no scores).
    """

    gradient_scores: Callable[[Sequence[str], str], Any] | None = None
    abstract: bool = False

    def scores(self, base_params: Params, targets: Sequence[str], who: str) -> Any:
        """Gradient scores of the kernels ``targets`` matches (a tree mirroring ``base_params``)."""
        if self.abstract:
            return base_params  # never read for abstract kernels; only its presence is checked
        if self.gradient_scores is None:
            raise ConfigError(f"{who}: gradient selection needs selection data, and this caller gives none")
        return self.gradient_scores(tuple(targets), who)


class Method:
    """Do-nothing defaults of the optional capabilities (DESIGN §2.1); registered methods subclass it."""

    name: str
    records_topics = False
    """The method records ``topic/prior`` and, given the side input ``target_ids``, ``topic/posterior`` per head
    position (KLAFT's TCM): tasks that generate text then report r_TCM of their outputs
    (:func:`vlpeft_jax.eval.rtcm.caption_topics`)."""

    def prepare(self, rng: jax.Array, base_params: Params, context: PrepareContext) -> Params:
        """Data-dependent initialisation; the default is :meth:`init` (no data needed)."""
        return self.init(rng, base_params)  # type: ignore[attr-defined]

    def stage_rules(self, peft_params: Params) -> list[Rule]:
        """Trainable rules added in front of each stage where the method is active (default: none)."""
        return []

    def optimizer_wrapper(self, tx: optax.GradientTransformation, peft_params: Params
                          ) -> optax.GradientTransformation:
        """The optimizer of a stage where the method is active (default: ``tx`` unchanged)."""
        return tx

    def auxiliary_keys(self) -> tuple[str, ...]:
        """Top-level keys of the method's parameters that it trains but that are not part of the adapter
        (PETAL's IB estimators, ``sib``): kept out of the trainable counts. Default: none."""
        return ()

    def extra_passes(self) -> tuple[str, ...]:
        """Names of extra forward passes a task loss runs while the method is active (each with the side input
        ``pass_name``; their recorded loss terms are added, :func:`extra_pass_records`). Default: none."""
        return ()


class Records(dict):
    """What hooks recorded during one :func:`apply_with` call: name -> tuple of values, in call order."""

    def total(self, name: str) -> jax.Array:
        """The sum of every value recorded as ``name`` (e.g. one loss term recorded once per layer)."""
        values = self[name]
        return functools.reduce(jnp.add, values[1:], values[0])

    def loss_terms(self) -> dict[str, jax.Array]:
        """``{term: total}`` of the names ``loss/<term>``."""
        return {n[len(LOSS_PREFIX):]: self.total(n) for n in self if n.startswith(LOSS_PREFIX)}


LOSS_PREFIX = "loss/"


def _records(collection: Any) -> Records:
    out: dict[str, list[Any]] = {}
    for path, value in jax.tree_util.tree_leaves_with_path(collection):
        # sow keeps a tuple per name: the path ends (..., DictKey(name), SequenceKey(i))
        name = getattr(path[-2], "key", None) if len(path) >= 2 else None
        out.setdefault(str(name), []).append(value)
    return Records({k: tuple(v) for k, v in out.items()})


def apply_with(apply_fn: Callable[..., Any], methods: Sequence[tuple[PeftMethod, Params]], *args: Any,
               rng: jax.Array | None = None, train: bool = False, side_inputs: Mapping[str, Any] | None = None,
               record: bool = False, **kwargs: Any) -> Any:
    """Calls ``apply_fn(*args, **kwargs)`` with every ``(method, peft_params)`` active (first = innermost).

    Args:
      apply_fn: a Flax ``module.apply`` (or any function running the model).
      methods: ``(method, peft_params)`` pairs.
      rng: the methods' dropout key (method ``i`` gets ``fold_in(rng, i)``).
      train: training mode for the methods' hooks (dropout).
      side_inputs: per-batch values the hooks read (``ctx.side_input(name)``; names from
        :data:`vlpeft_jax.models.hooks.SIDE_INPUTS`).
      record: also return what the hooks recorded: ``apply_fn`` must accept Flax's ``mutable=`` (it gets
        ``mutable=["records"]``), and the call returns ``(output, Records)``.

    Returns:
      the model output, or ``(output, Records)`` with ``record=True``.
    """
    active: list[hooks.Hook] = []
    for i, (method, p) in enumerate(methods):
        r = None if rng is None else jax.random.fold_in(rng, i)
        active.extend(method.hooks(p, rng=r, train=train))
    with hooks.use_hooks(active, side_inputs=side_inputs):
        if not record:
            return apply_fn(*args, **kwargs)
        out, state = apply_fn(*args, mutable=[hooks.RECORDS], **kwargs)
    return out, _records(state.get(hooks.RECORDS, {}))


def extra_pass_records(apply_fn: Callable[..., Any], methods: Sequence[tuple[Any, Params]], *args: Any,
                       rng: jax.Array, side_inputs: Mapping[str, Any] | None = None, **kwargs: Any) -> Records:
    """Runs every extra pass the ``(method, params)`` pairs ask for (``method.extra_passes()``, default none)
    and returns what those passes recorded, loss terms only (the caller adds them to the main pass' records).

    Each pass is ``apply_with(apply_fn, methods, *args, train=True, record=True, **kwargs)`` with the side
    input ``pass_name`` set, its own key ``fold_in(rng, i + 1)``, and the main pass' ``side_inputs``.

    Example (a task loss; ``t`` the text length):
        >>> records = extra_pass_records(model.apply, active, ids, mask, rng=rng, logits_to_keep=t,
        ...     side_inputs={"target_ids": shift_labels(labels)})  # doctest: +SKIP
    """
    names = list(dict.fromkeys(n for m, _ in methods for n in getattr(m, "extra_passes", lambda: ())()))
    out: dict[str, tuple[Any, ...]] = {}
    for i, name in enumerate(names):
        _, records = apply_with(apply_fn, methods, *args, rng=jax.random.fold_in(rng, i + 1), train=True,
                                   side_inputs={**dict(side_inputs or {}), "pass_name": name}, record=True, **kwargs)
        for key, values in records.items():
            if key.startswith(LOSS_PREFIX):
                out[key] = out.get(key, ()) + tuple(values)
    return Records(out)
