"""Pretrain a tiny InstructBLIP-like model (ViT -> Q-Former -> linear -> LLaMA-style decoder) on the shapes world.

The base PETAL (seed 001) and its baselines adapt: a Q-Former with 8 learned query tokens that also reads an
instruction text (InstructBLIP), its query outputs projected to the decoder's width and prepended to the text.
Every parameter trains, from a random initialisation, on the Q-Former text ``model.qformer_text="task"`` (the
task instruction, standard InstructBLIP; spec A29). An adaptation config that sets ``model.qformer_text``
otherwise (PETAL's ``"instructions"``) still reuses this base: the runner keeps the pretrain's own text setting.

Variants:

- ``captions`` (default): source-domain captions, ``"A photo of"`` to the Q-Former, like
  ``configs/shapes_pretrain.py`` (700 steps).
- ``vqa``: source-style questions (``color``, ``shape``, ``existence``; see ``configs/shapes_vqa_pretrain.py``),
  ``"Question: {q} Short answer:"`` to the Q-Former and the LM; the same two stages as there (the Mapping
  Layer's role is the Q-Former's and the projection's here).

Option ``generalist`` (PETAL's base, ``configs/shapes_petal.py``): an instruction-following base trained on both
caption styles, each asked for by its own Q-Former instruction (``train.domain="styled"``: "A photo of" for the
plain captions, "where are the shapes in the image?" for the expressive ones), or on every question type, so that
its frozen language model knows the words of every answer, as InstructBLIP's LLM does; PETAL then tunes only the
Q-Former to the target task. Option ``smoke``: a
seconds-long run for tests (smaller towers, a 32-wide Q-Former).

Sizes: ViT as ``shapes_pretrain`` (64 px, patch 16, width 96, 2 layers); Q-Former width 64, 2 layers, 4 heads,
intermediate 128, ``cross_attention_frequency`` 1 (both layers cross-attend to the image), 8 query tokens,
text up to ``qformer_max_length`` 64 tokens; decoder as ``shapes_pretrain`` (LLaMA width 128, 3 layers).

``python run.py train --config configs/shapes_qformer_pretrain.py`` trains and evaluates it alone; adaptation
configs reference it with ``c.pretrain.config = common.path("shapes_qformer_pretrain.py", smoke)``.
"""

import ml_collections

from configs import common

VARIANTS = ("captions", "vqa")
SOURCE_STYLE = ("color", "shape", "existence")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    name, opts = common.parse_variant(variant, "configs/shapes_qformer_pretrain.py", VARIANTS,
                                      {"smoke": False, "generalist": False}, default="captions")
    c = common.load("shapes_pretrain.py")  # the same world, vision tower, decoder and training set-up
    c.name = "shapes_qformer_pretrain" if name == "captions" else "shapes_qformer_vqa_pretrain"
    c.model = dict(
        family="qformer_vlm",
        vision=c.model.vision.to_dict(),
        qformer=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     cross_attention_frequency=1, num_query_tokens=8, qformer_text_input=True, vocab_size=0,
                     max_position_embeddings=64),
        decoder=c.model.decoder.to_dict(),
        qformer_text="task",
        qformer_max_length=64,
    )
    if name == "vqa":
        v = common.load("shapes_vqa_pretrain.py")
        c.task = "vqa"
        c.stages = [dict(s) for s in v.stages]
        # the align stage trains what maps the image into the LM: here the Q-Former and its projection
        c.stages[0]["trainable"] = [["base/(qformer|language_projection|language_model)/.*", "full"]]
        c.train = v.train.to_dict()
        c.eval = v.eval.to_dict()
    if opts["generalist"]:  # both caption styles / every question type: the base knows every answer's words
        c.name += "_generalist"
        if name == "vqa":
            from vlpeft_jax.data.shapes import QUESTION_TYPES

            c.train.question_types = list(QUESTION_TYPES)
        else:
            c.train.domain = "styled"
            # two stages as the VQA base: trained jointly from the start the Q-Former learned no image use (one
            # caption for all 200 validation images); with the tower frozen at its random initialisation first,
            # the Q-Former's cross-attention learns to read its features (seed 001: InstructBLIP's ViT is frozen)
            c.stages = [
                dict(name="align", steps=2000, trainable=[["base/(qformer|language_projection|language_model)/.*",
                                                            "full"]],
                     optimizer=common.adamw(1e-3, weight_decay=0.01, warmup_steps=50), methods=[]),
                dict(name="pretrain", steps=700, trainable=[["base/.*", "full"]],
                     optimizer=common.adamw(5e-4, weight_decay=0.01, warmup_steps=50), methods=[]),
            ]
    if opts["smoke"]:
        common.shrink_for_smoke(c)
        c.model.qformer.update(hidden_size=32, intermediate_size=64, num_attention_heads=2)
    return c
