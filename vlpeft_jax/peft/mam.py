"""KLAFT's Modified Attention Mechanism (MAM) as a method, with the MRM and ITM losses it carries.

Seed ``000_a957fa63d822500b.txt`` (KLAFT) Sec. 3.3, Eq. 2; spec sheet ``klaft.md`` §2.2, choices A1-A9,
A16, A17. One attention is computed under two masks, a "dependent" cross-modal ``M_c`` and an "independent"
same-modality ``M_s``, and the two probability tables are blended per (query, key) pair by a sparse gate::

    MAM = [B_c ⊗ softmax(S + M_c) + (1 − B_c) ⊗ softmax(S + M_s)] V,   S = Q Kᵀ/√d       (A4: gate the
    B_c = σ(A)·1[σ(A) > μ],   A = X W_b + C_b,   W_b ∈ R^{d×N_max},  C_b ∈ R^{N_max×N_max}   probabilities)

- **Gate** (:func:`gate_values`): ``A[i, j] = x_i·W_b[:, j] + C_b[i, j]`` over *absolute positions*; W_b and C_b
  are allocated for ``max_length`` = N_max positions and indexed by position (A5); one gate shared by all heads,
  computed from the same normalised input as Q/K/V (A6); μ = ``mu`` = 0.2 by default (A7); the indicator is
  a constant mask, so entries at or below μ are exactly 0 and get zero gradient (A8). ``1 − B_c`` is not
  thresholded (as printed).
- **Masks** (:func:`mask_tables`, ``mam_masks``; A2): ``r3`` (default) M_c = all edges with text causal, M_s =
  same type only (visual bidirectional, text causal); ``r1`` M_c = cross-type edges only; ``r2`` M_s = prefix-LM;
  ``conventional`` = the "MAM(w/o)" ablation: one prefix-LM mask, no gate. [CLS] rows use their M_s row in both
  masks; padding keys are blocked; every real row keeps its own key, so no row is all-masked.
- **Token types**: visual tokens are the first ``num_visual`` positions (the prefix VLM's layout, visual tokens
  prepended), told apart by position (``position < num_visual``) rather than by a side input because the decode
  loop passes no per-token side inputs and the rule must hold in cached decoding too.
- **Placement** (``mam_layers``; A1, A9):

  * ``"top"`` (default): one new pre-LN block on the final hidden states, ``u = X + W_O·MAM(LN_1(X))``,
    ``out = u + W_2·ReLU(W_1·LN_2(u) + b_1) + b_2`` (FFN 4·d, ReLU as the paper says), through the
    ``final_hidden`` hook over the whole sequence (visual and text positions). W_O and W_2 start at zero, so the
    block is the identity at initialisation. Text rows read only the block's *inputs* as keys, so M_c's
    visual→text edges cannot leak future text into next-token prediction. The padding mask and the positions
    are read from the language model's attention layers (a pass-through ``attention`` hook on ``targets``;
    ``ctx.positions`` and the key-validity row of the additive bias).
  * ``"all"``: the ``attention`` hook of every language-model layer (``targets``) mixes the two masked
    attentions with the layer's own (frozen) Q/K/V and a per-layer gate. Visual rows use their M_s row in both
    masks (they never see text), so the visual keys/values of every layer depend on the image only: the spec's
    "visual K/V fixed, visual-row outputs discarded" requirement, met without leaking future text through
    visual positions. To start from the frozen model, each layer's output is ``base + α_l·(MAM − base)``
    with ``α_l`` (``mix``) initialised to 0 (a LLaMA-Adapter-style zero gate; the paper gives no init).

- **Inference** (A3): Eq. 2 with the learned gate (``mam_inference="mixed"``); ``"independent"`` sets B_c := 0
  when not training (the Fig. 1 caption read literally; an ablation).
- **KV-cache decoding**: ``"all"`` works with the model's own cache (the hook sees cached keys/values and takes
  key validity and positions from the bias). ``"top"`` keeps its own cache of the block's keys/values, which
  a hook cannot return through the model's :class:`~vlpeft_jax.models.layers.KVCache`: the step function
  passes it as the side input ``mam_cache`` (:meth:`MAM.init_decode_state`) and reads the updated one back
  from the records (:meth:`MAM.read_decode_state`); calling the model with a KV cache but without it raises.
- **ITM** (``itm=True``; Eq. 8, A17, top placement only): one learned [CLS] vector (``cls``) is appended at the
  block input twice, as the image-[CLS] (after the visual tokens, kept at inference so text positions index
  the gate as in training) and as the text-[CLS] (after the last real text token, training only); the two
  differ only in what their rows may see (M_s rows: the visual tokens / the text). Their outputs are v_a and
  v_x, and the triplet
  loss (:func:`vlpeft_jax.peft.klaft_losses.itm_loss`, ε = ``itm_margin``, negatives = the other rows'
  texts except those whose side input ``image_ids`` equals the anchor's) is recorded as ``loss/itm`` in
  training. The [CLS] slots are appended at the *end* of the array and given their logical positions; the
  block has no position embedding, so only the masks and gate indices (by position) see where they sit.
- **MRM** (``mrm=True``; Eq. 7, A16): a ``linear`` hook on the Mapping Layer's first projection (``mrm_site``)
  zeroes 15 % of the regions of ``F_vis`` (at least one per image) and keeps the originals as targets; the
  regressor f_θ (d → d → d_pf, GELU) reads the block output (``"top"``) or the final hidden state
  (``"all"``) at the masked visual positions; ``loss/mrm`` is the mean squared L2 error over masked regions.
  The targets carry no gradient (a trainable vision tower could otherwise make them trivial to predict).
  ``mrm_pass="separate"`` (A16's clean caption pass): masking happens only in the extra forward pass named
  ``"mrm"`` (:meth:`MAM.extra_passes`; the task runs it with the side input ``pass_name="mrm"`` and adds only
  ``loss/mrm`` from it); ``"same"``: the (only) training forward is region-masked, so the caption NLL sees
  masked images too. One visual region → :class:`~vlpeft_jax.errors.ConfigError`.

Example:
    >>> import jax, jax.numpy as jnp
    >>> pos = jnp.arange(4)[None]; kind = token_kinds(pos, 2)
    >>> m_c, m_s = mask_tables(kind, pos, kind, pos, jnp.ones((1, 4), bool))
    >>> m_s[0].astype(int).tolist()
    [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.models import hooks, layers
from vlpeft_jax.peft import base as pb
from vlpeft_jax.peft import klaft_losses as kl
from vlpeft_jax.peft.adapters import match_paths
from vlpeft_jax.peft.llama_adapter import attention_modules

Array = jax.Array

TEXT, VISUAL, IMAGE_CLS, TEXT_CLS = 0, 1, 2, 3
PLACEMENTS = ("top", "all")
MASK_PATTERNS = ("r3", "r1", "r2", "conventional")
INFERENCE_MODES = ("mixed", "independent")
MRM_PASSES = ("separate", "same")
MRM_PASS_NAME = "mrm"
LM_ATTENTION = r"(?:.*/)?(?:model|transformer|model/decoder)/(?:layers|h)_\d+/(?:self_attn|attn)"
MAL_FIRST = r"(?:.*/)?multi_modal_projector/(?:linear_1|linear_in)"
FINAL_NORMS = r"(?:.*/)?(?:model/norm|transformer/ln_f|decoder/final_layer_norm)/scale"

# side inputs read here: image_ids, mam_cache, pass_name (registered in vlpeft_jax.models.hooks.SIDE_INPUTS)


# ------------------------------------------------------------------------------------ masks, gate, attention


def token_kinds(positions: Array, num_visual: int) -> Array:
    """``VISUAL`` (1) at positions ``< num_visual``, else ``TEXT`` (0) (visual tokens come first)."""
    return jnp.where(positions < num_visual, VISUAL, TEXT).astype(jnp.int32)


def mask_tables(q_kind: Array, q_pos: Array, k_kind: Array, k_pos: Array, k_valid: Array,
                pattern: str = "r3") -> tuple[Array, Array]:
    """The boolean "may attend" tables ``(M_c, M_s)`` ``[b, tq, tk]`` of spec §2.2 (True = 0, False = −∞).

    Args:
      q_kind, k_kind: ``[b, tq]`` / ``[b, tk]`` token types (``TEXT``, ``VISUAL``, ``IMAGE_CLS``, ``TEXT_CLS``).
      q_pos, k_pos: their logical positions (causality among text compares them).
      k_valid: ``[b, tk]`` False at padding keys.
      pattern: ``r3``, ``r1``, ``r2`` or ``conventional`` (see the module docstring; A2).
    """
    if pattern not in MASK_PATTERNS:
        raise ConfigError(f"mam_masks={pattern!r}; valid: {', '.join(MASK_PATTERNS)}")
    q_vis = ((q_kind == VISUAL) | (q_kind == IMAGE_CLS))[:, :, None]
    k_vis = ((k_kind == VISUAL) | (k_kind == IMAGE_CLS))[:, None, :]
    causal = k_pos[:, None, :] <= q_pos[:, :, None]
    same = jnp.where(q_vis, k_vis, ~k_vis & causal)
    joint = jnp.where(q_vis, True, k_vis | causal)
    prefix_lm = jnp.where(q_vis, k_vis, k_vis | causal)
    cross = jnp.where(q_vis, ~k_vis, k_vis)
    m_c, m_s = {"r3": (joint, same), "r1": (cross, same), "r2": (joint, prefix_lm),
                "conventional": (prefix_lm, prefix_lm)}[pattern]
    is_cls = ((q_kind == IMAGE_CLS) | (q_kind == TEXT_CLS))[:, :, None]
    m_c, m_s = jnp.where(is_cls, same, m_c), jnp.where(is_cls, same, m_s)
    valid = k_valid[:, None, :].astype(bool)
    own = (k_pos[:, None, :] == q_pos[:, :, None]) & (k_kind[:, None, :] == q_kind[:, :, None]) & valid
    return (m_c & valid) | own, (m_s & valid) | own


def gate_values(x: Array, weight: Array, bias: Array, q_pos: Array, k_pos: Array, mu: float) -> Array:
    """``B_c = σ(A)·1[σ(A) > μ]`` ``[b, tq, tk]`` with ``A[i, j] = x_i·W_b[:, pos_j] + C_b[pos_i, pos_j]``.

    ``x`` ``[b, tq, d]`` are the queries' (normalised) inputs, ``weight`` W_b ``[d, N]``, ``bias`` C_b ``[N, N]``,
    positions index both (clipped to ``N − 1``; the callers check lengths first). The indicator is a constant:
    ``jnp.where`` passes the gradient σ'(A) only where σ(A) > μ (A8).

    Example:
        >>> p = jnp.arange(2)[None]
        >>> g = gate_values(jnp.zeros((1, 2, 3)), jnp.zeros((3, 4)), jnp.zeros((4, 4)), p, p, 0.2)
        >>> g.tolist()  # σ(0) = 0.5 > 0.2
        [[[0.5, 0.5], [0.5, 0.5]]]
    """
    n = bias.shape[0]
    qp, kp = jnp.clip(q_pos, 0, n - 1), jnp.clip(k_pos, 0, n - 1)
    a = jnp.einsum("bqd,bkd->bqk", x.astype(jnp.float32), jnp.take(weight.T, kp, axis=0).astype(jnp.float32))
    a = a + bias[qp[:, :, None], kp[:, None, :]].astype(jnp.float32)
    s = jax.nn.sigmoid(a)
    return jnp.where(s > mu, s, 0.0)


def mam_attention(q: Array, k: Array, v: Array, mask_c: Array, mask_s: Array, gate: Array | None) -> Array:
    """Eq. 2 (A4): ``[B_c ⊗ softmax(S + M_c) + (1 − B_c) ⊗ softmax(S + M_s)] V`` per head, no renormalisation.

    Args:
      q: ``[b, tq, h, d]``; k, v: ``[b, tk, kvh, d]`` (grouped-query heads allowed).
      mask_c, mask_s: ``[b, tq, tk]`` bool tables (:func:`mask_tables`).
      gate: ``[b, tq, tk]`` B_c, shared by the heads (A6); None = ``softmax(S + M_s) V`` only.

    Returns:
      ``[b, tq, h, d]``.
    """
    b, tq, h, d = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q.reshape(b, tq, kvh, g, d), k).astype(jnp.float32)
    scores = (scores / jnp.sqrt(jnp.float32(d))).reshape(b, h, tq, tk)
    p_s = jax.nn.softmax(scores + layers.mask_to_bias(mask_s)[:, None], axis=-1)
    if gate is None:
        probs = p_s
    else:
        p_c = jax.nn.softmax(scores + layers.mask_to_bias(mask_c)[:, None], axis=-1)
        bc = gate[:, None].astype(jnp.float32)
        probs = bc * p_c + (1.0 - bc) * p_s
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs.reshape(b, kvh, g, tq, tk).astype(v.dtype), v)
    return out.reshape(b, tq, h, d)


def key_validity(bias: Array | None, batch: int, tk: int) -> Array:
    """``[b, tk]`` bool: the keys the attention's last query row may see, i.e. the real (and, with a cache,
    written) keys; read from the additive bias the model passes to the ``attention`` hook."""
    if bias is None:
        return jnp.ones((batch, tk), bool)
    return jnp.broadcast_to(bias[:, 0, -1, :] > layers.NEG_INF / 2, (batch, tk))


def positions_of(valid: Array) -> Array:
    """Positions ``cumsum(valid) − 1`` (0 before the first real token), as the models number real tokens."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


