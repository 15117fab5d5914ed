"""KLAFT's two alignment losses as pure functions: MRM (Eq. 7) and ITM (Eq. 8).

Seed ``000_a957fa63d822500b.txt`` (KLAFT), spec sheet ``klaft.md`` §3.2-3.3. The MAM method
(:mod:`vlpeft_jax.peft.mam`) calls these from its hooks and records the results as ``loss/mrm`` and
``loss/itm``; the task adds them with ``config.loss_weights`` (λ = 0.1 each, Eq. 9).

- **MRM** (Eq. 7, UNITER's feature regression): each visual region (a row of the pre-Mapping-Layer features
  ``F_vis``) is masked independently with probability 15 %, at least one per image
  (:func:`draw_region_mask`); the loss is the squared L2 distance between the regressor's prediction and the
  original region, summed over the feature width and averaged over the masked regions only
  (:func:`mrm_loss`; per-term mean, spec A19). The paper applies MRM only "if |I_pf| > 1": with one region
  there is nothing to predict it from, and :class:`~vlpeft_jax.errors.ConfigError` is raised.
- **ITM** (Eq. 8, a triplet loss): ``max(||v_a − v_x|| − ||v_a − v_y|| + ε, 0)`` with Euclidean distance and
  ε = 1 (spec A17, Sentence-BERT's triplet objective whose wording Eq. 8 copies), averaged over every in-batch
  triplet ``(i, j ≠ i)`` whose negative text ``v_y = v_x[j]`` belongs to another image (COCO has five captions
  per image, so a caption of the same image is not a negative) (:func:`itm_loss`).

The distance is ``sqrt(max(Σ (a − b)², 1e-12))`` so its gradient stays finite at zero distance (it changes
a distance by at most 1e-6).

Example:
    >>> import jax.numpy as jnp
    >>> float(triplet_hinge(jnp.array([0.0, 0.0]), jnp.array([1.0, 0.0]), jnp.array([1.5, 0.0])))
    0.5
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlpeft_jax.errors import ConfigError

Array = jax.Array

MRM_RATE = 0.15  # the paper's 15 % (Eq. 7)
ITM_MARGIN = 1.0  # ε, spec A17


def distance(a: Array, b: Array) -> Array:
    """Euclidean distance over the last axis, with a finite gradient at 0 (see the module docstring)."""
    sq = jnp.sum(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=-1)
    return jnp.sqrt(jnp.maximum(sq, 1e-12))


def triplet_hinge(v_a: Array, v_x: Array, v_y: Array, margin: float = ITM_MARGIN) -> Array:
    """Eq. 8 for one (or a broadcast batch of) triplet(s): ``max(||v_a − v_x|| − ||v_a − v_y|| + ε, 0)``.

    Example:
        >>> float(triplet_hinge(jnp.zeros(2), jnp.array([1.0, 0.0]), jnp.array([3.0, 0.0])))
        0.0
    """
    return jnp.maximum(distance(v_a, v_x) - distance(v_a, v_y) + margin, 0.0)


def itm_loss(v_a: Array, v_x: Array, image_ids: Array | None = None, margin: float = ITM_MARGIN) -> Array:
    """Mean triplet hinge over the in-batch triplets (anchor ``v_a[i]``, positive ``v_x[i]``, negative ``v_x[j]``).

    Args:
      v_a: image vectors ``[b, d]`` (the image-[CLS] outputs).
      v_x: their texts' vectors ``[b, d]`` (the text-[CLS] outputs).
      image_ids: ``[b]`` ints; ``j`` is a negative of ``i`` only where ``image_ids[j] != image_ids[i]``
        (None: every ``j != i``).
      margin: ε.

    Returns:
      A scalar; 0 when the batch holds no valid triplet.

    Example:
        >>> a = jnp.zeros((2, 2)); x = jnp.array([[1.0, 0.0], [1.5, 0.0]])
        >>> float(itm_loss(a, x))  # (i=0, j=1): 1 - 1.5 + 1 = 0.5; (i=1, j=0): 1.5 - 1 + 1 = 1.5
        1.0
    """
    b = v_a.shape[0]
    d_pos = distance(v_a, v_x)  # [b]
    d_neg = distance(v_a[:, None, :], v_x[None, :, :])  # [b(anchor), b(negative)]
    valid = ~jnp.eye(b, dtype=bool)
    if image_ids is not None:
        ids = jnp.asarray(image_ids)
        valid = valid & (ids[:, None] != ids[None, :])
    hinge = jnp.maximum(d_pos[:, None] - d_neg + margin, 0.0)
    n = jnp.sum(valid)
    return jnp.where(n > 0, jnp.sum(jnp.where(valid, hinge, 0.0)) / jnp.maximum(n, 1), 0.0)


def draw_region_mask(rng: Array, batch: int, num_regions: int, rate: float = MRM_RATE) -> Array:
    """``[batch, num_regions]`` bool: each region masked with probability ``rate``, at least one per image.

    Raises:
      ConfigError: ``num_regions < 2`` (MRM needs surrounding regions, Eq. 7 "if |I_pf| > 1") or ``rate``
        outside (0, 1).

    Example:
        >>> m = draw_region_mask(jax.random.key(0), 4, 10)
        >>> m.shape, bool(m.any(-1).all())
        ((4, 10), True)
    """
    if num_regions < 2:
        raise ConfigError(f"MRM asked for with {num_regions} visual token(s) per image; masked region modelling "
                          "predicts a region from the others and needs at least 2 (seed 000 Eq. 7: 'if |I_pf| > "
                          "1'); turn mrm off for this model")
    if not 0.0 < rate < 1.0:
        raise ConfigError(f"mrm_rate={rate}; must lie in (0, 1) (the paper's 0.15)")
    k1, k2 = jax.random.split(rng)
    mask = jax.random.bernoulli(k1, rate, (batch, num_regions))
    forced = jax.nn.one_hot(jax.random.randint(k2, (batch,), 0, num_regions), num_regions, dtype=bool)
    return jnp.where(mask.any(-1, keepdims=True), mask, forced)


def mrm_loss(predictions: Array, targets: Array, mask: Array) -> Array:
    """Eq. 7: mean over masked regions of ``||v̂_m − v_m||²`` (summed over the feature width).

    Args:
      predictions: ``[b, n, d_pf]`` the regressor's outputs at the visual positions.
      targets: ``[b, n, d_pf]`` the original (unmasked) region features.
      mask: ``[b, n]`` bool, True at masked regions; only these count.

    Example:
        >>> t = jnp.ones((1, 3, 2)); m = jnp.array([[True, False, False]])
        >>> float(mrm_loss(t.at[0, 1].set(9.0), t, m))  # an error at an unmasked region is ignored
        0.0
    """
    err = jnp.sum(jnp.square(predictions.astype(jnp.float32) - targets.astype(jnp.float32)), axis=-1)
    m = mask.astype(jnp.float32)
    return jnp.sum(err * m) / jnp.maximum(jnp.sum(m), 1.0)
