"""Linear probe: two classification heads on a frozen ViT over the shapes world.

``python run.py train --config configs/shapes_classify.py`` (well under a minute on a 2-core CPU);
``:smoke`` is a seconds-long variant for tests; ``:finetune`` (also ``:finetune,smoke``) trains the whole
model instead, as a reference. Task ``classification`` (:mod:`vlpeft_jax.tasks.classification`)
with one single-label head (``count``, 4 classes, softmax) and one multi-label head (``shape_presence``,
5 classes, sigmoid) on the class token of a small ViT (``model.family='vision_classifier'``; the tower has
the sizes of ``configs/shapes_pretrain.py``'s, so a captioning-pretrained tower would fit it). Only the heads
train (``linear_probe('heads')``); the tower stays bit-identical.

Choices:
- No pretraining of the tower: the probe reads a *randomly initialised* ViT (random features), so the
  table measures what a linear read-out of such features recovers against the label prior. The runner's
  pretrain cache trains a base with this run's own model (heads included), which would hand the probe
  already-trained heads, so a cheap "pretrain the tower on other labels, then probe" needs the runner to
  take a subtree (``vision_tower``) from another model's cache; not done here.
- ``eval.zero_shot=False``: the heads start at random, so "zero-shot" is chance by construction; the task
  reports the label prior's own scores instead (``chance accuracy``, ``chance mAP`` columns).
- The class token (``pool='cls'``) rather than the mean of the patch tokens: on these random features it
  probes far better (val count accuracy 0.53 vs 0.32; 2000 steps instead of 600 change little).
- The world is that of ``configs/shapes_pretrain.py`` (same data settings and cache).
"""

import ml_collections

from configs import common
from vlpeft_jax.data import shapes
from vlpeft_jax.train import presets


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    kind, opts = common.parse_variant(variant, "configs/shapes_classify.py", ("probe", "finetune"), {"smoke": False},
                                      default="probe")
    c = ml_collections.ConfigDict()
    c.task = "classification"
    c.name = "shapes_classify"
    c.seed = 0
    c.run_dir = ""
    c.data = dict(kind="shapes", cache_dir=".cache/shapes", seed=0, image_size=64, num_train=2000, num_val=200,
                  num_test=200, num_ood=200, num_captions=5)
    c.heads = ["count", "shape_presence"]
    c.model = dict(
        family="vision_classifier",
        vision=dict(family="vit", image_size=64, patch_size=16, hidden_size=96, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=192, add_pooling_layer=False),
        pool="cls",
    )
    c.peft = {}
    c.stages = [dict(name="probe", steps=600, trainable=presets.linear_probe("heads"),
                     optimizer=common.adamw(1e-2, warmup_steps=20), methods=[])]
    if kind == "finetune":  # reference: the whole model trained from its random initialisation
        c.name = "shapes_classify_finetune"
        c.stages = [dict(name="finetune", steps=600, trainable=presets.full_finetuning(),
                         optimizer=common.adamw(1e-3, weight_decay=0.01, warmup_steps=50), methods=[])]
    c.train = dict(batch_size=64, checkpoint_every=0, progress=True)
    c.eval = dict(split="val", max_examples=0, batch_size=100, zero_shot=False)
    c.pretrain = dict(config="", cache_dir=".cache/pretrained")
    if opts["smoke"]:
        common.shrink_for_smoke(c)
    c.model.heads = heads_for(c)
    return c


def heads_for(c: ml_collections.ConfigDict) -> dict[str, int]:
    """``{label: number of classes}`` of ``c.heads`` on ``c.data``'s world (what the task fills in), written
    into the config so that ``run.py params`` sees the heads without building the task."""
    world = {k: v for k, v in c.data.to_dict().items() if k not in ("kind", "cache_dir")}
    classes = shapes.ShapesWorldConfig(**world).label_classes()
    return {h: len(classes[h]) for h in c.heads}