# ------------------------------------------------------------------------------------------ the top block


def _normal(rng: Array, shape: tuple[int, ...]) -> Array:
    return 0.02 * jax.random.normal(rng, shape, jnp.float32)


def _dense(rng: Array | None, n_in: int, n_out: int) -> dict[str, Array]:
    kernel = jnp.zeros((n_in, n_out), jnp.float32) if rng is None else _normal(rng, (n_in, n_out))
    return {"kernel": kernel, "bias": jnp.zeros((n_out,), jnp.float32)}


def _norm(width: int) -> dict[str, Array]:
    return {"scale": jnp.ones((width,), jnp.float32), "bias": jnp.zeros((width,), jnp.float32)}


def init_block(rng: Array, width: int, max_length: int) -> dict[str, Any]:
    """Parameters of the top MAM block (A9): pre-LN MAM attention and a 4·d ReLU FFN, zero ``o_proj``/``fc2``."""
    k = jax.random.split(rng, 5)
    return {"ln_1": _norm(width), "q_proj": _dense(k[0], width, width), "k_proj": _dense(k[1], width, width),
            "v_proj": _dense(k[2], width, width), "o_proj": _dense(None, width, width),
            "gate": {"weight": _normal(k[3], (width, max_length)),
                     "bias": jnp.zeros((max_length, max_length), jnp.float32)},
            "ln_2": _norm(width), "fc1": _dense(k[4], width, 4 * width), "fc2": _dense(None, 4 * width, width)}


