"""KLAFT (seed 000) on the shapes world: the source-pretrained prefix VLM adapted to the target (expressive)
caption style, KLAFT's setting of a plain -> expressive caption gap.

``python run.py train --config configs/shapes_klaft.py:VARIANT`` runs one variant;
``python run.py sweep --config configs/shapes_klaft.py --sweep table2 --seeds 0,1,2,3`` the Table 2 analogue and
``--sweep table4`` the Table 4 analogue (one table and plot each). Every variant starts from the same cached base
(``configs/shapes_pretrain.py``) and trains the same number of steps on target-style captions.

Variants:

- ``finetune``: the base fine-tuned (every weight) without KLAFT (Table 2's "without KLAFT" rows).
- ``klaft``: the same fine-tuning plus KLAFT's components: one MAM block on top of the decoder
  (``peft.mam``: R3 masks, gate threshold μ = 0.2, ITM and MRM), TCM below the LM head (``peft.tcm``: K = 10,
  ω = 0.2, addition) and the losses of Eq. 9 (``loss_weights``: λ_TTM = λ_MRM = λ_ITM = 0.1; the caption NLL
  is the TCM mixture likelihood of Eq. 3). Seed 000 Table 2 S1-S3 ("GPT-2 fine-tuned").
- ``tcm``: the PEFT variant (Table 2 S6): the base frozen, TCM + TTM only.
- ``lora``, ``prefix``, ``prompt``, ``bitfit``: PEFT baselines at their own parameter counts (as in
  ``configs/shapes_compare_003.py``; the LLaMA-style decoder has no biases, so BitFit tunes those of the vision
  tower and the Mapping Layer).
- Table 4 ablations of ``klaft``: ``no_tcm``, ``no_mam`` (the MAM block with one conventional prefix-LM mask
  and no gate, "MAM(w/o)"), ``no_ttm``, ``no_mrm``, ``no_itm``, ``mult`` / ``affine`` (TCM functions), ``k2``,
  ``k5``, ``k20`` (number of topics), ``omega0`` (ω = 0).

Options: ``frac=X`` trains on that fraction of the training images (Table 2's data regimes; the shapes world
has 2,000 training images, so the paper's 0.1 % / 1 % / 100 % of COCO become 5 % / 20 % / 100 % here: 100,
400 and 2,000 images, the smallest still more than a few batches), ``lr=X`` the learning rate,
``smoke`` a seconds-long run for tests.

Example:
    >>> SWEEPS["table4"][:3]
    ['klaft', 'no_tcm', 'no_mam']
"""

import ml_collections

from configs import common

BASELINES = ("lora", "prefix", "prompt", "bitfit")
ABLATIONS = ("no_tcm", "no_mam", "no_ttm", "no_mrm", "no_itm", "mult", "affine", "k2", "k5", "k20", "omega0")
VARIANTS = ("klaft", "finetune", "tcm", *BASELINES, *ABLATIONS)
FRACTIONS = (0.05, 0.2)
SWEEPS = {
    "table2": [f"{v},frac={f}" for f in FRACTIONS for v in ("finetune", "klaft")]
    + ["finetune", "klaft", "tcm", *BASELINES],
    "table4": ["klaft", *ABLATIONS],
}
FULL_LR, PEFT_LR, NEW_LR = 5e-4, 3e-3, 3e-3  # fine-tuned base, PEFT methods, KLAFT's new modules
STEPS = 400


def tcm_settings(variant: str) -> dict:
    tcm = dict(method="tcm", num_topics=10, omega=0.2, function="addition")
    tcm.update({"mult": dict(function="multiplication"), "affine": dict(function="affine"),
                "k2": dict(num_topics=2), "k5": dict(num_topics=5), "k20": dict(num_topics=20),
                "omega0": dict(omega=0.0), "no_ttm": dict(ttm="off")}.get(variant, {}))
    return tcm


def mam_settings(variant: str, dec: ml_collections.ConfigDict) -> dict:
    mam = dict(method="mam", mam_layers="top", mam_masks="r3", mu=0.2, num_visual=16, max_length=64,
               num_heads=dec.num_attention_heads, itm=True, mrm=True)
    mam.update({"no_mam": dict(mam_masks="conventional"), "no_mrm": dict(mrm=False),
                "no_itm": dict(itm=False)}.get(variant, {}))
    return mam


def get_config(variant: str = "klaft") -> ml_collections.ConfigDict:
    name, opts = common.parse_variant(variant, "configs/shapes_klaft.py", VARIANTS,
                                      {"smoke": False, "frac": 1.0, "lr": 0.0}, default="klaft")
    smoke = opts["smoke"]
    c = common.load("shapes_pretrain.py", "smoke" if smoke else None)
    suffix = "" if opts["frac"] == 1.0 else f"_frac{opts['frac']:g}"
    c.name = f"shapes_klaft_{name}{suffix}"
    c.pretrain.config = common.path("shapes_pretrain.py", smoke)
    c.train.domain = "target"
    c.train.max_length = 40
    c.train.data_fraction = opts["frac"]
    c.eval.zero_shot = True
    dec = c.model.decoder
    if name in BASELINES or name == "tcm":
        method = tcm_settings(name) if name == "tcm" else (
            dict(method="bitfit") if name == "bitfit" else common.baseline_method(name, dec))
        c.peft = {name: method}
        c.loss_weights = dict(ttm=0.1)
        # BitFit trains the base's own biases in place; the other methods their own parameters
        trainable = [["base/.*/bias", name]] if name == "bitfit" else [[f"peft/{name}/.*", name]]
        c.stages = [dict(name=name, steps=STEPS, trainable=trainable, optimizer=common.adamw(opts["lr"] or PEFT_LR),
                         methods=[name])]
    else:  # finetune, klaft and its ablations: every base weight trains, KLAFT's modules beside it
        peft = {}
        if name != "finetune":
            peft["mam"] = mam_settings(name, dec)
            if name != "no_tcm":
                peft["tcm"] = tcm_settings(name)
        c.peft = peft
        c.loss_weights = dict(ttm=0.1, mrm=0.1, itm=0.1)
        opt = common.adamw(opts["lr"] or FULL_LR)
        opt["groups"] = {k: common.adamw(NEW_LR, clip_norm=None) for k in peft}
        trainable = [["base/.*", "full"]] + [[f"peft/{k}/.*", k] for k in peft]
        c.stages = [dict(name="adapt", steps=STEPS, trainable=trainable, optimizer=opt, methods=list(peft))]
    if smoke:
        common.shrink_for_smoke(c)
        for m in c.peft.values():
            if m.get("method") == "mam":
                m["num_heads"] = 2
    return c
