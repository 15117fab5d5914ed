"""``run.py export --run RUN_DIR --format peft --out DIR [--method NAME] [--with-base]``.

Writes the adapters of a finished run (``RUN_DIR/final``) in Hugging Face ``peft`` format
(``adapter_config.json`` + ``adapter_model.safetensors``, see :mod:`vlpeft_jax.hf.peft_io`).

- Which adapters: ``--method NAME`` (an instance name of the run's ``peft`` section); without it every
  method of the run is exported, into ``DIR`` if there is one and into ``DIR/<name>`` if there are several
  (peft's own layout for several adapters).
- Which model: peft adapters belong to one Hugging Face model. A run on a Hugging Face VLM checkpoint
  (``model.hf_dir``) whose key map peft export knows (LLaVA: :data:`vlpeft_jax.hf.peft_io.KEY_MAP_SOURCES`)
  exports for the whole VLM, keyed by transformers' module names
  (``base_model.model.model.language_model.layers.0...``, ``...model.vision_tower.encoder.layers.0...``), so
  adapters on the vision tower and the projector go too; ``base_model_name_or_path`` is ``model.hf_dir``, and
  ``--with-base`` writes the run's whole VLM checkpoint instead. For a VLM run of the shapes configs it is
  the decoder LM: our ``language_model/...`` prefix is stripped and the keys are the LM's own
  (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), so the adapter loads onto the LM
  alone (``LlamaForCausalLM``, ``GPT2LMHeadModel``). A method that also adapts the vision tower or the
  connector is refused with a message naming the module. For a decoder-only run there is no prefix.
- ``--with-base`` also writes the run's (trained or pretrained) LM as a Hugging Face checkpoint in
  ``DIR/base_model`` (``config.json`` + ``model.safetensors``) and records it as
  ``base_model_name_or_path``, so that in PyTorch::

      base = AutoModelForCausalLM.from_pretrained("DIR/base_model")
      model = PeftModel.from_pretrained(base, "DIR")

  gives the run's LM with its adapter (text-only inputs; the visual tokens come from our vision tower).
- Nothing is overwritten by surprise: ``--out`` must be a new or empty directory unless ``--force`` (which
  replaces the files this command writes and leaves any others); it is checked (not a file, writable) and
  every adapter is converted before the first file is written, and each file is written atomically
  (temporary file, then rename).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from vlpeft_jax import files
from vlpeft_jax.config import read_run_config
from vlpeft_jax.errors import ConfigError


def hf_config_dict(config: Any) -> dict[str, Any]:
    """A Hugging Face ``config.json`` for one of our decoder configs (GPT-2, LLaMA, Qwen2, OPT).

    Example:
        >>> from vlpeft_jax.models.gpt2 import GPT2Config
        >>> hf_config_dict(GPT2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4))["n_embd"]
        64
        >>> from vlpeft_jax.models.opt import OPTConfig
        >>> out = hf_config_dict(OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        ...                                word_embed_proj_dim=32, do_layer_norm_before=False))
        >>> out["architectures"], out["word_embed_proj_dim"], out["do_layer_norm_before"]
        (['OPTForCausalLM'], 32, False)
    """
    from vlpeft_jax.models.gpt2 import GPT2Config
    from vlpeft_jax.models.llama import LlamaConfig
    from vlpeft_jax.models.opt import OPTConfig

    if isinstance(config, GPT2Config):
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
                "n_positions": config.max_position_embeddings, "n_embd": config.hidden_size,
                "n_layer": config.num_hidden_layers, "n_head": config.num_attention_heads,
                "n_inner": config.intermediate_size, "activation_function": config.activation_function,
                "layer_norm_epsilon": config.layer_norm_epsilon, "scale_attn_weights": config.scale_attn_weights,
                "scale_attn_by_inverse_layer_idx": config.scale_attn_by_inverse_layer_idx,
                "tie_word_embeddings": config.tie_word_embeddings, "torch_dtype": "float32"}
    if isinstance(config, LlamaConfig):
        rope: dict[str, Any] = {"rope_type": config.rope_type, "rope_theta": config.rope_theta}
        if config.rope_type in ("linear", "llama3"):
            rope["factor"] = config.rope_factor
        if config.rope_type == "llama3":
            rope.update(low_freq_factor=config.rope_low_freq_factor, high_freq_factor=config.rope_high_freq_factor,
                        original_max_position_embeddings=config.rope_original_max_position_embeddings)
        out = {"architectures": ["Qwen2ForCausalLM" if config.model_type == "qwen2" else "LlamaForCausalLM"],
               "model_type": config.model_type, "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
               "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
               "num_attention_heads": config.num_attention_heads,
               "num_key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim,
               "hidden_act": config.hidden_act, "rms_norm_eps": config.rms_norm_eps,
               "rope_theta": config.rope_theta, "rope_parameters": rope,
               "tie_word_embeddings": config.tie_word_embeddings, "torch_dtype": "float32"}
        if config.model_type == "qwen2":
            out["use_sliding_window"] = False
        else:
            out.update(attention_bias=config.attention_bias, mlp_bias=config.mlp_bias)
        return out
    if isinstance(config, OPTConfig):
        if config.layer_norm_eps != 1e-5:
            raise ConfigError(f"OPT layer_norm_eps={config.layer_norm_eps} cannot be exported: transformers' OPT "
                              "has no such setting and always uses 1e-5")
        # dropout 0: our OPT has none (transformers' default of 0.1 acts only in training mode)
        return {"architectures": ["OPTForCausalLM"], "model_type": "opt", "vocab_size": config.vocab_size,
                "hidden_size": config.hidden_size, "ffn_dim": config.ffn_dim,
                "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
                "max_position_embeddings": config.max_position_embeddings,
                "word_embed_proj_dim": config.word_embed_proj_dim,
                "do_layer_norm_before": config.do_layer_norm_before,
                "_remove_final_layer_norm": config.remove_final_layer_norm,
                "enable_bias": config.enable_bias, "layer_norm_elementwise_affine": True,
                "activation_function": config.activation_function, "dropout": 0.0, "attention_dropout": 0.0,
                "layerdrop": 0.0, "tie_word_embeddings": config.tie_word_embeddings, "torch_dtype": "float32"}
    raise ConfigError(f"exporting the base model is supported for GPT-2, LLaMA/Qwen2 and OPT decoders, not "
                      f"{type(config).__name__}")


def write_hf_checkpoint(params: Any, config: Any, out_dir: Path) -> Path:
    """Our decoder parameters -> ``out_dir/config.json`` + ``model.safetensors`` (float32), each written
    atomically."""
    from safetensors.numpy import save

    from vlpeft_jax.hf import decoders

    state = decoders.to_hf_state_dict(jax.device_get(params), config)
    files.write_bytes(out_dir / "model.safetensors",
                      save({k: np.ascontiguousarray(v) for k, v in state.items()}, metadata={"format": "pt"}))
    files.write_text(out_dir / "config.json", json.dumps(hf_config_dict(config), indent=2) + "\n")
    return out_dir


def peft_base(setup: Any) -> tuple[Any, tuple[str, ...]]:
    """``(BaseModelInfo, prefix)``: the Hugging Face model a run's adapters are exported for.

    A run on a checkpoint folder (``setup.task.model_dir``) whose ``model_type`` peft export knows
    (:data:`vlpeft_jax.hf.peft_io.HF_CONFIG_READERS`, e.g. ``llava``): the whole model, prefix ``()``, with the
    folder as ``base_model_name_or_path``. Otherwise the decoder LM (prefix ``("language_model",)``) of a VLM,
    or the model itself.
    """
    from vlpeft_jax.hf import io, peft_io

    model_dir = getattr(setup.task, "model_dir", None)
    if model_dir is not None and io.load_config(model_dir).get("model_type") in peft_io.HF_CONFIG_READERS:
        return peft_io.BaseModelInfo.from_hf_dir(model_dir), ()
    module = setup.module
    lm = getattr(module, "language_model", None)
    prefix: tuple[str, ...] = ("language_model",) if lm is not None else ()
    return peft_io.BaseModelInfo.from_config((lm if lm is not None else module).config), prefix


def write_vlm_checkpoint(params: Any, model_dir: str | Path, out_dir: Path) -> Path:
    """A run's whole LLaVA -> ``out_dir/config.json`` (the checkpoint's, unchanged) + ``model.safetensors``
    (transformers 5's names, float32), each written atomically; loads with ``LlavaForConditionalGeneration``."""
    from safetensors.numpy import save

    from vlpeft_jax.hf import io
    from vlpeft_jax.hf.llava import LlavaConfig, llava_to_hf_state_dict

    hf_config = io.load_config(model_dir)
    if hf_config.get("model_type") != "llava":
        raise ConfigError(f"--with-base writes LLaVA and decoder checkpoints; {model_dir} is a "
                          f"{hf_config.get('model_type')!r} one (its adapters load onto {model_dir} itself)")
    state = llava_to_hf_state_dict(jax.device_get(params), LlavaConfig.from_hf(hf_config))
    files.write_bytes(out_dir / "model.safetensors",
                      save({k: np.ascontiguousarray(v) for k, v in state.items()}, metadata={"format": "pt"}))
    files.write_text(out_dir / "config.json", json.dumps({**hf_config, "torch_dtype": "float32"}, indent=2) + "\n")
    return out_dir


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="run.py export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished run directory")
    parser.add_argument("--format", choices=("peft",), default="peft", help="output format (peft)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--method", default=None, help="the PEFT method instance to export (default: all)")
    parser.add_argument("--with-base", action="store_true",
                        help="also write the run's LM as a Hugging Face checkpoint in OUT/base_model")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty --out directory (replacing the files this command writes)")
    args = parser.parse_args(argv)
    cfg = read_run_config(args.run)
    files.check_writable_dir(args.out, "--out")
    if args.out.is_dir() and any(args.out.iterdir()) and not args.force:
        raise ConfigError(f"--out {args.out} is not empty; choose a new or empty directory, or pass --force to "
                          "overwrite the adapter files in it")
    methods_cfg = dict(cfg.get("peft") or {})
    if not methods_cfg:
        raise ConfigError(f"{args.run}: the run has no PEFT methods (its config's peft section is empty); "
                          "nothing to export")
    if args.method is not None and args.method not in methods_cfg:
        raise ConfigError(f"--method {args.method!r} is not a method of {args.run}; its methods: "
                          f"{', '.join(methods_cfg)}")
    from vlpeft_jax.experiments import runner
    from vlpeft_jax.hf import peft_io

    setup, params = runner.load_final(args.run, cfg)
    methods = setup.methods
    info, prefix = peft_base(setup)
    names = [args.method] if args.method else list(methods)
    # Every adapter is converted before anything is written, so that a refused one leaves no partial output.
    exported = {n: peft_io.peft_state(methods[n], params["peft"][n], info, prefix=prefix) for n in names}
    if args.with_base:
        if info.base_model_name_or_path is not None:  # the whole VLM of model.hf_dir
            base_dir = write_vlm_checkpoint(params["base"], info.base_model_name_or_path, args.out / "base_model")
        else:
            lm_params = params["base"][prefix[0]] if prefix else params["base"]
            base_dir = write_hf_checkpoint(lm_params, info.config, args.out / "base_model")
        for config, _ in exported.values():
            config["base_model_name_or_path"] = str(base_dir.resolve())
        print(f"wrote the base {'model' if info.base_model_name_or_path else 'LM'} to {base_dir}")
    for name, (config, state) in exported.items():
        out = args.out if len(names) == 1 else args.out / name
        peft_io.write_peft_dir(config, state, out)
        print(f"wrote {name} ({type(methods[name]).__name__}) in peft format to {out}")
    return 0
