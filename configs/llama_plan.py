"""LLaMA-7B and LLaMA-13B shapes for memory plans (``run.py plan``): LoRA, NeuroAda and full fine-tuning.

``python run.py plan --config configs/llama_plan.py:7b_lora --mesh fsdp=8 --device-memory 80GB`` compiles the
train step on abstract shapes for 8 (simulated) devices and prints what one device holds. Nothing here is
ever allocated, and there are no weights or data: the configs have no task, so the plan uses next-token
cross-entropy over ``[batch, seq]`` tokens.

Variants ``{7b,13b}_{lora,lora_all,neuroada,full}``; options ``,tiny`` (a 2-layer width-64 model of the same
structure, for tests) and ``,bf16`` (bfloat16 compute):

- ``lora``: rank 16 (alpha 32) on ``q_proj`` and ``v_proj`` of every layer (the LoRA paper's choice);
  ``lora_all``: rank 16 on all seven projections (q, k, v, o, gate, up, down; QLoRA's choice).
- ``neuroada``: NeuroAda with k = 1 on the seven projections, as ``configs/llama7b_neuroada.py`` (top1).
- ``full``: every base parameter trains.

All use AdamW. Parameters and the optimizer state are float32: ``LlamaConfig`` has no parameter dtype (its
``dtype`` is the compute dtype; parameters stay float32 master weights). The compute dtype is float32 by
default because simulated devices are CPU devices, and XLA:CPU computes bfloat16 dots in float32, keeping
converted copies of every weight alive for the backward pass: LLaMA-7B LoRA on one device, batch 1 x 512,
measured 30.5 GiB of temporaries with ``,bf16`` against 7.9 GiB in float32. On an accelerator, where
bfloat16 dots are native, plan with ``,bf16``.

7B: hidden 4096, intermediate 11008, 32 layers, 32 heads; 13B: hidden 5120, intermediate 13824, 40 layers,
40 heads; both vocabulary 32000, untied head.
"""

import ml_collections

from configs import common

SIZES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
}
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
METHODS = ("lora", "lora_all", "neuroada", "full")
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = tuple(f"{size}_{method}" for size in SIZES for method in METHODS)


def get_config(variant: str = "7b_lora") -> ml_collections.ConfigDict:
    variant, opts = common.parse_variant(variant, "configs/llama_plan.py", VARIANTS, {"tiny": False, "bf16": False},
                                         default="7b_lora")
    size, method = variant.split("_", 1)
    c = ml_collections.ConfigDict()
    c.name = f"llama{size}_{method}" + ("_tiny" if opts["tiny"] else "") + ("_bf16" if opts["bf16"] else "")
    c.seed = 0
    c.model = {"family": "llama", "vocab_size": 32000, "tie_word_embeddings": False,
               "dtype": "bfloat16" if opts["bf16"] else "float32", **(TINY if opts["tiny"] else SIZES[size])}
    opt = dict(name="adamw", learning_rate=1e-4)
    if method in ("lora", "lora_all"):
        targets = ["q_proj", "v_proj"] if method == "lora" else PROJECTIONS
        c.peft = dict(lora=dict(method="lora", targets=targets, rank=16, alpha=32.0))
        c.stages = [dict(name="lora", steps=1, trainable=[["peft/lora/.*", "lora"]], methods=["lora"],
                         optimizer=opt)]
    elif method == "neuroada":
        c.peft = dict(neuroada=dict(method="neuroada", k=1, targets=PROJECTIONS))
        # values only: the int32 indices stored beside them are static and must not be trained
        c.stages = [dict(name="neuroada", steps=1, trainable=[["peft/neuroada/.*/values", "neuroada"]],
                         methods=["neuroada"], optimizer=opt)]
    else:
        c.peft = {}
        c.stages = [dict(name="full", steps=1, trainable=[["base/.*", "full"]], optimizer=opt)]
    return c
