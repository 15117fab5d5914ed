"""Hugging Face BERT and Q-Former checkpoints -> :mod:`vlpeft_jax.models.bert`.

Our parameter paths mirror the Hugging Face module names (``encoder.layer.0.attention.self.query`` ->
``encoder/layer_0/attention/self/query``), so every key map below is a rename plus the transpose of
linear weights.

- :func:`load_bert`: a ``BertModel`` directory, or a ``BertFor*`` one whose keys start with ``bert.``
  (heads such as ``cls.*`` are ignored; the pooler is loaded when present).
- :func:`load_qformer`: a ``Blip2QFormerModel`` / ``InstructBlipQFormerModel`` directory (keys without
  prefix; ``query_tokens`` may be stored beside them), or a full BLIP-2 / InstructBLIP checkpoint
  (``qformer.*`` plus top-level ``query_tokens``).
- :func:`qformer_from_bert`: a Q-Former initialised from a BERT checkpoint, as BLIP-2 and PETAL do
  (seed ``001_e6226210b77e0466.txt`` §3.1: "we initialize Q-Former with the pre-trained weights of
  BERT_base, while the cross-attention layers are randomly initialized").
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlpeft_jax.errors import CheckpointError, ConfigError
from vlpeft_jax.hf import io
from vlpeft_jax.hf.io import KeyMap
from vlpeft_jax.models import layers
from vlpeft_jax.models.bert import BertConfig, BertModel, QFormer

Params = dict[str, Any]


# --------------------------------------------------------------------------------------------------
# Key maps


def _attention_maps(hf_prefix: str, path: str, inner_hf: str, inner_ours: str) -> list[KeyMap]:
    maps = []
    for proj in ("query", "key", "value"):
        maps += io.linear(f"{hf_prefix}.{inner_hf}.{proj}", f"{path}/{inner_ours}/{proj}")
    maps += io.linear(f"{hf_prefix}.output.dense", f"{path}/output/dense")
    maps += io.norm(f"{hf_prefix}.output.LayerNorm", f"{path}/output/LayerNorm")
    return maps


def _ffn_maps(hf_prefix: str, path: str, hf_suffix: str, our_suffix: str) -> list[KeyMap]:
    return (io.linear(f"{hf_prefix}.intermediate{hf_suffix}.dense", f"{path}/intermediate{our_suffix}/dense")
            + io.linear(f"{hf_prefix}.output{hf_suffix}.dense", f"{path}/output{our_suffix}/dense")
            + io.norm(f"{hf_prefix}.output{hf_suffix}.LayerNorm", f"{path}/output{our_suffix}/LayerNorm"))


def bert_key_map(config: BertConfig) -> list[KeyMap]:
    """HF ``BertModel`` keys (no ``bert.`` prefix) -> our :class:`BertModel` paths."""
    maps = [io.embedding(f"embeddings.{n}.weight", f"embeddings/{n}")
            for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
    maps += io.norm("embeddings.LayerNorm", "embeddings/LayerNorm")
    for i in range(config.num_hidden_layers):
        hf, ours = f"encoder.layer.{i}", f"encoder/layer_{i}"
        maps += _attention_maps(f"{hf}.attention", f"{ours}/attention", "self", "self")
        maps += _ffn_maps(hf, ours, "", "")
    if config.add_pooler:
        maps += io.linear("pooler.dense", "pooler/dense")
    return maps


def qformer_key_map(config: BertConfig) -> list[KeyMap]:
    """HF ``Blip2QFormerModel`` / ``InstructBlipQFormerModel`` keys (+ ``query_tokens``) -> our :class:`QFormer`."""
    maps = [KeyMap("query_tokens", "query_tokens")]
    if config.qformer_text_input:
        maps += [io.embedding(f"embeddings.{n}.weight", f"embeddings/{n}")
                 for n in ("word_embeddings", "position_embeddings")]
        maps += io.norm("embeddings.layernorm", "embeddings/layernorm")
    else:
        maps += io.norm("layernorm", "layernorm")
    for i in range(config.num_hidden_layers):
        hf, ours = f"encoder.layer.{i}", f"encoder/layer_{i}"
        maps += _attention_maps(f"{hf}.attention", f"{ours}/attention", "attention", "attention")
        if config.has_cross_attention(i):
            maps += _attention_maps(f"{hf}.crossattention", f"{ours}/crossattention", "attention", "attention")
        if config.separate_query_ffn:
            maps += _ffn_maps(hf, ours, "_query", "_query")
        if config.has_text_ffn:
            maps += _ffn_maps(hf, ours, "", "")
    return maps


def bert_to_qformer_key_map(config: BertConfig) -> list[KeyMap]:
    """HF ``BertModel`` keys -> the BERT-derived part of a :class:`QFormer` (as BLIP-2 initialises it).

    Self-attention, feed-forward and embeddings come from BERT; the query FFN is a copy of BERT's FFN
    (LAVIS ``Blip2Qformer.__init__`` copies every ``*_query`` weight from its text twin). Cross-attention
    and ``query_tokens`` are not in the map: they are freshly initialised.
    """
    if config.qformer_text_input:
        maps = [io.embedding(f"embeddings.{n}.weight", f"embeddings/{n}")
                for n in ("word_embeddings", "position_embeddings")]
        maps += io.norm("embeddings.LayerNorm", "embeddings/layernorm")
    else:
        maps = io.norm("embeddings.LayerNorm", "layernorm")
    for i in range(config.num_hidden_layers):
        hf, ours = f"encoder.layer.{i}", f"encoder/layer_{i}"
        maps += _attention_maps(f"{hf}.attention", f"{ours}/attention", "self", "attention")
        if config.separate_query_ffn:
            maps += _ffn_maps(hf, ours, "", "_query")
        if config.has_text_ffn:
            maps += _ffn_maps(hf, ours, "", "")
    return maps


# --------------------------------------------------------------------------------------------------
# Loading


def _normalise_keys(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Strips ``prefix`` where present and renames old TF-style ``LayerNorm.gamma/beta``."""
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} | {
            k: v for k, v in state.items() if "." not in k}  # keep top-level tensors (query_tokens)
    out = {}
    for k, v in state.items():
        if k.endswith("LayerNorm.gamma"):
            k = k[:-len("gamma")] + "weight"
        elif k.endswith("LayerNorm.beta"):
            k = k[:-len("beta")] + "bias"
        out[k] = v
    return out


