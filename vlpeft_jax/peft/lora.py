"""LoRA and rsLoRA: low-rank additive updates applied in activation space.

``y = x W + b + s · dropout(x) A B`` with ``A ∈ R^{in×r}``, ``B ∈ R^{r×out}`` (B zero-initialised, so
training starts from the base model), ``s = α / r`` (LoRA, Hu et al. 2022) or ``s = α / √r`` (rsLoRA,
Kalajdzievski 2023). Seed ``002_77ee72ace92f5c60.txt`` uses r=16, α=32, dropout 0.05 on Q, K, V.
The update is never materialised while training (DESIGN invariant 2); :meth:`LoRA.merge` folds it into
``W`` for inference.

Example:
    >>> import jax, jax.numpy as jnp
    >>> base = {"layer": {"q_proj": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}}
    >>> lora = LoRA(targets=("q_proj",), rank=2, alpha=4)
    >>> p = lora.init(jax.random.key(0), base)
    >>> p["layer"]["q_proj"]["lora_a"].shape, p["layer"]["q_proj"]["lora_b"].shape
    ((4, 2), (2, 4))
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
from jax.sharding import PartitionSpec

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.models import hooks
from vlpeft_jax.peft import base as pb

INITS = ("kaiming", "gaussian")


@dataclasses.dataclass(frozen=True)
class LoRA(pb.Method):
    """LoRA settings.

    Attributes:
      targets: module name patterns (``q_proj`` matches every module named so; or a regex over the
        ``/``-joined path).
      rank: r.
      alpha: α.
      dropout: dropout on the LoRA branch's input while training.
      use_rslora: scale by ``α/√r`` instead of ``α/r``.
      rank_pattern: ``(pattern, rank)`` pairs overriding ``rank`` (first match wins; a mapping is accepted).
        Kept as a tuple so that the method is hashable (it is part of jitted step functions).
      init_weights: ``kaiming`` (A ~ U(±1/√in), as peft) or ``gaussian`` (A ~ N(0, 1/r)).
    """

    targets: tuple[str, ...] = ("q_proj", "v_proj")
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    rank_pattern: tuple[tuple[str, int], ...] = ()
    init_weights: str = "kaiming"
    name: str = "lora"

    def __post_init__(self) -> None:
        if isinstance(self.rank_pattern, Mapping):
            object.__setattr__(self, "rank_pattern", tuple(self.rank_pattern.items()))
        object.__setattr__(self, "targets", tuple(self.targets))
        for r in (self.rank, *(r for _, r in self.rank_pattern)):
            if int(r) <= 0:
                raise ConfigError(f"{self.name}.rank={r}; must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{self.name}.dropout={self.dropout}; must be in [0, 1)")
        if self.init_weights not in INITS:
            raise ConfigError(f"{self.name}.init_weights={self.init_weights!r}; valid: {', '.join(INITS)}")

    def rank_for(self, path: tuple[str, ...]) -> int:
        name = "/".join(path)
        for pat, r in self.rank_pattern:
            if re.fullmatch(pat, name) or name.endswith("/" + pat) or name == pat:
                return int(r)
        return int(self.rank)

    def scaling(self, rank: int) -> float:
        return self.alpha / math.sqrt(rank) if self.use_rslora else self.alpha / rank

    def init(self, rng: jax.Array, base_params: pb.Params) -> pb.Params:
        out: pb.Params = {}
        for path in pb.match_targets(base_params, self.targets, method=self.name):
            kernel = pb.get_path(base_params, path + ("kernel",))
            d_in, d_out = kernel.shape[-2], kernel.shape[-1]
            r = self.rank_for(path)
            if r > min(d_in, d_out):
                raise ConfigError(f"{self.name}.rank={r} is larger than {'/'.join(path)} allows "
                                  f"(kernel {d_in}x{d_out}: at most {min(d_in, d_out)})")
            key = jax.random.fold_in(rng, zlib.crc32("/".join(path).encode()))
            if self.init_weights == "kaiming":
                bound = 1.0 / math.sqrt(d_in)
                a = jax.random.uniform(key, (d_in, r), jnp.float32, -bound, bound)
            else:
                a = jax.random.normal(key, (d_in, r), jnp.float32) / r
            pb.set_path(out, path, {"lora_a": a, "lora_b": jnp.zeros((r, d_out), jnp.float32)})
        return out

    def hooks(self, peft_params: pb.Params, *, rng: jax.Array | None = None, train: bool = False
              ) -> list[hooks.Hook]:
        use_dropout = train and self.dropout > 0.0 and rng is not None

        def lora_linear(ctx: hooks.HookContext, nxt: Any, x: jax.Array, kernel: jax.Array, bias: Any) -> jax.Array:
            p = pb.lookup(peft_params, ctx.path)
            a, b = p["lora_a"], p["lora_b"]
            h = x
            if use_dropout:
                key = jax.random.fold_in(rng, zlib.crc32(ctx.name.encode()))
                keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
                h = jnp.where(keep, x / (1.0 - self.dropout), 0.0).astype(x.dtype)
            s = self.scaling(a.shape[1])
            return nxt(x, kernel, bias) + ((h @ a.astype(x.dtype)) * s) @ b.astype(x.dtype)  # scale the rank-r side

        return [hooks.Hook("linear", lora_linear, where=pb.adapted_where(peft_params, "lora_a"))]

    def delta(self, p: Mapping[str, jax.Array]) -> jax.Array:
        """The dense update ``s · A B`` of one module (for merging and export)."""
        return self.scaling(p["lora_a"].shape[1]) * (p["lora_a"] @ p["lora_b"])

    def merge(self, base_params: pb.Params, peft_params: pb.Params) -> pb.Params:
        merged = pb.copy_tree(base_params)
        for path in pb.module_paths(peft_params, "lora_a"):
            k = pb.get_path(base_params, path + ("kernel",))
            pb.set_path(merged, path + ("kernel",), (k + self.delta(pb.get_path(peft_params, path))).astype(k.dtype))
        return merged

    def num_params(self, peft_params: pb.Params) -> int:
        return pb.count(peft_params)

    def logical_specs(self, peft_params: pb.Params, base_specs: pb.Params) -> pb.Params:
        """Logical ``PartitionSpec`` s for ``peft_params``: ``lora_a`` ``[d_in, r]`` shards like its kernel's input
        axis, ``lora_b`` ``[r, d_out]`` like its output axis (the rank axis is replicated), so under FSDP or tensor
        parallelism the factors sit with the kernel's shards. ``base_specs`` is the base tree of logical specs
        (``layers.logical_axes`` of a boxed abstract init); the result plugs into
        ``train(param_specs={"base": base_specs, "peft": {name: <this>}})`` and ``run.py plan``.

        Example:
            >>> from jax.sharding import PartitionSpec as P
            >>> lora = LoRA(targets=("proj",), rank=2)
            >>> p = lora.init(jax.random.key(0), {"proj": {"kernel": jnp.zeros((4, 6))}})
            >>> lora.logical_specs(p, {"proj": {"kernel": P("embed", "mlp")}})
            {'proj': {'lora_a': P('embed', None), 'lora_b': P(None, 'mlp')}}
        """
        out: pb.Params = {}
        for path in pb.module_paths(peft_params, "lora_a"):
            spec = pb.get_path(base_specs, path + ("kernel",))
            in_axis, out_axis = (spec[-2], spec[-1]) if spec is not None and len(spec) >= 2 else (None, None)
            pb.set_path(out, path, {"lora_a": PartitionSpec(in_axis, None), "lora_b": PartitionSpec(None, out_axis)})
        return out
