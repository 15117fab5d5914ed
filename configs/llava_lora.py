"""Adapt a LLaVA checkpoint with LoRA on COCO captions (default) or VQAv2 (``:vqa``).

``python run.py train --config configs/llava_lora.py --config.model.hf_dir=DIR --config.data.root=DIR``, where
the model folder is a ``LlavaForConditionalGeneration`` checkpoint saved by transformers (e.g. llava-1.5-7b-hf)
and the data folder holds COCO 2017 (``annotations/captions_{train,val}2017.json``, ``train2017/``,
``val2017/``) or, for ``:vqa``, VQAv2 (``v2_OpenEnded_mscoco_{train,val}2014_questions.json``,
``v2_mscoco_{train,val}2014_annotations.json``, ``train2014/``, ``val2014/``); other layouts:
``--config.data.splits.train.annotations=...`` etc. (see :mod:`vlpeft_jax.data.sources`).

LoRA (rank 8, alpha 16, dropout 0.05) on the language model's query and value projections, as in LLaVA's
and seed 003's LoRA set-up; option ``vision`` adds the vision tower's query and value projections. Prompts:
captioning uses the checkpoint's own format (its chat template when it has one, else LLaVA-1.5's
``USER: <image>\\n... ASSISTANT:``) with the instruction "Describe the image in one short sentence."; VQA
uses LLaVA-1.5's short-answer prompt (Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning",
Table 7: "Answer the question using a single word or phrase."). ``,smoke`` is a seconds-long run for tests.
"""

import ml_collections

from configs import common

VARIANTS = ("captions", "vqa")
LM_TARGETS = [r"language_model/.*/(q_proj|v_proj)"]
VISION_TARGETS = [r"vision_tower/.*/(q_proj|v_proj)"]


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    name, opts = common.parse_variant(variant, "configs/llava_lora.py", VARIANTS, {"smoke": False, "vision": False},
                                      default="captions")
    targets = LM_TARGETS + (VISION_TARGETS if opts["vision"] else [])
    lora = dict(targets=targets, rank=8, alpha=16.0, dropout=0.05)
    if name == "captions":
        prompt = dict(format="", caption="Describe the image in one short sentence.")
        c = common.checkpoint_config("llava_lora", "captioning", peft={"lora": lora}, prompt=prompt,
                                     learning_rate=2e-4, steps=2000)
    else:
        fmt = dict(template="USER: {image}\n{question}\nAnswer the question using a single word or phrase. "
                            "ASSISTANT:")
        c = common.checkpoint_config("llava_lora_vqa", "vqa", peft={"lora": lora}, prompt=dict(format=fmt),
                                     learning_rate=2e-4, steps=2000)
    if opts["smoke"]:
        common.shrink_checkpoint_run(c)
    return c
