"""PETAL (seed ``001_e6226210b77e0466.txt``): Dynamic Mode Approximation on the Q-Former, Adaptive Instruction
Mixture-of-Experts, and the Score-based Information Bottleneck loss, on an InstructBLIP-style model.

Three parts, each optional, all through hook points (``models/`` knows nothing of PETAL):

**DMA** (Sec. 3.2, Eq. 2; App. E Eq. 10). On every adapted Q-Former projection ``n`` (q, k, v of the 12
self-attention and 6 cross-attention layers: 54 matrices on InstructBLIP; spec ``../shared/specs/petal.md``
§2.2, choice A1), with frozen kernel ``W0_n`` and bias ``b0_n``, token ``t`` of modality ``m(t)``::

    h_t = Γ_n · (x_t W0_n) + b0_n + dropout_0.1(x_t U_g) · C_n^{m(t)} · V_g

    core="full" (default): C_n^m[a, b] = Σ_c P_g[a, b, c] · λ^m_c · p_{n,c}     (App. E's R×R×R core)
    core="cp"   (Eq. 2):   C_n^m = diag(λ^m ⊙ p_n)

applied in activation space as three thin products ``[b,t,d]·[d,R] → ·[R,R] → ·[R,H_t]`` (the update
``U C V`` is never a dense matrix while training). Factor groups ``g`` follow the input stream (A3): ``txt``
(inputs of width ``H_t``: self-attention q, k, v and cross-attention q) and ``img`` (cross-attention k, v,
whose inputs are the image features). ``V_g`` starts at zero and ``Γ`` at one, so the model starts as the
frozen one. Modalities (A5): learned query tokens and image features are ``vis``, instruction tokens (Q-Former
positions from ``num_query_tokens`` on) are ``txt``; one ``λ^m`` per modality. ``core="full"`` with the
super-diagonal core ``P[a,b,c] = δ_abc`` is exactly ``core="cp"``. ``gamma=False`` freezes Γ at 1 (ablation
V4, A27: it is then not a parameter at all); ``per_modality=False`` uses no λ (λ ≡ 1, as the authors' code).

**AIM** (Sec. 3.3, Eq. 3-4; App. E). Over the instruction states after the Q-Former's embedding LayerNorm
(the ``embed`` hook at ``<qformer>/embeddings/instructions``; the query tokens are not mixed, A10), ``K``
experts ``y_k`` and the gate ``g_k = softmax_k G(x, y_k)``; ``I_in = Σ_k g_k y_k`` replaces the instruction
states. ``expert="bottleneck"`` (default, A11): ``y_k = x + gelu(x A_k) B_k`` with ``A_k: H_t→M``, ``B_k = 0``
at init (App. E counts exactly ``K·2·H_t·M``); ``expert="film"``: Eq. 3 literally, ``y_k = γ_k ⊙ x + β_k``;
``expert="code"``: the authors' released experts (``Linear(H_t,M) → Linear(M,H_t)`` with biases, no
nonlinearity, uniform mean, output ``0.6·x + 0.4·mean_k E_k(x)``; our hook applies it to the instruction
tokens only, where their code also mixes the query tokens). The gate (A12) is additive attention on the
masked means ``G = v·tanh(x̄ W_x + ȳ_k W_y + b)`` with ``v = 0`` (uniform at init); ``gate=False`` averages
uniformly. ``aim="random"`` (Table 4's "random instruction", A28) replaces the instruction states by a
learnable ``L×H_t`` matrix (its own mask of ones); ``aim="none"`` leaves them (ablations V1, V3).

**SIB** (Sec. 3.4, Eq. 5-9; §4.2 of the sheet). With ``ib_weight > 0`` the method records two loss terms
during training: ``loss/ib`` = ``λ_IB · -(Î(Z;Y) - η Î(X;Z))`` (the model side: Eq. 6 maximised, the critic's
parameters stopped) and ``loss/ib_critic`` = ``-Î(X;Z)`` on stopped inputs (the MINE critic maximising its own
bound), from ``Z`` = score-pooled Q-Former query outputs (Eq. 5, read at the ``language_projection`` input),
``X`` = the mean image feature (read at the first cross-attention key projection's input) and ``Y`` = the bag
of words of the side input ``target_ids`` (:mod:`vlpeft_jax.peft.petal_ib`). The estimators live under
``sib`` in the method's parameters: training-only (``PETAL.auxiliary_keys`` keeps them out of the
trainable counts; give them their own optimizer group, ``configs/shapes_petal.py`` does: 10× lr, no decay,
A20). ``ib_weight="learnable"`` is the authors' compiled variant: a trainable weight ``ρ`` (init 0) and the
term ``ρ · (Î_ZY - η Î_XZ)``.

Where the paper and the authors' code disagree (sheet §8): the released code has no λ, no Γ, no gate (uniform
mean of 6 bias-ful linear experts mixed 0.6/0.4 into all Q-Former tokens), per-layer scale/shift terms and an
"All_Context" batch-mean hack (not implemented here: they couple examples of a batch), and no IB loss in its
source (its compiled-only files add one with a learnable weight). This module follows the paper, with the
sheet's choices where the paper is silent, and keeps the code's forms as options.

Example:
    >>> import jax, jax.numpy as jnp
    >>> petal = PETAL(rank=4, num_experts=2, expert_width=4, gate_width=4, num_query_tokens=2, ib_weight=0.0)
    >>> petal.rank, petal.core, petal.aim
    (4, 'full', 'experts')
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from vlpeft_jax.errors import ConfigError, InputError
from vlpeft_jax.models import hooks
from vlpeft_jax.models.bert import INSTRUCTIONS_HOOK
from vlpeft_jax.peft import base as pb
from vlpeft_jax.peft import petal_ib

CORES = ("full", "cp")
AIMS = ("experts", "none", "random")
EXPERTS = ("bottleneck", "film", "code")
MODALITIES = ("vis", "txt")
DEFAULT_TARGETS = (r"qformer/.*attention/attention/(query|key|value)",)
CODE_MIX = (0.6, 0.4)  # the released code's ``0.6·emb + 0.4·mean_k E_k(emb)``


def _normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
    return std * jax.random.normal(key, shape, jnp.float32)


def _key(rng: jax.Array, name: str) -> jax.Array:
    return jax.random.fold_in(rng, zlib.crc32(name.encode()))


@dataclasses.dataclass(frozen=True)
class PETAL(pb.Method):
    """PETAL settings (see the module docstring; spec choices in brackets).

    Attributes:
      targets: Q-Former projections DMA adapts (patterns as LoRA's); each must be a ``query``/``key``/``value``
        under ``qformer_root`` (A1: q, k, v of self- and cross-attention).
      rank: R (64 in the paper).
      core: ``full`` (App. E's R×R×R core per factor group, default) or ``cp`` (Eq. 2's diagonal).
      dma_dropout: dropout on ``x U`` while training (0.1, the authors' code).
      gamma: learnable Γ per matrix (False: Γ ≡ 1, ablation V4).
      per_modality: a λ per modality (False: λ ≡ 1, the authors' code).
      dma: False turns DMA off (the method is then AIM and/or SIB only).
      num_query_tokens: the Q-Former's query count (positions before it are ``vis``); None reads it from the
        Q-Former's config at run time.
      aim: ``experts`` (AIM), ``none`` (V1/V3) or ``random`` (a learnable instruction matrix).
      num_experts: K (3). expert: ``bottleneck``, ``film`` or ``code``. expert_width: M (64).
      gate: the learned gate of Eq. 4 (False: uniform mean, as the code). gate_width: d_g (64).
      random_instruction_length: rows of the ``aim="random"`` matrix.
      ib_weight: λ_IB (0.05; 0 turns SIB off: V2/V3) or ``"learnable"`` (the code's ``para_info``).
      ib_eta: η of Eq. 6 (0.1, the code's β). zy_estimator: ``gaussian`` or ``club_sample``.
      ib_pool: ``score`` (Eq. 5) or ``mean`` (the code). zy_hidden, xz_hidden: estimator widths (32, 64).
      qformer_root: the Q-Former's path in the model. projection: the path whose linear input is the Q-Former's
        query output (Z of the IB loss).
    """

    targets: tuple[str, ...] = DEFAULT_TARGETS
    rank: int = 64
    core: str = "full"
    dma_dropout: float = 0.1
    gamma: bool = True
    per_modality: bool = True
    dma: bool = True
    num_query_tokens: int | None = None
    aim: str = "experts"
    num_experts: int = 3
    expert: str = "bottleneck"
    expert_width: int = 64
    gate: bool = True
    gate_width: int = 64
    random_instruction_length: int = 16
    ib_weight: float | str = 0.05
    ib_eta: float = petal_ib.ETA
    zy_estimator: str = "gaussian"
    ib_pool: str = "score"
    zy_hidden: int = 32
    xz_hidden: int = 64
    qformer_root: str = "qformer"
    projection: str = "language_projection"
    name: str = "petal"

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", (self.targets,) if isinstance(self.targets, str) else tuple(self.targets))
        w = self.name
        for key in ("rank", "num_experts", "expert_width", "gate_width", "random_instruction_length", "zy_hidden",
                    "xz_hidden"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{w}.{key}={v!r}; must be a positive integer")
        for key, valid in (("core", CORES), ("aim", AIMS), ("expert", EXPERTS),
                           ("zy_estimator", petal_ib.ZY_ESTIMATORS), ("ib_pool", petal_ib.POOL_MODES)):
            if getattr(self, key) not in valid:
                raise ConfigError(f"{w}.{key}={getattr(self, key)!r}; valid: {', '.join(valid)}")
        if not 0.0 <= self.dma_dropout < 1.0:
            raise ConfigError(f"{w}.dma_dropout={self.dma_dropout!r}; must be in [0, 1)")
        if self.ib_weight != "learnable" and (isinstance(self.ib_weight, (str, bool)) or not self.ib_weight >= 0):
            raise ConfigError(f"{w}.ib_weight={self.ib_weight!r}; must be a number >= 0 or 'learnable'")
        if self.num_query_tokens is not None and (not isinstance(self.num_query_tokens, int)
                                                  or self.num_query_tokens <= 0):
            raise ConfigError(f"{w}.num_query_tokens={self.num_query_tokens!r}; must be a positive integer or None")
        if not (self.dma or self.aim != "none" or self.uses_ib):
            raise ConfigError(f"{w}: dma=False, aim='none' and ib_weight=0 leave nothing to train")

    @property
    def uses_ib(self) -> bool:
        return self.ib_weight == "learnable" or float(self.ib_weight) > 0

    # ------------------------------------------------------------------------------------------ init

    def _targets(self, base_params: pb.Params) -> list[tuple[str, ...]]:
        paths = pb.match_targets(base_params, self.targets, method=self.name)
        root = tuple(self.qformer_root.split("/"))
        for path in paths:
            if path[:len(root)] != root or path[-1] not in ("query", "key", "value") or "attention" not in path[-2]:
                raise ConfigError(f"{self.name}.targets: {'/'.join(path)} is not a Q-Former attention projection; "
                                  f"DMA adapts query/key/value under {self.qformer_root!r}/.../(attention|"
                                  f"crossattention)/attention (seed 001 Fig. 2)")
        return paths

    @staticmethod
    def group_of(path: tuple[str, ...]) -> str:
        """The factor group of a projection: ``img`` for cross-attention keys/values, else ``txt`` (A3)."""
        return "img" if "crossattention" in path and path[-1] in ("key", "value") else "txt"

    def init(self, rng: jax.Array, base_params: pb.Params) -> pb.Params:
        out: pb.Params = {}
        root = tuple(self.qformer_root.split("/"))
        qformer = pb.get_path(base_params, root)
        hidden = qformer["query_tokens"].shape[-1]
        if self.num_query_tokens is not None and qformer["query_tokens"].shape[1] != self.num_query_tokens:
            raise ConfigError(f"{self.name}.num_query_tokens={self.num_query_tokens} but the Q-Former has "
                              f"{qformer['query_tokens'].shape[1]} query tokens")
        r = self.rank
        if self.dma:
            widths: dict[str, int] = {}
            for path in self._targets(base_params):
                kernel = pb.get_path(base_params, path + ("kernel",))
                g = self.group_of(path)
                if widths.setdefault(g, kernel.shape[0]) != kernel.shape[0] or kernel.shape[1] != hidden:
                    raise ConfigError(f"{self.name}: {'/'.join(path)} has kernel {tuple(kernel.shape)}; the {g!r} "
                                      f"factor group expects [{widths[g]}, {hidden}]")
                module: pb.Params = {"mode": _normal(_key(rng, "/".join(path)), (r,), math.sqrt(2.0 / (r + 1)))}
                if self.gamma:
                    module["gamma"] = jnp.ones((), jnp.float32)
                pb.set_path(out, path, module)
            groups = {}
            for g, d_in in widths.items():
                f = {"U": _normal(_key(rng, f"U_{g}"), (d_in, r), 1.0 / math.sqrt(3.0 * d_in)),
                     "V": jnp.zeros((r, hidden), jnp.float32)}
                if self.core == "full":
                    f["P"] = _normal(_key(rng, f"P_{g}"), (r, r, r), 1.0 / r)
                groups[g] = f
            dma: pb.Params = {"groups": groups}
            if self.per_modality:
                dma["lambda"] = 1.0 + _normal(_key(rng, "lambda"), (len(MODALITIES), r), 0.02)
            out["dma"] = dma
        if self.aim == "experts":
            out["aim"] = self._init_aim(_key(rng, "aim"), hidden)
        elif self.aim == "random":
            out["aim"] = {"instruction": _normal(_key(rng, "random"), (self.random_instruction_length, hidden), 0.02)}
        if self.uses_ib:
            out["sib"] = self._init_sib(_key(rng, "sib"), base_params, hidden)
        return out

    def _init_aim(self, rng: jax.Array, hidden: int) -> pb.Params:
        k, m = self.num_experts, self.expert_width
        keys = jax.random.split(rng, 6)
        if self.expert == "bottleneck":
            experts = {"A": _normal(keys[0], (k, hidden, m), 0.02), "B": jnp.zeros((k, m, hidden), jnp.float32)}
        elif self.expert == "film":
            experts = {"scale": 1.0 + _normal(keys[0], (k, hidden), 2e-4), "shift": _normal(keys[1], (k, hidden), 2e-4)}
        else:  # the released code: Linear(H,M) -> Linear(M,H), biases, BERT init N(0, 0.02)
            experts = {"A": _normal(keys[0], (k, hidden, m), 0.02), "a_bias": jnp.zeros((k, m), jnp.float32),
                       "B": _normal(keys[1], (k, m, hidden), 0.02), "b_bias": jnp.zeros((k, hidden), jnp.float32)}
        out: pb.Params = {"experts": experts}
        if self.gate and self.expert != "code":
            d = self.gate_width
            out["gate"] = {"W_x": _normal(keys[2], (hidden, d), 0.02), "W_y": _normal(keys[3], (hidden, d), 0.02),
                           "bias": jnp.zeros((d,), jnp.float32), "v": jnp.zeros((d,), jnp.float32)}
        return out

    def _init_sib(self, rng: jax.Array, base_params: pb.Params, hidden: int) -> pb.Params:
        image_width = self._image_width(base_params)
        vocab = lm_vocab_size(base_params)
        est = petal_ib.init_estimators(rng, hidden, image_width, vocab, self.zy_hidden, self.xz_hidden)
        if self.ib_weight == "learnable":
            est["weight"] = jnp.zeros((), jnp.float32)
        return est

    def _image_width(self, base_params: pb.Params) -> int:
        root = tuple(self.qformer_root.split("/"))
        keys = [p for p in pb.module_paths(pb.get_path(base_params, root), "kernel", root)
                if "crossattention" in p and p[-1] == "key"]
        if not keys:
            raise ConfigError(f"{self.name}: the IB loss reads the image features at a cross-attention key "
                              f"projection, and {self.qformer_root!r} has none")
        return int(pb.get_path(base_params, keys[0] + ("kernel",)).shape[0])

    # ------------------------------------------------------------------------------------------ DMA

    def cores(self, p: pb.Params, module: Mapping[str, jax.Array], group: str) -> jax.Array:
        """``C_n^m`` for both modalities, ``[2, R, R]`` (``core="full"``) or the diagonals ``[2, R]`` (``cp``)."""
        lam = p["dma"]["lambda"] if self.per_modality else jnp.ones((len(MODALITIES), self.rank), jnp.float32)
        vec = lam * module["mode"][None]  # λ^m ⊙ p_n
        if self.core == "cp":
            return vec
        return jnp.einsum("abc,mc->mab", p["dma"]["groups"][group]["P"], vec)

    def delta(self, p: pb.Params, path: tuple[str, ...], modality: str) -> jax.Array:
        """The dense update ``U_g C_n^m V_g`` of one matrix for one modality (for merging and tests)."""
        group = self.group_of(path)
        f = p["dma"]["groups"][group]
        c = self.cores(p, pb.get_path(p, path), group)[MODALITIES.index(modality)]
        c = jnp.diag(c) if self.core == "cp" else c
        return f["U"] @ c @ f["V"]

    @staticmethod
    def query_count(ctx: hooks.HookContext, fallback: int | None) -> int:
        """The Q-Former's query-token count, from the calling module's config (or ``fallback``)."""
        if fallback is not None:
            return fallback
        module = ctx.module
        while module is not None:
            cfg = getattr(module, "config", None)
            n = getattr(cfg, "num_query_tokens", None)
            if isinstance(n, int) and n > 0:
                return n
            module = getattr(module, "parent", None)
        raise ConfigError(f"PETAL at {ctx.name}: cannot tell the query tokens from the instruction tokens; set "
                          "peft.<petal>.num_query_tokens")

    def _dma_hook(self, p: pb.Params, rng: jax.Array | None, train: bool) -> hooks.Hook:
        use_dropout = train and self.dma_dropout > 0.0 and rng is not None

        def dma_linear(ctx: hooks.HookContext, nxt: Any, x: jax.Array, kernel: jax.Array, bias: Any) -> jax.Array:
            module = pb.lookup(p, ctx.path)
            base = nxt(x, kernel, None)
            if self.gamma:
                base = base * module["gamma"].astype(base.dtype)
            if bias is not None:
                base = base + bias.astype(base.dtype)
            group = self.group_of(ctx.path)
            f = p["dma"]["groups"][group]
            h = x.astype(jnp.float32)
            if use_dropout:
                keep = jax.random.bernoulli(_key(rng, ctx.name), 1.0 - self.dma_dropout, h.shape)
                h = jnp.where(keep, h / (1.0 - self.dma_dropout), 0.0)
            u = h @ f["U"]  # [b, t, R]
            c = self.cores(p, module, group)
            apply = (lambda c_m: u * c_m) if self.core == "cp" else (lambda c_m: u @ c_m)
            uc = apply(c[0])
            n_query = None if "crossattention" in ctx.path else self.query_count(ctx, self.num_query_tokens)
            if n_query is not None and x.shape[1] > n_query:
                # self-attention over [queries; instruction]: instruction positions use λ^txt (A5)
                is_txt = jnp.arange(x.shape[1]) >= n_query
                uc = jnp.where(is_txt[None, :, None], apply(c[1]), uc)
            return base + (uc @ f["V"]).astype(base.dtype)

        return hooks.Hook("linear", dma_linear, where=pb.adapted_where(p, "mode"))

    # ------------------------------------------------------------------------------------------ AIM

    def mix_instructions(self, p: pb.Params, x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """AIM on instruction states ``x`` ``[b, t, H]`` (mask ``[b, t]`` or None): ``(I_in, gate [b, K])``."""
        e = p["aim"]["experts"]
        x = x.astype(jnp.float32)
        m = jnp.ones(x.shape[:2], jnp.float32) if mask is None else mask.astype(jnp.float32)
        if self.expert == "code":
            ys = jnp.einsum("kbtm,kmh->kbth", jnp.einsum("bth,khm->kbtm", x, e["A"]) + e["a_bias"][:, None, None],
                            e["B"]) + e["b_bias"][:, None, None]
            gate = jnp.full((x.shape[0], self.num_experts), 1.0 / self.num_experts)
            return CODE_MIX[0] * x + CODE_MIX[1] * jnp.mean(ys, axis=0), gate
        if self.expert == "bottleneck":
            ys = x[None] + jnp.einsum("kbtm,kmh->kbth", jax.nn.gelu(jnp.einsum("bth,khm->kbtm", x, e["A"]),
                                                                    approximate=False), e["B"])
        else:  # Eq. 3: y_k = γ_k ⊙ x + β_k
            ys = x[None] * e["scale"][:, None, None] + e["shift"][:, None, None]
        if self.gate:
            g = p["aim"]["gate"]
            denom = jnp.maximum(m.sum(1, keepdims=True), 1.0)
            x_bar = (x * m[..., None]).sum(1) / denom  # [b, H]
            y_bar = (ys * m[None, ..., None]).sum(2) / denom[None]  # [K, b, H]
            scores = jnp.tanh(x_bar @ g["W_x"] + y_bar @ g["W_y"] + g["bias"]) @ g["v"]  # [K, b]
            gate = jax.nn.softmax(scores.T, axis=-1)  # [b, K], Eq. 4
        else:
            gate = jnp.full((x.shape[0], self.num_experts), 1.0 / self.num_experts)
        return jnp.einsum("bk,kbth->bth", gate, ys), gate

    def _aim_hook(self, p: pb.Params, state: dict[str, Any]) -> hooks.Hook:
        def aim_embed(ctx: hooks.HookContext, nxt: Any, ids: jax.Array, x: jax.Array, mask: Any) -> Any:
            x, mask = nxt(ids, x, mask)
            state["instructions"] = True
            if self.aim == "random":
                inst = p["aim"]["instruction"]
                b = x.shape[0]
                return (jnp.broadcast_to(inst[None], (b, *inst.shape)).astype(x.dtype),
                        jnp.ones((b, inst.shape[0]), jnp.int32 if mask is None else mask.dtype))
            mixed, gate = self.mix_instructions(p, x, mask)
            ctx.record("petal/gate", gate)
            return mixed.astype(x.dtype), mask

        return hooks.Hook("embed", aim_embed, where=lambda path: bool(path) and path[-1] == INSTRUCTIONS_HOOK
                          and "/".join(path[:-2]) == self.qformer_root)

    # ------------------------------------------------------------------------------------------ SIB

    def _sib_hooks(self, p: pb.Params, rng: jax.Array | None, train: bool, state: dict[str, Any]
                   ) -> list[hooks.Hook]:
        root = tuple(self.qformer_root.split("/"))

        def image_features(ctx: hooks.HookContext, nxt: Any, x: jax.Array, kernel: jax.Array, bias: Any) -> Any:
            state.setdefault("x_bar", jnp.mean(x.astype(jnp.float32), axis=1))  # X of Eq. 8: the first layer's
            return nxt(x, kernel, bias)

        def query_outputs(ctx: hooks.HookContext, nxt: Any, h: jax.Array, kernel: jax.Array, bias: Any) -> Any:
            if self.aim != "none" and not state.get("instructions"):
                raise InputError(f"{self.name}: aim={self.aim!r} mixes the Q-Former's instruction tokens, but this "
                                 "batch has none (qformer_input_ids); feed the instructions (model.qformer_text) or "
                                 "set aim='none'")
            if train and self.uses_ib:
                targets = ctx.side_input("target_ids")
                if targets is None:
                    raise InputError(f"{self.name}: the IB loss needs the side input target_ids (the LM targets)")
                if "x_bar" not in state:
                    raise InputError(f"{self.name}: the IB loss found no image features (no cross-attention key "
                                     f"projection under {self.qformer_root!r} ran)")
                z, _ = petal_ib.score_pool(h.astype(jnp.float32), self.ib_pool)
                y = petal_ib.bag_of_words(targets, p["sib"]["zy"]["mu2"]["kernel"].shape[-1])
                key = jax.random.key(0) if rng is None else _key(rng, "sib")
                terms = petal_ib.ib_terms(p["sib"], state["x_bar"], z, y, key, eta=self.ib_eta,
                                          zy_estimator=self.zy_estimator)
                if self.ib_weight == "learnable":  # the code: + ρ (I_zy - β I_xz), ρ learnable from 0
                    model_term = -p["sib"]["weight"] * terms["model"]
                else:
                    model_term = float(self.ib_weight) * terms["model"]
                ctx.record("loss/ib", model_term)
                ctx.record("loss/ib_critic", terms["critic"])
            return nxt(h, kernel, bias)

        out = [hooks.Hook("linear", query_outputs, where=lambda path: "/".join(path) == self.projection)]
        if self.uses_ib:
            out.append(hooks.Hook("linear", image_features, where=lambda path: path[:len(root)] == root
                                  and "crossattention" in path and path[-1] == "key"))
        return out

    # ------------------------------------------------------------------------------------------ protocol

    def hooks(self, peft_params: pb.Params, *, rng: jax.Array | None = None, train: bool = False
              ) -> list[hooks.Hook]:
        state: dict[str, Any] = {}  # per trace: what the AIM / image hooks saw, for the projection hook
        out = []
        if self.dma:
            out.append(self._dma_hook(peft_params, rng, train))
        if self.aim != "none":
            out.append(self._aim_hook(peft_params, state))
        out.extend(self._sib_hooks(peft_params, rng, train, state))
        return out

    def merge(self, base_params: pb.Params, peft_params: pb.Params) -> pb.Params:
        """DMA folded into the Q-Former kernels: ``Γ_n W0_n + U_g C_n^m V_g``.

        Raises :class:`ConfigError` where that is not a weight change: AIM (a gated, input-dependent mixture of
        the instruction states) or a random instruction matrix is present, or a self-attention matrix sees both
        modalities with different λ (use :meth:`merge_dma` with ``modality=`` for single-modality inputs).
        """
        if "aim" in peft_params:
            raise ConfigError(f"{self.name}: AIM (aim={self.aim!r}) changes the instruction states, which no base "
                              "weight can express; merge_dma(base, peft, modality) folds the DMA part only")
        return self.merge_dma(base_params, peft_params)

    def merge_dma(self, base_params: pb.Params, peft_params: pb.Params, modality: str | None = None) -> pb.Params:
        """Base parameters with DMA folded in. ``modality`` (``vis``/``txt``) chooses λ^m for matrices whose
        inputs mix both (the self-attention q, k, v: exact for inputs of that modality only, e.g. a Q-Former run
        without instruction text for ``vis``); None requires λ^vis = λ^txt there (or ``per_modality=False``)."""
        if modality is not None and modality not in MODALITIES:
            raise ConfigError(f"modality={modality!r}; valid: {', '.join(MODALITIES)} or None")
        merged = pb.copy_tree(base_params)
        for path in pb.module_paths(peft_params, "mode"):
            single = "crossattention" in path  # cross-attention: queries and image features, all ``vis``
            m = "vis" if single else modality
            if m is None:
                if self.per_modality and not jnp.array_equal(self.delta(peft_params, path, "vis"),
                                                             self.delta(peft_params, path, "txt")):
                    raise ConfigError(f"{self.name}: {'/'.join(path)} sees query (vis) and instruction (txt) tokens "
                                      "with different λ, so no single weight reproduces it; pass modality='vis' "
                                      "or 'txt' to merge for inputs of one modality")
                m = "vis"
            k = pb.get_path(base_params, path + ("kernel",))
            gamma = pb.get_path(peft_params, path).get("gamma", 1.0)
            pb.set_path(merged, path + ("kernel",), (gamma * k + self.delta(peft_params, path, m)).astype(k.dtype))
        return merged

    def num_params(self, peft_params: pb.Params) -> int:
        """The adapter's parameters (the training-only IB estimators excluded)."""
        return pb.count({k: v for k, v in peft_params.items() if k != "sib"})

    def auxiliary_keys(self) -> tuple[str, ...]:
        """The IB estimators (``sib``) train but are not part of the adapter."""
        return ("sib",)

    def param_breakdown(self, peft_params: pb.Params) -> dict[str, int]:
        """Counts by part, with App. E's comparable subset (seed 001 Eq. 10 + the experts): U, V and the cores of
        the factor groups plus the expert matrices (biases, λ, p, Γ and the gate are not in App. E's count)."""
        dma = peft_params.get("dma", {})
        factors = pb.count(dma.get("groups", {}))
        experts = peft_params.get("aim", {}).get("experts", {})
        expert_mats = pb.count({k: v for k, v in experts.items() if k in ("A", "B")})
        modes = pb.count({k: v for k, v in peft_params.items() if k not in ("dma", "aim", "sib")})
        return {"App. E subset (U, V, P + expert matrices)": factors + expert_mats,
                "DMA factors U, V, P": factors,
                "per-matrix p_n and Γ_n": modes,
                "λ per modality": pb.count(dma.get("lambda", {})),
                "experts": pb.count(experts),
                "gate / random instruction": pb.count({k: v for k, v in peft_params.get("aim", {}).items()
                                                       if k != "experts"}),
                "PETAL total (adapter)": self.num_params(peft_params),
                "IB estimators (training-only)": pb.count(peft_params.get("sib", {}))}


def lm_vocab_size(base_params: pb.Params) -> int:
    """The language model's output vocabulary: ``lm_head`` width, else the tied input embedding's rows."""
    lm = base_params.get("language_model", base_params)
    heads = pb.module_paths(lm, "kernel")
    for path in heads:
        if path[-1] == "lm_head":
            return int(pb.get_path(lm, path + ("kernel",)).shape[-1])
    for path in pb.module_paths(lm, "embedding"):
        if path[-1] in ("embed_tokens", "wte", "shared", "word_embeddings"):
            return int(pb.get_path(lm, path + ("embedding",)).shape[0])
    raise ConfigError("PETAL's IB loss needs the language model's vocabulary size (an lm_head or token embedding "
                      "under language_model); found neither")
