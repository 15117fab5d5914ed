"""The main job: adapt the source-pretrained shapes VLM to the target caption style with LoRA.

``python run.py`` runs this. It reuses (or first trains) the base of ``configs/shapes_pretrain.py``,
adds LoRA (rank 8, alpha 16, dropout 0.05) to every projection of the decoder, trains the LoRA factors
on target-domain captions, and reports zero-shot vs adapted scores on both domains.
"""

from pathlib import Path

import ml_collections

from vlpeft_jax.cli.config import load_config_file
from vlpeft_jax.experiments.captioning import shrink_for_smoke


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    here = Path(__file__).resolve().parent
    c = load_config_file(here / "shapes_pretrain.py", variant or None)
    c.name = "shapes_lora"
    c.pretrain.config = str(here / "shapes_pretrain.py")
    c.peft = dict(lora=dict(targets=[r"language_model/.*_proj"], rank=8, alpha=16.0, dropout=0.05))
    opt = dict(name="adamw", learning_rate=3e-3, weight_decay=0.0, warmup_steps=30, schedule="cosine",
               clip_norm=1.0)
    c.stages = [dict(name="lora", steps=400, trainable=[["peft/lora/.*", "lora"]], optimizer=opt,
                     methods=["lora"])]
    c.train.domain = "target"
    c.train.max_length = 40
    c.eval.zero_shot = True
    if variant == "smoke":
        c.pretrain.config += ":smoke"
        shrink_for_smoke(c)
    return c
