"""PETAL (seed 001) on the shapes world: the tiny InstructBLIP-like base (``configs/shapes_qformer_pretrain.py``)
adapted by tuning only its Q-Former, against the paper's baselines.

The base (``shapes_qformer_pretrain.py:generalist``: Q-Former, projection and LM on a frozen random tower, then all
weights) follows two caption instructions given
to its Q-Former: "A photo of" gives plain (source) captions, "where are the shapes in the image?" expressive
(target) ones, as InstructBLIP follows instructions and its LLM knows the words of any caption. The adaptation
trains on target captions with each method's own Q-Former text (PETAL: its three instructions; baselines: "A
photo of", which the base answers in the source style): the Q-Former has to learn to ask for the target style.
Two earlier set-ups were uninformative and are not used: from the source-only base (whose frozen LM never
produced target words) PETAL stayed at target CIDEr-D 0.2; from a base trained on both styles under one
instruction (which answers in the source style) PETAL did not move it in 400 steps (target CIDEr-D 6.1 against
7.1 zero-shot, 3 seeds).

``python run.py train --config configs/shapes_petal.py:VARIANT`` runs one variant; sweeps (one table and plot
each, ``python run.py sweep --config configs/shapes_petal.py --sweep NAME --seeds 0,1,2``):

- ``table1``: captioning (the base adapted to the expressive *target* captions): PETAL vs
  full Q-Former fine-tuning, head tuning, deep prompts, LLaMA-Adapter and LoRA (Table 1's analogue);
- ``table2``: the same on VQA (the VQA base adapted on every question type; VQA accuracy: Table 2's analogue);
- ``table4``: ablations V1 (no AIM), V2 (no IB), V3 (DMA only), V4 (Γ ≡ 1) and the random instruction, on
  captioning (Table 4);
- ``fig3``: the number of experts K = 1..6 on VQA (Fig. 3);
- ``table3``: PETAL vs LoRA vs full fine-tuning trained on 50 or 150 images (Table 3's few-shot setting).

Variants (the Q-Former has 2 layers of width 64, self- and cross-attention in both: 12 adapted matrices where
InstructBLIP has 54; sizes scaled down with it: R = 8, M = 8, d_g = 8):

- ``petal``: DMA (full core) + AIM (K = 3 bottleneck experts, gate) + SIB (λ_IB = 0.05, η = 0.1); the Q-Former
  reads the task's three Table 7 instructions as one paragraph (``model.qformer_text="instructions"``);
- ``v1`` (no AIM), ``v2`` (no SIB), ``v3`` (DMA only), ``v4`` (Γ ≡ 1), ``random`` (a learnable instruction
  matrix instead of AIM), ``core_cp`` (Eq. 2's CP form), ``code`` (the authors' released experts: uniform mix
  0.6/0.4 of 6 linear experts, no λ, no Γ; their learnable IB weight, CLUB-sample and mean pooling);
  ``k1`` ... ``k6`` (K experts);
- baselines (the Q-Former reads the task instruction, standard InstructBLIP, spec A29): ``lora`` (rank 8 on the
  same 12 matrices), ``head`` (the last Q-Former layer, as the paper's "Head"), ``deep_prompts`` (8 learnable
  key/value prompts in every Q-Former self-attention layer: deep prompt tuning in its P-Tuning v2 form, our
  stand-in for MaPLe's per-layer prompts), ``llama_adapter`` (8 gated adaption prompts in both Q-Former
  layers), ``full`` (every Q-Former weight and the query tokens).

Options: ``vqa`` (the VQA task), ``n=N`` (train on the first N training images: few-shot), ``lr=X``,
``steps=N``, ``smoke`` (seconds, for tests).

Learning rates (not tuned per method, the same for every PEFT method): 3e-3 for PEFT parameters, 5e-4 for
full fine-tuning and head tuning, 1e-2 for the IB estimators (their own group, no weight decay: spec A20 asks
for 10× the PETAL rate, which at our 3e-3 would be 3e-2 for freshly initialised networks).

Example:
    >>> SWEEPS["table4"]
    ['petal', 'v1', 'v2', 'v3', 'v4', 'random']
"""

import ml_collections

from configs import common
from vlpeft_jax.errors import ConfigError

PETAL_VARIANTS = ("petal", "v1", "v2", "v3", "v4", "random", "core_cp", "code",
                  *(f"k{k}" for k in range(1, 7)))
