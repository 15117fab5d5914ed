"""Prompt formats of vision-language models, as data.

A :class:`PromptFormat` says how a user's text (a captioning instruction or a VQA question) becomes the
text a checkpoint was trained on. It is built from a plain dict (a config section or a preset of
:data:`PROMPT_FORMATS`), never from per-model code branches:

* ``template``: a ``str.format`` template with the fields ``{prompt}`` (or its synonym ``{question}``)
  and ``{image}``, the place of the image. ``{image}`` is replaced by the processor's image token
  (``<image>`` for LLaVA), so a template does not hard-code the token's spelling; a literal ``<image>``
  works as well. LLaVA-1.5: ``"USER: {image}\\n{prompt} ASSISTANT:"``. BLIP-2 and InstructBLIP put the
  image in front of the text themselves (the processor prepends the query tokens), so their templates
  have no ``{image}``: BLIP-2's VQA prompt is ``"Question: {question} Answer:"``, its captioning prompt
  empty, InstructBLIP's the instruction itself (``"{prompt}"``).
* ``chat_template=True``: the text is rendered through the checkpoint's own chat template (the processor's
  ``chat_template.jinja``/``.json`` or the tokenizer's), as transformers' ``apply_chat_template`` does with
  one user turn holding an image item and a text item, and ``add_generation_prompt=True``.
* ``qformer_template``: InstructBLIP's instruction also goes to the Q-Former tokenizer. ``None`` gives it
  the same text as the language model (what transformers' ``InstructBlipProcessor`` does); a template
  (fields as above, without ``{image}``) gives it something else.
* ``target_separator``: what joins the prompt and a training target (``"USER: ... ASSISTANT:" + " " +
  "a cat"``); the target's tokens are those that follow the prompt's when the joined text is tokenized,
  so they match what the model sees when it continues the prompt.

Unknown keys or template fields raise :class:`~vlpeft_jax.errors.ConfigError` naming them.

Example:
    >>> fmt = PromptFormat.from_config("llava-1.5")
    >>> fmt.render("What is this?", image_token="<image>")
    'USER: <image>\\nWhat is this? ASSISTANT:'
    >>> PromptFormat.from_config({"template": "Question: {question} Answer:"}).render("Why?")
    'Question: Why? Answer:'
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Mapping
from typing import Any

from vlpeft_jax.errors import ConfigError

TEMPLATE_FIELDS = ("prompt", "question", "image")

# Presets: the formats the checkpoints were trained with (LLaVA-1.5: Liu et al. 2023, "Improved Baselines with
# Visual Instruction Tuning", and the llava-hf model cards; BLIP-2: Li et al. 2023, section 4.2 and the
# Salesforce model cards; InstructBLIP: Dai et al. 2023, the instruction is given to both Q-Former and LM).
PROMPT_FORMATS: dict[str, dict[str, Any]] = {
    "plain": {"template": "{prompt}"},
    "llava-1.5": {"template": "USER: {image}\n{prompt} ASSISTANT:"},
    "llava-chat": {"chat_template": True},
    "blip2-caption": {"template": ""},
    "blip2-vqa": {"template": "Question: {question} Answer:"},
    "instructblip": {"template": "{prompt}"},
}


def _fields(template: str, what: str) -> set[str]:
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ConfigError(f"{what} {template!r} is not a valid format string: {e}") from None
    bad = sorted(n for n in names if n not in TEMPLATE_FIELDS)
    if bad:
        raise ConfigError(f"{what} {template!r} has unknown field(s) {bad}; valid fields: "
                          f"{', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}")
    return names


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How a user's text becomes a model prompt; see the module docstring.

    Example:
        >>> PromptFormat(template="{prompt}", qformer_template="Q: {prompt}").render_qformer("hi")
        'Q: hi'
    """

    template: str = "{prompt}"
    chat_template: bool = False
    qformer_template: str | None = None
    target_separator: str = " "

    def __post_init__(self) -> None:
        if not isinstance(self.template, str):
            raise ConfigError(f"prompt template must be a string; got {type(self.template).__name__}")
        _fields(self.template, "prompt template")
        if self.qformer_template is not None:
            if "image" in _fields(self.qformer_template, "qformer_template"):
                raise ConfigError(f"qformer_template {self.qformer_template!r} may not contain {{image}}: the "
                                  "Q-Former sees the image through cross-attention, not as a token")
        if not isinstance(self.target_separator, str):
            raise ConfigError(f"target_separator must be a string; got {self.target_separator!r}")

    @classmethod
    def from_config(cls, config: PromptFormat | Mapping[str, Any] | str | None) -> PromptFormat:
        """From a dict of the dataclass fields, a preset name of :data:`PROMPT_FORMATS`, or None (``"plain"``).

        Example:
            >>> PromptFormat.from_config({"tmplate": "{prompt}"})  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            vlpeft_jax.errors.ConfigError: unknown prompt format key(s) ['tmplate']; valid: template, ...
        """
        if isinstance(config, PromptFormat):
            return config
        if config is None:
            config = "plain"
        if isinstance(config, str):
            if config not in PROMPT_FORMATS:
                raise ConfigError(f"unknown prompt format {config!r}; presets: {', '.join(PROMPT_FORMATS)} "
                                  "(or give a dict with 'template' or 'chat_template')")
            config = PROMPT_FORMATS[config]
        if not isinstance(config, Mapping):
            raise ConfigError(f"a prompt format is a dict, a preset name or None; got {type(config).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(k for k in config if k not in valid)
        if unknown:
            raise ConfigError(f"unknown prompt format key(s) {unknown}; valid: {', '.join(valid)}")
        return cls(**dict(config))

    def to_config(self) -> dict[str, Any]:
        """The dict :meth:`from_config` reads back."""
        return dataclasses.asdict(self)

    def render(self, text: str | None, image_token: str = "<image>", num_images: int = 1,
               chat_template: str | None = None, tokenizer: Any = None) -> str:
        """The language model's prompt for ``text`` (None: empty).

        ``{image}`` becomes ``num_images`` copies of ``image_token``. With ``chat_template=True`` the format
        renders through ``tokenizer.apply_chat_template`` with the template string ``chat_template`` (the
        checkpoint's), one user turn of ``num_images`` image items and the text.
        """
        text = "" if text is None else str(text)
        if self.chat_template:
            if tokenizer is None or not chat_template:
                raise ConfigError("prompt format has chat_template=True but the checkpoint has no chat template "
                                  "(no chat_template.jinja/.json, none in processor_config.json or the tokenizer); "
                                  "give a 'template' instead")
            content: list[dict[str, str]] = [{"type": "image"} for _ in range(num_images)]
            content.append({"type": "text", "text": text})
            return tokenizer.apply_chat_template([{"role": "user", "content": content}], chat_template=chat_template,
                                                 tokenize=False, add_generation_prompt=True)
        return self.template.format(prompt=text, question=text, image=image_token * num_images)

    def render_qformer(self, text: str | None, lm_prompt: str | None = None) -> str:
        """The Q-Former's text: ``qformer_template`` filled with ``text``, or else ``lm_prompt`` (the language
        model's rendered prompt, as transformers' InstructBLIP processor passes the same text to both)."""
        text = "" if text is None else str(text)
        if self.qformer_template is None:
            return text if lm_prompt is None else lm_prompt
        return self.qformer_template.format(prompt=text, question=text)


__all__ = ["PROMPT_FORMATS", "PromptFormat", "TEMPLATE_FIELDS"]
