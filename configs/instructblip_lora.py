"""Adapt an InstructBLIP checkpoint (Vicuna/LLaMA or Flan-T5 LM) with LoRA on COCO captions or VQAv2 (``:vqa``).

``python run.py train --config configs/instructblip_lora.py --config.model.hf_dir=DIR --config.data.root=DIR``
(folders as in ``configs/llava_lora.py``). LoRA (rank 8, alpha 16, dropout 0.05) on the language model's query
and value projections (LLaMA's ``q_proj``/``v_proj``, T5's ``SelfAttention``/``EncDecAttention`` ``q``/``v``);
option ``qformer`` adds the Q-Former's query and value projections (``query``/``value``: the module PETAL
tunes, seed 001). The instruction goes to the Q-Former and to the LM (InstructBLIP, Dai et al. 2023):
captioning "A short image caption:", VQA "Question: {question} Short answer:" (the VQA template of
InstructBLIP's appendix and of PETAL, seed 001 Table 7). ``,smoke`` is a seconds-long run for tests.
"""

import ml_collections

from configs import common

VARIANTS = ("captions", "vqa")
LM_TARGETS = [r"language_model/.*/(q_proj|v_proj|SelfAttention/q|SelfAttention/v|EncDecAttention/q|EncDecAttention/v)"]
QFORMER_TARGETS = [r"qformer/.*attention/(query|value)"]


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    name, opts = common.parse_variant(variant, "configs/instructblip_lora.py", VARIANTS,
                                      {"smoke": False, "qformer": False}, default="captions")
    targets = LM_TARGETS + (QFORMER_TARGETS if opts["qformer"] else [])
    lora = dict(targets=targets, rank=8, alpha=16.0, dropout=0.05)
    if name == "captions":
        prompt = dict(format="instructblip", caption="A short image caption:")
        c = common.checkpoint_config("instructblip_lora", "captioning", peft={"lora": lora}, prompt=prompt,
                                     learning_rate=1e-4, steps=2000)
    else:
        prompt = dict(format=dict(template="Question: {question} Short answer:"))
        c = common.checkpoint_config("instructblip_lora_vqa", "vqa", peft={"lora": lora}, prompt=prompt,
                                     learning_rate=1e-4, steps=2000)
    if opts["smoke"]:
        common.shrink_checkpoint_run(c)
    return c
