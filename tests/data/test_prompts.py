"""Prompt formats as data: presets, templates, chat templates rendered as transformers renders them, errors."""

from __future__ import annotations

import pytest

from tests.data import vlm_dirs
from vlpeft_jax.data.prompts import PROMPT_FORMATS, PromptFormat
from vlpeft_jax.errors import ConfigError


def test_templates_and_presets():
    llava = PromptFormat.from_config("llava-1.5")
    assert llava.render("What is this?", image_token="<image>") == "USER: <image>\nWhat is this? ASSISTANT:"
    assert llava.render("Hi", image_token="<img>", num_images=2) == "USER: <img><img>\nHi ASSISTANT:"
    assert PromptFormat.from_config("blip2-vqa").render("Why?") == "Question: Why? Answer:"
    assert PromptFormat.from_config("blip2-caption").render(None) == ""
    assert PromptFormat.from_config(None).render("as is {braces} stay") == "as is {braces} stay"
    for name, cfg in PROMPT_FORMATS.items():  # every preset is valid data and round-trips
        fmt = PromptFormat.from_config(name)
        assert PromptFormat.from_config(fmt.to_config()) == fmt == PromptFormat.from_config(dict(cfg))


def test_qformer_text():
    fmt = PromptFormat.from_config("instructblip")
    assert fmt.render_qformer("describe it", lm_prompt=fmt.render("describe it")) == "describe it"
    split = PromptFormat(template="USER: {prompt} ASSISTANT:", qformer_template="{question}")
    assert split.render_qformer("why?", lm_prompt=split.render("why?")) == "why?"
    assert PromptFormat(template="Q: {prompt}").render_qformer("x", lm_prompt="Q: x") == "Q: x"


def test_chat_template_renders_like_transformers(tmp_path):
    _, ref = vlm_dirs.llava_dir(tmp_path)
    fmt = PromptFormat.from_config("llava-chat")
    for n in (1, 2):
        conv = [{"role": "user", "content": [{"type": "image"}] * n + [{"type": "text", "text": "what is it ?"}]}]
        want = ref.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        assert fmt.render("what is it ?", num_images=n, chat_template=ref.chat_template,
                          tokenizer=ref.tokenizer) == want
    with pytest.raises(ConfigError, match="no chat template"):
        fmt.render("x", tokenizer=ref.tokenizer, chat_template=None)


def test_format_errors():
    with pytest.raises(ConfigError, match=r"unknown prompt format key\(s\) \['prompt'\]"):
        PromptFormat.from_config({"prompt": "x"})
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['answer'\]"):
        PromptFormat.from_config({"template": "Q: {question} A: {answer}"})
    with pytest.raises(ConfigError, match="not a valid format string"):
        PromptFormat(template="{prompt")
    with pytest.raises(ConfigError, match="unknown prompt format 'llava-2'"):
        PromptFormat.from_config("llava-2")
    with pytest.raises(ConfigError, match="may not contain"):
        PromptFormat(qformer_template="{image} {prompt}")
    with pytest.raises(ConfigError, match="a dict, a preset name or None"):
        PromptFormat.from_config(["{prompt}"])
