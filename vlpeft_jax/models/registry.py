"""Models picked by name from a config (big_vision style).

A model config is a mapping with ``family`` and the family's Hugging Face config field names, e.g.
``{"family": "llama", "hidden_size": 128, "num_hidden_layers": 2, ...}``. VLMs nest them:
``{"family": "prefix_vlm", "vision": {...}, "decoder": {...}, "connector": {...}}`` or, InstructBLIP-like,
``{"family": "qformer_vlm", "vision": {...}, "qformer": {<BertConfig fields>}, "decoder": {...}}``.

Example:
    >>> import jax
    >>> m, inputs = build_model({"family": "gpt2", "vocab_size": 50, "hidden_size": 16,
    ...                          "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 32})
    >>> shapes = jax.eval_shape(m.init, jax.random.key(0), **inputs)
    >>> sorted(shapes["params"])
    ['transformer']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from vlpeft_jax.errors import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _config(cls: type, cfg: Mapping[str, Any], family: str) -> Any:
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in dict(cfg).items() if k != "family"}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ConfigError(f"model family {family!r} has no setting(s) {', '.join(unknown)}; "
                          f"valid: {', '.join(sorted(fields))}")
    if "dtype" in kwargs and isinstance(kwargs["dtype"], str):
        if kwargs["dtype"] not in DTYPES:
            raise ConfigError(f"model dtype {kwargs['dtype']!r}; valid: {', '.join(DTYPES)}")
        kwargs["dtype"] = DTYPES[kwargs["dtype"]]
    for k in ("image_size", "patch_size"):
        if k in kwargs and isinstance(kwargs[k], int):
            kwargs[k] = (kwargs[k], kwargs[k])
        elif k in kwargs:
            kwargs[k] = tuple(kwargs[k])
    return cls(**kwargs)


def _gpt2(cfg: Mapping[str, Any]) -> Any:
    from vlpeft_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(_config(GPT2Config, cfg, "gpt2"))


def _llama(cfg: Mapping[str, Any]) -> Any:
    from vlpeft_jax.models.llama import LlamaConfig, LlamaForCausalLM

    cfg = dict(cfg)
    if cfg.get("family") == "qwen2":
        cfg.setdefault("model_type", "qwen2")
    return LlamaForCausalLM(_config(LlamaConfig, cfg, str(cfg.get("family"))))


def _opt(cfg: Mapping[str, Any]) -> Any:
    from vlpeft_jax.models.opt import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(_config(OPTConfig, cfg, "opt"))


def _t5(cfg: Mapping[str, Any]) -> Any:
    from vlpeft_jax.models.t5 import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(_config(T5Config, cfg, "t5"))


def _vit(cfg: Mapping[str, Any]) -> Any:
    from vlpeft_jax.models.vit import ViTConfig, ViTModel

    return ViTModel(_config(ViTConfig, cfg, "vit"))


def _clip_vision(cfg: Mapping[str, Any]) -> Any:
    from vlpeft_jax.models.clip import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(_config(CLIPVisionConfig, cfg, "clip_vision"))


DECODERS: dict[str, Callable[[Mapping[str, Any]], Any]] = {"gpt2": _gpt2, "llama": _llama, "qwen2": _llama,
                                                            "opt": _opt}
ENCODER_DECODERS: dict[str, Callable[[Mapping[str, Any]], Any]] = {"t5": _t5}
VISION: dict[str, Callable[[Mapping[str, Any]], Any]] = {"vit": _vit, "clip_vision": _clip_vision}
VLMS = ("prefix_vlm", "qformer_vlm")
QFORMER_VLM_KEYS = ("family", "vision", "qformer", "decoder")
CLASSIFIERS = ("vision_classifier",)


def _family(cfg: Mapping[str, Any], valid: Mapping[str, Any] | tuple[str, ...], what: str) -> str:
    fam = cfg.get("family")
    if fam not in valid:
        raise ConfigError(f"{what}.family={fam!r}; valid: {', '.join(valid)}")
    return str(fam)


def build_decoder(cfg: Mapping[str, Any]) -> Any:
    """A decoder LM module from ``{"family": "gpt2"|"llama"|"qwen2"|"opt", <HF config fields>}``."""
    return DECODERS[_family(cfg, DECODERS, "decoder")](cfg)


def build_vision(cfg: Mapping[str, Any]) -> Any:
    """A vision tower from ``{"family": "vit"|"clip_vision", <HF config fields>}``."""
    return VISION[_family(cfg, VISION, "vision")](cfg)


def build_prefix_vlm(cfg: Mapping[str, Any]) -> Any:
    """A :class:`~vlpeft_jax.models.vlm.PrefixVLM` from ``vision``, ``decoder`` and ``connector`` settings."""
    from vlpeft_jax.models.vlm import ConnectorConfig, PrefixVLM

    for key in ("vision", "decoder"):
        if key not in cfg:
            raise ConfigError(f"model.{key} is missing; a prefix_vlm needs vision, decoder and connector settings")
    vision = build_vision(cfg["vision"])
    decoder = build_decoder(cfg["decoder"])
    connector = _config(ConnectorConfig, cfg.get("connector", {}), "connector")
    # Visual tokens enter as inputs_embeds: as wide as the token embeddings (OPT's word_embed_proj_dim).
    lm_width = getattr(decoder.config, "word_embed_proj_dim", None) or decoder.config.hidden_size
    return PrefixVLM(vision_tower=vision, language_model=decoder, connector=connector,
                     lm_width=lm_width, image_token_id=cfg.get("image_token_id"))


def build_qformer_vlm(cfg: Mapping[str, Any]) -> Any:
    """A :class:`~vlpeft_jax.models.vlm.QFormerVLM` (InstructBLIP-like) from ``vision``, ``qformer``, ``decoder``.

    ``qformer`` holds :class:`~vlpeft_jax.models.bert.BertConfig` fields (``hidden_size``, ``num_hidden_layers``,
    ``num_attention_heads``, ``intermediate_size``, ``cross_attention_frequency``, ``num_query_tokens``,
    ``vocab_size``, ``max_position_embeddings``, ...); ``encoder_hidden_size`` defaults to the vision tower's
    width and ``qformer_text_input`` to True (InstructBLIP: the Q-Former also reads an instruction). The
    ``num_query_tokens`` query outputs are prepended to the LM input (``image_token_id`` None).

    Example:
        >>> m = build_qformer_vlm({
        ...     "family": "qformer_vlm",
        ...     "vision": {"family": "vit", "image_size": 16, "patch_size": 8, "hidden_size": 12,
        ...                "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 24},
        ...     "qformer": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        ...                 "intermediate_size": 32, "cross_attention_frequency": 1, "num_query_tokens": 3,
        ...                 "vocab_size": 30, "max_position_embeddings": 16},
        ...     "decoder": {"family": "llama", "vocab_size": 30, "hidden_size": 16, "intermediate_size": 32,
        ...                 "num_hidden_layers": 1, "num_attention_heads": 2}})
        >>> m.qformer.config.encoder_hidden_size, m.num_query_tokens, m.lm_width
        (12, 3, 16)
    """
    from vlpeft_jax.models.bert import BertConfig, QFormer
    from vlpeft_jax.models.vlm import QFormerVLM

    unknown = sorted(set(cfg) - set(QFORMER_VLM_KEYS))
    if unknown:
        raise ConfigError(f"model family 'qformer_vlm' has no setting(s) {', '.join(unknown)}; "
                          f"valid: {', '.join(QFORMER_VLM_KEYS[1:])}")
    for key in QFORMER_VLM_KEYS[1:]:
        if not cfg.get(key):
            raise ConfigError(f"model.{key} is missing; a qformer_vlm needs vision, qformer and decoder settings")
    vision = build_vision(cfg["vision"])
    decoder = build_decoder(cfg["decoder"])
    q = dict(cfg["qformer"])
    q.setdefault("encoder_hidden_size", vision.config.hidden_size)
    q.setdefault("qformer_text_input", True)
    for key in ("cross_attention_frequency", "num_query_tokens"):
        if not isinstance(q.get(key), int) or q[key] < 1:
            raise ConfigError(f"model.qformer.{key}={q.get(key)!r}; a Q-Former needs an integer >= 1")
    qformer_cfg = _config(BertConfig, q, "qformer_vlm.qformer")
    lm_width = getattr(decoder.config, "word_embed_proj_dim", None) or decoder.config.hidden_size
    return QFormerVLM(vision, QFormer(qformer_cfg), decoder, lm_width=lm_width,
                      num_query_tokens=qformer_cfg.num_query_tokens, image_token_id=None)


def build_vision_classifier(cfg: Mapping[str, Any]) -> Any:
    """A :class:`~vlpeft_jax.models.classifier.VisionClassifier`: ``heads`` (``{name: num_classes}``), ``pool``,
    ``patch_heads`` (names of heads applied per patch token), and either ``vision`` (a tower config) or ``vlm``
    (a ``prefix_vlm`` config: its tower and Mapping Layer)."""
    from vlpeft_jax.models.classifier import VisionClassifier, check_heads
    from vlpeft_jax.models.vlm import ConnectorConfig

    unknown = sorted(set(cfg) - {"family", "vision", "vlm", "heads", "pool", "patch_heads"})
    if unknown:
        raise ConfigError(f"model family 'vision_classifier' has no setting(s) {', '.join(unknown)}; "
                          "valid: heads, patch_heads, pool, vision, vlm")
    if ("vision" in cfg) == ("vlm" in cfg):
        raise ConfigError("a vision_classifier needs exactly one of model.vision (a vision tower) and model.vlm "
                          "(a prefix_vlm whose visual tokens are classified)")
    heads = check_heads(cfg.get("heads") or {})
    if "vision" in cfg:
        return VisionClassifier(build_vision(cfg["vision"]), heads, pool=cfg.get("pool", "cls"),
                                patch_heads=tuple(cfg.get("patch_heads") or ()))
    vlm = cfg["vlm"]
    if vlm.get("family") != "prefix_vlm" or "vision" not in vlm or "decoder" not in vlm:
        raise ConfigError("model.vlm must be a prefix_vlm config with vision, decoder (its hidden_size sizes the "
                          "visual tokens) and connector settings")
    connector = _config(ConnectorConfig, vlm.get("connector", {}), "connector")
    return VisionClassifier(build_vision(vlm["vision"]), heads, pool=cfg.get("pool", "mean"), connector=connector,
                            connector_width=int(vlm["decoder"]["hidden_size"]),
                            patch_heads=tuple(cfg.get("patch_heads") or ()))


def build_ckt(cfg: Mapping[str, Any]) -> Any:
    """CK-Transformer (thesis ch. 3) from ``model`` settings: :class:`~vlpeft_jax.models.ckt.CKTConfig` fields
    (``vocab_size`` and ``region_feature_size`` are filled in by the refexp task)."""
    from vlpeft_jax.models.ckt import CKTConfig, CKTransformer

    fields = {f.name for f in dataclasses.fields(CKTConfig)}
    unknown = sorted(set(cfg) - fields - {"family"})
    if unknown:
        raise ConfigError(f"model: unknown key(s) {', '.join(unknown)} for family 'ckt'; valid: "
                          f"{', '.join(sorted(fields))}")
    return CKTransformer(CKTConfig(**{k: v for k, v in cfg.items() if k != "family"}))


def example_inputs(module: Any, batch: int = 1, seq: int = 8) -> dict[str, Any]:
    """Inputs for ``module.init`` / ``jax.eval_shape`` (shapes only matter)."""
    from vlpeft_jax.models.ckt import CKTransformer
    from vlpeft_jax.models.vlm import PrefixVLM, QFormerVLM

    if isinstance(module, CKTransformer):  # two candidates, one fact each
        c = module.config
        return {"regions": np.zeros((batch, 2, c.region_feature_size), np.float32),
                "geometry": np.zeros((batch, 2, c.geometry_size), np.float32),
                "region_mask": np.ones((batch, 2), bool), "expr_ids": np.zeros((batch, seq), np.int32),
                "expr_mask": np.ones((batch, seq), bool), "fact_ids": np.zeros((batch, 1, seq), np.int32),
                "fact_mask": np.ones((batch, 1, seq), bool), "fact_index": np.zeros((batch, 2, 1), np.int32)}

    ids = np.zeros((batch, seq), np.int32)
    if isinstance(module, (PrefixVLM, QFormerVLM)):
        vc = (module.vision_tower if isinstance(module, PrefixVLM) else module.vision_model).config
        h, w = vc.image_size
        out = {"input_ids": ids, "attention_mask": np.ones_like(ids),
               "pixel_values": np.zeros((batch, h, w, vc.num_channels), np.float32)}
        if isinstance(module, QFormerVLM) and module.qformer.config.qformer_text_input:
            # the instruction text creates the Q-Former's word and position embeddings at init
            out.update(qformer_input_ids=ids, qformer_attention_mask=np.ones_like(ids))
        return out
    if hasattr(module, "config") and hasattr(module.config, "image_size"):
        h, w = module.config.image_size
        return {"pixel_values": np.zeros((batch, h, w, module.config.num_channels), np.float32)}
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def build_model(cfg: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Any registered model and example init inputs, from its config mapping."""
    fam = cfg.get("family")
    if fam == "prefix_vlm":
        m = build_prefix_vlm(cfg)
    elif fam == "qformer_vlm":
        m = build_qformer_vlm(cfg)
    elif fam in DECODERS:
        m = build_decoder(cfg)
    elif fam in ENCODER_DECODERS:  # example inputs are the encoder's; the decoder starts from its start token
        m = ENCODER_DECODERS[fam](cfg)
    elif fam in VISION:
        m = build_vision(cfg)
    elif fam in CLASSIFIERS:
        m = build_vision_classifier(cfg)
    elif fam == "ckt":
        m = build_ckt(cfg)
    else:
        valid = [*DECODERS, *ENCODER_DECODERS, *VISION, *VLMS, *CLASSIFIERS, "ckt"]
        raise ConfigError(f"model.family={fam!r}; valid: {', '.join(valid)}")
    return m, example_inputs(m)
