"""Prefix tuning with a prefix encoder (seed ``002_77ee72ace92f5c60.txt`` §3, App. B, Fig. 6; Li & Liang 2021).

Every adapted attention layer gets ``P`` extra keys and values, prepended inside the ``attention`` hook with
a zero attention bias (every query sees every prefix position) and one entry per *key/value* head (GQA
models get ``num_kv_heads`` prefix heads, as peft provisions them). While training, the prefixes come from a
prefix encoder, the MLP re-parameterisation of Li & Liang plus the seed's prefix-type embedding:

    e_i  = E[i] + t                              E: [P, d_e] prefix embeddings, t: [d_e] prefix-type embedding
    h_i  = tanh(e_i W_1 + b_1)                   W_1: [d_e, d_h]
    kv_i = h_i W_2 + b_2                         W_2: [d_h, L * 2 * kv_heads * head_dim], split per layer

App. B describes the prefix-type embedding only as "a symmetrical setting with token type embedding" (BERT's
``token_type_embeddings``, one learned vector per segment type, added to the token embedding). We define it
as written: one learned vector ``t`` (the "prefix" type, N(0, 0.02²) like BERT's table) added to every prefix
embedding before the MLP, with no LayerNorm (Fig. 6 is not in our copy of the paper). ``type_embedding=False``
and ``projection=False`` give the two ablations of Table 10 (no type embedding; no MLP: the prefixes are
trained directly, which is also peft's ``prefix_projection=False``).

Parameter trees mirror the attention modules they adapt (``transformer/h_3/attn``,
``model/layers_3/self_attn``, ``encoder/layer_3/attention/self``):

- encoder form (``projection=True``): ``{"prefix_encoder": {"embedding", "type_embedding", "dense":
  {"kernel", "bias"}}, <attention path>: {"prefix_out": {"kernel": [d_h, 2*kvh*hd], "bias"}}}``; the per-layer
  ``prefix_out`` blocks are the column blocks of ``W_2`` (the same function and parameter count as one
  ``Linear`` of width ``L * 2 * kvh * hd``);
- plain form: ``{<attention path>: {"prefix_keys": [P, kvh, hd], "prefix_values": [P, kvh, hd]}}``.

:meth:`PrefixTuning.finalize` turns the encoder form into the plain form ("the output of the prefix encoder can be
saved as the new prefix, so there is no computational overhead", App. B); the hooks accept both.

Positions. peft passes the prefix as Hugging Face ``past_key_values``, so the model numbers the real tokens
from ``P``: ``P..P+t-1`` (Hugging Face counts from the cache length), and a caller's explicit ``position_ids``
are shifted by ``P`` too (``PeftModel._adjust_prompt_learning_kwargs`` in peft 0.21). The method does the same
through the ``positions`` hook of every model trunk it adapts (GPT-2 ``transformer``, LLaMA ``model``, BERT's
``BertModel``; vision towers and the Q-Former have no such hook and keep their positions): whatever positions
the model uses (``cumsum(mask) - 1`` from the attention mask, so that left padding is skipped, continued from a
KV cache, or the caller's ``position_ids``) get ``+P``, at the prefill and at every ``decode=True`` step alike.
So our model and peft's give the same outputs on the same inputs, without ``position_ids``; with left padding
our numbering is that of peft's ``generate`` (HF ``generate`` passes ``cumsum(mask) - 1``, which peft shifts),
while peft's bare ``forward`` numbers a padded row from its pad tokens. The prefix itself is not in the
sequence: a KV cache holds only real tokens, and the prefix is prepended at every step. ``P + t`` must fit the
model's position table (GPT-2 ``n_positions``, BERT ``max_position_embeddings``), as in peft. With the
evaluation replacement ``remove`` the model runs without a prefix, so positions are not shifted; ``zeros`` and
``noise`` keep a prefix of ``P`` positions and the shift.

peft-format export and import (``PREFIX_TUNING``, the finalized prefixes as ``prompt_embeddings``):
:mod:`vlpeft_jax.hf.peft_formats.prompts`.

Example:
    >>> import jax, jax.numpy as jnp
    >>> base = {"model": {f"layers_{i}": {"self_attn": {"k_proj": {"kernel": jnp.zeros((8, 4))}}}
    ...                   for i in range(2)}}
    >>> prefix = PrefixTuning(num_virtual_tokens=3, num_kv_heads=2, encoder_hidden_size=5)
    >>> p = prefix.init(jax.random.key(0), base)
    >>> plain = prefix.finalize(p)
    >>> plain["model"]["layers_1"]["self_attn"]["prefix_keys"].shape
    (3, 2, 2)
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlpeft_jax.errors import ConfigError
from vlpeft_jax.models import hooks
from vlpeft_jax.peft import base as pb

# Name of a key projection inside an attention module -> how many key widths its output holds
# (GPT-2's c_attn is the fused query|key|value projection).
KEY_PROJECTIONS: dict[str, int] = {"k_proj": 1, "key": 1, "c_attn": 3}
EVAL_REPLACEMENTS = ("keep", "remove", "zeros", "noise")


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    """One self-attention module a prompt/prefix method can plug into.

    Attributes:
      path: the module's path, which is also its ``attention`` hook path.
      width: the model width entering the attention (the key projection's input width).
      kv_width: ``kv_heads * head_dim`` (the key projection's output width, a third of GPT-2's ``c_attn``).
    """

    path: tuple[str, ...]
    width: int
    kv_width: int

    @property
    def name(self) -> str:
        return "/".join(self.path)


def natural_key(path: Sequence[str]) -> list[Any]:
    """Sort key that orders ``h_2`` before ``h_10``."""
    parts = re.split(r"(\d+)", "/".join(path))
    return [int(p) if i % 2 else p for i, p in enumerate(parts)]


def matches(name: str, pattern: str) -> bool:
    """Target-pattern semantics of :func:`vlpeft_jax.peft.base.match_targets`: a plain name matches modules
    whose last names equal it, anything else is a regular expression over the full ``/``-joined path."""
    if re.fullmatch(r"[A-Za-z0-9_/]+", pattern):
        return name == pattern or name.endswith("/" + pattern)
    return re.fullmatch(pattern, name) is not None


def attention_sites(base_params: Mapping[str, Any], targets: Sequence[str] = (), *, method: str = "method"
                    ) -> list[AttentionSite]:
    """The attention modules (holding a ``k_proj``, ``key`` or ``c_attn`` kernel) chosen by ``targets``.

    With no targets: every self-attention module (paths containing ``cross`` are left out: a Q-Former's
    cross-attention reads image features, not the sequence). Each target pattern must match some module;
    otherwise :class:`ConfigError` lists the available paths. Sites come in natural layer order.
    """
    sites = []
    for path in pb.module_paths(base_params, "kernel"):
        factor = KEY_PROJECTIONS.get(path[-1])
        kernel = pb.get_path(base_params, path + ("kernel",))
        if factor is None or np.ndim(kernel) != 2:
            continue
        d_in, d_out = kernel.shape
        sites.append(AttentionSite(path[:-1], int(d_in), int(d_out) // factor))
    sites.sort(key=lambda s: natural_key(s.path))
    if not targets:
        chosen = [s for s in sites if not any("cross" in part for part in s.path)]
        if not chosen:
            raise ConfigError(f"{method}: the base parameters have no self-attention module (no k_proj, key or "
                              "c_attn kernel)")
        return chosen
    chosen = []
    for pat in targets:
        hits = [s for s in sites if matches(s.name, pat)]
        if not hits:
            names = [s.name for s in sites]
            shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
            raise ConfigError(f"{method}: target pattern {pat!r} matches no attention module; available: {shown}")
        chosen.extend(h for h in hits if h not in chosen)
    chosen.sort(key=lambda s: natural_key(s.path))
    return chosen


def _torch_linear(key: jax.Array, d_in: int, d_out: int) -> dict[str, jax.Array]:
    # torch.nn.Linear's default init (what peft's PrefixEncoder starts from): U(±1/sqrt(fan_in)).
    kk, kb = jax.random.split(key)
    bound = 1.0 / math.sqrt(d_in)
    return {"kernel": jax.random.uniform(kk, (d_in, d_out), jnp.float32, -bound, bound),
            "bias": jax.random.uniform(kb, (d_out,), jnp.float32, -bound, bound)}


def holders(tree: Mapping[str, Any], key: str, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths of the sub-dicts of ``tree`` that hold ``key`` (whatever its value), in natural order."""
    out = []
    for k, v in tree.items():
        if isinstance(v, Mapping):
            if key in v:
                out.append(prefix + (k,))
            out.extend(holders(v, key, prefix + (k,)))
    return sorted(out, key=natural_key)


def _path_key(rng: jax.Array, path: Sequence[str]) -> jax.Array:
    return jax.random.fold_in(rng, zlib.crc32("/".join(path).encode()))


@dataclasses.dataclass(frozen=True)
class PrefixTuning(pb.Method):
    """Prefix-tuning settings.

    Attributes:
      num_virtual_tokens: prefix length ``P`` (seed 002 Table 8: 8 to 64).
      num_kv_heads: key/value heads of the adapted layers (GPT-2 ``n_head``, LLaMA ``num_key_value_heads``);
        parameters do not record head counts, so give this or ``head_dim`` (the other is the key
        projection's width divided by it).
      head_dim: width of one head (alternative to ``num_kv_heads``).
      targets: attention-module patterns (a plain name matches modules whose path ends with it, else a regex
        over the path); empty: every self-attention module.
      projection: train through the prefix encoder (MLP re-parameterisation); False trains the prefixes directly.
      type_embedding: add the learned prefix-type embedding before the MLP (seed 002 App. B).
      embedding_dim: width of the prefix embeddings ``d_e`` (None: the model width).
      encoder_hidden_size: hidden width ``d_h`` of the MLP (None: ``d_e``, as peft).
      eval_replacement: at evaluation (``train=False``), ``keep`` the prefix, ``remove`` it, replace it by
        ``zeros`` or by Gaussian ``noise`` (seed 002 Table 5: "-Prefix" and "-Prefix +Noise").
      noise_std: standard deviation of that noise (None: each layer's learned keys/values' own std).
    """

    num_virtual_tokens: int = 16
    num_kv_heads: int | None = None
    head_dim: int | None = None
    targets: tuple[str, ...] = ()
    projection: bool = True
    type_embedding: bool = True
    embedding_dim: int | None = None
    encoder_hidden_size: int | None = None
    eval_replacement: str = "keep"
    noise_std: float | None = None
    name: str = "prefix"

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", (self.targets,) if isinstance(self.targets, str) else tuple(self.targets))
        if int(self.num_virtual_tokens) <= 0:
            raise ConfigError(f"{self.name}.num_virtual_tokens={self.num_virtual_tokens}; the prefix length must be "
                              "a positive integer")
        for field in ("num_kv_heads", "head_dim", "embedding_dim", "encoder_hidden_size"):
            v = getattr(self, field)
            if v is not None and int(v) <= 0:
                raise ConfigError(f"{self.name}.{field}={v}; must be a positive integer (or None)")
        if self.num_kv_heads is None and self.head_dim is None:
            raise ConfigError(f"{self.name}: set num_kv_heads (key/value heads of the adapted attention layers, e.g. "
                              "GPT-2 n_head, LLaMA num_key_value_heads) or head_dim")
        if self.eval_replacement not in EVAL_REPLACEMENTS:
            raise ConfigError(f"{self.name}.eval_replacement={self.eval_replacement!r}; valid: "
                              f"{', '.join(EVAL_REPLACEMENTS)}")
        if self.noise_std is not None and self.noise_std < 0:
            raise ConfigError(f"{self.name}.noise_std={self.noise_std}; must be >= 0 (or None)")

    # ------------------------------------------------------------------------------------------------
    # Shapes

    def heads_of(self, kv_width: int, where: str) -> tuple[int, int]:
        """``(kv_heads, head_dim)`` of a key width ``kv_heads * head_dim`` (``where`` names it in errors)."""
        if self.num_kv_heads is not None:
            kvh = int(self.num_kv_heads)
            if kv_width % kvh:
                raise ConfigError(f"{self.name}.num_kv_heads={kvh} does not divide the key width {kv_width} of {where}")
            if self.head_dim is not None and kvh * int(self.head_dim) != kv_width:
                raise ConfigError(f"{self.name}: num_kv_heads={kvh} x head_dim={self.head_dim} != key width "
                                  f"{kv_width} of {where}")
            return kvh, kv_width // kvh
        hd = int(self.head_dim)
        if kv_width % hd:
            raise ConfigError(f"{self.name}.head_dim={hd} does not divide the key width {kv_width} of {where}")
        return kv_width // hd, hd

    def sites(self, base_params: Mapping[str, Any]) -> list[AttentionSite]:
        """The attention modules this method adapts, in layer order."""
        return attention_sites(base_params, self.targets, method=self.name)

    # ------------------------------------------------------------------------------------------------
    # The method

    def init(self, rng: jax.Array, base_params: pb.Params) -> pb.Params:
        sites = self.sites(base_params)
        p = int(self.num_virtual_tokens)
        out: pb.Params = {}
        if not self.projection:
            for site in sites:
                kvh, hd = self.heads_of(site.kv_width, site.name)
                kk, kv = jax.random.split(_path_key(rng, site.path))
                # N(0, 1), as peft's nn.Embedding holding the prefixes when prefix_projection=False.
                pb.set_path(out, site.path, {"prefix_keys": jax.random.normal(kk, (p, kvh, hd), jnp.float32),
                                             "prefix_values": jax.random.normal(kv, (p, kvh, hd), jnp.float32)})
            return out
        d_e = int(self.embedding_dim or sites[0].width)
        d_h = int(self.encoder_hidden_size or d_e)
        k_emb, k_type, k_dense, k_out = jax.random.split(rng, 4)
        encoder: pb.Params = {"embedding": jax.random.normal(k_emb, (p, d_e), jnp.float32),
                              "dense": _torch_linear(k_dense, d_e, d_h)}
        if self.type_embedding:
            encoder["type_embedding"] = 0.02 * jax.random.normal(k_type, (d_e,), jnp.float32)
        out["prefix_encoder"] = encoder
        for site in sites:
            kvh, hd = self.heads_of(site.kv_width, site.name)
            # fan_in is d_h for every column block, so per-layer blocks have the distribution of peft's one Linear
            pb.set_path(out, site.path, {"prefix_out": _torch_linear(_path_key(k_out, site.path), d_h, 2 * kvh * hd)})
        return out

    def layer_prefixes(self, peft_params: pb.Params) -> dict[tuple[str, ...], tuple[jax.Array, jax.Array]]:
        """``{attention path: (keys, values)}``, each ``[P, kv_heads, head_dim]``, from either form."""
        plain = {path: (pb.get_path(peft_params, path)["prefix_keys"], pb.get_path(peft_params, path)["prefix_values"])
                 for path in holders(peft_params, "prefix_keys")}
        out_paths = holders(peft_params, "prefix_out")
        if not out_paths:
            return plain
        enc = peft_params["prefix_encoder"]
        e = enc["embedding"]
        if "type_embedding" in enc:
            e = e + enc["type_embedding"]
        h = jnp.tanh(e @ enc["dense"]["kernel"] + enc["dense"]["bias"])
        for path in out_paths:
            out = pb.get_path(peft_params, path)["prefix_out"]
            kv = (h @ out["kernel"] + out["bias"]).reshape(h.shape[0], 2, -1)
            plain[path] = (kv[:, 0], kv[:, 1])
        # the encoder's output [P, kvh*hd] gets its head split here (the plain form stores it split)
        return {path: (self._split_heads(path, k), self._split_heads(path, v)) for path, (k, v) in plain.items()}

    def _split_heads(self, path: tuple[str, ...], x: jax.Array) -> jax.Array:
        if x.ndim == 3:
            return x
        kvh, hd = self.heads_of(x.shape[-1], "/".join(path))
        return x.reshape(x.shape[0], kvh, hd)

    def finalize(self, peft_params: pb.Params) -> pb.Params:
        """The plain form: static per-layer prefixes, no encoder (identical outputs, nothing to run at inference)."""
        out: pb.Params = {}
        for path, (k, v) in self.layer_prefixes(peft_params).items():
            pb.set_path(out, path, {"prefix_keys": k, "prefix_values": v})
        return out

    def hooks(self, peft_params: pb.Params, *, rng: jax.Array | None = None, train: bool = False
              ) -> list[hooks.Hook]:
        params = peft_params
        if not train and self.eval_replacement != "keep":
            params = replace_prefix(self.finalize(peft_params), self.eval_replacement,
                                    rng if rng is not None else jax.random.key(0), noise_std=self.noise_std)
        # Computed once per forward pass (the encoder runs here, not once per layer).
        prefixes = self.layer_prefixes(params)
        shift = int(self.num_virtual_tokens)

        def holds_prefixed_layers(path: tuple[str, ...]) -> bool:
            return any(p[:len(path)] == path for p in prefixes)

        def shift_positions(ctx: hooks.HookContext, nxt: Any, positions: jax.Array) -> jax.Array:
            # the real tokens come after the P prefix positions, as after peft's past_key_values
            positions = nxt(positions)
            return positions + jnp.asarray(shift, positions.dtype)

        def prefix_attention(ctx: hooks.HookContext, nxt: Any, q: jax.Array, k: jax.Array, v: jax.Array,
                             bias: jax.Array | None) -> jax.Array:
            pk, pv = prefixes[ctx.path]
            b = k.shape[0]
            pk = jnp.broadcast_to(pk.astype(k.dtype)[None], (b,) + pk.shape)
            pv = jnp.broadcast_to(pv.astype(v.dtype)[None], (b,) + pv.shape)
            if bias is not None:  # every query sees the whole prefix: zero bias on its columns
                bias = jnp.concatenate([jnp.zeros(bias.shape[:-1] + (pk.shape[1],), bias.dtype), bias], axis=-1)
            return nxt(q, jnp.concatenate([pk, k], axis=1), jnp.concatenate([pv, v], axis=1), bias)

        return [hooks.Hook("attention", prefix_attention, where=lambda path: path in prefixes),
                hooks.Hook("positions", shift_positions, where=holds_prefixed_layers)]

    def merge(self, base_params: pb.Params, peft_params: pb.Params) -> pb.Params:
        raise ConfigError(f"{self.name}: prefix tuning cannot be merged into the base weights (it adds attention "
                          "keys/values); use finalize() to drop the prefix encoder for inference")

    def num_params(self, peft_params: pb.Params) -> int:
        return pb.count(peft_params)


def replace_prefix(peft_params: pb.Params, mode: str, rng: jax.Array | None = None, *,
                   noise_std: float | None = None) -> pb.Params:
    """Plain-form prefixes replaced for evaluation (seed 002 Table 5).

    ``mode``: ``keep`` (unchanged), ``remove`` (no prefix at all: an empty tree, the hooks then do nothing),
    ``zeros`` (zero keys and values: the prefix still takes attention mass) or ``noise`` (Gaussian noise of
    std ``noise_std``, by default each layer's learned keys'/values' own std; needs ``rng``).

    Example:
        >>> import jax.numpy as jnp
        >>> p = {"attn": {"prefix_keys": jnp.ones((2, 1, 2)), "prefix_values": jnp.ones((2, 1, 2))}}
        >>> replace_prefix(p, "remove"), float(replace_prefix(p, "zeros")["attn"]["prefix_keys"].sum())
        ({}, 0.0)
    """
    if mode not in EVAL_REPLACEMENTS:
        raise ConfigError(f"prefix replacement mode {mode!r}; valid: {', '.join(EVAL_REPLACEMENTS)}")
    if mode == "keep":
        return peft_params
    if mode == "remove":
        return {}
    if holders(peft_params, "prefix_out"):
        raise ConfigError("replace_prefix takes plain prefixes: call finalize() first")
    if mode == "noise" and rng is None:
        raise ConfigError("replace_prefix(mode='noise') needs an rng")
    out: pb.Params = {}
    for path in holders(peft_params, "prefix_keys"):
        node = pb.get_path(peft_params, path)
        new = {}
        for name in ("prefix_keys", "prefix_values"):
            x = node[name]
            if mode == "zeros":
                new[name] = jnp.zeros_like(x)
            else:
                std = jnp.std(x) if noise_std is None else noise_std
                key = jax.random.fold_in(_path_key(rng, path), zlib.crc32(name.encode()))
                new[name] = (std * jax.random.normal(key, x.shape, jnp.float32)).astype(x.dtype)
        pb.set_path(out, path, new)
    return out
