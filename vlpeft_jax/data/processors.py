"""A vision-language checkpoint's own input processing: its image processor config, tokenizer and image tokens.

Two pieces, both read from a local Hugging Face checkpoint directory:

* :func:`image_preprocessor_from_pretrained` turns ``preprocessor_config.json`` (or, as transformers 5
  saves it, the ``image_processor`` entry of ``processor_config.json``) into an
  :class:`~vlpeft_jax.data.images.ImagePreprocessor` whose pixel values equal the transformers image
  processor's (PIL backend). Settings missing from the file take the defaults of its
  ``image_processor_type`` (:data:`IMAGE_PROCESSOR_DEFAULTS`, those of transformers 5.24). Unknown types
  and settings we cannot honour (anyres grids, padding other than LLaVA's square padding, outputs of
  varying size) raise :class:`~vlpeft_jax.errors.InputError` naming them. The output is NHWC float32, the
  layout of the project's towers (transformers returns NCHW); ``data_format`` is therefore ignored, and
  images are always converted to RGB (``do_convert_rgb=False`` only matters to transformers for images
  that are not RGB, which no tower here can take).
* :class:`VLMProcessor` builds the numpy inputs of a LLaVA, BLIP-2 or InstructBLIP checkpoint: the
  prompt format (:mod:`vlpeft_jax.data.prompts`), the image token expanded as transformers' processors do,
  fixed-length padding (so jitted steps compile once), and training labels.

Image tokens, as transformers 5.24's processors place them:

* LLaVA (``LlavaProcessor``): every ``<image>`` in the text becomes ``n`` copies before tokenizing, with
  ``n = (H // patch) * (W // patch) + num_additional_image_tokens``, minus one for
  ``vision_feature_select_strategy="default"`` (the CLS feature is dropped); ``H, W`` are the processed
  image's. ``patch_size``/``num_additional_image_tokens`` come from ``processor_config.json`` or, when
  it lacks them, from the vision config (one CLS token for CLIP towers). The count must equal the vision
  tower's output for the model's image size, or :class:`InputError`.
* BLIP-2 / InstructBLIP (``Blip2Processor``, ``InstructBlipProcessor``): ``num_query_tokens`` image
  tokens are put *in front of the already padded text*: ``[image]*N + [pad...] + [bos] text`` with left
  padding. The language model finds the query outputs at the image-token positions
  (``config.image_token_index``); positions must therefore come from the attention mask (a cumulative
  sum), which is what OPT and transformers' ``generate`` do. A checkpoint whose config has no
  ``image_token_index`` (made before transformers 4.47) gets no image tokens (``num_image_tokens == 0``):
  its model prepends the query outputs itself. InstructBLIP's text also goes, unchanged, to the Q-Former
  tokenizer (``qformer_tokenizer/`` in the checkpoint), padded on its own side (right, for BERT).

Training batches (:meth:`VLMProcessor.training_batch`) are right-padded. Decoder-only LMs:
``prompt (with image tokens) target <eos>`` with ``labels = -100`` on the prompt, the image tokens and
padding. Encoder-decoder LMs (T5; ``encoder_decoder=True``): the prompt is the encoder input and
``labels = target <eos>`` alone, with ``decoder_input_ids`` the labels shifted right behind
``decoder_start_token_id`` (T5's ``_shift_right``).

Example:
    >>> import json, tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "preprocessor_config.json").write_text(json.dumps({
    ...     "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 8},
    ...     "crop_size": {"height": 8, "width": 8}}))
    >>> pre = image_preprocessor_from_pretrained(d)
    >>> pre.height_width, pre.crop, pre.resample
    ((8, 8), 'center', 'bicubic')
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vlpeft_jax.data.images import _RESAMPLE_BY_CODE, CLIP_MEAN, CLIP_STD, HALF_MEAN, HALF_STD, ImagePreprocessor
from vlpeft_jax.errors import InputError

IGNORE_INDEX = -100

# Class defaults of transformers 5.24's image processors (the PIL classes; the torchvision ones share them).
_CLIP_LIKE = {"do_resize": True, "size": {"shortest_edge": 224}, "default_to_square": False, "resample": 3,
              "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
              "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
              "do_convert_rgb": True}
IMAGE_PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "CLIPImageProcessor": _CLIP_LIKE,
    "LlavaImageProcessor": {**_CLIP_LIKE, "do_pad": False},
    "BlipImageProcessor": {"do_resize": True, "size": {"height": 384, "width": 384}, "default_to_square": True,
                           "resample": 3, "do_rescale": True, "do_normalize": True, "image_mean": list(CLIP_MEAN),
                           "image_std": list(CLIP_STD), "do_convert_rgb": True},
    "ViTImageProcessor": {"do_resize": True, "size": {"height": 224, "width": 224}, "resample": 2,
                          "do_rescale": True, "do_normalize": True, "image_mean": list(HALF_MEAN),
                          "image_std": list(HALF_STD)},
    "SiglipImageProcessor": {"do_resize": True, "size": {"height": 224, "width": 224}, "default_to_square": False,
                             "resample": 3, "do_rescale": True, "do_normalize": True,
                             "image_mean": list(HALF_MEAN), "image_std": list(HALF_STD), "do_convert_rgb": True},
}
_BASE_DEFAULTS = {"default_to_square": True, "rescale_factor": 1 / 255}
# Settings that change pixel values, all honoured here.
_HONOURED = {"do_convert_rgb", "do_resize", "size", "default_to_square", "resample", "do_center_crop", "crop_size",
             "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std", "do_pad", "pad_size",
             "use_square_size"}
# Bookkeeping and output-format keys that do not change pixel values.
_METADATA = {"image_processor_type", "feature_extractor_type", "processor_class", "_processor_class", "auto_map",
             "return_tensors", "data_format", "input_data_format", "device", "disable_grouping", "image_seq_length",
             "image_processor_class", "_valid_processor_keys", "_valid_kwargs_names"}


# ------------------------------------------------------------------------------------------ image config
def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_image_processor_config(model_dir: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """The image processor settings of a checkpoint directory and the file they came from.

    ``preprocessor_config.json`` (transformers 4 and the hub's checkpoints) is preferred; otherwise the
    ``image_processor`` entry of ``processor_config.json`` (what transformers 5's ``save_pretrained`` writes).
    """
    d = Path(model_dir)
    if (d / "preprocessor_config.json").is_file():
        return _read_json(d / "preprocessor_config.json"), d / "preprocessor_config.json"
    if (d / "processor_config.json").is_file():
        proc = _read_json(d / "processor_config.json")
        if isinstance(proc.get("image_processor"), dict):
            return dict(proc["image_processor"]), d / "processor_config.json"
    raise InputError(f"{d}: no image processor settings (neither preprocessor_config.json nor an 'image_processor' "
                     "entry in processor_config.json)")


# transformers' AutoImageProcessor choice by the checkpoint's model_type, for configs that name no type.
_TYPE_BY_MODEL = {"clip": "CLIPImageProcessor", "clip_vision_model": "CLIPImageProcessor",
                  "llava": "CLIPImageProcessor", "blip": "BlipImageProcessor", "blip-2": "BlipImageProcessor",
                  "instructblip": "BlipImageProcessor", "vit": "ViTImageProcessor", "siglip": "SiglipImageProcessor",
                  "siglip_vision_model": "SiglipImageProcessor"}


def _processor_type(cfg: Mapping[str, Any], source: str, model_type: str | None = None) -> str:
    name = cfg.get("image_processor_type") or cfg.get("feature_extractor_type")
    if not name:
        # No type named: the model's (as AutoImageProcessor would pick), else CLIP's, the towers' usual one.
        name = _TYPE_BY_MODEL.get(model_type or "", "CLIPImageProcessor")
    name = str(name).replace("FeatureExtractor", "ImageProcessor")
    for suffix in ("Fast", "Pil"):
        if name.endswith(suffix) and name[:-len(suffix)] in IMAGE_PROCESSOR_DEFAULTS:
            name = name[:-len(suffix)]
    if name not in IMAGE_PROCESSOR_DEFAULTS:
        extra = " (LLaVA-NeXT anyres tiling is not supported)" if "Next" in name else ""
        raise InputError(f"{source}: image_processor_type {name!r} is not supported{extra}; supported: "
                         f"{', '.join(IMAGE_PROCESSOR_DEFAULTS)}")
    return name


def _size_dict(value: Any, default_to_square: bool, key: str, source: str) -> dict[str, int]:
    """transformers' ``get_size_dict``: int -> square or shortest edge, (h, w) -> height/width."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or value is None:
        raise InputError(f"{source}: {key}={value!r} is not a size")
    if isinstance(value, int):
        return {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    if isinstance(value, Mapping) and set(value) in ({"height", "width"}, {"shortest_edge"}):
        return {k: int(v) for k, v in value.items()}
    raise InputError(f"{source}: {key}={value!r} is not supported; valid: an int, [height, width], "
                     "{'height', 'width'} or {'shortest_edge'} (variable output sizes such as longest_edge or "
                     "max_height/max_width cannot make fixed-size batches)")


def image_preprocessor_from_config(config: Mapping[str, Any], source: str = "image processor config",
                                   model_type: str | None = None) -> ImagePreprocessor:
    """An :class:`ImagePreprocessor` equal to the transformers image processor with these settings.

    A config without ``image_processor_type`` takes the defaults of the processor transformers'
    ``AutoImageProcessor`` picks for ``model_type`` (the checkpoint's), or CLIP's when that is unknown.

    Example:
        >>> image_preprocessor_from_config({"image_processor_type": "BlipImageProcessor", "size": 16}).size
        (16, 16)
        >>> image_preprocessor_from_config({"image_processor_type": "LlavaNextImageProcessor"})
        Traceback (most recent call last):
        ...
        vlpeft_jax.errors.InputError: image processor config: image_processor_type 'LlavaNextImageProcessor' \
is not supported (LLaVA-NeXT anyres tiling is not supported); supported: CLIPImageProcessor, LlavaImageProcessor, \
BlipImageProcessor, ViTImageProcessor, SiglipImageProcessor
    """
    kind = _processor_type(config, source, model_type)
    unknown = sorted(k for k in config if k not in _HONOURED and k not in _METADATA)
    if unknown:
        hint = " (image_grid_pinpoints is LLaVA-NeXT anyres tiling)" if "image_grid_pinpoints" in unknown else ""
        raise InputError(f"{source}: setting(s) {unknown} of {kind} cannot be honoured{hint}; understood: "
                         f"{', '.join(sorted(_HONOURED))}")
    cfg = {**_BASE_DEFAULTS, **IMAGE_PROCESSOR_DEFAULTS[kind]}
    cfg.update({k: v for k, v in config.items() if v is not None})
    square = bool(cfg.get("default_to_square", True))
    size = _size_dict(cfg.get("size"), square, "size", source) if cfg.get("size") is not None else None
    if cfg.get("use_square_size") and size is not None and "shortest_edge" in size:
        size = {"height": size["shortest_edge"], "width": size["shortest_edge"]}  # CLIP's KOSMOS-2 switch
    do_resize, do_crop = bool(cfg.get("do_resize")), bool(cfg.get("do_center_crop"))
    if do_resize and size is None:
        raise InputError(f"{source}: do_resize is set but there is no size")

    pad_to_square = False
    if cfg.get("do_pad"):
        if kind != "LlavaImageProcessor":
            raise InputError(f"{source}: do_pad={cfg['do_pad']!r} is not supported for {kind} (only "
                             "LlavaImageProcessor's pad-to-square is)")
        pad_to_square = True

    fields: dict[str, Any] = {"pad_to_square": pad_to_square, "do_resize": do_resize}
    if do_crop:
        crop = _size_dict(cfg.get("crop_size"), True, "crop_size", source)
        if "height" not in crop:
            raise InputError(f"{source}: crop_size={cfg.get('crop_size')!r} must give height and width")
        fields.update(size=(crop["height"], crop["width"]), crop="center")
        if do_resize:
            if "shortest_edge" in size:
                fields["resize_shortest_edge"] = size["shortest_edge"]
            else:
                fields["resize_hw"] = (size["height"], size["width"])
    else:
        if not do_resize or "height" not in size:
            raise InputError(f"{source}: without a centre crop the output size would vary from image to image "
                             f"(do_resize={do_resize}, size={cfg.get('size')!r}); batches need a fixed size")
        fields.update(size=(size["height"], size["width"]), crop="none")
    resample = cfg.get("resample", 2)
    if isinstance(resample, str):
        fields["resample"] = resample.lower()
    elif int(resample) in _RESAMPLE_BY_CODE:
        fields["resample"] = _RESAMPLE_BY_CODE[int(resample)]
    else:
        raise InputError(f"{source}: resample={resample!r} is not a PIL filter code; valid: "
                         f"{sorted(_RESAMPLE_BY_CODE)}")
    fields["rescale_factor"] = float(cfg["rescale_factor"]) if cfg.get("do_rescale") else None
    if cfg.get("do_normalize"):
        fields["mean"] = _channels(cfg.get("image_mean"), "image_mean", source)
        fields["std"] = _channels(cfg.get("image_std"), "image_std", source)
    else:
        fields["mean"], fields["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if pad_to_square:  # LLaVA pads with int(mean * 255) whether or not it normalises
        mean = cfg.get("image_mean")
        fields["pad_color"] = tuple(int(m * 255) for m in _channels(mean, "image_mean", source)) if mean else (0, 0, 0)
    return ImagePreprocessor(**fields)


def _channels(value: Any, key: str, source: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return tuple(float(v) for v in value)  # type: ignore[return-value]
    raise InputError(f"{source}: {key}={value!r} must be a number or 3 numbers")


def image_preprocessor_from_pretrained(model_dir: str | os.PathLike) -> ImagePreprocessor:
    """The :class:`ImagePreprocessor` of a checkpoint directory (see :func:`load_image_processor_config`).

    Example:
        >>> image_preprocessor_from_pretrained("/nonexistent")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        vlpeft_jax.errors.InputError: /nonexistent: no image processor settings ...
    """
    cfg, path = load_image_processor_config(model_dir)
    model_type = None
    if (Path(model_dir) / "config.json").is_file():
        model_type = _read_json(Path(model_dir) / "config.json").get("model_type")
    return image_preprocessor_from_config(cfg, str(path), model_type)
