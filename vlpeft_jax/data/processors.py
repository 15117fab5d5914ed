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
  tokenizer (``qformer_tokenizer/`` in the checkpoint). Its padding side is the language model tokenizer's
  when that tokenizer was saved with one (transformers passes the LM tokenizer's init ``padding_side`` to
  both tokenizers, so a left-padded Vicuna left-pads the Q-Former text too, which shifts the Q-Former's
  absolute positions), else the Q-Former tokenizer's own; ``qformer_padding_side`` overrides it.

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

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlpeft_jax.data.images import _RESAMPLE_BY_CODE, CLIP_MEAN, CLIP_STD, HALF_MEAN, HALF_STD, ImagePreprocessor
from vlpeft_jax.data.prompts import PromptFormat
from vlpeft_jax.errors import CheckpointError, ConfigError, InputError

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


# ------------------------------------------------------------------------------------------ VLM processor
ANYRES_MODEL_TYPES = ("llava_next", "llava_next_video", "llava_onevision")
VLM_MODEL_TYPES = ("llava", "blip-2", "instructblip")
ENCODER_DECODER_LMS = ("t5", "mt5", "umt5")


def _chat_template(model_dir: Path, tokenizer: Any) -> str | None:
    """The checkpoint's chat template: ``chat_template.jinja``, ``chat_template.json``, ``processor_config.json``
    or the tokenizer's, in that order (where transformers 5 and 4 save it)."""
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json"):
        if (model_dir / name).is_file():
            template = _read_json(model_dir / name).get("chat_template")
            if isinstance(template, str) and template:
                return template
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) and template else None


def _image_token_of(tokenizer: Any, default: str, add: bool) -> tuple[str, int]:
    """The tokenizer's image token (its ``image_token`` when it names one) and its single id.

    ``add``: add ``default`` as a special token when the tokenizer names none, as transformers'
    ``Blip2Processor``/``InstructBlipProcessor`` do (a no-op when the vocabulary already has it).
    """
    token = getattr(tokenizer, "image_token", None)
    if not isinstance(token, str) or not token:
        token = default
        if add:
            from tokenizers import AddedToken

            tokenizer.add_tokens([AddedToken(token, normalized=False, special=True)], special_tokens=True)
    ids = list(tokenizer.encode(token, add_special_tokens=False))
    if len(ids) != 1:
        raise CheckpointError(f"the tokenizer splits the image token {token!r} into {len(ids)} ids {ids}; it must be "
                              "one special token")
    return token, int(ids[0])