def _config(model_dir: str | os.PathLike, **overrides: Any) -> BertConfig:
    try:
        return BertConfig.from_hf(io.load_config(model_dir), **overrides)
    except ConfigError as e:
        raise ConfigError(f"{model_dir}/config.json: {e}") from None


def _to_jax(tree: Any) -> Any:
    return jax.tree.map(jnp.asarray, tree)


def _bert_dummy_inputs() -> tuple[jax.Array]:
    return (jnp.zeros((1, 1), jnp.int32),)


def _qformer_dummy_inputs(config: BertConfig) -> tuple[jax.Array, jax.Array | None]:
    ids = jnp.zeros((1, 1), jnp.int32) if config.qformer_text_input else None
    return jnp.zeros((1, 1, int(config.encoder_hidden_size)), jnp.float32), ids


def load_bert(model_dir: str | os.PathLike, dtype: Any = jnp.float32) -> tuple[BertModel, Params]:
    """Loads a Hugging Face BERT checkpoint directory into :class:`BertModel` and its params.

    Keys may carry a ``bert.`` prefix (``BertForMaskedLM`` and friends); task heads are ignored; the pooler
    is part of the model iff the checkpoint has ``pooler.dense.weight``.

    Example (needs a checkpoint directory, so not run by the doctests; tests/models/test_bert.py loads one):
        >>> model, params = load_bert("path/to/all-MiniLM-L6-v2")  # doctest: +SKIP
        >>> out = model.apply({"params": params}, ids, mask)  # doctest: +SKIP
    """
    d = io.resolve_model_dir(model_dir)
    state = _normalise_keys(io.load_state_dict(d), "bert.")
    config = _config(d, dtype=dtype, add_pooler="pooler.dense.weight" in state)
    model = BertModel(config)
    abstract = layers.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), *_bert_dummy_inputs())))["params"]
    params = io.convert(state, bert_key_map(config), abstract, source=str(d))
    return model, _to_jax(params)


