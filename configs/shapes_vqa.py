"""Open-ended VQA on the shapes world: a base that answers source-style questions, adapted with LoRA.

The base (``configs/shapes_vqa_pretrain.py``, reused from ``.cache/pretrained`` or trained first) answers
*source-style* questions — the ``color``, ``shape`` and ``existence`` questions, about what the plain source
captions say (which objects, in which colours). LoRA (rank 8, alpha 16, dropout 0.05, every projection of
the decoder) is then trained on the *target-style* questions — ``count``, ``position``, ``relation``: counts,
positions and relations, which only the expressive target captions state. The report gives zero-shot (the
base) and adapted VQA accuracy (official, x100) and exact match on every question of the validation split
and per question type, so the gains on the new types and what the source-style types lose both show.

Variants: ``target_style`` (default, as above); ``all_types`` trains LoRA on every question type (the
source-style questions replayed beside the new ones); ``,smoke`` after either (or alone) is a seconds-long
run for tests. ``python run.py train --config configs/shapes_vqa.py[:VARIANT]``.
"""

import ml_collections

from configs import common
from vlpeft_jax.data.shapes import QUESTION_TYPES

VARIANTS = ("target_style", "all_types")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    name, opts = common.parse_variant(variant, "configs/shapes_vqa.py", VARIANTS, {"smoke": False},
                                      default="target_style")
    c = common.load("shapes_vqa_pretrain.py", "smoke" if opts["smoke"] else None)
    c.name = "shapes_vqa" if name == "target_style" else f"shapes_vqa_{name}"
    c.pretrain.config = common.path("shapes_vqa_pretrain.py", opts["smoke"])
    c.peft = dict(lora=dict(targets=[r"language_model/.*_proj"], rank=8, alpha=16.0, dropout=0.05))
    opt = common.adamw(3e-3)
    c.stages = [dict(name="lora", steps=1000, trainable=[["peft/lora/.*", "lora"]], optimizer=opt,
                     methods=["lora"])]
    source_style = set(c.train.question_types)
    c.train.question_types = [t for t in QUESTION_TYPES if name == "all_types" or t not in source_style]
    c.eval.zero_shot = True
    if opts["smoke"]:
        common.shrink_for_smoke(c)
    return c
