"""Hugging Face checkpoints in (and, with :mod:`vlpeft_jax.hf.peft_io`, PEFT adapters out and in; the per-method
peft formats are in :mod:`vlpeft_jax.hf.peft_formats`).

:func:`load_pretrained` reads any supported local checkpoint directory by its ``model_type``; the
family loaders (:mod:`~vlpeft_jax.hf.decoders`, :mod:`~vlpeft_jax.hf.vision`, :mod:`~vlpeft_jax.hf.bert`)
hold the explicit key maps. Nothing here touches the network: a hub id fails at once with
:class:`~vlpeft_jax.errors.OfflineError`.

Example:
    >>> from vlpeft_jax.hf import SUPPORTED_MODEL_TYPES
    >>> sorted(SUPPORTED_MODEL_TYPES)[:3]
    ['bert', 'blip-2', 'blip_2_qformer']
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from vlpeft_jax.errors import CheckpointError
from vlpeft_jax.hf.io import load_config, load_state_dict, resolve_model_dir


def _loaders() -> dict[str, Callable[..., tuple[Any, dict]]]:
    from vlpeft_jax.hf.bert import load_bert, load_qformer
    from vlpeft_jax.hf.blip2 import load_blip2, load_instructblip
    from vlpeft_jax.hf.decoders import DECODER_LOADERS
    from vlpeft_jax.hf.llava import load_llava
    from vlpeft_jax.hf.t5 import load_t5
    from vlpeft_jax.hf.vision import VISION_LOADERS

    return {**DECODER_LOADERS, **VISION_LOADERS, "bert": load_bert, "blip_2_qformer": load_qformer, "t5": load_t5,
            "llava": load_llava, "blip-2": load_blip2, "instructblip": load_instructblip}


SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen2", "opt", "t5", "vit", "clip", "clip_vision_model", "bert",
                         "blip_2_qformer", "llava", "blip-2", "instructblip")
# whole vision-language checkpoints (vision tower + connector + language model)
VLM_MODEL_TYPES = ("llava", "blip-2", "instructblip")


def load_pretrained(model_dir: str | os.PathLike, **kwargs: Any) -> tuple[Any, dict]:
    """``(module, params)`` of a local Hugging Face checkpoint directory, chosen by its ``model_type``."""
    from vlpeft_jax.hf.llava import ANYRES_MODEL_TYPES, load_llava

    model_type = load_config(model_dir).get("model_type")
    loaders = _loaders()
    if model_type in ANYRES_MODEL_TYPES:  # load_llava names why these are out of scope (anyres tiling)
        return load_llava(model_dir, **kwargs)
    if model_type not in loaders:
        raise CheckpointError(f"{model_dir}: model_type {model_type!r} is not supported; supported: "
                              f"{', '.join(sorted(loaders))}")
    return loaders[model_type](model_dir, **kwargs)


def abstract_pretrained(model_dir: str | os.PathLike, **kwargs: Any) -> tuple[Any, dict]:
    """``(module, parameter shapes)`` of a vision-language checkpoint from its ``config.json`` alone (no weights
    read, nothing allocated): what ``run.py params`` counts."""
    from vlpeft_jax.hf import blip2, llava

    config = load_config(model_dir)
    model_type = config.get("model_type")
    if model_type in ("blip-2", "instructblip"):
        module = blip2.build_qformer_vlm(config, source=f"{model_dir}/config.json", **kwargs)
        return module, blip2.abstract_params(module)
    if model_type == "llava" or model_type in llava.ANYRES_MODEL_TYPES:
        module = llava.LlavaConfig.from_hf(config, **kwargs).build()
        return module, llava.abstract_params(module)
    raise CheckpointError(f"{model_dir}: model_type {model_type!r} is not a vision-language checkpoint; supported: "
                          f"{', '.join(VLM_MODEL_TYPES)}")


def load_tokenizer(model_dir: str | os.PathLike) -> Any:
    """The tokenizer saved in a checkpoint directory (transformers ``AutoTokenizer``, offline)."""
    from vlpeft_jax.data.tokenizer import load_pretrained_tokenizer

    return load_pretrained_tokenizer(resolve_model_dir(model_dir))


__all__ = ["SUPPORTED_MODEL_TYPES", "VLM_MODEL_TYPES", "abstract_pretrained",
           "load_config", "load_pretrained", "load_state_dict", "load_tokenizer",
           "resolve_model_dir"]