def _apply_dense(p: Mapping[str, Array], x: Array) -> Array:
    return x @ p["kernel"] + p["bias"]


def _apply_norm(p: Mapping[str, Array], x: Array, eps: float = 1e-5) -> Array:
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _heads(x: Array, n: int) -> Array:
    return x.reshape(*x.shape[:2], n, x.shape[-1] // n)


def _feed_forward(p: Mapping[str, Any], u: Array) -> Array:
    return u + _apply_dense(p["fc2"], jax.nn.relu(_apply_dense(p["fc1"], _apply_norm(p["ln_2"], u))))


def _mlp_head(p: Mapping[str, Any], x: Array) -> Array:
    return _apply_dense(p["fc2"], jax.nn.gelu(_apply_dense(p["fc1"], x), approximate=False))


# ------------------------------------------------------------------------------------------------ method


@dataclasses.dataclass(frozen=True)
class MAM(pb.Method):
    """MAM settings (see the module docstring; the spec's config keys where it names them).

    Attributes:
      mam_layers: ``"top"`` (one new block on the final hidden states) or ``"all"`` (every decoder layer) (A1).
      mam_masks: ``"r3"``, ``"r1"``, ``"r2"`` or ``"conventional"`` (A2; the last is the MAM(w/o) ablation).
      mu: the gate threshold μ in [0, 1] (A7: 0.2).
      max_length: N_max, the positions W_b and C_b cover (A5); a sequence (with [CLS] slots, or a decode
        cache) longer than this is refused. The spec's N_max = I_pf + 1 + T_max + 1.
      num_visual: I_pf, the visual tokens at the start of the sequence (required).
      num_heads: heads of the top block (the spec: the PLM's head count).
      width: the top block's width; None reads it from the final norm of the base parameters.
      targets: the language model's attention modules (``"all"``: the adapted ones; ``"top"``: where the
        padding mask and positions are read).
      mam_inference: ``"mixed"`` (Eq. 2 at inference) or ``"independent"`` (B_c := 0 when not training) (A3).
      itm, itm_margin: the ITM loss and ε (A17; top placement only).
      mrm, mrm_rate, mrm_pass, mrm_site: the MRM loss, its masking rate (0.15), ``"separate"`` or ``"same"``
        pass (A16), and the Mapping Layer's first projection (whose input rows are the regions).
    """

    mam_layers: str = "top"
    mam_masks: str = "r3"
    mu: float = 0.2
    max_length: int = 64
    num_visual: int | None = None
    num_heads: int = 4
    width: int | None = None
    targets: tuple[str, ...] = (LM_ATTENTION,)
    mam_inference: str = "mixed"
    itm: bool = False
    itm_margin: float = kl.ITM_MARGIN
    mrm: bool = False
    mrm_rate: float = kl.MRM_RATE
    mrm_pass: str = "separate"
    mrm_site: str = MAL_FIRST
    name: str = "mam"

    @property
    def remat_safe(self) -> bool:
        """Whether the hooks work inside rematerialised layers (``model.remat``): ``"top"`` carries the padding
        layout from the layers' attention hook to the ``final_hidden`` hook through Python state, which a
        ``jax.checkpoint`` scope does not allow (the runner refuses the combination)."""
        return self.mam_layers != "top"

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", (self.targets,) if isinstance(self.targets, str) else tuple(self.targets))
        n = self.name
        if self.mam_layers not in PLACEMENTS:
            raise ConfigError(f"{n}.mam_layers={self.mam_layers!r}; valid: {', '.join(PLACEMENTS)}")
        if self.mam_masks not in MASK_PATTERNS:
            raise ConfigError(f"{n}.mam_masks={self.mam_masks!r}; valid: {', '.join(MASK_PATTERNS)}")
        if self.mam_inference not in INFERENCE_MODES:
            raise ConfigError(f"{n}.mam_inference={self.mam_inference!r}; valid: {', '.join(INFERENCE_MODES)}")
        if self.mrm_pass not in MRM_PASSES:
            raise ConfigError(f"{n}.mrm_pass={self.mrm_pass!r}; valid: {', '.join(MRM_PASSES)}")
        if not 0.0 <= float(self.mu) <= 1.0:
            raise ConfigError(f"{n}.mu={self.mu}; the gate threshold must lie in [0, 1] (the spec's 0.2)")
        if self.num_visual is None or int(self.num_visual) < 1:
            raise ConfigError(f"{n}.num_visual={self.num_visual}; give I_pf, the number of visual tokens the VLM "
                              "places before the text (>= 1)")
        if int(self.max_length) <= int(self.num_visual):
            raise ConfigError(f"{n}.max_length={self.max_length} must exceed num_visual={self.num_visual} "
                              "(N_max = I_pf + 1 + T_max + 1)")
        if int(self.num_heads) < 1:
            raise ConfigError(f"{n}.num_heads={self.num_heads}; must be >= 1")
        if self.itm and self.mam_layers != "top":
            raise ConfigError(f"{n}.itm=True needs mam_layers='top': the [CLS] vectors are appended at the MAM "
                              "block's input (spec A17)")
        if self.mrm and int(self.num_visual) < 2:
            raise ConfigError(f"{n}.mrm=True with num_visual={self.num_visual}: MRM asked for with a single visual "
                              "token; it predicts masked regions from the others (seed 000 Eq. 7, 'if |I_pf| > 1')")
        if self.mrm and not 0.0 < float(self.mrm_rate) < 1.0:
            raise ConfigError(f"{n}.mrm_rate={self.mrm_rate}; must lie in (0, 1) (the paper's 0.15)")

    # ---------------------------------------------------------------------------------- parameters

    def _lm_width(self, base_params: pb.Params) -> int:
        if self.width is not None:
            return int(self.width)
        rx = re.compile(FINAL_NORMS)
        for path in pb.module_paths(base_params, "scale"):
            if rx.fullmatch("/".join(path + ("scale",))):
                return int(pb.get_path(base_params, path + ("scale",)).shape[-1])
        raise ConfigError(f"{self.name}: found no language-model final norm (model/norm, transformer/ln_f, "
                          "decoder/final_layer_norm) in the base parameters; set width")

    def adapted_widths(self, base_params: pb.Params) -> dict[tuple[str, ...], int]:
        """``"all"``: the adapted attention module paths and their layer-input width."""
        candidates = attention_modules(base_params)
        return {p: candidates[p] for p in match_paths(candidates, self.targets, self.name, "attention module")}

    def init(self, rng: jax.Array, base_params: pb.Params) -> pb.Params:
        k_block, k_cls, k_mrm, k_all = jax.random.split(rng, 4)
        n = int(self.max_length)
        out: pb.Params = {}
        if self.mam_layers == "top":
            width = self._lm_width(base_params)
            if width % int(self.num_heads):
                raise ConfigError(f"{self.name}: width {width} is not divisible by num_heads={self.num_heads}")
            out["block"] = init_block(k_block, width, n)
            if self.itm:
                out["cls"] = _normal(k_cls, (width,))
        else:
            for i, (path, w) in enumerate(sorted(self.adapted_widths(base_params).items())):
                pb.set_path(out, path, {"gate_weight": _normal(jax.random.fold_in(k_all, i), (w, n)),
                                        "gate_bias": jnp.zeros((n, n), jnp.float32),
                                        "mix": jnp.zeros((), jnp.float32)})
        if self.mrm:
            site = pb.match_targets(base_params, self.mrm_site, method=self.name)[0]
            d_pf = int(pb.get_path(base_params, site + ("kernel",)).shape[0])
            width = self._lm_width(base_params)
            k1, k2 = jax.random.split(k_mrm)
            out["mrm_head"] = {"fc1": _dense(k1, width, width), "fc2": _dense(k2, width, d_pf)}
        return out

    def merge(self, base_params: pb.Params, peft_params: pb.Params) -> pb.Params:
        raise ConfigError(f"{self.name}: MAM is not mergeable (a new block / a second masked softmax and gate); "
                          "keep it active at inference")

    def num_params(self, peft_params: pb.Params) -> int:
        return pb.count(peft_params)

    def extra_passes(self) -> tuple[str, ...]:
        """Extra forward passes the task runs with the side input ``pass_name``: ``("mrm",)`` for MRM on a
        separate region-masked pass (A16), else none."""
        return (MRM_PASS_NAME,) if self.mrm and self.mrm_pass == "separate" else ()

    # -------------------------------------------------------------------------------- decode state

    def init_decode_state(self, peft_params: pb.Params, batch: int, max_len: int) -> dict[str, Array] | None:
        """``"top"``: the block's empty key/value cache for a model cache of ``max_len`` slots (one more slot
        holds the image-[CLS]); pass it as side input ``mam_cache``. ``"all"``: None (the model's cache serves).

        Example:
            >>> m = MAM(num_visual=2, width=8, num_heads=2)
            >>> s = m.init_decode_state(m.init(jax.random.key(0), {}), batch=3, max_len=5)
            >>> s["keys"].shape, int(s["index"])
            ((3, 6, 2, 4), 0)
        """
        if self.mam_layers != "top":
            return None
        width = peft_params["block"]["q_proj"]["kernel"].shape[0]
        h = int(self.num_heads)
        z = jnp.zeros((batch, max_len + 1, h, width // h), jnp.float32)
        return {"keys": z, "values": z, "index": jnp.zeros((), jnp.int32)}

    def read_decode_state(self, records: Mapping[str, Any]) -> dict[str, Array]:
        """The updated ``mam_cache`` from the records of a cached call (``apply_with(..., record=True)``)."""
        return {k: records[f"state/{self.name}/{k}"][-1] for k in ("keys", "values", "index")}

    # ---------------------------------------------------------------------------------------- hooks

    def hooks(self, peft_params: pb.Params, *, rng: jax.Array | None = None, train: bool = False
              ) -> list[hooks.Hook]:
        # What one forward's hooks hand each other while it is traced (fresh for every hooks() call).
        stash: dict[str, Any] = {}
        lm_attention = hooks.path_matcher(self.targets)
        gate_off = (not train) and self.mam_inference == "independent"
        num_visual, n_max, mu = int(self.num_visual), int(self.max_length), float(self.mu)

        def main_pass(ctx: hooks.HookContext) -> bool:
            return ctx.side_input("pass_name") is None

        def mask_regions(ctx: hooks.HookContext, nxt: Any, x: Array, kernel: Array, bias: Any) -> Array:
            pass_name = ctx.side_input("pass_name")
            wanted = MRM_PASS_NAME if self.mrm_pass == "separate" else None
            if not train or pass_name != wanted:
                return nxt(x, kernel, bias)
            if rng is None:
                raise ConfigError(f"{self.name}: MRM masks regions at random in training and needs the method's rng "
                                  "(apply_with(..., rng=...))")
            mask = kl.draw_region_mask(jax.random.fold_in(rng, 0), x.shape[0], x.shape[1], float(self.mrm_rate))
            stash["mrm"] = (x, mask)
            ctx.record("mrm/mask", mask)
            return nxt(jnp.where(mask[..., None], jnp.zeros_like(x), x), kernel, bias)

        def record_mrm(ctx: hooks.HookContext, visual_out: Array) -> None:
            if "mrm" not in stash:
                return
            feats, mask = stash.pop("mrm")
            feats = jax.lax.stop_gradient(feats)  # fixed regression targets (UNITER's are detector features)
            if feats.shape[1] != num_visual:
                raise ConfigError(f"{self.name}: the Mapping Layer input has {feats.shape[1]} regions but "
                                  f"num_visual={num_visual}; MRM needs one visual token per region")
            pred = _mlp_head(peft_params["mrm_head"], visual_out[:, :num_visual].astype(jnp.float32))
            ctx.record("loss/mrm", kl.mrm_loss(pred, feats, mask))

        def read_layout(ctx: hooks.HookContext, nxt: Any, q: Array, k: Array, v: Array, bias: Any) -> Array:
            if ctx.positions is None:
                raise ConfigError(f"{self.name}: attention {ctx.name} passes no positions; MAM needs them")
            stash["layout"] = (key_validity(bias, q.shape[0], k.shape[1]), ctx.positions, ctx.decode)
            return nxt(q, k, v, bias)

        def check_length(tk: int, what: str) -> None:
            if tk > n_max:
                raise ConfigError(f"{self.name}: {what} has {tk} positions but max_length={n_max} (N_max, the gate's "
                                  "size); raise max_length")

        def all_attention(ctx: hooks.HookContext, nxt: Any, q: Array, k: Array, v: Array, bias: Any) -> Array:
            base = nxt(q, k, v, bias)
            p = pb.lookup(peft_params, ctx.path)
            if ctx.positions is None or ctx.inputs is None:
                raise ConfigError(f"{self.name}: attention {ctx.name} passes no positions/inputs; MAM needs them")
            check_length(k.shape[1], f"attention {ctx.name} (keys, or KV-cache slots)")
            k_valid = key_validity(bias, q.shape[0], k.shape[1])
            k_pos, q_pos = positions_of(k_valid), ctx.positions
            q_kind, k_kind = token_kinds(q_pos, num_visual), token_kinds(k_pos, num_visual)
            m_c, m_s = mask_tables(q_kind, q_pos, k_kind, k_pos, k_valid, self.mam_masks)
            m_c = jnp.where((q_kind == VISUAL)[:, :, None], m_s, m_c)  # visual rows never see text (A1 "all")
            gate = None
            if self.mam_masks != "conventional":
                gate = gate_values(ctx.inputs, p["gate_weight"], p["gate_bias"], q_pos, k_pos, mu)
                gate = jnp.zeros_like(gate) if gate_off else gate
            out = mam_attention(q, k, v, m_c, m_s, gate).astype(base.dtype)
            return base + p["mix"].astype(base.dtype) * (out - base)

        def block(xq: Array, kind: Array, pos: Array, k: Array, v: Array, k_kind: Array, k_pos: Array,
                  k_valid: Array) -> Array:
            """The top block on the query rows ``xq`` (types ``kind``, positions ``pos``) against the keys/values
            ``k``/``v`` (all slots, the queries' own included)."""
            p = peft_params["block"]
            xn = _apply_norm(p["ln_1"], xq)
            q = _heads(_apply_dense(p["q_proj"], xn), int(self.num_heads))
            m_c, m_s = mask_tables(kind, pos, k_kind, k_pos, k_valid, self.mam_masks)
            gate = None
            if self.mam_masks != "conventional":
                gate = gate_values(xn, p["gate"]["weight"], p["gate"]["bias"], pos, k_pos, mu)
                gate = jnp.zeros_like(gate) if gate_off else gate
            attn = mam_attention(q, k, v, m_c, m_s, gate)
            u = xq + _apply_dense(p["o_proj"], attn.reshape(xq.shape))
            return _feed_forward(p, u)

        def keys_values(x: Array) -> tuple[Array, Array]:
            p = peft_params["block"]
            xn = _apply_norm(p["ln_1"], x)
            return (_heads(_apply_dense(p["k_proj"], xn), int(self.num_heads)),
                    _heads(_apply_dense(p["v_proj"], xn), int(self.num_heads)))

        cls_shift = 1 if self.itm else 0

        def logical(pos: Array) -> Array:  # the image-[CLS] sits at num_visual: text positions move up by one
            return pos + cls_shift * (pos >= num_visual)

        def top_hidden(ctx: hooks.HookContext, nxt: Any, h: Array) -> Array:
            h = nxt(h)
            if "layout" not in stash:
                raise ConfigError(f"{self.name}: no language-model attention matched targets {list(self.targets)} "
                                  "before the final hidden state; the top block reads the padding mask there")
            valid, positions, decode = stash.pop("layout")
            state = ctx.side_input("mam_cache")
            x = h.astype(jnp.float32)
            b, t, d = x.shape
            if state is not None:
                return top_cached(ctx, x, valid, positions, decode, state).astype(h.dtype)
            if valid.shape[1] != t or decode:
                raise ConfigError(f"{self.name}: mam_layers='top' with a KV cache needs the block's own cache: pass "
                                  "side input 'mam_cache' (MAM.init_decode_state) and read it back with "
                                  "MAM.read_decode_state")
            kind, pos = token_kinds(positions, num_visual), logical(positions)
            slots = [x]
            kinds, poss, valids = [kind], [pos], [valid]
            with_text_cls = self.itm and train and main_pass(ctx)
            if self.itm:
                slots.append(jnp.broadcast_to(peft_params["cls"], (b, 1, d)))
                kinds.append(jnp.full((b, 1), IMAGE_CLS, jnp.int32))
                poss.append(jnp.full((b, 1), num_visual, jnp.int32))
                valids.append(jnp.ones((b, 1), bool))
            if with_text_cls:
                is_text = valid & (kind == TEXT)
                last = jnp.max(jnp.where(is_text, pos, num_visual), axis=1, keepdims=True)
                slots.append(jnp.broadcast_to(peft_params["cls"], (b, 1, d)))
                kinds.append(jnp.full((b, 1), TEXT_CLS, jnp.int32))
                poss.append(last + 1)
                valids.append(is_text.any(axis=1, keepdims=True))
            xa = jnp.concatenate(slots, axis=1)
            kind_a, pos_a, valid_a = (jnp.concatenate(a, axis=1) for a in (kinds, poss, valids))
            check_length(xa.shape[1], "the top block's sequence ([CLS] slots included)")
            k, v = keys_values(xa)
            out = block(xa, kind_a, pos_a, k, v, kind_a, pos_a, valid_a)
            if with_text_cls:
                ctx.record("loss/itm", kl.itm_loss(out[:, t], out[:, t + 1], ctx.side_input("image_ids"),
                                                   float(self.itm_margin)))
            if self.mrm:
                record_mrm(ctx, out)
            return out[:, :t].astype(h.dtype)

        def top_cached(ctx: hooks.HookContext, x: Array, valid: Array, positions: Array, decode: bool,
                       state: Mapping[str, Array]) -> Array:
            b, t, d = x.shape
            slots = state["keys"].shape[1] - 1  # the model cache's slots; the last one is the image-[CLS]'s
            if valid.shape[1] != slots:
                raise ConfigError(f"{self.name}: mam_cache has {slots} + 1 slots but the model's KV cache has "
                                  f"{valid.shape[1]}; create it with MAM.init_decode_state(..., "
                                  f"max_len={valid.shape[1]})")
            check_length(slots + cls_shift, "the KV cache (with the image-[CLS] slot)")
            k_new, v_new = keys_values(x)
            index = state["index"]
            keys = jax.lax.dynamic_update_slice(state["keys"], k_new.astype(state["keys"].dtype), (0, index, 0, 0))
            values = jax.lax.dynamic_update_slice(state["values"], v_new.astype(state["values"].dtype),
                                                  (0, index, 0, 0))
            if self.itm and not decode:  # the prefill writes the image-[CLS] once
                k_cls, v_cls = keys_values(jnp.broadcast_to(peft_params["cls"], (b, 1, d)))
                keys = keys.at[:, slots].set(k_cls[:, 0].astype(keys.dtype))
                values = values.at[:, slots].set(v_cls[:, 0].astype(values.dtype))
            model_pos = positions_of(valid)
            k_kind = jnp.concatenate([token_kinds(model_pos, num_visual), jnp.full((b, 1), IMAGE_CLS, jnp.int32)], 1)
            k_pos = jnp.concatenate([logical(model_pos), jnp.full((b, 1), num_visual, jnp.int32)], 1)
            k_valid = jnp.concatenate([valid, jnp.full((b, 1), bool(self.itm))], 1)
            out = block(x, token_kinds(positions, num_visual), logical(positions), keys, values, k_kind, k_pos,
                        k_valid)
            for name, value in (("keys", keys), ("values", values), ("index", index + t)):
                ctx.record(f"state/{self.name}/{name}", value)
            return out

        def all_hidden(ctx: hooks.HookContext, nxt: Any, h: Array) -> Array:
            h = nxt(h)
            record_mrm(ctx, h)
            return h

        out: list[hooks.Hook] = []
        if self.mrm:
            out.append(hooks.Hook("linear", mask_regions, where=hooks.path_matcher(self.mrm_site)))
        if self.mam_layers == "top":
            out += [hooks.Hook("attention", read_layout, where=lm_attention), hooks.Hook("final_hidden", top_hidden)]
        else:
            out.append(hooks.Hook("attention", all_attention, where=pb.adapted_where(peft_params, "gate_weight")))
            if self.mrm:
                out.append(hooks.Hook("final_hidden", all_hidden))
        return out


# ------------------------------------------------------------------------------- decoding with the top block


@dataclasses.dataclass(frozen=True)
class DecodeStateApply:
    """A decoding step function (:mod:`vlpeft_jax.eval.decode`'s ``StepFn``) over params ``{"base", "peft"}`` that
    carries the MAM top block's own key/value cache beside the model's: the cache is ``(model cache, state)``.

    It is ``tasks.base.PeftApply`` plus this: on a cached call it passes the state as side input ``mam_cache``
    (created on the prefill by :meth:`MAM.init_decode_state`) and takes the updated one from the records
    (:meth:`MAM.read_decode_state`). Without a top-placed MAM the state stays None and nothing is recorded.
    Decoders and decoder VLMs (ids, embeddings or a dict of keyword arguments, as ``ModuleApply``); not
    encoder-decoders. Every leaf of the state has the batch axis first (the write index is a scalar), so beam
    search's row repeat and gather need nothing special.

    Attributes:
      module: the Flax module.
      methods: ``(instance name, method)`` pairs; a method's parameters are ``params["peft"][name]``.

    Example:
        >>> step = DecodeStateApply(module=None, methods=(("mam", MAM(num_visual=2, width=8, num_heads=2)),))
        >>> [n for n, _ in step.stateful()]
        ['mam']
    """

    module: Any
    methods: tuple[tuple[str, Any], ...] = ()

    def stateful(self) -> list[tuple[str, MAM]]:
        """The methods that keep a decode state (MAM with ``mam_layers="top"``)."""
        return [(n, m) for n, m in self.methods if isinstance(m, MAM) and m.mam_layers == "top"]

    def __call__(self, params: Any, inputs: Any, attention_mask: Array, cache: Any, decode: bool) -> Any:
        active = [(m, params["peft"][n]) for n, m in self.methods]
        if cache is None:  # a full forward (e.g. generate's shape inference)
            return pb.apply_with(self._apply, active, params["base"], inputs, attention_mask, None, decode)
        model_cache, state = cache
        stateful = self.stateful()
        if not stateful:
            out = pb.apply_with(self._apply, active, params["base"], inputs, attention_mask, model_cache, decode)
            return out.replace(cache=(out.cache, None))
        if len(stateful) > 1:
            raise ConfigError(f"{len(stateful)} top-placed MAM methods ({', '.join(n for n, _ in stateful)}) are "
                              "active; one top block at a time can decode with a cache")
        name, mam = stateful[0]
        if state is None:
            state = mam.init_decode_state(params["peft"][name], model_cache.mask.shape[0], model_cache.max_len)
        out, records = pb.apply_with(self._apply, active, params["base"], inputs, attention_mask, model_cache, decode,
                                     side_inputs={"mam_cache": state}, record=True)
        return out.replace(cache=(out.cache, mam.read_decode_state(records)))

    def _apply(self, base: Any, inputs: Any, attention_mask: Array, cache: Any, decode: bool, **kw: Any) -> Any:
        variables = {"params": base}
        if isinstance(inputs, dict):
            return self.module.apply(variables, attention_mask=attention_mask, cache=cache, decode=decode, **inputs,
                                     **kw)
        if jnp.issubdtype(inputs.dtype, jnp.integer):
            return self.module.apply(variables, inputs, attention_mask, cache=cache, decode=decode, **kw)
        return self.module.apply(variables, None, attention_mask, inputs_embeds=inputs, cache=cache, decode=decode,
                                 **kw)

    def init_cache(self, batch: int, max_len: int) -> tuple[Any, None]:
        """``(the module's, or its language model's, empty KV cache, None)``; the prefill creates the state."""
        for owner in (self.module, getattr(self.module, "language_model", None)):
            if owner is not None and hasattr(owner, "init_cache"):
                return owner.init_cache(batch, max_len), None
        raise ConfigError(f"{type(self.module).__name__} has no init_cache (nor a language_model with one)")