def _padded(rows: Sequence[Sequence[int]], length: int, pad: int, side: str, what: str,
            prefixes: Sequence[Sequence[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``[n, length]`` ids and mask; ``prefixes`` (BLIP-2's image tokens) go before the padding."""
    n = len(rows)
    ids = np.full((n, length), pad, np.int32)
    mask = np.zeros((n, length), np.int32)
    for i, row in enumerate(rows):
        head = list(prefixes[i]) if prefixes is not None else []
        total = len(head) + len(row)
        if total > length:
            raise InputError(f"{what} of row {i} takes {total} tokens, more than max_length={length}; raise "
                             "max_length or shorten the prompt")
        ids[i, :len(head)] = head
        mask[i, :len(head)] = 1
        start = len(head) if side == "right" else length - len(row)
        ids[i, start:start + len(row)] = row
        mask[i, start:start + len(row)] = 1
    return ids, mask


@dataclasses.dataclass
class VLMProcessor:
    """Text and images of a LLaVA, BLIP-2 or InstructBLIP checkpoint as fixed-size numpy inputs.

    Built by :meth:`from_pretrained`; see the module docstring for the token layouts.

    Attributes:
        tokenizer: the language model's transformers tokenizer.
        image_preprocessor: the checkpoint's image preprocessing.
        prompt_format: how a user's text becomes the prompt.
        image_layout: ``"inline"`` (LLaVA: image tokens where the prompt has the image token) or ``"prefix"``
            (BLIP-2/InstructBLIP: image tokens before the text).
        image_token, image_token_id: the placeholder token and its id (None for a BLIP-2 checkpoint without
            ``image_token_index``).
        num_image_tokens: placeholder tokens per image (0: the model prepends the image itself).
        encoder_decoder: the LM is an encoder-decoder (T5): prompts go to the encoder, targets to ``labels``.
        qformer_tokenizer: InstructBLIP's Q-Former tokenizer (None otherwise).
        chat_template: the checkpoint's chat template, for ``PromptFormat(chat_template=True)``.
        padding_side: of the generation inputs (``"left"`` for decoder-only LMs, so that every row ends at the
            last position; ``"right"`` for encoder-decoder LMs, whose relative positions must not see padding).
        decoder_start_token_id: first decoder input of an encoder-decoder LM (T5: the pad id).
        qformer_padding_side: of the Q-Former text (module docstring); None: the Q-Former tokenizer's.

    Example (BLIP-2's layout, image tokens before the left padding):
        >>> from tokenizers import Tokenizer, models, pre_tokenizers
        >>> from transformers import PreTrainedTokenizerFast
        >>> tk = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<image>": 2, "what": 3, "?": 4}, "<pad>"))
        >>> tk.pre_tokenizer = pre_tokenizers.Whitespace()
        >>> tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>")
        >>> proc = VLMProcessor(tok, ImagePreprocessor(size=4), {"template": "{prompt} ?"}, image_layout="prefix",
        ...                     image_token="<image>", image_token_id=2, num_image_tokens=2)
        >>> x = proc.generation_inputs([np.zeros((8, 8, 3), np.uint8)], ["what"], max_length=6)
        >>> x["input_ids"].tolist(), x["attention_mask"].tolist(), x["pixel_values"].shape
        ([[2, 2, 0, 0, 3, 4]], [[1, 1, 0, 0, 1, 1]], (1, 4, 4, 3))
    """

    tokenizer: Any
    image_preprocessor: ImagePreprocessor
    prompt_format: PromptFormat
    image_layout: str
    image_token: str
    image_token_id: int | None
    num_image_tokens: int
    encoder_decoder: bool = False
    qformer_tokenizer: Any = None
    chat_template: str | None = None
    padding_side: str = "left"
    decoder_start_token_id: int | None = None
    qformer_padding_side: str | None = None

    def __post_init__(self) -> None:
        if self.image_layout not in ("inline", "prefix"):
            raise ConfigError(f"image_layout must be 'inline' or 'prefix'; got {self.image_layout!r}")
        if self.padding_side not in ("left", "right"):
            raise ConfigError(f"padding_side must be 'left' or 'right'; got {self.padding_side!r}")
        if self.image_layout == "inline" and self.num_image_tokens < 1:
            raise ConfigError("an inline image layout needs num_image_tokens >= 1")
        self.prompt_format = PromptFormat.from_config(self.prompt_format)
        if getattr(self.tokenizer, "eos_token_id", None) is None:
            raise CheckpointError(f"tokenizer {type(self.tokenizer).__name__} has no eos token; targets need one")

    # ------------------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, prompt_format: PromptFormat | Mapping[str, Any] | str |
                        None = None, encoder_decoder: bool | None = None, padding_side: str | None = None
                        ) -> VLMProcessor:
        """From a local checkpoint directory: ``config.json``, the tokenizer(s), the processor configs.

        ``prompt_format``: a :class:`PromptFormat`, its dict or a preset name; None: ``"llava-1.5"`` for
        LLaVA (the chat template's preset ``"llava-chat"`` when the checkpoint has one), ``"blip2-vqa"`` for
        BLIP-2, ``"instructblip"``. ``encoder_decoder``: None reads it from the LM's config.
        """
        from vlpeft_jax.data.tokenizer import load_pretrained_tokenizer as load_tokenizer

        d = Path(model_dir)
        if not (d / "config.json").is_file():
            raise CheckpointError(f"{d} has no config.json (needed to know the architecture)")
        cfg = _read_json(d / "config.json")
        model_type = cfg.get("model_type")
        if model_type in ANYRES_MODEL_TYPES or cfg.get("image_grid_pinpoints"):
            raise ConfigError(f"{d}: model_type {model_type!r} uses anyres image tiling (LLaVA-NeXT), which is out of "
                              f"scope; supported: {', '.join(VLM_MODEL_TYPES)}")
        if model_type not in VLM_MODEL_TYPES:
            raise CheckpointError(f"{d}: model_type {model_type!r} is not a supported vision-language checkpoint; "
                                  f"supported: {', '.join(VLM_MODEL_TYPES)}")
        proc_cfg = _read_json(d / "processor_config.json") if (d / "processor_config.json").is_file() else {}
        if model_type == "llava":
            _select_strategy(cfg, proc_cfg, str(d))  # before transformers reads config.json with the tokenizer
        tokenizer = load_tokenizer(d)
        pre = image_preprocessor_from_pretrained(d)
        text_cfg = cfg.get("text_config") or {}
        if encoder_decoder is None:
            encoder_decoder = (bool(text_cfg.get("is_encoder_decoder"))
                               or text_cfg.get("model_type") in ENCODER_DECODER_LMS)
        template = _chat_template(d, tokenizer)
        config_image_id = cfg.get("image_token_index", cfg.get("image_token_id"))
        qformer_tokenizer, qformer_side = None, None
        if model_type == "llava":
            token, token_id = _image_token_of(tokenizer, proc_cfg.get("image_token") or "<image>", add=False)
            if config_image_id is not None and int(config_image_id) != token_id:
                raise CheckpointError(f"{d}: config.json image_token_index={config_image_id} but the tokenizer gives "
                                      f"{token!r} the id {token_id}")
            num = _llava_image_tokens(cfg, proc_cfg, pre, str(d))
            layout = "inline"
            default_format = "llava-chat" if template else "llava-1.5"
        else:
            token, token_id = _image_token_of(tokenizer, "<image>", add=True)
            if config_image_id is None:  # made before transformers 4.47: the model prepends the queries itself
                num, token_id = 0, None
            else:
                if int(config_image_id) != token_id:
                    raise CheckpointError(f"{d}: config.json image_token_index={config_image_id} but the tokenizer "
                                          f"gives {token!r} the id {token_id}")
                num = int(cfg.get("num_query_tokens", 32))
            layout = "prefix"
            default_format = "instructblip" if model_type == "instructblip" else "blip2-vqa"
            if model_type == "instructblip":
                if not (d / "qformer_tokenizer").is_dir():
                    raise CheckpointError(f"{d}: an InstructBLIP checkpoint needs its Q-Former tokenizer in "
                                          f"{d / 'qformer_tokenizer'}")
                qformer_tokenizer = load_tokenizer(d / "qformer_tokenizer")
                if "padding_side" in (getattr(tokenizer, "init_kwargs", None) or {}):
                    qformer_side = tokenizer.padding_side
        start = text_cfg.get("decoder_start_token_id")
        if encoder_decoder and start is None:
            start = tokenizer.pad_token_id
        return cls(tokenizer=tokenizer, image_preprocessor=pre,
                   prompt_format=PromptFormat.from_config(prompt_format if prompt_format is not None
                                                          else default_format),
                   image_layout=layout, image_token=token, image_token_id=token_id, num_image_tokens=num,
                   encoder_decoder=encoder_decoder, qformer_tokenizer=qformer_tokenizer, chat_template=template,
                   padding_side=padding_side or ("right" if encoder_decoder else "left"),
                   decoder_start_token_id=None if start is None else int(start), qformer_padding_side=qformer_side)

    # ------------------------------------------------------------------------------------------- prompts
    def render(self, text: str | None, num_images: int = 1) -> str:
        """The language model's prompt text for a user's ``text`` (prompt format applied, image tokens
        not yet expanded)."""
        return self.prompt_format.render(text, image_token=self.image_token, num_images=num_images,
                                         chat_template=self.chat_template, tokenizer=self.tokenizer)

    def _encode(self, text: str, special: bool = True) -> list[int]:
        return [int(i) for i in self.tokenizer(text, add_special_tokens=special)["input_ids"]]

    def _expand(self, rendered: str, num_images: int, row: int) -> str:
        """LLaVA: checks the image-token count and repeats each ``num_image_tokens`` times."""
        found = rendered.count(self.image_token)
        if found != num_images:
            raise InputError(f"row {row}: the prompt {rendered!r} has {found} image token(s) {self.image_token!r} "
                             f"for {num_images} image(s); each image needs exactly one (put {{image}} in the "
                             "prompt template)")
        return rendered.replace(self.image_token, self.image_token * self.num_image_tokens)

    def _prompt_ids(self, text: str | None, num_images: int, row: int) -> tuple[list[int], list[int], str]:
        """(image-token prefix, prompt ids, rendered prompt) of one row."""
        rendered = self.render(text, num_images)
        if self.image_layout == "prefix":
            if num_images != 1:
                raise InputError(f"row {row}: BLIP-2/InstructBLIP take exactly one image per prompt; got {num_images}")
            if self.image_token in rendered:
                raise InputError(f"row {row}: the prompt {rendered!r} contains the image token {self.image_token!r}; "
                                 "BLIP-2/InstructBLIP put the image before the text themselves (no {image} in the "
                                 "template)")
            return [self.image_token_id] * self.num_image_tokens, self._encode(rendered), rendered
        ids = self._encode(self._expand(rendered, num_images, row))
        want = self.num_image_tokens * num_images
        if ids.count(self.image_token_id) != want:
            raise InputError(f"row {row}: tokenizing {rendered!r} gave {ids.count(self.image_token_id)} image-token "
                             f"ids, expected {want}; the image token must be a special token of the tokenizer")
        return [], ids, rendered

    def qformer_length(self, text: str | None, num_images: int = 1) -> int:
        """Tokens of the Q-Former text of ``text`` (InstructBLIP; 0 without a Q-Former tokenizer): what
        ``qformer_max_length`` must hold. transformers pads the Q-Former text of a batch to its longest row
        only, and the Q-Former's positions see that padding, so decoding pads to the longest text decoded."""
        if self.qformer_tokenizer is None:
            return 0
        rendered = self.render(text, num_images)
        return len(self.qformer_tokenizer(self.prompt_format.render_qformer(text, rendered))["input_ids"])

    def _qformer(self, texts: Sequence[str | None], rendered: Sequence[str], length: int) -> dict[str, np.ndarray]:
        if self.qformer_tokenizer is None:
            return {}
        rows = [[int(i) for i in self.qformer_tokenizer(self.prompt_format.render_qformer(t, r))["input_ids"]]
                for t, r in zip(texts, rendered, strict=True)]
        side = self.qformer_padding_side or getattr(self.qformer_tokenizer, "padding_side", "right")
        ids, mask = _padded(rows, length, int(self.qformer_tokenizer.pad_token_id), side, "Q-Former text")
        return {"qformer_input_ids": ids, "qformer_attention_mask": mask}

    def _images(self, images: Sequence[Any], n: int) -> tuple[list[list[Any]], list[Any]]:
        if len(images) != n:
            raise InputError(f"got {len(images)} image entries for {n} prompts; give one image (or, for LLaVA, a "
                             "list of images) per prompt")
        per_row = [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
        return per_row, [im for row in per_row for im in row]

    # -------------------------------------------------------------------------------------------- inputs
    def generation_inputs(self, images: Sequence[Any], texts: Sequence[str | None], max_length: int,
                          qformer_max_length: int | None = None) -> dict[str, np.ndarray]:
        """Padded prompts and pixel values for generation (``padding_side``), all ``max_length`` long.

        Returns ``input_ids``, ``attention_mask`` (int32 ``[b, max_length]``), ``pixel_values`` (float32
        ``[images, H, W, 3]``) and, for InstructBLIP, ``qformer_input_ids``/``qformer_attention_mask``
        (``qformer_max_length``, default ``max_length``, which is what transformers pads it to). Every check
        (image-token counts, lengths, image files) runs before anything is compiled.
        """
        per_row, flat = self._images(images, len(texts))
        prefixes, rows, rendered = [], [], []
        for i, (text, ims) in enumerate(zip(texts, per_row, strict=True)):
            prefix, ids, r = self._prompt_ids(text, len(ims), i)
            prefixes.append(prefix)
            rows.append(ids)
            rendered.append(r)
        ids, mask = _padded(rows, max_length, int(self._pad_id), self.padding_side, "prompt", prefixes)
        out = {"input_ids": ids, "attention_mask": mask,
               **self._qformer(texts, rendered, qformer_max_length or max_length)}
        out["pixel_values"] = self.image_preprocessor.batch(flat)
        return out

    def prompt_length(self, text: str | None, num_images: int = 1, row: int = 0) -> int:
        """Tokens the generation prompt of ``text`` takes (image tokens included): the ``max_length`` that
        :meth:`generation_inputs` needs for it. Checks the prompt as :meth:`generation_inputs` does."""
        prefix, ids, _ = self._prompt_ids(text, num_images, row)
        return len(prefix) + len(ids)

    @property
    def pad_token_id(self) -> int:
        """The id that pads prompts and follows a finished generation (the EOS when there is no pad token)."""
        return self._pad_id

    @property
    def _pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(self.tokenizer.eos_token_id if pad is None else pad)

    def training_batch(self, images: Sequence[Any], texts: Sequence[str | None], targets: Sequence[str],
                       max_length: int, max_target_length: int | None = None, qformer_max_length: int | None = None,
                       return_truncated: bool = False) -> dict[str, np.ndarray] | tuple[dict[str, np.ndarray], int]:
        """Right-padded training inputs with ``labels`` (module docstring); int32 ``[b, max_length]``.

        Decoder-only: ``input_ids``/``attention_mask``/``labels`` of ``prompt target <eos>``, labels -100 on
        the prompt, image tokens and padding; a target too long loses its end (counted, returned with
        ``return_truncated``). Encoder-decoder: ``input_ids``/``attention_mask`` of the prompt, ``labels`` of
        ``target <eos>`` (``max_target_length``, default ``max_length``), ``decoder_input_ids`` and
        ``decoder_attention_mask``. InstructBLIP adds the Q-Former inputs (``qformer_max_length``, default
        ``max_length``). ``pixel_values`` as
        :meth:`generation_inputs`.
        """
        if len(targets) != len(texts):
            raise InputError(f"got {len(targets)} targets for {len(texts)} prompts")
        per_row, flat = self._images(images, len(texts))
        eos, pad = int(self.tokenizer.eos_token_id), self._pad_id
        n = len(texts)
        ids = np.full((n, max_length), pad, np.int32)
        mask = np.zeros((n, max_length), np.int32)
        labels = np.full((n, max_length), IGNORE_INDEX, np.int32)
        rendered, truncated = [], 0
        target_rows: list[list[int]] = []
        for i, (text, target, ims) in enumerate(zip(texts, targets, per_row, strict=True)):
            prefix, prompt, r = self._prompt_ids(text, len(ims), i)
            rendered.append(r)
            head = prefix + prompt
            if len(head) >= max_length + (1 if self.encoder_decoder else 0):
                raise InputError(f"row {i}: the prompt takes {len(head)} tokens, leaving none of max_length="
                                 f"{max_length} for the target; raise max_length or shorten the prompt")
            if self.encoder_decoder:
                ids[i, :len(head)], mask[i, :len(head)] = head, 1
                target_rows.append(self._encode(target, special=False) + [eos])
                continue
            tail = self._target_ids(r, target, prompt, len(ims)) + [eos]
            if len(head) + len(tail) > max_length:
                truncated += 1
                tail = tail[:max_length - len(head)]
            row = head + tail
            ids[i, :len(row)], mask[i, :len(row)] = row, 1
            labels[i, len(head):len(row)] = tail
        out = {"input_ids": ids, "attention_mask": mask}
        if self.encoder_decoder:
            length = max_target_length or max_length
            labels = np.full((n, length), IGNORE_INDEX, np.int32)
            for i, tail in enumerate(target_rows):
                if len(tail) > length:
                    truncated += 1
                    tail = tail[:length]
                labels[i, :len(tail)] = tail
            start = self.decoder_start_token_id if self.decoder_start_token_id is not None else pad
            dec = np.concatenate([np.full((n, 1), start, np.int32), labels[:, :-1]], axis=1)
            out["decoder_input_ids"] = np.where(dec == IGNORE_INDEX, pad, dec).astype(np.int32)
            out["decoder_attention_mask"] = (labels != IGNORE_INDEX).astype(np.int32)
        out["labels"] = labels
        out.update(self._qformer(texts, rendered, qformer_max_length or max_length))
        out["pixel_values"] = self.image_preprocessor.batch(flat)
        return (out, truncated) if return_truncated else out

    def _target_ids(self, rendered: str, target: str, prompt_ids: list[int], num_images: int) -> list[int]:
        """The target's tokens as they follow the prompt when both are tokenized together (falls back to the
        target alone when the tokenizer merges across the boundary)."""
        joined = rendered + self.prompt_format.target_separator + target if rendered else target
        if self.image_layout == "inline":
            joined = joined.replace(self.image_token, self.image_token * self.num_image_tokens)
        full = self._encode(joined)
        if full[:len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
            tail = full[len(prompt_ids):]
        else:
            tail = self._encode((self.prompt_format.target_separator if rendered else "") + target, special=False)
        eos = int(self.tokenizer.eos_token_id)
        return tail[:-1] if tail and tail[-1] == eos else tail


def _select_strategy(cfg: Mapping[str, Any], proc_cfg: Mapping[str, Any], source: str) -> str:
    strategy = proc_cfg.get("vision_feature_select_strategy") or cfg.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ConfigError(f"{source}: vision_feature_select_strategy={strategy!r} is not supported; valid: "
                          "'default' (drop CLS), 'full'")
    return strategy


def _llava_image_tokens(cfg: Mapping[str, Any], proc_cfg: Mapping[str, Any], pre: ImagePreprocessor,
                        source: str) -> int:
    """Image tokens per image as transformers' LlavaProcessor counts them, checked against the vision tower."""
    strategy = _select_strategy(cfg, proc_cfg, source)
    vision = cfg.get("vision_config") or {}
    vision_type = str(vision.get("model_type", "clip_vision_model"))
    cls_tokens = 1 if vision_type.startswith("clip") else 0
    patch = int(proc_cfg.get("patch_size") or vision.get("patch_size", 14))
    extra = proc_cfg.get("num_additional_image_tokens")
    extra = cls_tokens if extra is None else int(extra)
    drop = 1 if strategy == "default" else 0
    h, w = pre.height_width
    num = (h // patch) * (w // patch) + extra - drop
    size = int(vision.get("image_size", 336 if vision_type.startswith("clip") else 224))
    vpatch = int(vision.get("patch_size", 14))
    tower = (size // vpatch) ** 2 + cls_tokens - drop
    if num != tower:
        raise InputError(f"{source}: the processor gives {num} image tokens per image ({h}x{w} pixels, patch {patch}, "
                         f"{extra} extra, strategy {strategy!r}) but the vision tower outputs {tower} features "
                         f"({size}x{size} pixels, patch {vpatch}); the image-token count must match")
    return num


__all__ = ["IMAGE_PROCESSOR_DEFAULTS", "VLMProcessor", "image_preprocessor_from_config",
           "image_preprocessor_from_pretrained", "load_image_processor_config"]
