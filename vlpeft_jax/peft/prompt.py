"""Prompt tuning / prompt learning and deep (per-layer) prompts.

:class:`PromptTuning` (Lester et al. 2021; seed ``003_51c0d4f63b3b21d6.txt``, "prompt learning"): ``P`` learnable
vectors are inserted into the input embeddings through the ``embed`` hook (only at the prefill: a
``decode=True`` step adds nothing, the prompt's keys/values are already in the KV cache). Seed 003 initialises
them "with the same sentence used for the original MLLM, concatenated with the standard system prompt": the
``text`` init takes the token embeddings of a text (tokenized as peft's ``PROMPT_TUNING_INIT=TEXT``, special
tokens included, repeated to fill ``P``; a text longer than ``P`` is an error), ``vocab`` takes the embeddings of
uniformly sampled vocabulary ids, ``random`` draws N(0, σ²) with σ the token table's own std (peft's RANDOM is
N(0, 1); at the scale of a pretrained table that is a very large prompt). The prompt goes before the sequence
(before any left padding, as peft) for token embeddings, and right after the class token for image embeddings
(ViT ``cls_token``, CLIP ``class_embedding``), the layout of visual prompt tuning, so that pooling still reads
the class token.

:class:`DeepPromptTuning` (MaPLe / VPT-deep style, seed ``001_e6226210b77e0466.txt`` baselines: "we incorporate
learnable prompts at each layer"): the same input prompt tokens, and at every later layer the prompt tokens'
hidden states entering the layer are replaced by that layer's own learnable vectors. The tokens really are in
the sequence (they take positions, are projected by the layer's own, possibly LoRA-adapted, query/key/value
projections, and their keys/values sit in the KV cache), so real tokens attend to them exactly as in VPT-deep.
With the hook points available the replacement happens at the attention's input projections (``linear`` hook
on ``q_proj/k_proj/v_proj``, ``c_attn``, ``query/key/value``), i.e. *after* the layer's input norm: our layer
prompts live in the normalised space (``u_l`` instead of ``LN(p_l)``; every ``LN(p)`` is some ``u``, so this is
a superset of MaPLe's prompts, initialised N(0, 1) like a normalised hidden state). The replaced rows' own
residual stream is never read again (the next layer replaces them again; the last layer's prompt outputs are
dropped by the caller like prompt tuning's). Register deep prompts after (outside) methods that adapt the same
projections, so those see the prompt rows. The ``linear`` hook cannot see ``decode``; the ``embed`` hook,
which runs first in every forward pass, records whether this pass is a prefill.

Logits (and hidden states) of prompted decoders have ``P`` more positions: ``[b, P + t, vocab]``.

peft-format export and import of :class:`PromptTuning` (``PROMPT_TUNING``): :mod:`vlpeft_jax.hf.peft_formats.prompts`.

Example:
    >>> import jax, jax.numpy as jnp
    >>> base = {"model": {"embed_tokens": {"embedding": jnp.ones((10, 4))}}}
    >>> prompt = PromptTuning(num_virtual_tokens=3, init_from="text", init_token_ids=(5, 6))
    >>> p = prompt.init(jax.random.key(0), base)
    >>> p["model"]["embed_tokens"]["prompt_embeddings"].shape
    (3, 4)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlpeft_jax.errors import CheckpointError, ConfigError
from vlpeft_jax.models import hooks
from vlpeft_jax.peft import base as pb
from vlpeft_jax.peft.prefix import AttentionSite, attention_sites, holders, matches, natural_key

INITS = ("text", "vocab", "random")
TOKEN_TABLES = ("wte", "embed_tokens", "word_embeddings", "token_embedding")
CLASS_TOKENS = ("cls_token", "class_embedding")
# Linear layers of an attention module that read the layer's (normalised) hidden state.
INPUT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "c_attn", "query", "key", "value")


@dataclasses.dataclass(frozen=True)
class EmbedSite:
    """An ``embed`` hook point a prompt can be inserted at.

    Attributes:
      path: the hook path (the token table, or a vision tower's ``embeddings`` module).
      width: embedding width.
      insert_at: index the prompt is inserted at (0 for tokens; 1, after the class token, for images).
      table: the token-embedding table ``[vocab, width]`` (None for image embeddings).
      reference: the array whose std scales the random init (the table, or the class token).
    """

    path: tuple[str, ...]
    width: int
    insert_at: int
    table: Any = None
    reference: Any = None

    @property
    def name(self) -> str:
        return "/".join(self.path)


def insert_index(path: Sequence[str]) -> int:
    """Where a prompt goes in the sequence of the ``embed`` hook at ``path``: 0 for token embeddings, 1 (after
    the class token) for a vision tower's ``embeddings`` module."""
    return 1 if path[-1] == "embeddings" else 0


def embed_sites(base_params: Mapping[str, Any], targets: Sequence[str] = (), *, method: str = "method"
                ) -> list[EmbedSite]:
    """Embedding hook points chosen by ``targets`` (empty: every token table named like ``wte``/``embed_tokens``)."""
    sites = []
    for path in pb.module_paths(base_params, "embedding"):
        table = pb.get_path(base_params, path + ("embedding",))
        if path[-1] in TOKEN_TABLES and np.ndim(table) == 2:
            sites.append(EmbedSite(path, int(table.shape[1]), 0, table, table))
    for leaf in CLASS_TOKENS:
        for path in holders(base_params, leaf):
            cls = pb.get_path(base_params, path + (leaf,))
            sites.append(EmbedSite(path, int(np.shape(cls)[-1]), insert_index(path), None, cls))
    sites.sort(key=lambda s: natural_key(s.path))
    if not targets:
        chosen = [s for s in sites if s.table is not None]
        if not chosen:
            raise ConfigError(f"{method}: the base parameters have no token-embedding table "
                              f"({', '.join(TOKEN_TABLES)}); name the embedding module in targets")
        return chosen
    chosen = []
    for pat in targets:
        hits = [s for s in sites if matches(s.name, pat)]
        if not hits:
            shown = ", ".join(s.name for s in sites) or "none"
            raise ConfigError(f"{method}: target pattern {pat!r} matches no embedding module; available: {shown}")
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


def tokenize_init_text(tokenizer_dir: str, text: str) -> tuple[int, ...]:
    """Token ids of ``text`` as peft's TEXT init computes them (``tokenizer(text)["input_ids"]``, special tokens
    included), with the tokenizer saved in a local Hugging Face directory (transformers ``AutoTokenizer``, offline;
    loaded here rather than through :func:`vlpeft_jax.hf.load_tokenizer`, a higher layer)."""
    from transformers import AutoTokenizer

    d = Path(tokenizer_dir).expanduser()
    if not d.is_dir():
        raise ConfigError(f"tokenizer={str(tokenizer_dir)!r} is not a local directory; the prompt's text init reads a "
                          "Hugging Face tokenizer saved on this machine (there is no network access: download a hub "
                          "tokenizer elsewhere and pass its directory)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{d}: no loadable tokenizer ({e})") from None
    return tuple(int(i) for i in tokenizer(text)["input_ids"])


@dataclasses.dataclass(frozen=True)
class _PromptSettings(pb.Method):
    """Settings shared by :class:`PromptTuning` and :class:`DeepPromptTuning`.

    Attributes:
      num_virtual_tokens: prompt length ``P``; None (text init only) means the length of the tokenized text.
      init_from: ``text``, ``vocab`` (sampled vocabulary embeddings) or ``random``.
      init_text: the text for ``text`` init (e.g. the original instruction and system prompt).
      tokenizer: local Hugging Face tokenizer directory that tokenizes ``init_text``.
      init_token_ids: pre-tokenized ids instead of ``init_text`` + ``tokenizer``.
      random_std: std of the ``random`` init (None: the std of the embedding the prompt is inserted into).
      targets: embedding modules (plain name or regex; empty: the token tables).
    """

    num_virtual_tokens: int | None = 20
    init_from: str = "random"
    init_text: str = ""
    tokenizer: str = ""
    init_token_ids: tuple[int, ...] = ()
    random_std: float | None = None
    targets: tuple[str, ...] = ()
    name: str = "prompt"

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", (self.targets,) if isinstance(self.targets, str) else tuple(self.targets))
        object.__setattr__(self, "init_token_ids", tuple(int(i) for i in self.init_token_ids))
        if self.init_from not in INITS:
            raise ConfigError(f"{self.name}.init_from={self.init_from!r}; valid: {', '.join(INITS)}")
        n = self.num_virtual_tokens
        if n is None:
            if self.init_from != "text":
                raise ConfigError(f"{self.name}.num_virtual_tokens=None (the text's length) needs init_from='text'")
        elif int(n) <= 0:
            raise ConfigError(f"{self.name}.num_virtual_tokens={n}; the prompt length must be a positive integer")
        if self.init_from == "text":
            if not self.init_token_ids and not (self.init_text and self.tokenizer):
                raise ConfigError(f"{self.name}.init_from='text' needs init_text and tokenizer (a local tokenizer "
                                  "directory), or init_token_ids")
            if n is not None and len(self.init_token_ids) > int(n):
                raise ConfigError(f"{self.name}: the prompt-init text has {len(self.init_token_ids)} tokens, longer "
                                  f"than the prompt (num_virtual_tokens={n})")
        if self.random_std is not None and self.random_std < 0:
            raise ConfigError(f"{self.name}.random_std={self.random_std}; must be >= 0 (or None)")

    def init_ids(self) -> tuple[int, ...]:
        """The token ids of the text init (tokenizing ``init_text`` if no ids were given)."""
        ids = self.init_token_ids or tokenize_init_text(self.tokenizer, self.init_text)
        if not ids:
            raise ConfigError(f"{self.name}: the prompt-init text tokenizes to nothing")
        if self.num_virtual_tokens is not None and len(ids) > int(self.num_virtual_tokens):
            raise ConfigError(f"{self.name}: the prompt-init text {self.init_text!r} has {len(ids)} tokens, longer "
                              f"than the prompt (num_virtual_tokens={self.num_virtual_tokens}); lengthen the prompt "
                              "or shorten the text")
        return ids

    def _prompt_init(self, rng: jax.Array, site: EmbedSite, ids: tuple[int, ...] | None) -> jax.Array:
        n = len(ids) if self.num_virtual_tokens is None else int(self.num_virtual_tokens)
        if self.init_from in ("text", "vocab") and site.table is None:
            raise ConfigError(f"{self.name}.init_from={self.init_from!r} needs a token table; {site.name} is an image "
                              "embedding (use init_from='random')")
        if self.init_from == "text":
            vocab = site.table.shape[0]
            if max(ids) >= vocab or min(ids) < 0:
                raise ConfigError(f"{self.name}: prompt-init token ids must be in [0, {vocab}) for {site.name}; "
                                  f"got {min(ids)}..{max(ids)}")
            ids = (ids * math.ceil(n / len(ids)))[:n]  # peft repeats a short text to fill the prompt
            return jnp.asarray(site.table, jnp.float32)[jnp.asarray(ids)]
        if self.init_from == "vocab":
            sampled = jax.random.randint(rng, (n,), 0, site.table.shape[0])
            return jnp.asarray(site.table, jnp.float32)[sampled]
        std = float(np.std(np.asarray(site.reference))) if self.random_std is None else float(self.random_std)
        return std * jax.random.normal(rng, (n, site.width), jnp.float32)

    def _sites(self, base_params: pb.Params) -> list[EmbedSite]:
        return embed_sites(base_params, self.targets, method=self.name)

    def _embed_hook(self, prompts: Mapping[tuple[str, ...], jax.Array], insert_at: Mapping[tuple[str, ...], int],
                    on_call: Any = None) -> hooks.Hook:
        def prompt_embed(ctx: hooks.HookContext, nxt: Any, ids: Any, embeds: jax.Array, mask: Any) -> Any:
            embeds, mask = nxt(ids, embeds, mask)
            if on_call is not None:
                on_call(ctx)
            if ctx.decode:  # an incremental step: the prompt is already in the KV cache
                return embeds, mask
            prompt = prompts[ctx.path]
            b, s = embeds.shape[0], insert_at[ctx.path]
            rows = jnp.broadcast_to(prompt.astype(embeds.dtype)[None], (b,) + prompt.shape)
            embeds = jnp.concatenate([embeds[:, :s], rows, embeds[:, s:]], axis=1)
            if mask is not None:
                ones = jnp.ones((b, prompt.shape[0]), mask.dtype)
                mask = jnp.concatenate([mask[:, :s], ones, mask[:, s:]], axis=1)
            return embeds, mask

        return hooks.Hook("embed", prompt_embed, where=lambda path: path in prompts)

    def merge(self, base_params: pb.Params, peft_params: pb.Params) -> pb.Params:
        raise ConfigError(f"{self.name}: prompts cannot be merged into the base weights (they add tokens)")

    def num_params(self, peft_params: pb.Params) -> int:
        return pb.count(peft_params)


@dataclasses.dataclass(frozen=True)
class PromptTuning(_PromptSettings):
    """Prompt tuning / prompt learning (see the module docstring and :class:`_PromptSettings` for the settings)."""

    def init(self, rng: jax.Array, base_params: pb.Params) -> pb.Params:
        sites = self._sites(base_params)
        ids = self.init_ids() if self.init_from == "text" else None
        out: pb.Params = {}
        for i, site in enumerate(sites):
            pb.set_path(out, site.path, {"prompt_embeddings": self._prompt_init(jax.random.fold_in(rng, i), site, ids)})
        return out

    def hooks(self, peft_params: pb.Params, *, rng: jax.Array | None = None, train: bool = False
              ) -> list[hooks.Hook]:
        paths = holders(peft_params, "prompt_embeddings")
        prompts = {p: pb.get_path(peft_params, p)["prompt_embeddings"] for p in paths}
        insert_at = {p: insert_index(p) for p in paths}
        return [self._embed_hook(prompts, insert_at)]


def tower_root(path: Sequence[str]) -> tuple[str, ...]:
    """The module that holds an embedding and its layers: ``transformer/wte`` -> ``transformer``,
    ``bert/embeddings/word_embeddings`` -> ``bert``, ``vision_model/embeddings`` -> ``vision_model``."""
    root = tuple(path)
    if root and root[-1] != "embeddings":
        root = root[:-1]
    while root and "embeddings" in root[-1]:
        root = root[:-1]
    return root


@dataclasses.dataclass(frozen=True)
class DeepPromptTuning(_PromptSettings):
    """Deep prompts (MaPLe / VPT-deep): input prompts plus per-layer prompt replacements (module docstring).

    Attributes (besides those of :class:`_PromptSettings`; ``targets`` must choose exactly one embedding):
      layer_targets: attention modules whose layers get their own prompts (empty: every self-attention module
        of the embedding's tower). The first layer (index 0) reads the input prompts and gets none.
      layer_prompt_std: std of the N(0, σ²) init of the per-layer prompts (normalised space).
    """

    layer_targets: tuple[str, ...] = ()
    layer_prompt_std: float = 1.0
    name: str = "deep_prompt"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layer_targets", (self.layer_targets,) if isinstance(self.layer_targets, str)
                           else tuple(self.layer_targets))
        if self.layer_prompt_std < 0:
            raise ConfigError(f"{self.name}.layer_prompt_std={self.layer_prompt_std}; must be >= 0")

    def layer_sites(self, base_params: pb.Params, embed: EmbedSite) -> list[AttentionSite]:
        """The attention modules that get their own prompts (all but the first layer)."""
        sites = attention_sites(base_params, self.layer_targets, method=self.name)
        if not self.layer_targets:
            root = tower_root(embed.path)
            sites = [s for s in sites if s.path[:len(root)] == root]
        out = []
        for s in sites:
            if hooks.HookContext("attention", s.path).layer == 0:
                continue
            if s.width != embed.width:
                raise ConfigError(f"{self.name}: layer {s.name} is {s.width} wide but the prompts of {embed.name} are "
                                  f"{embed.width} wide; choose layers of the same tower in layer_targets")
            out.append(s)
        if not out:
            raise ConfigError(f"{self.name}: no attention layer after the first one to put prompts in "
                              f"(layer_targets={self.layer_targets})")
        return out

    def init(self, rng: jax.Array, base_params: pb.Params) -> pb.Params:
        sites = self._sites(base_params)
        if len(sites) != 1:
            raise ConfigError(f"{self.name}: deep prompts go into one tower; targets choose "
                              f"{[s.name for s in sites]} (use one instance per tower)")
        embed = sites[0]
        ids = self.init_ids() if self.init_from == "text" else None
        k_in, k_layers = jax.random.split(rng)
        prompt = self._prompt_init(k_in, embed, ids)
        out: pb.Params = {}
        pb.set_path(out, embed.path, {"prompt_embeddings": prompt})
        for i, site in enumerate(self.layer_sites(base_params, embed)):
            key = jax.random.fold_in(k_layers, i)
            u = self.layer_prompt_std * jax.random.normal(key, (prompt.shape[0], site.width), jnp.float32)
            pb.set_path(out, site.path, {"layer_prompts": u})
        return out

    def hooks(self, peft_params: pb.Params, *, rng: jax.Array | None = None, train: bool = False
              ) -> list[hooks.Hook]:
        embed_paths = holders(peft_params, "prompt_embeddings")
        prompts = {p: pb.get_path(peft_params, p)["prompt_embeddings"] for p in embed_paths}
        insert_at = {p: insert_index(p) for p in embed_paths}
        start = next(iter(insert_at.values()), 0)
        layer_prompts = {p: pb.get_path(peft_params, p)["layer_prompts"] for p in holders(peft_params, "layer_prompts")}
        # Trace-time record of the current forward pass, written by the embed hook (which runs first).
        state: dict[str, bool] = {}

        def record(ctx: hooks.HookContext) -> None:
            state["prefill"] = not ctx.decode

        def layer_prompt_linear(ctx: hooks.HookContext, nxt: Any, x: jax.Array, kernel: jax.Array, bias: Any) -> Any:
            if "prefill" not in state:
                raise ConfigError(f"{self.name}: {ctx.name} ran before the prompt's embed hook "
                                  f"({', '.join('/'.join(p) for p in prompts)}); the layers and the embedding must "
                                  "belong to the same model call")
            if not state["prefill"]:  # decode step: the prompt rows' keys/values are in the cache
                return nxt(x, kernel, bias)
            u = layer_prompts[ctx.path[:-1]]
            rows = jnp.broadcast_to(u.astype(x.dtype)[None], (x.shape[0],) + u.shape)
            x = jnp.concatenate([x[:, :start], rows, x[:, start + u.shape[0]:]], axis=1)
            return nxt(x, kernel, bias)

        return [self._embed_hook(prompts, insert_at, on_call=record),
                hooks.Hook("linear", layer_prompt_linear,
                           where=lambda path: path[-1] in INPUT_PROJECTIONS and path[:-1] in layer_prompts)]
