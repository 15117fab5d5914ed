"""What the experiment configs share: composing configs, variant parsing, optimizer presets, smoke shrinking.

Config files import this module (``from configs import common``) and the public library only.

Example:
    >>> from configs import common
    >>> common.parse_variant("lora,smoke,lr=0.01", "configs/x.py", ("lora", "dora"), {"smoke": False, "lr": 3e-3})
    ('lora', {'smoke': True, 'lr': 0.01})
    >>> common.adamw(3e-3)["warmup_steps"]
    30
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from vlpeft_jax.config import load_config_file
from vlpeft_jax.errors import ConfigError

HERE = Path(__file__).resolve().parent


def load(name: str, variant: str | None = None) -> ml_collections.ConfigDict:
    """The config ``configs/<name>`` (e.g. ``shapes_pretrain.py``), for configs built on another one."""
    return load_config_file(HERE / name, variant or None)


def path(name: str, smoke: bool = False) -> str:
    """``configs/<name>`` as a config reference (``:smoke`` appended when asked), e.g. for ``pretrain.config``."""
    return str(HERE / name) + (":smoke" if smoke else "")


def adamw(learning_rate: float, *, weight_decay: float = 0.0, warmup_steps: int = 30, schedule: str = "cosine",
          clip_norm: float | None = 1.0) -> dict[str, Any]:
    """The stage optimizer the shapes configs use: AdamW, linear warm-up then cosine decay, clipping at 1."""
    opt: dict[str, Any] = dict(name="adamw", learning_rate=learning_rate, weight_decay=weight_decay,
                               warmup_steps=warmup_steps, schedule=schedule)
    if clip_norm is not None:
        opt["clip_norm"] = clip_norm
    return opt


def parse_variant(variant: str | None, where: str, names: Sequence[str], options: Mapping[str, Any],
                  default: str | None = None) -> tuple[str, dict[str, Any]]:
    """Splits ``"NAME,opt,key=value,..."`` into the name and the options, refusing anything unknown.

    ``options`` maps each option to its default: a bool default makes a flag (``smoke``), any other type a
    ``key=value`` option parsed as that type (numbers must be > 0). With ``names`` empty the config has no
    named variants: every part must be an option (``smokey`` is refused, not taken as a name), and the name
    returned is ``default or ""``.

    Example:
        >>> parse_variant("smokey", "configs/x.py", (), {"smoke": False})
        Traceback (most recent call last):
        ...
        vlpeft_jax.errors.ConfigError: configs/x.py:smokey: unknown variant or option 'smokey'; valid: options smoke

    Raises:
      ConfigError: naming ``where``, the bad part and what is valid.
    """
    parts = [v.strip() for v in (variant or "").split(",") if v.strip()]
    named = bool(names) and bool(parts) and "=" not in parts[0] and parts[0] not in options
    name = parts.pop(0) if named else (default or "")
    flags = [k for k, v in options.items() if isinstance(v, bool)]
    valued = [f"{k}=X" for k, v in options.items() if not isinstance(v, bool)]
    option_list = ", ".join(flags + valued)
    if names:
        valid = ", ".join(names) + (f" (options: {option_list})" if options else "")
    else:
        valid = f"options {option_list}" if options else "no variants (use the file without ':...')"
    if names and name not in names:
        raise ConfigError(f"{where}:{variant}: unknown variant {name!r}; valid: {valid}")
    opts = dict(options)
    for part in parts:
        key, eq, value = part.partition("=")
        if key not in options or isinstance(options[key], bool) == bool(eq):
            what = "unknown variant or option" if not names and not eq and key not in options else "bad option"
            raise ConfigError(f"{where}:{variant}: {what} {part!r}; valid: {valid}")
        if isinstance(options[key], bool):
            opts[key] = True
            continue
        kind = type(options[key])
        try:
            parsed = kind(value)
            if isinstance(parsed, (int, float)) and parsed <= 0:
                raise ValueError(value)
        except ValueError:
            raise ConfigError(f"{where}:{variant}: bad option {part!r} ({key} must be a positive "
                              f"{kind.__name__}); valid: {valid}") from None
        opts[key] = parsed
    return name, opts


def shrink_for_smoke(c: ml_collections.ConfigDict) -> None:
    """Shrinks a shapes config in place to a seconds-long run (tests, ``configs/X.py:smoke``)."""
    c.data.update(num_train=32, num_val=8, num_test=8, num_ood=8)
    c.model.vision.update(hidden_size=32, num_hidden_layers=1, intermediate_size=64)
    if "decoder" in c.model:
        c.model.decoder.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    for s in c.stages:
        s["steps"] = 4
        s["optimizer"]["warmup_steps"] = 0
        for group in s["optimizer"].get("groups", {}).values():
            group["warmup_steps"] = 0
    c.train.batch_size = 8
    c.train.progress = False
    c.eval.update(max_examples=8, batch_size=8, max_new_tokens=8)


# Data layouts under ``data.root`` (override any path with --config.data.splits.<split>.<key>=...).
COCO_SPLITS = {"train": {"annotations": "annotations/captions_train2017.json", "images": "train2017"},
               "val": {"annotations": "annotations/captions_val2017.json", "images": "val2017"}}
VQAV2_SPLITS = {"train": {"questions": "v2_OpenEnded_mscoco_train2014_questions.json",
                          "annotations": "v2_mscoco_train2014_annotations.json", "images": "train2014"},
                "val": {"questions": "v2_OpenEnded_mscoco_val2014_questions.json",
                        "annotations": "v2_mscoco_val2014_annotations.json", "images": "val2014"}}


def checkpoint_config(name: str, task: str, *, peft: Mapping[str, Any], prompt: Mapping[str, Any],
                      learning_rate: float, steps: int) -> ml_collections.ConfigDict:
    """A run adapting a Hugging Face vision-language checkpoint (``model.hf_dir``) on COCO captions or VQAv2
    under ``data.root``: one stage training every method of ``peft``; caption metrics or VQA accuracy."""
    if task not in ("captioning", "vqa"):
        raise ConfigError(f"task={task!r}; valid: captioning, vqa")
    c = ml_collections.ConfigDict()
    c.task, c.name, c.seed, c.run_dir = task, name, 0, ""
    c.model = dict(hf_dir="", dtype="float32")
    splits = COCO_SPLITS if task == "captioning" else VQAV2_SPLITS
    c.data = dict(kind="coco" if task == "captioning" else "vqa", root="", on_error="skip", images="lazy",
                  max_examples=0, splits={k: dict(v) for k, v in splits.items()})
    c.prompt = dict(prompt)
    c.peft = {k: dict(v) for k, v in peft.items()}
    trainable = [[f"peft/{k}/.*", k] for k in peft]
    c.stages = [dict(name="adapt", steps=steps, trainable=trainable, optimizer=adamw(learning_rate, warmup_steps=50),
                     methods=list(peft))]
    c.train = dict(batch_size=8, max_length=48, max_target_length=0, checkpoint_every=500, progress=True)
    c.eval = dict(split="val", max_examples=500, batch_size=8, method="beam", num_beams=3, length_penalty=1.0,
                  max_new_tokens=30 if task == "captioning" else 10,
                  metrics=["BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"], zero_shot=False)
    c.pretrain = dict(config="", cache_dir=".cache/pretrained")
    return c


def shrink_checkpoint_run(c: ml_collections.ConfigDict) -> None:
    """A seconds-long variant of a checkpoint run (tests): a few steps, few examples, greedy decoding."""
    for s in c.stages:
        s["steps"] = 3
        s["optimizer"]["warmup_steps"] = 0
    c.train.update(batch_size=2, checkpoint_every=0, progress=False)
    c.data.max_examples = 4
    c.eval.update(max_examples=4, batch_size=2, method="greedy", num_beams=1, max_new_tokens=4)


PETAL_NO_DECAY = [r"(?:.*/)?(?:bias|scale|embedding|gamma|mode|lambda)"]
"""PETAL's leaves without weight decay: biases, norms, embeddings, and its Γ, mode vectors and λ (decaying Γ would
pull the frozen W0's weight towards 0; seed 001 spec §5)."""


