"""NeuroAda: zero-initialised sparse additive deltas on the top-k input connections of every neuron.

Seed ``004_21d0d480fe4006f4.txt``, chapter 5. For each targeted kernel ``W`` (ours ``[in, out]``; a
neuron is an output unit) the top-``k`` input connections of every neuron are chosen once, before
training (Eq. 5.2: by ``|W|``; the other strategies of Fig. 5.7 via ``selection``). NeuroAda stores per
projection only

- ``values``: float32 ``[d_out, k]``, zero-initialised, trainable (``θ`` of Eq. 5.3);
- ``indices``: int32 ``[d_out, k]``, static input positions (never a dense mask, §5.3.2 "mask-free");
- ``rows``: int32 ``[n]``, only when ``neuron_fraction < 1`` (then values/indices are ``[n, k]``).

Training differentiates ``values`` only (their AdamW state is ``2·d_out·k`` floats, Eq. 5.6, instead of
``2·d_out·d_in`` for mask-based tuning, Eq. 5.5). The stage rule must train ``peft/<name>/.*/values``
(see :meth:`NeuroAda.trainable_rules`): ``indices`` are integers and must stay frozen.

Two equivalent forward paths (DESIGN invariant 2), chosen by ``mode``:

- ``gather`` (activation space): ``y = x W + b + Σ_k θ[i,k] · x[..., idx[i,k]]`` with an XLA gather of
  ``x`` (work and temporaries ∝ tokens·d_out·k; no weight-sized array is formed, see :func:`gather_delta`);
- ``scatter``: ``y = x (W + scatter(θ)) + b`` with an XLA scatter into a merged weight (one matmul
  forward; temporaries about one copy of the targeted weights; no dense optimizer state). When NeuroAda is
  the innermost ``linear`` hook, :func:`merged_linear`'s backward pass takes the values' gradient from
  gathered activations instead of forming the dense ``xᵀg`` (the full-fine-tuning weight gradient) and
  gathering ``k`` entries per neuron from it, as plain autodiff would;
- ``auto`` (default): per projection and input shape (static under ``jit``), the path with the smaller
  temporaries (:func:`choose_mode`, which records the measurements: gather for ``tokens·k <= d_in``).

Either way the optimizer sees only the ``[d_out, k]`` values.

:meth:`NeuroAda.merge` scatter-adds the deltas into the base kernels (App. C.6, phase 3).

Example:
    >>> import jax, jax.numpy as jnp
    >>> base = {"layer": {"q_proj": {"kernel": jnp.arange(12.0).reshape(4, 3)}}}
    >>> ada = NeuroAda(targets=("q_proj",), k=2)
    >>> p = ada.init(jax.random.key(0), base)
    >>> p["layer"]["q_proj"]["values"].shape, p["layer"]["q_proj"]["indices"].tolist()
    ((3, 2), [[3, 2], [3, 2], [3, 2]])
    >>> ada.num_params(p), ada.trainable_rules()
    (6, [('peft/neuroada/(?:.*/)?values', 'neuroada')])
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.models import hooks
from vlpeft_jax.models.layers import linear_default
from vlpeft_jax.peft import base as pb
from vlpeft_jax.peft import selection as sel

MODES = ("gather", "scatter", "auto")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

def choose_mode(d_in: int, k: int, tokens: int) -> str:
    """``gather`` or ``scatter`` for a projection of input width ``d_in``, ``k`` connections per neuron and
    ``tokens`` rows of activations: the path with the smaller temporary, ``gather`` iff ``tokens·k <= d_in``.

    The gather path's temporaries are the gathered activations (``tokens·d_out·k``), the scatter path's the
    merged weights (``d_in·d_out``). Measured in full train steps on CPU (``python run.py bench sparse``:
    LLaMA-style, 4 layers, width 1024, MLP 2752, 256 tokens, all seven projections; 2-core Xeon, after
    :func:`merged_linear` removed the scatter path's dense weight gradient), gather / scatter: k=1: 462 / 392
    ms per step, 155 / 292 MiB of XLA temporaries; k=2: 633 / 469 ms, 197 / 292 MiB; k=4: 764 / 460 ms,
    292 / 300 MiB; k=8: 957 / 442 ms, 482 / 315 MiB. So the rule follows memory (the point of NeuroAda);
    scatter is the faster path on CPU at every k (``mode="scatter"`` when speed matters more). In
    ``run.py bench train``'s GPT-2 at k=1, :func:`merged_linear` cut the scatter step from 125 to 99 GFLOP
    (LoRA's count), 2018 to 1386 ms and 504 to 482 MiB. Not measured on accelerators yet.

    Example:
        >>> choose_mode(1024, 1, 256), choose_mode(1024, 8, 256), choose_mode(4096, 20, 4096)
        ('gather', 'scatter', 'scatter')
    """
    return "gather" if tokens * k <= d_in else "scatter"


def gather_delta(x: jax.Array, values: jax.Array, indices: jax.Array) -> jax.Array:
    """``[..., n]``: ``Σ_k values[i, k] · x[..., indices[i, k]]`` (an XLA gather in activation space).

    Its gradient (JAX's transpose of the gather) is a scatter-add into the input gradient and a re-gather
    for the values: no weight-sized array is formed. (A variant forming the input gradient as ``g Δᵀ``
    with a dense ``Δ`` ran up to 1.6x faster on CPU but kept a weight-sized buffer per projection alive,
    doubling the temporaries; the memory is the point of NeuroAda.)
    """
    return jnp.einsum("...nk,nk->...n", jnp.take(x, indices, axis=-1), values.astype(x.dtype))


@jax.custom_vjp
def merged_linear(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, values: jax.Array,
                  indices: jax.Array, rows: jax.Array | None) -> jax.Array:
    """``x (W + scatter(values)) + b`` whose backward pass never forms the dense weight gradient.

    Autodiff of the plain merged-weight path computes ``∂W' = xᵀg`` (a full ``tokens·d_in·d_out`` matrix
    product, as full fine-tuning does) only to gather ``k`` entries per neuron from it. Here the gradient of
    ``values[i, j]`` is ``Σ_tokens g[..., i] · x[..., indices[i, j]]`` from gathered activations
    (``tokens·d_out·k`` work), the input gradient ``g W'ᵀ`` is the one product the frozen layer needs anyway,
    and the kernel's own gradient ``xᵀg`` is returned for completeness (XLA removes it when the kernel is
    frozen, the usual case). 2-D kernels only (``[in, out]``).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x, w = jnp.ones((2, 3)), jnp.zeros((3, 2))
        >>> v, idx = jnp.array([[1.0], [2.0]]), jnp.array([[0], [2]], jnp.int32)
        >>> merged_linear(x, w, None, v, idx, None).tolist()
        [[1.0, 2.0], [1.0, 2.0]]
        >>> jax.grad(lambda v: merged_linear(x, w, None, v, idx, None).sum())(v).tolist()
        [[2.0], [2.0]]
    """
    return linear_default(x, sel.scatter_add(kernel, indices, values, rows), bias)


def _merged_linear_fwd(x, kernel, bias, values, indices, rows):
    merged = sel.scatter_add(kernel, indices, values, rows)
    return linear_default(x, merged, bias), (x, merged, bias, values, indices, rows)


def _merged_linear_bwd(res, g):
    x, merged, bias, values, indices, rows = res
    dx = jnp.einsum("...o,io->...i", g, merged.astype(g.dtype)).astype(x.dtype)
    dkernel = jnp.einsum("...i,...o->io", x, g.astype(x.dtype)).astype(merged.dtype)
    dbias = None if bias is None else g.reshape(-1, g.shape[-1]).sum(0).astype(bias.dtype)
    g_sel = (g if rows is None else jnp.take(g, rows, axis=-1)).reshape(-1, indices.shape[0], 1)
    x_sel = jnp.take(x.reshape(-1, x.shape[-1]), indices, axis=-1)  # [tokens, n, k]
    # the product in the activations' own layout, then a sum over tokens as a product with ones: XLA does not
    # transpose g (the batched contraction "tn,tnk->nk" made it write g transposed, 3x slower on CPU)
    ones = jnp.ones((g_sel.shape[0],), jnp.float32)
    dvalues = jnp.einsum("t,tnk->nk", ones, g_sel.astype(jnp.float32) * x_sel.astype(jnp.float32))
    dvalues = dvalues.astype(values.dtype)
    return dx, dkernel, dbias, dvalues, None, None


merged_linear.defvjp(_merged_linear_fwd, _merged_linear_bwd)


def adamw_state_bytes(d_in: int, d_out: int, k: int | None = None) -> int:
    """AdamW moment memory of one projection: Eq. 5.5 (mask-based, ``k=None``: ``2·d_out·d_in·4`` bytes)
    or Eq. 5.6 (NeuroAda: ``2·d_out·k·4`` bytes).

    Example:
        >>> adamw_state_bytes(5120, 5120) // adamw_state_bytes(5120, 5120, k=1)  # §5.3.3: a 5120x reduction
        5120
    """
    return 2 * d_out * (d_in if k is None else k) * 4


def projection_memory(d_in: int, d_out: int, k: int = 1, *, value_bytes: int = 2, index_bytes: int = 2,
                      mask_bits: int = 1) -> dict[str, float]:
    """Selection storage of one projection, as in Table 5.1: a dense mask at ``mask_bits`` per weight vs
    NeuroAda's ``k`` (value, index) pairs per neuron (BF16 values and 16-bit indices in the thesis), in MiB.

    Example:
        >>> m = projection_memory(4096, 4096)
        >>> round(m["mask_mb"], 2), round(m["neuroada_mb"], 3), m["ratio"]
        (2.0, 0.016, 128.0)
    """
    mask_mb = d_in * d_out * mask_bits / 8 / 2**20
    neuroada_mb = d_out * k * (value_bytes + index_bytes) / 2**20
    return {"mask_mb": mask_mb, "neuroada_mb": neuroada_mb, "ratio": mask_mb / neuroada_mb,
            "adamw_masked_bytes": adamw_state_bytes(d_in, d_out),
            "adamw_neuroada_bytes": adamw_state_bytes(d_in, d_out, k)}


@dataclasses.dataclass(frozen=True)
class NeuroAda(pb.Method):
    """NeuroAda settings.

    Attributes:
      targets: module name patterns (as LoRA's); the thesis adapts q, k, v, o, gate, up, down.
      k: connections per neuron (top-1 and top-20 in Table 5.2).
      budget: instead of ``k``: trainable values (``>= 1``) or a fraction (``< 1``) of the targeted
        weights, converted to one ``k`` for all targets (0: use ``k``).
      selection: ``magnitude`` (Eq. 5.2), ``gradient`` (needs ``init(..., scores=...)``), ``reverse``,
        ``random`` (Fig. 5.7).
      neuron_fraction: fraction of each projection's neurons that get connections (Fig. 5.6).
      mode: ``gather``, ``scatter`` or ``auto`` (see the module docstring).
    """

    targets: tuple[str, ...] = DEFAULT_TARGETS
    k: int = 1
    budget: float = 0.0
    selection: str = "magnitude"
    neuron_fraction: float = 1.0
    mode: str = "auto"
    name: str = "neuroada"

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", (self.targets,) if isinstance(self.targets, str) else tuple(self.targets))
        sel.validate(self.name, k=self.k, budget=self.budget, strategy=self.selection,
                     neuron_fraction=self.neuron_fraction)
        if self.mode not in MODES:
            raise ConfigError(f"{self.name}.mode={self.mode!r}; valid: {', '.join(MODES)}")

    def trainable_rules(self) -> list[tuple[str, str]]:
        """Stage rules training the values only (the int32 indices must never reach ``jax.grad``)."""
        return [(f"peft/{self.name}/(?:.*/)?values", self.name)]

    def init(self, rng: jax.Array, base_params: pb.Params, scores: Mapping[str, Any] | None = None) -> pb.Params:
        """Selects the connections and returns zero values with their indices, by module path.

        Works under ``jax.eval_shape`` (selection is ``jax.lax.top_k``). ``scores`` are the gradient
        scores of :func:`vlpeft_jax.peft.selection.gradient_scores` (``selection='gradient'`` only).
        """
        chosen = sel.select(base_params, self.targets, k=self.k, budget=self.budget, strategy=self.selection,
                            neuron_fraction=self.neuron_fraction, rng=rng, scores=scores, name=self.name,
                            max_ndim=2)
        out: pb.Params = {}
        for path, s in chosen.items():
            entry = {"values": jnp.zeros(s.indices.shape, jnp.float32), "indices": s.indices}
            if s.rows is not None:
                entry["rows"] = s.rows
            pb.set_path(out, path, entry)
        return out

    def prepare(self, rng: jax.Array, base_params: pb.Params, context: pb.PrepareContext) -> pb.Params:
        """:meth:`init`, with the gradient scores of the run's selection data for ``selection='gradient'``."""
        scores = context.scores(base_params, self.targets, self.name) if self.selection == "gradient" else None
        return self.init(rng, base_params, scores=scores)

    def hooks(self, peft_params: pb.Params, *, rng: jax.Array | None = None, train: bool = False
              ) -> list[hooks.Hook]:
        def neuroada_linear(ctx: hooks.HookContext, nxt: Any, x: jax.Array, kernel: jax.Array, bias: Any
                            ) -> jax.Array:
            p = pb.lookup(peft_params, ctx.path)
            values, indices, rows = p["values"], p["indices"], p.get("rows")
            tokens = math.prod(x.shape[:-1])
            mode = self.mode if self.mode != "auto" else choose_mode(kernel.shape[0], values.shape[-1], tokens)
            if mode == "scatter":
                if nxt is linear_default and kernel.ndim == 2:  # innermost: the backward without xᵀg
                    return merged_linear(x, kernel, bias, values, indices, rows)
                return nxt(x, sel.scatter_add(kernel, indices, values, rows), bias)
            delta = gather_delta(x, values, indices)
            y = nxt(x, kernel, bias)
            return y + delta if rows is None else y.at[..., rows].add(delta)

        return [hooks.Hook("linear", neuroada_linear, where=pb.adapted_where(peft_params, "values"))]

    def merge(self, base_params: pb.Params, peft_params: pb.Params) -> pb.Params:
        """Base parameters with every delta scatter-added into its kernel (same outputs, no overhead)."""
        merged = pb.copy_tree(base_params)
        for path in pb.module_paths(peft_params, "values"):
            p = pb.get_path(peft_params, path)
            k = pb.get_path(base_params, path + ("kernel",))
            pb.set_path(merged, path + ("kernel",), sel.scatter_add(k, p["indices"], p["values"], p.get("rows")))
        return merged

    def dense_delta(self, p: Mapping[str, jax.Array], kernel_shape: tuple[int, ...]) -> jax.Array:
        """The dense ``Δ`` of one module (Eq. 5.3): zeros except the selected entries."""
        return sel.scatter_add(jnp.zeros(kernel_shape, jnp.float32), p["indices"], p["values"], p.get("rows"))

    def num_params(self, peft_params: pb.Params) -> int:
        """Trainable values (indices and rows are static integers, not parameters)."""
        return sum(pb.count(pb.get_path(peft_params, path)["values"])
                   for path in pb.module_paths(peft_params, "values"))

    def logical_specs(self, peft_params: pb.Params, base_specs: pb.Params) -> pb.Params:
        """Logical ``PartitionSpec`` s for ``peft_params``: ``values``/``indices`` shard like their kernel's
        output axis (``[d_out, k]`` -> ``(out_axis, None)``); ``rows`` is replicated.

        ``base_specs`` is the base tree of logical specs (``layers.logical_axes`` of a boxed abstract init);
        the result plugs into ``train(param_specs={"base": base_specs, "peft": {name: <this>}})``.
        """
        out: pb.Params = {}
        for path in pb.module_paths(peft_params, "values"):
            spec = pb.get_path(base_specs, path + ("kernel",))
            out_axis = spec[-1] if spec is not None and len(spec) else None
            entry = {"values": PartitionSpec(out_axis, None), "indices": PartitionSpec(out_axis, None)}
            if "rows" in pb.get_path(peft_params, path):
                entry["rows"] = PartitionSpec()
            pb.set_path(out, path, entry)
        return out