def load_qformer(model_dir: str | os.PathLike, num_query_tokens: int | None = None,
                 rng: jax.Array | None = None, dtype: Any = jnp.float32) -> tuple[QFormer, Params]:
    """Loads a BLIP-2 / InstructBLIP Q-Former checkpoint directory into :class:`QFormer` and its params.

    ``config.json`` is a ``blip_2_qformer`` / ``instructblip_qformer`` config, or a full ``blip-2`` /
    ``instructblip`` one. The query tokens are read from a ``query_tokens`` tensor when the checkpoint has
    one (full checkpoints do); otherwise they are initialised as BLIP-2 does, ``normal(0.02)`` from
    ``rng``, with ``num_query_tokens`` (or the config's) tokens.

    Example (needs a checkpoint directory, so not run by the doctests; tests/models/test_bert.py loads one):
        >>> qformer, params = load_qformer("path/to/qformer", num_query_tokens=32,
        ...                                rng=jax.random.key(0))  # doctest: +SKIP
        >>> out = qformer.apply({"params": params}, image_features)  # doctest: +SKIP
    """
    d = io.resolve_model_dir(model_dir)
    state = _normalise_keys(io.load_state_dict(d), "qformer.")
    config = _config(d, dtype=dtype)
    stored = state.get("query_tokens")
    if stored is not None:
        if stored.ndim != 3 or stored.shape[0] != 1 or stored.shape[2] != config.hidden_size:
            raise CheckpointError(f"{d}: tensor 'query_tokens' has shape {tuple(stored.shape)}; expected "
                                  f"(1, num_query_tokens, {config.hidden_size})")
        for name, n in (("num_query_tokens argument", num_query_tokens), ("config's num_query_tokens",
                                                                          config.num_query_tokens or None)):
            if n is not None and n != stored.shape[1]:
                raise CheckpointError(f"{d}: tensor 'query_tokens' holds {stored.shape[1]} tokens but the {name} "
                                      f"is {n}")
        num_query_tokens = int(stored.shape[1])
    num_query_tokens = num_query_tokens or config.num_query_tokens
    if not num_query_tokens:
        raise CheckpointError(f"{d} stores no 'query_tokens' and its config gives no num_query_tokens: pass "
                              "num_query_tokens (and rng) to initialise them")
    config = dataclasses.replace(config, num_query_tokens=int(num_query_tokens))
    if stored is None:
        if rng is None:
            raise CheckpointError(f"{d} stores no 'query_tokens': pass rng to initialise them (normal(0.02))")
        state = dict(state, query_tokens=np.asarray(
            config.initializer_range * jax.random.normal(rng, (1, num_query_tokens, config.hidden_size))))
    model = QFormer(config)
    abstract = layers.unbox(jax.eval_shape(
        lambda: model.init(jax.random.key(0), *_qformer_dummy_inputs(config))))["params"]
    params = io.convert(state, qformer_key_map(config), abstract, source=str(d))
    return model, _to_jax(params)


def qformer_from_bert(bert_dir: str | os.PathLike, num_query_tokens: int, cross_attention_frequency: int,
                      encoder_hidden_size: int, rng: jax.Array, *, qformer_text_input: bool = True,
                      dtype: Any = jnp.float32) -> tuple[QFormer, Params]:
    """A Q-Former initialised from a BERT checkpoint, as BLIP-2 / InstructBLIP / PETAL do.

    Self-attention, the feed-forward blocks (text and, copied, query) and the embeddings come from BERT
    (``embeddings.LayerNorm`` becomes the Q-Former's ``layernorm``; token type embeddings and the pooler
    are dropped). Cross-attention layers (BERT init: ``normal(0.02)`` weights, zero biases, unit
    LayerNorms) and ``query_tokens`` (``normal(0.02)``) are freshly initialised from ``rng``.
    ``qformer_text_input=True`` gives InstructBLIP's layout (the Q-Former embeds instructions), False
    BLIP-2's.

    Example (needs a BERT checkpoint directory, so not run by the doctests; tests/models/test_bert.py runs it):
        >>> qformer, params = qformer_from_bert("path/to/bert-base-uncased", num_query_tokens=32,
        ...     cross_attention_frequency=2, encoder_hidden_size=1408, rng=jax.random.key(0))  # doctest: +SKIP
    """
    d = io.resolve_model_dir(bert_dir)
    state = _normalise_keys(io.load_state_dict(d), "bert.")
    config = _config(d, dtype=dtype, add_pooler=False, num_query_tokens=int(num_query_tokens),
                     cross_attention_frequency=int(cross_attention_frequency),
                     encoder_hidden_size=int(encoder_hidden_size), qformer_text_input=qformer_text_input)
    if not config.is_qformer or num_query_tokens <= 0:
        raise ConfigError(f"qformer_from_bert needs cross_attention_frequency >= 1 and num_query_tokens >= 1; got "
                          f"{cross_attention_frequency} and {num_query_tokens}")
    model = QFormer(config)
    fresh = layers.unbox(model.init(rng, *_qformer_dummy_inputs(config)))["params"]
    params = io.convert(state, bert_to_qformer_key_map(config), fresh, source=str(d),
                        allow_missing=[r"query_tokens", r"encoder/layer_\d+/crossattention/.*"])
    return model, _to_jax(params)
