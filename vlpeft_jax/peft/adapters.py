"""Bottleneck adapters: sequential (Houlsby et al. 2019) and parallel (He et al. 2022).

An adapter is a small bottleneck ``A(h) = act(dropout(h) W_down + b_down) W_up + b_up`` with
``W_down ∈ R^{d×r}``, ``W_up ∈ R^{r×d}``; ``W_up`` and ``b_up`` start at zero, so training starts from the
base model. Seed ``002_77ee72ace92f5c60.txt`` (§4.1, Table 2) compares both placements as *S-Adapter* and
*P-Adapter* (after Hu et al. 2023, LLM-Adapters), alone and after prefix tuning (PT-PEFT).

- ``placement="sequential"``: ``y = f(x); y ← y + s · A(y)`` on the output of chosen linear layers (the
  ``linear`` hook). Houlsby's positions are the attention output projection and the feed-forward output,
  before the residual sum: the default targets pick them in every backbone here (``o_proj``/``down_proj``
  in LLaMA, ``attn/c_proj``/``mlp/c_proj`` in GPT-2, ``out_proj``/``fc2`` in CLIP,
  ``attention/output/dense``/``output/dense`` in BERT, ViT and the Q-Former).
- ``placement="parallel"``: ``y = FFN(x) + s · A(x)`` beside a whole feed-forward block (the ``mlp`` hook),
  as He et al.'s best variant (parallel to the FFN, scaled). The ``mlp`` hook points are
  ``.../mlp`` (LLaMA, GPT-2, CLIP, the connector), the layer itself ``.../layer_<i>`` (ViT) or
  ``.../layers_<i>`` (OPT, whose ``fc1``/``fc2`` sit directly in the decoder layer) and
  ``.../intermediate`` / ``.../intermediate_query`` (BERT and the Q-Former); :func:`ffn_hook_points`
  finds them in a parameter tree. Targets are patterns over these paths (default: every one).

An adapter is a nonlinear function of the activations, so it cannot be folded into the base weights:
:meth:`BottleneckAdapter.merge` raises :class:`ConfigError`; keep the adapter active at inference.

Example:
    >>> import jax, jax.numpy as jnp
    >>> base = {"layer": {"o_proj": {"kernel": jnp.ones((8, 8))}}}
    >>> adapter = BottleneckAdapter(targets=("o_proj",), bottleneck_size=2)
    >>> p = adapter.init(jax.random.key(0), base)
    >>> p["layer"]["o_proj"]["adapter_down"].shape, p["layer"]["o_proj"]["adapter_up"].shape
    ((8, 2), (2, 8))
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.models import hooks, layers
from vlpeft_jax.peft import base as pb

PLACEMENTS = ("sequential", "parallel")

# Houlsby's positions (after the attention output projection and after the feed-forward) in our backbones.
SEQUENTIAL_TARGETS = (r"(?:.*/)?(?:o_proj|down_proj|c_proj|out_proj|fc2|output(?:_query)?/dense)",)
PARALLEL_TARGETS = (".*",)

# The first linear of a feed-forward block (its input width is the block's input width), by family.
_FFN_INPUTS = ("gate_proj", "up_proj", "c_fc", "fc1")


def ffn_hook_points(params: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """The paths where the backbones call the ``mlp`` hook, with the feed-forward's input width.

    Mirrors the model files: ``.../mlp`` holding ``gate_proj``/``up_proj``/``c_fc``/``fc1`` (LLaMA,
    GPT-2, CLIP); an OPT decoder layer (``fc1``/``fc2`` beside ``self_attn``, the hook at the layer's own
    path); a ViT layer (``layernorm_after`` beside ``intermediate`` and ``output``);
    ``<layer>/intermediate`` and ``<layer>/intermediate_query`` of a BERT / Q-Former layer. (The transformer
    Mapping Layer's blocks hold ``fc1``/``fc2`` under ``layers_<i>/mlp``, found as ``.../mlp``.)

    Example:
        >>> import numpy as np
        >>> p = {"h_0": {"mlp": {"c_fc": {"kernel": np.ones((4, 16))}, "c_proj": {"kernel": np.ones((16, 4))}}}}
        >>> ffn_hook_points(p)
        {('h_0', 'mlp'): 4}
    """
    out: dict[tuple[str, ...], int] = {}
    for name, node in params.items():
        if not isinstance(node, Mapping):
            continue
        path = prefix + (name,)
        if name == "mlp":
            for first in _FFN_INPUTS:
                if isinstance(node.get(first), Mapping) and "kernel" in node[first]:
                    out[path] = int(node[first]["kernel"].shape[0])
                    break
        elif "self_attn" in node and _is_linear(node.get("fc1")) and _is_linear(node.get("fc2")):
            # OPT: the hook wraps fc2(act(fc1(x))) at the decoder layer's own path
            out[path] = int(node["fc1"]["kernel"].shape[0])
        elif "layernorm_after" in node and "intermediate" in node and "output" in node:
            # ViT: the hook wraps intermediate + output at the layer's own path
            out[path] = int(node["intermediate"]["dense"]["kernel"].shape[0])
        else:  # BERT / Q-Former: the hook sits at the intermediate module (text and query FFNs)
            for suffix in ("", "_query"):
                inter = node.get(f"intermediate{suffix}")
                if isinstance(inter, Mapping) and "dense" in inter and f"output{suffix}" in node:
                    out[path + (f"intermediate{suffix}",)] = int(inter["dense"]["kernel"].shape[0])
        out.update(ffn_hook_points(node, path))
    return out


def _is_linear(node: Any) -> bool:
    return isinstance(node, Mapping) and "kernel" in node


def match_paths(candidates: Mapping[tuple[str, ...], Any], patterns: tuple[str, ...], method: str,
                what: str) -> list[tuple[str, ...]]:
    """The candidate paths matching any pattern, like :func:`vlpeft_jax.peft.base.match_targets`.

    A bare name matches paths ending in it; anything else is a regex over the whole path. A pattern that
    matches nothing raises :class:`ConfigError` listing the candidates (``what`` says what they are).
    """
    names = {p: "/".join(p) for p in candidates}
    chosen: list[tuple[str, ...]] = []
    for pat in patterns:
        if re.fullmatch(r"[A-Za-z0-9_/]+", pat):
            hits = [p for p, n in names.items() if n == pat or n.endswith("/" + pat)]
        else:
            try:
                rx = re.compile(pat)
            except re.error as e:
                raise ConfigError(f"{method}: invalid target pattern {pat!r}: {e}") from None
            hits = [p for p, n in names.items() if rx.fullmatch(n)]
        if not hits:
            shown = ", ".join(list(names.values())[:12]) + (" ..." if len(names) > 12 else "")
            raise ConfigError(f"{method}: target pattern {pat!r} matches no {what}; available: {shown or 'none'}")
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


@dataclasses.dataclass(frozen=True)
class BottleneckAdapter(pb.Method):
    """Bottleneck adapter settings.

    Attributes:
      placement: ``sequential`` (on the output of linear layers) or ``parallel`` (beside feed-forward blocks).
      targets: path patterns (a bare name such as ``o_proj`` matches modules so named; anything else is a
        regex over the ``/``-joined path). Sequential: linear modules; parallel: ``mlp`` hook points. Empty:
        Houlsby's positions (sequential) or every feed-forward block (parallel).
      bottleneck_size: r, at most the adapted width.
      activation: nonlinearity between the projections (a Hugging Face activation name).
      scaling: s, the factor on the adapter's output (He et al. use 4 for the parallel FFN adapter).
      dropout: dropout on the adapter's input while training.
      use_bias: biases on both projections (as Houlsby and He et al.).
    """

    placement: str = "sequential"
    targets: tuple[str, ...] = ()
    bottleneck_size: int = 64
    activation: str = "relu"
    scaling: float = 1.0
    dropout: float = 0.0
    use_bias: bool = True
    name: str = "adapter"

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", (self.targets,) if isinstance(self.targets, str) else tuple(self.targets))
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"{self.name}.placement={self.placement!r}; valid: {', '.join(PLACEMENTS)}")
        if int(self.bottleneck_size) <= 0:
            raise ConfigError(f"{self.name}.bottleneck_size={self.bottleneck_size}; must be a positive integer")
        if self.activation not in layers.ACTIVATIONS:
            raise ConfigError(f"{self.name}.activation={self.activation!r}; "
                              f"valid: {', '.join(sorted(layers.ACTIVATIONS))}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{self.name}.dropout={self.dropout}; must be in [0, 1)")

    @property
    def target_patterns(self) -> tuple[str, ...]:
        if self.targets:
            return self.targets
        return SEQUENTIAL_TARGETS if self.placement == "sequential" else PARALLEL_TARGETS

    def adapted_widths(self, base_params: pb.Params) -> dict[tuple[str, ...], int]:
        """The adapted module paths and the width each adapter sees (input = output width)."""
        if self.placement == "sequential":
            paths = pb.match_targets(base_params, self.target_patterns, method=self.name)
            return {p: int(pb.get_path(base_params, p + ("kernel",)).shape[-1]) for p in paths}
        points = ffn_hook_points(base_params)
        paths = match_paths(points, self.target_patterns, self.name, "feed-forward (mlp hook) module")
        return {p: points[p] for p in paths}

    def init(self, rng: jax.Array, base_params: pb.Params) -> pb.Params:
        out: pb.Params = {}
        r = int(self.bottleneck_size)
        for path, width in self.adapted_widths(base_params).items():
            if r > width:
                raise ConfigError(f"{self.name}.bottleneck_size={r} is larger than {'/'.join(path)} allows "
                                  f"(width {width})")
            key = jax.random.fold_in(rng, zlib.crc32("/".join(path).encode()))
            bound = 1.0 / math.sqrt(width)  # kaiming-uniform(a=√5) as torch's Linear and LLM-Adapters
            p = {"adapter_down": jax.random.uniform(key, (width, r), jnp.float32, -bound, bound),
                 "adapter_up": jnp.zeros((r, width), jnp.float32)}
            if self.use_bias:
                p["adapter_down_bias"] = jnp.zeros((r,), jnp.float32)
                p["adapter_up_bias"] = jnp.zeros((width,), jnp.float32)
            pb.set_path(out, path, p)
        return out

    def bottleneck(self, p: Mapping[str, jax.Array], h: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        """``s · A(h)`` for one module's parameters ``p`` (dropout on ``h`` when ``key`` is given)."""
        if key is not None:
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - self.dropout), 0.0).astype(h.dtype)
        z = h @ p["adapter_down"].astype(h.dtype)
        if "adapter_down_bias" in p:
            z = z + p["adapter_down_bias"].astype(h.dtype)
        z = layers.activation(self.activation)(z) @ p["adapter_up"].astype(h.dtype)
        if "adapter_up_bias" in p:
            z = z + p["adapter_up_bias"].astype(h.dtype)
        return jnp.asarray(self.scaling, h.dtype) * z

    def hooks(self, peft_params: pb.Params, *, rng: jax.Array | None = None, train: bool = False
              ) -> list[hooks.Hook]:
        use_dropout = train and self.dropout > 0.0 and rng is not None

        def key_for(ctx: hooks.HookContext) -> jax.Array | None:
            return jax.random.fold_in(rng, zlib.crc32(ctx.name.encode())) if use_dropout else None

        where = pb.adapted_where(peft_params, "adapter_down")
        if self.placement == "sequential":
            def sequential(ctx: hooks.HookContext, nxt: Any, x: jax.Array, kernel: jax.Array, bias: Any
                           ) -> jax.Array:
                y = nxt(x, kernel, bias)
                return y + self.bottleneck(pb.lookup(peft_params, ctx.path), y, key=key_for(ctx))

            return [hooks.Hook("linear", sequential, where=where)]

        def parallel(ctx: hooks.HookContext, nxt: Any, x: jax.Array) -> jax.Array:
            return nxt(x) + self.bottleneck(pb.lookup(peft_params, ctx.path), x, key=key_for(ctx))

        return [hooks.Hook("mlp", parallel, where=where)]

    def merge(self, base_params: pb.Params, peft_params: pb.Params) -> pb.Params:
        raise ConfigError(f"{self.name}: adapter is not mergeable: a bottleneck adapter is a nonlinear function of "
                          "the activations and cannot be folded into the base weights; keep it active at inference")

    def num_params(self, peft_params: pb.Params) -> int:
        return pb.count(peft_params)
