"""Pretrain the shapes VLM of ``configs/shapes_pretrain.py`` on source-style VQA: the base of ``shapes_vqa.py``.

Source-style questions are those the source captions answer (``"a red circle and a blue square"``: which
objects, in which colours): the shapes world's ``color``, ``shape`` and ``existence`` questions. The other
types — ``count``, ``position``, ``relation`` — need what only the target captions state (counts, positions,
relations) and are left for the adaptation. Every training question of a source-style type becomes
``<bos> Question: {q} Short answer: {answer} <eos>`` with the image as prefix (PETAL's VQA instruction,
seed 001 Table 7), loss on the answer only.

Two stages, from a random initialisation: ``align`` trains the Mapping Layer and the decoder with the vision
tower frozen at its random initialisation, then ``pretrain`` trains everything at a lower rate. Why: trained
jointly from the start (one stage, all parameters, 600-1500 steps, learning rates 5e-4 to 5e-3, with or
without source captions mixed in), the model only learned the answer priors (e.g. ``purple`` to every colour
question): within the first ~25 steps the vision tower's image-dependent output shrinks (its std across
images fell from 0.11 to 0.03), the gradient reaching it falls to ~1e-3 of the decoder's, and the visual
tokens stop carrying the image. A frozen random tower keeps its features (a linear probe on them reads a
single object's colour at ~0.9), and the decoder learns to read them.

``python run.py train --config configs/shapes_vqa_pretrain.py`` trains and evaluates it alone (5-7
minutes on 2 CPU cores); ``configs/shapes_vqa.py`` reuses it (cached under ``.cache/pretrained``). ``:smoke``
is seconds long.
"""

import ml_collections

from configs import common

SOURCE_STYLE = ("color", "shape", "existence")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    _, opts = common.parse_variant(variant, "configs/shapes_vqa_pretrain.py", (), {"smoke": False})
    c = common.load("shapes_pretrain.py")  # the same model and world as the captioning experiments
    c.task = "vqa"
    c.name = "shapes_vqa_pretrain"
    c.stages = [
        dict(name="align", steps=2000, trainable=[["base/(multi_modal_projector|language_model)/.*", "full"]],
             optimizer=common.adamw(1e-3, weight_decay=0.01, warmup_steps=50), methods=[]),
        dict(name="pretrain", steps=1000, trainable=[["base/.*", "full"]],
             optimizer=common.adamw(5e-4, weight_decay=0.01, warmup_steps=50), methods=[]),
    ]
    c.train = dict(question_types=list(SOURCE_STYLE), captions="", batch_size=32, max_length=24,
                   checkpoint_every=0, progress=True)
    c.eval = dict(split="val", max_examples=0, batch_size=100, method="greedy", num_beams=1, length_penalty=1.0,
                  max_new_tokens=5, zero_shot=False)
    if opts["smoke"]:
        common.shrink_for_smoke(c)
    return c
