"""Tiny vision-language checkpoint directories for tests, written with transformers.

Each builder writes what a real checkpoint directory holds: the tokenizer (a ``tokenizers`` WordLevel model
wrapped in ``PreTrainedTokenizerFast``, with ``<image>`` as a special token), the processor configs as
transformers' ``LlavaProcessor`` / ``Blip2Processor`` / ``InstructBlipProcessor`` ``save_pretrained`` writes
them (``processor_config.json`` with the image processor inside, ``chat_template.jinja``,
``qformer_tokenizer/``), and ``config.json`` of a tiny model; with ``with_weights=True`` also the random
weights (``torch.manual_seed(seed)``), so end-to-end tests can load the whole checkpoint. The builders return
``(directory, processor)``: the transformers processor is the reference to compare with.

Example:
    >>> import tempfile
    >>> d, proc = llava_dir(tempfile.mkdtemp())
    >>> type(proc).__name__, (d / "config.json").is_file()
    ('LlavaProcessor', True)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WORDS = ("USER ASSISTANT Question Answer Describe the image : ? . , ! a an cat cats dog dogs red blue green small "
         "big photo of what is this it in on and two there are color yes no picture short answer").split()
# LLaVA-1.5's chat template, reduced to what the tests need: images first, then the text, then "ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] + ' ' }}{% endif %}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def word_tokenizer(style: str = "decoder", image_token: bool = True, image_token_attr: bool = True,
                   padding_side: str = "left") -> Any:
    """A WordLevel tokenizer over :data:`WORDS`.

    ``style``: ``"decoder"`` (LLaMA/OPT-like: ``<s>`` prepended, ``</s>`` eos, ``<pad>``), ``"t5"``
    (``</s>`` appended, ``<pad>`` id 0, no bos) or ``"bert"`` (``[CLS] ... [SEP]``, the Q-Former's).
    ``image_token``: ``<image>`` is in the vocabulary as a special token; ``image_token_attr``: the tokenizer
    also names it (``tokenizer.image_token``), as llava-hf tokenizers do.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers import processors as tp
    from transformers import PreTrainedTokenizerFast

    specials = {"decoder": ["<pad>", "<s>", "</s>", "<unk>"], "t5": ["<pad>", "</s>", "<unk>"],
                "bert": ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]}[style]
    words = [w.lower() for w in WORDS] if style == "bert" else list(WORDS)
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + words))}
    unk = "[UNK]" if style == "bert" else "<unk>"
    tk = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if style == "decoder":
        tk.post_processor = tp.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
        kw = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    elif style == "t5":
        tk.post_processor = tp.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
        kw = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    else:
        from tokenizers import normalizers

        tk.normalizer = normalizers.Lowercase()
        tk.post_processor = tp.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
            ("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        kw = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]"}
    if image_token and image_token_attr:
        kw["extra_special_tokens"] = {"image_token": "<image>"}
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, padding_side=padding_side, **kw)
    if image_token and not image_token_attr:
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


def _save_weights(path: Path, model_cls: Any, config: Any, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    model_cls(config).eval().save_pretrained(path)


def _text_config(lm: str, vocab_size: int, tok: Any) -> Any:
    import transformers as tf

    common = {"vocab_size": vocab_size, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    if lm in ("llama", "qwen2"):
        cls = tf.LlamaConfig if lm == "llama" else tf.Qwen2Config
        return cls(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id, **common)
    if lm == "opt":
        return tf.OPTConfig(hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                            word_embed_proj_dim=32, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                            **common)
    if lm == "t5":
        return tf.T5Config(d_model=32, d_ff=48, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4,
                           feed_forward_proj="gated-gelu", decoder_start_token_id=tok.pad_token_id, **common)
    raise ValueError(f"unknown lm {lm!r}")


def llava_dir(path: str | Path, lm: str = "llama", image_size: int = 28, patch_size: int = 14,
              strategy: str = "default", chat_template: bool = True, image_token_attr: bool = True,
              with_weights: bool = False, seed: int = 0) -> tuple[Path, Any]:
    """A tiny LLaVA checkpoint (CLIP tower ``image_size``/``patch_size``, shortest edge + centre crop)."""
    import transformers as tf

    path = Path(path)
    tok = word_tokenizer("decoder", image_token_attr=image_token_attr)
    ip = tf.CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size,
                                                                                  "width": image_size})
    proc = tf.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch_size,
                             vision_feature_select_strategy=strategy, num_additional_image_tokens=1,
                             chat_template=LLAVA_CHAT_TEMPLATE if chat_template else None)
    proc.save_pretrained(path)
    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=image_size, patch_size=patch_size, projection_dim=32)
    config = tf.LlavaConfig(vision_config=vision, text_config=_text_config(lm, len(tok), tok),
                            image_token_index=proc.image_token_id, vision_feature_select_strategy=strategy,
                            vision_feature_layer=-2)
    config.save_pretrained(path)
    if with_weights:
        _save_weights(path, tf.LlavaForConditionalGeneration, config, seed)
    return path, proc


