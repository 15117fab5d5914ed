"""Multi-task gradient manipulation as optax transformations, sparse training (PSN) and conflict analysis.

The thesis ``004_21d0d480fe4006f4.txt`` ch. 6 (spec ``../shared/specs/sparse_mtl.md``), one module per piece:

- methods (one module each, a plain function on ``[T, P]`` task gradients plus its ``METHOD`` record):
  ``linear`` (``ls``, Joint Train), ``pcgrad``, ``cagrad``, ``graddrop``, ``mgda``, ``imtl`` (``imtlg``),
  ``nash`` (``nashmtl``), ``famo``, ``uw``, ``dwa``, ``rlw``, ``aligned``; :func:`combine` calls any by name;
- :mod:`~vlpeft_jax.mtl.gradients`: per-task gradients from one forward pass;
- :mod:`~vlpeft_jax.mtl.transform`: :func:`gradient_manipulation`, the optax transformation over per-task
  gradients (optionally masked for sparse training);
- :mod:`~vlpeft_jax.mtl.step`: the multi-task train step;
- :mod:`~vlpeft_jax.mtl.psn`: the PSN mask (per-neuron top-K by magnitude) and Table 17 counting;
- :mod:`~vlpeft_jax.mtl.conflict`: gradient-conflict incidence p% and Δm%.

Example:
    >>> import jax.numpy as jnp
    >>> combine("mgda", jnp.array([[1.0, 0.0], [0.0, 1.0]])).tolist()  # the min-norm point, weights x T
    [1.0, 1.0]
"""

from vlpeft_jax.mtl.base import Combined, GMMethod, gram
from vlpeft_jax.mtl.conflict import conflict_count, conflict_stats, delta_m, incidence
from vlpeft_jax.mtl.gradients import per_task_grads
from vlpeft_jax.mtl.psn import k_for_fraction, psn_mask, trainable_fraction
from vlpeft_jax.mtl.registry import combine, get, names
from vlpeft_jax.mtl.transform import gradient_manipulation, sparse_chain

__all__ = [
    "Combined", "GMMethod", "combine", "conflict_count", "conflict_stats", "delta_m", "get", "gradient_manipulation",
    "gram", "incidence", "k_for_fraction", "names", "per_task_grads", "psn_mask", "sparse_chain",
    "trainable_fraction",
]