BASELINES = ("lora", "head", "deep_prompts", "llama_adapter", "full")
VARIANTS = (*PETAL_VARIANTS, *BASELINES)
COMPARISON = ["petal", "lora", "head", "deep_prompts", "llama_adapter", "full"]
SWEEPS = {
    "table1": COMPARISON,
    "table2": [f"{v},vqa" for v in COMPARISON],
    "table4": ["petal", "v1", "v2", "v3", "v4", "random"],
    "fig3": [f"k{k},vqa" for k in range(1, 7)],
    "table3": [f"{v},n={n}" for n in (50, 150) for v in ("petal", "lora", "full")],
}
PEFT_LR, FULL_LR, ESTIMATOR_LR = 3e-3, 5e-4, 1e-2
STEPS = {"captioning": 400, "vqa": 500}
QFORMER_MATRICES = r"qformer/.*attention/attention/(query|key|value)"
QFORMER_SELF_ATTENTION = r"qformer/encoder/layer_\d+/attention/attention"


def petal_settings(variant: str) -> dict:
    """PETAL's settings for a PETAL variant (the paper's defaults scaled to the tiny Q-Former)."""
    p = dict(method="petal", rank=8, num_experts=3, expert_width=8, gate_width=8, ib_weight=0.05,
             random_instruction_length=16)
    p.update({"v1": dict(aim="none"), "v2": dict(ib_weight=0.0), "v3": dict(aim="none", ib_weight=0.0),
              "v4": dict(gamma=False), "random": dict(aim="random"), "core_cp": dict(core="cp"),
              "code": dict(expert="code", num_experts=6, gate=False, per_modality=False, gamma=False,
                           ib_weight="learnable", zy_estimator="club_sample", ib_pool="mean")}.get(variant, {}))
    if variant.startswith("k") and variant[1:].isdigit():
        p["num_experts"] = int(variant[1:])
    return p


def baseline_settings(variant: str) -> tuple[dict, list]:
    """``(peft, trainable rules)`` of a baseline."""
    if variant == "lora":
        return {"lora": dict(targets=[QFORMER_MATRICES], rank=8, alpha=8.0)}, [["peft/lora/.*", "lora"]]
    if variant == "deep_prompts":
        return ({"prefix": dict(num_virtual_tokens=8, targets=[QFORMER_SELF_ATTENTION])},
                [["peft/prefix/.*", "prefix"]])
    if variant == "llama_adapter":
        return ({"llama_adapter": dict(adapter_len=8, adapter_layers=2, targets=[QFORMER_SELF_ATTENTION])},
                [["peft/llama_adapter/.*", "llama_adapter"]])
    if variant == "head":  # the last Q-Former layer (seed 001 App. B.1: "Head")
        return {}, [["base/qformer/encoder/layer_1/.*", "full"]]
    return {}, [["base/qformer/.*", "full"]]  # full Q-Former fine-tuning (query tokens included)


def get_config(variant: str = "petal") -> ml_collections.ConfigDict:
    name, opts = common.parse_variant(variant, "configs/shapes_petal.py", VARIANTS,
                                      {"smoke": False, "vqa": False, "n": 0, "lr": 0.0, "steps": 0},
                                      default="petal")
    smoke, task = opts["smoke"], "vqa" if opts["vqa"] else "captioning"
    base_variant = ",".join(x for x in ("vqa" if opts["vqa"] else "", "generalist", "smoke" if smoke else "") if x)
    c = common.load("shapes_qformer_pretrain.py", base_variant)
    c.pretrain.config = common.path("shapes_qformer_pretrain.py") + f":{base_variant}"
    suffix = (f"_n{opts['n']}" if opts["n"] else "") + ("_vqa" if opts["vqa"] else "")
    c.name = f"shapes_petal_{name}{suffix}"
    c.eval.zero_shot = True
    if task == "captioning":
        c.train.domain = "target"
        c.train.max_length = 40
    else:
        from vlpeft_jax.data.shapes import QUESTION_TYPES

        c.train.question_types = list(QUESTION_TYPES)
    if opts["n"]:
        if task != "captioning":
            raise ConfigError("configs/shapes_petal.py: n=N (few-shot) is built for captioning only")
        c.train.data_fraction = opts["n"] / c.data.num_train
    steps = opts["steps"] or STEPS[task]
    if name in PETAL_VARIANTS:
        petal = petal_settings(name)
        c.model.qformer_text = "instructions"  # the task's three Table 7 instructions, one paragraph (A13-A14)
        c.peft = {"petal": petal}
        c.stages = [common.petal_stage(petal, common.adamw(opts["lr"] or PEFT_LR, weight_decay=0.02),
                                       common.adamw(ESTIMATOR_LR, clip_norm=None), steps)]
    else:
        c.model.qformer_text = "task"  # standard InstructBLIP input for the baselines (A29)
        peft, trainable = baseline_settings(name)
        c.peft = peft
        lr = opts["lr"] or (FULL_LR if name in ("head", "full") else PEFT_LR)
        c.stages = [dict(name="adapt", steps=steps, trainable=trainable, optimizer=common.adamw(lr),
                         methods=list(peft))]
    if smoke:
        common.shrink_for_smoke(c)
    if "prefix" in c.peft:  # the Q-Former's heads (after any shrinking)
        c.peft.prefix.num_kv_heads = c.model.qformer.num_attention_heads
    return c
