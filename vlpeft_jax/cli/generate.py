"""``run.py generate --model DIR|RUN_DIR --image IMG [--image IMG2 ...] --prompt TEXT [--max-new-tokens N]
[--num-beams B] [--length-penalty P] [--format PRESET] [--dtype D] [--json]``.

The quickest way to try a vision-language checkpoint, and what we compare with transformers' ``generate``:

- ``--model``: a local LLaVA, BLIP-2 or InstructBLIP checkpoint folder (transformers' ``save_pretrained``
  layout), or a run directory of ``run.py train`` on such a checkpoint (its adapters are then active: the
  run's final parameters over the checkpoint named in its config).
- Each ``--image`` is decoded with the checkpoint's own image processor and gets one output; every image gets
  the same ``--prompt``, placed in the checkpoint's prompt format (LLaVA: its chat template when it has
  one, else ``USER: <image>\\n{prompt} ASSISTANT:``; BLIP-2: ``Question: {prompt} Answer:``;
  InstructBLIP: the prompt itself, also given to the Q-Former), or in ``--format`` (a preset of
  :data:`vlpeft_jax.data.prompts.PROMPT_FORMATS`: ``plain`` passes the prompt as it is). A run directory
  uses the format the run trained with.
- Decoding: greedy with ``--num-beams 1`` (default), else beam search; at most ``--max-new-tokens`` tokens
  (default 30), stopping at the checkpoint's EOS (``generation_config.json`` when it has one).
- Output: one line per image, ``IMG: text``; with ``--json``,
  ``{"outputs": [{"image": ..., "text": ..., "token_ids": [...]}]}`` where ``token_ids`` are the new tokens only.

Every input is checked before anything is compiled: the folder, each image (a file the processor cannot read
is named), the prompt's image tokens and the options.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from vlpeft_jax.errors import ConfigError, InputError


def _positive(name: str):
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} {text!r}: expected an integer >= 1") from None
        if n < 1:
            raise argparse.ArgumentTypeError(f"{name} {n}: must be >= 1")
        return n

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run.py generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder or run directory")
    p.add_argument("--image", action="append", required=True, help="an image file (repeat for several)")
    p.add_argument("--prompt", default="", help="the text for the prompt format (default: empty)")
    p.add_argument("--max-new-tokens", type=_positive("--max-new-tokens"), default=30)
    p.add_argument("--num-beams", type=_positive("--num-beams"), default=1)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--format", default=None, help="prompt format preset (default: the checkpoint's or the run's)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--batch-size", type=_positive("--batch-size"), default=8)
    p.add_argument("--json", action="store_true", help="print JSON with the new tokens' ids")
    return p


def load(model: str, prompt_format: str | None, dtype: str) -> tuple[Any, Any, Any, list, list[int]]:
    """``(processor, module, params, active methods, stop ids)`` of a checkpoint folder or a run directory."""
    from vlpeft_jax.data.processors import VLMProcessor
    from vlpeft_jax.tasks import hf_vlm

    d = Path(model).expanduser()
    if not d.is_dir():
        raise ConfigError(f"--model {model!r}: no such folder (a checkpoint folder or a run directory)")
    if (d / "final").is_dir():  # a run directory
        import ml_collections

        from vlpeft_jax.config import read_run_config
        from vlpeft_jax.experiments import runner

        cfg = read_run_config(d)
        if not cfg.get("model") or "hf_dir" not in cfg.model:
            raise ConfigError(f"{d} is a run on a registry model ({cfg.model.get('family')!r}), not on a "
                              "Hugging Face checkpoint; use `run.py eval --run` for it")
        if prompt_format is not None:
            cfg.prompt = ml_collections.ConfigDict({**cfg.get("prompt", {}).to_dict(), "format": prompt_format})
        task = hf_vlm.task_for_inference(cfg)
        setup, params = runner.load_final(d, cfg, task=task)
        return task.processor, setup.module, params, setup.active(), task.stop_ids
    if not (d / "config.json").is_file():
        raise ConfigError(f"--model {model!r}: neither a checkpoint folder (config.json) nor a run directory "
                          "(final/)")
    from vlpeft_jax.hf import load_pretrained
    from vlpeft_jax.models.registry import DTYPES

    processor = VLMProcessor.from_pretrained(d, prompt_format=prompt_format)
    module, base = load_pretrained(d, dtype=DTYPES[dtype])
    return processor, module, {"base": base, "peft": {}}, [], hf_vlm.stop_token_ids(d, processor.tokenizer)


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from vlpeft_jax.data.images import check_image_file
    from vlpeft_jax.tasks.hf_vlm import generate_texts

    for image in args.image:
        check_image_file(image)
    if args.num_beams == 1 and args.length_penalty != 1.0:
        raise InputError("--length-penalty applies to beam search; give --num-beams >= 2")
    with contextlib.redirect_stdout(sys.stderr):  # progress lines: stdout holds only the outputs (--json)
        processor, module, params, methods, stop_ids = load(args.model, args.format, args.dtype)
    settings = {"batch_size": args.batch_size, "method": "greedy" if args.num_beams == 1 else "beam",
                "num_beams": args.num_beams, "length_penalty": args.length_penalty,
                "max_new_tokens": args.max_new_tokens}
    outputs = generate_texts(processor, module, params, methods, args.image, [args.prompt] * len(args.image),
                             settings, stop_ids)
    if args.json:
        rows = [{"image": im, **o} for im, o in zip(args.image, outputs, strict=True)]
        print(json.dumps({"outputs": rows}))
    else:
        for im, o in zip(args.image, outputs, strict=True):
            print(f"{im}: {o['text']}")
    return 0
