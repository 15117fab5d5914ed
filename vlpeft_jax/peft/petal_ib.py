"""PETAL's Score-based Information Bottleneck (SIB) as pure functions: pooling, targets, estimators, loss terms.

Seed ``001_e6226210b77e0466.txt`` (PETAL), Sec. 3.4, Eq. 5-9; spec sheet ``specs/petal.md`` §4 and the
choices A16-A20. :mod:`vlpeft_jax.peft.petal` calls these; everything here is a function of plain dict pytrees
of float32 arrays, so it jits and differentiates like any loss.

- **Pooling (Eq. 5, A16)**: the Q-Former's query outputs ``H [b, n, d]`` are pooled into ``ẑ = Σ_i α_i H_i``
  with ``α = softmax_i(s)``, ``s_i = (1/n) Σ_j H_i·H_j / sqrt(d)`` (:func:`score_pool`). The row-mean of the Gram
  matrix makes Eq. 5's free index ``j`` concrete and ``1/sqrt(d)`` keeps the softmax from being one-hot on
  LayerNorm'd 768-d vectors. ``mode="mean"`` is the authors' code (α uniform).
- **Variables (A17)**: X is the mean of the frozen ViT features; Z is ``ẑ``; Y is the normalised bag of words
  of the target tokens, pads and -100 excluded (:func:`bag_of_words`; the authors' code counts pads as token 0).
- **Estimators (A18)**, architectures and init of the authors' ``model_loader_modify.py`` (kernels Xavier
  normal, biases 0; :func:`init_estimators`):

  * ``I(Z;Y)``: a Gaussian decoder ``q_θ(y|z)`` (:func:`gaussian_decoder`) and the Barber–Agakov lower bound
    ``½ mean_b Σ_d [-(μ-y)²/(e^ℓ+1e-6) - ℓ]`` (up to the constant ``H(Y)``; the code's ``CLUBSample.loglikeli``
    times ½), or the code's CLUB-sample difference (``zy_estimator="club_sample"``) (:func:`zy_bound`);
  * ``I(X;Z)``: a MINE critic ``T_φ([x; z])`` and the Donsker–Varadhan bound
    ``mean_b T(x_b, z_b) - (logsumexp_b T(x_b, z_σ(b)) - log B)``, σ uniform with replacement (:func:`mine_dv`).

- **Loss (Eq. 6 and 9, A19, stop-gradient form)**: :func:`ib_terms` returns
  ``L_model = -(Î_ZY(θ; ẑ) - η Î_XZ(sg(φ); x̄, ẑ))`` (the model and θ maximise Eq. 6 with the critic frozen) and
  ``L_critic = -Î_XZ(φ; sg(x̄), sg(ẑ))`` (the critic maximises its own bound and nothing else). The caller adds
  ``λ_IB · L_model + L_critic`` to the cross-entropy, so one optimizer serves both; the estimators get their
  own optax group (A20, 10× lr, no weight decay) and are training-only (not counted as PEFT parameters).

The authors' code trains the estimators on the model's loss (so its MINE critic is pushed to *lower* its bound)
and maximises the CLUB *upper* bound for ``I(Z;Y)``; the split above gives each bound the direction it is
valid in (spec §8 item 7).

Example:
    >>> params = init_estimators(jax.random.key(0), z_dim=4, x_dim=3, vocab_size=5)
    >>> h = jax.random.normal(jax.random.key(1), (2, 6, 4)); x = jnp.ones((2, 3))
    >>> z, alpha = score_pool(h)
    >>> y = bag_of_words(jnp.array([[1, 2, -100], [4, 4, 3]]), 5)
    >>> terms = ib_terms(params, x, z, y, jax.random.key(2))
    >>> sorted(terms), terms["model"].shape
    (['critic', 'i_xz', 'i_zy', 'model'], ())
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from vlpeft_jax.errors import ConfigError, InputError

Array = jax.Array

POOL_MODES = ("score", "mean")
ZY_ESTIMATORS = ("gaussian", "club_sample")
ETA = 0.1  # Eq. 6's η; the authors' ModelWrapper.beta
VAR_EPS = 1e-6  # added to the decoder's variance, as in the authors' CLUBSample

# PyTorch's xavier_normal_ (an untruncated normal, std sqrt(2 / (fan_in + fan_out))); jax.nn.initializers'
# glorot_normal draws from a truncated normal instead.
_xavier_normal = jax.nn.initializers.variance_scaling(1.0, "fan_avg", "normal")


def score_pool(h: Array, mode: str = "score") -> tuple[Array, Array]:
    """Eq. 5 (A16): pool the query outputs ``h [b, n, d]`` into ``(ẑ [b, d], α [b, n])``.

    ``mode="score"``: ``s_i = (1/n) Σ_j h_i·h_j / sqrt(d)``, ``α = softmax_i(s)``; ``mode="mean"``: ``α = 1/n``
    (the authors' code). In both, ``ẑ = Σ_i α_i h_i``.

    Raises:
      ConfigError: an unknown ``mode``.

    Example:
        >>> h = jnp.array([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
        >>> z, alpha = score_pool(h)
        >>> bool(alpha[0, 0] > alpha[0, 3]), round(float(alpha.sum()), 6)  # the two agreeing queries weigh more
        (True, 1.0)
        >>> score_pool(h, "mean")[0].tolist()
        [[0.75, 0.25]]
    """
    h = jnp.asarray(h, jnp.float32)
    b, n, d = h.shape
    if mode == "score":
        # (1/n) Σ_j h_i·h_j = h_i·mean_j h_j: the Gram row-mean without the [n, n] matrix
        s = jnp.einsum("bnd,bd->bn", h, h.mean(axis=1)) / math.sqrt(d)
        alpha = jax.nn.softmax(s, axis=-1)
    elif mode == "mean":
        alpha = jnp.full((b, n), 1.0 / n, jnp.float32)
    else:
        raise ConfigError(f"ib_pool={mode!r}; valid values are {', '.join(map(repr, POOL_MODES))}")
    return jnp.einsum("bn,bnd->bd", alpha, h), alpha


def bag_of_words(target_ids: Array, vocab_size: int, pad_id: int | None = None) -> Array:
    """A17: the normalised bag of words ``ȳ [b, vocab_size]`` of the target tokens ``[b, t]``.

    Ids below 0 (``-100``), at or above ``vocab_size`` and equal to ``pad_id`` are ignored; each row sums to 1,
    a row without tokens is all zeros. Built by a scatter-add into ``[b, vocab_size]`` (no ``[b, t, V]`` one-hot).

    Example:
        >>> bag_of_words(jnp.array([[2, 2, 1, 3, -100], [0, 0, 0, 0, 0]]), 4, pad_id=0).tolist()
        [[0.0, 0.25, 0.5, 0.25], [0.0, 0.0, 0.0, 0.0]]
    """
    ids = jnp.asarray(target_ids)
    valid = (ids >= 0) & (ids < vocab_size)
    if pad_id is not None:
        valid = valid & (ids != pad_id)
    rows = jnp.arange(ids.shape[0])[:, None]
    counts = jnp.zeros((ids.shape[0], vocab_size), jnp.float32).at[rows, jnp.where(valid, ids, 0)].add(
        valid.astype(jnp.float32))
    total = valid.sum(axis=-1, keepdims=True).astype(jnp.float32)
    return counts / jnp.maximum(total, 1.0)


def _dense(rng: Array, d_in: int, d_out: int) -> dict[str, Array]:
    return {"kernel": _xavier_normal(rng, (d_in, d_out), jnp.float32), "bias": jnp.zeros((d_out,), jnp.float32)}


def _apply(p: dict[str, Array], x: Array) -> Array:
    return x @ p["kernel"] + p["bias"]


def init_estimators(rng: Array, z_dim: int, x_dim: int, vocab_size: int, zy_hidden: int = 32,
                    xz_hidden: int = 64) -> dict:
    """A18: the estimator parameters ``{"zy": decoder θ, "xz": MINE critic φ}``, Xavier-normal kernels, zero biases.

    ``"zy"``: ``mu1`` (z_dim→zy_hidden), ``mu2`` (→vocab_size), ``lv1``, ``lv2`` (same shapes);
    ``"xz"``: ``h`` (x_dim+z_dim→xz_hidden), ``out`` (→1). Kernels are ``[d_in, d_out]``. The authors' sizes
    (``ModelWrapper``): zy_hidden 32, xz_hidden 64. Count: :func:`estimator_count`.

    Example:
        >>> p = init_estimators(jax.random.key(0), z_dim=4, x_dim=3, vocab_size=5)
        >>> p["zy"]["mu2"]["kernel"].shape, p["xz"]["h"]["kernel"].shape, float(p["xz"]["out"]["bias"][0])
        ((32, 5), (7, 64), 0.0)
    """
    k = jax.random.split(rng, 6)
    return {
        "zy": {"mu1": _dense(k[0], z_dim, zy_hidden), "mu2": _dense(k[1], zy_hidden, vocab_size),
               "lv1": _dense(k[2], z_dim, zy_hidden), "lv2": _dense(k[3], zy_hidden, vocab_size)},
        "xz": {"h": _dense(k[4], x_dim + z_dim, xz_hidden), "out": _dense(k[5], xz_hidden, 1)},
    }


def estimator_count(z_dim: int, x_dim: int, vocab_size: int, zy_hidden: int = 32, xz_hidden: int = 64) -> int:
    """Closed-form parameter count of :func:`init_estimators` (spec §2.4: training-only, not PEFT parameters).

    Gaussian decoder ``2·(z·h₁ + h₁ + h₁·V + V)`` plus MINE critic ``(x + z)·h₂ + h₂ + h₂ + 1``.

    Example:
        >>> estimator_count(768, 1408, 32100)  # spec §2.4, T5 vocabulary: 2,167,816 + 139,393
        2307209
    """
    decoder = 2 * (z_dim * zy_hidden + zy_hidden + zy_hidden * vocab_size + vocab_size)
    critic = (x_dim + z_dim) * xz_hidden + xz_hidden + xz_hidden + 1
    return decoder + critic


def gaussian_decoder(p_zy: dict, z: Array) -> tuple[Array, Array]:
    """``q_θ(y|z)``: ``μ = W2 relu(W1 z + b1) + b2``, ``ℓ = tanh(W4 relu(W3 z + b3) + b4)`` (log-variance in [-1, 1]).

    Example:
        >>> p = init_estimators(jax.random.key(0), 4, 3, 5)["zy"]
        >>> mu, logvar = gaussian_decoder(p, jnp.ones((2, 4)))
        >>> mu.shape, bool((jnp.abs(logvar) <= 1).all())
        ((2, 5), True)
    """
    z = jnp.asarray(z, jnp.float32)
    mu = _apply(p_zy["mu2"], jax.nn.relu(_apply(p_zy["mu1"], z)))
    logvar = jnp.tanh(_apply(p_zy["lv2"], jax.nn.relu(_apply(p_zy["lv1"], z))))
    return mu, logvar


def zy_bound(p_zy: dict, z: Array, y: Array, estimator: str = "gaussian", rng: Array | None = None,
             perm: Array | None = None) -> Array:
    """``Î(Z;Y)`` (A18), a scalar.

    ``"gaussian"`` (default): the Barber–Agakov lower bound up to the constant ``H(Y)``,
    ``½ mean_b Σ_d [-(μ_bd - y_bd)²/(e^ℓ_bd + 1e-6) - ℓ_bd]`` (the authors' ``CLUBSample.loglikeli`` × ½).
    ``"club_sample"``: the authors' ``CLUBSample.forward``,
    ``½ mean_b [Σ_d -(μ_b - y_b)²/(e^ℓ_b + 1e-6) - Σ_d -(μ_b - y_π(b))²/(e^ℓ_b + 1e-6)]`` with
    ``π = jax.random.permutation(rng, B)`` (or ``perm``, given, for tests).

    Raises:
      ConfigError: an unknown ``estimator``, or ``"club_sample"`` without ``rng`` or ``perm``.

    Example:
        >>> p = init_estimators(jax.random.key(0), 4, 3, 5)["zy"]
        >>> z, y = jnp.ones((2, 4)), jnp.full((2, 5), 0.2)
        >>> float(zy_bound(p, z, y, "club_sample", perm=jnp.array([0, 1])))  # identity π: the terms cancel
        0.0
    """
    if estimator not in ZY_ESTIMATORS:
        raise ConfigError(f"zy_estimator={estimator!r}; valid values are {', '.join(map(repr, ZY_ESTIMATORS))}")
    y = jnp.asarray(y, jnp.float32)
    mu, logvar = gaussian_decoder(p_zy, z)
    inv_var = 1.0 / (jnp.exp(logvar) + VAR_EPS)
    positive = jnp.sum(-jnp.square(mu - y) * inv_var, axis=-1)
    if estimator == "gaussian":
        return 0.5 * jnp.mean(positive - jnp.sum(logvar, axis=-1))
    if perm is None:
        if rng is None:
            raise ConfigError("zy_estimator='club_sample' draws a random permutation of the batch and needs an rng "
                              "(or an explicit perm); none was given")
        perm = jax.random.permutation(rng, y.shape[0])
    negative = jnp.sum(-jnp.square(mu - y[perm]) * inv_var, axis=-1)
    return 0.5 * jnp.mean(positive - negative)


def mine_critic(p_xz: dict, x: Array, z: Array) -> Array:
    """``T_φ([x; z])`` ``[b]``: one ReLU hidden layer on the concatenation (x first, as the authors' MINE).

    Example:
        >>> p = init_estimators(jax.random.key(0), 4, 3, 5)["xz"]
        >>> mine_critic(p, jnp.ones((2, 3)), jnp.ones((2, 4))).shape
        (2,)
    """
    xz = jnp.concatenate([jnp.asarray(x, jnp.float32), jnp.asarray(z, jnp.float32)], axis=-1)
    return _apply(p_xz["out"], jax.nn.relu(_apply(p_xz["h"], xz)))[..., 0]


def _check_mine_batch(x: Array, z: Array) -> int:
    b = x.shape[0]
    if z.shape[0] != b:
        raise InputError(f"MINE got x with batch {b} and z with batch {z.shape[0]}; they must match")
    if b < 2:
        raise InputError(f"the MINE estimator of I(X;Z) needs a batch of at least 2 (it shuffles z across the batch "
                         f"for the marginal term); got batch {b}. Use a larger batch or turn the IB loss off "
                         "(lambda_IB = 0)")
    return b


def mine_dv(p_xz: dict, x: Array, z: Array, rng: Array | None = None, *, sigma: Array | None = None) -> Array:
    """``Î(X;Z)`` (A18): the Donsker–Varadhan bound ``mean_b T(x_b, z_b) - (logsumexp_b T(x_b, z_σ(b)) - log B)``.

    ``σ = jax.random.randint(rng, (B,), 0, B)`` (uniform with replacement, the authors' ``torch.randint``), or
    ``sigma`` given.

    Raises:
      InputError: ``B < 2`` (checked from the static shape, so also under ``jit``) or x and z batches differ.

    Example:
        >>> p = init_estimators(jax.random.key(0), 4, 3, 5)["xz"]
        >>> x, z = jnp.ones((2, 3)), jnp.ones((2, 4))
        >>> float(mine_dv(p, x, z, jax.random.key(1)))  # identical pairs: the joint and marginal terms agree
        0.0
    """
    b = _check_mine_batch(x, z)
    if sigma is None:
        if rng is None:
            raise ConfigError("mine_dv draws the shuffled pairs at random and needs an rng (or an explicit sigma)")
        sigma = jax.random.randint(rng, (b,), 0, b)
    joint = mine_critic(p_xz, x, z)
    marginal = mine_critic(p_xz, x, jnp.asarray(z)[sigma])
    return jnp.mean(joint) - (jax.nn.logsumexp(marginal) - math.log(b))


def ib_terms(est_params: dict, x_bar: Array, z_hat: Array, y_bow: Array, rng: Array, *, eta: float = ETA,
             zy_estimator: str = "gaussian") -> dict[str, Array]:
    """Eq. 6/9 in stop-gradient form (A19): ``{"model", "critic", "i_zy", "i_xz"}``, all scalars.

    - ``model = -(Î_ZY(θ; ẑ) - η Î_XZ(sg(φ); x̄, ẑ))``: gradients reach ``ẑ``, ``x̄`` and θ, never φ;
    - ``critic = -Î_XZ(φ; sg(x̄), sg(ẑ))``: gradients reach φ only;
    - ``i_zy``, ``i_xz``: the two bounds, stop-gradient, for logging.

    Both MINE evaluations use the same shuffle σ. ``rng`` is split into ``(k_zy, k_xz)``: ``k_zy`` draws
    CLUB-sample's π, ``k_xz`` draws σ (see :func:`zy_bound`, :func:`mine_dv`). The caller adds
    ``λ_IB · model + critic`` to the loss.

    Raises:
      InputError: a batch below 2 or a ``y_bow`` width other than the decoder's vocabulary.
      ConfigError: an unknown ``zy_estimator``.

    Example:
        >>> p = init_estimators(jax.random.key(0), 4, 3, 5)
        >>> x, z = jnp.ones((3, 3)), jax.random.normal(jax.random.key(1), (3, 4))
        >>> t = ib_terms(p, x, z, jnp.full((3, 5), 0.2), jax.random.key(2), eta=0.1)
        >>> bool(jnp.allclose(t["model"], -(t["i_zy"] - 0.1 * t["i_xz"])))
        True
    """
    x_bar = jnp.asarray(x_bar, jnp.float32)
    z_hat = jnp.asarray(z_hat, jnp.float32)
    b = _check_mine_batch(x_bar, z_hat)
    vocab = est_params["zy"]["mu2"]["kernel"].shape[-1]
    if y_bow.shape != (b, vocab):
        raise InputError(f"y_bow has shape {tuple(y_bow.shape)}; the decoder expects ({b}, {vocab}) "
                         "(batch, vocabulary), see bag_of_words")
    k_zy, k_xz = jax.random.split(rng)
    sigma = jax.random.randint(k_xz, (b,), 0, b)
    i_zy = zy_bound(est_params["zy"], z_hat, y_bow, zy_estimator, rng=k_zy)
    i_xz_model = mine_dv(jax.lax.stop_gradient(est_params["xz"]), x_bar, z_hat, sigma=sigma)
    i_xz_critic = mine_dv(est_params["xz"], jax.lax.stop_gradient(x_bar), jax.lax.stop_gradient(z_hat), sigma=sigma)
    return {
        "model": -(i_zy - eta * i_xz_model),
        "critic": -i_xz_critic,
        "i_zy": jax.lax.stop_gradient(i_zy),
        "i_xz": jax.lax.stop_gradient(i_xz_critic),
    }
