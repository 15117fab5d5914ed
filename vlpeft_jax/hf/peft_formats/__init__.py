"""Hugging Face ``peft`` formats, one module per method family (the conversions behind :mod:`vlpeft_jax.hf.peft_io`).

Each module converts between a method's parameters and peft's ``adapter_config.json`` fields plus tensors,
in both directions, and exposes one :class:`~vlpeft_jax.hf.peft_io.PeftFormat` per registered method;
:data:`vlpeft_jax.hf.peft_io.PEFT_FORMATS` maps the method's registered name
(:data:`vlpeft_jax.peft.registry.METHODS`) to it. The method classes in :mod:`vlpeft_jax.peft` know nothing
of peft's format.

- :mod:`~vlpeft_jax.hf.peft_formats.lora`: LoRA and rsLoRA (``LORA``), DoRA (``LORA`` with ``use_dora``);
- :mod:`~vlpeft_jax.hf.peft_formats.ia3`: IA3 (``IA3``);
- :mod:`~vlpeft_jax.hf.peft_formats.prompts`: prefix tuning (``PREFIX_TUNING``) and prompt tuning
  (``PROMPT_TUNING``);
- :mod:`~vlpeft_jax.hf.peft_formats.llama_adapter`: LLaMA-Adapter (``ADAPTION_PROMPT``).
"""
