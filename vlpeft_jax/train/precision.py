"""Mixed precision: a compute dtype for the model, float32 master weights, dynamic loss scaling for float16.

``config.precision`` (``float32``, the default, ``bfloat16`` or ``float16``) picks the dtype the model
computes in. The parameters, the gradients and the optimizer state stay float32: every layer casts its
float32 kernel to the activations' dtype where it is used (``layers.Linear``), so the cast is part of the
differentiated function and the gradient arrives in float32 (the "master weights" recipe of Micikevicius et
al., 2018, *Mixed Precision Training*). Softmax, norms' statistics and the loss are taken in float32 by the
layers and losses themselves.

- :func:`with_compute_dtype` writes the dtype into a model config (and the nested configs of a VLM), the
  ``dtype`` setting every model family here already has.
- float16 has a narrow exponent range: small gradients underflow to zero. :func:`dynamic_loss_scale` wraps
  the stage's optax transformation with a loss scale (in its state, so it is checkpointed and resumed): the
  train step multiplies the loss by it and divides the gradients by it (:func:`loss_scale_of`); a step whose
  scaled gradients overflow is skipped and the scale halved; after ``growth_interval`` finite steps in a row
  the scale doubles. bfloat16 has float32's exponent range and needs no scaling.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> with_compute_dtype({"family": "gpt2", "hidden_size": 8}, "bfloat16")["dtype"]
    'bfloat16'
    >>> tx = dynamic_loss_scale(optax.sgd(1.0), initial_scale=8.0)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> float(loss_scale_of(state))
    8.0
    >>> _, state = tx.update({"w": jnp.array([jnp.inf, 0.0])}, state)  # an overflow: skipped, scale halved
    >>> float(loss_scale_of(state)), int(state.skipped)
    (4.0, 1)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from vlpeft_jax.config import OPTIONAL_SETTINGS, PRECISIONS
from vlpeft_jax.errors import ConfigError
from vlpeft_jax.models import registry

DEFAULT_PRECISION = OPTIONAL_SETTINGS["precision"]
__all__ = ["PRECISIONS", "DEFAULT_PRECISION", "LossScaleState", "check_precision", "dynamic_loss_scale",
           "compute_dtype", "loss_scale_of", "loss_scaling", "with_compute_dtype"]

# the registry's families whose config has a ``dtype`` (compute dtype) setting; VLMs and classifiers hold them
DTYPE_FAMILIES = (*registry.DECODERS, *registry.ENCODER_DECODERS, *registry.VISION, "ckt")
NESTED = {"prefix_vlm": ("vision", "decoder"), "qformer_vlm": registry.QFORMER_VLM_KEYS[1:],
          "vision_classifier": ("vision", "vlm")}
UNFAMILIED = ("qformer",)  # nested configs without a ``family`` key that take a dtype (BERT fields)


def check_precision(precision: Any) -> str:
    """``precision`` if it is one of :data:`PRECISIONS` (None: the default, float32).

    Raises:
      ConfigError: naming the value and the valid ones.
    """
    if precision is None:
        return DEFAULT_PRECISION
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r}; valid: {', '.join(PRECISIONS)}")
    return str(precision)


def with_compute_dtype(model_cfg: Mapping[str, Any], precision: str | None) -> dict[str, Any]:
    """A copy of ``model_cfg`` whose model (and every nested tower / decoder / Q-Former) computes in ``precision``.

    float32 (or None) returns the config unchanged, so a config's own ``dtype`` settings keep working. Otherwise a
    ``dtype`` the config already sets must agree.

    Raises:
      ConfigError: an unknown precision, a family without a compute dtype, or a conflicting ``dtype``.
    """
    precision = check_precision(precision)
    cfg = dict(model_cfg)
    if precision == DEFAULT_PRECISION:
        return cfg
    return _set_dtype(cfg, precision, "model")


def _set_dtype(cfg: dict[str, Any], precision: str, where: str) -> dict[str, Any]:
    family = cfg.get("family")
    if family in NESTED:
        for key in NESTED[family]:
            if isinstance(cfg.get(key), Mapping):
                sub = dict(cfg[key])
                cfg[key] = (_set_dtype(sub, precision, f"{where}.{key}") if "family" in sub or key not in UNFAMILIED
                            else _own_dtype(sub, precision, f"{where}.{key}"))
        return cfg
    if family not in DTYPE_FAMILIES:
        raise ConfigError(f"precision={precision!r}: {where} (family {family!r}) has no compute dtype; mixed "
                          f"precision supports the families {', '.join(DTYPE_FAMILIES + tuple(NESTED))}")
    return _own_dtype(cfg, precision, where)


def _own_dtype(cfg: dict[str, Any], precision: str, where: str) -> dict[str, Any]:
    cfg["dtype"] = compute_dtype(precision, cfg.get("dtype"), where)
    return cfg


def compute_dtype(precision: str | None, given: str | None, where: str = "model") -> str:
    """The compute dtype of a model whose config says ``dtype=given`` in a run of ``precision``: a low precision
    wins over an unset or float32 ``dtype``; float32 (or None) keeps ``given``.

    Example:
        >>> compute_dtype("bfloat16", None), compute_dtype(None, "float16"), compute_dtype("float32", None)
        ('bfloat16', 'float16', 'float32')

    Raises:
      ConfigError: a low precision and a different explicit low-precision ``dtype``.
    """
    precision = check_precision(precision)
    if precision == DEFAULT_PRECISION:
        return given or DEFAULT_PRECISION
    if given not in (None, DEFAULT_PRECISION, precision):
        raise ConfigError(f"precision={precision!r} but {where}.dtype={given!r}; set one of them, or both alike")
    return precision


# --------------------------------------------------------------------------------------------------
# Dynamic loss scaling


@flax.struct.dataclass
class LossScaleState:
    """The optimizer state of :func:`dynamic_loss_scale`.

    Attributes:
      scale: the current loss scale (float32 scalar).
      good_steps: finite steps since the scale last changed (int32).
      skipped: steps skipped for overflowing gradients so far (int32).
      inner: the wrapped transformation's state.
    """

    scale: jax.Array
    good_steps: jax.Array
    skipped: jax.Array
    inner: Any


def dynamic_loss_scale(tx: optax.GradientTransformation, *, initial_scale: float = 2.0 ** 15,
                       growth_interval: int = 2000, factor: float = 2.0, min_scale: float = 1.0
                       ) -> optax.GradientTransformation:
    """Wraps ``tx`` with a dynamic loss scale (the train step scales the loss, see :func:`loss_scale_of`).

    ``update`` receives the *unscaled* gradients. If any is not finite the update is zero, the inner state is
    kept, the scale is divided by ``factor`` (not below ``min_scale``) and ``skipped`` counts the step; otherwise
    ``tx`` updates as usual and, after ``growth_interval`` finite steps in a row, the scale is multiplied by
    ``factor``. The defaults are PyTorch's ``torch.amp.GradScaler`` defaults (init 2**16 there; 2**15 here keeps a
    float16 loss of up to 2 below float16's maximum).

    Example:
        >>> import jax.numpy as jnp, optax
        >>> tx = dynamic_loss_scale(optax.sgd(1.0), initial_scale=4.0, growth_interval=2)
        >>> st = tx.init(jnp.zeros(1))
        >>> for _ in range(2):
        ...     _, st = tx.update(jnp.ones(1), st)
        >>> float(st.scale)  # two finite steps in a row: doubled
        8.0
    """
    if not (initial_scale >= min_scale > 0 and factor > 1 and growth_interval >= 1):
        raise ConfigError(f"dynamic_loss_scale: need initial_scale >= min_scale > 0, factor > 1 and growth_interval "
                          f">= 1; got initial_scale={initial_scale}, min_scale={min_scale}, factor={factor}, "
                          f"growth_interval={growth_interval}")

    def init(params: Any) -> LossScaleState:
        return LossScaleState(scale=jnp.asarray(initial_scale, jnp.float32), good_steps=jnp.zeros((), jnp.int32),
                              skipped=jnp.zeros((), jnp.int32), inner=tx.init(params))

    def update(updates: Any, state: LossScaleState, params: Any = None) -> tuple[Any, LossScaleState]:
        leaves = jax.tree_util.tree_leaves(updates)
        finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in leaves])) if leaves else jnp.bool_(True)
        safe = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), updates)
        new_updates, new_inner = tx.update(safe, state.inner, params)
        new_updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates)
        inner = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_inner, state.inner)
        good = jnp.where(finite, state.good_steps + 1, 0)
        grow = good >= growth_interval
        scale = jnp.where(finite, jnp.where(grow, state.scale * factor, state.scale),
                          jnp.maximum(state.scale / factor, min_scale))
        return new_updates, LossScaleState(scale=scale.astype(jnp.float32), good_steps=jnp.where(grow, 0, good),
                                           skipped=state.skipped + (~finite).astype(jnp.int32), inner=inner)

    return optax.GradientTransformation(init, update)


def loss_scale_of(opt_state: Any) -> jax.Array | None:
    """The loss scale held by a :func:`dynamic_loss_scale` state (the outermost transformation), else None."""
    return opt_state.scale if isinstance(opt_state, LossScaleState) else None


def loss_scaling(precision: str | None) -> bool:
    """Whether ``precision`` trains with a dynamic loss scale (float16 only)."""
    return check_precision(precision) == "float16"
