"""Datasets: the synthetic shapes world, local COCO/VQA-format files, Hugging Face datasets, TFDS.

Every source yields the records of :mod:`vlpeft_jax.data.batching` (:class:`CaptionExample`,
:class:`VQAExample`), which :class:`CaptionBatches`, :class:`VQABatches` and :class:`EvalBatches` turn into
fixed-size numpy batches for a prefix VLM. ``datasets`` and ``tensorflow_datasets`` are imported only when
their loaders run.

Example:
    >>> from vlpeft_jax import data
    >>> world = data.generate(data.ShapesWorldConfig(num_train=4, num_val=1, num_test=1, num_ood=1))
    >>> tok = world.build_tokenizer()
    >>> batches = data.CaptionBatches(world.train.caption_examples("target"), tok,
    ...                               data.ImagePreprocessor(size=64), batch_size=2, max_length=48)
    >>> batches.batch(0)["input_ids"].shape
    (2, 48)
"""

from vlpeft_jax.data.batching import (
    IGNORE_INDEX,
    VQA_PROMPT_TEMPLATE,
    CaptionBatches,
    CaptionExample,
    DataSkipWarning,
    EpochSampler,
    EvalBatches,
    LoadedDataset,
    SkipReport,
    TextCodec,
    VQABatches,
    VQAExample,
    build_lm_sequences,
    build_prompt_sequences,
    text_codec,
    vqa_prompt,
)
from vlpeft_jax.data.coco import load_coco_captions, load_flickr30k, load_karpathy
from vlpeft_jax.data.hf_datasets import (
    hf_caption_examples,
    hf_vqa_examples,
    load_hf_captions,
    load_hf_dataset,
    load_hf_vqa,
)
from vlpeft_jax.data.images import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImagePreprocessor,
    decode_image,
)
from vlpeft_jax.data.processors import VLMProcessor, image_preprocessor_from_pretrained
from vlpeft_jax.data.prompts import PROMPT_FORMATS, PromptFormat
from vlpeft_jax.data.shapes import (
    CAPTION_INSTRUCTIONS,
    CAPTION_TASK_PROMPT,
    LABEL_CLASSES,
    VQA_INSTRUCTIONS,
    VQA_TASK_TEMPLATE,
    ShapesExample,
    ShapesSplit,
    ShapesWorld,
    ShapesWorldConfig,
    generate,
    load_or_generate,
    patch_masks,
    render_scene,
    shapes_tokenizer,
)
from vlpeft_jax.data.sources import check_data, load_split
from vlpeft_jax.data.tfds import load_tfds_captions, load_tfds_vqa, tfds_available
from vlpeft_jax.data.tokenizer import WordTokenizer
from vlpeft_jax.data.vqa import load_vqa_json, load_vqav2

__all__ = [
    "CAPTION_INSTRUCTIONS", "CAPTION_TASK_PROMPT", "CLIP_MEAN", "CLIP_STD", "IGNORE_INDEX", "IMAGENET_MEAN",
    "IMAGENET_STD", "LABEL_CLASSES", "PROMPT_FORMATS", "VQA_INSTRUCTIONS", "VQA_PROMPT_TEMPLATE", "VQA_TASK_TEMPLATE",
    "CaptionBatches", "CaptionExample", "DataSkipWarning", "EpochSampler", "EvalBatches", "ImagePreprocessor",
    "LoadedDataset", "PromptFormat", "ShapesExample", "ShapesSplit", "ShapesWorld", "ShapesWorldConfig", "SkipReport",
    "TextCodec", "VLMProcessor", "VQABatches", "VQAExample", "WordTokenizer", "build_lm_sequences",
    "build_prompt_sequences", "check_data", "decode_image", "generate", "hf_caption_examples", "hf_vqa_examples",
    "image_preprocessor_from_pretrained", "load_coco_captions",
    "load_flickr30k", "load_hf_captions", "load_hf_dataset", "load_hf_vqa", "load_karpathy", "load_or_generate",
    "load_split", "load_tfds_captions", "load_tfds_vqa", "load_vqa_json", "load_vqav2", "patch_masks", "render_scene",
    "shapes_tokenizer", "text_codec", "tfds_available", "vqa_prompt",
]
