"""Pretrain a tiny prefix VLM (ViT -> MLP Mapping Layer -> LLaMA-style decoder) on source-domain captions.

``python run.py train --config configs/shapes_pretrain.py``. The main job (``configs/shapes_lora.py``)
reuses this run's result as its base (cached under ``.cache/pretrained``), so the model and data
settings here are the ones the adaptation experiments share. ``:smoke`` gives a seconds-long variant
for tests.
"""

import ml_collections

from configs import common


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    _, opts = common.parse_variant(variant, "configs/shapes_pretrain.py", (), {"smoke": False})
    c = ml_collections.ConfigDict()
    c.task = "captioning"
    c.name = "shapes_pretrain"
    c.seed = 0
    c.run_dir = ""
    c.data = dict(kind="shapes", cache_dir=".cache/shapes", seed=0, image_size=64, num_train=2000, num_val=200,
                  num_test=200, num_ood=200, num_captions=5)
    c.model = dict(
        family="prefix_vlm",
        vision=dict(family="vit", image_size=64, patch_size=16, hidden_size=96, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=192, add_pooling_layer=False),
        connector=dict(kind="mlp", num_layers=2, feature="patches"),
        decoder=dict(family="llama", vocab_size=0, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    )
    c.peft = {}
    opt = common.adamw(2e-3, weight_decay=0.01, warmup_steps=50)
    c.stages = [dict(name="pretrain", steps=700, trainable=[["base/.*", "full"]], optimizer=opt, methods=[])]
    c.train = dict(domain="source", batch_size=32, max_length=24, checkpoint_every=0, progress=True)
    c.eval = dict(split="val", max_examples=0, batch_size=50, method="greedy", num_beams=1, length_penalty=1.0,
                  max_new_tokens=40, metrics=["BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"], zero_shot=False)
    c.pretrain = dict(config="", cache_dir=".cache/pretrained")
    if opts["smoke"]:
        common.shrink_for_smoke(c)
    return c
