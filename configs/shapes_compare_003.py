"""Seed 003's comparison on the shapes world: zero-shot vs prompt learning, prefix tuning, LoRA, DoRA and
full fine-tuning of the source-pretrained prefix VLM, adapted to the target (expressive) caption style.

``python run.py sweep --config configs/shapes_compare_003.py --sweep table --seeds 0,1,2`` runs all
variants and writes one table (in-domain = target references, out-of-domain = source references) with
trainable-parameter % and a bar plot; ``python run.py train --config configs/shapes_compare_003.py:lora``
runs one. Add ``,smoke`` to a variant for a seconds-long run. Every variant trains the same number of
steps from the same cached base (``configs/shapes_pretrain.py``); the zero-shot row is the base itself.

Prompt learning is initialised from the text of the caption instruction (seed 003: the original
instruction), tokenised by the shapes world's tokenizer.

Example:
    >>> SWEEPS["table"]
    ['prompt', 'prefix', 'lora', 'dora', 'full']
"""

import ml_collections

from configs import common

SWEEPS = {"table": ["prompt", "prefix", "lora", "dora", "full"]}
LEARNING_RATES = {"full": 5e-4}  # every other method: 3e-3; a variant's ',lr=X' overrides


def get_config(variant: str = "lora") -> ml_collections.ConfigDict:
    kind, opts = common.parse_variant(variant, "configs/shapes_compare_003.py", SWEEPS["table"],
                                      {"smoke": False, "lr": 0.0}, default="lora")
    smoke, lr = opts["smoke"], opts["lr"] or LEARNING_RATES.get(kind, 3e-3)
    c = common.load("shapes_pretrain.py", "smoke" if smoke else None)
    c.name = f"shapes_003_{kind}"
    c.pretrain.config = common.path("shapes_pretrain.py", smoke)
    opt = common.adamw(lr)
    if kind == "full":
        c.peft = {}
        stage = dict(name="full", steps=400, trainable=[["base/.*", "full"]], optimizer=opt, methods=[])
    else:
        c.peft = {kind: common.baseline_method(kind, c.model.decoder)}
        stage = dict(name=kind, steps=400, trainable=[[f"peft/{kind}/.*", kind]], optimizer=opt, methods=[kind])
    c.stages = [stage]
    c.train.domain = "target"
    c.train.max_length = 40
    c.eval.zero_shot = True
    if smoke:
        common.shrink_for_smoke(c)
    return c
