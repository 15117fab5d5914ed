"""KLAFT's Topic Control Mechanism (TCM) as a PEFT method: a per-token mixture of topics over the frozen LM head.

Seed ``000_a957fa63d822500b.txt`` (KLAFT), Sec. 3.4 and 4; spec sheet ``specs/klaft.md`` §2.3, §3.1, §4, §7.

**Model (Eq. 3-5).** With ``h`` the hidden state that feeds the LM head (the ``lm_head`` hook's input, i.e.
after the backbone's final norm, A12) and ``LMH`` the model's own frozen head (the hook's ``next``):

- prior (Eq. 4): ``π = softmax(LN(h) · W_TZ)``, a new LayerNorm (γ=1, β=0 at init) and ``W_TZ ∈ R^{d×K}``, no bias;
- components (Eq. 5): ``p_z = softmax(LMH(h̃_z))`` with ``h̃_0 = h`` (the *residual* topic: the frozen
  model's own prediction) and, for ``z = 1..K-1``, ``h̃_z = (1-ω) h + ω φ_z(h)`` where ``φ_z`` is
  ``addition`` ``g_z`` (default), ``multiplication`` ``h ⊙ g_z`` or ``affine`` ``h W_z + b_z``;
- likelihood (Eq. 3): ``p(x_t) = Σ_z π_z p_z(x_t)``, maximised exactly (no sampling).

Choices where the paper is silent (the spec's A-numbers):

- **A10**: ``num_topics`` K counts *all* components, the residual included (K-1 learned topics; W_TZ has K
  columns, the only shape the paper prints). K = 1 is the residual alone.
- **A11**: every function keeps the ω-interpolation, so ω means the same for all three and ω = 0 (or K = 1)
  is exactly the frozen head: then the hook returns ``next(h)`` itself, bit for bit.
- **A12**: ``h`` is the LM head's input (after the final norm; T5: after its ``d^-1/2`` scaling), ``LMH``
  whatever head the model has (tied or not); TCM runs on the positions the head sees (``logits_to_keep``).
- **A13**: the hook returns the log of the marginal mixture ``log Σ_z π_z p_z`` as the "logits". These are
  log-probabilities (``logsumexp = 0``), so a task's unchanged cross-entropy on them *is* the mixture NLL of
  Eq. 3, and greedy/beam decoding (:mod:`vlpeft_jax.eval.decode`) decodes from the marginal, with the KV cache,
  unchanged. ``decoding="hard"`` (the spec's option) emits outside training from the prior-argmax topic alone.
- **A14**: per position the hook records ``topic/prior`` (argmax of π) and, when the side input
  ``target_ids`` is given, ``topic/posterior`` (argmax of ``r_z ∝ π_z p_z(x_t)``, -1 where there is no
  target). The posterior of an emitted token depends only on its prefix and itself, so r_TCM (Eq. 10) of
  generated captions is one teacher-forced forward (:func:`~vlpeft_jax.eval.rtcm.caption_topics`,
  :func:`~vlpeft_jax.eval.rtcm.caption_r_tcm`).
- **A15 (TTM, Eq. 6)**: ``L_TTM = mean ||h - h̃_{z*}||² = ω² ||h - φ_{z*}(h)||²`` with ``z*`` the **hard
  posterior argmax, stop-gradient** (the prior-expected form would be minimised by all mass on the residual
  topic, spec §3.1), recorded as ``loss/ttm`` (the runner multiplies by ``config.loss_weights["ttm"]``;
  KLAFT's λ_TTM = 0.1). ``ttm="dropout"`` (default, the spec's recipe) computes it on a **separate
  corrupted pass**: the method lists that pass in :meth:`TCM.extra_passes`; run with the side input
  ``pass_name="tcm_ttm"``, TCM's ``embed`` hook zeroes the token embeddings (position embeddings kept) of a
  random ``ttm_dropout`` (0.15) fraction of the positions that have a target, and its ``lm_head`` hook records
  ``loss/ttm`` over exactly those dropped positions, from the corrupted states. The drop mask is drawn over
  ``target_ids`` and right-aligned with the sequence, so a prefix VLM's visual tokens stay clean; the hook acts
  on the decoder's token embeddings only (paths ending ``wte``/``embed_tokens``, not a vision tower's patches).
  An encoder-decoder (T5) has its embed hook on the encoder input only: there ``ttm="dropout"`` is refused.
  :func:`~vlpeft_jax.peft.base.extra_pass_records` runs the extra passes of any methods (a task loss adds
  their loss terms).
  ``ttm="clean"`` is the one-pass approximation (every target position of the main pass, uncorrupted);
  ``ttm="off"`` records none.
- **§5 inits**: W_TZ ~ N(0, 0.02²); LN γ = 1, β = 0; g_z ~ N(0, 0.02²) (a method's ``init`` sees no data; the
  spec's data-dependent init, g_z = hidden states of K-1 random target tokens, is
  :func:`topic_vectors_from_hidden`, for a caller that has them); multiplication g_z = 1 + N(0, 0.02²);
  affine W_z = I + N(0, 0.02²), b_z = 0.

**Computation.** Everything after the head runs in float32 in log space:
``log p = logsumexp_z [log π_z + log_softmax(LMH(h̃_z))]``. For ``addition`` the head's linearity gives
``LMH(h̃_z) = (1-ω) LMH(h) + ω LMH(g_z)`` (exact for an affine head: the weights sum to 1, so a bias passes
through), so the head runs once on ``h`` (``[b, t, V]``) and once on the K-1 vectors ``g`` (``[K-1, V]``), and a
``lax.scan`` over topics accumulates ``logaddexp``; a custom VJP recomputes each topic's logits in a second
scan, so training memory stays O(b·t·V) (plain autodiff of the scan would keep K copies). ``naive=True``
(and the ``multiplication``/``affine`` functions, for which the shortcut does not hold) apply the head to every
``h̃_z`` and stack the K distributions: O(K·b·t·V), the reference the tests and ``run.py bench klaft`` compare.
All heads in this library (GPT-2, LLaMA/Qwen2, OPT, T5 and the VLMs on them) are linear; a non-affine head
needs ``naive=True``.

Bad settings raise :class:`ConfigError` before anything is traced: ``num_topics < 1``, ``omega`` outside
[0, 1], an unknown ``function`` or ``ttm``, and a base model without an LM head (no ``lm_head/kernel`` and no
tied ``wte``/``embed_tokens``/``shared`` embedding, so no ``lm_head`` hook point) at :meth:`TCM.init`.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from vlpeft_jax.models.registry import build_model
    >>> from vlpeft_jax.peft import base as pb
    >>> model, inputs = build_model({"family": "gpt2", "vocab_size": 11, "hidden_size": 8,
    ...     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 8})
    >>> params = model.init(jax.random.key(0), **inputs)["params"]
    >>> tcm = TCM(num_topics=3, omega=0.2)
    >>> p = tcm.init(jax.random.key(1), params)
    >>> tcm.num_params(p)  # d·K + 2d + (K-1)·d
    56
    >>> out, rec = pb.apply_with(model.apply, [(tcm, p)], {"params": params}, jnp.array([[1, 2, 3]]),
    ...                          side_inputs={"target_ids": jnp.array([[2, 3, -100]])}, record=True)
    >>> float(jnp.exp(out.logits).sum(-1).mean()).__round__(4), rec["topic/posterior"][0].shape
    (1.0, (1, 3))
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlpeft_jax.errors import ConfigError, InputError
from vlpeft_jax.models import hooks
from vlpeft_jax.peft import base as pb

FUNCTIONS = ("addition", "multiplication", "affine")
TTM_MODES = ("dropout", "clean", "off")
DECODINGS = ("marginal", "hard")
TTM_PASS = "tcm_ttm"
IGNORE = -100
_HEAD_KERNEL = re.compile(r"(?:^|/)lm_head/kernel(?:/|$)")
_TIED_EMBEDDING = re.compile(r"(?:^|/)(?:wte|embed_tokens|shared)/embedding(?:/|$)")
_T5_ENCODER = re.compile(r"(?:^|/)encoder/block_\d+/")
TOKEN_EMBEDDINGS = ("wte", "embed_tokens")  # the decoder LMs' embed hook paths end so (GPT-2; LLaMA/Qwen2, OPT)


@dataclasses.dataclass(frozen=True)
class TCM(pb.Method):
    """TCM settings (see the module docstring).

    Attributes:
      num_topics: K, components including the residual topic 0 (A10); 10 in every KLAFT row.
      omega: ω in [0, 1] (Eq. 5); 0.2 in the paper. ω = 0 is exactly the frozen head.
      function: ``addition`` (default), ``multiplication`` or ``affine`` (A11's ω-form).
      ttm: ``dropout`` (TTM on the separate token-dropout pass, A15), ``clean`` (on the main pass) or ``off``.
      ttm_dropout: the fraction of target positions whose token embedding the TTM pass zeroes (A15: 0.15).
      init_std: standard deviation of the random inits (§5: 0.02).
      naive: apply the head to every topic's hidden state (the O(K·b·t·V) reference path).
      decoding: ``marginal`` (A13: the mixture, in training and evaluation alike) or ``hard`` (outside training,
        i.e. when decoding or evaluating, the output is the prior-argmax topic's distribution alone).
      layer_norm_eps: ε of the prior's LayerNorm.
    """

    records_topics = True

    num_topics: int = 10
    omega: float = 0.2
    function: str = "addition"
    ttm: str = "dropout"
    ttm_dropout: float = 0.15
    init_std: float = 0.02
    naive: bool = False
    decoding: str = "marginal"
    layer_norm_eps: float = 1e-5
    name: str = "tcm"

    def __post_init__(self) -> None:
        k = self.num_topics
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ConfigError(f"{self.name}.num_topics={k!r}; must be an integer >= 1 (the residual topic counts)")
        if not 0.0 <= float(self.omega) <= 1.0:
            raise ConfigError(f"{self.name}.omega={self.omega!r}; must be in [0, 1]")
        if self.function not in FUNCTIONS:
            raise ConfigError(f"{self.name}.function={self.function!r}; valid: {', '.join(FUNCTIONS)}")
        if self.decoding not in DECODINGS:
            raise ConfigError(f"{self.name}.decoding={self.decoding!r}; valid: {', '.join(DECODINGS)}")
        if self.ttm not in TTM_MODES:
            raise ConfigError(f"{self.name}.ttm={self.ttm!r}; valid: {', '.join(TTM_MODES)}")
        if self.ttm == "dropout" and not 0.0 < float(self.ttm_dropout) < 1.0:
            raise ConfigError(f"{self.name}.ttm_dropout={self.ttm_dropout!r}; must be in (0, 1) with ttm='dropout'")
        if float(self.init_std) < 0.0:
            raise ConfigError(f"{self.name}.init_std={self.init_std!r}; must be >= 0")

    # ----------------------------------------------------------------------------------------------
    # parameters

    def init(self, rng: jax.Array, base_params: pb.Params) -> pb.Params:
        """``topic_norm`` (LN γ, β), ``topic_logits`` (W_TZ ``[d, K]``) and the K-1 topics: ``topic_vectors``
        ``[K-1, d]`` (addition, multiplication) or ``topic_kernels`` ``[K-1, d, d]`` + ``topic_biases``."""
        d, k, std = head_width(base_params, self.name), int(self.num_topics), float(self.init_std)
        if self.ttm == "dropout" and _has(base_params, _T5_ENCODER):
            raise ConfigError(f"{self.name}.ttm='dropout' drops decoder tokens through the embed hook, which an "
                              "encoder-decoder (T5) has only on the encoder input; use ttm='clean' (or 'off')")
        k_prior, k_topics = jax.random.split(rng)
        p: pb.Params = {
            "topic_norm": {"scale": jnp.ones((d,), jnp.float32), "bias": jnp.zeros((d,), jnp.float32)},
            "topic_logits": {"kernel": std * jax.random.normal(k_prior, (d, k), jnp.float32)},
        }
        noise = std * jax.random.normal(k_topics, (k - 1, d, d) if self.function == "affine" else (k - 1, d))
        if self.function == "addition":
            p["topic_vectors"] = noise
        elif self.function == "multiplication":
            p["topic_vectors"] = 1.0 + noise
        else:
            p["topic_kernels"] = jnp.eye(d, dtype=jnp.float32)[None] + noise
            p["topic_biases"] = jnp.zeros((k - 1, d), jnp.float32)
        return p

    def merge(self, base_params: pb.Params, peft_params: pb.Params) -> pb.Params:
        raise ConfigError(f"{self.name}: TCM cannot be merged into the base weights (a mixture of K head outputs "
                          "is not one linear head)")

    def num_params(self, peft_params: pb.Params) -> int:
        return pb.count(peft_params)

    def extra_passes(self) -> tuple[str, ...]:
        """Names of the extra forward passes a task loss should run (``pass_name`` side input): TTM's
        token-dropout pass with ``ttm="dropout"``. See :func:`vlpeft_jax.peft.base.extra_pass_records`."""
        return (TTM_PASS,) if self.ttm == "dropout" else ()

    # ----------------------------------------------------------------------------------------------
    # the pieces of Eq. 3-6 (pure functions of the parameters; the hooks below assemble them)

    def log_prior(self, p: pb.Params, h: jax.Array) -> jax.Array:
        """``log π`` ``[..., K]`` (Eq. 4), float32."""
        h = h.astype(jnp.float32)
        mean = h.mean(-1, keepdims=True)
        var = jnp.square(h - mean).mean(-1, keepdims=True)
        normed = (h - mean) * jax.lax.rsqrt(var + self.layer_norm_eps)
        normed = normed * p["topic_norm"]["scale"] + p["topic_norm"]["bias"]
        return jax.nn.log_softmax(normed @ p["topic_logits"]["kernel"], axis=-1)

    def topic_states(self, p: pb.Params, h: jax.Array) -> jax.Array:
        """``φ_z(h)`` for z = 1..K-1: ``[K-1, ..., d]`` (float32; ``h̃_z = (1-ω) h + ω φ_z(h)``)."""
        h = h.astype(jnp.float32)
        lead = (slice(None),) + (None,) * (h.ndim - 1)
        if self.function == "addition":
            return jnp.broadcast_to(p["topic_vectors"][lead], (p["topic_vectors"].shape[0], *h.shape))
        if self.function == "multiplication":
            return h[None] * p["topic_vectors"][lead]
        return jnp.einsum("...d,kde->k...e", h, p["topic_kernels"]) + p["topic_biases"][lead]

    def shifted(self, p: pb.Params, h: jax.Array) -> jax.Array:
        """``h̃_z`` for z = 1..K-1 (Eq. 5): ``[K-1, ..., d]``, float32."""
        return (1.0 - self.omega) * h.astype(jnp.float32)[None] + self.omega * self.topic_states(p, h)

    def ttm_distance(self, p: pb.Params, h: jax.Array, z: jax.Array) -> jax.Array:
        """``||h - h̃_z||² = ω² ||h - φ_z(h)||²`` per position ``[...]`` (0 for z = 0; Eq. 6)."""
        h32 = h.astype(jnp.float32)
        if int(self.num_topics) == 1:
            return jnp.zeros(z.shape, jnp.float32)
        if self.function == "addition":  # gather g_z instead of building K-1 copies of h
            phi = jnp.take(p["topic_vectors"], jnp.maximum(z - 1, 0), axis=0, mode="clip")
        else:
            states = self.topic_states(p, h)
            phi = jnp.take_along_axis(states, jnp.maximum(z - 1, 0)[None, ..., None], axis=0)[0]
        dist = self.omega ** 2 * jnp.sum(jnp.square(h32 - phi), axis=-1)
        return jnp.where(z > 0, dist, 0.0)

    def hard_logprobs(self, p: pb.Params, head: Callable[[jax.Array], jax.Array], h: jax.Array,
                      log_prior: jax.Array) -> jax.Array:
        """``log softmax(LMH(h̃_{z*}))`` with ``z* = argmax π`` per position (``decoding="hard"``, A13)."""
        z = jnp.argmax(log_prior, axis=-1)
        base = head(h).astype(jnp.float32)
        if self.function == "addition" and not self.naive:
            topic = head(p["topic_vectors"].astype(h.dtype)).astype(jnp.float32)
            picked = jnp.take(topic, jnp.maximum(z - 1, 0), axis=0, mode="clip")  # [..., V]
            chosen = (1.0 - self.omega) * base + self.omega * picked
        else:
            shifted = head(self.shifted(p, h).astype(h.dtype)).astype(jnp.float32)  # [K-1, ..., V]
            chosen = jnp.take_along_axis(shifted, jnp.maximum(z - 1, 0)[None, ..., None], axis=0)[0]
        return jax.nn.log_softmax(jnp.where((z > 0)[..., None], chosen, base), axis=-1)

    def mixture(self, p: pb.Params, head: Callable[[jax.Array], jax.Array], h: jax.Array,
                log_prior: jax.Array | None = None) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
        """The log mixture ``log Σ_z π_z p_z`` ``[..., V]`` (float32; Eq. 3) and ``topic_logp``.

        ``head`` is the frozen LM head (the hook's ``next``); ``log_prior`` defaults to :meth:`log_prior`.
        ``topic_logp(targets [...]) -> [..., K]`` gives each topic's ``log π_z + log p_z(target)`` without
        gradient: the posterior ``r_z`` is its softmax, its argmax the posterior topic.
        """
        log_prior = self.log_prior(p, h) if log_prior is None else log_prior
        k = int(self.num_topics)
        if self.function == "addition" and not self.naive:
            base = head(h).astype(jnp.float32)
            topic = head(p["topic_vectors"].astype(h.dtype)).astype(jnp.float32)  # [K-1, V]
            y, lse = _addition_mixture(base, topic, log_prior, float(self.omega))

            def topic_logp(targets: jax.Array) -> jax.Array:
                safe = jnp.where(targets == IGNORE, 0, targets)[..., None]
                b = jnp.take_along_axis(jax.lax.stop_gradient(base), safe, axis=-1)  # [..., 1]
                u = jax.lax.stop_gradient(topic)[:, safe[..., 0]]  # [K-1, ...]
                own = jnp.concatenate([b, jnp.moveaxis((1.0 - self.omega) * b[..., 0][None] + self.omega * u,
                                                       0, -1)], axis=-1)
                return jax.lax.stop_gradient(log_prior + own - lse)

            return y, topic_logp
        logits = [head(h)]
        if k > 1:
            logits.append(head(self.shifted(p, h).astype(h.dtype)))
        logp = jnp.concatenate([jax.nn.log_softmax(x.astype(jnp.float32), axis=-1).reshape(-1, *h.shape[:-1],
                                                                                              x.shape[-1])
                                for x in logits], axis=0)  # [K, ..., V]
        joint = jnp.moveaxis(log_prior, -1, 0)[..., None] + logp
        y = jax.nn.logsumexp(joint, axis=0)

        def topic_logp_naive(targets: jax.Array) -> jax.Array:
            safe = jnp.where(targets == IGNORE, 0, targets)
            own = jnp.take_along_axis(joint, jnp.broadcast_to(safe[None, ..., None], (k, *safe.shape, 1)), axis=-1)
            return jax.lax.stop_gradient(jnp.moveaxis(own[..., 0], 0, -1))

        return y, topic_logp_naive

    # ----------------------------------------------------------------------------------------------
    # hooks

    def hooks(self, peft_params: pb.Params, *, rng: jax.Array | None = None, train: bool = False
              ) -> list[hooks.Hook]:
        p = peft_params
        trivial = int(self.num_topics) == 1 or float(self.omega) == 0.0
        hard = self.decoding == "hard" and not train and not trivial

        def dropped(ctx: hooks.HookContext, length: int) -> jax.Array:
            """The TTM pass's dropped positions ``[b, length]``, right-aligned (the same draw in both hooks)."""
            targets = ctx.side_input("target_ids")
            if targets is None:
                raise InputError(f"{self.name}: the TTM pass ({TTM_PASS!r}) needs the side input target_ids")
            if rng is None:
                raise InputError(f"{self.name}: the TTM pass draws its token dropout and needs a key "
                                 "(apply_with(..., rng=...))")
            targets = jnp.asarray(targets)
            drop = jax.random.bernoulli(jax.random.fold_in(rng, 0x77A), self.ttm_dropout, targets.shape)
            return _right_align(drop & (targets != IGNORE), length, False)

        def embed_hook(ctx: hooks.HookContext, nxt: Any, ids: Any, embeds: jax.Array, mask: Any) -> Any:
            embeds, mask = nxt(ids, embeds, mask)
            if ctx.side_input("pass_name") != TTM_PASS or ctx.decode:
                return embeds, mask
            drop = dropped(ctx, embeds.shape[1])
            return jnp.where(drop[..., None], jnp.zeros((), embeds.dtype), embeds), mask

        def head_hook(ctx: hooks.HookContext, nxt: Any, h: jax.Array) -> jax.Array:
            pass_name = ctx.side_input("pass_name")
            targets = ctx.side_input("target_ids")
            targets = None if targets is None else _right_align(jnp.asarray(targets), h.shape[1], IGNORE)
            if pass_name == TTM_PASS and self.ttm == "dropout":
                where = dropped(ctx, h.shape[1])
                _, topic_logp = self.mixture(p, nxt, h)
                z = jnp.argmax(topic_logp(targets), axis=-1)
                ctx.record("loss/ttm", _masked_mean(self.ttm_distance(p, h, z), where))
                return nxt(h)  # this pass's logits are not scored
            log_prior = self.log_prior(p, h)
            if trivial:
                y, topic_logp = nxt(h), None
            else:
                y, topic_logp = self.mixture(p, nxt, h, log_prior)
            if pass_name is not None:  # another method's extra pass: the mixture, nothing recorded
                return y
            if hard:  # A13's option: emit from the prior's argmax topic alone
                y = self.hard_logprobs(p, nxt, h, log_prior)
            ctx.record("topic/prior", jnp.argmax(log_prior, axis=-1).astype(jnp.int32))
            if targets is not None:
                if topic_logp is None:  # all components are the base head: the posterior is the prior
                    z = jnp.argmax(jax.lax.stop_gradient(log_prior), axis=-1)
                else:
                    z = jnp.argmax(topic_logp(targets), axis=-1)
                valid = targets != IGNORE
                ctx.record("topic/posterior", jnp.where(valid, z, -1).astype(jnp.int32))
                if self.ttm == "clean":
                    ctx.record("loss/ttm", _masked_mean(self.ttm_distance(p, h, z), valid))
            return y

        out = [hooks.Hook("lm_head", head_hook)]
        if self.ttm == "dropout" and train:  # the decoder's token embeddings only (not a vision tower's patches)
            out.append(hooks.Hook("embed", embed_hook, where=lambda path: bool(path) and path[-1] in TOKEN_EMBEDDINGS))
        return out


# --------------------------------------------------------------------------------------------------
# the efficient addition mixture: log Σ_z π_z softmax((1-ω) base + ω topic_z), O(b·t·V) memory


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _addition_mixture(base: jax.Array, topic: jax.Array, log_prior: jax.Array, omega: float
                      ) -> tuple[jax.Array, jax.Array]:
    return _addition_forward(base, topic, log_prior, omega)


def _addition_forward(base: jax.Array, topic: jax.Array, log_prior: jax.Array, omega: float
                      ) -> tuple[jax.Array, jax.Array]:
    """``(y [..., V], lse [..., K])``: the log mixture and each topic's log-normaliser."""
    lse0 = jax.nn.logsumexp(base, axis=-1)
    acc = log_prior[..., :1] + base - lse0[..., None]

    def body(acc: jax.Array, xs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        u, lp = xs
        logits = (1.0 - omega) * base + omega * u
        lse = jax.nn.logsumexp(logits, axis=-1)
        return jnp.logaddexp(acc, lp[..., None] + logits - lse[..., None]), lse

    y, lses = jax.lax.scan(body, acc, (topic, jnp.moveaxis(log_prior[..., 1:], -1, 0)))
    return y, jnp.concatenate([lse0[..., None], jnp.moveaxis(lses, 0, -1)], axis=-1)


def _addition_fwd(base: jax.Array, topic: jax.Array, log_prior: jax.Array, omega: float) -> Any:
    y, lse = _addition_forward(base, topic, log_prior, omega)
    return (y, lse), (base, topic, log_prior, y, lse)


def _addition_bwd(omega: float, res: Any, cts: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    # y = logsumexp_z a_z, a_z = log π_z + ℓ_z - lse(ℓ_z): with the responsibilities w_z = exp(a_z - y),
    # ∂/∂ℓ_z(v) = c(v) w_z(v) - p_z(v) Σ_v' c(v') w_z(v'), ∂/∂log π_z = Σ_v c(v) w_z(v). lse is not differentiated
    # (it only feeds the stop-gradient posterior).
    base, topic, log_prior, y, lse = res
    c = cts[0]

    def grads(logits: jax.Array, lse_z: jax.Array, lp_z: jax.Array) -> tuple[jax.Array, jax.Array]:
        logp = logits - lse_z[..., None]
        q = c * jnp.exp(lp_z[..., None] + logp - y)
        s = q.sum(-1)
        return q - jnp.exp(logp) * s[..., None], s

    d_base, s0 = grads(base, lse[..., 0], log_prior[..., 0])

    def body(d_base: jax.Array, xs: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, Any]:
        u, lp, lse_z = xs
        d_logits, s = grads((1.0 - omega) * base + omega * u, lse_z, lp)
        return d_base + (1.0 - omega) * d_logits, (omega * d_logits.reshape(-1, u.shape[-1]).sum(0), s)

    d_base, (d_topic, ss) = jax.lax.scan(
        body, d_base, (topic, jnp.moveaxis(log_prior[..., 1:], -1, 0), jnp.moveaxis(lse[..., 1:], -1, 0)))
    return d_base, d_topic, jnp.concatenate([s0[..., None], jnp.moveaxis(ss, 0, -1)], axis=-1)


_addition_mixture.defvjp(_addition_fwd, _addition_bwd)


def topic_vectors_from_hidden(tcm: TCM, peft_params: pb.Params, hidden: Any, mask: Any = None, seed: int = 0
                              ) -> pb.Params:
    """The spec's data-dependent init (§5) for ``addition``: ``g_z`` := the hidden states ``h_t`` of K-1 random
    positions (e.g. the LM-head inputs over a batch of target-domain captions, ``mask`` marking caption tokens),
    so each topic starts as a real context rather than near zero. Returns new parameters (the rest unchanged).

    Example:
        >>> tcm = TCM(num_topics=3)
        >>> p = tcm.init(jax.random.key(0), {"lm_head": {"kernel": jnp.zeros((4, 7))}})
        >>> h = jnp.arange(12.0).reshape(1, 3, 4)
        >>> new = topic_vectors_from_hidden(tcm, p, h, mask=jnp.array([[0, 1, 1]]))
        >>> sorted(new["topic_vectors"][:, 0].tolist())  # the states of positions 1 and 2
        [4.0, 8.0]
    """
    if tcm.function != "addition":
        raise ConfigError(f"{tcm.name}: topic vectors from hidden states are for function='addition' "
                          f"(got {tcm.function!r})")
    h = np.asarray(hidden, np.float32).reshape(-1, np.shape(hidden)[-1])
    keep = np.ones(len(h), bool) if mask is None else np.asarray(mask, bool).reshape(-1)
    pool = h[keep]
    k = int(tcm.num_topics) - 1
    if len(pool) == 0 or pool.shape[1] != peft_params["topic_vectors"].shape[1]:
        raise InputError(f"{tcm.name}: need hidden states [..., {peft_params['topic_vectors'].shape[1]}] with at "
                         f"least one selected position; got shape {np.shape(hidden)} and {len(pool)} selected")
    rows = np.random.default_rng(seed).choice(len(pool), size=k, replace=len(pool) < k)
    return {**peft_params, "topic_vectors": jnp.asarray(pool[rows])}


def _right_align(x: jax.Array, length: int, fill: Any) -> jax.Array:
    """``x [b, t]`` right-aligned to ``length`` positions (front-padded with ``fill``, or its last ones kept)."""
    t = x.shape[1]
    if t >= length:
        return x[:, t - length:]
    return jnp.pad(x, ((0, 0), (length - t, 0)), constant_values=fill)


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.where(mask, values, 0.0).sum() / jnp.maximum(mask.sum(), 1)


def _paths(tree: Any) -> list[tuple[str, Any]]:
    return [("/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path), leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _has(tree: Any, pattern: re.Pattern[str]) -> bool:
    return any(pattern.search(name) for name, _ in _paths(tree))


def head_width(base_params: pb.Params, who: str = "tcm") -> int:
    """The width of the LM head's input: ``lm_head/kernel`` ``[d, V]``, else a tied ``wte``/``embed_tokens``/
    ``shared`` embedding ``[V, d]``; :class:`ConfigError` when the model has none (no ``lm_head`` hook point)
    or several heads of different widths. Works on ``ShapeDtypeStruct`` leaves."""
    heads, tied = set(), set()
    for name, leaf in _paths(base_params):
        if _HEAD_KERNEL.search(name):
            heads.add(int(leaf.shape[0]))
        elif _TIED_EMBEDDING.search(name):
            tied.add(int(leaf.shape[-1]))
    widths = heads or tied
    if not widths:
        raise ConfigError(f"{who}: the base model has no LM head (no 'lm_head/kernel' and no tied 'wte', "
                          "'embed_tokens' or 'shared' embedding), so there is no lm_head hook point for TCM; use a "
                          "decoder LM (gpt2, llama, qwen2, opt, t5) or a VLM built on one")
    if len(widths) > 1:
        raise ConfigError(f"{who}: the base model has LM heads of several widths {sorted(widths)}; TCM needs one")
    return widths.pop()

