"""Named hook points: how PEFT methods plug into the backbones without editing them.

Model code never branches on a method (DESIGN invariant 4). Instead, at a few named places it calls
:func:`call` with the module's path, a default implementation and its arguments. Hooks registered with
:func:`use_hooks` for that kind (and whose ``where`` predicate accepts the path) wrap the default, like
middleware: each hook receives a :class:`HookContext`, the ``next`` function (the default, or the hook
registered before it) and the arguments, and returns what the default would return.

Hook kinds and their signatures (``next`` has the same signature minus ``ctx``):

=================  ======================================================  ==============================
kind               hook signature                                          used by
=================  ======================================================  ==============================
``linear``         ``fn(ctx, next, x, kernel, bias) -> y``                 LoRA, DoRA, IA3, NeuroAda, DMA,
                                                                           BitFit, sequential adapters
``attention``      ``fn(ctx, next, q, k, v, bias) -> out``                 prefix K/V, MAM (second mask +
                   q ``[b,tq,h,d]``, k/v ``[b,tk,kvh,d]``, bias additive   gate), knockout, LLaMA-Adapter
                   ``[b,1|h,tq,tk]``; ``ctx.inputs`` = the layer input
``mlp``            ``fn(ctx, next, x) -> y`` (the whole feed-forward)      parallel adapters
``embed``          ``fn(ctx, next, ids, embeds, mask) -> (embeds, mask)``  prompt tuning, deep prompts,
                   (also the Q-Former's instruction states:                PETAL's instruction experts
                   ``<qformer>/embeddings/instructions``)
``final_hidden``   ``fn(ctx, next, h) -> h`` (before the LM head)          topic control (TCM)
``lm_head``        ``fn(ctx, next, h) -> logits``                          TCM mixture, head tuning
``positions``      ``fn(ctx, next, positions) -> positions`` ``[b, t]``    prefix tuning (real tokens
                   int position ids used for position embeddings / RoPE;   numbered from ``P``)
                   path: the trunk holding the layers that use them
=================  ======================================================  ==============================

The ``positions`` hook runs once per forward pass, where a model has its final position ids: after the
``embed`` hook (so prompts are counted), for the prefill and for every ``decode=True`` step (``ctx.decode``
says which), on positions derived from the attention mask / KV cache *and* on explicit ``position_ids``
(peft shifts those too: ``PeftModel._adjust_prompt_learning_kwargs`` adds ``num_virtual_tokens`` to a
caller's ``position_ids`` for prefix tuning). Its path is the module whose layers use the positions:
GPT-2 ``transformer``, LLaMA ``model``, BERT the ``BertModel`` itself (the parent of ``embeddings``).
ViT, CLIP and the Q-Former have no ``positions`` hook point.

Every hook point passes the Flax module that calls it (``module=``), so a hook can use the **output
channel**: ``ctx.record(name, value)`` sows ``value`` into the :data:`RECORDS` collection, and
``vlpeft_jax.peft.base.apply_with(..., record=True)`` returns what was recorded (names ``loss/<term>`` are loss
terms the runner adds to the task loss; anything else is an intermediate for metrics or analysis); a hook point
called without a module raises a clear error on ``record``. **Side inputs** are per-batch values given to
``apply_with(..., side_inputs={...})`` that every hook kind reads with ``ctx.side_input(name)``; the names,
dtypes and shapes are registered in :data:`SIDE_INPUTS` (which hooks read which: ``attention`` hooks the
``knockout`` pattern and ``modality``; ``linear``/``mlp``/``embed`` hooks of instruction-aware methods the
``instruction_ids``/``instruction_mask``; TCM's ``lm_head``/``embed`` hooks the ``target_ids`` and
``pass_name``; MAM's hooks the ``image_ids``, ``mam_cache`` and ``pass_name``).

Hooks run inside the traced (jitted) function, so the PEFT parameters they close over are traced
values; nothing here is global state at run time beyond the context stack, which is only read while
tracing.

Example:
    >>> import jax.numpy as jnp
    >>> from vlpeft_jax.models import hooks
    >>> double = hooks.Hook("linear", lambda ctx, nxt, x, w, b: 2 * nxt(x, w, b))
    >>> with hooks.use_hooks(double):
    ...     y = hooks.call("linear", ("proj",), lambda x, w, b: x @ w, jnp.ones((1, 2)), jnp.ones((2, 3)), None)
    >>> y.tolist()
    [[4.0, 4.0, 4.0]]
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from vlpeft_jax.tree import layer_index

HOOK_KINDS = ("linear", "attention", "mlp", "embed", "final_hidden", "lm_head", "positions")


@dataclasses.dataclass(frozen=True)
class HookContext:
    """What a hook knows about the place it is called from.

    Attributes:
      kind: the hook kind (one of ``HOOK_KINDS``).
      path: the calling module's path, e.g. ``("model", "layers_3", "self_attn", "q_proj")``; it mirrors
        the parameter tree, so ``params[path]`` holds that module's parameters. Paths mirror the Hugging
        Face module names, with a list index ``layers.3`` written ``layers_3``.
      decode: True during an incremental decoding step with a KV cache (not for the prefill), so that
        hooks that change the sequence length (prompts) apply only once.
      inputs: for ``attention``, the hidden state entering the attention layer ``[b, t, d]``.
      positions: for ``attention``, absolute positions of the queries ``[b, tq]`` after the ``positions``
        hook (or None).
    """

    kind: str
    path: tuple[str, ...]
    decode: bool = False
    inputs: Any = None
    positions: Any = None
    side_inputs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    module: Any = None

    def record(self, name: str, value: Any) -> None:
        """Records ``value`` under ``name`` in the output channel (Flax ``sow`` into :data:`RECORDS`).

        What a run reads back: :func:`vlpeft_jax.peft.base.apply_with` with ``record=True`` returns every
        recorded value by name, in call order. Names starting with ``loss/`` are loss terms the runner adds to
        the task loss (weighted by ``config.loss_weights``) and logs; anything else is an intermediate (topic
        ids, attention maps) for metrics and analysis. Outside a recording call (``module.init``, a plain
        apply) nothing is kept.

        Raises:
          ValueError: the hook point was called without its module (``module=``), so nothing can be sown.
        """
        if self.module is None:
            raise ValueError(f"hook {self.kind!r} at {self.name!r}: this hook point passes no module, so it "
                             f"cannot record {name!r}")
        self.module.sow(RECORDS, name, value)

    def side_input(self, name: str, default: Any = None) -> Any:
        """The per-batch value ``name`` (see :data:`SIDE_INPUTS`) passed to ``apply_with``, or ``default``."""
        if name not in SIDE_INPUTS:
            raise KeyError(f"unknown side input {name!r}; registered: {', '.join(sorted(SIDE_INPUTS))}")
        return self.side_inputs.get(name, default)

    @property
    def layer(self) -> int | None:
        """Index of the enclosing transformer layer (:func:`vlpeft_jax.tree.layer_index`: ``layers_<i>``, ``layer_<i>``,
        ``h_<i>``, ``blocks_<i>``), or None. The outermost such segment counts, as in
        :func:`vlpeft_jax.tree.layer_stacks`: T5's ``block_<i>/layer_<j>`` is block ``i`` (``j`` numbers its
        sub-layers)."""
        for name in self.path:
            index = layer_index(name)
            if index is not None:
                return index
        return None

    @property
    def name(self) -> str:
        """The path joined with ``/``, the form used by target patterns."""
        return "/".join(self.path)


@dataclasses.dataclass(frozen=True)
class Hook:
    """A function plugged into one hook kind, optionally restricted to some module paths.

    Attributes:
      kind: one of ``HOOK_KINDS``.
      fn: ``fn(ctx, next, *args)``; see the module docstring for each kind's arguments.
      where: predicate on the module path; None means every module of that kind.
    """

    kind: str
    fn: Callable[..., Any]
    where: Callable[[tuple[str, ...]], bool] | None = None

    def __post_init__(self) -> None:
        if self.kind not in HOOK_KINDS:
            raise ValueError(f"unknown hook kind {self.kind!r}; valid kinds: {', '.join(HOOK_KINDS)}")

    def applies_to(self, path: tuple[str, ...]) -> bool:
        return self.where is None or bool(self.where(path))


RECORDS = "records"
"""The Flax collection hooks record into (:meth:`HookContext.record`)."""

SIDE_INPUTS: dict[str, str] = {
    "instruction_ids": "int32 [b, t_i]: token ids of the instruction(s) (PETAL's instruction experts read them)",
    "instruction_mask": "int32 [b, t_i]: 1 at real instruction tokens, 0 at padding",
    "modality": "int32 [b, t]: per-token modality of the sequence a layer sees (0 text, 1 image)",
    "knockout": "bool [b, t_q, t_k] or [layers, b, t_q, t_k]: attention edges to block (attention knockout)",
    "target_ids": "int32 [b, t]: the token id each position of the LM head is scored against (the loss's targets: "
                  "a causal LM's labels shifted left by one, losses.shift_labels), -100 where there is none; "
                  "right-aligned with the positions the head sees (KLAFT's TCM posterior topics and TTM)",
    "pass_name": "str (static): the extra forward pass being run, one of the active methods' extra_passes() "
                 "(KLAFT's TTM token-dropout pass); absent in the main pass",
    "image_ids": "int32 [b]: an id per example's image (the tasks pass each row's example index, -1 on padding "
                 "rows); in-batch contrastive terms (KLAFT's ITM, Eq. 8) take no negative from a row with the same id",
    "mam_cache": "dict of arrays (MAM.init_decode_state): the MAM top block's own key/value cache in cached "
                 "decoding; absent otherwise",
}
"""Side inputs a hook may read (``ctx.side_input(name)``): name -> dtype, shape and meaning. A method that
needs a new one registers it with :func:`register_side_input`."""


def register_side_input(name: str, doc: str) -> None:
    """Declares a side input (its dtype, shape and meaning in ``doc``) so ``apply_with`` accepts it."""
    SIDE_INPUTS.setdefault(name, doc)


class _Stack(threading.local):
    def __init__(self) -> None:
        self.hooks: list[Hook] = []
        self.side_inputs: dict[str, Any] = {}


_STACK = _Stack()


@contextlib.contextmanager
def use_hooks(*hooks: Hook | Sequence[Hook], side_inputs: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Activates hooks (and side inputs) for the model calls made (traced) inside the ``with`` block.

    Hooks may be given one by one or as sequences. Hooks registered earlier sit closer to the default
    implementation; a later hook wraps the earlier ones. Nested blocks add to the outer ones. ``side_inputs``
    (names from :data:`SIDE_INPUTS`) are what the hooks' contexts return from ``ctx.side_input(name)``.
    """
    side_inputs = dict(side_inputs or {})
    unknown = sorted(set(side_inputs) - set(SIDE_INPUTS))
    if unknown:
        raise ValueError(f"unknown side input(s) {', '.join(unknown)}; registered: {', '.join(sorted(SIDE_INPUTS))}")
    flat: list[Hook] = []
    for h in hooks:
        if isinstance(h, Hook):
            flat.append(h)
        else:
            flat.extend(h)
    for h in flat:
        if not isinstance(h, Hook):
            raise TypeError(f"use_hooks takes Hook objects, got {type(h).__name__}")
    before, before_inputs = list(_STACK.hooks), dict(_STACK.side_inputs)
    _STACK.hooks = before + flat
    _STACK.side_inputs = {**before_inputs, **side_inputs}
    try:
        yield
    finally:
        _STACK.hooks, _STACK.side_inputs = before, before_inputs


