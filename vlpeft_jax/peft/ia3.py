"""IA3: learned rescaling of activations (Liu et al. 2022, "(IA)^3"), as peft implements it.

Each adapted linear layer gets one vector, initialised to ones (training starts from the base model):

- attention projections (e.g. keys and values): the layer's *output* is scaled, ``y = (x W + b) ⊙ l``
  with ``l ∈ R^{out}``;
- feed-forward modules (``feedforward_modules``, a subset of the targets): the layer's *input* is scaled,
  ``y = (x ⊙ l) W + b`` with ``l ∈ R^{in}``.

This is peft's ``IA3Layer`` (``peft/tuners/ia3/layer.py``): ``ia3_l`` of shape ``(out, 1)`` or ``(1, in)``.
:meth:`IA3.merge` folds the vectors into the weights (and, for output scaling, the bias), as peft's
``merge`` does. The defaults are peft's for LLaMA (keys, values and ``down_proj``, the last one scaled at
its input). peft-format export and import: :mod:`vlpeft_jax.hf.peft_formats.ia3`.

Example:
    >>> import jax, jax.numpy as jnp
    >>> base = {"mlp": {"down_proj": {"kernel": jnp.ones((4, 2))}}, "attn": {"v_proj": {"kernel": jnp.ones((2, 3))}}}
    >>> ia3 = IA3(targets=("v_proj", "down_proj"), feedforward_modules=("down_proj",))
    >>> p = ia3.init(jax.random.key(0), base)
    >>> p["mlp"]["down_proj"]["input_scale"].shape, p["attn"]["v_proj"]["output_scale"].shape
    ((4,), (3,))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.models import hooks
from vlpeft_jax.peft import base as pb


@dataclasses.dataclass(frozen=True)
class IA3(pb.Method):
    """IA3 settings.

    Attributes:
      targets: module name patterns to adapt (``v_proj`` matches every module named so; or a regex over
        the ``/``-joined path).
      feedforward_modules: patterns among the targets whose *input* is scaled (the rest scale their output).
    """

    targets: tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
    feedforward_modules: tuple[str, ...] = ("down_proj",)
    name: str = "ia3"

    def __post_init__(self) -> None:
        for field in ("targets", "feedforward_modules"):
            value = getattr(self, field)
            object.__setattr__(self, field, (value,) if isinstance(value, str) else tuple(value))
        if not self.targets:
            raise ConfigError(f"{self.name}.targets is empty; name at least one module pattern (e.g. v_proj)")

    def split_targets(self, base_params: pb.Params) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
        """(modules scaled at their output, modules scaled at their input) of ``base_params``."""
        targets = pb.match_targets(base_params, self.targets, method=self.name)
        feedforward: list[tuple[str, ...]] = []
        if self.feedforward_modules:
            feedforward = pb.match_targets(base_params, self.feedforward_modules, method=f"{self.name}.feedforward")
        outside = ["/".join(p) for p in feedforward if p not in targets]
        if outside:
            raise ConfigError(f"{self.name}.feedforward_modules={list(self.feedforward_modules)} matches "
                              f"{', '.join(outside)}, which are not among the targets {list(self.targets)}; "
                              "feed-forward modules must be a subset of the targets")
        return [p for p in targets if p not in feedforward], feedforward

    def init(self, rng: jax.Array, base_params: pb.Params) -> pb.Params:
        del rng  # deterministic: every vector starts at ones
        out: pb.Params = {}
        scaled_out, scaled_in = self.split_targets(base_params)
        for path in scaled_out:
            d_out = pb.get_path(base_params, path + ("kernel",)).shape[-1]
            pb.set_path(out, path, {"output_scale": jnp.ones((d_out,), jnp.float32)})
        for path in scaled_in:
            d_in = pb.get_path(base_params, path + ("kernel",)).shape[-2]
            pb.set_path(out, path, {"input_scale": jnp.ones((d_in,), jnp.float32)})
        return out

    def hooks(self, peft_params: pb.Params, *, rng: jax.Array | None = None, train: bool = False
              ) -> list[hooks.Hook]:
        del rng, train  # no randomness

        def ia3_linear(ctx: hooks.HookContext, nxt: Any, x: jax.Array, kernel: jax.Array, bias: Any) -> jax.Array:
            p = pb.lookup(peft_params, ctx.path)
            if "input_scale" in p:
                return nxt(x * p["input_scale"].astype(x.dtype), kernel, bias)
            y = nxt(x, kernel, bias)
            return y * p["output_scale"].astype(y.dtype)

        def where(path: tuple[str, ...]) -> bool:
            p = pb.lookup(peft_params, path)
            return isinstance(p, Mapping) and ("input_scale" in p or "output_scale" in p)

        return [hooks.Hook("linear", ia3_linear, where=where)]

    def merge(self, base_params: pb.Params, peft_params: pb.Params) -> pb.Params:
        """Input scaling -> kernel rows; output scaling -> kernel columns and the bias."""
        merged = pb.copy_tree(base_params)
        for path in pb.module_paths(peft_params, "input_scale"):
            k = pb.get_path(base_params, path + ("kernel",))
            scale = pb.get_path(peft_params, path)["input_scale"]
            pb.set_path(merged, path + ("kernel",), (k * scale[:, None]).astype(k.dtype))
        for path in pb.module_paths(peft_params, "output_scale"):
            module = pb.get_path(base_params, path)
            scale = pb.get_path(peft_params, path)["output_scale"]
            pb.set_path(merged, path + ("kernel",), (module["kernel"] * scale).astype(module["kernel"].dtype))
            if module.get("bias") is not None:
                pb.set_path(merged, path + ("bias",), (module["bias"] * scale).astype(module["bias"].dtype))
        return merged

    def num_params(self, peft_params: pb.Params) -> int:
        return pb.count(peft_params)
