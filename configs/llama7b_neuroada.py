"""NeuroAda on the LLaMA-7B shapes: the trainable-parameter shares of the thesis' Table 5.2.

``python run.py params --config configs/llama7b_neuroada.py:top1`` prints 0.020% and ``:top20`` prints
0.404% (seed ``004_21d0d480fe4006f4.txt``, Table 5.2, LLaMA (7B) rows): k connections for each neuron of
q, k, v, o, gate, up and down in all 32 layers, over the 6.74B base parameters. Everything is computed on
abstract shapes (``jax.eval_shape``), so no memory is needed; there are no weights to train here.
"""

import ml_collections

from configs import common

VARIANTS = {"top1": 1, "top20": 20}


def get_config(variant: str = "top1") -> ml_collections.ConfigDict:
    variant, _ = common.parse_variant(variant, "configs/llama7b_neuroada.py", tuple(VARIANTS), {}, default="top1")
    c = ml_collections.ConfigDict()
    c.name = f"llama7b_neuroada_{variant}"
    c.seed = 0
    c.model = dict(family="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                   num_hidden_layers=32, num_attention_heads=32, tie_word_embeddings=False)
    c.peft = dict(neuroada=dict(method="neuroada", k=VARIANTS[variant],
                                targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    # values only: the int32 indices stored beside them are static and must not be trained
    c.stages = [dict(name="neuroada", steps=1, trainable=[["peft/neuroada/.*/values", "neuroada"]],
                     methods=["neuroada"], optimizer=dict(name="adamw", learning_rate=1e-3))]
    return c