def petal_stage(petal: Mapping[str, Any], optimizer: dict, estimator_group: Mapping[str, Any], steps: int) -> dict:
    """One stage training ``peft.petal`` with ``optimizer`` (PETAL's no-decay leaves added) and, when PETAL has an IB
    loss, its estimators (``peft/petal/sib``) in their own group ``ib_estimators`` (spec A20)."""
    opt = dict(optimizer, no_decay=list(PETAL_NO_DECAY))
    trainable = [["peft/petal/.*", "petal"]]
    if petal.get("ib_weight", 0.05):
        opt["groups"] = {"ib_estimators": dict(estimator_group)}
        trainable.insert(0, ["peft/petal/sib/.*", "ib_estimators"])
    return dict(name="adapt", steps=steps, trainable=trainable, optimizer=opt, methods=["petal"])


SHAPES_LM_LAYERS = "language_model/model/layers_\\d+"
CAPTION_INSTRUCTION = "a short description of the image"


def baseline_method(kind: str, dec: Mapping[str, Any]) -> dict[str, Any]:
    """The PEFT baselines of the shapes comparisons (seed 003's set-up) on the prefix VLM's decoder ``dec``:
    ``prompt`` (initialised from the caption instruction's tokens), ``prefix``, ``lora`` / ``dora`` (rank 8)."""
    from vlpeft_jax.data.shapes import shapes_tokenizer

    if kind == "prompt":
        ids = tuple(shapes_tokenizer().encode(CAPTION_INSTRUCTION, add_special_tokens=False))
        return dict(method="prompt", num_virtual_tokens=len(ids), init_from="text", init_token_ids=ids,
                    targets=["language_model/model/embed_tokens"])
    if kind == "prefix":
        return dict(method="prefix", num_virtual_tokens=8, num_kv_heads=dec["num_key_value_heads"],
                    targets=[f"{SHAPES_LM_LAYERS}/self_attn"], projection=True, type_embedding=True)
    return dict(method=kind, targets=[f"{SHAPES_LM_LAYERS}/.*_proj"], rank=8, alpha=16.0, dropout=0.0)  # lora, dora
