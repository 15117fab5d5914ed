"""Sparse neuron-wise tuning on the shapes world (thesis ch. 5, Figs. 5.6 and 5.7, Table 5.2 at small scale).

Adapts the source-pretrained shapes VLM (``configs/shapes_pretrain.py``) to the target caption style with
NeuroAda on every projection of the decoder, or with LoRA at an equal trainable budget.
``python run.py train --config configs/shapes_sparse.py:VARIANT``; variants:

- ``top1``, ``top2``, ``top20``: NeuroAda, top-k by ``|W|`` per neuron (Table 5.2's top-1 / top-20);
- ``magnitude``, ``gradient``, ``reverse``, ``random``: the selection strategies of Fig. 5.7 at k = 4
  (``gradient``: ``|∇W|`` of the caption loss over ``selection.num_batches`` batches of target captions);
- ``gps``, ``gps_top1``: GPS (thesis ch. 4), the mask-based reference: gradient selection at k = 4 / 1,
  the selected entries of the base kernels trained in place through a masked optimizer (dense state);
- ``coverage25``, ``coverage50``, ``coverage75``, ``coverage100``: that % of each projection's neurons
  involved, at the trainable budget of k = 4 with all neurons (Fig. 5.6);
- ``lora_r1``, ``lora_r2``: LoRA on the same projections, with as many trainable values as ``top2`` and
  ``magnitude`` (k = 4) respectively (each projection ``d_in x d_out`` has ``r (d_in + d_out)`` LoRA
  values and ``k d_out`` NeuroAda values; the decoder's shapes make those equal).

Append ``,smoke`` (e.g. ``top1,smoke``) for a seconds-long run.
``python run.py sweep --config configs/shapes_sparse.py --sweep table`` runs the table (target-domain
metrics against trainable %, ``sweep_params.png``); ``--sweep repeats --seeds 0,1,2`` repeats seven of its
rows over three seeds into the same output directory (finished runs are reused).

Example:
    >>> SWEEPS["table"][:3]
    ['top1', 'top2', 'top20']
"""

import ml_collections

from configs import common

TARGETS = r"language_model/.*_proj"
NEUROADA = {
    "top1": dict(k=1), "top2": dict(k=2), "top20": dict(k=20),
    "magnitude": dict(k=4, selection="magnitude"), "gradient": dict(k=4, selection="gradient"),
    "reverse": dict(k=4, selection="reverse"), "random": dict(k=4, selection="random"),
    **{f"coverage{p}": dict(neuron_fraction=p / 100, coverage=True) for p in (25, 50, 75, 100)},
}
LORA = {"lora_r1": 1, "lora_r2": 2}
GPS = {"gps": 4, "gps_top1": 1}
SWEEPS = {"table": ["top1", "top2", "top20", "magnitude", "gradient", "reverse", "random", "gps", "gps_top1",
                    "coverage25", "coverage50", "coverage75", "coverage100", "lora_r1", "lora_r2"],
          # the rows repeated over seeds 0, 1, 2 (``--seeds 0,1,2``) to show the seed-to-seed spread
          "repeats": ["top1", "top20", "magnitude", "random", "gps", "lora_r1", "lora_r2"]}
COVERAGE_K = 4


def decoder_neurons(decoder: dict) -> int:
    """Output units of q, k, v, o, gate, up, down summed over the decoder's layers."""
    d, m = decoder["hidden_size"], decoder["intermediate_size"]
    heads = decoder["num_attention_heads"]
    kv = decoder.get("num_key_value_heads") or heads
    per_layer = d + 2 * (d // heads) * kv + d + 2 * m + d
    return per_layer * decoder["num_hidden_layers"]


def get_config(variant: str = "top1") -> ml_collections.ConfigDict:
    name, opts = common.parse_variant(variant, "configs/shapes_sparse.py", [*NEUROADA, *GPS, *LORA],
                                      {"smoke": False}, default="top1")
    smoke = opts["smoke"]
    c = common.load("shapes_pretrain.py", "smoke" if smoke else None)
    c.name = f"shapes_sparse_{name}"
    c.pretrain.config = common.path("shapes_pretrain.py", smoke)
    opt = common.adamw(3e-3)
    c.selection = dict(num_batches=8, domain="target")
    if name in GPS:
        # GPS trains selected base entries in place: its stage rules and masked optimizer come with the method
        c.peft = dict(gps=dict(method="gps", targets=[TARGETS], k=GPS[name], selection="gradient"))
        opt["learning_rate"] = 1e-2  # the same step as NeuroAda's deltas: the same entries, trained in place
        c.stages = [dict(name="gps", steps=400, trainable=[], optimizer=opt, methods=["gps"])]
    elif name in LORA:
        r = LORA[name]
        c.peft = dict(lora=dict(targets=[TARGETS], rank=r, alpha=2.0 * r))
        c.stages = [dict(name="lora", steps=400, trainable=[["peft/lora/.*", "lora"]], optimizer=opt, methods=["lora"])]
    else:
        settings = dict(NEUROADA[name])
        if settings.pop("coverage", False):
            # the same number of trainable values as k = 4 on every neuron, spread over fewer neurons
            settings["budget"] = float(COVERAGE_K * decoder_neurons(c.model.decoder.to_dict()))
        c.peft = dict(neuroada=dict(method="neuroada", targets=[TARGETS], **settings))
        # sparse deltas start at zero on a handful of weights per neuron: a larger step than LoRA's
        opt["learning_rate"] = 1e-2
        c.stages = [dict(name="neuroada", steps=400, trainable=[["peft/neuroada/.*/values", "neuroada"]],
                         optimizer=opt, methods=["neuroada"])]
    c.train.domain = "target"
    c.train.max_length = 40
    c.eval.zero_shot = True
    if smoke:
        common.shrink_for_smoke(c)
    return c