def _blip_vision_qformer(image_size: int, patch_size: int) -> tuple[Any, Any]:
    import transformers as tf

    vision = tf.Blip2VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=image_size, patch_size=patch_size)
    qformer = tf.Blip2QFormerConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, encoder_hidden_size=32, vocab_size=len(WORDS) + 8)
    return vision, qformer


def blip2_dir(path: str | Path, lm: str = "opt", num_query_tokens: int = 4, image_size: int = 16,
              patch_size: int = 8, image_token_index: bool = True, with_weights: bool = False,
              seed: int = 0) -> tuple[Path, Any]:
    """A tiny BLIP-2 checkpoint (OPT or Flan-T5-like LM); the processor adds ``<image>`` to the tokenizer."""
    import transformers as tf

    path = Path(path)
    style = "t5" if lm == "t5" else "decoder"
    tok = word_tokenizer(style, image_token=False, padding_side="right" if lm == "t5" else "left")
    ip = tf.BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    proc = tf.Blip2Processor(ip, tok, num_query_tokens=num_query_tokens)
    proc.save_pretrained(path)
    vision, qformer = _blip_vision_qformer(image_size, patch_size)
    image_id = tok.convert_tokens_to_ids("<image>")
    config = tf.Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                            text_config=_text_config(lm, len(tok), tok).to_dict(), num_query_tokens=num_query_tokens,
                            image_token_index=image_id if image_token_index else None)
    config.save_pretrained(path)
    if with_weights:
        _save_weights(path, tf.Blip2ForConditionalGeneration, config, seed)
    return path, proc


def instructblip_dir(path: str | Path, lm: str = "llama", num_query_tokens: int = 4, image_size: int = 16,
                     patch_size: int = 8, with_weights: bool = False, seed: int = 0) -> tuple[Path, Any]:
    """A tiny InstructBLIP checkpoint (Vicuna/LLaMA- or Flan-T5-like LM) with its Q-Former tokenizer."""
    import transformers as tf

    path = Path(path)
    style = "t5" if lm == "t5" else "decoder"
    tok = word_tokenizer(style, image_token=False, padding_side="right" if lm == "t5" else "left")
    qtok = word_tokenizer("bert", image_token=False, padding_side="right")
    ip = tf.BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    proc = tf.InstructBlipProcessor(ip, tok, qtok, num_query_tokens=num_query_tokens)
    proc.save_pretrained(path)
    vision = tf.InstructBlipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=image_size, patch_size=patch_size)
    qformer = tf.InstructBlipQFormerConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, encoder_hidden_size=32, vocab_size=len(qtok),
                                           pad_token_id=qtok.pad_token_id)
    config = tf.InstructBlipConfig(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                   text_config=_text_config(lm, len(tok), tok).to_dict(),
                                   num_query_tokens=num_query_tokens,
                                   image_token_index=tok.convert_tokens_to_ids("<image>"))
    config.save_pretrained(path)
    if with_weights:
        _save_weights(path, tf.InstructBlipForConditionalGeneration, config, seed)
    return path, proc


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON file of a checkpoint directory (tests use it to check what was written)."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