def active_hooks() -> tuple[Hook, ...]:
    """The hooks currently active (innermost last)."""
    return tuple(_STACK.hooks)


def call(kind: str, path: Sequence[str], default: Callable[..., Any], *args: Any,
         decode: bool = False, inputs: Any = None, positions: Any = None, module: Any = None) -> Any:
    """Runs ``default(*args)`` through the active hooks of ``kind`` that apply to ``path``.

    This is what model code calls at a hook point. With no active hook it is exactly
    ``default(*args)``. ``module`` is the Flax module making the call (the hooks record through it).
    """
    path = tuple(path)
    fn = default
    matching = [h for h in _STACK.hooks if h.kind == kind and h.applies_to(path)]
    if not matching:
        return default(*args)
    ctx = HookContext(kind=kind, path=path, decode=decode, inputs=inputs, positions=positions,
                      side_inputs=_STACK.side_inputs, module=module)
    for h in matching:
        fn = _wrap(h.fn, ctx, fn)
    return fn(*args)


def _wrap(hook_fn: Callable[..., Any], ctx: HookContext, nxt: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any) -> Any:
        return hook_fn(ctx, nxt, *args)

    return wrapped


def path_matcher(patterns: str | Sequence[str]) -> Callable[[tuple[str, ...]], bool]:
    """A ``where`` predicate: True if the ``/``-joined path fully matches any regular expression.

    Example:
        >>> m = path_matcher(r".*/(q|v)_proj")
        >>> m(("decoder", "layers_0", "attn", "q_proj")), m(("decoder", "layers_0", "attn", "k_proj"))
        (True, False)
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = [re.compile(p) for p in patterns]

    def where(path: tuple[str, ...]) -> bool:
        name = "/".join(path)
        return any(c.fullmatch(name) for c in compiled)

    return where
