"""DoRA: weight-decomposed low-rank adaptation, applied in activation space as peft does.

DoRA (Liu et al. 2024) splits each adapted weight into a magnitude and a direction and adapts the
direction with LoRA: ``W' = m · (W + s·A B) / ||W + s·A B||_c``, where ``||·||_c`` is the norm of each
output unit's weight vector (our kernels are ``[in, out]``, so it is the norm over the input axis, one
value per output unit) and ``m ∈ R^{out}`` starts at ``||W||_c`` (so training starts from the base model).

While training nothing is merged (DESIGN invariant 2). With ``g = m / ||W + s·A B||_c`` this is peft's
``DoraLinearLayer.forward`` (``peft/tuners/lora/dora.py``)::

    y = (x W + b) + (g - 1) · (x W) + g · s · (x A) B

and, with dropout active while training, ``x W`` and ``x A`` in the added terms use the dropped-out input
(the first term keeps ``x``), exactly as peft's ``DoraLinearVariant.forward``. The column norm is treated as
a constant in backward (``jax.lax.stop_gradient``), as DoRA §4.3 suggests and peft does ("we suggest
treating ||V + ΔV||_c as a constant, thereby detaching it from the gradient graph"): gradients reach
``m`` and, through ``(x A) B``, the LoRA factors, and nothing else. The norm needs the dense ``A B``
(as in peft); its gradient is never formed. :meth:`DoRA.merge` gives ``W' = g ⊙ (W + s·A B)`` with the
bias unchanged, peft's ``merge``. In peft's files DoRA is a LoRA adapter with ``use_dora=true``: see
:mod:`vlpeft_jax.hf.peft_formats.lora`.

Settings, initialisation, rank checks and scaling (LoRA or rsLoRA) are LoRA's (:class:`~vlpeft_jax.peft.lora.LoRA`,
composed, not copied). Other hooks on the same module that run inside DoRA (registered before it) are
scaled with the base output, as peft's stacked adapters are.

Example:
    >>> import jax, jax.numpy as jnp
    >>> base = {"layer": {"q_proj": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}}
    >>> dora = DoRA(targets=("q_proj",), rank=2, alpha=4)
    >>> p = dora.init(jax.random.key(0), base)
    >>> sorted(p["layer"]["q_proj"]), p["layer"]["q_proj"]["magnitude"].tolist()
    (['lora_a', 'lora_b', 'magnitude'], [2.0, 2.0, 2.0])
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import jax
import jax.numpy as jnp

from vlpeft_jax.models import hooks
from vlpeft_jax.peft import base as pb
from vlpeft_jax.peft.lora import LoRA


def column_norm(kernel: jax.Array, delta: jax.Array) -> jax.Array:
    """``||W + ΔW||_c`` per output unit of an ``[in, out]`` kernel, in float32, detached (DoRA §4.3)."""
    w = kernel.astype(jnp.float32) + jax.lax.stop_gradient(delta).astype(jnp.float32)
    return jax.lax.stop_gradient(jnp.linalg.norm(w, axis=-2))


@dataclasses.dataclass(frozen=True)
class DoRA(pb.Method):
    """DoRA settings (the same as :class:`~vlpeft_jax.peft.lora.LoRA`'s).

    Attributes:
      targets: module name patterns (``q_proj`` matches every module named so; or a regex over the
        ``/``-joined path).
      rank: r.
      alpha: α.
      dropout: dropout on the adapter branch's input while training.
      use_rslora: scale by ``α/√r`` instead of ``α/r``.
      rank_pattern: ``(pattern, rank)`` pairs overriding ``rank`` (first match wins; a mapping is accepted).
      init_weights: ``kaiming`` or ``gaussian`` initialisation of ``A`` (``B`` starts at zero).
    """

    targets: tuple[str, ...] = ("q_proj", "v_proj")
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    rank_pattern: tuple[tuple[str, int], ...] = ()
    init_weights: str = "kaiming"
    name: str = "dora"

    def __post_init__(self) -> None:
        lora = self.lora  # validates every setting, with this instance's name in the messages
        object.__setattr__(self, "targets", lora.targets)
        object.__setattr__(self, "rank_pattern", lora.rank_pattern)

    @property
    def lora(self) -> LoRA:
        """The LoRA that adapts the direction (same settings)."""
        return LoRA(targets=self.targets, rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                    use_rslora=self.use_rslora, rank_pattern=self.rank_pattern, init_weights=self.init_weights,
                    name=self.name)

    def init(self, rng: jax.Array, base_params: pb.Params) -> pb.Params:
        """LoRA's factors plus ``magnitude = ||W + s·A B||_c`` (``= ||W||_c``, as B starts at zero)."""
        lora = self.lora
        out = lora.init(rng, base_params)
        for path in pb.module_paths(out, "lora_a"):
            p = pb.get_path(out, path)
            kernel = pb.get_path(base_params, path + ("kernel",))
            p["magnitude"] = column_norm(kernel, lora.delta(p))
        return out

    def hooks(self, peft_params: pb.Params, *, rng: jax.Array | None = None, train: bool = False
              ) -> list[hooks.Hook]:
        use_dropout = train and self.dropout > 0.0 and rng is not None
        lora = self.lora

        def dora_linear(ctx: hooks.HookContext, nxt: Any, x: jax.Array, kernel: jax.Array, bias: Any) -> jax.Array:
            p = pb.lookup(peft_params, ctx.path)
            a, b = p["lora_a"].astype(x.dtype), p["lora_b"].astype(x.dtype)
            s = lora.scaling(a.shape[1])
            gain = (p["magnitude"] / column_norm(kernel, lora.delta(p))).astype(x.dtype)  # m / ||W + sAB||_c
            result = nxt(x, kernel, bias)
            if use_dropout:
                key = jax.random.fold_in(rng, zlib.crc32(ctx.name.encode()))
                keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
                h = jnp.where(keep, x / (1.0 - self.dropout), 0.0).astype(x.dtype)
                base_out = jnp.einsum("...i,io->...o", h, kernel.astype(x.dtype))
            else:
                h = x
                base_out = result if bias is None else result - bias.astype(result.dtype)
            return result + (gain - 1) * base_out + gain * (s * ((h @ a) @ b))

        return [hooks.Hook("linear", dora_linear, where=pb.adapted_where(peft_params, "magnitude"))]

    def merge(self, base_params: pb.Params, peft_params: pb.Params) -> pb.Params:
        """Plain base parameters: ``kernel <- (m / ||W + s·A B||_c) ⊙ (W + s·A B)``, bias unchanged."""
        lora = self.lora
        merged = pb.copy_tree(base_params)
        for path in pb.module_paths(peft_params, "magnitude"):
            p = pb.get_path(peft_params, path)
            k = pb.get_path(base_params, path + ("kernel",))
            delta = lora.delta(p)
            gain = p["magnitude"] / column_norm(k, delta)
            new = gain * (k.astype(jnp.float32) + delta.astype(jnp.float32))
            pb.set_path(merged, path + ("kernel",), new.astype(k.dtype))
        return merged

    def num_params(self, peft_params: pb.Params) -> int:
        return pb.count(peft_params)
