"""LLaMA-Adapter: learnable adaption prompts with zero-initialised gated attention (Zhang et al. 2023).

In each of the top ``adapter_layers`` layers, ``adapter_len`` learnable prompt vectors ``P_l`` (width of the
layer input) are projected by the layer's own key and value projections and attended by the layer's
queries through a *separate* softmax, whose output is scaled by a gate ``g_l`` initialised to zero::

    out = softmax(q kᵀ/√d + bias) v  +  g_l · softmax(q (P_l W_k + b_k)ᵀ/√d) (P_l W_v + b_v)

so training starts exactly from the base model (the paper's "zero-init attention", §3.2). The prompt keys
carry no rotary embedding, and the sum enters the output projection, as in peft's ``AdaptionPrompt``
(``AdaptedAttention``), which this reproduces on LLaMA (``g_l`` used as is; ``tanh_gate=True`` gives the
official v1 code's ``tanh(g_l)``). Prompts are N(0, 1) (the official code's ``nn.Embedding``); the
parameters are peft's ``adaption_prompt`` ``[1, adapter_len, d]`` and ``adaption_gate`` ``[1]``, stored at
the attention module's path (e.g. ``model/layers_7/self_attn``).

How the prompt keys/values are computed: the ``attention`` hook receives q, k, v but not the projection
weights. This method therefore also hooks the adapted layer's key/value projections (``k_proj``/``v_proj``,
``key``/``value``, or GPT-2's fused ``c_attn``): when the model applies them to the layer input, the hook
applies the same projection (through any method registered before this one) to the prompt and hands the
result to the attention hook of the same layer, which the model calls next. So the current projection
weights are always used (also when a stage fine-tunes them), and the protocol needs no ``base_params``.
Differences from peft, by design: on GPT-2, peft adds the adapter output *after* ``c_proj`` without
projecting it; here it goes through ``c_proj`` like the paper (and peft's LLaMA); with an ``o_proj``
bias, peft adds that bias twice.

Not mergeable (the prompts attend through their own softmax): :meth:`LlamaAdapter.merge` raises.

peft interop (``peft_type`` ``ADAPTION_PROMPT``, in :mod:`vlpeft_jax.hf.peft_formats.llama_adapter`): peft saves
``base_model.model.model.layers.<i>.self_attn.adaption_prompt`` ``[1, adapter_len, d]`` and ``...adaption_gate``
``[1]`` for the top ``adapter_layers`` ``self_attn`` modules (``target_modules: "self_attn"``). Exported and
imported for LLaMA only: peft has no Qwen2 adaption prompt, its GPT-2 one differs from ours (above), and with an
``o_proj`` bias its output differs by that bias; those are refused with a message. A ``tanh_gate`` adapter is
exported with ``tanh(g)`` as peft's gate (the same outputs); imported adapters use the gate as is.

Example:
    >>> import jax, jax.numpy as jnp
    >>> attn = {n: {"kernel": jnp.ones((16, 16))} for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    >>> base = {"model": {f"layers_{i}": {"self_attn": attn} for i in range(4)}}
    >>> p = LlamaAdapter(adapter_len=3, adapter_layers=2).init(jax.random.key(0), base)
    >>> sorted(p["model"]), p["model"]["layers_3"]["self_attn"]["adaption_prompt"].shape
    (['layers_2', 'layers_3'], (1, 3, 16))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.models import hooks, layers
from vlpeft_jax.peft import base as pb
from vlpeft_jax.peft.adapters import match_paths
from vlpeft_jax.tree import layer_index

KEY_PROJECTIONS = ("k_proj", "key")
VALUE_PROJECTIONS = ("v_proj", "value")
FUSED_PROJECTIONS = ("c_attn",)  # GPT-2: query, key and value side by side
DEFAULT_TARGETS = (r"(?:.*/)?(?:self_attn|attn)",)


def attention_modules(params: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """Attention hook paths whose key/value projections are children, with the layer-input width.

    Example:
        >>> import numpy as np
        >>> attention_modules({"h_0": {"attn": {"c_attn": {"kernel": np.ones((8, 24))}}}})
        {('h_0', 'attn'): 8}
    """
    out: dict[tuple[str, ...], int] = {}
    for name, node in params.items():
        if not isinstance(node, Mapping):
            continue
        path = prefix + (name,)
        kernels = {k: v["kernel"] for k, v in node.items() if isinstance(v, Mapping) and "kernel" in v}
        fused = [k for k in FUSED_PROJECTIONS if k in kernels]
        keys = [k for k in KEY_PROJECTIONS if k in kernels]
        values = [k for k in VALUE_PROJECTIONS if k in kernels]
        if fused or (keys and values):
            out[path] = int(kernels[(fused or keys)[0]].shape[0])
        out.update(attention_modules(node, path))
    return out


def _top_layers(paths: list[tuple[str, ...]], n: int | None, method: str) -> list[tuple[str, ...]]:
    """The ``n`` highest-indexed layers of every layer stack among ``paths`` (all if ``n`` is None)."""
    stacks: dict[tuple[str, ...], list[tuple[int, tuple[str, ...]]]] = {}
    for p in paths:
        layer_at = [i for i, seg in enumerate(p) if layer_index(seg) is not None]
        if not layer_at:  # not inside a layer stack: its own group
            stacks.setdefault(p, []).append((0, p))
            continue
        cut = layer_at[-1]
        stacks.setdefault(p[:cut], []).append((layer_index(p[cut]), p))
    chosen: list[tuple[str, ...]] = []
    for container, members in stacks.items():
        members.sort()
        if n is not None and n > len(members):
            raise ConfigError(f"{method}.adapter_layers={n} but {'/'.join(container) or 'the model'} has "
                              f"{len(members)} matching attention layers")
        chosen.extend(p for _, p in (members if n is None else members[-n:]))
    return chosen


@dataclasses.dataclass(frozen=True)
class LlamaAdapter(pb.Method):
    """LLaMA-Adapter settings (names follow peft's ``AdaptionPromptConfig``).

    Attributes:
      targets: patterns over attention module paths (default: every ``self_attn`` / ``attn``; use e.g.
        ``attention/self`` for BERT or ``attention/attention`` for ViT).
      adapter_len: prompt vectors per adapted layer.
      adapter_layers: adapt the top this many layers of each matched layer stack (None: every one).
      tanh_gate: use ``tanh(gate)`` (the official v1 code) instead of the gate itself (peft).
    """

    targets: tuple[str, ...] = DEFAULT_TARGETS
    adapter_len: int = 10
    adapter_layers: int | None = None
    tanh_gate: bool = False
    name: str = "llama_adapter"

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", (self.targets,) if isinstance(self.targets, str) else tuple(self.targets))
        if int(self.adapter_len) <= 0:
            raise ConfigError(f"{self.name}.adapter_len={self.adapter_len}; must be a positive integer")
        if self.adapter_layers is not None and int(self.adapter_layers) <= 0:
            raise ConfigError(f"{self.name}.adapter_layers={self.adapter_layers}; must be a positive integer "
                              "(or None for every layer)")

    def adapted_widths(self, base_params: pb.Params) -> dict[tuple[str, ...], int]:
        """The adapted attention module paths and their layer-input width."""
        candidates = attention_modules(base_params)
        paths = match_paths(candidates, self.targets, self.name, "attention module with key/value projections")
        return {p: candidates[p] for p in _top_layers(paths, self.adapter_layers, self.name)}

    def init(self, rng: jax.Array, base_params: pb.Params) -> pb.Params:
        out: pb.Params = {}
        for i, (path, width) in enumerate(sorted(self.adapted_widths(base_params).items())):
            prompt = jax.random.normal(jax.random.fold_in(rng, i), (1, int(self.adapter_len), width), jnp.float32)
            pb.set_path(out, path, {"adaption_prompt": prompt, "adaption_gate": jnp.zeros((1,), jnp.float32)})
        return out

    def hooks(self, peft_params: pb.Params, *, rng: jax.Array | None = None, train: bool = False
              ) -> list[hooks.Hook]:
        adapted = pb.adapted_where(peft_params, "adaption_prompt")
        # Prompt keys/values of each adapted layer, written by the projection hook while the model is traced
        # and read by the same layer's attention hook; fresh for every call of hooks() (i.e. every trace).
        prompt_kv: dict[tuple[str, ...], dict[str, jax.Array]] = {}

        def is_projection(path: tuple[str, ...]) -> bool:
            names = KEY_PROJECTIONS + VALUE_PROJECTIONS + FUSED_PROJECTIONS
            return len(path) > 1 and path[-1] in names and adapted(path[:-1])

        def project_prompt(ctx: hooks.HookContext, nxt: Any, x: jax.Array, kernel: jax.Array, bias: Any
                           ) -> jax.Array:
            attn, which = ctx.path[:-1], ctx.path[-1]
            prompt = pb.lookup(peft_params, attn)["adaption_prompt"][0].astype(x.dtype)
            projected = nxt(prompt, kernel, bias)
            slot = prompt_kv.setdefault(attn, {})
            if which in FUSED_PROJECTIONS:
                _, slot["k"], slot["v"] = jnp.split(projected, 3, axis=-1)
            else:
                slot["k" if which in KEY_PROJECTIONS else "v"] = projected
            return nxt(x, kernel, bias)

        def gated_attention(ctx: hooks.HookContext, nxt: Any, q: jax.Array, k: jax.Array, v: jax.Array,
                            bias: Any) -> jax.Array:
            out = nxt(q, k, v, bias)
            slot = prompt_kv.pop(ctx.path, {})
            if "k" not in slot or "v" not in slot:
                raise ConfigError(f"{self.name}: the key/value projections of {ctx.name} were not applied through "
                                  "the linear hook before its attention; this model is not supported")
            b, _, _, d = q.shape
            n = slot["k"].shape[0]
            pk = jnp.broadcast_to(slot["k"].reshape(1, n, -1, d), (b, n, slot["k"].shape[-1] // d, d))
            pv = jnp.broadcast_to(slot["v"].reshape(1, n, -1, d), (b, n, slot["v"].shape[-1] // d, d))
            gate = pb.lookup(peft_params, ctx.path)["adaption_gate"]
            if self.tanh_gate:
                gate = jnp.tanh(gate)
            prompt_out = layers.attention_default(q, pk.astype(q.dtype), pv.astype(v.dtype), None)
            return out + gate.astype(out.dtype) * prompt_out.astype(out.dtype)

        return [hooks.Hook("linear", project_prompt, where=is_projection),
                hooks.Hook("attention", gated_attention, where=adapted)]

    def merge(self, base_params: pb.Params, peft_params: pb.Params) -> pb.Params:
        raise ConfigError(f"{self.name}: adapter is not mergeable: the adaption prompts attend through their own "
                          "softmax and cannot be folded into the base weights; keep it active at inference")

    def num_params(self, peft_params: pb.Params) -> int:
        return pb.count(peft_params)
