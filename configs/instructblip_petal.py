"""PETAL (seed 001) on an InstructBLIP checkpoint (Vicuna/LLaMA or Flan-T5 LM): COCO captions or VQAv2 (``:vqa``).

``python run.py train --config configs/instructblip_petal.py --config.model.hf_dir=DIR --config.data.root=DIR``
(folders as in ``configs/instructblip_lora.py``). The Q-Former reads the task's three Table 7 "original
instructions" stacked as one paragraph (seed 001 Sec. 3.3; spec A13-A15) and the language model the
task-specific instruction (Table 7: captions "A photo of", VQA "Question: {question} Short answer:"). PETAL's
defaults are the paper's (R = 64, K = 3, M = 64, λ_IB = 0.05, η = 0.1; :mod:`vlpeft_jax.peft.petal`); the IB
estimators train in their own optimizer group at 10× the learning rate without weight decay (spec A20), and Γ,
λ and the mode vectors are not decayed (spec §5). Learning rate 2e-5 with 1,000 warm-up steps and AdamW
weight decay 0.02 (Sec. 4.1; our warm-up starts at 0, the paper's at 1e-6).

Options: ``smoke`` (seconds, for tests), ``counts`` (no run: ``python run.py params --config
configs/instructblip_petal.py:counts`` prints App. E's count on the real InstructBLIP shapes, abstract, nothing
downloaded or allocated).
"""

import ml_collections

from configs import common
from vlpeft_jax.data.shapes import CAPTION_INSTRUCTIONS, VQA_INSTRUCTIONS

VARIANTS = ("captions", "vqa")
def real_shapes_model() -> dict:
    """InstructBLIP (Vicuna-7B) shapes for abstract counting: EVA ViT-g/14 (1408 wide, 39 layers), the
    Q-Former (768 wide, 12 layers, cross-attention every 2nd, 32 queries), a LLaMA-7B LM."""
    return dict(
        family="qformer_vlm",
        vision=dict(family="vit", image_size=224, patch_size=14, hidden_size=1408, num_hidden_layers=39,
                    num_attention_heads=16, intermediate_size=6144, add_pooling_layer=False),
        qformer=dict(vocab_size=30523, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, cross_attention_frequency=2, num_query_tokens=32,
                     max_position_embeddings=512),
        decoder=dict(family="llama", vocab_size=32001, hidden_size=4096, intermediate_size=11008,
                     num_hidden_layers=32, num_attention_heads=32))


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    name, opts = common.parse_variant(variant, "configs/instructblip_petal.py", VARIANTS,
                                      {"smoke": False, "counts": False}, default="captions")
    petal = dict(method="petal", rank=64, num_experts=3, expert_width=64, ib_weight=0.05)
    if name == "captions":
        prompt = dict(format=dict(template="{prompt}", qformer_template="\n".join(CAPTION_INSTRUCTIONS)),
                      caption="A photo of")
        c = common.checkpoint_config("instructblip_petal", "captioning", peft={"petal": petal}, prompt=prompt,
                                     learning_rate=2e-5, steps=5000)
    else:
        prompt = dict(format=dict(template="Question: {question} Short answer:",
                                  qformer_template="\n".join(VQA_INSTRUCTIONS)))
        c = common.checkpoint_config("instructblip_petal_vqa", "vqa", peft={"petal": petal}, prompt=prompt,
                                     learning_rate=2e-5, steps=5000)
    if opts["counts"]:  # abstract only: the real shapes without a checkpoint (run.py params)
        del c["task"]  # no data: the model's shapes only
        c.model = real_shapes_model()
        c.peft.petal.ib_weight = 0.0  # App. E counts no estimators
    c.stages = [common.petal_stage(c.peft.petal.to_dict(), common.adamw(2e-5, weight_decay=0.02, warmup_steps=1000),
                                   {"learning_rate": 2e-4, "weight_decay": 0.0}, 5000)]
    if opts["smoke"]:
        common.shrink_checkpoint_run(c)
        c.peft.petal.update(rank=4, expert_width=4, gate_width=4)
    return c
