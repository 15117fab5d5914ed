"""The main job: adapt the source-pretrained shapes VLM to the target caption style with LoRA.

``python run.py`` runs this. It reuses (or first trains) the base of ``configs/shapes_pretrain.py``,
adds LoRA (rank 8, alpha 16, dropout 0.05) to every projection of the decoder, trains the LoRA factors
on target-domain captions, and reports zero-shot vs adapted scores on both domains.
"""

import ml_collections

from configs import common


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    _, opts = common.parse_variant(variant, "configs/shapes_lora.py", (), {"smoke": False})
    c = common.load("shapes_pretrain.py", "smoke" if opts["smoke"] else None)
    c.name = "shapes_lora"
    c.pretrain.config = common.path("shapes_pretrain.py", opts["smoke"])
    c.peft = dict(lora=dict(targets=[r"language_model/.*_proj"], rank=8, alpha=16.0, dropout=0.05))
    opt = common.adamw(3e-3)
    c.stages = [dict(name="lora", steps=400, trainable=[["peft/lora/.*", "lora"]], optimizer=opt,
                     methods=["lora"])]
    c.train.domain = "target"
    c.train.max_length = 40
    c.eval.zero_shot = True
    if opts["smoke"]:
        common.shrink_for_smoke(c)
    return c
